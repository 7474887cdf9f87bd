"""How the cost of streaming one-shot pruning grows with model size: wall time, CPU time and peak RSS.

Each run writes a random-initialised Llama-shaped float32 checkpoint (random weights are fine for
cost: the work does not depend on the values) and streams it through ``hf_flop.prune_checkpoint``
with the default score (``obs``), levels head + row, 50 % of the linears, 32 calibration batches of
4 x 128 random tokens (16,384 tokens: the SmolLM2 benchmark's calibration size), in a fresh process
so its peak RSS (``ru_maxrss``) is its own. Shapes are the SmolLM2 family's (135M, 360M, 1.7B) and
Llama-3.1-8B's, with one vocabulary (49,152) for all.

Two series:

* ``width``: two layers of each shape, so the cost per layer (and per parameter) can be compared
  across widths d and FFN sizes without waiting for every layer;
* ``depth``: the 360M shape at 4, 8, 16 and 32 layers: peak RSS against depth, and against the
  checkpoint's size (a whole 1.7B checkpoint, ~2 hours at one thread, is left to ``--run``).

Every run is stored on its own (``results/stream_cost/<shape>_L<layers>.json``) and skipped when it
exists, so the benchmark resumes; the summary (``results/stream_cost.json``, ``stream_cost.png``)
fits the growth exponents from whatever runs exist.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/stream_cost.py --series width
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/stream_cost.py --series depth
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/stream_cost.py --run llama8b:1   # one 8B-shaped layer
    .venv/bin/python benchmarks/stream_cost.py --summary
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from common import RESULTS, save_figure, write_json  # noqa: E402

VOCAB, BATCHES, BATCH, BLOCK = 49152, 32, 4, 128
# name: (hidden, intermediate, layers, attention heads, key-value heads)
SHAPES = {
    "smollm2_135m": (576, 1536, 30, 9, 3),
    "smollm2_360m": (960, 2560, 32, 15, 5),
    "smollm2_1.7b": (2048, 8192, 24, 32, 32),
    "llama8b": (4096, 14336, 32, 32, 8),
}
SERIES = {
    "width": [("smollm2_135m", 2), ("smollm2_360m", 2), ("smollm2_1.7b", 2)],
    "depth": [("smollm2_360m", n) for n in (4, 8, 16, 32)],
}
RUNS = RESULTS / "stream_cost"


def _config(shape: str, layers: int):
    from transformers import LlamaConfig

    hidden, intermediate, _, heads, kv = SHAPES[shape]
    return LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv,
        tie_word_embeddings=True,
    )


def _write_checkpoint(shape: str, layers: int, folder: Path) -> None:
    """The random checkpoint, built in this (separate) process so the pruning process never holds it."""
    import torch
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    LlamaForCausalLM(_config(shape, layers)).save_pretrained(folder, max_shard_size="1GB")


def _prune(source: Path, output: Path) -> dict:
    """One streamed prune, timed; runs in its own process (``--child``)."""
    import torch

    from hf_flop import FlopConfig, prune_checkpoint

    g = torch.Generator().manual_seed(0)
    batches = [{"input_ids": torch.randint(0, VOCAB, (BATCH, BLOCK), generator=g)} for _ in range(BATCHES)]
    started, cpu = time.perf_counter(), time.process_time()
    config = FlopConfig(levels=["head", "row"], target_sparsity=0.5)
    result = prune_checkpoint(source, output, config, batches, reconstruct_options={"progress": False})
    return {
        "wall_s": time.perf_counter() - started,
        "cpu_s": time.process_time() - cpu,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "sparsity": result.report.deterministic_sparsity,
        "torch_threads": torch.get_num_threads(),
    }


def _counts(shape: str, layers: int) -> dict:
    hidden, intermediate, _, heads, kv = SHAPES[shape]
    head_dim = hidden // heads
    attention = 2 * hidden * heads * head_dim + 2 * hidden * kv * head_dim
    layer = attention + 3 * hidden * intermediate + 2 * hidden  # the linears and the two norms
    return {"layer_params": layer, "params": layers * layer + VOCAB * hidden + hidden}


def run(shape: str, layers: int) -> dict:
    """The stored result of one shape at ``layers`` layers, measuring it first if missing."""
    path = RUNS / f"{shape}_L{layers}.json"
    if path.exists():
        return json.loads(path.read_text())
    with tempfile.TemporaryDirectory(dir="/tmp") as tmp:
        source, output = Path(tmp) / "source", Path(tmp) / "pruned"
        subprocess.run([sys.executable, __file__, "--write", shape, str(layers), str(source)], check=True)
        size = sum(f.stat().st_size for f in source.glob("*.safetensors"))
        child = subprocess.run(
            [sys.executable, __file__, "--child", str(source), str(output)], check=True, capture_output=True, text=True
        )
        measured = json.loads(child.stdout.strip().splitlines()[-1])
        pruned = sum(f.stat().st_size for f in output.glob("*.safetensors"))
    hidden, intermediate, _, heads, kv = SHAPES[shape]
    result = {"shape": shape, "layers": layers, "hidden": hidden, "intermediate": intermediate, "heads": heads}
    result |= {"kv_heads": kv, **_counts(shape, layers), "checkpoint_mb": size / 2**20, "pruned_mb": pruned / 2**20}
    result |= {**measured, "calibration_tokens": BATCHES * BATCH * BLOCK}
    result["rss_over_checkpoint"] = result["peak_rss_mb"] / result["checkpoint_mb"]
    write_json(path, result)
    print(json.dumps(result))
    return result


def _fit(xs: list[float], ys: list[float]) -> float | None:
    """The slope of log y against log x (least squares), or None with fewer than two distinct points."""
    if len(set(xs)) < 2:
        return None
    lx, ly = [math.log(x) for x in xs], [math.log(y) for y in ys]
    mx, my = sum(lx) / len(lx), sum(ly) / len(ly)
    return sum((a - mx) * (b - my) for a, b in zip(lx, ly)) / sum((a - mx) ** 2 for a in lx)


def summary() -> dict:
    """Growth exponents and per-parameter ratios from the stored runs; writes the JSON and the plot."""
    runs = [json.loads(p.read_text()) for p in sorted(RUNS.glob("*.json"))]
    width = sorted((r for r in runs if r["layers"] <= 2), key=lambda r: r["layer_params"])
    for r in width:
        r["cpu_s_per_layer"] = r["cpu_s"] / r["layers"]
        r["cpu_us_per_param"] = 1e6 * r["cpu_s_per_layer"] / r["layer_params"]
    small = next((r for r in width if r["shape"] == "smollm2_135m"), None)
    out: dict = {"runs": runs, "width_series": width}
    if width:
        out["time_exponent_vs_layer_params"] = _fit(
            [r["layer_params"] for r in width], [r["cpu_s_per_layer"] for r in width]
        )
        out["time_exponent_vs_hidden"] = _fit([r["hidden"] for r in width], [r["cpu_s_per_layer"] for r in width])
    if small:
        out["cost_per_param_vs_135m"] = {r["shape"]: r["cpu_us_per_param"] / small["cpu_us_per_param"] for r in width}
    out["llama8b_on_this_cpu"] = _llama8b_estimate(width)
    depth = sorted((r for r in runs if r["shape"] == "smollm2_360m" and r["layers"] > 2), key=lambda r: r["layers"])
    if len(depth) >= 2:
        out["rss_growth_per_depth_doubling"] = [
            (b["peak_rss_mb"] - a["peak_rss_mb"]) / a["peak_rss_mb"]
            for a, b in zip(depth, depth[1:])
            if b["layers"] == 2 * a["layers"]
        ]
        out["rss_exponent_vs_layers"] = _fit([r["layers"] for r in depth], [r["peak_rss_mb"] for r in depth])
    write_json(RESULTS / "stream_cost.json", out)
    _plot(width, depth)
    return out


def _llama8b_estimate(width: list[dict]) -> dict | None:
    """Llama-3.1-8B's 32 layers at this CPU's measured cost per layer of the 8B shape (one thread).

    Streaming works layer by layer, so the whole model costs its layer count times one layer, and
    its peak memory is the one-layer run's (the calibration activations do not grow with depth).
    """
    measured = next((r for r in width if r["shape"] == "llama8b"), None)
    if measured is None:
        return None
    layers = SHAPES["llama8b"][2]
    return {
        "from": f"llama8b_L{measured['layers']}",
        "layers": layers,
        "cpu_hours_one_thread": layers * measured["cpu_s_per_layer"] / 3600,
        "peak_rss_mb_one_layer_run": measured["peak_rss_mb"],
    }


def _plot(width: list[dict], depth: list[dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    if width:
        a.loglog([r["layer_params"] for r in width], [r["cpu_s_per_layer"] for r in width], "o-")
        for r in width:
            a.annotate(
                f"{r['shape']} (d={r['hidden']}, ffn={r['intermediate']})",
                (r["layer_params"], r["cpu_s_per_layer"]),
                xytext=(-6, 4) if r is width[-1] else (6, -4),
                textcoords="offset points",
                ha="right" if r is width[-1] else "left",  # the widest shape's label left of it, inside the axes
                fontsize=7,
            )
    a.set_xlabel("parameters per layer")
    a.set_ylabel("CPU seconds per layer (1 thread)")
    a.set_title("prune_checkpoint cost per layer")
    if depth:
        b.plot([r["layers"] for r in depth], [r["peak_rss_mb"] for r in depth], "o-", label="peak RSS")
        b.plot([r["layers"] for r in depth], [r["checkpoint_mb"] for r in depth], "s--", label="float32 checkpoint")
        b.legend()
    b.set_xlabel("layers (SmolLM2-360M shape)")
    b.set_ylabel("MB")
    b.set_title("peak RSS against depth")
    fig.tight_layout()
    save_figure(fig, RESULTS / "stream_cost.png")


def main() -> None:
    if sys.argv[1:2] == ["--write"]:
        _write_checkpoint(sys.argv[2], int(sys.argv[3]), Path(sys.argv[4]))
        return
    if sys.argv[1:2] == ["--child"]:
        print(json.dumps(_prune(Path(sys.argv[2]), Path(sys.argv[3]))))
        return
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--series", choices=sorted(SERIES), action="append", default=[])
    parser.add_argument("--run", action="append", default=[], help="shape:layers, e.g. llama8b:1")
    parser.add_argument("--summary", action="store_true", help="Only the summary of the stored runs.")
    args = parser.parse_args()
    todo = [item for s in args.series for item in SERIES[s]]
    todo += [(spec.split(":")[0], int(spec.split(":")[1])) for spec in args.run]
    for shape, layers in todo:
        if shape not in SHAPES:
            parser.error(f"unknown shape {shape!r}; known: {', '.join(SHAPES)}")
        run(shape, layers)
    print(json.dumps({k: v for k, v in summary().items() if k not in ("runs", "width_series")}, indent=2))


if __name__ == "__main__":
    main()
