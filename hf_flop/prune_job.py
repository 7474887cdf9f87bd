"""The ``hf-flop prune`` job, as a sequence of phases: ``run`` reads top to bottom.

load the model and data -> dense fine-tune (optional) and evaluate -> prune with ``PruningTrainer``
(distilling from the dense model) -> compact and evaluate -> CPU latency, dense vs compacted ->
save the compacted model with its card, the plots, the ONNX model and ``model.gguf`` for llama.cpp (both
optional) and ``summary.json`` -> push (optional).

Everything is written into a temporary folder that replaces the output folder only once complete.
The options arrive completed and checked by ``hf_flop_cli`` (the command line). torch, transformers
and rich are imported inside the phases.
"""

from __future__ import annotations

import argparse
import copy
import math
import os
import re
import tempfile
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from hf_flop_cli.choices import DATASETS

from .data import TaskData
from .files import atomic_folder, write_json_atomic

LATENCY_BATCHES = (1, 32)
GGUF_FILE = "model.gguf"
# export_gguf's arguments -> the options that set them, for its messages addressed to a CLI user
GGUF_NAMES = {"tokenizer_gguf=": "--gguf-tokenizer", "tokenizer_pre=": "hf_flop.export_gguf(tokenizer_pre=...)"}
# PruningArguments fields -> the options that set them, for messages addressed to a CLI user
CLI_NAMES = {
    "max_steps / num_train_epochs": "--max-steps / --epochs",
    "gate_learning_rate": "--gate-learning-rate",
    "lagrangian_learning_rate": "--lagrangian-learning-rate",
    "target_warmup_steps": "--target-warmup",
    "pruning_phase": "--pruning-phase",
}


@dataclass
class _Job:
    """What the phases share: the options, the console, the data, and the results they record."""

    args: argparse.Namespace
    console: Any
    tokenizer: Any
    data: TaskData
    workdir: str  # Trainer's output_dir; nothing is saved there (save_strategy "no")
    results: dict = field(default_factory=dict)  # metric values: pretrained (causal-lm), dense, pruned
    times: dict = field(default_factory=dict)  # wall time of the training phases, in seconds
    target: dict = field(default_factory=dict)  # where the size ended against the target (TargetCheck, met, message)
    training: dict = field(default_factory=dict)  # PruningTrainer.training_facts(), for the card

    def evaluate(self, model) -> float:
        """The task's metric of ``model`` on the report split."""
        from .metrics import evaluate_model

        data = self.data
        scores = evaluate_model(model, data["report"], task=self.args.task, collator=data["collator"], batch_size=32)
        return scores[data["metric"]]


def run(args: argparse.Namespace, flop_config, output_dir: Path) -> dict:
    """Run the job on checked options; returns the summary that it also writes to ``output_dir/summary.json``."""
    import torch
    from rich.console import Console

    from .progress import print_summary, quiet_libraries

    started, load_start = time.perf_counter(), os.getloadavg()
    console = Console()
    quiet_libraries()
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)  # training and evaluation; the latency phase sets its own
    try:
        summary = _run(args, flop_config, output_dir, console, started, load_start)
    finally:
        torch.set_num_threads(threads)  # a caller in the same process (tests, a notebook) gets its setting back
    print_summary(console, summary, output_dir)
    if args.push_to_hub:
        _push(args, output_dir, console)
    return summary


