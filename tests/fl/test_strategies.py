"""Aggregation rules of every strategy on small hand-made tensors."""

import pytest
import torch

from fed_plora.fl.strategies import ClientUpdate, Factors, build_strategy
from fed_plora.fl.strategies.fedplora import select_modules, selection_seed

R, K, N = 4, 3, 2


def global_adapter():
    a = torch.arange(R * K, dtype=torch.float32).reshape(R, K) / 10
    b = -torch.arange(N * R, dtype=torch.float32).reshape(N, R) / 10
    return {"layer": Factors(a, b)}


HEAD = {"head.weight": torch.zeros(2, 2)}


def update(client, size, a, b, trained, head_value=0.0):
    return ClientUpdate(
        client, size, {"layer": Factors(a, b)}, {"layer": torch.tensor(trained)}, {"head.weight": torch.full((2, 2), head_value)}
    )


def filled(value_a, value_b, modules=range(R)):
    a, b = torch.zeros(R, K), torch.zeros(N, R)
    for j in modules:
        a[j] = value_a + j
        b[:, j] = value_b + j
    return a, b


def two_clients_on_overlapping_modules():
    """The global adapter and two updates: client 0 (1 example) trains modules 0, 1 (a := 1, b := 2), client 1
    (3 examples) trains 1, 2 (a := 5, b := 6); module 3 is trained by nobody."""
    g = global_adapter()["layer"]
    a0, b0 = g.a.clone(), g.b.clone()
    a0[[0, 1]], b0[:, [0, 1]] = 1.0, 2.0
    a1, b1 = g.a.clone(), g.b.clone()
    a1[[1, 2]], b1[:, [1, 2]] = 5.0, 6.0
    return g, [update(0, 1, a0, b0, [0, 1], 1.0), update(1, 3, a1, b1, [1, 2], 5.0)]


def test_fedplora_clients_mean_averages_each_module_over_the_rounds_clients():
    s = build_strategy("fedplora", global_adapter(), HEAD, module_mean="clients")
    g, updates = two_clients_on_overlapping_modules()
    s.aggregate(0, updates)
    a, b = s.adapter["layer"]
    # module 0: client 0 (weight 1/4) moved it, client 1 (3/4) returned it as received
    torch.testing.assert_close(a[0], 0.25 * torch.full((K,), 1.0) + 0.75 * g.a[0])
    torch.testing.assert_close(b[:, 0], 0.25 * torch.full((N,), 2.0) + 0.75 * g.b[:, 0])
    torch.testing.assert_close(a[1], torch.full((K,), (1 * 1.0 + 3 * 5.0) / 4))  # both trained it: data weights
    torch.testing.assert_close(b[:, 1], torch.full((N,), (1 * 2.0 + 3 * 6.0) / 4))
    torch.testing.assert_close(a[2], 0.25 * g.a[2] + 0.75 * torch.full((K,), 5.0))
    torch.testing.assert_close(a[3], g.a[3])  # nobody: keeps the global value
    torch.testing.assert_close(b[:, 3], g.b[:, 3])
    torch.testing.assert_close(s.extra["head.weight"], torch.full((2, 2), 4.0))  # FedAvg over all clients


def test_fedplora_averages_each_module_over_its_trainers_by_default():
    s = build_strategy("fedplora", global_adapter(), HEAD)
    g, updates = two_clients_on_overlapping_modules()
    s.aggregate(0, updates)
    a, b = s.adapter["layer"]
    torch.testing.assert_close(a[0], torch.full((K,), 1.0))  # only client 0: its factors whole
    torch.testing.assert_close(a[1], torch.full((K,), (1 * 1.0 + 3 * 5.0) / 4))
    torch.testing.assert_close(b[:, 1], torch.full((N,), (1 * 2.0 + 3 * 6.0) / 4))
    torch.testing.assert_close(a[2], torch.full((K,), 5.0))  # only client 1
    torch.testing.assert_close(a[3], g.a[3])
    torch.testing.assert_close(b[:, 3], g.b[:, 3])


