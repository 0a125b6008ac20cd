"""Cost accounting: traffic from the tensors actually sent, and FLOP estimates (the noise measures
are in ``noise``)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from ..model import linear_weight_count
from ..strategies import ClientUpdate
from ..strategies.lowrank import product_flops

#: Bytes per value of the two wire formats reported.
WIRE_BYTES = {"bf16": 2, "fp32": 4}


def payload_values(tensors: dict[str, torch.Tensor]) -> int:
    """Number of values in a payload (the sum of ``numel`` over the tensors sent)."""
    return sum(t.numel() for t in tensors.values())


def payload_bytes(tensors: dict[str, torch.Tensor]) -> dict[str, int]:
    """Bytes of a payload in each wire format: ``{"bf16": …, "fp32": …}``."""
    values = payload_values(tensors)
    return {fmt: values * size for fmt, size in WIRE_BYTES.items()}


def fold_flops(n: int, k: int, rank: int) -> float:
    """FLOPs of ``W += s · B_f A_f`` over ``rank`` modules (the product, then ``n k`` adds); 0 for none."""
    return product_flops(n, k, rank) + n * k if rank else 0.0


def training_flops(tokens: int, frozen_params: int, trainable_params: int) -> float:
    """Estimated FLOPs of training on ``tokens`` tokens (linear layers only, attention scores ignored):
    forward ``2 P`` per token for every weight, backward ``2 P`` for input gradients through every
    weight plus ``2 P`` for weight gradients of the trainable ones: ``tokens · (4 P_frozen + 6 P_trainable)``."""
    return float(tokens) * (4.0 * frozen_params + 6.0 * trainable_params)


def trainable_params(update: ClientUpdate, head_params: int) -> int:
    """Parameters a client trained: the head's and, per layer, ``r · (N + K)`` for its ``r`` trained modules."""
    return head_params + sum(len(update.trained[n]) * (f.b.shape[0] + f.a.shape[1]) for n, f in update.adapter.items())


#: Per-client cost fields averaged over the accepted clients of a round.
MEAN_KEYS = ("bytes_down_bf16", "bytes_down_fp32", "bytes_up_bf16", "bytes_up_fp32", "trainable_params")


@dataclass(frozen=True)
class ParameterCounts:
    """What a client's training costs are counted from: ``head``, the values of the other trainable tensors
    (a classification head), and ``frozen``, every linear weight besides them (PLoRA bases included)."""

    head: int
    frozen: int

    @classmethod
    def of(cls, model: nn.Module, extra: dict[str, torch.Tensor]) -> ParameterCounts:
        head = sum(t.numel() for t in extra.values())
        return cls(head, linear_weight_count(model) - head)

    def training(self, update: ClientUpdate, tokens: int) -> tuple[int, float]:
        """``(trainable parameters, training FLOPs)`` of a client's ``update`` over ``tokens`` tokens."""
        trainable = trainable_params(update, self.head)
        return trainable, training_flops(tokens, self.frozen, trainable)


def mean_costs(rows: list[dict]) -> dict:
    """Per-client means of traffic (and of any ``ClientResult.wire`` field) and trainable parameters,
    sums of FLOPs, mean and max init noise (over the accepted clients; means are None when there is none)."""
    if not rows:
        keys = (*MEAN_KEYS, "init_noise", "init_noise_max")
        return {**dict.fromkeys(keys), "train_flops": 0.0, "fold_flops": 0.0}
    wire = [k for k in rows[0] if k not in (*MEAN_KEYS, "train_flops", "fold_flops", "init_noise")]
    out = {k: float(np.mean([r[k] for r in rows])) for k in (*MEAN_KEYS, *wire)}
    out.update({k: float(sum(r[k] for r in rows)) for k in ("train_flops", "fold_flops")})
    noise = [r["init_noise"] for r in rows]
    known = [v for v in noise if v is not None]
    out["init_noise"] = float(np.mean(known)) if len(known) == len(noise) else None
    out["init_noise_max"] = max(known) if len(known) == len(noise) else None
    return out
