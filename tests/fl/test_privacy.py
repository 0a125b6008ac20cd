"""Client-level differential privacy: the sum form against each method's own step, the clip and the noise
planted and measured, the accountant against references, the config's refusals, and a private run."""

import copy
import json
import math

import pytest
import torch
from helpers import DATA, moved_update, simulated, stable, tiny_config

from fed_plora.fl.config import ConfigError, load_config
from fed_plora.fl.privacy.accounting import TOLERANCE, epsilon, noise_for_epsilon
from fed_plora.fl.privacy.mechanism import (
    PrivacyParams,
    aggregate_sums,
    check_secure_sums,
    noise_generator,
    round_sums,
)
from fed_plora.fl.rounds.schedule import round_clients
from fed_plora.fl.storage import read_jsonl
from fed_plora.fl.strategies import ClientUpdate, Factors, build_strategy

dpa = pytest.importorskip("dp_accounting")

R, K, N = 4, 24, 16
HEAD = {"head.weight": torch.zeros(2, 3)}

#: Every method whose step is a sum, with the options that change its sums.
SUMS = [
    ("fedplora", {}),
    ("fedplora", {"module_mean": "clients"}),
    ("fedplora", {"selection": "first", "untrained": "drop"}),
    ("rblora", {}),
    ("fedit", {"client_rank": 2}),
]


def strategy(name, options, seed=0):
    torch.manual_seed(seed)
    adapter = {"q": Factors(torch.randn(R, K), torch.randn(N, R)), "v": Factors(torch.randn(R, K), torch.zeros(N, R))}
    return build_strategy(name, adapter, HEAD, weighting="uniform", seed=seed, **options)


def flat(s):
    """The strategy's global state as one vector (layers' factors and head)."""
    return torch.cat([t.flatten() for f in s.adapter.values() for t in f] + [t.flatten() for t in s.extra.values()])


RANKS = [1, 2, 4, 2, 3]


@pytest.mark.parametrize("name, options", SUMS)
def test_the_sum_form_is_each_methods_own_step(name, options):
    """Without clip or noise, the round in sum form (the step on unchanged clients plus each module's sum of
    deltas over its denominator) is the method's own aggregation, with uniform weights; a planned client
    without an update counts as one that returned its plan unchanged."""
    ours, theirs = strategy(name, options), strategy(name, options)
    plans = [ours.configure_client(0, c, r) for c, r in enumerate(RANKS)]
    for plan, c, r in zip(plans, range(len(RANKS)), RANKS):  # their plans: the same draws
        assert all(torch.equal(i, theirs.configure_client(0, c, r).trained[n]) for n, i in plan.trained.items())
    updates = [moved_update(p, 7, c) for c, p in enumerate(plans)]
    dropped = ClientUpdate(plans[3].client, 7, copy.deepcopy(plans[3].adapter), plans[3].trained, dict(plans[3].extra))
    theirs.aggregate(0, [*updates[:3], dropped, updates[4]])
    _, info = aggregate_sums(ours, 0, plans, updates[:3] + updates[4:], PrivacyParams(math.inf, 0.0))
    torch.testing.assert_close(flat(ours), flat(theirs), rtol=0, atol=1e-5)
    assert info.pop("dp_norm_median") > 0
    assert info == {"dp_clipped": 0, "dp_modules_kept": 0}
    assert not torch.allclose(flat(ours), flat(strategy(name, options)))  # the round moved the model


@pytest.mark.parametrize("name", ["hetlora", "flora", "flexlora", "fedex"])
def test_a_method_that_is_no_sum_is_refused_with_its_reason(name):
    s = strategy(name, {})
    plans = [s.configure_client(0, c, r) for c, r in enumerate(RANKS)]
    with pytest.raises(ValueError, match=f"{name} cannot aggregate in sum form: .*(norms|products|product)"):
        aggregate_sums(s, 0, plans, [], PrivacyParams(1.0, 0.0))


def test_data_size_weights_are_refused():
    s = build_strategy("fedit", strategy("fedit", {"client_rank": 2}).adapter, HEAD, weighting="data", client_rank=2)
    with pytest.raises(ValueError, match="uniform weights"):
        aggregate_sums(s, 0, [s.configure_client(0, 0, 2)], [], PrivacyParams(1.0, 0.0))


