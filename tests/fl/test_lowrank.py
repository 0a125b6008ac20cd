"""Server-side algebra from factors (``fl.strategies.lowrank``) against the dense formulas it replaces: norms,
distances, noise, FlexLoRA's truncated SVD and HetLoRA's weights agree to rounding, and a server round on a
layer whose dense ``[N, K]`` would not fit the memory bound runs within it."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from fed_plora.fl.measures.noise import aggregation_noise, initialisation_noise
from fed_plora.fl.strategies import ClientUpdate, Factors, build_strategy
from fed_plora.fl.strategies.lowrank import (
    concat,
    inner,
    merged,
    orthonormal_complement,
    relative_error,
    squared_distance,
    squared_norm,
    top_components,
)

SHAPES = [(7, 5, 3), (33, 17, 40), (64, 48, 16)]  # (N, K, r): r > min(N, K) in the second


def factors(n, k, r, seed, scale=1.0):
    gen = torch.Generator().manual_seed(seed)
    return Factors(torch.randn(r, k, generator=gen) * scale, torch.randn(n, r, generator=gen))


def dense(f: Factors) -> torch.Tensor:
    return f.b.double() @ f.a.double()


@pytest.mark.parametrize("n, k, r", SHAPES)
def test_norms_and_distances_equal_the_dense_ones(n, k, r):
    x, y = factors(n, k, r, 1), factors(n, k, r + 2, 2)
    assert inner(x, y) == pytest.approx(float((dense(x) * dense(y)).sum()), rel=1e-10)
    assert squared_norm(x) == pytest.approx(float(dense(x).norm() ** 2), rel=1e-10)
    assert squared_distance(x, y) == pytest.approx(float((dense(x) - dense(y)).norm() ** 2), rel=1e-10)
    assert squared_distance(x, x) == 0.0
    terms = [(0.25, x), (-1.5, y)]
    torch.testing.assert_close(dense(concat(terms)), 0.25 * dense(x) - 1.5 * dense(y), rtol=1e-5, atol=1e-5)  # fp32 factors


def test_a_small_distance_between_large_updates_keeps_its_digits():
    """float64 Gram matrices: a difference 1e-4 of the norm is measured to 1e-6 relative (fp32 dense: ~1e-3)."""
    x = factors(256, 192, 8, 3)
    nudge = factors(256, 192, 2, 4, scale=1e-4)
    y = concat([(1.0, x), (1.0, nudge)])
    exact = float(dense(nudge).norm() ** 2)
    assert squared_distance(x, y) == pytest.approx(exact, rel=1e-6)


def test_relative_error_and_noise_over_layers():
    target = {"l1": factors(9, 6, 2, 5), "l2": factors(4, 11, 3, 6)}
    estimate = {"l1": factors(9, 6, 2, 7), "l2": target["l2"]}
    num = sum(float((dense(estimate[n]) - dense(target[n])).norm() ** 2) for n in target)
    den = sum(float(dense(target[n]).norm() ** 2) for n in target)

    def pairs(x, y):
        return [(x[n], y[n]) for n in y]

    expected = (num / den) ** 0.5
    assert relative_error(pairs(estimate, target)) == pytest.approx(expected, rel=1e-10)
    assert (
        initialisation_noise(pairs(estimate, target))
        == aggregation_noise(pairs(estimate, target))
        == relative_error(pairs(estimate, target))
    )
    zero = {n: Factors(torch.zeros_like(f.a), f.b) for n, f in target.items()}
    assert relative_error(pairs(zero, zero)) == 0.0 and relative_error(pairs(target, zero)) is None


def test_merged_counts_a_shared_module_once():
    """Clients' untrained modules are the global model's: ``merged`` keeps each once, with summed weights."""
    shared = factors(12, 9, 4, 10)
    own = factors(12, 9, 4, 11)
    one = Factors(torch.cat([own.a[:2], shared.a[2:]]), torch.cat([own.b[:, :2], shared.b[:, 2:]], dim=1))
    two = Factors(
        torch.cat([shared.a[:1], own.a[1:3] * 2, shared.a[3:]]),
        torch.cat([shared.b[:, :1], own.b[:, 1:3], shared.b[:, 3:]], dim=1),
    )
    zero = Factors(torch.zeros(4, 9), shared.b)
    terms = [(0.3, one), (0.5, two), (0.2, zero)]
    m = merged(terms)
    assert m.a.shape[0] == 7  # 8 live modules of the first two clients, module 3 shared by both; the third dead
    torch.testing.assert_close(dense(m), sum(c * dense(f) for c, f in terms), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("n, k, r", SHAPES)
def test_top_components_are_the_dense_truncated_svd(n, k, r):
    x = factors(n, k, r, 8)
    u, s, vh = torch.linalg.svd(dense(x), full_matrices=False)
    for count in (1, 3, min(n, k, r)):
        u_f, s_f, vh_f = top_components(x, count)
        assert s_f.numel() == min(count, n, k, r)
        torch.testing.assert_close(s_f, s[: s_f.numel()], rtol=1e-10, atol=1e-10)
        c = s_f.numel()
        torch.testing.assert_close((u_f * s_f) @ vh_f, (u[:, :c] * s[:c]) @ vh[:c], rtol=1e-9, atol=1e-9)


def test_orthonormal_complement():
    q, _ = torch.linalg.qr(torch.randn(30, 4, generator=torch.Generator().manual_seed(9), dtype=torch.float64))
    extra = orthonormal_complement(q.T, 5, torch.Generator().manual_seed(0))
    basis = torch.cat([q.T, extra])
    torch.testing.assert_close(basis @ basis.T, torch.eye(9, dtype=torch.float64), atol=1e-12, rtol=0)


def _updates(n, k, rank, ranks, seed):
    gen = torch.Generator().manual_seed(seed)
    out = []
    for client, r in enumerate(ranks):
        a, b = torch.zeros(rank, k), torch.zeros(n, rank)
        a[:r], b[:, :r] = torch.randn(r, k, generator=gen), torch.randn(n, r, generator=gen)
        out.append(ClientUpdate(client, 10 + 7 * client, {"layer": Factors(a, b)}, {"layer": torch.arange(r)}, {}))
    return out


def _start(n, k, rank):
    return {"layer": Factors(torch.zeros(rank, k), torch.zeros(n, rank))}


@pytest.mark.parametrize("ranks", [[2, 4, 8, 16, 4], [1, 2]])  # Σ r_i ≥ R, and Σ r_i = 3 < R = 16
def test_flexlora_equals_the_dense_svd_of_the_weighted_sum(ranks):
    n, k, rank = 40, 24, 16
    updates = _updates(n, k, rank, ranks, seed=len(ranks))
    s = build_strategy("flexlora", _start(n, k, rank), {}, seed=3)
    s.aggregate(0, updates)
    sizes = torch.tensor([u.num_examples for u in updates], dtype=torch.float64)
    weights = sizes / sizes.sum()
    ideal = sum(w * dense(Factors(u.adapter["layer"].a, u.adapter["layer"].b)) for w, u in zip(weights.tolist(), updates))
    torch.testing.assert_close(dense(s.global_factors("layer")), ideal, rtol=1e-5, atol=1e-5)  # kept exactly
    u, sv, vh = torch.linalg.svd(ideal, full_matrices=False)
    for client_rank in (1, 4, rank):  # each client's truncation: the top r_i components
        plan = s.configure_client(1, 0, client_rank)
        c = client_rank
        torch.testing.assert_close(dense(plan.adapter["layer"]), (u[:, :c] * sv[:c]) @ vh[:c], rtol=1e-4, atol=1e-4)
    a = s.adapter["layer"].a.double()
    torch.testing.assert_close(a @ a.T, torch.eye(rank, dtype=torch.float64), atol=1e-5, rtol=0)  # A = Vᵀ: orthonormal rows
    if sum(ranks) < rank:  # components beyond rank(ΔW): B zero, A an orthonormal completion (trainable modules)
        assert not s.adapter["layer"].b[:, sum(ranks) :].any()


def test_hetlora_weights_equal_the_dense_norm_weights():
    n, k, rank = 30, 20, 8
    updates = _updates(n, k, rank, [2, 8, 4], seed=4)
    s = build_strategy("hetlora", _start(n, k, rank), {})
    s.aggregate(0, updates)
    norms = torch.tensor([float(dense(u.adapter["layer"]).norm()) for u in updates], dtype=torch.float64)
    w = norms / norms.sum()
    expected_a = sum(wi * u.adapter["layer"].a.double() for wi, u in zip(w.tolist(), updates))
    torch.testing.assert_close(s.adapter["layer"].a.double(), expected_a, rtol=1e-6, atol=1e-6)


ROUND_ON_A_LARGE_LAYER = """
import json, resource, sys, torch
from fed_plora.fl.measures.noise import initialisation_noise, round_aggregation_noise
from fed_plora.fl.strategies import ClientUpdate, Factors, build_strategy
torch.set_num_threads(1)
n = k = int(sys.argv[1]); rank = 16
gen = torch.Generator().manual_seed(0)
start = {"layer": Factors(torch.randn(rank, k, generator=gen) / k**0.5, torch.zeros(n, rank))}
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
peak = {}
for method in ("flexlora", "hetlora", "fedplora"):
    s = build_strategy(method, start, {})
    updates = []
    for client in range(10):
        r = (2, 4, 8, 16)[client % 4]
        a, b = start["layer"].a.clone(), torch.zeros(n, rank)
        b[:, :r] = torch.randn(n, r, generator=gen) * 1e-2
        updates.append(ClientUpdate(client, 100 + client, {"layer": Factors(a, b)}, {"layer": torch.arange(r)}, {}))
    for u in updates:
        initialisation_noise([(u.adapter["layer"], s.global_factors("layer"))])
    result = s.aggregate(0, updates)
    round_aggregation_noise(s, result.base_update, updates, [0.1] * 10)
    peak[method] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before
print(json.dumps(peak))
"""


def test_a_server_round_on_a_large_layer_forms_nothing_of_its_size():
    """N = K = 12288: one dense fp32 ``[N, K]`` is 576 MiB; FlexLoRA, HetLoRA, Fed-PLoRA and both noise measures
    stay far below it (10 clients, ranks up to 16)."""
    done = subprocess.run([sys.executable, "-c", ROUND_ON_A_LARGE_LAYER, "12288"], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    peak = json.loads(done.stdout)
    dense_bytes = 12288 * 12288 * 4
    assert all(grown < dense_bytes / 2 for grown in peak.values()), peak  # measured here: 73 MiB
