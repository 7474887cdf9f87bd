"""The GGUF hyper-parameters that depend on the llama.cpp graph: RoPE, sliding windows, soft-capping.

``hf_flop.export_gguf`` writes the shapes; this module turns a config's RoPE, sliding-window layers
and soft-capping into the keys the chosen graph (``hf_flop.gguf_graphs.GGUFGraph``) reads, and refuses,
before any work, a config the graph would compute differently.
"""

from __future__ import annotations

import warnings

import torch

from .gguf_graphs import SOFTCAPS, GGUFExportWarning, GGUFGraph

# RoPE types whose frequencies do not depend on the sequence length (llama.cpp: a fixed rope_freqs tensor)
STATIC_ROPE_TYPES = ("default", "linear", "llama3")
KEY_ROPE_TYPES = ("default", "linear")  # what a graph without rope_freqs takes (rope.scaling.* keys)
LAYER_TYPES = ("full_attention", "sliding_attention")  # keys of a per-layer-type rope_parameters (Gemma 3)


def activation(config) -> tuple[str, str]:
    """``(config attribute, value)`` of the FFN activation (transformers' Gemma configs call it hidden_activation)."""
    for attr in ("hidden_act", "hidden_activation"):
        if getattr(config, attr, None):
            return attr, getattr(config, attr)
    return "hidden_act", "silu"


def check_config(graph: GGUFGraph, name: str, config, head_dim: int) -> None:
    """What llama.cpp's ``graph`` (named ``name``) would compute otherwise than ``config`` says, refused."""
    attr, act = activation(config)
    if act not in graph.activations:
        raise ValueError(
            f"llama.cpp's {name} graph uses {' or '.join(graph.activations)} in the FFN; this model's {attr} is {act!r}."
        )
    for cap in SOFTCAPS:
        value = getattr(config, cap, None)
        if value and cap not in graph.softcapping:
            raise ValueError(
                f"this model's {cap} is {value}; llama.cpp's {name} graph does not soft-cap those logits, so its "
                f"outputs would differ."
            )
        if not value and graph.softcapping.get(cap):
            raise ValueError(
                f"llama.cpp's {name} graph always soft-caps with {cap}; this model's is {value!r}. Set it in the "
                "config (the value the model was trained with) before exporting."
            )
    sliding = sliding_layers(config, config.num_hidden_layers)
    rope(graph, config, head_dim, sliding)
    window = getattr(config, "sliding_window", None)
    if not graph.sliding_window and any(sliding) and window < config.max_position_embeddings:
        note = (
            f"the model attends within a sliding window of {window} tokens; llama.cpp's {name} graph attends to the "
            "whole context, so outputs differ once a sequence is longer than the window."
        )
        warnings.warn(GGUFExportWarning(note, note=note), stacklevel=4)


def check_levels(graph: GGUFGraph, layout: str, flop_config) -> None:
    """What ``flop_config``'s pruning would give that llama.cpp's ``graph`` (``layout``) cannot run, refused."""
    levels = set(flop_config.levels)
    shaped = sorted(levels & {"head", "query_head", "row"})
    if shaped and graph.per_layer is None and not flop_config.uniform_shapes:
        raise ValueError(
            f"levels {shaped} give each layer its own shapes, and llama.cpp's {layout} graph runs the same shapes in "
            f"every layer only ('deci', which reads per-layer shapes, lacks this family's {graph.extras}). Prune "
            "with uniform shapes: FlopConfig(uniform_shapes=True) (command line: --uniform-shapes)."
        )
    if "embedding" in levels and graph.scaled_embedding:
        raise ValueError(
            f"level 'embedding' factorizes the token embedding, and llama.cpp's {layout} graph scales the embeddings "
            "itself, which a factorized embedding does not. Drop level 'embedding' for a GGUF file."
        )


def sliding_layers(config, blocks: int) -> list[bool]:
    """Per layer, whether it attends within ``config.sliding_window`` (``layer_types``; all of them without)."""
    window = getattr(config, "sliding_window", None)
    if not window:
        return [False] * blocks
    types = getattr(config, "layer_types", None)
    if not types:
        return [True] * blocks
    return [t == "sliding_attention" for t in types[:blocks]] + [False] * max(0, blocks - len(types))


def _rope_parameters(config) -> tuple[dict, dict]:
    """``(full-attention layers' RoPE, sliding-window layers' RoPE)``: the same dict unless given per layer type."""
    params = dict(getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {})
    if any(t in params for t in LAYER_TYPES):
        full = dict(params.get("full_attention") or {})
        return full, dict(params.get("sliding_attention") or full)
    return params, params


def _theta(params: dict, config) -> float:
    return float(params.get("rope_theta", getattr(config, "rope_theta", 10000.0)))


def rope(graph: GGUFGraph, config, head_dim: int, sliding: list[bool]) -> tuple[dict, torch.Tensor | None]:
    """``(hparams, rope_freqs tensor or None)`` of the model's RoPE for ``graph``; refuses what it cannot express."""
    full, swa = _rope_parameters(config)
    rope_type = full.get("rope_type", full.get("type", "default"))
    allowed = STATIC_ROPE_TYPES if graph.rope_freqs else KEY_ROPE_TYPES
    partial = full.get("partial_rotary_factor", getattr(config, "partial_rotary_factor", None) or 1.0)
    if rope_type not in allowed or partial != 1.0:
        raise ValueError(
            f"export_gguf writes RoPE with fixed frequencies over the whole head ({', '.join(allowed)} for this "
            f"graph); this model's RoPE is {rope_type!r} (partial_rotary_factor {partial})."
        )
    hparams: dict = {"rope_freq_base": _theta(full, config)}
    if any(sliding) and graph.sliding_window:
        swa_type = swa.get("rope_type", swa.get("type", "default"))
        if swa_type != "default":
            raise ValueError(
                f"llama.cpp rotates sliding-window layers without a RoPE scaling; this model's are {swa_type!r}."
            )
        hparams["rope_freq_base_swa"] = _theta(swa, config)
    if rope_type == "default":
        return hparams, None
    if not graph.rope_freqs:  # linear: positions divided by the factor, as llama.cpp's freq_scale does
        import gguf

        hparams |= {"rope_scaling_type": gguf.RopeScalingType.LINEAR, "rope_scaling_factor": float(full["factor"])}
        return hparams, None
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    inv_freq, attention_scale = ROPE_INIT_FUNCTIONS[rope_type](config, "cpu")
    if abs(float(attention_scale) - 1.0) > 1e-6:
        raise ValueError(f"this model's RoPE ({rope_type}) scales attention by {attention_scale}; llama.cpp's is 1.")
    base = hparams["rope_freq_base"]
    default = 1.0 / base ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    return hparams, (default / inv_freq.to(torch.float64)).to(torch.float32)


def window_and_caps(graph: GGUFGraph, config, sliding: list[bool]) -> dict:
    """The sliding-window and soft-capping keys of ``graph`` (``check_config`` warns of a window it ignores)."""
    hparams: dict = {}
    window = getattr(config, "sliding_window", None)
    if graph.sliding_window:
        if any(sliding) or graph.softcapping.get("attn_logit_softcapping"):  # gemma2 is sliding-window by design
            hparams["sliding_window"] = int(window or config.max_position_embeddings)
            hparams["sliding_window_pattern"] = list(sliding)  # an array: which layers slide
    for cap in graph.softcapping:
        if getattr(config, cap, None):
            hparams[cap] = float(getattr(config, cap))
    return hparams
