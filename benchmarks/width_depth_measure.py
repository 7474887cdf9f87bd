"""llama.cpp on the total-size rows' recovered models: f16 files, tokens per second, the first greedy tokens.

The row ``gguf_total_size`` of bench_smollm2.py reads the models those rows saved
(``results/smollm2/<row id>/model``, not committed), writes each and the pretrained model as an f16
GGUF file, and measures them in llama.cpp at 2 threads, the files in turn so a busy moment slows
every file alike: prompt and generation tokens per second (the best of ``repeats`` rounds, as
``SETTINGS[mode]["gguf"]`` of smollm2_rows.py sets them), and
whether llama.cpp's first 32 greedy tokens equal transformers' on the same PTB prompt.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import common

LLAMA_THREADS = 2
GREEDY_CHECKED = 32


def saved_model(root: Path, row_id: str) -> Path:
    """Where a total-size row saves its recovered model."""
    return root / row_id / "model"


def phase_gguf_total_size(row, out: Path, settings: dict, root: Path) -> dict:
    """Every saved model of ``row.measures`` and the pretrained one, as f16 GGUF, timed in llama.cpp."""
    from bench_gguf import _hf_greedy, _prompt, _timed_run
    from llama_cpp import Llama, __version__
    from transformers import AutoModelForCausalLM

    from hf_flop import export_gguf

    measure = settings["gguf"]
    missing = [r for r in row.measures if not saved_model(root, r).is_dir()]
    if missing:
        raise SystemExit(
            f"the models of {missing} are not saved here: run those rows first (--only {','.join(missing)})."
        )
    tokenizer = common.smollm2_tokenizer()
    prompt = _prompt(tokenizer, measure["prompt_tokens"])
    models = {"dense": lambda: common.causal_lm("smollm2")[0]}
    models |= {r: (lambda r=r: AutoModelForCausalLM.from_pretrained(saved_model(root, r))) for r in row.measures}
    files = {}
    for name, load in models.items():
        model = load().eval()
        path = export_gguf(model, out / f"{name}_f16.gguf", tokenizer_gguf=common.smollm2_gguf(), quantization="f16")
        files[name] = {
            "path": path,
            "bytes": path.stat().st_size,
            "params": model.num_parameters(),
            "shape": {k: getattr(model.config, k) for k in ("hidden_size", "num_hidden_layers", "intermediate_size")}
            | {"heads": model.config.num_attention_heads, "kv_heads": model.config.num_key_value_heads},
            "hf_greedy": _hf_greedy(model, prompt, GREEDY_CHECKED),
        }
        del model
    steps = measure["gen_tokens"]
    best = {name: {"prompt_tokens_per_s": 0.0, "gen_tokens_per_s": 0.0} for name in files}
    greedy = {}
    load_start = os.getloadavg()
    start = time.perf_counter()
    for _ in range(measure["repeats"]):
        for name, entry in files.items():
            llm = Llama(
                model_path=str(entry["path"]),
                n_ctx=len(prompt) + steps + 8,
                n_batch=len(prompt),
                n_threads=LLAMA_THREADS,
                n_threads_batch=LLAMA_THREADS,
                verbose=False,
            )
            prompt_speed, gen_speed, tokens = _timed_run(llm, prompt, steps)
            best[name]["prompt_tokens_per_s"] = max(best[name]["prompt_tokens_per_s"], prompt_speed)
            best[name]["gen_tokens_per_s"] = max(best[name]["gen_tokens_per_s"], gen_speed)
            greedy[name] = tokens[:GREEDY_CHECKED]
            del llm
    result = {}
    for name, entry in files.items():
        expected = entry.pop("hf_greedy")
        entry.pop("path")
        result[name] = {
            **entry,
            **best[name],
            "gen_vs_dense": best[name]["gen_tokens_per_s"] / best["dense"]["gen_tokens_per_s"],
            "greedy_matches_transformers": greedy[name] == expected,
            "greedy_agreement": sum(a == b for a, b in zip(greedy[name], expected)),
        }
        print(f"{name}: {result[name]}", flush=True)
    return {
        "runtime": f"llama-cpp-python {__version__}",
        "llama_threads": LLAMA_THREADS,
        "prompt_tokens": len(prompt),
        "gen_tokens": steps,
        "repeats": measure["repeats"],
        "load_avg_start": load_start,
        "timing_s": time.perf_counter() - start,
        "files": result,
    }
