"""Gates: one learnable keep/drop decision per structural unit (rank-1 component, head, FFN row).

Every gate exposes the same verbs, so layers, accounting, one-shot pruning and the trainer never
ask which kind they hold:

* ``from_config(config, n)`` -- build a gate over ``n`` units from a ``FlopConfig``;
* ``forward()``              -- a stochastic sample in training mode, the deterministic mask in eval mode;
* ``deterministic_mask()``   -- the eval-time mask (no randomness);
* ``keep_probability()``     -- per unit, the differentiable probability that the unit survives;
* ``expected_l0()``          -- ``keep_probability().sum()``, the expected number of surviving units;
* ``l0(deterministic)``      -- units kept: the eval mask's non-zeros, or the expected L0;
* ``set_mask(keep)``         -- make the eval mask exactly ``keep`` (one-shot pruning);
* ``keep_strength()``        -- per unit, how firmly the trained gate keeps it (fixing the masks at a target);
* ``warm_start(q, ...)``     -- order the units by importance quantiles ``q`` before training.

A new gate type is one class here plus one entry in ``GATE_TYPES``.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .config import FlopConfig


class Gate(nn.Module):
    """Interface shared by all gates over ``n`` units."""

    n: int

    @classmethod
    def from_config(cls, config: FlopConfig, n: int) -> Gate:
        """A gate over ``n`` units with the settings of ``config``."""
        return cls(n)

    def forward(self) -> torch.Tensor:
        return self.sample() if self.training else self.deterministic_mask()

    def sample(self) -> torch.Tensor:  # pragma: no cover - interface
        raise NotImplementedError

    def deterministic_mask(self) -> torch.Tensor:  # pragma: no cover - interface
        raise NotImplementedError

    def keep_probability(self) -> torch.Tensor:  # pragma: no cover - interface
        raise NotImplementedError

    def expected_l0(self) -> torch.Tensor:
        return self.keep_probability().sum()

    def l0(self, deterministic: bool) -> torch.Tensor:
        """Units kept: the eval mask's non-zeros (``deterministic``), else the differentiable expected L0."""
        return (self.deterministic_mask() != 0).sum() if deterministic else self.expected_l0()

    @torch.no_grad()
    def close(self, units: torch.Tensor) -> None:  # pragma: no cover - interface
        """Force the given units (bool mask or indices) shut, e.g. for one-shot pruning."""
        raise NotImplementedError

    @torch.no_grad()
    def set_mask(self, keep: torch.Tensor) -> None:  # pragma: no cover - interface
        """Make the eval mask exactly ``keep`` (bool per unit): kept units fully open (1), the rest closed."""
        raise NotImplementedError

    def keep_strength(self) -> torch.Tensor:
        """Per unit, how firmly the gate keeps it (higher: more firmly), without gradient.

        Within a gate it orders the units as the eval mask keeps them; across gates of one type it is
        on one scale, so units of the whole model can be ranked by it (``hf_flop.oneshot.fix_masks_at_target``).
        """
        return self.keep_probability().detach()

    def warm_start_ceiling(self) -> float | None:
        """The value ``warm_start`` gives the most important unit by default; None if the gate has no such scale."""
        return None

    @torch.no_grad()
    def warm_start(self, quantiles: torch.Tensor, *, low: float, high: float, dense_start: bool) -> None:
        """Set the gate so units with higher importance quantile (in [0, 1]) start more open."""
        raise NotImplementedError  # pragma: no cover - interface


