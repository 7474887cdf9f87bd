"""One transformer layer of a checkpoint as a model of its own, fed stored boundary hidden states.

Streaming pruning (``hf_flop.streaming``) never builds the whole model. For layer ``i`` it builds the
model's own class from its config with ``num_hidden_layers=1`` (the per-layer config lists such as
``layer_types`` cut to layer ``i``'s entry), a vocabulary of one id per calibration batch and tied
embeddings, so everything but the layer is a few kilobytes. Layer ``i``'s tensors are loaded into
its only layer. Each calibration batch becomes a *proxy* batch: ``input_ids`` filled with the
batch's index, its other entries (``attention_mask``...) as they were. A pre-hook on the layer
replaces, during a forward of the whole one-layer model, the hidden states it receives by that
batch's stored boundary states. So the model's own code computes the masks and position embeddings
exactly as the full model does, and every hf_flop routine that runs calibration batches through a
model (``compute_scores``, ``reconstruct``, ``prune_to_target``, ``compact``) works on it unchanged.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import nn
from transformers import AutoModelForCausalLM, PretrainedConfig, PreTrainedModel
from transformers.initialization import no_init_weights

from .architectures import find_layers
from .calibration import StopForward, eval_mode
from .recognition import spec_for


def one_layer_config(config: PretrainedConfig, index: int, vocab: int) -> PretrainedConfig:
    """``config`` with one transformer layer (layer ``index``'s per-layer entries), ``vocab`` ids, tied embeddings."""
    values = config.to_dict()
    values.update(num_hidden_layers=1, vocab_size=vocab, tie_word_embeddings=True, pad_token_id=None)
    for key, value in config.to_dict().items():
        # per-layer lists (layer_types: sliding or full attention) keep layer index's entry
        if isinstance(value, list) and len(value) == config.num_hidden_layers and key != "architectures":
            values[key] = [value[index]]
    return type(config).from_dict(values)


class ProxyBatches:
    """Calibration batches whose layer input is a stored hidden state: re-iterable, on one device."""

    def __init__(self, batches: list[dict[str, torch.Tensor]], device: torch.device) -> None:
        self.batches = []
        for index, batch in enumerate(batches):
            ids = batch["input_ids"]
            proxy = {k: v.to(device) for k, v in batch.items() if k not in ("input_ids", "labels")}
            proxy["input_ids"] = torch.full(ids.shape, index, dtype=torch.long, device=device)
            self.batches.append(proxy)

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)


class LayerModel:
    """Layer ``index`` of a checkpoint inside a one-layer model (see the module docstring).

    ``states`` (one tensor per batch, set before each use) are the hidden states the layer is fed.
    """

    def __init__(self, config: PretrainedConfig, index: int, n_batches: int, dtype: torch.dtype) -> None:
        with no_init_weights():  # the layer's weights are loaded next; the rest is a tiny vocabulary
            model = AutoModelForCausalLM.from_config(one_layer_config(config, index, max(n_batches, 1)))
        self.model: PreTrainedModel = model.to(dtype).eval()
        self.prefix = find_layers(self.model, spec_for(self.model, None))[0]
        self.layer = self.model.get_submodule(self.prefix)
        self.states: list[torch.Tensor] = []
        self._batch: list[int | None] = [None]  # the proxy batch whose full forward is in flight
        self.model.register_forward_pre_hook(self._enter, with_kwargs=True)
        self.model.register_forward_hook(self._leave, always_call=True)
        self.layer.register_forward_pre_hook(self._substitute, with_kwargs=True, prepend=True)

    def _enter(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        ids = kwargs.get("input_ids", args[0] if args else None)
        self._batch[0] = int(ids.reshape(-1)[0]) if ids is not None else None

    def _leave(self, module: nn.Module, args: tuple, output) -> None:
        self._batch[0] = None

    def _substitute(self, module: nn.Module, args: tuple, kwargs: dict):
        # only inside a forward of the whole model: reconstruct also calls the layer directly, on its own inputs
        if self._batch[0] is None:
            return None
        state = self.states[self._batch[0]]
        arrived = args[0] if args else kwargs["hidden_states"]
        state = state.to(device=arrived.device, dtype=arrived.dtype)
        if args:
            return (state, *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": state}

    def load(self, tensors: dict[str, torch.Tensor]) -> None:
        """Load the layer's tensors (keys relative to the layer); every parameter of the layer must be given."""
        expected = dict(self.layer.state_dict())
        missing = sorted(set(expected) - set(tensors))
        unexpected = sorted(set(tensors) - set(expected))
        if missing or unexpected:
            raise ValueError(
                f"the checkpoint's layer tensors do not match the config: missing {missing[:4]}, unexpected "
                f"{unexpected[:4]}. Is config.json the one this checkpoint was saved with?"
            )
        for key, value in tensors.items():
            if tuple(value.shape) != tuple(expected[key].shape):
                raise ValueError(
                    f"{key} has shape {tuple(value.shape)} in the checkpoint, {tuple(expected[key].shape)} in the config."
                )
        self.layer.load_state_dict(tensors, strict=True)

    @torch.no_grad()
    def outputs(self, model: nn.Module, batches: ProxyBatches) -> list[torch.Tensor]:
        """The layer's output hidden states for each batch, with ``model`` (this model, or its FLOP wrapper)."""
        found: list[torch.Tensor] = []

        def grab(module: nn.Module, args: tuple, output) -> None:
            found.append((output[0] if isinstance(output, tuple) else output).detach())
            raise StopForward  # the final norm and the head are not needed

        handle = self.layer.register_forward_hook(grab)
        try:
            with eval_mode(model):
                for batch in batches:
                    try:
                        model(**batch, use_cache=False)
                    except StopForward:
                        pass
        finally:
            handle.remove()
        return found


@torch.no_grad()
def embedded_states(model: PreTrainedModel, batches: list[dict[str, torch.Tensor]]) -> list[torch.Tensor]:
    """What the first transformer layer of ``model`` receives for each batch (its embedding output, as the
    model's own forward computes it: scaled where the model scales it)."""
    first = model.get_submodule(find_layers(model, spec_for(model, None))[0])
    found: list[torch.Tensor] = []

    def grab(module: nn.Module, args: tuple, kwargs: dict) -> None:
        found.append((args[0] if args else kwargs["hidden_states"]).detach())
        raise StopForward

    handle = first.register_forward_pre_hook(grab, with_kwargs=True)
    device = next(model.parameters()).device
    try:
        with eval_mode(model):
            for batch in batches:
                try:
                    model(**{k: v.to(device) for k, v in batch.items() if k != "labels"}, use_cache=False)
                except StopForward:
                    pass
    finally:
        handle.remove()
    return found
