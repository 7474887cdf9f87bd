"""hf_flop.files: the one atomic writer behind every output (folders, plots, JSON state)."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest

from hf_flop import files


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture(params=[0o022, 0o027])
def umask(request):
    """The process umask set to the parameter for the test (the usual one, and a group-only one)."""
    old = os.umask(request.param)
    yield request.param
    os.umask(old)


def test_atomic_folder_creates_an_ordinary_folder(tmp_path, umask):
    out = tmp_path / "nested" / "out"
    with files.atomic_folder(out, overwrite=False) as tmp:
        assert tmp.parent == out.parent and not out.exists()
        (tmp / "a.txt").write_text("a")
    assert (out / "a.txt").read_text() == "a"
    # what a plain mkdir gives (0o755 under the usual umask); mkdtemp would leave it private (0o700)
    assert _mode(out) == 0o777 & ~umask
    assert sorted(p.name for p in out.parent.iterdir()) == ["out"]


def test_atomic_folder_replaces_an_old_folder_only_when_complete(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")
    with files.atomic_folder(out, overwrite=True) as tmp:
        (tmp / "new.txt").write_text("new")
        assert (out / "old.txt").read_text() == "old"  # untouched while the new one is written
    assert sorted(p.name for p in out.iterdir()) == ["new.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # the old copy is gone


def test_an_error_inside_removes_the_temporary_folder(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")
    with pytest.raises(RuntimeError, match="boom"), files.atomic_folder(out, overwrite=True) as tmp:
        (tmp / "half.txt").write_text("x")
        raise RuntimeError("boom")
    assert sorted(p.name for p in out.iterdir()) == ["old.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_old_folder_is_restored_when_the_final_move_fails(tmp_path, monkeypatch):
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")
    real_rename = Path.rename

    def rename(self, target):
        if ".tmp-" in self.name:  # the new folder's move into place
            raise OSError("rename refused")
        return real_rename(self, target)

    monkeypatch.setattr(Path, "rename", rename)
    with pytest.raises(OSError, match="rename refused"), files.atomic_folder(out, overwrite=True) as tmp:
        (tmp / "new.txt").write_text("new")
    assert sorted(p.name for p in out.iterdir()) == ["old.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_without_overwrite_a_folder_filled_meanwhile_is_kept(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(OSError), files.atomic_folder(out, overwrite=False) as tmp:
        (tmp / "mine.txt").write_text("mine")
        out.mkdir()  # e.g. another process finished the same cache entry first
        (out / "theirs.txt").write_text("theirs")
    assert sorted(p.name for p in out.iterdir()) == ["theirs.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_check_output_dir(tmp_path):
    assert files.check_output_dir(tmp_path / "new", False) == tmp_path / "new"
    full = tmp_path / "full"
    full.mkdir()
    (full / "x").write_text("x")
    with pytest.raises(ValueError, match="output_dir .* is not empty; pass overwrite=True"):
        files.check_output_dir(full, False)
    with pytest.raises(ValueError, match="--out .* is not empty; pass --overwrite, or choose"):
        files.check_output_dir(full, False, name="--out", overwrite_hint="pass --overwrite")
    assert files.check_output_dir(full, True) == full
    with pytest.raises(ValueError, match="is a file"):
        files.check_output_dir(full / "x", True)
    with pytest.raises(TypeError, match="must be a path"):
        files.check_output_dir(3, True)


def test_atomic_file_and_json(tmp_path, umask):
    path = files.write_json_atomic(tmp_path / "state.json", {"a": [1, 2]})
    assert json.loads(path.read_text()) == {"a": [1, 2]}
    assert _mode(path) == 0o666 & ~umask  # 0o644 under the usual umask; mkstemp's would be 0o600
    with pytest.raises(RuntimeError), files.atomic_file(path) as tmp:
        assert tmp.suffix == ".json" and tmp.parent == tmp_path  # the suffix picks savefig's format
        tmp.write_text("half")
        raise RuntimeError
    assert json.loads(path.read_text()) == {"a": [1, 2]}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state.json"]


def test_atomic_files_moves_a_file_and_its_companions(tmp_path):
    path = tmp_path / "model.onnx"
    path.write_text("old")
    with files.atomic_files(path) as tmp:
        assert tmp.name == "model.onnx" and tmp.parent.parent == tmp_path  # final names from the start
        tmp.write_text("new")
        tmp.with_name("model.onnx.data").write_text("weights")  # a companion that the file names
        assert path.read_text() == "old"
    assert path.read_text() == "new" and (tmp_path / "model.onnx.data").read_text() == "weights"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx", "model.onnx.data"]

    with pytest.raises(RuntimeError), files.atomic_files(tmp_path / "other.onnx") as tmp:
        tmp.write_text("half")
        raise RuntimeError
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx", "model.onnx.data"]
