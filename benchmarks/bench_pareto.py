"""Pruned and quantized: what each pair of choices costs in quality and buys in size and speed, per file.

Rows (pareto_rows.py; ``--list`` prints them), each in its own process; a row whose JSON exists is
skipped, so a run resumes:

  lm_dense, lm_pruned_30, lm_pruned_50
      SmolLM2-135M-Instruct (the embedded weights, no fine-tuning) and copies pruned one-shot
      (``hf_flop.prune_oneshot``: heads and FFN rows, activation scores + refit on 32 x 512 PTB training
      tokens, the same count in every layer, rounded to 32; no recovery training), compacted (a stock
      ``LlamaForCausalLM``), each written by ``hf_flop.export_gguf`` as f16, q8_0, q4_0 and q4_k_m; the
      PyTorch (float32) perplexity of the model on the PTB test blocks
  lm_measure
      llama.cpp (llama-cpp-python, 2 threads) on every file: perplexity on the same PTB test blocks
      (``hf_flop.metrics.gguf_perplexity``), prompt processing (128 PTB tokens in one batch) and greedy
      generation (128 tokens) in tokens/s, the best of 5 rounds that visit every file in turn
  minilm_dense, minilm_pruned_50, minilm_pruned_75
      the MiniLM dense start (bench_minilm.py's: two epochs on all training sentences) and copies pruned
      with the equal-budget recipe ``oneshotobslr10`` (one-shot obs + refit on 512 sentences, one epoch of
      4,000 sentences distilled from the dense start), saved
  minilm_measure
      each model exported by ``hf_flop.export_onnx`` as float32, int8 (ONNX Runtime's dynamic
      quantization) and int8-static (static QDQ quantization, activation scales from 8 x 16 training
      sentences); accuracy on the 1,000 test sentences through ONNX Runtime
      (``hf_flop.metrics.evaluate_onnx``), latency at batch 1 and 32 on 64-token inputs, 1 thread, the
      best of 10 interleaved rounds

    .venv/bin/python benchmarks/bench_pareto.py --list     # the rows, and which are measured
    .venv/bin/python benchmarks/bench_pareto.py            # full run: the measure rows on an idle machine
    .venv/bin/python benchmarks/bench_pareto.py --quick    # smoke run: tiny random Llama and BERT

Needs ``pip install llama-cpp-python`` (the q4_k_m files and every llama.cpp number). Results:
results/pareto[_quick]/<row id>.json, the summary in bench_pareto[_quick].json / .png; models and
files stay in results/pareto[_quick]/ (not committed). ``--threads`` is torch's (pruning, training).
"""

from __future__ import annotations

import json
import os
import sys
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the sibling modules, also when imported
import common  # noqa: E402
import minilm_rows  # noqa: E402
from pareto_rows import (  # noqa: E402
    BATCHES,
    GGUF_TYPES,
    LLAMA_THREADS,
    LM_PRUNING,
    LM_TARGETS,
    MINILM_TARGETS,
    ONNX_THREADS,
    ONNX_TYPES,
    ROWS,
    SETTINGS,
    ParetoRow,
    model_name,
)

MINILM_RECIPE = "oneshotobslr10"  # the equal-budget recipe the pruned MiniLM rows reproduce
GOALS = {"lm_speedup": 3.0, "lm_size": 0.3, "lm_perplexity_rise": 0.10, "onnx_speedup": 3.0, "onnx_drop": 0.01}


def _ptb_test(tokenizer, settings: dict):
    """The first ``eval_blocks`` PTB test blocks of ``eval_block`` tokens: every model's and file's perplexity rows."""
    from hf_flop.app.data import load_ptb, tokenize_lm

    test = tokenize_lm(load_ptb()["test"], tokenizer, text_column="text", block_size=settings["eval_block"])
    return test.select(range(min(settings["eval_blocks"], len(test))))


