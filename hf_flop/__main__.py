"""``python -m hf_flop``: the same command line as ``hf-flop`` (``hf_flop_cli``).

Running a package's ``__main__`` imports the package first, and ``import hf_flop`` registers FLOP with
PEFT and transformers (torch...): this way starts seconds slower than ``hf-flop`` or ``python -m hf_flop_cli``.
"""

import sys

from hf_flop_cli import main

sys.exit(main())
