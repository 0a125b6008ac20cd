"""pytest-benchmark suite of the fused PLoRA linear op against cuBLAS, PEFT-style unfused LoRA and an
Unsloth-style path (the op's formulas with cuBLAS products, the low-rank term added in place by ``addmm_``).

Run through ``python -m bench.plora_linear`` (which prints the ratio table and writes the JSON), or
directly: ``python -m pytest bench/bench_plora_linear.py --benchmark-json=out.json``.

Every timed call ends with a CUDA synchronisation; each case also records the median of CUDA-event
timings (``triton.testing.do_bench``) and the peak memory of its region in ``extra_info``.
"""

from __future__ import annotations

import os

if not __import__("torch").cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # must precede the kernels' import

import pytest
import torch

from bench.common import median_ms, on_gpu, peak_memory_bytes, synced
from fed_plora.kernels import plora_linear
from fed_plora.kernels.plora_linear import formulas

RANK = 64
SCALE = 2.0

if on_gpu():
    DTYPE = torch.bfloat16
    SHAPES = [(m, k, n) for m in (2048, 8192, 16384) for k, n in ((4096, 4096), (4096, 11008), (11008, 4096))]
    COUNTS = (8, 16, 32, 64)
    ROUNDS, WARMUP = 20, 5
else:  # smoke configuration through the Triton interpreter
    DTYPE = torch.float32
    SHAPES = [(128, 256, 192)]
    COUNTS = (4, 64)
    ROUNDS, WARMUP = 3, 1

# (variant, needs an active count): references are independent of the active set.
VARIANTS = [
    ("cublas_fwd", False),  # x @ Wᵀ
    ("cublas_dgrad", False),  # dy @ W
    ("fused_fwd", True),
    ("fused_bwd", True),
    ("fused_fwdbwd", True),
    ("unfused_fwd", True),  # PEFT-style: base matmul, x @ Aᵀ, @ Bᵀ, scale, add
    ("unfused_bwd", True),
    ("unfused_fwdbwd", True),
    ("unsloth_fwdbwd", True),  # formulas.TORCH: cuBLAS products, slab by addmm_, x and t saved
]

CASES = [
    (m, k, n, count if needs_count else None, variant)
    for m, k, n in SHAPES
    for variant, needs_count in VARIANTS
    for count in (COUNTS if needs_count else (None,))
]


def _case_id(case) -> str:
    m, k, n, count, variant = case
    return f"{variant}-M{m}-K{k}-N{n}" + (f"-r{count}" if count else "")


def make_inputs(m: int, k: int, n: int, count: int | None, device: torch.device) -> dict:
    """Fresh random operands (never zeros); ``B`` random too, so the adapter term is real work."""
    gen = torch.Generator(device=device).manual_seed(m + k + n + (count or 0))

    def rand(*shape, std=1.0):
        return torch.randn(*shape, generator=gen, device=device, dtype=torch.float32).mul_(std).to(DTYPE)

    lora_a = rand(RANK, k, std=k**-0.5)
    lora_b = rand(n, RANK, std=0.1)
    active = torch.randperm(RANK, generator=gen, device=device)[: count or 1]
    return {
        "x": rand(m, k),
        "weight": rand(n, k, std=k**-0.5),
        "dy": rand(m, n),
        "lora_a": lora_a,
        "lora_b": lora_b,
        "active": active,
        "a_act": lora_a[active].contiguous(),
        "b_act": lora_b[:, active].contiguous(),
        "all_act": torch.arange(active.numel(), device=device),  # every module of a_act / b_act
    }


def fused(inp, x, a, b):
    return plora_linear(x, inp["weight"], a, b, inp["active"], SCALE)


def unfused(inp, x, a, b):
    """PEFT's LoRA forward with rank = the active count: five torch launches."""
    return x @ inp["weight"].T + (x @ a.T) @ b.T * SCALE


class _UnslothStyle(torch.autograd.Function):
    """LoRA as Unsloth computes it: ``formulas.forward`` / ``formulas.backward`` with cuBLAS products
    (``formulas.TORCH``), the low-rank term added in place to the base GEMM's output, ``x`` and ``t`` saved."""

    @staticmethod
    def forward(ctx, x, weight, a, b, active, scale):
        y, t = formulas.forward(x, weight, a, b, active, scale, None, products=formulas.TORCH)
        ctx.save_for_backward(x, t, weight, a, b, active)
        ctx.scale = scale
        return y

    @staticmethod
    def backward(ctx, dy):
        x, t, weight, a, b, active = ctx.saved_tensors
        needs = [ctx.needs_input_grad[i] for i in (0, 2, 3)]
        grads = iter(formulas.backward(dy, x, t, lambda: weight.T, a, b, active, ctx.scale, needs, products=formulas.TORCH))
        dx, da, db = (next(grads) if need else None for need in needs)
        return dx, None, da, db, None, None


def unsloth(inp, x, a, b):
    """Unsloth-style LoRA with rank = the active count (``a``, ``b``: the active modules only)."""
    return _UnslothStyle.apply(x, inp["weight"], a, b, inp["all_act"], SCALE)


OPS = {"fused": fused, "unfused": unfused, "unsloth": unsloth}


def build_call(variant: str, inp: dict):
    """The function to time for ``variant`` (a backward variant runs its forward once, untimed)."""
    if variant == "cublas_fwd":
        return lambda: inp["x"] @ inp["weight"].T
    if variant == "cublas_dgrad":
        return lambda: inp["dy"] @ inp["weight"]
    kind, phase = variant.split("_")
    op = OPS[kind]
    a, b = (inp["lora_a"], inp["lora_b"]) if kind == "fused" else (inp["a_act"], inp["b_act"])
    leaves = [t.detach().requires_grad_() for t in (inp["x"], a, b)]
    if phase == "fwd":
        with_grad = [t.detach() for t in leaves]
        return lambda: op(inp, *with_grad)
    if phase == "bwd":
        y = op(inp, *leaves)
        return lambda: torch.autograd.grad(y, leaves, inp["dy"], retain_graph=True)
    return lambda: torch.autograd.grad(op(inp, *leaves), leaves, inp["dy"])


def check_fused_against_unfused(inp: dict) -> float:
    """Relative error of the fused forward against the unfused computation in float64, in this run."""
    y = fused(inp, inp["x"], inp["lora_a"], inp["lora_b"]).float()
    x, w, a, b = (inp[name].double() for name in ("x", "weight", "a_act", "b_act"))
    ref = x @ w.T + (x @ a.T) @ b.T * SCALE
    return ((y.double() - ref).norm() / ref.norm()).item()


@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_plora_linear(benchmark, case):
    m, k, n, count, variant = case
    device = torch.device("cuda" if on_gpu() else "cpu")
    inp = make_inputs(m, k, n, count, device)
    call = build_call(variant, inp)
    info = {"M": m, "K": k, "N": n, "R": RANK, "active": count, "variant": variant, "dtype": str(DTYPE)}
    if variant.startswith("fused"):
        info["rel_error_vs_unfused"] = check_fused_against_unfused(inp)
        assert info["rel_error_vs_unfused"] < (2e-2 if torch.bfloat16 == DTYPE else 1e-4)
    info["median_ms_events"] = median_ms(call) if on_gpu() else None
    info["peak_bytes"] = peak_memory_bytes(call)
    benchmark.extra_info.update(info)
    benchmark.pedantic(synced(call), rounds=ROUNDS, warmup_rounds=WARMUP, iterations=1)