def phase_lm_model(row: ParetoRow, out: Path, settings: dict, root: Path) -> dict:
    from bench_gguf import _models
    from transformers import default_data_collator

    from hf_flop import FlopConfig, compact, export_gguf, prune_oneshot, sparsity_report
    from hf_flop.metrics import evaluate_model
    from hf_flop.metrics.gguf_runtime import llama_cpp_missing

    if any(t.startswith("q4_k") for t in GGUF_TYPES) and llama_cpp_missing():  # before any work
        raise SystemExit("the q4_k_m files need llama.cpp's quantizer: pip install llama-cpp-python.")
    model, tokenizer = _models(settings)
    result = {"target": row.target / 100}
    if row.target:
        start = time.perf_counter()
        calibration = common.ptb_calibration(tokenizer, settings["oneshot_sequences"], settings["oneshot_block"])
        options = {k: v for k, v in LM_PRUNING.items() if k != "score"}
        config = FlopConfig(target_sparsity=row.target / 100, **options)
        gated = prune_oneshot(model, config, calibration, LM_PRUNING["score"], reconstruct_options={"progress": False})
        result["linear_sparsity"] = sparsity_report(gated).deterministic_sparsity
        model = compact(gated).eval()
        result["prune_time_s"] = time.perf_counter() - start
    result["class"] = type(model).__name__
    result["params"] = sum(p.numel() for p in model.parameters())
    test = _ptb_test(tokenizer, settings)
    scores = evaluate_model(model, test, task="causal-lm", collator=default_data_collator, batch_size=4)
    result["torch_perplexity"] = scores["perplexity"]
    files = {}
    for quantization in GGUF_TYPES:
        path = root / "files" / f"{model_name(row.target)}_{quantization}.gguf"
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            export_gguf(model, path, tokenizer_gguf=common.smollm2_gguf(), quantization=quantization)
        files[quantization] = {
            "path": str(path.relative_to(root)),
            "bytes": path.stat().st_size,
            "warnings": sorted({str(w.message) for w in caught}),
        }
        print(f"{path.name}: {path.stat().st_size:,} bytes", flush=True)
    result["files"] = files
    return result


def _prompt(settings: dict) -> list[int]:
    from bench_gguf import _prompt as ptb_prompt

    return ptb_prompt(common.smollm2_tokenizer(), settings["prompt_tokens"])


def phase_lm_measure(row: ParetoRow, out: Path, settings: dict, root: Path) -> dict:
    import llama_cpp

    from hf_flop.metrics.gguf_runtime import gguf_perplexity, gguf_speed

    models = _read_models(root, "lm", LM_TARGETS)
    test = _ptb_test(common.smollm2_tokenizer(), settings)
    prompt = _prompt(settings)
    files = {(name, q): root / entry["files"][q]["path"] for name, entry in models.items() for q in GGUF_TYPES}
    result = {name: {} for name in models}
    for (name, q), path in files.items():
        start = time.perf_counter()
        perplexity = gguf_perplexity(path, test, threads=LLAMA_THREADS)["perplexity"]
        result[name][q] = {"perplexity": perplexity, "perplexity_time_s": time.perf_counter() - start}
        print(f"{path.name}: perplexity {perplexity:.2f}", flush=True)
    load_start = os.getloadavg()
    for _ in range(settings["speed_rounds"]):  # every file in turn: a busy moment slows one round, not one file
        for (name, q), path in files.items():
            speed = gguf_speed(path, prompt, steps=settings["gen_tokens"], repeats=1, threads=LLAMA_THREADS)
            entry = result[name][q]
            for key, value in speed.items():
                entry[key] = max(entry.get(key, 0.0), value)
    for (name, q), path in files.items():
        print(f"{path.name}: {result[name][q]}", flush=True)
    return {
        "runtime": f"llama-cpp-python {llama_cpp.__version__}",
        "llama_threads": LLAMA_THREADS,
        "prompt_tokens": len(prompt),
        "gen_tokens": settings["gen_tokens"],
        "rounds": settings["speed_rounds"],
        "eval_tokens": len(test) * settings["eval_block"],
        "load_avg_start": load_start,
        "files": result,
    }


def _minilm_settings(root: Path) -> dict:
    return minilm_rows.SETTINGS[common.results_mode(root)]


