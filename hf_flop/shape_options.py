"""What ``hf_flop.search_shape`` takes and returns: a candidate mix, the search's options, its result.

A *mix* fixes the share of the target the coarse levels take: ``hidden_fraction`` of the residual
channels (level ``"hidden"``) and ``layers`` depth units (level ``"layer"``: whole layers, or
sublayers with ``layer_granularity="sublayer"``). The finer levels (heads, rows, ...) then fill the
rest of the same parameter budget, so every candidate ends at the same size.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from .ranking import RANKINGS

# the levels a mix fixes the count of; every other level of the FlopConfig fills the rest of the budget
MIX_LEVELS = ("hidden", "layer")


@dataclass(frozen=True)
class ShapeMix:
    """One candidate: remove ``hidden_fraction`` of the residual channels and ``layers`` depth units, and
    let the other levels (heads, rows) reach the target."""

    hidden_fraction: float = 0.0
    layers: int = 0

    def __post_init__(self) -> None:
        if not isinstance(self.hidden_fraction, (int, float)) or not 0.0 <= self.hidden_fraction < 1.0:
            raise ValueError(
                f"ShapeMix.hidden_fraction={self.hidden_fraction!r} must be in [0, 1): the fraction of the residual "
                "channels removed (0: keep them all)."
            )
        if not isinstance(self.layers, int) or isinstance(self.layers, bool) or self.layers < 0:
            raise ValueError(f"ShapeMix.layers={self.layers!r} must be an integer >= 0: the depth units removed.")

    def describe(self) -> str:
        """A short name for tables: ``heads+rows``, ``hidden 25% + 2 layers``, ..."""
        parts = []
        if self.hidden_fraction:
            parts.append(f"hidden {100 * self.hidden_fraction:g}%")
        if self.layers:
            parts.append(f"{self.layers} layer{'s' if self.layers > 1 else ''}")
        return " + ".join(parts) if parts else "fine levels only"


def _fractions(name: str, values: tuple) -> tuple[float, ...]:
    values = tuple(values)
    if not values:
        raise ValueError(f"ShapeSearchConfig.{name} is empty; give at least one fraction (0.0: none removed).")
    bad = [v for v in values if not isinstance(v, (int, float)) or isinstance(v, bool) or not 0.0 <= v < 1.0]
    if bad:
        raise ValueError(f"ShapeSearchConfig.{name}={list(values)} holds {bad}: each must be in [0, 1).")
    return values


@dataclass
class ShapeSearchConfig:
    """Options of ``hf_flop.search_shape``. Without ``candidates`` it tries every pair of ``hidden_fractions``
    and ``layer_fractions`` the model's levels allow (each once)."""

    hidden_fractions: tuple[float, ...] = field(
        default=(0.0, 0.125, 0.25),
        metadata={"help": "Fractions of the residual channels removed, one candidate each (with level 'hidden')."},
    )
    layer_fractions: tuple[float, ...] = field(
        default=(0.0, 0.125, 0.25),
        metadata={
            "help": "Fractions of the removable depth units (layers) removed, rounded to whole units, one candidate "
            "each (with level 'layer')."
        },
    )
    score: str | None = field(
        default=None,
        metadata={"help": "One-shot score (hf_flop.scores); None: recommended_oneshot_score(config)."},
    )
    ranking: str = field(default="per_gate", metadata={"help": f"How the fine levels' units rank: {list(RANKINGS)}."})
    min_units_per_gate: int = field(default=1, metadata={"help": "Units every gate keeps (prune_to_target)."})
    protect_layers: tuple[int, ...] = field(
        default=(), metadata={"help": "Transformer layers (indices) left whole: no unit of theirs is removed."}
    )
    heldout: float = field(
        default=0.25,
        metadata={
            "help": "Fraction of the calibration batches (at least one) held out to score the candidates; the rest "
            "are scored, pruned and refit on (at least two)."
        },
    )
    max_batches: int | None = field(default=None, metadata={"help": "Read at most this many calibration batches."})
    seed: int = field(default=0, metadata={"help": "Seed of the held-out split (and of the distillation steps)."})
    distill_steps: int = field(
        default=0,
        metadata={
            "help": "Steps of logit distillation from the dense model on the fit batches before each candidate is "
            "scored (0: score right after the refit)."
        },
    )
    distill_learning_rate: float = field(default=1e-4, metadata={"help": "AdamW learning rate of those steps."})
    reconstruct_options: dict | None = field(
        default=None, metadata={"help": "Keyword arguments of hf_flop.reconstruct (ridge, holdout, add_bias)."}
    )

    def __post_init__(self) -> None:
        self.hidden_fractions = _fractions("hidden_fractions", self.hidden_fractions)
        self.layer_fractions = _fractions("layer_fractions", self.layer_fractions)
        self.protect_layers = tuple(self.protect_layers)
        if self.ranking not in RANKINGS:
            raise ValueError(f"ShapeSearchConfig.ranking={self.ranking!r} is not known; use one of {list(RANKINGS)}.")
        if not isinstance(self.min_units_per_gate, int) or self.min_units_per_gate < 0:
            raise ValueError(
                f"ShapeSearchConfig.min_units_per_gate={self.min_units_per_gate!r} must be an integer >= 0."
            )
        if not isinstance(self.heldout, (int, float)) or not 0.0 < self.heldout < 1.0:
            raise ValueError(f"ShapeSearchConfig.heldout={self.heldout!r} must be in (0, 1).")
        if self.max_batches is not None and (not isinstance(self.max_batches, int) or self.max_batches < 3):
            raise ValueError(
                f"ShapeSearchConfig.max_batches={self.max_batches!r} must be None or at least 3 (two to refit on, one "
                "held out)."
            )
        if not isinstance(self.seed, int):
            raise ValueError(f"ShapeSearchConfig.seed={self.seed!r} must be an integer.")
        if not isinstance(self.distill_steps, int) or self.distill_steps < 0:
            raise ValueError(f"ShapeSearchConfig.distill_steps={self.distill_steps!r} must be an integer >= 0.")
        if not self.distill_learning_rate > 0:
            raise ValueError(f"ShapeSearchConfig.distill_learning_rate={self.distill_learning_rate!r} must be > 0.")


