"""PLoRALinear on its own: the forward against the reference, module states, dtypes, 4-bit bases."""

import pytest
import torch
from torch import nn

from fed_plora import plora
from fed_plora.kernels import plora_linear_reference


def _layer(n=48, k=40, r=6, dtype=torch.float32, bias=True, seed=0, **kwargs):
    torch.manual_seed(seed)
    base = nn.Linear(k, n, bias=bias, dtype=dtype)
    layer = plora.PLoRALinear(base, r, scale=0.5, **kwargs)
    with torch.no_grad():
        layer.lora_b.normal_(std=0.3)
    return layer


def test_forward_matches_reference_and_grads_reach_adapters_only():
    layer = _layer()
    x = torch.randn(3, 5, 40, requires_grad=True)
    y = layer(x)
    every = torch.arange(6)
    ref = plora_linear_reference(x, layer.base_layer.weight, layer.lora_a, layer.lora_b, every, 0.5, layer.base_layer.bias)
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)
    y.square().sum().backward()
    assert layer.lora_a.grad is not None and layer.lora_b.grad is not None and x.grad is not None
    assert layer.base_layer.weight.grad is None and not layer.base_layer.weight.requires_grad


def test_init_is_identity_and_reset():
    base = nn.Linear(16, 8)
    layer = plora.PLoRALinear(base, 4, scale=2.0, init="gaussian")
    x = torch.randn(2, 16)
    torch.testing.assert_close(layer(x), base(x))
    assert layer.lora_a.abs().sum() > 0 and layer.lora_b.abs().sum() == 0
    with pytest.raises(ValueError, match="init"):
        layer.reset_adapter("ones")


@pytest.mark.parametrize("mode", ["merge", "exact"])
def test_select_states_parameters_and_unfold(mode):
    layer = _layer()
    x = torch.randn(4, 40)
    before = layer(x).detach()
    values = layer.module_values()
    weight = layer.base_layer.weight.detach().clone()
    layer.select_and_fold([4, 1], mode=mode)
    other = "folded" if mode == "merge" else "frozen"
    assert layer.states == [other, "trainable", other, other, "trainable", other]
    assert [n for n, p in layer.named_parameters() if p.requires_grad] == ["selected_a", "selected_b"]
    assert layer.selected_a.shape == (2, 40) and layer.selected_b.shape == (48, 2)
    torch.testing.assert_close(layer(x), before, rtol=1e-5, atol=1e-5)
    if mode == "exact":
        assert torch.equal(layer.base_layer.weight, weight)
    with pytest.raises(RuntimeError, match="unfold"):
        layer.select_and_fold([0])
    with torch.no_grad():
        layer.selected_a.add_(1.0)  # a "training step" on the selected modules
    a, b = layer.module_values()
    assert torch.equal(a[[1, 4]], values[0][[1, 4]] + 1.0) and torch.equal(a[[0, 2, 3, 5]], values[0][[0, 2, 3, 5]])
    layer.unfold()
    assert layer.states == ["trainable"] * 6 and layer.selected_a is None
    assert layer.lora_a.requires_grad and torch.equal(layer.lora_a, a) and torch.equal(layer.lora_b, b)
    torch.testing.assert_close(layer.base_layer.weight, weight, rtol=0, atol=1e-6)


def test_pristine_unfold_is_bit_exact_in_bf16():
    layer = _layer(dtype=torch.bfloat16)
    weight = layer.base_layer.weight.detach().clone()
    layer.select_and_fold([0], mode="merge", pristine=True)
    assert not torch.equal(layer.base_layer.weight, weight)
    layer.unfold()
    assert torch.equal(layer.base_layer.weight, weight)


def test_selection_errors():
    layer = _layer()
    with pytest.raises(ValueError, match="repeat"):
        layer.select_and_fold([1, 1])
    with pytest.raises(ValueError, match=r"\[0, 6\)"):
        layer.select_and_fold([6])
    with pytest.raises(ValueError, match="mode"):
        layer.select_and_fold([1], mode="fold")
    with pytest.raises(TypeError, match="indices"):
        layer.select_and_fold(3)
    with pytest.raises(TypeError, match="base_layer"):
        plora.PLoRALinear(nn.Conv1d(2, 2, 1), 4, 1.0)
    with pytest.raises(ValueError, match="r must"):
        plora.PLoRALinear(nn.Linear(2, 2), 0, 1.0)


def test_empty_selection_and_set_values_refused_while_folded():
    layer = _layer(r=3)
    x = torch.randn(2, 40)
    before = layer(x).detach()
    layer.select_and_fold([], mode="merge")
    assert layer.selected_a is None and not any(p.requires_grad for p in layer.parameters())
    torch.testing.assert_close(layer(x), before, rtol=1e-5, atol=1e-5)
    with pytest.raises(RuntimeError, match="folded"):
        layer.set_module_values(*layer.module_values())
    layer.unfold()
    with pytest.raises(ValueError, match="shape"):
        layer.set_module_values(torch.zeros(2, 40), layer.lora_b)


