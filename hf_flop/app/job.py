"""The ``hf-flop prune`` job, as a sequence of phases: ``run`` reads top to bottom.

load the model and data -> dense fine-tune (optional) and evaluate -> prune with ``PruningTrainer``
(distilling from the dense model) -> compact and evaluate -> CPU latency, dense vs compacted ->
export the ONNX model and ``model.gguf`` for llama.cpp (both optional), each measured on itself (``exports.json``)
-> save the compacted model with its card, the plots and ``summary.json`` -> push (optional).

Everything is written into a temporary folder that replaces the output folder only once complete.
The options arrive complete and checked (``JobOptions``, built by ``hf_flop_cli``, the command line).
torch, transformers and rich are imported inside the phases.
"""

from __future__ import annotations

import copy
import math
import os
import tempfile
import time
import warnings
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

from ..files import atomic_folder, write_json_atomic
from .card import save_model
from .data import TaskData
from .exports import card_rows, measure_gguf, measure_onnx, write_exports
from .gguf_file import GGUF_FILE, check_gguf_export, export_model_gguf
from .options import JobOptions
from .state import JobState

LATENCY_BATCHES = (1, 32)
SEARCH_FILE = "shape_search.json"  # --search: every candidate mix tried, and the one chosen
# PruningArguments fields -> the options that set them, for messages addressed to a CLI user
CLI_NAMES = {
    "max_steps / num_train_epochs": "--max-steps / --epochs",
    "gate_learning_rate": "--gate-learning-rate",
    "lagrangian_learning_rate": "--lagrangian-learning-rate",
    "target_warmup_steps": "--target-warmup",
    "pruning_phase": "--pruning-phase",
    "recovery_lora_rank": "--recovery-lora-rank",
}


def run(options: JobOptions, flop_config, output_dir: Path) -> dict:
    """Run the job on checked options; returns the summary that it also writes to ``output_dir/summary.json``.

    ``flop_config`` is the options' ``FlopConfig``; ``output_dir`` the checked ``options.output_dir``.
    """
    import torch
    from rich.console import Console

    from ..scores import recommended_oneshot_score
    from .progress import print_summary, quiet_libraries

    if options.oneshot_score is None:  # not given: what the library recommends for this configuration
        options = replace(options, oneshot_score=recommended_oneshot_score(flop_config))
    started, load_start = time.perf_counter(), os.getloadavg()
    console = Console()
    quiet_libraries()
    threads = torch.get_num_threads()
    torch.set_num_threads(options.threads)  # training and evaluation; the latency phase sets its own
    try:
        summary = _run(options, flop_config, output_dir, console, started, load_start)
    finally:
        torch.set_num_threads(threads)  # a caller in the same process (tests, a notebook) gets its setting back
    print_summary(console, summary, output_dir)
    if options.push_to_hub:
        _push(options, output_dir, summary, console)
    return summary


def _run(options: JobOptions, flop_config, output_dir: Path, console, started: float, load_start) -> dict:
    """The phases, written into a temporary folder that becomes ``output_dir`` once complete."""
    tokenizer, data, model = _load(options, console)
    _check_before_training(model, flop_config, console)
    if options.export_gguf:
        check_gguf_export(options, model, tokenizer, console, flop_config)
    with (
        tempfile.TemporaryDirectory(prefix="hf-flop-trainer-") as workdir,
        atomic_folder(output_dir, overwrite=options.overwrite) as out,
    ):
        results = {"metric": data["metric"], "eval_split": data["eval_split"]}
        job = JobState(options, console, tokenizer, data, workdir, results=results)
        dense = _fine_tune_dense(job, model)
        flop_model, log_history = _prune(job, model, dense, flop_config)
        if job.search:
            write_json_atomic(out / SEARCH_FILE, job.search)
        small, report = _compact_and_evaluate(job, flop_model)
        latency = _measure_latency(job, dense, small)
        exported, rows = _export_and_measure(job, small, out)  # first: the card shows what was measured
        save_model(job, flop_model, latency, out / "model", output_dir / "model", exports=card_rows(rows))
        plots = [] if options.no_plots else _plots(job, log_history, report, out / "plots")
        summary = {**_summary(job, dense, small, report, latency, plots, log_history), **exported}
        summary["wall_time_s"]["total"] = round(time.perf_counter() - started, 1)
        summary["machine"]["load_avg_start"] = load_start
        write_json_atomic(out / "summary.json", summary)
    return summary


