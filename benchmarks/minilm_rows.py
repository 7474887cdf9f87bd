"""What bench_minilm.py measures: its settings and its rows (MiniLM-L6 on the Rotten Tomatoes sentences).

Every row is declared here once, in the order a full run measures it; ``bench_minilm.py`` runs a row
by its ``kind`` and reads the other fields, and ``tables.py`` prints its label. ``python
benchmarks/bench_minilm.py --list`` prints them all.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from rows import Row, declare, lr_text

# Shared by every phase: the same data, batch and learning rate. The dense start trains on
# dense_train_samples (0: all 8,072 sentences) for dense_epochs; every compared row then gets the same
# budget, train_samples for epochs.
SETTINGS = {
    "full": {"train_samples": 4000, "epochs": 1.0, "dense_train_samples": 0, "dense_epochs": 2.0}
    | {"eval_samples": 0, "batch_size": 16, "max_length": 64},
    "quick": {"train_samples": 400, "epochs": 1.0, "dense_train_samples": 400, "dense_epochs": 1.0}
    | {"eval_samples": 200, "batch_size": 16, "max_length": 48},
}
LEARNING_RATE = 5e-5
ONESHOT_CALIBRATION = {"full": (32, 16), "quick": (8, 16)}  # (batches, sentences per batch): 512 sentences
LATENCY_THREADS = 1  # the CLI's default too: one fixed thread count keeps ratios stable on a shared machine
PRUNING_PHASE = 0.4  # the two-phase rows: 40 % of the steps choose the structure, 60 % recover from it
HIDDEN_DISTILLATION = 1.0  # weight of the hidden-state (layer) distillation added to the logit distillation
# The gradual rows prune one-shot at these fractions of the run, to these fractions of the target (a
# cubic ramp, Zhu & Gupta's schedule), compacting and refitting each time; the steps between recover.
GRADUAL_STAGES = ((0.0, 1 - 0.75**3), (0.1, 1 - 0.5**3), (0.2, 1 - 0.25**3), (0.3, 1.0))
HEAD_ROW = ("head", "row")
RANK_HEAD_ROW = ("rank", "head", "row")


@dataclass(frozen=True, kw_only=True)
class MiniLMRow(Row):
    """A MiniLM row. ``kind`` is one of ``bench_minilm.PHASES_BY_KIND``'s keys."""

    target: float | None = field(default=None, metadata={"help": "Fraction of the encoder linears' weights removed."})
    levels: tuple[str, ...] = field(default=HEAD_ROW, metadata={"help": "hf_flop levels pruned."})
    pruner: str = field(
        default="",
        metadata={
            "help": "How the structure is chosen: hf_flop (prune_oneshot with `score`), flap, torch_pruning "
            "(importance `score`), same_share (every layer keeps the same share), torch_pruning_masks "
            "(Torch-Pruning's units as hf_flop masks), gradual (GRADUAL_STAGES), learned (PruningTrainer's gates)."
        },
    )
    score: str = field(default="", metadata={"help": "hf_flop score, or Torch-Pruning importance."})
    ranking: str = field(default="per_gate", metadata={"help": "prune_oneshot's ranking."})
    uniform_shapes: bool = field(default=False, metadata={"help": "FlopConfig(uniform_shapes=...)."})
    refit: bool = field(default=True, metadata={"help": "Reconstruct (refit) after choosing the masks."})
    seed: int = field(default=0, metadata={"help": "Training seed and calibration draw (0: the first)."})
    learning_rate: float = field(default=LEARNING_RATE, metadata={"help": "Recovery learning rate."})
    hidden_distillation: float = field(default=0.0, metadata={"help": "Hidden-state distillation weight."})
    trainer_args: dict = field(default_factory=dict, metadata={"help": "PruningArguments of a learned row."})
    reconstruction_data: bool = field(default=True, metadata={"help": "A learned row gets the calibration data."})
    recipe: str = field(default="", metadata={"help": "The name its results store ('method' / 'row')."})


