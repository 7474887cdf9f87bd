"""One-shot reconstruction (``hf_flop.reconstruct``) and the least-squares math under it (``hf_flop.refit``)."""

from __future__ import annotations

import copy

import pytest
import torch
from tiny_models import VOCAB, tiny_bert, tiny_gpt2, tiny_llama

import hf_flop
from hf_flop import FlopConfig, compact, get_flop_model, prune_oneshot, reconstruct, sparsity_report
from hf_flop.model import find_flop_model
from hf_flop.refit import Moments, fit_columns, fit_rank, output_error

BUILDERS = {"bert": tiny_bert, "gpt2": tiny_gpt2, "llama": tiny_llama}


def batches(n: int = 8, seed: int = 0, rows: int = 4, length: int = 16) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    found = []
    for _ in range(n):
        ids = torch.randint(1, VOCAB, (rows, length), generator=g)
        found.append({"input_ids": ids, "attention_mask": torch.ones_like(ids)})
    return found


# --- the math ------------------------------------------------------------------------------------------


def _data(n: int = 3000, d: int = 10, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(d, d, generator=g)
    return torch.randn(n, d, generator=g) @ mix + 0.3  # correlated features, non-zero mean


def _moments(x: torch.Tensor) -> torch.Tensor:
    m = Moments(x.shape[1])
    m.add(x)
    return m.matrix()


@pytest.mark.parametrize("fit_bias", [False, True])
def test_column_fit_is_the_least_squares_solution(fit_bias):
    x = _data()
    g = torch.Generator().manual_seed(1)
    w, b = torch.randn(5, 10, generator=g), torch.randn(5, generator=g)
    keep = torch.tensor([True] * 6 + [False] * 4)
    fit = fit_columns(w, b, _moments(x), keep, fit_bias=fit_bias, ridge=0.0)
    z = x[:, keep].double()
    if fit_bias:
        z = torch.cat([z, torch.ones(len(z), 1, dtype=z.dtype)], 1)
    target = (x @ w.T).double() + (b.double() if fit_bias else 0)  # a fixed bias is not the columns' to explain
    direct = torch.linalg.lstsq(z, target).solution.T
    assert torch.allclose(fit.weight[:, keep], direct[:, :6], atol=1e-6)
    assert (fit.weight[:, ~keep] == 0).all()
    if fit_bias:
        assert torch.allclose(fit.bias, direct[:, 6], atol=1e-6)
    else:
        assert torch.equal(fit.bias, b.double())


def test_output_error_from_moments_equals_the_error_on_the_tokens():
    x = _data()
    g = torch.Generator().manual_seed(2)
    a, b = torch.randn(4, 10, generator=g), torch.randn(4, 10, generator=g)
    bias = torch.randn(4, generator=g)
    direct = ((x @ a.T + bias - x @ b.T) ** 2).sum(1).mean()
    assert output_error(a, bias, b, None, _moments(x)) == pytest.approx(float(direct), rel=1e-4)


@pytest.mark.parametrize("fit_bias", [False, True])
def test_whitened_rank_fit_beats_the_plain_truncation(fit_bias):
    x = _data(d=12)
    g = torch.Generator().manual_seed(3)
    w, b = torch.randn(8, 12, generator=g), torch.randn(8, generator=g)
    keep = torch.ones(12, dtype=torch.bool)
    moments = _moments(x)
    fit = fit_rank(w, b, moments, keep, 3, fit_bias=fit_bias, ridge=0.0)
    assert fit.rank == 3 and torch.allclose(fit.p @ fit.q, fit.weight)
    u, s, vh = torch.linalg.svd(w.double(), full_matrices=False)
    plain = (u[:, :3] * s[:3]) @ vh[:3]
    assert output_error(fit.weight, fit.bias, w, b, moments) < 0.9 * output_error(plain, b, w, b, moments)


def test_rank_fit_of_a_degenerate_covariance_raises_the_damping_instead_of_failing():
    """Fewer tokens than features, two features always equal and one constant: the covariance is singular (and
    in floats slightly indefinite), which a plain Cholesky refuses; the fit still returns the rank it was asked."""
    g = torch.Generator().manual_seed(5)
    x = torch.randn(6, 16, generator=g, dtype=torch.float64)
    x[:, 1] = x[:, 0]
    x[:, 2] = 3.0
    w, b = torch.randn(8, 16, generator=g), torch.randn(8, generator=g)
    moments = _moments(x)
    fit = fit_rank(w, b, moments, torch.ones(16, dtype=torch.bool), 4, fit_bias=True, ridge=0.0)
    assert fit.rank == 4 and torch.isfinite(fit.weight).all() and torch.isfinite(fit.bias).all()


# --- reconstruct on models -----------------------------------------------------------------------------


def _pruned(arch: str, levels: list[str], target: float = 0.5):
    model = BUILDERS[arch]().eval()
    dense = copy.deepcopy(model)
    pruned = prune_oneshot(model, FlopConfig(levels=levels, target_sparsity=target), batches(), "activation",
                           reconstruct=False)
    return dense, pruned.eval()


def _consumer_errors(model, reference_layers: dict, data: list[dict]) -> float:
    """Sum over the refit modules of ||unpruned layer(x) - pruned layer(x)||^2 on the model's own inputs x.

    Measured from activations on fresh batches, independently of the moments reconstruction used.
    """
    flop = find_flop_model(model)
    errors = []
    layers = {n: m for n, m in flop.flop_layers().items() if n in reference_layers}
    # the output hook sees the masked input's result; the reference needs the unmasked input
    inputs = {}
    pre = [m.register_forward_pre_hook(lambda mod, args, n=n: inputs.__setitem__(n, args[0]), prepend=True)
           for n, m in layers.items()]
    post = []
    for name, module in layers.items():
        def record(mod, args, output, n=name):
            weight, bias = reference_layers[n]
            x = inputs[n].detach()
            errors.append(((x @ weight.T + (bias if bias is not None else 0) - output) ** 2).sum().item())

        post.append(module.register_forward_hook(record))
    with torch.no_grad():
        for batch in data:
            model(**batch)
    for h in pre + post:
        h.remove()
    return sum(errors)


@pytest.mark.parametrize("arch", sorted(BUILDERS))
@pytest.mark.parametrize("levels", [["head", "row"], ["rank", "head", "row"]])
def test_reconstruction_lowers_the_layer_output_error_on_held_out_tokens(arch, levels):
    _, plain = _pruned(arch, levels)
    refit = copy.deepcopy(plain)
    flop = find_flop_model(plain)
    consumers = {g.consumer for g in flop.structure_groups}
    references = {
        n: tuple(t.detach().clone() if t is not None else None for t in m.reference())
        for n, m in flop.flop_layers().items()
        if n in consumers
    }
    report = reconstruct(refit, batches(), progress=False)
    assert any(r.applied for r in report.layers)
    assert all(r.refit_error < r.plain_error for r in report.layers if r.applied)
    fresh = batches(n=3, seed=7)
    assert _consumer_errors(refit, references, fresh) < _consumer_errors(plain, references, fresh)


@pytest.mark.parametrize("arch", sorted(BUILDERS))
@pytest.mark.parametrize("levels", [["head", "row"], ["rank", "head", "row"], ["rank"]])
def test_compaction_after_reconstruction_is_exact(arch, levels):
    _, model = _pruned(arch, levels)
    before = sparsity_report(model)
    reconstruct(model, batches(), progress=False)
    after = sparsity_report(model)
    assert after.deterministic_kept_params == before.deterministic_kept_params
    small = compact(model)
    test = batches(n=1, seed=11)[0]
    with torch.no_grad():
        assert torch.allclose(small(**test).logits, model(**test).logits, atol=1e-4)
    weights = [
        p.numel()
        for name in find_flop_model(model).flop_layers()  # the compacted model keeps the module names
        for pname, p in small.get_submodule(name).named_parameters()
        if not pname.endswith("bias")
    ]
    assert sum(weights) == after.deterministic_kept_params


@pytest.mark.parametrize("arch", sorted(BUILDERS))
def test_refit_when_a_layer_keeps_one_unit(arch):
    model = get_flop_model(BUILDERS[arch]().eval(), FlopConfig(levels=["head", "row"])).eval()
    flop = find_flop_model(model)
    for group in flop.structure_groups:
        gate = flop.flop_structure_gates[group.key]
        keep = torch.zeros(group.n_units, dtype=torch.bool)
        keep[1] = True  # every unit but one removed
        gate.set_mask(keep)
    plain = copy.deepcopy(model)
    report = reconstruct(model, batches(), progress=False)
    unit_width = {g.consumer: g.consumer_unit for g in flop.structure_groups}  # a row, a head or a KV group
    assert report.layers and all(r.kept_inputs == unit_width[r.name] for r in report.layers)
    small = compact(model)
    test = batches(n=1, seed=5)[0]
    with torch.no_grad():
        assert torch.allclose(small(**test).logits, model(**test).logits, atol=1e-4)
    assert any(r.applied for r in report.layers)
    assert all(r.refit_error < r.plain_error for r in report.layers if r.applied)
    assert sparsity_report(model).deterministic_kept_params == sparsity_report(plain).deterministic_kept_params


def test_add_bias_gives_bias_less_consumers_a_bias_and_compacts_exactly():
    _, model = _pruned("llama", ["head", "row"])
    flop = find_flop_model(model)
    consumers = [flop.flop_layers()[g.consumer] for g in flop.structure_groups]
    assert all(layer.bias is None for layer in consumers)
    report = reconstruct(model, batches(), add_bias=True, progress=False)
    applied = {r.name for r in report.layers if r.applied}
    assert applied and all(flop.flop_layers()[n].bias is not None for n in applied)
    small = compact(model)
    test = batches(n=1, seed=5)[0]
    with torch.no_grad():
        assert torch.allclose(small(**test).logits, model(**test).logits, atol=1e-4)


def test_prune_oneshot_reconstructs_by_default():
    data = batches()
    plain = prune_oneshot(tiny_gpt2().eval(), FlopConfig(levels=["head", "row"]), data, "activation",
                          reconstruct=False)
    default = prune_oneshot(tiny_gpt2().eval(), FlopConfig(levels=["head", "row"]), data, "activation")
    names = [g.consumer for g in find_flop_model(plain).structure_groups]
    changed = [
        not torch.equal(find_flop_model(plain).flop_layers()[n].base_layer.weight,
                        find_flop_model(default).flop_layers()[n].base_layer.weight)
        for n in names
    ]
    assert any(changed)
    assert sparsity_report(default).deterministic_kept_params == sparsity_report(plain).deterministic_kept_params


def test_bad_calibration_data_gets_clear_errors():
    _, model = _pruned("llama", ["head", "row"])
    with pytest.raises(ValueError, match="at least 2 calibration batches"):
        reconstruct(model, batches(n=1), progress=False)
    with pytest.raises(ValueError, match="too small"):
        reconstruct(model, batches(n=2, rows=1, length=4), progress=False)
    with pytest.raises(ValueError, match="input_ids"):
        reconstruct(model, [{"ids": torch.ones(2, 4, dtype=torch.long)}] * 3, progress=False)
    with pytest.raises(ValueError, match="holdout"):
        reconstruct(model, batches(), holdout=1.0, progress=False)
    with pytest.raises(ValueError, match="no FLOP layers"):
        reconstruct(tiny_llama(), batches(), progress=False)
    with pytest.raises(ValueError, match="reconstruct=False"):
        prune_oneshot(tiny_llama(), FlopConfig(levels=["head", "row"]), batches(n=2, rows=1, length=4), "activation")


def test_unknown_architecture_rank_pruning_reconstructs_in_one_pass():
    from transformers import OPTConfig, OPTForCausalLM

    torch.manual_seed(0)
    config = OPTConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, ffn_dim=64, num_attention_heads=4,
                       max_position_embeddings=64, word_embed_proj_dim=32)
    model = OPTForCausalLM(config).eval()
    peft_model = prune_oneshot(model, FlopConfig(levels=["rank"], target_modules=["fc1", "fc2"], target_sparsity=0.6),
                               batches(), "activation", reconstruct=False).eval()
    report = reconstruct(peft_model, batches(), progress=False)
    assert not report.sequential and report.layers
    assert "one pass" in str(report)
    small = compact(peft_model)
    test = batches(n=1, seed=2)[0]
    with torch.no_grad():
        assert torch.allclose(small(**test).logits, peft_model(**test).logits, atol=1e-4)


