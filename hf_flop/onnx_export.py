"""Exporting a compacted model to ONNX, for ONNX Runtime.

``export_onnx(model_or_folder, path)`` writes one ONNX model whose inputs are ``input_ids`` and
``attention_mask`` (and ``token_type_ids`` where the model has more than one token type, as BERT
has), with dynamic batch and sequence axes, and whose one output is ``logits``. torch's exporter
(``torch.onnx.export(dynamo=True)``, which goes through ``torch.export``) traces the module as it
is, so the compacted classes' per-layer head counts and widths (``hf_flop.modeling``), low-rank
and block-sparse layers and factorized embeddings all become plain ONNX operators on weights of
their compacted shapes: non-uniform models need nothing special.

The file is written into a temporary folder next to ``path``; ONNX Runtime then runs it on two
batch shapes against the PyTorch model (``check``), and only then does it move into place.
"""

from __future__ import annotations

import importlib.util
import inspect
import os
import tempfile
import warnings
from pathlib import Path

import torch
import transformers
from torch import nn
from transformers import AutoConfig, PreTrainedModel

from .files import atomic_files
from .gates import Gate
from .layers import FlopLinear
from .model import FlopModel
from .modeling import modeling_flop
from .onnx_quant import check_quantization, quantize_int8

INPUTS = ("input_ids", "attention_mask")
# (batch, length): the first traces the graph, both check it; different sizes prove the axes dynamic.
# Sizes 0 and 1 are avoided: torch.export would specialise the graph to them.
CHECK_SHAPES = ((2, 8), (3, 5))
# Of the logits' scale (the largest |logit|, at least 1). An export error is of the order of the logits themselves;
# float32 rounding through a deep model is not, but it exceeds 1e-4: on SmolLM2-135M pruned one-shot to 50 % (30
# layers, 4 x 32 tokens) PyTorch differed from itself by 2.2e-4 of that scale between 1 and 2 threads, and ONNX
# Runtime from PyTorch by 6.8e-4.
TOLERANCE = 1e-3


class OnnxExportError(RuntimeError):
    """The export failed, or ONNX Runtime's logits differ from PyTorch's; nothing was written."""


def missing_onnx_packages(check: bool = True) -> list[str]:
    """The PyPI packages ``export_onnx`` needs that are not installed (onnxruntime only for ``check``)."""
    needed = ["onnx", "onnxscript"] + (["onnxruntime"] if check else [])  # onnxscript: torch's exporter
    return [name for name in needed if importlib.util.find_spec(name) is None]


def export_onnx(
    model_or_folder: PreTrainedModel | str | os.PathLike,
    path: str | os.PathLike,
    *,
    overwrite: bool = False,
    check: bool = True,
    opset_version: int | None = None,
    quantization: str | None = None,
    calibration=None,
) -> Path:
    """Write a compacted (or any plain transformers) text model as an ONNX model at ``path``.

    Args:
        model_or_folder: a ``PreTrainedModel`` with a task head (e.g. ``hf_flop.compact(model)``), or
            a folder written by ``save_compacted`` / ``save_pretrained``. A gated FLOP model is refused:
            compact it first.
        path: the ``.onnx`` file to write. torch's exporter puts the weights of large models (over 1.5 GB in
            torch 2.13) into ``<name>.data`` beside it.
        overwrite: replace an existing file at ``path``.
        check: run the written model with ONNX Runtime (CPU) at two input shapes and compare its logits
            with PyTorch's (within 1e-3 times the largest |logit|, at least 1e-3: a net for export errors,
            above float32 rounding) before moving it into place.
        opset_version: the ONNX opset to target (default: the exporter's).
        quantization: ``None`` (float32) or ``"int8"``: the float model, exported and checked as above, is
            rewritten with int8 weights by ONNX Runtime's dynamic quantization (``hf_flop.onnx_quant``); the
            check then also runs the int8 model (finite logits of the right shape: int8 rounding moves them
            by more than the float tolerance). ``"int8-static"``: static quantization, activation scales
            measured on ``calibration``. Needs onnxruntime.
        calibration: for ``"int8-static"``, input batches (dicts with ``input_ids``, optionally
            ``attention_mask`` / ``token_type_ids``, tensors or arrays), e.g. ``prune_oneshot``'s.

    Returns the path written. Raises ``OnnxExportError`` when the exporter fails or the check finds
    a difference; nothing is written then.
    """
    path = _check_path(path, overwrite)
    check_quantization(quantization, calibration)
    missing = missing_onnx_packages(check or quantization is not None)
    if missing:
        raise ImportError(
            f"export_onnx needs {', '.join(missing)}: pip install 'hf-flop[deploy]' (or pip install {' '.join(missing)})."
        )
    model = _load(Path(model_or_folder)) if isinstance(model_or_folder, (str, os.PathLike)) else model_or_folder
    _check_model(model)
    names = input_names(model)
    was_training = model.training
    wrapper = _LogitsOnly(model, names).eval()  # dropout off, as in deployment; the model's mode is restored after
    try:
        examples = [
            _example_inputs(model, names, batch, length, seed) for seed, (batch, length) in enumerate(CHECK_SHAPES)
        ]
        with torch.no_grad():
            expected = [wrapper(*inputs) for inputs in examples]
        program = _export(wrapper, examples[0], names, opset_version)
        with atomic_files(path) as tmp:
            if quantization is None:
                program.save(tmp)  # one file; large models' weights go to <name>.data beside it
                if check:
                    _compare(tmp, names, examples, expected)
            else:  # the float model checked in a folder of its own, then quantized into place
                with tempfile.TemporaryDirectory(dir=tmp.parent) as folder:
                    source = Path(folder) / path.name
                    program.save(source)
                    if check:
                        _compare(source, names, examples, expected)
                    quantize_int8(source, tmp, quantization, names, calibration)
                if check:
                    _compare(tmp, names, examples, expected, quantized=True)
    finally:
        model.train(was_training)
    return path