def _run(args: argparse.Namespace, flop_config, output_dir: Path, console, started: float, load_start) -> dict:
    """The phases, written into a temporary folder that becomes ``output_dir`` once complete."""
    tokenizer, data, model = _load(args, console)
    _check_before_training(model, flop_config, console)
    if args.export_gguf:
        _check_gguf_export(args, model, tokenizer, console)
    with (
        tempfile.TemporaryDirectory(prefix="hf-flop-trainer-") as workdir,
        atomic_folder(output_dir, overwrite=args.overwrite) as out,
    ):
        results = {"metric": data["metric"], "eval_split": data["eval_split"]}
        job = _Job(args, console, tokenizer, data, workdir, results=results)
        dense = _fine_tune_dense(job, model)
        flop_model, log_history = _prune(job, model, dense, flop_config)
        small, report = _compact_and_evaluate(job, flop_model)
        latency = _measure_latency(job, dense, small)
        _save_model(job, flop_model, latency, out / "model", output_dir / "model")
        plots = [] if args.no_plots else _plots(job, log_history, report, out / "plots")
        summary = _summary(job, dense, small, report, latency, plots, log_history)
        if args.export_onnx:
            summary["onnx"] = _export_onnx(job, small, out / "model.onnx")
        if args.export_gguf:
            summary["gguf"] = _export_gguf(job, small, out / GGUF_FILE)
        summary["wall_time_s"]["total"] = round(time.perf_counter() - started, 1)
        summary["machine"]["load_avg_start"] = load_start
        write_json_atomic(out / "summary.json", summary)
    return summary


# --- the phases ----------------------------------------------------------------------------------
def prepare_data(args: argparse.Namespace, tokenizer) -> TaskData:
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


def _load(args: argparse.Namespace, console) -> tuple[Any, TaskData, Any]:
    """The tokenizer, the prepared data and the model (seeded: a new classifier head is initialised here)."""
    from transformers import set_seed

    from .data import find_model, load_task_model, load_tokenizer

    with console.status("loading model and data"):
        path = find_model(args.model)
        tokenizer = load_tokenizer(path)
        data = prepare_data(args, tokenizer)
    console.print(
        f"[bold]hf-flop prune[/]: {args.task} | model {args.model} | dataset {args.dataset} | "
        f"train {len(data['train']):,} | eval ({data['eval_split']}) {len(data['report']):,} | "
        f"target {args.target} | levels {','.join(args.levels)} | {args.threads} thread(s)"
    )
    set_seed(args.seed)
    return tokenizer, data, load_task_model(path, args.task, data["num_labels"], tokenizer, data["label_names"])


def _check_before_training(model, flop_config, console) -> None:
    """What injection and PruningTrainer would refuse after the dense fine-tune, refused now (model untouched)."""
    from .preflight import check_before_training

    with console.status("checking the pruning configuration against the model"):
        check_before_training(model, flop_config, option="--target-modules")


def _gguf_tokenizer(args: argparse.Namespace):
    """``--gguf-tokenizer``, else the GGUF an embedded default came from (its vocabulary as llama.cpp's converter wrote it)."""
    from .data import source_gguf

    return Path(args.gguf_tokenizer).expanduser() if args.gguf_tokenizer else source_gguf(args.model)


def _cli_words(message: str) -> str:
    for name, option in GGUF_NAMES.items():
        message = message.replace(name, option)
    return message


def _check_gguf_export(args: argparse.Namespace, model, tokenizer, console) -> None:
    """What export_gguf would refuse about the model and its vocabulary (--export-gguf), refused before training."""
    from .export_gguf import check_exportable

    with console.status("checking that llama.cpp can take the model (--export-gguf)"):
        try:
            check_exportable(model, tokenizer=tokenizer, tokenizer_gguf=_gguf_tokenizer(args))
        except ValueError as err:
            raise ValueError(f"--export-gguf: {_cli_words(str(err))}") from None


