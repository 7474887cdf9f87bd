"""bf16 and fp16 models through injection, one-shot scores and refit, compaction, save and reload, dtype kept.

PEFT keeps a half-precision model's adapter tensors (here the rank factors) in float32; the gated
layers compute in them and hand the next layer the model's own dtype.
"""

from __future__ import annotations

import pytest
import torch

from hf_flop import FlopConfig, compact, get_flop_model, prune_oneshot
from tests.tiny_models import VOCAB, tiny_bert, tiny_llama

BUILDERS = {"bert": tiny_bert, "llama": tiny_llama}


def _batches(count: int = 6) -> list[dict]:
    generator = torch.Generator().manual_seed(1)
    return [{"input_ids": torch.randint(1, VOCAB, (4, 16), generator=generator)} for _ in range(count)]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize(
    "levels", [["rank"], ["rank", "head", "row"], ["head", "row"], ["embedding", "row"]], ids="+".join
)
@pytest.mark.parametrize("arch", sorted(BUILDERS))
def test_half_precision_prunes_compacts_and_reloads_in_its_dtype(arch, levels, dtype, tmp_path):
    model = BUILDERS[arch]().to(dtype).eval()
    inputs = torch.randint(1, VOCAB, (2, 12), generator=torch.Generator().manual_seed(2))
    flop = get_flop_model(model, FlopConfig(target_sparsity=0.4, levels=levels))
    prune_oneshot(flop, None, _batches(), "activation")  # scores and the refit accumulate in float32/64
    flop.eval()
    gated = flop(inputs).logits
    small = compact(flop).eval()
    logits = small(inputs).logits
    assert gated.dtype == logits.dtype == dtype
    assert {p.dtype for p in small.parameters()} == {dtype}
    # one rounding of the compacted weights to the model's dtype: within a few of its ulps at the logits' scale
    scale = gated.float().abs().max().item()
    assert scale > 0
    assert (gated.float() - logits.float()).abs().max().item() <= 2e-2 * scale + 1e-3
    small.save_pretrained(tmp_path)
    reloaded = type(small).from_pretrained(tmp_path).eval()
    assert reloaded.dtype == dtype
    # not bitwise: a model cast with .to(dtype) holds its rotary inv_freq in that dtype, the compacted one in float32
    assert (reloaded(inputs).logits.float() - logits.float()).abs().max().item() <= 2e-2 * scale + 1e-3


def test_a_bf16_llama_compacts_to_what_from_pretrained_reloads_bitwise(tmp_path):
    """from_pretrained builds a bf16 model in bf16 and keeps the rotary frequencies in float32; compaction
    builds its model the same way (not .to(bf16), which would round them), so the reload is bitwise equal."""
    tiny_llama().save_pretrained(tmp_path / "dense")
    model = type(tiny_llama()).from_pretrained(tmp_path / "dense", dtype=torch.bfloat16).eval()
    assert model.model.rotary_emb.inv_freq.dtype == torch.float32
    flop = get_flop_model(model, FlopConfig(target_sparsity=0.4, levels=["head", "row"], uniform_shapes=True))
    prune_oneshot(flop, None, _batches(), "activation")
    small = compact(flop).eval()
    assert small.model.rotary_emb.inv_freq.dtype == torch.float32
    assert torch.get_default_dtype() == torch.float32  # restored after building the compacted model
    small.save_pretrained(tmp_path / "small")
    reloaded = type(small).from_pretrained(tmp_path / "small", dtype=torch.bfloat16).eval()
    inputs = torch.randint(1, VOCAB, (2, 12), generator=torch.Generator().manual_seed(2))
    assert torch.equal(reloaded(inputs).logits, small(inputs).logits)
