"""NF4 kernels against bitsandbytes (the oracle, run on CPU): quantise, dequantise, in-place fold."""

import pytest
import torch

bnb = pytest.importorskip("bitsandbytes")
F = pytest.importorskip("bitsandbytes.functional")

from fed_plora.kernels import dequantize_nf4, fold_, fold_nf4_, quantize_nf4, unfold_nf4_  # noqa: E402
from fed_plora.kernels.nf4 import as_nf4, dequantize_nf4_reference, fold_nf4_reference, quantize_nf4_reference  # noqa: E402

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def codes(packed: torch.Tensor) -> torch.Tensor:
    """One 4-bit code per value (high nibble first)."""
    flat = packed.reshape(-1)
    return torch.stack([flat >> 4, flat & 15], 1).view(-1)


def params4bit(weight: torch.Tensor, blocksize: int, nested: bool):
    param = bnb.nn.Params4bit(
        weight.cpu(), requires_grad=False, quant_type="nf4", blocksize=blocksize, compress_statistics=nested
    )
    return param.to(weight.device)


def assert_nested_codes_nearest(ours: torch.Tensor, theirs: torch.Tensor, absmax: torch.Tensor, state) -> None:
    """Nested 8-bit absmax codes: ours are the nearest level of ``(absmax - offset) / absmax2``; bitsandbytes'
    CPU search occasionally returns a neighbour instead (about 1 value in 60-700 here), so it may differ there."""
    scaled = (absmax - state.offset) * (1 / state.state2.absmax).repeat_interleave(256)[: absmax.numel()]
    level = state.state2.code
    ours_distance = (scaled - level[ours.long()]).abs()
    assert bool((ours_distance <= (scaled[:, None] - level).abs().amin(1)).all())
    differ = ours != theirs
    assert differ.double().mean() < 0.03 and bool(((ours.long() - theirs.long())[differ].abs() == 1).all())


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("blocksize", [64, 128])
@pytest.mark.parametrize("nested", [False, True])
def test_quantize_matches_bitsandbytes(device, dtype, blocksize, nested):
    weight = (torch.randn(96, 320) * 0.02).to(device, dtype)
    weight[3, :64] = 0.0  # an all-zero block
    packed, state = F.quantize_4bit(weight.cpu(), blocksize=blocksize, compress_statistics=nested, quant_type="nf4")
    ours = quantize_nf4(weight, blocksize, state.state2.code.to(device) if nested else None)
    assert torch.equal(ours.packed.cpu(), packed)
    if nested:
        assert torch.equal(ours.offset.cpu(), state.offset)
        assert torch.equal(ours.absmax2.cpu(), state.state2.absmax)
        plain = F.quantize_4bit(weight.cpu(), blocksize=blocksize, quant_type="nf4")[1].absmax
        assert_nested_codes_nearest(ours.absmax.cpu(), state.absmax, plain, state)
    else:
        assert torch.equal(ours.absmax.cpu(), state.absmax)


@pytest.mark.parametrize("shape", [(33, 65), (7,), (3, 5, 40)])
def test_quantize_odd_shapes_match_bitsandbytes_codes(device, shape):
    weight = torch.randn(shape).to(device, torch.bfloat16)
    packed, state = F.quantize_4bit(weight.cpu(), blocksize=64, quant_type="nf4")
    ours = quantize_nf4(weight, 64)
    assert torch.equal(ours.packed.cpu(), packed)
    assert torch.equal(ours.absmax.cpu(), state.absmax)
    assert torch.equal(dequantize_nf4(ours).cpu(), dequantize_nf4_reference(quantize_nf4_reference(weight.cpu(), 64)))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("blocksize", [64, 128])
@pytest.mark.parametrize("nested", [False, True])
def test_dequantize_matches_bitsandbytes(device, dtype, blocksize, nested):
    param = params4bit((torch.randn(80, 256) * 0.05).to(dtype), blocksize, nested)
    expected = F.dequantize_4bit(param.data, param.quant_state)
    assert torch.equal(dequantize_nf4(param.to(device)).cpu(), expected)


