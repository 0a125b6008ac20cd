"""The Flower path (``fl.flower``): the same rounds as the in-process simulator, bit for bit.

- Under Flower's simulation engine (Ray), 2 rounds with 3 clients of a tiny model: every method's global
  adapter and every logged number equal ``fl.rounds.simulate``'s for the same seed and client sampling.
- In-process (a Grid that hands messages straight to the ClientApp): faults on the wire (an error
  reply, a malformed upload, no reply) drop the client with the reason logged; the run goes on.
- The Flower App's run config is the main config, field for field.
- ``FlowerStrategy`` takes one of our strategies as such: the example ServerApp of one's own
  (``docs/examples/flower_server_app.py``) trains ``FedPLoRA`` exactly as the simulator does.
"""

import copy
import importlib.util
import itertools
import json
import logging
import re
import time
import types
import uuid

import pytest
import tomllib
import torch

flwr = pytest.importorskip("flwr", reason="the Flower extra is not installed (pip install -e '.[flower]')")

from flwr.app import ConfigRecord, Context, Error, Message, MetricRecord, RecordDict  # noqa: E402
from flwr.serverapp import ServerApp  # noqa: E402
from helpers import DATA, REPO_ROOT, same_run, simulated, tiny_config  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

from fed_plora.fl import RunFailed, load_config  # noqa: E402
from fed_plora.fl.flower import FlowerStrategy, config_from_run_config, run_on_flower  # noqa: E402
from fed_plora.fl.flower.client_app import app as client_app  # noqa: E402
from fed_plora.fl.flower.secure import SecAggSettings  # noqa: E402
from fed_plora.fl.flower.server_app import SECURE, TIMEOUTS  # noqa: E402
from fed_plora.fl.flower.strategy import Nodes  # noqa: E402
from fed_plora.fl.flower.wire import from_arrays, to_arrays  # noqa: E402
from fed_plora.fl.rounds.checkpoint import load_checkpoint  # noqa: E402
from fed_plora.fl.rounds.server import Server  # noqa: E402
from fed_plora.fl.storage import read_jsonl  # noqa: E402
from fed_plora.fl.strategies import STRATEGIES, Factors, FedPLoRA  # noqa: E402


@pytest.mark.skipif(not DATA.is_dir(), reason=f"no local data directory at {DATA}")
def test_simulation_engine_equals_our_simulator(tiny_models, tmp_path):
    pytest.importorskip("ray", reason="Flower's simulation engine needs flwr[simulation]")
    from flwr.simulation import run_simulation

    config = tiny_config(tiny_models, tmp_path, "federation.rounds=2", "federation.clients=3")
    config.run.name = "flower"
    server_app = ServerApp()

    @server_app.main()
    def main(grid, context):
        run_on_flower(grid, config, node_timeout=120, round_timeout=300)

    backend = {"client_resources": {"num_cpus": 1}, "init_args": {"num_cpus": 2, "include_dashboard": False}}
    run_simulation(server_app, client_app, num_supernodes=3, backend_config=backend)
    flower_dir = tmp_path / "flower"
    assert (flower_dir / "summary.md").exists(), "the ServerApp did not finish"
    local_dir = simulated(tiny_config(tiny_models, tmp_path, "federation.rounds=2", "federation.clients=3"), "local")
    same_run(flower_dir, local_dir, STRATEGIES)
    records = read_jsonl(flower_dir / "metrics.jsonl")
    assert len(records) == 2 * len(STRATEGIES) and all(not r["faults"] for r in records)
    for r in records:  # Flower's bytes: the fp32 payload plus the message framing (headers, config)
        assert r["bytes_down_fp32"] < r["bytes_down_flower"] < r["bytes_down_fp32"] + 8192
        assert r["bytes_up_fp32"] < r["bytes_up_flower"] < r["bytes_up_fp32"] + 4096


@pytest.fixture
def server_identity(monkeypatch):
    """The identity Flower's runtime gives the ServerApp's process (messages are stamped with it)."""
    from flwr.supercore.task_identity import TaskIdentity

    for field, value in (("_run_id", 1), ("_node_id", 0), ("_task_id", 1)):
        monkeypatch.setattr(TaskIdentity, field, value)


