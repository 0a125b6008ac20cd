"""Factor pairs and their algebra: sums, norms, distances and truncated SVDs of ``b @ a`` without forming it.

A ``Factors(a [r, K], b [N, r])`` stands for the ``[N, K]`` matrix ``b @ a``. Everything here but ``delta``
(the clients' and the tests' dense product) costs
``O((N + K) r²)`` time and ``O((N + K) r)`` memory for a pair of rank ``r``: the server never builds an
``[N, K]`` matrix. Norms and inner products come from small Gram matrices in float64,
``⟨b₁a₁, b₂a₂⟩_F = Σ (b₁ᵀb₂ ∘ a₁a₂ᵀ)`` (in fp32 the cancellation in a distance loses about 1e-3 relative).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import NamedTuple

import torch


class Factors(NamedTuple):
    """One layer's adapter: ``a [R, K]`` (module j is row j) and ``b [N, R]`` (module j is column j)."""

    a: torch.Tensor
    b: torch.Tensor

    def delta(self) -> torch.Tensor:
        """``b @ a`` in fp32, ``[N, K]``: the layer's update before the scale ``s`` (dense: not for the server)."""
        return self.b.float() @ self.a.float()


def concat(terms: Sequence[tuple[float, Factors]]) -> Factors:
    """``Σ c_i b_i a_i`` exactly, as one pair of fp32 factors: the rows of every ``c_i a_i`` stacked,
    ``[Σ r_i, K]``, and the columns of every ``b_i``, ``[N, Σ r_i]``."""
    rows = [c * f.a.float() for c, f in terms]
    cols = [f.b.float() for _, f in terms]
    return Factors(torch.cat(rows), torch.cat(cols, dim=1))


def inner(x: Factors, y: Factors) -> float:
    """``⟨x.b @ x.a, y.b @ y.a⟩_F`` in float64, from ``x.bᵀ y.b [r_x, r_y]`` and ``x.a y.aᵀ [r_x, r_y]``."""
    b_gram = x.b.double().T @ y.b.double()
    a_gram = x.a.double() @ y.a.double().T
    return float((b_gram * a_gram).sum())


def squared_norm(x: Factors) -> float:
    """``‖x.b @ x.a‖²_F`` in float64."""
    return max(inner(x, x), 0.0)


def squared_distance(x: Factors, y: Factors) -> float:
    """``‖x.b @ x.a − y.b @ y.a‖²_F`` in float64 (``‖x‖² + ‖y‖² − 2⟨x, y⟩``, clamped at 0; exactly 0 when the
    two pairs are equal)."""
    return max(squared_norm(x) + squared_norm(y) - 2.0 * inner(x, y), 0.0)


def relative_error(estimate: Mapping[str, Factors], target: Mapping[str, Factors]) -> float | None:
    """``‖estimate − target‖_F / ‖target‖_F`` over all layers together (sums of squares across layers).

    0.0 when the two agree exactly (also when both are zero); None when only the target is zero.
    """
    if estimate.keys() != target.keys():
        raise ValueError(f"estimate and target must name the same layers, got {sorted(estimate)} vs {sorted(target)}")
    num = sum(squared_distance(estimate[n], target[n]) for n in target)
    den = sum(squared_norm(target[n]) for n in target)
    if num == 0.0:
        return 0.0
    return math.sqrt(num / den) if den > 0 else None


def top_components(x: Factors, count: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The top singular triplets of ``x.b @ x.a`` (rank ``r``): ``(u [N, c], s [c], vh [c, K])`` in float64 with
    ``c = min(count, rank of the factors)``, from thin QRs of ``x.b`` and ``x.aᵀ`` and the SVD of the
    ``r × r`` core ``R_b R_aᵀ``."""
    q_b, r_b = torch.linalg.qr(x.b.double())  # [N, p], [p, r]
    q_a, r_a = torch.linalg.qr(x.a.double().T)  # [K, q], [q, r]
    u, s, vh = torch.linalg.svd(r_b @ r_a.T, full_matrices=False)  # [p, m], [m], [m, q]
    kept = min(count, s.numel())
    return q_b @ u[:, :kept], s[:kept], vh[:kept] @ q_a.T


def orthonormal_complement(rows: torch.Tensor, count: int, generator: torch.Generator) -> torch.Tensor:
    """``count`` orthonormal rows ``[count, K]`` orthogonal to the orthonormal ``rows [m, K]`` (float64), drawn
    at random (``generator``): what a dense SVD returns, up to rotation, for singular values that are zero."""
    k = rows.shape[1]
    draw = torch.randn(k, count, generator=generator, dtype=torch.float64).to(rows.device)
    for _ in range(2):  # twice is enough for orthogonality to working precision
        draw = draw - rows.T @ (rows @ draw)
    q, _ = torch.linalg.qr(draw)
    return q.T
