"""FedEx-LoRA (exact aggregation, the residual merged into the base), RB-LoRA (each module averaged over the
clients whose rank reaches it) and Fed-PLoRA's ablations (fixed selection, dropped modules), on small
hand-made tensors and, for FedEx-LoRA, through the simulator."""

import pytest
import torch
from helpers import REPO_ROOT, moved_update, needs_data, tiny_config

from fed_plora.fl.measures import costs
from fed_plora.fl.measures.noise import round_aggregation_noise
from fed_plora.fl.strategies import STRATEGIES, ClientUpdate, Factors, build_strategy
from fed_plora.fl.strategies.fedplora import select_modules, selection_seed
from fed_plora.fl.study.config import load_study

R, K, N = 4, 7, 5
S = 2.0  # the layers' scale alpha / R
LAYERS = ("l0", "l1")


def start(seed=0):
    """A global adapter with nonzero B (a model some rounds in), and a head."""
    generator = torch.Generator().manual_seed(seed)
    adapter = {n: Factors(torch.randn(R, K, generator=generator), torch.randn(N, R, generator=generator)) for n in LAYERS}
    return adapter, {"head": torch.randn(2, 3, generator=generator)}


def fedex_round(ranks_sizes, weighting="data", seed=0):
    strategy = build_strategy("fedex", *start(seed), weighting=weighting)
    plans = [strategy.configure_client(0, c, r) for c, (r, _) in enumerate(ranks_sizes)]
    updates = [moved_update(p, size, 10 + c) for c, (p, (_, size)) in enumerate(zip(plans, ranks_sizes))]
    return strategy, updates, strategy.aggregate(0, updates)


