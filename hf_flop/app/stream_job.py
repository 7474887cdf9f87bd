"""``hf-flop stream``: calibration blocks from a dataset, then ``hf_flop.prune_checkpoint`` on a checkpoint folder."""

from __future__ import annotations

from pathlib import Path

import torch

from ..config import FlopConfig
from ..streaming import StreamResult, prune_checkpoint
from .data.models import load_tokenizer
from .data.task_data import find_column
from .data.text_datasets import load_text_dataset
from .data.tokenization import tokenize_lm

TEXT_COLUMNS = ("text", "sentence", "content", "review")


def calibration_blocks(args, tokenizer) -> list[dict[str, torch.Tensor]]:
    """``--calibration-batches`` batches of ``--batch-size`` blocks of ``--max-length`` tokens, a seeded sample."""
    dataset = load_text_dataset(args.dataset, args.dataset_config)
    train = dataset["train"]
    column = find_column(train, args.text_column, TEXT_COLUMNS, "text")
    blocks = tokenize_lm(train, tokenizer, text_column=column, block_size=args.max_length)
    wanted = args.calibration_batches * args.batch_size
    if len(blocks) < 2 * args.batch_size:
        raise ValueError(
            f"--dataset gives {len(blocks)} blocks of {args.max_length} tokens, fewer than two batches of "
            f"{args.batch_size}; use more text, a smaller --max-length or --batch-size."
        )
    order = torch.randperm(len(blocks), generator=torch.Generator().manual_seed(args.seed))[:wanted].tolist()
    rows = blocks.select(order)
    batches = []
    for start in range(0, len(rows) - args.batch_size + 1, args.batch_size):
        part = rows[start : start + args.batch_size]
        batches.append({key: torch.tensor(part[key]) for key in ("input_ids", "attention_mask")})
    return batches


def run(args, flop_config: FlopConfig) -> StreamResult:
    """Prune ``--model`` into ``--output-dir``; prints where it went and the size."""
    if args.threads:
        torch.set_num_threads(args.threads)
    folder = Path(args.model).expanduser()
    if not folder.is_dir():
        raise ValueError(f"--model {folder} is not a folder; 'hf-flop stream' reads a local checkpoint folder.")
    out = Path(args.output_dir).expanduser()
    if out.exists():
        raise ValueError(f"--output-dir {out} exists; choose a new folder.")
    tokenizer = load_tokenizer(str(folder))
    result = prune_checkpoint(
        folder,
        out,
        flop_config,
        calibration_blocks(args, tokenizer),
        device=args.device,
        score=args.oneshot_score,
        allocation=args.allocation,
        reconstruct_options={"progress": False},
    )
    report = result.report
    print(
        f"wrote {result.path}: {report.deterministic_kept_params:,} of {report.prunable_params:,} prunable parameters "
        f"kept (sparsity {report.deterministic_sparsity:.4f}), {result.allocation} allocation, {result.seconds:.1f} s"
    )
    return result
