"""Bad clients and faults: every update is validated, a failing client is dropped, the round goes on;
a round without any valid update keeps the global state."""

import dataclasses
import logging
import math
import re

import pytest
import torch
from helpers import needs_data, tiny_config

from fed_plora.fl.federation import build_federation
from fed_plora.fl.model import load_model, load_tokenizer
from fed_plora.fl.rounds.simulate import simulate
from fed_plora.fl.rounds.validate import RejectedUpdate, validate_update
from fed_plora.fl.strategies import ClientPlan, ClientUpdate, Factors

pytestmark = needs_data


def _plan_and_update():
    torch.manual_seed(0)
    adapter = {"q": Factors(torch.randn(4, 6), torch.randn(5, 4))}
    trained = {"q": torch.tensor([1, 3])}
    extra = {"head.weight": torch.randn(2, 5)}
    plan = ClientPlan("fedplora", 0, adapter, trained, extra, {})
    a, b = adapter["q"].a.clone(), adapter["q"].b.clone()
    a[trained["q"]] += 0.1
    b[:, trained["q"]] -= 0.1
    update = ClientUpdate(0, 10, {"q": Factors(a, b)}, trained, {"head.weight": extra["head.weight"] + 0.01})
    return plan, update


def _with(update, a=None, b=None, extra=None, adapter=None):
    factors = update.adapter["q"]
    if adapter is None:
        adapter = {"q": Factors(factors.a if a is None else a, factors.b if b is None else b)}
    return ClientUpdate(update.client, update.num_examples, adapter, update.trained, update.extra if extra is None else extra)


def _poke(t, index, value):
    t = t.clone()
    t[index] = value
    return t


@pytest.mark.parametrize(
    "fault, reason",
    [
        (lambda u: _with(u, a=_poke(u.adapter["q"].a, (1, 2), float("nan"))), r"q\.a: non-finite values \(NaN\)"),
        (lambda u: _with(u, b=_poke(u.adapter["q"].b, (0, 3), float("inf"))), r"q\.b: non-finite values \(Inf\)"),
        (
            lambda u: _with(u, extra={"head.weight": torch.full((2, 5), float("-inf"))}),
            r"extra head\.weight: non-finite values \(Inf\)",
        ),
        (lambda u: _with(u, a=u.adapter["q"].a[:, :5]), r"q\.a: got \(4, 5\) torch\.float32, expected \(4, 6\)"),
        (lambda u: _with(u, b=u.adapter["q"].b.double()), r"q\.b: got \(5, 4\) torch\.float64"),
        (lambda u: _with(u, adapter={**u.adapter, "k": u.adapter["q"]}), r"layers: unexpected \['k'\]"),
        (
            lambda u: _with(u, extra={**u.extra, "pooler.weight": torch.zeros(3)}),
            r"extra tensors: unexpected \['pooler\.weight'\]",
        ),
        (lambda u: _with(u, adapter={}), r"layers: unexpected \[\], missing \['q'\]"),
        (lambda u: _with(u, a=_poke(u.adapter["q"].a, (0, 0), 9.0)), r"layer q: modules outside the planned set changed"),
        (lambda u: _with(u, b=u.adapter["q"].b.index_fill(1, torch.tensor([1]), 1e6)), r"update norm .* exceeds the bound 1000"),
    ],
    ids=["nan", "inf", "inf-extra", "shape", "dtype", "extra-layer", "extra-tensor", "missing-layer", "untrained-module", "norm"],
)
def test_validation_names_the_fault(fault, reason):
    plan, update = _plan_and_update()
    validate_update(plan, update, 1000.0)  # the honest update passes
    with pytest.raises(RejectedUpdate, match=reason):
        validate_update(plan, fault(update), 1000.0)


def test_other_trained_set_is_rejected_and_bound_can_be_off():
    plan, update = _plan_and_update()
    moved = ClientUpdate(0, 10, update.adapter, {"q": torch.tensor([0, 1])}, update.extra)
    with pytest.raises(RejectedUpdate, match=r"trained modules \[0, 1\], planned \[1, 3\]"):
        validate_update(plan, moved, None)
    validate_update(plan, _with(update, b=update.adapter["q"].b.index_fill(1, torch.tensor([1]), 1e6)), math.inf)


class FaultyClients:
    """Wraps ``fit``: the ``i``-th call (in round and client order) suffers ``faults[i]``, if any."""

    def __init__(self, faults):
        from fed_plora.fl.rounds.client import fit

        self.fit, self.faults, self.calls = fit, faults, 0

    def __call__(self, model, plan, features, **train):
        fault = self.faults.get(self.calls)
        self.calls += 1
        if fault == "raise":
            raise RuntimeError("CUDA out of memory (planted)")
        update, stats = self.fit(model, plan, features, **train)
        name = next(iter(update.adapter))
        a, b = update.adapter[name]
        idx = plan.trained[name]
        if fault == "nan":
            a = a.clone()
            a[idx[0], 0] = float("nan")
        elif fault == "inf":
            b = b.clone()
            b[0, idx[0]] = float("inf")
        elif fault == "shape":
            a = a[:, :-1]
        elif fault == "huge":
            a = a.clone()
            a[idx] *= 1e6
        update.adapter[name] = Factors(a, b)
        if fault == "extra":
            update.extra["bert.pooler.dense.weight"] = torch.zeros(32, 32)
        # claims the server can check against its own records
        if fault == "size":
            update = dataclasses.replace(update, num_examples=2**62)
        elif fault == "client":
            update = dataclasses.replace(update, client=plan.client + 1)
        elif fault == "trained":
            update = dataclasses.replace(update, trained={n: (i + 1) % a.shape[0] for n, i in update.trained.items()})
        elif fault == "steps":
            stats = dataclasses.replace(stats, steps=stats.steps + 1)
        elif fault == "loss":
            stats = dataclasses.replace(stats, loss=float("nan"))
        return update, stats


