"""What bench_smollm2.py measures: its settings and its rows (SmolLM2-135M on the Penn Treebank).

Every row is declared here once, in the order a full run measures it; ``bench_smollm2.py`` runs a row
by its ``kind`` and reads the other fields, and ``tables.py`` prints its label. ``python
benchmarks/bench_smollm2.py --list`` prints them all.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from rows import Row, declare, lr_text

TARGET = 0.5  # of the non-embedding linear weights (q, k, v, o, gate, up, down)
LEVELS = ["head", "row"]
EMBEDDING_CLUSTERS = 4
LEARNING_RATE = 5e-5
LONG_BUDGET = 4  # the long rows and the equal-budget rows train for 4x the steps
PRUNING_PHASE = 0.4  # the two-phase row: 40 % of the steps choose the structure, 60 % recover from it
# A budget of tens of steps is short for gates that start fully open (log_alpha ~7, moving ~lr per
# step): the learned rows start from the activation scores (hf_flop.warm_start_gates, log_alpha 3..7
# by rank) and move their gates at 0.5 instead of the default 0.2. At 0.5 the first full run ended at
# 0.35 of the linears removed, short of the 0.5 target (results/smollm2/flop.json), so the fast rows,
# added after it, move the gates at 1.5.
GATE_LEARNING_RATE, FAST_GATE_LEARNING_RATE = 0.5, 1.5
SETTINGS = {
    "full": {"block": 128, "batch": 4, "steps": 40, "eval_blocks": 48, "calibration_batches": 8}
    | {"oneshot_sequences": 32, "oneshot_block": 512, "cost_sequences": 128}
    | {"gguf": {"prompt_tokens": 128, "gen_tokens": 128, "repeats": 5}},
    "quick": {"block": 32, "batch": 2, "steps": 3, "eval_blocks": 4, "calibration_batches": 2}
    | {"oneshot_sequences": 24, "oneshot_block": 128, "cost_sequences": 24}
    | {"gguf": {"prompt_tokens": 16, "gen_tokens": 32, "repeats": 2}},
}


@dataclass(frozen=True, kw_only=True)
class SmolLM2Row(Row):
    """A SmolLM2 row. ``kind`` is one of ``bench_smollm2.PHASES_BY_KIND``'s keys."""

    target: float = field(default=TARGET, metadata={"help": "Fraction of the linears' weights removed."})
    pruner: str = field(
        default="",
        metadata={
            "help": "How the structure is chosen: hf_flop (prune_oneshot with `score`), flap, torch_pruning "
            "(FFN channels, importance `score`), learned (PruningTrainer's gates), dense (no pruning); the "
            "total-size rows: hf_flop_total (levels or search_shape), torch_pruning_width (width_depth.py)."
        },
    )
    score: str = field(default="", metadata={"help": "hf_flop score, or Torch-Pruning importance."})
    ranking: str = field(default="per_gate", metadata={"help": "prune_oneshot's ranking."})
    add_bias: bool = field(default=False, metadata={"help": "reconstruct(add_bias=...)."})
    uniform_shapes: bool = field(default=False, metadata={"help": "FlopConfig(uniform_shapes=...)."})
    embedding: bool = field(default=False, metadata={"help": "Level embedding too, at the same total size."})
    gate_learning_rate: float = field(default=GATE_LEARNING_RATE, metadata={"help": "A learned row's gate rate."})
    steps_factor: int = field(default=1, metadata={"help": "Multiplies the budget's steps (and training blocks)."})
    learning_rate: float = field(default=LEARNING_RATE, metadata={"help": "Recovery learning rate."})
    seed: int = field(default=0, metadata={"help": "Training seed (the data order; the calibration stays)."})
    cost: bool = field(default=False, metadata={"help": "The cost run: one prune_oneshot call, cost_sequences."})
    trainer_args: dict = field(default_factory=dict, metadata={"help": "PruningArguments of a learned row."})
    recipe: str = field(default="", metadata={"help": "The name its results store ('method' / 'row')."})
    levels: tuple[str, ...] = field(default=(), metadata={"help": "hf_flop's levels; empty: the benchmark's."})
    total_kept: float = field(
        default=0.0,
        metadata={"help": "A total-size row: fraction of all the parameters kept; 0: what `target` of the linears leaves."},
    )
    search: bool = field(default=False, metadata={"help": "A total-size row: hf_flop.search_shape picks the mix."})
    measures: tuple[str, ...] = field(
        default=(), metadata={"help": "A llama.cpp row: the total-size rows whose saved models it times."}
    )