class LocalGrid:
    """A Flower Grid in this process: each node is a Context, a pushed message goes straight to the ClientApp
    (an exception it raises becomes an error reply, as Flower's runtime makes it) and its reply waits to
    be pulled; ``send_and_receive`` waits for replies as Flower's grids do (up to ``timeout``).

    ``faults``: ``{(round, i): kind}`` for the i-th train message of a round: "error" (an error reply),
    "malformed" (an upload tensor of the wrong shape), "silent" (no reply) or "huge" (the reply claims
    ``num-examples`` 2**62). ``nodes``: more nodes, ``{node id: node config}``; ``answers``: ``{node id:
    ConfigRecord}``, what a node answers a query with instead of its ClientApp; ``silent``: nodes that never
    answer; ``dies``: nodes that answer their first query, then never again. ``pushed`` logs every message
    sent: ``(time, message type, node)``.
    """

    def __init__(self, clients: int, faults=None, *, nodes=None, answers=None, silent=(), dies=()):
        configs = {7000 + c: {"partition-id": c} for c in range(clients)}
        configs.update(nodes or {})
        self.contexts = {
            node: Context(run_id=1, node_id=node, node_config=config, state=RecordDict(), run_config={})
            for node, config in configs.items()
        }
        self.faults, self.answers, self.silent, self.dies = faults or {}, answers or {}, set(silent), set(dies)
        self.replies, self.pushed, self.answered = {}, [], set()
        self.run = types.SimpleNamespace(run_id=1)

    def get_node_ids(self):
        return list(self.contexts)

    def push_messages(self, messages):
        ids, train = [], 0
        for message in messages:
            message.metadata.__dict__["_message_id"] = message_id = uuid.uuid4().hex
            kind, node = message.metadata.message_type, message.metadata.dst_node_id
            self.pushed.append((time.monotonic(), kind, node))
            ids.append(message_id)
            fault = None
            if kind == "train" and "plan" in message.content:
                fault = self.faults.get((int(message.content["plan"]["round"]), train))
                train += 1
            if fault == "silent" or node in self.silent or (node in self.dies and node in self.answered):
                continue
            self.answered.add(node)
            self.replies[message_id] = self.reply(message, fault)
        return ids

    def reply(self, message, fault):
        node = message.metadata.dst_node_id
        if fault == "error":
            return Message(Error(code=0, reason="node ran out of memory (planted)"), reply_to=message)
        if message.metadata.message_type == "query" and node in self.answers:
            return Message(RecordDict({"node": self.answers[node]}), reply_to=message)
        try:
            reply = client_app(own_copy(message), self.contexts[node])
        except Exception as error:
            return Message(Error(code=2, reason=f"{type(error).__name__}: {error}"), reply_to=message)
        if fault == "malformed":
            tensors = from_arrays(reply.content["upload"])
            name = next(k for k in tensors if k.endswith(".a"))
            tensors[name] = torch.zeros(tensors[name].shape[0] + 1, tensors[name].shape[1])
            reply.content["upload"] = to_arrays(tensors)
        if fault == "huge":
            reply.content["stats"] = MetricRecord({**reply.content["stats"], "num-examples": 2**62})
        return reply

    def pull_messages(self, message_ids):
        wanted = set(message_ids)  # replies come in the order they were given
        return [self.replies.pop(i) for i in list(self.replies) if i in wanted]

    def send_and_receive(self, messages, *, timeout=None):
        waiting, replies = set(self.push_messages(messages)), []
        end = time.monotonic() + (timeout or 0.0)
        while waiting:
            got = self.pull_messages(waiting)
            waiting -= {r.metadata.reply_to_message_id for r in got}
            replies += got
            if not waiting or time.monotonic() >= end:
                break
            time.sleep(0.05)
        return replies


def own_copy(message):
    """``message`` with its config records copied, as a node gets it over the wire (SecAgg+'s workflow sends
    one content object to every node, and its mod edits the config it receives)."""
    copied = copy.copy(message)
    content = RecordDict({key: ConfigRecord(dict(record)) for key, record in message.content.config_records.items()})
    for key, record in message.content.array_records.items():
        content[key] = record
    for key, record in message.content.metric_records.items():
        content[key] = record
    copied.content = content
    return copied