def phase_minilm_model(row: ParetoRow, out: Path, settings: dict, root: Path) -> dict:
    """The dense start (saved as root/dense_model), or the recipe's pruned model from it (saved beside it)."""
    if not row.target:
        from bench_minilm import phase_dense_start

        return phase_dense_start(minilm_rows.ROWS["dense_rerun"], out, _minilm_settings(root), root)
    from minilm_equal_budget import phase_equal_budget

    recipe = minilm_rows.ROWS[f"eq_{MINILM_RECIPE}_{row.target}_s0"]
    save_to = root / f"minilm_{model_name(row.target)}_model"
    result = phase_equal_budget(recipe, out, _minilm_settings(root), root, save_to=save_to)
    return {**result, "recipe": MINILM_RECIPE, "model_folder": save_to.name}


def _minilm_folder(root: Path, name: str) -> Path:
    return root / ("dense_model" if name == "dense" else f"minilm_{name}_model")


def phase_minilm_measure(row: ParetoRow, out: Path, settings: dict, root: Path) -> dict:
    import numpy as np
    import onnxruntime
    from bench_onnx import inputs
    from transformers import AutoModelForSequenceClassification, AutoTokenizer, DataCollatorWithPadding

    from hf_flop import export_onnx
    from hf_flop.metrics.onnx_runtime import evaluate_onnx, onnx_session

    names = list(_read_models(root, "minilm", MINILM_TARGETS))
    missing = [str(_minilm_folder(root, n)) for n in names if not _minilm_folder(root, n).is_dir()]
    if missing:  # the saved models are not committed: a fresh clone has only the rows' JSON
        raise SystemExit(f"{missing} are missing: delete the minilm_*.json files and run again.")
    tokenizer = AutoTokenizer.from_pretrained(root / "dense_model")
    train, test = common.sentiment_splits(_minilm_settings(root), tokenizer)
    collator = DataCollatorWithPadding(tokenizer)
    calibration = [  # int8-static's activation scales: training sentences, never the test ones
        {k: v for k, v in batch.items() if k != "labels"} for batch in common.sentence_batches(train, collator, 8, 16)
    ]
    result, sessions = {name: {} for name in names}, {}
    for name in names:
        model = AutoModelForSequenceClassification.from_pretrained(_minilm_folder(root, name)).eval()
        pytorch = common.accuracy(model, test, collator)
        for quantization in ONNX_TYPES:
            path = root / "files" / f"minilm_{name}_{quantization}.onnx"
            options = {"quantization": None if quantization == "float32" else quantization}
            if quantization == "int8-static":
                options["calibration"] = calibration
            export_onnx(model, path, overwrite=True, **options)
            accuracy = evaluate_onnx(path, test, task="seq-cls", collator=collator, threads=ONNX_THREADS)["accuracy"]
            result[name][quantization] = {
                "path": str(path.relative_to(root)),
                "bytes": path.stat().st_size,
                "accuracy": accuracy,
                "pytorch_accuracy": pytorch,
                "params": sum(p.numel() for p in model.parameters()),
            }
            sessions[(name, quantization)] = onnx_session(path, ONNX_THREADS)
            print(f"{path.name}: accuracy {accuracy:.4f} (PyTorch {pytorch:.4f})", flush=True)
    vocab = tokenizer.vocab_size
    load_start = os.getloadavg()
    for batch in BATCHES:
        feed = {k: v.numpy() for k, v in inputs(batch, settings["latency_tokens"], vocab).items()}
        runs = {
            key: lambda s=session, f=feed: s.run(["logits"], {i.name: f[i.name] for i in s.get_inputs()})
            for key, session in sessions.items()
        }
        times = common.best_times(runs, settings["latency_rounds"], warmup=2)
        for (name, quantization), seconds in times.items():
            result[name][quantization][f"ms_b{batch}"] = 1000 * seconds
        print(f"batch {batch}: " + ", ".join(f"{n}/{q} {1000 * s:.2f} ms" for (n, q), s in times.items()), flush=True)
    return {
        "runtime": f"onnxruntime {onnxruntime.__version__}",
        "threads": ONNX_THREADS,
        "tokens": settings["latency_tokens"],
        "rounds": settings["latency_rounds"],
        "test_examples": len(test),
        "load_avg_start": load_start,
        "numpy": np.__version__,
        "files": result,
    }


