"""The strategy interface, on plain tensors (read like Flower's Strategy: configure a round's clients,
aggregate the round's results).

Every adapted layer has a name and global rank ``R``; its adapter is a pair ``Factors(a [R, K], b [N, R])``
with the model's update ``ΔW = s · b @ a``. A method that gives a client rank ``r < R`` fills ``r``
modules and leaves the others zero; the simulator trains ``trained[name]`` and folds the rest (zero
modules fold to nothing). The scale ``s`` is common to every module and client, so strategies work on
``b @ a`` and never see it.
"""

from __future__ import annotations

import dataclasses
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from .lowrank import Factors, concat

Adapter = dict[str, Factors]


@dataclass
class ClientPlan:
    """What a client starts from in a round.

    adapter: the starting factors of every layer (``[R, K]``/``[N, R]``, zeros where a module is absent);
    trained: per layer, the ``[r]`` module indices the client trains (the others are folded/frozen);
    extra: the other trainable tensors (a classification head), by parameter name;
    download: the tensors the server sends, as sent (traffic is counted from these);
    client_flops: preparation FLOPs at the client besides folding (FLoRA merging its stack);
    init: JSON-able values that, with ``download``, let a remote client rebuild ``adapter`` (see
    ``Strategy.client_adapter``; FLoRA: the seed of its fresh modules);
    fold_mode: how the client folds the modules it does not train (``plora.select_and_fold``'s mode);
    local: JSON-able settings of the client's local training that the method sets and alone reads (its
    ``local_scale`` and ``local_penalty``), empty for plain fine-tuning.
    """

    method: str
    client: int
    adapter: Adapter
    trained: dict[str, torch.Tensor]
    extra: dict[str, torch.Tensor]
    download: dict[str, torch.Tensor]
    client_flops: float = 0.0
    init: dict = field(default_factory=dict)
    fold_mode: str = "merge"
    local: dict = field(default_factory=dict)


@dataclass
class ClientUpdate:
    """A client's result: its factors after training (every module; untrained ones as they started),
    the modules it trained, its other trainable tensors, and its local data size."""

    client: int
    num_examples: int
    adapter: Adapter
    trained: dict[str, torch.Tensor]
    extra: dict[str, torch.Tensor]

    def upload(self) -> dict[str, torch.Tensor]:
        """The tensors a client sends back: the trained rows of ``a``, columns of ``b``, and ``extra``."""
        sent = {}
        for name, (a, b) in self.adapter.items():
            idx = self.trained[name]
            sent[f"{name}.a"] = a[idx]
            sent[f"{name}.b"] = b[:, idx]
        return {**sent, **{f"extra.{k}": v for k, v in self.extra.items()}}


@dataclass
class RoundResult:
    """What a round's aggregation changed besides the global adapter.

    base_update: factors ``(a [r, K], b [N, r])`` per layer that the simulator merges into the frozen
    base for good (FLoRA), else None; server_flops: FLOPs of the aggregation (products, SVD).
    """

    base_update: Adapter | None = None
    server_flops: float = 0.0
    info: dict = field(default_factory=dict)


def option(default, allowed: str, help: str):
    """A method option's field with what it allows and what it does beside it (listed by ``fed-plora config``;
    the check itself is the ``Options`` class's ``__post_init__``)."""
    return field(default=default, metadata={"allowed": allowed, "help": help})


@dataclass
class MethodOptions:
    """The options of a method (none here): the table ``[methods.<name>]`` of a run config. A method's own
    subclass adds its fields, checks each in ``__post_init__`` (``ValueError`` naming the field), and overrides
    the two hooks below where an option depends on the run."""

    def check_run(self, global_rank: int) -> None:
        """``ValueError`` when an option does not fit a run of global rank ``global_rank``, its message starting
        with the option's name (``client_rank = 32: must lie in [1, model.rank = 16]``)."""

    def for_clients(self, client_ranks: Sequence[int]) -> MethodOptions:
        """The options a run with these client rank budgets uses: an unset option that depends on the
        federation resolved (FedIT's ``client_rank``); the options themselves by default."""
        return self


