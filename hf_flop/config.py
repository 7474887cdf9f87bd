"""`FlopConfig`: the PEFT-style configuration of FLOP pruning."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from peft import PeftConfig

from .peft_type import flop_peft_type

# FlopConfig.levels entries: the structures that get gates (hf_flop.model injects each level's modules)
LEVELS = ("rank", "head", "query_head", "row", "block", "embedding", "expert", "layer", "hidden")
# FlopConfig.gate values: the gate types (hf_flop.gates.GATE_TYPES builds them)
GATES = ("hard_concrete", "topk")
# FlopConfig.layer_granularity values: what one gate of level "layer" removes (hf_flop.depth)
LAYER_GRANULARITIES = ("layer", "sublayer")
# the levels whose compacted shapes a stock transformers config can describe (see uniform_shapes)
UNIFORM_LEVELS = ("head", "query_head", "row", "expert", "layer", "hidden")


class FlopConfigError(ValueError):
    """A ``FlopConfig`` value that is not valid. ``field`` is the ``FlopConfig`` field it belongs to, so an
    interface (the command line) can name its own option for it without reading the message."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field

    def __reduce__(self):  # pickles (e.g. across processes) with its field
        return type(self), (self.field, str(self))


def _check_choice(field: str, name: str, value: object, allowed: tuple) -> None:
    if value not in allowed:
        raise FlopConfigError(field, f"FlopConfig.{name}={value!r} is not valid; use one of {list(allowed)}.")