def _export_gguf(job: _Job, small, path: Path) -> dict:
    """``model.gguf`` for llama.cpp; returns what the summary records (architecture, per-layer shapes, size)."""
    import gguf

    from .export_gguf import export_gguf

    args = job.args
    with job.console.status("writing model.gguf for llama.cpp"), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        export_gguf(small, path, tokenizer=job.tokenizer, tokenizer_gguf=_gguf_tokenizer(args), dtype=args.gguf_dtype)
    # e.g. low-rank layers stored dense; the API's other choice (densify=False, refuse) is no option here
    for warning in caught:
        if issubclass(warning.category, UserWarning):
            text = _cli_words(str(warning.message).split("; densify=False")[0].removeprefix("export_gguf: "))
            job.console.print(f"[bold yellow]note:[/] {text}", highlight=False)
    fields = gguf.GGUFReader(path).fields
    arch = fields["general.architecture"].contents()
    return {
        "file": path.name,
        "architecture": arch,
        "dtype": args.gguf_dtype,
        "bytes": path.stat().st_size,
        "head_count": fields[f"{arch}.attention.head_count"].contents(),
        "head_count_kv": fields[f"{arch}.attention.head_count_kv"].contents(),
        "feed_forward_length": fields[f"{arch}.feed_forward_length"].contents(),
    }


def _fine_tune_dense(job: _Job, model):
    """Fine-tune ``model`` in place (``--dense-epochs``) and evaluate it; returns a frozen copy: baseline and teacher."""
    from transformers import Trainer, TrainingArguments

    from .progress import train_with_progress

    args, console, metric = job.args, job.console, job.data["metric"]
    if args.task == "causal-lm":  # a pretrained LM is a baseline as it is; a new classifier head is random
        with console.status("evaluating the pretrained model"):
            job.results["pretrained"] = job.evaluate(model)
    if args.dense_epochs > 0:
        training_args = _training_args(TrainingArguments, job, epochs=args.dense_epochs, max_steps=None)
        trainer = Trainer(
            model=model, args=training_args, train_dataset=job.data["train"], data_collator=job.data["collator"]
        )
        job.times["dense_fine_tune"] = train_with_progress(trainer, console, "dense fine-tune")
    with console.status("evaluating the dense model"):
        job.results["dense"] = job.evaluate(model)
    console.print(f"dense {metric} ({job.data['eval_split']}): {job.results['dense']:.4f}")
    return copy.deepcopy(model).eval()


def _prune(job: _Job, model, dense, flop_config) -> tuple[Any, list[dict]]:
    """Inject FLOP and train to the target with PruningTrainer; returns the FLOP model and the training logs."""
    from . import get_flop_model
    from .progress import train_with_progress
    from .trainer import PruningArguments, PruningTrainer

    args = job.args
    model = get_flop_model(model, flop_config)
    rates = {
        k: getattr(args, k) for k in ("gate_learning_rate", "lagrangian_learning_rate") if getattr(args, k) is not None
    }
    training_args = _training_args(
        PruningArguments,
        job,
        epochs=args.epochs,
        max_steps=args.max_steps,
        target_warmup_steps=args.target_warmup,
        pruning_phase=args.pruning_phase,
        oneshot_score=args.oneshot_score,
        hidden_distillation_weight=args.hidden_distillation,
        calibration_batches=args.calibration_batches,
        **rates,
    )
    trainer = PruningTrainer(
        model=model,
        args=training_args,
        train_dataset=job.data["train"],
        data_collator=job.data["collator"],
        teacher_model=dense if args.distill else None,
    )
    with warnings.catch_warnings():
        # the job reports a missed target itself, in its own option names (below and in the summary)
        warnings.filterwarnings("ignore", message="PruningTrainer: the model ended", category=UserWarning)
        job.times["pruning"] = train_with_progress(trainer, job.console, "pruning")
    job.training = trainer.training_facts()
    check = trainer.target_check
    job.target = {**asdict(check), "met": check.met}
    if not check.met:
        job.target["message"] = trainer.missed_target_message(CLI_NAMES).replace(
            "PruningTrainer: the model", "the model"
        )
        job.console.print(f"[bold yellow]warning:[/] {job.target['message']}", highlight=False)
    return model, trainer.state.log_history


