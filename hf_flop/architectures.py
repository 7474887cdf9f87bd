"""Where each supported architecture keeps its attention heads and FFN rows: the one architecture table.

Everything architecture-specific in hf_flop reads this table; no other module tests ``model_type``.
A model whose ``model_type`` is missing here gets its layout recognised from its modules and config
(``hf_flop.recognition``, which keeps what it found in ``RECOGNISED``); the table holds what
recognition cannot know (the GGUF graph, what a stock config needs). To add an architecture, add one
``ArchSpec`` to ``ARCHITECTURES`` (names are relative to one transformer layer): hf_flop verifies an
entry it does not ship on a small copy before using it, and the test suite's per-architecture checks
take a tiny config of it.

Vocabulary: a *layer* is one transformer layer (an entry of ``model.encoder.layer`` or
``model.layers``); MLPruning's weight *blocks* (level ``"block"``) are another thing entirely.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, replace

from torch import nn

from .gguf_graphs import GRAPHS
from .linear import linear_shape
from .modeling import TYPE_PREFIX

PROJECTIONS = ("q", "k", "v")  # what a projection norm may normalise
HEAD_COUNTS = ("heads", "kv_heads", "q_width", "group_size")  # what an attention attribute may count
EXPERT_COUNTS = ("experts", "width")  # what an experts or router attribute may count


@dataclass(frozen=True)
class ExpertsSpec:
    """Where a mixture-of-experts layer keeps its experts and router (names relative to a transformer layer).

    The experts are one module holding 3-D parameters: ``gate_up`` of shape ``(experts, 2 * width, hidden)``
    (each expert's gate rows, then its up rows) and ``down`` of shape ``(experts, hidden, width)``; it is
    called as ``experts(hidden, top_k_index, top_k_weights)``. The router holds ``router_weight``
    ``(experts, hidden)``; it takes the softmax of its logits, then the top ``top_k_attr`` experts, whose
    weights it renormalises to sum 1 when ``renormalise`` says so (a config attribute, or always / never).
    A layer without the experts module (``mlp_only_layers``, ``decoder_sparse_step``) is a dense layer.
    """

    experts: str = "mlp.experts"
    router: str = "mlp.gate"
    gate_up: str = "gate_up_proj"
    down: str = "down_proj"
    router_weight: str = "weight"
    # config attribute: experts per MoE layer (the stored name: Qwen3-MoE and Mixtral map num_experts to it)
    count_attr: str = "num_local_experts"
    width_attr: str = "moe_intermediate_size"  # config attribute: each expert's FFN width
    top_k_attr: str = "num_experts_per_tok"
    renormalise: str | bool = "norm_topk_prob"  # config attribute, or True / False
    weights_in_logits_dtype: bool = True  # the routing weights are cast back to the logits' dtype
    # attributes compaction rewrites on the experts module and on the router -> what they count
    experts_attrs: dict[str, str] = field(default_factory=lambda: {"num_experts": "experts", "intermediate_dim": "width"})
    router_attrs: dict[str, str] = field(default_factory=lambda: {"num_experts": "experts"})

    def __post_init__(self) -> None:
        what = (set(self.experts_attrs.values()) | set(self.router_attrs.values())) - set(EXPERT_COUNTS)
        if what:
            raise ValueError(
                f"ExpertsSpec attribute maps say what an attribute counts, one of {list(EXPERT_COUNTS)}; got {sorted(what)}."
            )
NORM_KINDS = ("rms", "layer")  # what a residual norm computes (ArchSpec.norm_kind)


@dataclass(frozen=True)
class ArchSpec:
    """Layout of one architecture, in names relative to a transformer layer.

    ``q``/``k``/``v`` may name the same module (``fused_qkv``: GPT-2's ``c_attn``, Phi-3's ``qkv_proj``,
    ModernBERT's ``Wqkv``); the slices' offsets then follow from each layer's head counts.
    ``up`` lists every FFN producer whose output rows are the intermediate neurons (gate and up
    projections for gated MLPs); ``down`` consumes them. A producer may hold several equal chunks of
    those rows (``up_chunks``: Phi-3's ``gate_up_proj`` is ``[gate; up]``).

    Norms inside the attention: a norm over one head's ``head_dim`` (Qwen3's, Gemma 3's ``q_norm`` and
    ``k_norm``) is shared by every head, so nothing of it is cut and it needs no field. An RMS norm
    over a whole projection's width (OLMo-2's) is listed in ``projection_norms``: its weight is cut
    with the heads, and its mean of squares covers the heads compaction keeps (``hf_flop.projection_norms``).

    ``head_extra_producers`` lists further modules whose output rows are per-head slices of a
    projection's, mapped to the projection (``"q"``, ``"k"`` or ``"v"``) whose slicing they follow:
    they are cut with the heads. DeBERTa-v2's relative-position projections (``pos_query_proj`` like
    q, ``pos_key_proj`` like k) are such; a layer without one (``share_att_key``) simply has nothing
    extra to cut.

    ``attention_head_attrs`` names what compaction rewrites on each attention module (``"heads"``,
    ``"kv_heads"``, ``"q_width"`` or ``"group_size"``, the query heads per KV head, which level
    ``"query_head"`` changes); a dotted name such as ``"config.num_attention_heads"`` gives that
    module its own view of the config with the value changed (Phi-3 slices ``qkv_proj`` by the config).
    """

    layers: str  # regex matched (as a suffix) against the name of the ModuleList of transformer layers
    attention: str  # the attention module; its head-count attributes are rewritten at compaction
    q: str
    k: str
    v: str
    o: str
    up: tuple[str, ...]
    down: str
    heads_attr: str
    kv_heads_attr: str | None  # None: as many KV heads as query heads
    hidden_attr: str
    head_dim_attr: str | None = None  # None: hidden // heads
    # q, k, v are consecutive slices of one module's output: q (heads * head_dim), then k and v
    # (kv_heads * head_dim each), offsets computed per layer from its head counts
    fused_qkv: bool = False
    up_chunks: int = 1  # each `up` module's output is this many equal chunks of the FFN rows ([gate; up])
    projection_norms: dict[str, str] = field(default_factory=dict)  # RMS norm over a whole projection -> "q"/"k"
    head_extra_producers: dict[str, str] = field(default_factory=dict)  # module cut with the heads -> "q"/"k"/"v"
    attention_head_attrs: dict[str, str] = field(default_factory=dict)  # attr -> what it counts
    embeddings: tuple[str, ...] = ()  # input embedding module name(s), for level "embedding"
    intermediate_attr: str | None = None  # config attribute of the FFN width (compaction to a stock config)
    # the llama.cpp graph that computes this architecture (a key of gguf_graphs.GRAPHS); None: no GGUF export.
    # Mistral and Qwen2 are Llama plus optional biases, which llama.cpp's llama/deci graphs load
    gguf: str | None = None
    # mixture-of-experts layers (hf_flop.experts): levels "expert" and "row" inside the experts; None: no MoE
    experts: ExpertsSpec | None = None
    # each sublayer (attention, FFN) adds its output to a residual stream that no norm follows inside the layer
    # (pre-norm decoders, Gemma's and OLMo-2's norms on the branch itself): a zero branch is exactly the sublayer
    # skipped, so level "layer" can remove a sublayer alone. False for post-norm layers (BERT's LayerNorm(h + f(h)))
    pre_norm_residual: bool = False
    # the modules whose outputs are the attention and the FFN residual branches (what is added to the stream),
    # where a sublayer gate multiplies; None: the output projections ``o`` and ``down``. A norm on the branch
    # (Gemma's post_attention_layernorm) must be named: gating its input would be normalised away
    branch_outputs: tuple[str, str] | None = None
    # config flags that make a layer compute with its own index (GPT-2's scale_attn_by_inverse_layer_idx): when
    # set, removing layers would change the layers after them, so compaction refuses it
    layer_index_flags: tuple[str, ...] = ()
    # layers built unlike the others by position (ModernBERT's layer 0 has no attention norm): renumbering could not
    # rebuild them, so level "layer" gives them no unit (indices into the layer list)
    fixed_layers: tuple[int, ...] = ()
    # config lists with one entry per layer, cut to the kept layers when level "layer" removes some (a list that
    # only happens to be as long as the layers, such as DeBERTa's pos_att_type, is not one)
    layer_lists: tuple[str, ...] = ("layer_types", "no_rope_layers")
    # level "hidden" (residual-stream channels, hf_flop.hidden); empty: the level is refused. Names relative to
    # the base model (model.base_model) unless said: the embeddings whose outputs enter the residual stream
    residual_embeddings: tuple[str, ...] = ()
    residual_norms: tuple[str, ...] = ()  # per layer (relative to a layer): norms over the residual width
    model_norms: tuple[str, ...] = ()  # norms over the residual width outside the layers, besides final_norm
    final_norm: str | None = None  # the norm whose output the task head reads
    residual_heads: tuple[str, ...] = ()  # task-model linears reading the residual stream (those the class has)
    norm_kind: str = "rms"  # "rms" (x / RMS(x)) or "layer" (LayerNorm: centred, then divided by the std)
    norm_eps_attr: str = "variance_epsilon"  # the norm modules' epsilon attribute

    def __post_init__(self) -> None:
        if self.up_chunks < 1:
            raise ValueError(
                f"ArchSpec.up_chunks must be at least 1 (chunks of FFN rows per up module), got {self.up_chunks}."
            )
        bad = {norm: proj for norm, proj in self.projection_norms.items() if proj not in PROJECTIONS}
        if bad:
            raise ValueError(
                f"ArchSpec.projection_norms maps each norm to the projection it normalises, one of "
                f"{sorted(PROJECTIONS)}; got {bad}."
            )
        if self.gguf is not None and self.gguf not in GRAPHS:
            raise ValueError(f"ArchSpec.gguf names a llama.cpp graph of {sorted(GRAPHS)}, got {self.gguf!r}.")
        bad = {m: proj for m, proj in self.head_extra_producers.items() if proj not in PROJECTIONS}
        if bad:
            raise ValueError(
                f"ArchSpec.head_extra_producers maps each module to the projection whose head slicing it follows, one "
                f"of {sorted(PROJECTIONS)}; got {bad}."
            )
        if self.norm_kind not in NORM_KINDS:
            raise ValueError(f"ArchSpec.norm_kind must be one of {list(NORM_KINDS)}, got {self.norm_kind!r}.")
        what = set(self.attention_head_attrs.values()) - set(HEAD_COUNTS)
        if what:
            raise ValueError(
                f"ArchSpec.attention_head_attrs values say what an attribute counts, one of {list(HEAD_COUNTS)}; "
                f"got {sorted(what)}."
            )

    def default_targets(self, model: nn.Module | None = None) -> list[str]:
        """The projections pruned by default; with ``model``, the ``head_extra_producers`` it lacks left out."""
        extras = set(self.head_extra_producers)
        if model is not None:
            extras = {e for e in extras if any(n.endswith(f".{e}") for n, _ in model.named_modules())}
        return sorted({self.q, self.k, self.v, self.o, *self.up, self.down, *extras})

    @property
    def branches(self) -> tuple[str, str]:
        """The attention and FFN residual-branch outputs (``branch_outputs``, or ``o`` and ``down``)."""
        return self.branch_outputs or (self.o, self.down)

    @property
    def ffn(self) -> str:
        """The FFN module (the common parent of ``up`` and ``down``), or "" when they sit in the layer itself."""
        parents = {name.rpartition(".")[0] for name in (*self.up, self.down)}
        return parents.pop() if len(parents) == 1 else ""

    @property
    def hidden_pruning(self) -> bool:
        """Whether level ``"hidden"`` knows this layout: its residual embeddings and norms are named."""
        return bool(self.residual_embeddings and self.residual_norms)

    @property
    def stock_head_pruning(self) -> bool:
        """Whether a stock config can describe fewer heads of the same size (``uniform_shapes`` with heads).

        Only a config that states the head size itself (``head_dim_attr``) can; BERT-, DistilBERT- and
        GPT-2-style configs derive it as ``hidden // heads``, so fewer heads there would be wider heads.
        """
        return self.head_dim_attr is not None


_BERT = ArchSpec(
    layers=r"encoder\.layer",
    attention="attention.self",
    q="attention.self.query",
    k="attention.self.key",
    v="attention.self.value",
    o="attention.output.dense",
    up=("intermediate.dense",),
    down="output.dense",
    heads_attr="num_attention_heads",
    kv_heads_attr=None,
    hidden_attr="hidden_size",
    attention_head_attrs={"num_attention_heads": "heads", "all_head_size": "q_width"},
    intermediate_attr="intermediate_size",
)

_LLAMA = ArchSpec(
    layers=r"layers",
    attention="self_attn",
    q="self_attn.q_proj",
    k="self_attn.k_proj",
    v="self_attn.v_proj",
    o="self_attn.o_proj",
    up=("mlp.gate_proj", "mlp.up_proj"),
    down="mlp.down_proj",
    heads_attr="num_attention_heads",
    kv_heads_attr="num_key_value_heads",
    hidden_attr="hidden_size",
    head_dim_attr="head_dim",
    attention_head_attrs={"num_key_value_groups": "group_size"},  # repeat_kv's factor
    intermediate_attr="intermediate_size",
    gguf="llama",
    pre_norm_residual=True,
    residual_embeddings=("embed_tokens",),
    residual_norms=("input_layernorm", "post_attention_layernorm"),
    final_norm="norm",
    residual_heads=("lm_head", "score"),
)
# what level "hidden" needs to be off for a Llama variant whose norms differ (OLMo-2's norms after each sublayer)
_GEMMA_BRANCHES = ("post_attention_layernorm", "post_feedforward_layernorm")  # the norms on the residual branches
_NO_HIDDEN = {"residual_embeddings": (), "residual_norms": (), "final_norm": None, "residual_heads": ()}


def _fused_qkv(module: str) -> dict:
    """The fields of q, k and v as consecutive slices of one module's output (``[q; k; v]``)."""
    return {"q": module, "k": module, "v": module, "fused_qkv": True}


