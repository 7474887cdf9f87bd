"""P1-P4, P6, P7 of the main job: MiniLM-L6 on the Rotten Tomatoes sentiment sentences, CPU.

Phases (each in its own process, so its peak memory is its own; a phase whose JSON exists is
skipped, so an interrupted run resumes; one torch thread each unless --threads says otherwise):

  dense          plain fine-tune of MiniLM + a new classifier head (full: all 8,072 sentences,
                 2 epochs); the baseline, the teacher and the starting point of every other run
  dense_more     the dense model fine-tuned for the shared budget (full: 4,000 sentences, 1
                 epoch, 250 steps of 16): the "same budget" dense reference for P4 and P7
  flop_<T>       `hf-flop prune` from the dense model for the shared budget with distillation,
                 levels rank+head+row, then compaction, evaluation and CPU latency (T = 50, 75 %
                 of the encoder linear weights removed)
  tp_<imp>_<T>   Torch-Pruning (heads + FFN channels, magnitude or Taylor) to the same kept
                 parameter count, then the shared budget of fine-tuning with the same distillation
  flop_50_<lv>   issue 5's levels sweep at 50%: rank only, head+row, head+row+block (MLPruning's
                 three levels; rank and block do not combine in one step)
  eq_<row>_<T>_s<k>  issue 13, every row at the same total budget from the same dense start (the
                 retrained dense_model, dense_rerun.json) with the same logit distillation, training
                 seed k (and calibration draw k: 512 training sentences, shared by every row):
                   old        the one-phase FLOP schedule, levels rank+head+row (what flop_<T> runs)
                   twophase   gates warm-started from activation scores, PruningTrainer with
                              pruning_phase=PRUNING_PHASE: prune, fix the masks at exactly the target,
                              reconstruct on the calibration data, freeze, recover; rank+head+row
                   twophasehr the same with levels head+row
                   oneshot    hf_flop.prune_oneshot (activation, heads + rows, reconstruction), compact,
                              then every step recovers at the compacted size
                   tptaylor   Torch-Pruning Taylor heads + FFN channels, then every step recovers
                   trainer    PruningTrainer with its defaults, as a user runs it (pruning_phase=0: one-shot
                              obs masks + refit before the first step, recovery of the compacted model);
                              the committed results predate the fork_rng fix (PruningTrainer built the
                              compacted model from the global RNG): other random draws than oneshotobs,
                              whose computation it now repeats bitwise
                   recipe     the oneshot row as a user runs it: PruningTrainer(pruning_phase=0) sets the
                              same one-shot masks and refit before its first step, then recovers at the
                              original shapes with the masks held (the same function, the slower route)
                 rows added after the first measurement, looking for a lead over Taylor:
                   <row>hd    oneshot / tptaylor with hidden-state distillation (weight HIDDEN_DISTILLATION)
                   <row>lr<N> oneshot / tptaylor with recovery learning rate N x 1e-5 (a sweep per row)
                   gradual    one-shot + refit in four compacted stages (GRADUAL_STAGES), recovery between
                   oneshotlayer          activation + refit, every layer pruned by the same share
                   oneshot<score>        another hf_flop score (sensitivity, fisher, obs) + refit
                   oneshotplain          activation masks without the refit
                   oneshottptaylor[plain] Torch-Pruning Taylor's heads and rows as hf_flop masks, refit
                              (or not), compacted
  wall_time      issue 13's cost goal: a dense fine-tune and PruningTrainer(pruning_phase=0) with and
                 without compact_recovery, back to back in one process (run it alone: --only wall_time
                 --threads 2)
  os_<m>_<T>     one-shot from the dense model with NO fine-tuning at all (issue 12), heads + FFN rows,
                 every row calibrated on the same 512 training sentences: hf_flop.prune_oneshot with
                 score <m> (magnitude, activation, fluctuation, obs, sensitivity, fisher; `_std`: standardised
                 ranking),
                 accuracy after plain removal and after hf_flop.reconstruct; `flap`: the FLAP-style
                 baseline (flap_baseline.py); `tptaylor`: Torch-Pruning Taylor (heads + FFN) alone;
                 `_uniform`: FlopConfig(uniform_shapes=True), the same FFN width in every layer (FFN rows
                 only: a stock BERT config cannot hold fewer heads), compacting to the stock class;
                 `_rows`: FFN rows only, per-layer widths: with `_uniform`, the cost of uniform shapes at
                 equal size (issue 14)

    .venv/bin/python benchmarks/bench_minilm.py            # full run (about 1 h on 2 idle cores)
    .venv/bin/python benchmarks/bench_minilm.py --quick    # minutes: small subsets, smoke test

Results: benchmarks/results/minilm[_quick]/<phase>.json, summary in bench_minilm[_quick].json/.png.
"""

from __future__ import annotations

import copy
import json
import os
import re
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))  # the sibling modules (phase_runner, torch_pruning_baseline), also when imported
TARGETS = (0.5, 0.75)
IMPORTANCES = ("magnitude", "taylor")
LEVELS = {"": "rank,head,row", "rank": "rank", "headrow": "head,row", "hrb": "head,row,block"}
LATENCY_THREADS = 1  # the CLI's default too: one fixed thread count keeps ratios stable on a shared machine
SETTINGS = {  # shared by every phase: same data, same batch, same learning rate, same epochs
    # the dense starting point trains on dense_train_samples (0 = all 8,072) for dense_epochs; every
    # compared run (dense_more, flop_*, tp_*) then gets the same budget: train_samples, epochs
    "full": {"train_samples": 4000, "epochs": 1.0, "dense_train_samples": 0, "dense_epochs": 2.0}
    | {"eval_samples": 0, "batch_size": 16, "max_length": 64},
    "quick": {"train_samples": 400, "epochs": 1.0, "dense_train_samples": 400, "dense_epochs": 1.0}
    | {"eval_samples": 200, "batch_size": 16, "max_length": 48},
}
LEARNING_RATE = 5e-5
ONESHOT_METHODS = (
    *("magnitude", "activation", "fluctuation", "sensitivity", "fisher"),
    *("activation_std", "fluctuation_std", "flap", "tptaylor", "obs"),
)
ONESHOT_CALIBRATION = {"full": (32, 16), "quick": (8, 16)}  # (batches, sentences per batch)


