"""Tiny random models of each supported architecture, for fast tests."""

from __future__ import annotations

import torch
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    DistilBertConfig,
    DistilBertForSequenceClassification,
    GPT2Config,
    GPT2LMHeadModel,
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
    RobertaConfig,
    RobertaForSequenceClassification,
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


def tiny_llama(tie_word_embeddings: bool = False) -> LlamaForCausalLM:
    """Llama with grouped-query attention: 4 query heads sharing 2 KV heads."""
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(**_gqa_kwargs(), tie_word_embeddings=tie_word_embeddings))


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
# every architecture of hf_flop.structures.ARCHITECTURES, by model_type (the per-architecture checks)
ARCH_BUILDERS = {
    **TINY_BUILDERS,
    "roberta": tiny_roberta,
    "distilbert": tiny_distilbert,
    "mistral": tiny_mistral,
    "qwen2": tiny_qwen2,
    "olmo2": tiny_olmo2,
    "phi3": tiny_phi3,
    "modernbert": tiny_modernbert,
}


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