def _read_models(root: Path, prefix: str, targets: tuple[int, ...]) -> dict[str, dict]:
    """The model rows' results by model name; a clear stop when one has not run (or its files are gone)."""
    found = {}
    for target in targets:
        path = root / f"{prefix}_{model_name(target)}.json"
        if not path.is_file():
            raise SystemExit(f"{path} is missing: run --only {path.stem} first.")
        found[model_name(target)] = json.loads(path.read_text())
    for entry in found.values():
        for file in entry.get("files", {}).values():
            if not (root / file["path"]).is_file():  # the files are not committed: a fresh clone has only the JSON
                raise SystemExit(f"{root / file['path']} is missing: delete the {prefix}_*.json files and run again.")
    return found


PHASES_BY_KIND = {
    "lm_model": phase_lm_model,
    "lm_measure": phase_lm_measure,
    "minilm_model": phase_minilm_model,
    "minilm_measure": phase_minilm_measure,
}


def run_phase(row: ParetoRow, out: Path, settings: dict, root: Path) -> dict:
    return PHASES_BY_KIND[row.kind](row, out, settings, root)


def main() -> None:
    from phase_runner import run_benchmark

    run_benchmark(__file__, "pareto", ROWS, SETTINGS, run_phase, summarize)


def summarize(root: Path, mode: str) -> None:
    from phase_runner import read_results, write_summary

    results = read_results(root, ROWS)
    rows = _lm_rows(results) + _minilm_rows(results)
    summary = {
        "mode": mode,
        "settings": SETTINGS[mode],
        "lm": {k: results["lm_measure"][k] for k in ("runtime", "llama_threads", "prompt_tokens", "gen_tokens")}
        if "lm_measure" in results
        else None,
        "minilm": {k: results["minilm_measure"][k] for k in ("runtime", "threads", "tokens", "test_examples")}
        if "minilm_measure" in results
        else None,
        "rows": rows,
        "goals": _goals(rows),
    }
    write_summary("bench_pareto", summary, _plot)


def _lm_rows(results: dict) -> list[dict]:
    measured = results.get("lm_measure")
    if measured is None:
        return []
    reference = measured["files"]["dense"]["f16"]
    dense_bytes = results["lm_dense"]["files"]["f16"]["bytes"]
    rows = []
    for target in LM_TARGETS:
        name = model_name(target)
        model = results[f"lm_{name}"]
        for q in GGUF_TYPES:
            speed = measured["files"][name][q]
            rows.append(
                {
                    "model": "SmolLM2-135M",
                    "pruned": target / 100,
                    "format": "GGUF",
                    "type": q,
                    "params": model["params"],
                    "bytes": model["files"][q]["bytes"],
                    "size_vs_dense": model["files"][q]["bytes"] / dense_bytes,
                    "metric": "perplexity",
                    "value": speed["perplexity"],
                    "pytorch_value": model["torch_perplexity"],
                    "prompt_tokens_per_s": speed["prompt_tokens_per_s"],
                    "gen_tokens_per_s": speed["generation_tokens_per_s"],
                    "gen_speedup": speed["generation_tokens_per_s"] / reference["generation_tokens_per_s"],
                    "prompt_speedup": speed["prompt_tokens_per_s"] / reference["prompt_tokens_per_s"],
                    "warnings": model["files"][q]["warnings"],
                }
            )
    return rows


def _minilm_rows(results: dict) -> list[dict]:
    measured = results.get("minilm_measure")
    if measured is None:
        return []
    reference = measured["files"]["dense"]["float32"]
    rows = []
    for target in MINILM_TARGETS:
        name = model_name(target)
        for q in ONNX_TYPES:
            entry = measured["files"][name][q]
            row = {
                "model": "MiniLM-L6",
                "pruned": target / 100,
                "format": "ONNX",
                "type": q,
                "params": entry["params"],
                "bytes": entry["bytes"],
                "size_vs_dense": entry["bytes"] / reference["bytes"],
                "metric": "accuracy",
                "value": entry["accuracy"],
                "pytorch_value": entry["pytorch_accuracy"],
            }
            for batch in BATCHES:
                row[f"ms_b{batch}"] = entry[f"ms_b{batch}"]
                row[f"speedup_b{batch}"] = reference[f"ms_b{batch}"] / entry[f"ms_b{batch}"]
            rows.append(row)
    return rows