def test_fedplora_clients_mean_moves_a_module_by_its_trainers_share_of_the_round():
    """With ``module_mean = "clients"`` a small client alone on a module moves it by its share of the round, not
    by its whole update: the aggregated update is the round's ideal ``Σ p_i ΔW_i`` (with the holder-only mean, a
    module held by one client of weight 1/100 takes that client's factors whole, 100 times its share)."""
    zero_b = {"layer": Factors(global_adapter()["layer"].a, torch.zeros(N, R))}
    s = build_strategy("fedplora", zero_b, HEAD, module_mean="clients")
    g = s.adapter["layer"]
    small_a, small_b = g.a.clone(), g.b.clone()
    small_b[:, 0] = 1.0  # the small client trained module 0 only
    big_a, big_b = g.a.clone(), g.b.clone()
    big_b[:, 1] = 1.0  # the big one module 1
    updates = [update(0, 1, small_a, small_b, [0]), update(1, 99, big_a, big_b, [1])]
    s.aggregate(0, updates)
    ideal = 0.01 * updates[0].adapter["layer"].delta() + 0.99 * updates[1].adapter["layer"].delta()
    got = s.adapter["layer"].delta()
    torch.testing.assert_close(got, ideal)  # B starts at zero: the products carry no cross term
    torch.testing.assert_close(s.adapter["layer"].b[:, 0], torch.full((N,), 0.01))


@pytest.mark.parametrize("module_mean", ["holders", "clients"])
def test_fedplora_equals_fedavg_of_factors_when_every_client_trains_every_module(module_mean):
    s = build_strategy("fedplora", global_adapter(), HEAD, module_mean=module_mean)
    fedit = build_strategy("fedit", global_adapter(), HEAD, client_rank=R)
    a0, b0 = filled(1.0, 2.0)
    a1, b1 = filled(3.0, -1.0)
    updates = [update(0, 2, a0, b0, list(range(R))), update(1, 5, a1, b1, list(range(R)))]
    s.aggregate(0, updates)
    fedit.aggregate(0, updates)
    assert torch.equal(s.adapter["layer"].a, fedit.adapter["layer"].a)
    assert torch.equal(s.adapter["layer"].b, fedit.adapter["layer"].b)


def test_fedplora_uniform_weights():
    s = build_strategy("fedplora", global_adapter(), HEAD, weighting="uniform")
    a0, b0 = filled(1.0, 1.0)
    a1, b1 = filled(3.0, 3.0)
    s.aggregate(0, [update(0, 1, a0, b0, [0, 1]), update(1, 9, a1, b1, [1])])
    torch.testing.assert_close(s.adapter["layer"].a[1], torch.full((K,), 3.0))  # (2 + 4) / 2
    s = build_strategy("fedplora", global_adapter(), HEAD, weighting="uniform", module_mean="clients")
    s.aggregate(0, [update(0, 1, a0, b0, [0, 1]), update(1, 9, a1, b1, [1])])
    torch.testing.assert_close(s.adapter["layer"].a[0], (torch.full((K,), 1.0) + global_adapter()["layer"].a[0]) / 2)


def test_fedplora_plan_is_the_global_model_with_seeded_selection():
    s = build_strategy("fedplora", global_adapter(), HEAD, seed=7)
    plan = s.configure_client(3, 5, 2)
    torch.testing.assert_close(plan.adapter["layer"].a, global_adapter()["layer"].a)  # zero initialisation noise
    assert plan.trained["layer"].tolist() == select_modules(2, R, selection_seed(7, 3, 5)).tolist()
    again = build_strategy("fedplora", global_adapter(), HEAD, seed=7).configure_client(3, 5, 2)
    assert plan.trained["layer"].tolist() == again.trained["layer"].tolist()
    assert len(set(plan.trained["layer"].tolist())) == 2
    assert plan.download["layer.a"].shape == (R, K) and plan.download["layer.b"].shape == (N, R)  # all R modules go down
    draws = {tuple(s.configure_client(r, 0, 2).trained["layer"].tolist()) for r in range(20)}
    assert len(draws) > 1


