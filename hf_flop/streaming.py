"""Prune a causal-LM checkpoint that does not fit in memory, one transformer layer at a time.

``prune_checkpoint(source, output_dir, config, calibration_data)`` reads a safetensors checkpoint
folder tensor by tensor (``hf_flop.checkpoint_io``) and never builds the whole model: the calibration
batches' hidden states at the layer boundary are kept (one tensor per batch), and each transformer
layer is built on its own (``hf_flop.stream_layer``), scored, pruned, refit with
``hf_flop.reconstruct``, compacted, written as its own shard and freed before the next is read.

Allocation (``allocation=``):

* ``"global"`` (default): two passes. The first streams the *dense* hidden states through the layers
  and scores every unit, as ``prune_oneshot`` scores the dense model; ``prune_to_target`` then ranks
  all units of the model at once (``ranking``, ``min_units_per_gate``, ``protect_layers`` as there) on
  the model built on the meta device, weights absent. The second pass prunes each layer to those masks
  and refits it on the pruned hidden states. This is ``prune_oneshot`` + ``compact`` computed in
  another order: the same scores, masks, refits and compacted weights, up to float rounding.
* ``"per_layer"``: one pass. Every layer gives up ``target_sparsity`` of its own prunable parameters,
  ranked within the layer (scores still on the dense hidden states, which this pass carries alongside
  the pruned ones). It reads the checkpoint once, but the budget no longer moves between layers.

The config (per-layer shapes with the remote code, or a stock config when the shapes allow one)
comes from ``compact`` on the meta-device model with the final masks, so it is what ``compact`` +
``save_pretrained`` writes; the tensors are the per-layer compactions, checked against it.
"""

from __future__ import annotations

import copy
import gc
import shutil
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM
from transformers.initialization import no_init_weights
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

from .accounting import SparsityReport, sparsity_report
from .architectures import UnsupportedArchitectureError, find_layers
from .calibration import iter_calibration
from .checkpoint_io import INDEX_FILE, CheckpointReader, ShardWriter
from .compact import _relative_paths, build_compacted, compact_with_plan
from .config import FlopConfig
from .files import atomic_folder, check_output_dir
from .hub import CARD_TEMPLATE, render_card
from .lookup import find_flop_model
from .model import get_flop_model
from .oneshot import open_all_gates, prune_to_target
from .ranking import frozen_gates
from .recognition import spec_for
from .reconstruction import reconstruct
from .scores import SCORE_TYPES, compute_scores, find_gated_units, recommended_oneshot_score, score_type
from .stream_layer import LayerModel, ProxyBatches, embedded_states, one_layer_config

STREAM_LEVELS = ("head", "query_head", "row")
ALLOCATIONS = ("global", "per_layer")
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "vocab.txt",
    "merges.txt",
    "tokenizer.model",
    "spiece.model",
    "chat_template.jinja",
    "chat_template.json",
)