def _data(settings: dict, tokenizer):
    from hf_flop.app.data import load_sentiment, tokenize_classification

    raw = load_sentiment()

    def prep(split, n):
        part = raw[split] if not n else raw[split].shuffle(seed=0).select(range(min(n, len(raw[split]))))
        return tokenize_classification(
            part, tokenizer, text_column="text", label_column="label", max_length=settings["max_length"]
        )

    return prep("train", settings["train_samples"]), prep("test", settings["eval_samples"])


def _args(out: str, settings: dict, cls=None, **extra):
    from transformers import TrainingArguments

    cls = cls or TrainingArguments
    return cls(
        output_dir=out,
        num_train_epochs=settings["epochs"],
        per_device_train_batch_size=settings["batch_size"],
        weight_decay=0.01,
        warmup_steps=0.1,
        logging_steps=20,
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
        **{"seed": 0, "learning_rate": LEARNING_RATE, **extra},
    )


def _latency(dense, small, test_set, tokenizer, max_length: int) -> dict:
    import torch

    from hf_flop.metrics import cpu_latency

    result = {}
    with torch.inference_mode():
        for batch in (1, 32):
            rows = [{k: v for k, v in test_set[i].items() if k != "labels"} for i in range(batch)]
            inputs = dict(tokenizer.pad(rows, padding="max_length", max_length=max_length, return_tensors="pt"))
            timing = cpu_latency(
                {"dense": dense, "pruned": small}, inputs, repeats=10 if batch == 1 else 5, threads=LATENCY_THREADS
            )
            result[str(batch)] = {
                "dense_ms": timing["dense"] * 1e3,
                "pruned_ms": timing["pruned"] * 1e3,
                "speedup": timing["dense"] / timing["pruned"],
            }
    return result


def _linear_flops_ratio(dense, small) -> float:
    """Multiply-adds per token in the encoder linears, dense / pruned: the ideal speed-up."""
    from torch import nn

    from hf_flop.modeling.block_sparse import BlockSparseLinear

    def macs(model):  # dense linears: every weight; block-sparse ones: the stored blocks
        return sum(
            m.weight.numel() if isinstance(m, nn.Linear) else m.values.numel()
            for n, m in model.named_modules()
            if isinstance(m, (nn.Linear, BlockSparseLinear)) and ".encoder." in n
        )

    return macs(dense) / macs(small)


def phase_dense(out: Path, settings: dict, source: str, save_to: Path | None) -> dict:
    from transformers import AutoModelForSequenceClassification, AutoTokenizer, DataCollatorWithPadding, Trainer

    from hf_flop.metrics import evaluate_model

    tokenizer = AutoTokenizer.from_pretrained(source)
    train, test = _data(settings, tokenizer)
    model = AutoModelForSequenceClassification.from_pretrained(source, num_labels=2)
    collator = DataCollatorWithPadding(tokenizer)
    start = time.perf_counter()
    Trainer(model=model, args=_args(str(out / "work"), settings), train_dataset=train, data_collator=collator).train()
    wall = time.perf_counter() - start
    accuracy = evaluate_model(model, test, task="seq-cls", collator=collator)["accuracy"]
    if save_to is not None:
        model.save_pretrained(save_to)
        tokenizer.save_pretrained(save_to)
    return {"accuracy": accuracy, "wall_time_s": wall, "train_examples": len(train), "test_examples": len(test)}


def phase_flop(out: Path, settings: dict, target: float, dense_model: Path, levels: str) -> dict:
    from hf_flop_cli import main

    argv = [
        "prune",
        "--model",
        str(dense_model),
        "--dense-epochs",
        "0",
        "--epochs",
        str(settings["epochs"]),
        "--target",
        str(target),
        "--levels",
        levels,
        "--latency-threads",
        str(LATENCY_THREADS),
        "--train-samples",
        str(settings["train_samples"]),
        "--eval-samples",
        str(settings["eval_samples"]),
        "--batch-size",
        str(settings["batch_size"]),
        "--max-length",
        str(settings["max_length"]),
        "--output-dir",
        str(out / "run"),
        "--overwrite",
    ]
    code = main(argv)
    if code:
        raise SystemExit(f"hf-flop prune failed with status {code}")
    summary = json.loads((out / "run" / "summary.json").read_text())
    from transformers import AutoModelForSequenceClassification

    import hf_flop  # noqa: F401  (registers the compacted model classes)

    small = AutoModelForSequenceClassification.from_pretrained(out / "run" / "model")
    dense = AutoModelForSequenceClassification.from_pretrained(dense_model)
    return {
        "accuracy_dense": summary["results"]["dense"],
        "accuracy": summary["results"]["pruned"],
        "sparsity": summary["params"]["sparsity"],
        "target": target,
        "levels": levels,
        "params": summary["params"],
        "latency": summary["latency_ms"],
        "speedup": summary["speedup"],
        "wall_time_s": summary["wall_time_s"].get("pruning"),
        "flops_ratio": _linear_flops_ratio(dense, small),
    }


