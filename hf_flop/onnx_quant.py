"""Int8 ONNX models: ONNX Runtime's dynamic quantization of what ``hf_flop.export_onnx`` wrote.

``export_onnx(..., quantization="int8")`` exports and checks the float model as usual, then rewrites it
with ``onnxruntime.quantization.quantize_dynamic``: the weights of MatMul / Gemm (and the embedding
Gather) become int8 with one scale per output channel, activations are quantized on the fly at run time
(no calibration data). Norms, softmax and the rest stay float. The result is about a quarter of the float
file and runs int8 matrix products; its logits differ from PyTorch's by the rounding of the weights, so
the check is then that predictions mostly agree (``hf_flop.onnx_export.check``), not the float tolerance.
"""

from __future__ import annotations

from pathlib import Path

QUANTIZATIONS = (None, "int8")


def check_quantization(quantization: str | None) -> None:
    """Refuse, before any work, a quantization ``export_onnx`` cannot write, naming what it can."""
    if quantization not in QUANTIZATIONS:
        hint = (
            " GGUF types (q8_0, q4_0, q4_k_m, ...) are export_gguf's."
            if isinstance(quantization, str) and quantization.lower().startswith(("q", "f", "bf"))
            else ""
        )
        raise ValueError(
            f"export_onnx: quantization={quantization!r} is not one it writes: None (float32, as PyTorch computes) or "
            f"'int8' (ONNX Runtime's dynamic quantization: int8 weights, activations quantized at run time).{hint}"
        )


def quantize_int8(source: Path, target: Path) -> None:
    """``source`` (a float ONNX model) as ``target`` with int8 weights, by ONNX Runtime's dynamic quantizer."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quantize_dynamic(
        str(source),
        str(target),
        weight_type=QuantType.QInt8,  # signed weights: ONNX Runtime's recommended default on x86 and ARM
        per_channel=True,  # one scale per output row: pruned, refit rows can differ widely in size
    )
