"""The ``hf-flop`` argument parser: its subcommands, their options with their help, and the option types.

Argument errors are one line (no usage block), exit status 2. Values FlopConfig checks (levels, target,
round-to) are only parsed here: FlopConfig's own check is the one rule, and its errors name the option.
"""

from __future__ import annotations

import argparse

from .choices import (
    DATASETS,
    GATES,
    GGUF_K_QUANTIZATIONS,
    GGUF_QUANTIZATIONS,
    MODELS,
    ONNX_QUANTIZATIONS,
    PRUNING_OPTIONS,
    SCORES,
)
from .defaults import TASK_DEFAULTS, default_threads
from .eval_parser import add_eval_parser
from .stream_parser import add_stream_parser

_TAKES = dict(PRUNING_OPTIONS.values())  # option -> what it takes, for the help


def _number(value: str) -> float:
    try:
        return float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not a number") from None


def _non_negative(kind):
    def parse(value: str):
        try:
            number = kind(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{value!r} is not a {kind.__name__}") from None
        if number < 0:
            raise argparse.ArgumentTypeError(f"{value} must be >= 0")
        return number

    return parse


def _positive(kind):
    def parse(value: str):
        number = _non_negative(kind)(value)
        if number == 0:
            raise argparse.ArgumentTypeError(f"{value} must be > 0")
        return number

    return parse


def _fraction(value: str) -> float:
    """A number in [0, 1]."""
    number = _number(value)
    if not 0.0 <= number <= 1.0:
        raise argparse.ArgumentTypeError(f"{value} must be in [0, 1]")
    return number


def _fractions(value: str) -> list[float]:
    """A comma-separated list of numbers in [0, 1); at least one."""
    numbers = [_number(v.strip()) for v in value.split(",") if v.strip()]
    if not numbers or any(not 0.0 <= n < 1.0 for n in numbers):
        raise argparse.ArgumentTypeError(f"{value!r}: give comma-separated fractions in [0, 1), e.g. 0,0.125,0.25")
    return numbers


def _levels(value: str) -> list[str]:
    """The comma-separated list; FlopConfig checks the names."""
    return [v.strip() for v in value.split(",") if v.strip()]


def _names(value: str) -> list[str]:
    """A comma-separated list of module names; at least one."""
    names = [v.strip() for v in value.split(",") if v.strip()]
    if not names:
        raise argparse.ArgumentTypeError("give at least one module name, e.g. q_proj,v_proj")
    return names


def _add_model_options(parser: argparse.ArgumentParser) -> None:
    names = ", ".join(f"'{k}' ({v})" for k, v in MODELS.items())
    parser.add_argument(
        "--task",
        choices=tuple(TASK_DEFAULTS),  # a task the CLI runs has defaults here (and a metric in hf_flop.metrics)
        default="seq-cls",
        help="seq-cls: sequence classification (accuracy); causal-lm: language modelling (perplexity).",
    )
    parser.add_argument(
        "--model",
        help=f"Hub id or local folder of a transformers model, or an embedded default: {names}. "
        "Default: minilm for seq-cls, smollm2 for causal-lm.",
    )
    parser.add_argument(
        "--target",
        type=_number,
        default=0.5,
        help=f"Fraction of the prunable parameters to remove: {_TAKES['--target']}.",
    )
    parser.add_argument(
        "--levels",
        type=_levels,
        default="head,row",
        help=f"Structures to gate, {_TAKES['--levels']}: rank = FLOP low-rank components, head = attention "
        "heads (whole KV groups), query_head = query heads inside KV groups (GQA/MQA; KV heads kept), row = FFN "
        "neurons, block = weight blocks (not with rank), embedding = vocabulary clusters, layer = whole "
        "transformer layers.",
    )
    parser.add_argument("--gate", choices=GATES, default="hard_concrete", help="Gate type.")
    parser.add_argument(
        "--round-to",
        type=int,
        default=1,
        help=f"Round kept ranks/rows up to a multiple of this, {_TAKES['--round-to']}.",
    )
    parser.add_argument(
        "--uniform-shapes",
        action="store_true",
        help="Keep the same heads (KV groups) and FFN width in every layer, so the compacted model is the stock "
        "transformers class (no remote code; llama.cpp's 'llama'). Levels head, query_head, row and/or hidden; heads only where "
        "the stock config states the head size (Llama-family, not BERT or GPT-2: use --levels row there). "
        "On SmolLM2 at 50 %% it also gave the lower perplexity (benchmarks/README.md, 'Equal budget').",
    )
    parser.add_argument(
        "--target-modules",
        type=_names,
        help="Linear layers to prune, a comma-separated list of module names matched as suffixes (e.g. "
        "q_proj,k_proj,v_proj,out_proj,fc1,fc2). Default: the attention and MLP projections of a supported "
        "architecture; other architectures need it (and support levels rank and block only).",
    )


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line (no usage block), exit status 2."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows real defaults only: task-dependent ones (None) are described in the option's help."""

    def _get_help_string(self, action: argparse.Action) -> str:
        if action.default in (None, False, argparse.SUPPRESS) or "Default:" in (action.help or ""):
            return action.help or ""
        return super()._get_help_string(action)


def build_parser() -> argparse.ArgumentParser:
    """The ``hf-flop`` argument parser (subcommands ``prune`` and ``report``)."""
    fmt = _HelpFormatter
    parser = _Parser(
        prog="hf-flop",
        description="Structured pruning of transformers models with FLOP (factorized low-rank pruning).",
        epilog="Run 'hf-flop prune' with no arguments for the main job on the embedded defaults (offline).",
    )
    parser.add_argument("--debug", action="store_true", help="Show full tracebacks instead of one-line errors.")
    sub = parser.add_subparsers(dest="command", metavar="{prune,report,stream,eval}", parser_class=_Parser)

    prune = sub.add_parser(
        "prune",
        formatter_class=fmt,
        help="Fine-tune, prune to a target size, compact, evaluate, save (the main job).",
        description="Dense fine-tune (optional), FLOP pruning with PruningTrainer (distilling from the dense "
        "model), compaction, evaluation before/after, CPU latency, model card and plots. With no arguments: "
        "all-MiniLM-L6-v2 on the Rotten Tomatoes sentiment sentences, offline.",
    )
    _add_model_options(prune)
    data = prune.add_argument_group("data")
    data.add_argument(
        "--dataset",
        help="Hub id, local folder (save_to_disk or data files) or file (csv/tsv/json/jsonl/parquet/txt), or an "
        f"embedded default: {', '.join(f'{k!r} ({v})' for k, v in DATASETS.items())}. "
        "Default: rt-sentiment for seq-cls, ptb for causal-lm.",
    )
    data.add_argument("--dataset-config", help="Configuration name of a Hub dataset (load_dataset's second argument).")
    data.add_argument(
        "--data-dir", help="Folder with vaderSentiment-3.3.2.tar.gz for rt-sentiment (default: $HF_FLOP_DATA or .venv)."
    )
    data.add_argument("--text-column", help="Text column (default: the first of text, sentence, content, review).")
    data.add_argument("--label-column", help="Label column for seq-cls (default: label or labels).")
    data.add_argument(
        "--eval-split", help="Split to report metrics on (default: test if it has labels, else validation)."
    )
    data.add_argument(
        "--max-length",
        type=_positive(int),
        help="Tokens per example (seq-cls, truncation) or per block (causal-lm). Default: 64 / 128.",
    )
    data.add_argument(
        "--train-samples",
        type=_non_negative(int),
        help="Training examples (causal-lm: blocks) used, a seeded subset; 0 = all. Default: all (8,072) / 800.",
    )
    data.add_argument(
        "--eval-samples",
        type=_non_negative(int),
        help="Evaluation examples (causal-lm: blocks); 0 = all. Default: 1000 / 100.",
    )

    train = prune.add_argument_group("training")
    train.add_argument(
        "--dense-epochs",
        type=_non_negative(float),
        help="Epochs of plain fine-tuning before pruning (its result is the 'dense' baseline and the teacher). "
        "Default: 1 for seq-cls (a new classifier head needs training), 0 for causal-lm.",
    )
    train.add_argument(
        "--epochs", type=_positive(float), help="Pruning epochs. Default: 2 for seq-cls, 1 for causal-lm."
    )
    train.add_argument("--max-steps", type=_positive(int), help="Pruning steps (overrides --epochs).")
    train.add_argument(
        "--target-warmup", type=_non_negative(float), default=0.5, help="Target warm-up: steps, or a fraction if < 1."
    )
    train.add_argument("--batch-size", type=_positive(int), help="Training batch size (per process). Default: 16 / 8.")
    train.add_argument(
        "--learning-rate",
        type=_positive(float),
        help="Model learning rate. Default: 5e-5 for seq-cls, 2e-4 for causal-lm (measured, benchmarks/README.md, 'Equal budget').",
    )
    train.add_argument(
        "--gate-learning-rate", type=_positive(float), help="Gate learning rate. Default: PruningArguments' default."
    )
    train.add_argument(
        "--lagrangian-learning-rate",
        type=_positive(float),
        help="Lagrange multiplier learning rate. Default: PruningArguments' default.",
    )
    train.add_argument(
        "--distill",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="Distil the pruned model from the dense one (logit KL).",
    )
    train.add_argument(
        "--pruning-phase",
        type=_fraction,
        default=0.0,
        help="Fraction of the pruning steps that learn the masks, in [0, 1]. 1: FLOP's single phase (the gates "
        "learn to the end). Below 1: the gates start from --oneshot-score scores, and after that fraction the masks "
        "are fixed at exactly the target, the kept weights refit on --calibration-batches training batches, and "
        "the remaining steps fine-tune with the masks held. 0: the masks are set one-shot before the first step "
        "and every step fine-tunes.",
    )
    train.add_argument(
        "--oneshot-score",
        choices=SCORES,
        help="Score that sets the one-shot masks (--pruning-phase 0) or starts the gates (below 1). Default: obs; "
        "activation with --uniform-shapes (measured on SmolLM2: 63.3 against 74.8; benchmarks/README.md, 'Equal budget').",
    )
    train.add_argument(
        "--calibration-batches",
        type=_positive(int),
        default=32,
        help="Training batches (of --batch-size) the scores and the refit read, with --pruning-phase below 1.",
    )
    train.add_argument(
        "--search",
        action="store_true",
        help="Before pruning, choose the shape by measurement (hf_flop.search_shape): candidate mixes remove a share "
        "of the residual channels (level hidden) and of the layers (level layer), heads and rows fill the rest of "
        "the same --target; each is pruned one-shot and refit on three quarters of the --calibration-batches and "
        "scored by its loss on the other quarter. The lowest loss sets the masks; shape_search.json lists every "
        "candidate. Needs --pruning-phase 0 and hidden and/or layer in --levels.",
    )
    train.add_argument(
        "--search-hidden",
        type=_fractions,
        help="With --search: the fractions of the residual channels the candidates remove. Default: 0,0.125,0.25.",
    )
    train.add_argument(
        "--search-layers",
        type=_fractions,
        help="With --search: the fractions of the layers the candidates remove (rounded to whole layers). "
        "Default: 0,0.125,0.25.",
    )
    train.add_argument(
        "--hidden-distillation",
        type=_non_negative(float),
        default=0.0,
        help="Weight of the hidden-state (layer-by-layer MSE) distillation from the dense model, beside the logit "
        "KL; 0 = off. Needs --distill.",
    )
    train.add_argument(
        "--recovery-lora-rank",
        type=_positive(int),
        metavar="N",
        help="Recover with LoRA adapters of rank N on the compacted model's linears instead of training every "
        "weight (fewer trainable parameters, less optimizer memory); they are merged into the saved model, which "
        "loads without peft. Needs the recovery steps of --pruning-phase 0 and levels head, query_head, row.",
    )
    train.add_argument("--seed", type=int, default=0, help="Seed of data subsets, initialisation and training.")
    train.add_argument(
        "--threads",
        type=_positive(int),
        help="CPU threads (torch.set_num_threads) for training and evaluation. Default: $OMP_NUM_THREADS if set, "
        f"else every CPU this process may use ({default_threads()} here). On a machine other jobs share, fewer "
        "threads than cores are faster (see docs/cli.md).",
    )

    out = prune.add_argument_group("output")
    out.add_argument("--output-dir", default="hf_flop_output", help="Folder for the compacted model, plots, summary.")
    out.add_argument("--overwrite", action="store_true", help="Replace --output-dir if it exists and is not empty.")
    out.add_argument(
        "--latency-threads",
        type=_positive(int),
        default=1,
        help="CPU threads for the dense vs compacted latency measurement (batch 1 and 32, --max-length tokens).",
    )
    out.add_argument("--no-plots", action="store_true", help="Skip the PNG plots (they need matplotlib).")
    out.add_argument(
        "--export-onnx",
        action="store_true",
        help="Also write the compacted model as ONNX, <output-dir>/model.onnx, for ONNX Runtime: inputs input_ids, "
        "attention_mask (and token_type_ids where the model has token types, as BERT has), output logits, any batch "
        "size and length; checked against PyTorch with ONNX Runtime. Needs pip install 'hf-flop[deploy]'.",
    )
    out.add_argument(
        "--export-gguf",
        action="store_true",
        help="Also write the compacted model as model.gguf for llama.cpp (hf_flop.export_gguf; causal-lm, Llama-family "
        "models; per-layer shapes as llama.cpp's deci architecture). Needs the gguf package (in 'hf-flop[deploy]').",
    )
    out.add_argument(
        "--gguf-dtype", choices=("f32", "f16"), default="f32", help="Precision of the GGUF file's matrices."
    )
    out.add_argument(
        "--gguf-quantization",
        choices=GGUF_QUANTIZATIONS + GGUF_K_QUANTIZATIONS,
        metavar="TYPE",
        help="Quantize model.gguf (--export-gguf) to this llama.cpp type, instead of --gguf-dtype: "
        f"{', '.join(GGUF_QUANTIZATIONS)} (written by the gguf package), or the K-quants "
        f"{', '.join(GGUF_K_QUANTIZATIONS)} (by llama.cpp's quantizer: needs llama-cpp-python). Norms stay f32; "
        "matrices whose width is not a multiple of the type's block stay f16 (a note says which).",
    )
    out.add_argument(
        "--onnx-quantization",
        choices=ONNX_QUANTIZATIONS,
        help="Quantize model.onnx (--export-onnx): int8 is ONNX Runtime's dynamic quantization (int8 weights, "
        "activations quantized at run time), written after the float model is checked against PyTorch.",
    )
    out.add_argument(
        "--gguf-tokenizer",
        help="A GGUF file whose vocabulary (tokenizer.* metadata) model.gguf copies. Default: the embedded model's own "
        "GGUF for smollm2, else the vocabulary is built from the model's tokenizer.json (byte-level BPE only).",
    )
    out.add_argument("--push-to-hub", action="store_true", help="Also push the compacted model, its card and the exported files to the Hub.")
    out.add_argument("--repo-id", help="Hub repository (owner/name) for --push-to-hub.")
    out.add_argument("--private", action="store_true", help="Create the Hub repository as private.")
    out.add_argument(
        "--license",
        help="License of the pruned model for its card (e.g. apache-2.0). Default: the base model's, read from its "
        "README.md metadata when it is there (the embedded MiniLM: apache-2.0), else none.",
    )

    report = sub.add_parser(
        "report",
        formatter_class=fmt,
        help="Inject FLOP into a model and print its sparsity report.",
        description="Inject FLOP gates (nothing trained) and print the prunable parameters per module.",
    )
    _add_model_options(report)
    add_stream_parser(sub, fmt, _positive, _levels, _number)
    add_eval_parser(sub, fmt, _positive)
    return parser
