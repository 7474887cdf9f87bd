"""Saving a compacted model with its model card, and publishing it on the Hugging Face Hub.

``save_compacted`` compacts a FLOP model, writes it (safetensors, config, remote code when needed,
tokenizer) with a model card rendered from ``model_cards/compacted_model_card.md`` into a temporary
folder next to ``output_dir`` and renames it into place, so ``output_dir`` is either complete or
untouched. Pushing is a separate step on the finished folder (``push_compacted``): when it fails,
the folder stays complete and the push can simply be repeated.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from pathlib import Path

from huggingface_hub import EvalResult, ModelCard, ModelCardData
from torch import nn

from .accounting import SparsityReport, check_target, sparsity_report
from .compact import compact_with_plan, plan_layers
from .files import atomic_folder, check_output_dir
from .hub_push import PushToHubError, push_compacted  # noqa: F401 (PushToHubError: still importable from here)
from .lookup import find_flop_model
from .modeling import CODE_FILES, auto_class_names

# inside the package, so that a wheel install has it too (package data, see pyproject.toml)
# the template people edit is the top-level model_cards/compacted_model_card.md; the package holds a symlink
# to it, which a wheel build resolves into a copy, so an installed hf_flop carries the same text
CARD_TEMPLATE = Path(__file__).resolve().parent / "model_cards" / "compacted_model_card.md"

# auto class -> Hub pipeline tag, most specific first (the first match names the task)
PIPELINE_TAGS = {
    "AutoModelForSequenceClassification": "text-classification",
    "AutoModelForCausalLM": "text-generation",
    "AutoModelForMaskedLM": "fill-mask",
    "AutoModelForTokenClassification": "token-classification",
    "AutoModelForQuestionAnswering": "question-answering",
    "AutoModel": "feature-extraction",
}
_HUB_ID = re.compile(r"^[\w.-]+(/[\w.-]+)?$")
# PEFT bookkeeping that says nothing about the pruning
_CONFIG_NOISE = ("base_model_name_or_path", "revision", "inference_mode", "auto_mapping", "peft_version")


def save_compacted(
    model: nn.Module,
    output_dir: str | os.PathLike,
    *,
    push_to_hub: bool = False,
    repo_id: str | None = None,
    private: bool | None = None,
    token: str | None = None,
    overwrite: bool = False,
    tokenizer=None,
    eval_results: Mapping[str, float] | None = None,
    eval_dataset: str | None = None,
    speedup: float | Mapping[str, float] | None = None,
    base_model: str | None = None,
    tags: list[str] | None = None,
    license: str | None = None,
    datasets: list[str] | None = None,
    commit_message: str | None = None,
    card_template: str | os.PathLike | None = None,
    baseline_results: Mapping[str, float] | None = None,
    eval_dataset_id: str | None = None,
    eval_split: str | None = None,
    training: Mapping[str, object] | None = None,
    load_from: str | None = None,
    exports: list[Mapping[str, object]] | None = None,
) -> Path:
    """Compact ``model`` (a FLOP ``PeftModel``/``FlopModel``), save it with a model card, optionally push it.

    Args:
        output_dir: folder to write; an existing non-empty folder is replaced only with ``overwrite=True``.
        push_to_hub, repo_id, private, token: push the finished folder to ``repo_id`` ("user/name")
            with ``create_repo`` + ``upload_folder``; ``private`` applies when the repo is created.
        tokenizer: saved alongside (anything with ``save_pretrained``).
        eval_results: ``{metric name: value}``, shown in the card and as ``model-index`` metadata;
            ``eval_dataset`` names the data they were measured on.
        speedup: measured speed-up over the dense model, one number or ``{setting: number}``.
        base_model: Hub id of the model that was pruned (default: the model's ``name_or_path`` when
            it looks like a Hub id).
        license: the card's license (default: the base model's, read from the ``license`` field of the
            README.md metadata in its local folder when there is one).
        datasets: Hub ids of the training data, for the card's metadata.
        card_template: a Jinja template to use instead of ``model_cards/compacted_model_card.md``.
        baseline_results: the same metrics for the dense model before pruning; the card shows each
            beside the pruned value, with the change.
        eval_dataset_id, eval_split: the Hub id (only when the data really is that Hub dataset) and the
            split of the evaluation data, for the ``model-index``.
        training: how the model was pruned (steps, learning rates, distillation, data...), shown as a
            list in the card; ``PruningTrainer.save_compacted`` fills it from its arguments.
        load_from: the repository id or folder the card's load snippet names (default: ``repo_id`` when
            pushing, else the absolute path of ``output_dir``).
        exports: the card's table of exported files, one mapping per file with ``file``, ``format``,
            ``quantization``, ``bytes`` (its size), and ``metric`` and ``speed`` (text: measured on that file).

    Returns the path of the saved folder. Raises ``PushToHubError`` when only the push failed.
    """
    out = check_output_dir(output_dir, overwrite)
    if push_to_hub and not repo_id:
        raise ValueError("save_compacted(push_to_hub=True) needs repo_id='user/name' (the Hub repository to create).")
    if repo_id is not None and not (isinstance(repo_id, str) and _HUB_ID.match(repo_id)):
        raise ValueError(f"repo_id={repo_id!r} is not a Hub repository id; use 'user/name'.")
    metrics = _check_numbers("eval_results", eval_results)
    baseline = _check_numbers("baseline_results", baseline_results)
    speedups = _check_numbers("speedup", {"overall": speedup} if isinstance(speedup, (int, float)) else speedup)
    _check_exports(exports)
    template = Path(card_template) if card_template is not None else CARD_TEMPLATE
    if not template.is_file():
        raise ValueError(f"model card template {template} not found; pass card_template=<path to a Jinja .md file>.")
    if tokenizer is not None and not hasattr(tokenizer, "save_pretrained"):
        raise TypeError(
            f"tokenizer must have save_pretrained (a transformers tokenizer), got {type(tokenizer).__name__}."
        )

    flop_model = find_flop_model(model)  # clear error for a model without FLOP layers
    report = sparsity_report(flop_model)
    compacted, plan = compact_with_plan(flop_model)
    if load_from is None:
        load_from = repo_id if push_to_hub else str(out.absolute())
    card = render_card(
        flop_model,
        compacted,
        plan,
        report,
        template=template,
        model_id=repo_id or out.name,
        base_model=base_model,
        metrics=metrics,
        eval_dataset=eval_dataset,
        speedup=speedups,
        tags=tags,
        license=license,
        datasets=datasets,
        baseline=baseline,
        eval_dataset_id=eval_dataset_id,
        eval_split=eval_split,
        training=training,
        load_from=load_from,
        with_tokenizer=tokenizer is not None,
        exports=exports,
    )

    with atomic_folder(out, overwrite=overwrite) as tmp:
        compacted.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        card.save(tmp / "README.md")
    if push_to_hub:
        push_compacted(out, repo_id, private=private, token=token, commit_message=commit_message)
    return out


def _check_numbers(name: str, values) -> dict[str, float]:
    if values is None:
        return {}
    if not isinstance(values, Mapping) or not all(
        isinstance(k, str) and isinstance(v, (int, float)) and not isinstance(v, bool) for k, v in values.items()
    ):
        raise ValueError(f"{name} must map names to numbers, e.g. {{'accuracy': 0.91}}; got {values!r}.")
    return {k: float(v) for k, v in values.items()}


EXPORT_KEYS = ("file", "format", "quantization", "bytes", "metric", "speed")  # a row of the exported-files table


def _check_exports(exports) -> None:
    for row in [] if exports is None else exports if isinstance(exports, list) else [exports]:
        if not isinstance(row, Mapping) or not set(EXPORT_KEYS) <= set(row):
            raise ValueError(f"exports must be a list of mappings with {', '.join(EXPORT_KEYS)}; got {row!r}.")


# --- the model card --------------------------------------------------------------------------------
def render_card(
    flop_model,
    compacted: nn.Module,
    plan: dict,
    report: SparsityReport,
    *,
    template: Path = CARD_TEMPLATE,
    model_id: str,
    base_model: str | None = None,
    metrics: Mapping[str, float] | None = None,
    eval_dataset: str | None = None,
    speedup: Mapping[str, float] | None = None,
    tags: list[str] | None = None,
    license: str | None = None,
    datasets: list[str] | None = None,
    baseline: Mapping[str, float] | None = None,
    eval_dataset_id: str | None = None,
    eval_split: str | None = None,
    training: Mapping[str, object] | None = None,
    load_from: str | None = None,
    with_tokenizer: bool = False,
    exports: list[Mapping[str, object]] | None = None,
) -> ModelCard:
    """The model card of a compacted model, from the Jinja ``template`` (arguments as in ``save_compacted``)."""
    config = flop_model.flop_config
    task_model = flop_model.model
    stock_class = getattr(type(compacted), "flop_stock_class", None) or type(compacted)
    custom_code = stock_class is not type(compacted)
    auto_name, pipeline_tag = _task_of(stock_class)
    if base_model is None:
        name = str(getattr(task_model.config, "name_or_path", "") or "")
        base_model = name if _HUB_ID.match(name) and not Path(name).exists() else None
    if license is None:
        license = base_model_license(task_model)
    low_rank = [name for name, m in report.modules.items() if m.factorized_after_compaction]
    levels = [lvl for lvl in config.levels if lvl != "rank"]
    card_tags = ["hf-flop", "pruned", "structured-pruning"]
    card_tags += ["low-rank"] if low_rank else []  # only when some layer really is stored low-rank
    card_tags += [f"{lvl}-pruning" for lvl in levels]
    card_tags += ["custom_code"] if custom_code else []
    card_tags += [t for t in tags or [] if t not in card_tags]
    # model-index: the dataset's Hub id only when the caller says there is one (a name is not an id)
    dataset_type = eval_dataset_id or "custom"
    eval_list = [
        EvalResult(
            task_type=pipeline_tag,
            dataset_type=dataset_type,
            dataset_name=eval_dataset or eval_dataset_id or "evaluation data",
            dataset_split=eval_split,
            metric_type=name,
            metric_value=value,
        )
        for name, value in (metrics or {}).items()
    ]
    card_data = ModelCardData(
        base_model=base_model,
        library_name="transformers",
        pipeline_tag=pipeline_tag,
        tags=card_tags,
        license=license,
        datasets=datasets,
        model_name=model_id,
        eval_results=eval_list or None,
    )
    kept_total = sum(p.numel() for p in compacted.parameters())
    dense_total = sum(p.numel() for n, p in task_model.named_parameters() if flop_model.prefix not in n)
    pruning_config = {k: v for k, v in config.to_dict().items() if k not in _CONFIG_NOISE}
    baseline = baseline or {}
    metric_rows = [
        {"name": name, "value": value, "dense": baseline.get(name), "change": _change(value, baseline.get(name))}
        for name, value in (metrics or {}).items()
    ]
    labels = _label_names(compacted)
    return ModelCard.from_template(
        card_data,
        template_path=str(template),
        model_id=model_id,
        base_model=base_model,
        architecture=stock_class.__name__,
        pruned=_what_was_pruned(config.levels, len(low_rank), len(report.modules)),
        low_rank=bool(low_rank),
        total_params=dense_total,
        kept_total_params=kept_total,
        prunable_params=report.prunable_params,
        kept_prunable_params=report.deterministic_kept_params,
        sparsity=report.deterministic_sparsity,
        target=check_target(flop_model),
        metrics=metric_rows,
        has_baseline=any(row["dense"] is not None for row in metric_rows),
        eval_dataset=eval_dataset,
        eval_split=eval_split,
        speedup=speedup or {},
        training=dict(training or {}),
        exports=list(exports or []),
        labels=labels,
        load_code=_load_code(auto_name, load_from or model_id, custom_code, with_tokenizer, pipeline_tag, labels),
        custom_code=custom_code,
        code_files=list(CODE_FILES) if custom_code else [],
        blocks=_block_rows(plan),
        layers=_layer_rows(report),
        pruning_config=json.dumps(pruning_config, indent=2, sort_keys=True, default=str),
    )


def base_model_license(model: nn.Module) -> str | None:
    """The ``license`` in the README.md metadata of the folder ``model`` was loaded from, if it is there."""
    from huggingface_hub.repocard import metadata_load

    folder = Path(str(getattr(getattr(model, "config", None), "name_or_path", "") or ""))
    readme = folder / "README.md"
    if not str(folder) or not readme.is_file():
        return None
    try:
        found = (metadata_load(readme) or {}).get("license")
    except Exception:  # malformed YAML in someone else's card: no license rather than no card
        return None
    return found if isinstance(found, str) else None


_LEVEL_WORDS = {
    "head": "attention heads",
    "query_head": "query heads (every KV head kept)",
    "row": "FFN neurons (rows)",
    "block": "weight blocks",
    "embedding": "vocabulary clusters of the embedding",
    "expert": "whole experts of the mixture-of-experts layers (with their router rows)",
    "layer": "whole transformer layers or their sublayers (depth)",
}


def _what_was_pruned(levels: list[str], n_low_rank: int, n_layers: int) -> str:
    """The card's one-line account of what was pruned, true to the saved model (no "low-rank" without such layers)."""
    parts = []
    if "rank" in levels:
        if n_low_rank:
            parts.append(
                f"the rank of linear layers (FLOP, factorized low-rank: {n_low_rank} of {n_layers} pruned matrices "
                "are stored low-rank)"
            )
        else:
            parts.append(
                "the rank of linear layers (FLOP gates; no matrix ended low-rank: each kept too much rank for two thin "
                "matrices to be smaller than one)"
            )
    parts += [_LEVEL_WORDS[lvl] for lvl in levels if lvl in _LEVEL_WORDS]
    return "; ".join(parts)