# --- the phases ----------------------------------------------------------------------------------
def prepare_data(options: JobOptions, tokenizer) -> TaskData:
    """The options' dataset, tokenized for ``options.task`` (``hf_flop.app.data.prepare_task_data``)."""
    from .data import prepare_task_data  # looked up when called: one patched name serves every entry point

    return prepare_task_data(
        options.dataset,
        tokenizer,
        task=options.task,
        max_length=options.max_length,
        text_column=options.text_column,
        label_column=options.label_column,
        eval_split=options.eval_split,
        train_samples=options.train_samples,
        eval_samples=options.eval_samples,
        seed=options.seed,
        data_dir=options.data_dir,
        dataset_config=options.dataset_config,
    )


def _load(options: JobOptions, console) -> tuple[Any, TaskData, Any]:
    """The tokenizer, the prepared data and the model (seeded: a new classifier head is initialised here)."""
    from transformers import set_seed

    from .data import find_model, load_task_model, load_tokenizer

    with console.status("loading model and data"):
        path = find_model(options.model)
        tokenizer = load_tokenizer(path)
        data = prepare_data(options, tokenizer)
    console.print(
        f"[bold]hf-flop prune[/]: {options.task} | model {options.model} | dataset {options.dataset} | "
        f"train {len(data['train']):,} | eval ({data['eval_split']}) {len(data['report']):,} | "
        f"target {options.target} | levels {','.join(options.levels)} | {options.threads} thread(s)"
    )
    set_seed(options.seed)
    return tokenizer, data, load_task_model(path, options.task, data["num_labels"], tokenizer, data["label_names"])


def _check_before_training(model, flop_config, console) -> None:
    """What injection and PruningTrainer would refuse after the dense fine-tune, refused now (model untouched)."""
    from ..preflight import check_before_training

    with console.status("checking the pruning configuration against the model"):
        check_before_training(model, flop_config, option="--target-modules")


def _fine_tune_dense(job: JobState, model):
    """Fine-tune ``model`` in place (``--dense-epochs``) and evaluate it; returns a frozen copy: baseline and teacher."""
    from transformers import Trainer, TrainingArguments

    from .progress import train_with_progress

    options, console, metric = job.options, job.console, job.data["metric"]
    if options.task == "causal-lm":  # a pretrained LM is a baseline as it is; a new classifier head is random
        with console.status("evaluating the pretrained model"):
            job.results["pretrained"] = job.evaluate(model)
    if options.dense_epochs > 0:
        training_args = _training_args(TrainingArguments, job, epochs=options.dense_epochs, max_steps=None)
        trainer = Trainer(
            model=model, args=training_args, train_dataset=job.data["train"], data_collator=job.data["collator"]
        )
        job.times["dense_fine_tune"] = train_with_progress(trainer, console, "dense fine-tune")
    with console.status("evaluating the dense model"):
        job.results["dense"] = job.evaluate(model)
    console.print(f"dense {metric} ({job.data['eval_split']}): {job.results['dense']:.4f}")
    return copy.deepcopy(model).eval()


def _prune(job: JobState, model, dense, flop_config) -> tuple[Any, list[dict]]:
    """Inject FLOP and train to the target with PruningTrainer; returns the FLOP model and the training logs."""
    from .. import get_flop_model
    from ..trainer import PruningArguments, PruningTrainer, TargetMissedWarning
    from .progress import train_with_progress

    options = job.options
    model = get_flop_model(model, flop_config)
    rates = {
        k: getattr(options, k)
        for k in ("gate_learning_rate", "lagrangian_learning_rate")
        if getattr(options, k) is not None
    }
    training_args = _training_args(
        PruningArguments,
        job,
        epochs=options.epochs,
        max_steps=options.max_steps,
        target_warmup_steps=options.target_warmup,
        pruning_phase=options.pruning_phase,
        oneshot_score=options.oneshot_score,
        hidden_distillation_weight=options.hidden_distillation,
        calibration_batches=options.calibration_batches,
        recovery_lora_rank=options.recovery_lora_rank,
        **rates,
    )
    trainer = PruningTrainer(
        model=model,
        args=training_args,
        train_dataset=job.data["train"],
        data_collator=job.data["collator"],
        teacher_model=dense if options.distill else None,
    )
    if options.search:
        job.search = _search_shape(job, model, trainer)
    with warnings.catch_warnings():
        # the job reports a missed target itself, in its own option names (below and in the summary)
        warnings.simplefilter("ignore", TargetMissedWarning)
        job.times["pruning"] = train_with_progress(trainer, job.console, "pruning")
    job.training = trainer.training_facts()
    check = trainer.target_check
    job.target = {**asdict(check), "met": check.met}
    if not check.met:
        job.target["message"] = trainer.missed_target_message(CLI_NAMES, prefix="")
        job.console.print(f"[bold yellow]warning:[/] {job.target['message']}", highlight=False)
    return model, trainer.state.log_history


