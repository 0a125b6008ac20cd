"""What a client does on its model: a round's fit (load, fold, train, read back, unfold) and local training (AdamW)."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from fed_plora import plora

from ..config import Config
from ..data.tokenize import collate
from ..device import precision_context
from ..model import read_adapter, write_adapter
from ..strategies import ClientPlan, ClientUpdate, strategy_class
from .schedule import client_seed, local_steps, round_lr


@dataclass
class TrainStats:
    """Mean training loss over the local steps, steps taken, tokens processed (padded), and wall seconds."""

    loss: float
    steps: int
    tokens: int
    seconds: float = 0.0


def fit(model: nn.Module, plan: ClientPlan, features: list[dict], **train) -> tuple[ClientUpdate, TrainStats]:
    """One client's round on the shared ``model``: load ``plan``, scale its layers by its method's
    ``local_scale``, Select-N-Fold (``plan.fold_mode``, ``pristine``), train (``train``: the keywords of
    ``train_local``; the loss plus the method's ``local_penalty``), read the factors back. The base and the
    scales are restored and the gradients dropped even when training raises, so that the next client starts
    clean."""
    method = strategy_class(plan.method)
    write_adapter(model, plan.adapter, plan.extra)
    layers = plora.plora_layers(model)
    scales = {name: layer.scale for name, layer in layers.items()}
    for layer in layers.values():
        layer.scale *= method.local_scale(plan.local)
    try:
        plora.select_and_fold(model, {n: idx.tolist() for n, idx in plan.trained.items()}, plan.fold_mode, pristine=True)
        try:
            stats = train_local(model, features, penalty=method.local_penalty(plan.local, layers), **train)
            adapter, extra = read_adapter(model)
        finally:
            plora.unfold(model)
    finally:
        for name, layer in layers.items():
            layer.scale = scales[name]
        for p in model.parameters():
            p.grad = None
        model.eval()
    return ClientUpdate(plan.client, len(features), adapter, plan.trained, extra), stats


def log_prior(features: list[dict], num_labels: int) -> torch.Tensor:
    """``[num_labels]`` log of the label frequencies of ``features`` (class-labelled), each count plus one:
    what a logit-adjusted loss adds to the logits (Menon et al., 2021; in federated learning under label skew,
    Zhang et al., 2022, FedLC), so that a client whose data is mostly one class fits that through the prior and
    not by pushing the shared model towards the class. The server's model predicts without it."""
    labels = [f["labels"] for f in features]
    if not labels or not all(isinstance(y, int) and 0 <= y < num_labels for y in labels):
        raise ValueError(f"logit adjustment needs class labels in [0, {num_labels}) for every example")
    counts = torch.bincount(torch.tensor(labels), minlength=num_labels).double() + 1.0
    return (counts / counts.sum()).log().float()


def fit_settings(config: Config, rnd: int, client: int, shard_size: int, pad_id: int, autocast_dtype: torch.dtype | None) -> dict:
    """The keywords of ``train_local`` for ``client`` in round ``rnd``: the same wherever the client runs."""
    tcfg = config.train
    return dict(
        steps=local_steps(config, shard_size),
        batch_size=tcfg.batch_size,
        lr=round_lr(config, rnd),
        warmup_steps=tcfg.warmup_steps,
        group_by_length=tcfg.group_by_length,
        optimizer=tcfg.optimizer,
        momentum=tcfg.momentum,
        weight_decay=tcfg.weight_decay,
        seed=client_seed(config.run.seed, rnd, client, 0),
        pad_id=pad_id,
        logit_adjustment=tcfg.logit_adjustment,
        autocast_dtype=autocast_dtype,
    )


def local_batches(
    features: list[dict], batch_size: int, steps: int, generator: torch.Generator, pad_id: int, group_by_length: bool = False
):
    """``steps`` padded batches drawn without replacement, reshuffling at every pass over ``features``
    (``group_by_length``: batches of examples of similar length, see ``pass_order``)."""
    lengths = [len(f["input_ids"]) for f in features] if group_by_length else None
    order: list[int] = []
    for _ in range(steps):
        if len(order) < batch_size:
            order += pass_order(len(features), batch_size, generator, lengths)
        chunk, order = order[:batch_size], order[batch_size:]
        yield collate([features[i] for i in chunk], pad_id)


#: Batches per group sorted by length (``pass_order``).
LENGTH_GROUP = 50


def pass_order(count: int, batch_size: int, generator: torch.Generator, lengths: list[int] | None = None) -> list[int]:
    """One pass over ``count`` examples in random order; with ``lengths``, as batches of similar length: the
    random order is cut into groups of ``LENGTH_GROUP`` batches, each group sorted by length and cut into
    batches, and the batches shuffled (a short last batch kept last), so that a batch pads little while
    every example stays equally likely at every step."""
    order = torch.randperm(count, generator=generator).tolist()
    if lengths is None:
        return order
    batches = []
    group = batch_size * LENGTH_GROUP
    for start in range(0, count, group):
        members = sorted(order[start : start + group], key=lambda i: lengths[i])
        batches += [members[k : k + batch_size] for k in range(0, len(members), batch_size)]
    short = [b for b in batches if len(b) < batch_size]
    full = [b for b in batches if len(b) == batch_size]
    return [i for k in torch.randperm(len(full), generator=generator).tolist() for i in full[k]] + [i for b in short for i in b]


def train_local(
    model: nn.Module,
    features: list[dict],
    *,
    steps: int,
    batch_size: int,
    lr: float,
    weight_decay: float,
    seed: int,
    pad_id: int,
    autocast_dtype: torch.dtype | None = None,
    optimizer: str = "adamw",
    momentum: float = 0.0,
    warmup_steps: int = 0,
    group_by_length: bool = False,
    logit_adjustment: bool = False,
    penalty: Callable[[], torch.Tensor] | None = None,
) -> TrainStats:
    """``steps`` steps of a fresh ``optimizer`` ("adamw" or "sgd" with ``momentum``) on the parameters that
    currently require grad (build after the fold), the learning rate rising linearly over the first
    ``warmup_steps``, batches of similar length with ``group_by_length``; ``penalty()`` is added to every
    step's loss (the reported loss is the task's alone). ``logit_adjustment`` (classification): the loss is
    the cross-entropy of ``logits + log_prior(features)``, so that the model need not learn this client's label
    mix (the reported loss is that one)."""
    if steps < 1:
        raise ValueError(f"local steps must be >= 1, got {steps}")
    start = time.perf_counter()
    device = next(model.parameters()).device
    params = [p for p in model.parameters() if p.requires_grad]
    if optimizer == "adamw":
        opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    elif optimizer == "sgd":
        opt = torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    else:
        raise ValueError(f"optimizer must be 'adamw' or 'sgd', got {optimizer!r}")
    warmup = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: min(1.0, (step + 1) / (warmup_steps + 1)))
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)  # dropout
    prior = log_prior(features, model.config.num_labels).to(device) if logit_adjustment else None
    model.train()
    total, tokens = 0.0, 0
    for batch in local_batches(features, batch_size, steps, generator, pad_id, group_by_length):
        batch = {k: v.to(device) for k, v in batch.items()}
        with precision_context(device, autocast_dtype):
            if prior is None:
                loss = model(**batch).loss
            else:
                labels = batch.pop("labels")
                loss = nn.functional.cross_entropy(model(**batch).logits.float() + prior, labels)
        (loss if penalty is None else loss + penalty()).backward()
        opt.step()
        warmup.step()
        opt.zero_grad(set_to_none=True)
        total += float(loss.detach())
        tokens += batch["input_ids"].numel()
    model.eval()
    return TrainStats(total / steps, steps, tokens, time.perf_counter() - start)