def _budget_rows() -> list[SmolLM2Row]:
    """Every row at the shared budget (40 steps), then three of them at 4x."""

    def learned(id: str, label: str, **fields) -> SmolLM2Row:
        label = f"PruningTrainer, head+row gates warm-started from activation scores{label}"
        return SmolLM2Row(id=id, label=label, kind="learned", pruner="learned", **fields)

    def recovered(id: str, pruner: str, score: str, label: str, **fields) -> SmolLM2Row:
        return SmolLM2Row(id=id, label=label, kind="prune_then_recover", pruner=pruner, score=score, **fields)

    embedding = ", level embedding too (4 frequency clusters) at the same total size"
    fast = f", gate learning rate {FAST_GATE_LEARNING_RATE}"
    long = f", {LONG_BUDGET}x the budget"
    oneshot_embedding = "hf_flop one-shot activation, head+row+embedding at the same total size, then recovery"
    return [
        SmolLM2Row(id="pretrained", label="the pretrained model, no training", kind="pretrained"),
        SmolLM2Row(id="dense", label="the pretrained model fine-tuned with the budget", kind="dense"),
        learned("flop", ""),
        learned("flop_emb", embedding, embedding=True),
        *(
            recovered(f"oneshot_{score}", "hf_flop", score, f"hf_flop one-shot {score}, head+row, then recovery")
            for score in ("magnitude", "activation", "sensitivity")
        ),
        *(
            recovered(f"tp_{imp}", "torch_pruning", imp, f"Torch-Pruning {name} (FFN channels), then recovery")
            for imp, name in (("magnitude", "magnitude"), ("taylor", "Taylor"))
        ),
        learned("flop_fast", fast, gate_learning_rate=FAST_GATE_LEARNING_RATE),
        recovered("oneshot_activation_emb", "hf_flop", "activation", oneshot_embedding, embedding=True),
        learned("flop_emb_fast", embedding + fast, embedding=True, gate_learning_rate=FAST_GATE_LEARNING_RATE),
        # added once the 40-step learned rows had fallen short of the target
        learned("flop_long", long, steps_factor=LONG_BUDGET),
        recovered(
            "oneshot_activation_long",
            "hf_flop",
            "activation",
            f"hf_flop one-shot activation, head+row, then recovery{long}",
            steps_factor=LONG_BUDGET,
        ),
        learned("flop_emb_long", embedding + long, embedding=True, steps_factor=LONG_BUDGET),
    ]


# The rows with no training at all: recipe name (the "method" their results store) -> label and fields.
NO_TRAINING = {
    "magnitude": ("hf_flop magnitude", {"pruner": "hf_flop", "score": "magnitude"}),
    "activation": ("hf_flop activation", {"pruner": "hf_flop", "score": "activation"}),
    "fluctuation": ("hf_flop fluctuation", {"pruner": "hf_flop", "score": "fluctuation"}),
    "obs": ("hf_flop obs", {"pruner": "hf_flop", "score": "obs"}),
    "sensitivity": ("hf_flop sensitivity", {"pruner": "hf_flop", "score": "sensitivity"}),
    "fisher": ("hf_flop fisher", {"pruner": "hf_flop", "score": "fisher"}),
    "activation_std": (
        "hf_flop activation (standardised)",
        {"pruner": "hf_flop", "score": "activation", "ranking": "standardized"},
    ),
    "fluctuation_std_bias": (
        "hf_flop fluctuation (standardised, + bias)",
        {"pruner": "hf_flop", "score": "fluctuation", "ranking": "standardized", "add_bias": True},
    ),
    "flap": ("FLAP-style (fluctuation, standardised, bias compensation)", {"pruner": "flap"}),
    "tptaylor": ("Torch-Pruning Taylor (FFN channels)", {"pruner": "torch_pruning", "score": "taylor"}),
    "activation_uniform": (
        "hf_flop activation (uniform shapes)",
        {"pruner": "hf_flop", "score": "activation", "uniform_shapes": True},
    ),
    "obs_uniform": ("hf_flop obs (uniform shapes)", {"pruner": "hf_flop", "score": "obs", "uniform_shapes": True}),
}


