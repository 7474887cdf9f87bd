"""Publishing a saved folder on the Hugging Face Hub, with the files exported beside it, in one commit.

``push_compacted`` uploads a folder ``save_compacted`` wrote and, optionally, exported files that live
elsewhere (``model.onnx``, ``model.gguf``, ``exports.json``, which the card's table describes) to the
repository root. Nothing local changes, so a failed push is simply repeated.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

__all__ = ["PushToHubError", "push_compacted"]


class PushToHubError(RuntimeError):
    """Pushing a saved folder to the Hub failed; the folder itself is complete."""


def _extra_files(folder: Path, extra_files: Sequence[str | os.PathLike]) -> list[Path]:
    """The exported files to upload beside the folder's, checked before anything is sent."""
    paths = [Path(p) for p in extra_files]
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise ValueError(f"extra_files {missing} are not files; pass the exported files (e.g. model.onnx) by path.")
    names = [p.name for p in paths]
    clashes = sorted({n for n in names if names.count(n) > 1 or (folder / n).exists()})
    if clashes:
        raise ValueError(
            f"extra_files {clashes} would overwrite a file of the same name in the repository; rename them first."
        )
    return paths


def push_compacted(
    folder: str | os.PathLike,
    repo_id: str,
    *,
    private: bool | None = None,
    token: str | None = None,
    commit_message: str | None = None,
    extra_files: Sequence[str | os.PathLike] = (),
) -> str:
    """Upload a folder written by ``save_compacted`` to ``repo_id`` (created if missing); returns the commit URL.

    ``extra_files`` (e.g. the ONNX / GGUF files ``hf-flop prune`` exported and ``exports.json``) go to the
    repository root in the same commit. Any failure (Hub unreachable, HTTP error, rejected token) raises
    ``PushToHubError`` saying what went wrong; nothing local changes, so calling this again after fixing
    the cause is safe.
    """
    from huggingface_hub import CommitOperationAdd, HfApi
    from huggingface_hub.errors import HfHubHTTPError

    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise ValueError(f"{folder} is not a saved model folder (no config.json); write it with save_compacted first.")
    extras = _extra_files(folder, extra_files)
    files = sorted(p for p in folder.rglob("*") if p.is_file())
    operations = [CommitOperationAdd(p.relative_to(folder).as_posix(), str(p)) for p in files]
    operations += [CommitOperationAdd(p.name, str(p)) for p in extras]
    api = HfApi(token=token)
    try:
        api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        info = api.create_commit(
            repo_id=repo_id,
            operations=operations,
            commit_message=commit_message or "Upload model compacted with hf_flop",
        )
    except HfHubHTTPError as err:
        status = err.response.status_code if err.response is not None else None
        reason = {
            401: "the Hub rejected the token (HTTP 401); pass a valid write token with token=... or log in "
            "with `hf auth login`",
            403: f"the token may not write to {repo_id!r} (HTTP 403); check its permissions and the namespace",
        }.get(status, f"the Hub answered HTTP {status}: {str(err).strip().splitlines()[0]}")
        raise PushToHubError(_push_message(folder, repo_id, api.endpoint, reason, extras)) from err
    except Exception as err:  # unreachable host, timeouts, offline mode: whatever the HTTP stack raises
        reason = f"could not reach the Hub ({type(err).__name__}: {err})"
        raise PushToHubError(_push_message(folder, repo_id, api.endpoint, reason, extras)) from err
    return info.commit_url


def _push_message(folder: Path, repo_id: str, endpoint: str, reason: str, extras: list[Path]) -> str:
    again = f", extra_files={[str(p) for p in extras]!r}" if extras else ""
    return (
        f"pushing {folder} to {endpoint}/{repo_id} failed: {reason}. The local folder is complete; once fixed, "
        f"push it again with hf_flop.push_compacted({str(folder)!r}, {repo_id!r}{again})."
    )
