"""Kernel demo: the fused PLoRA op checked against its float64 reference and timed against the unfused path.

    python -m bench.demo

On a CUDA GPU it runs natively in bf16 at a realistic shape; on a CPU through the Triton
interpreter at a small shape (the timings there only show that the path runs).
"""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # must precede the kernels' import

from bench.common import environment, median_ms, on_gpu
from fed_plora.kernels import plora_linear, plora_linear_reference


def main() -> None:
    device = torch.device("cuda" if on_gpu() else "cpu")
    dtype = torch.bfloat16 if on_gpu() else torch.float32
    m, k, n, rank = (4096, 4096, 4096, 64) if on_gpu() else (256, 512, 384, 16)
    env = environment()
    print(f"device: {env['device']}  torch {env['torch']}  triton {env['triton']}  interpreter: {env['triton_interpret']}")
    print(f"shape: M={m} K={k} N={n} R={rank}  dtype: {dtype}")

    gen = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(m, k, device=device, generator=gen).to(dtype)
    weight = (torch.randn(n, k, device=device, generator=gen) * k**-0.5).to(dtype)
    lora_a = (torch.randn(rank, k, device=device, generator=gen) * k**-0.5).to(dtype)
    lora_b = (torch.randn(n, rank, device=device, generator=gen) * 0.1).to(dtype)
    dy = torch.randn(m, n, device=device, generator=gen).to(dtype)
    scale = 2.0

    print("\ncorrectness against the float64 reference (relative Frobenius error):")
    for count in (0, rank // 4, rank):
        active = torch.randperm(rank, device=device, generator=gen)[:count]
        leaves = [t.clone().requires_grad_() for t in (x, lora_a, lora_b)]
        y = plora_linear(leaves[0], weight, leaves[1], leaves[2], active, scale)
        grads = torch.autograd.grad(y, leaves, dy)
        ref_leaves = [t.double().requires_grad_() for t in (x, lora_a, lora_b)]
        y_ref = plora_linear_reference(ref_leaves[0], weight.double(), ref_leaves[1], ref_leaves[2], active, scale)
        ref_grads = torch.autograd.grad(y_ref, ref_leaves, dy.double())
        errors = [_rel(y, y_ref)] + [_rel(g, r) for g, r in zip(grads, ref_grads)]
        print(f"  active {count:3d}: y {errors[0]:.1e}  dx {errors[1]:.1e}  dA {errors[2]:.1e}  dB {errors[3]:.1e}")

    active = torch.randperm(rank, device=device, generator=gen)[: rank // 4]
    a_act, b_act = lora_a[active].contiguous(), lora_b[:, active].contiguous()
    times = {
        "bare x @ W.T": median_ms(lambda: x @ weight.T),
        "unfused LoRA (PEFT-style)": median_ms(lambda: x @ weight.T + (x @ a_act.T) @ b_act.T * scale),
        "fused plora_linear": median_ms(lambda: plora_linear(x, weight, lora_a, lora_b, active, scale)),
    }
    print(f"\nforward time, {rank // 4} of {rank} modules active (median ms):")
    for name, value in times.items():
        print(f"  {name:28s} {value:9.3f}  ({value / times['bare x @ W.T']:.2f}x bare)")
    if not on_gpu():
        print("  (Triton interpreter on CPU: these times show that the path runs, not how fast it is on a GPU)")


def _rel(value: torch.Tensor, reference: torch.Tensor) -> float:
    denom = reference.norm()
    return 0.0 if denom == 0 and value.abs().max() == 0 else ((value.double() - reference).norm() / denom).item()


if __name__ == "__main__":
    main()