def _no_training_row(target: int, method: str) -> SmolLM2Row:
    label, fields = NO_TRAINING[method]
    return SmolLM2Row(
        id=f"os{target}_{method}", label=label, kind="no_training", target=target / 100, recipe=method, **fields
    )


NO_TRAINING_METHODS = (
    *("magnitude", "activation", "fluctuation", "obs", "sensitivity", "fisher", "activation_std"),
    *("fluctuation_std_bias", "flap", "tptaylor", "activation_uniform"),
)
# the cost of the user's call: activation scores, pruning and reconstruction in one, on cost_sequences
COST = SmolLM2Row(
    id="os50_cost",
    label="hf_flop activation + reconstruction in one prune_oneshot call (the cost run)",
    kind="no_training",
    target=0.5,
    pruner="hf_flop",
    score="activation",
    cost=True,
    recipe="activation",
)


def _no_training_rows() -> list[SmolLM2Row]:
    return [
        *(_no_training_row(target, method) for target in (30, 50) for method in NO_TRAINING_METHODS),
        _no_training_row(50, "obs_uniform"),
        COST,
    ]


# The equal-budget rows (4x the budget, every row from the pretrained model with the same distillation
# and calibration): recipe name (the "row" their results store) -> label and fields.
EQUAL_BUDGET_RECIPES = {
    "dense": {"label": "dense, fine-tuned for the same steps", "pruner": "dense"},
    "twophase": {
        "label": "two-phase, head+row (gates warm-started from activation scores; prune 40 %, fix, refit, recover)",
        "pruner": "learned",
        "trainer_args": {
            "target_warmup_steps": 0.5,
            "pruning_phase": PRUNING_PHASE,
            "gate_learning_rate": GATE_LEARNING_RATE,
            "oneshot_score": "activation",  # as measured, before "obs" existed
        },
    },
    "oneshot": {
        "label": "hf_flop one-shot activation + refit, per-layer shapes, then recovery",
        "pruner": "hf_flop",
        "score": "activation",
    },
    "tptaylor": {"label": "Torch-Pruning Taylor (FFN channels), then recovery", "pruner": "torch_pruning"},
    # the same KV groups and FFN width in every layer: a stock LlamaForCausalLM
    "oneshotuniform": {
        "label": "hf_flop one-shot activation + refit, uniform shapes, then recovery",
        "pruner": "hf_flop",
        "score": "activation",
        "uniform_shapes": True,
    },
    "oneshotobs": {
        "label": "hf_flop one-shot obs + refit, per-layer shapes, then recovery",
        "pruner": "hf_flop",
        "score": "obs",
    },
    "oneshotuniformobs": {
        "label": "hf_flop one-shot obs + refit, uniform shapes, then recovery",
        "pruner": "hf_flop",
        "score": "obs",
        "uniform_shapes": True,
    },
}


def _equal_budget_row(recipe: str, n: int = 0, seed: int = 0) -> SmolLM2Row:
    """Recipe ``recipe`` at recovery learning rate n x 1e-5 (0: the default), training seed ``seed``."""
    fields = dict(EQUAL_BUDGET_RECIPES[recipe])
    label = fields.pop("label")
    if n:
        recipe, fields["learning_rate"] = f"{recipe}lr{n}", n * 1e-5
        label += f" at lr {lr_text(n * 1e-5)}"
    if fields["pruner"] == "torch_pruning":
        fields["score"] = "taylor"
    return SmolLM2Row(
        id=f"eq_{recipe}" + (f"_s{seed}" if seed else ""),
        label=label,
        kind="equal_budget",
        steps_factor=LONG_BUDGET,
        seed=seed,
        recipe=recipe,
        **fields,
    )


