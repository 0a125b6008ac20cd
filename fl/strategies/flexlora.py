"""FlexLoRA: average full products, SVD, give each client the top components (DESIGN.md §1)."""

from __future__ import annotations

import torch

from ..costs import product_flops, svd_flops
from .base import Adapter, ClientPlan, ClientUpdate, Factors, RoundResult, Strategy, stacked


class FlexLoRA(Strategy):
    """The server forms ``ΔW = Σ p_i B_i A_i`` per layer (kept exactly, as stacked factors), takes its SVD
    ``U Σ Vᵀ`` and keeps the top ``R`` components as ``B = U Σ``, ``A = Vᵀ``; a client of rank ``r_i`` gets
    the top ``r_i``. The global model used for evaluation is that rank-``R`` truncation."""

    name = "flexlora"

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

    def configure_client(self, rnd: int, client: int, rank: int) -> ClientPlan:
        return self.truncated_plan(client, rank)

    def aggregate(self, rnd: int, updates: list[ClientUpdate]) -> RoundResult:
        weights = self.client_weights(updates)
        self.full, flops = {}, 0.0
        for name, (a, b) in self.adapter.items():
            n_out, k_in = b.shape[0], a.shape[1]
            self.full[name] = stacked(updates, weights, name)
            u_mat, s_vec, vh = torch.linalg.svd(self.full[name].delta(), full_matrices=False)
            kept = min(self.rank, len(s_vec))  # a layer with min(N, K) < R has fewer components: zero modules
            new_a, new_b = torch.zeros_like(a), torch.zeros_like(b)
            new_a[:kept] = vh[:kept].to(a.dtype)
            new_b[:, :kept] = (u_mat[:, :kept] * s_vec[:kept]).to(b.dtype)
            self.adapter[name] = Factors(new_a, new_b)
            flops += sum(product_flops(n_out, k_in, len(u.trained[name])) for u in updates) + svd_flops(n_out, k_in)
        self.average_extra(updates, weights)
        return RoundResult(server_flops=flops)

    def global_delta(self, name: str) -> torch.Tensor:
        if self.full is None:
            return super().global_delta(name)
        return self.full[name].delta()