def phase_tp(out: Path, settings: dict, importance: str, target: float, dense_model: Path) -> dict:
    from torch_pruning_baseline import DistillationTrainer, encoder_linear_params, prune_with_torch_pruning
    from transformers import AutoModelForSequenceClassification, AutoTokenizer, DataCollatorWithPadding

    from hf_flop.metrics import evaluate_model
    from hf_flop.trainer import PruningArguments

    tokenizer = AutoTokenizer.from_pretrained(dense_model)
    train, test = _data(settings, tokenizer)
    collator = DataCollatorWithPadding(tokenizer)
    dense = AutoModelForSequenceClassification.from_pretrained(dense_model).eval()
    model = copy.deepcopy(dense)
    calibration = [collator([train[i] for i in range(j, j + 16)]) for j in range(0, 128, 16)]
    example = {k: v for k, v in calibration[0].items() if k != "labels"}
    before = encoder_linear_params(model)
    prune_with_torch_pruning(model, example, target, importance, calibration)
    sparsity = 1 - encoder_linear_params(model) / before
    accuracy_oneshot = evaluate_model(model, test, task="seq-cls", collator=collator)["accuracy"]
    model.train()
    start = time.perf_counter()
    DistillationTrainer(
        model=model,
        args=_args(str(out / "work"), settings, PruningArguments),
        teacher_model=dense,
        train_dataset=train,
        data_collator=collator,
    ).train()
    wall = time.perf_counter() - start
    accuracy = evaluate_model(model, test, task="seq-cls", collator=collator)["accuracy"]
    model.eval()
    return {
        "accuracy": accuracy,
        "accuracy_oneshot": accuracy_oneshot,
        "sparsity": sparsity,
        "target": target,
        "latency": _latency(dense, model, test, tokenizer, settings["max_length"]),
        "flops_ratio": _linear_flops_ratio(dense, model),
        "wall_time_s": wall,
    }


def _calibration(train, collator, mode: str, seed: int) -> list[dict]:
    """ONESHOT_CALIBRATION's training sentences, collated; draw ``seed`` > 0 from another shuffle of the set."""
    batches, size = ONESHOT_CALIBRATION[mode]
    pool = train.shuffle(seed=seed) if seed else train
    return [collator([pool[i] for i in range(j, j + size)]) for j in range(0, batches * size, size)]


def phase_oneshot_only(
    out: Path, settings: dict, method: str, target: float, dense_model: Path, mode: str, seed: int = 0
) -> dict:
    """One-shot heads + FFN rows from the dense model, no training: accuracy plain and reconstructed.

    ``seed`` > 0 draws the calibration sentences from another shuffle of the training set (the spread
    of a one-shot result is the spread over calibration draws; the test set stays the same)."""
    from torch_pruning_baseline import encoder_linear_params, prune_with_torch_pruning
    from transformers import AutoModelForSequenceClassification, AutoTokenizer, DataCollatorWithPadding

    from hf_flop import FlopConfig, compact, get_flop_model, prune_oneshot, reconstruct, sparsity_report
    from hf_flop.metrics import evaluate_model

    tokenizer = AutoTokenizer.from_pretrained(dense_model)
    train, test = _data(settings, tokenizer)
    collator = DataCollatorWithPadding(tokenizer)
    batches, size = ONESHOT_CALIBRATION[mode]
    calibration = _calibration(train, collator, mode, seed)
    model = AutoModelForSequenceClassification.from_pretrained(dense_model).eval()

    def accuracy(m) -> float:
        return evaluate_model(m, test, task="seq-cls", collator=collator)["accuracy"]

    result = {"method": method, "target": target, "calibration_sentences": batches * size, "calibration_seed": seed}
    start = time.perf_counter()
    if method == "tptaylor":
        before = encoder_linear_params(model)
        example = {k: v for k, v in calibration[0].items() if k != "labels"}
        prune_with_torch_pruning(model, example, target, "taylor", calibration)
        result.update(sparsity=1 - encoder_linear_params(model) / before, prune_time_s=time.perf_counter() - start)
        return {**result, "accuracy": accuracy(model)}
    score, *options = method.split("_")  # <score>[_std][_bias][_uniform][_rows]
    uniform = "uniform" in options  # a stock BERT config holds one head count of fixed size: FFN rows only
    levels = ["row"] if uniform or "rows" in options else ["head", "row"]
    gated = get_flop_model(model, FlopConfig(levels=levels, target_sparsity=target, uniform_shapes=uniform))
    if method == "flap":
        from flap_baseline import prune_flap

        prune_flap(gated, calibration, target)
        result["prune_time_s"] = time.perf_counter() - start
    else:
        ranking = "standardized" if "std" in options else "per_gate"
        prune_oneshot(gated, None, calibration, score, ranking=ranking, reconstruct=False)
        result["prune_time_s"] = time.perf_counter() - start
        result["accuracy_plain"] = accuracy(gated)
        start = time.perf_counter()
        report = reconstruct(gated, calibration, add_bias="bias" in options, progress=False)
        result["reconstruct_time_s"] = time.perf_counter() - start
        result["refit_modules"] = [sum(r.applied for r in report.layers), len(report.layers)]
    result["accuracy"] = accuracy(gated)
    result["sparsity"] = sparsity_report(gated).deterministic_sparsity
    small = compact(gated)
    result["accuracy_compacted"] = accuracy(small)  # the same model, smaller: a sanity check
    result["compacted_class"] = type(small).__name__  # the stock class, or the Flop* class of per-layer shapes
    return result


