"""``PruningArguments(recovery_lora_rank=...)``: one-shot recovery trains LoRA adapters on the compacted model,
merged into its weights after, so the saved model is a plain dense model that loads without peft."""

from __future__ import annotations

import copy
import json
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM, LlamaForCausalLM, TrainerCallback

from hf_flop import FlopConfig, PruningArguments, PruningTrainer, compact, get_flop_model

sys.path.insert(0, str(Path(__file__).parent / "scripts"))
from tiny_task import CountingTask, tiny_llama  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _args(out, **overrides) -> PruningArguments:
    settings = dict(
        output_dir=str(out / "run"),
        max_steps=10,
        per_device_train_batch_size=8,
        learning_rate=1e-2,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        seed=0,
        disable_tqdm=True,
        use_cpu=True,
        pruning_phase=0.0,
        calibration_batches=4,
        recovery_lora_rank=4,
    )
    return PruningArguments(**{**settings, **overrides})


def _trainer(out, *, config: dict | None = None, dtype=torch.float32, teacher: bool = True, **overrides):
    dense = tiny_llama(0)
    if dtype != torch.float32:  # loaded in it, as from_pretrained does: the rotary frequencies stay float32
        dense.save_pretrained(out / "dense")
        dense = LlamaForCausalLM.from_pretrained(out / "dense", dtype=dtype)
    model = get_flop_model(
        copy.deepcopy(dense), FlopConfig(target_sparsity=0.5, levels=["head", "row"], **config or {})
    )
    trainer = PruningTrainer(
        model=model,
        args=_args(out, **overrides),
        train_dataset=CountingTask(n=128),
        teacher_model=dense if teacher else None,
    )
    seen = _Seen()
    trainer.add_callback(seen)
    return model, trainer, seen


class _Seen(TrainerCallback):
    """What Trainer trains as training begins: the model, its trainable parameters, and its frozen weights."""

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.model = model
        self.trainable = {n: p.numel() for n, p in model.named_parameters() if p.requires_grad}
        self.trainable_dtypes = {p.dtype for p in model.parameters() if p.requires_grad}
        self.frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}


def _inputs(n: int = 6) -> dict[str, torch.Tensor]:
    data = CountingTask(n=n, seed=3)
    return {"input_ids": torch.stack([data[i]["input_ids"] for i in range(n)])}


@torch.no_grad()
def _logits(model) -> torch.Tensor:
    return model.eval()(**_inputs()).logits.float()


@pytest.mark.parametrize("config", [{}, {"round_to": 8}], ids=["per-layer", "padding"])
def test_lora_recovery_trains_the_adapters_alone_and_merges_them_into_the_weights(tmp_path, config):
    from peft import PeftModel

    model, trainer, seen = _trainer(tmp_path, config=config)
    trainer.train()
    assert trainer.compacted_recovery and trainer.model is model
    assert isinstance(seen.model, PeftModel)
    # only the adapters trained, and they are a small part of the compacted model
    assert seen.trainable and all("lora_A" in n or "lora_B" in n for n in seen.trainable)
    merged = seen.model.get_base_model()  # merge_and_unload merged the adapters into this model, in place
    total = sum(p.numel() for p in merged.parameters())
    assert sum(seen.trainable.values()) < 0.25 * total
    # the loss fell, and the merged linears moved while everything else (embeddings, norms) stayed
    losses = [e["task_loss"] for e in trainer.state.log_history if "task_loss" in e]
    assert losses[-1] < losses[0]
    frozen = {n.replace("base_model.model.", "", 1).replace(".base_layer", ""): v for n, v in seen.frozen.items()}
    after = merged.state_dict()
    moved = {n for n, v in frozen.items() if not torch.equal(v, after[n])}
    assert moved and all(n.endswith("proj.weight") for n in moved)
    assert not any("lora" in n for n in after)
    # the gated model holds the result: its compaction computes what the merged model computes
    torch.testing.assert_close(_logits(compact(model)), _logits(merged), atol=1e-5, rtol=0)
    torch.testing.assert_close(_logits(model), _logits(merged), atol=1e-5, rtol=0)
    assert "LoRA adapters (rank 4, alpha 8" in trainer.training_facts()["schedule"]


def test_the_saved_lora_recovered_model_loads_with_plain_transformers(tmp_path):
    """Uniform shapes: the stock LlamaForCausalLM class, no adapter files, no LoRA tensors."""
    model, trainer, seen = _trainer(tmp_path, config={"uniform_shapes": True})
    trainer.train()
    trainer.save_compacted(str(tmp_path / "final"))
    folder = tmp_path / "final"
    assert not (folder / "adapter_config.json").exists() and not (folder / "adapter_model.safetensors").exists()
    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        assert not any("lora" in k for k in f.keys())
    assert json.loads((folder / "config.json").read_text())["architectures"] == ["LlamaForCausalLM"]
    loaded = LlamaForCausalLM.from_pretrained(folder)
    torch.testing.assert_close(_logits(loaded), _logits(seen.model.get_base_model()), atol=1e-5, rtol=0)