def _compact_and_evaluate(job: _Job, flop_model):
    """The compacted model (eval mode) and the sparsity report of the gates it was cut by."""
    from . import compact, sparsity_report

    report = sparsity_report(flop_model)
    with job.console.status("compacting and evaluating"):
        small = compact(flop_model).eval()
        job.results["pruned"] = job.evaluate(small)
    job.console.print(f"pruned {job.data['metric']} ({job.data['eval_split']}): {job.results['pruned']:.4f}")
    return small, report


def _measure_latency(job: _Job, dense, small) -> dict[str, dict[str, float]]:
    """Milliseconds per forward of each model on CPU (whatever device trained), per batch size."""
    import torch

    from .metrics import cpu_latency

    args = job.args
    latency = {}
    dense, small = dense.cpu(), small.cpu()
    with job.console.status("measuring CPU latency (dense vs compacted)"), torch.inference_mode():
        for batch_size in LATENCY_BATCHES:
            inputs = _latency_inputs(job.data["report"], job.tokenizer, batch_size, args.max_length)
            repeats, warmup = (5, 1) if batch_size > 1 else (10, 2)
            # a fixed thread count keeps the ratio stable on a shared machine
            timing = cpu_latency(
                {"dense": dense, "pruned": small}, inputs, repeats=repeats, warmup=warmup, threads=args.latency_threads
            )
            latency[str(batch_size)] = {k: round(v * 1000, 3) for k, v in timing.items()}
    return latency


def _save_model(job: _Job, flop_model, latency: dict, folder: Path, final_folder: Path) -> None:
    """The compacted model, tokenizer and model card (``save_compacted``) in ``folder``.

    ``final_folder`` is where ``folder`` ends up (the job writes into a staging folder): the card's load
    snippet names it, or the Hub repository when pushing.
    """
    from . import save_compacted
    from .data import DATASET_SOURCES, MODEL_HUB_IDS

    args, results = job.args, job.results
    metric = results["metric"]
    setting = f"CPU, {args.latency_threads} thread(s), {args.max_length} tokens"
    speedup = {f"{setting}, batch {b}": v["dense"] / v["pruned"] for b, v in latency.items()}
    dataset_id = _hub_dataset_id(args.dataset)
    # a local file or folder is named, not located: the card travels, the user's paths should not
    dataset = DATASETS.get(args.dataset) or dataset_id or Path(args.dataset).name
    source = DATASET_SOURCES.get(args.dataset, dataset)  # what the embedded data really is, in full
    base = MODEL_HUB_IDS.get(args.model, args.model).rstrip("/").split("/")[-1]
    name = args.repo_id or re.sub(r"[^\w.-]", "-", f"{base}-flop-{round(100 * args.target)}")
    with job.console.status("saving the compacted model and card"):
        save_compacted(
            flop_model,
            folder,
            repo_id=name,  # the card's title; pushing (if asked) happens once the output folder is complete
            tokenizer=job.tokenizer,
            eval_results={metric: results["pruned"]},
            baseline_results={metric: results["dense"]},
            eval_dataset=dataset,
            eval_dataset_id=dataset_id,
            eval_split=results["eval_split"],
            datasets=[dataset_id] if dataset_id else None,
            speedup=speedup,
            base_model=MODEL_HUB_IDS.get(args.model),
            license=args.license,
            training=_training_facts(job, source),
            load_from=args.repo_id if args.push_to_hub else str(final_folder.absolute()),
        )


def _export_onnx(job: _Job, small, path: Path) -> str:
    """The compacted model as ONNX at ``path`` (``export_onnx``: checked against PyTorch with ONNX Runtime); its name."""
    from .onnx_export import export_onnx

    with job.console.status("exporting to ONNX and checking it with ONNX Runtime"):
        export_onnx(small, path)
    job.console.print(f"ONNX model written and checked with ONNX Runtime: {path.name}")
    return path.name


def _hub_dataset_id(dataset: str) -> str | None:
    """``--dataset`` when it names a Hub dataset (not an embedded default, not a local path), else None."""
    if dataset in DATASETS or Path(dataset).expanduser().exists():
        return None
    return dataset if re.fullmatch(r"[\w.-]+(/[\w.-]+)?", dataset) else None


