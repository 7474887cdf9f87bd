"""The application layer: what the ``hf-flop`` command line runs, built on the library.

* ``job`` the ``hf-flop prune`` job, its phases in order, on ``JobOptions`` (``options``); ``state``
  what its phases share; ``card`` the saved model's card; ``gguf_file`` its ``model.gguf`` for llama.cpp;
* ``progress`` what it shows while it works; ``plots`` its PNGs;
* ``lm_eval_run`` ``evaluate_lm`` (exported here as ``hf_flop.app.evaluate_lm``), EleutherAI's
  lm-evaluation-harness on dense and pruned models, what ``hf-flop eval`` runs;
* ``data`` the embedded defaults and the task data it shares with the examples.

The library (``hf_flop`` outside this package) never imports it, and it never imports the command line
``hf_flop_cli``, which builds ``JobOptions`` from its parsed options and calls ``job.run``
(``tests/test_layout.py`` checks both).
"""

from .lm_eval_run import evaluate_lm

__all__ = ["evaluate_lm"]
