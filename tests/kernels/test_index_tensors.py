"""Index tensors (``active``, the folds' ``indices``): any strides, validated as they really are, and a
broken promise cannot make a kernel read or write out of bounds.

A non-contiguous view means exactly the values it shows: every op gives bit-identical results with a
strided view and with its contiguous copy, although the slots the view skips hold out-of-range values
and repeats (what a kernel reading the view as contiguous would use). A CPU index tensor changed through
``.numpy()`` (which bumps no version counter) after a successful call is rejected on the next call. A
CUDA one is validated once per version (no sync per call); changed behind its version counter, the
kernels skip an index outside ``[0, R)``.
"""

from __future__ import annotations

import importlib

import pytest
import torch

bnb = pytest.importorskip("bitsandbytes")

from fed_plora.kernels import fold_, fold_nf4_, plora_linear, plora_linear_nf4, quantize_nf4, unfold_, unfold_nf4_  # noqa: E402
from fed_plora.kernels.fold._triton import fold_launch  # noqa: E402
from fed_plora.kernels.plora_linear import formulas  # noqa: E402

nf4_triton = importlib.import_module("fed_plora.kernels.nf4._triton")
nf4_op = importlib.import_module("fed_plora.kernels.plora_linear_nf4.op")

R = 8  # modules; the views below show the set [3, 0, 5] (or [4])


def _views(device) -> dict[str, tuple[torch.Tensor, list[int]]]:
    """name -> (an index view, the values it shows)."""
    t = lambda values, dtype=torch.int64: torch.tensor(values, device=device, dtype=dtype)
    return {
        "every_other": (t([3, 99, 0, -7, 5, 8])[::2], [3, 0, 5]),
        "column": (t([[3, 3], [0, -1], [5, 9]], torch.int32)[:, 0], [3, 0, 5]),
        "transposed_row": (t([[3, 3, 3], [0, 0, 0], [5, 5, 5]]).T[1], [3, 0, 5]),
        "diagonal": (t([[3, 200, 200], [200, 0, 255], [3, 3, 5]], torch.uint8).diagonal(), [3, 0, 5]),
        "offset": (t([99, 3, 0, 5])[1:], [3, 0, 5]),  # contiguous, but not at the start of its storage
        "expanded": (t(4).expand(1), [4]),  # stride 0
    }


VIEWS = list(_views("cpu"))


def _view(device, name):
    view, values = _views(device)[name]
    assert view.tolist() == values
    contiguous = torch.tensor(values, device=device, dtype=view.dtype)
    return view, contiguous


def _adapters(device, m=4, k=64, n=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=g).to(device)
    weight = (torch.randn(n, k, generator=g) * 0.1).to(device)
    lora_a = (torch.randn(R, k, generator=g) / k**0.5).to(device)
    lora_b = (torch.randn(n, R, generator=g) * 0.5).to(device)
    return x, weight, lora_a, lora_b


def test_non_contiguous_views_really_are_non_contiguous():
    for name, (view, _) in _views("cpu").items():
        assert view.is_contiguous() == (name in ("offset", "expanded")), name


@pytest.mark.parametrize("name", VIEWS)
def test_plora_linear_with_a_strided_active_equals_its_contiguous_copy(device, name):
    x, weight, lora_a, lora_b = _adapters(device)

    def run(active):
        leaves = [t.clone().requires_grad_() for t in (x, lora_a, lora_b)]
        y = plora_linear(leaves[0], weight, leaves[1], leaves[2], active, 0.5)
        y.backward(torch.linspace(-1, 1, y.numel(), device=device).view_as(y))
        return [y.detach()] + [leaf.grad for leaf in leaves]

    view, contiguous = _view(device, name)
    for ours, expected in zip(run(view), run(contiguous)):
        assert torch.equal(ours, expected)


@pytest.mark.parametrize("name", ["every_other", "column"])
@pytest.mark.parametrize("dequant", ["fused", "temporary"])
def test_plora_linear_nf4_with_a_strided_active_equals_its_contiguous_copy(device, name, dequant):
    x, weight, lora_a, lora_b = _adapters(device)
    nf4 = quantize_nf4(weight)

    def run(active):
        leaves = [t.clone().requires_grad_() for t in (x, lora_a, lora_b)]
        y = plora_linear_nf4(leaves[0], nf4, leaves[1], leaves[2], active, 0.5, dequant=dequant, trainable=2)
        y.backward(torch.linspace(-1, 1, y.numel(), device=device).view_as(y))
        return [y.detach()] + [leaf.grad for leaf in leaves]

    view, contiguous = _view(device, name)
    for ours, expected in zip(run(view), run(contiguous)):
        assert torch.equal(ours, expected)


