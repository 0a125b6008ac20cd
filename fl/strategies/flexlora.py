"""FlexLoRA: average full products, SVD, give each client the top components (docs/fl.md)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .base import Adapter, ClientPlan, ClientUpdate, Factors, MethodOptions, RoundResult, Strategy, option, stacked
from .lowrank import orthonormal_complement, qr_flops, svd_flops, top_components
from .registry import register

#: How a FlexLoRA client scales its modules (``[methods.flexlora] scale``).
SCALES = ("common", "rank")


@dataclass
class FlexLoRAOptions(MethodOptions):
    """``[methods.flexlora]``: ``scale``, "common" (every client's update is ``s · B A`` with the run's
    ``s = α/R``, as for every other method; the default) or "rank" (a client of rank ``r_i`` scales by
    ``α/r_i``, as PEFT does for ``LoraConfig(r=r_i, lora_alpha=α)`` and FlexLoRA's reference code runs it)."""

    scale: str = option("common", f"one of {', '.join(SCALES)}", "a client's scale: the run's alpha / R, or alpha / r_i")

    def __post_init__(self) -> None:
        if self.scale not in SCALES:
            raise ValueError(f"scale must be one of {SCALES}, got {self.scale!r}")


@register
class FlexLoRA(Strategy):
    """The server keeps ``ΔW = Σ p_i B_i A_i`` per layer exactly, as stacked factors, takes its SVD ``U Σ Vᵀ``
    and keeps the top ``R`` components as ``B = U Σ``, ``A = Vᵀ``; a client of rank ``r_i`` gets the top
    ``r_i``. The global model used for evaluation is that rank-``R`` truncation.

    The SVD comes from the factors (``lowrank.top_components``: thin QRs and the SVD of a ``Σ r_i``-square
    core), never from the dense ``[N, K]`` product. Where ``ΔW`` has fewer than ``min(R, N, K)`` nonzero
    singular values, the missing components are zero: ``B`` columns zero, ``A`` rows an orthonormal
    completion of ``V`` (as a dense SVD returns them, up to rotation; drawn from the run seed and round), so
    that the clients' modules there train as fresh LoRA modules.

    With ``scale = "rank"`` a client of rank ``r_i`` trains with its layers' scale multiplied by ``R / r_i``
    (``α/r_i`` in all); the server sums the updates it means, ``Σ p_i (R/r_i) B_i A_i``, and hands a client
    of rank ``r_j`` the top ``r_j`` components with ``B`` divided by ``R/r_j``, so that its model starts from
    the global update. The global adapter (evaluation) is in the common scale either way."""

    name = "flexlora"
    not_a_sum = "its step is an SVD of Σ p_i B_i A_i, products that clipping the factor deltas does not bound"
    Options = FlexLoRAOptions

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.full: Adapter | None = None  # stacked (p_i A_i rows, B_i columns): ΔW exactly

    def state(self) -> tuple[dict[str, torch.Tensor], dict]:
        tensors, meta = super().state()
        if self.full is not None:
            tensors.update({f"full.{n}.{p}": t for n, f in self.full.items() for p, t in zip("ab", f)})
        return tensors, {**meta, "full": self.full is not None}

    def load_state(self, tensors: dict[str, torch.Tensor], meta: dict) -> None:
        super().load_state(tensors, meta)
        device = next(iter(self.adapter.values())).a.device
        self.full = (
            {n: Factors(tensors[f"full.{n}.a"].to(device), tensors[f"full.{n}.b"].to(device)) for n in self.adapter}
            if meta["full"]
            else None
        )

    def multiplier(self, rank: int) -> float:
        """A rank-``rank`` client's scale over the common one: ``R / rank`` with ``scale = "rank"``, else 1."""
        return self.rank / rank if self.options.scale == "rank" else 1.0

    @classmethod
    def local_scale(cls, local: dict) -> float:
        """``local["scale"]``: the client's ``multiplier`` (set only with ``scale = "rank"``)."""
        return float(local.get("scale", 1.0))

    def configure_client(self, rnd: int, client: int, rank: int) -> ClientPlan:
        multiplier = self.multiplier(rank)
        if multiplier == 1.0:
            return self.truncated_plan(client, rank)
        plan = self.truncated_plan(client, rank, {"scale": multiplier})
        for name, (_a, b) in plan.adapter.items():
            b /= multiplier
            plan.download[f"{name}.b"] = b[:, :rank]
        return plan

    def aggregate(self, rnd: int, updates: list[ClientUpdate]) -> RoundResult:
        weights = self.client_weights(updates)
        multipliers = torch.tensor([self.multiplier(len(next(iter(u.trained.values())))) for u in updates], dtype=weights.dtype)
        self.full, flops = {}, 0.0
        generator = torch.Generator().manual_seed(self.seed * 100_003 + rnd)
        for name, (a, b) in self.adapter.items():
            n_out, k_in = b.shape[0], a.shape[1]
            self.full[name] = stacked(updates, weights * multipliers, name)  # each update at its own scale
            u_mat, s_vec, vh = top_components(self.full[name], self.rank)
            kept, components = s_vec.numel(), min(self.rank, n_out, k_in)
            new_a, new_b = torch.zeros_like(a), torch.zeros_like(b)
            new_a[:kept] = vh.to(a.dtype)
            new_b[:, :kept] = (u_mat * s_vec).to(b.dtype)
            if kept < components:
                new_a[kept:components] = orthonormal_complement(vh, components - kept, generator).to(a.dtype)
            self.adapter[name] = Factors(new_a, new_b)
            flops += _svd_from_factors_flops(n_out, k_in, self.full[name].a.shape[0], kept)
        self.average_extra(updates, weights)
        return RoundResult(server_flops=flops)

    def global_factors(self, name: str) -> Factors:
        if self.full is None:
            return super().global_factors(name)
        return self.full[name]


def _svd_from_factors_flops(n: int, k: int, stacked_rank: int, kept: int) -> float:
    """QRs of ``B [n, r]`` and ``Aᵀ [k, r]`` (``r = stacked_rank``), the ``p × q`` core ``R_b R_aᵀ`` and its SVD,
    and the ``kept`` singular vectors mapped back through ``Q_b [n, p]`` and ``Q_a [k, q]``."""
    p, q = min(n, stacked_rank), min(k, stacked_rank)
    decompose = qr_flops(n, stacked_rank) + qr_flops(k, stacked_rank) + 2.0 * p * q * stacked_rank + svd_flops(p, q)
    return decompose + 2.0 * (n * p + k * q) * kept
