"""What the command line refuses before the job starts, each as one line that names the option to change.

``check_options`` needs nothing from ``hf_flop``, so it answers before hf_flop's slow import;
``check_outputs`` runs once the output folder is known, before anything loads or trains. The values
FlopConfig checks are FlopConfig's alone (``hf_flop_cli._flop_config`` names the option of its error).
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import TYPE_CHECKING

from .choices import COMPACT_RECOVERY_LEVELS

if TYPE_CHECKING:
    from hf_flop.app.options import JobOptions


class CliError(Exception):
    """A user error: printed as one line, exit status 2."""


def check_options(args) -> None:
    """Options that only make sense together (parsed ``hf-flop prune`` options)."""
    if args.gguf_quantization and not args.export_gguf:
        raise CliError("--gguf-quantization quantizes model.gguf: add --export-gguf, or drop --gguf-quantization.")
    if args.onnx_quantization and not args.export_onnx:
        raise CliError("--onnx-quantization quantizes model.onnx: add --export-onnx, or drop --onnx-quantization.")
    if args.push_to_hub and not args.repo_id:
        raise CliError("--push-to-hub needs --repo-id owner/name.")
    _check_search(args)
    if args.hidden_distillation > 0 and not args.distill:
        raise CliError("--hidden-distillation distils from the dense model: drop --no-distill, or set it to 0.")
    if args.recovery_lora_rank is not None:
        if args.pruning_phase != 0:
            raise CliError(
                f"--recovery-lora-rank trains LoRA adapters in the recovery steps on the compacted model, which only "
                f"--pruning-phase 0 has (now {args.pruning_phase:g}); use --pruning-phase 0, or drop --recovery-lora-rank."
            )
        other = [level for level in args.levels if level not in COMPACT_RECOVERY_LEVELS]
        if other:
            raise CliError(
                f"--recovery-lora-rank recovers on the compacted model, which only levels "
                f"{','.join(COMPACT_RECOVERY_LEVELS)} train (--levels has {','.join(other)}); drop those levels, or "
                "drop --recovery-lora-rank."
            )


def _check_search(args) -> None:
    """--search: one-shot masks, a coarse level to mix, enough batches to fit and hold out."""
    if not args.search:
        given = [name for name in ("--search-hidden", "--search-layers") if getattr(args, name[2:].replace("-", "_"))]
        if given:
            raise CliError(f"{' and '.join(given)} set(s) the candidates of --search: add --search, or drop it.")
        return
    if args.pruning_phase != 0.0:
        raise CliError(
            "--search sets the masks before the first step from the chosen mix, so it needs --pruning-phase 0 (the "
            "default); drop --pruning-phase, or drop --search."
        )
    if not {"hidden", "layer"} & set(args.levels):
        raise CliError(
            "--search mixes residual channels and layers with the finer levels: add hidden and/or layer to --levels "
            "(e.g. --levels head,row,hidden,layer), or drop --search."
        )
    if args.calibration_batches < 3:
        raise CliError("--search needs at least 3 --calibration-batches (two to fit and refit on, one held out).")


def _check_gguf_quantization(options: JobOptions) -> None:
    """--gguf-quantization with --gguf-dtype, and llama-cpp-python for a K-quant: export_gguf's own check."""
    from hf_flop.gguf_quant import resolve_quantization

    try:
        dtype = options.gguf_dtype if options.gguf_dtype != "f32" else None  # f32: --gguf-dtype's default
        resolve_quantization(
            options.gguf_quantization, dtype, {"quantization": "--gguf-quantization", "dtype": "--gguf-dtype"}.get
        )
    except ValueError as err:
        raise CliError(str(err).removeprefix("export_gguf: ")) from None


def check_outputs(options: JobOptions, output_dir: Path) -> None:
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
    if options.export_gguf:
        if options.task != "causal-lm":
            raise CliError("--export-gguf writes causal language models for llama.cpp; use it with --task causal-lm.")
        if importlib.util.find_spec("gguf") is None:
            raise CliError("--export-gguf needs the gguf package: pip install gguf (or 'hf-flop[deploy]').")
        if options.gguf_tokenizer and not Path(options.gguf_tokenizer).expanduser().is_file():
            raise CliError(f"--gguf-tokenizer {options.gguf_tokenizer} is not a file.")
        if options.gguf_quantization:
            _check_gguf_quantization(options)
    if not options.no_plots and importlib.util.find_spec("matplotlib") is None:
        raise CliError("the plots need matplotlib: pip install matplotlib (or hf-flop[examples]), or pass --no-plots.")
    if options.export_onnx:
        from hf_flop.onnx_export import missing_onnx_packages

        missing = missing_onnx_packages()
        if missing:
            raise CliError(
                f"--export-onnx needs {', '.join(missing)}: pip install 'hf-flop[deploy]', or drop --export-onnx."
            )
    if options.push_to_hub:
        if not re.fullmatch(r"[\w.-]+/[\w.-]+", options.repo_id):
            raise CliError(f"--repo-id {options.repo_id!r} is not a Hub repository id; use owner/name.")
        from huggingface_hub import constants, get_token

        if constants.HF_HUB_OFFLINE:
            raise CliError("--push-to-hub cannot push with HF_HUB_OFFLINE set; unset it, or drop --push-to-hub.")
        if not get_token():
            raise CliError("--push-to-hub needs a Hub token with write access: run `hf auth login` or set HF_TOKEN.")
