"""Cost accounting: traffic from the tensors actually sent, and FLOP estimates (the noise measures
are in ``noise``)."""

from __future__ import annotations

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


def qr_flops(m: int, n: int) -> float:
    """Householder thin QR of an ``m × n`` matrix: ``2 m n² − 2 n³ / 3`` with ``m ≥ n`` (Golub & Van Loan, 5.2.2)."""
    m, n = max(m, n), min(m, n)
    return 2.0 * m * n**2 - 2.0 * n**3 / 3.0


def gram_flops(n: int, k: int, rank: int) -> float:
    """FLOPs of ``‖B A‖_F`` from Gram matrices, ``B [n, rank]``, ``A [rank, k]``: ``2 (n + k) rank²``."""
    return 2.0 * (n + k) * rank**2