@pytest.mark.skipif(not DATA.is_dir(), reason=f"no local data directory at {DATA}")
def test_wire_faults_drop_the_client_and_the_run_goes_on(tiny_models, tmp_path, server_identity):
    faults = {(0, 0): "error", (1, 0): "malformed", (1, 1): "silent"}
    config = tiny_config(tiny_models, tmp_path, 'methods.names=["fedplora", "flora"]', "federation.rounds=3")
    config.run.name = "faulty"
    run_on_flower(LocalGrid(3, faults), config, node_timeout=5, reply_timeout=0.5)
    records = read_jsonl(tmp_path / "faulty" / "metrics.jsonl")
    for method in ("fedplora", "flora"):
        first, second, third = [r for r in records if r["method"] == method]
        assert [f["stage"] for f in first["faults"]] == ["fit"] and "node ran out of memory (planted)" in first["faults"][0][
            "reason"
        ]
        assert first["faults"][0]["client"] == first["clients"][0] and len(first["ranks"]) == 1
        malformed, silent = second["faults"]
        assert malformed["stage"] == "validate" and "got (" in malformed["reason"] and "expected (" in malformed["reason"]
        assert silent["stage"] == "fit" and "no reply" in silent["reason"]
        assert second["train_loss"] is None and second["ranks"] == []  # every update of the round lost: global kept
        assert not third["faults"] and third["eval_matthews"] is not None


@pytest.mark.skipif(not DATA.is_dir(), reason=f"no local data directory at {DATA}")
def test_in_process_grid_equals_our_simulator(tiny_models, tmp_path, server_identity):
    config = tiny_config(tiny_models, tmp_path, "federation.rounds=3")
    config.run.name = "grid"
    run_on_flower(LocalGrid(3), config, node_timeout=5)
    same_run(tmp_path / "grid", simulated(tiny_config(tiny_models, tmp_path, "federation.rounds=3"), "local"), STRATEGIES)


def test_a_node_without_partition_id_is_named(server_identity):
    context = Context(run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config={})
    query = Message(RecordDict(), message_type="query", dst_node_id=1)
    with pytest.raises(KeyError, match="node config must set partition-id"):
        client_app(query, context)


def test_flower_app_run_config_is_the_main_config():
    with open(REPO_ROOT / "flower_app" / "pyproject.toml", "rb") as f:
        app = tomllib.load(f)["tool"]["flwr"]["app"]
    assert app["components"] == {
        "serverapp": "fed_plora.fl.flower.server_app:app",
        "clientapp": "fed_plora.fl.flower.client_app:app",
    }
    run_config = dict(app["config"])
    assert {k: run_config.pop(k) for k in TIMEOUTS} == TIMEOUTS
    assert {k: run_config.pop(k) for k in SECURE} == SECURE
    flower = config_from_run_config(run_config).to_dict()
    main = load_config(REPO_ROOT / "configs" / "cola_minilm.toml").to_dict()
    flower["run"]["name"] = main["run"]["name"]
    assert flower == main
    assert set(run_config) == set(fields(main)), "every config field is listed, so that --run-config can override it"
    assert json.loads(run_config["methods.names"]) == main["methods"]["names"]


def fields(table: dict, prefix: str = "") -> list[str]:
    """The dotted names of a config dict's fields (``"methods.fedit.client_rank"``)."""
    names = []
    for key, value in table.items():
        names += fields(value, f"{prefix}{key}.") if isinstance(value, dict) else [f"{prefix}{key}"]
    return names


@pytest.mark.skipif(not DATA.is_dir(), reason=f"no local data directory at {DATA}")
def test_example_server_app_trains_fedplora_as_our_simulator(tiny_models, tmp_path, server_identity):
    spec = importlib.util.spec_from_file_location("flower_server_app", REPO_ROOT / "docs" / "examples" / "flower_server_app.py")
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    config = tiny_config(tiny_models, tmp_path, 'methods.names=["fedplora"]', "federation.rounds=3")
    out = tmp_path / "adapter.safetensors"
    context = Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config={})
    example.server_app(config, str(out))(LocalGrid(3), context)
    local = load_checkpoint(
        simulated(tiny_config(tiny_models, tmp_path, 'methods.names=["fedplora"]', "federation.rounds=3"), "local")
        / "checkpoints",
        "fedplora",
    )
    theirs = load_file(out)
    assert theirs.keys() == local.tensors.keys()
    assert all(torch.equal(theirs[k], local.tensors[k]) for k in theirs)
    assert any(theirs[k].any() for k in theirs if k.endswith(".b"))  # trained: B moved from zero