def input_names(model: PreTrainedModel) -> list[str]:
    """The ONNX model's inputs: ``input_ids``, ``attention_mask``, and ``token_type_ids`` when types matter.

    Token types matter where the model has more than one (BERT's sentence pairs); RoBERTa has one,
    GPT-2 and Llama have none (GPT-2 accepts the argument, but its tokenizer never makes it).
    """
    accepted = inspect.signature(model.forward).parameters
    if not set(INPUTS) <= set(accepted):
        raise ValueError(
            f"export_onnx exports text models that take input_ids and attention_mask; "
            f"{type(model).__name__}.forward takes {', '.join(accepted)}."
        )
    multiple_types = "token_type_ids" in accepted and getattr(model.config, "type_vocab_size", 0) > 1
    return [*INPUTS, "token_type_ids"] if multiple_types else list(INPUTS)


def _example_inputs(model: PreTrainedModel, names: list[str], batch: int, length: int, seed: int) -> list[torch.Tensor]:
    """Random inputs of shape ``batch x length`` in ``names``' order; the last row is right-padded by two tokens."""
    g = torch.Generator().manual_seed(seed)
    config = model.config
    values = {
        "input_ids": torch.randint(0, config.vocab_size, (batch, length), generator=g),
        "attention_mask": torch.ones(batch, length, dtype=torch.long),
        # DeBERTa-v3 configs say type_vocab_size 0 (no token types): only needed when there are several
        "token_type_ids": torch.randint(0, max(1, getattr(config, "type_vocab_size", 1)), (batch, length), generator=g),
    }
    values["attention_mask"][-1, -2:] = 0
    device = next(model.parameters()).device
    return [values[name].to(device) for name in names]


class _LogitsOnly(nn.Module):
    """The model on positional tensors (in ``names``' order), returning the logits alone: no cache, no other output."""

    def __init__(self, model: PreTrainedModel, names: list[str]) -> None:
        super().__init__()
        self.model = model
        self.names = names
        # a decoder would otherwise also return its key/value cache, which a logits-only graph does not carry
        self.options = {"use_cache": False} if "use_cache" in inspect.signature(model.forward).parameters else {}

    def forward(self, *tensors: torch.Tensor) -> torch.Tensor:
        output = self.model(**dict(zip(self.names, tensors)), **self.options, return_dict=True)
        logits = getattr(output, "logits", None)
        if logits is None:
            raise ValueError(
                f"{type(self.model).__name__} returns no logits; export_onnx writes a model with a task head "
                "(e.g. AutoModelForSequenceClassification or AutoModelForCausalLM)."
            )
        return logits


def _check_path(path: str | os.PathLike, overwrite: bool) -> Path:
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path must be a file path such as 'model.onnx', got {type(path).__name__}.")
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"path {path} is a folder; give the file to write, e.g. {path / 'model.onnx'}.")
    if path.exists() and not overwrite:
        raise ValueError(f"path {path} exists; pass overwrite=True to replace it, or choose another file.")
    return path