PRUNING_PHASE = 0.4  # the twophase rows: 40 % of the steps choose the structure, 60 % recover from it
EQUAL_BUDGET_ROWS = ("old", "twophase", "twophasehr", "oneshot", "tptaylor", "recipe")
# rows ending in "hd" add hidden-state (layer) distillation with this weight to the logit distillation
HIDDEN_DISTILLATION = 1.0
LATER_ROWS = ("oneshothd", "tptaylorhd", "gradual", "gradualhd")  # added after the first measurement
# recovery learning rate 2e-5 / 1e-4 / 2e-4
SWEEP_ROWS = tuple(f"{row}lr{n}" for row in ("oneshot", "tptaylor") for n in (2, 10, 20))
LATER_ROWS += ("oneshotlayer",)  # one-shot + refit with every layer pruned by the same share
LATER_ROWS += ("oneshotsensitivity", "oneshotfisher")  # task-aware (gradient) scores + refit
LATER_ROWS += ("oneshotobs",)  # OBS scores: the removal cost after the refit (hf_flop.obs)
LATER_ROWS += ("oneshotobslr10", "trainer")  # the same at lr 1e-4; PruningTrainer() with its defaults
LATER_ROWS += (
    "oneshottptaylor",
    "oneshotplain",
    "oneshottptaylorplain",
)  # Torch-Pruning Taylor's heads and rows, hf_flop's refit, then recovery
# the gradual rows prune one-shot at these fractions of the run, to these fractions of the target (a cubic
# ramp, Zhu & Gupta's schedule), compacting and refitting each time; the steps between stages recover
GRADUAL_STAGES = ((0.0, 1 - 0.75**3), (0.1, 1 - 0.5**3), (0.2, 1 - 0.25**3), (0.3, 1.0))


def _gradual_recovery(model, dense, train, collator, calibration, settings, target, work, seed, hidden, **extra):
    """The gradual rows: prune in GRADUAL_STAGES, each a one-shot prune + refit of the current (compacted)
    model; between stages recover on the next slice of one seeded pass over the data, under one linear
    warm-up/decay schedule for the whole run (the optimizer restarts at each stage: the shapes change)."""
    import torch
    from torch_pruning_baseline import DistillationTrainer, encoder_linear_params
    from transformers import get_linear_schedule_with_warmup

    from hf_flop import FlopConfig, compact, get_flop_model, prune_oneshot
    from hf_flop.trainer import PruningArguments

    order = train.shuffle(seed=seed)
    size = settings["batch_size"]
    total = len(order) // size
    dense_linear = encoder_linear_params(dense)
    bounds = [round(frac * total) for frac, _ in GRADUAL_STAGES] + [total]
    trainer = None
    for k, (_, share) in enumerate(GRADUAL_STAGES):
        kept_now = encoder_linear_params(model) / dense_linear
        relative = 1 - (1 - share * target) / kept_now  # of the current model's linears
        gated = get_flop_model(model, FlopConfig(levels=["head", "row"], target_sparsity=relative))
        prune_oneshot(gated, None, calibration, "activation")
        model = compact(gated).train()
        rows = order.select(range(bounds[k] * size, min(len(order), bounds[k + 1] * size)))
        if not len(rows):
            continue
        args = _args(work + f"_{k}", settings, PruningArguments, seed=seed, hidden_distillation_weight=hidden, **extra)
        trainer = DistillationTrainer(
            model=model, args=args, teacher_model=dense, train_dataset=rows, data_collator=collator
        )
        trainer.create_optimizer()
        whole = get_linear_schedule_with_warmup(trainer.optimizer, round(0.1 * total), total)
        offset = bounds[k]
        trainer.lr_scheduler = torch.optim.lr_scheduler.LambdaLR(
            trainer.optimizer, lambda step, f=whole.lr_lambdas[0], o=offset: f(step + o)
        )
        trainer.train()
    return model.eval(), trainer


def _keep_top_share(gated, calibration, share: float) -> None:
    """Per gate (each layer's heads, each layer's FFN rows) keep the top ``share`` of units by activation
    score, then refit: hf_flop's scores and reconstruction with Torch-Pruning's per-layer allocation."""
    import torch

    from hf_flop import compute_scores, reconstruct
    from hf_flop.scores import find_gated_units

    scores = compute_scores(gated, calibration, "activation")
    for unit in find_gated_units(gated):
        keep = torch.zeros(unit.n_units, dtype=torch.bool)
        keep[torch.argsort(scores[unit.key], descending=True)[: round(share * unit.n_units)]] = True
        unit.gate.set_mask(keep)
    reconstruct(gated, calibration)


def _keep_what_torch_pruning_keeps(gated, dense, calibration, target: float, refit: bool) -> None:
    """Set ``gated``'s masks to the heads and FFN rows Torch-Pruning Taylor keeps at ``target``, then refit.

    Torch-Pruning removes rows physically; every kept row is an exact copy of a dense row, which is how
    the kept indices are found (the query rows of a head's first dimension, the FFN up rows)."""
    import torch
    from torch_pruning_baseline import prune_with_torch_pruning

    from hf_flop import reconstruct
    from hf_flop.scores import find_gated_units

    example = {k: v for k, v in calibration[0].items() if k != "labels"}
    pruned = prune_with_torch_pruning(copy.deepcopy(dense), example, target, "taylor", calibration)
    head_dim = dense.config.hidden_size // dense.config.num_attention_heads
    keep = {}
    for i, (full, small) in enumerate(zip(dense.bert.encoder.layer, pruned.bert.encoder.layer)):
        for key, w_full, w_small, step in (
            (f"head_{i}", full.attention.self.query.weight, small.attention.self.query.weight, head_dim),
            (f"row_{i}", full.intermediate.dense.weight, small.intermediate.dense.weight, 1),
        ):
            first_rows = w_full[::step]  # a unit's first row identifies it
            found = torch.cdist(w_small[::step].detach(), first_rows.detach()).argmin(1)
            assert torch.equal(w_small[::step], first_rows[found]), "a kept row is not a copy of a dense row"
            mask = torch.zeros(len(first_rows), dtype=torch.bool)
            mask[found] = True
            keep[key] = mask
    for unit in find_gated_units(gated):
        unit.gate.set_mask(keep[unit.key])
    if refit:
        reconstruct(gated, calibration)


