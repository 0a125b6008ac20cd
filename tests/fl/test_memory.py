"""Memory stays flat across rounds: a 20-round CPU run of a tiny model holds the same live tensors after
every round, and the process's resident and peak memory stop growing after the first rounds."""

import gc
import resource
import warnings

import pytest
import torch
from helpers import needs_data, tiny_config

from fed_plora.fl.federation import build_federation
from fed_plora.fl.model import load_model, load_tokenizer
from fed_plora.fl.rounds.simulate import simulate

pytestmark = needs_data

ROUNDS = 20
MiB = 2**20


def live_tensor_bytes() -> int:
    """Bytes of the distinct storages of every tensor the garbage collector can reach."""
    gc.collect()
    storages = {}
    with warnings.catch_warnings():  # isinstance on some deprecated torch objects warns
        warnings.simplefilter("ignore")
        tensors = [obj for obj in gc.get_objects() if isinstance(obj, torch.Tensor)]
    for obj in tensors:
        if obj.device.type == "cpu":
            storage = obj.untyped_storage()
            try:
                storages[storage.data_ptr()] = storage.nbytes()
            except RuntimeError:  # no real storage: a FakeTensor kept by torch.compile's caches (other tests)
                continue
    return sum(storages.values())


def resident_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


@pytest.mark.parametrize("method", ["fedplora", "flora"])
def test_memory_flat_over_20_rounds(tiny_models, tmp_path, method):
    config = tiny_config(tiny_models, tmp_path, f"federation.rounds={ROUNDS}", "train.eval_every=5")
    tokenizer = load_tokenizer(config.model.name)
    fed = build_federation(config, tokenizer)
    model = load_model(config.model.name, fed.task, tokenizer.pad_token_id, 0, torch.device("cpu"), torch.float32)
    rows = []

    def measure(record):  # the live-tensor scan is slow: every 3rd round
        live = live_tensor_bytes() if record["round"] % 3 == 2 or record["round"] == ROUNDS else None
        rows.append((live, resident_bytes(), record["peak_memory_bytes"]))

    last = {}  # only the latest checkpoint is kept alive, as a run does
    simulate(config, method, fed, model, tokenizer, None, measure, on_checkpoint=lambda c: last.update(checkpoint=c))
    tensors, rss, peak = zip(*rows)
    sampled = [r for r, t in enumerate(tensors) if t is not None]
    print(
        f"\n{method}: live tensors {tensors[1] / MiB:.3f} -> {tensors[-1] / MiB:.3f} MiB, "
        f"RSS {rss[1] / MiB:.1f} -> {rss[-1] / MiB:.1f} MiB, peak RSS {peak[1] / MiB:.1f} -> {peak[-1] / MiB:.1f} MiB"
    )
    if method == "flora":
        # FLoRA keeps every merged stack (clients that come back download what they missed): growth by
        # design, exactly the stacks' bytes, which are set aside; nothing else grows.
        per_round = [
            sum(t.numel() * t.element_size() for k, t in last["checkpoint"].tensors.items() if k.startswith(f"stack{r}."))
            for r in range(ROUNDS)
        ]
        stack_bytes = [sum(per_round[: r + 1]) for r in range(ROUNDS)]
        tensors = [None if t is None else t - s for t, s in zip(tensors, stack_bytes)]
    # The same live tensors after every round, but for index tensors whose length is a client's rank.
    assert max(tensors[r] for r in sampled) - min(tensors[r] for r in sampled) < 1024
    growth = [round((v - rss[4]) / MiB, 1) for v in rss[4:]]
    print(f"{method}: RSS growth from round 5, MiB: {growth}")
    assert max(growth) < 8 and peak[-1] - peak[4] < 8 * MiB, growth
