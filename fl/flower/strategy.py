"""``FlowerStrategy``: a Flower strategy that runs any of our strategies (FedPLoRA, FedIT, FLoRA, HetLoRA,
FlexLoRA) with the clients on Flower SuperNodes.

Flower's ``Strategy.start`` drives the rounds through a ``fl.rounds.Server``. ``configure_train`` asks it
for the round's plans and addresses each to the SuperNode holding that client's partition (``Nodes``: nodes
are asked for their ``partition-id`` when first seen); ``aggregate_train`` turns the replies back into
updates (a missing reply, an error reply or a malformed upload drops that client) and lets the server finish
the round: validation, aggregation, the record (with the bytes of the Flower messages) and a checkpoint.
No client evaluation round is configured: ``fed-plora``'s runs evaluate on the server (``RunServer``);
a ServerApp of one's own may pass Flower's ``evaluate_fn`` to ``start``.

What the server trusts (docs/flower.md, "What the Flower server trusts"): a node's ``partition-id`` is taken
once, first come first served, and only when it names a client of the run; every claim of a reply is
checked against the server's own records (``fl.rounds.validate``); a node that misses a deadline is marked
unresponsive and no longer waited for.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterable

from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.common.constant import ErrorCode
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy as FlowerBaseStrategy

from ..config import Config
from ..federation import build_federation, client_ranks
from ..model import load_tokenizer
from ..rounds.checkpoint import Checkpoint
from ..rounds.server import ClientResult, RoundPlan, Server
from ..rounds.validate import RejectedUpdate, update_from_upload
from ..strategies import ClientPlan, Strategy
from .wire import message_bytes, plan_content, read_reply, to_arrays

log = logging.getLogger(__name__)

#: The node-config key a SuperNode names its client (data partition) with.
PARTITION_KEY = "partition-id"
#: Default seconds to wait, once a node has answered a round's messages, for the others (``reply_timeout``).
REPLY_TIMEOUT = 120.0
#: Error codes of a reply that say the node or the message was unavailable (not that the ClientApp failed).
UNAVAILABLE = (ErrorCode.MESSAGE_UNAVAILABLE, ErrorCode.REPLY_MESSAGE_UNAVAILABLE, ErrorCode.NODE_UNAVAILABLE)
#: Seconds between two pulls of replies, and between two looks for new nodes while waiting for them.
PULL_INTERVAL, NODES_INTERVAL = 0.1, 0.5


class FlowerStrategy(FlowerBaseStrategy):
    """Flower's side of a strategy's rounds.

    Args:
        strategy: one of ours, run under ``config``: its ``[federation]`` (clients, fraction, rank budgets
            drawn as in any run, update norm bound), ``[train]`` (the local steps a client takes) and
            ``run.seed``; the config also travels in every train message, and ``fl.flower.client_app``
            builds its model, data and training from it. Or a ``fl.rounds.Server`` already driving one
            (then without ``config``): ``fed-plora``'s runs pass their ``RunServer``, which also
            evaluates and measures.
        client_sizes: with a strategy, every client's data size, the weights of data-size averaging (a
            reply claiming another size is rejected); default: the sizes of the config's partition, built
            here as every client builds it (the task data must be readable where the ServerApp runs).
        on_round, on_checkpoint: receive each round's record and a checkpoint after it, as in the simulator.
        node_timeout: seconds to wait, before the first round, for a node of every client.
        reply_timeout: seconds to wait for the other replies of a round once one has come (``start``
            waits at most its ``timeout`` in all); a node that misses the deadline is marked unresponsive.
        nodes: the ``Nodes`` of the run, to share what is known of them between strategies (the methods of
            a run); default: a registry of this strategy's own.
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
        reply_timeout: float = REPLY_TIMEOUT,
        nodes: Nodes | None = None,
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
        clients = self.server.config.federation.clients
        self.nodes = Nodes(clients) if nodes is None else nodes
        if self.nodes.clients != clients:
            raise ValueError(f"nodes: a registry of {self.nodes.clients} clients for a run of {clients}")
        self.on_round, self.on_checkpoint = on_round, on_checkpoint
        self.node_timeout, self.reply_timeout = node_timeout, reply_timeout
        self.planned: RoundPlan | None = None
        self.outbox: dict[int, Message] = {}  # client -> the train message sent to its node this round
        self.sent_bytes: dict[int, int] = {}

    @property
    def node_of(self) -> dict[int, int]:
        """Client (partition) -> the node that serves it."""
        return self.nodes.node_of

    def start(
        self,
        grid: Grid,
        initial_arrays: ArrayRecord,
        num_rounds: int = 3,
        timeout: float = 3600,
        train_config: ConfigRecord | None = None,
        evaluate_config: ConfigRecord | None = None,
        evaluate_fn: Callable[[int, ArrayRecord], MetricRecord | None] | None = None,
    ):
        """Flower's ``Strategy.start``, each round's wait for replies ending ``reply_timeout`` seconds after
        the first reply (at the latest ``timeout`` seconds after the messages went out)."""
        bounded = BoundedGrid(grid, self.reply_timeout)
        return super().start(bounded, initial_arrays, num_rounds, timeout, train_config, evaluate_config, evaluate_fn)

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
        self.nodes.discover(grid, self.node_timeout)
        self.planned = planned = self.server.plan_round()
        self.outbox, self.sent_bytes = {}, {}
        for plan in planned.plans:
            node = self.nodes.responsive_node(plan.client)
            if node is None:
                continue  # no node to ask: the client is dropped (see _result)
            content = plan_content(self.server.config, self.server.method, planned.rnd, plan)
            message = Message(content=content, message_type=MessageType.TRAIN, dst_node_id=node)
            self.sent_bytes[plan.client] = message_bytes(message)
            self.outbox[plan.client] = message
        return list(self.outbox.values())

    def aggregate_train(self, server_round: int, replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        client_of = {m.metadata.message_id: client for client, m in self.outbox.items()}
        by_client: dict[int, Message] = {}
        for reply in replies:
            client = client_of.get(reply.metadata.reply_to_message_id)
            if client is None or client in by_client:
                log.warning("ignored a reply from node %d: it answers no train message of this round", reply.metadata.src_node_id)
                continue
            by_client[client] = reply
        when = f"{self.server.method} round {self.planned.rnd + 1}"
        results = [self._result(plan, by_client.get(plan.client), when) for plan in self.planned.plans]
        record = self.server.finish_round(self.planned, results)
        self.on_checkpoint(self.server.checkpoint())
        self.on_round(record)
        scalars = {k: v for k, v in record.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        return self.global_arrays(), MetricRecord(scalars)

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        return []

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        return None

    def _result(self, plan: ClientPlan, reply: Message | None, when: str) -> ClientResult:
        """The ``ClientResult`` of ``plan``'s client from its reply (or its absence)."""
        client, sent = plan.client, self.outbox.get(plan.client)
        if sent is None:
            return ClientResult(error=LookupError(self.nodes.why_not_asked(client)))
        node = sent.metadata.dst_node_id
        if reply is None:
            self.nodes.mark_unresponsive(node, when)
            return ClientResult(error=TimeoutError(f"no reply from the client's node {node} in time (now unresponsive)"))
        if reply.metadata.src_node_id != node:
            return ClientResult(
                error=RejectedUpdate(f"the reply comes from node {reply.metadata.src_node_id}; the plan went to node {node}")
            )
        if reply.has_error():
            if reply.error.code in UNAVAILABLE:
                self.nodes.mark_unresponsive(node, when)
            return ClientResult(error=RuntimeError(f"client failed on its node: {reply.error.reason}"))
        try:
            upload, num_examples, stats, seconds = read_reply(reply.content)
            update = update_from_upload(plan, num_examples, upload)
        except Exception as error:  # a malformed reply drops the client, never the run
            return ClientResult(error=error)
        wire = {"bytes_down_flower": self.sent_bytes[client], "bytes_up_flower": message_bytes(reply)}
        return ClientResult(update, stats, seconds=seconds, wire=wire)


class Nodes:
    """The SuperNodes of a run as the server knows them, shared by the strategies of its methods.

    A node is asked (a query message) for its ``partition-id`` when first seen, and serves that client for
    the run if the id names a client of the run that no other node has claimed before (first come keeps
    it). A node that reports no id, an id that is not an integer in ``[0, clients)``, a claimed id, or
    later another id than its first is logged and ignored for the run; one whose ClientApp fails on the
    query likewise. A node that misses a deadline (a train reply or a query) is unresponsive: no message
    is sent to it, and its client is dropped from the rounds that sample it, until it answers a new
    query; the query goes out at the start of the next round, its answer is collected at the start of the
    rounds after, without waiting for it.
    """

    def __init__(self, clients: int):
        self.clients = clients
        self.node_of: dict[int, int] = {}  # client -> node
        self.ignored: dict[int, str] = {}  # node -> why
        self.unresponsive: dict[int, str] = {}  # node -> when it missed a deadline
        self.queries: dict[str, int] = {}  # message id of an unanswered query -> node
        self.discovered = False

    def discover(self, grid: Grid, node_timeout: float) -> None:
        """Ask the nodes not heard from yet (new ones, and unresponsive ones without a query out) for their
        ``partition-id`` and take in the answers that have come. The first time, wait up to ``node_timeout``
        seconds for a node of every client (raise ``TimeoutError`` if none came at all); later, never wait."""
        deadline = time.monotonic() + node_timeout
        while True:
            self._ask(grid)
            self._collect(grid)
            missing = sorted(set(range(self.clients)) - set(self.node_of))
            if self.discovered or not missing:
                break
            if time.monotonic() >= deadline:
                if not self.node_of:
                    raise TimeoutError(f"no node reported a {PARTITION_KEY} in [0, {self.clients}) within {node_timeout:.0f} s")
                log.warning(
                    "no node reported %s %s within %.0f s: those clients are dropped from the rounds that sample them "
                    "until a node reports them",
                    PARTITION_KEY,
                    missing,
                    node_timeout,
                )
                break
            time.sleep(NODES_INTERVAL)
        self.discovered = True

    def responsive_node(self, client: int) -> int | None:
        """The node to send ``client``'s plan to; None when it has none or its node is unresponsive."""
        node = self.node_of.get(client)
        return None if node is None or node in self.unresponsive else node

    def why_not_asked(self, client: int) -> str:
        node = self.node_of.get(client)
        if node is None:
            return f"no node has reported {PARTITION_KEY} {client}"
        return f"the client's node {node} is unresponsive (missed a deadline in {self.unresponsive[node]})"

    def mark_unresponsive(self, node: int, when: str) -> None:
        if node not in self.unresponsive and node not in self.ignored:
            log.warning("node %d missed a deadline in %s: unresponsive until it answers a query", node, when)
            self.unresponsive[node] = when

    def _ask(self, grid: Grid) -> None:
        asking = set(self.queries.values())
        serving = set(self.node_of.values())
        new = [
            node
            for node in grid.get_node_ids()
            if node not in self.ignored and node not in asking and (node not in serving or node in self.unresponsive)
        ]
        if not new:
            return
        queries = [Message(RecordDict(), message_type=MessageType.QUERY, dst_node_id=node) for node in new]
        for message_id, node in zip(grid.push_messages(queries), new):
            if message_id:  # a query that could not be pushed is sent again next time
                self.queries[message_id] = node

    def _collect(self, grid: Grid) -> None:
        if not self.queries:
            return
        for reply in grid.pull_messages(list(self.queries)):
            node = self.queries.pop(reply.metadata.reply_to_message_id, None)
            if node is not None:
                self._register(node, reply)

    def _register(self, node: int, reply: Message) -> None:
        """Take in ``node``'s answer to a query (``reply``)."""
        if reply.metadata.src_node_id != node:
            return self._ignore(node, f"its answer came from node {reply.metadata.src_node_id}")
        if reply.has_error():
            if reply.error.code in UNAVAILABLE:
                return  # not there (yet): asked again next round
            return self._ignore(node, f"its ClientApp failed on the query: {reply.error.reason}")
        try:
            partition = reply.content.get("node", {}).get(PARTITION_KEY)
        except Exception as error:  # a malformed answer: the node is ignored, the run goes on
            return self._ignore(node, f"malformed answer ({type(error).__name__}: {error})")
        if partition is None:
            return self._ignore(node, f"it reports no {PARTITION_KEY}")
        if isinstance(partition, bool) or not isinstance(partition, int) or not 0 <= partition < self.clients:
            return self._ignore(node, f"it reports {PARTITION_KEY}={partition!r}; expected an integer in [0, {self.clients})")
        holder = self.node_of.get(partition)
        served = next((c for c, n in self.node_of.items() if n == node), None)
        if served is not None and served != partition:
            return self._ignore(node, f"it reports {PARTITION_KEY}={partition}, and {served} before")
        if holder is not None and holder != node:
            return self._ignore(node, f"{PARTITION_KEY}={partition} is already served by node {holder} (first come keeps it)")
        if node in self.unresponsive:
            log.info("node %d answers again: it serves client %d again", node, partition)
            del self.unresponsive[node]
        self.node_of[partition] = node

    def _ignore(self, node: int, why: str) -> None:
        log.warning("node %d ignored for the run: %s", node, why)
        self.ignored[node] = why
        self.unresponsive.pop(node, None)
        self.node_of = {c: n for c, n in self.node_of.items() if n != node}


class BoundedGrid:
    """``grid`` whose ``send_and_receive`` stops waiting ``reply_timeout`` seconds after the first reply;
    everything else is ``grid``'s."""

    def __init__(self, grid: Grid, reply_timeout: float):
        self.grid, self.reply_timeout = grid, reply_timeout

    def __getattr__(self, name: str):
        return getattr(self.grid, name)

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> list[Message]:
        return collect_replies(self.grid, messages, timeout, self.reply_timeout)


def collect_replies(grid: Grid, messages: Iterable[Message], timeout: float | None, reply_timeout: float) -> list[Message]:
    """Push ``messages`` and pull their replies until every one has come, ``timeout`` seconds have passed
    (None: no limit) or ``reply_timeout`` seconds have passed since the first reply."""
    messages = list(messages)
    if not messages:
        return []
    waiting = {message_id for message_id in grid.push_messages(messages) if message_id}
    end = math.inf if timeout is None else time.monotonic() + timeout
    replies: list[Message] = []
    while waiting:
        for reply in grid.pull_messages(list(waiting)):
            if reply.metadata.reply_to_message_id in waiting:
                waiting.discard(reply.metadata.reply_to_message_id)
                if not replies:
                    end = min(end, time.monotonic() + reply_timeout)
                replies.append(reply)
        now = time.monotonic()
        if not waiting or now >= end:
            break
        time.sleep(min(PULL_INTERVAL, end - now))
    return replies


def partition_sizes(config: Config) -> list[int]:
    """Every client's data size under ``config``: the sizes of the run's partition, built as every client
    builds it (``fl.federation.build_federation``)."""
    fed = build_federation(config, load_tokenizer(config.model.name))
    return [len(shard) for shard in fed.shards]