def phase_equal_budget(out: Path, settings: dict, row: str, target: float, seed: int, dense_model: Path, mode: str):
    """Issue 13: one row of the equal-budget comparison (see the module docstring)."""
    from torch_pruning_baseline import DistillationTrainer, encoder_linear_params, prune_with_torch_pruning
    from transformers import AutoModelForSequenceClassification, AutoTokenizer, DataCollatorWithPadding

    from hf_flop import (
        FlopConfig,
        compact,
        get_flop_model,
        prune_oneshot,
        sparsity_report,
    )
    from hf_flop.metrics import evaluate_model
    from hf_flop.trainer import PruningArguments, PruningTrainer

    tokenizer = AutoTokenizer.from_pretrained(dense_model)
    train, test = _data(settings, tokenizer)
    collator = DataCollatorWithPadding(tokenizer)
    batches, size = ONESHOT_CALIBRATION[mode]
    calibration = _calibration(train, collator, mode, seed)
    dense = AutoModelForSequenceClassification.from_pretrained(dense_model).eval()
    model = copy.deepcopy(dense)
    dense_linear = encoder_linear_params(dense)

    def accuracy(m) -> float:
        return evaluate_model(m, test, task="seq-cls", collator=collator)["accuracy"]

    result = {"row": row, "target": target, "seed": seed, "calibration_sentences": batches * size}
    work = str(out / "work")
    start = time.perf_counter()
    # <base>[hd][lr<N>]: "hd" adds layer distillation, "lr<N>" sets the learning rate to N x 1e-5 (a sweep)
    base, hd, lr = re.fullmatch(r"([a-z]+?)(hd)?(?:lr(\d+))?", row).groups()
    hidden = HIDDEN_DISTILLATION if hd else 0.0
    learning_rate = int(lr) * 1e-5 if lr else LEARNING_RATE
    result.update(hidden_distillation_weight=hidden, learning_rate=learning_rate)
    if base == "gradual":
        small, trainer = _gradual_recovery(
            model,
            dense,
            train,
            collator,
            calibration,
            settings,
            target,
            work,
            seed,
            hidden,
            learning_rate=learning_rate,
        )
        result["sparsity"] = 1 - encoder_linear_params(small) / dense_linear
    elif base.startswith("oneshot") or base == "tptaylor":
        # prune once, compact, then every step recovers at the small size
        if base.startswith("oneshot"):
            gated = get_flop_model(model, FlopConfig(levels=["head", "row"], target_sparsity=target))
            if base == "oneshotlayer":  # every layer keeps the same share of its heads and FFN rows (TP's allocation)
                _keep_top_share(gated, calibration, 1 - target)
            elif base.startswith("oneshottptaylor"):  # Torch-Pruning Taylor's heads and rows, hf_flop's refit
                refit = base != "oneshottptaylorplain"  # (or none: compaction alone, against the tptaylor row)
                _keep_what_torch_pruning_keeps(gated, copy.deepcopy(dense), calibration, target, refit)
            elif base == "oneshotplain":  # activation masks without the refit: what the refit does for recovery
                prune_oneshot(gated, None, calibration, "activation", reconstruct=False)
            else:  # oneshot<score>: another hf_flop score than activation (e.g. oneshotsensitivity, Taylor's)
                prune_oneshot(gated, None, calibration, base.removeprefix("oneshot") or "activation")
            result["sparsity"] = sparsity_report(gated).deterministic_sparsity
            model = compact(gated)
        else:
            example = {k: v for k, v in calibration[0].items() if k != "labels"}
            prune_with_torch_pruning(model, example, target, "taylor", calibration)
            result["sparsity"] = 1 - encoder_linear_params(model) / dense_linear
        result["prune_time_s"] = time.perf_counter() - start
        result["accuracy_before_recovery"] = accuracy(model.eval())
        model.train()
        trainer = DistillationTrainer(
            model=model,
            args=_args(
                work,
                settings,
                PruningArguments,
                seed=seed,
                hidden_distillation_weight=hidden,
                learning_rate=learning_rate,
            ),
            teacher_model=dense,
            train_dataset=train,
            data_collator=collator,
        )
        trainer.train()
        small = model.eval()
    else:
        levels = ["head", "row"] if row in ("twophasehr", "recipe", "trainer") else ["rank", "head", "row"]
        model = get_flop_model(model, FlopConfig(levels=levels, target_sparsity=target))
        extra = {"target_warmup_steps": 0.5, "pruning_phase": 1.0}
        if row != "old":  # PruningTrainer warm-starts the gates from activation scores of the calibration data
            extra["pruning_phase"] = 0.0 if row == "recipe" else PRUNING_PHASE
        if row in ("recipe", "twophase", "twophasehr"):  # measured with activation scores, before "obs" existed
            extra["oneshot_score"] = "activation"
        if row == "recipe":  # measured before compact_recovery existed: the masks held at full size
            extra["compact_recovery"] = False
        if row == "trainer":  # PruningTrainer's own defaults: one-shot (obs) + refit, compacted recovery
            extra = {}
        trainer = PruningTrainer(
            model=model,
            args=_args(work, settings, PruningArguments, seed=seed, **extra),
            teacher_model=dense,
            train_dataset=train,
            data_collator=collator,
            reconstruction_data=calibration if row != "old" else None,
        )
        trainer.train()
        result["sparsity"] = sparsity_report(model).deterministic_sparsity
        result["boundary"] = trainer.boundary
        small = compact(model).eval()
    result["wall_time_s"] = time.perf_counter() - start
    result["accuracy"] = accuracy(small)
    result["accuracy_dense"] = accuracy(dense)
    result["flops_ratio"] = _linear_flops_ratio(dense, small)
    result["log"] = [e for e in trainer.state.log_history if "loss" in e]
    return result


