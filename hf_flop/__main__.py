"""`python -m hf_flop`: the same command line as `hf-flop`."""

import sys

from .cli import main

sys.exit(main())
