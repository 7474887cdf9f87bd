"""Tiny random models of each supported architecture, for fast tests."""

from __future__ import annotations

import torch
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    DebertaV2Config,
    DebertaV2ForSequenceClassification,
    DistilBertConfig,
    DistilBertForSequenceClassification,
    Gemma2Config,
    Gemma2ForCausalLM,
    Gemma3ForCausalLM,
    Gemma3TextConfig,
    GPT2Config,
    GPT2LMHeadModel,
    GraniteConfig,
    GraniteForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    ModernBertConfig,
    ModernBertForSequenceClassification,
    Olmo2Config,
    Olmo2ForCausalLM,
    Phi3Config,
    Phi3ForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
    RobertaConfig,
    RobertaForSequenceClassification,
    SmolLM3Config,
    SmolLM3ForCausalLM,
)

VOCAB = 97


# the tiny sequence classifiers' sizes (BERT's config names)
_ENCODER = dict(
    vocab_size=VOCAB,
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    intermediate_size=64,
    max_position_embeddings=64,
    num_labels=2,
)


def tiny_bert(**overrides) -> BertForSequenceClassification:
    """``overrides``: other BertConfig values (e.g. dropout 0 where two routes must see the same forward)."""
    torch.manual_seed(0)
    return BertForSequenceClassification(BertConfig(**_ENCODER, **overrides))


def tiny_gpt2() -> GPT2LMHeadModel:
    torch.manual_seed(0)
    config = GPT2Config(
        vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64, bos_token_id=0, eos_token_id=0
    )
    return GPT2LMHeadModel(config)


def _gqa_kwargs() -> dict:
    return dict(
        vocab_size=VOCAB,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
        bos_token_id=0,
        eos_token_id=0,
        pad_token_id=0,
    )


def _tiny_gqa(model_class: type, config_class: type):
    """A tiny causal LM of a Llama-like family with grouped-query attention (``_gqa_kwargs``)."""
    torch.manual_seed(0)
    return model_class(config_class(**_gqa_kwargs()))


def tiny_llama(tie_word_embeddings: bool = False, **overrides) -> LlamaForCausalLM:
    """Llama with grouped-query attention: 4 query heads sharing 2 KV heads (``overrides``: other config values)."""
    torch.manual_seed(0)
    config = LlamaConfig(**{**_gqa_kwargs(), **overrides}, tie_word_embeddings=tie_word_embeddings)
    return LlamaForCausalLM(config)


def tiny_mqa_llama(num_key_value_heads: int = 1) -> LlamaForCausalLM:
    """Llama with multi-query attention: 4 query heads sharing one KV head (or ``num_key_value_heads``)."""
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(**{**_gqa_kwargs(), "num_key_value_heads": num_key_value_heads}))


def tiny_roberta() -> RobertaForSequenceClassification:
    torch.manual_seed(0)
    config = RobertaConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=70,  # positions start after pad_token_id
        pad_token_id=1,
        num_labels=2,
    )
    return RobertaForSequenceClassification(config)


def tiny_distilbert() -> DistilBertForSequenceClassification:
    torch.manual_seed(0)
    config = DistilBertConfig(
        vocab_size=VOCAB, dim=32, n_layers=2, n_heads=4, hidden_dim=64, max_position_embeddings=64, num_labels=2
    )
    return DistilBertForSequenceClassification(config)


def tiny_mistral() -> MistralForCausalLM:
    """Mistral with grouped-query attention (4 query heads, 2 KV heads)."""
    return _tiny_gqa(MistralForCausalLM, MistralConfig)


def tiny_qwen2() -> Qwen2ForCausalLM:
    """Qwen2 with grouped-query attention (4 query heads, 2 KV heads) and biased Q/K/V projections."""
    return _tiny_gqa(Qwen2ForCausalLM, Qwen2Config)


