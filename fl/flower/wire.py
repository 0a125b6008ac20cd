"""Plans and updates as Flower message contents, and message sizes as Flower serialises them.

A train message carries ``download`` (the plan's tensors, exactly those the traffic accounting counts),
``plan`` (method, round, client, trained module indices, fold mode and the strategy's ``init`` values) and ``run``
(the run's configuration as JSON, so that a client needs no configuration of its own). A reply carries
``upload`` (``ClientUpdate.upload``) and ``stats`` (data size and training statistics). Under secure
aggregation (``secure``) the same plan travels as Flower's legacy ``FitIns`` (``secure_fit_ins``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.common import FitIns, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects

from ..config import Config
from ..rounds.client import TrainStats
from ..strategies import Adapter, ClientPlan, ClientUpdate, Strategy

#: Tensor dtypes that travel exactly (through numpy).
WIRE_DTYPES = (torch.float32, torch.float64, torch.float16, torch.int64, torch.int32)


def to_arrays(tensors: dict[str, torch.Tensor]) -> ArrayRecord:
    """An ``ArrayRecord`` of CPU copies of ``tensors`` (same names, exact values)."""
    for name, tensor in tensors.items():
        if tensor.dtype not in WIRE_DTYPES:
            raise TypeError(f"tensor {name!r}: dtype {tensor.dtype} cannot be sent; expected one of {WIRE_DTYPES}")
    return ArrayRecord({name: Array(t.detach().cpu().contiguous()) for name, t in tensors.items()})


def from_arrays(record: ArrayRecord) -> dict[str, torch.Tensor]:
    """The tensors of an ``ArrayRecord``, by name (CPU)."""
    return {name: torch.from_numpy(array.numpy()) for name, array in record.items()}


def message_bytes(message: Message) -> int:
    """Bytes of ``message`` as Flower serialises it for the wire: every object of its tree deflated,
    identical array chunks counted once (as Flower sends them once)."""
    return sum(len(obj.deflate()) for obj in get_all_nested_objects(message).values())


def plan_header(method: str, rnd: int, plan: ClientPlan) -> dict:
    """The scalars of a plan as they travel (everything but its tensors)."""
    return {
        "method": method,
        "round": rnd,
        "client": plan.client,
        "trained": json.dumps({n: idx.tolist() for n, idx in plan.trained.items()}),
        "fold_mode": plan.fold_mode,
        "init": json.dumps(plan.init),
        "local": json.dumps(plan.local),
    }


def plan_content(config: Config, method: str, rnd: int, plan: ClientPlan) -> RecordDict:
    """The content of the train message that hands ``plan`` to its client."""
    return RecordDict(
        {
            "download": to_arrays(plan.download),
            "plan": ConfigRecord(plan_header(method, rnd, plan)),
            "run": ConfigRecord({"config": json.dumps(config.to_dict())}),
        }
    )


@dataclass
class TrainRequest:
    """A train message as read by a client: the run's config, the method, round and client, and the plan
    as sent (``download``, ``trained``, ``fold_mode``, ``init``, ``local``; tensors on the CPU)."""

    config: Config
    method: str
    rnd: int
    client: int
    download: dict[str, torch.Tensor]
    trained: dict[str, list[int]]
    fold_mode: str
    init: dict
    local: dict

    def plan(self, strategy: type[Strategy], template: Adapter) -> ClientPlan:
        """The ``ClientPlan`` rebuilt with ``strategy.client_adapter`` against ``template`` (the client's
        own adapter factors; their device is the plan's)."""
        device = next(iter(template.values())).a.device
        download = {n: t.to(device) for n, t in self.download.items()}
        trained = {n: torch.tensor(idx, dtype=torch.int64, device=device) for n, idx in self.trained.items()}
        extra = {n[len("extra.") :]: t for n, t in download.items() if n.startswith("extra.")}
        adapter = strategy.client_adapter(download, self.init, template)
        return ClientPlan(
            strategy.name,
            self.client,
            adapter,
            trained,
            extra,
            download,
            init=self.init,
            fold_mode=self.fold_mode,
            local=self.local,
        )


def read_request(content: RecordDict) -> TrainRequest:
    """The ``TrainRequest`` of a train message's content (see ``plan_content``)."""
    missing = sorted({"download", "plan", "run"} - set(content))
    if missing:
        raise ValueError(f"train message misses the records {missing}")
    return request_from(content["plan"], content["run"]["config"], from_arrays(content["download"]))


def request_from(header, config_json: str, download: dict[str, torch.Tensor]) -> TrainRequest:
    """The ``TrainRequest`` of a ``plan_header``, the run's config as JSON and the plan's tensors."""
    return TrainRequest(
        Config.from_dict(json.loads(config_json)),
        str(header["method"]),
        int(header["round"]),
        int(header["client"]),
        download,
        json.loads(header["trained"]),
        str(header["fold_mode"]),
        json.loads(header["init"]),
        json.loads(header["local"]),
    )


def secure_fit_ins(config: Config, method: str, rnd: int, plan: ClientPlan, counted: dict[str, torch.Tensor]) -> FitIns:
    """The ``FitIns`` that hands ``plan`` to its client under SecAgg+ (whose workflow speaks Flower's legacy
    messages): the plan's tensors as parameters (sorted by name), its header, the run's config, and per layer
    which modules enter the round's sums (``counted``, ``[R]`` bool)."""
    names = sorted(plan.download)
    settings = {
        **plan_header(method, rnd, plan),
        "run": json.dumps(config.to_dict()),
        "download": json.dumps(names),
        "counted": json.dumps({n: c.tolist() for n, c in counted.items()}),
    }
    return FitIns(ndarrays_to_parameters([plan.download[n].detach().cpu().numpy() for n in names]), settings)


def read_secure_fit_ins(fit_ins: FitIns) -> tuple[TrainRequest, dict[str, torch.Tensor]]:
    """``(request, counted)`` of a ``secure_fit_ins``."""
    settings = fit_ins.config
    names = json.loads(settings["download"])
    arrays = parameters_to_ndarrays(fit_ins.parameters)
    if len(names) != len(arrays):
        raise ValueError(f"secure train message: {len(arrays)} tensors for the {len(names)} names it lists")
    download = {n: torch.from_numpy(a.copy()) for n, a in zip(names, arrays)}
    counted = {n: torch.tensor(c, dtype=torch.bool) for n, c in json.loads(settings["counted"]).items()}
    return request_from(settings, str(settings["run"]), download), counted


def claims(update: ClientUpdate, stats: TrainStats, seconds: float) -> dict:
    """What a client says of its round, as it travels (a reply's ``stats``, or a secure round's fit metrics)."""
    return {
        "num-examples": update.num_examples,
        "loss": stats.loss,
        "steps": stats.steps,
        "tokens": stats.tokens,
        "train-seconds": stats.seconds,
        "seconds": seconds,
    }


def read_claims(sent) -> tuple[object, TrainStats, float]:
    """``(num_examples, stats, seconds)`` of ``claims`` as sent: never converted, a missing one None
    (``check_claims`` judges them, so that ``steps = 1.9`` is not read as 1); the timings, which are reported
    and never trusted, as numbers (0 when not one)."""
    stats = TrainStats(sent.get("loss"), sent.get("steps"), sent.get("tokens"), _seconds(sent.get("train-seconds")))
    return sent.get("num-examples"), stats, _seconds(sent.get("seconds"))


def _seconds(value) -> float:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else 0.0


def update_content(update: ClientUpdate, stats: TrainStats, seconds: float) -> RecordDict:
    """The content of a client's reply: its upload and its training statistics."""
    return RecordDict({"upload": to_arrays(update.upload()), "stats": MetricRecord(claims(update, stats, seconds))})


def read_reply(content: RecordDict) -> tuple[dict[str, torch.Tensor], object, TrainStats, float]:
    """``(uploaded tensors, num_examples, stats, seconds)`` of a client's reply (``read_claims``)."""
    if "upload" not in content or "stats" not in content:
        raise ValueError(f"reply must carry 'upload' and 'stats' records, got {sorted(content)}")
    num_examples, stats, seconds = read_claims(content["stats"])
    return from_arrays(content["upload"]), num_examples, stats, seconds