def _training_facts(job: _Job, dataset: str) -> dict[str, str]:
    """How the model was made, for the card's "Training procedure": the data, the dense fine-tune, then the
    pruning as ``PruningTrainer.training_facts`` tells it."""
    args, data = job.args, job.data
    return {
        "data": f"{dataset}; {len(data['train']):,} training examples, evaluated on {len(data['report']):,} "
        f"{data['eval_split']} examples ({args.max_length} tokens at most)",
        "dense fine-tune": f"{args.dense_epochs:g} epoch(s) before pruning (the baseline and the teacher)"
        if args.dense_epochs
        else "none (the pretrained model is the baseline)",
        **job.training,
    }


def _plots(job: _Job, log_history: list[dict], report, folder: Path) -> list[str]:
    """The sparsity-over-steps and kept-per-layer PNGs in ``folder``; returns their file names."""
    from .plots import plot_kept, plot_training

    args = job.args
    model, dataset = Path(args.model).name or args.model, Path(args.dataset).name or args.dataset  # no long paths
    title = f"{model} on {dataset}, target {args.target}, levels {','.join(args.levels)}"
    return [
        plot_training(log_history, folder / "sparsity.png", title=title).name,
        plot_kept(report, folder / "kept.png", title=title).name,
    ]


def _summary(job: _Job, dense, small, report, latency: dict, plots: list[str], log_history: list[dict]) -> dict:
    """Everything ``summary.json`` records: results, sizes, latency, timing, machine, settings, logs."""
    args = job.args
    return {
        "task": args.task,
        "model": args.model,
        "dataset": args.dataset,
        "levels": args.levels,
        "target_sparsity": args.target,
        "target_check": job.target,
        "results": job.results,
        "params": {
            "dense_total": _params(dense),
            "pruned_total": _params(small),
            "prunable": report.prunable_params,
            "prunable_kept": report.deterministic_kept_params,
            "sparsity": report.deterministic_sparsity,
        },
        "latency_ms": latency,
        "speedup": {b: round(v["dense"] / v["pruned"], 3) for b, v in latency.items()},
        "wall_time_s": {k: round(v, 1) for k, v in job.times.items()},
        "machine": {"cpus": os.cpu_count(), "torch_threads": args.threads, "load_avg_end": os.getloadavg()},
        "train_examples": len(job.data["train"]),
        "eval_examples": len(job.data["report"]),
        "plots": plots,
        "log_history": log_history,
        "settings": {k: v for k, v in vars(args).items() if k not in ("func",)},
    }


def _push(args: argparse.Namespace, output_dir: Path, console) -> None:
    from .hub import push_compacted

    with console.status(f"pushing to {args.repo_id}"):
        url = push_compacted(output_dir / "model", args.repo_id, private=args.private or None)
    console.print(f"pushed: {url}")


# --- helpers -------------------------------------------------------------------------------------
def _training_args(cls, job: _Job, *, epochs: float, max_steps: int | None, **extra):
    """(Pruning)TrainingArguments from the options: no checkpoints, ~50 log points, no tqdm."""
    import torch

    args = job.args
    steps = max_steps or math.ceil(math.ceil(len(job.data["train"]) / args.batch_size) * epochs)
    return cls(
        output_dir=job.workdir,
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


def _params(model) -> int:
    return sum(p.numel() for p in model.parameters())


def _latency_inputs(dataset, tokenizer, batch_size: int, max_length: int) -> dict:
    """A batch of ``batch_size`` evaluation rows padded to ``max_length``: dense and compacted see the same shapes."""
    rows = [{k: v for k, v in dataset[i % len(dataset)].items() if k != "labels"} for i in range(batch_size)]
    return dict(tokenizer.pad(rows, padding="max_length", max_length=max_length, return_tensors="pt"))
