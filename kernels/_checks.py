"""Argument validation shared by the kernels: clear errors that name the argument and what was expected.

Every check runs before anything is written, so a rejected call never leaves a tensor half-updated.
"""

from __future__ import annotations

import math
import numbers
import weakref

import torch

from ._runtime import FLOAT_DTYPES

_INDEX_DTYPES = (torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8)


def check_tensor(name: str, value, *, ndim: int | None = None, min_ndim: int | None = None) -> torch.Tensor:
    """``value`` is a tensor with ``ndim`` (or at least ``min_ndim``) dimensions."""
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if ndim is not None and value.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions, got shape {tuple(value.shape)}")
    if min_ndim is not None and value.dim() < min_ndim:
        raise ValueError(f"{name} must have at least {min_ndim} dimension(s), got shape {tuple(value.shape)}")
    return value


def check_float_dtype(name: str, value: torch.Tensor, expected: torch.dtype | None = None, like: str = "x") -> None:
    """``value`` is fp32/fp16/bf16 and, when given, of dtype ``expected`` (the dtype of ``like``)."""
    if value.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float32, float16 or bfloat16, got {value.dtype}")
    if expected is not None and value.dtype != expected:
        raise TypeError(f"{name} must have dtype {expected} (the dtype of {like}), got {value.dtype}")


def check_same_device(name: str, value: torch.Tensor, device: torch.device, like: str = "x") -> None:
    """``value`` is on ``device`` (the device of ``like``)."""
    if value.device != device:
        raise ValueError(f"{name} must be on {device} (the device of {like}), got {value.device}")


def check_writable_once(name: str, value: torch.Tensor) -> None:
    """An in-place kernel's output: every element in a place of its own (as torch's in-place ops require);
    ``ValueError`` for a tensor whose elements share memory (a stride 0 from ``expand``, overlapping strides)."""
    reach = 1  # one past the farthest offset the smaller-stride dims reach
    for size, stride in sorted(((s, st) for s, st in zip(value.shape, value.stride()) if s > 1), key=lambda d: d[1]):
        if stride < reach:
            raise ValueError(
                f"{name}: elements share memory (shape {tuple(value.shape)}, strides {value.stride()}; e.g. an expand()): "
                "an in-place kernel writes each element once, pass a tensor with its own storage (.contiguous())"
            )
        reach += stride * (size - 1)


def check_scale(name: str, value) -> float:
    """A finite real number (Python or 0-d tensor on any device is rejected: it would need a sync)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a Python float, got {type(value).__name__}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    return value


def check_bias(bias, n: int, x: torch.Tensor) -> None:
    """``bias`` is None or ``[N]`` with x's dtype and device."""
    if bias is None:
        return
    check_tensor("bias", bias, ndim=1)
    if bias.shape[0] != n:
        raise ValueError(f"bias must have shape [N] = [{n}], got {tuple(bias.shape)}")
    check_float_dtype("bias", bias, x.dtype)
    check_same_device("bias", bias, x.device)


def check_adapters(
    lora_a, lora_b, shape: tuple[int, int], shape_of: str, dtype: torch.dtype, device: torch.device, like: str
) -> int:
    """``lora_a [R, K]`` and ``lora_b [N, R]`` for the weight ``shape_of`` of ``shape = (N, K)``, both of
    ``dtype`` on ``device`` (those of ``like``); returns ``R``."""
    check_tensor("lora_a", lora_a, ndim=2)
    check_tensor("lora_b", lora_b, ndim=2)
    n, k = shape
    r = lora_a.shape[0]
    if r == 0:
        raise ValueError("lora_a must hold at least one module (R >= 1), got R = 0")
    if lora_a.shape[1] != k:
        raise ValueError(f"lora_a must have shape [R, K] = [R, {k}] (K from {shape_of} [N, K]), got {tuple(lora_a.shape)}")
    if tuple(lora_b.shape) != (n, r):
        raise ValueError(
            f"lora_b must have shape [N, R] = [{n}, {r}] (N from {shape_of}, R from lora_a), got {tuple(lora_b.shape)}"
        )
    for name, tensor in (("lora_a", lora_a), ("lora_b", lora_b)):
        check_float_dtype(name, tensor, dtype, like)
        check_same_device(name, tensor, device, like)
    return r


# CUDA index tensors already validated: id -> (weakref, version counter, rank). A module's index tensor is
# normally reused step after step, so its values are read back (a device-to-host copy and a sync) only the
# first time, and again after an in-place change bumps its version counter. CPU index tensors are never
# cached: reading them costs no sync, and a cache could not see a change made through ``.numpy()``.
_VALIDATED_INDICES: dict[int, tuple[weakref.ref, int, int]] = {}


def check_indices(name: str, indices, rank: int, device: torch.device, like: str = "x") -> torch.Tensor:
    """A 1-D integer tensor on ``device`` (that of ``like``) of distinct module indices in ``[0, rank)``,
    with any strides. Returns the tensor the kernels must read: ``indices`` itself when contiguous int64, else a
    contiguous int64 copy (made on the device, no sync).

    The values are read as the tensor really is (views and strides included). A CPU tensor is checked on
    every call. A CUDA tensor is checked once per tensor object and version counter (the read back to the
    host is a sync): an in-place change through torch bumps the counter and is checked again, but a change
    that bypasses it (``.data``, DLPack, raw pointers, another process) is not seen, and it is the caller's
    duty not to write invalid indices that way. Even then the kernels never read or write out of bounds:
    they skip an index outside ``[0, rank)`` (a broken promise gives wrong values, never corrupt memory).
    """
    check_tensor(name, indices, ndim=1)
    if indices.dtype not in _INDEX_DTYPES:
        raise TypeError(f"{name} must be an integer tensor of module indices, got dtype {indices.dtype}")
    if indices.device != device:
        raise ValueError(f"{name} must be on {device} (the device of {like}), got {indices.device}")
    if indices.numel() > rank:
        raise ValueError(f"{name} has {indices.numel()} entries but there are only R = {rank} modules")
    cache = indices.device.type != "cpu"
    if cache:
        cached = _VALIDATED_INDICES.get(id(indices))
        if cached is not None and cached[0]() is indices and cached[1] == indices._version and cached[2] == rank:
            return as_kernel_indices(indices)
    values = _values(indices)
    if values:
        low, high = min(values), max(values)
        if low < 0 or high >= rank:
            raise ValueError(f"{name} must hold module indices in [0, {rank}), got values from {low} to {high}")
        if len(set(values)) != len(values):
            raise ValueError(f"{name} must not repeat a module index, got {values}")
    if cache:
        _VALIDATED_INDICES[id(indices)] = (weakref.ref(indices, _forget(id(indices))), indices._version, rank)
    return as_kernel_indices(indices)


def as_kernel_indices(indices: torch.Tensor) -> torch.Tensor:
    """Contiguous int64: one dtype for every index tensor, so the index dtype never selects another binary or
    tuning key (a device copy unless ``indices`` is already contiguous int64)."""
    return indices.to(torch.int64).contiguous()


def _values(indices: torch.Tensor) -> list[int]:
    """The values as the tensor really is, whatever its strides (for a CUDA tensor: a read back, a sync)."""
    return indices.detach().tolist()


def _forget(key: int):
    return lambda _ref: _VALIDATED_INDICES.pop(key, None)