ARCHITECTURES: dict[str, ArchSpec] = {
    "bert": _BERT,
    "roberta": _BERT,
    "distilbert": ArchSpec(
        layers=r"transformer\.layer",
        attention="attention",
        q="attention.q_lin",
        k="attention.k_lin",
        v="attention.v_lin",
        o="attention.out_lin",
        up=("ffn.lin1",),
        down="ffn.lin2",
        heads_attr="n_heads",
        kv_heads_attr=None,
        hidden_attr="dim",
        attention_head_attrs={"n_heads": "heads"},
        intermediate_attr="hidden_dim",
    ),
    "gpt2": ArchSpec(
        layers=r"h",
        attention="attn",
        **_fused_qkv("attn.c_attn"),
        o="attn.c_proj",
        up=("mlp.c_fc",),
        down="mlp.c_proj",
        heads_attr="n_head",
        kv_heads_attr=None,
        hidden_attr="n_embd",
        attention_head_attrs={"num_heads": "heads", "split_size": "q_width", "embed_dim": "q_width"},
        intermediate_attr="n_inner",
        pre_norm_residual=True,
        layer_index_flags=("scale_attn_by_inverse_layer_idx",),
    ),
    "llama": _LLAMA,
    "mistral": _LLAMA,
    "qwen2": _LLAMA,
    # Llama with per-head q_norm/k_norm (over head_dim, shared by the heads: nothing of them is cut)
    "qwen3": replace(_LLAMA, gguf="qwen3"),
    # Llama-shaped with Gemma's norms around each sublayer (over the hidden size: not cut), scaled embeddings,
    # soft-capping and sliding-window layers; Gemma 3 adds Qwen3's per-head q/k norms
    # (level "hidden" is off: the norms on each sublayer's output would undo the channel gate's folded values, and
    # the embedding scale sqrt(hidden_size) follows the config's width)
    "gemma2": replace(_LLAMA, gguf="gemma2", branch_outputs=_GEMMA_BRANCHES, **_NO_HIDDEN),
    "gemma3_text": replace(_LLAMA, gguf="gemma3", branch_outputs=_GEMMA_BRANCHES, **_NO_HIDDEN),
    # Llama with RMS norms over the whole q and k projections (and norms after each sublayer, not cut)
    "olmo2": replace(
        _LLAMA,
        projection_norms={"self_attn.q_norm": "q", "self_attn.k_norm": "k"},
        gguf=None,
        branch_outputs=("post_attention_layernorm", "post_feedforward_layernorm"),
        **_NO_HIDDEN,
    ),
    # Llama with fused [q; k; v] and [gate; up] projections; its attention slices qkv_proj at
    # config.num_attention_heads * head_dim and its own num_key_value_heads
    "phi3": replace(
        _LLAMA,
        **_fused_qkv("self_attn.qkv_proj"),
        up=("mlp.gate_up_proj",),
        up_chunks=2,
        attention_head_attrs={
            "config.num_attention_heads": "heads",
            "num_key_value_heads": "kv_heads",
            "num_key_value_groups": "group_size",
        },
        gguf=None,
    ),
    # BERT-shaped, with disentangled attention: relative-position projections of the shared relative embeddings,
    # per head like q and k (absent with share_att_key, where the positions go through query_proj/key_proj)
    "deberta-v2": replace(
        _BERT,
        q="attention.self.query_proj",
        k="attention.self.key_proj",
        v="attention.self.value_proj",
        head_extra_producers={"attention.self.pos_query_proj": "q", "attention.self.pos_key_proj": "k"},
    ),
    # the encoder: Wqkv is [q; k; v] (equal thirds), Wi is [input; gate] (a GLU); local and global layers alike
    "modernbert": ArchSpec(
        layers=r"layers",
        attention="attn",
        **_fused_qkv("attn.Wqkv"),
        o="attn.Wo",
        up=("mlp.Wi",),
        up_chunks=2,
        down="mlp.Wo",
        heads_attr="num_attention_heads",
        kv_heads_attr=None,
        hidden_attr="hidden_size",
        intermediate_attr="intermediate_size",
        pre_norm_residual=True,
        fixed_layers=(0,),
    ),
    # Qwen3 attention (per-head q/k norms, nothing to cut); MoE MLPs, dense ones in mlp_only_layers
    "qwen3_moe": replace(_LLAMA, experts=ExpertsSpec(), gguf=None),
    # every layer a MoE; the routing weights always renormalised, kept in float32
    "mixtral": replace(
        _LLAMA,
        experts=ExpertsSpec(width_attr="intermediate_size", renormalise=True, weights_in_logits_dtype=False),
        intermediate_attr=None,
        gguf=None,
    ),
}