def test_reconstruct_is_public():
    assert hf_flop.reconstruct is reconstruct and "reconstruct" in hf_flop.__all__


class _SharedBuffer(torch.nn.Module):
    """Two linears read one tensor; it is then rewritten in place, so the third reads the same address, new values."""

    def __init__(self) -> None:
        super().__init__()
        self.first, self.second, self.third = (torch.nn.Linear(8, 8) for _ in range(3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.clone()
        out = self.first(h) + self.second(h)
        h.mul_(2.0)
        return out + self.third(h)


def test_stages_group_modules_by_the_tensor_they_read_not_by_its_address():
    """A stage is refit from one recorded pass, so only modules reading the very same tensor may share one. An
    address alone is not enough: an in-place write (here) or the allocator handing a freed input's address to
    the next module's input (seen with Llama: o_proj grouped with gate/up in about 1 of 16 layers, which made
    reconstruction results vary from run to run) must start a new stage."""
    from hf_flop.calibration import CalibrationSplit
    from hf_flop.reconstruction import _stages

    layer = _SharedBuffer()
    calib = CalibrationSplit(layer, batches(n=2), None, 0.5)
    modules = {"first": layer.first, "second": layer.second, "third": layer.third}
    hidden, calls = [torch.randn(2, 4, 8)], [((None,), {})]
    assert _stages(layer, list(modules), modules, hidden, calls, calib) == [["first", "second"], ["third"]]