def _check_inputs(
    source, output_dir, config, calibration_data, score, allocation, target_sparsity, max_batches, reconstruct_options
):
    """Everything ``prune_checkpoint`` refuses, before any tensor is read: the checked folders, model config,
    reader, calibration batches and target."""
    folder = Path(source)
    if not folder.is_dir():
        raise ValueError(f"source {folder} is not a folder; pass the local folder of a saved checkpoint.")
    if not (folder / "config.json").is_file():
        raise ValueError(f"{folder} has no config.json; pass a folder written by save_pretrained.")
    out = check_output_dir(output_dir, False, name="output_dir", overwrite_hint="remove it")
    if out.exists():
        raise ValueError(f"output_dir {out} exists; choose a new folder (it is written whole at the end).")
    if not isinstance(config, FlopConfig):
        raise TypeError(f"config must be a FlopConfig, got {type(config).__name__}.")
    other = [level for level in config.levels if level not in STREAM_LEVELS]
    if other:
        raise ValueError(
            f"streaming prunes the levels {list(STREAM_LEVELS)} only; {other} need the whole model. Drop them, "
            "or load the model and use prune_oneshot."
        )
    if allocation not in ALLOCATIONS:
        raise ValueError(f"allocation={allocation!r} is not known; use one of {list(ALLOCATIONS)}.")
    if allocation == "per_layer" and config.uniform_shapes:
        raise ValueError(
            "allocation='per_layer' ranks each layer on its own, so layers may keep different counts, which "
            "FlopConfig(uniform_shapes=True) forbids; use allocation='global'."
        )
    if score is not None:
        spec = score_type(score, calibration_data)
        if spec.needs_labels:
            raise ValueError(
                f"score={score!r} needs the loss of the whole model, which streaming never runs; use one of "
                f"{[n for n, t in SCORE_TYPES.items() if not t.needs_labels]}."
            )
    if (reconstruct_options or {}).get("add_bias"):
        raise ValueError("reconstruct_options add_bias=True is not supported by streaming; leave it out.")
    target = config.target_sparsity if target_sparsity is None else target_sparsity
    if not isinstance(target, (int, float)) or not 0.0 <= target < 1.0:
        raise ValueError(f"target_sparsity={target!r} must be in [0, 1), the fraction of prunable parameters removed.")
    model_config = AutoConfig.from_pretrained(folder, local_files_only=True)
    # class names only: MODEL_FOR_CAUSAL_LM_MAPPING's classes would import every model of transformers
    causal = {name for names in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values() for name in _as_tuple(names)}
    names = model_config.architectures or []
    if model_config.model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES or (names and not set(names) & causal):
        raise ValueError(
            f"{folder} holds a {model_config.model_type!r} model ({', '.join(names) or 'no architectures'}), not a "
            "causal LM transformers knows; streaming prunes causal language models (AutoModelForCausalLM)."
        )
    reader = CheckpointReader(folder)
    if calibration_data is None:
        raise ValueError("prune_checkpoint needs calibration_data: a list of batches (dicts with 'input_ids').")
    batches = list(iter_calibration(calibration_data, max_batches=max_batches))
    if len(batches) < 2:
        raise ValueError(f"calibration_data has {len(batches)} batch(es); the refit needs at least 2.")
    return folder, out, model_config, reader, batches, target


def _as_tuple(names) -> tuple:
    return tuple(names) if isinstance(names, (list, tuple)) else (names,)


def _meta_flop_model(model_config, flop_config: FlopConfig):
    """The whole FLOP model on the meta device (no weights), its gates on the CPU: for ranking and the config."""
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(model_config)
    flop = get_flop_model(model, copy.deepcopy(flop_config))
    for gate in find_flop_model(flop).gates().values():  # small, and the ranking reads them: real tensors
        gate.to_empty(device="cpu")
        gate.set_mask(torch.ones(gate.n, dtype=torch.bool))
    return flop


def _full_names(one_layer, full_groups: dict, layer_prefix: str, full_prefix: str) -> dict[str, str]:
    """The one-layer FLOP model's gate names -> the full model's (``head_0`` of the one layer is ``head_<i>``)."""
    names = {}
    for group in find_flop_model(one_layer).structure_groups:
        if group.layer != layer_prefix or (full_prefix, group.level) not in full_groups:
            raise RuntimeError(f"gate {group.key} has no counterpart in layer {full_prefix}; please report this.")
        names[group.key] = full_groups[(full_prefix, group.level)]
    missing = sorted(set(find_flop_model(one_layer).gates()) - set(names))
    if missing:
        raise RuntimeError(f"gates {missing[:3]} are not head/row gates of a layer; please report this.")
    return names


@dataclass
class StreamResult:
    """What ``prune_checkpoint`` wrote and how."""

    path: Path  # the output folder
    keep: dict[str, torch.Tensor]  # gate name (of the whole model) -> bool mask of the kept units
    report: SparsityReport  # sizes of the whole model with these masks
    allocation: str
    tensors_read: int  # tensors read from the checkpoint (each layer's once per pass)
    seconds: float


