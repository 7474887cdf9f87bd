"""``hf-flop``: the command line (also ``python -m hf_flop_cli``, or ``python -m hf_flop``).

``hf-flop prune`` with no arguments runs the main job on the embedded defaults (offline): fine-tune
all-MiniLM-L6-v2 on the Rotten Tomatoes sentiment sentences, prune it with FLOP to the default
target (distilling from the dense model), compact it, and report dense vs pruned accuracy, sizes
and CPU speed measured in the same run. Every piece can be swapped by an option: any model (Hub id
or local folder), any dataset, sequence classification or causal language modelling.

``hf-flop report`` injects FLOP into a model and prints the sparsity report (a quick look at what
would be pruned and how the parameters are counted).

This module parses and checks the options; the prune job itself is ``hf_flop.prune_job``, its
console output ``hf_flop.progress``, and the model and data loading it shares with the examples
``hf_flop.data``.

Why a package of its own, beside ``hf_flop``: ``import hf_flop`` registers FLOP with PEFT and the
compacted models with transformers' Auto classes (users rely on that: ``PeftModel.from_pretrained``
and ``AutoModel.from_pretrained`` work right after it), so it imports peft, transformers and torch,
which took 9 to 20 s on 2 CPU cores; any ``hf_flop.*`` module runs that first. This package imports
only the standard library at module level, so ``hf-flop --help`` and an option error answer at once;
hf_flop is imported once the options have parsed and passed the checks that need nothing from it.
Keep every ``hf_flop`` (and torch, transformers...) import inside the functions that run a command.
``python -m hf_flop`` works too, but starts as slowly as ``import hf_flop``.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from pathlib import Path

from .choices import DATASETS, GATES, LEVELS, MODELS, SCORES

# The default job must finish in under ~15 minutes on 2 CPU cores (measured 6.4 min, see the
# README): all 8,072 training sentences, batch 16, one dense epoch, then two pruning epochs.
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
        # 5e-5 and 63.3 at 2e-4 (Torch-Pruning's model 135.0 and 85.6): README, "Equal budget"
        "learning_rate": 2e-4,
    },
}


class CliError(Exception):
    """A user error: printed as one line, exit status 2."""


# --- arguments -----------------------------------------------------------------------------------
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


# FlopConfig field -> (the option that sets it, what it takes): for --help and for FlopConfig's errors
_PRUNING_OPTIONS = {
    "target_sparsity": ("--target", "a number in [0, 1)"),
    "levels": ("--levels", f"a comma-separated subset of {','.join(LEVELS)}"),
    "gate": ("--gate", f"one of {', '.join(GATES)}"),
    "round_to": ("--round-to", "a positive integer"),
    "target_modules": ("--target-modules", "a comma-separated list of linear layer names"),
    "uniform_shapes": ("--uniform-shapes", "levels head and/or row only"),
}
_TAKES = dict(_PRUNING_OPTIONS.values())


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


def _levels(value: str) -> list[str]:
    """The comma-separated list; FlopConfig checks the names."""
    return [v.strip() for v in value.split(",") if v.strip()]


def _names(value: str) -> list[str]:
    """A comma-separated list of module names; at least one."""
    names = [v.strip() for v in value.split(",") if v.strip()]
    if not names:
        raise argparse.ArgumentTypeError("give at least one module name, e.g. q_proj,v_proj")
    return names


def _flop_config(args):
    """The options' FlopConfig. FlopConfig checks the values; its error becomes one line naming the option."""
    from hf_flop.config import FlopConfig

    try:
        return FlopConfig(
            target_sparsity=args.target,
            levels=args.levels,
            gate=args.gate,
            round_to=args.round_to,
            target_modules=args.target_modules,
            uniform_shapes=args.uniform_shapes,
        )
    except ValueError as err:
        field = re.match(r"FlopConfig\.(\w+)", str(err))  # FlopConfig's messages start with the field
        option, takes = _PRUNING_OPTIONS.get(field and field.group(1), ("pruning options", "see --help"))
        raise CliError(f"invalid {option} ({takes}): {err}") from None


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
        "heads, row = FFN neurons, block = weight blocks (not with rank), embedding = vocabulary clusters.",
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
        "transformers class (no remote code; llama.cpp's 'llama'). Levels head and/or row; heads only where "
        "the stock config states the head size (Llama-family, not BERT or GPT-2: use --levels row there). "
        "On SmolLM2 at 50 %% it also gave the lower perplexity (README, 'Equal budget').",
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
    sub = parser.add_subparsers(dest="command", metavar="{prune,report}", parser_class=_Parser)

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
        help="Model learning rate. Default: 5e-5 for seq-cls, 2e-4 for causal-lm (measured, README 'Equal budget').",
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
        "activation with --uniform-shapes (measured on SmolLM2: 63.3 against 74.8; README 'Equal budget').",
    )
    train.add_argument(
        "--calibration-batches",
        type=_positive(int),
        default=32,
        help="Training batches (of --batch-size) the scores and the refit read, with --pruning-phase below 1.",
    )
    train.add_argument(
        "--hidden-distillation",
        type=_non_negative(float),
        default=0.0,
        help="Weight of the hidden-state (layer-by-layer MSE) distillation from the dense model, beside the logit "
        "KL; 0 = off. Needs --distill.",
    )
    train.add_argument("--seed", type=int, default=0, help="Seed of data subsets, initialisation and training.")
    train.add_argument(
        "--threads",
        type=_positive(int),
        help="CPU threads (torch.set_num_threads) for training and evaluation. Default: $OMP_NUM_THREADS if set, "
        f"else every CPU this process may use ({default_threads()} here). On a machine other jobs share, fewer "
        "threads than cores are faster (see the README).",
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
        "--gguf-tokenizer",
        help="A GGUF file whose vocabulary (tokenizer.* metadata) model.gguf copies. Default: the embedded model's own "
        "GGUF for smollm2, else the vocabulary is built from the model's tokenizer.json (byte-level BPE only).",
    )
    out.add_argument("--push-to-hub", action="store_true", help="Also push the compacted model and card to the Hub.")
    out.add_argument("--repo-id", help="Hub repository (owner/name) for --push-to-hub.")
    out.add_argument("--private", action="store_true", help="Create the Hub repository as private.")
    out.add_argument(
        "--license",
        help="License of the pruned model for its card (e.g. apache-2.0). Default: the base model's, read from its "
        "README.md metadata when it is there (the embedded MiniLM: apache-2.0), else none.",
    )
    prune.set_defaults(func=run_prune)

    report = sub.add_parser(
        "report",
        formatter_class=fmt,
        help="Inject FLOP into a model and print its sparsity report.",
        description="Inject FLOP gates (nothing trained) and print the prunable parameters per module.",
    )
    _add_model_options(report)
    report.set_defaults(func=run_report)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``hf-flop`` console script; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    try:
        args.func(args)
    except KeyboardInterrupt:
        print("hf-flop: interrupted", file=sys.stderr)
        return 130
    except Exception as err:
        if args.debug or not _is_user_error(err):
            raise
        message = " ".join(str(err).split()) or type(err).__name__
        print(f"hf-flop {args.command}: error: {message} (--debug shows the traceback)", file=sys.stderr)
        return 2
    return 0


