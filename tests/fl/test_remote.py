"""What a remote client (on Flower or any transport) receives and sends: for every method, the plan
rebuilt from its download equals the server's plan exactly, and an upload turns back into exactly the
update it came from; a malformed upload is rejected with a reason."""

import pytest
import torch
from helpers import moved_update

from fed_plora.fl.rounds.validate import RejectedUpdate, update_from_upload, validate_update
from fed_plora.fl.strategies import STRATEGIES, Factors, build_strategy

R, K, N = 4, 5, 3
LAYERS = ("l0", "l1")
OPTIONS = {"fedit": {"client_rank": 2}, "hetlora": {"prune_gamma": 0.5}}
#: Every method with its options in ``OPTIONS``, and Fed-PLoRA's ablations besides.
CASES = [(m, OPTIONS.get(m, {})) for m in STRATEGIES] + [
    ("fedplora", {"untrained": "drop"}),
    ("fedplora", {"selection": "first"}),
    ("fedplora", {"selection": "first", "untrained": "drop"}),
]


def start():
    generator = torch.Generator().manual_seed(0)
    adapter = {n: Factors(torch.randn(R, K, generator=generator), torch.zeros(N, R)) for n in LAYERS}
    return adapter, {"head.weight": torch.randn(2, 3, generator=generator)}


def template():
    return {n: Factors(torch.full((R, K), 7.0), torch.full((N, R), 7.0)) for n in LAYERS}


@pytest.mark.parametrize(("method", "options"), CASES)
def test_remote_client_rebuilds_every_plan_and_upload_exactly(method, options):
    adapter, extra = start()
    strategy = build_strategy(method, adapter, extra, seed=3, **options)
    cls = type(strategy)
    held: dict[int, dict] = {}  # client -> base updates it has received, by index
    for rnd in range(3):
        updates = []
        for client, rank in ((0, 1), (1, 4), (2, 2)):
            plan = strategy.configure_client(rnd, client, rank)
            rebuilt = cls.client_adapter(plan.download, plan.init, template())
            for name, (a, b) in plan.adapter.items():
                assert torch.equal(rebuilt[name].a, a) and torch.equal(rebuilt[name].b, b), (method, rnd, client, name)
            held.setdefault(client, {}).update(cls.client_base_updates(plan.download, plan.init))
            merged = strategy.merged_updates()
            assert sorted(held[client]) == list(range(len(merged)))
            for index, update in enumerate(merged):
                for name, (a, b) in update.items():
                    assert torch.equal(held[client][index][name].a, a) and torch.equal(held[client][index][name].b, b)
            update = moved_update(plan, 10 + client, seed=100 * rnd + client)
            back = update_from_upload(plan, update.num_examples, update.upload())
            validate_update(plan, back, None)
            for name, (a, b) in update.adapter.items():
                assert torch.equal(back.adapter[name].a, a) and torch.equal(back.adapter[name].b, b)
            assert (
                all(torch.equal(back.extra[n], t) for n, t in update.extra.items()) and back.num_examples == update.num_examples
            )
            updates.append(back)
        strategy.aggregate(rnd, updates)


def test_flora_sends_only_the_stacks_a_client_missed():
    adapter, extra = start()
    strategy = build_strategy("flora", adapter, extra)
    for rnd in range(3):
        plans = [strategy.configure_client(rnd, c, 2) for c in ((0, 1) if rnd < 2 else (0,))]
        strategy.aggregate(rnd, [moved_update(p, 5, rnd) for p in plans])
    plan = strategy.configure_client(3, 1, 2)
    assert sorted(type(strategy).client_base_updates(plan.download, plan.init)) == [1, 2]
    assert plan.init["base_updates"] == 3


def test_bad_uploads_are_rejected_with_the_reason():
    adapter, extra = start()
    strategy = build_strategy("fedplora", adapter, extra)
    plan = strategy.configure_client(0, 0, 2)
    good = moved_update(plan, 8, 0).upload()

    def rejected(sent, num_examples=8):
        with pytest.raises(RejectedUpdate) as error:
            update_from_upload(plan, num_examples, sent)
        return str(error.value)

    assert "missing ['l1.b']" in rejected({k: v for k, v in good.items() if k != "l1.b"})
    assert "unexpected ['l0.c']" in rejected({**good, "l0.c": torch.zeros(1)})
    assert "l0.a: got (3, 5)" in rejected({**good, "l0.a": torch.zeros(3, K)})
    assert "torch.float64" in rejected({**good, "extra.head.weight": good["extra.head.weight"].double()})
    for bad in (0, -1, 2.5, True):
        assert "num_examples must be a positive integer" in rejected(good, bad)
    assert update_from_upload(plan, 8, good).num_examples == 8


def test_a_download_that_does_not_fit_the_client_model_is_named():
    adapter, extra = start()
    plan = build_strategy("fedplora", adapter, extra).configure_client(0, 0, 2)
    small = {n: Factors(torch.zeros(R, K - 1), torch.zeros(N, R)) for n in LAYERS}
    with pytest.raises(ValueError, match=r"layer l0: received a \(4, 5\).*this model's adapter is a \(4, 4\)"):
        STRATEGIES["fedplora"].client_adapter(plan.download, plan.init, small)