def _equal_budget_rows() -> list[SmolLM2Row]:
    return [
        *(_equal_budget_row(r) for r in ("dense", "twophase", "oneshot", "tptaylor", "oneshotuniform")),
        # a learning-rate sweep, the same for every row
        *(_equal_budget_row(r, n) for n in (10, 20) for r in ("oneshot", "oneshotuniform", "tptaylor")),
        # more seeds of the rows that decide the comparison
        *(_equal_budget_row(r, 20, seed) for seed in (1, 2) for r in ("oneshotuniform", "tptaylor")),
        # the OBS score in place of activation, at the best rate
        _equal_budget_row("oneshotobs", 20),
        _equal_budget_row("oneshotuniformobs", 20),
        # 2e-4 was the best rate and the highest one tried: further steps, for both methods
        *(_equal_budget_row(r, n) for n in (40, 80) for r in ("oneshotuniform", "tptaylor")),
    ]


# The total-size rows (benchmarks/width_depth.py): the equal budget, every row pruned to one total
# parameter count by any mix of levels. Recipe -> label and fields; the sizes: "" the total the
# head+row rows reach (81.4 M: 50 % of the linears), "half" 50 % of all the parameters.
WIDTH_DEPTH_RECIPES = {
    "hiddenrow": {
        "label": "hf_flop one-shot activation + refit, residual channels + FFN rows (heads kept), uniform",
        "levels": ("hidden", "row"),
    },
    "layer": {
        "label": "hf_flop one-shot activation + refit, heads + FFN rows + whole layers, uniform",
        "levels": ("head", "row", "layer"),
    },
    "hidden": {
        "label": "hf_flop one-shot activation + refit, residual channels + heads + FFN rows, uniform",
        "levels": ("hidden", "head", "row"),
    },
    "search": {
        "label": "hf_flop search_shape over residual channels, layers, heads and FFN rows, uniform",
        "levels": ("head", "row", "hidden", "layer"),
        "search": True,
    },
    "headrow": {"label": "hf_flop one-shot activation + refit, heads + FFN rows, uniform", "levels": ("head", "row")},
    "tpwidth": {
        "label": "Torch-Pruning Taylor width: residual + FFN channels, one ratio (heads kept)",
        "pruner": "torch_pruning_width",
        "score": "taylor",
    },
}
SIZES = {"": 0.0, "half": 0.5}
TOTAL_SIZE_PRUNERS = ("hf_flop_total", "torch_pruning_width")  # the pruners of the total-size rows
WIDTH_DEPTH_RATE = 20  # x 1e-5: the best rate of the equal-budget sweep


def _width_depth_row(recipe: str, size: str = "", seed: int = 0) -> SmolLM2Row:
    fields = {"pruner": "hf_flop_total", "score": "activation", "uniform_shapes": True} | WIDTH_DEPTH_RECIPES[recipe]
    label = fields.pop("label") + (" at 50 % of all the parameters" if size else " at 81.4 M parameters")
    name = f"{size}{recipe}lr{WIDTH_DEPTH_RATE}"
    return SmolLM2Row(
        id=f"eq_{name}" + (f"_s{seed}" if seed else ""),
        label=label + f", then recovery at lr {lr_text(WIDTH_DEPTH_RATE * 1e-5)}",
        kind="equal_budget",
        steps_factor=LONG_BUDGET,
        seed=seed,
        recipe=name,
        learning_rate=WIDTH_DEPTH_RATE * 1e-5,
        total_kept=SIZES[size],
        **fields,
    )


def _width_depth_rows() -> list[SmolLM2Row]:
    def gguf(id: str, size: str, recipes: tuple[str, ...]) -> SmolLM2Row:
        measures = tuple(_width_depth_row(r, size).id for r in recipes)
        label = f"llama.cpp f16 tokens/s and greedy tokens of the pretrained model and {', '.join(measures)}"
        return SmolLM2Row(id=id, label=label, kind="gguf_total_size", measures=measures)

    return [
        *(_width_depth_row(r) for r in ("hiddenrow", "layer", "search", "tpwidth", "hidden")),
        gguf("gguf_total_size", "", ("layer", "search", "tpwidth")),
        *(_width_depth_row(r, "half") for r in ("headrow", "hidden", "layer", "search", "tpwidth")),
        gguf("gguf_half_total_size", "half", ("headrow", "search", "tpwidth")),
    ]


ROWS: dict[str, SmolLM2Row] = declare(
    [*_budget_rows(), *_no_training_rows(), *_equal_budget_rows(), *_width_depth_rows()]
)