def _is_user_error(err: Exception) -> bool:
    """An error the message alone lets the user fix (printed as one line); any other is a bug (a traceback)."""
    kinds = [CliError, ValueError, TypeError, OSError, ImportError]
    # a PushToHubError comes from hf_flop.hub, so it is loaded when one was raised; importing it for the check
    # would load torch just to print an error raised before hf_flop was needed
    hub = sys.modules.get("hf_flop.hub")
    if hub is not None:
        kinds.append(hub.PushToHubError)
    onnx_export = sys.modules.get("hf_flop.onnx_export")  # the same for an OnnxExportError (--export-onnx)
    if onnx_export is not None:
        kinds.append(onnx_export.OnnxExportError)
    return isinstance(err, tuple(kinds))


# --- subcommands ---------------------------------------------------------------------------------
def _fill_task_defaults(args) -> None:
    for key, value in TASK_DEFAULTS[args.task].items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    if args.oneshot_score is None:  # obs won on MiniLM and tied on SmolLM2, but lost there with uniform shapes
        args.oneshot_score = "activation" if args.uniform_shapes else "obs"
    if args.threads is None:
        args.threads = default_threads()
    if args.push_to_hub and not args.repo_id:
        raise CliError("--push-to-hub needs --repo-id owner/name.")
    if args.hidden_distillation > 0 and not args.distill:
        raise CliError("--hidden-distillation distils from the dense model: drop --no-distill, or set it to 0.")


