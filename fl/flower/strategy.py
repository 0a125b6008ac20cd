"""``FlowerStrategy``: a Flower strategy that runs any of our strategies (FedPLoRA, FedIT, FLoRA, HetLoRA,
FlexLoRA) with the clients on Flower SuperNodes.

Flower's ``Strategy.start`` drives the rounds through a ``fl.rounds.Server``. ``configure_train`` asks it
for the round's plans and addresses each to the SuperNode holding that client's partition (nodes are asked
for their ``partition-id`` when first seen); ``aggregate_train`` turns the replies back into updates (a
missing reply, an error reply or a malformed upload drops that client) and lets the server finish the
round: validation, aggregation, the record (with the bytes of the Flower messages) and a checkpoint.
No client evaluation round is configured: ``fed-plora``'s runs evaluate on the server (``FederatedServer``);
a ServerApp of one's own may pass Flower's ``evaluate_fn`` to ``start``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable

from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy as FlowerBaseStrategy

from ..checkpoint import Checkpoint
from ..config import Config
from ..experiment import build_federation, client_ranks
from ..model import load_tokenizer
from ..rounds import ClientResult, RoundPlan, Server
from ..strategies import ClientPlan, Strategy
from ..validate import update_from_upload
from .wire import message_bytes, plan_content, read_reply, to_arrays

log = logging.getLogger(__name__)

#: The node-config key a SuperNode names its client (data partition) with.
PARTITION_KEY = "partition-id"


class FlowerStrategy(FlowerBaseStrategy):
    """Flower's side of a strategy's rounds.

    Args:
        strategy: one of ours, run under ``config``: its ``[federation]`` (clients, fraction, rank budgets
            drawn as in any run, update norm bound), ``[train]`` (the local steps a client takes) and
            ``run.seed``; the config also travels in every train message, and ``fl.flower.client_app``
            builds its model, data and training from it. Or a ``fl.rounds.Server`` already driving one
            (then without ``config``): ``fed-plora``'s runs pass their ``FederatedServer``, which also
            evaluates and measures.
        client_sizes: with a strategy, every client's data size, the weights of data-size averaging (a
            reply claiming another size is rejected); default: the sizes of the config's partition, built
            here as every client builds it (the task data must be readable where the ServerApp runs).
        on_round, on_checkpoint: receive each round's record and a checkpoint after it, as in the simulator.
        node_timeout: seconds to wait for every client's node to connect.
    """

    def __init__(
        self,
        strategy: Strategy | Server,
        config: Config | None = None,
        *,
        client_sizes: list[int] | None = None,
        on_round: Callable[[dict], None] = lambda record: None,
        on_checkpoint: Callable[[Checkpoint], None] = lambda checkpoint: None,
        node_timeout: float = 600.0,
    ):
        if isinstance(strategy, Server):
            if config is not None or client_sizes is not None:
                raise TypeError("config and client_sizes go with a Strategy; a Server has its own")
            self.server = strategy
        elif config is None:
            raise TypeError("a Strategy needs the run's config (federation, seed and what the clients build)")
        else:
            sizes = partition_sizes(config) if client_sizes is None else client_sizes
            self.server = Server(strategy, config, client_ranks(config), client_sizes=sizes)
        self.on_round, self.on_checkpoint = on_round, on_checkpoint
        self.node_timeout = node_timeout
        self.node_of: dict[int, int] = {}  # client (partition) -> node id
        self.asked: set[int] = set()  # node ids already asked for their partition
        self.planned: RoundPlan | None = None
        self.sent_bytes: dict[int, int] = {}

    def global_arrays(self) -> ArrayRecord:
        """The global adapter and head (``Strategy.state`` tensors of the wrapped strategy)."""
        tensors, _ = self.server.strategy.state()
        return to_arrays({k: v for k, v in tensors.items() if k.startswith(("adapter.", "extra."))})

    def summary(self) -> None:
        server = self.server
        log.info(
            "Fed-PLoRA %s over Flower: %d clients, fraction %.2f, rank %d",
            server.method,
            server.config.federation.clients,
            server.config.federation.fraction,
            server.strategy.rank,
        )

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        self._discover(grid)
        self.planned = planned = self.server.plan_round()
        messages = []
        for plan in planned.plans:
            content = plan_content(self.server.config, self.server.method, planned.rnd, plan)
            message = Message(content=content, message_type=MessageType.TRAIN, dst_node_id=self.node_of[plan.client])
            self.sent_bytes[plan.client] = message_bytes(message)
            messages.append(message)
        return messages

    def aggregate_train(self, server_round: int, replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        client_of = {node: client for client, node in self.node_of.items()}
        by_client = {client_of.get(r.metadata.src_node_id): r for r in replies}
        results = [self._result(plan, by_client.get(plan.client)) for plan in self.planned.plans]
        record = self.server.finish_round(self.planned, results)
        self.on_checkpoint(self.server.checkpoint())
        self.on_round(record)
        scalars = {k: v for k, v in record.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        return self.global_arrays(), MetricRecord(scalars)

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        return []

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        return None

    def _result(self, plan: ClientPlan, reply: Message | None) -> ClientResult:
        """The ``ClientResult`` of ``plan``'s client from its reply (or its absence)."""
        if reply is None:
            return ClientResult(error=TimeoutError("no reply from the client's node"))
        if reply.has_error():
            return ClientResult(error=RuntimeError(f"client failed on its node: {reply.error.reason}"))
        try:
            upload, num_examples, stats, seconds = read_reply(reply.content)
            update = update_from_upload(plan, num_examples, upload)
        except Exception as error:  # a malformed reply drops the client, never the run
            return ClientResult(error=error)
        wire = {"bytes_down_flower": self.sent_bytes[plan.client], "bytes_up_flower": message_bytes(reply)}
        return ClientResult(update, stats, seconds=seconds, wire=wire)

    def _discover(self, grid: Grid) -> None:
        """Map every client to a connected node by the ``partition-id`` the node reports, waiting up to
        ``node_timeout`` seconds for nodes that have not connected yet."""
        clients = self.server.config.federation.clients
        deadline = time.monotonic() + self.node_timeout
        while True:
            new = [n for n in grid.get_node_ids() if n not in self.asked]
            if new:
                queries = [Message(RecordDict(), message_type=MessageType.QUERY, dst_node_id=n) for n in new]
                for reply in grid.send_and_receive(queries, timeout=self.node_timeout):
                    self._register(reply, clients)
            missing = sorted(set(range(clients)) - set(self.node_of))
            if not missing:
                return
            if time.monotonic() > deadline:
                connected = f"{len(self.node_of)} of {clients} clients connected"
                raise TimeoutError(f"no node reported {PARTITION_KEY} {missing} within {self.node_timeout:.0f} s ({connected})")
            time.sleep(1.0)

    def _register(self, reply: Message, clients: int) -> None:
        node = reply.metadata.src_node_id
        self.asked.add(node)
        if reply.has_error() or "node" not in reply.content:
            log.warning(
                "node %d did not report its %s: %s",
                node,
                PARTITION_KEY,
                reply.error.reason if reply.has_error() else "no 'node' record",
            )
            return
        partition = reply.content["node"][PARTITION_KEY]
        if not isinstance(partition, int) or not 0 <= partition < clients:
            raise ValueError(f"node {node} reports {PARTITION_KEY}={partition!r}; expected an integer in [0, {clients})")
        self.node_of[partition] = node


def partition_sizes(config: Config) -> list[int]:
    """Every client's data size under ``config``: the sizes of the run's partition, built as every client
    builds it (``fl.experiment.build_federation``)."""
    fed = build_federation(config, load_tokenizer(config.model.name))
    return [len(shard) for shard in fed.shards]
