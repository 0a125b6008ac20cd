"""Host overhead per call of the fused ops: the eager path (an ``autograd.Function``, or its forward body)
against the same op dispatched as its ``torch.library`` custom op (what ``torch.compile`` graphs call).

    python -m bench.op_dispatch            # writes bench/results/op_dispatch-<device>.json
    python -m bench.op_dispatch --rounds 100

Only host time is measured, never kernel time: every Triton launch (shrink, fused GEMM, reduction, NF4
GEMM, NF4 dequantisation) is replaced by a stand-in that allocates its output and launches nothing. What
remains is what a real call also does on the host: argument checks, reshapes, autograd bookkeeping, the
small torch ops of the backward (zeroed gradients and index copies, computed here on the CPU, launched on
a GPU) and, on the custom-op path, the dispatcher's Python machinery. Both paths run the same public
function (``plora_linear``, ``plora_linear_nf4``); for the custom-op path its ``autograd.Function`` and its
forward body (which the eager path runs alone when autograd records nothing, as in the no-grad forward
here) are swapped for the custom op.

Calls of the two paths are interleaved (batches of ``--calls`` calls, alternating order); the per-call
median over ``--rounds`` batches is reported with its quartiles, in wall-clock time and in CPU time of the
calling thread (a cross-check on a shared machine: CPU time leaves out time the scheduler gives to other
processes, though not a hypervisor's steal time). Before the stand-ins go in, the two paths are checked to
give bit-identical values and gradients with the real kernels.
"""

from __future__ import annotations

import argparse
import gc
import importlib
import os
import statistics
import sys
import time
from contextlib import ExitStack
from types import SimpleNamespace
from unittest import mock

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # must precede the kernels' import: the Triton path runs

import bitsandbytes.functional as bnb_functional

from bench.common import bench_device, format_table, on_gpu, write_result
from fed_plora.kernels import plora_linear, plora_linear_nf4
from fed_plora.kernels.nf4 import quantize_nf4_reference

float_op = importlib.import_module("fed_plora.kernels.plora_linear.op")
nf4_op = importlib.import_module("fed_plora.kernels.plora_linear_nf4.op")
formulas = importlib.import_module("fed_plora.kernels.plora_linear.formulas")

M, K, N, R, ACTIVE = 16, 1024, 1024, 16, 8  # a small model's layer at decode-like token counts
DTYPE = torch.bfloat16
SCALE = 2.0


def stand_ins() -> ExitStack:
    """Patch every Triton launch of both ops with an allocation of its output (no launch, no math)."""

    def shrink(x, g, g_rows_dim, active, bucket, scale):
        return torch.empty((x.shape[0], bucket), device=x.device, dtype=torch.float32)

    def gemm_with_slab(x, w, t, g, g_rows_dim, active, slab_scale, bias):
        return torch.empty((x.shape[0], w.shape[0]), device=x.device, dtype=x.dtype)

    def reduce_over_m(x, t):
        return torch.empty((x.shape[1], t.shape[1]), device=x.device, dtype=torch.float32)

    def gemm_lowrank(x, w, h, h_rows_dim, g, g_rows_dim, active, bucket, u_scale, slab_scale, bias, t=None):
        m, l_len = x.shape
        partials = None if t is None else torch.empty((1, l_len, bucket), device=x.device, dtype=torch.float32)
        u = torch.empty((m, bucket), device=x.device, dtype=torch.float32)
        return torch.empty((m, w.shape[0]), device=x.device, dtype=x.dtype), u, partials

    def gemm_nf4_with_slab(x, nf4, t, g, g_rows_dim, active, slab_scale, bias):
        return torch.empty((x.shape[0], nf4.shape[0]), device=x.device, dtype=x.dtype)

    def dequantize_nf4(nf4):
        return torch.empty(tuple(nf4.shape), device=nf4.packed.device, dtype=nf4.dtype)

    stack = ExitStack()
    for module, name, stand_in in [
        (formulas, "TRITON", formulas.Products(shrink, gemm_with_slab, reduce_over_m, gemm_lowrank)),
        (nf4_op._triton, "gemm_nf4_with_slab", gemm_nf4_with_slab),
        (nf4_op, "dequantize_nf4", dequantize_nf4),
    ]:
        stack.enter_context(mock.patch.object(module, name, stand_in))
    return stack


def custom_op_path(op: str) -> ExitStack:
    """While open, the public ``op`` ("float" or "nf4") dispatches its custom op where it would run its
    ``autograd.Function`` (autograd records the call) or its forward body (it does not)."""
    module, function, body, custom = (
        (float_op, "_LinearFunction", "_linear_forward", float_op._linear)
        if op == "float"
        else (nf4_op, "_LinearNF4Function", "_linear_nf4_forward", nf4_op._linear_nf4)
    )
    stack = ExitStack()
    stack.enter_context(mock.patch.object(module, function, SimpleNamespace(apply=custom)))
    stack.enter_context(mock.patch.object(module, body, custom))
    return stack


