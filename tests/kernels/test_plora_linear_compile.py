"""The fused op's kernels compile for an H100 (sm_90) even where there is no GPU (see ``aot_compile.py``).

Every GPU autotuning config is compiled in bf16 (the performance path), one config per kernel in
fp16 and fp32; the GEMM with slab and bias, and once without either; the fused GEMM with dB partial sums, and
once with a bias instead.
"""

import pytest
from aot_compile import SUPPORTED, compile_in_subprocess

SCRIPT = r"""
from aot_compile import build
from fed_plora.kernels.plora_linear import _triton as k
from fed_plora.kernels.plora_linear import _gemm_lowrank as f

def options(config):
    return dict(num_warps=config.num_warps, num_stages=config.num_stages)

for dtype, dot in (("bf16", "tf32"), ("fp16", "tf32"), ("fp32", "ieee")):
    act = "*" + dtype
    every = dtype == "bf16"
    for config in k._shrink_kernel.configs[: None if every else 1]:
        build(k._shrink_kernel, dict(x_ptr=act, g_ptr=act, idx_ptr="*i64", t_ptr="*fp32", scale="fp32"),
              dict(P=64, UPCAST=False, DOT_PRECISION=dot, **config.kwargs), **options(config))
    for i, config in enumerate(k._gemm_with_slab_kernel.configs[: None if every else 1]):
        for slab, bias in ((True, True),) + (((False, False),) if i == 0 else ()):
            build(k._gemm_with_slab_kernel,
                  dict(x_ptr=act, w_ptr=act, t_ptr="*fp32", g_ptr=act, idx_ptr="*i64", bias_ptr=act, y_ptr=act, slab_scale="fp32"),
                  dict(P=64, HAS_SLAB=slab, HAS_BIAS=bias, UPCAST=False, DOT_PRECISION=dot, **config.kwargs), **options(config))
    for i, config in enumerate(f._gemm_lowrank_kernel.configs[: None if every else 1]):
        for partials, bias in ((True, False),) + (((False, True),) if i == 0 else ()):
            build(f._gemm_lowrank_kernel,
                  dict(x_ptr=act, w_ptr=act, h_ptr=act, g_ptr=act, idx_ptr="*i64", bias_ptr=act, t_ptr="*fp32", y_ptr=act,
                       u_ptr="*fp32", part_ptr="*fp32", scratch_ptr="*fp32", u_scale="fp32", slab_scale="fp32"),
                  dict(P=64, HAS_BIAS=bias, PARTIALS=partials, UPCAST=False, DOT_PRECISION=dot, BLOCK_M=128, **config.kwargs),
                  **options(config))
    for config in k._reduce_over_m_kernel.configs[: None if every else 1]:
        build(k._reduce_over_m_kernel, dict(x_ptr=act, t_ptr="*fp32", out_ptr="*fp32"),
              dict(P=64, UPCAST=False, DOT_PRECISION=dot, **config.kwargs), **options(config))
print("compiled")
"""


@pytest.mark.skipif(not SUPPORTED, reason="ahead-of-time API as of Triton 3.9")
def test_fused_op_kernels_compile_for_sm90():
    result = compile_in_subprocess(SCRIPT)
    assert result.returncode == 0 and "compiled" in result.stdout, result.stderr[-3000:]
