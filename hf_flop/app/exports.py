"""Each file the job exported, measured on that very file: ``exports.json`` and the card's table of them.

An ONNX file gets the job's task metric on the evaluation data through ONNX Runtime and its latency at the
job's latency batch sizes; a GGUF file its perplexity on the evaluation data and its tokens per second
through llama.cpp, when llama-cpp-python is importable; otherwise its row says why it was not measured
(never a number from somewhere else). Sizes are the files' on disk.
"""

from __future__ import annotations

from pathlib import Path

from ..files import write_json_atomic
from .state import JobState

EXPORTS_FILE = "exports.json"
GENERATED_TOKENS = 32  # greedy tokens timed for a GGUF file's generation speed


def _file_sizes(path: Path) -> dict:
    """The file's size on disk, and its external weights' (``<name>.data``, large ONNX models) when present."""
    sizes = {"bytes": path.stat().st_size}
    data = path.with_name(path.name + ".data")
    if data.is_file():
        sizes.update(data_file=data.name, data_bytes=data.stat().st_size)
    return sizes


def _metric(job: JobState, value: float) -> dict:
    """The measured metric with what it is comparable to: the compacted PyTorch model's, on the same rows."""
    data = job.data
    return {
        "name": data["metric"],
        "value": value,
        "pytorch": job.results["pruned"],
        "split": data["eval_split"],
        "examples": len(data["report"]),
    }


def measure_onnx(job: JobState, path: Path, latency_inputs: dict[int, dict]) -> dict:
    """The row of an ONNX file: its size, the task metric through ONNX Runtime, latency per batch size
    (``latency_inputs``: batch size -> a batch of inputs, those the PyTorch latency was measured on)."""
    import onnxruntime

    from ..metrics.onnx_runtime import evaluate_onnx, onnx_latency

    options, data = job.options, job.data
    with job.console.status(f"measuring {path.name} with ONNX Runtime"):
        scores = evaluate_onnx(
            path, data["report"], task=options.task, collator=data["collator"], threads=options.threads
        )
        latency = {}
        for batch_size, inputs in latency_inputs.items():
            repeats, warmup = (5, 1) if batch_size > 1 else (10, 2)  # as the PyTorch latency
            seconds = onnx_latency(path, inputs, repeats=repeats, warmup=warmup, threads=options.latency_threads)
            latency[str(batch_size)] = round(seconds * 1000, 3)
    row = {
        "file": path.name,
        "format": "onnx",
        "quantization": options.onnx_quantization or "float32",
        **_file_sizes(path),
        "runtime": f"onnxruntime {onnxruntime.__version__}",
        "metric": _metric(job, scores[data["metric"]]),
        "latency_ms": latency,
        "threads": options.latency_threads,
        "tokens": options.max_length,
    }
    job.console.print(f"{path.name} through ONNX Runtime: {_metric_text(row)}; {_speed_text(row)}", highlight=False)
    return row


def measure_gguf(job: JobState, path: Path) -> dict:
    """The row of a GGUF file: its size, and its perplexity and tokens/s through llama.cpp when it is importable."""
    from ..metrics.gguf_runtime import gguf_perplexity, gguf_speed, llama_cpp_missing

    options, data = job.options, job.data
    row = {
        "file": path.name,
        "format": "gguf",
        "quantization": options.gguf_quantization or options.gguf_dtype,
        **_file_sizes(path),
    }
    reason = llama_cpp_missing()
    if reason:
        job.console.print(f"[bold yellow]note:[/] {path.name} not measured: {reason}", highlight=False)
        return {**row, "not_measured": reason}
    import llama_cpp

    prompt = [int(t) for t in data["report"][0]["input_ids"]]
    with job.console.status(f"measuring {path.name} with llama.cpp"):
        scores = gguf_perplexity(path, data["report"], threads=options.threads)
        speed = gguf_speed(path, prompt, steps=GENERATED_TOKENS, threads=options.latency_threads)
    row.update(
        runtime=f"llama-cpp-python {getattr(llama_cpp, '__version__', '(version unknown)')}",
        metric=_metric(job, scores["perplexity"]),
        tokens_per_s={
            "prompt": round(speed["prompt_tokens_per_s"], 1),
            "generation": round(speed["generation_tokens_per_s"], 1),
        },
        threads=options.latency_threads,
        prompt_tokens=len(prompt),
        generated_tokens=GENERATED_TOKENS,
    )
    job.console.print(f"{path.name} through llama.cpp: {_metric_text(row)}; {_speed_text(row)}", highlight=False)
    return row


def write_exports(folder: Path, rows: list[dict]) -> Path:
    """``exports.json`` in ``folder`` (temporary name, then renamed): one entry per exported file."""
    return write_json_atomic(folder / EXPORTS_FILE, {"files": rows})


def card_rows(rows: list[dict]) -> list[dict]:
    """The card's table of exported files (``save_compacted(exports=...)``), from ``exports.json``'s rows."""
    return [
        {
            "file": row["file"],
            "format": {"onnx": "ONNX", "gguf": "GGUF"}[row["format"]],
            "quantization": row["quantization"],
            "bytes": row["bytes"] + row.get("data_bytes", 0),
            "metric": _metric_text(row),
            "speed": _speed_text(row),
        }
        for row in rows
    ]


def _metric_text(row: dict) -> str:
    if "not_measured" in row:
        return f"not measured: {row['not_measured']}"
    metric = row["metric"]
    return f"{metric['name']} {metric['value']:.4f} (PyTorch {metric['pytorch']:.4f})"


def _speed_text(row: dict) -> str:
    if "not_measured" in row:
        return f"not measured: {row['not_measured']}"
    threads = f"{row['threads']} thread{'s' if row['threads'] > 1 else ''}"
    if row["format"] == "onnx":
        batches = ", ".join(f"batch {b}: {ms:.2f} ms" for b, ms in row["latency_ms"].items())
        return f"{batches} (ONNX Runtime, {threads}, {row['tokens']} tokens)"
    speed = row["tokens_per_s"]
    return (
        f"generation {speed['generation']:.1f} tokens/s, prompt {speed['prompt']:.1f} tokens/s (llama.cpp, {threads})"
    )
