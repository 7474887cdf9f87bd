"""The llama.cpp graphs ``hf_flop.export_gguf`` writes, as data: what each loads and computes.

An ``ArchSpec.gguf`` names one entry of ``GRAPHS``. Each entry says which modules become which
llama.cpp tensors and what the graph computes beyond a plain Llama layer (per-head q/k norms, norms
after the sublayers, Gemma's ``1 + weight`` norms and scaled embeddings, soft-capping, sliding-window
layers), so the exporter reads one table instead of testing families. What llama.cpp does was read in
the source vendored by llama-cpp-python 0.3.36 (src/models/<arch>.cpp, src/llama-model.cpp):

* ``llama`` and ``deci`` rotate consecutive pairs of a head (``LLAMA_ROPE_TYPE_NORM``); ``qwen3``,
  ``gemma2`` and ``gemma3`` rotate its two halves (``NEOX``), as transformers does, so their q and k
  rows are written as they are. Only ``llama``/``deci`` read a ``rope_freqs`` tensor; the others take
  a linear RoPE scaling as ``rope.scaling.*`` keys, and their sliding-window layers rotate unscaled.
* ``qwen3``, ``gemma2`` and ``gemma3`` size every layer from layer 0 (``n_head``, ``n_head_kv``,
  ``n_ff``): uniform models only. ``deci``, the graph that reads per-layer shapes, computes a Llama
  layer and nothing of what ``GGUFGraph.extras`` lists, so a per-layer model of theirs is refused.
* Gemma's RMSNorm multiplies by ``1 + weight``; llama.cpp's by ``weight``, so ``norm_offset`` is added
  to every norm weight (llama.cpp's own converter does the same). Gemma's graphs multiply the token
  embeddings by ``sqrt(hidden)`` themselves, as transformers' Gemma models do.
* The query scale: ``llama``/``deci``/``qwen3`` use ``1/sqrt(head_dim)``; ``gemma2``/``gemma3`` too, except
  at the block counts of their 27B models (``hidden_scale_blocks``), where they use
  ``1/sqrt(hidden // heads)`` of the file's own (pruned) head count. transformers' own scale (the
  attention module's ``scaling``, Gemma's ``query_pre_attn_scalar``) is folded into the q norm's
  weight, or into q's rows when there is none, so the product is the model's whatever llama.cpp uses.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

# module (relative to one transformer layer) -> llama.cpp tensor kind (a gguf.MODEL_TENSOR member name)
_ATTENTION = {
    "self_attn.q_proj": "ATTN_Q",
    "self_attn.k_proj": "ATTN_K",
    "self_attn.v_proj": "ATTN_V",
    "self_attn.o_proj": "ATTN_OUT",
}
_GATED_FFN = {"mlp.gate_proj": "FFN_GATE", "mlp.up_proj": "FFN_UP", "mlp.down_proj": "FFN_DOWN"}
_QK_NORMS = {"self_attn.q_norm": "ATTN_Q_NORM", "self_attn.k_norm": "ATTN_K_NORM"}
_GEMMA_NORMS = {  # a norm before and after each sublayer
    "input_layernorm": "ATTN_NORM",
    "post_attention_layernorm": "ATTN_POST_NORM",
    "pre_feedforward_layernorm": "FFN_NORM",
    "post_feedforward_layernorm": "FFN_POST_NORM",
}
SOFTCAPS = ("attn_logit_softcapping", "final_logit_softcapping")  # config attributes; GGUFWriter.add_<name>


class GGUFExportWarning(UserWarning):
    """What ``export_gguf`` (or ``check_exportable``) warns about, as fields a caller can word for its users.

    ``str(warning)`` is the full message. ``note`` says what happened in one full sentence fit to print
    as a note (no ``export_gguf:`` prefix, no advice about parameters); ``parameter`` is the
    ``export_gguf`` parameter that would avoid it (e.g. ``"densify"``), or None when none does.
    """

    def __init__(self, message: str, note: str | None = None, parameter: str | None = None) -> None:
        super().__init__(message)
        self.note = message if note is None else note
        self.parameter = parameter

    def __reduce__(self):  # pickles (e.g. across processes) with its fields
        return type(self), (str(self), self.note, self.parameter)


@dataclass(frozen=True)
class GGUFGraph:
    """One llama.cpp architecture ``export_gguf`` writes: its tensors and what it computes.

    ``layer`` / ``model`` map module names (relative to a transformer layer / the base model) to
    tensor kinds; the embeddings are found with ``get_input/output_embeddings()``. ``softcapping``
    maps each soft-capping config attribute the graph computes to whether it applies one even when
    the config has none (Gemma 2 always caps attention logits): such a model is refused, and a
    config setting one the graph lacks is refused too.
    """

    layer: dict[str, str]
    model: dict[str, str] = field(default_factory=lambda: {"norm": "OUTPUT_NORM"})
    activations: tuple[str, ...] = ("silu",)  # FFN activations (config hidden_act / hidden_activation) it computes
    rope_pairs: bool = True  # rotates consecutive pairs of a head: q and k rows are interleaved from halves
    rope_freqs: bool = True  # reads a rope_freqs tensor (static RoPE scalings); else linear scaling keys only
    per_layer: str | None = None  # the graph that reads per-layer shapes, for a non-uniform model
    arrays: bool = False  # writes head counts and FFN widths as per-layer arrays (it is such a graph)
    norm_offset: float = 0.0  # added to every norm weight (Gemma's RMSNorm computes x * (1 + weight))
    scaled_embedding: bool = False  # multiplies the token embeddings by sqrt(hidden) itself
    sliding_window: bool = False  # computes sliding-window layers (config sliding_window, layer_types)
    softcapping: dict[str, bool] = field(default_factory=dict)
    tied_output: bool = False  # always reuses token_embd as the output layer (an untied LM head is refused)
    hidden_scale_blocks: tuple[int, ...] = ()  # block counts at which queries are scaled by (hidden // heads)^-0.5
    extras: str = ""  # what it computes beyond a Llama layer, for the refusal of per-layer shapes


LLAMA = GGUFGraph(
    layer={"input_layernorm": "ATTN_NORM", **_ATTENTION, "post_attention_layernorm": "FFN_NORM", **_GATED_FFN},
    per_layer="deci",
)
_NEOX = dict(rope_pairs=False, rope_freqs=False)
_GEMMA = dict(
    **_NEOX,
    activations=("gelu_pytorch_tanh",),
    norm_offset=1.0,
    scaled_embedding=True,
    sliding_window=True,
)

GRAPHS: dict[str, GGUFGraph] = {
    "llama": LLAMA,
    "deci": replace(LLAMA, per_layer=None, arrays=True),  # Nemotron-NAS: per-layer head counts and FFN widths
    "qwen3": GGUFGraph(
        layer={**LLAMA.layer, **_QK_NORMS},
        **_NEOX,
        extras="per-head q/k RMS norms (q_norm, k_norm)",
    ),
    "gemma2": GGUFGraph(
        layer={**_ATTENTION, **_GEMMA_NORMS, **_GATED_FFN},
        **_GEMMA,
        softcapping={"attn_logit_softcapping": True, "final_logit_softcapping": False},
        tied_output=True,
        hidden_scale_blocks=(46,),
        extras="norms after the attention and the FFN, Gemma's scaled embeddings, GELU, soft-capping and "
        "sliding-window layers",
    ),
    "gemma3": GGUFGraph(
        layer={**_ATTENTION, **_QK_NORMS, **_GEMMA_NORMS, **_GATED_FFN},
        **_GEMMA,
        softcapping={"final_logit_softcapping": False},
        hidden_scale_blocks=(62,),
        extras="per-head q/k RMS norms, norms after the attention and the FFN, Gemma's scaled embeddings, GELU "
        "and sliding-window layers",
    ),
}
# llama.cpp architectures export_gguf can write (general.architecture)
GGUF_ARCHITECTURES = tuple(GRAPHS)


def llama_cpp_query_scale(graph: GGUFGraph, blocks: int, hidden: int, heads: int, head_dim: int) -> float:
    """The factor llama.cpp's ``graph`` scales queries by, for a file of ``blocks`` layers and ``heads`` heads."""
    if blocks in graph.hidden_scale_blocks:
        return (hidden // heads) ** -0.5  # llama.cpp divides the integers first
    return head_dim**-0.5
