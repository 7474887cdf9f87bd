"""Level ``"hidden"``: one gate over the residual-stream channels, shared by the whole model.

A channel of the residual stream (the model's ``hidden_size`` features) is written by the embeddings
and by every sublayer's output projection (attention ``o``, FFN ``down``), normalised by every
residual norm, and read by the projections after them (q/k/v, gate/up) and by the task head. A
removed channel takes all of it: the embeddings' columns, every residual norm's weight (and bias),
the readers' input columns, the writers' output rows (and bias), the head's input columns.

The gated model computes what the compacted one will (``HiddenChannels``, one module at
``model.flop_hidden``):

* every write into the residual stream (the embeddings' outputs, ``o``'s and ``down``'s outputs) is
  multiplied by the channel gate ``z``, so a closed channel stays 0 all the way; compaction folds
  ``z`` into the embedding columns and the writers' rows (a tied LM head, which reads the final
  norm with the embedding's weight, gets ``1 / z`` folded into the final norm instead);
* every residual norm takes its statistic over the kept channels only (``hf_flop.gated_norms``);
* the readers need nothing: their removed input channels are 0.

One sample of the gate serves a whole forward pass (a pre-hook on the task model draws it in
training). Everything the level needs of an architecture is in its ``ArchSpec`` (``residual_*``,
``final_norm``, ``norm_kind``, ``norm_eps_attr``); compaction, the accounting and the norm
compensation are in ``hf_flop.hidden_cuts``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from .architectures import ARCHITECTURES, ArchSpec, arch_spec, base_model_type, find_layers, layer_layouts
from .counting import compacted_count, expected_kept_count, kept_unit_indices
from .gated import Compacted, Cut, GatedLayer, GatedUnits, ModuleSparsity
from .gated_norms import KeptChannelsNorm, NormRescaling
from .gates import Gate
from .hidden_heads import head_channel_plan
from .linear import dense_weight, linear_shape

HIDDEN_NAME = "flop_hidden"  # where the channel gate module sits in the task model
# levels whose modules compaction cannot cut channels of (block grids, clustered embeddings)
HIDDEN_EXCLUDES = ("block", "embedding")


@dataclass
class HiddenLayout:
    """The residual stream of one model, in absolute module names."""

    n: int  # residual channels (hidden_size)
    embeddings: list[str]
    norms: list[str]  # every residual norm: per layer, the model's, the final one
    final_norm: str | None
    readers: list[str]  # targeted linears reading the stream: q/k/v, gate/up, a targeted head
    writers: list[str]  # targeted linears writing it: o, down
    heads: list[str]  # untargeted untied heads reading it (cut here, not as gated layers)
    tied: str | None  # the head whose weight is the input embedding's, if any
    kind: str
    eps_attr: str
    config: dict = field(default_factory=dict)  # what the compacted config changes: hidden size, head size


def _base_prefix(model: nn.Module) -> str:
    base = getattr(model, "base_model", model)
    return next(name for name, module in model.named_modules() if module is base)


def _weight(module: nn.Module) -> torch.Tensor:
    return module.base_layer.weight if hasattr(module, "base_layer") else module.weight


def hidden_layout(model: nn.Module, spec: ArchSpec, targets: set[str]) -> HiddenLayout:
    """The residual stream's modules in ``model`` (``targets``: the names FLOP replaces), from ``spec``."""
    prefix = _base_prefix(model)

    def at_base(name: str) -> str:
        return f"{prefix}.{name}" if prefix else name

    modules = dict(model.named_modules())
    layers = find_layers(model, spec)
    readers, writers, norms = [], [], []
    for p in layers:
        readers += list(dict.fromkeys(f"{p}.{name}" for name in (spec.q, spec.k, spec.v, *spec.up)))
        writers += [f"{p}.{spec.o}", f"{p}.{spec.down}"]
        norms += [f"{p}.{name}" for name in spec.residual_norms]
    final = at_base(spec.final_norm) if spec.final_norm else None
    norms += [at_base(name) for name in spec.model_norms] + ([final] if final else [])
    embeddings = [at_base(name) for name in spec.residual_embeddings]
    present = [h for h in spec.residual_heads if h in modules]
    embedding = modules.get(embeddings[0]) if embeddings else None
    tied = next((h for h in present if embedding is not None and _weight(modules[h]) is embedding.weight), None)
    readers += [h for h in present if h in targets and h != tied]
    heads = [h for h in present if h not in targets and h != tied]
    config = {spec.hidden_attr: None}
    if spec.head_dim_attr is not None:  # stated: the heads keep their size while the stream narrows
        config[spec.head_dim_attr] = layer_layouts(model, spec)[0].head_dim
    n = getattr(model.config, spec.hidden_attr)
    layout = HiddenLayout(n, embeddings, norms, final, readers, writers, heads, tied, spec.norm_kind, spec.norm_eps_attr)
    layout.config = config
    return layout


