"""Bridges to library interfaces other branches are adding; delete this file (revert its commit) once they are in.

The application is written against: ``hf_flop.config.FlopConfigError`` (``.field``),
``hf_flop.scores.recommended_oneshot_score``, ``hf_flop.trainer.TargetMissedWarning`` and
``PruningTrainer.missed_target_message(names, prefix="")``, ``hf_flop.export_gguf.GGUFExportWarning``
(``.note``) and the ``names=`` argument of ``check_exportable`` / ``export_gguf``. Each name here is the
library's where it has it, else a stand-in that keeps the old behaviour, so the job runs meanwhile.
"""

from __future__ import annotations

import importlib
import inspect
import re
import warnings

# the modules, not the names hf_flop's __init__ exports (hf_flop.export_gguf is also a function there)
_config, _export_gguf, _scores, _trainer = (
    importlib.import_module(f"hf_flop.{name}") for name in ("config", "export_gguf", "scores", "trainer")
)

# --- FlopConfig's errors name their field ----------------------------------------------------------------------------
FlopConfigError = getattr(_config, "FlopConfigError", ValueError)


def config_error_field(err: ValueError) -> str | None:
    """``err.field``; the old messages start with ``FlopConfig.<field>``."""
    if hasattr(err, "field"):
        return err.field
    found = re.match(r"FlopConfig\.(\w+)", str(err))
    return found and found.group(1)


# --- the one-shot score a configuration gets when none is asked ------------------------------------------------------
def _old_recommendation(config) -> str:
    return "activation" if config.uniform_shapes else "obs"


recommended_oneshot_score = getattr(_scores, "recommended_oneshot_score", _old_recommendation)


# --- the trainer's missed target ---------------------------------------------------------------------------------------
def ignore_missed_target() -> None:
    """Inside ``warnings.catch_warnings()``: drop PruningTrainer's missed-target warning (the job words its own)."""
    if hasattr(_trainer, "TargetMissedWarning"):
        warnings.simplefilter("ignore", _trainer.TargetMissedWarning)
    else:
        warnings.filterwarnings("ignore", message="PruningTrainer: the model ended", category=UserWarning)


def missed_target_message(trainer, names: dict[str, str]) -> str:
    """``trainer.missed_target_message(names, prefix="")``."""
    if "prefix" in inspect.signature(trainer.missed_target_message).parameters:
        return trainer.missed_target_message(names, prefix="")
    return trainer.missed_target_message(names).replace("PruningTrainer: the model", "the model")


# --- GGUF messages in the caller's option names -------------------------------------------------------------------------
_NAMES_TAKEN = "names" in inspect.signature(_export_gguf.check_exportable).parameters


def _old_words(message: str, names: dict[str, str]) -> str:
    for name, option in names.items():
        message = message.replace(f"{name}=", option)
    return message


def check_exportable(model, *, names: dict[str, str], **kwargs) -> None:
    """``hf_flop.export_gguf.check_exportable(model, ..., names=names)``."""
    if _NAMES_TAKEN:
        return _export_gguf.check_exportable(model, names=names, **kwargs)
    try:
        return _export_gguf.check_exportable(model, **kwargs)
    except ValueError as err:
        raise ValueError(_old_words(str(err), names)) from None


def export_gguf(model, path, *, names: dict[str, str], **kwargs):
    """``hf_flop.export_gguf.export_gguf(model, path, ..., names=names)``."""
    if _NAMES_TAKEN:
        return _export_gguf.export_gguf(model, path, names=names, **kwargs)
    return _export_gguf.export_gguf(model, path, **kwargs)


GGUFExportWarning = getattr(_export_gguf, "GGUFExportWarning", UserWarning)


def gguf_note(warning: Warning, names: dict[str, str]) -> str:
    """``warning.note``; the old warnings carry the API's advice after "; densify=False" and an "export_gguf: " prefix."""
    if hasattr(warning, "note"):
        return warning.note
    return _old_words(str(warning).split("; densify=False")[0].removeprefix("export_gguf: "), names)