def test_flower_strategy_takes_a_strategy_with_its_config_or_a_server():
    adapter = {"l": Factors(torch.ones(2, 3), torch.zeros(4, 2))}
    config = load_config(None, ["federation.clients=2", "model.rank=2", "federation.rank_choices=[1, 2]"])
    flower = FlowerStrategy(FedPLoRA(adapter, {}), config, client_sizes=[5, 7])
    assert flower.server.method == "fedplora" and len(flower.server.client_ranks) == 2
    assert flower.server.client_sizes == [5, 7]
    with pytest.raises(TypeError, match="needs the run's config"):
        FlowerStrategy(FedPLoRA(adapter, {}))
    server = Server(FedPLoRA(adapter, {}), config, [1, 2], client_sizes=[5, 7])
    with pytest.raises(TypeError, match="a Server has its own"):
        FlowerStrategy(server, config)
    with pytest.raises(TypeError, match="a Server has its own"):
        FlowerStrategy(server, client_sizes=[5, 7])
    for sizes in ([5], [5, 0], [5, 7.0]):
        with pytest.raises(ValueError, match="client_sizes"):
            Server(FedPLoRA(adapter, {}), config, [1, 2], client_sizes=sizes)


# What the server trusts (docs/flower.md): claims are checked against its own records, bad nodes are
# ignored, silent nodes stop being waited for.


@pytest.mark.skipif(not DATA.is_dir(), reason=f"no local data directory at {DATA}")
def test_a_reply_claiming_another_data_size_is_rejected(tiny_models, tmp_path, server_identity):
    """A reply with num-examples 2**62 would make the global model that client's under data-size weighting:
    it is rejected, and the run is the one in which that client failed."""
    runs = {}
    for kind in ("huge", "error"):
        config = tiny_config(tiny_models, tmp_path, 'methods.names=["fedplora"]', "federation.fraction=1.0")
        config.run.name = kind
        run_on_flower(LocalGrid(3, {(0, 0): kind}), config, node_timeout=5)
        runs[kind] = read_jsonl(tmp_path / kind / "metrics.jsonl")
    first = runs["huge"][0]
    (fault,) = first["faults"]
    assert fault["client"] == first["clients"][0] and fault["stage"] == "validate"
    assert re.fullmatch(rf"claims {2**62} examples; client {fault['client']} holds \d+", fault["reason"])
    assert len(first["ranks"]) == 2 and not runs["huge"][1]["faults"]
    huge, failed = (load_checkpoint(tmp_path / kind / "checkpoints", "fedplora").tensors for kind in ("huge", "error"))
    assert huge.keys() == failed.keys() and all(torch.equal(huge[k], failed[k]) for k in huge)


def _query_grid(**kwargs):
    """A LocalGrid of 3 clients with bad nodes planted: partition-id 99, "1" (a string), none (the ClientApp
    raises, or the answer has no id), True, -1, 2.0, and 0 again (after node 7000)."""
    answers = {
        8002: ConfigRecord({"partition-id": "1"}),
        8005: ConfigRecord({}),
        8006: ConfigRecord({"partition-id": True}),
        8008: ConfigRecord({"partition-id": 2.0}),
    }
    nodes = {8001: {"partition-id": 99}, 8003: {}, 8004: {"partition-id": 0}, 8007: {"partition-id": -1}}
    return LocalGrid(3, nodes={**nodes, **{node: {} for node in answers}}, answers=answers, **kwargs)


def test_bad_and_duplicate_node_claims_are_ignored(server_identity, caplog):
    grid = _query_grid()
    nodes = Nodes(3)
    with caplog.at_level(logging.WARNING, logger="fed_plora.fl.flower.strategy"):
        nodes.discover(grid, node_timeout=5)
    assert nodes.node_of == {0: 7000, 1: 7001, 2: 7002}  # the first claims
    logged = {r.getMessage() for r in caplog.records}
    expected = {
        8001: "it reports partition-id=99; expected an integer in [0, 3)",
        8002: "it reports partition-id='1'; expected an integer in [0, 3)",
        8003: "its ClientApp failed on the query: KeyError",
        8004: "partition-id=0 is already served by node 7000 (first come keeps it)",
        8005: "it reports no partition-id",
        8006: "it reports partition-id=True",
        8007: "it reports partition-id=-1",
        8008: "it reports partition-id=2.0",
    }
    assert set(nodes.ignored) == set(expected)
    for node, why in expected.items():
        assert nodes.ignored[node].startswith(why), (node, nodes.ignored[node])
        assert any(m.startswith(f"node {node} ignored for the run: {why}") for m in logged), node
    queries = [node for _, kind, node in grid.pushed if kind == "query"]
    nodes.discover(grid, node_timeout=5)  # later rounds ask nobody again
    assert [node for _, kind, node in grid.pushed if kind == "query"] == queries and len(queries) == len(grid.contexts)