def test_fp32_adapters_on_bf16_base_and_autocast():
    layer = _layer(dtype=torch.bfloat16, adapter_dtype=torch.float32)
    assert layer.lora_a.dtype == torch.float32
    x = torch.randn(4, 40, dtype=torch.bfloat16)
    y = layer(x)
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    assert layer.lora_a.grad.dtype == torch.float32 and layer.lora_a.grad.abs().sum() > 0

    fp32 = _layer()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = fp32(torch.randn(4, 40))
    assert y.dtype == torch.bfloat16


def test_dropout_path_matches_fused_path_in_eval_and_differs_in_training():
    layer = _layer(dropout=0.5)
    x = torch.randn(8, 40)
    layer.eval()
    fused = layer(x)
    layer.train()
    torch.manual_seed(3)
    dropped = layer(x)
    assert not torch.allclose(fused, dropped)
    dropped.sum().backward()
    assert layer.lora_a.grad is not None


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_linear4bit_base_forward_backward_and_merge_restores_exactly(quant_type):
    bnb = pytest.importorskip("bitsandbytes")
    torch.manual_seed(0)
    dense = nn.Linear(64, 32)
    base = bnb.nn.Linear4bit(64, 32, compute_dtype=torch.float32, quant_type=quant_type)
    base.load_state_dict(dense.state_dict())
    base = base.to("cpu")
    layer = plora.PLoRALinear(base, 4, scale=1.0)
    assert layer.is_4bit and layer.lora_a.dtype == torch.float32
    with torch.no_grad():
        layer.lora_b.normal_(std=0.5)
    x = torch.randn(3, 64)
    weight = bnb.functional.dequantize_4bit(base.weight.data, base.weight.quant_state)
    y = layer(x)
    ref = plora_linear_reference(x, weight, layer.lora_a, layer.lora_b, torch.arange(4), 1.0, base.bias)
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)
    y.sum().backward()
    assert layer.lora_b.grad.abs().sum() > 0

    packed = base.weight.data.clone()
    layer.select_and_fold([2])  # default for 4-bit: exact
    assert layer.states == ["frozen", "frozen", "trainable", "frozen"]
    torch.testing.assert_close(layer(x), y.detach(), rtol=1e-5, atol=1e-5)
    layer.unfold()
    layer.select_and_fold([2], mode="merge")
    assert not torch.equal(base.weight.data, packed)
    layer.unfold()
    assert torch.equal(base.weight.data, packed)


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_merge_into_a_linear4bit_base_moves_it_towards_the_sum(quant_type):
    base, dequantize = _linear4bit(quant_type)
    layer = plora.PLoRALinear(base, 4, scale=0.5)
    weight = dequantize(base.weight.data, base.weight.quant_state)
    gen = torch.Generator().manual_seed(4)
    a, b = torch.randn(2, 64, generator=gen), torch.randn(32, 2, generator=gen) * 0.5
    target = weight + 0.5 * (b @ a)
    saved = plora.snapshot_bases(nn.ModuleDict({"layer": layer}))
    layer.merge_into_base(a, b)
    merged = dequantize(base.weight.data, base.weight.quant_state)
    assert (merged - target).norm() < 0.5 * (weight - target).norm()
    plora.restore_bases(nn.ModuleDict({"layer": layer}), saved)
    assert torch.equal(dequantize(base.weight.data, base.weight.quant_state), weight)


def test_bf16_merge_unfold_drift_is_bounded_and_pristine_is_exact():
    torch.manual_seed(0)
    layer = _layer(n=64, k=64, r=8, dtype=torch.bfloat16, bias=False, adapter_dtype=torch.float32)
    with torch.no_grad():
        layer.base_layer.weight.normal_(std=0.02)
        layer.lora_b.normal_(std=0.01)
    weight = layer.base_layer.weight.detach().clone()
    gen = torch.Generator().manual_seed(1)
    for pristine in (False, True):
        for _ in range(100):
            layer.select_and_fold(torch.randperm(8, generator=gen)[:2], mode="merge", pristine=pristine)
            layer.unfold()
        drift = (layer.base_layer.weight.float() - weight.float()).abs().max().item()
        if pristine:
            assert drift == 0.0
        else:  # rounding drift (see docs for the 1024x1024 numbers); reset for the pristine run
            assert 0 < drift < 0.05 * weight.float().abs().max().item()
            with torch.no_grad():
                layer.base_layer.weight.copy_(weight)