@dataclass
class ShapeCandidate:
    """One candidate the search tried: its mix, the size it reached, and its held-out loss (lower is better)."""

    mix: ShapeMix
    kept_params: int  # deterministic kept prunable parameters (sparsity_report), the same budget for every candidate
    sparsity: float  # of the prunable parameters of the searched FlopConfig
    step: int  # parameters of the unit at the budget's boundary: candidates differ by at most about this
    loss: float  # mean calibration loss over the held-out batches
    kept_units: dict[str, tuple[int, int]]  # level -> (kept units, units), over the whole model
    layers_removed: list[str]
    refit_modules: int  # modules whose refit was kept (hf_flop.reconstruct)

    def row(self) -> dict:
        """The candidate as a JSON-ready dict (one row of the table)."""
        row = asdict(self)
        row["mix"] = {**asdict(self.mix), "name": self.mix.describe()}
        row["kept_units"] = {level: list(counts) for level, counts in self.kept_units.items()}
        return row


@dataclass
class ShapeSearchResult:
    """Every candidate ``search_shape`` tried, in the order tried, and the one with the lowest held-out loss."""

    target_sparsity: float
    prunable_params: int
    budget: float  # (1 - target_sparsity) * prunable_params
    score: str
    candidates: list[ShapeCandidate]
    best_index: int
    skipped: list[dict] = field(default_factory=list)  # mixes of the default grid that cannot reach the target, why
    model: object = None  # the model pruned with the best mix, when search_shape was asked to apply it

    @property
    def best(self) -> ShapeCandidate:
        return self.candidates[self.best_index]

    def table(self) -> dict:
        """The search as a JSON-ready dict: the target, every candidate's row, the chosen one."""
        return {
            "target_sparsity": self.target_sparsity,
            "prunable_params": self.prunable_params,
            "budget_params": self.budget,
            "score": self.score,
            "candidates": [c.row() for c in self.candidates],
            "chosen": self.best_index,
            "skipped": self.skipped,
        }

    def __str__(self) -> str:
        lines = [f"{'mix':<28} {'kept params':>12} {'sparsity':>9} {'held-out loss':>14}"]
        for i, c in enumerate(self.candidates):
            mark = "  <- chosen" if i == self.best_index else ""
            lines.append(f"{c.mix.describe():<28} {c.kept_params:>12,} {c.sparsity:>9.4f} {c.loss:>14.4f}{mark}")
        lines += [f"skipped {s['mix']['name']}: {s['reason']}" for s in self.skipped]
        return "\n".join(lines)
