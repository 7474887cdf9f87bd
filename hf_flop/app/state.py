"""``JobState``: what the phases of the ``hf-flop prune`` job share, and the results they record."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .data import TaskData
from .options import JobOptions


@dataclass
class JobState:
    """What the phases share: the options, the console, the data, and the results they record."""

    options: JobOptions
    console: Any
    tokenizer: Any
    data: TaskData
    workdir: str  # Trainer's output_dir; nothing is saved there (save_strategy "no")
    results: dict = field(default_factory=dict)  # metric values: pretrained (causal-lm), dense, pruned
    times: dict = field(default_factory=dict)  # wall time of the training phases, in seconds
    target: dict = field(default_factory=dict)  # where the size ended against the target (TargetCheck, met, message)
    training: dict = field(default_factory=dict)  # PruningTrainer.training_facts(), for the card
    search: dict = field(default_factory=dict)  # --search: ShapeSearchResult.table(), for shape_search.json and the card

    def evaluate(self, model) -> float:
        """The task's metric of ``model`` on the report split."""
        from ..metrics import evaluate_model

        data = self.data
        scores = evaluate_model(model, data["report"], task=self.options.task, collator=data["collator"], batch_size=32)
        return scores[data["metric"]]
