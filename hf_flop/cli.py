"""``hf-flop``: the command line (also ``python -m hf_flop``).

``hf-flop prune`` with no arguments runs the main job on the embedded defaults (offline): fine-tune
all-MiniLM-L6-v2 on the Rotten Tomatoes sentiment sentences, prune it with FLOP to the default
target (distilling from the dense model), compact it, and report dense vs pruned accuracy, sizes
and CPU speed measured in the same run. Every piece can be swapped by an option: any model (Hub id
or local folder), any dataset, sequence classification or causal language modelling.

``hf-flop report`` injects FLOP into a model and prints the sparsity report (a quick look at what
would be pruned and how the parameters are counted).
"""

from __future__ import annotations

import argparse
import copy
import math
import os
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path

from .data import DATASETS, MODELS, TaskData
from .files import atomic_folder, check_output_dir, write_json_atomic
from .hub import PushToHubError

TASKS = ("seq-cls", "causal-lm")
# The default job must finish in under ~15 minutes on 2 CPU cores (measured 7.9 min, see the
# README): all 8,072 training sentences, batch 16, one dense epoch, then two pruning epochs.
TASK_DEFAULTS = {
    "seq-cls": {
        "model": "minilm",
        "dataset": "rt-sentiment",
        "max_length": 64,
        "train_samples": 0,
        "eval_samples": 1000,
        "batch_size": 16,
        "dense_epochs": 1.0,
        "epochs": 2.0,
        "learning_rate": 5e-5,
    },
    "causal-lm": {
        "model": "smollm2",
        "dataset": "ptb",
        "max_length": 128,
        "train_samples": 800,
        "eval_samples": 100,
        "batch_size": 8,
        "dense_epochs": 0.0,
        "epochs": 1.0,
        "learning_rate": 5e-5,
    },
}
LATENCY_BATCHES = (1, 32)


class CliError(Exception):
    """A user error: printed as one line, exit status 2."""


# --- arguments -----------------------------------------------------------------------------------
def _target(value: str) -> float:
    try:
        target = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not a number") from None
    if not 0.0 <= target < 1.0:
        raise argparse.ArgumentTypeError(
            f"{value} is outside [0, 1): it is the fraction of prunable parameters removed"
        )
    return target


