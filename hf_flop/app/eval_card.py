"""The model card's lm-eval table: task, metric, dense and pruned, read from ``evaluate_lm``'s results JSON."""

from __future__ import annotations

import json
import os
from pathlib import Path

from ..files import atomic_file

START, END = "<!-- hf_flop lm-eval -->", "<!-- /hf_flop lm-eval -->"  # the section's bounds, so a re-run replaces it


def eval_table(report: dict) -> str:
    """The markdown section for ``report`` (``{"settings", "results"}``): one row per task and metric."""
    settings, results = report["settings"], report["results"]
    names = list(results)
    lines = [
        START,
        "## lm-evaluation-harness",
        "",
        f"lm-eval {settings['lm_eval_version']}, {settings['num_fewshot']}-shot, batch size "
        f"{settings['batch_size']}, seed {settings['seed']}"
        + (f", at most {settings['limit']} documents per task" if settings.get("limit") else "")
        + ".",
        "",
        "| task | metric | " + " | ".join(names) + " |",
        "|---|---|" + "---|" * len(names),
    ]
    first = results[names[0]]
    for task, metrics in first.items():
        for metric in metrics:
            if "stderr" in metric:
                continue  # the table shows the values; the JSON keeps the standard errors
            cells = [results[name].get(task, {}).get(metric) for name in names]
            shown = [f"{v:.4f}" if isinstance(v, (int, float)) else "" for v in cells]
            lines.append(f"| {task} | {metric.split(',')[0]} | " + " | ".join(shown) + " |")
    return "\n".join([*lines, END]) + "\n"


def add_eval_table(readme: str | os.PathLike, results_json: str | os.PathLike) -> Path:
    """Write the table of ``results_json`` into the card ``readme``, replacing an earlier one; atomic."""
    readme, results_json = Path(readme), Path(results_json)
    if not readme.is_file():
        raise ValueError(f"{readme} is not a model card; pass the README.md of a model saved by hf_flop.")
    report = json.loads(results_json.read_text())
    text = readme.read_text()
    if START in text and END in text:
        text = text[: text.index(START)] + text[text.index(END) + len(END) + 1 :]
    with atomic_file(readme) as temporary:
        temporary.write_text(text.rstrip("\n") + "\n\n" + eval_table(report))
    return readme
