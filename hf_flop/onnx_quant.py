"""Int8 ONNX models: ONNX Runtime's dynamic quantization of what ``hf_flop.export_onnx`` wrote.

``export_onnx(..., quantization="int8")`` exports and checks the float model as usual, then rewrites it
with ``onnxruntime.quantization.quantize_dynamic``: the weights of MatMul / Gemm (and the embedding
Gather) become int8 with one scale per output channel, activations are quantized on the fly at run time
(no calibration data). Norms, softmax and the rest stay float. The weights take about a quarter of the
float ones and run as int8 matrix products; the logits differ from PyTorch's by the rounding, so the
check on the int8 model is that it runs and gives finite logits, not the float tolerance.

``quantization="int8-static"`` is ONNX Runtime's static quantization (``quantize_static``, QDQ format):
activations too get fixed int8 scales, measured by running the float model on ``calibration`` batches
(dicts of input tensors, e.g. the batches given to ``prune_oneshot``).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path

QUANTIZATIONS = (None, "int8", "int8-static")


def check_quantization(quantization: str | None, calibration) -> None:
    """Refuse, before any work, a quantization ``export_onnx`` cannot write (naming what it can), and calibration
    data without static quantization or the other way round."""
    if quantization == "int8-static" and calibration is None:
        raise ValueError(
            "export_onnx: quantization='int8-static' measures activation scales on calibration data: pass "
            "calibration= (a list of input batches, dicts with input_ids), or use quantization='int8' (dynamic)."
        )
    if calibration is not None and quantization != "int8-static":
        raise ValueError(
            f"export_onnx: calibration= is for quantization='int8-static' (got quantization={quantization!r}); "
            "drop it, or pass quantization='int8-static'."
        )
    if quantization not in QUANTIZATIONS:
        hint = (
            " GGUF types (q8_0, q4_0, q4_k_m, ...) are export_gguf's."
            if isinstance(quantization, str) and quantization.lower().startswith(("q", "f", "bf"))
            else ""
        )
        raise ValueError(
            f"export_onnx: quantization={quantization!r} is not one it writes: None (float32, as PyTorch computes) or "
            f"'int8' (ONNX Runtime's dynamic quantization: int8 weights, activations quantized at run time) or "
            f"'int8-static' (activation scales from calibration= batches).{hint}"
        )


def quantize_int8(
    source: Path,
    target: Path,
    quantization: str,
    names: list[str],
    calibration: Iterable[Mapping] | None = None,
) -> None:
    """``source`` (a float ONNX model with inputs ``names``) as ``target`` in int8, by ONNX Runtime's quantizer."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    if quantization == "int8-static":
        _quantize_static(source, target, names, calibration)
        return
    quantize_dynamic(
        str(source),
        str(target),
        weight_type=QuantType.QInt8,  # signed weights: ONNX Runtime's recommended default on x86 and ARM
        per_channel=True,  # one scale per output row: pruned, refit rows can differ widely in size
    )


def _quantize_static(source: Path, target: Path, names: list[str], calibration: Iterable[Mapping]) -> None:
    """ONNX Runtime's static (QDQ) quantization, activation ranges from the float model run on ``calibration``."""
    import numpy as np
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    feeds = [onnx_inputs(batch, names, i) for i, batch in enumerate(calibration)]
    if not feeds:
        raise ValueError("export_onnx: calibration= is empty; pass at least one batch of inputs.")

    class _Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.batches = iter(feeds)

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self.batches, None)

    quantize_static(
        str(source),
        str(target),
        _Reader(),
        quant_format=QuantFormat.QDQ,  # quantize / dequantize pairs: ONNX Runtime fuses them into int8 kernels
        per_channel=True,
        weight_type=QuantType.QInt8,
        activation_type=QuantType.QInt8,
    )


def onnx_inputs(batch: Mapping, names: list[str], index: int = 0, what: str = "export_onnx: calibration batch") -> dict:
    """One batch (tensors or arrays) as ONNX Runtime's int64 inputs ``names``: a full attention mask and token
    type 0 when absent. A batch without ``input_ids`` is refused as ``what`` number ``index``."""
    import numpy as np

    if "input_ids" not in batch:
        raise ValueError(f"{what} {index} has no input_ids (it has {', '.join(batch)}).")
    ids = np.asarray(batch["input_ids"].cpu() if hasattr(batch["input_ids"], "cpu") else batch["input_ids"])
    defaults = {"attention_mask": np.ones_like(ids), "token_type_ids": np.zeros_like(ids)}
    feed = {}
    for name in names:
        value = batch.get(name, defaults.get(name))
        feed[name] = np.asarray(value.cpu() if hasattr(value, "cpu") else value).astype(np.int64)
    return feed