@pytest.mark.parametrize("name, options", SUMS)
def test_a_client_a_hundred_times_the_clip_moves_the_model_by_at_most_c_over_its_denominator(name, options):
    """A client whose raw update is 100 C, among clients that return their plans: against the same round
    without its update (FedIT's step alone zeroes the modules beyond its rank), the model moves by exactly
    ``C / n`` where every module it trained is divided by the round's ``n`` clients (FedIT, the clients' mean,
    and every module held by all), and by at most ``C / h`` over a holders' mean, ``h`` the fewest holders of its
    modules; unclipped it would move by 100 times that."""
    s, clip = strategy(name, options), 0.5
    plans = [s.configure_client(0, c, 4) for c in range(5)]  # every client holds every module it can
    big = moved_update(plans[2], 7, 3, 1.0)
    raw = math.sqrt(
        sum(float((x - y).square().sum()) for f, g in zip(big.adapter.values(), plans[2].adapter.values()) for x, y in zip(f, g))
    )
    raw = math.sqrt(raw**2 + float((big.extra["head.weight"] - plans[2].extra["head.weight"]).square().sum()))
    scale = 100 * clip / raw
    big = moved_update(plans[2], 7, 3, scale)
    without = strategy(name, options)  # the same round with the client returning its plan
    aggregate_sums(without, 0, [without.configure_client(0, c, 4) for c in range(5)], [], PrivacyParams(clip, 0.0))
    _, info = aggregate_sums(s, 0, plans, [big], PrivacyParams(clip, 0.0))
    moved = float((flat(s) - flat(without)).norm())
    assert info["dp_clipped"] == 1 and info["dp_norm_median"] == pytest.approx(100 * clip, rel=1e-4)
    assert moved == pytest.approx(clip / len(plans), rel=1e-4)


def test_over_holders_a_lone_holder_moves_its_module_by_at_most_c_and_min_holders_keeps_it():
    """Fed-PLoRA's holder mean: a module trained by one client moves by its whole clipped delta (``C``), the
    others by ``C / h_j``; with ``min_holders = 2`` the lone module keeps its value, is counted, and the clip
    is spent on the modules that count."""
    clip = 0.5
    for min_holders, bound in ((1, clip), (2, clip / 2)):
        s = strategy("fedplora", {"selection": "first"})
        plans = [s.configure_client(0, c, r) for c, r in enumerate([4, 2, 2])]  # modules 2, 3: client 0 alone
        before = copy.deepcopy(s.adapter)
        _, info = aggregate_sums(s, 0, plans, [moved_update(plans[0], 7, 0, 10.0)], PrivacyParams(clip, 0.0, min_holders))
        moved = [
            math.sqrt(
                sum(
                    float((new.a[j] - old.a[j]).square().sum() + (new.b[:, j] - old.b[:, j]).square().sum())
                    for new, old in zip(s.adapter.values(), before.values())
                )
            )
            for j in range(R)
        ]
        total = math.sqrt(sum(m**2 for m in moved) + float(s.extra["head.weight"].square().sum()))
        assert total <= bound * (1 + 1e-5) and total > 0.9 * bound / 3
        assert info["dp_modules_kept"] == (0 if min_holders == 1 else 4)  # modules 2 and 3 in both layers
        if min_holders == 2:
            assert moved[2] == moved[3] == 0.0


