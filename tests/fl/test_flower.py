"""The Flower path (``fl.flower``): the same rounds as the in-process simulator, bit for bit.

- Under Flower's simulation engine (Ray), 2 rounds with 3 clients of a tiny model: every method's global
  adapter and every logged number equal ``fl.simulator``'s for the same seed and client sampling.
- In-process (a Grid that hands messages straight to the ClientApp): faults on the wire (an error
  reply, a malformed upload, no reply) drop the client with the reason logged; the run goes on.
- The Flower App's run config is the main config, field for field.
- ``FlowerStrategy`` takes one of our strategies as such: the example ServerApp of one's own
  (``docs/examples/flower_server_app.py``) trains ``FedPLoRA`` exactly as the simulator does.
"""

import importlib.util
import json
import re

import pytest
import tomllib
import torch

flwr = pytest.importorskip("flwr", reason="the Flower extra is not installed (pip install -e '.[flower]')")

from flwr.app import Context, Error, Message, MetricRecord, RecordDict  # noqa: E402
from flwr.serverapp import ServerApp  # noqa: E402
from helpers import DATA, REPO_ROOT, same_run, simulated, tiny_config  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

from fed_plora.fl import Server, load_config  # noqa: E402
from fed_plora.fl.checkpoint import load_checkpoint  # noqa: E402
from fed_plora.fl.flower import FlowerStrategy, config_from_run_config, run_on_flower  # noqa: E402
from fed_plora.fl.flower.client_app import app as client_app  # noqa: E402
from fed_plora.fl.flower.server_app import TIMEOUTS  # noqa: E402
from fed_plora.fl.flower.wire import from_arrays, to_arrays  # noqa: E402
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
    """A Flower Grid in this process: each node is a Context, each message goes straight to the ClientApp.

    ``faults``: ``{(round, i): kind}`` for the i-th train message of a round: "error" (an error reply),
    "malformed" (an upload tensor of the wrong shape), "silent" (no reply) or "huge" (the reply claims
    ``num-examples`` 2**62).
    """

    def __init__(self, clients: int, faults: dict | None = None):
        self.contexts = {
            7000 + c: Context(run_id=1, node_id=7000 + c, node_config={"partition-id": c}, state=RecordDict(), run_config={})
            for c in range(clients)
        }
        self.faults = faults or {}

    def get_node_ids(self):
        return list(self.contexts)

    def send_and_receive(self, messages, timeout=None):
        replies = []
        for i, message in enumerate(messages):
            fault = None
            if message.metadata.message_type == "train":
                fault = self.faults.get((int(message.content["plan"]["round"]), i))
            if fault == "silent":
                continue
            if fault == "error":
                replies.append(Message(Error(code=0, reason="node ran out of memory (planted)"), reply_to=message))
                continue
            reply = client_app(message, self.contexts[message.metadata.dst_node_id])
            if fault == "malformed":
                tensors = from_arrays(reply.content["upload"])
                name = next(k for k in tensors if k.endswith(".a"))
                tensors[name] = torch.zeros(tensors[name].shape[0] + 1, tensors[name].shape[1])
                reply.content["upload"] = to_arrays(tensors)
            if fault == "huge":
                reply.content["stats"] = MetricRecord({**reply.content["stats"], "num-examples": 2**62})
            replies.append(reply)
        return replies


@pytest.mark.skipif(not DATA.is_dir(), reason=f"no local data directory at {DATA}")
def test_wire_faults_drop_the_client_and_the_run_goes_on(tiny_models, tmp_path, server_identity):
    faults = {(0, 0): "error", (1, 0): "malformed", (1, 1): "silent"}
    config = tiny_config(tiny_models, tmp_path, 'methods.names=["fedplora", "flora"]', "federation.rounds=3")
    config.run.name = "faulty"
    run_on_flower(LocalGrid(3, faults), config, node_timeout=5)
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