def _find(rows: list[dict], model: str, pruned: float, kind: str) -> dict | None:
    return next((r for r in rows if r["model"] == model and r["pruned"] == pruned and r["type"] == kind), None)


def _goals(rows: list[dict]) -> list[dict]:
    """Each goal of the pruned-and-quantized files: the measured value, the bound, met or not."""
    goals = []
    f16 = _find(rows, "SmolLM2-135M", 0.5, "f16")
    for kind in ("q4_0", "q4_k_m"):
        q4 = _find(rows, "SmolLM2-135M", 0.5, kind)
        if q4 is None or f16 is None:
            continue
        rise = q4["value"] / f16["value"] - 1
        goals += [
            {"goal": f"SmolLM2 50 % {kind}: generation vs dense f16", "value": q4["gen_speedup"], "bound": ">= 3.0"}
            | {"met": q4["gen_speedup"] >= GOALS["lm_speedup"]},
            {"goal": f"SmolLM2 50 % {kind}: file size vs dense f16", "value": q4["size_vs_dense"], "bound": "<= 0.3"}
            | {"met": q4["size_vs_dense"] <= GOALS["lm_size"]},
            {"goal": f"SmolLM2 50 % {kind}: perplexity rise vs 50 % f16", "value": rise, "bound": "<= 0.10"}
            | {"met": rise <= GOALS["lm_perplexity_rise"]},
        ]
    fp32 = _find(rows, "MiniLM-L6", 0.5, "float32")
    for kind in ("int8", "int8-static"):
        int8 = _find(rows, "MiniLM-L6", 0.5, kind)
        if fp32 is None or int8 is None:
            continue
        drop = fp32["value"] - int8["value"]
        goals += [
            {"goal": f"MiniLM 50 % {kind}: batch-32 speed-up vs dense float32", "value": int8["speedup_b32"]}
            | {"bound": ">= 3.0", "met": int8["speedup_b32"] >= GOALS["onnx_speedup"]},
            {"goal": f"MiniLM 50 % {kind}: accuracy drop vs 50 % float32 (points)", "value": 100 * drop}
            | {"bound": "<= 1.0", "met": drop <= GOALS["onnx_drop"]},
        ]
    return goals


def _plot(summary: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(13, 5))
    panels = (
        (
            "SmolLM2-135M",
            "gen_tokens_per_s",
            "llama.cpp generation, tokens/s (2 threads)",
            "PTB perplexity (llama.cpp)",
        ),
        ("MiniLM-L6", "ms_b32", "ONNX Runtime latency at batch 32, ms (1 thread)", "accuracy (ONNX Runtime)"),
    )
    for ax, (model, x_key, x_label, y_label) in zip(axes, panels):
        rows = [r for r in summary["rows"] if r["model"] == model]
        for pruned in sorted({r["pruned"] for r in rows}):
            group = [r for r in rows if r["pruned"] == pruned]
            label = "dense" if pruned == 0 else f"pruned {pruned:.0%}"
            ax.plot([r[x_key] for r in group], [r["value"] for r in group], "o", label=label)
            for r in group:
                ax.annotate(f"{r['type']}\n{r['bytes'] / 1e6:.0f} MB", (r[x_key], r["value"]), fontsize=7)
        ax.set(xlabel=x_label, ylabel=y_label, title=model)
        if model == "SmolLM2-135M":
            ax.set_yscale("log")
        ax.legend(fontsize=8)
    fig.suptitle(f"Pruned x quantized, every number measured on its file ({summary['mode']})")
    fig.tight_layout()
    common.save_figure(fig, path)


if __name__ == "__main__":
    main()
