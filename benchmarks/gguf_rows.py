"""What bench_gguf.py measures: its settings and its rows (llama.cpp on SmolLM2-135M, dense vs pruned).

``python benchmarks/bench_gguf.py --list`` prints the rows.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from rows import Row, declare

TARGET = 0.5
LEVELS = ["head", "row"]
LLAMA_THREADS = 2
GREEDY_CHECKED = 32  # first greedy tokens compared with transformers
DTYPES = ("f32", "f16")
MODELS = ("dense", "pruned")
SETTINGS = {
    "full": {"prompt_tokens": 128, "gen_tokens": 128, "repeats": 5, "oneshot_sequences": 32, "oneshot_block": 512},
    "quick": {"prompt_tokens": 16, "gen_tokens": 32, "repeats": 2, "oneshot_sequences": 8, "oneshot_block": 64}
    | {"tiny": True},
}


@dataclass(frozen=True, kw_only=True)
class GGUFRow(Row):
    """A llama.cpp row: ``kind`` "export" writes the files, "speed" times the ``dtype`` files."""

    dtype: str = field(default="", metadata={"help": "The GGUF files a speed row times (f32 or f16)."})


ROWS: dict[str, GGUFRow] = declare(
    [
        GGUFRow(
            id="export",
            label="the dense model and its one-shot pruned copy (heads + FFN rows), written as f32 and f16 GGUF files",
            kind="export",
        ),
        *(
            GGUFRow(id=f"speed_{d}", label=f"llama.cpp tokens per second of the {d} files", kind="speed", dtype=d)
            for d in DTYPES
        ),
    ]
)