def test_a_node_that_changes_its_claim_is_ignored(server_identity):
    grid = LocalGrid(2)
    nodes = Nodes(2)
    nodes.discover(grid, node_timeout=5)
    nodes.mark_unresponsive(7001, "test round 1")
    assert nodes.responsive_node(1) is None and "unresponsive" in nodes.why_not_asked(1)
    grid.answers[7001] = ConfigRecord({"partition-id": 0})
    nodes.discover(grid, node_timeout=5)  # the re-query: 7001 now claims client 0
    assert nodes.node_of == {0: 7000} and "and 1 before" in nodes.ignored[7001]
    assert nodes.why_not_asked(1) == "no node has reported partition-id 1"


def test_discovery_waits_for_missing_clients_once_and_goes_on(server_identity, caplog):
    grid = LocalGrid(3, silent={7002})
    nodes = Nodes(3)
    start = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="fed_plora.fl.flower.strategy"):
        nodes.discover(grid, node_timeout=1.0)
    assert 1.0 <= time.monotonic() - start < 3.0 and nodes.node_of == {0: 7000, 1: 7001}
    assert any("no node reported partition-id [2] within 1 s" in r.getMessage() for r in caplog.records)
    start = time.monotonic()
    nodes.discover(grid, node_timeout=1.0)  # later rounds never wait
    assert time.monotonic() - start < 0.5
    with pytest.raises(TimeoutError, match=r"no node reported a partition-id in \[0, 3\) within 0 s"):
        Nodes(3).discover(LocalGrid(0, nodes={8001: {"partition-id": 99}}), node_timeout=0.2)


@pytest.mark.skipif(not DATA.is_dir(), reason=f"no local data directory at {DATA}")
def test_bad_nodes_leave_the_run_as_our_simulator(tiny_models, tmp_path, server_identity):
    """Nodes reporting partition-id 99, "1", none or a claimed one are ignored; the run is the simulator's."""
    overrides = ('methods.names=["fedplora"]', "federation.fraction=1.0")
    config = tiny_config(tiny_models, tmp_path, *overrides)
    config.run.name = "bad-nodes"
    grid = _query_grid()
    run_on_flower(grid, config, node_timeout=5)
    assert {node for _, kind, node in grid.pushed if kind == "train"} == {7000, 7001, 7002}  # 8004 never got client 0
    local = simulated(tiny_config(tiny_models, tmp_path, *overrides), "local")
    same_run(tmp_path / "bad-nodes", local, ["fedplora"])


@pytest.mark.skipif(not DATA.is_dir(), reason=f"no local data directory at {DATA}")
def test_silent_nodes_are_not_waited_for_every_round(tiny_models, tmp_path, server_identity):
    """A node that never answers (8000) and one that stops answering after its first query (7002, client 2)
    cost the short reply timeout once, never the full node or round timeout; the run's methods share
    what the server knows of them."""
    full = 20.0
    methods = 'methods.names=["fedplora", "fedit"]'
    config = tiny_config(tiny_models, tmp_path, methods, "federation.rounds=3", "federation.fraction=1.0")
    config.run.name = "silent"
    grid = LocalGrid(3, nodes={8000: {"partition-id": 1}}, silent={8000}, dies={7002})
    start = time.monotonic()
    run_on_flower(grid, config, node_timeout=full, round_timeout=full, reply_timeout=0.5)
    assert time.monotonic() - start < full
    records = read_jsonl(tmp_path / "silent" / "metrics.jsonl")
    reasons = [[(f["client"], f["stage"], f["reason"]) for f in r["faults"]] for r in records]
    assert reasons[0] == [(2, "fit", "TimeoutError: no reply from the client's node 7002 in time (now unresponsive)")]
    unresponsive = "LookupError: the client's node 7002 is unresponsive (missed a deadline in fedplora round 1)"
    assert reasons[1:] == [[(2, "fit", unresponsive)]] * 5  # fedplora rounds 2-3, fedit rounds 1-3
    assert all(len(r["ranks"]) == 2 for r in records)
    trains = [t for t, kind, _ in grid.pushed if kind == "train"]
    assert len(trains) == 3 + 5 * 2  # client 2 is not sent a plan after fedplora's first round
    starts = trains[0:1] + trains[3::2]  # the first train message of each round
    assert all(b - a < full for a, b in itertools.pairwise(starts))  # no round waits the full timeout
    sent = [(kind, node) for _, kind, node in grid.pushed if node in (7002, 8000)]
    assert sent.count(("query", 8000)) == 1 and ("train", 8000) not in sent  # asked once, never again
    assert sent.count(("query", 7002)) == 2 and sent.count(("train", 7002)) == 1  # one re-query, left open