def make_call(op: str, mode: str, device: torch.device, m=M, k=K, n=N):
    """A no-argument call of the public op: ``mode`` "fwd" (no grad) or "fwd+bwd"; fresh random operands.

    Returns the call and, for checks, a function giving ``[y, dx, dA, dB]`` of one forward and backward."""
    gen = torch.Generator(device=device).manual_seed(0)

    def rand(*shape, std=1.0):
        return torch.randn(*shape, generator=gen, device=device).mul_(std).to(DTYPE)

    x, weight, lora_a, lora_b, dy = rand(m, k), rand(n, k, std=k**-0.5), rand(R, k, std=k**-0.5), rand(n, R, std=0.1), rand(m, n)
    active = torch.randperm(R, generator=gen, device=device)[:ACTIVE]
    leaves = [t.requires_grad_(mode == "fwd+bwd") for t in (x, lora_a, lora_b)]
    if op == "float":
        forward = lambda: plora_linear(x, weight, lora_a, lora_b, active, SCALE)
    else:
        nf4 = quantize_nf4_reference(weight, 64, bnb_functional.create_dynamic_map().to(device))  # QLoRA's nested absmax
        forward = lambda: plora_linear_nf4(x, nf4, lora_a, lora_b, active, SCALE)

    def call():
        if mode == "fwd":
            with torch.no_grad():
                forward()
            return
        for leaf in leaves:
            leaf.grad = None
        forward().backward(dy)

    def values():
        call()
        with torch.no_grad():
            y = forward()
        return [y] + [leaf.grad for leaf in leaves]

    return call, values


def check_bit_identical(device: torch.device) -> dict:
    """Real kernels, small shape: the eager path and the custom op give the same bits (y, dx, dA, dB)."""
    result = {}
    for op in ("float", "nf4"):
        _, values = make_call(op, "fwd+bwd", device, m=4, k=128, n=64)
        eager = values()
        with custom_op_path(op):
            custom = values()
        result[op] = all(torch.equal(a, b) for a, b in zip(eager, custom))
    return result


def time_per_call_us(calls: dict, rounds: int, batch: int) -> dict[str, dict[str, list[float]]]:
    """Per-call µs of each entry of ``calls`` (name -> (call, context factory)), interleaved batch by batch:
    wall clock, and CPU time of this thread."""
    names = list(calls)
    for name in names:  # warm-up: caches, allocator, first-call paths
        call, context = calls[name]
        with context():
            for _ in range(batch):
                call()
    samples = {name: {"wall": [], "cpu": []} for name in names}
    gc.collect()
    gc.disable()
    try:
        for r in range(rounds):
            for name in names if r % 2 == 0 else reversed(names):
                call, context = calls[name]
                with context():
                    wall, cpu = time.perf_counter(), time.thread_time()
                    for _ in range(batch):
                        call()
                    samples[name]["cpu"].append((time.thread_time() - cpu) / batch * 1e6)
                    samples[name]["wall"].append((time.perf_counter() - wall) / batch * 1e6)
    finally:
        gc.enable()
    return samples


def summary(samples: dict[str, list[float]]) -> dict:
    """Medians and quartiles (µs) of wall-clock and CPU-time samples."""
    result = {}
    for clock, values in samples.items():
        q1, median, q3 = statistics.quantiles(values, n=4)
        result[clock] = {"median_us": median, "quartiles_us": [q1, q3]}
    return result


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=500, help="timed batches per case and path")
    parser.add_argument("--calls", type=int, default=20, help="calls per timed batch")
    args = parser.parse_args(argv)
    device = bench_device()

    bit_identical = check_bit_identical(device)
    print(f"bit-identical values and gradients, eager vs custom op (real kernels, M=4 K=128 N=64): {bit_identical}")

    rows = []
    with stand_ins():
        for op in ("float", "nf4"):
            for mode in ("fwd", "fwd+bwd"):
                call, _ = make_call(op, mode, device)
                samples = time_per_call_us(
                    {"eager": (call, ExitStack), "custom_op": (call, lambda: custom_op_path(op))}, args.rounds, args.calls
                )
                eager, custom = summary(samples["eager"]), summary(samples["custom_op"])
                rows.append({
                    "op": "plora_linear" if op == "float" else "plora_linear_nf4",
                    "pass": "forward (no grad)" if mode == "fwd" else "forward+backward",
                    "eager_us": eager["wall"]["median_us"],
                    "custom_op_us": custom["wall"]["median_us"],
                    "eager/custom_op": eager["wall"]["median_us"] / custom["wall"]["median_us"],
                    "saved_us": custom["wall"]["median_us"] - eager["wall"]["median_us"],
                    "eager_cpu_us": eager["cpu"]["median_us"],
                    "custom_op_cpu_us": custom["cpu"]["median_us"],
                    "cpu eager/custom_op": eager["cpu"]["median_us"] / custom["cpu"]["median_us"],
                    "saved_cpu_us": custom["cpu"]["median_us"] - eager["cpu"]["median_us"],
                    "eager": eager,
                    "custom_op": custom,
                })  # fmt: skip

    note = (
        "HOST OVERHEAD ONLY, not kernel time: Triton launches replaced by stand-ins that allocate their outputs; "
        + (
            "CUDA device, host clock, no synchronisation"
            if on_gpu()
            else "on CPU without a GPU (Triton interpreter path, nothing interpreted)"
        )
        + f"; per-call medians of {args.rounds} interleaved batches of {args.calls} calls, wall clock (*_us) and CPU time of "
        "the calling thread (*_cpu_us); reference: the custom-op path"
    )
    print()
    columns = [
        "op",
        "pass",
        "eager_us",
        "custom_op_us",
        "eager/custom_op",
        "saved_us",
        "eager_cpu_us",
        "custom_op_cpu_us",
        "saved_cpu_us",
    ]
    print(format_table(rows, columns))
    print(f"\n({note}.)")
    payload = {
        "what": note,
        "shapes": {"M": M, "K": K, "N": N, "R": R, "active": ACTIVE, "bias": False},
        "dtype": str(DTYPE).removeprefix("torch."),
        "nf4": {"blocksize": 64, "nested_absmax": True, "dequant": "auto (fused at this M)"},
        "torch_threads": torch.get_num_threads(),
        "rounds": args.rounds,
        "calls_per_round": args.calls,
        "bit_identical_eager_vs_custom_op": bit_identical,
        "rows": rows,
    }
    path = write_result("op_dispatch", payload)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
