"""plora_linear_nf4 (forward and backward, both dequantisation modes) against the torch reference."""

import pytest
import torch

bnb = pytest.importorskip("bitsandbytes")

from helpers import ELEMENTWISE  # noqa: E402

from fed_plora.kernels import plora_linear_nf4, quantize_nf4  # noqa: E402
from fed_plora.kernels.nf4 import dequantize_nf4_reference  # noqa: E402
from fed_plora.kernels.plora_linear import plora_linear_reference  # noqa: E402


def _case(device, dtype, m=48, k=256, n=96, r=6, nested=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    weight = (torch.randn(n, k, generator=g) * 0.05).to(device, dtype)
    code2 = __import__("bitsandbytes.functional").functional.create_dynamic_map().to(device)
    nf4 = quantize_nf4(weight, 64, code2 if nested else None)
    x = torch.randn(m, k, generator=g).to(device, dtype)
    lora_a = (torch.randn(r, k, generator=g) / k**0.5).to(device, dtype)
    lora_b = (torch.randn(n, r, generator=g) * 0.1).to(device, dtype)
    bias = torch.randn(n, generator=g).to(device, dtype)
    return nf4, x, lora_a, lora_b, bias


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("dequant", ["fused", "temporary"])
@pytest.mark.parametrize("nested", [False, True])
def test_forward_and_backward_match_reference(device, dtype, dequant, nested):
    nf4, x, lora_a, lora_b, bias = _case(device, dtype, nested=nested)
    active = torch.tensor([4, 0, 2], device=device)
    leaves = [t.clone().requires_grad_(True) for t in (x, lora_a, lora_b, bias)]
    y = plora_linear_nf4(leaves[0], nf4, *leaves[1:3], active, 0.8, leaves[3], dequant=dequant)
    weight = dequantize_nf4_reference(nf4).double()
    ref_leaves = [t.double().requires_grad_(True) for t in (x, lora_a, lora_b, bias)]
    expected = plora_linear_reference(ref_leaves[0], weight, *ref_leaves[1:3], active, 0.8, ref_leaves[3])
    torch.testing.assert_close(y.double(), expected, **ELEMENTWISE[dtype])
    dy = torch.randn_like(expected).to(dtype).double()
    y.backward(dy.to(dtype))
    expected.backward(dy)
    for ours, ref in zip(leaves, ref_leaves):
        torch.testing.assert_close(ours.grad.double(), ref.grad, **ELEMENTWISE[dtype])
    assert torch.count_nonzero(leaves[1].grad[[1, 3, 5]]) == 0  # inactive modules get exactly zero


def test_bitsandbytes_params4bit_and_leading_dims(device):
    weight = torch.randn(64, 128) * 0.05
    param = bnb.nn.Params4bit(weight, requires_grad=False, quant_type="nf4", blocksize=64).to(device)
    x = torch.randn(2, 5, 128, device=device)
    lora_a = torch.randn(4, 128, device=device) * 0.1
    lora_b = torch.randn(64, 4, device=device) * 0.1
    active = torch.tensor([1, 3], device=device)
    y = plora_linear_nf4(x, param, lora_a, lora_b, active, 2.0)
    dense = bnb.functional.dequantize_4bit(param.data, param.quant_state) if device.type == "cpu" else None
    if dense is not None:
        expected = plora_linear_reference(x, dense, lora_a, lora_b, active, 2.0)
        torch.testing.assert_close(y, expected, rtol=1e-4, atol=1e-4)
    assert y.shape == (2, 5, 64)


def test_ragged_rows_fall_back_to_the_temporary(device):
    nf4, x, lora_a, lora_b, _ = _case(device, torch.float32, k=200, m=8)
    active = torch.tensor([1], device=device)
    with pytest.raises(ValueError, match="dequant='fused' needs rows of whole blocks"):
        plora_linear_nf4(x, nf4, lora_a, lora_b, active, 1.0, dequant="fused")
    y = plora_linear_nf4(x, nf4, lora_a, lora_b, active, 1.0)  # auto: temporary
    expected = plora_linear_reference(x, dequantize_nf4_reference(nf4), lora_a, lora_b, active, 1.0)
    torch.testing.assert_close(y, expected, rtol=1e-4, atol=1e-4)


def test_rejects_bad_arguments(device):
    nf4, x, lora_a, lora_b, _ = _case(device, torch.float32)
    active = torch.tensor([0], device=device)
    with pytest.raises(ValueError, match=r"x must have last dimension K = 256"):
        plora_linear_nf4(x[:, :-1], nf4, lora_a, lora_b, active, 1.0)
    with pytest.raises(TypeError, match=r"lora_b must have dtype torch.float32"):
        plora_linear_nf4(x, nf4, lora_a, lora_b.half(), active, 1.0)
    with pytest.raises(ValueError, match="dequant must be 'auto', 'fused' or 'temporary'"):
        plora_linear_nf4(x, nf4, lora_a, lora_b, active, 1.0, dequant="never")


@pytest.mark.parametrize("dequant", ["fused", "temporary"])
def test_frozen_modules_are_evaluated_without_gradients(device, dequant):
    """``trainable``: the exact alternative to a 4-bit fold keeps folded modules as frozen terms."""
    nf4, x, lora_a, lora_b, _ = _case(device, torch.float32, m=32)
    active = torch.tensor([3, 0, 5, 1], device=device)  # 3, 0 trained; 5, 1 frozen
    leaves = [t.clone().requires_grad_(True) for t in (x, lora_a, lora_b)]
    y = plora_linear_nf4(leaves[0], nf4, leaves[1], leaves[2], active, 0.5, dequant=dequant, trainable=2)
    ref_leaves = [t.clone().requires_grad_(True) for t in (x, lora_a, lora_b)]
    weight = dequantize_nf4_reference(nf4)
    trained = plora_linear_reference(ref_leaves[0], weight, ref_leaves[1], ref_leaves[2], active[:2], 0.5)
    expected = trained + plora_linear_reference(ref_leaves[0], 0 * weight, lora_a, lora_b, active[2:], 0.5)
    torch.testing.assert_close(y, expected, rtol=1e-4, atol=1e-4)
    dy = torch.randn_like(y)
    y.backward(dy)
    expected.backward(dy)
    for ours, ref in zip(leaves, ref_leaves):
        torch.testing.assert_close(ours.grad, ref.grad, rtol=1e-4, atol=1e-4)
    assert torch.count_nonzero(leaves[1].grad[[1, 5]]) == 0 and torch.count_nonzero(leaves[2].grad[:, [1, 5]]) == 0
    with pytest.raises(ValueError, match=r"trainable must be an int in \[0, 4\]"):
        plora_linear_nf4(x, nf4, lora_a, lora_b, active, 0.5, trainable=5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("with_bias", [False, True])
def test_decoding_size_splits_the_k_loop(device, dtype, with_bias):
    """At decoding sizes programs share an output tile's K loop (here 2 programs, 10 and 9 K-steps: the interpreter
    stands for a GPU of 3 SMs) and the tile's last program adds their fp32 partial sums."""
    from fed_plora.kernels.plora_linear_nf4._triton import BLOCK_K, splits

    m, k, n = 5, 1216, 40
    assert splits(1, k // BLOCK_K, 3, 40e3, 2 * m * n * 4) == 2  # 4 would leave fewer than 8 K-steps a program
    nf4, x, lora_a, lora_b, bias = _case(device, dtype, m=m, k=k, n=n, seed=3)
    active = torch.tensor([5, 1], device=device)
    bias = bias if with_bias else None
    y = plora_linear_nf4(x, nf4, lora_a, lora_b, active, 0.7, bias, dequant="fused")
    weight = dequantize_nf4_reference(nf4).double()
    expected = plora_linear_reference(x.double(), weight, lora_a.double(), lora_b.double(), active, 0.7,
                                      bias.double() if with_bias else None)  # fmt: skip
    tolerance = ELEMENTWISE.get(dtype, dict(rtol=5e-3, atol=5e-3))
    torch.testing.assert_close(y.double(), expected, **tolerance)
