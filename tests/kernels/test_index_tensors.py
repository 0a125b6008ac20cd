"""Index tensors (``active``, the folds' ``indices``): a broken promise cannot make a kernel read or write
out of bounds (issue 12): kernels skip a module index outside ``[0, R)``.
"""

from __future__ import annotations

import importlib

import pytest
import torch

bnb = pytest.importorskip("bitsandbytes")

from fed_plora.kernels import quantize_nf4  # noqa: E402
from fed_plora.kernels.fold._triton import fold_launch  # noqa: E402
from fed_plora.kernels.plora_linear import formulas  # noqa: E402

nf4_triton = importlib.import_module("fed_plora.kernels.nf4._triton")
nf4_op = importlib.import_module("fed_plora.kernels.plora_linear_nf4.op")

R = 8  # modules


def _adapters(device, m=4, k=64, n=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=g).to(device)
    weight = (torch.randn(n, k, generator=g) * 0.1).to(device)
    lora_a = (torch.randn(R, k, generator=g) / k**0.5).to(device)
    lora_b = (torch.randn(n, R, generator=g) * 0.5).to(device)
    return x, weight, lora_a, lora_b


# ------------------------------------------------------------------ kernels skip indices outside [0, R)

# What kernels receive when a promise is broken after the check (the launchers take checked arguments,
# so these call them directly): an out-of-range entry contributes nothing. The reference puts an unused
# module U in its place, with U's row of lora_a and column of lora_b zeroed: the same sums, bit for bit.
BAD = [([3, R, 0, -1, 5], torch.int64), ([3, 100, 0, -128, 5], torch.int8), ([3, 1 << 40, 0, 5], torch.int64)]
U = 7


@pytest.mark.parametrize("values, dtype", BAD, ids=["just_out", "int8", "huge"])
def test_kernels_skip_out_of_range_indices(device, values, dtype):
    x, weight, lora_a, lora_b = _adapters(device)
    bad = torch.tensor(values, device=device, dtype=dtype)
    fixed = torch.tensor([v if 0 <= v < R else U for v in values], device=device)
    a_ref, b_ref = lora_a.clone(), lora_b.clone()
    a_ref[U], b_ref[:, U] = 0, 0
    # The shrink over rows of lora_a (forward) and columns of lora_b (backward), and the GEMMs' slab.
    dy = torch.randn(4, 16, device=device)
    for inputs, g, g_ref, rows_dim in ((x, lora_a, a_ref, 0), (dy, lora_b, b_ref, 1)):
        t = formulas.TRITON.shrink(inputs, g, rows_dim, bad, 16, 1.0)
        assert torch.equal(t, formulas.TRITON.shrink(inputs, g_ref, rows_dim, fixed, 16, 1.0))
    t = torch.randn(4, 16, device=device)
    y = formulas.TRITON.gemm_with_slab(x, weight, t, lora_b, 1, bad, 0.5, None)
    assert torch.equal(y, formulas.TRITON.gemm_with_slab(x, weight, t, b_ref, 1, fixed, 0.5, None))
    nf4 = quantize_nf4(weight)
    y = nf4_op._triton.gemm_nf4_with_slab(x, nf4, t, lora_b, bad, 0.5, None)
    assert torch.equal(y, nf4_op._triton.gemm_nf4_with_slab(x, nf4, t, b_ref, fixed, 0.5, None))
    # The folds.
    ours, expected = weight.clone(), weight.clone()
    fold_launch(ours, lora_a, lora_b, bad, 16, 1.0)
    fold_launch(expected, a_ref, b_ref, fixed, 16, 1.0)
    assert torch.equal(ours, expected)
    ours, expected = quantize_nf4(weight), quantize_nf4(weight)
    nf4_triton.fold(ours, lora_a, lora_b * 40, bad, 16, 1.0, ours.absmax)
    nf4_triton.fold(expected, a_ref, b_ref * 40, fixed, 16, 1.0, expected.absmax)
    assert torch.equal(ours.packed, expected.packed) and torch.equal(ours.absmax, expected.absmax)