PRIVATE = (
    'methods.names=["fedplora", "fedit"]',
    'federation.weighting="uniform"',
    "privacy.clip=0.05",
    "privacy.noise_multiplier=0.3",
    "privacy.delta=1e-3",
)


@pytest.mark.skipif(not DATA.is_dir(), reason=f"no local data directory at {DATA}")
def test_secagg_plus_rounds_equal_the_private_simulator(tiny_models, tmp_path, server_identity):
    """Under Flower's SecAgg+ workflow (its mod on every node) the server sees only the sum of the clipped
    deltas, and the run ends where the in-process private run ends, up to SecAgg+'s quantisation."""
    config = tiny_config(tiny_models, tmp_path, *PRIVATE)
    config.run.name = "secure"
    run_on_flower(LocalGrid(3), config, node_timeout=5, secure=SecAggSettings())
    local_dir = simulated(tiny_config(tiny_models, tmp_path, *PRIVATE), "local")
    for method in ("fedplora", "fedit"):
        ours, theirs = (
            load_checkpoint(local_dir / "checkpoints", method),
            load_checkpoint(tmp_path / "secure" / "checkpoints", method),
        )
        for key, tensor in ours.tensors.items():
            torch.testing.assert_close(theirs.tensors[key], tensor, rtol=0, atol=1e-5, msg=f"{method} {key}")
        assert any(float(t.abs().max()) > 0 for k, t in theirs.tensors.items() if k.endswith(".b")), "the rounds moved B"
    secure, local = read_jsonl(tmp_path / "secure" / "metrics.jsonl"), read_jsonl(local_dir / "metrics.jsonl")
    assert len(secure) == len(local) == 4
    for summed, plain in zip(secure, local):
        assert not summed["faults"] and summed["clients"] == plain["clients"] and summed["ranks"] == plain["ranks"]
        assert summed["dp_epsilon"] == plain["dp_epsilon"] and summed["dp_modules_kept"] == plain["dp_modules_kept"]
        assert summed["agg_noise"] is None and plain["agg_noise"] is not None  # it needs each update
        assert summed["bytes_up_sum_bf16"] == plain["bytes_up_sum_bf16"]
        assert summed["train_loss"] == pytest.approx(plain["train_loss"], rel=1e-4)


@pytest.mark.skipif(not DATA.is_dir(), reason=f"no local data directory at {DATA}")
def test_a_client_that_does_not_clip_gets_the_secure_round_rejected(tiny_models, tmp_path, server_identity, monkeypatch):
    """The server cannot see one update in a secure sum: a client that skips its clip (100x over) shows in the
    sum's norm, and the round is rejected whole (every contributor logged, the model unchanged)."""
    from fed_plora.fl.flower import client_app as node
    from fed_plora.fl.privacy.mechanism import private_delta

    def unclipped(plan, update, counted, clip):
        delta, norm = private_delta(plan, update, counted, clip)
        return ({k: t * 100 for k, t in delta.items()} if plan.client == 0 else delta), norm

    monkeypatch.setattr(node, "private_delta", unclipped)
    config = tiny_config(
        tiny_models, tmp_path, *PRIVATE, 'methods.names=["fedplora"]', "federation.fraction=1.0", "federation.rounds=1"
    )
    with pytest.raises(RunFailed, match="did not clip"):
        run_on_flower(LocalGrid(3), config, node_timeout=5, secure=SecAggSettings())
    (record,) = read_jsonl(tmp_path / config.run.name / "metrics.jsonl")
    assert {f["client"] for f in record["faults"]} == {0, 1, 2}
    assert all("secure aggregate rejected" in f["reason"] and "did not clip" in f["reason"] for f in record["faults"])
    final = load_checkpoint(tmp_path / config.run.name / "checkpoints", "fedplora").tensors
    assert all(float(t.abs().max()) == 0 for k, t in final.items() if k.endswith(".b")), "B left its zero start"