def test_the_noise_per_module_has_std_z_c_over_its_denominator():
    """Over many rounds of unchanged clients, each module's change is the noise added to its sum once,
    divided by its denominator: standard deviation ``z C / h_j`` (holders 3, 2, 1 and a module kept by
    ``min_holders`` with none), the head's ``z C / n``."""
    z, clip = 1.3, 0.4
    s = strategy("fedplora", {"selection": "first"})
    changes = {j: [] for j in range(R)}
    head = []
    params = PrivacyParams(clip, z, min_holders=1)
    for draw in range(150):
        plans = [s.configure_client(draw, c, r) for c, r in enumerate([3, 2, 1])]  # holders of modules: 3, 2, 1, 0
        before = copy.deepcopy(s.adapter), s.extra["head.weight"].clone()
        aggregate_sums(s, draw, plans, [], params, noise_generator(0, draw))
        for j in range(R):
            for name, (a, b) in s.adapter.items():
                changes[j] += [a[j] - before[0][name].a[j], b[:, j] - before[0][name].b[:, j]]
        head.append(s.extra["head.weight"] - before[1])
    stds = [float(torch.cat(changes[j]).std()) for j in range(R)]
    for j, holders in enumerate([3, 2, 1]):
        assert stds[j] == pytest.approx(z * clip / holders, rel=0.03), j
    assert stds[3] == 0.0
    assert float(torch.cat([h.flatten() for h in head]).std()) == pytest.approx(z * clip / 3, rel=0.06)


def test_the_noise_is_seeded_by_run_and_round():
    draws = []
    for seed, rnd in ((0, 1), (0, 1), (0, 2), (1, 1)):
        s = strategy("fedplora", {})
        plans = [s.configure_client(0, c, 2) for c in range(3)]
        aggregate_sums(s, rnd, plans, [], PrivacyParams(1.0, 1.0), noise_generator(seed, rnd))
        draws.append(flat(s))
    assert torch.equal(draws[0], draws[1])
    assert not torch.equal(draws[0], draws[2]) and not torch.equal(draws[0], draws[3])


def test_secret_randomness_draws_noise_and_samples_no_seed_repeats():
    """``privacy.randomness = "secret"``: the noise generator and the round's client sample come from the
    operating system's entropy, so the same run seed and round draw anew each time; "seeded" repeats."""
    assert not torch.equal(
        torch.randn(64, generator=noise_generator(None, 1)), torch.randn(64, generator=noise_generator(None, 1))
    )
    seeded, secret = load_config(None, PRIVATE), load_config(None, [*PRIVATE, 'privacy.randomness="secret"'])
    samples = {
        name: [[round_clients(c, rnd) for rnd in range(20)] for _ in range(2)]
        for name, c in (("seeded", seeded), ("secret", secret))
    }
    assert samples["seeded"][0] == samples["seeded"][1]
    assert samples["secret"][0] != samples["secret"][1]  # equal with probability 252^-20
    assert all(len(set(s)) == 5 for s in samples["secret"][0])


# accounting ---------------------------------------------------------------------------------------------


def library_epsilon(z_over_sensitivity, population, sample, steps, delta):
    accountant = dpa.rdp.RdpAccountant(neighboring_relation=dpa.NeighboringRelation.REPLACE_ONE)
    step = dpa.SampledWithoutReplacementDpEvent(population, sample, dpa.GaussianDpEvent(z_over_sensitivity))
    return accountant.compose(step, steps).get_epsilon(delta)


@pytest.mark.parametrize("population, sample, z, steps", [(10, 5, 1.0, 10), (100, 10, 0.8, 50), (50, 1, 2.0, 200)])
def test_epsilon_is_the_librarys_sampling_without_replacement_at_sensitivity_2c(population, sample, z, steps):
    """ε is the library's RDP accountant for fixed-size sampling without replacement, replace-one, each round
    a Gaussian of noise ``z C`` over sensitivity ``2 C``; fewer clients per round spend less."""
    delta = 1e-5
    ours = epsilon(z, sample, population, steps, delta)
    assert ours == pytest.approx(library_epsilon(z / 2, population, sample, steps, delta), rel=1e-9)
    assert ours > library_epsilon(z, population, sample, steps, delta)  # sensitivity C would claim less
    if sample > 1:
        assert epsilon(z, sample - 1, population, steps, delta) < ours
    assert epsilon(z, sample, population, 0, delta) == 0.0


def analytic_gaussian_epsilon(mu, delta):
    """The exact ε(δ) of a Gaussian mechanism of sensitivity over noise ``mu`` (Balle and Wang, 2018), by bisection."""
    phi = lambda x: 0.5 * math.erfc(-x / math.sqrt(2))
    delta_at = lambda eps: phi(-eps / mu + mu / 2) - math.exp(eps) * phi(-eps / mu - mu / 2)
    low, high = 0.0, 100.0
    for _ in range(200):
        mid = (low + high) / 2
        low, high = (mid, high) if delta_at(mid) > delta else (low, mid)
    return high


