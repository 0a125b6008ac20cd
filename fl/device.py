"""Where a run computes and in which precision: the device, the base weights' dtype and autocast."""

from __future__ import annotations

import contextlib

import torch


def pick_device(choice: str) -> torch.device:
    """``run.device``: "auto" (CUDA when present, else CPU), "cpu" or "cuda"."""
    if choice == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if choice not in ("cpu", "cuda"):
        raise ValueError(f"run.device must be auto, cpu or cuda, got {choice!r}")
    return torch.device(choice)


def precision(choice: str, device: torch.device) -> tuple[torch.dtype, torch.dtype | None]:
    """``(base weight dtype, autocast dtype)``: "auto" is bf16 on a GPU, fp32 on CPU."""
    if choice == "auto":
        choice = "bf16" if device.type == "cuda" else "fp32"
    if choice == "fp32":
        return torch.float32, None
    if choice == "bf16":
        return torch.bfloat16, torch.bfloat16
    raise ValueError(f"model.precision must be auto, fp32 or bf16, got {choice!r}")


def precision_context(device: torch.device, dtype: torch.dtype | None):
    """bf16 autocast on a GPU when ``dtype`` is bf16; nothing otherwise."""
    if dtype is None or device.type != "cuda":
        return contextlib.nullcontext()
    return torch.autocast("cuda", dtype=dtype)