def test_fedit_averages_a_and_b_separately():
    s = build_strategy("fedit", global_adapter(), HEAD, client_rank=2)
    plan = s.configure_client(0, 0, 4)
    assert plan.trained["layer"].tolist() == [0, 1]
    assert plan.download["layer.a"].shape == (2, K)
    assert torch.count_nonzero(plan.adapter["layer"].a[2:]) == 0
    a0, b0 = filled(1.0, 10.0, range(2))
    a1, b1 = filled(3.0, 20.0, range(2))
    s.aggregate(0, [update(0, 1, a0, b0, [0, 1]), update(1, 3, a1, b1, [0, 1])])
    torch.testing.assert_close(s.adapter["layer"].a, 0.25 * a0 + 0.75 * a1)
    torch.testing.assert_close(s.adapter["layer"].b, 0.25 * b0 + 0.75 * b1)


def test_flora_stack_reproduces_the_weighted_sum_and_restarts():
    s = build_strategy("flora", global_adapter(), HEAD)
    p0 = s.configure_client(0, 0, 1)
    p1 = s.configure_client(0, 1, 3)
    assert torch.count_nonzero(p0.adapter["layer"].b) == 0 and torch.count_nonzero(p0.adapter["layer"].a[1:]) == 0
    assert not torch.equal(p0.adapter["layer"].a[0], p1.adapter["layer"].a[0])  # a fresh A per client, as the reference
    again = build_strategy("flora", global_adapter(), HEAD).configure_client(0, 1, 3)
    torch.testing.assert_close(again.adapter["layer"].a, p1.adapter["layer"].a, rtol=0, atol=0)  # seeded by run, round, client
    a0, b0 = filled(1.0, 2.0, range(1))
    a1, b1 = filled(3.0, 4.0, range(3))
    u0, u1 = update(0, 1, a0, b0, [0]), update(1, 3, a1, b1, [0, 1, 2])
    result = s.aggregate(0, [u0, u1])
    stack = result.base_update["layer"]
    assert stack.a.shape == (4, K) and stack.b.shape == (N, 4)  # rank 1 + 3 stacked
    torch.testing.assert_close(stack.b @ stack.a, 0.25 * (b0 @ a0) + 0.75 * (b1 @ a1))
    assert torch.count_nonzero(s.global_factors("layer").delta()) == 0  # new modules: B = 0
    # Client 0 took part in round 0 (received nothing then); client 2 never did: both get the stack.
    assert "stack0.layer.a" in s.configure_client(1, 0, 2).download
    s.aggregate(1, [update(0, 1, a0, b0, [0])])
    late = s.configure_client(2, 2, 2)
    assert {"stack0.layer.a", "stack1.layer.a"} <= set(late.download)
    assert late.client_flops > 0


def test_hetlora_truncates_zero_pads_and_weights_by_norm():
    s = build_strategy("hetlora", global_adapter(), HEAD)
    plan = s.configure_client(0, 0, 2)
    g = global_adapter()["layer"]
    torch.testing.assert_close(plan.adapter["layer"].a[:2], g.a[:2])
    assert torch.count_nonzero(plan.adapter["layer"].a[2:]) == 0 and plan.download["layer.b"].shape == (N, 2)
    a0, b0 = filled(1.0, 1.0, range(2))
    a1, b1 = filled(2.0, 1.0, range(4))
    n0 = torch.linalg.matrix_norm(b0 @ a0)
    n1 = torch.linalg.matrix_norm(b1 @ a1)
    s.aggregate(0, [update(0, 100, a0, b0, [0, 1]), update(1, 1, a1, b1, [0, 1, 2, 3])])
    w0, w1 = n0 / (n0 + n1), n1 / (n0 + n1)
    torch.testing.assert_close(s.adapter["layer"].a, w0 * a0 + w1 * a1)  # a0's rows 2, 3 are the zero padding
    torch.testing.assert_close(s.adapter["layer"].b, w0 * b0 + w1 * b1)