# the entries hf_flop ships, checked by its test suite; any other spec is verified before use (hf_flop.recognition)
BUILT_IN: dict[str, ArchSpec] = dict(ARCHITECTURES)
# layouts recognised from a model in this process, by model_type (filled by hf_flop.recognition.spec_for)
RECOGNISED: dict[str, ArchSpec] = {}


class UnsupportedArchitectureError(ValueError):
    """Raised for a model whose layout is not in the structure table and could not be recognised or verified."""


def base_model_type(model_type: str | None) -> str | None:
    """``model_type`` itself, or for a model compacted by hf_flop (``"flop_llama"``) the one it came from."""
    if model_type and model_type.startswith(TYPE_PREFIX):
        return model_type[len(TYPE_PREFIX) :]
    return model_type


def arch_spec(model_type: str | None) -> ArchSpec:
    """The table entry of ``model_type`` (or the layout recognised for it in this process), or a clear error.

    For a model at hand, ``hf_flop.recognition.spec_for(model)`` also recognises and verifies layouts.
    """
    model_type = base_model_type(model_type)
    if model_type in ARCHITECTURES:
        return ARCHITECTURES[model_type]
    if model_type in RECOGNISED:
        return RECOGNISED[model_type]
    raise UnsupportedArchitectureError(
        f"hf_flop does not know the layout of model_type={model_type!r}. Supported: "
        f"{sorted(ARCHITECTURES)}. For rank pruning of other models pass explicit `target_modules`; "
        "for head/row pruning pass the model to hf_flop.recognition.spec_for (it recognises Llama-shaped layouts), "
        "or add an ArchSpec for it to hf_flop/architectures.py (ARCHITECTURES)."
    )