def phase_wall_time(out: Path, settings: dict, dense_model: Path, mode: str) -> dict:
    """Issue 13's cost goal: the pruning run's wall time against a dense fine-tune of the same steps.

    One process, back to back, with nothing else running (run it alone): a plain ``Trainer`` on the
    dense model, then ``PruningTrainer(pruning_phase=0)`` at 50 % with the teacher (one-shot scores,
    refit, then every step recovers) twice: with ``compact_recovery`` (the default: the steps train
    the compacted model) and without (the full-size model with its masks held). Each from a fresh copy
    of the dense model, the same data and seed; the accuracy of each pruned model is recorded too.
    """
    from transformers import AutoModelForSequenceClassification, AutoTokenizer, DataCollatorWithPadding, Trainer

    from hf_flop import FlopConfig, compact, get_flop_model
    from hf_flop.metrics import evaluate_model
    from hf_flop.trainer import PruningArguments, PruningTrainer

    tokenizer = AutoTokenizer.from_pretrained(dense_model)
    train, test = _data(settings, tokenizer)
    collator = DataCollatorWithPadding(tokenizer)
    calibration = _calibration(train, collator, mode, 0)
    dense = AutoModelForSequenceClassification.from_pretrained(dense_model).eval()
    work = str(out / "work")
    result = {}

    start = time.perf_counter()
    Trainer(
        model=copy.deepcopy(dense).train(), args=_args(work, settings), train_dataset=train, data_collator=collator
    ).train()
    result["dense_finetune_s"] = time.perf_counter() - start

    for route, compacted in (("compacted", True), ("masked", False)):
        gated = get_flop_model(copy.deepcopy(dense), FlopConfig(levels=["head", "row"], target_sparsity=0.5))
        start = time.perf_counter()
        trainer = PruningTrainer(
            model=gated,
            args=_args(work, settings, PruningArguments, pruning_phase=0.0, compact_recovery=compacted),
            teacher_model=dense,
            train_dataset=train,
            data_collator=collator,
            reconstruction_data=calibration,
        )
        trainer.train()
        result[f"pruning_trainer_{route}_s"] = time.perf_counter() - start
        result[f"pruning_trainer_{route}_vs_dense"] = result[f"pruning_trainer_{route}_s"] / result["dense_finetune_s"]
        result[f"accuracy_{route}"] = evaluate_model(compact(gated), test, task="seq-cls", collator=collator)[
            "accuracy"
        ]
        assert trainer.compacted_recovery == compacted
    result["load_avg_end"] = list(os.getloadavg())
    return result


def run_phase(name: str, out: Path, settings: dict, root: Path) -> dict:
    dense_model = root / "dense_model"
    if name.startswith("eq_"):  # eq_<row>_<T>_s<seed>
        _, row, target, seed = name.split("_")
        mode = "quick" if root.name.endswith("_quick") else "full"
        return phase_equal_budget(out, settings, row, int(target) / 100, int(seed[1:]), dense_model, mode)
    if name == "wall_time":
        return phase_wall_time(out, settings, dense_model, "quick" if root.name.endswith("_quick") else "full")
    if name == "dense":
        from hf_flop.app.data import minilm_path

        start = {**settings, "train_samples": settings["dense_train_samples"], "epochs": settings["dense_epochs"]}
        return phase_dense(out, start, str(minilm_path()), save_to=dense_model)
    if name == "dense_more":
        return phase_dense(out, settings, str(dense_model), save_to=None)
    kind, *rest = name.split("_")
    if kind == "os":  # os_<method>_<T>[_s<seed>]
        mode = "quick" if root.name.endswith("_quick") else "full"
        seed = int(rest.pop()[1:]) if rest[-1].startswith("s") else 0
        return phase_oneshot_only(out, settings, "_".join(rest[:-1]), int(rest[-1]) / 100, dense_model, mode, seed)
    if kind == "flop":
        return phase_flop(out, settings, int(rest[0]) / 100, dense_model, LEVELS[rest[1] if len(rest) > 1 else ""])
    target = int(rest[-1]) / 100
    return phase_tp(out, settings, rest[0], target, dense_model)


PHASES = ["dense", "dense_more"] + [f"flop_{int(t * 100)}" for t in TARGETS]
PHASES += [f"tp_{imp}_{int(t * 100)}" for t in TARGETS for imp in IMPORTANCES]
PHASES += [f"flop_50_{levels}" for levels in LEVELS if levels]
PHASES += [f"os_{m}_{int(t * 100)}" for t in TARGETS for m in ONESHOT_METHODS]
# calibration draws 1 and 2 for the rows whose gaps are within a few points (three draws with seed 0)
PHASES += [f"os_{m}_{t}_s{k}" for t in (50, 75) for m in ("activation", "flap", "tptaylor", "obs") for k in (1, 2)]
# issue 14: uniform FFN widths against per-layer widths at the same size (rows alone reach 2/3 at most: 50 % only)
PHASES += ["os_activation_uniform_50", "os_activation_rows_50"]

# issue 13: seed 0 of every row first, then the other seeds (a partial run still compares all rows)
PHASES += [f"eq_{row}_{t}_s{k}" for k in (0, 1, 2) for t in (50, 75) for row in EQUAL_BUDGET_ROWS]
# after issue 13's first measurement: layer distillation for the two best rows, and gradual one-shot pruning
PHASES += [f"eq_{row}_{t}_s{k}" for k in (0, 1, 2) for t in (50, 75) for row in LATER_ROWS + SWEEP_ROWS]
# three more seeds of the two rows that decide issue 13's goals (their 3-seed gap was about 1 point)
PHASES += [f"eq_{row}_{t}_s{k}" for k in (3, 4, 5) for t in (50, 75) for row in ("oneshotobs", "tptaylor")]
PHASES += [f"eq_{row}lr10_{t}_s{k}" for k in (3, 4, 5) for t in (50, 75) for row in ("oneshotobs", "tptaylor")]
PHASES += ["wall_time"]  # run it alone: --only wall_time --threads 2


