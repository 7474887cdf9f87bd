"""Quantized GGUF files: which ggml type each tensor is stored as, and who quantizes it.

``export_gguf(..., quantization=...)`` takes llama.cpp's file-type names. Two quantizers are used:

* the ``gguf`` package's own (``gguf.quants.quantize``) for the types it implements: ``f32``, ``f16``,
  ``bf16``, ``q8_0``, ``q4_0``, ``q4_1``, ``q5_0``, ``q5_1`` (blocks of 32 values, one scale each);
* llama.cpp's (``llama_cpp.llama_model_quantize``, from llama-cpp-python) for the K-quant mixes
  ``q2_k`` ... ``q6_k``: the model is written as an f32 GGUF first, which llama.cpp then quantizes
  with its own per-tensor choices. gguf-py cannot write K-quants (its K-quant classes only dequantize).

Which tensor gets which type follows llama.cpp (``convert_hf_to_gguf.py`` and ``src/llama-quant.cpp``):

* 1-D tensors (norms, biases, ``rope_freqs``) stay f32: llama.cpp's kernels take them only as f32.
* The output matrix (``output.weight``, or ``token_embd.weight`` when the embedding is tied and doubles
  as the output) gets more bits: llama.cpp's quantizer stores it as Q6_K for every type but Q8_0. The
  ``gguf`` package cannot write Q6_K, so for ``q4_*`` / ``q5_*`` it is written as Q8_0 -- what llama.cpp
  itself falls back to when Q6_K does not fit. An untied token embedding takes the file's type.
* A matrix whose rows (its input width; after pruning e.g. 40 FFN rows) are not a multiple of the
  type's block (32 here) is kept in f16, as both llama.cpp tools do, with a ``GGUFExportWarning``.
  llama.cpp's quantizer demotes K-quants (blocks of 256) itself: Q4_K -> Q5_0, Q5_K -> Q5_1,
  Q6_K -> Q8_0, Q2_K / Q3_K -> Q4_0, and to f16 when that does not fit either; the warning lists them.
"""

from __future__ import annotations

import importlib
import warnings
from collections.abc import Callable

import numpy as np
import torch

from .gguf_graphs import GGUFExportWarning

# quantization -> (ggml type name of its matrices, llama.cpp file type name), written by the gguf package
PYTHON_TYPES = {
    "f32": ("F32", "ALL_F32"),
    "f16": ("F16", "MOSTLY_F16"),
    "bf16": ("BF16", "MOSTLY_BF16"),
    "q8_0": ("Q8_0", "MOSTLY_Q8_0"),
    "q5_1": ("Q5_1", "MOSTLY_Q5_1"),
    "q5_0": ("Q5_0", "MOSTLY_Q5_0"),
    "q4_1": ("Q4_1", "MOSTLY_Q4_1"),
    "q4_0": ("Q4_0", "MOSTLY_Q4_0"),
}
# quantization -> llama.cpp's file type (the LLAMA_FTYPE_* of llama_model_quantize), quantized by llama.cpp
LLAMA_CPP_TYPES = {
    "q6_k": "MOSTLY_Q6_K",
    "q5_k_m": "MOSTLY_Q5_K_M",
    "q5_k_s": "MOSTLY_Q5_K_S",
    "q4_k_m": "MOSTLY_Q4_K_M",
    "q4_k_s": "MOSTLY_Q4_K_S",
    "q3_k_l": "MOSTLY_Q3_K_L",
    "q3_k_m": "MOSTLY_Q3_K_M",
    "q3_k_s": "MOSTLY_Q3_K_S",
    "q2_k": "MOSTLY_Q2_K",
}
QUANTIZATIONS = (*PYTHON_TYPES, *LLAMA_CPP_TYPES)
K_BLOCK = 256  # values per K-quant block


def resolve_quantization(quantization: str | None, dtype: str | None, name: Callable[[str], str]) -> str:
    """The file's quantization from ``export_gguf``'s ``quantization`` and older ``dtype``, refused before any work.

    ``dtype`` (``"f32"`` / ``"f16"``) is the float subset of ``quantization``; given both, they must agree.
    ``name`` words a parameter as the caller's interface calls it (``hf_flop.naming.ParameterNames``).
    """
    if dtype is not None and dtype not in ("f32", "f16"):
        raise ValueError(
            f"export_gguf: {name('dtype')}={dtype!r} is not one of 'f32', 'f16'; for other types pass "
            f"{name('quantization')} (one of {', '.join(QUANTIZATIONS)})."
        )
    if quantization is None:
        return dtype or "f32"
    if not isinstance(quantization, str) or quantization.lower() not in QUANTIZATIONS:
        raise ValueError(
            f"export_gguf: {name('quantization')}={quantization!r} is not a GGUF type hf_flop writes. The gguf package "
            f"writes {', '.join(PYTHON_TYPES)}; with llama-cpp-python installed, llama.cpp's quantizer writes "
            f"{', '.join(LLAMA_CPP_TYPES)}."
        )
    quantization = quantization.lower()
    if dtype is not None and dtype != quantization:
        raise ValueError(
            f"export_gguf: {name('dtype')}={dtype!r} and {name('quantization')}={quantization!r} disagree; "
            f"{name('dtype')} is the older name for {name('quantization')}='f32' / 'f16': pass only {name('quantization')}."
        )
    if quantization in LLAMA_CPP_TYPES:
        llama_cpp_module(quantization, name)
    return quantization


