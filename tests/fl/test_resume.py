"""Crash and resume: a run killed with SIGKILL in the middle of a round, then resumed, logs exactly the
numbers of an uninterrupted run; checkpoints and JSON lines survive the crash whole."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from helpers import DATA, needs_data, stable, tiny_config
from safetensors.torch import load_file

from fed_plora.fl import resume_experiment, run_experiment
from fed_plora.fl.config import REFERENCES
from fed_plora.fl.rounds.checkpoint import capture_rng, restore_rng
from fed_plora.fl.storage import append_jsonl, read_jsonl
from fed_plora.fl.strategies import STRATEGIES, ClientUpdate, Factors, build_strategy

pytestmark = needs_data

#: Runs the ``fed-plora`` command in one thread; the ``stop_at``-th local training (0-based) signals, then hangs.
DRIVER = """
import sys, time
import torch
torch.set_num_threads(1)
from fed_plora.fl.rounds import client
from fed_plora.fl.cli import main
stop_at, marker = int(sys.argv[1]), sys.argv[2]
train, calls = client.train_local, [0]
def train_local(*args, **kwargs):
    if calls[0] == stop_at:
        open(marker, "w").close()
        time.sleep(600)
    calls[0] += 1
    return train(*args, **kwargs)
client.train_local = train_local
sys.exit(main(sys.argv[3:]))
"""


def _fl(tmp_path, args, stop_at=-1):
    marker = tmp_path / f"stopped-{stop_at}"
    proc = subprocess.Popen(
        [sys.executable, "-c", DRIVER, str(stop_at), str(marker), *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    return proc, marker


def test_sigkill_mid_round_then_resume_equals_uninterrupted(tiny_models, tmp_path):
    config = tmp_path / "tiny.toml"
    config.write_text(
        f'[model]\nname = "{tiny_models / "bert"}"\nrank = 4\nalpha = 8.0\n'
        f'[task]\ndata_dir = "{DATA}"\nmax_train_examples = 48\nmax_eval_examples = 8\nmax_length = 16\n'
        '[federation]\nclients = 3\nfraction = 0.67\nrounds = 3\nrank_scheme = "cycle"\nrank_choices = [1, 2, 4]\n'
        "[train]\nlocal_steps = 1\nbatch_size = 4\neval_batch_size = 8\n[methods.hetlora]\nprune_gamma = 0.5\n"
    )
    args = ["run", "--config", str(config), "--out-dir", str(tmp_path), "--no-progress"]
    # 2 clients per round, 3 rounds per method: training call 15 is FLoRA's round 2, second client.
    killed, marker = _fl(tmp_path, [*args, "--name", "killed"], stop_at=15)
    straight, _ = _fl(tmp_path, [*args, "--name", "straight"])
    deadline = time.monotonic() + 300
    while not marker.exists():
        assert killed.poll() is None, killed.stdout.read().decode()
        assert time.monotonic() < deadline, "the run never reached the planned kill point"
        time.sleep(0.05)
    os.kill(killed.pid, signal.SIGKILL)
    killed.wait()
    run = tmp_path / "killed"
    assert json.loads((run / "checkpoints" / "flora.json").read_text())["rounds_done"] == 1
    assert len(read_jsonl(run / "metrics.jsonl")) == 3 + 3 + 1
    assert not (run / "checkpoints" / "hetlora.json").exists() and not (run / "summary.md").exists()
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"method": "flora", "round": 2, "train_lo')  # a torn line, as a crash mid-write could leave
    resumed, _ = _fl(tmp_path, ["resume", str(run), "--no-progress"])
    for proc in (resumed, straight):
        out = proc.communicate(timeout=300)[0].decode()
        assert proc.returncode == 0, out
    ours, theirs = (read_jsonl(tmp_path / name / "metrics.jsonl") for name in ("killed", "straight"))
    assert len(ours) == (len(STRATEGIES) + len(REFERENCES)) * 3  # every method and reference row, 3 rounds each
    assert stable(ours) == stable(theirs)
    assert (run / "metrics.jsonl").read_text().endswith("}\n")
    for method in STRATEGIES:
        files = [
            json.loads((tmp_path / name / "checkpoints" / f"{method}.json").read_text())["tensors"]
            for name in ("killed", "straight")
        ]
        a, b = (load_file(tmp_path / name / "checkpoints" / f) for name, f in zip(("killed", "straight"), files))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), method
        assert sorted(p.name for p in (run / "checkpoints").glob(f"{method}.round*")) == [f"{method}.round3.safetensors"]


def _as_written_before_checksums(run):
    """Make ``run`` a run directory of an earlier version: no manifest, checkpoints of format 1 (no checksums)."""
    (run / "manifest.json").unlink()
    for path in (run / "checkpoints").glob("*.json"):
        payload = json.loads(path.read_text())
        for key in ("sha256", "tensors_sha256", "run"):
            del payload[key]
        path.write_text(json.dumps({**payload, "format": 1}))


def test_resume_reads_a_run_written_before_the_method_tables(tiny_models, tmp_path):
    """A run directory of an earlier version (no manifest, no checksums) whose config.json has the old flat
    method options resumes as an uninterrupted run."""
    options = ('methods.names=["hetlora", "fedit"]', "methods.hetlora.prune_gamma=0.5", "methods.fedit.client_rank=2")
    straight, _ = run_experiment(tiny_config(tiny_models, tmp_path, 'run.name="straight"', *options), progress=False)
    old, _ = run_experiment(tiny_config(tiny_models, tmp_path, 'run.name="old"', "federation.rounds=1", *options), progress=False)
    _as_written_before_checksums(old)
    saved = json.loads((old / "config.json").read_text())
    saved["methods"] = {"names": saved["methods"]["names"], "fold_mode": "merge", "fedit_rank": 2, "hetlora_prune_gamma": 0.5}
    saved["federation"]["rounds"] = 2
    (old / "config.json").write_text(json.dumps(saved))
    resume_experiment(old, progress=False)
    ours, theirs = (
        sorted(stable(read_jsonl(d / "metrics.jsonl")), key=lambda r: (r["method"], r["round"])) for d in (old, straight)
    )
    assert ours == theirs


def test_jsonl_reader_skips_a_torn_last_line(tmp_path):
    path = tmp_path / "m.jsonl"
    append_jsonl(path, {"a": 1})
    append_jsonl(path, {"b": [2.5, None]})
    with open(path, "a") as f:
        f.write('{"c": ')
    assert read_jsonl(path) == [{"a": 1}, {"b": [2.5, None]}]
    assert read_jsonl(tmp_path / "absent.jsonl") == []


def test_rng_states_round_trip():
    state = capture_rng()
    first = (torch.rand(3), __import__("numpy").random.rand(2).tolist(), __import__("random").random())
    restore_rng(json.loads(json.dumps(state)))
    assert torch.equal(torch.rand(3), first[0])
    assert __import__("numpy").random.rand(2).tolist() == first[1] and __import__("random").random() == first[2]


@pytest.mark.parametrize("method", list(STRATEGIES))
def test_strategy_state_round_trip(method):
    """A strategy restored from ``state()`` after two rounds continues exactly as the original."""
    torch.manual_seed(0)
    adapter = {"l0": Factors(torch.randn(4, 6), torch.zeros(5, 4)), "l1": Factors(torch.randn(4, 5), torch.zeros(6, 4))}
    extra = {"head": torch.randn(2, 3)}
    options = {"fedit": {"client_rank": 2}, "hetlora": {"prune_gamma": 0.5}}.get(method, {})

    def play(strategy, rnd):
        updates = []
        for client, rank in ((0, 2), (1, 4)):
            plan = strategy.configure_client(rnd, client, rank)
            gen = torch.Generator().manual_seed(rnd * 10 + client)
            trained = {}
            for name, (a, b) in plan.adapter.items():
                idx = plan.trained[name]
                a, b = a.clone(), b.clone()
                a[idx] += 0.1 * torch.randn(a[idx].shape, generator=gen)
                b[:, idx] += 0.1 * torch.randn(b[:, idx].shape, generator=gen)
                trained[name] = Factors(a, b)
            updates.append(ClientUpdate(client, 5 + client, trained, plan.trained, {k: v + 0.1 for k, v in plan.extra.items()}))
        strategy.aggregate(rnd, updates)

    original = build_strategy(method, adapter, extra, seed=3, **options)
    for rnd in range(2):
        play(original, rnd)
    tensors, meta = original.state()
    copy = build_strategy(method, adapter, extra, seed=3, **options)
    copy.load_state({k: v.clone() for k, v in tensors.items()}, json.loads(json.dumps(meta)))
    assert [len(u) for u in copy.merged_updates()] == [len(u) for u in original.merged_updates()]
    for strategy in (original, copy):
        play(strategy, 2)
    for name in adapter:
        assert torch.equal(copy.global_factors(name).delta(), original.global_factors(name).delta())
    assert all(torch.equal(copy.extra[k], original.extra[k]) for k in extra)
    assert json.dumps(copy.state()[1]) == json.dumps(original.state()[1])
