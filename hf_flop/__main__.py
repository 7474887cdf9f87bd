"""``python -m hf_flop``: the same command line as ``hf-flop`` (``hf_flop_cli``).

Running a package's ``__main__`` imports the package first, and ``import hf_flop`` registers FLOP with
PEFT and transformers (torch...): this way starts seconds slower than ``hf-flop`` or ``python -m hf_flop_cli``.

The one module of ``hf_flop`` that imports the command line: Python runs it as the entry point and
nothing imports it, so the library still never depends on its CLI (``tests/test_layout.py``).
"""

import sys

from hf_flop_cli import main

sys.exit(main())
