"""A gated model trained under FSDP2 (``fully_shard``) on two CPU processes (gloo).

accelerate (1.16) enables FSDP only for GPU-type devices: ``accelerate launch --use_fsdp`` on a
CPU-only machine runs DDP and Trainer reports ``is_fsdp_enabled=False`` (docs/training.md). So:

* tests/scripts/fsdp_train.py runs the trainer's step by hand under torchrun: FSDP2 on each
  transformer layer and the root, the gates kept whole (``hf_flop.fsdp_ignored_params``), their
  gradients averaged (``hf_flop.sync_gate_gradients``); checked against one process;
* tests/scripts/fsdp_trainer.py runs PruningTrainer with accelerate's state switched to FSDP2 by
  hand, as accelerate sets it for GPU processes, so that the wrapping, the optimizer switch and the
  clipping are accelerate's own code.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from accelerate.utils.fsdp_utils import get_parameters_from_modules
from test_distributed import _free_port

SCRIPTS = Path(__file__).parent / "scripts"
sys.path.insert(0, str(SCRIPTS))
from fsdp_train import run  # noqa: E402  (the single-process reference: the same steps in this process)
from tiny_task import tiny_llama  # noqa: E402

from hf_flop import FlopConfig, fsdp_ignored_modules, fsdp_ignored_params, get_flop_model, sync_gate_gradients  # noqa: E402
from hf_flop.lookup import find_flop_model  # noqa: E402


def _ranks(script: str, out: Path) -> list[dict]:
    """What each of the two processes of ``script`` (under tests/scripts) ended with (its ``run``)."""
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
        "--master_port", str(_free_port()), str(SCRIPTS / script), str(out),
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "CUDA_VISIBLE_DEVICES": ""}
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return [torch.load(out / f"rank{i}.pt", weights_only=False) for i in (0, 1)]


def test_fsdp_ignored_modules_selects_exactly_the_gates_as_accelerate_reads_it():
    """accelerate turns the ``fsdp_ignored_modules`` pattern into FSDP2's ``ignored_params``: the gate parameters."""
    model = get_flop_model(tiny_llama(0), FlopConfig(target_sparsity=0.5, levels=["rank", "head", "row"]))
    pattern = fsdp_ignored_modules(model)
    params = get_parameters_from_modules(pattern, model, None)
    assert params == fsdp_ignored_params(model) and len(params) == len(find_flop_model(model).gates())
    sync_gate_gradients(model)  # no process group: nothing to average, and no error


def _assert_same(a: dict, b: dict, tolerance: float) -> None:
    """The same gates, eval masks, multipliers and weights, to ``tolerance`` (0: bitwise)."""
    for name, params in a["gates"].items():
        for x, y in zip(params, b["gates"][name]):
            torch.testing.assert_close(x, y, atol=tolerance, rtol=0, msg=name)
        assert torch.equal(a["masks"][name], b["masks"][name]), name
    assert a["weights"].keys() == b["weights"].keys()
    for name, weight in a["weights"].items():
        torch.testing.assert_close(weight, b["weights"][name], atol=tolerance, rtol=0, msg=name)
    for name, value in a["multipliers"].items():
        assert abs(value - b["multipliers"][name]) <= tolerance, name


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU (gloo) processes")
def test_fsdp_two_processes_keep_whole_gates_equal_and_match_one_process(tmp_path, one_torch_thread):
    """Levels rank (gates inside the sharded layers), head and row (gates at the root), 6 steps of the
    trainer's loss and optimizer groups; the ranks see different halves of each batch of 8."""
    first, second = _ranks("fsdp_train.py", tmp_path)
    assert [r["world_size"] for r in (first, second)] == [2, 2]
    assert first["seen"] != second["seen"]  # each process trained on its own half
    assert first["held_fraction"] == pytest.approx(0.5, abs=0.01)  # the weights were sharded
    _assert_same(first, second, 0.0)  # bitwise: replicated gates, one averaged gradient
    assert first["multipliers"]["lambda_1"] < 0 < first["multipliers"]["lambda_2"]  # they moved
    # the expected sparsity outside the forward pass, on the sharded model, before and after training
    single = run(str(tmp_path / "single"))
    assert single["world_size"] == 1 and single["seen"][0] == first["seen"][0] + second["seen"][0]
    assert first["sparsity_before"] == single["sparsity_before"]
    # FSDP averages the two halves' gradients: the gradient of the whole batch, up to float sums
    # (1.9e-6 on weights and gates when measured)
    _assert_same(first, single, 2e-5)
    assert first["expected_sparsity"] == pytest.approx(single["expected_sparsity"], abs=1e-6)
    # compaction from the gathered full state dict is exact against the gated model it came from
    compaction = first["compaction"]
    assert compaction["max_logit_error"] < 1e-4
    assert compaction["sparsity"] > 0 and compaction["params"][0] < compaction["params"][1]
    # with the gates sharded like the rest, the expected sparsity says what to do instead of failing in DTensor
    assert "fsdp_ignored_params" in first["sharded_gates_error"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU (gloo) processes")
def test_pruning_trainer_under_accelerates_fsdp2_keeps_gates_whole_and_equal(tmp_path):
    """4 learned-gate steps of PruningTrainer; each process gets its own batches from Trainer's sampler."""
    first, second = _ranks("fsdp_trainer.py", tmp_path)
    assert [r["world_size"] for r in (first, second)] == [2, 2]
    assert first["fsdp"] and first["held_fraction"] == pytest.approx(0.5, abs=0.01)
    # the multiplier groups, which FSDP2's prepare would have refused, were added after it
    assert first["roles"] == ["gates", "lambda_1", "lambda_2"]
    assert first["multipliers"] == second["multipliers"] and first["multipliers"]["lambda_2"] > 0
    for name, params in first["gates"].items():  # averaged gradients: bitwise the same gates
        for x, y in zip(params, second["gates"][name]):
            torch.testing.assert_close(x, y, atol=0, rtol=0, msg=name)
    assert first["logs"] == second["logs"] and all("grad_norm" in h for h in first["logs"])  # clipping ran
    assert first["logs"][-1]["expected_sparsity"] > first["logs"][0]["expected_sparsity"]  # the gates moved
    assert first["compaction"]["max_logit_error"] < 1e-4  # compacted from the gathered state dict
    assert "get_model_state_dict" in first["save_refusal"] and "get_model_state_dict" in second["save_refusal"]
    assert "PruningArguments(pruning_phase=0.5) under FSDP" in first["refusal"]  # refused before any work