def _non_negative(kind):
    def parse(value: str):
        try:
            number = kind(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{value!r} is not a {kind.__name__}") from None
        if number < 0:
            raise argparse.ArgumentTypeError(f"{value} must be >= 0")
        return number

    return parse


def _positive(kind):
    def parse(value: str):
        number = _non_negative(kind)(value)
        if number == 0:
            raise argparse.ArgumentTypeError(f"{value} must be > 0")
        return number

    return parse


def _levels(value: str) -> list[str]:
    from .config import LEVELS

    levels = [v.strip() for v in value.split(",") if v.strip()]
    bad = [v for v in levels if v not in LEVELS]
    if not levels or bad:
        raise argparse.ArgumentTypeError(f"{value!r}: use a comma-separated subset of {','.join(LEVELS)}")
    return levels


def _add_model_options(parser: argparse.ArgumentParser) -> None:
    from .config import GATES

    names = ", ".join(f"'{k}' ({v})" for k, v in MODELS.items())
    parser.add_argument(
        "--task",
        choices=TASKS,
        default="seq-cls",
        help="seq-cls: sequence classification (accuracy); causal-lm: language modelling (perplexity).",
    )
    parser.add_argument(
        "--model",
        help=f"Hub id or local folder of a transformers model, or an embedded default: {names}. "
        "Default: minilm for seq-cls, smollm2 for causal-lm.",
    )
    parser.add_argument(
        "--target", type=_target, default=0.5, help="Fraction of the prunable parameters to remove, in [0, 1)."
    )
    parser.add_argument(
        "--levels",
        type=_levels,
        default="rank",
        help="Comma-separated structures to gate: rank (FLOP low-rank components), head, row (FFN neurons), block.",
    )
    parser.add_argument("--gate", choices=GATES, default="hard_concrete", help="Gate type.")
    parser.add_argument(
        "--round-to", type=_positive(int), default=1, help="Round kept ranks/rows up to a multiple of this."
    )


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line (no usage block), exit status 2."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows real defaults only: task-dependent ones (None) are described in the option's help."""

    def _get_help_string(self, action: argparse.Action) -> str:
        if action.default in (None, False, argparse.SUPPRESS) or "Default:" in (action.help or ""):
            return action.help or ""
        return super()._get_help_string(action)


def build_parser() -> argparse.ArgumentParser:
    """The ``hf-flop`` argument parser (subcommands ``prune`` and ``report``)."""
    fmt = _HelpFormatter
    parser = _Parser(
        prog="hf-flop",
        description="Structured pruning of transformers models with FLOP (factorized low-rank pruning).",
        epilog="Run 'hf-flop prune' with no arguments for the main job on the embedded defaults (offline).",
    )
    parser.add_argument("--debug", action="store_true", help="Show full tracebacks instead of one-line errors.")
    sub = parser.add_subparsers(dest="command", metavar="{prune,report}", parser_class=_Parser)

    prune = sub.add_parser(
        "prune",
        formatter_class=fmt,
        help="Fine-tune, prune to a target size, compact, evaluate, save (the main job).",
        description="Dense fine-tune (optional), FLOP pruning with PruningTrainer (distilling from the dense "
        "model), compaction, evaluation before/after, CPU latency, model card and plots. With no arguments: "
        "all-MiniLM-L6-v2 on the Rotten Tomatoes sentiment sentences, offline.",
    )
    _add_model_options(prune)
    data = prune.add_argument_group("data")
    data.add_argument(
        "--dataset",
        help="Hub id, local folder (save_to_disk or data files) or file (csv/tsv/json/jsonl/parquet/txt), or an "
        f"embedded default: {', '.join(f'{k!r} ({v})' for k, v in DATASETS.items())}. "
        "Default: rt-sentiment for seq-cls, ptb for causal-lm.",
    )
    data.add_argument("--dataset-config", help="Configuration name of a Hub dataset (load_dataset's second argument).")
    data.add_argument(
        "--data-dir", help="Folder with vaderSentiment-3.3.2.tar.gz for rt-sentiment (default: $HF_FLOP_DATA or .venv)."
    )
    data.add_argument("--text-column", help="Text column (default: the first of text, sentence, content, review).")
    data.add_argument("--label-column", help="Label column for seq-cls (default: label or labels).")
    data.add_argument(
        "--eval-split", help="Split to report metrics on (default: test if it has labels, else validation)."
    )
    data.add_argument(
        "--max-length",
        type=_positive(int),
        help="Tokens per example (seq-cls, truncation) or per block (causal-lm). Default: 64 / 128.",
    )
    data.add_argument(
        "--train-samples",
        type=_non_negative(int),
        help="Training examples (causal-lm: blocks) used, a seeded subset; 0 = all. Default: all (8,072) / 800.",
    )
    data.add_argument(
        "--eval-samples",
        type=_non_negative(int),
        help="Evaluation examples (causal-lm: blocks); 0 = all. Default: 1000 / 100.",
    )

    train = prune.add_argument_group("training")
    train.add_argument(
        "--dense-epochs",
        type=_non_negative(float),
        help="Epochs of plain fine-tuning before pruning (its result is the 'dense' baseline and the teacher). "
        "Default: 1 for seq-cls (a new classifier head needs training), 0 for causal-lm.",
    )
    train.add_argument(
        "--epochs", type=_positive(float), help="Pruning epochs. Default: 2 for seq-cls, 1 for causal-lm."
    )
    train.add_argument("--max-steps", type=_positive(int), help="Pruning steps (overrides --epochs).")
    train.add_argument(
        "--target-warmup", type=_non_negative(float), default=0.5, help="Target warm-up: steps, or a fraction if < 1."
    )
    train.add_argument("--batch-size", type=_positive(int), help="Training batch size (per process). Default: 16 / 8.")
    train.add_argument("--learning-rate", type=_positive(float), help="Model learning rate. Default: 5e-5.")
    train.add_argument(
        "--gate-learning-rate", type=_positive(float), help="Gate learning rate. Default: PruningArguments' default."
    )
    train.add_argument(
        "--lagrangian-learning-rate",
        type=_positive(float),
        help="Lagrange multiplier learning rate. Default: PruningArguments' default.",
    )
    train.add_argument(
        "--distill",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="Distil the pruned model from the dense one (logit KL).",
    )
    train.add_argument("--seed", type=int, default=0, help="Seed of data subsets, initialisation and training.")

    out = prune.add_argument_group("output")
    out.add_argument("--output-dir", default="hf_flop_output", help="Folder for the compacted model, plots, summary.")
    out.add_argument("--overwrite", action="store_true", help="Replace --output-dir if it exists and is not empty.")
    out.add_argument(
        "--latency-threads",
        type=_positive(int),
        default=1,
        help="CPU threads for the dense vs compacted latency measurement (batch 1 and 32, --max-length tokens).",
    )
    out.add_argument("--no-plots", action="store_true", help="Skip the PNG plots (they need matplotlib).")
    out.add_argument("--push-to-hub", action="store_true", help="Also push the compacted model and card to the Hub.")
    out.add_argument("--repo-id", help="Hub repository (owner/name) for --push-to-hub.")
    out.add_argument("--private", action="store_true", help="Create the Hub repository as private.")
    prune.set_defaults(func=run_prune)

    report = sub.add_parser(
        "report",
        formatter_class=fmt,
        help="Inject FLOP into a model and print its sparsity report.",
        description="Inject FLOP gates (nothing trained) and print the prunable parameters per module.",
    )
    _add_model_options(report)
    report.set_defaults(func=run_report)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``hf-flop`` console script; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    try:
        args.func(args)
    except KeyboardInterrupt:
        print("hf-flop: interrupted", file=sys.stderr)
        return 130
    except (CliError, PushToHubError, ValueError, TypeError, OSError, ImportError) as err:
        if args.debug:
            raise
        message = " ".join(str(err).split()) or type(err).__name__
        print(f"hf-flop {args.command}: error: {message} (--debug shows the traceback)", file=sys.stderr)
        return 2
    return 0


# --- loading -------------------------------------------------------------------------------------
def _quiet() -> None:
    """Silence library chatter (load reports, map progress bars); the CLI prints its own progress."""
    import warnings

    import datasets
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    datasets.disable_progress_bars()
    datasets.logging.set_verbosity_error()
    warnings.filterwarnings("ignore", category=FutureWarning)


def _prepare_data(args, tokenizer) -> TaskData:
    """The options' dataset, tokenized for ``args.task`` (``hf_flop.data.prepare_task_data``)."""
    from .data import prepare_task_data

    return prepare_task_data(
        args.dataset,
        tokenizer,
        task=args.task,
        max_length=args.max_length,
        text_column=args.text_column,
        label_column=args.label_column,
        eval_split=args.eval_split,
        train_samples=args.train_samples,
        eval_samples=args.eval_samples,
        seed=args.seed,
        data_dir=args.data_dir,
        dataset_config=args.dataset_config,
    )


# --- progress ------------------------------------------------------------------------------------
def _progress_callback(console, phase: str):
    """A TrainerCallback drawing a rich progress bar with loss and sparsity (target vs expected)."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
    from transformers import TrainerCallback

    class RichProgress(TrainerCallback):
        def __init__(self) -> None:
            self.progress = None
            self.task = None

        def on_train_begin(self, args, state, control, **kwargs):
            if not console.is_terminal:  # a log file gets one line per log (on_log) instead of a live bar
                return
            self.progress = Progress(
                TextColumn(f"[bold]{phase}"),
                BarColumn(),
                MofNCompleteColumn(),
                TimeElapsedColumn(),
                TextColumn("{task.fields[info]}"),
                console=console,
            )
            self.progress.start()
            self.task = self.progress.add_task(phase, total=state.max_steps, info="")

        def on_step_end(self, args, state, control, **kwargs):
            if self.progress is not None:
                self.progress.update(self.task, completed=state.global_step)

        def on_log(self, args, state, control, logs=None, **kwargs):
            logs = logs or {}
            parts = []
            if "loss" in logs:
                parts.append(f"loss {logs['loss']:.4f}")
            if "expected_sparsity" in logs:
                parts.append(
                    f"sparsity {logs['expected_sparsity']:.3f} (eval {logs.get('deterministic_sparsity', 0):.3f}) "
                    f"/ target {logs.get('target_sparsity', 0):.3f}"
                )
            if "lambda_1" in logs:
                parts.append(f"λ1 {logs['lambda_1']:+.3f} λ2 {logs.get('lambda_2', 0):+.3f}")
            if not parts:
                return
            if self.progress is not None:
                self.progress.update(self.task, info=" | ".join(parts))
            else:
                line = f"{phase} step {state.global_step}/{state.max_steps}: " + " | ".join(parts)
                console.print(line, soft_wrap=True, highlight=False)

        def on_train_end(self, args, state, control, **kwargs):
            if self.progress is not None:
                self.progress.stop()

    return RichProgress()


def _train(trainer_cls, console, phase: str, **kwargs):
    """Build a (Pruning)Trainer with the rich progress bar instead of transformers' printing, and train it."""
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    trainer = trainer_cls(**kwargs)
    trainer.remove_callback(PrinterCallback)
    trainer.remove_callback(ProgressCallback)
    trainer.add_callback(_progress_callback(console, phase))
    start = time.perf_counter()
    trainer.train()
    return trainer, time.perf_counter() - start


def _training_args(cls, args, workdir: str, n_train: int, *, epochs: float, max_steps: int | None, **extra):
    import torch

    steps = max_steps or math.ceil(math.ceil(n_train / args.batch_size) * epochs)
    return cls(
        output_dir=workdir,
        num_train_epochs=epochs,
        max_steps=max_steps if max_steps else -1,
        per_device_train_batch_size=args.batch_size,
        per_device_eval_batch_size=max(args.batch_size, 32),
        learning_rate=args.learning_rate,
        weight_decay=0.01,
        warmup_steps=0.1,
        logging_steps=max(1, steps // 50),  # about 50 points for the progress and the plots
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
        dataloader_pin_memory=torch.cuda.is_available(),
        seed=args.seed,
        train_sampling_strategy="group_by_length" if args.task == "seq-cls" else "random",
        **extra,
    )


# --- the main job --------------------------------------------------------------------------------
def _fill_task_defaults(args) -> None:
    for key, value in TASK_DEFAULTS[args.task].items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    if args.push_to_hub and not args.repo_id:
        raise CliError("--push-to-hub needs --repo-id owner/name.")


def _params(model) -> int:
    return sum(p.numel() for p in model.parameters())


def _latency_inputs(dataset, tokenizer, batch_size: int, max_length: int) -> dict:
    """A batch of ``batch_size`` evaluation rows padded to ``max_length``: dense and compacted see the same shapes."""
    rows = [{k: v for k, v in dataset[i % len(dataset)].items() if k != "labels"} for i in range(batch_size)]
    return dict(tokenizer.pad(rows, padding="max_length", max_length=max_length, return_tensors="pt"))


def run_prune(args) -> dict:
    """``hf-flop prune``: the whole job; returns the summary that it also writes to ``summary.json``."""
    from rich.console import Console

    from .data import find_model, load_tokenizer

    _fill_task_defaults(args)
    console = Console()
    output_dir = check_output_dir(
        Path(args.output_dir).expanduser(), args.overwrite, name="--output-dir", overwrite_hint="pass --overwrite"
    )
    from .config import FlopConfig

    flop_config = FlopConfig(target_sparsity=args.target, levels=args.levels, gate=args.gate, round_to=args.round_to)
    _quiet()
    started, load_start = time.perf_counter(), os.getloadavg()
    with console.status("loading model and data"):
        model_path = find_model(args.model)
        tokenizer = load_tokenizer(model_path)
        data = _prepare_data(args, tokenizer)
    console.print(
        f"[bold]hf-flop prune[/]: {args.task} | model {args.model} | dataset {args.dataset} | "
        f"train {len(data['train']):,} | eval ({data['eval_split']}) {len(data['report']):,} | "
        f"target {args.target} | levels {','.join(args.levels)}"
    )
    with atomic_folder(output_dir, overwrite=args.overwrite) as staging:
        summary = _prune_job(args, console, model_path, tokenizer, data, flop_config, staging)
        summary["wall_time_s"] = {**summary["wall_time_s"], "total": round(time.perf_counter() - started, 1)}
        summary["machine"]["load_avg_start"] = load_start
        write_json_atomic(staging / "summary.json", summary)
    _print_summary(console, summary, output_dir)
    if args.push_to_hub:
        _push(args, output_dir, console)
    return summary


def _prune_job(args, console, model_path, tokenizer, data, flop_config, out: Path) -> dict:
    import torch
    from transformers import Trainer, TrainingArguments, set_seed

    from . import compact, get_flop_model, sparsity_report
    from .data import load_task_model
    from .metrics import cpu_latency, evaluate_model
    from .trainer import PruningArguments, PruningTrainer

    set_seed(args.seed)
    task, collator = args.task, data["collator"]
    model = load_task_model(model_path, task, data["num_labels"], tokenizer)
    evaluate = lambda m: evaluate_model(m, data["report"], task=task, collator=collator, batch_size=32)  # noqa: E731
    metric = data["metric"]
    results: dict = {"metric": metric, "eval_split": data["eval_split"]}
    times: dict = {}
    workdir = tempfile.mkdtemp(prefix="hf-flop-trainer-")
    try:
        if task == "causal-lm":
            with console.status("evaluating the pretrained model"):
                results["pretrained"] = evaluate(model)[metric]
        if args.dense_epochs > 0:
            dense_args = _training_args(
                TrainingArguments, args, workdir, len(data["train"]), epochs=args.dense_epochs, max_steps=None
            )
            _, times["dense_fine_tune"] = _train(
                Trainer,
                console,
                "dense fine-tune",
                model=model,
                args=dense_args,
                train_dataset=data["train"],
                data_collator=collator,
            )
        with console.status("evaluating the dense model"):
            results["dense"] = evaluate(model)[metric]
        console.print(f"dense {metric} ({data['eval_split']}): {results['dense']:.4f}")
        dense = copy.deepcopy(model).eval()

        model = get_flop_model(model, flop_config)
        prune_args = _training_args(
            PruningArguments,
            args,
            workdir,
            len(data["train"]),
            epochs=args.epochs,
            max_steps=args.max_steps,
            target_warmup_steps=args.target_warmup,
            **{
                k: getattr(args, k)
                for k in ("gate_learning_rate", "lagrangian_learning_rate")
                if getattr(args, k) is not None
            },
        )
        trainer, times["pruning"] = _train(
            PruningTrainer,
            console,
            "pruning",
            model=model,
            args=prune_args,
            train_dataset=data["train"],
            data_collator=collator,
            teacher_model=dense if args.distill else None,
        )
        report = sparsity_report(model)
        with console.status("compacting and evaluating"):
            small = compact(model).eval()
            results["pruned"] = evaluate(small)[metric]
        console.print(f"pruned {metric} ({data['eval_split']}): {results['pruned']:.4f}")

        latency = {}  # CPU latency, whatever device trained
        dense, small = dense.cpu(), small.cpu()
        with console.status("measuring CPU latency (dense vs compacted)"), torch.inference_mode():
            for batch_size in LATENCY_BATCHES:
                inputs = _latency_inputs(data["report"], tokenizer, batch_size, args.max_length)
                repeats, warmup = (5, 1) if batch_size > 1 else (10, 2)
                # a fixed thread count keeps the ratio stable on a shared machine
                timing = cpu_latency(
                    {"dense": dense, "pruned": small},
                    inputs,
                    repeats=repeats,
                    warmup=warmup,
                    threads=args.latency_threads,
                )
                latency[str(batch_size)] = {k: round(v * 1000, 3) for k, v in timing.items()}

        with console.status("saving the compacted model and card"):
            _save_model(model, out / "model", tokenizer, results, latency, args)
        plots = [] if args.no_plots else _plots(trainer.state.log_history, report, out / "plots", args)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return {
        "task": task,
        "model": args.model,
        "dataset": args.dataset,
        "levels": args.levels,
        "target_sparsity": args.target,
        "results": results,
        "params": {
            "dense_total": _params(dense),
            "pruned_total": _params(small),
            "prunable": report.prunable_params,
            "prunable_kept": report.deterministic_kept_params,
            "sparsity": report.deterministic_sparsity,
        },
        "latency_ms": latency,
        "speedup": {b: round(v["dense"] / v["pruned"], 3) for b, v in latency.items()},
        "wall_time_s": {k: round(v, 1) for k, v in times.items()},
        "machine": {"cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(), "load_avg_end": os.getloadavg()},
        "train_examples": len(data["train"]),
        "eval_examples": len(data["report"]),
        "plots": plots,
        "log_history": trainer.state.log_history,
        "settings": {k: v for k, v in vars(args).items() if k not in ("func",)},
    }


def _save_model(model, folder: Path, tokenizer, results: dict, latency: dict, args) -> None:
    from . import save_compacted
    from .data import DATASETS, MODEL_HUB_IDS

    eval_results = {results["metric"]: results["pruned"]}  # the dense baseline is in summary.json
    setting = f"CPU, {args.latency_threads} thread(s), {args.max_length} tokens"
    speedup = {f"{setting}, batch {b}": v["dense"] / v["pruned"] for b, v in latency.items()}
    dataset = DATASETS.get(args.dataset, args.dataset)
    base = MODEL_HUB_IDS.get(args.model, args.model).rstrip("/").split("/")[-1]
    name = args.repo_id or re.sub(r"[^\w.-]", "-", f"{base}-flop-{round(100 * args.target)}")
    save_compacted(
        model,
        folder,
        repo_id=name,  # the card's title; pushing (if asked) happens once the output folder is complete
        tokenizer=tokenizer,
        eval_results=eval_results,
        eval_dataset=f"{dataset} ({results['eval_split']} split)",
        speedup=speedup,
        base_model=MODEL_HUB_IDS.get(args.model),
    )


def _plots(log_history, report, folder: Path, args) -> list[str]:
    from .plots import plot_kept, plot_training

    title = f"{args.model} on {args.dataset}, target {args.target}, levels {','.join(args.levels)}"
    return [
        plot_training(log_history, folder / "sparsity.png", title=title).name,
        plot_kept(report, folder / "kept.png", title=title).name,
    ]


def _push(args, output_dir: Path, console) -> None:
    from .hub import push_compacted

    with console.status(f"pushing to {args.repo_id}"):
        url = push_compacted(output_dir / "model", args.repo_id, private=args.private or None)
    console.print(f"pushed: {url}")


def _print_summary(console, summary: dict, output_dir: Path) -> None:
    from rich.table import Table

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
        f"{params['prunable_kept']:,} (sparsity {params['sparsity']:.3f}, target {summary['target_sparsity']})",
    )
    for batch, values in lat.items():
        table.add_row(
            f"CPU latency, batch {batch} (ms, {summary['settings']['latency_threads']} thr)",
            f"{values['dense']:.1f}",
            f"{values['pruned']:.1f} ({summary['speedup'][batch]:.2f}x)",
        )
    times = summary["wall_time_s"]
    table.add_row(
        "wall time (s)", f"{times.get('dense_fine_tune', 0):.0f} fine-tune", f"{times['pruning']:.0f} pruning"
    )
    console.print(table)
    console.print(f"written to {output_dir}/: model/ (compacted model + README.md card), summary.json, plots/")


# --- report --------------------------------------------------------------------------------------
def run_report(args) -> None:
    """``hf-flop report``: inject FLOP and print the sparsity report of the untrained gates."""
    from . import FlopConfig, get_flop_model, sparsity_report
    from .data import find_model, load_task_model

    _quiet()
    path = find_model(args.model or TASK_DEFAULTS[args.task]["model"])
    model = load_task_model(path, args.task, num_labels=2)
    config = FlopConfig(target_sparsity=args.target, levels=args.levels, gate=args.gate, round_to=args.round_to)
    model = get_flop_model(model, config)
    print(sparsity_report(model))


if __name__ == "__main__":
    sys.exit(main())
