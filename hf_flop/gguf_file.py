"""Writing a GGUF file for llama.cpp: tensors under llama.cpp's names, then header, metadata and data.

``hf_flop.export_gguf`` reads a model into llama.cpp's layout (tensor kinds, per-layer shapes, the
vocabulary); this module only names the tensors as llama.cpp's loader looks them up and writes the
file, complete or not at all (``hf_flop.files.atomic_file``).
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import gguf
import numpy as np
import torch

from .files import atomic_file
from .gguf_quant import file_type, is_llama_cpp, llama_cpp_quantize, quantized, tensor_types, warn_kept

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


def write_gguf(path: Path, arch: str, name: str, hparams: dict, vocab: list, tensors: dict, quantization: str) -> Path:
    """The GGUF file: header, metadata (hyper-parameters, then the vocabulary), tensors; atomically.

    ``hparams`` are ``GGUFWriter.add_<key>`` calls, ``vocab`` ``add_key_value`` entries
    (``hf_flop.gguf_vocab``); tensors are stored as ``quantization`` gives (``hf_flop.gguf_quant``): by the
    gguf package, or for a K-quant as f32 first, which llama.cpp's quantizer then rewrites.
    """
    with atomic_file(path) as tmp:
        if not is_llama_cpp(quantization):
            _write(tmp, arch, name, hparams, vocab, tensors, quantization)
        else:
            with tempfile.TemporaryDirectory(dir=tmp.parent, prefix=f".{path.name}.f32-") as folder:
                source = Path(folder) / "f32.gguf"
                _write(source, arch, name, hparams, vocab, tensors, "f32")
                llama_cpp_quantize(source, tmp, quantization)
    return path


def _write(path: Path, arch: str, name: str, hparams: dict, vocab: list, tensors: dict, quantization: str) -> None:
    """One GGUF file by the gguf package, its tensors in the types ``tensor_types`` gives."""
    types, kept = tensor_types(tensors, quantization)
    if kept:
        warn_kept(kept, quantization, 32, "f16")  # every block type the gguf package writes here has 32 values
    writer = gguf.GGUFWriter(path, arch)
    try:
        writer.add_name(name)
        writer.add_file_type(file_type(quantization))
        for key, value in hparams.items():
            getattr(writer, f"add_{key}")(value)
        for key, value, kind, sub_kind in vocab:
            writer.add_key_value(key, value, kind, sub_kind)
        for tensor_name, tensor in tensors.items():
            qtype = types[tensor_name]
            data = quantized(tensor, qtype)
            writer.add_tensor(tensor_name, data, raw_dtype=qtype if data.dtype == np.uint8 else None)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
    finally:
        writer.close()