def _unit_params(model: nn.Module, layout: HiddenLayout) -> int:
    """Parameters one residual channel owns: a column or row of every module it crosses."""
    modules = dict(model.named_modules())
    params = sum(linear_shape(modules[r])[0] for r in layout.readers)
    params += sum(linear_shape(modules[w])[1] for w in layout.writers)
    params += sum(linear_shape(modules[h])[0] for h in layout.heads)
    params += sum(modules[e].weight.shape[0] for e in layout.embeddings)
    params += sum(len(list(modules[m].parameters(recurse=False))) for m in layout.norms)
    return params


def _dense(module: nn.Module) -> torch.Tensor:
    """The ``(out, in)`` weight a linear (or a gated linear) computes with, as float on the CPU."""
    if hasattr(module, "folded_weight"):
        return module.folded_weight().detach().float().cpu()
    return dense_weight(module).detach().float().cpu()


class HiddenChannels(nn.Module, GatedLayer):
    """The residual-channel gate and what the hooks around the model ask of it (see the module docstring).

    ``shape`` is ``(parameters one step of the kept count owns, channels)``, so ``check_target``'s unit size holds.
    """

    def __init__(self, gate: Gate, layout: HiddenLayout, unit_params: int, root: nn.Module, multiple: int = 1) -> None:
        super().__init__()
        self.gate = gate
        self.multiple = multiple  # kept channels are rounded up to a multiple of this (closed ones pad)
        self.probe = nn.Identity()  # every norm's output passes it: the activation scores observe its input
        self.layout = layout
        self.n = layout.n
        self.unit_params = unit_params
        # check_target's unit: the kept count moves in steps of `multiple` channels
        self.shape = (unit_params * multiple, layout.n)
        self._root = (root,)  # a tuple: not registered as a submodule
        self._sample: torch.Tensor | None = None
        self._measuring: torch.Tensor | None = None  # kept channels while measuring the norm compensation
        self.rescaling = NormRescaling()

    def extra_repr(self) -> str:
        return f"channels={self.n}, norms={len(self.layout.norms)}, kind={self.layout.kind}"

    # --- what the hooks ask --------------------------------------------------------------------------
    def begin_forward(self) -> None:
        """A new forward pass of the task model: the next training value is a new sample."""
        self._sample = None

    def value(self) -> torch.Tensor | None:
        """The gate values the writes are multiplied by (one sample per forward in training); None while
        measuring the compensation (the dense stream)."""
        if self._measuring is not None:
            return None
        if self.training:
            if self._sample is None:
                self._sample = self.gate()
            return self._sample
        return self.gate()  # through forward, so the sensitivity scores' probes see every use

    def kept_channels(self) -> torch.Tensor:
        """Bool per channel: those compaction keeps (every open one; at least one)."""
        mask = self.gate.deterministic_mask().detach()
        units = kept_unit_indices(mask.cpu(), compacted_count(int((mask != 0).sum()), self.n, self.multiple))
        keep = torch.zeros(self.n, dtype=torch.bool)
        keep[units] = True
        return keep.to(mask.device)

    def kept_count(self, deterministic: bool) -> torch.Tensor:
        """Channels kept: compaction's count, or the differentiable expected count."""
        if deterministic:
            return torch.tensor(float(compacted_count(int(self.gate.l0(True)), self.n, self.multiple)))
        return expected_kept_count(self.gate.l0(False))

    def norm_statistic(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """``(channels in the statistic, their count)`` for the residual norms, or None: all of them."""
        if self._measuring is not None:
            return None
        if self.training:
            return self.value() != 0, self.kept_count(False)
        keep = self.kept_channels()
        return None if bool(keep.all()) else (keep, keep.sum().float())

    def observe(self, y: torch.Tensor) -> torch.Tensor:
        return self.probe(y)

    def measuring_channels(self) -> torch.Tensor | None:
        return self._measuring

    def record_rescaling(self, name: str, ratio: torch.Tensor) -> None:
        self.rescaling.add(name, ratio, None)

    # --- the gated-layer verbs (hf_flop.gated) ---------------------------------------------------------
    def gates(self) -> dict[str, Gate]:
        return {"channels": self.gate}

    def count(self, kept_in, kept_out, *, deterministic: bool, round_to: int) -> dict[str, ModuleSparsity]:
        """One entry per module the channels cross that is no gated linear: the embeddings, the norms, an
        untargeted head (a tied head is the embedding's weight, counted there). Linears: ``hidden_cuts``."""
        k = self.kept_count(deterministic)
        entries = {}
        for name, per_channel in self.owned().items():
            params = per_channel * k
            entries[f".{name}"] = ModuleSparsity(
                (per_channel, self.n), (per_channel, int(k)), None, None, params, False
            )
        return entries

    def owned(self) -> dict[str, int]:
        """Module name -> its parameters per channel, for the modules only this gate cuts."""
        modules = dict(self._root[0].named_modules())
        found = {e: modules[e].weight.shape[0] for e in self.layout.embeddings}
        found.update({h: linear_shape(modules[h])[0] for h in self.layout.heads})
        found.update({m: len(list(modules[m].parameters(recurse=False))) for m in self.layout.norms})
        return {name: count for name, count in found.items() if count}

    def compact(self, cut: Cut) -> Compacted:
        """No module of its own: the compacted config's narrower hidden size (``hidden_cuts.cut_stream`` cuts)."""
        config = dict(self.layout.config)
        hidden_attr = next(iter(config))
        config[hidden_attr] = int(self.kept_channels().sum())
        return Compacted(None, {}, config=config)

    @torch.no_grad()
    def scored_units(self, name: str) -> list[GatedUnits]:
        """The channels: activation scores read every residual norm's output (Minitron's importance), with
        unit consumer norms of 1; magnitude reads the squared weights of every row and column a channel owns."""
        modules = dict(self._root[0].named_modules())
        weights = torch.zeros(self.n)
        for r in self.layout.readers + self.layout.heads:
            weights += _dense(modules[r]).pow(2).sum(0)
        for w in self.layout.writers:
            weights += _dense(modules[w]).pow(2).sum(1)
        for e in self.layout.embeddings:
            weights += modules[e].weight.detach().float().pow(2).sum(0).cpu()
        return [
            GatedUnits(
                key=f"{name}.channels",
                level="hidden",
                gate=self.gate,
                n_units=self.n,
                unit=1,
                unit_params=self.unit_params,
                observed=self.probe,
                column_sq_norms=torch.ones(self.n),
                row_sq_norms=weights,
                module=name,
                step=self.multiple,
            )
        ]

    def unload(self, model: nn.Module, merge: bool) -> None:
        """Take the gate module out of the model (``merge_and_unload`` refuses removed channels first)."""
        if getattr(model, HIDDEN_NAME, None) is self:
            delattr(model, HIDDEN_NAME)


class BeginForward:
    """Pre-hook on the task model: one gate sample per forward pass."""

    def __init__(self, channels: HiddenChannels) -> None:
        self.channels = channels

    def __call__(self, module: nn.Module, args: tuple) -> None:
        self.channels.begin_forward()


class ScaleOutput:
    """Forward hook on a write into the residual stream: its output times the channel gate."""

    def __init__(self, channels: HiddenChannels) -> None:
        self.channels = channels

    def __call__(self, module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        z = self.channels.value()
        return output if z is None else output * z.to(output.dtype)


def hidden_channels(model_or_flop: nn.Module) -> HiddenChannels | None:
    """The channel gate module of a FLOP model (or of its task model), or None without level ``"hidden"``."""
    for owner in (model_or_flop, getattr(model_or_flop, "model", None)):  # the task model, or a FlopModel's
        found = getattr(owner, HIDDEN_NAME, None) if isinstance(owner, nn.Module) else None
        if isinstance(found, HiddenChannels):
            return found
    return None


def check_hidden_level(model: nn.Module, config, targets: list[str]) -> None:
    """Clear errors, before anything is replaced, for a model or config level ``"hidden"`` cannot handle."""
    model_type = base_model_type(getattr(model.config, "model_type", None))
    able = sorted(name for name, s in ARCHITECTURES.items() if s.hidden_pruning and s.head_dim_attr and not s.experts)
    spec = arch_spec(model_type)
    if spec.experts is not None:
        raise ValueError(
            f"level 'hidden' does not support mixture-of-experts models yet ({model_type!r}): the experts' 3-D weights "
            f"and the router read the residual stream too, and hf_flop does not cut them. Families it supports: {able}. "
            "Use levels expert/row/head for this model."
        )
    if spec.head_dim_attr is None:
        raise ValueError(
            f"level 'hidden' is not supported for model_type={model_type!r}: its config derives the head size as "
            f"{spec.hidden_attr} / {spec.heads_attr}, so a narrower residual stream would change the head size of "
            f"every attention layer (BERT-family, GPT-2). Families whose config states head_dim: {able}. Use levels "
            "head/row for this model."
        )
    if not spec.hidden_pruning:
        raise ValueError(
            f"level 'hidden' needs the layout of the residual stream, which the ArchSpec of {model_type!r} does not "
            "name (residual_embeddings, residual_norms, final_norm, residual_heads in hf_flop/architectures.py; "
            f"left empty where a norm after a sublayer would undo the channel gate). Families it knows: {able}. "
            "Use the other levels for this model."
        )
    clash = [level for level in config.levels if level in HIDDEN_EXCLUDES]
    if clash:
        raise ValueError(
            f"level 'hidden' cannot be combined with {clash}: those compact to block grids or clustered embeddings "
            "whose channels cannot be cut. Combine 'hidden' with rank, head, query_head and/or row, or prune the "
            "channels in a second step."
        )
    if config.uniform_shapes and "query_head" in config.levels:
        raise ValueError(
            "FlopConfig(uniform_shapes=True) with levels 'hidden' and 'query_head': a stock config needs "
            f"{spec.hidden_attr} to be a multiple of {spec.heads_attr}, and query heads pruned inside their KV groups "
            "can end at any count. Use level 'head' (whole KV groups) with 'hidden', or uniform_shapes=False (the "
            "compacted model then loads with its saved remote code)."
        )
    modules = dict(model.named_modules())
    layout = hidden_layout(model, spec, set(targets))
    missing = [m for m in layout.embeddings + layout.norms if m not in modules]
    if missing:
        raise ValueError(
            f"level 'hidden': the ArchSpec of {model_type!r} names residual modules {missing[:4]} that "
            f"{type(model).__name__} does not have; correct its residual_* fields."
        )
    untargeted = [m for m in layout.readers + layout.writers if m not in targets]
    if untargeted:
        raise ValueError(
            f"level 'hidden' cuts the input columns of every q/k/v/gate/up projection and the output rows of every "
            f"o/down projection, so all of them must be targeted; target_modules / exclude_modules leave out "
            f"{untargeted[:4]}{' ...' if len(untargeted) > 4 else ''}. Target them (target_modules=None does), or "
            "drop the level."
        )
    if layout.tied is not None and layout.tied in targets:
        raise ValueError(
            f"level 'hidden': the head {layout.tied} is tied to the input embedding, so it cannot be a target "
            "as well; remove it from target_modules (the channel gate cuts it with the embedding)."
        )
    eps = [m for m in layout.norms if not hasattr(modules[m], spec.norm_eps_attr)]
    if eps:
        raise ValueError(
            f"level 'hidden': the norm {eps[0]} ({type(modules[eps[0]]).__name__}) has no {spec.norm_eps_attr!r}; "
            "set ArchSpec.norm_eps_attr to its epsilon attribute."
        )


def channel_multiple(model: nn.Module, config) -> int:
    """What the kept channel count is a multiple of: under ``uniform_shapes``, every head count the model can
    end at, since stock configs (Llama's) require ``hidden_size % num_attention_heads == 0`` even when they
    state ``head_dim`` (``hf_flop.hidden_heads``)."""
    if not config.uniform_shapes:
        return 1
    return head_channel_plan(model.config, config.levels).multiple


def inject_hidden(model: nn.Module, config, gate: Gate, targets: set[str]) -> list:
    """Put the channel gate (``model.flop_hidden``) and its hooks into ``model``; returns the hook handles."""
    spec = arch_spec(base_model_type(model.config.model_type))
    layout = hidden_layout(model, spec, targets)
    device = next(model.parameters()).device
    multiple = channel_multiple(model, config)
    channels = HiddenChannels(gate.to(device), layout, _unit_params(model, layout), model, multiple)
    model.add_module(HIDDEN_NAME, channels)
    modules = dict(model.named_modules())
    handles = [model.register_forward_pre_hook(BeginForward(channels))]
    for name in layout.embeddings + layout.writers:
        handles.append(modules[name].register_forward_hook(ScaleOutput(channels)))
    for name in layout.norms:
        handles.append(modules[name].register_forward_hook(KeptChannelsNorm(channels, name, layout.kind, layout.eps_attr)))
    return handles
