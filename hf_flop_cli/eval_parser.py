"""The ``hf-flop eval`` subcommand's options: lm-eval's harness on a dense and a pruned model, one JSON."""

from __future__ import annotations


def add_eval_parser(sub, formatter_class, positive) -> None:
    """Add ``eval`` to the subparsers ``sub`` (``positive`` is the main parser's positive-number type)."""
    evaluate = sub.add_parser(
        "eval",
        formatter_class=formatter_class,
        help="Run EleutherAI's lm-evaluation-harness on model folders with pinned settings (needs lm-eval).",
        description="Runs lm-eval (pip install 'hf_flop[eval]') on each model folder with the same tasks, few-shot "
        "count, batch size and seed, and writes one results JSON (settings, harness version, per-model metrics) "
        "that the model card reads. The bundled task hf_flop_next_sentence needs no Hub access.",
    )
    evaluate.add_argument("--model", action="append", required=True, help="Model folder (repeat for several).")
    evaluate.add_argument("--dense", help="Folder of the dense model, reported as 'dense' next to the others.")
    evaluate.add_argument("--tasks", required=True, help="Comma-separated lm-eval task names.")
    evaluate.add_argument("--output", required=True, help="Results JSON to write.")
    evaluate.add_argument("--num-fewshot", type=int, default=0, help="Few-shot examples per prompt.")
    evaluate.add_argument("--batch-size", type=positive(int), default=8, help="Batch size of the harness.")
    evaluate.add_argument("--seed", type=int, default=0, help="Seed of Python, NumPy, torch and few-shot sampling.")
    evaluate.add_argument("--limit", type=positive(int), help="At most this many documents per task.")
    evaluate.add_argument("--include-path", help="Folder of extra task YAMLs.")
    evaluate.add_argument("--device", help="Device, e.g. cuda (default: cuda when available, else cpu).")
    evaluate.add_argument(
        "--card", help="Model card (README.md of a saved model) to add the results table to, e.g. the pruned folder's."
    )
