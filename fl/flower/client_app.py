"""The Flower ``ClientApp``: a SuperNode trains the client named by its ``partition-id`` node config.

A train message carries the run's config and the client's plan (``wire``); the node loads the task's
data and keeps its own shard (the same partition as the simulator's, from the run seed), loads the
backbone once per method and runs ``fl.rounds.client.fit`` exactly as the simulator does (folding as the plan
says). Node config keys:
``partition-id`` (required: which client this node is) and ``data-dir`` (optional: where this machine
keeps the task data; otherwise the run config's ``task.data_dir``, ``$FED_PLORA_DATA`` or the Hub).

Under secure aggregation the train messages are those of Flower's SecAgg+ workflow: its mod
(``secure_aggregation_mod``) runs the protocol's stages, and the node's reply is its clipped delta, masked.

FLoRA's base updates (merged stacks) are kept in the node's ``context.state`` by round index, merged into
the frozen base for the node's fit and taken out again after it, since a process's model is shared by
the nodes it serves (the simulation engine runs many nodes per process).
"""

from __future__ import annotations

import contextlib
import json
import time

import flwr.compat.common.recorddict_compat as compat
import torch
from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.client.mod import secaggplus_mod
from flwr.clientapp import ClientApp
from flwr.common import Code, FitRes, Status, ndarrays_to_parameters
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS

from fed_plora import plora

from ..config import Config
from ..device import pick_device, precision
from ..federation import build_federation
from ..model import inject_configured, load_model, load_tokenizer, read_adapter
from ..privacy.mechanism import private_delta, sum_names
from ..rounds.client import fit, fit_settings
from ..strategies import Adapter, Factors, strategy_class
from .strategy import PARTITION_KEY
from .wire import TrainRequest, claims, from_arrays, read_request, read_secure_fit_ins, to_arrays, update_content

DATA_DIR_KEY = "data-dir"

app = ClientApp()


class ClientRuntime:
    """A process's client side of one run: tokenizer, the tokenised federation, and one backbone with
    PLoRA layers (for the method now running), shared by every node this process serves."""

    def __init__(self, config: Config):
        self.config = config
        self.device = pick_device(config.run.device)
        self.base_dtype, self.autocast_dtype = precision(config.model.precision, self.device)
        self.tokenizer = load_tokenizer(config.model.name)
        self.fed = build_federation(config, self.tokenizer)
        self.method: str | None = None
        self.model: torch.nn.Module | None = None

    def model_for(self, method: str) -> torch.nn.Module:
        """The backbone for ``method`` (a fresh one when the method changes)."""
        if method != self.method:
            self.model = None  # free the previous method's model first
            model = load_model(
                self.config.model.name,
                self.fed.task,
                self.tokenizer.pad_token_id,
                self.config.run.seed,
                self.device,
                self.base_dtype,
            )
            self.model, self.method = inject_configured(model, self.config), method
        return self.model


_runtime: tuple[str, ClientRuntime] | None = None


def runtime_for(config: Config) -> ClientRuntime:
    """The process's ``ClientRuntime`` for ``config`` (rebuilt when the run's config changes)."""
    global _runtime
    key = json.dumps({**config.to_dict(), "methods": None}, sort_keys=True)
    if _runtime is None or _runtime[0] != key:
        _runtime = None
        _runtime = (key, ClientRuntime(config))
    return _runtime[1]


def partition_of(context: Context) -> int:
    """This node's client index (node config ``partition-id``)."""
    if PARTITION_KEY not in context.node_config:
        raise KeyError(f"node config must set {PARTITION_KEY} (flower-supernode --node-config '{PARTITION_KEY}=0')")
    return int(context.node_config[PARTITION_KEY])


@app.query()
def query(message: Message, context: Context) -> Message:
    """Tell the server which client this node is."""
    return Message(RecordDict({"node": ConfigRecord({PARTITION_KEY: partition_of(context)})}), reply_to=message)


def secure_aggregation_mod(message: Message, context: Context, call_next) -> Message:
    """Flower's ``secaggplus_mod`` for the messages of a SecAgg+ round (those carrying its stage); a plain
    train message goes straight to ``train``."""
    if RECORD_KEY_CONFIGS in message.content.config_records:
        return secaggplus_mod(message, context, call_next)
    return call_next(message, context)


