"""Factor pairs and their algebra: sums, norms, distances and truncated SVDs of ``b @ a`` without forming it.

A ``Factors(a [r, K], b [N, r])`` stands for the ``[N, K]`` matrix ``b @ a``. Everything here but ``delta``
(the clients' and the tests' dense product) costs
``O((N + K) r²)`` time and ``O((N + K) r)`` memory for a pair of rank ``r``: the server never builds an
``[N, K]`` matrix. Norms and inner products come from small Gram matrices in float64,
``⟨b₁a₁, b₂a₂⟩_F = Σ (b₁ᵀb₂ ∘ a₁a₂ᵀ)`` (in fp32 the cancellation in a distance loses about 1e-3 relative).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
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


def module_norms(x: Factors) -> tuple[torch.Tensor, torch.Tensor]:
    """Squared norms of every module's row of ``a`` and column of ``b``, ``([r], [r])`` in fp32 (a module is live
    when both are nonzero; entries below ~1e-19 square to zero and count as zero)."""
    a, b = x.a.float(), x.b.float()
    return (a * a).sum(1), (b * b).sum(0)


def live(x: Factors) -> Factors:
    """``x`` without the modules whose row of ``a`` or column of ``b`` is zero (they add nothing to ``b @ a``)."""
    a_norms, b_norms = module_norms(x)
    keep = (a_norms > 0) & (b_norms > 0)
    return x if bool(keep.all()) else Factors(x.a[keep], x.b[:, keep])


def merged(terms: Sequence[tuple[float, Factors]]) -> Factors:
    """``Σ c_i b_i a_i`` like ``concat`` (and in its order: term by term, module by module), for terms of ``R``
    modules each (module ``j``: row ``j`` of ``a``, column ``j`` of ``b``), with zero modules left out and a
    module that several terms hold with equal values entered once, where it first occurs, with the sum of
    their coefficients: clients' untrained modules, which are the global model's, count once, not once per
    client. Modules are compared by their norms first, by value only when those agree."""
    groups: dict[tuple[int, float, float], list[list]] = {}  # (j, ‖a_j‖², ‖b_j‖²) -> [[coefficient, a_j, b_j]]
    order: list[list] = []
    for c, f in terms:
        a_norms, b_norms = (n.tolist() for n in module_norms(f))
        for j, key in enumerate(zip(a_norms, b_norms)):
            if key[0] == 0.0 or key[1] == 0.0:
                continue
            a_j, b_j = f.a[j], f.b[:, j]
            candidates = groups.setdefault((j, *key), [])
            same = next((g for g in candidates if torch.equal(g[1], a_j) and torch.equal(g[2], b_j)), None)
            if same is None:
                candidates.append([c, a_j, b_j])
                order.append(candidates[-1])
            else:
                same[0] += c
    if not order:
        first = terms[0][1]
        return Factors(first.a.new_zeros(0, first.a.shape[1]).float(), first.b.new_zeros(first.b.shape[0], 0).float())
    rows = torch.stack([c * a_j.float() for c, a_j, _ in order])
    return Factors(rows, torch.stack([b_j.float() for *_, b_j in order], dim=1))


def _float64(x: Factors) -> Factors:
    return Factors(x.a.double(), x.b.double())


def _gram_inner(x: Factors, y: Factors) -> float:
    """``Σ (x.bᵀ y.b ∘ x.a y.aᵀ)`` of two float64 pairs."""
    return float(((x.b.T @ y.b) * (x.a @ y.a.T)).sum())


def inner(x: Factors, y: Factors) -> float:
    """``⟨x.b @ x.a, y.b @ y.a⟩_F`` in float64, from ``x.bᵀ y.b [r_x, r_y]`` and ``x.a y.aᵀ [r_x, r_y]``."""
    return _gram_inner(_float64(x), _float64(y))


def squared_norm(x: Factors) -> float:
    """``‖x.b @ x.a‖²_F`` in float64."""
    x = _float64(x)
    return max(_gram_inner(x, x), 0.0)


def distance_and_norm(x: Factors, y: Factors) -> tuple[float, float]:
    """``(‖x.b @ x.a − y.b @ y.a‖²_F, ‖y.b @ y.a‖²_F)`` in float64 (``‖x‖² + ‖y‖² − 2⟨x, y⟩``, clamped at 0); the
    distance is exactly 0, at the cost of a comparison, when the two pairs hold the same live modules."""
    x, y = live(x), live(y)
    y64 = _float64(y)
    norm_y = max(_gram_inner(y64, y64), 0.0)
    if x.a.shape == y.a.shape and torch.equal(x.a, y.a) and torch.equal(x.b, y.b):
        return 0.0, norm_y
    x64 = _float64(x)
    return max(_gram_inner(x64, x64) + norm_y - 2.0 * _gram_inner(x64, y64), 0.0), norm_y


def squared_distance(x: Factors, y: Factors) -> float:
    """``‖x.b @ x.a − y.b @ y.a‖²_F`` (see ``distance_and_norm``)."""
    return distance_and_norm(x, y)[0]


def relative_error(layers: Iterable[tuple[Factors, Factors]]) -> float | None:
    """``‖estimate − target‖_F / ‖target‖_F`` over all layers together (sums of squares across layers), from
    ``(estimate, target)`` pairs, one per layer, taken one at a time (a generator holds one layer's stacks).

    0.0 when the two agree exactly (also when both are zero); None when only the target is zero.
    """
    num = den = 0.0
    for estimate, target in layers:
        distance, norm = distance_and_norm(estimate, target)
        num, den = num + distance, den + norm
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


def product_flops(n: int, k: int, rank: int) -> float:
    """FLOPs of forming ``B A`` with ``B [n, rank]``, ``A [rank, k]``: ``2 n k rank``."""
    return 2.0 * n * k * rank


def svd_flops(m: int, n: int) -> float:
    """Thin SVD (``U``, ``Σ``, ``V``) of an ``m × n`` matrix: the cheaper of Golub–Reinsch
    (``14 m n² + 8 n³``) and R-SVD (``6 m n² + 20 n³``), with ``m ≥ n`` (Golub & Van Loan, table 5.4.1)."""
    m, n = max(m, n), min(m, n)
    return float(min(14 * m * n**2 + 8 * n**3, 6 * m * n**2 + 20 * n**3))


def qr_flops(m: int, n: int) -> float:
    """Householder thin QR of an ``m × n`` matrix: ``2 m n² − 2 n³ / 3`` with ``m ≥ n`` (Golub & Van Loan, 5.2.2)."""
    m, n = max(m, n), min(m, n)
    return 2.0 * m * n**2 - 2.0 * n**3 / 3.0


def gram_flops(n: int, k: int, rank: int) -> float:
    """FLOPs of ``‖B A‖_F`` from Gram matrices, ``B [n, rank]``, ``A [rank, k]``: ``2 (n + k) rank²``."""
    return 2.0 * (n + k) * rank**2