def _search_shape(job: JobState, model, trainer) -> dict:
    """--search: the mix of levels with the lowest held-out loss on the trainer's calibration batches
    (``hf_flop.search_shape``) sets the masks, refit; the trainer then only recovers. Returns the candidate table."""
    from ..shape_options import ShapeSearchConfig
    from ..shape_search import search_shape

    options = job.options
    given = (("hidden_fractions", options.search_hidden), ("layer_fractions", options.search_layers))
    config = ShapeSearchConfig(score=options.oneshot_score, seed=options.seed, **{k: tuple(v) for k, v in given if v})
    started = time.perf_counter()
    with job.console.status("searching the shape: candidate mixes, each pruned one-shot, refit and scored"):
        result = search_shape(model, None, trainer.calibration_data, options=config, apply=True)
    job.times["shape_search"] = time.perf_counter() - started
    job.console.print(str(result), highlight=False)
    trainer.phases.adopt_masks(trainer.args, 0, result.best.refit_modules)
    return result.table()


def _compact_and_evaluate(job: JobState, flop_model):
    """The compacted model (eval mode) and the sparsity report of the gates it was cut by."""
    from .. import compact, sparsity_report

    report = sparsity_report(flop_model)
    with job.console.status("compacting and evaluating"):
        small = compact(flop_model).eval()
        job.results["pruned"] = job.evaluate(small)
    job.console.print(f"pruned {job.data['metric']} ({job.data['eval_split']}): {job.results['pruned']:.4f}")
    return small, report


def _measure_latency(job: JobState, dense, small) -> dict[str, dict[str, float]]:
    """Milliseconds per forward of each model on CPU (whatever device trained), per batch size."""
    import torch

    from ..metrics import cpu_latency

    options = job.options
    latency = {}
    dense, small = dense.cpu(), small.cpu()
    with job.console.status("measuring CPU latency (dense vs compacted)"), torch.inference_mode():
        for batch_size, inputs in _latency_batches(job).items():
            repeats, warmup = (5, 1) if batch_size > 1 else (10, 2)
            # a fixed thread count keeps the ratio stable on a shared machine
            timing = cpu_latency(
                {"dense": dense, "pruned": small},
                inputs,
                repeats=repeats,
                warmup=warmup,
                threads=options.latency_threads,
            )
            latency[str(batch_size)] = {k: round(v * 1000, 3) for k, v in timing.items()}
    return latency


def _export_and_measure(job: JobState, small, out: Path) -> tuple[dict, list[dict]]:
    """The exports the options ask for, each measured on the file (``exports.json``); returns the summary's
    entries about them and ``exports.json``'s rows."""
    options = job.options
    summary, rows = {}, []
    if options.export_onnx:
        summary["onnx"] = _export_onnx(job, small, out / "model.onnx")
        if options.onnx_quantization:
            summary["onnx_quantization"] = options.onnx_quantization
        rows.append(measure_onnx(job, out / "model.onnx", _latency_batches(job)))
    if options.export_gguf:
        summary["gguf"] = export_model_gguf(job, small, out / GGUF_FILE)
        rows.append(measure_gguf(job, out / GGUF_FILE))
    if rows:
        summary["exports"] = write_exports(out, rows).name
    return summary, rows


def _export_onnx(job: JobState, small, path: Path) -> str:
    """The compacted model as ONNX at ``path`` (``export_onnx``: checked against PyTorch with ONNX Runtime); its name."""
    from ..onnx_export import export_onnx

    quantization = job.options.onnx_quantization
    with job.console.status("exporting to ONNX and checking it with ONNX Runtime"):
        export_onnx(small, path, quantization=quantization)
    job.console.print(f"ONNX model written and checked with ONNX Runtime: {path.name}")
    return path.name


