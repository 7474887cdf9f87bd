"""Tokenisation for the two tasks: truncated classification rows, and language-modelling blocks."""

from __future__ import annotations


def tokenize_classification(dataset, tokenizer, *, text_column: str, label_column: str, max_length: int):
    """Tokenize ``text_column`` (truncated to ``max_length``, unpadded) and keep ``label_column`` as ``labels``.

    Every other column is dropped so the result feeds a ``DataCollatorWithPadding`` and a model directly.
    """

    def encode(batch):
        encoded = tokenizer(batch[text_column], truncation=True, max_length=max_length)
        encoded["labels"] = batch[label_column]
        return encoded

    return dataset.map(encode, batched=True, remove_columns=dataset.column_names)


def tokenize_lm(dataset, tokenizer, *, text_column: str, block_size: int):
    """Concatenate the texts (one per row, newline-separated) and cut them into ``block_size``-token blocks.

    Each block gets ``labels = input_ids`` (the model shifts them). The incomplete last block is
    dropped, as in transformers' ``run_clm`` example.
    """

    def encode(batch):
        return tokenizer([text + "\n" for text in batch[text_column]])

    def group(batch):
        ids = [t for seq in batch["input_ids"] for t in seq]
        n = len(ids) // block_size * block_size
        blocks = [ids[i : i + block_size] for i in range(0, n, block_size)]
        return {"input_ids": blocks, "attention_mask": [[1] * block_size for _ in blocks], "labels": blocks}

    tokens = dataset.map(encode, batched=True, remove_columns=dataset.column_names)
    return tokens.map(group, batched=True, batch_size=1000, remove_columns=tokens.column_names)