@pytest.mark.parametrize("z, steps", [(1.0, 10), (4.0, 100), (10.0, 3)])
def test_with_every_client_sampled_epsilon_lies_between_the_exact_gaussian_and_the_classic_rdp_bound(z, steps):
    """With every client in every round, ``steps`` rounds are one Gaussian of sensitivity ``2 C √steps`` over
    noise ``z C``: the accountant's ε cannot beat that mechanism's exact ε(δ), and is no worse than the classic
    conversion ``min_α 2 α steps / z² + log(1/δ) / (α − 1)`` of its RDP."""
    delta = 1e-5
    ours = epsilon(z, 8, 8, steps, delta)
    exact = analytic_gaussian_epsilon(2 * math.sqrt(steps) / z, delta)
    classic = min(2 * a * steps / z**2 + math.log(1 / delta) / (a - 1) for a in [1 + x / 100 for x in range(1, 10000)])
    assert exact <= ours <= classic


def test_the_noise_for_a_target_is_the_smallest_that_meets_it():
    target, delta = 2.0, 1e-4
    z = noise_for_epsilon(target, delta, 5, 20, 30)
    assert epsilon(z, 5, 20, 30, delta) <= target < epsilon(z - 3 * TOLERANCE, 5, 20, 30, delta)


# the config ---------------------------------------------------------------------------------------------

PRIVATE = [
    "privacy.clip=1.0",
    "privacy.noise_multiplier=1.0",
    "privacy.delta=1e-3",
    'federation.weighting="uniform"',
    'methods.names=["fedplora", "fedit", "rblora"]',
]


@pytest.mark.parametrize(
    "overrides, named",
    [
        (['federation.weighting="data"'], r"federation.weighting = 'data': privacy needs 'uniform'"),
        (['methods.names=["fedplora", "hetlora"]'], r"methods.names: 'hetlora' cannot run with privacy: its weights are"),
        (['methods.names=["flexlora"]'], r"methods.names: 'flexlora' cannot run with privacy: its step is an SVD"),
        (["privacy.min_holders=6"], r"privacy.min_holders = 6: exceeds the 5 clients"),
        (
            ["privacy.delta=1e-3", "privacy.target_epsilon=0.5"],
            r"privacy.target_epsilon = 0.5: privacy.noise_multiplier = 1.0 spends ε = ",
        ),
        (["privacy.noise_multiplier=0"], r"privacy.noise_multiplier = 0: must be a number in \(0, inf\)"),
    ],
)
def test_a_refused_private_config_names_the_field(overrides, named):
    with pytest.raises(ConfigError, match=named):
        load_config(None, [*PRIVATE, *overrides])


def test_privacy_fields_need_clip_and_clip_needs_delta_and_a_noise():
    with pytest.raises(ConfigError, match=r"privacy.noise_multiplier = 1.0: privacy is off \(privacy.clip is unset\)"):
        load_config(None, ["privacy.noise_multiplier=1.0"])
    with pytest.raises(ConfigError, match=r"privacy.randomness = 'secret': privacy is off \(privacy.clip is unset\)"):
        load_config(None, ['privacy.randomness="secret"'])
    with pytest.raises(ConfigError, match=r"privacy.randomness = 'random': must be one of seeded, secret"):
        load_config(None, [*PRIVATE, 'privacy.randomness="random"'])
    with pytest.raises(ConfigError, match="privacy.delta: needed"):
        load_config(
            None,
            ["privacy.clip=1.0", "privacy.noise_multiplier=1.0", 'federation.weighting="uniform"', 'methods.names=["fedit"]'],
        )
    with pytest.raises(ConfigError, match="privacy.noise_multiplier, privacy.target_epsilon: set one"):
        load_config(None, ["privacy.clip=1.0", "privacy.delta=0.1", 'federation.weighting="uniform"', 'methods.names=["fedit"]'])
    assert load_config(None, PRIVATE).privacy.clip == 1.0


# runs ---------------------------------------------------------------------------------------------------