def _plots(job: JobState, log_history: list[dict], report, folder: Path) -> list[str]:
    """The sparsity-over-steps and kept-per-layer PNGs in ``folder``; returns their file names."""
    from .plots import plot_kept, plot_training

    options = job.options
    # names, not long paths
    model, dataset = Path(options.model).name or options.model, Path(options.dataset).name or options.dataset
    title = f"{model} on {dataset}, target {options.target}, levels {','.join(options.levels)}"
    return [
        plot_training(log_history, folder / "sparsity.png", title=title).name,
        plot_kept(report, folder / "kept.png", title=title).name,
    ]


def _summary(job: JobState, dense, small, report, latency: dict, plots: list[str], log_history: list[dict]) -> dict:
    """Everything ``summary.json`` records: results, sizes, latency, timing, machine, settings, logs."""
    options = job.options
    return {
        "task": options.task,
        "model": options.model,
        "dataset": options.dataset,
        "levels": options.levels,
        "target_sparsity": options.target,
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
        "machine": {"cpus": os.cpu_count(), "torch_threads": options.threads, "load_avg_end": os.getloadavg()},
        "train_examples": len(job.data["train"]),
        "eval_examples": len(job.data["report"]),
        "plots": plots,
        "shape_search": {"file": SEARCH_FILE, "chosen": job.search["candidates"][job.search["chosen"]]["mix"]}
        if job.search
        else None,
        "log_history": log_history,
        "settings": asdict(options),
    }


def _push(options: JobOptions, output_dir: Path, summary: dict, console) -> None:
    """The model folder and, beside it in the same commit, the exported files its card describes."""
    from ..hub_push import push_compacted

    gguf = summary.get("gguf")
    exported = [name for name in (summary.get("onnx"), gguf and gguf["file"], summary.get("exports")) if name]
    data = [f"{name}.data" for name in exported if (output_dir / f"{name}.data").is_file()]  # large ONNX weights
    extra_files = [output_dir / name for name in exported + data]
    with console.status(f"pushing to {options.repo_id}"):
        url = push_compacted(
            output_dir / "model", options.repo_id, private=options.private or None, extra_files=extra_files
        )
    console.print(f"pushed: {url}" + (f" (with {', '.join(p.name for p in extra_files)})" if extra_files else ""))


# --- helpers -------------------------------------------------------------------------------------
def _training_args(cls, job: JobState, *, epochs: float, max_steps: int | None, **extra):
    """(Pruning)TrainingArguments from the options: no checkpoints, ~50 log points, no tqdm."""
    import torch

    options = job.options
    steps = max_steps or math.ceil(math.ceil(len(job.data["train"]) / options.batch_size) * epochs)
    return cls(
        output_dir=job.workdir,
        num_train_epochs=epochs,
        max_steps=max_steps if max_steps else -1,
        per_device_train_batch_size=options.batch_size,
        per_device_eval_batch_size=max(options.batch_size, 32),
        learning_rate=options.learning_rate,
        weight_decay=0.01,
        warmup_steps=0.1,
        logging_steps=max(1, steps // 50),  # about 50 points for the progress and the plots
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
        dataloader_pin_memory=torch.cuda.is_available(),
        seed=options.seed,
        train_sampling_strategy="group_by_length" if options.task == "seq-cls" else "random",
        **extra,
    )


def _params(model) -> int:
    return sum(p.numel() for p in model.parameters())


def _latency_batches(job: JobState) -> dict[int, dict]:
    """Batch size -> the batch its latency is measured on (``LATENCY_BATCHES``), for every model and file alike."""
    return {b: _latency_inputs(job.data["report"], job.tokenizer, b, job.options.max_length) for b in LATENCY_BATCHES}


def _latency_inputs(dataset, tokenizer, batch_size: int, max_length: int) -> dict:
    """A batch of ``batch_size`` evaluation rows padded to ``max_length``: dense and compacted see the same shapes."""
    rows = [{k: v for k, v in dataset[i % len(dataset)].items() if k != "labels"} for i in range(batch_size)]
    return dict(tokenizer.pad(rows, padding="max_length", max_length=max_length, return_tensors="pt"))