def tiny_olmo2() -> Olmo2ForCausalLM:
    """OLMo-2 with grouped-query attention; its q_norm/k_norm are RMS norms over the whole Q/K projections."""
    return _tiny_gqa(Olmo2ForCausalLM, Olmo2Config)


def tiny_phi3() -> Phi3ForCausalLM:
    """Phi-3 with grouped-query attention: fused qkv_proj ([q; k; v]) and gate_up_proj ([gate; up])."""
    return _tiny_gqa(Phi3ForCausalLM, Phi3Config)


def tiny_modernbert() -> ModernBertForSequenceClassification:
    """ModernBERT: fused Wqkv, GLU Wi ([input; gate]); layer 0 global attention, layer 1 a 4-token local window."""
    torch.manual_seed(0)
    ids = dict(pad_token_id=0, bos_token_id=1, eos_token_id=1, cls_token_id=1, sep_token_id=1)
    config = ModernBertConfig(**_ENCODER, global_attn_every_n_layers=2, local_attention=4, **ids)
    return ModernBertForSequenceClassification(config)


def tiny_deberta_v2(share_att_key: bool = False) -> DebertaV2ForSequenceClassification:
    """DeBERTa-v2/v3: disentangled attention with c2p and p2c relative positions (log buckets).

    Without ``share_att_key`` the positions have their own projections (pos_key_proj, pos_query_proj), cut with
    the heads; with it they go through key_proj and query_proj.
    """
    torch.manual_seed(0)
    config = DebertaV2Config(
        **_ENCODER,
        relative_attention=True,
        pos_att_type=["p2c", "c2p"],
        share_att_key=share_att_key,
        position_buckets=8,
        max_relative_positions=16,
        norm_rel_ebd="layer_norm",
        position_biased_input=False,
        type_vocab_size=0,
        pad_token_id=0,
    )
    return DebertaV2ForSequenceClassification(config)


# --- Llama-shaped families beyond Llama (table entries for their GGUF graphs) and families hf_flop's table lacks
# (their layouts are recognised from the modules, hf_flop.recognition): each config sets what its family adds to
# Llama away from its default, so compaction and reload must carry it


def tiny_qwen3(head_dim: int = 8) -> Qwen3ForCausalLM:
    """Qwen3: per-head q_norm/k_norm (shared across heads), a stated head size."""
    torch.manual_seed(0)
    return Qwen3ForCausalLM(Qwen3Config(**_gqa_kwargs(), head_dim=head_dim))


def tiny_gemma2() -> Gemma2ForCausalLM:
    """Gemma 2: scaled embeddings, soft-capping, query_pre_attn_scalar, sliding and full layers (window 4 < the inputs)."""
    torch.manual_seed(0)
    return Gemma2ForCausalLM(Gemma2Config(**_gqa_kwargs(), head_dim=8, query_pre_attn_scalar=16, sliding_window=4))


def tiny_gemma3_text() -> Gemma3ForCausalLM:
    """Gemma 3 (text): per-head norms, query_pre_attn_scalar, explicit layer_types (one sliding, one full)."""
    torch.manual_seed(0)
    config = Gemma3TextConfig(
        **_gqa_kwargs(),
        head_dim=8,
        query_pre_attn_scalar=16,
        sliding_window=4,
        layer_types=["sliding_attention", "full_attention"],
    )
    return Gemma3ForCausalLM(config)


def tiny_granite() -> GraniteForCausalLM:
    """Granite: embedding, residual, attention and logit multipliers (none at its default of 1)."""
    torch.manual_seed(0)
    config = GraniteConfig(
        **_gqa_kwargs(), embedding_multiplier=2.0, residual_multiplier=0.5, attention_multiplier=0.3, logits_scaling=2.0
    )
    return GraniteForCausalLM(config)


def tiny_smollm3() -> SmolLM3ForCausalLM:
    """SmolLM3: a layer without RoPE (no_rope_layers); the config derives the head size."""
    torch.manual_seed(0)
    return SmolLM3ForCausalLM(SmolLM3Config(**_gqa_kwargs(), no_rope_layers=[1, 0]))


