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

#: Launch arguments about the token count: ``M`` itself and ``M_BUCKET = token_bucket(M)``, which only keys the
#: autotuner (kernels never read it). Kernels declare both ``do_not_specialize``: M only bounds rows, so its
#: divisibility by 16 would change no vectorised access and only double the binaries.
TOKEN_ARGS = ["M", "M_BUCKET"]

#: Smallest padded rank: ``tl.dot`` needs every dimension >= 16.
MIN_RANK_BUCKET = 16

#: Smallest token bucket: the smallest BLOCK_M of any autotuning config.
MIN_TOKEN_BUCKET = 16


#: Streaming multiprocessors assumed for ``meta`` tensors, which stand for an H100 SXM when launch plans are
#: counted without a GPU (``bench/static_profile.py``).
META_MULTIPROCESSORS = 132


#: Streaming multiprocessors the interpreter stands for: a few, so that the tests cover persistent programs that
#: start inside a row block (it runs programs one by one, so more would only be slower).
INTERPRETER_MULTIPROCESSORS = 3


def multiprocessors(device: torch.device) -> int:
    """SMs of ``device``'s GPU; ``META_MULTIPROCESSORS`` for ``meta``, ``INTERPRETER_MULTIPROCESSORS`` for CPU."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return META_MULTIPROCESSORS if device.type == "meta" else INTERPRETER_MULTIPROCESSORS


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

    Every autotuned kernel keys its tuning on this bucket (the launch argument ``M_BUCKET``), not on M itself: with
    dynamic padding M changes almost every batch, and every new key benchmarks every config on the GPU.
    Powers of two bound the keys to about log2 of the largest M per shape; the config tuned for the first
    M of a bucket serves the others (results do not depend on the config beyond rounding order). ``m`` is
    a host int (a tensor's size), so bucketing needs no sync.
    """
    return max(MIN_TOKEN_BUCKET, 1 << (m - 1).bit_length())


def arch(device: torch.device) -> int:
    """Compute capability of the GPU that runs launches on ``device``, as Triton numbers it (90 for sm_90): the CUDA
    device's, else Triton's current target (a GPU that ``bench.offline_triton`` stands in for); 0 in the interpreter."""
    if INTERPRET:
        return 0
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        return 10 * major + minor
    return triton.runtime.driver.active.get_current_target().arch


def autotune(
    gpu_configs: list[triton.Config],
    interpreter_config: triton.Config,
    key: list[str],
    before_hopper: list[triton.Config] | None = None,
):
    """``@triton.autotune`` over ``gpu_configs`` (the interpreter cannot autotune: ``interpreter_config`` alone
    there), keyed on ``key`` plus every ``stride_*`` argument of the kernel. ``before_hopper`` replaces
    ``gpu_configs`` on GPUs older than sm_90, where tensor-core operands live in registers (``mma.sync``) and
    tiles sized for Hopper's ``wgmma`` would spill.

    Triton compiles one binary per specialisation of the strides (unit, divisible by 16), so two launches with
    equal sizes but transposed operands (the forward GEMM and the dx GEMM of a square weight) run different
    binaries; keyed on their strides, each is tuned for itself. The autotuner adds the tensors' dtypes, and
    ``key`` must name every constexpr a launcher sets, so that each key selects exactly one binary per config."""

    def for_this_gpu(configs, named_args, **kwargs):
        older = arch(next(a for a in named_args.values() if isinstance(a, torch.Tensor)).device) < 90
        return before_hopper if older else gpu_configs

    def decorate(fn):
        strides = [name for name in fn.arg_names if name.startswith("stride_")]
        configs = [interpreter_config] if INTERPRET else gpu_configs + (before_hopper or [])
        prune = {"early_config_prune": for_this_gpu} if before_hopper else None
        return triton.autotune(configs=configs, key=[*key, *strides], prune_configs_by=prune)(fn)

    return decorate


def device_guard(tensor: torch.Tensor):
    """Context that makes ``tensor``'s CUDA device current for a launch (a no-op on CPU)."""
    return torch.cuda.device(tensor.device) if tensor.is_cuda else contextlib.nullcontext()