def _run(tiny_models, tmp_path, method, faults, rounds, *overrides):
    config = tiny_config(tiny_models, tmp_path, f"federation.rounds={rounds}", "federation.fraction=1.0", *overrides)
    tokenizer = load_tokenizer(config.model.name)
    fed = build_federation(config, tokenizer)
    model = load_model(config.model.name, fed.task, tokenizer.pad_token_id, 0, torch.device("cpu"), torch.float32)
    checkpoints = []
    records = simulate(
        config, method, fed, model, tokenizer, None, on_checkpoint=checkpoints.append, client_fit=FaultyClients(faults)
    )
    return records, checkpoints


def test_planted_faults_are_logged_and_rounds_complete(tiny_models, tmp_path, caplog):
    faults = {0: "raise", 1: "nan", 3: "inf", 4: "shape", 5: "extra", 8: "huge"}
    with caplog.at_level(logging.WARNING, logger="fed_plora.fl.rounds.server"):
        records, checkpoints = _run(tiny_models, tmp_path, "fedplora", faults, 3)
    assert [r["round"] for r in records] == [1, 2, 3] and all("eval_matthews" in r for r in records)
    logged = [(f["client"], f["stage"], f["reason"]) for r in records for f in r["faults"]]
    assert [entry[:2] for entry in logged] == [
        (0, "fit"),
        (1, "validate"),
        (0, "validate"),
        (1, "validate"),
        (2, "validate"),
        (2, "validate"),
    ]
    reasons = [entry[2] for entry in logged]
    assert reasons[0] == "RuntimeError: CUDA out of memory (planted)"
    assert "non-finite values (NaN)" in reasons[1] and "non-finite values (Inf)" in reasons[2]
    assert "got (4, 31)" in reasons[3] and "unexpected ['bert.pooler.dense.weight']" in reasons[4]
    assert "exceeds the bound" in reasons[5]
    ours = [r.getMessage() for r in caplog.records if r.name == "fed_plora.fl.rounds.server"]
    assert len(ours) == 6 and ours[0] == "fedplora round 1: client 0 dropped: RuntimeError: CUDA out of memory (planted)"
    # Round 1 aggregates client 2 alone; round 2 has no valid update: the global state stays as it was.
    assert len(records[0]["ranks"]) == 1 and math.isfinite(records[0]["train_loss"])
    assert records[1]["ranks"] == [] and records[1]["train_loss"] is None and records[1]["agg_noise"] is None
    assert records[1]["eval_matthews"] == records[0]["eval_matthews"]
    for name, value in checkpoints[0].tensors.items():
        assert torch.equal(checkpoints[1].tensors[name], value), name
    assert len(records[2]["ranks"]) == 2 and all(torch.isfinite(t).all() for t in checkpoints[2].tensors.values())


@pytest.mark.parametrize("method", ["fedplora", "flora", "flexlora"])
def test_every_client_failing_keeps_the_initial_model(tiny_models, tmp_path, method):
    records, checkpoints = _run(tiny_models, tmp_path, method, dict.fromkeys(range(6), "raise"), 2, 'methods.names=["fedplora"]')
    assert [len(r["faults"]) for r in records] == [3, 3] and all(r["train_loss"] is None for r in records)
    first, last = checkpoints[0].tensors, checkpoints[-1].tensors
    for name, value in first.items():
        if name.startswith("adapter.") and name.endswith(".b"):
            assert not value.any(), name  # B = 0: no update ever reached the global adapter
        if name.startswith("extra."):
            assert torch.equal(last[name], value), name


@pytest.mark.parametrize(
    "fault, reason",
    [
        ("size", rf"claims {2**62} examples; client 0 holds \d+"),
        ("client", r"the update names client 1; it was planned for client 0"),
        ("trained", r"layer .*: trained modules \[\d\], planned \[\d\]"),
        ("steps", r"claims 2 local steps; the plan is 1"),
        ("loss", r"claims a training loss of nan; expected a finite number"),
    ],
)
def test_a_clients_claims_are_checked_against_the_servers_records(tiny_models, tmp_path, fault, reason):
    """An in-process client's claims (data size, identity, trained modules, local steps, loss) are not
    trusted either: one that disagrees with the server's records is rejected; the others are averaged."""
    records, _ = _run(tiny_models, tmp_path, "fedplora", {0: fault}, 1, 'methods.names=["fedplora"]')
    (record,) = records
    assert [(f["client"], f["stage"]) for f in record["faults"]] == [(0, "validate")]
    assert re.fullmatch(reason, record["faults"][0]["reason"]), record["faults"][0]["reason"]
    assert len(record["ranks"]) == 2 and math.isfinite(record["train_loss"])