def _moved(path: str, old: str, new: str) -> str:
    """A plan path under layer ``old`` of the one-layer model, under layer ``new`` of the whole model."""
    if path == old or path.startswith(old + "."):
        return new + path[len(old) :]
    raise RuntimeError(f"plan entry {path} is outside the layer {old}; please report this.")


def prune_checkpoint(
    source,
    output_dir,
    config: FlopConfig,
    calibration_data: Iterable,
    *,
    device: str | torch.device | None = None,
    score: str | None = None,
    target_sparsity: float | None = None,
    allocation: str = "global",
    ranking: str = "per_gate",
    min_units_per_gate: int = 1,
    protect_layers: Sequence[int] = (),
    max_batches: int | None = None,
    reconstruct_options: dict | None = None,
) -> StreamResult:
    """Prune the causal LM saved in ``source`` layer by layer into ``output_dir``, never holding the whole model.

    ``config`` is a ``FlopConfig`` with levels among ``head``, ``query_head``, ``row``; ``score`` defaults
    to ``recommended_oneshot_score(config)`` (scores needing a loss are refused); ``target_sparsity``
    defaults to the config's. ``allocation`` decides each layer's share (see the module docstring);
    ``ranking``, ``min_units_per_gate`` and ``protect_layers`` are ``prune_to_target``'s,
    ``reconstruct_options`` ``reconstruct``'s. Each layer and its batches go to ``device`` for the work
    (default: the CPU). The folder gets sharded safetensors, config.json (with the remote code when the
    shapes are per layer), generation_config.json, the source's tokenizer files and a model card; it is
    written under a temporary name and renamed at the end. Returns a ``StreamResult`` (the folder in
    ``path``, the masks in ``keep``).
    """
    started = time.perf_counter()
    folder, out, model_config, reader, batches, target = _check_inputs(
        source,
        output_dir,
        config,
        calibration_data,
        score,
        allocation,
        target_sparsity,
        max_batches,
        reconstruct_options,
    )
    if protect_layers and allocation == "per_layer":
        raise ValueError("protect_layers applies to allocation='global'; per_layer ranks each layer on its own.")
    score = score or recommended_oneshot_score(config)
    device = torch.device(device) if device is not None else torch.device("cpu")
    dtype = model_config.dtype or torch.float32
    dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    meta = _meta_flop_model(model_config, config)
    task = find_flop_model(meta).model
    try:
        spec_for(task, config.levels, uniform_shapes=config.uniform_shapes)
        full_layers = find_layers(task, spec_for(task, None))
    except UnsupportedArchitectureError as err:
        raise ValueError(f"{folder}: the layout of {type(task).__name__} is not known to hf_flop: {err}") from None
    stream = _Stream(reader, model_config, full_layers, batches, device, dtype, config, score, reconstruct_options)
    stream.full_groups = {(g.layer, g.level): g.key for g in find_flop_model(meta).structure_groups}
    stream.relative = _relative_paths(task)
    frozen_gates(find_flop_model(meta), find_gated_units(meta), protect_layers)  # valid indices, before any work
    keep = None
    if allocation == "global":
        prune_to_target(
            meta,
            stream.dense_scores(),
            target,
            ranking=ranking,
            min_units_per_gate=min_units_per_gate,
            protect_layers=protect_layers,
        )
        keep = {s.key: s.gate.deterministic_mask().detach().cpu() != 0 for s in find_gated_units(meta)}
    rest = [k for k in reader.keys() if not any(k.startswith(p + ".") for p in full_layers)]
    with atomic_folder(out, overwrite=False) as tmp:
        writer = ShardWriter(tmp, len(full_layers) + len(rest))
        kept = stream.prune_layers(writer, keep, target, ranking, min_units_per_gate)
        for s in find_gated_units(meta):
            s.gate.set_mask(kept[s.key])
        for key in rest:  # the embedding, the final norm, the head: as they were, one at a time
            tensor = reader.get(key)
            stream.written[key] = tuple(tensor.shape)
            writer.write({key: tensor})
            del tensor
        writer.finish()
        report = _finish_folder(folder, tmp, meta, stream, out)
    return StreamResult(out, kept, report, allocation, len(reader.reads), time.perf_counter() - started)


