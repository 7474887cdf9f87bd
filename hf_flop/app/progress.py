"""What ``hf-flop`` shows while it works: a rich progress bar for Trainer runs, the result table, quiet libraries.

Imports rich and transformers at the top, so only the commands import it (inside functions):
``hf-flop --help`` does not load it.
"""

from __future__ import annotations

import time
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table
from transformers import Trainer, TrainerCallback
from transformers.trainer_callback import PrinterCallback, ProgressCallback


def quiet_libraries() -> None:
    """Silence library chatter (load reports, map progress bars); the CLI prints its own progress."""
    import logging
    import warnings

    import datasets
    import transformers

    logging.getLogger("hf_flop").setLevel(logging.ERROR)  # the CLI prints hf_flop's warnings its own way
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    datasets.disable_progress_bars()
    datasets.logging.set_verbosity_error()
    warnings.filterwarnings("ignore", category=FutureWarning)
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)  # the ONNX exporter's notes on optional operators


class RichProgress(TrainerCallback):
    """A TrainerCallback drawing a rich progress bar with loss and sparsity (target vs expected).

    On a terminal the bar is live; otherwise (a log file) each log becomes one line.
    """

    def __init__(self, console: Console, phase: str) -> None:
        self.console = console
        self.phase = phase
        self.progress: Progress | None = None
        self.task = None

    def on_train_begin(self, args, state, control, **kwargs):
        if not self.console.is_terminal:
            return
        self.progress = Progress(
            TextColumn(f"[bold]{self.phase}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TextColumn("{task.fields[info]}"),
            console=self.console,
        )
        self.progress.start()
        self.task = self.progress.add_task(self.phase, total=state.max_steps, info="")

    def on_step_end(self, args, state, control, **kwargs):
        if self.progress is not None:
            self.progress.update(self.task, completed=state.global_step)

    def on_log(self, args, state, control, logs=None, **kwargs):
        logs = logs or {}
        parts = []
        if "task_loss" in logs:  # the headline: the total adds the constraint term, which may climb meanwhile
            parts.append(f"task loss {logs['task_loss']:.4f} (total {logs['loss']:.4f})")
        elif "loss" in logs:
            parts.append(f"loss {logs['loss']:.4f}")
        recovering = logs.get("phase") == "recovery"  # masks fixed: no target to chase, multipliers idle
        if "expected_sparsity" in logs and recovering:
            parts.append(f"masks fixed at sparsity {logs.get('deterministic_sparsity', 0):.3f}")
        elif "expected_sparsity" in logs:
            parts.append(
                f"sparsity {logs['expected_sparsity']:.3f} (eval {logs.get('deterministic_sparsity', 0):.3f}) "
                f"/ target {logs.get('target_sparsity', 0):.3f}"
            )
        if "lambda_1" in logs and not recovering:
            parts.append(f"λ1 {logs['lambda_1']:+.3f} λ2 {logs.get('lambda_2', 0):+.3f}")
        if not parts:
            return
        if self.progress is not None:
            self.progress.update(self.task, info=" | ".join(parts))
        else:
            label = f"{self.phase} ({logs['phase']})" if "phase" in logs else self.phase
            line = f"{label} step {state.global_step}/{state.max_steps}: " + " | ".join(parts)
            self.console.print(line, soft_wrap=True, highlight=False)

    def on_train_end(self, args, state, control, **kwargs):
        if self.progress is not None:
            self.progress.stop()


def train_with_progress(trainer: Trainer, console: Console, phase: str) -> float:
    """Train with the rich progress bar instead of transformers' printing; returns the wall time in seconds."""
    trainer.remove_callback(PrinterCallback)
    trainer.remove_callback(ProgressCallback)
    trainer.add_callback(RichProgress(console, phase))
    start = time.perf_counter()
    trainer.train()
    return time.perf_counter() - start


def print_summary(console: Console, summary: dict, output_dir: Path) -> None:
    """The dense vs pruned table of a ``hf-flop prune`` summary, and where the results were written."""
    res, params, lat = summary["results"], summary["params"], summary["latency_ms"]
    metric = res["metric"]
    table = Table(title=f"hf-flop prune: {summary['model']} on {summary['dataset']}")
    table.add_column("")
    table.add_column("dense", justify="right")
    table.add_column("pruned (compacted)", justify="right")
    if "pretrained" in res:
        table.add_row(f"{metric} before fine-tuning", f"{res['pretrained']:.4f}", "")
    table.add_row(f"{metric} ({res['eval_split']})", f"{res['dense']:.4f}", f"{res['pruned']:.4f}")
    table.add_row("parameters (total)", f"{params['dense_total']:,}", f"{params['pruned_total']:,}")
    table.add_row(
        "prunable parameters",
        f"{params['prunable']:,}",
        f"{params['prunable_kept']:,} (sparsity {params['sparsity']:.3f}, target {summary['target_sparsity']}"
        + (")" if summary.get("target_check", {}).get("met", True) else ": MISSED)"),
    )
    for batch, values in lat.items():
        table.add_row(
            f"CPU latency, batch {batch} (ms, {summary['settings']['latency_threads']} thr)",
            f"{values['dense']:.1f}",
            f"{values['pruned']:.1f} ({summary['speedup'][batch]:.2f}x)",
        )
    times = summary["wall_time_s"]
    table.add_row(
        f"wall time (s, {summary['machine']['torch_threads']} thr)",
        f"{times.get('dense_fine_tune', 0):.0f} fine-tune",
        f"{times['pruning']:.0f} pruning",
    )
    console.print(table)
    target = summary.get("target_check") or {}
    if target and not target.get("met", True):
        console.print(f"[bold yellow]missed target:[/] {target['message']}", highlight=False)
    onnx = f", {summary['onnx']} (ONNX)" if summary.get("onnx") else ""
    gguf = summary.get("gguf")
    onnx += f", {gguf['file']} (llama.cpp, architecture {gguf['architecture']})" if gguf else ""
    onnx += f", {summary['exports']} (each exported file measured)" if summary.get("exports") else ""
    console.print(f"written to {output_dir}/: model/ (compacted model + README.md card), summary.json, plots/{onnx}")