def _change(value: float, dense: float | None) -> str:
    return "" if dense is None else f"{value - dense:+.4f}"


def _label_names(model: nn.Module) -> dict[int, str]:
    """A classifier's class names, when they are real names (not transformers' LABEL_<i> placeholders)."""
    id2label = getattr(getattr(model, "config", None), "id2label", None) or {}
    if all(str(name) == f"LABEL_{i}" for i, name in id2label.items()):
        return {}
    return {int(i): str(name) for i, name in sorted(id2label.items(), key=lambda kv: int(kv[0]))}


def _load_code(
    auto_name: str, where: str, custom_code: bool, with_tokenizer: bool, pipeline_tag: str, labels: dict
) -> str:
    trust = ", trust_remote_code=True" if custom_code else ""
    imports = [auto_name] + (["AutoTokenizer"] if with_tokenizer else [])
    lines = [f"from transformers import {', '.join(sorted(imports))}", ""]
    lines.append(f"model = {auto_name}.from_pretrained({where!r}{trust})")
    if with_tokenizer:
        # transformers reads config.json to pick the tokenizer class; a custom-code config needs the flag too
        lines.append(f"tokenizer = AutoTokenizer.from_pretrained({where!r}{trust})")
        if pipeline_tag == "text-classification":
            lines += [
                "",
                'inputs = tokenizer(["your text here"], return_tensors="pt")',
                "predicted = model(**inputs).logits.argmax(-1).item()",
                "print(model.config.id2label[predicted])" + (f"  # one of {list(labels.values())}" if labels else ""),
            ]
    return "\n".join(lines)


def _task_of(stock_class: type) -> tuple[str, str]:
    """(auto class to load with, pipeline tag) of a stock model class."""
    names = auto_class_names(stock_class.config_class.model_type)
    for auto_name, tag in PIPELINE_TAGS.items():
        if names.get(auto_name) == stock_class.__name__:
            return auto_name, tag
    loader = next((a for a, c in names.items() if c == stock_class.__name__), "AutoModel")
    return loader, "feature-extraction"


def _block_rows(plan: dict) -> list[dict]:
    return [{"name": layer, **counts} for layer, counts in plan_layers(plan).items()]


def _layer_rows(report: SparsityReport) -> list[dict]:
    rows = []
    for name, m in report.modules.items():
        rank = f"{m.kept_rank} / {m.rank}" if m.rank is not None else "-"
        rows.append(
            {
                "name": name,
                "shape": f"{m.shape[0]} x {m.shape[1]}",
                "kept_shape": f"{m.kept_shape[0]} x {m.kept_shape[1]}",
                "rank": rank,
                "form": f"low-rank ({m.kept_rank})" if m.factorized_after_compaction else "dense",
                "params": m.kept_params,
                "params_before": m.shape[0] * m.shape[1],
            }
        )
    return rows