@pytest.mark.parametrize("name", VIEWS)
@pytest.mark.parametrize("fold", [fold_, unfold_])
def test_fold_with_strided_indices_equals_its_contiguous_copy(device, name, fold):
    _, weight, lora_a, lora_b = _adapters(device, n=24, k=40)
    view, contiguous = _view(device, name)
    ours, expected = weight.clone(), weight.clone()
    fold(ours, lora_a, lora_b, view, 0.75)
    fold(expected, lora_a, lora_b, contiguous, 0.75)
    assert torch.equal(ours, expected) and not torch.equal(ours, weight)


@pytest.mark.parametrize("name", ["every_other", "diagonal"])
@pytest.mark.parametrize("k", [64, 48])  # the fused kernel (rows of whole blocks) and the dense temporary
@pytest.mark.parametrize("fold", [fold_nf4_, unfold_nf4_])
def test_fold_nf4_with_strided_indices_equals_its_contiguous_copy(device, name, k, fold):
    _, weight, lora_a, lora_b = _adapters(device, n=8, k=k)
    view, contiguous = _view(device, name)
    ours, expected = quantize_nf4(weight), quantize_nf4(weight)
    fold(ours, lora_a, lora_b * 40, view, 1.0)
    fold(expected, lora_a, lora_b * 40, contiguous, 1.0)
    assert torch.equal(ours.packed, expected.packed) and torch.equal(ours.absmax, expected.absmax)
    assert not torch.equal(ours.packed, quantize_nf4(weight).packed)


def test_expanded_view_with_repeats_is_rejected(device):
    x, weight, lora_a, lora_b = _adapters(device)
    with pytest.raises(ValueError, match=r"active must not repeat a module index, got \[3, 3\]"):
        plora_linear(x, weight, lora_a, lora_b, torch.tensor(3, device=device).expand(2), 0.5)


def test_compiled_op_with_a_strided_active_equals_its_contiguous_copy(device):
    torch._dynamo.reset()
    x, weight, lora_a, lora_b = _adapters(device)
    storage = torch.tensor([3, 99, 0, -7, 5, 8], device=device)

    def step(active_of):
        def fn(x, lora_a, lora_b, storage):
            return plora_linear(x, weight, lora_a, lora_b, active_of(storage), 0.5)

        return fn

    def run(fn, compiled):
        leaves = [t.clone().requires_grad_() for t in (x, lora_a, lora_b)]
        fn = torch.compile(fn, backend="aot_eager", fullgraph=True) if compiled else fn
        y = fn(*leaves, storage)
        y.backward(torch.linspace(-1, 1, y.numel(), device=device).view_as(y))
        return [y.detach()] + [leaf.grad for leaf in leaves]

    try:
        expected = run(step(lambda s: torch.tensor([3, 0, 5], device=device)), compiled=False)
        for active_of in (lambda s: s[::2], lambda s: s.view(3, 2)[:, 0]):  # a view made inside the graph
            for ours, reference in zip(run(step(active_of), compiled=True), expected):
                assert torch.equal(ours, reference)
        # ... and one passed into it
        compiled = torch.compile(plora_linear, backend="aot_eager", fullgraph=True)
        y = compiled(x, weight, lora_a, lora_b, storage[::2], 0.5)
        assert torch.equal(y, expected[0])
    finally:
        torch._dynamo.reset()


# ------------------------------------------------------------------ changes that bump no version counter


def _change_behind_version_counter(indices: torch.Tensor, position: int, value: int) -> None:
    version = indices._version
    indices.numpy()[position] = value
    assert indices._version == version  # invisible to a version-counter cache


def test_cpu_active_changed_through_numpy_is_rejected():
    x, weight, lora_a, lora_b = _adapters("cpu")
    nf4 = quantize_nf4(weight)
    for call in (
        lambda active: plora_linear(x, weight, lora_a, lora_b, active, 0.5),
        lambda active: plora_linear_nf4(x, nf4, lora_a, lora_b, active, 0.5),
    ):
        active = torch.tensor([3, 0])
        call(active)
        _change_behind_version_counter(active, 1, R)
        with pytest.raises(ValueError, match=rf"active must hold module indices in \[0, {R}\), got values from 3 to {R}"):
            call(active)


