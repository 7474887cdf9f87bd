"""The ``hf-flop stream`` subcommand's options: prune a causal-LM checkpoint folder layer by layer."""

from __future__ import annotations

from .choices import SCORES


def add_stream_parser(sub, formatter_class, positive, levels, number) -> None:
    """Add ``stream`` to the subparsers ``sub`` (the option parsers are the main parser's)."""
    stream = sub.add_parser(
        "stream",
        formatter_class=formatter_class,
        help="One-shot prune a causal-LM checkpoint folder layer by layer, never loading the whole model.",
        description="Reads a safetensors checkpoint folder one transformer layer at a time (hf_flop.prune_checkpoint): "
        "scores, prunes and refits each layer on calibration blocks of --dataset, writes it, frees it. No training "
        "and no evaluation. Levels head, query_head and row.",
    )
    stream.add_argument("--model", required=True, help="Local folder of a causal LM saved with save_pretrained.")
    stream.add_argument("--dataset", default="ptb", help="Calibration text: as in 'hf-flop prune --dataset'.")
    stream.add_argument("--dataset-config", help="Configuration name of a Hub dataset.")
    stream.add_argument("--text-column", help="Text column (default: the first of text, sentence, content, review).")
    stream.add_argument("--output-dir", required=True, help="New folder for the pruned model (must not exist).")
    stream.add_argument("--target", type=number, default=0.5, help="Fraction of the prunable parameters to remove.")
    stream.add_argument("--levels", type=levels, default="head,row", help="head, query_head and/or row.")
    stream.add_argument("--uniform-shapes", action="store_true", help="The same heads and FFN width in every layer.")
    stream.add_argument(
        "--oneshot-score", choices=SCORES, help="Score (default: obs; activation with --uniform-shapes)."
    )
    stream.add_argument(
        "--allocation",
        choices=("global", "per_layer"),
        default="global",
        help="global: rank every unit of the model at once, as prune_oneshot does (two passes over the checkpoint); "
        "per_layer: every layer at the target on its own (one pass).",
    )
    stream.add_argument("--calibration-batches", type=positive(int), default=16, help="Calibration batches.")
    stream.add_argument("--batch-size", type=positive(int), default=4, help="Blocks per calibration batch.")
    stream.add_argument("--max-length", type=positive(int), default=256, help="Tokens per calibration block.")
    stream.add_argument("--device", help="Device for each layer's work, e.g. cuda (default: cpu).")
    stream.add_argument("--seed", type=int, default=0, help="Seed of the calibration sample.")
    stream.add_argument("--threads", type=positive(int), help="CPU threads (torch.set_num_threads).")
