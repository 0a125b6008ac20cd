"""The fused op's formulas (``formulas.py``) and the products they are written with.

The formulas with plain-torch products in float64 are checked against autograd of the forward reference;
each Triton product against its plain-torch reference.
"""

from __future__ import annotations

import pytest
import torch
from helpers import rel_error

from fed_plora.kernels import plora_linear_reference
from fed_plora.kernels.plora_linear import formulas


def _operands(m, k, n, rank, dtype, device, seed):
    gen = torch.Generator().manual_seed(seed)

    def rand(*shape, std=1.0):
        return (torch.randn(*shape, generator=gen, dtype=torch.float64) * std).to(device=device, dtype=dtype)

    return rand(m, k), rand(n, k, std=k**-0.5), rand(rank, k, std=k**-0.5), rand(n, rank), rand(n), rand(m, n), gen


@pytest.mark.parametrize("count, trainable", [(0, None), (1, None), (5, None), (5, 2), (5, 0), (8, None)])
def test_formulas_are_the_gradient_of_the_reference(count, trainable):
    x, weight, lora_a, lora_b, bias, dy, gen = _operands(13, 11, 9, 8, torch.float64, "cpu", seed=count)
    active = torch.randperm(8, generator=gen)[:count]
    y, t = formulas.forward(x, weight, lora_a, lora_b, active, 0.75, bias, products=formulas.TORCH)
    dx, da, db = formulas.backward(
        dy, x, t, lambda: weight.T, lora_a, lora_b, active, 0.75, [True, True, True], trainable, products=formulas.TORCH
    )

    leaves = [v.clone().requires_grad_() for v in (x, lora_a, lora_b)]
    trained = active[:trainable]
    y_ref = plora_linear_reference(*leaves[:1], weight, *leaves[1:], trained, 0.75, bias)
    frozen = active[trained.numel() :]
    if frozen.numel():  # modules after the first `trainable` enter the output but get no gradient
        y_ref = y_ref + plora_linear_reference(leaves[0], weight * 0, lora_a, lora_b, frozen, 0.75)
    y_ref.backward(dy)
    torch.testing.assert_close(y, y_ref, rtol=1e-12, atol=1e-12)
    for grad, leaf in zip((dx, da, db), leaves):
        torch.testing.assert_close(grad, leaf.grad, rtol=1e-12, atol=1e-12)


def test_backward_returns_only_what_is_asked():
    x, weight, lora_a, lora_b, _, dy, _ = _operands(6, 5, 4, 3, torch.float64, "cpu", seed=1)
    active = torch.tensor([2, 0])
    _, t = formulas.forward(x, weight, lora_a, lora_b, active, 1.0, None, products=formulas.TORCH)
    calls = []
    weight_t = lambda: calls.append(1) or weight.T
    (db,) = formulas.backward(dy, x, t, weight_t, lora_a, lora_b, active, 1.0, [False, False, True], products=formulas.TORCH)
    assert db.shape == lora_b.shape and not calls  # W0ᵀ is not even read without dx


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_triton_products_match_their_torch_references(dtype, device):
    x, weight, lora_a, lora_b, bias, dy, gen = _operands(37, 40, 24, 6, dtype, device, seed=3)
    active = torch.randperm(6, generator=gen)[:4].to(device)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    triton, torch_ = formulas.TRITON, formulas.TORCH
    for g, rows_dim, inp in ((lora_a, 0, x), (lora_b, 1, dy)):
        t = triton.shrink(inp, g, rows_dim, active, 16, 0.5)
        assert t.shape == (inp.shape[0], 16) and t.dtype == torch.float32 and not t[:, 4:].any()
        assert rel_error(t[:, :4], torch_.shrink(inp.double(), g.double(), rows_dim, active, 16, 0.5)) < tol
    t = triton.shrink(x, lora_a, 0, active, 16, 1.0)
    for w, g, rows_dim, inp, b in ((weight, lora_b, 1, x, bias), (weight.T, lora_a, 0, dy, None)):
        y = triton.gemm_with_slab(inp, w, t, g, rows_dim, active, 0.5, b)
        ref = torch_.gemm_with_slab(
            inp.double(), w.double(), t.double(), g.double(), rows_dim, active, 0.5, None if b is None else b.double()
        )
        assert y.dtype == dtype and rel_error(y, ref) < tol
    for inp in (x, dy):
        assert rel_error(triton.reduce_over_m(inp, t), torch_.reduce_over_m(inp.double(), t.double())) < tol


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("m, n", [(37, 24), (300, 150)])  # one tile; 5 row blocks x 3 tiles over 3 programs
def test_fused_gemm_matches_its_torch_reference(m, n, dtype, device):
    """``gemm_lowrank`` (a run of tiles per program, U recomputed where a run or a row block starts, the dB partial
    sums accumulated per program) against its plain-torch reference, forward-like and backward-like."""
    x, weight, lora_a, lora_b, bias, dy, gen = _operands(m, 40, n, 6, dtype, device, seed=4)
    active = torch.randperm(6, generator=gen)[:4].to(device)
    t = torch.randn(m, 16, generator=gen).to(device)
    t[:, 4:] = 0  # padded columns, as the forward writes them
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    b_rows = formulas.modules_as_rows(lora_b)
    cases = (
        (x, weight, lora_a, lora_b.T, 1.0, 0.5, bias, None),  # forward: y and t from x
        (dy, weight.T, b_rows, lora_a, 0.5, 1.0, None, t),  # backward: dx, dt and dB's partial sums from dy
    )
    for inp, w, h, g, u_scale, slab_scale, b, with_t in cases:
        y, u, partials = formulas.TRITON.gemm_lowrank(inp, w, h, 0, g, 0, active, 16, u_scale, slab_scale, b, with_t)
        y_ref, u_ref, partials_ref = formulas.TORCH.gemm_lowrank(
            inp.double(), w.double(), h.double(), 0, g.double(), 0, active, 16, u_scale, slab_scale,
            None if b is None else b.double(), None if with_t is None else with_t[:, :4].double(),
        )  # fmt: skip
        assert y.dtype == dtype and rel_error(y, y_ref) < tol
        assert u.dtype == torch.float32 and not u[:, 4:].any() and rel_error(u[:, :4], u_ref) < tol
        if with_t is None:
            assert partials is None
        else:
            assert rel_error(partials.sum(0)[:, :4], partials_ref[0]) < tol
