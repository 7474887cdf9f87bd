"""Export a Llama-family decoder, dense or compacted by hf_flop, to GGUF: the file llama.cpp runs.

``export_gguf(model_or_folder, path)`` writes a Llama, Mistral or Qwen2 model with the same heads, KV
heads and FFN width in every layer as llama.cpp's ``llama`` architecture, and a non-uniform one as its
``deci`` architecture with per-layer arrays. Qwen3 and Gemma 2/3 models are written as llama.cpp's
``qwen3``, ``gemma2`` and ``gemma3`` graphs, which take uniform models only (``hf_flop.gguf_graphs``
says what each graph computes; ``hf_flop.gguf_hparams`` writes their RoPE, window and soft-capping
keys). What llama.cpp accepts, read in its source (the copy vendored by llama-cpp-python 0.3.36,
llama.cpp commit 0c1e570, which the slow test builds and runs):

* ``llama`` (src/models/llama.cpp) sizes every layer's tensors and graph from the head count, KV-head
  count and FFN width of layer 0 (``hparams.n_head()``, ``n_head_kv()``, ``n_ff()``): uniform models only.
* ``deci`` (Nemotron-NAS, src/models/deci.cpp) sizes layer ``il``'s tensors and attention from
  ``n_head(il)``, ``n_head_kv(il)`` and ``n_ff(il)``. The loader common to all architectures
  (``load_hparams`` in src/llama-model.cpp, ``get_key_or_arr`` in src/llama-model-loader.cpp) reads
  ``<arch>.attention.head_count``, ``.head_count_kv`` and ``<arch>.feed_forward_length`` either as one
  number or as an array of exactly ``block_count`` int32/uint32 entries, and the KV cache is sized per
  layer (src/llama-kv-cache.cpp, ``n_embd_k_gqa(il)``). deci gives 0 heads, 0 KV heads or 0 FFN width
  special meanings (no attention, linear attention, no FFN); compaction keeps at least one of each.
* The head size defaults to ``embedding_length / head_count`` of layer 0, wrong once heads are pruned,
  so ``attention.key_length`` / ``value_length`` are written; ``rope.dimension_count`` must equal it.
* Both graphs rotate consecutive pairs of a head (``LLAMA_ROPE_TYPE_NORM``) where transformers rotates
  its two halves, so the rows of q and k (weights and biases) are interleaved per head.
* ``output.weight`` is optional: without it the output layer reuses ``token_embd.weight`` (tied
  embeddings, e.g. SmolLM2). q/k/v/o and FFN biases are optional tensors (Qwen2, ``attention_bias``).
* ``rope_freqs.weight`` (optional) divides each rotary frequency: the static RoPE scalings
  (``linear``, ``llama3``) are written as that tensor, computed with transformers' own RoPE code.

Refused, each with its remedy in the message: architectures without a ``gguf`` layout in
``hf_flop.architectures``; models without an LM head; activations other than SiLU; RoPE types that
change with the sequence length or scale attention (dynamic, yarn, longrope, ...); an output layer with a
bias; ``architecture="llama"`` for a non-uniform model (``FlopConfig(uniform_shapes=True)`` gives a
uniform one); low-rank, block-sparse or cluster-factorized layers when ``densify=False`` -- by default they
are multiplied back into the dense matrix they compute, with a warning, since GGUF has no factorized
tensors for llama.cpp's graphs; tokenizers ``hf_flop.gguf_vocab`` cannot express; per-layer shapes of a
family whose graph ``deci`` cannot compute (Qwen3's q/k norms, Gemma's extra norms). A sliding window
(Mistral) is warned about: llama.cpp's llama and deci graphs attend to the whole context.

The file appears complete or not at all (``hf_flop.gguf_file``: a temporary file, then a rename). Its
tensors are f32, f16 or quantized (``quantization=``: which tensor gets which type is ``hf_flop.gguf_quant``'s).
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from transformers import PreTrainedModel

from .architectures import ARCHITECTURES, arch_spec, find_layers
from .gguf_graphs import GGUF_ARCHITECTURES, GRAPHS, GGUFExportWarning, GGUFGraph, llama_cpp_query_scale
from .gguf_hparams import check_config, check_levels, rope, sliding_layers, window_and_caps
from .gguf_quant import resolve_quantization
from .modeling import LowRankLinear
from .modeling.block_sparse import BlockSparseLinear
from .modeling.factorized_embedding import FactorizedEmbedding, TiedFactorizedHead
from .naming import ParameterNames

DTYPES = {"f32": torch.float32, "f16": torch.float16}  # dtype's choices: quantization's float subset


@dataclass
class _Layer:
    """One transformer layer as llama.cpp sees it: its shape and its tensors by kind, ``(out, in)`` weights."""

    heads: int
    kv_heads: int
    ffn: int
    tensors: dict[str, tuple[torch.Tensor, torch.Tensor | None]] = field(default_factory=dict)


@torch.no_grad()
def export_gguf(
    model_or_folder: nn.Module | str | os.PathLike,
    path: str | os.PathLike,
    *,
    tokenizer=None,
    tokenizer_gguf: str | os.PathLike | None = None,
    tokenizer_pre: str | None = None,
    dtype: str | None = None,
    quantization: str | None = None,
    architecture: str | None = None,
    densify: bool = True,
    name: str | None = None,
    names: Mapping[str, str] | None = None,
) -> Path:
    """Write ``model_or_folder`` to the GGUF file ``path`` for llama.cpp; returns ``path``.

    Args:
        model_or_folder: a compacted model (``hf_flop.compact``), a FLOP model (compacted first), a
            stock Llama / Mistral / Qwen2 / Qwen3 / Gemma 2 / Gemma 3 causal LM, or a folder one was saved to
            (``save_compacted``).
        path: the file to write (replaced if it exists; written to a temporary file, then renamed).
        tokenizer: the model's transformers fast tokenizer or its folder; default: the folder's own.
            Byte-level BPE tokenizers only (see ``hf_flop.gguf_vocab``).
        tokenizer_gguf: a GGUF file whose ``tokenizer.*`` metadata is copied instead (the base model's,
            e.g. ``hf_flop.app.data.smollm2_gguf()`` for models pruned from the embedded SmolLM2).
        tokenizer_pre: llama.cpp's pre-tokenizer name, when the tokenizer's is not recognised.
        dtype: ``"f32"`` or ``"f16"`` for the matrices: the older name for ``quantization="f32"`` / ``"f16"``
            (given both, they must agree).
        quantization: the file's type (default ``dtype``, else ``"f32"``): ``"f32"``, ``"f16"``, ``"bf16"``,
            ``"q8_0"``, ``"q5_1"``, ``"q5_0"``, ``"q4_1"``, ``"q4_0"`` (gguf's quantizer), or a K-quant mix
            ``"q6_k"``, ``"q5_k_m"``, ``"q5_k_s"``, ``"q4_k_m"``, ``"q4_k_s"``, ``"q3_k_l"``, ``"q3_k_m"``,
            ``"q3_k_s"``, ``"q2_k"`` (llama.cpp's quantizer: needs llama-cpp-python). Norms and biases stay f32;
            matrices whose width does not fit the type's blocks are kept in f16, with a warning
            (``hf_flop.gguf_quant`` says which tensor gets which type).
        architecture: ``None`` (the family's graph, ``"llama"`` for Llama / Mistral / Qwen2 when every
            layer has the same shapes, else ``"deci"``), the family's graph (refused for per-layer
            shapes), or ``"deci"`` for the Llama family.
        densify: store low-rank / block-sparse / cluster-factorized layers as the dense matrices they
            compute (with a warning); ``False`` refuses such a model instead.
        name: ``general.name`` in the file; default: the model's folder name.
        names: what the caller's interface calls these parameters (e.g. ``{"tokenizer_gguf": "--gguf-tokenizer"}``):
            the error messages name them so (``hf_flop.naming``).

    Warnings are ``GGUFExportWarning``s.
    """
    names = ParameterNames(names)
    quantization = resolve_quantization(quantization, dtype, names)
    _check_choice("architecture", architecture, (None, *GGUF_ARCHITECTURES), names)
    model, tokenizer = _load(model_or_folder, tokenizer, load_tokenizer=tokenizer_gguf is None)
    from .gguf_file import named_tensors, write_gguf  # import gguf, an optional dependency
    from .gguf_vocab import vocabulary

    layout = _check_model(model)
    graph = GRAPHS[layout]
    vocab = vocabulary(
        _vocab_rows(model), tokenizer=tokenizer, tokenizer_gguf=tokenizer_gguf, tokenizer_pre=tokenizer_pre, names=names
    )
    config = model.config
    head_dim = _head_dim(config)
    densified: list[str] = []
    embedding, output = _embeddings(model, graph, densified)
    layers = _layers(model, graph, head_dim, densified)
    if densified:
        _densify_or_refuse(densified, densify, names)
    arch = _architecture(layers, architecture, layout, names)
    sliding = sliding_layers(config, len(layers))
    rope_keys, rope_factors = rope(graph, config, head_dim, sliding)

    def per_layer(values: list[int]) -> int | list[int]:
        return values if GRAPHS[arch].arrays else values[0]  # deci: arrays (the loader takes either)

    hparams = {
        "context_length": config.max_position_embeddings,
        "embedding_length": config.hidden_size,
        "block_count": len(layers),
        "feed_forward_length": per_layer([layer.ffn for layer in layers]),
        "head_count": per_layer([layer.heads for layer in layers]),
        "head_count_kv": per_layer([layer.kv_heads for layer in layers]),
        "key_length": head_dim,
        "value_length": head_dim,
        "rope_dimension_count": head_dim,
        **rope_keys,
        "layer_norm_rms_eps": float(config.rms_norm_eps),
        "vocab_size": int(embedding.shape[0]),
        **window_and_caps(graph, config, sliding),
    }
    globals_ = {"TOKEN_EMBD": embedding, "OUTPUT": output, "ROPE_FREQS": rope_factors}
    for module_name, kind in graph.model.items():
        globals_[kind] = _norm(model.base_model.get_submodule(module_name), graph)
    label = name or Path(str(getattr(config, "name_or_path", "") or "model")).name or "model"
    tensors = named_tensors(globals_, [layer.tensors for layer in layers])
    return write_gguf(Path(path), arch, label, hparams, vocab, tensors, quantization)


def check_exportable(
    model: nn.Module,
    *,
    tokenizer=None,
    tokenizer_gguf: str | os.PathLike | None = None,
    tokenizer_pre: str | None = None,
    names: Mapping[str, str] | None = None,
    flop_config=None,
) -> None:
    """What ``export_gguf`` would refuse about ``model``'s architecture, config and vocabulary, refused now.

    Needs no trained weights, so the CLI calls it before training; the layer shapes pruning will give
    are not known yet (a non-uniform Llama is written as ``deci``, never refused for its shapes). With
    the ``FlopConfig`` pruning will use (``flop_config``), what its levels would give that the model's
    graph cannot run is refused too: per-layer shapes where no per-layer graph computes the family
    (Qwen3, Gemma), a cluster-factorized embedding where the graph scales embeddings (Gemma).
    ``names`` is ``export_gguf``'s.
    """
    from .gguf_vocab import vocabulary

    layout = _check_model(model)
    if flop_config is not None:
        check_levels(GRAPHS[layout], layout, flop_config)
    vocabulary(
        _vocab_rows(model),
        tokenizer=tokenizer,
        tokenizer_gguf=tokenizer_gguf,
        tokenizer_pre=tokenizer_pre,
        names=ParameterNames(names),
    )


def _check_model(model: nn.Module) -> str:
    """``model``'s ``GGUF_TENSORS`` layout, once its architecture and config are ones llama.cpp computes."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    spec = arch_spec(model_type)
    if spec.gguf is None:
        supported = sorted(t for t, s in ARCHITECTURES.items() if s.gguf)
        raise ValueError(
            f"export_gguf writes Llama-family decoders ({', '.join(supported)}), which llama.cpp's "
            f"{', '.join(GGUF_ARCHITECTURES)} graphs compute; model_type={model_type!r} has no such layout in hf_flop."
        )
    if model.get_output_embeddings() is None:
        raise ValueError(
            f"export_gguf writes causal language models (an LM head); {type(model).__name__} has none: load the model "
            "with AutoModelForCausalLM."
        )
    plan = getattr(model.config, "flop_plan", None) or {}
    skipped = sorted(p for p, m in plan.get("modules", {}).items() if m.get("kind", "").startswith("skipped_"))
    if skipped:
        raise ValueError(
            f"export_gguf writes layers with both an attention and an FFN, but this model's layers lost sublayers "
            f"({', '.join(skipped[:3])}{' ...' if len(skipped) > 3 else ''}: FlopConfig(layer_granularity='sublayer')). "
            "Prune whole layers (layer_granularity='layer') for a GGUF file, or export with export_onnx."
        )
    graph = GRAPHS[spec.gguf]
    check_config(graph, spec.gguf, model.config, _head_dim(model.config))
    head, embedding = model.get_output_embeddings(), model.get_input_embeddings()
    tied = isinstance(head, TiedFactorizedHead) or getattr(head, "weight", None) is getattr(embedding, "weight", 0)
    if graph.tied_output and not tied:
        raise ValueError(
            f"export_gguf: this model's LM head is not tied to its token embedding; llama.cpp's {spec.gguf} graph always "
            "computes the output with the token embedding (tie_word_embeddings=True)."
        )
    return spec.gguf


# --- reading the model ---------------------------------------------------------------------------
def _check_choice(argument: str, value, allowed: tuple, names: ParameterNames) -> None:
    if value not in allowed:
        raise ValueError(f"export_gguf: {names(argument)}={value!r} is not one of {', '.join(map(repr, allowed))}.")


def _load(model_or_folder, tokenizer, *, load_tokenizer: bool):
    """The model (a FLOP model compacted, a folder loaded) and its tokenizer (a folder's own by default)."""
    from transformers import AutoTokenizer

    if isinstance(model_or_folder, (str, os.PathLike)):
        from transformers import AutoModelForCausalLM

        folder = Path(model_or_folder)
        if not (folder / "config.json").is_file():
            raise FileNotFoundError(f"export_gguf: {folder} is not a model folder (no config.json).")
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
        if tokenizer is None and load_tokenizer and (folder / "tokenizer.json").is_file():
            tokenizer = AutoTokenizer.from_pretrained(folder)
    else:
        model = model_or_folder
    if not isinstance(model, PreTrainedModel):  # a PeftModel / FlopModel: what llama.cpp runs is its compaction
        from .compact import compact

        model = compact(model)
    if isinstance(tokenizer, (str, os.PathLike)):
        tokenizer = AutoTokenizer.from_pretrained(tokenizer)
    return model, tokenizer


def _head_dim(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def _vocab_rows(model: nn.Module) -> int:
    embedding = model.get_input_embeddings()
    return embedding.num_embeddings


def _dense(module: nn.Module, name: str, densified: list[str]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(weight (out, in), bias)`` of a linear layer as one matrix; a factorized layer's name goes to ``densified``."""
    if isinstance(module, nn.Linear):
        return module.weight, module.bias
    if isinstance(module, LowRankLinear):
        densified.append(name)
        return module.out_proj.weight @ module.in_proj.weight, module.out_proj.bias
    if isinstance(module, BlockSparseLinear):
        densified.append(name)
        return module.to_dense(), module.bias
    raise ValueError(
        f"export_gguf: {name} is a {type(module).__name__}; it writes nn.Linear, LowRankLinear and BlockSparseLinear "
        "layers. A model with FLOP gates must be compacted first (hf_flop.compact, or pass the FLOP model itself)."
    )


def _embeddings(
    model: PreTrainedModel, graph: GGUFGraph, densified: list[str]
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The token embedding matrix, and the output matrix (``None`` when tied: llama.cpp then reuses the embedding)."""
    embedding, head = model.get_input_embeddings(), model.get_output_embeddings()
    if isinstance(embedding, FactorizedEmbedding) and graph.scaled_embedding:
        raise ValueError(
            "export_gguf: this model's embedding is cluster-factorized; llama.cpp's graph for it scales the token "
            "embeddings by sqrt(hidden size) itself, which the factorized embedding does not. Prune without level "
            "'embedding' for a GGUF file."
        )
    if isinstance(embedding, FactorizedEmbedding):
        densified.append("the cluster-factorized embedding")
        with torch.no_grad():
            matrix = embedding(torch.arange(embedding.num_embeddings, device=embedding.position.device))
    else:
        matrix = embedding.weight
    if isinstance(head, TiedFactorizedHead) or getattr(head, "weight", None) is getattr(embedding, "weight", False):
        output = None
    elif isinstance(head, nn.Linear):
        output = head.weight
    else:
        raise ValueError(f"export_gguf: the LM head is a {type(head).__name__}; it writes nn.Linear heads.")
    if getattr(head, "bias", None) is not None:
        raise ValueError("export_gguf: the LM head has a bias, which llama.cpp's llama and deci graphs do not add.")
    return matrix, output


def _norm(module: nn.Module, graph: GGUFGraph) -> torch.Tensor:
    """A norm's weight as llama.cpp multiplies by it (Gemma's ``1 + weight`` has the 1 added)."""
    return module.weight + graph.norm_offset if graph.norm_offset else module.weight


def _layers(model: PreTrainedModel, graph: GGUFGraph, head_dim: int, densified: list[str]) -> list[_Layer]:
    """Every transformer layer's shape and tensors, with transformers' query scale folded in and, for a graph
    rotating consecutive pairs, q and k rows interleaved for llama.cpp's RoPE."""
    modules = dict(model.named_modules())
    spec = arch_spec(model.config.model_type)
    hidden = model.config.hidden_size
    prefixes = find_layers(model, spec)
    layers = []
    for prefix in prefixes:
        tensors = {}
        for module_name, kind in graph.layer.items():
            module = modules[f"{prefix}.{module_name}"]
            if kind.endswith("_NORM"):
                tensors[kind] = (_norm(module, graph), None)
            else:
                tensors[kind] = _dense(module, f"{prefix}.{module_name}", densified)
        layer = _layer_shape(prefix, tensors, hidden, head_dim)
        # transformers scales queries by the attention's `scaling`; llama.cpp by its own factor: the ratio goes into
        # the q norm's weight (after which nothing rescales q) or, without one, into q's rows
        hf_scale = float(getattr(modules[f"{prefix}.{spec.attention}"], "scaling", head_dim**-0.5))
        ratio = hf_scale / llama_cpp_query_scale(graph, len(prefixes), hidden, layer.heads, head_dim)
        if abs(ratio - 1.0) > 1e-7:
            kind = "ATTN_Q_NORM" if "ATTN_Q_NORM" in tensors else "ATTN_Q"
            weight, bias = tensors[kind]
            tensors[kind] = (weight * ratio, None if bias is None else bias * ratio)
        if graph.rope_pairs:
            for kind, heads in (("ATTN_Q", layer.heads), ("ATTN_K", layer.kv_heads)):
                weight, bias = tensors[kind]
                pairs = _pairs_per_head(weight, heads), None if bias is None else _pairs_per_head(bias, heads)
                tensors[kind] = pairs
        layer.tensors = tensors
        layers.append(layer)
    return layers


def _layer_shape(prefix: str, tensors: dict, hidden: int, head_dim: int) -> _Layer:
    """Heads, KV heads and FFN width of one layer, checked to be shapes llama.cpp can build."""
    q, k, v, o = (tensors[kind][0] for kind in ("ATTN_Q", "ATTN_K", "ATTN_V", "ATTN_OUT"))
    gate, up, down = (tensors[kind][0] for kind in ("FFN_GATE", "FFN_UP", "FFN_DOWN"))
    heads, kv_heads, ffn = q.shape[0] // head_dim, k.shape[0] // head_dim, gate.shape[0]
    consistent = (
        q.shape[0] == heads * head_dim
        and k.shape == v.shape == (kv_heads * head_dim, hidden)
        and q.shape[1] == hidden
        and o.shape == (hidden, q.shape[0])
        and up.shape == gate.shape == (ffn, hidden)
        and down.shape == (hidden, ffn)
        and kv_heads > 0
        and heads % kv_heads == 0
    )
    if not consistent:
        raise ValueError(
            f"export_gguf: {prefix} has shapes llama.cpp cannot build (q {tuple(q.shape)}, k {tuple(k.shape)}, v "
            f"{tuple(v.shape)}, o {tuple(o.shape)}, head size {head_dim}): every layer needs whole heads, a head "
            "count that is a multiple of its KV-head count, and matching FFN widths."
        )
    return _Layer(heads, kv_heads, ffn)


def _pairs_per_head(rows: torch.Tensor, heads: int) -> torch.Tensor:
    """Reorder each head's rows from transformers' RoPE layout (halves) to llama.cpp's (consecutive pairs).

    Row ``j`` of a head's first half goes to ``2j`` and row ``j`` of its second half to ``2j + 1``, so
    the pair llama.cpp rotates together is the pair transformers rotates together.
    """
    head_dim = rows.shape[0] // heads
    return rows.reshape(heads, 2, head_dim // 2, *rows.shape[1:]).transpose(1, 2).reshape(rows.shape)


def _densify_or_refuse(layers: list[str], densify: bool, names: ParameterNames) -> None:
    shown = ", ".join(layers[:4]) + (f" and {len(layers) - 4} more" if len(layers) > 4 else "")
    if not densify:
        raise ValueError(
            f"export_gguf: {len(layers)} layer(s) are factorized (low-rank, block-sparse or cluster-factorized: {shown}); "
            f"llama.cpp's GGUF tensors are dense matrices. Pass {names('densify')}=True to store each as the matrix it "
            "computes (the file is then larger than the compacted model), or prune without levels rank / block / embedding."
        )
    note = (
        f"{len(layers)} factorized layer(s) ({shown}) are stored as the dense matrices they compute, since llama.cpp "
        "has no factorized tensors: the GGUF file and llama.cpp's work are those of dense layers of the kept shapes. "
        "Prune with levels head / row only for a model llama.cpp runs at its pruned size."
    )
    message = f"export_gguf: {note.removesuffix('.')}; {names('densify')}=False refuses."
    warnings.warn(GGUFExportWarning(message, note=note, parameter="densify"), stacklevel=3)


def _architecture(layers: list[_Layer], requested: str | None, layout: str, names: ParameterNames) -> str:
    """The llama.cpp architecture of the file: the family's graph for uniform shapes, else its per-layer graph."""
    graph = GRAPHS[layout]
    choices = [layout] + ([graph.per_layer] if graph.per_layer else [])
    if requested is not None and requested not in choices:
        raise ValueError(
            f"export_gguf: {names('architecture')}={requested!r} does not compute this model; llama.cpp computes it "
            f"as {' or '.join(map(repr, choices))}. Leave {names('architecture')}=None to choose by its shapes."
        )
    shapes = {(layer.heads, layer.kv_heads, layer.ffn) for layer in layers}
    if len(shapes) == 1:
        return requested or layout
    if graph.per_layer and requested in (None, graph.per_layer):
        return graph.per_layer
    heads = [layer.heads for layer in layers]
    kv = [layer.kv_heads for layer in layers]
    ffn = [layer.ffn for layer in layers]
    shown = f"this model has heads {heads}, KV heads {kv}, FFN widths {ffn}"
    if graph.per_layer:  # the family's graph was asked for by name
        raise ValueError(
            f"export_gguf: {names('architecture')}={layout!r} needs the same heads, KV heads and FFN width in every "
            f"layer (llama.cpp's {layout} graph sizes all layers from layer 0); {shown}. Prune with "
            f"FlopConfig(uniform_shapes=True) for a uniform model, or leave {names('architecture')}=None to write "
            f"{graph.per_layer!r}, which llama.cpp reads per layer."
        )
    raise ValueError(
        f"export_gguf: llama.cpp's {layout} graph sizes every layer from layer 0's heads, KV heads and FFN width; "
        f"{shown}. llama.cpp's only graph that reads per-layer shapes, 'deci', computes a plain Llama layer, without "
        f"this family's {graph.extras}, so it would compute another model. Prune with "
        "FlopConfig(uniform_shapes=True): every layer then keeps the same shapes, which this graph runs."
    )
