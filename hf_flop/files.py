"""Writing outputs atomically: a reader sees the old file or folder, or the complete new one, never half of one.

Every output of hf_flop goes through here: saved models (``save_compacted``), the CLI's output
folder, plots, the trainer's checkpoint state, the converted-model cache and ONNX exports. The temporary file
or folder is made next to its destination, so the final move is a rename within one file system.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def check_output_dir(
    output_dir: str | os.PathLike,
    overwrite: bool,
    *,
    name: str = "output_dir",
    overwrite_hint: str = "pass overwrite=True to replace it",
) -> Path:
    """``output_dir`` as a ``Path`` once it is safe to write: missing, an empty folder, or ``overwrite``.

    Raises ``TypeError`` for a non-path and ``ValueError`` for an existing file or a non-empty folder
    (without ``overwrite``); ``name`` and ``overwrite_hint`` word the message for the caller's
    interface (an argument name, a command-line option).
    """
    if not isinstance(output_dir, (str, os.PathLike)):
        raise TypeError(f"{name} must be a path, got {type(output_dir).__name__}.")
    out = Path(output_dir)
    if out.exists() and not out.is_dir():
        raise ValueError(f"{name} {out} exists and is a file; choose a folder path.")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise ValueError(f"{name} {out} exists and is not empty; {overwrite_hint}, or choose another folder.")
    return out


@contextmanager
def atomic_folder(out: str | os.PathLike, *, overwrite: bool) -> Iterator[Path]:
    """Yield a new empty folder next to ``out``; when the block succeeds, it becomes ``out``.

    If the block raises, the temporary folder is removed and ``out`` is untouched. On success the
    folder is renamed to ``out``. With ``overwrite``, an existing ``out`` is first renamed aside, put
    back if the final rename fails, and deleted only once the new folder is in place. Without it,
    the rename replaces a missing or empty ``out`` and fails (``OSError``) on a non-empty one, which
    is then left as it is; callers check beforehand with ``check_output_dir`` for a clear error.
    The folder gets the permissions of any new folder (0o777 less the umask).
    """
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temporary_name(out)
    # a plain mkdir, not mkdtemp: mkdtemp's folder is private (0o700) whatever the umask, and it would stay so
    tmp.mkdir()
    try:
        yield tmp
        _move_into_place(tmp, out, overwrite=overwrite)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _move_into_place(new: Path, out: Path, *, overwrite: bool) -> None:
    old = None
    if overwrite and out.exists():
        old = out.with_name(f".{out.name}.old-{uuid.uuid4().hex[:8]}")
        out.rename(old)
    try:
        new.rename(out)
    except BaseException:
        if old is not None:
            old.rename(out)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


@contextmanager
def atomic_file(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to ``path`` (same suffix) to write to; on success it replaces ``path``.

    The writer creates the file, so it gets the permissions of any new file (0o666 less the umask;
    mkstemp's would be 0o600). If the block raises, the temporary file is removed and ``path`` is
    untouched. The suffix is kept because some writers pick the format from it (``savefig``).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temporary_name(path, suffix=path.suffix)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


@contextmanager
def atomic_files(path: str | os.PathLike) -> Iterator[Path]:
    """Yield ``path``'s name inside a new temporary folder next to it; on success its files move beside ``path``.

    For writers that put companion files next to their output and refer to them by name (an ONNX
    model and its external weights ``<name>.data``): the names are the final ones from the start.
    The companions move first and ``path`` last, each by one rename, so every file that appears is
    complete. If the block raises, the temporary folder is removed and nothing beside ``path`` changes.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temporary_name(path)
    tmp.mkdir()
    try:
        yield tmp / path.name
        written = sorted(tmp.iterdir(), key=lambda p: p.name == path.name)  # path itself last
        for file in written:
            os.replace(file, path.parent / file.name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _temporary_name(path: Path, suffix: str = "") -> Path:
    """A hidden, unused name next to ``path``: a rename from it stays within one file system."""
    return path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}{suffix}")


def write_json_atomic(path: str | os.PathLike, data) -> Path:
    """Write ``data`` as indented JSON to ``path`` atomically (``atomic_file``); returns the path."""
    with atomic_file(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2))
    return Path(path)