def _load(folder: Path) -> PreTrainedModel:
    """The model saved in ``folder``, of the class its config names (a compacted ``FlopX`` or a stock one)."""
    if not (folder / "config.json").is_file():
        raise ValueError(
            f"{folder} is not a saved model folder (no config.json); pass a folder written by save_compacted or "
            "save_pretrained (hf-flop prune writes one to <output-dir>/model), or the model itself."
        )
    config = AutoConfig.from_pretrained(folder)
    name = (getattr(config, "architectures", None) or [""])[0]
    # stock classes are transformers attributes; the compacted FlopX classes are made on demand by name
    model_class = getattr(transformers, name, None) or getattr(modeling_flop, name, None)
    if not isinstance(model_class, type) or not issubclass(model_class, PreTrainedModel):
        raise ValueError(
            f"{folder}/config.json names no model class hf_flop or transformers knows (architectures: "
            f"{config.architectures}); load the model yourself and pass it to export_onnx."
        )
    return model_class.from_pretrained(folder)


def _check_model(model) -> None:
    if isinstance(model, nn.Module) and any(isinstance(m, (FlopModel, FlopLinear, Gate)) for m in model.modules()):
        raise ValueError(
            "this is a gated FLOP model, not yet compacted: its gates would be exported with the full-size weights. "
            "Export the compacted model, hf_flop.export_onnx(hf_flop.compact(model), path), or the folder that "
            "hf_flop.save_compacted wrote."
        )
    if not isinstance(model, PreTrainedModel):
        raise TypeError(
            f"export_onnx needs a transformers PreTrainedModel or a saved model folder, got {type(model).__name__}."
        )


def _export(wrapper: _LogitsOnly, inputs: list[torch.Tensor], names: list[str], opset_version: int | None):
    """``torch.onnx.export`` with dynamic batch and sequence axes; its failure as an ``OnnxExportError``."""
    batch, sequence = torch.export.Dim("batch"), torch.export.Dim("sequence")
    try:
        with warnings.catch_warnings():
            # the exporter warns that the two inputs' axes share one name, which is what is meant
            warnings.filterwarnings("ignore", message=".*shares the same shape constraints", category=UserWarning)
            warnings.filterwarnings("ignore", category=FutureWarning)  # torch's deprecations inside its own exporter
            return torch.onnx.export(
                wrapper,
                tuple(inputs),
                input_names=names,
                output_names=["logits"],
                dynamic_shapes=(tuple({0: batch, 1: sequence} for _ in names),),  # one entry: forward(*tensors)
                opset_version=opset_version,
                dynamo=True,
                verbose=False,
            )
    except Exception as err:
        cause = err
        while cause.__cause__ is not None:  # the exporter wraps torch.export's error in generic advice
            cause = cause.__cause__
        reason = (str(cause).strip() or type(cause).__name__).splitlines()[0].rstrip(".")
        raise OnnxExportError(
            f"torch.onnx.export could not export {type(wrapper.model).__name__}: {reason}. Nothing was written."
        ) from err


def _compare(
    path: Path,
    names: list[str],
    examples: list[list[torch.Tensor]],
    expected: list[torch.Tensor],
    quantized: bool = False,
) -> None:
    """Run ``path`` with ONNX Runtime (CPU) on each example; raise if its logits differ from ``expected`` (by more
    than ``TOLERANCE`` of their scale; for a ``quantized`` model: if they are not finite or of another shape)."""
    import numpy as np
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for inputs, reference in zip(examples, expected):
        feed = {name: tensor.cpu().numpy() for name, tensor in zip(names, inputs)}
        (logits,) = session.run(["logits"], feed)
        reference = reference.float().cpu().numpy()
        if quantized:
            if logits.shape != reference.shape or not np.isfinite(logits).all():
                raise OnnxExportError(
                    f"ONNX Runtime's int8 model gives logits of shape {logits.shape} (expected {reference.shape}) or "
                    "non-finite values; nothing was written. Pass check=False to write the file anyway."
                )
            continue
        difference = float(np.abs(logits - reference).max())
        allowed = TOLERANCE * max(1.0, float(np.abs(reference).max()))
        if not difference <= allowed:  # also catches NaN
            raise OnnxExportError(
                f"ONNX Runtime's logits differ from PyTorch's by {difference:.3g} (allowed {allowed:.3g}) at input shape "
                f"{tuple(inputs[0].shape)}; nothing was written. Pass check=False to write the file anyway."
            )