def test_hetlora_self_pruning_shrinks_a_client_whose_tail_fades():
    s = build_strategy("hetlora", global_adapter(), HEAD, prune_gamma=0.5)
    strong_a, strong_b = filled(1.0, 1.0)
    weak_a, weak_b = strong_a.clone(), strong_b.clone()
    weak_b[:, 2:] *= 0.1
    s.aggregate(0, [update(0, 1, strong_a, strong_b, [0, 1, 2, 3])])
    assert s.configure_client(1, 0, 4).trained["layer"].numel() == 4
    s.aggregate(1, [update(0, 1, weak_a, weak_b, [0, 1, 2, 3])])
    assert s.configure_client(2, 0, 4).trained["layer"].numel() == 2


def test_flexlora_svd_of_the_weighted_products():
    s = build_strategy("flexlora", global_adapter(), HEAD)
    torch.manual_seed(0)
    a0, b0 = torch.randn(R, K), torch.randn(N, R)
    a1, b1 = torch.randn(R, K), torch.randn(N, R)
    a0[2:], b0[:, 2:] = 0, 0
    s.aggregate(0, [update(0, 1, a0, b0, [0, 1]), update(1, 3, a1, b1, [0, 1, 2, 3])])
    ideal = 0.25 * (b0 @ a0) + 0.75 * (b1 @ a1)
    torch.testing.assert_close(s.global_factors("layer").delta(), ideal)  # the server keeps ΔW exactly
    # N = 2 < R = 4 components exist: the global adapter keeps R modules, the missing ones zero
    assert s.adapter["layer"].a.shape == (R, K) and s.adapter["layer"].b.shape == (N, R)
    assert not s.adapter["layer"].a[N:].any() and not s.adapter["layer"].b[:, N:].any()
    u, sv, vh = torch.linalg.svd(ideal)
    plan = s.configure_client(1, 0, 1)  # rank 1: the top singular component
    torch.testing.assert_close(
        plan.adapter["layer"].b @ plan.adapter["layer"].a, sv[0] * torch.outer(u[:, 0], vh[0]), atol=1e-5, rtol=1e-5
    )
    full = s.configure_client(1, 1, R)  # rank ≥ rank(ΔW) = 2 here: exact
    torch.testing.assert_close(full.adapter["layer"].b @ full.adapter["layer"].a, ideal, atol=1e-5, rtol=1e-5)


def test_unknown_method_and_bad_arguments_are_named():
    with pytest.raises(KeyError, match="unknown method 'fedx'"):
        build_strategy("fedx", global_adapter(), HEAD)
    with pytest.raises(ValueError, match="weighting"):
        build_strategy("fedplora", global_adapter(), HEAD, weighting="size")
    with pytest.raises(ValueError, match="client rank"):
        build_strategy("fedplora", global_adapter(), HEAD).configure_client(0, 0, R + 1)
    with pytest.raises(ValueError, match="client_rank"):
        build_strategy("fedit", global_adapter(), HEAD, client_rank=0)


def test_the_registry_holds_every_method_once_and_refuses_a_taken_name():
    """Each method's module registers its class; a second class under a taken (or no) name is refused and
    the registry is left as it was."""
    from fed_plora.fl.strategies import STRATEGIES, FedIT, register

    assert list(STRATEGIES) == ["fedplora", "fedit", "flora", "hetlora", "flexlora", "fedex", "rblora"]
    before = dict(STRATEGIES)
    for name in ("fedit", ""):
        clash = type("Clash", (FedIT,), {"name": name})
        with pytest.raises(ValueError, match="empty or taken"):
            register(clash)
    assert before == STRATEGIES


