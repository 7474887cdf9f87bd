"""The job's ``model.gguf`` for llama.cpp (``--export-gguf``): refused before training when llama.cpp cannot
take the model, written at the end, with ``hf_flop.export_gguf``'s messages in the command line's words."""

from __future__ import annotations

import warnings
from pathlib import Path

from .data import source_gguf
from .options import JobOptions
from .state import JobState

GGUF_FILE = "model.gguf"
# export_gguf's parameters -> what sets them for a CLI user: its errors and notes name these instead
OPTION_NAMES = {"tokenizer_gguf": "--gguf-tokenizer", "quantization": "--gguf-quantization", "tokenizer_pre": "hf_flop.export_gguf(tokenizer_pre=...)"}


def _gguf_tokenizer(options: JobOptions) -> Path | None:
    """``--gguf-tokenizer``, else the GGUF an embedded default came from (its vocabulary as llama.cpp's converter wrote it)."""
    return Path(options.gguf_tokenizer).expanduser() if options.gguf_tokenizer else source_gguf(options.model)


def check_gguf_export(options: JobOptions, model, tokenizer, console, flop_config=None) -> None:
    """What export_gguf would refuse about the model, its vocabulary and the pruning's shapes (--export-gguf),
    refused before training."""
    from ..export_gguf import check_exportable

    with console.status("checking that llama.cpp can take the model (--export-gguf)"):
        try:
            gguf = _gguf_tokenizer(options)
            check_exportable(
                model, tokenizer=tokenizer, tokenizer_gguf=gguf, names=OPTION_NAMES, flop_config=flop_config
            )
        except ValueError as err:
            raise ValueError(f"--export-gguf: {err}") from None


def export_model_gguf(job: JobState, small, path: Path) -> dict:
    """``model.gguf`` for llama.cpp; returns what the summary records (architecture, per-layer shapes, size)."""
    import gguf

    from ..export_gguf import GGUFExportWarning, export_gguf

    options = job.options
    with job.console.status("writing model.gguf for llama.cpp"), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", GGUFExportWarning)
        export_gguf(
            small,
            path,
            tokenizer=job.tokenizer,
            tokenizer_gguf=_gguf_tokenizer(options),
            quantization=options.gguf_quantization or options.gguf_dtype,  # checked to agree before training
            names=OPTION_NAMES,
        )
    # e.g. low-rank layers stored dense: a note, without the API's other choice (densify=False), no option here
    for warning in caught:
        if isinstance(warning.message, GGUFExportWarning):
            job.console.print(f"[bold yellow]note:[/] {warning.message.note}", highlight=False)
        else:  # not the exporter's: shown as it would have been
            warnings.showwarning(warning.message, warning.category, warning.filename, warning.lineno)
    fields = gguf.GGUFReader(path).fields
    arch = fields["general.architecture"].contents()
    return {
        "file": path.name,
        "architecture": arch,
        "dtype": options.gguf_dtype,
        "quantization": options.gguf_quantization or options.gguf_dtype,
        "bytes": path.stat().st_size,
        "head_count": fields[f"{arch}.attention.head_count"].contents(),
        "head_count_kv": fields[f"{arch}.attention.head_count_kv"].contents(),
        "feed_forward_length": fields[f"{arch}.feed_forward_length"].contents(),
    }