def main() -> None:
    from phase_runner import run_benchmark

    run_benchmark(__file__, "minilm", PHASES, SETTINGS, run_phase, summarize)


def summarize(root: Path, mode: str) -> None:
    results = {p.stem: json.loads(p.read_text()) for p in sorted(root.glob("*.json"))}
    dense = results.get("dense", {})
    dense_more = results.get("dense_more", {})
    rows, oneshot = [], []
    start = results.get("dense_rerun", dense)  # the dense model the one-shot rows were pruned from
    for name, r in results.items():
        if name.startswith("os_"):
            oneshot.append(
                {
                    "run": name,
                    "target": r["target"],
                    "sparsity": r.get("sparsity"),
                    "accuracy_plain": r.get("accuracy_plain"),
                    "accuracy": r["accuracy"],
                    "drop_vs_dense_points": 100 * (start.get("accuracy", 0) - r["accuracy"]),
                    "prune_time_s": r.get("prune_time_s"),
                    "reconstruct_time_s": r.get("reconstruct_time_s"),
                }
            )
        if not name.startswith(("flop_", "tp_")):
            continue
        lat = r.get("latency", {})
        b1 = lat.get("1", {})
        b32 = lat.get("32", {})
        speed1 = b1.get("speedup", b1.get("dense", 0) / b1["pruned"] if "pruned" in b1 else None)
        speed32 = b32.get("speedup", b32.get("dense", 0) / b32["pruned"] if "pruned" in b32 else None)
        rows.append(
            {
                "run": name,
                "target": r.get("target"),
                "levels": r.get("levels"),
                "sparsity": r.get("sparsity"),
                "accuracy": r.get("accuracy"),
                "drop_vs_dense_points": 100 * (dense.get("accuracy", 0) - r["accuracy"]),
                "speedup_b1": speed1,
                "speedup_b32": speed32,
                "flops_ratio": r.get("flops_ratio"),
                "wall_time_s": r.get("wall_time_s"),
                "wall_vs_dense_same_epochs": (r["wall_time_s"] / dense_more["wall_time_s"])
                if r.get("wall_time_s") and dense_more.get("wall_time_s")
                else None,
                "peak_rss_mb": r.get("peak_rss_mb"),
                "peak_rss_vs_dense": r["peak_rss_mb"] / dense_more["peak_rss_mb"]
                if dense_more.get("peak_rss_mb")
                else None,
            }
        )
    _summarize_equal_budget(results, start, mode)
    summary = {
        "mode": mode,
        "settings": SETTINGS[mode],
        "machine": {"cpus": os.cpu_count()},
        "dense": dense,
        "dense_more": dense_more,
        "dense_oneshot_start": start,
        "rows": rows,
        "oneshot_rows": oneshot,
    }
    from phase_runner import write_summary

    write_summary(root, "bench_minilm", summary, _plot)


def _summarize_equal_budget(results: dict, start: dict, mode: str) -> None:
    """Issue 13's table (bench_minilm_equal_budget.json/.png): per row and target, the seeds, mean and spread."""
    import statistics

    from phase_runner import write_summary

    groups: dict[tuple[str, int], list[dict]] = {}
    for name, r in results.items():
        if name.startswith("eq_"):
            groups.setdefault((r["row"], round(100 * r["target"])), []).append(r)
    rows = []
    shown = ("trainer", "oneshotobs", "oneshotobslr10", "oneshot", "oneshothd", "recipe", "tptaylor", "tptaylorhd", "gradual", "gradualhd")
    order = {row: i for i, row in enumerate((*shown, "twophasehr", "twophase", "old"))}
    for (row, target), runs in sorted(groups.items(), key=lambda item: (item[0][1], order.get(item[0][0], 9))):
        accuracy = [100 * r["accuracy"] for r in runs]
        rows.append(
            {
                "row": row,
                "target": target / 100,
                "seeds": [r["seed"] for r in runs],
                "accuracy": accuracy,
                "mean": statistics.mean(accuracy),
                "spread": statistics.stdev(accuracy) if len(accuracy) > 1 else None,
                "drop_vs_dense_points": 100 * start.get("accuracy", 0) - statistics.mean(accuracy),
                "sparsity": [r["sparsity"] for r in runs],
                "accuracy_before_recovery": [
                    100 * r["accuracy_before_recovery"] for r in runs if "accuracy_before_recovery" in r
                ],
                "wall_time_s": statistics.mean(r["wall_time_s"] for r in runs),
                "peak_rss_mb": max(r.get("peak_rss_mb", 0) for r in runs),
            }
        )
    summary = {
        "mode": mode,
        "settings": SETTINGS[mode],
        "dense_start": start,
        "pruning_phase": PRUNING_PHASE,
        "note": "spread: standard deviation over seeds (training seed and calibration draw); drop against the "
        "dense start every row was pruned from",
        "rows": rows,
    }
    write_summary(HERE / "results", "bench_minilm_equal_budget", summary, _plot_equal_budget)


