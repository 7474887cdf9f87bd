"""The names a user picks from: pruning levels, gate types, the embedded models and datasets.

Their one home is here, outside ``hf_flop``, because ``hf-flop --help`` lists them and must not
import ``hf_flop`` (whose import loads torch, see ``hf_flop_cli``). ``hf_flop.config`` and
``hf_flop.prune_job`` and ``hf_flop.scores`` read them from here. No imports: keep it that way.
"""

from __future__ import annotations

# FlopConfig.levels entries and FlopConfig.gate values (hf_flop.config checks them)
LEVELS = ("rank", "head", "row", "block", "embedding")
GATES = ("hard_concrete", "topk")
# one-shot unit scores (hf_flop.scores computes them; PruningArguments.oneshot_score takes one)
SCORES = ("magnitude", "activation", "fluctuation", "obs", "sensitivity", "fisher")

# the embedded defaults' short names and what they are: literal copies of hf_flop.app.data's MODELS and DATASETS,
# which resolve and load them by these names (tests/test_cli.py keeps the copies equal)
MODELS = {"minilm": "all-MiniLM-L6-v2 (BERT, 22.7M)", "smollm2": "SmolLM2-135M-Instruct (Llama, 135M)"}
DATASETS = {"rt-sentiment": "Rotten Tomatoes sentences, binary sentiment", "ptb": "Penn Treebank (Mikolov)"}

# FlopConfig field -> (the option that sets it, what it takes): for --help, and for a FlopConfig error, which
# names its field (FlopConfigError.field)
PRUNING_OPTIONS = {
    "target_sparsity": ("--target", "a number in [0, 1)"),
    "levels": ("--levels", f"a comma-separated subset of {','.join(LEVELS)}"),
    "gate": ("--gate", f"one of {', '.join(GATES)}"),
    "round_to": ("--round-to", "a positive integer"),
    "target_modules": ("--target-modules", "a comma-separated list of linear layer names"),
    "uniform_shapes": ("--uniform-shapes", "levels head and/or row only"),
}
