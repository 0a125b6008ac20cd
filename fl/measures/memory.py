"""Peak memory of a round: the CUDA allocator's peak on a GPU, the process's peak resident set on CPU."""

from __future__ import annotations

import resource

import torch


def memory_fields(device: torch.device) -> dict:
    """A record's peak memory and what it measures."""
    kind = "cuda_max_allocated" if device.type == "cuda" else "process_max_rss"
    return {"peak_memory_bytes": peak_memory_bytes(device), "peak_memory_kind": kind}


def peak_memory_bytes(device: torch.device) -> int:
    """Peak CUDA allocation since the last reset, or the process's peak resident set on CPU."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024