def test_lora_recovery_keeps_bfloat16(tmp_path):
    """The adapters train in float32 (PEFT's autocast); the merged and saved weights are bf16 again."""
    model, trainer, seen = _trainer(tmp_path, dtype=torch.bfloat16)
    trainer.train()
    assert seen.trainable_dtypes == {torch.float32}
    merged = seen.model.get_base_model()
    assert {p.dtype for p in merged.parameters()} == {torch.bfloat16}
    trainer.save_compacted(str(tmp_path / "final"))
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "final", trust_remote_code=True)
    assert {p.dtype for p in loaded.parameters()} == {torch.bfloat16}
    # the same weights, bit for bit (the logits differ by bf16 rounding: compaction leaves the rotary
    # frequencies in bf16, from_pretrained computes them in float32)
    expected = merged.state_dict()
    for name, value in loaded.state_dict().items():
        assert torch.equal(value, expected[name]), name


def test_resume_from_a_lora_checkpoint_equals_the_uninterrupted_run(tmp_path):
    def run(out, resume=None):
        model, trainer, _ = _trainer(out, max_steps=8, save_strategy="steps", save_steps=4, teacher=False)
        trainer.train(resume_from_checkpoint=resume)
        return model

    full = run(tmp_path / "full")
    checkpoint = tmp_path / "full" / "run" / "checkpoint-4"
    assert (checkpoint / "adapter_model.safetensors").is_file() and (checkpoint / "flop_lora_base.pt").is_file()
    resumed = run(tmp_path / "resumed", resume=str(checkpoint))
    for (name, x), y in zip(compact(full).state_dict().items(), compact(resumed).state_dict().values()):
        torch.testing.assert_close(x, y, atol=1e-5, rtol=0, msg=name)
    # a full-recovery run cannot resume it, nor a LoRA run a full-recovery checkpoint
    model, trainer, _ = _trainer(tmp_path / "other", recovery_lora_rank=None)
    with pytest.raises(ValueError, match="checkpoint of a LoRA recovery run"):
        trainer.train(resume_from_checkpoint=str(checkpoint))


@pytest.mark.parametrize(
    "fields, match",
    [
        ({"recovery_lora_rank": 0}, "recovery_lora_rank=0 must be a positive integer"),
        ({"recovery_lora_rank": 2.5}, "recovery_lora_rank=2.5 must be a positive integer"),
        ({"recovery_lora_rank": True}, "recovery_lora_rank=True must be a positive integer"),
        ({"recovery_lora_rank": 4, "pruning_phase": 0.5}, r"only one-shot runs recover on \(pruning_phase=0"),
        ({"recovery_lora_rank": 4, "compact_recovery": False}, "compact_recovery=False"),
        ({"recovery_lora_rank": None, "recovery_lora_alpha": 8.0}, "also set recovery_lora_rank"),
        ({"recovery_lora_rank": None, "recovery_lora_target_modules": ["q_proj"]}, "also set recovery_lora_rank"),
        ({"recovery_lora_alpha": 0}, "recovery_lora_alpha=0 must be a number > 0"),
        ({"recovery_lora_target_modules": "q_proj"}, "must be a non-empty list of module names"),
        ({"recovery_lora_target_modules": []}, "must be a non-empty list of module names"),
    ],
)
def test_bad_lora_arguments(tmp_path, fields, match):
    with pytest.raises(ValueError, match=match):
        _args(tmp_path, **fields)


def test_lora_recovery_it_cannot_do_is_refused_before_any_work(tmp_path):
    data = CountingTask(n=64)
    model = get_flop_model(tiny_llama(0), FlopConfig(target_sparsity=0.5, levels=["rank"]))
    with pytest.raises(
        ValueError, match=r"only levels head, query_head, row recover on \(FlopConfig.levels=\['rank'\]"
    ):
        PruningTrainer(model=model, args=_args(tmp_path), train_dataset=data)
    model = get_flop_model(tiny_llama(0), FlopConfig(target_sparsity=0.5, levels=["head", "row"]))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    with pytest.raises(ValueError, match="an optimizer passed to PruningTrainer"):
        PruningTrainer(model=model, args=_args(tmp_path), train_dataset=data, optimizers=(optimizer, None))
    with pytest.raises(ValueError, match=r"no linear layer of the model is named \['qproj'\]"):
        PruningTrainer(
            model=model,
            args=_args(tmp_path, recovery_lora_target_modules=["q_proj", "qproj"]),
            train_dataset=data,
        )