def test_cpu_active_changed_through_numpy_between_forward_and_backward_is_rejected():
    x, weight, lora_a, lora_b = _adapters("cpu")
    lora_a.requires_grad_()
    active = torch.tensor([3, 0])
    y = plora_linear(x, weight, lora_a, lora_b, active, 0.5)
    _change_behind_version_counter(active, 0, -1)
    with pytest.raises(ValueError, match=r"active must hold module indices in \[0, 8\), got values from -1 to 0"):
        y.sum().backward()


def test_cpu_indices_changed_through_numpy_are_rejected_before_a_fold_writes():
    _, weight, lora_a, lora_b = _adapters("cpu")
    for fold in (fold_, unfold_):
        indices = torch.tensor([1, 2])
        fold(weight, lora_a, lora_b, indices, 1.0)
        before = weight.clone()
        _change_behind_version_counter(indices, 0, 2)
        with pytest.raises(ValueError, match=r"indices must not repeat a module index, got \[2, 2\]"):
            fold(weight, lora_a, lora_b, indices, 1.0)
        assert torch.equal(weight, before)
    nf4 = quantize_nf4(weight)
    for fold in (fold_nf4_, unfold_nf4_):
        indices = torch.tensor([1, 2])
        fold(nf4, lora_a, lora_b, indices, 1.0)
        packed, absmax = nf4.packed.clone(), nf4.absmax.clone()
        _change_behind_version_counter(indices, 1, 100)
        with pytest.raises(ValueError, match=r"indices must hold module indices in \[0, 8\)"):
            fold(nf4, lora_a, lora_b, indices, 1.0)
        assert torch.equal(nf4.packed, packed) and torch.equal(nf4.absmax, absmax)


@pytest.mark.gpu
def test_strided_cuda_active_costs_no_host_sync_after_its_first_use():
    x, weight, lora_a, lora_b = _adapters("cuda")
    lora_a.requires_grad_()
    view, contiguous = _view("cuda", "every_other")
    expected = plora_linear(x, weight, lora_a, lora_b, contiguous, 0.5)
    plora_linear(x, weight, lora_a, lora_b, view, 0.5).sum().backward()  # validates the view once
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(3):
            y = plora_linear(x, weight, lora_a, lora_b, view, 0.5)
            y.sum().backward()
            fold_(weight, lora_a.detach(), lora_b, view, 0.0)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.equal(y, expected)


@pytest.mark.gpu
def test_cuda_active_changed_behind_its_version_counter_reads_nothing_out_of_bounds():
    """The caller's duty, broken: a validated CUDA tensor changed through ``.data`` is not checked again
    (a check would cost a sync per call), but the kernels skip the bad index instead of reading past R."""
    x, weight, lora_a, lora_b = _adapters("cuda")
    active = torch.tensor([3, 0], device="cuda")
    plora_linear(x, weight, lora_a, lora_b, active, 0.5)
    active.data[1] = 1 << 40
    y = plora_linear(x, weight, lora_a, lora_b, active, 0.5)
    expected = plora_linear(x, weight, lora_a, lora_b, torch.tensor([3], device="cuda"), 0.5)
    assert torch.equal(y, expected)


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
    y = nf4_op._triton.gemm_nf4_with_slab(x, nf4, t, lora_b, 1, bad, 0.5, None)
    assert torch.equal(y, nf4_op._triton.gemm_nf4_with_slab(x, nf4, t, b_ref, 1, fixed, 0.5, None))
    # The folds.
    ours, expected = weight.clone(), weight.clone()
    fold_launch(ours, lora_a, lora_b, bad, 16, 1.0)
    fold_launch(expected, a_ref, b_ref, fixed, 16, 1.0)
    assert torch.equal(ours, expected)
    ours, expected = quantize_nf4(weight), quantize_nf4(weight)
    nf4_triton.fold(ours, lora_a, lora_b * 40, bad, 16, 1.0, ours.absmax)
    nf4_triton.fold(expected, a_ref, b_ref * 40, fixed, 16, 1.0, expected.absmax)
    assert torch.equal(ours.packed, expected.packed) and torch.equal(ours.absmax, expected.absmax)