def _finish_folder(folder: Path, tmp: Path, meta, stream: _Stream, out: Path) -> SparsityReport:
    """Check the written shapes against ``compact`` of the meta model; write its config (with code), the
    generation config, the source's tokenizer files and the model card."""
    task, written = find_flop_model(meta).model, stream.written
    layers = tuple(p + "." for p in stream.full_layers)
    state = {k: v for k, v in task.state_dict().items() if not k.startswith(layers)}
    state.update({k: torch.empty(shape, device="meta") for k, shape in written.items() if k.startswith(layers)})
    plan = stream.plan
    # the config and shapes compact() gives the whole model, without its weights
    report = sparsity_report(meta)
    compacted = build_compacted(task, find_flop_model(meta).flop_config.uniform_shapes, plan, {}, state, on_meta=True)
    expected = {k: tuple(v.shape) for k, v in compacted.state_dict().items()}
    wrong = {k: (v, expected.get(k)) for k, v in written.items() if expected.get(k) != v}
    lacking = sorted(set(expected) - set(written) - _tied(compacted))
    if wrong or lacking:
        raise RuntimeError(
            f"streamed tensors differ from the compacted shapes: {list(wrong.items())[:3]}, missing {lacking[:3]}; "
            "please report this."
        )
    _save_config(compacted, tmp)
    if (folder / "generation_config.json").is_file():
        shutil.copyfile(folder / "generation_config.json", tmp / "generation_config.json")
    copied = [name for name in TOKENIZER_FILES if (folder / name).is_file()]
    for name in copied:
        shutil.copyfile(folder / name, tmp / name)
    card = render_card(
        find_flop_model(meta),
        compacted,
        plan,
        report,
        template=CARD_TEMPLATE,
        model_id=out.name,
        load_from=str(out.absolute()),
        with_tokenizer=bool(copied),
    )
    card.save(tmp / "README.md")
    return report


def _tied(model) -> set[str]:
    """Keys save_pretrained leaves out because they are tied to another (the head to the embedding)."""
    if not model.config.tie_word_embeddings:
        return set()
    tied = getattr(model, "all_tied_weights_keys", None) or getattr(model, "_tied_weights_keys", None) or {}
    return set(tied)


def _save_config(compacted, folder: Path) -> None:
    """config.json and generation_config.json (with the remote code files and ``auto_map`` for per-layer
    shapes) as ``compacted.save_pretrained`` writes them; its (empty) weights file is dropped, the shards stay."""
    side = folder / ".config"
    compacted.save_pretrained(side, state_dict={})
    for path in side.iterdir():
        if not (path.name.endswith(".safetensors") or path.name == INDEX_FILE):  # the code files stay (modeling_flop.py)
            shutil.move(str(path), folder / path.name)
    shutil.rmtree(side)


