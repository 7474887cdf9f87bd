"""Writing a GGUF file for llama.cpp: tensors under llama.cpp's names, then header, metadata and data.

``hf_flop.export_gguf`` reads a model into llama.cpp's layout (tensor kinds, per-layer shapes, the
vocabulary); this module only names the tensors as llama.cpp's loader looks them up and writes the
file, complete or not at all (``hf_flop.files.atomic_file``).
"""

from __future__ import annotations

from pathlib import Path

import gguf
import torch

from .files import atomic_file

Tensors = dict[str, tuple[torch.Tensor, torch.Tensor | None]]  # kind (a gguf.MODEL_TENSOR name) -> (weight, bias)


def file_name(kind: str, block: int | None = None) -> str:
    """llama.cpp's name of a tensor kind (``gguf.TENSOR_NAMES``), of transformer layer ``block`` where per layer."""
    base = gguf.TENSOR_NAMES[gguf.MODEL_TENSOR[kind]]
    return base.format(bid=block) if block is not None else base


def named_tensors(globals_: dict[str, torch.Tensor | None], layers: list[Tensors]) -> dict[str, torch.Tensor]:
    """Tensors by llama.cpp's file names: the model-wide ones (``None``: left out), then each layer's."""
    tensors = {file_name(kind) + ".weight": t for kind, t in globals_.items() if t is not None}
    for i, layer in enumerate(layers):
        for kind, (weight, bias) in layer.items():
            tensors[file_name(kind, i) + ".weight"] = weight
            if bias is not None:
                tensors[file_name(kind, i) + ".bias"] = bias
    return tensors


def write_gguf(
    path: Path, arch: str, name: str, hparams: dict, vocab: list, tensors: dict, matrix_dtype: torch.dtype
) -> Path:
    """The GGUF file: header, metadata (hyper-parameters, then the vocabulary), tensors; atomically.

    ``hparams`` are ``GGUFWriter.add_<key>`` calls, ``vocab`` ``add_key_value`` entries
    (``hf_flop.gguf_vocab``); matrices are stored as ``matrix_dtype`` (float32 or float16).
    """
    file_type = gguf.LlamaFileType.ALL_F32 if matrix_dtype == torch.float32 else gguf.LlamaFileType.MOSTLY_F16
    with atomic_file(path) as tmp:
        writer = gguf.GGUFWriter(tmp, arch)
        try:
            writer.add_name(name)
            writer.add_file_type(file_type)
            for key, value in hparams.items():
                getattr(writer, f"add_{key}")(value)
            for key, value, kind, sub_kind in vocab:
                writer.add_key_value(key, value, kind, sub_kind)
            for tensor_name, tensor in tensors.items():
                # llama.cpp keeps norms, biases and rope factors in f32 whatever the file type
                target = matrix_dtype if tensor.dim() > 1 else torch.float32
                writer.add_tensor(tensor_name, tensor.detach().to("cpu", target).contiguous().numpy())
            writer.write_header_to_file()
            writer.write_kv_data_to_file()
            writer.write_tensors_to_file()
        finally:
            writer.close()
    return path
