"""Cost accounting: traffic from the tensors actually sent, FLOP estimates, and the two noise measures
of DESIGN.md §1."""

from __future__ import annotations

import math

import torch

#: Bytes per value of the two wire formats reported.
WIRE_BYTES = {"bf16": 2, "fp32": 4}


def payload_values(tensors: dict[str, torch.Tensor]) -> int:
    """Number of values in a payload (the sum of ``numel`` over the tensors sent)."""
    return sum(t.numel() for t in tensors.values())


def payload_bytes(tensors: dict[str, torch.Tensor]) -> dict[str, int]:
    """Bytes of a payload in each wire format: ``{"bf16": …, "fp32": …}``."""
    values = payload_values(tensors)
    return {fmt: values * size for fmt, size in WIRE_BYTES.items()}


def product_flops(n: int, k: int, rank: int) -> float:
    """FLOPs of forming ``B A`` with ``B [n, rank]``, ``A [rank, k]``: ``2 n k rank``."""
    return 2.0 * n * k * rank


def fold_flops(n: int, k: int, rank: int) -> float:
    """FLOPs of ``W += s · B_f A_f`` over ``rank`` modules (the product, then ``n k`` adds); 0 for none."""
    return product_flops(n, k, rank) + n * k if rank else 0.0


def svd_flops(m: int, n: int) -> float:
    """Thin SVD (``U``, ``Σ``, ``V``) of an ``m × n`` matrix: the cheaper of Golub–Reinsch
    (``14 m n² + 8 n³``) and R-SVD (``6 m n² + 20 n³``), with ``m ≥ n`` (Golub & Van Loan, table 5.4.1)."""
    m, n = max(m, n), min(m, n)
    return float(min(14 * m * n**2 + 8 * n**3, 6 * m * n**2 + 20 * n**3))


def training_flops(tokens: int, frozen_params: int, trainable_params: int) -> float:
    """Estimated FLOPs of training on ``tokens`` tokens (linear layers only, attention scores ignored):
    forward ``2 P`` per token for every weight, backward ``2 P`` for input gradients through every
    weight plus ``2 P`` for weight gradients of the trainable ones: ``tokens · (4 P_frozen + 6 P_trainable)``."""
    return float(tokens) * (4.0 * frozen_params + 6.0 * trainable_params)


def relative_error(estimate: dict[str, torch.Tensor], target: dict[str, torch.Tensor]) -> float | None:
    """``‖estimate − target‖_F / ‖target‖_F`` over all layers together (the sum of squares across layers).

    0.0 when the two agree exactly (also when both are zero); None when only the target is zero.
    """
    if estimate.keys() != target.keys():
        raise ValueError(f"estimate and target must name the same layers, got {sorted(estimate)} vs {sorted(target)}")
    num = sum(float(torch.linalg.matrix_norm(estimate[n].float() - target[n].float())) ** 2 for n in target)
    den = sum(float(torch.linalg.matrix_norm(target[n].float())) ** 2 for n in target)
    if num == 0.0:
        return 0.0
    return math.sqrt(num / den) if den > 0 else None


def initialisation_noise(client_start: dict[str, torch.Tensor], global_delta: dict[str, torch.Tensor]) -> float | None:
    """``‖ΔW_client_start − ΔW_global‖_F / ‖ΔW_global‖_F`` (DESIGN.md §1), per-layer ``[N, K]`` deltas."""
    return relative_error(client_start, global_delta)


def aggregation_noise(aggregated: dict[str, torch.Tensor], ideal: dict[str, torch.Tensor]) -> float | None:
    """``‖ΔW_aggregated − Σ p_i ΔW_i‖_F / ‖Σ p_i ΔW_i‖_F`` (DESIGN.md §1), per-layer ``[N, K]`` deltas."""
    return relative_error(aggregated, ideal)