def _dense_rows() -> list[MiniLMRow]:
    start = "dense start: all-MiniLM-L6-v2 plus a new classifier head, fine-tuned"
    return [
        MiniLMRow(id="dense", label=f"{start} (the teacher and start of the first rows)", kind="dense_start"),
        MiniLMRow(
            id="dense_rerun",
            label=f"{start} again (the start of the one-shot and equal-budget rows)",
            kind="dense_start",
            in_full_run=False,
        ),
        MiniLMRow(id="dense_more", label="the dense start fine-tuned for the shared budget", kind="dense_same_budget"),
    ]


def _cli_row(target: int, levels: tuple[str, ...], suffix: str = "") -> MiniLMRow:
    return MiniLMRow(
        id=f"flop_{target}{suffix}",
        label=f"hf-flop prune from the dense start, levels {'+'.join(levels)}",
        kind="cli",
        target=target / 100,
        levels=levels,
    )


def _torch_pruning_row(importance: str, target: int) -> MiniLMRow:
    name = {"magnitude": "magnitude", "taylor": "Taylor"}[importance]
    return MiniLMRow(
        id=f"tp_{importance}_{target}",
        label=f"Torch-Pruning {name}, heads + FFN channels, then the shared budget with distillation",
        kind="torch_pruning",
        target=target / 100,
        pruner="torch_pruning",
        score=importance,
    )


# The rows with no training at all: recipe name (the "method" their results store) -> label and fields.
NO_TRAINING = {
    "magnitude": ("hf_flop magnitude", {"pruner": "hf_flop", "score": "magnitude"}),
    "activation": ("hf_flop activation", {"pruner": "hf_flop", "score": "activation"}),
    "fluctuation": ("hf_flop fluctuation", {"pruner": "hf_flop", "score": "fluctuation"}),
    "sensitivity": ("hf_flop sensitivity", {"pruner": "hf_flop", "score": "sensitivity"}),
    "fisher": ("hf_flop fisher", {"pruner": "hf_flop", "score": "fisher"}),
    "obs": ("hf_flop obs", {"pruner": "hf_flop", "score": "obs"}),
    "activation_std": (
        "hf_flop activation (standardised)",
        {"pruner": "hf_flop", "score": "activation", "ranking": "standardized"},
    ),
    "fluctuation_std": (
        "hf_flop fluctuation (standardised)",
        {"pruner": "hf_flop", "score": "fluctuation", "ranking": "standardized"},
    ),
    "flap": ("FLAP-style (fluctuation, standardised, bias compensation)", {"pruner": "flap"}),
    "tptaylor": ("Torch-Pruning Taylor", {"pruner": "torch_pruning", "score": "taylor"}),
    # a stock BERT config holds one head count of a fixed size: uniform shapes prune FFN rows only
    "activation_uniform": (
        "hf_flop activation (FFN rows only, uniform shapes)",
        {"pruner": "hf_flop", "score": "activation", "levels": ("row",), "uniform_shapes": True},
    ),
    "activation_rows": (
        "hf_flop activation (FFN rows only)",
        {"pruner": "hf_flop", "score": "activation", "levels": ("row",)},
    ),
}


def _no_training_row(method: str, target: int, seed: int = 0) -> MiniLMRow:
    label, fields = NO_TRAINING[method]
    return MiniLMRow(
        id=f"os_{method}_{target}" + (f"_s{seed}" if seed else ""),
        label=label,
        kind="no_training",
        target=target / 100,
        seed=seed,
        recipe=method,
        **fields,
    )


