"""Issue 3: PruningTrainer under ``accelerate launch`` with two CPU processes (DDP over gloo).

``accelerate launch --cpu`` starts a single process (accelerate 1.x sends --cpu to its simple
launcher), so the test launches with ``--multi_gpu``: on a machine without CUDA that is torchrun with
two CPU processes, and Trainer sets up DDP with the gloo backend.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).parent / "scripts" / "ddp_train.py"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU (gloo) launch")
def test_two_process_ddp_keeps_gates_and_multipliers_identical(tmp_path):
    accelerate = shutil.which("accelerate", path=os.path.dirname(sys.executable)) or shutil.which("accelerate")
    assert accelerate, "the accelerate CLI is needed (it comes with the accelerate package)"
    command = [
        accelerate, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
        "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(_free_port()),
        str(SCRIPT), str(tmp_path),
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "CUDA_VISIBLE_DEVICES": ""}
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]

    ranks = [torch.load(tmp_path / f"rank{i}.pt", weights_only=False) for i in (0, 1)]
    assert [r["world_size"] for r in ranks] == [2, 2]
    assert ranks[0]["seen"] != ranks[1]["seen"]  # each rank trained on its own share of the data
    first, second = ranks
    assert first["multipliers"] == second["multipliers"]  # bitwise: the same s on both ranks
    assert first["multipliers"]["lambda_1"] < 0 < first["multipliers"]["lambda_2"]  # they did move
    for name, params in first["gates"].items():
        for a, b in zip(params, second["gates"][name]):
            torch.testing.assert_close(a, b, atol=0, rtol=0)
        assert torch.equal(first["masks"][name], second["masks"][name])
    torch.testing.assert_close(first["embedding"], second["embedding"], atol=0, rtol=0)
    assert any(h["expected_sparsity"] > 0 for h in first["logs"])  # the gates were trained, not just equal
