"""What pruning costs while training: PruningTrainer vs a dense Trainer, and FLOP's live-component speed-up.

Part 1, runs. One small random-initialised Llama (grouped-query attention), a learnable synthetic LM task
(sequences counting by a stride), the same steps, batch and seed, trained by

* ``dense``: a plain ``transformers.Trainer`` on the model as it is;
* ``rank`` and ``rank+head+row``: ``PruningTrainer`` at target sparsity 0.5 (warm-up over half the run).

Each run is a fresh subprocess, so its peak resident memory (``VmHWM``) is its own; each configuration
runs ``--repeats`` times, interleaved, and the fastest run is kept. Recorded: wall
time of ``train()``, every optimizer step's time, the resident memory before ``train()`` and the
peak, trainable parameters, and the final sparsity.

Part 2, one layer. Forward + backward time in training mode of a ``FlopLinear`` with a fraction
``f`` of its rank-1 components alive (the others closed, their samples exactly 0), with FLOP's
speed-up (``live_threshold=0.8``: below 80% alive only the live components are computed) and
without it (``live_threshold=0``), next to a dense ``nn.Linear`` of the same shape.

Writes ``benchmarks/results/bench_trainer.{json,png}`` (``--quick``: ``bench_trainer_quick.*``, a
smaller run for a smoke test). One thread per process; the machine may be shared, so layer timings
take the minimum over repetitions. Run: ``.venv/bin/python benchmarks/bench_trainer.py [--quick]``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the sibling modules, also when imported
import common  # noqa: E402

RUNS = {"dense": None, "rank": ["rank"], "rank+head+row": ["rank", "head", "row"]}
FRACTIONS = [1.0, 0.9, 0.8, 0.7, 0.6, 0.4, 0.2, 0.1, 0.05]
LAYER_SHAPES = [(1536, 384), (768, 768)]  # (out, in): MiniLM's FFN up projection, a square BERT-base-like matrix


def _memory_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status (Linux only)")


def _model(size: dict):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    hidden = size["hidden"]
    config = LlamaConfig(
        vocab_size=size["vocab"],
        hidden_size=hidden,
        num_hidden_layers=size["layers"],
        num_attention_heads=8,
        num_key_value_heads=4,
        intermediate_size=2 * hidden,
        max_position_embeddings=size["seq"],
    )
    return LlamaForCausalLM(config)


class _Strides(torch.utils.data.Dataset):
    """Sequences counting up from a random start by a random stride: learnable, so gates get a task signal."""

    def __init__(self, n: int, seq: int, vocab: int) -> None:
        g = torch.Generator().manual_seed(0)
        start, stride = torch.randint(0, vocab, (n, 1), generator=g), torch.randint(1, 8, (n, 1), generator=g)
        self.ids = (start + stride * torch.arange(seq)) % vocab

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict:
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def run_one(name: str, size: dict, steps: int) -> dict:
    """One training run in this process (called in a subprocess by ``main``)."""
    from transformers import Trainer, TrainerCallback, TrainingArguments

    from hf_flop import FlopConfig, PruningArguments, PruningTrainer, get_flop_model, sparsity_report

    torch.set_num_threads(1)
    model = _model(size)
    levels = RUNS[name]
    settings = dict(
        output_dir=tempfile.mkdtemp(prefix="bench_trainer_"),
        max_steps=steps,
        per_device_train_batch_size=size["batch"],
        learning_rate=1e-3,
        logging_steps=max(steps // 10, 1),
        save_strategy="no",
        report_to=[],
        seed=0,
        disable_tqdm=True,
        use_cpu=True,
    )
    data = _Strides(steps * size["batch"], size["seq"], size["vocab"])
    step_times: list[float] = []

    class StepTimer(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            self.start = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            step_times.append(time.perf_counter() - self.start)

    if levels is None:
        trainer = Trainer(model=model, args=TrainingArguments(**settings), train_dataset=data)
    else:
        model = get_flop_model(model, FlopConfig(target_sparsity=0.5, levels=levels))
        # the learned schedule: every step carries the gates and the constraint (what this benchmark times)
        trainer = PruningTrainer(model=model, args=PruningArguments(**settings, pruning_phase=1.0), train_dataset=data)
    trainer.add_callback(StepTimer())
    rss_before = _memory_kb("VmRSS")
    start = time.perf_counter()
    trainer.train()
    wall = time.perf_counter() - start
    result = {
        "wall_s": wall,
        "step_s": step_times,
        "rss_before_train_mb": rss_before / 1024,
        "peak_rss_mb": _memory_kb("VmHWM") / 1024,
        "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad),
    }
    if levels is not None:
        report = sparsity_report(model)
        result["final_sparsity"] = {
            "deterministic": report.deterministic_sparsity,
            "expected": report.expected_sparsity,
        }
        result["kept_rank_fraction"] = {
            k: m.kept_rank / m.rank for k, m in report.modules.items() if m.rank is not None and m.kept_rank is not None
        }
    return result


def layer_timing(shape: tuple[int, int], tokens: int, reps: int) -> dict:
    """Forward+backward seconds of one gated layer per live fraction, with and without the speed-up."""
    import hf_flop
    from hf_flop import FlopConfig

    torch.set_num_threads(1)
    out_f, in_f = shape

    class One(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(in_f, out_f)

        def forward(self, x):
            return self.lin(x)

    torch.manual_seed(0)
    x = torch.randn(tokens, in_f)
    dense = nn.Linear(in_f, out_f)
    gated = hf_flop.get_flop_model(One(), FlopConfig(target_modules=["lin"], target_sparsity=0.5)).train()
    layer = next(iter(gated.base_model.flop_layers().values()))

    def fwd_bwd(module) -> float:
        best = float("inf")
        for rep in range(reps + 1):
            module.zero_grad(set_to_none=True)
            start = time.perf_counter()
            module(x).sum().backward()
            if rep:  # the first round warms up
                best = min(best, time.perf_counter() - start)
        return best

    result = {"dense_s": fwd_bwd(dense), "fractions": FRACTIONS, "skip_s": [], "no_skip_s": []}
    rank = layer.rank
    for fraction in FRACTIONS:
        with torch.no_grad():
            log_alpha = layer.gate.log_alpha
            log_alpha.fill_(10.0)  # open: samples are 1 but for a ~5e-4 chance
            log_alpha[round(fraction * rank) :] = -20.0  # closed: samples exactly 0
        for key, threshold in (("skip_s", 0.8), ("no_skip_s", 0.0)):
            layer.live_threshold = threshold
            result[key].append(fwd_bwd(gated))
    return result


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = result["runs"]
    names = list(runs)
    fig, axes = plt.subplots(1, 4, figsize=(19, 4.2))
    ax = axes[0]
    ax.bar(names, [runs[n]["wall_s"] for n in names], color=["gray", "tab:blue", "tab:orange"])
    ax.set_ylabel("train() wall time (s)")
    ax.set_title(f"{result['steps']} steps, same model and data")
    ax = axes[1]
    xs = range(len(names))
    ax.bar([x - 0.2 for x in xs], [runs[n]["rss_before_train_mb"] for n in names], 0.4, label="before train()")
    ax.bar([x + 0.2 for x in xs], [runs[n]["peak_rss_mb"] for n in names], 0.4, label="peak")
    ax.set_xticks(list(xs), names)
    ax.set_ylabel("resident memory (MB)")
    ax.set_title("process memory (imports included)")
    ax.legend()
    ax = axes[2]
    for n in names:
        steps = runs[n]["step_s"]
        window = max(len(steps) // 20, 1)
        smooth = [statistics.mean(steps[max(0, i - window) : i + 1]) for i in range(len(steps))]
        ax.plot(range(1, len(steps) + 1), [s * 1000 for s in smooth], label=n)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("step time (ms, moving mean)")
    ax.set_title("step time along the run")
    ax.legend()
    ax = axes[3]
    for shape, timing in result["layers"].items():
        base = timing["dense_s"]
        ax.plot(timing["fractions"], [base / t for t in timing["skip_s"]], "o-", label=f"{shape}: live only (0.8)")
        ax.plot(timing["fractions"], [base / t for t in timing["no_skip_s"]], "x--", label=f"{shape}: all components")
    ax.axhline(1.0, color="gray", lw=0.8)
    ax.set_xlabel("fraction of rank-1 components alive")
    ax.set_ylabel("speed vs dense nn.Linear (fwd+bwd)")
    ax.set_title(f"one FlopLinear, {result['layer_tokens']} tokens")
    ax.invert_xaxis()
    ax.legend(fontsize=7)
    fig.tight_layout()
    common.save_figure(fig, path, dpi=100)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a small, fast run (writes bench_trainer_quick.*)")
    parser.add_argument("--repeats", type=int, default=2, help="runs per configuration; the fastest is kept")
    parser.add_argument("--child", help=argparse.SUPPRESS)  # internal: run one configuration, print JSON
    args = parser.parse_args()
    size = (
        dict(hidden=64, layers=2, vocab=256, seq=32, batch=8, steps=30, layer_tokens=256, reps=3)
        if args.quick
        else dict(hidden=256, layers=4, vocab=1024, seq=64, batch=8, steps=200, layer_tokens=1024, reps=7)
    )
    if args.child:
        print("RESULT " + json.dumps(run_one(args.child, size, size["steps"])))
        return

    runs: dict[str, dict] = {}
    walls: dict[str, list[float]] = {name: [] for name in RUNS}
    for _ in range(args.repeats):  # interleaved, the fastest kept: the least disturbed on a shared machine
        for name in RUNS:
            env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
            cmd = [sys.executable, os.path.abspath(__file__), "--child", name] + (["--quick"] if args.quick else [])
            done = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
            if done.returncode != 0:
                raise RuntimeError(f"run {name!r} failed:\n{done.stderr[-3000:]}")
            line = next(line for line in done.stdout.splitlines() if line.startswith("RESULT "))
            result = json.loads(line[len("RESULT ") :])
            walls[name].append(result["wall_s"])
            if name not in runs or result["wall_s"] < runs[name]["wall_s"]:
                runs[name] = result
    for name, r in runs.items():
        r["wall_s_all_repeats"] = walls[name]
        print(
            f"{name:>14}: train {r['wall_s']:.1f} s, median step {statistics.median(r['step_s']) * 1000:.0f} ms, "
            f"peak RSS {r['peak_rss_mb']:.0f} MB ({r['peak_rss_mb'] - r['rss_before_train_mb']:+.0f} MB in train)"
            + (
                " | final sparsity eval {deterministic:.3f}, expected {expected:.3f}".format(**r["final_sparsity"])
                if "final_sparsity" in r
                else ""
            )
        )
    layers = {}
    for shape in LAYER_SHAPES:
        layers[f"{shape[0]}x{shape[1]}"] = t = layer_timing(shape, size["layer_tokens"], size["reps"])
        speedups = ", ".join(f"{f}: {b / a:.2f}x" for f, a, b in zip(t["fractions"], t["skip_s"], t["no_skip_s"]))
        print(f"layer {shape}: live-only vs all components: {speedups}")
    result = {
        "model": {k: size[k] for k in ("hidden", "layers", "vocab", "seq", "batch")},
        "steps": size["steps"],
        "layer_tokens": size["layer_tokens"],
        "torch_threads": 1,
        "repeats": args.repeats,
        "runs": runs,
        "layers": layers,
    }
    stem = "bench_trainer_quick" if args.quick else "bench_trainer"
    common.write_json(common.RESULTS / f"{stem}.json", result, indent=1)
    plot(result, common.RESULTS / f"{stem}.png")
    print(f"wrote {common.RESULTS / stem}.json and .png")


if __name__ == "__main__":
    main()
