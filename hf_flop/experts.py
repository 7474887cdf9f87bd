"""Mixture-of-experts layers: whole experts (level ``"expert"``) and each expert's FFN rows (level ``"row"``).

A MoE layer (``ArchSpec.experts``, ``hf_flop.architectures.ExpertsSpec``) holds its experts in one
module with 3-D parameters, ``gate_up (E, 2I, H)`` and ``down (E, H, I)``, and a router whose logits
``(tokens, E)`` go through a softmax, then the top ``k`` (optionally renormalised). Injection replaces
the experts module by a ``FlopExperts`` that computes the same thing with gates in it:

* an *expert gate* over the ``E`` experts (level ``"expert"``). A closed expert is removed from the
  routing: a forward hook on the router sets its logit to ``-inf`` and routes again (softmax, top-k,
  renormalisation as the router does), which is exactly what a router without that expert's row
  computes. The gate's value scales the expert's routing weight (folded into its down projection at
  compaction);
* a *row gate per expert* over its ``I`` intermediate neurons (level ``"row"`` on a MoE layer): the
  mask multiplies the neurons before the expert's down projection, so a closed neuron's gate/up rows
  and down column go exactly.

Each expert reads its tokens through a tap (``ExpertTap``, an identity module called on what reaches its
down projection: ``routing weight * act(gate) * up`` of the tokens routed to it). The one-shot scores and the
refit watch the taps with the hooks they put on any consumer, so every statistic of an expert's rows
comes from its routed tokens only, weighted by the routing weight, as its output is; a tap also answers
the verbs of a refit target (its expert's down projection). The expert gate's units are watched through
``flop_routing_tap``: per token, the norm of each expert's weighted output (0 where not routed), so
the ``activation`` score of an expert is the root mean square of what it adds to the layer's output over
all tokens (its routed mass times its output norm); ``obs`` gives experts that score too.

Compaction drops the closed experts' slices and router rows, cuts every kept expert to the layer's widest
kept expert (narrower ones padded with closed, zero rows, which add exactly nothing), and rewrites the
expert counts and widths (``flop_plan`` kind ``"parameters"``; a stock config under uniform shapes).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .architectures import ExpertsSpec
from .counting import compacted_count, expected_kept_count, kept_unit_indices
from .gated import Compacted, Cut, GatedLayer, GatedUnits, ModuleSparsity
from .gates import Gate
from .refit import Fit, fit_columns

EXPERT_LEVEL = "expert"
EXPERT_ROW_LEVEL = "expert_row"  # the GatedUnits level of one expert's row gate


class ExpertTap(nn.Module):
    """Called on what one expert's down projection reads, times the routing weights (the part of the layer's
    output it makes, as the down projection is linear); hooks on it see that expert's routed tokens only.

    It is also a refit target (``hf_flop.reconstruction``): the expert's down projection, as a linear
    ``(hidden, width)`` without a bias that reads this tap's input.
    """

    bias = None

    def __init__(self, experts: FlopExperts, index: int) -> None:
        super().__init__()
        self.__dict__["_experts"] = experts  # not a submodule: the experts own the tap, not the reverse
        self.index = index
        self.refit_stage = True  # the taps of one layer are refit together, each on its own tokens

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x

    @property
    def in_features(self) -> int:
        return self._experts.width

    def folded_weight(self) -> torch.Tensor:
        return self._experts.down_weight()[self.index].detach().clone()

    def reference(self) -> tuple[torch.Tensor, None]:
        return self._experts.down_weight()[self.index].detach(), None

    @torch.no_grad()
    def refit(self, moments: torch.Tensor, scale: torch.Tensor, *, fit_bias: bool, ridge: float) -> Fit:
        # an expert has no bias and gets none (the stock experts module has no place for one)
        return fit_columns(self.reference()[0], None, moments, scale != 0, fit_bias=False, ridge=ridge)

    @torch.no_grad()
    def apply_fit(self, fit: Fit, scale: torch.Tensor) -> None:
        # the expert reads x * scale: dividing the kept columns by their scale makes it compute fit.weight @ x
        divisor = torch.where(scale != 0, scale, torch.ones_like(scale)).to(fit.weight)
        down = self._experts.down_weight()
        down[self.index] = (fit.weight / divisor).to(device=down.device, dtype=down.dtype)


class RouterMask:
    """Forward hook on a router: routes around the closed experts of its ``FlopExperts`` (a callable
    object, so that ``copy.deepcopy`` of the model binds the copy's hook to the copied experts)."""

    def __init__(self, experts: FlopExperts) -> None:
        self.experts = experts

    def __call__(self, module: nn.Module, args: tuple, output: tuple) -> tuple:
        return self.experts.route(output)


class FlopExperts(nn.Module, GatedLayer):
    """Gated replacement of a MoE layer's experts module (see the module docstring).

    ``base_layer`` is the original experts module (its parameters are the experts' weights, trained as
    the base weights are); ``flop_expert_gate`` and ``flop_row_gates[e]`` are the gates, ``None`` for a
    level not asked for.
    """

    def __init__(
        self,
        base_layer: nn.Module,
        router: nn.Module,
        router_name: str,
        layout: ExpertsSpec,
        *,
        top_k: int,
        renormalise: bool,
        gate_factory: Callable[[int], Gate],
        experts: bool,
        rows: bool,
    ) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.layout = layout
        self.top_k, self.renormalise = top_k, renormalise
        self.n_experts, width_2, self.hidden = getattr(base_layer, layout.gate_up).shape
        self.width = width_2 // 2
        self.__dict__["router"] = router  # not a submodule: it stays where the model has it
        self.router_name = router_name
        self.flop_expert_gate = gate_factory(self.n_experts) if experts else None
        self.flop_row_gates = nn.ModuleList(gate_factory(self.width) for _ in range(self.n_experts)) if rows else None
        self.flop_taps = nn.ModuleList(ExpertTap(self, e) for e in range(self.n_experts))
        self.flop_routing_tap = ExpertTap(self, -1)
        self._routed: torch.Tensor | None = None  # the expert-gate values the router used in this forward
        self._router_hook = router.register_forward_hook(RouterMask(self))

    # --- the computation ----------------------------------------------------------------------------
    def gate_up_weight(self) -> torch.Tensor:
        return getattr(self.base_layer, self.layout.gate_up)

    def down_weight(self) -> torch.Tensor:
        return getattr(self.base_layer, self.layout.down)

    def route(self, output: tuple) -> tuple:
        """The router's output with the closed experts taken out of the routing (their logits ``-inf``)."""
        values = self.flop_expert_gate() if self.flop_expert_gate is not None else None
        self._routed = values  # one sample per forward: the experts scale by the same values
        closed = values == 0 if values is not None else None
        # all closed (a training sample can do that): no routing is left, and the zero values silence the layer
        if closed is None or not bool(closed.any()) or bool(closed.all()):
            return output
        logits = output[0]
        masked = logits.masked_fill(closed.to(logits.device), float("-inf"))
        probs = F.softmax(masked.float(), dim=-1)
        top, index = torch.topk(probs, self.top_k, dim=-1)
        if self.renormalise:
            top = top / top.sum(dim=-1, keepdim=True)
        if self.layout.weights_in_logits_dtype:
            top = top.to(logits.dtype)
        return (masked, top, index, *output[3:])

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor):
        values = self._routed
        self._routed = None
        if values is None and self.flop_expert_gate is not None:  # called without its router
            values = self.flop_expert_gate()
        if values is not None:  # the expert gate scales each expert's routing weight
            top_k_weights = top_k_weights * values.to(top_k_weights)[top_k_index]
        rows = [gate() for gate in self.flop_row_gates] if self.flop_row_gates is not None else None
        gate_up, down, act = self.gate_up_weight(), self.down_weight(), self.base_layer.act_fn
        out = torch.zeros_like(hidden_states)
        watched = bool(self.flop_routing_tap._forward_pre_hooks)
        norms = (
            hidden_states.new_zeros(hidden_states.shape[0], self.n_experts, dtype=torch.float32) if watched else None
        )
        with torch.no_grad():
            hit = [e for e in torch.unique(top_k_index).tolist() if e < self.n_experts]
        for e in hit:
            token, position = torch.where(top_k_index == e)
            gate, up = F.linear(hidden_states[token], gate_up[e]).chunk(2, dim=-1)
            x, weight = act(gate) * up, top_k_weights[token, position, None]
            tap = self.flop_taps[e]
            if tap._forward_pre_hooks:  # observed (scores, refit): what reaches the output, weight times neurons
                tap(x * weight)
            if rows is not None:
                x = x * rows[e].to(x.dtype)
            y = F.linear(x, down[e]) * weight  # the stock order: the weight after the down projection
            if watched:
                norms[token, e] = y.detach().float().norm(dim=-1)
            out.index_add_(0, token, y.to(out.dtype))
        if watched:
            self.flop_routing_tap(norms)
        return out

    # --- the masks ----------------------------------------------------------------------------------
    def expert_values(self) -> torch.Tensor:
        """Each expert's eval-mask value (1 without an expert gate)."""
        if self.flop_expert_gate is None:
            return torch.ones(self.n_experts)
        return self.flop_expert_gate.deterministic_mask().detach().float().cpu()

    def row_values(self, e: int) -> torch.Tensor:
        """Expert ``e``'s row eval-mask values (1 without row gates)."""
        if self.flop_row_gates is None:
            return torch.ones(self.width)
        return self.flop_row_gates[e].deterministic_mask().detach().float().cpu()

    def kept_experts(self) -> torch.Tensor:
        return (self.expert_values() != 0).nonzero().squeeze(1)

    def kept_width(self, round_to: int) -> int:
        """The width every kept expert compacts to: the widest kept expert's (the 3-D weights share one)."""
        widths = [
            compacted_count(int((self.row_values(e) != 0).sum()), self.width, round_to) for e in range(self.n_experts)
        ]
        kept = self.kept_experts().tolist()
        return max((widths[e] for e in kept), default=0)

    # --- the verbs of a gated module ----------------------------------------------------------------
    def gates(self) -> dict[str, Gate]:
        found = {EXPERT_LEVEL: self.flop_expert_gate} if self.flop_expert_gate is not None else {}
        for e, gate in enumerate(self.flop_row_gates or ()):
            found[f"row_{e}"] = gate
        return found

    def expert_params(self, width) -> int:
        """Parameters one expert of ``width`` rows owns: its gate/up rows, down columns and router row."""
        return (3 * width + 1) * self.hidden

    def count(self, kept_in, kept_out, *, deterministic: bool, round_to: int) -> dict[str, ModuleSparsity]:
        full = (3 * self.width + 1, self.hidden)
        entries = {}
        if deterministic:
            alive, width = self.expert_values() != 0, self.kept_width(round_to)
            for e in range(self.n_experts):
                rows = 3 * width + 1 if alive[e] else 0
                entries[f".expert_{e}"] = ModuleSparsity(
                    full, (rows, self.hidden), None, None, rows * self.hidden, False
                )
            return entries
        if self.flop_expert_gate is not None:
            alive = self.flop_expert_gate.keep_probability()
        else:
            alive = torch.ones(self.n_experts, device=self.gate_up_weight().device)
        for e in range(self.n_experts):
            if self.flop_row_gates is not None:
                width = expected_kept_count(self.flop_row_gates[e].l0(False))
            else:
                width = torch.tensor(float(self.width))
            kept = alive[e] * self.expert_params(width)
            entries[f".expert_{e}"] = ModuleSparsity(full, full, None, None, kept, False)
        return entries

    @torch.no_grad()
    def compact(self, cut: Cut) -> Compacted:
        kept = self.kept_experts()
        if len(kept) < self.top_k:
            raise ValueError(
                f"{cut.path_of(self)}: the eval masks keep {len(kept)} experts, fewer than the {self.top_k} the router "
                "picks per token (num_experts_per_tok), which no compacted router can route. Keep at least that many "
                "(hf_flop.oneshot.fix_masks_at_target and prune_oneshot do), then compact."
            )
        width, values = self.kept_width(cut.round_to), self.expert_values()
        gate_up, down = self.gate_up_weight().detach(), self.down_weight().detach()
        new_gate_up, new_down = [], []
        for e in kept.tolist():
            mask = self.row_values(e)
            rows = kept_unit_indices(mask, width)  # its open rows, then closed ones (zero) as padding
            index = rows.to(gate_up.device)
            new_gate_up.append(torch.cat([gate_up[e, index], gate_up[e, self.width + index]]))
            scale = (mask[rows] * values[e]).to(down)  # the row masks and the expert's gate value, folded
            new_down.append(down[e][:, index] * scale)
        router = self.router
        weight_name = self.layout.router_weight
        router_weight = getattr(router, weight_name).detach()[kept.to(gate_up.device)]
        counts = {"experts": len(kept), "width": width}
        path, router_path = cut.path_of(self), cut.path_of(router)
        return Compacted(
            spec={
                "kind": "parameters",
                "shapes": {
                    self.layout.gate_up: [len(kept), 2 * width, self.hidden],
                    self.layout.down: [len(kept), self.hidden, width],
                },
            },
            tensors={self.layout.gate_up: torch.stack(new_gate_up), self.layout.down: torch.stack(new_down)},
            config={self.layout.count_attr: len(kept), self.layout.width_attr: width},
            modules={router_path: {"kind": "parameters", "shapes": {weight_name: [len(kept), self.hidden]}}},
            state={f"{self.router_name}.{weight_name}": router_weight},
            attributes={
                path: {attr: counts[what] for attr, what in self.layout.experts_attrs.items()},
                router_path: {attr: counts[what] for attr, what in self.layout.router_attrs.items()},
            },
        )

    def unit_slices(self, round_to: int) -> dict[str, tuple[float, float]]:
        # an expert, or one row of one; under uniform shapes a row slice is round_to rows of every expert
        expert = float(self.expert_params(self.width))
        row = 3.0 * self.hidden
        return {EXPERT_LEVEL: (expert, expert), EXPERT_ROW_LEVEL: (row, row * round_to * self.n_experts)}

    def scored_units(self, name: str) -> list[GatedUnits]:
        gate_up, down = self.gate_up_weight().detach().float(), self.down_weight().detach().float()
        found = []
        if self.flop_expert_gate is not None:
            found.append(
                GatedUnits(
                    key=f"{name}.{EXPERT_LEVEL}",
                    level=EXPERT_LEVEL,
                    gate=self.flop_expert_gate,
                    n_units=self.n_experts,
                    unit=1,
                    unit_params=self.expert_params(self.width),
                    observed=self.flop_routing_tap,  # per token: each expert's weighted output norm
                    column_sq_norms=torch.ones(self.n_experts, device=down.device),
                    row_sq_norms=down.pow(2).sum((1, 2)) * gate_up.pow(2).sum((1, 2)),
                    module=name,
                    min_kept=self.top_k,
                )
            )
        for e, gate in enumerate(self.flop_row_gates or ()):
            rows = gate_up[e, : self.width].pow(2).sum(1) + gate_up[e, self.width :].pow(2).sum(1)
            found.append(
                GatedUnits(
                    key=f"{name}.row_{e}",
                    level=EXPERT_ROW_LEVEL,
                    gate=gate,
                    n_units=self.width,
                    unit=1,
                    unit_params=3 * self.hidden,
                    observed=self.flop_taps[e],
                    column_sq_norms=down[e].pow(2).sum(0),
                    row_sq_norms=rows,
                    module=name,
                    routed=True,
                )
            )
        return found

    def refit_targets(self, name: str) -> dict[str, tuple[ExpertTap, torch.Tensor]]:
        """The kept experts that lost rows, as refit targets: ``{tap name: (tap, row-mask values)}``."""
        found = {}
        for e in self.kept_experts().tolist():
            values = self.row_values(e)
            if bool((values == 0).any()):
                found[f"{name}.flop_taps.{e}"] = (self.flop_taps[e], values)
        return found

    def merge_refusal(self) -> str | None:
        closed = (self.expert_values() == 0).nonzero().squeeze(1).tolist()
        if not closed:
            return None
        return (
            f"merge_and_unload cannot remove experts {closed} of {self.router_name}: a closed expert changes the "
            "routing of every token, which no weight of the same shape expresses. Use hf_flop.compact(model), which "
            "drops the experts and their router rows."
        )

    @torch.no_grad()
    def unload(self, model: nn.Module, merge: bool) -> None:
        """Put the stock experts module back (with ``merge``: the row masks and gate values folded into
        the down projections; a closed expert cannot be folded into weights, since it changes the routing)."""
        if merge:
            if self.merge_refusal():
                raise ValueError(self.merge_refusal())
            values, down = self.expert_values(), self.down_weight()
            for e in range(self.n_experts):
                down[e] *= (self.row_values(e) * values[e]).to(down)[None, :]
        self._router_hook.remove()
        for module in model.modules():
            for child_name, child in module.named_children():
                if child is self:
                    setattr(module, child_name, self.base_layer)
