"""The job's compacted model saved with its card: the card's name, its data and how the model was made.

``save_compacted`` (hf_flop.hub) writes the card; this module says what the job knows about the model:
the dataset as a user would name it (an embedded default in full, a Hub id, or a local file's name), the
base model's Hub id, the metric before and after, the speed-up, and the training procedure.
"""

from __future__ import annotations

import re
from pathlib import Path

from .data import DATASET_SOURCES, DATASETS, MODEL_HUB_IDS
from .state import JobState


def save_model(
    job: JobState, flop_model, latency: dict, folder: Path, final_folder: Path, exports: list[dict] | None = None
) -> None:
    """The compacted model, tokenizer and model card (``save_compacted``) in ``folder``.

    ``final_folder`` is where ``folder`` ends up (the job writes into a staging folder): the card's load
    snippet names it, or the Hub repository when pushing. ``exports``: the card's table of the exported
    files (``hf_flop.app.exports.card_rows``).
    """
    from .. import save_compacted

    options, results = job.options, job.results
    metric = results["metric"]
    setting = f"CPU, {options.latency_threads} thread(s), {options.max_length} tokens"
    speedup = {f"{setting}, batch {b}": v["dense"] / v["pruned"] for b, v in latency.items()}
    dataset_id = _hub_dataset_id(options.dataset)
    # a local file or folder is named, not located: the card travels, the user's paths should not
    dataset = DATASETS.get(options.dataset) or dataset_id or Path(options.dataset).name
    source = DATASET_SOURCES.get(options.dataset, dataset)  # what the embedded data really is, in full
    base = MODEL_HUB_IDS.get(options.model, options.model).rstrip("/").split("/")[-1]
    name = options.repo_id or re.sub(r"[^\w.-]", "-", f"{base}-flop-{round(100 * options.target)}")
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
            base_model=MODEL_HUB_IDS.get(options.model),
            license=options.license,
            training=_training_facts(job, source),
            load_from=options.repo_id if options.push_to_hub else str(final_folder.absolute()),
            exports=exports or None,
        )


def _hub_dataset_id(dataset: str) -> str | None:
    """``--dataset`` when it names a Hub dataset (not an embedded default, not a local path), else None."""
    if dataset in DATASETS or Path(dataset).expanduser().exists():
        return None
    return dataset if re.fullmatch(r"[\w.-]+(/[\w.-]+)?", dataset) else None


def _training_facts(job: JobState, dataset: str) -> dict[str, str]:
    """How the model was made, for the card's "Training procedure": the data, the dense fine-tune, then the
    pruning as ``PruningTrainer.training_facts`` tells it."""
    options, data = job.options, job.data
    return {
        "data": f"{dataset}; {len(data['train']):,} training examples, evaluated on {len(data['report']):,} "
        f"{data['eval_split']} examples ({options.max_length} tokens at most)",
        "dense fine-tune": f"{options.dense_epochs:g} epoch(s) before pruning (the baseline and the teacher)"
        if options.dense_epochs
        else "none (the pretrained model is the baseline)",
        **job.training,
        **({"shape search": _searched(job.search)} if job.search else {}),
    }


def _searched(table: dict) -> str:
    """The searched candidates in one line: each mix and its held-out loss, the chosen one marked."""
    tried = ", ".join(
        f"{c['mix']['name']} {c['loss']:.4f}{' (chosen)' if i == table['chosen'] else ''}"
        for i, c in enumerate(table["candidates"])
    )
    return (
        f"the shape was chosen by measurement (hf_flop.search_shape): {len(table['candidates'])} mixes at sparsity "
        f"{table['target_sparsity']:g}, each pruned one-shot with the refit, by held-out calibration loss: {tried}"
    )