class HardConcreteGate(Gate):
    """Hard-concrete gate of Louizos et al. (2018), as used by FLOP.

    Training sample: ``u ~ U(0,1)``, ``s = sigmoid((log u - log(1-u) + log_alpha) / beta)``,
    stretched to ``(limit_l, limit_r)`` and clamped to ``[0, 1]``.

    Eval mask (FLOP's rule): ``sigmoid(0.8 * log_alpha / beta)``, stretched and clamped like the
    training sample, then the ``round(n - expected_l0)`` smallest entries are set to zero. The
    stretch-and-clamp is our choice: it makes a confidently open gate exactly 1, so a freshly
    injected model (``log_alpha`` at ``init_log_alpha``) computes exactly what the dense model did.
    """

    def __init__(
        self,
        n: int,
        *,
        init_log_alpha: float | None = None,
        init_std: float = 0.01,
        beta: float = 1.0,
        limit_l: float = -0.1,
        limit_r: float = 1.1,
        eps: float = 1e-6,
    ) -> None:
        super().__init__()
        if n < 1:
            raise ValueError(f"a gate needs at least one unit, got n={n}")
        self.n = n
        self.beta = beta
        self.limit_l = limit_l
        self.limit_r = limit_r
        self.eps = eps
        if init_log_alpha is None:
            init_log_alpha = open_log_alpha(n, beta, limit_l, limit_r)
        self.log_alpha = nn.Parameter(torch.empty(n))
        with torch.no_grad():
            self.log_alpha.normal_(init_log_alpha, init_std)

    @classmethod
    def from_config(cls, config: FlopConfig, n: int) -> HardConcreteGate:
        return cls(
            n, init_log_alpha=config.init_log_alpha, beta=config.temperature, limit_l=config.limit_l, limit_r=config.limit_r
        )

    def extra_repr(self) -> str:
        return f"n={self.n}, beta={self.beta}, limits=({self.limit_l}, {self.limit_r})"

    def _stretch_and_clamp(self, s: torch.Tensor) -> torch.Tensor:
        return (s * (self.limit_r - self.limit_l) + self.limit_l).clamp(0.0, 1.0)

    def sample(self) -> torch.Tensor:
        u = torch.rand_like(self.log_alpha).clamp(self.eps, 1.0 - self.eps)
        s = torch.sigmoid((torch.log(u) - torch.log1p(-u) + self.log_alpha) / self.beta)
        return self._stretch_and_clamp(s)

    def keep_probability(self) -> torch.Tensor:
        # P(z != 0) = sigmoid(log_alpha - beta * log(-l / r))
        return torch.sigmoid(self.log_alpha - self.beta * math.log(-self.limit_l / self.limit_r))

    def deterministic_mask(self) -> torch.Tensor:
        # Stretching lifts confidently open gates to exactly 1 (the dense start); below 0.5 the plain
        # sigmoid is kept, never clamped to 0, so only the expected-zeros rule zeroes units and the
        # eval mask keeps round(expected L0) of them, as the constraint assumes.
        s = torch.sigmoid(0.8 * self.log_alpha / self.beta)
        soft = torch.where(s >= 0.5, self._stretch_and_clamp(s), s)
        expected_zeros = int(round(self.n - self.keep_probability().sum().item()))
        if expected_zeros > 0:
            soft = soft.clone()
            soft[torch.topk(soft, expected_zeros, largest=False).indices] = 0.0
        return soft

    def keep_strength(self) -> torch.Tensor:
        # log_alpha itself: the eval mask is monotone in it and every gate shares beta and the stretch,
        # and unlike P(z != 0) it does not saturate to a float tie among confidently open units
        return self.log_alpha.detach().clone()

    @torch.no_grad()
    def close(self, units: torch.Tensor) -> None:
        # far enough below zero that both the sample and the eval mask are 0 and P(z != 0) ~ 0
        self.log_alpha[units] = -20.0

    def open_value(self) -> float:
        """The dense-start ``log_alpha`` of this gate (see ``open_log_alpha``)."""
        return open_log_alpha(self.n, self.beta, self.limit_l, self.limit_r)

    @torch.no_grad()
    def set_mask(self, keep: torch.Tensor) -> None:
        self.log_alpha.fill_(self.open_value())
        self.close(~keep.to(torch.bool))

    def warm_start_ceiling(self) -> float:
        return self.open_value()

    @torch.no_grad()
    def warm_start(self, quantiles: torch.Tensor, *, low: float, high: float, dense_start: bool) -> None:
        """``log_alpha = low + (high - low) * q``: under size pressure the small ones close first.

        ``P(z != 0)`` moves fastest at small ``log_alpha``. With ``dense_start`` the whole gate is then
        lifted (order kept) just enough that its eval mask is all ones, so training starts from the
        dense model even where the expected-zeros rule would zero some units.
        """
        self.log_alpha.copy_(low + (high - low) * quantiles.to(self.log_alpha.device))
        if dense_start:
            self._lift_until_open()

    def _lift_until_open(self) -> None:
        """Add to ``log_alpha`` the smallest shift (to 0.01) for which the eval mask is all ones."""
        base = self.log_alpha.detach().clone()

        def all_open(shift: float) -> bool:
            self.log_alpha.copy_(base + shift)
            return bool((self.deterministic_mask() == 1).all())

        if all_open(0.0):
            return
        lo, hi = 0.0, self.open_value() - float(base.min())  # at hi every unit is confidently open
        while hi - lo > 0.01:
            mid = (lo + hi) / 2
            lo, hi = (lo, mid) if all_open(mid) else (mid, hi)
        all_open(hi)


