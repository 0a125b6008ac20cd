"""The server's evaluation of a global model on a task's evaluation split."""

from __future__ import annotations

import torch
from torch import nn

from ..data import TaskSpec, score
from ..data.tokenize import collate
from ..device import precision_context


@torch.no_grad()
def evaluate(
    model: nn.Module,
    task: TaskSpec,
    features: list[dict],
    tokenizer,
    *,
    batch_size: int,
    max_new_tokens: int | None = None,
    autocast_dtype: torch.dtype | None = None,
) -> dict[str, float]:
    """The task's metrics on ``features``: argmax of the logits (classification) or greedy generation, in
    batches of examples of similar length."""
    device = next(model.parameters()).device
    model.eval()
    predictions, references = [], []
    by_length = sorted(features, key=lambda f: len(f["input_ids"]))  # batches pad little; the metric is order-free
    for start in range(0, len(by_length), batch_size):
        chunk = by_length[start : start + batch_size]
        if task.kind == "classification":
            batch = {k: v.to(device) for k, v in collate(chunk, tokenizer.pad_token_id).items()}
            references += batch.pop("labels").tolist()
            with precision_context(device, autocast_dtype):
                predictions += model(**batch).logits.argmax(-1).tolist()
        else:
            batch = {k: v.to(device) for k, v in collate(chunk, tokenizer.pad_token_id, left=True).items()}
            with precision_context(device, autocast_dtype):
                out = model.generate(
                    **batch,
                    max_new_tokens=max_new_tokens or task.max_new_tokens,
                    do_sample=False,
                    pad_token_id=tokenizer.pad_token_id,
                )
            predictions += tokenizer.batch_decode(out[:, batch["input_ids"].shape[1] :], skip_special_tokens=True)
            references += [f["reference"] for f in chunk]
    return score(task.name, predictions, references, task.metric)
