"""RMS norms over a whole attention projection (OLMo-2's ``q_norm``/``k_norm``), pruned with the heads.

Such a norm divides every feature of the projection by one root mean square taken over all heads,
so the heads mix through the statistic: a closed head's Q/K rows would still scale the open heads'
queries and keys, and cutting them would change the result. hf_flop therefore gives the gated model
the function the compacted one computes: the statistic covers the heads compaction keeps (the
head gate's eval mask, ``hf_flop.counting.kept_unit_indices``), in training and in eval, and the
compacted norm keeps the weights of those heads (``ArchSpec.projection_norms``). A freshly injected
model keeps every head, so it computes what the original model did.

``KeptHeadsStatistic`` does it without knowing the norm's code (its epsilon, its ``1 + weight``):
it runs the norm on an input whose removed features are replaced by the kept features' root mean
square, which leaves the mean of squares that of the kept features, and rescales the removed
features' outputs back to their own values. That holds for any norm ``y_i = f_i(x_i / r(x))``
with ``f_i`` linear and ``r`` a function of the mean of squares: RMS norms, not LayerNorm.
"""

from __future__ import annotations

import torch
from torch import nn

from .counting import kept_unit_indices
from .gates import Gate
from .groups import StructureGroup


class KeptHeadsStatistic:
    """Forward hook on a projection norm: its mean of squares over the kept heads' features only.

    A callable object (not a closure), so ``copy.deepcopy`` of the model carries a hook bound to the
    copied gate, as ``hf_flop.groups.InputMask`` does.
    """

    def __init__(self, gate: Gate, group: StructureGroup, unit: int, round_to: int) -> None:
        self.gate = gate
        self.group = group  # the head group whose kept units are compaction's (StructureCuts)
        self.unit = unit  # features of one unit in this norm (a KV group's query rows, or its key rows)
        self.round_to = round_to

    def kept_features(self) -> torch.Tensor:
        """Bool per feature of the norm: the features of the units compaction keeps."""
        mask = self.gate.deterministic_mask().detach()
        units = kept_unit_indices(mask, int(self.group.kept_units(self.gate, True, self.round_to)))
        keep = torch.zeros(self.gate.n, dtype=torch.bool, device=mask.device)
        keep[units] = True
        return self.group.feature_mask(keep, self.unit)

    def __call__(self, module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        keep = self.kept_features().to(output.device)
        if bool(keep.all()):
            return output
        x = args[0].float()
        rms = x[..., keep].pow(2).mean(-1, keepdim=True).sqrt()
        filled = torch.where(keep, x, rms).to(args[0].dtype)
        y = module.forward(filled, *args[1:])  # forward itself: the hooks do not run again
        back = torch.where(keep, 1.0, x / rms.clamp_min(torch.finfo(torch.float32).tiny))
        return (y.float() * back).to(y.dtype)


def removes_projection_norm_heads(groups: list[StructureGroup], gates, round_to: int) -> bool:
    """Whether compaction removes heads of a group with projection norms (their statistic then skips them)."""
    return any(
        group.norms and int(group.kept_units(gates[group.key], True, round_to)) < group.n_units for group in groups
    )


def cut_projection_norms(norms: dict[str, torch.Tensor], state: dict, relative) -> dict[str, dict]:
    """Cut each projection norm's parameters in ``state`` to its kept features; their ``flop_plan`` entries.

    ``norms`` maps a norm's module name to its kept features (``StructureCuts.norms``), ``relative``
    turns a module name into its plan path.
    """
    plan = {}
    for name, features in norms.items():
        for key in [k for k in state if k.startswith(name + ".")]:
            state[key] = state[key][features.to(state[key].device)].clone()
        plan[relative(name)] = {"kind": "norm", "width": len(features)}
    return plan