@pytest.mark.skipif(not DATA.is_dir(), reason=f"no local data directory at {DATA}")
def test_a_false_claim_under_secagg_rejects_the_round(tiny_models, tmp_path, server_identity, monkeypatch):
    """Claims still travel in the clear under secure aggregation and are checked; a false one cannot be taken
    out of the sum, so the round is rejected."""
    from fed_plora.fl.flower import client_app as node

    real = node.train_plan

    def lying(request, context):
        plan, update, stats = real(request, context)
        if plan.client == 1:
            update.num_examples += 5
        return plan, update, stats

    monkeypatch.setattr(node, "train_plan", lying)
    config = tiny_config(
        tiny_models, tmp_path, *PRIVATE, 'methods.names=["fedit"]', "federation.fraction=1.0", "federation.rounds=1"
    )
    with pytest.raises(RunFailed):
        run_on_flower(LocalGrid(3), config, node_timeout=5, secure=SecAggSettings())
    (record,) = read_jsonl(tmp_path / config.run.name / "metrics.jsonl")
    reasons = {f["client"]: f["reason"] for f in record["faults"]}
    assert set(reasons) == {0, 1, 2} and "examples" in reasons[1]
    assert all("secure aggregate rejected" in reasons[c] for c in (0, 2))


@pytest.mark.skipif(not DATA.is_dir(), reason=f"no local data directory at {DATA}")
def test_a_malformed_masked_vector_costs_its_round_not_the_run(tiny_models, tmp_path, server_identity, monkeypatch):
    """A node whose vector has another shape than the round's makes SecAgg+ itself fail: that round is recorded
    with every planned client dropped and the reason, and the next round runs."""
    from fed_plora.fl.flower import client_app as node
    from fed_plora.fl.privacy.mechanism import sum_names

    def short(plan):
        names = sum_names(plan)
        return names[:-1] if plan.client == 0 and not node_rounds.append(plan.client) and len(node_rounds) == 1 else names

    node_rounds = []
    monkeypatch.setattr(node, "sum_names", short)
    config = tiny_config(
        tiny_models, tmp_path, *PRIVATE, 'methods.names=["fedit"]', "federation.fraction=1.0", "federation.rounds=3"
    )
    run_on_flower(LocalGrid(3), config, node_timeout=5, secure=SecAggSettings())
    first, second, _ = read_jsonl(tmp_path / config.run.name / "metrics.jsonl")
    assert {f["client"] for f in first["faults"]} == {0, 1, 2}
    assert all("a node sent another shape" in f["reason"] for f in first["faults"])
    assert not second["faults"]


def test_secure_aggregation_refuses_a_run_without_privacy(tiny_models, tmp_path):
    config = tiny_config(tiny_models, tmp_path)
    with pytest.raises(ValueError, match=r"flower.secure-aggregation: needs \[privacy\]"):
        run_on_flower(LocalGrid(3), config, secure=SecAggSettings())
    assert not (tmp_path / config.run.name).exists()


def test_the_server_app_reads_secure_aggregation_from_the_run_config(monkeypatch):
    """``flwr run --run-config "flower.secure-aggregation=true flower.secagg-shares=3"`` reaches the run as
    ``SecAggSettings``; without it the run is plain."""
    from fed_plora.fl.flower import server_app

    seen = []
    monkeypatch.setattr(
        server_app, "run_on_flower", lambda grid, config, *a, secure=None, **k: seen.append(secure) or ("dir", "table")
    )
    for extra, expected in (
        ({}, None),
        ({"flower.secure-aggregation": True, "flower.secagg-shares": 3, "flower.secagg-threshold": 2}, SecAggSettings(3, 2)),
    ):
        context = Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config={"run.name": "x", **extra})
        server_app.main(None, context)
        assert seen.pop() == expected
