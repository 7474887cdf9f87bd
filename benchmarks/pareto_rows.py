"""What bench_pareto.py measures: pruned x quantized files, measured where they run.

``python benchmarks/bench_pareto.py --list`` prints the rows. Two models:

* SmolLM2-135M in llama.cpp: the pretrained model and copies pruned one-shot to 30 % and 50 % of
  the linears' weights, each written as GGUF files of every type in ``GGUF_TYPES``;
* MiniLM-L6 on the Rotten Tomatoes sentences in ONNX Runtime: the dense start and copies pruned to
  50 % and 75 % with the equal-budget benchmark's recipe (one-shot obs + refit, then one epoch of
  distilled recovery), each as a float32 and an int8 ONNX file.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from rows import Row, declare

GGUF_TYPES = ("f16", "q8_0", "q4_0", "q4_k_m")  # q4_k_m needs llama.cpp's quantizer (llama-cpp-python)
ONNX_TYPES = ("float32", "int8", "int8-static")  # int8-static: activation scales from 8 x 16 training sentences
LM_TARGETS = (0, 30, 50)  # percent of the linears' weights removed; 0 is the unpruned model
MINILM_TARGETS = (0, 50, 75)
LLAMA_THREADS = 2  # llama.cpp's threads, as the goal states them
ONNX_THREADS = 1  # ONNX Runtime's intra-op threads: the CLI's latency default
BATCHES = (1, 32)
# The SmolLM2 pruning: heads (KV groups) and FFN rows, the same count in every layer, rounded to 32 so every
# matrix fits the 32-wide blocks of q8_0 / q4_0 and the file is llama.cpp's plain `llama` graph.
LM_PRUNING = {"levels": ["head", "row"], "uniform_shapes": True, "round_to": 32, "score": "activation"}
SETTINGS = {
    "full": {"oneshot_sequences": 32, "oneshot_block": 512, "eval_block": 512, "eval_blocks": 24}
    | {"prompt_tokens": 128, "gen_tokens": 128, "speed_rounds": 5, "latency_tokens": 64, "latency_rounds": 10},
    "quick": {"oneshot_sequences": 8, "oneshot_block": 64, "eval_block": 64, "eval_blocks": 4, "tiny": True}
    | {"prompt_tokens": 16, "gen_tokens": 16, "speed_rounds": 2, "latency_tokens": 16, "latency_rounds": 2},
}


@dataclass(frozen=True, kw_only=True)
class ParetoRow(Row):
    """A Pareto row: ``kind`` "lm_model" / "minilm_model" writes one model's files, "*_measure" times them all."""

    target: int = field(default=0, metadata={"help": "Percent of the linears' weights removed (0: dense)."})


def model_name(target: int) -> str:
    """The name a model's files and result keys carry: 'dense' or 'pruned_<target>'."""
    return "dense" if target == 0 else f"pruned_{target}"


ROWS: dict[str, ParetoRow] = declare(
    [
        *(
            ParetoRow(
                id=f"lm_{model_name(t)}",
                label="SmolLM2-135M"
                + (f" pruned one-shot to {t} % (heads + FFN rows, uniform)" if t else "")
                + f", written as {', '.join(GGUF_TYPES)} GGUF",
                kind="lm_model",
                target=t,
            )
            for t in LM_TARGETS
        ),
        ParetoRow(
            id="lm_measure",
            label=f"llama.cpp on every GGUF file: PTB perplexity, prompt and generation tokens/s ({LLAMA_THREADS} threads)",
            kind="lm_measure",
        ),
        *(
            ParetoRow(
                id=f"minilm_{model_name(t)}",
                label="MiniLM-L6 dense start" if t == 0 else f"MiniLM-L6 pruned to {t} % (obs + refit, recovered)",
                kind="minilm_model",
                target=t,
            )
            for t in MINILM_TARGETS
        ),
        ParetoRow(
            id="minilm_measure",
            label=f"ONNX Runtime on every float32 / int8 / int8-static file: accuracy, latency at batch 1 and 32 ({ONNX_THREADS} thread)",
            kind="minilm_measure",
        ),
    ]
)