@pytest.mark.parametrize("weighting", ["data", "uniform"])
def test_fedex_residual_makes_the_round_exact(weighting):
    """W0 + s·E + s·B̄Ā equals W0 + s·Σ p_i B_i A_i (the dense formula), with Ā, B̄ the zero-padded means
    and E factored at rank at most Σ r_i + R."""
    ranks_sizes = [(1, 3), (2, 5), (4, 2)]
    strategy, updates, result = fedex_round(ranks_sizes, weighting)
    sizes = torch.tensor([s for _, s in ranks_sizes], dtype=torch.float64)
    p = sizes / sizes.sum() if weighting == "data" else torch.full((3,), 1 / 3, dtype=torch.float64)
    w0 = torch.randn(N, K, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    for name in LAYERS:
        a_mean = sum(pi * u.adapter[name].a.double() for pi, u in zip(p, updates))
        b_mean = sum(pi * u.adapter[name].b.double() for pi, u in zip(p, updates))
        for r, u in zip((1, 2, 4), updates):  # a client's modules beyond its rank are zero (the padding)
            assert not u.adapter[name].a[r:].any() and not u.adapter[name].b[:, r:].any()
        torch.testing.assert_close(strategy.adapter[name].a.double(), a_mean, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(strategy.adapter[name].b.double(), b_mean, rtol=1e-6, atol=1e-6)
        residual = result.base_update[name]
        assert residual.a.shape[0] <= 1 + 2 + 4 + R
        ideal = w0 + S * sum(pi * u.adapter[name].delta().double() for pi, u in zip(p, updates))
        got = w0 + S * residual.delta().double() + S * strategy.adapter[name].delta().double()
        torch.testing.assert_close(got, ideal, rtol=1e-5, atol=1e-5)
        # the residual is what FedIT's mean misses: not zero here
        assert residual.delta().norm() > 1e-2 * ideal.norm()


def test_fedex_aggregation_noise_is_zero_where_fedits_is_not():
    """The harness's aggregation noise (global update plus the round's base update against Σ p_i ΔW_i)
    measures the exact method at ~0 and FedIT's mean of the same updates well above it."""
    strategy, updates, result = fedex_round([(1, 3), (2, 5), (4, 2)])
    weights = [3 / 10, 5 / 10, 2 / 10]
    assert round_aggregation_noise(strategy, result.base_update, updates, weights) < 1e-6
    fedit = build_strategy("fedit", *start(), client_rank=R)
    fedit.aggregate(0, updates)
    assert round_aggregation_noise(fedit, None, updates, weights) > 1e-2


def test_fedex_sends_the_residuals_a_client_missed_and_counts_them():
    strategy = fedex_round([(1, 3), (2, 5)])[0]
    strategy.aggregate(1, [moved_update(strategy.configure_client(1, 0, 2), 3, 7)])
    assert len(strategy.merged_updates()) == 2
    late = strategy.configure_client(2, 5, 2)  # a client that never took part: both residuals
    assert late.init == {"base_updates": 2}
    assert sorted(type(strategy).client_base_updates(late.download, late.init)) == [0, 1]
    residual_values = sum((f.a.numel() + f.b.numel()) for update in strategy.merged_updates() for f in update.values())
    own = len(LAYERS) * 2 * (N + K) + 2 * 3  # its rank-2 modules and the head
    assert costs.payload_values(late.download) == own + residual_values
    assert late.client_flops == sum(2.0 * N * K * f.a.shape[0] for u in strategy.merged_updates() for f in u.values())
    again = strategy.configure_client(3, 0, 2)  # client 0 took part in round 1: only residual 1
    assert sorted(type(strategy).client_base_updates(again.download, again.init)) == [1]


def test_fedex_one_client_at_full_rank_has_no_residual():
    """One client of rank R: the means are its factors and the residual is exactly zero (merging it changes
    nothing, bit for bit)."""
    strategy, updates, result = fedex_round([(R, 9)])
    for name in LAYERS:
        assert torch.equal(strategy.adapter[name].a, updates[0].adapter[name].a)
        assert torch.equal(strategy.adapter[name].b, updates[0].adapter[name].b)
        assert not result.base_update[name].delta().any()


def test_fedex_a_round_of_zero_updates_has_one_zero_module():
    adapter = {n: Factors(torch.zeros(R, K), torch.zeros(N, R)) for n in LAYERS}
    strategy = build_strategy("fedex", adapter, {"head": torch.zeros(2, 3)})
    plan = strategy.configure_client(0, 0, 2)
    result = strategy.aggregate(0, [ClientUpdate(0, 4, plan.adapter, plan.trained, plan.extra)])
    for name in LAYERS:
        residual = result.base_update[name]
        assert residual.a.shape == (1, K) and residual.b.shape == (N, 1) and not residual.delta().any()


def rblora_updates():
    """Three clients of ranks 1, 2 and 4 with 1, 2 and 3 examples; client i sets its modules to a = i + 1 + j,
    b = −(i + 1) − j (module j), its others zero."""
    updates = []
    for i, (rank, size) in enumerate(((1, 1), (2, 2), (4, 3))):
        a, b = torch.zeros(R, K), torch.zeros(N, R)
        for j in range(rank):
            a[j], b[:, j] = i + 1 + j, -(i + 1) - j
        updates.append(ClientUpdate(i, size, {"l0": Factors(a, b)}, {"l0": torch.arange(rank)}, {"head": torch.zeros(2, 3)}))
    return updates


def test_rblora_averages_each_module_over_the_clients_that_reach_it():
    """Hand-computed: module 0 over all three clients (1:2:3), module 1 over clients 1 and 2 (2:3), modules 2
    and 3 client 2's alone; and the same as the authors' rank-balanced weights γ_j^(i) = α_i β_j on the
    zero-padded factors, α_i = n_i / Σ n, β_j = Σ n / Σ_{r_k > j} n_k."""
    global_a = torch.full((R, K), 100.0)
    strategy = build_strategy("rblora", {"l0": Factors(global_a, torch.zeros(N, R))}, {"head": torch.zeros(2, 3)})
    updates = rblora_updates()
    strategy.aggregate(0, updates)
    a, b = strategy.adapter["l0"]
    expected = [(1 * 1 + 2 * 2 + 3 * 3) / 6, (2 * 3 + 3 * 4) / 5, 5.0, 6.0]
    torch.testing.assert_close(a[:, 0], torch.tensor(expected))
    torch.testing.assert_close(b[0], -torch.tensor(expected))
    sizes, ranks = torch.tensor([1.0, 2.0, 3.0]), torch.tensor([1, 2, 4])
    alpha = sizes / sizes.sum()
    beta = torch.tensor([sizes.sum() / sizes[ranks > j].sum() for j in range(R)])
    authors_a = sum(alpha[i] * beta[:, None] * u.adapter["l0"].a for i, u in enumerate(updates))
    authors_b = sum(alpha[i] * beta[None, :] * u.adapter["l0"].b for i, u in enumerate(updates))
    torch.testing.assert_close(a, authors_a)
    torch.testing.assert_close(b, authors_b)
    strategy.aggregate(1, updates[:2])  # nobody reaches modules 2 and 3: they keep their values
    torch.testing.assert_close(strategy.adapter["l0"].a[2:, 0], torch.tensor([5.0, 6.0]))


def test_rblora_is_fedplora_with_fixed_selection_and_dropped_modules():
    """RB-LoRA's rounds (truncated plans, the holders' mean) are Fed-PLoRA's with selection = "first" and
    untrained = "drop": the same plans, traffic and global adapter after every round."""
    adapter, extra = start()
    rblora = build_strategy("rblora", adapter, extra)
    ablated = build_strategy("fedplora", adapter, extra, selection="first", untrained="drop")
    for rnd in range(2):
        rounds = []
        for strategy in (rblora, ablated):
            plans = [strategy.configure_client(rnd, c, r) for c, r in ((0, 1), (1, 3), (2, 2))]
            rounds.append(plans)
            strategy.aggregate(rnd, [moved_update(p, 4 + c, 10 * rnd + c) for c, p in enumerate(plans)])
        for ours, theirs in zip(*rounds):
            assert ours.download.keys() == theirs.download.keys()
            assert all(torch.equal(ours.download[k], theirs.download[k]) for k in ours.download)
            for name in LAYERS:
                assert torch.equal(ours.trained[name], theirs.trained[name])
                assert torch.equal(ours.adapter[name].a, theirs.adapter[name].a)
                assert torch.equal(ours.adapter[name].b, theirs.adapter[name].b)
        for name in LAYERS:
            assert torch.equal(rblora.adapter[name].a, ablated.adapter[name].a)
            assert torch.equal(rblora.adapter[name].b, ablated.adapter[name].b)


def test_fedplora_defaults_are_random_selection_and_folding():
    adapter, extra = start()
    default = build_strategy("fedplora", adapter, extra, seed=7).configure_client(3, 5, 2)
    assert default.trained["l0"].tolist() == select_modules(2, R, selection_seed(7, 3, 5)).tolist()
    assert default.init == {} and default.download["l0.a"].shape == (R, K)  # every module sent, nothing else
    assert torch.equal(default.adapter["l0"].b, adapter["l0"].b)  # the global model: folded, not dropped


def test_fedplora_first_selection_trains_the_first_modules_and_folds_the_rest():
    adapter, extra = start()
    plan = build_strategy("fedplora", adapter, extra, selection="first").configure_client(0, 0, 3)
    assert plan.trained["l0"].tolist() == [0, 1, 2]
    assert torch.equal(plan.adapter["l0"].b, adapter["l0"].b) and plan.download["l0.b"].shape == (N, R)


def test_fedplora_drop_starts_from_the_selected_modules_alone():
    """With untrained = "drop" a client's other modules are zero (nothing to fold) and not sent; the server's
    mean is the same as with folding for the same trained values (holders and clients means)."""
    adapter, extra = start()
    for mean in ("holders", "clients"):
        drop = build_strategy("fedplora", adapter, extra, seed=2, untrained="drop", module_mean=mean)
        fold = build_strategy("fedplora", adapter, extra, seed=2, module_mean=mean)
        drop_updates, fold_updates = [], []
        for c, r in ((0, 1), (1, 2)):
            plan = drop.configure_client(0, c, r)
            idx = plan.trained["l0"]
            assert idx.tolist() == select_modules(r, R, selection_seed(2, 0, c)).tolist()
            assert plan.download["l0.a"].shape == (r, K) and plan.download["l0.b"].shape == (N, r)
            outside = torch.ones(R, dtype=torch.bool)
            outside[idx] = False
            assert not plan.adapter["l0"].a[outside].any() and not plan.adapter["l0"].b[:, outside].any()
            assert torch.equal(plan.adapter["l0"].a[idx], adapter["l0"].a[idx])
            update = moved_update(plan, 3 + c, c)
            drop_updates.append(update)
            folded = {}  # the same trained values over the folded plan's other modules
            for name, (a, b) in fold.configure_client(0, c, r).adapter.items():
                a, b = a.clone(), b.clone()
                a[idx], b[:, idx] = update.adapter[name].a[idx], update.adapter[name].b[:, idx]
                folded[name] = Factors(a, b)
            fold_updates.append(ClientUpdate(c, 3 + c, folded, update.trained, update.extra))
        drop.aggregate(0, drop_updates)
        fold.aggregate(0, fold_updates)
        for name in LAYERS:
            assert torch.equal(drop.adapter[name].a, fold.adapter[name].a)
            assert torch.equal(drop.adapter[name].b, fold.adapter[name].b)


def test_bad_ablation_options_are_named():
    adapter, extra = start()
    with pytest.raises(ValueError, match=r"selection must be one of \('random', 'first'\), got 'last'"):
        build_strategy("fedplora", adapter, extra, selection="last")
    with pytest.raises(ValueError, match=r"untrained must be one of \('fold', 'drop'\), got 'zero'"):
        build_strategy("fedplora", adapter, extra, untrained="zero")


@needs_data
def test_fedex_with_one_full_rank_client_is_centralised_training(tiny_models, tmp_path):
    """One client at rank R = 4, every round: FedEx-LoRA's rounds equal FedIT's at rank R (plain local
    training on that client's data, the adapter carried over), every parameter of the final model bit for
    bit, and every logged loss and score; FedEx's downlink adds the (zero) residuals."""
    from fed_plora.fl.federation import build_federation
    from fed_plora.fl.model import load_model, load_tokenizer
    from fed_plora.fl.rounds.simulate import simulate

    config = tiny_config(
        tiny_models,
        tmp_path,
        "federation.clients=1",
        "federation.fraction=1.0",
        "federation.rounds=3",
        'federation.rank_scheme="fixed"',
        "federation.rank_choices=[4]",
        "methods.fedit.client_rank=4",
        "train.local_steps=2",
    )
    tokenizer = load_tokenizer(config.model.name)
    fed = build_federation(config, tokenizer)
    runs = {}
    for method in ("fedex", "fedit"):
        model = load_model(config.model.name, fed.task, tokenizer.pad_token_id, 0, torch.device("cpu"), torch.float32)
        records = simulate(config, method, fed, model, tokenizer, None)
        runs[method] = (records, model.state_dict())
    (fedex, fedex_model), (fedit, fedit_model) = runs["fedex"], runs["fedit"]
    assert fedex_model.keys() == fedit_model.keys()
    for key, value in fedex_model.items():
        assert torch.equal(value, fedit_model[key]), key
    for ours, theirs in zip(fedex, fedit, strict=True):
        for key in ("train_loss", "eval_matthews", "init_noise", "bytes_up_fp32"):
            assert ours[key] == theirs[key], key
        assert ours["agg_noise"] < 1e-6
    assert fedex[0]["bytes_down_fp32"] == fedit[0]["bytes_down_fp32"]  # nothing merged before round 1
    assert fedex[2]["bytes_down_fp32"] > fedit[2]["bytes_down_fp32"]  # the residual of round 2


def test_the_methods_study_runs_every_method_and_each_ablation_changes_one_thing():
    """``configs/study_sst2_methods.toml`` loads (every cell's config valid): 5 seeds, both levels with the seven
    methods and the majority and centralised rows; each severe-level ablation is the severe setting's
    Fed-PLoRA with one change."""
    study = load_study(REPO_ROOT / "configs" / "study_sst2_methods.toml")
    assert study.seeds == [0, 1, 2, 3, 4] and len(study.cells) == 5 * 5
    for level in ("moderate", "severe"):
        config = study.cell(level, 0).config
        assert config.methods.names == list(STRATEGIES) and config.references.names == ["majority", "centralised"]
        assert config.federation.partition == "dirichlet" and config.federation.dirichlet_alpha == 0.5
    severe = study.cell("severe", 0).config.to_dict()
    changes = {
        "severe-first": ("methods", "fedplora", "selection", "first"),
        "severe-drop": ("methods", "fedplora", "untrained", "drop"),
        "severe-uniform": ("federation", "weighting", "uniform"),
    }
    for setting, change in changes.items():
        ablated = study.cell(setting, 0).config.to_dict()
        assert ablated["methods"]["names"] == ["fedplora"] and ablated["references"]["names"] == []
        expected = {
            **severe,
            "run": ablated["run"],
            "methods": {**severe["methods"], "names": ["fedplora"]},
            "references": {**severe["references"], "names": []},
        }
        *path, key, value = change
        table = expected
        for part in path:
            table[part] = table = dict(table[part])
        table[key] = value
        assert ablated == expected, setting