def _plot_equal_budget(summary: dict, path: Path) -> None:
    """Horizontal bars (one per row, mean over seeds, dots: the seeds), one panel per target; colour by family."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def family(row: str) -> tuple[str, str]:
        if row.startswith("oneshottptaylor"):
            return "C2", "Torch-Pruning's structure in hf_flop (compacted, refit or not)"
        if "tptaylor" in row:
            return "C1", "Torch-Pruning Taylor"
        if row.startswith(("oneshotobs", "trainer")):
            return "C3", "hf_flop one-shot, score obs (the default) + refit, then recovery"
        if row.startswith(("oneshot", "recipe", "gradual")):
            return "C0", "hf_flop one-shot, other scores (+ refit), then recovery"
        return "C7", "hf_flop learned gates (one or two phases)"

    targets = sorted({r["target"] for r in summary["rows"]})
    height = max(len([r for r in summary["rows"] if r["target"] == t]) for t in targets)
    fig, axes = plt.subplots(1, len(targets), figsize=(6.5 * len(targets), 1.2 + 0.32 * height), squeeze=False)
    dense = 100 * summary["dense_start"].get("accuracy", 0)
    for ax, target in zip(axes[0], targets):
        rows = sorted((r for r in summary["rows"] if r["target"] == target), key=lambda r: r["mean"])
        ys = range(len(rows))
        ax.barh(ys, [r["mean"] for r in rows], color=[family(r["row"])[0] for r in rows], alpha=0.8)
        for y, r in zip(ys, rows):
            ax.plot(r["accuracy"], [y] * len(r["accuracy"]), "k.", ms=5)  # every seed
            ax.annotate(
                f"{r['mean']:.1f} (n={len(r['accuracy'])})",
                (max(r["accuracy"]), y),
                xytext=(4, 0),
                textcoords="offset points",
                va="center",
                fontsize=7,
            )
        ax.axvline(dense, color="gray", ls="--", lw=1)
        low = min(min(r["accuracy"]) for r in rows)
        ax.set_xlim(max(0, low - 3), dense + 2)
        ax.set_yticks(list(ys), [r["row"] for r in rows], fontsize=8)
        ax.set(xlabel="test accuracy (%)", title=f"{int(100 * target)} % of the encoder linears removed")
        ax.grid(axis="x", alpha=0.3)
    families = ("oneshotobs", "oneshot", "tptaylor", "oneshottptaylor", "old")
    handles = [plt.Rectangle((0, 0), 1, 1, color=family(r)[0], alpha=0.8) for r in families]
    labels = [family(r)[1] for r in families]
    handles.append(plt.Line2D([], [], color="gray", ls="--"))
    labels.append(f"dense start {dense:.1f}")
    fig.legend(handles, labels, loc="lower center", ncol=3, fontsize=7, frameon=False)
    fig.suptitle("MiniLM-L6, equal budget (250 steps, the same distillation per row); bars: mean, dots: seeds")
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    fig.savefig(path, dpi=110)


def _plot(summary: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows, oneshot = summary["rows"], summary.get("oneshot_rows", [])
    fig = plt.figure(figsize=(12, 8.5 if oneshot else 4))
    grid = fig.add_gridspec(2 if oneshot else 1, 2)
    axes = [fig.add_subplot(grid[0, 0]), fig.add_subplot(grid[0, 1])]
    if oneshot:
        axes.append(fig.add_subplot(grid[1, :]))
    for method, marker in (("flop", "o"), ("tp_magnitude", "s"), ("tp_taylor", "^")):
        pts = [r for r in rows if r["run"].startswith(method + "_") and r["run"].count("_") == method.count("_") + 1]
        if pts:
            axes[0].plot([r["sparsity"] for r in pts], [100 * r["accuracy"] for r in pts], marker=marker, label=method)
            axes[1].plot(
                [r["sparsity"] for r in pts], [r["speedup_b32"] or 0 for r in pts], marker=marker, label=method
            )
    for r in rows:  # the levels sweep at 50%: single points, labelled
        if r["run"].startswith("flop_50"):
            axes[0].plot(r["sparsity"], 100 * r["accuracy"], "x", color="C0")
            axes[1].plot(r["sparsity"], r["speedup_b32"] or 0, "x", color="C0")
            axes[0].annotate(r["levels"], (r["sparsity"], 100 * r["accuracy"]), fontsize=7)
            axes[1].annotate(r["levels"], (r["sparsity"], r["speedup_b32"] or 0), fontsize=7)
    if summary["dense"]:
        axes[0].axhline(100 * summary["dense"]["accuracy"], color="gray", ls="--", label="dense")
    axes[0].set(xlabel="removed fraction of encoder linear weights", ylabel="test accuracy (%)", title="accuracy")
    axes[1].set(xlabel="removed fraction of encoder linear weights", ylabel="CPU speed-up, batch 32", title="latency")
    if oneshot:
        ax = axes[2]
        xs = range(len(oneshot))
        ax.bar(
            [x - 0.2 for x in xs],
            [100 * (r["accuracy_plain"] or float("nan")) for r in oneshot],
            width=0.4,
            color="lightgray",
            label="plain removal",
        )
        ax.bar(
            [x + 0.2 for x in xs],
            [100 * r["accuracy"] for r in oneshot],
            width=0.4,
            color="C2",
            label="hf_flop: reconstructed; flap / tptaylor: their result",
        )
        if summary["dense"]:
            start = summary.get("dense_oneshot_start") or summary["dense"]
            ax.axhline(100 * start["accuracy"], color="gray", ls="--", label="dense start of these rows")
        ax.set_xticks(list(xs), [r["run"].removeprefix("os_") for r in oneshot], rotation=60, ha="right", fontsize=8)
        ax.set(ylabel="test accuracy (%)", title="one-shot, no fine-tuning (heads + FFN rows)", ylim=(45, 90))
    for ax in axes:
        ax.grid(alpha=0.3)
    for ax in axes[:2]:
        ax.legend(fontsize=7)
    if oneshot:
        axes[2].legend(fontsize=8, loc="lower left", framealpha=0.9)
    fig.suptitle(f"MiniLM-L6 on Rotten Tomatoes sentences ({summary['mode']})")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
