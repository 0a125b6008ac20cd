"""fold_ / unfold_ against a float64 reference: odd shapes, every dtype, argument errors."""

import pytest
import torch

from fed_plora.kernels import fold_, unfold_
from fed_plora.kernels.fold import fold_reference

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _adapter(n, k, r, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    weight = torch.randn(n, k, generator=g).to(device, dtype)
    lora_a = (torch.randn(r, k, generator=g) / k**0.5).to(device, dtype)
    lora_b = (torch.randn(n, r, generator=g) * 0.5).to(device, dtype)
    return weight, lora_a, lora_b


def _ulp(x: torch.Tensor) -> torch.Tensor:
    """Spacing of x's dtype at |x| (in float64)."""
    return torch.nextafter(x.abs(), torch.full_like(x, float("inf"))).double() - x.abs().double()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n, k, r, idx", [(67, 131, 5, [3, 0, 4]), (200, 48, 24, list(range(0, 24, 2))), (1, 300, 3, [2])])
def test_fold_matches_float64_reference(device, dtype, n, k, r, idx):
    weight, lora_a, lora_b = _adapter(n, k, r, dtype, device)
    indices = torch.tensor(idx, device=device, dtype=torch.int32)
    expected = fold_reference(weight, lora_a, lora_b, indices, 0.75)
    index = indices.long()
    magnitude = weight.double().abs() + 0.75 * (lora_b[:, index].double().abs() @ lora_a[index].double().abs())
    out = fold_(weight, lora_a, lora_b, indices, 0.75)
    assert out is weight
    # One rounding of an fp32-accumulated sum: every element within one unit in the last place of the
    # float64 result plus the fp32 accumulation error, and almost all of them identical.
    err = (weight.double() - expected.double()).abs()
    assert bool((err <= _ulp(expected) + 2.0**-21 * magnitude).all())
    if dtype != torch.float32:
        assert (err == 0).double().mean() > 0.97


def test_unfold_inverts_fold_and_matches_reference(device):
    weight, lora_a, lora_b = _adapter(96, 80, 8, torch.float32, device, seed=1)
    original = weight.clone()
    indices = torch.tensor([7, 1, 2], device=device)
    expected = fold_reference(weight, lora_a, lora_b, indices, -2.0)
    unfold_(weight, lora_a, lora_b, indices, 2.0)
    torch.testing.assert_close(weight, expected, rtol=1e-6, atol=1e-6)
    fold_(weight, lora_a, lora_b, indices, 2.0)
    torch.testing.assert_close(weight, original, rtol=1e-5, atol=1e-5)


def test_fold_strided_weight_and_adapters(device):
    base, lora_a, lora_b = _adapter(64, 96, 6, torch.float32, device, seed=2)
    weight = base.T.contiguous().T  # column-major [N, K]
    a_t = lora_a.T.contiguous().T
    b_t = lora_b.T.contiguous().T
    indices = torch.tensor([5, 0], device=device)
    expected = fold_reference(base, lora_a, lora_b, indices, 0.5)
    fold_(weight, a_t, b_t, indices, 0.5)
    torch.testing.assert_close(weight, expected, rtol=1e-6, atol=1e-6)


def test_fold_empty_indices_is_a_no_op_and_bumps_nothing(device):
    weight, lora_a, lora_b = _adapter(8, 16, 4, torch.float32, device)
    before, version = weight.clone(), weight._version
    fold_(weight, lora_a, lora_b, torch.empty(0, dtype=torch.long, device=device), 1.0)
    assert torch.equal(weight, before) and weight._version == version


def test_fold_bumps_version_so_autograd_sees_it(device):
    weight, lora_a, lora_b = _adapter(16, 16, 2, torch.float32, device)
    weight.requires_grad_(True)
    x = torch.randn(3, 16, device=device, requires_grad=True)
    y = (x @ weight.T).sum()  # saves weight for x's gradient
    fold_(weight, lora_a, lora_b, torch.tensor([0], device=device), 1.0)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.backward()


@pytest.mark.parametrize(
    "change, error, message",
    [
        (lambda w, a, b, i: (w[0], a, b, i, 1.0), ValueError, "weight must have 2 dimensions"),
        (lambda w, a, b, i: (w.long(), a, b, i, 1.0), TypeError, "weight must be float32, float16 or bfloat16"),
        (lambda w, a, b, i: (w, a[:, :-1], b, i, 1.0), ValueError, r"lora_a must have shape \[R, K\]"),
        (lambda w, a, b, i: (w, a, b[:, :-1], i, 1.0), ValueError, r"lora_b must have shape \[N, R\]"),
        (lambda w, a, b, i: (w, a.half(), b, i, 1.0), TypeError, "lora_a must have dtype torch.float32 .the dtype of weight"),
        (lambda w, a, b, i: (w, a, b, i.float(), 1.0), TypeError, "indices must be an integer tensor"),
        (lambda w, a, b, i: (w, a, b, i + 10, 1.0), ValueError, r"indices must hold module indices in \[0, 4\)"),
        (lambda w, a, b, i: (w, a, b, torch.cat([i, i]), 1.0), ValueError, "must not repeat"),
        (lambda w, a, b, i: (w, a, b, i, float("nan")), ValueError, "scale must be finite"),
        (lambda w, a, b, i: (w, a, b, i, torch.tensor(1.0)), TypeError, "scale must be a Python float"),
        (lambda w, a, b, i: (w[:1].expand(8, 12), a, b, i, 1.0), ValueError, r"weight: elements share memory .*strides \(0, 1\)"),
        (lambda w, a, b, i: (w.as_strided((8, 12), (1, 1)), a, b, i, 1.0), ValueError, "weight: elements share memory"),
    ],
)
def test_fold_rejects_bad_arguments_before_writing(device, change, error, message):
    weight, lora_a, lora_b = _adapter(8, 12, 4, torch.float32, device)
    before = weight.clone()
    args = change(weight, lora_a, lora_b, torch.tensor([0, 2], device=device))
    with pytest.raises(error, match=message):
        fold_(*args)
    assert torch.equal(weight, before)


def test_fold_rejects_indices_on_another_device():
    weight, lora_a, lora_b = _adapter(8, 12, 4, torch.float32, "cpu")
    with pytest.raises(ValueError, match="indices must be on cpu .the device of weight"):
        fold_(weight, lora_a, lora_b, torch.tensor([0], device="meta"), 1.0)


@pytest.mark.gpu
def test_fold_allocates_nothing_on_gpu():
    weight, lora_a, lora_b = _adapter(1024, 2048, 16, torch.bfloat16, "cuda")
    indices = torch.arange(8, device="cuda")
    fold_(weight, lora_a, lora_b, indices, 0.5)  # compile outside the measured call
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    fold_(weight, lora_a, lora_b, indices, 0.5)
    torch.cuda.synchronize()
    assert torch.cuda.max_memory_allocated() == before


def test_cpu_without_triton_takes_the_torch_path(monkeypatch):
    from fed_plora.kernels.fold import op as fold_op

    weight, lora_a, lora_b = _adapter(40, 72, 5, torch.bfloat16, "cpu", seed=5)
    indices = torch.tensor([4, 1], device="cpu")
    expected = fold_reference(weight, lora_a, lora_b, indices, 0.5)
    monkeypatch.setattr(fold_op, "INTERPRET", False)
    version = weight._version
    fold_(weight, lora_a, lora_b, indices, 0.5)
    assert torch.equal(weight, expected) and weight._version > version
