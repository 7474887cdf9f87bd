"""Safetensors checkpoint folders read one tensor at a time, and written one shard at a time.

``CheckpointReader`` opens ``model.safetensors`` or ``model.safetensors.index.json`` plus its shards
and hands out single tensors (``safetensors.safe_open``), so a caller holds only what it asked for;
it logs every key it read, which is how the streaming tests check that no layer is read twice or
early. ``ShardWriter`` writes each group of tensors (the embedding, one transformer layer, ...) to
its own shard as soon as it is complete, then the index that ``from_pretrained`` reads.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"


class CheckpointReader:
    """The tensors of a safetensors checkpoint folder, by key, read on demand (never all at once)."""

    def __init__(self, folder: str | os.PathLike) -> None:
        self.folder = Path(folder)
        index = self.folder / INDEX_FILE
        if index.is_file():
            weight_map = json.loads(index.read_text()).get("weight_map")
            if not isinstance(weight_map, dict) or not weight_map:
                raise ValueError(f"{index} has no 'weight_map'; it is not a safetensors index.")
            self.files = {key: self.folder / name for key, name in weight_map.items()}
        elif (self.folder / SINGLE_FILE).is_file():
            with safe_open(self.folder / SINGLE_FILE, framework="pt") as handle:
                self.files = {key: self.folder / SINGLE_FILE for key in handle.keys()}
        else:
            raise ValueError(
                f"{self.folder} holds neither {SINGLE_FILE} nor {INDEX_FILE}: streaming reads safetensors checkpoints "
                "(save the model with save_pretrained(..., safe_serialization=True), the default)."
            )
        missing = sorted({str(p.name) for p in self.files.values() if not p.is_file()})
        if missing:
            raise ValueError(f"{self.folder}: the index names shards that are not there: {missing[:3]}.")
        self.reads: list[str] = []  # every key read, in order

    def keys(self) -> list[str]:
        return list(self.files)

    def get(self, key: str) -> torch.Tensor:
        """The tensor ``key``, read from its file now."""
        with safe_open(self.files[key], framework="pt") as handle:
            tensor = handle.get_tensor(key)
        self.reads.append(key)
        return tensor

    def shape(self, key: str) -> tuple[int, ...]:
        """The shape of ``key`` without reading its data."""
        with safe_open(self.files[key], framework="pt") as handle:
            return tuple(handle.get_slice(key).get_shape())

    def read_prefix(self, prefix: str, strip: bool = True) -> dict[str, torch.Tensor]:
        """Every tensor whose key starts with ``prefix``; keys without it when ``strip``."""
        return {(k[len(prefix) :] if strip else k): self.get(k) for k in self.files if k.startswith(prefix)}


class ShardWriter:
    """Writes groups of tensors to shards ``model-0000k-of-0000n.safetensors`` as they come, then the index."""

    def __init__(self, folder: str | os.PathLike, shards: int) -> None:
        self.folder, self.shards = Path(folder), shards
        self.weight_map: dict[str, str] = {}
        self.total_size = 0
        self.written = 0

    def write(self, tensors: dict[str, torch.Tensor]) -> None:
        """One shard holding ``tensors`` (made contiguous CPU copies, as safetensors needs)."""
        if self.written >= self.shards:
            raise RuntimeError(f"ShardWriter was told of {self.shards} shards; a further one was written.")
        self.written += 1
        name = f"model-{self.written:05d}-of-{self.shards:05d}.safetensors"
        ready = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
        save_file(ready, str(self.folder / name), metadata={"format": "pt"})
        for key, value in ready.items():
            self.weight_map[key] = name
            self.total_size += value.numel() * value.element_size()

    def finish(self) -> None:
        """The index (all shards must have been written)."""
        if self.written != self.shards:
            raise RuntimeError(f"ShardWriter wrote {self.written} of {self.shards} shards.")
        index = {"metadata": {"total_size": self.total_size}, "weight_map": dict(sorted(self.weight_map.items()))}
        (self.folder / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
