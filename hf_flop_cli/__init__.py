"""``hf-flop``: the command line (also ``python -m hf_flop_cli``, or ``python -m hf_flop``).

``hf-flop prune`` with no arguments runs the main job on the embedded defaults (offline): fine-tune
all-MiniLM-L6-v2 on the Rotten Tomatoes sentiment sentences, prune it with FLOP to the default
target (distilling from the dense model), compact it, and report dense vs pruned accuracy, sizes
and CPU speed measured in the same run. Every piece can be swapped by an option: any model (Hub id
or local folder), any dataset, sequence classification or causal language modelling.

``hf-flop stream`` one-shot prunes a causal-LM checkpoint folder one transformer layer at a time
(``hf_flop.prune_checkpoint``), for models that do not fit in memory.

``hf-flop report`` injects FLOP into a model and prints the sparsity report (a quick look at what
would be pruned and how the parameters are counted).

This package is the parser (``parser``; the task's defaults in ``defaults``, the names a user picks
from in ``choices``), its checks (``checks``) and ``main``. The work is the application layer's,
``hf_flop.app``: ``hf-flop prune`` builds a ``JobOptions`` and runs ``hf_flop.app.job``.

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

import json
import sys
from pathlib import Path

from .checks import CliError, check_options, check_outputs
from .choices import PRUNING_OPTIONS
from .defaults import TASK_DEFAULTS, default_threads
from .parser import build_parser

__all__ = ["TASK_DEFAULTS", "CliError", "build_parser", "default_threads", "main", "run_prune", "run_report"]


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``hf-flop`` console script; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    try:
        COMMANDS[args.command](args)
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
    # a PushToHubError comes from hf_flop.hub_push, so it is loaded when one was raised; importing it for the
    # check would load torch just to print an error raised before hf_flop was needed
    hub_push = sys.modules.get("hf_flop.hub_push")
    if hub_push is not None:
        kinds.append(hub_push.PushToHubError)
    onnx_export = sys.modules.get("hf_flop.onnx_export")  # the same for an OnnxExportError (--export-onnx)
    if onnx_export is not None:
        kinds.append(onnx_export.OnnxExportError)
    return isinstance(err, tuple(kinds))


# --- subcommands ---------------------------------------------------------------------------------
def _fill_task_defaults(args) -> None:
    """The options the user left out that depend on the task (``TASK_DEFAULTS``) or the machine (threads)."""
    for key, value in TASK_DEFAULTS[args.task].items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    if args.threads is None:
        args.threads = default_threads()


def _flop_config(args):
    """The options' FlopConfig. FlopConfig checks the values; its error becomes one line naming the option."""
    from hf_flop.config import FlopConfig, FlopConfigError

    try:
        return FlopConfig(
            target_sparsity=args.target,
            levels=args.levels,
            gate=args.gate,
            round_to=args.round_to,
            target_modules=args.target_modules,
            uniform_shapes=args.uniform_shapes,
        )
    except FlopConfigError as err:
        option, takes = PRUNING_OPTIONS.get(err.field, ("pruning options", "see --help"))
        raise CliError(f"invalid {option} ({takes}): {err}") from None


def _job_options(args):
    """The job's ``JobOptions`` from the completed options: its fields are named after them."""
    from dataclasses import fields

    from hf_flop.app.options import JobOptions

    return JobOptions(**{field.name: getattr(args, field.name) for field in fields(JobOptions)})


def run_prune(args) -> dict:
    """``hf-flop prune``: complete and check the options, run the job; returns the summary it writes to summary.json.

    The job's phases are in ``hf_flop.app.job``.
    """
    _fill_task_defaults(args)
    check_options(args)
    flop_config = _flop_config(args)  # the first import of hf_flop: torch, transformers, peft
    from hf_flop.app import job
    from hf_flop.files import check_output_dir

    options = _job_options(args)
    output_dir = check_output_dir(
        Path(options.output_dir).expanduser(), options.overwrite, name="--output-dir", overwrite_hint="pass --overwrite"
    )
    check_outputs(options, output_dir)
    return job.run(options, flop_config, output_dir)


def run_report(args) -> None:
    """``hf-flop report``: inject FLOP and print the sparsity report of the untrained gates."""
    from hf_flop import get_flop_model, sparsity_report
    from hf_flop.app.data import find_model, load_task_model
    from hf_flop.app.progress import quiet_libraries

    config = _flop_config(args)
    quiet_libraries()
    path = find_model(args.model or TASK_DEFAULTS[args.task]["model"])
    model = get_flop_model(load_task_model(path, args.task, num_labels=2), config)
    print(sparsity_report(model))


def run_stream(args):
    """``hf-flop stream``: prune a causal-LM checkpoint folder layer by layer (``hf_flop.prune_checkpoint``)."""
    args.gate, args.round_to, args.target_modules = "hard_concrete", 1, None  # what _flop_config reads
    config = _flop_config(args)
    from hf_flop.app import stream_job
    from hf_flop.app.progress import quiet_libraries

    quiet_libraries()
    return stream_job.run(args, config)


def run_eval(args):
    """``hf-flop eval``: lm-eval's harness on the model folders (``hf_flop.app.lm_eval_run.evaluate_lm``)."""
    from hf_flop.app.lm_eval_run import evaluate_lm

    models = {"dense": args.dense} if args.dense else {}
    # one model is "pruned" (the card's column); several are named by their folders
    names = ["pruned"] if len(args.model) == 1 else [Path(folder).name for folder in args.model]
    models.update(zip(names, args.model))
    report = evaluate_lm(
        models,
        [task for task in args.tasks.split(",") if task],
        args.output,
        num_fewshot=args.num_fewshot,
        batch_size=args.batch_size,
        seed=args.seed,
        limit=args.limit,
        include_path=args.include_path,
        device=args.device,
    )
    if args.card:
        from hf_flop.app.eval_card import add_eval_table

        add_eval_table(args.card, args.output)
    print(json.dumps(report["results"], indent=2))


COMMANDS = {"prune": run_prune, "report": run_report, "stream": run_stream, "eval": run_eval}  # subcommand -> what runs it