def test_run_dependent_options_are_the_options_own():
    """FedIT's unset client_rank resolves to the smallest budget, and a rank above R is refused, by its
    ``Options`` (the run config only calls them)."""
    from fed_plora.fl.strategies import FedIT

    options = FedIT.Options()
    assert options.for_clients([8, 2, 4]).client_rank == 2 and options.client_rank is None
    assert FedIT.Options(client_rank=4).for_clients([2]).client_rank == 4
    with pytest.raises(ValueError, match=r"client_rank = 32: must lie in \[1, model.rank = 16\]"):
        FedIT.Options(client_rank=32).check_run(16)
    strategy = FedIT.for_run(global_adapter(), HEAD, "data", 0, options, [8, 2, 4])
    assert strategy.options.client_rank == 2


def test_a_servers_measure_hook_adds_to_every_record_and_sees_the_round():
    """``Server.finish_round`` screens, aggregates, then asks ``measure`` for the record's extra fields with
    the accepted updates, the faults and the aggregation; a rejected client never reaches it."""
    from fed_plora.fl.config import load_config
    from fed_plora.fl.rounds import ClientResult, Server, TrainStats

    class Counting(Server):
        def measure(self, done):
            return {"accepted": [u.client for u in done.updates], "faulty": len(done.faults), "seen": done.aggregated is not None}

    config = load_config(None, ["federation.clients=2", "federation.fraction=1.0", "train.local_steps=3"])
    server = Counting(build_strategy("fedit", global_adapter(), HEAD, client_rank=2), config, [2, 2], client_sizes=[5, 7])
    planned = server.plan_round()
    results = []
    for plan in planned.plans:
        size = [5, 7][plan.client]
        steps = 3 if plan.client == 0 else 4  # client 1 claims a step it was not asked for: rejected
        update = ClientUpdate(plan.client, size, plan.adapter, plan.trained, plan.extra)
        results.append(ClientResult(update, TrainStats(1.0, steps, 0)))
    record = server.finish_round(planned, results)
    assert record["accepted"] == [0] and record["faulty"] == 1 and record["seen"] is True
    assert record["faults"][0]["client"] == 1 and server.records == [record]


def test_module_noise_is_the_mean_of_factors_alone():
    """Against each module's product averaged over its trainers, Fed-PLoRA's holder mean errs only where a
    module's trainers disagree (the mean of factors is not the mean of products): with one trainer per module
    the module-wise noise is zero while the noise against ``Σ p_i ΔW_i`` is not; with every client on every
    module both ideals are the same sum."""
    from fed_plora.fl.measures.noise import clients_ideal, module_ideal, round_aggregation_noise

    g = global_adapter()["layer"]
    a0, b0 = g.a.clone(), g.b.clone()
    a0[[0, 1]], b0[:, [0, 1]] = 1.0, 2.0
    a1, b1 = g.a.clone(), g.b.clone()
    a1[[2]], b1[:, [2]] = 5.0, 6.0
    updates = [update(0, 1, a0, b0, [0, 1]), update(1, 3, a1, b1, [2])]
    s = build_strategy("fedplora", global_adapter(), HEAD)
    s.aggregate(0, updates)
    weights = [0.25, 0.75]
    assert round_aggregation_noise(s, None, updates, weights, module_ideal) == pytest.approx(0.0, abs=1e-7)
    assert round_aggregation_noise(s, None, updates, weights, clients_ideal) > 0.1
    _, overlapping = two_clients_on_overlapping_modules()
    s = build_strategy("fedplora", global_adapter(), HEAD)
    s.aggregate(0, overlapping)
    assert round_aggregation_noise(s, None, overlapping, weights, module_ideal) > 0.01  # module 1: two trainers
    same = [update(c, 1, *filled(c, 2 * c), list(range(R))) for c in range(2)]
    dense = lambda f: f.b.double() @ f.a.double()
    torch.testing.assert_close(dense(module_ideal("layer", same, weights)), dense(clients_ideal("layer", same, weights)))
