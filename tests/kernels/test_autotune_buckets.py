"""Autotuning keys on the bucket of the token count M, not on M: a stream of batch lengths within one bucket
costs one tuning run per shape.

The interpreter cannot benchmark (one config per kernel there, so Triton computes no key at all), so each
autotuned kernel is wrapped in a GPU-style autotuner with its own key names, two configs and a benchmark
stand-in that records each tuning run without launching; Triton's own ``Autotuner.run`` builds the keys from
the launchers' real arguments, as on a GPU.
"""

from __future__ import annotations

import importlib

import pytest
import torch
import triton

from fed_plora.kernels import plora_linear, plora_linear_nf4, quantize_nf4
from fed_plora.kernels._runtime import token_bucket

launchers = importlib.import_module("fed_plora.kernels.plora_linear._triton")
fused_launchers = importlib.import_module("fed_plora.kernels.plora_linear._gemm_lowrank")
nf4_launchers = importlib.import_module("fed_plora.kernels.plora_linear_nf4._triton")

AUTOTUNED = [
    (launchers, "_shrink_kernel"),
    (launchers, "_gemm_with_slab_kernel"),
    (launchers, "_reduce_over_m_kernel"),
    (fused_launchers, "_gemm_lowrank_kernel"),
    (nf4_launchers, "_gemm_nf4_kernel"),
]


def test_token_bucket_is_a_power_of_two_from_16():
    assert [token_bucket(m) for m in (1, 15, 16, 17, 32, 33, 2047, 2048, 2049, 8192)] == [
        16, 16, 16, 32, 32, 64, 2048, 2048, 4096, 8192,
    ]  # fmt: skip
    assert len({token_bucket(m) for m in range(1, 65537)}) == 13


def _gpu_style_tuner(kernel, runs: list):
    """``kernel``'s JIT function autotuned on its own keys over two configs; ``runs`` gets one entry per
    config benchmarked. The first config (the one that can run here) always wins."""
    first = kernel.configs[0]
    other = triton.Config(dict(first.kwargs), num_warps=2 * first.num_warps, num_stages=first.num_stages)

    def bench_stand_in(kernel_call, quantiles):
        runs.append(1)
        return [float(len(runs))] * len(quantiles)  # later configs of a tuning run are slower

    return triton.autotune(configs=[first, other], key=kernel.keys, do_bench=bench_stand_in)(kernel.fn)


@pytest.mark.parametrize("bucket, counts", [(32, (17, 20, 31, 32)), (64, (33, 47, 64))])
def test_token_counts_of_one_bucket_share_one_tuning_run(bucket, counts, monkeypatch, device):
    for module, name in AUTOTUNED:
        assert "M_BUCKET" in getattr(module, name).keys and "M" not in getattr(module, name).keys
    runs = {name: [] for _, name in AUTOTUNED}
    tuners = {name: _gpu_style_tuner(getattr(module, name), runs[name]) for module, name in AUTOTUNED}
    for module, name in AUTOTUNED:
        monkeypatch.setattr(module, name, tuners[name])

    gen = torch.Generator().manual_seed(0)
    k, n, rank = 128, 64, 8
    weight = (torch.randn(n, k, generator=gen) * k**-0.5).to(device)
    lora_a = (torch.randn(rank, k, generator=gen) * k**-0.5).to(device).requires_grad_()
    lora_b = torch.randn(n, rank, generator=gen).to(device).requires_grad_()
    nf4 = quantize_nf4(weight, 64)
    active, none = torch.tensor([5, 0, 3], device=device), torch.tensor([], device=device, dtype=torch.long)
    for m in counts:
        x = torch.randn(m, k, generator=gen).to(device).requires_grad_()
        plora_linear(x, weight, lora_a, lora_b, active, 0.5).sum().backward()
        plora_linear(x, weight, lora_a, lora_b, none, 0.5).sum().backward()
        with torch.no_grad():
            plora_linear_nf4(x, nf4, lora_a, lora_b, active, 0.5, dequant="fused")

    # One key per product shape: the fused GEMM's forward (over K) and dx (over N), the reduction's dA, the plain
    # GEMM's forward and dx with no module active, the NF4 op's shrink and GEMM; each tuned once, for the first
    # count, whatever came after.
    shapes = {
        "_shrink_kernel": 1, "_gemm_with_slab_kernel": 2, "_reduce_over_m_kernel": 1, "_gemm_lowrank_kernel": 2,
        "_gemm_nf4_kernel": 1,
    }  # fmt: skip
    for name, tuner in tuners.items():
        position = tuner.keys.index("M_BUCKET")
        assert {key[position] for key in tuner.cache} == {bucket}, name
        assert len(tuner.cache) == shapes[name], (name, list(tuner.cache))
        assert len(runs[name]) == 2 * shapes[name], name  # two configs benchmarked per key, once
