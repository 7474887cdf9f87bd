"""Where the command line was: it is ``hf_flop_cli`` now, so that it can parse before ``import hf_flop``.

``main`` stays importable from here for what names ``hf_flop.cli:main``: a ``hf-flop`` script installed
before the move (``pip install -e .`` again makes it start fast) and callers of ``hf_flop.cli.main``.
"""

from __future__ import annotations

from hf_flop_cli import main

__all__ = ["main"]