@dataclass(frozen=True)
class LayerLayout:
    """One transformer layer's concrete numbers and module names (absolute, in the model)."""

    prefix: str  # e.g. "bert.encoder.layer.3"
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int  # the dense FFN width; 0 in a mixture-of-experts layer (hf_flop.experts)

    @property
    def group_size(self) -> int:
        return self.heads // self.kv_heads


def find_layers(model: nn.Module, spec: ArchSpec) -> list[str]:
    """Absolute names of the transformer layers (children of the matched ModuleList)."""
    pattern = re.compile(rf"(^|.*\.){spec.layers}$")
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and pattern.match(name):
            return [f"{name}.{i}" for i in range(len(module))]
    raise UnsupportedArchitectureError(f"no ModuleList matching {spec.layers!r} was found in {type(model).__name__}.")


def layer_layouts(model: nn.Module, spec: ArchSpec) -> list[LayerLayout]:
    """Per-layer head counts and widths, read from the modules themselves (so compacted models work too)."""
    config = model.config
    heads = getattr(config, spec.heads_attr)
    hidden = getattr(config, spec.hidden_attr)
    head_dim = getattr(config, spec.head_dim_attr, None) if spec.head_dim_attr else None
    head_dim = head_dim or hidden // heads
    layouts = []
    modules = dict(model.named_modules())
    for prefix in find_layers(model, spec):
        o = modules[f"{prefix}.{spec.o}"]
        down = modules.get(f"{prefix}.{spec.down}")  # None in a mixture-of-experts layer
        q_width = linear_shape(o)[1]
        layer_heads = q_width // head_dim
        layer_kv_heads = layer_heads
        if spec.kv_heads_attr:  # from K's rows: query heads may have gone while every KV head stayed
            k_rows = linear_shape(modules[f"{prefix}.{spec.k}"])[0]
            layer_kv_heads = (k_rows - q_width) // 2 // head_dim if spec.fused_qkv else k_rows // head_dim
        layouts.append(
            LayerLayout(
                prefix=prefix,
                heads=layer_heads,
                kv_heads=max(1, layer_kv_heads),
                head_dim=head_dim,
                intermediate=linear_shape(down)[1] if down is not None else 0,
            )
        )
    return layouts