def _equal_budget_recipes() -> dict[str, dict]:
    """The equal-budget rows: recipe name (the "row" their results store) -> label and fields."""
    learned = {"pruner": "learned"}
    two_phase = {"target_warmup_steps": 0.5, "pruning_phase": PRUNING_PHASE, "oneshot_score": "activation"}
    activation = {"pruner": "hf_flop", "score": "activation"}
    taylor = {"pruner": "torch_pruning", "score": "taylor"}
    recipes = {
        "old": {
            "label": "FLOP single phase, rank+head+row (the old default)",
            **learned,
            "levels": RANK_HEAD_ROW,
            "trainer_args": {"target_warmup_steps": 0.5, "pruning_phase": 1.0},
            "reconstruction_data": False,
        },
        "twophase": {
            "label": "two-phase, rank+head+row (prune 40 %, fix, refit, recover)",
            **learned,
            "levels": RANK_HEAD_ROW,
            "trainer_args": two_phase,
        },
        "twophasehr": {
            "label": "two-phase, head+row (prune 40 %, fix, refit, recover)",
            **learned,
            "trainer_args": two_phase,
        },
        "oneshot": {"label": "one-shot activation + refit, then recovery", **activation},
        "tptaylor": {"label": "Torch-Pruning Taylor, then recovery", **taylor},
        # measured before compact_recovery existed: the masks held at full size
        "recipe": {
            "label": "one-shot activation through PruningTrainer(pruning_phase=0), masks held at full size",
            **learned,
            "trainer_args": {
                "target_warmup_steps": 0.5,
                "pruning_phase": 0.0,
                "oneshot_score": "activation",
                "compact_recovery": False,
            },
        },
        "gradual": {
            "label": "gradual: one-shot activation + refit in four compacted stages over the first 30 % of "
            "the steps, recovery between",
            "pruner": "gradual",
            "score": "activation",
        },
        "oneshotlayer": {
            "label": "one-shot activation + refit, every layer pruned by the same share (Taylor's allocation), "
            "then recovery",
            "pruner": "same_share",
            "score": "activation",
        },
        "oneshotsensitivity": {
            "label": "one-shot sensitivity + refit, then recovery",
            **activation,
            "score": "sensitivity",
        },
        "oneshotfisher": {"label": "one-shot fisher + refit, then recovery", **activation, "score": "fisher"},
        "oneshotobs": {"label": "one-shot obs + refit, then recovery", **activation, "score": "obs"},
        # PruningTrainer as a user runs it: its defaults (one-shot obs masks and refit, compacted recovery)
        "trainer": {
            "label": "PruningTrainer() with its defaults (one-shot obs + refit, compacted recovery)",
            **learned,
        },
        "oneshottptaylor": {
            "label": "Torch-Pruning Taylor's heads and rows as hf_flop masks + refit, compacted, then recovery",
            "pruner": "torch_pruning_masks",
            "score": "taylor",
        },
        "oneshottptaylorplain": {
            "label": "Torch-Pruning Taylor's heads and rows as hf_flop masks, compacted without the refit, "
            "then recovery",
            "pruner": "torch_pruning_masks",
            "score": "taylor",
            "refit": False,
        },
        "oneshotplain": {"label": "one-shot activation without the refit, then recovery", **activation, "refit": False},
    }
    for name in ("oneshot", "tptaylor", "gradual"):
        recipe = recipes[name]
        recipes[f"{name}hd"] = {
            **recipe,
            "label": f"{recipe['label']} with hidden-state distillation",
            "hidden_distillation": HIDDEN_DISTILLATION,
        }
    # the learning-rate sweep (n x 1e-5: 2e-5, 1e-4, 2e-4), and 1e-4 for the obs row
    for name, n in (*((r, n) for r in ("oneshot", "tptaylor") for n in (2, 10, 20)), ("oneshotobs", 10)):
        recipes[f"{name}lr{n}"] = _at_learning_rate(recipes[name], n)
    # depth too: whole encoder layers compete with heads and rows (Block Influence for the layers)
    best = recipes["oneshotobslr10"]
    recipes["oneshotobslayerlr10"] = {
        **best,
        "label": best["label"].replace("one-shot obs + refit", "one-shot obs + refit over heads, rows and whole layers"),
        "levels": (*HEAD_ROW, "layer"),
    }
    return recipes


def _at_learning_rate(recipe: dict, n: int) -> dict:
    """The recipe with recovery learning rate n x 1e-5 (its recipe name ends in lr<n>)."""
    rate = n * 1e-5
    return {**recipe, "label": f"{recipe['label']} at lr {lr_text(rate)}", "learning_rate": rate}