def run_prune(args) -> dict:
    """``hf-flop prune``: complete and check the options, run the job; returns the summary it writes to summary.json.

    The job's phases are in ``hf_flop.prune_job``.
    """
    _fill_task_defaults(args)
    flop_config = _flop_config(args)  # the first import of hf_flop: torch, transformers, peft
    from hf_flop import prune_job
    from hf_flop.files import check_output_dir

    output_dir = check_output_dir(
        Path(args.output_dir).expanduser(), args.overwrite, name="--output-dir", overwrite_hint="pass --overwrite"
    )
    _check_outputs(args, output_dir)
    return prune_job.run(args, flop_config, output_dir)


def _check_outputs(args, output_dir: Path) -> None:
    """What the job needs at its end, checked before it trains: a writable place, the card template, matplotlib
    for the plots, the ONNX packages for --export-onnx, for --export-gguf a causal-lm task and the gguf package, and
    for --push-to-hub a repository id, a token and the network allowed. (Whether llama.cpp can take the model is
    checked once it is loaded.)"""
    import importlib.util

    from hf_flop.hub import CARD_TEMPLATE

    parent = output_dir.absolute().parent  # the output is staged next to the folder, then renamed into place
    existing = next(p for p in (parent, *parent.parents) if p.exists())
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        raise CliError(f"--output-dir {output_dir} cannot be written: {existing} is not a writable folder.")
    if not CARD_TEMPLATE.is_file():
        raise CliError(
            f"the model card template {CARD_TEMPLATE} is missing from this installation of hf_flop; reinstall it "
            "(pip install --force-reinstall hf-flop)."
        )
    if args.export_gguf:
        if args.task != "causal-lm":
            raise CliError("--export-gguf writes causal language models for llama.cpp; use it with --task causal-lm.")
        if importlib.util.find_spec("gguf") is None:
            raise CliError("--export-gguf needs the gguf package: pip install gguf (or 'hf-flop[deploy]').")
        if args.gguf_tokenizer and not Path(args.gguf_tokenizer).expanduser().is_file():
            raise CliError(f"--gguf-tokenizer {args.gguf_tokenizer} is not a file.")
    if not args.no_plots and importlib.util.find_spec("matplotlib") is None:
        raise CliError("the plots need matplotlib: pip install matplotlib (or hf-flop[examples]), or pass --no-plots.")
    if args.export_onnx:
        from hf_flop.onnx_export import missing_onnx_packages

        missing = missing_onnx_packages()
        if missing:
            raise CliError(
                f"--export-onnx needs {', '.join(missing)}: pip install 'hf-flop[deploy]', or drop --export-onnx."
            )
    if args.push_to_hub:
        if not re.fullmatch(r"[\w.-]+/[\w.-]+", args.repo_id):
            raise CliError(f"--repo-id {args.repo_id!r} is not a Hub repository id; use owner/name.")
        from huggingface_hub import constants, get_token

        if constants.HF_HUB_OFFLINE:
            raise CliError("--push-to-hub cannot push with HF_HUB_OFFLINE set; unset it, or drop --push-to-hub.")
        if not get_token():
            raise CliError("--push-to-hub needs a Hub token with write access: run `hf auth login` or set HF_TOKEN.")


def run_report(args) -> None:
    """``hf-flop report``: inject FLOP and print the sparsity report of the untrained gates."""
    from hf_flop import get_flop_model, sparsity_report
    from hf_flop.data import find_model, load_task_model
    from hf_flop.progress import quiet_libraries

    config = _flop_config(args)
    quiet_libraries()
    path = find_model(args.model or TASK_DEFAULTS[args.task]["model"])
    model = get_flop_model(load_task_model(path, args.task, num_labels=2), config)
    print(sparsity_report(model))
