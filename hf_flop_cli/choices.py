"""The names a user picks from: pruning levels, gate types, one-shot scores, the embedded models and datasets.

``hf-flop --help`` lists them and must not import ``hf_flop`` (whose import loads torch, see
``hf_flop_cli``), so this module imports nothing. The levels, gates and scores are defined by the
library (``hf_flop.config.LEVELS`` and ``GATES``, ``hf_flop.scores.SCORES``): these are literal
copies of them, and ``tests/test_vocabulary.py`` checks that each copy equals the library's.
"""

from __future__ import annotations

# copies of hf_flop.config.LEVELS (FlopConfig.levels entries) and hf_flop.config.GATES (FlopConfig.gate values)
LEVELS = ("rank", "head", "query_head", "row", "block", "embedding", "expert", "layer", "hidden")
GATES = ("hard_concrete", "topk")
# a copy of hf_flop.scores.SCORES: the built-in one-shot scores (PruningArguments.oneshot_score takes one)
SCORES = ("magnitude", "activation", "fluctuation", "obs", "sensitivity", "fisher", "block_influence", "skip_loss")
# a copy of hf_flop.groups.GROUP_LEVELS: the levels whose one-shot recovery trains the compacted model (and so
# LoRA adapters on it: --recovery-lora-rank)
COMPACT_RECOVERY_LEVELS = ("head", "query_head", "row")

# copies of hf_flop.gguf_quant.QUANTIZATIONS (export_gguf's quantization; the K-quants need llama-cpp-python) and
# hf_flop.onnx_quant.QUANTIZATIONS' dynamic one (static needs calibration= batches, an API-only choice):
# --gguf-quantization and --onnx-quantization take them
GGUF_QUANTIZATIONS = ("f32", "f16", "bf16", "q8_0", "q5_1", "q5_0", "q4_1", "q4_0")
GGUF_K_QUANTIZATIONS = ("q6_k", "q5_k_m", "q5_k_s", "q4_k_m", "q4_k_s", "q3_k_l", "q3_k_m", "q3_k_s", "q2_k")
ONNX_QUANTIZATIONS = ("int8",)

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
    "uniform_shapes": ("--uniform-shapes", "levels head, query_head, row, layer and/or hidden only"),
}
