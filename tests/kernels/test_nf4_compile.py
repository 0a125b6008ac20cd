"""The fold and NF4 kernels compile for an H100 (sm_90) even where there is no GPU.

Every kernel variant is compiled ahead of time through ``ptxas`` (see ``aot_compile.py``).
"""

import pytest
from aot_compile import SUPPORTED, compile_in_subprocess

SCRIPT = r"""
import triton.language as tl
from aot_compile import build
from fed_plora.kernels.fold._triton import _fold_kernel
from fed_plora.kernels.nf4 import _triton as nf4
from fed_plora.kernels.plora_linear_nf4._triton import _gemm_nf4_kernel

bf, f32 = "*bf16", "*fp32"
for w, dot in ((bf, "tf32"), (f32, "ieee")):
    build(_fold_kernel, dict(w_ptr=w, a_ptr=w, b_ptr=w, idx_ptr="*i64", scale="fp32"),
          dict(P=32, UPCAST=False, DOT_PRECISION=dot, BLOCK_N=64, BLOCK_K=128), num_warps=8)
for nested in (False, True):
    state = dict(packed_ptr="*u8", absmax_ptr="*u8" if nested else f32, absmax2_ptr=f32, code2_ptr=f32, offset_ptr=f32, code_ptr=f32)
    build(nf4._dequantize_kernel, dict(state, out_ptr=bf), dict(BLOCKSIZE=64, BLOCKS=32, NESTED=nested, BLOCKSIZE2=256, UPCAST=False), enable_fp_fusion=False)
    build(nf4._fold_kernel, dict(state, bounds_ptr=f32, new_absmax_ptr=f32, a_ptr=bf, b_ptr=bf, idx_ptr="*i64", scale="fp32"),
          dict(BLOCKSIZE=64, NESTED=nested, BLOCKSIZE2=256, P=32, W_DTYPE=tl.bfloat16, UPCAST=False, DOT_PRECISION="tf32", BLOCK_N=32, BLOCK_K=256),
          num_warps=8, enable_fp_fusion=False)
    for x, dot, registers in ((bf, "tf32", True), (f32, "ieee", False)):  # levels in registers, or bitsandbytes' values
        for block_m, swap in ((64, False), (16, True)):
            build(_gemm_nf4_kernel, dict(state, x_ptr=x, t_ptr=f32, g_ptr=x, idx_ptr="*i64", bias_ptr=x, y_ptr=x, partial_ptr=f32,
                                         arrived_ptr="*i32", slab_scale="fp32"),
                  dict(BLOCKSIZE=64, NESTED=nested, BLOCKSIZE2=256, W_DTYPE=tl.bfloat16, W_UPCAST=False, P=32, HAS_SLAB=True,
                       HAS_BIAS=True, UPCAST=False, DOT_PRECISION=dot, SCALE_AFTER_DOT=registers, LEVELS_IN_REGISTERS=registers,
                       BLOCK_M=block_m, BLOCK_N=64, BLOCK_K=64, GROUP_M=8, SWAP_AB=swap),
                  num_warps=4, num_stages=3)
build(nf4._quantize_kernel, dict(x_ptr=bf, bounds_ptr=f32, packed_ptr="*u8", absmax_ptr=f32), dict(BLOCKSIZE=64, BLOCKS=32, UPCAST=False), enable_fp_fusion=False)
build(nf4._quantize_absmax_kernel, dict(absmax_ptr=f32, offset_ptr=f32, code2_ptr=f32, qabsmax_ptr="*u8", absmax2_ptr=f32), dict(BLOCKSIZE2=256), enable_fp_fusion=False)
print("compiled")
"""


@pytest.mark.skipif(not SUPPORTED, reason="ahead-of-time API as of Triton 3.9")
def test_kernels_compile_for_sm90():
    result = compile_in_subprocess(SCRIPT)
    assert result.returncode == 0 and "compiled" in result.stdout, result.stderr[-3000:]
