"""A tiny Llama (grouped-query attention) and a small learnable LM task, shared by the trainer tests.

The task: each sequence counts up from a random start by a stride of 1, 2 or 3 (mod the vocabulary);
after two tokens the rest is predictable, so the loss falls quickly from log(vocab).
"""

from __future__ import annotations

import torch
from torch.utils.data import Dataset
from transformers import LlamaConfig, LlamaForCausalLM

VOCAB = 64
SEQ_LEN = 16


def tiny_llama(seed: int = 0, hidden: int = 48, layers: int = 2) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=2 * hidden,
        max_position_embeddings=SEQ_LEN,
        tie_word_embeddings=True,
    )
    return LlamaForCausalLM(config)


class CountingTask(Dataset):
    """``n`` sequences ``start, start + k, start + 2k, ...`` (mod VOCAB), with labels = input_ids."""

    def __init__(self, n: int = 256, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        start = torch.randint(0, VOCAB, (n, 1), generator=g)
        stride = torch.randint(1, 4, (n, 1), generator=g)
        self.ids = (start + stride * torch.arange(SEQ_LEN)) % VOCAB

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "labels": self.ids[i]}