def open_log_alpha(n: int, beta: float = 1.0, limit_l: float = -0.1, limit_r: float = 1.1) -> float:
    """The smallest ``log_alpha`` at which a gate of ``n`` units starts as "the dense model".

    Three conditions: the eval value ``sigmoid(0.8 log_alpha / beta)``, stretched, clamps to exactly
    1; the expected-zeros rule zeroes nothing (``n (1 - p) < 0.25``); and each unit's expected
    sparsity ``1 - p`` is below 1e-4, so a freshly injected model reports ~0 expected sparsity.
    Starting no higher than needed keeps the way to closing short (gates move ~lr per step).
    """
    saturate = beta / 0.8 * math.log((1 - limit_l) / (limit_r - 1))  # stretched sigmoid reaches 1
    miss = min(1e-4, 0.25 / n)
    keep = math.log((1 - miss) / miss) + beta * math.log(-limit_l / limit_r)
    return max(saturate, keep) + 0.1


class TopKGate(Gate):
    """MLPruning's learnable Top-k threshold: per-unit ``scores`` and one ``threshold`` parameter.

    The kept fraction is ``sigmoid(threshold)``; the mask keeps the ``k = ceil(n * sigmoid(threshold))``
    highest scores, the same hard mask in training and eval. Straight-through gradients, as in
    MLPruning: each score gets the gradient of its mask entry, and ``threshold`` gets the sum of the
    gradients of the kept entries (so the task loss can ask for more units). The size pressure
    reaches ``threshold`` through ``keep_probability``: its value is exactly ``k / n`` (what the
    mask keeps), its gradient that of ``sigmoid(threshold)``. Pair it with the adaptive
    regularizer of ``hf_flop.constraint``.

    Ties keep the lower-indexed units (a stable sort), so with the equal initial scores the first
    units survive: for rank gates those are the largest singular components.

    ``init_threshold=None`` starts the gate keeping every unit, with ``n (1 - sigmoid(threshold))
    = 1/4`` (``threshold = log(4n - 1)``, about 8.7 for 1,536 units). MLPruning starts at 10, which
    also keeps everything but sits deeper in the sigmoid's flat tail: the thresholds then travel
    further before the size moves at all.
    """

    def __init__(self, n: int, *, init_threshold: float | None = None, init_score: float = 1.0) -> None:
        super().__init__()
        if n < 1:
            raise ValueError(f"a gate needs at least one unit, got n={n}")
        self.n = n
        if init_threshold is None:
            init_threshold = math.log(4 * n - 1)
        self.scores = nn.Parameter(torch.full((n,), float(init_score)))
        self.threshold = nn.Parameter(torch.tensor(float(init_threshold)))

    def extra_repr(self) -> str:
        return f"n={self.n}"

    def kept_count(self) -> int:
        return int(math.ceil(self.n * torch.sigmoid(self.threshold).item() - 1e-6))

    def _hard_mask(self) -> torch.Tensor:
        mask = torch.zeros_like(self.scores)
        k = self.kept_count()
        if k > 0:
            mask[torch.sort(self.scores.detach(), descending=True, stable=True).indices[:k]] = 1.0
        return mask

    def sample(self) -> torch.Tensor:
        hard = self._hard_mask()
        return hard + (self.scores - self.scores.detach()) + hard * (self.threshold - self.threshold.detach())

    def deterministic_mask(self) -> torch.Tensor:
        return self._hard_mask()

    def keep_strength(self) -> torch.Tensor:
        # the scores: the mask keeps the highest; keep_probability is one value for the whole gate
        return self.scores.detach().clone()

    def keep_probability(self) -> torch.Tensor:
        soft = torch.sigmoid(self.threshold)
        return (soft + (self.kept_count() / self.n - soft).detach()).expand(self.n)

    @torch.no_grad()
    def close(self, units: torch.Tensor) -> None:
        mask = torch.zeros(self.n, dtype=torch.bool, device=self.scores.device)
        mask[units] = True
        self.scores[mask] = self.scores.min() - 1.0
        kept = int((~mask).sum().item())
        # aim n * sigmoid(threshold) at kept - 0.5 so float rounding cannot move ceil() off kept
        frac = (kept - 0.5) / self.n
        self.threshold.fill_(math.log(frac / (1 - frac)) if kept > 0 else -30.0)

    @torch.no_grad()
    def set_mask(self, keep: torch.Tensor) -> None:
        self.scores.fill_(1.0)
        self.close(~keep.to(torch.bool))

    @torch.no_grad()
    def warm_start(self, quantiles: torch.Tensor, *, low: float, high: float, dense_start: bool) -> None:
        """The scores become the quantiles: the mask keeps the most important units first (the threshold stays)."""
        self.scores.copy_(quantiles.to(self.scores.device))


GATE_TYPES: dict[str, type[Gate]] = {"hard_concrete": HardConcreteGate, "topk": TopKGate}


def build_gate(config: FlopConfig, n: int) -> Gate:
    """A gate of the config's type (``FlopConfig.gate``) over ``n`` units."""
    return GATE_TYPES[config.gate].from_config(config, n)
