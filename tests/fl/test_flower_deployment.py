"""A real Flower deployment on this machine: a SuperLink and two SuperNodes as separate processes over
HTTP, the app submitted with ``flwr run flower_app``. The run's global adapters and logged numbers
equal the in-process simulator's (FLoRA's base updates live in the nodes' state between messages)."""

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("flwr", reason="the Flower extra is not installed (pip install -e '.[flower]')")

from helpers import DATA, REPO_ROOT, same_run, simulated, tiny_config


def flower_cli(name: str) -> str:
    """Flower's command ``name``: beside this Python, else on PATH."""
    found = Path(sys.executable).parent / name
    path = str(found) if found.exists() else shutil.which(name)
    assert path, f"{name} not found beside {sys.executable} or on PATH: a broken Flower install"
    return path


METHODS = ["fedplora", "flora"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_port(port: int, process: subprocess.Popen, log: Path, seconds: float = 60.0) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        assert process.poll() is None, log.read_text()[-3000:]
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.2)
    raise TimeoutError(f"nothing listens on port {port} after {seconds} s:\n{log.read_text()[-3000:]}")


@pytest.mark.skipif(not DATA.is_dir(), reason=f"no local data directory at {DATA}")
def test_flwr_run_on_a_superlink_with_supernodes_equals_our_simulator(tiny_models, tmp_path):
    home = tmp_path / "flwr-home"
    home.mkdir()
    link = free_port()
    (home / "config.toml").write_text(
        f'[superlink]\ndefault = "test"\n\n[superlink.test]\naddress = "127.0.0.1:{link}"\ninsecure = true\n'
    )
    env = {**os.environ, "FLWR_HOME": str(home), "FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1"}
    processes = []

    def start(name, *args):
        log = tmp_path / f"{name}.log"
        process = subprocess.Popen(
            [flower_cli(args[0]), *args[1:]],
            stdout=open(log, "w"),
            stderr=subprocess.STDOUT,
            env=env,
            cwd=tmp_path,
            start_new_session=True,
        )
        processes.append(process)
        return process, log

    try:
        superlink, log = start(
            "superlink", "flower-superlink", "--insecure", "--disable-runtime-dependency-installation", "--port", str(link)
        )
        wait_for_port(link, superlink, log)
        for client in range(2):
            start(
                f"node{client}",
                "flower-supernode",
                "--insecure",
                "--superlink",
                f"127.0.0.1:{link}",
                "--port",
                str(free_port()),
                "--node-config",
                f'partition-id={client} data-dir="{DATA}"',
            )
        overrides = {
            "run.name": '"deployed"',
            "run.out_dir": f'"{tmp_path}"',
            "model.name": f'"{tiny_models / "bert"}"',
            "task.data_dir": f'"{DATA}"',
            "model.rank": 4,
            "model.alpha": 8.0,
            "model.target_modules": '""',
            "model.extra_trainable": '""',
            "task.max_length": 16,
            "task.max_train_examples": 48,
            "task.max_eval_examples": 8,
            "federation.clients": 2,
            "federation.fraction": 0.5,
            "federation.rounds": 2,
            "federation.rank_scheme": '"cycle"',
            "federation.rank_choices": '"[1, 2, 4]"',
            "train.local_steps": 1,
            "train.batch_size": 4,
            "train.eval_batch_size": 8,
            "train.lr": 1e-3,
            "train.eval_every": 1,
            "methods.names": "'" + str(METHODS).replace("'", '"') + "'",
            "flower.node-timeout": 120.0,
        }
        run_config = " ".join(f"{k}={v}" for k, v in overrides.items())
        submitted = subprocess.run(
            [flower_cli("flwr"), "run", str(REPO_ROOT / "flower_app"), "test", "--stream", "--run-config", run_config],
            env=env,
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=420,
        )
        logs = submitted.stdout[-4000:] + submitted.stderr[-2000:]
        assert submitted.returncode == 0 and (tmp_path / "deployed" / "summary.md").exists(), logs
    finally:
        for process in processes:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGTERM)
        for process in processes:
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
    config = tiny_config(
        tiny_models,
        tmp_path,
        f"methods.names={METHODS}".replace("'", '"'),
        "federation.clients=2",
        "federation.fraction=0.5",
        "train.eval_every=1",
    )
    same_run(tmp_path / "deployed", simulated(config, "local"), METHODS)