@app.train(mods=[secure_aggregation_mod])
def train(message: Message, context: Context) -> Message:
    """One client round: rebuild the plan, train as the simulator does, reply with the upload; under
    secure aggregation (a legacy ``FitIns``), reply with the clipped, zero-filled delta the round sums."""
    start = time.perf_counter()
    if "plan" not in message.content:
        return secure_train(message, context, start)
    request = read_request(message.content)
    _, update, stats = train_plan(request, context)
    return Message(update_content(update, stats, time.perf_counter() - start), reply_to=message)


def secure_train(message: Message, context: Context, start: float) -> Message:
    """A round under SecAgg+: train the plan, clip the delta to ``privacy.clip`` here (the server sees only
    the sum) and reply with it as a legacy ``FitRes`` of weight 1 (``sum_names`` order); the claims (data
    size, steps, loss, tokens) travel in the clear as its metrics."""
    request, counted = read_secure_fit_ins(compat.recorddict_to_fitins(message.content, keep_input=True))
    plan, update, stats = train_plan(request, context)
    clip = request.config.privacy.clip
    delta, norm = private_delta(plan, update, counted, clip)
    metrics = {**claims(update, stats, time.perf_counter() - start), "clipped": int(norm > clip)}
    arrays = [delta[name].detach().cpu().numpy() for name in sum_names(plan)]
    fit_res = FitRes(Status(Code.OK, ""), ndarrays_to_parameters(arrays), 1, metrics)
    return Message(compat.fitres_to_recorddict(fit_res, keep_input=True), reply_to=message)


def train_plan(request: TrainRequest, context: Context):
    """``(plan, update, stats)``: ``request``'s plan trained on this node's data as the simulator trains it."""
    client = partition_of(context)
    if request.client != client:
        raise ValueError(f"plan for client {request.client} sent to the node of client {client}")
    config = request.config
    if DATA_DIR_KEY in context.node_config:
        config.task.data_dir = str(context.node_config[DATA_DIR_KEY])
    runtime = runtime_for(config)
    model = runtime.model_for(request.method)
    strategy = strategy_class(request.method)
    plan = request.plan(strategy, read_adapter(model)[0])
    base_updates = node_base_updates(
        context.state, request.method, strategy.client_base_updates(plan.download, plan.init), plan.init
    )
    features = runtime.fed.client_features(client)
    settings = fit_settings(config, request.rnd, client, len(features), runtime.tokenizer.pad_token_id, runtime.autocast_dtype)
    with merged_base(model, base_updates):
        update, stats = fit(model, plan, features, **settings)
    return plan, update, stats


def node_base_updates(state: RecordDict, method: str, received: dict[int, Adapter], init: dict) -> list[Adapter]:
    """Store the base updates just ``received`` in the node's ``state`` and return all of them in order;
    ``init["base_updates"]`` (when set) is how many the server has merged so far, and all must be here."""
    prefix = f"base-update.{method}."
    for index, update in received.items():
        state[f"{prefix}{index}"] = to_arrays({f"{n}.{p}": t for n, f in update.items() for p, t in zip("ab", f)})
    held = sorted(int(key[len(prefix) :]) for key in state if key.startswith(prefix))
    expected = init.get("base_updates", len(held))
    if held != list(range(expected)):
        raise RuntimeError(
            f"{method}: this node holds base updates {held}, the server has merged {expected}; was the node restarted mid-run?"
        )
    updates = []
    for index in held:
        tensors = from_arrays(state[f"{prefix}{index}"])
        layers = {key.rsplit(".", 1)[0] for key in tensors}
        updates.append({n: Factors(tensors[f"{n}.a"], tensors[f"{n}.b"]) for n in sorted(layers)})
    return updates


@contextlib.contextmanager
def merged_base(model: torch.nn.Module, updates: list[Adapter]):
    """``model``'s frozen base with ``updates`` merged in order (as the simulator's server merges them),
    restored bit-exactly on exit."""
    if not updates:
        yield
        return
    saved = plora.snapshot_bases(model, updates[0])
    try:
        for update in updates:
            plora.merge_into_base(model, update)
        yield
    finally:
        plora.restore_bases(model, saved)