def llama_cpp_module(quantization: str, name: Callable[[str], str]):
    """``llama_cpp`` (llama-cpp-python), which the K-quants need; refused with what works without it."""
    try:
        return importlib.import_module("llama_cpp")
    except Exception as err:  # ImportError, or OSError when its shared library does not load
        raise ValueError(
            f"export_gguf: {name('quantization')}={quantization!r} is a K-quant, which only llama.cpp's quantizer writes: "
            f"it needs llama-cpp-python (pip install llama-cpp-python), which could not be imported ({err}). Without "
            f"it, {', '.join(PYTHON_TYPES)} are written by the gguf package (q4_0 / q5_0 / q8_0 for small files)."
        ) from None


def is_llama_cpp(quantization: str) -> bool:
    """Whether llama.cpp's quantizer (rather than the gguf package) writes ``quantization``."""
    return quantization in LLAMA_CPP_TYPES


def file_type(quantization: str):
    """``general.file_type`` of a file the gguf package writes (``gguf.LlamaFileType``)."""
    import gguf

    return gguf.LlamaFileType[PYTHON_TYPES[quantization][1]]


def tensor_types(tensors: dict[str, torch.Tensor], quantization: str) -> tuple[dict, list[str]]:
    """The ggml type of each tensor of a file the gguf package writes, and the matrices kept in f16 for their width."""
    import gguf

    base = gguf.GGMLQuantizationType[PYTHON_TYPES[quantization][0]]
    q8 = gguf.GGMLQuantizationType.Q8_0
    # llama.cpp's output matrix: output.weight, else the tied token embedding the output layer reuses
    output = "output.weight" if "output.weight" in tensors else "token_embd.weight"
    quantized = base not in (
        gguf.GGMLQuantizationType.F32,
        gguf.GGMLQuantizationType.F16,
        gguf.GGMLQuantizationType.BF16,
    )
    types, kept = {}, []
    for tensor_name, tensor in tensors.items():
        if tensor.dim() <= 1:
            types[tensor_name] = gguf.GGMLQuantizationType.F32
            continue
        target = q8 if quantized and tensor_name == output else base
        block = gguf.GGML_QUANT_SIZES[target][0]
        if tensor.shape[-1] % block:
            target = gguf.GGMLQuantizationType.F16
            kept.append(f"{tensor_name} (width {tensor.shape[-1]})")
        types[tensor_name] = target
    return types, kept


def quantized(tensor: torch.Tensor, qtype) -> np.ndarray:
    """``tensor`` in ggml type ``qtype``, by gguf's quantizer: float arrays, or the blocks' bytes (uint8)."""
    return __import__("gguf").quants.quantize(tensor.detach().to("cpu", torch.float32).contiguous().numpy(), qtype)


def warn_kept(kept: list[str], quantization: str, block: int, fallback: str, stacklevel: int = 4) -> None:
    """The ``GGUFExportWarning`` for matrices whose width does not fit ``quantization``'s blocks."""
    shown = ", ".join(kept[:4]) + (f" and {len(kept) - 4} more" if len(kept) > 4 else "")
    note = (
        f"{len(kept)} matrix(es) have a row width not a multiple of {quantization}'s block of {block} values ({shown}); they "
        f"are stored as {fallback}, as llama.cpp's converter and quantizer do. Prune to widths that are multiples of "
        f"{block} (e.g. FlopConfig(uniform_shapes=True) with such a target) for a fully quantized file."
    )
    warnings.warn(GGUFExportWarning(f"export_gguf: {note}", note=note, parameter="quantization"), stacklevel=stacklevel)


def llama_cpp_quantize(source, target, quantization: str) -> None:
    """llama.cpp's quantizer: the f32 GGUF ``source`` to ``target`` as the K-quant mix ``quantization``;
    then the ``GGUFExportWarning`` for the matrices it demoted because their width is not a multiple of 256."""
    import gguf

    llama_cpp = llama_cpp_module(quantization, str)
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_{LLAMA_CPP_TYPES[quantization]}")
    params.nthread = 1  # small files; do not take every core
    status = llama_cpp.llama_model_quantize(str(source).encode(), str(target).encode(), params)
    if status != 0:
        raise RuntimeError(f"export_gguf: llama.cpp's quantizer failed (status {status}) writing {quantization}.")
    demoted = [
        f"{t.name} (width {int(t.shape[0])}: {t.tensor_type.name})"
        for t in gguf.GGUFReader(target).tensors
        if len(t.shape) > 1 and int(t.shape[0]) % K_BLOCK  # GGUFReader's shape is ggml's: the row width first
    ]
    if demoted:
        warn_kept(demoted, quantization, K_BLOCK, "the smaller-block types llama.cpp falls back to (shown)", 5)