@pytest.mark.skipif(not DATA.is_dir(), reason=f"no local data directory at {DATA}")
def test_a_private_run_records_its_epsilon_and_privacy_off_changes_nothing(tiny_models, tmp_path):
    """A private run (noise for a target ε, a client dropped by the norm bound) writes ε spent per round,
    growing to at most the target, the clipped clients, the sum form's upload (all R modules: more than the
    clients' own) and the table's ε; the same run without ``[privacy]`` records none of it, and its records are
    those of a config that never had the section (a ``config.json`` from before it)."""
    methods = 'methods.names=["fedplora", "fedit"]'
    private = tiny_config(
        tiny_models,
        tmp_path,
        methods,
        'federation.weighting="uniform"',
        "privacy.clip=1e-5",
        "privacy.target_epsilon=8.0",
        "privacy.delta=0.01",
        "federation.rounds=3",
        'train.lr_schedule="constant"',
    )
    run = simulated(private, "private")
    records = read_jsonl(run / "metrics.jsonl")
    for method in ("fedplora", "fedit"):
        mine = [r for r in records if r["method"] == method]
        spent = [r["dp_epsilon"] for r in mine]
        assert spent == sorted(spent) and 0 < spent[0] < spent[-1] <= 8.0
        assert all(r["dp_clipped"] == 2 for r in mine)  # two clients a round, each far beyond 1e-5
        assert all(r["bytes_up_sum_bf16"] > r["bytes_up_bf16"] for r in mine if r["ranks"] != [4, 4])
    assert "| ε |" in (run / "summary.md").read_text()
    private.privacy.randomness = "secret"  # the same run, its noise and samples secret: the same ε per round
    secret = read_jsonl(simulated(private, "secret") / "metrics.jsonl")
    assert [r["dp_epsilon"] for r in secret] == [r["dp_epsilon"] for r in records]
    plain = tiny_config(tiny_models, tmp_path, methods, 'federation.weighting="uniform"')
    off = read_jsonl(simulated(plain, "off") / "metrics.jsonl")
    assert not any(k.startswith("dp_") or k == "bytes_up_sum_bf16" for r in off for k in r)
    saved = json.loads((tmp_path / "off" / "config.json").read_text())
    del saved["privacy"], saved["command"]
    from fed_plora.fl.config import Config

    assert Config.from_dict(saved) == plain
    again = read_jsonl(simulated(Config.from_dict(saved), "again") / "metrics.jsonl")
    assert stable(again) == stable(off)


def test_what_a_server_can_check_of_a_secure_sum():
    """A sum the server cannot take apart is still checked: honest clipped deltas pass; a delta in a module no
    contributor was planned to train, an unclipped delta, a missing tensor or a NaN are each named."""
    s, clip = strategy("rblora", {}), 0.5
    plans = [s.configure_client(0, c, r) for c, r in enumerate([1, 2, 1])]  # RB-LoRA: modules 0 and 1 only
    counted = {n: torch.ones(R, dtype=torch.bool) for n in plans[0].adapter}
    updates = [moved_update(p, 7, c) for c, p in enumerate(plans)]
    sums, norms = round_sums(plans, updates, counted, clip)
    assert max(norms) > clip  # the honest sum is of clipped deltas
    check_secure_sums(plans, [0, 1, 2], sums, counted, clip, slack=1e-6)
    faults = {
        "modules \\[3\\]": {**sums, "q.a": sums["q.a"].index_fill(0, torch.tensor([3]), 1e-3)},
        "did not clip": {k: t * 10 for k, t in sums.items()},
        "carries tensors": {k: t for k, t in sums.items() if k != "v.b"},
        "not finite": {**sums, "v.b": sums["v.b"].index_fill(1, torch.tensor([0]), float("nan"))},
    }
    for message, planted in faults.items():
        with pytest.raises(ValueError, match=message):
            check_secure_sums(plans, [0, 1, 2], planted, counted, clip, slack=1e-6)
    with pytest.raises(ValueError, match="modules \\[1\\]"):  # only client 0 (module 0) contributed
        check_secure_sums(plans, [0], sums, counted, clip * 3, slack=1e-6)
