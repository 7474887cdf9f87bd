"""The defaults that depend on the task or the machine: model, data and training sizes per task, and threads."""

from __future__ import annotations

import os

# The default job must finish in under ~15 minutes on 2 CPU cores (measured 6.4 min, see the
# benchmarks/README.md): all 8,072 training sentences, batch 16, one dense epoch, then two pruning epochs.
TASK_DEFAULTS = {
    "seq-cls": {
        "model": "minilm",
        "dataset": "rt-sentiment",
        "max_length": 64,
        "train_samples": 0,
        "eval_samples": 1000,
        "batch_size": 16,
        "dense_epochs": 1.0,
        "epochs": 2.0,
        "learning_rate": 5e-5,
    },
    "causal-lm": {
        "model": "smollm2",
        "dataset": "ptb",
        "max_length": 128,
        "train_samples": 800,
        "eval_samples": 100,
        "batch_size": 8,
        "dense_epochs": 0.0,
        "epochs": 1.0,
        # recovery after a one-shot prune of a pretrained LM: SmolLM2 at 50 %, 160 steps, perplexity 89.0 at
        # 5e-5 and 63.3 at 2e-4 (Torch-Pruning's model 135.0 and 85.6): benchmarks/README.md, "Equal budget"
        "learning_rate": 2e-4,
    },
}


def default_threads() -> int:
    """The ``--threads`` default: ``$OMP_NUM_THREADS`` when it is a positive integer, else the usable CPUs.

    A user who set ``OMP_NUM_THREADS`` (e.g. to share the machine) keeps that setting; otherwise the
    job uses every CPU this process may run on (``os.sched_getaffinity``: a ``taskset`` or container
    cpuset counts, not the machine's total), which is what torch picks on an idle machine.
    """
    value = os.environ.get("OMP_NUM_THREADS", "").split(",")[0].strip()  # "4,2" = nested OpenMP levels
    if value.isdigit() and int(value) > 0:
        return int(value)
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)
