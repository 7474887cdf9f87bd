"""What bench_gemma3.py measures: Gemma-3-270M on the Penn Treebank, in the SmolLM2 benchmark's protocol.

A new family with real weights (Gemma 3, multi-query attention: 4 query heads share one KV head), so
hf_flop prunes query heads (level ``query_head``) and FFN rows; Torch-Pruning takes the whole budget
from the FFN, as on SmolLM2. The settings, the target (50 % of the non-embedding linear weights), the
rows and their phases are SmolLM2's (smollm2_rows.py, bench_smollm2.py); only the model and hf_flop's
levels differ. ``python benchmarks/bench_gemma3.py --list`` prints the rows.
"""

from __future__ import annotations

from dataclasses import replace

from rows import declare
from smollm2_rows import SETTINGS as SMOLLM2_SETTINGS
from smollm2_rows import SmolLM2Row, _equal_budget_row, _no_training_row

LEVELS = ["query_head", "row"]  # one KV head: level "head" has a single unit per layer
SETTINGS = {mode: {**values, "model": "gemma3", "levels": LEVELS} for mode, values in SMOLLM2_SETTINGS.items()}



def _labelled(row: SmolLM2Row) -> SmolLM2Row:
    """SmolLM2's no-training row, its label saying what hf_flop prunes here (query heads, not KV groups)."""
    return replace(row, label=f"{row.label}, query heads + FFN rows") if row.pruner == "hf_flop" else row


ROWS: dict[str, SmolLM2Row] = declare(
    [
        SmolLM2Row(id="pretrained", label="the pretrained model, no training", kind="pretrained"),
        *(_labelled(_no_training_row(target, method)) for target in (50, 30) for method in ("obs", "tptaylor")),
        _labelled(_no_training_row(50, "obs_uniform")),
        # FFN rows alone: the same units as the Torch-Pruning rows, chosen by obs with the refit
        replace(_no_training_row(50, "obs"), id="os50_obs_rows", label="hf_flop obs, FFN rows only", levels=("row",)),
        # the shared 40-step budget (SmolLM2's budget rows), then the 4x equal-budget rows
        SmolLM2Row(
            id="oneshot_obs",
            label="hf_flop one-shot obs + refit, query heads + rows, then recovery",
            kind="prune_then_recover",
            pruner="hf_flop",
            score="obs",
        ),
        SmolLM2Row(
            id="oneshot_obs_rows",
            label="hf_flop one-shot obs + refit, FFN rows only, then recovery",
            kind="prune_then_recover",
            pruner="hf_flop",
            score="obs",
            levels=("row",),
        ),
        SmolLM2Row(
            id="tp_taylor",
            label="Torch-Pruning Taylor (FFN channels), then recovery",
            kind="prune_then_recover",
            pruner="torch_pruning",
            score="taylor",
        ),
        _equal_budget_row("oneshotobs", 20),
        _equal_budget_row("tptaylor", 20),
    ]
)
