"""A benchmark row as data: what one phase of a benchmark runs, under the id its results are stored as.

Each resumable benchmark (``bench_minilm.py``, ``bench_smollm2.py``, ``bench_gguf.py``) declares its
rows in a sibling module (``minilm_rows.py``, ...) as instances of a subclass of ``Row``. The id is
the name of the row's JSON file under ``results/<benchmark>/``: committed results are keyed by it, so
an id is never renamed; the label says what the row is, and every table prints it. The bench script
runs a row by its ``kind``; the other fields say how. Importing these modules loads no torch.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar


@dataclass(frozen=True, kw_only=True)
class Row:
    """One phase of a resumable benchmark; subclasses add the fields their benchmark reads."""

    id: str = field(metadata={"help": "Phase id: the results file's name (results/<benchmark>/<id>.json)."})
    label: str = field(metadata={"help": "What the row is, as tables and --list print it."})
    kind: str = field(metadata={"help": "Which phase function of the bench script runs the row."})
    in_full_run: bool = field(
        default=True,
        metadata={"help": "Run by a plain invocation; False: only by --only (a record, e.g. a phase run again)."},
    )

    def __post_init__(self) -> None:
        if not self.id or "/" in self.id or self.id != self.id.strip():
            raise ValueError(f"Row id {self.id!r} must be a plain file name (it names the results JSON).")
        if not self.label:
            raise ValueError(f"Row {self.id!r} needs a label saying what it is.")


RowT = TypeVar("RowT", bound=Row)


def declare(rows: Iterable[RowT]) -> dict[str, RowT]:
    """The registry: rows by id, in the order given (the order a full run measures them)."""
    registry: dict[str, RowT] = {}
    for row in rows:
        if row.id in registry:
            raise ValueError(f"Row id {row.id!r} is declared twice; every phase needs its own id.")
        registry[row.id] = row
    return registry


def full_run(registry: dict[str, Row]) -> list[str]:
    """The ids a plain run measures, in order."""
    return [row.id for row in registry.values() if row.in_full_run]


def lr_text(rate: float) -> str:
    """A learning rate as the labels write it: 0.0002 -> '2e-4'."""
    mantissa, exponent = f"{rate:.0e}".split("e")
    return f"{mantissa}e{int(exponent)}"


def registries() -> dict[str, dict[str, Row]]:
    """Every benchmark's rows by the name of its results folder (``results/<name>[_quick]/``)."""
    import gguf_rows
    import lora_rows
    import minilm_rows
    import pareto_rows
    import smollm2_rows

    return {
        "minilm": minilm_rows.ROWS,
        "smollm2": smollm2_rows.ROWS,
        "gguf": gguf_rows.ROWS,
        "smollm2_lora": lora_rows.ROWS,
        "pareto": pareto_rows.ROWS,
    }


def undeclared_results(results: Path) -> list[str]:
    """Result files under ``results/<benchmark>[_quick]/`` whose name is no declared row of that benchmark."""
    found = []
    for name, registry in registries().items():
        for folder in (results / name, results / f"{name}_quick"):
            found += [str(p.relative_to(results)) for p in sorted(folder.glob("*.json")) if p.stem not in registry]
    return found
