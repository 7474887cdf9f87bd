"""``python -m hf_flop_cli``: the ``hf-flop`` command line, as fast to start as the console script."""

import sys

from . import main

sys.exit(main())
