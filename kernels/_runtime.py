"""Facts about how Triton runs here, shared by every kernel in the package.

``INTERPRET`` is read once, at import: Triton decides at decoration time whether ``@triton.jit``
builds GPU code or runs through its numpy interpreter, so the flag must be set before this package
is imported (``tests/conftest.py`` does it on machines without CUDA).
"""

from __future__ import annotations

import contextlib
import os

import torch
import triton

INTERPRET: bool = os.environ.get("TRITON_INTERPRET", "0") == "1"

#: Dtypes every kernel accepts for activations, weights and adapters.
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

#: Launch arguments that carry an index set: its pointer, its length ``r`` and the number of modules ``R``
#: it indexes (kernels skip an index outside ``[0, R)`` rather than read out of bounds). Triton would
#: specialise an int on being 1 or a multiple of 16, and a pointer on its alignment; kernels declare these
#: ``do_not_specialize``, so no index set ever triggers a compile.
ACTIVE_SET_ARGS = ["idx_ptr", "r", "R"]

#: Launch arguments that only key the autotuner (``M_BUCKET = token_bucket(M)``): kernels never read them and
#: declare them ``do_not_specialize``, so they select a tuned config but never a compile.
TUNING_ARGS = ["M_BUCKET"]

#: Smallest padded rank: ``tl.dot`` needs every dimension >= 16.
MIN_RANK_BUCKET = 16

#: Smallest token bucket: the smallest BLOCK_M of any autotuning config.
MIN_TOKEN_BUCKET = 16


def upcast_in_kernel(dtype: torch.dtype) -> bool:
    """Whether kernels must compute on fp32 copies of ``dtype`` loads.

    The interpreter computes bf16 on raw bit patterns (silently wrong) and does fp16 dots at half
    precision, so there every 16-bit load is cast to fp32 at once; compiled kernels keep the native
    16-bit operands for the tensor cores.
    """
    return INTERPRET and dtype in (torch.float16, torch.bfloat16)


def rank_bucket(count: int) -> int:
    """Padded rank for ``count`` active modules: a power of two, at least 16.

    Kernels are specialised on the bucket only, never on the count or the indices, so any active set
    of the same bucket reuses the compiled kernel.
    """
    bucket = MIN_RANK_BUCKET  # doubling by comparisons: cheap on the host, and a symbolic count under
    while bucket < count:  # torch.compile guards only on the bucket's bounds
        bucket *= 2
    return bucket


def token_bucket(m: int) -> int:
    """Autotuning bucket of a token count ``m``: the next power of two, at least ``MIN_TOKEN_BUCKET``.

    Kernels key their autotuning on this bucket (the launch argument ``M_BUCKET``), not on M itself: with
    dynamic padding M changes almost every batch, and every new key benchmarks every config on the GPU.
    Powers of two bound the keys to about log2 of the largest M per shape; the config tuned for the first
    M of a bucket serves the others (results do not depend on the config beyond rounding order). ``m`` is
    a host int (a tensor's size), so bucketing needs no sync.
    """
    return max(MIN_TOKEN_BUCKET, 1 << (m - 1).bit_length())


def autotune_configs(gpu_configs: list[triton.Config], interpreter_config: triton.Config) -> list[triton.Config]:
    """The GPU search space, or the single config the interpreter can run (autotuning fails there)."""
    return [interpreter_config] if INTERPRET else gpu_configs


def device_guard(tensor: torch.Tensor):
    """Context that makes ``tensor``'s CUDA device current for a launch (a no-op on CPU)."""
    return torch.cuda.device(tensor.device) if tensor.is_cuda else contextlib.nullcontext()