class Strategy(ABC):
    """A federated method. Holds the global adapter and head; a server calls, per round,
    ``configure_client`` for each sampled client and then ``aggregate`` on their updates.

    Args:
        adapter: the initial global factors (the model's own initialisation: ``a`` Kaiming, ``b`` zero).
        extra: the initial other trainable tensors (head), by parameter name.
        weighting: "data" (by local data size, the default) or "uniform", for averages over clients.
        seed: the run seed (module selection, re-initialisation).
        options: the method's own options, the fields of its ``Options`` (validated there).
    """

    name: str = ""
    #: The dataclass of the method's own options: the table ``[methods.<name>]`` of a run config.
    Options: type[MethodOptions] = MethodOptions
    #: Why the server step is not a sum of the clients' deltas (clipped and noised under privacy, summed under
    #: secure aggregation): a method whose step is sets None and states its ``sum_denominators``.
    not_a_sum: str | None = "it states no sum form (Strategy.sum_denominators)"

    def __init__(self, adapter: Adapter, extra: dict[str, torch.Tensor], weighting: str = "data", seed: int = 0, **options):
        known = [f.name for f in dataclasses.fields(self.Options)]
        if set(options) - set(known):
            raise TypeError(f"{self.name}: unknown options {sorted(set(options) - set(known))}; its options are {known}")
        self.options = self.Options(**options)
        if weighting not in ("data", "uniform"):
            raise ValueError(f"weighting must be 'data' or 'uniform', got {weighting!r}")
        if not adapter:
            raise ValueError("adapter must name at least one layer")
        self.adapter: Adapter = {n: Factors(f.a.detach().clone(), f.b.detach().clone()) for n, f in adapter.items()}
        self.extra = {n: t.detach().clone() for n, t in extra.items()}
        self.weighting = weighting
        self.seed = seed
        first = next(iter(self.adapter.values()))
        self.rank = first.a.shape[0]

    @classmethod
    def for_run(
        cls,
        adapter: Adapter,
        extra: dict[str, torch.Tensor],
        weighting: str,
        seed: int,
        options: MethodOptions,
        client_ranks: Sequence[int],
    ) -> Strategy:
        """The method as a run sets it up: its ``options`` (a run config's table) resolved for the clients'
        rank budgets ``client_ranks`` (``MethodOptions.for_clients``)."""
        return cls(adapter, extra, weighting, seed, **dataclasses.asdict(options.for_clients(client_ranks)))

    @property
    def fold_mode(self) -> str:
        """How clients fold the modules they do not train (``ClientPlan.fold_mode``)."""
        return "merge"

    @abstractmethod
    def configure_client(self, rnd: int, client: int, rank: int) -> ClientPlan:
        """The plan for ``client`` (rank budget ``rank``) in round ``rnd``."""

    @abstractmethod
    def aggregate(self, rnd: int, updates: list[ClientUpdate]) -> RoundResult:
        """Fold the round's ``updates`` into the global state."""

    def global_adapter(self) -> Adapter:
        """The global model's factors (``R`` modules), what evaluation loads."""
        return self.adapter

    def global_factors(self, name: str) -> Factors:
        """The global model's update of layer ``name`` over the current base, unscaled, as factors of any rank
        (``lowrank`` measures them without the dense ``[N, K]`` product)."""
        return self.adapter[name]

    def state(self) -> tuple[dict[str, torch.Tensor], dict]:
        """Everything later rounds depend on, for a checkpoint: tensors by name, and JSON-able values."""
        tensors = {f"adapter.{n}.{p}": t for n, f in self.adapter.items() for p, t in zip("ab", f)}
        tensors.update({f"extra.{n}": t for n, t in self.extra.items()})
        return tensors, {}

    def load_state(self, tensors: dict[str, torch.Tensor], meta: dict) -> None:
        """Restore ``state()`` (tensors are moved to the device of the current ones)."""
        self.adapter = {
            n: Factors(tensors[f"adapter.{n}.a"].to(f.a.device), tensors[f"adapter.{n}.b"].to(f.b.device))
            for n, f in self.adapter.items()
        }
        self.extra = {n: tensors[f"extra.{n}"].to(t.device) for n, t in self.extra.items()}

    def merged_updates(self) -> list[Adapter]:
        """The base updates merged so far, in order (replayed onto a fresh base on resume); none by default."""
        return []

    def sum_denominators(self, holders: torch.Tensor, clients: int) -> torch.Tensor:
        """Under uniform weights, the ``[R]`` numbers by which the server step divides each module's sum of the
        clients' deltas (a trained module's change from its plan, zero elsewhere): a module's new value is its
        value after the same step on unchanged clients plus that quotient; 0 where the sum does not enter.
        ``holders [R]``: how many of the round's ``clients`` plans train each module. The extra tensors' sum is
        divided by ``clients``. ``ValueError`` (``not_a_sum``) for a method whose step is not such a sum."""
        raise ValueError(f"{self.name}: {self.not_a_sum}")

    # the client side of a remote round ------------------------------------------------------------

    @classmethod
    def client_adapter(cls, download: dict[str, torch.Tensor], init: dict, template: Adapter) -> Adapter:
        """A plan's ``adapter`` rebuilt where the client runs, from its ``download`` and ``init``.

        ``template``: the client's own factors (shapes ``[R, K]``/``[N, R]``, dtype and device of the
        result). Here a layer's sent ``a [r, K]``/``b [N, r]`` are its first ``r`` modules (all ``R``
        or a truncation), and the others are zero.
        """
        adapter = {}
        for name, (like_a, like_b) in template.items():
            sent_a, sent_b = download[f"{name}.a"], download[f"{name}.b"]
            rank = sent_a.shape[0]
            if sent_a.shape != (rank, like_a.shape[1]) or sent_b.shape != (like_b.shape[0], rank) or rank > like_a.shape[0]:
                raise ValueError(
                    f"layer {name}: received a {tuple(sent_a.shape)}, b {tuple(sent_b.shape)}; this model's adapter is "
                    f"a {tuple(like_a.shape)}, b {tuple(like_b.shape)}"
                )
            a, b = torch.zeros_like(like_a), torch.zeros_like(like_b)
            a[:rank], b[:, :rank] = sent_a, sent_b
            adapter[name] = Factors(a, b)
        return adapter

    @classmethod
    def client_base_updates(cls, download: dict[str, torch.Tensor], init: dict) -> dict[int, Adapter]:
        """Base updates sent with a plan, by their index in the run's sequence (``merged_updates``), which
        a remote client merges into its frozen base before training; none by default."""
        return {}

    @classmethod
    def local_scale(cls, local: dict) -> float:
        """The multiplier of every layer's scale while a client trains under a plan's ``local`` settings
        (1: the run's scale)."""
        return 1.0

    @classmethod
    def local_penalty(cls, local: dict, layers: dict[str, nn.Module]) -> Callable[[], torch.Tensor] | None:
        """A regulariser added to every local step's loss under a plan's ``local`` settings, over the model's
        PLoRA ``layers`` by name; None: the task's loss alone."""
        return None

    # shared helpers -----------------------------------------------------------------------------

    def client_weights(self, updates: list[ClientUpdate]) -> torch.Tensor:
        """Normalised ``[C]`` weights of the updates: by data size, or uniform."""
        if not updates:
            raise ValueError("aggregate needs at least one client update")
        if self.weighting == "uniform":
            raw = torch.ones(len(updates), dtype=torch.float64)
        else:
            raw = torch.tensor([u.num_examples for u in updates], dtype=torch.float64)
        return raw / raw.sum()

    def average_extra(self, updates: list[ClientUpdate], weights: torch.Tensor) -> None:
        """FedAvg of the other trainable tensors over all participating clients."""
        for name, value in self.extra.items():
            self.extra[name] = weighted_sum([u.extra[name] for u in updates], weights).to(value.dtype)

    def truncated_plan(self, client: int, rank: int, local: dict | None = None) -> ClientPlan:
        """A rank-``rank`` LoRA client: the global adapter's first ``rank`` modules, sent and trained."""
        adapter = {n: truncated(f, rank) for n, f in self.adapter.items()}
        idx = first_modules(rank, self.rank, next(iter(adapter.values())).a.device)
        download = {}
        for n, f in self.adapter.items():
            download[f"{n}.a"], download[f"{n}.b"] = f.a[:rank], f.b[:, :rank]
        return self.plan(client, adapter, {n: idx for n in adapter}, download, local=local)

    def plan(
        self,
        client: int,
        adapter: Adapter,
        trained: dict[str, torch.Tensor],
        download: dict[str, torch.Tensor],
        client_flops: float = 0.0,
        init: dict | None = None,
        local: dict | None = None,
    ) -> ClientPlan:
        """A ``ClientPlan`` carrying the global head and the method's fold mode; ``download`` gets the head added."""
        extra = {n: t.clone() for n, t in self.extra.items()}
        download = {**download, **{f"extra.{n}": t for n, t in extra.items()}}
        return ClientPlan(
            self.name, client, adapter, trained, extra, download, client_flops, init or {}, self.fold_mode, local or {}
        )


