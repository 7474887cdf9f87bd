"""Norms over the residual stream that take their statistic over the hidden channels compaction keeps.

Once level ``"hidden"`` removes residual channels, the compacted model's norms divide by the root
mean square (LayerNorm: centre and divide by the standard deviation) over the channels that remain.
The gated model must compute the same function, so every such norm gets a forward hook
(``KeptChannelsNorm``) that recomputes its output with the statistic over the kept channels:

* eval: the channels compaction keeps (``HiddenChannels.kept_channels``, their count exactly);
* training: the channels of the sampled mask, with the *expected* kept count as the divisor, so the
  size of the statistic follows the gate smoothly (and gives it a gradient).

Removed channels of the output are zeroed (a LayerNorm's bias would write into them otherwise), so
the linears reading the norm see exactly the compacted model's input.

An RMS norm is rescaled from its own output (``y * sqrt(mean_all + eps) / sqrt(sum / count + eps)``),
which keeps whatever its code does around the statistic (the dtype casts, the weight); a LayerNorm is
recomputed from its ``weight`` and ``bias``. ``NormRescaling`` measures, on calibration data with the
channels all present, how much the statistic moves when the removed channels leave it: the norm
compensation of ``hf_flop.hidden.compensate_norms``.
"""

from __future__ import annotations

from typing import Protocol

import torch
from torch import nn


class ChannelState(Protocol):
    """What a norm hook asks the hidden-channel gate (``hf_flop.hidden.HiddenChannels``)."""

    def norm_statistic(self) -> tuple[torch.Tensor, torch.Tensor] | None: ...

    def observe(self, y: torch.Tensor) -> torch.Tensor: ...

    def record_rescaling(self, name: str, ratio: torch.Tensor) -> None: ...

    def measuring_channels(self) -> torch.Tensor | None: ...


def _epsilon(module: nn.Module, attr: str) -> float:
    eps = getattr(module, attr, None)
    if eps is None:
        raise AttributeError(
            f"{type(module).__name__} has no epsilon attribute {attr!r} (ArchSpec.norm_eps_attr); name the one it has."
        )
    return float(eps)


def rms_over(x: torch.Tensor, count: torch.Tensor | float, eps: float) -> torch.Tensor:
    """``sqrt(sum(x^2) / count + eps)`` over the last axis (removed channels of ``x`` are 0)."""
    return (x.float().pow(2).sum(-1, keepdim=True) / count + eps).sqrt()


def kept_layer_norm(
    x: torch.Tensor, keep: torch.Tensor, count, weight: torch.Tensor | None, bias: torch.Tensor | None, eps: float
) -> torch.Tensor:
    """LayerNorm of ``x`` over the channels ``keep`` (``count`` of them), 0 on the others."""
    k = keep.to(torch.float32)
    xf = x.float()
    mean = (xf * k).sum(-1, keepdim=True) / count
    centred = (xf - mean) * k
    var = centred.pow(2).sum(-1, keepdim=True) / count
    y = centred * torch.rsqrt(var + eps)
    if weight is not None:
        y = y * weight.float()
    if bias is not None:
        y = y + bias.float()
    return y * k


class KeptChannelsNorm:
    """Forward hook of one residual norm: its statistic over the kept hidden channels (see the module docstring).

    A callable object (not a closure), so ``copy.deepcopy`` of the model carries a hook bound to the
    copied gate module.
    """

    def __init__(self, channels: ChannelState, name: str, kind: str, eps_attr: str) -> None:
        self.channels = channels
        self.name = name
        self.kind = kind
        self.eps_attr = eps_attr

    def __call__(self, module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        x, eps = args[0], _epsilon(module, self.eps_attr)
        measured = self.channels.measuring_channels()
        if measured is not None:  # compensation: how the statistic moves when the removed channels leave it
            self.channels.record_rescaling(self.name, self._statistic_ratio(x, measured, eps))
        state = self.channels.norm_statistic()
        if state is None:
            return self.channels.observe(output)
        keep, count = state
        keep = keep.to(x.device)
        n = x.shape[-1]
        if self.kind == "rms":
            ratio = rms_over(x, n, eps) / rms_over(x * keep.to(x.dtype), count, eps)
            y = (output.float() * ratio * keep.to(torch.float32)).to(output.dtype)
        else:
            y = kept_layer_norm(x, keep, count, module.weight, getattr(module, "bias", None), eps).to(output.dtype)
        return self.channels.observe(y)

    def _statistic_ratio(self, x: torch.Tensor, keep: torch.Tensor, eps: float) -> torch.Tensor:
        """Per token: the kept channels' statistic over the full one (RMS, or the std for LayerNorm)."""
        xf, k = x.float(), keep.to(x.device, torch.float32)
        count = k.sum()
        if self.kind == "rms":
            return (rms_over(xf * k, count, eps) / rms_over(xf, x.shape[-1], eps)).flatten()
        full = xf.var(-1, unbiased=False, keepdim=True)
        mean = (xf * k).sum(-1, keepdim=True) / count
        kept = ((xf - mean) * k).pow(2).sum(-1, keepdim=True) / count
        return ((kept + eps) / (full + eps)).sqrt().flatten()


class NormRescaling:
    """Running means, per norm, of the ratio of its kept-channel statistic to its full statistic."""

    def __init__(self) -> None:
        self.sums: dict[str, float] = {}
        self.tokens: dict[str, int] = {}

    def add(self, name: str, ratio: torch.Tensor, token_mask: torch.Tensor | None) -> None:
        ratio = ratio.detach().double().cpu()
        if token_mask is not None and token_mask.numel() == ratio.numel():
            ratio = ratio[token_mask.flatten().cpu().bool()]
        self.sums[name] = self.sums.get(name, 0.0) + float(ratio.sum())
        self.tokens[name] = self.tokens.get(name, 0) + ratio.numel()

    def factors(self) -> dict[str, float]:
        """Per norm: the mean ratio over the calibration tokens (1.0 for a norm no token reached)."""
        return {name: self.sums[name] / max(self.tokens[name], 1) for name in self.sums}
