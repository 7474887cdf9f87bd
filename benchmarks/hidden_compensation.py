"""Level "hidden" on SmolLM2-135M: PTB perplexity after one-shot channel pruning, with and without the norm compensation.

The channels are scored with the activation score (Minitron's: the RMS of each channel over every residual
norm's output on the calibration tokens) and pruned with ``prune_oneshot(levels=["hidden"])`` without the
refit; the compensation (``hf_flop.hidden_cuts.compensate_norms``) then folds the measured ratio of each norm's
kept-channel RMS to its full RMS into the norm's weight. Run at one thread:
``OMP_NUM_THREADS=1 python benchmarks/hidden_compensation.py [--quick]``.
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import common
import torch

from hf_flop import FlopConfig, compact, prune_oneshot
from hf_flop.hidden_cuts import compensate_norms

SETTINGS = {
    "full": {"block": 128, "batch": 4, "steps": 1, "eval_blocks": 32, "calibration_batches": 1, "sequences": 32},
    "quick": {"block": 64, "batch": 2, "steps": 1, "eval_blocks": 4, "calibration_batches": 1, "sequences": 8},
}
TARGETS = (0.05, 0.1, 0.2)


def perplexity(model, test) -> float:
    from transformers import default_data_collator

    from hf_flop.metrics import evaluate_model

    return evaluate_model(model, test, task="causal-lm", collator=default_data_collator, batch_size=8)["perplexity"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", default="benchmarks/results/hidden_compensation.json")
    args = parser.parse_args()
    settings = SETTINGS["quick" if args.quick else "full"]
    torch.manual_seed(0)
    dense, tokenizer = common.smollm2()
    _, test, _ = common.ptb_blocks(settings, tokenizer)
    calibration = common.ptb_calibration(tokenizer, settings["sequences"], settings["block"])
    rows = {"dense": {"perplexity": perplexity(dense, test), "hidden_size": dense.config.hidden_size}}
    print(rows["dense"], flush=True)
    for target in TARGETS:
        start = time.time()
        config = FlopConfig(levels=["hidden"], target_sparsity=target)
        model = prune_oneshot(copy.deepcopy(dense), config, calibration, "activation", reconstruct=False).eval()
        kept = compact(model).config.hidden_size
        plain = perplexity(model, test)
        factors = compensate_norms(model, calibration)
        compensated = perplexity(model, test)
        small = compact(model)
        rows[f"hidden_{target}"] = {
            "target": target,
            "hidden_size": kept,
            "perplexity_plain": plain,
            "perplexity_compensated": compensated,
            "compacted_perplexity": perplexity(small, test),
            "factor_range": [min(factors.values()), max(factors.values())],
            "seconds": time.time() - start,
        }
        print(rows[f"hidden_{target}"], flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"settings": settings, "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