def test_dequantize_ragged_rows_matches_bitsandbytes_portable_path(device):
    """Rows that are not whole blocks (192 = 1.5 blocks of 128): bitsandbytes' CPU C kernel reads some
    values with the previous block's absmax there; its portable torch path (the layout its CUDA kernel
    implements) agrees with ours."""
    from bitsandbytes.backends.default.ops import _dequantize_4bit_compute

    packed, state = F.quantize_4bit(torch.randn(80, 192) * 0.05, blocksize=128, quant_type="nf4")
    with torch._dynamo.config.patch(disable=True):
        expected = _dequantize_4bit_compute(packed.view(-1), state.absmax, state.code, 128, (80, 192), torch.float32)
    assert torch.equal(dequantize_nf4(packed.to(device), state).cpu(), expected)


def test_quantize_nf4_reference_agrees_with_kernels_on_a_ragged_tail(device):
    weight = torch.randn(1001).to(device)
    ours, ref = quantize_nf4(weight, 128), quantize_nf4_reference(weight.cpu(), 128)
    assert torch.equal(ours.packed.cpu(), ref.packed) and torch.equal(ours.absmax.cpu(), ref.absmax)


def _fold_case(device, dtype, k, nested, seed=0, rank=8):
    g = torch.Generator().manual_seed(seed)
    weight = torch.randn(128, k, generator=g) * 0.03
    lora_a = torch.randn(rank, k, generator=g) / k**0.5
    lora_b = torch.randn(128, rank, generator=g) * 0.02
    param = params4bit(weight.to(dtype), 64, nested).to(device)
    return param, lora_a.to(device, dtype), lora_b.to(device, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("nested", [False, True])
@pytest.mark.parametrize("k", [256, 200])  # fused kernel (rows of whole blocks) and the general path
def test_fold_nf4_matches_bitsandbytes_requantisation(device, dtype, nested, k):
    param, lora_a, lora_b = _fold_case(device, dtype, k, nested)
    indices = torch.tensor([6, 1, 3], device=device)
    expected = fold_nf4_reference(as_nf4(param), lora_a, lora_b, indices, 1.5)
    # The reference is bitsandbytes' own re-quantisation of the dequantised weight plus Δ.
    index = indices.long()
    dense = dequantize_nf4_reference(as_nf4(param)).cpu().double()
    folded = (dense + 1.5 * lora_b[:, index].cpu().double() @ lora_a[index].cpu().double()).to(dtype)
    assert torch.equal(
        F.quantize_4bit(folded, blocksize=64, compress_statistics=nested, quant_type="nf4")[0], expected.packed.cpu()
    )
    data_ptr = param.data.data_ptr()
    assert fold_nf4_(param, lora_a, lora_b, indices, 1.5) is param
    assert param.data.data_ptr() == data_ptr  # in place
    # Ties at NF4 thresholds (fp32 accumulation vs the float64 reference) are the only differences.
    assert (codes(param.data) != codes(expected.packed)).double().mean() < 1e-3
    # Block maxima are folded values: equal but for the same rare rounding differences.
    close = dict(rtol=1e-6 if dtype == torch.float32 else 8e-3, atol=0)
    if nested:
        torch.testing.assert_close(param.quant_state.state2.absmax, expected.absmax2, **close)
        torch.testing.assert_close(param.quant_state.offset, expected.offset, **close)
        assert (param.quant_state.absmax != expected.absmax).double().mean() < 0.05
    else:
        torch.testing.assert_close(param.quant_state.absmax, expected.absmax, **close)
        assert (param.quant_state.absmax == expected.absmax).double().mean() > 0.9
    # The folded Params4bit still works for bitsandbytes: dequantises to our dequantisation.
    if device.type == "cpu" and k % 64 == 0:
        assert torch.equal(F.dequantize_4bit(param.data, param.quant_state), dequantize_nf4(param))


def test_fold_nf4_with_large_delta_tracks_the_dense_fold(device):
    param, lora_a, lora_b = _fold_case(device, torch.float32, 256, False, seed=1)
    lora_b = lora_b * 50  # a delta as large as the weight: 4-bit rounding keeps most of it
    indices = torch.arange(8, device=device)
    dense = dequantize_nf4(param)
    fold_(dense, lora_a, lora_b, indices, 1.0)
    fold_nf4_(param, lora_a, lora_b, indices, 1.0)
    error = (dequantize_nf4(param) - dense).norm() / dense.norm()
    assert error < 0.15  # NF4's own quantisation error of a Gaussian-like weight is about 0.1


def test_unfold_nf4_is_fold_with_negative_scale(device):
    p1, lora_a, lora_b = _fold_case(device, torch.float32, 256, True, seed=2)
    p2, _, _ = _fold_case(device, torch.float32, 256, True, seed=2)
    indices = torch.tensor([0, 2], device=device)
    unfold_nf4_(p1, lora_a, lora_b, indices, 3.0)
    fold_nf4_(p2, lora_a, lora_b, indices, -3.0)
    assert torch.equal(p1.data, p2.data) and torch.equal(p1.quant_state.absmax, p2.quant_state.absmax)


def test_fold_nf4_rejects_bad_arguments_before_writing(device):
    param, lora_a, lora_b = _fold_case(device, torch.bfloat16, 256, False)
    before = param.data.clone()
    indices = torch.tensor([0], device=device)
    with pytest.raises(TypeError, match=r"lora_a must have dtype torch.bfloat16 \(the dtype of param\)"):
        fold_nf4_(param, lora_a.float(), lora_b, indices, 1.0)
    with pytest.raises(ValueError, match=r"lora_a must have shape \[R, K\] = \[R, 256\]"):
        fold_nf4_(param, lora_a[:, :-2], lora_b, indices, 1.0)
    with pytest.raises(ValueError, match=r"indices must hold module indices in \[0, 8\)"):
        fold_nf4_(param, lora_a, lora_b, indices + 8, 1.0)
    with pytest.raises(ValueError, match="param has no quant_state"):
        fold_nf4_(param.data.clone(), lora_a, lora_b, indices, 1.0)
    with pytest.raises(TypeError, match="param must be a bitsandbytes Params4bit"):
        fold_nf4_("weight", lora_a, lora_b, indices, 1.0)
    fp4 = bnb.nn.Params4bit(torch.randn(16, 64), requires_grad=False, quant_type="fp4").to(device)
    with pytest.raises(ValueError, match="must be NF4-quantised, got quant_type 'fp4'"):
        fold_nf4_(fp4, lora_a[:, :64], lora_b[:16], indices, 1.0)
    assert torch.equal(param.data, before)


@pytest.mark.gpu
def test_fold_nf4_on_gpu_allocates_only_the_block_maxima():
    param, lora_a, lora_b = _fold_case(torch.device("cuda"), torch.bfloat16, 1024, True)
    indices = torch.arange(4, device="cuda")
    fold_nf4_(param, lora_a, lora_b, indices, 1.0)  # compile outside the measured call
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    fold_nf4_(param, lora_a, lora_b, indices, 1.0)
    torch.cuda.synchronize()
    blocks = 128 * 1024 // 64
    assert torch.cuda.max_memory_allocated() - before <= blocks * 4 + 2048  # fp32 absmax before double quantisation


def test_cpu_without_triton_takes_the_torch_path(monkeypatch):
    """CPU tensors with no interpreter (Triton cannot launch there) give the kernels' results."""
    from fed_plora.kernels.fold import op as fold_op
    from fed_plora.kernels.nf4 import op as nf4_op

    param, lora_a, lora_b = _fold_case(torch.device("cpu"), torch.bfloat16, 256, True, seed=4)
    twin, _, _ = _fold_case(torch.device("cpu"), torch.bfloat16, 256, True, seed=4)
    indices = torch.tensor([2, 7], device="cpu")
    fold_nf4_(param, lora_a, lora_b, indices, 2.0)
    quantised = quantize_nf4(dequantize_nf4(param), 64, param.quant_state.state2.code)
    monkeypatch.setattr(nf4_op, "INTERPRET", False)
    monkeypatch.setattr(fold_op, "INTERPRET", False)
    fold_nf4_(twin, lora_a, lora_b, indices, 2.0)
    assert (codes(twin.data) != codes(param.data)).double().mean() < 1e-3
    torch.testing.assert_close(twin.quant_state.state2.absmax, param.quant_state.state2.absmax, rtol=8e-3, atol=0)
    again = quantize_nf4(dequantize_nf4(param), 64, param.quant_state.state2.code)
    assert torch.equal(again.packed, quantised.packed) and torch.equal(again.absmax, quantised.absmax)