# a static RoPE scaling (Llama 3's) for a tiny model: high frequencies kept, low ones divided by 8
LLAMA3_ROPE = {
    "rope_type": "llama3",
    "rope_theta": 10000.0,
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 32,
}

TINY_BUILDERS = {"bert": tiny_bert, "gpt2": tiny_gpt2, "llama": tiny_llama}
# every architecture of hf_flop.architectures.ARCHITECTURES, by model_type (the per-architecture checks)
ARCH_BUILDERS = {
    **TINY_BUILDERS,
    "roberta": tiny_roberta,
    "distilbert": tiny_distilbert,
    "mistral": tiny_mistral,
    "qwen2": tiny_qwen2,
    "olmo2": tiny_olmo2,
    "phi3": tiny_phi3,
    "modernbert": tiny_modernbert,
    "qwen3": tiny_qwen3,
    "gemma2": tiny_gemma2,
    "gemma3_text": tiny_gemma3_text,
    "deberta-v2": tiny_deberta_v2,
}
# families outside the table whose recognised layout the per-architecture checks cover too
RECOGNISED_BUILDERS = {
    "granite": tiny_granite,
    "smollm3": tiny_smollm3,
}
ALL_BUILDERS = {**ARCH_BUILDERS, **RECOGNISED_BUILDERS}


# --- mixture-of-experts families (hf_flop.experts): tested in tests/test_experts.py, not by the generic checks ---


def tiny_qwen3_moe(**overrides):
    """Qwen3-MoE: 3 layers, layer 0 a dense MLP (mlp_only_layers), layers 1-2 with 6 experts of width 16, top-2
    renormalised, eager experts (the default grouped_mm needs wider tensors) (``overrides``: other config values)."""
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    torch.manual_seed(0)
    kwargs = {**_gqa_kwargs(), "num_hidden_layers": 3, "head_dim": 8, "num_experts": 6, "num_experts_per_tok": 2}
    kwargs.update(moe_intermediate_size=16, norm_topk_prob=True, mlp_only_layers=[0], experts_implementation="eager")
    kwargs.update(overrides)
    return Qwen3MoeForCausalLM(Qwen3MoeConfig(**kwargs))


def tiny_mixtral(**overrides):
    """Mixtral: every layer a MoE of 4 experts of width 16, top-2."""
    from transformers import MixtralConfig, MixtralForCausalLM

    torch.manual_seed(0)
    kwargs = {**_gqa_kwargs(), "num_local_experts": 4, "num_experts_per_tok": 2, "intermediate_size": 16}
    kwargs["experts_implementation"] = "eager"  # the default grouped_mm needs wider tensors than a tiny model's
    return MixtralForCausalLM(MixtralConfig(**{**kwargs, **overrides}))


# the MoE entries of hf_flop.architectures.ARCHITECTURES
MOE_BUILDERS = {"qwen3_moe": tiny_qwen3_moe, "mixtral": tiny_mixtral}


def tiny_inputs(batch: int = 2, length: int = 7) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return {"input_ids": torch.randint(1, VOCAB, (batch, length), generator=g)}


_TOKENIZER_TEXT = [
    "the cat sat on the mat, and the dog sat on a log.",
    "a bird flew over 3 trees! did it? yes: 42 times.",
    "one two three four five six seven eight nine ten",
]


def tiny_bpe_tokenizer():
    """A byte-level BPE tokenizer (GPT-2 style) with exactly ``VOCAB`` tokens; ``<|endoftext|>`` (id 0) is BOS/EOS/pad.

    Trained (deterministically) on three sentences, so the tiny causal LMs can be run by engines that need
    a real vocabulary (llama.cpp).
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=["<|endoftext|>"], show_progress=False)
    backend.train_from_iterator(_TOKENIZER_TEXT * 20, trainer)
    special = "<|endoftext|>"
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token=special, eos_token=special, pad_token=special)