def _linear4bit(quant_type, n=32, k=64, seed=0):
    bnb = pytest.importorskip("bitsandbytes")
    torch.manual_seed(seed)
    dense = nn.Linear(k, n)
    base = bnb.nn.Linear4bit(k, n, compute_dtype=torch.float32, quant_type=quant_type)
    base.load_state_dict(dense.state_dict())
    return base.to("cpu"), bnb.functional.dequantize_4bit


def _spy_nf4_op(monkeypatch):
    from fed_plora.plora import layer

    calls = []
    op = layer.plora_linear_nf4

    def spy(x, param, lora_a, lora_b, active, scale, bias=None, **kwargs):
        calls.append((active.tolist(), kwargs.get("trainable")))
        return op(x, param, lora_a, lora_b, active, scale, bias, **kwargs)

    monkeypatch.setattr(layer, "plora_linear_nf4", spy)
    return calls


def test_nf4_base_runs_the_nf4_op_with_selected_modules_trainable_and_frozen_ones_exact(monkeypatch):
    calls = _spy_nf4_op(monkeypatch)
    base, dequantize = _linear4bit("nf4")
    layer = plora.PLoRALinear(base, 6, scale=0.5)
    with torch.no_grad():
        layer.lora_b.normal_(std=0.3)
    x = torch.randn(3, 64, requires_grad=True)
    dy = torch.randn(3, 32)
    y = layer(x)
    assert calls == [([0, 1, 2, 3, 4, 5], None)]
    leaves = [t.detach().clone().requires_grad_(True) for t in (x, layer.lora_a, layer.lora_b)]
    weight = dequantize(base.weight.data, base.weight.quant_state)
    ref = plora_linear_reference(leaves[0], weight, leaves[1], leaves[2], torch.arange(6), 0.5, base.bias)
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)
    y.backward(dy)
    ref.backward(dy)
    for ours, expected in zip((x, layer.lora_a, layer.lora_b), leaves):
        torch.testing.assert_close(ours.grad, expected.grad, rtol=1e-5, atol=1e-5)

    layer.select_and_fold([4, 1])  # 4-bit default: exact, base untouched
    assert layer.states == ["frozen", "trainable", "frozen", "frozen", "trainable", "frozen"]
    assert [n for n, p in layer.named_parameters() if p.requires_grad] == ["selected_a", "selected_b"]
    x.grad = layer.lora_a.grad = layer.lora_b.grad = None
    y = layer(x)
    assert calls[-1] == ([0, 1, 2, 3, 4, 5], 2)  # selected modules first, then the four frozen ones
    torch.testing.assert_close(y, ref.detach(), rtol=1e-5, atol=1e-5)
    y.backward(dy)
    assert layer.lora_a.grad is None and layer.lora_b.grad is None
    torch.testing.assert_close(layer.selected_a.grad, leaves[1].grad[[1, 4]], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(layer.selected_b.grad, leaves[2].grad[:, [1, 4]], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(x.grad, leaves[0].grad, rtol=1e-5, atol=1e-5)

    fp4 = plora.PLoRALinear(_linear4bit("fp4")[0], 2, scale=1.0)
    fp4(torch.randn(2, 64)).sum().backward()
    assert len(calls) == 2  # FP4 stays on the dequantise + plora_linear path


def test_nf4_base_dropout_trains_selected_modules_only():
    base, _ = _linear4bit("nf4")
    layer = plora.PLoRALinear(base, 4, scale=1.0, dropout=0.5)
    with torch.no_grad():
        layer.lora_b.normal_(std=0.3)
    x = torch.randn(8, 64)
    layer.eval()
    fused = layer(x)
    layer.select_and_fold([2])
    torch.testing.assert_close(layer(x), fused, rtol=1e-5, atol=1e-5)
    layer.train()
    torch.manual_seed(3)
    dropped = layer(x)
    assert not torch.allclose(dropped, fused)
    dropped.square().sum().backward()
    assert layer.selected_a.grad.abs().sum() > 0 and layer.lora_a.grad is None


def test_4bit_exact_keeps_the_delta_that_a_4bit_merge_rounds_away():
    """The reason for the 4-bit default (docs/nf4.md): a fold re-quantises a small delta away."""
    base, _ = _linear4bit("nf4", n=64, k=128)
    layer = plora.PLoRALinear(base, 4, scale=1.0)
    with torch.no_grad():  # ‖Δ‖/‖W‖ about 0.05, within the range of trained LoRA deltas (0.04-0.20)
        layer.lora_b.normal_(std=0.03)
    x = torch.randn(16, 128)
    with torch.no_grad():
        y = layer(x)
        delta = (y - base(x)).norm()
        errors = {}
        for mode in ("exact", "merge"):
            layer.select_and_fold([], mode=mode)  # every module frozen or folded
            errors[mode] = ((layer(x) - y).norm() / delta).item()
            layer.unfold()
    assert errors["exact"] < 1e-5 and errors["merge"] > 0.2, errors
