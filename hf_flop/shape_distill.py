"""A few steps of logit distillation from the dense model, to score a shape candidate after a short recovery.

Minitron ranks its candidate shapes after a short distillation rather than right after pruning, since the
loss of a freshly pruned model can order candidates differently from how they recover. This is that short
run at its smallest: AdamW on every weight but the gates (the masks stay as set), the KL divergence between
the candidate's and the dense model's next-token distributions over the real tokens, batches in order.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .calibration import eval_mode, iter_calibration, model_device
from .lookup import find_flop_model


def distill(student: nn.Module, teacher: nn.Module, batches: list[dict], steps: int, lr: float, seed: int) -> None:
    """Train ``student`` (a FLOP model with its masks set) ``steps`` steps towards ``teacher``'s logits on ``batches``.

    Both run in eval mode (no dropout; the gates compute their eval masks, so the masks do not move), the
    batches in order, cycling. The global random state is left as it was (``seed`` seeds a forked one).
    """
    gates = {id(p) for p in find_flop_model(student).gate_parameters()}
    params = [p for p in student.parameters() if id(p) not in gates and p.is_floating_point()]
    was = [p.requires_grad for p in params]
    for p in params:
        p.requires_grad_(True)
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    data = list(iter_calibration(batches, device=model_device(student)))
    try:
        with torch.random.fork_rng(devices=[]), eval_mode(student), eval_mode(teacher):
            torch.manual_seed(seed)
            for step in range(steps):
                batch = {k: v for k, v in data[step % len(data)].items() if k != "labels"}
                with torch.no_grad():
                    target = teacher(**batch).logits.float()
                logits = student(**batch).logits.float()
                loss = _token_kl(logits, target, batch.get("attention_mask"))
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
    finally:
        for p, requires in zip(params, was):
            p.requires_grad_(requires)
            p.grad = None


def _token_kl(logits: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """KL(teacher || student) per token, the mean over the real tokens (``mask``: 1 = a real token)."""
    per_token = F.kl_div(F.log_softmax(logits, -1), F.log_softmax(target, -1), log_target=True, reduction="none").sum(
        -1
    )
    if mask is None or mask.dim() != per_token.dim():
        return per_token.mean()
    mask = mask.to(per_token.dtype)
    return (per_token * mask).sum() / mask.sum().clamp_min(1.0)