@dataclass
class FlopConfig(PeftConfig):
    """Configuration of FLOP (Factorized Low-rank Pruning) and its multi-level options.

    Each targeted linear layer is re-parametrised as ``W = P diag(z) Q`` (level ``"rank"``) with one
    gate ``z_k`` per rank-1 component; ``"head"`` and ``"row"`` add one gate per attention head (per
    KV group under grouped-query attention) and per FFN intermediate neuron; ``"query_head"`` (grouped-
    or multi-query attention) removes query heads and keeps every KV head, the same number from each
    KV group of a layer; ``"layer"`` gates whole transformer layers (or, with ``layer_granularity="sublayer"``,
    their attention and FFN sublayers apart; ``hf_flop.depth``). The trainer drives the
    expected fraction of removed prunable parameters to ``target_sparsity``.
    """

    target_modules: list[str] | str | None = field(
        default=None,
        metadata={
            "help": "Module names (suffix match) or one regex (full match) of the linears to prune. "
            "None picks the architecture's attention and MLP projections."
        },
    )
    exclude_modules: list[str] | str | None = field(
        default=None, metadata={"help": "Module names or a regex to leave untouched."}
    )
    levels: list[str] = field(
        default_factory=lambda: ["rank"],
        metadata={"help": f"Which structures get gates; a subset of {list(LEVELS)}."},
    )
    target_sparsity: float = field(
        default=0.5,
        metadata={"help": "Fraction of the prunable parameters to remove, 0 <= t < 1."},
    )
    gate: str = field(default="hard_concrete", metadata={"help": f"Gate type, one of {list(GATES)}."})
    init_log_alpha: float | None = field(
        default=None,
        metadata={
            "help": "Initial log_alpha of hard-concrete gates. None picks, per gate, the smallest value that "
            "starts the model as the dense model (eval mask exactly 1, no expected zeros, expected sparsity "
            "< 1e-4 per unit): about 6.8 for gates of up to 2,500 units. The FLOP authors used 0 (from scratch)."
        },
    )
    temperature: float = field(default=1.0, metadata={"help": "Hard-concrete temperature beta (> 0)."})
    limit_l: float = field(default=-0.1, metadata={"help": "Hard-concrete stretch lower limit (< 0)."})
    limit_r: float = field(default=1.1, metadata={"help": "Hard-concrete stretch upper limit (> 1)."})
    block_size: int = field(default=32, metadata={"help": "Side of the square blocks of level 'block'."})
    round_to: int = field(
        default=1, metadata={"help": "Kept ranks/rows are rounded up to a multiple of this at compaction."}
    )
    train_base: bool = field(
        default=True,
        metadata={
            "help": "Train every base parameter (embeddings, norms, heads, biases) with the factors, as FLOP "
            "does; False trains only factors and gates."
        },
    )
    live_threshold: float = field(
        default=0.8,
        metadata={
            "help": "In training, a layer computes with only its live components once fewer than this "
            "fraction are alive (FLOP's speed-up). 0 disables."
        },
    )
    uniform_shapes: bool = field(
        default=False,
        metadata={
            "help": "Keep the same number of heads (KV groups under GQA) and the same FFN width (rounded to "
            "round_to) in every transformer layer, so compaction returns the stock transformers class with a "
            f"stock config (no remote code). Levels {list(UNIFORM_LEVELS)} only; heads only where the stock "
            "config states the head size (hf_flop.uniform)."
        },
    )
    layer_granularity: str = field(
        default="layer",
        metadata={
            "help": "What a gate of level 'layer' removes: 'layer' (a whole transformer layer) or 'sublayer' (its "
            "attention or its FFN alone; pre-norm residual layouts only, compacts to the saved remote code)."
        },
    )
    embedding_cutoffs: list[int] | None = field(
        default=None,
        metadata={
            "help": "Vocabulary cluster boundaries for level 'embedding' (increasing, < vocab size), positions in "
            "embedding_order. None: one cluster. hf_flop.embedding.frequency_cutoffs measures them from data."
        },
    )
    embedding_order: list[int] | None = field(
        default=None,
        metadata={
            "help": "Token ids by decreasing training frequency (a permutation of the vocabulary) whose ranges "
            "are the clusters of level 'embedding'. None: token-id order."
        },
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        self.peft_type = flop_peft_type()
        if isinstance(self.levels, str):
            self.levels = [self.levels]
        self.levels = list(self.levels)
        if not self.levels:
            raise FlopConfigError("levels", f"FlopConfig.levels is empty; choose at least one of {list(LEVELS)}.")
        for level in self.levels:
            _check_choice("levels", "levels entry", level, LEVELS)
        if len(set(self.levels)) != len(self.levels):
            raise FlopConfigError("levels", f"FlopConfig.levels={self.levels} repeats an entry; list each level once.")
        if "rank" in self.levels and "block" in self.levels:
            raise FlopConfigError(
                "levels",
                "FlopConfig.levels cannot combine 'rank' and 'block' in one step: blocks live in dense "
                "matrices. Run 'rank'/'head'/'row' first, compact, then 'block' (the two-step pipeline).",
            )
        if "head" in self.levels and "query_head" in self.levels:
            raise FlopConfigError(
                "levels",
                "FlopConfig.levels cannot combine 'head' and 'query_head': both gate the attention output. Use "
                "'head' to remove whole KV groups (a KV head and its query heads), or 'query_head' to remove query "
                "heads and keep every KV head (the only choice with one KV head, multi-query attention).",
            )
        _check_choice("gate", "gate", self.gate, GATES)
        _check_choice("layer_granularity", "layer_granularity", self.layer_granularity, LAYER_GRANULARITIES)
        if self.layer_granularity != "layer" and "layer" not in self.levels:
            raise FlopConfigError(
                "layer_granularity",
                f"FlopConfig.layer_granularity={self.layer_granularity!r} applies to level 'layer', which levels="
                f"{self.levels} lacks. Add 'layer' to levels, or leave layer_granularity at 'layer'.",
            )
        self._check_uniform_shapes()
        if not isinstance(self.target_sparsity, (int, float)) or not 0.0 <= self.target_sparsity < 1.0:
            raise FlopConfigError(
                "target_sparsity",
                f"FlopConfig.target_sparsity={self.target_sparsity!r} is outside [0, 1); it is the fraction "
                "of prunable parameters to remove, e.g. 0.5.",
            )
        if self.temperature <= 0:
            raise FlopConfigError(
                "temperature", f"FlopConfig.temperature={self.temperature} must be > 0 (e.g. 1.0 or 2/3)."
            )
        if not self.limit_l < 0 or not self.limit_r > 1:
            field_name = "limit_l" if not self.limit_l < 0 else "limit_r"
            raise FlopConfigError(
                field_name,
                f"FlopConfig.limit_l={self.limit_l} must be < 0 and limit_r={self.limit_r} > 1 (defaults -0.1 and 1.1).",
            )
        for name in ("block_size", "round_to"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise FlopConfigError(name, f"FlopConfig.{name}={value!r} must be a positive integer.")
        if not 0.0 <= self.live_threshold <= 1.0:
            raise FlopConfigError(
                "live_threshold", f"FlopConfig.live_threshold={self.live_threshold} must be in [0, 1]."
            )
        for name in ("target_modules", "exclude_modules"):
            value = getattr(self, name)
            if isinstance(value, str):
                try:
                    re.compile(value)
                except re.error as err:
                    raise FlopConfigError(name, f"FlopConfig.{name}={value!r} is not a valid regex: {err}") from None
            elif isinstance(value, (list, tuple, set)):
                setattr(self, name, sorted(value) if isinstance(value, set) else list(value))
            elif value is not None:
                raise FlopConfigError(name, f"FlopConfig.{name} must be None, a list of names or a regex string.")
        if self.embedding_cutoffs is not None:
            cutoffs = list(self.embedding_cutoffs)
            if any(not isinstance(c, int) or c <= 0 for c in cutoffs) or cutoffs != sorted(set(cutoffs)):
                raise FlopConfigError(
                    "embedding_cutoffs",
                    f"FlopConfig.embedding_cutoffs={cutoffs} must be strictly increasing positive integers.",
                )

    def _check_uniform_shapes(self) -> None:
        if not isinstance(self.uniform_shapes, bool):
            raise FlopConfigError(
                "uniform_shapes", f"FlopConfig.uniform_shapes={self.uniform_shapes!r} must be True or False."
            )
        other = [level for level in self.levels if level not in UNIFORM_LEVELS]
        if self.uniform_shapes and "layer" in self.levels and self.layer_granularity == "sublayer":
            raise FlopConfigError(
                "uniform_shapes",
                "FlopConfig.uniform_shapes=True with layer_granularity='sublayer': a layer without its attention or "
                "its FFN is a shape no stock transformers config describes. Use layer_granularity='layer' (whole "
                "layers go, the stock config just has fewer), or uniform_shapes=False (remote code).",
            )
        if self.uniform_shapes and other:
            # a stock config has no place for low-rank factors, block-sparse weights or clustered embeddings
            raise FlopConfigError(
                "uniform_shapes",
                f"FlopConfig.uniform_shapes=True allows levels {list(UNIFORM_LEVELS)} only, got {other}: those "
                "compact to low-rank, block-sparse or clustered modules that no stock transformers config "
                f"describes. Use levels within {list(UNIFORM_LEVELS)}, or uniform_shapes=False (the compacted "
                "model then loads with its saved remote code).",
            )