def clients_where_held(holders: torch.Tensor, clients: int) -> torch.Tensor:
    """``[R]``: ``clients`` where a module has a holder, else 0 (a FedAvg's denominators, ``sum_denominators``)."""
    return torch.where(holders > 0, float(clients), 0.0).double()


def weighted_sum(tensors: list[torch.Tensor], weights: torch.Tensor) -> torch.Tensor:
    """``Σ w_i t_i`` in fp32 (fp64 weights applied to fp32 copies)."""
    out = torch.zeros_like(tensors[0], dtype=torch.float32)
    for w, t in zip(weights.tolist(), tensors):
        out += w * t.float()
    return out


def stacked(updates: list[ClientUpdate], weights: torch.Tensor, name: str) -> Factors:
    """``Σ p_i B_i A_i`` of layer ``name`` exactly, as one pair of fp32 factors (see ``lowrank.concat``) over the
    modules every client trained (``weights``: the ``p_i``)."""
    terms = [
        (w, Factors(u.adapter[name].a[u.trained[name]], u.adapter[name].b[:, u.trained[name]]))
        for w, u in zip(weights.tolist(), updates)
    ]
    return concat(terms)


def first_modules(rank: int, total: int, device: torch.device) -> torch.Tensor:
    """Indices ``[0, rank)``: the modules a rank-``rank`` LoRA occupies in an ``R``-module layer."""
    if not 1 <= rank <= total:
        raise ValueError(f"client rank must lie in [1, {total}], got {rank}")
    return torch.arange(rank, device=device)


def truncated(factors: Factors, rank: int) -> Factors:
    """The first ``rank`` modules kept, the others zeroed (same shapes)."""
    a, b = factors.a.clone(), factors.b.clone()
    a[rank:] = 0
    b[:, rank:] = 0
    return Factors(a, b)