class _Stream:
    """The layer-by-layer passes over one checkpoint."""

    def __init__(self, reader, model_config, full_layers, batches, device, dtype, config, score, options) -> None:
        self.reader, self.model_config, self.full_layers = reader, model_config, full_layers
        self.batches, self.device, self.dtype = batches, device, dtype
        self.config, self.score, self.options = config, score, dict(options or {})
        self.options.setdefault("progress", False)
        self.proxies = ProxyBatches(batches, device)
        self.written: dict[str, tuple[int, ...]] = {}  # key -> shape of every tensor written
        self.plan: dict[str, dict] = {"modules": {}, "attributes": {}, "layers": {}}  # the whole model's flop_plan
        self.full_groups: dict[tuple[str, str], str] = {}  # (layer, level) -> the whole model's gate name
        self.relative = lambda name: name  # absolute module names -> plan paths of the whole model

    def embedded(self) -> list[torch.Tensor]:
        """The first layer's input for every batch. Every tensor outside the transformer layers is read but the
        output head's (the input embedding, position embeddings where the model adds them, the final norm)."""
        with no_init_weights():
            model = AutoModelForCausalLM.from_config(
                one_layer_config(self.model_config, 0, self.model_config.vocab_size)
            )
        model = model.to(self.dtype)
        head = model.get_output_embeddings()  # tied to the input embedding here: the source's head must not land in it
        head_name = next((n for n, m in model.named_modules() if m is head), None)
        state = model.state_dict()
        layers = tuple(p + "." for p in self.full_layers)
        wanted = [
            k
            for k in self.reader.keys()
            if k in state and not k.startswith(layers) and (head_name is None or not k.startswith(head_name + "."))
        ]
        model.load_state_dict({k: self.reader.get(k) for k in wanted}, strict=False)
        states = [h.cpu() for h in embedded_states(model.to(self.device), self.batches)]
        del model, state
        gc.collect()
        return states

    def _layer(self, index: int) -> LayerModel:
        layer = LayerModel(self.model_config, index, len(self.batches), self.dtype)
        layer.load(self.reader.read_prefix(self.full_layers[index] + "."))
        layer.model.to(self.device)
        return layer

    def dense_scores(self) -> dict[str, torch.Tensor]:
        """Pass one: every unit's score on the dense hidden states, under the full model's gate names."""
        states, scores = self.embedded(), {}
        for i in range(len(self.full_layers)):
            layer = self._layer(i)
            flop = get_flop_model(layer.model, copy.deepcopy(self.config))
            layer.states = states
            open_all_gates(flop)
            names = _full_names(flop, self.full_groups, layer.prefix, self.full_layers[i])
            scores.update({names[k]: v for k, v in compute_scores(flop, self.proxies, self.score).items()})
            states = [h.cpu() for h in layer.outputs(flop, self.proxies)]
            del flop, layer
            gc.collect()
        return scores

    def prune_layers(self, writer: ShardWriter, keep: dict | None, target: float, ranking: str, min_units: int) -> dict:
        """Pass two (or, without ``keep``, the only pass: each layer ranked on its own): prune, refit, compact
        and write each layer in turn. Returns the masks, under the full model's gate names."""
        states = self.embedded()
        dense = states if keep is None else None
        kept: dict[str, torch.Tensor] = {}
        for i, name in enumerate(self.full_layers):
            layer = self._layer(i)
            flop = get_flop_model(layer.model, copy.deepcopy(self.config))
            open_all_gates(flop)
            units = find_gated_units(flop)
            if keep is None:  # per layer: scores on the dense states, this layer's own budget
                layer.states = dense
                scores = compute_scores(flop, self.proxies, self.score)
                dense = [h.cpu() for h in layer.outputs(flop, self.proxies)]
                prune_to_target(flop, scores, target, ranking=ranking, min_units_per_gate=min_units)
            names = _full_names(flop, self.full_groups, layer.prefix, name)
            if keep is not None:
                for s in units:
                    s.gate.set_mask(keep[names[s.key]].to(self.device))
            kept.update({names[s.key]: s.gate.deterministic_mask().detach().cpu() != 0 for s in units})
            layer.states = states
            reconstruct(flop, self.proxies, **self.options)
            states = [h.cpu() for h in layer.outputs(flop, self.proxies)]
            compacted, plan = compact_with_plan(flop)
            one, full = _relative_paths(layer.model)(layer.prefix), self.relative(name)
            for part, entries in plan.items():
                self.plan.setdefault(part, {}).update({_moved(k, one, full): v for k, v in entries.items()})
            prefix = layer.prefix + "."
            tensors = {
                f"{name}.{k[len(prefix) :]}": v.detach().cpu()
                for k, v in compacted.state_dict().items()
                if k.startswith(prefix)
            }
            self.written.update({k: tuple(v.shape) for k, v in tensors.items()})
            writer.write(tensors)
            del flop, layer, compacted, tensors
            gc.collect()
        return kept