EQUAL_BUDGET_RECIPES = _equal_budget_recipes()
# The equal-budget summary lists, per target, these recipes first in this order, then the others (in the
# order of their file names), then the learned schedules last.
EQUAL_BUDGET_FIRST = (
    *("trainer", "oneshotobs", "oneshotobslr10", "oneshot", "oneshothd", "recipe", "tptaylor", "tptaylorhd"),
    "gradual",
)
EQUAL_BUDGET_LAST = ("twophasehr", "twophase", "old")
# The equal-budget runs in the order they were measured: every recipe of a batch at seed 0 first, so
# that a partial run still compares every recipe, then the next seeds.
EQUAL_BUDGET_BATCHES = (
    # the first comparison: learned schedules, one-shot, Torch-Pruning Taylor
    (("old", "twophase", "twophasehr", "oneshot", "tptaylor", "recipe"), (0, 1, 2)),
    # looking for a lead over Taylor: layer distillation, gradual pruning, allocation, scores, learning rates
    (
        (
            *("oneshothd", "tptaylorhd", "gradual", "gradualhd", "oneshotlayer", "oneshotsensitivity"),
            *("oneshotfisher", "oneshotobs", "oneshotobslr10", "trainer", "oneshottptaylor", "oneshotplain"),
            *("oneshottptaylorplain", "oneshotlr2", "oneshotlr10", "oneshotlr20", "tptaylorlr2", "tptaylorlr10"),
            "tptaylorlr20",
        ),
        (0, 1, 2),
    ),
    # three more seeds of the rows that decide the comparison with Taylor (their 3-seed gap was about 1 point)
    (("oneshotobs", "tptaylor"), (3, 4, 5)),
    (("oneshotobslr10", "tptaylorlr10"), (3, 4, 5)),
    # level layer, at the best rate, six seeds at once
    (("oneshotobslayerlr10",), (0, 1, 2, 3, 4, 5)),
)


def _equal_budget_row(recipe: str, target: int, seed: int) -> MiniLMRow:
    fields = dict(EQUAL_BUDGET_RECIPES[recipe])
    return MiniLMRow(
        id=f"eq_{recipe}_{target}_s{seed}",
        label=fields.pop("label"),
        kind="equal_budget",
        target=target / 100,
        seed=seed,
        recipe=recipe,
        **fields,
    )


TARGETS = (50, 75)  # percent of the encoder linears' weights removed
NO_TRAINING_METHODS = (
    *("magnitude", "activation", "fluctuation", "sensitivity", "fisher"),
    *("activation_std", "fluctuation_std", "flap", "tptaylor", "obs"),
)
CLOSE_METHODS = ("activation", "flap", "tptaylor", "obs")  # within a few points: calibration draws 1 and 2 too
WALL_TIME = MiniLMRow(
    id="wall_time",
    label="wall time: a dense fine-tune, then PruningTrainer(pruning_phase=0) compacted and masked, back to back "
    "(run it alone: --only wall_time --threads 2)",
    kind="wall_time",
    target=0.5,
)


def _rows() -> list[MiniLMRow]:
    """Every row, in the order a full run measures them."""
    return [
        *_dense_rows(),
        *(_cli_row(target, RANK_HEAD_ROW) for target in TARGETS),
        *(_torch_pruning_row(importance, target) for target in TARGETS for importance in ("magnitude", "taylor")),
        # the levels at one target: rank only, head+row, head+row+block (MLPruning's three levels)
        _cli_row(50, ("rank",), "_rank"),
        _cli_row(50, HEAD_ROW, "_headrow"),
        _cli_row(50, ("head", "row", "block"), "_hrb"),
        *(_no_training_row(method, target) for target in TARGETS for method in NO_TRAINING_METHODS),
        *(_no_training_row(m, target, seed) for target in TARGETS for m in CLOSE_METHODS for seed in (1, 2)),
        # uniform FFN widths against per-layer widths at the same size (rows alone reach 2/3 at most: 50 % only)
        _no_training_row("activation_uniform", 50),
        _no_training_row("activation_rows", 50),
        *(
            _equal_budget_row(recipe, target, seed)
            for recipes, seeds in EQUAL_BUDGET_BATCHES
            for seed in seeds
            for target in TARGETS
            for recipe in recipes
        ),
        WALL_TIME,
    ]


ROWS: dict[str, MiniLMRow] = declare(_rows())
