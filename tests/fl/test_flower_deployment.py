"""A real Flower deployment on this machine, set up as docs/flower.md's "Several machines" says: a SuperLink
with TLS and SuperNode authentication, two registered SuperNodes as separate processes over HTTPS, the app
submitted with ``flwr run flower_app``, credentials made by ``scripts/flower_certificates.py``. The run's
global adapters and logged numbers equal the in-process simulator's (FLoRA's base updates live in the nodes'
state between messages); SuperNodes with an unregistered key, with no key, or without the CA are refused
while the run goes on."""

import contextlib
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("flwr", reason="the Flower extra is not installed (pip install -e '.[flower]')")

from helpers import DATA, REPO_ROOT, same_run, simulated, tiny_config

METHODS = ["fedplora", "flora"]
CREDENTIALS = REPO_ROOT / "scripts" / "flower_certificates.py"


def flower_cli(name: str) -> str:
    """Flower's command ``name``: beside this Python, else on PATH."""
    found = Path(sys.executable).parent / name
    path = str(found) if found.exists() else shutil.which(name)
    assert path, f"{name} not found beside {sys.executable} or on PATH: a broken Flower install"
    return path


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


@contextlib.contextmanager
def flower_processes(directory: Path, env: dict):
    """Yields ``start(name, command, *args) -> (process, log)``, which starts a Flower command in its own
    process group with its output in ``directory/<name>.log``; every group is ended on exit (Flower's
    detached helpers, the SuperLink's SuperExec and the apps, end with their parent)."""
    processes = []

    def start(name, command, *args):
        log = directory / f"{name}.log"
        with open(log, "w") as out:
            process = subprocess.Popen(
                [flower_cli(command), *args], stdout=out, stderr=subprocess.STDOUT, env=env, cwd=directory, start_new_session=True
            )
        processes.append(process)
        return process, log

    try:
        yield start
    finally:
        for process in processes:  # a group outlives its first process when its children still run
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGTERM)
        for process in processes:
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()


def run_config(tmp_path: Path, tiny_models: Path) -> str:
    """``flwr run --run-config`` for the tiny two-client, two-round run that ``tiny_config`` simulates."""
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
    return " ".join(f"{k}={v}" for k, v in overrides.items())


def handshake_without_ca(port: int) -> str:
    """The TLS version a local client that verifies nothing (no CA, no certificate of its own) agrees on."""
    context = ssl.create_default_context()
    context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw, context.wrap_socket(raw) as tls:
        return tls.version()


def node_credentials(keys: Path, ca: bool, key: str | None) -> list[str]:
    """``flower-supernode`` options: verify the SuperLink with the trial CA (else with the system's CAs),
    sign in with the private key ``keys/key`` (else no key: the node asks the SuperLink to register it)."""
    return [
        *(["--root-certificates", str(keys / "ca.crt")] if ca else []),
        *(["--auth-supernode-private-key", str(keys / key)] if key else []),
    ]


#: The refused SuperNodes: with the CA or not, their key (node-2 is registered, node-3 is not), and what
#: their log says.
REFUSED = {
    "unregistered": (True, "node-3", "[code: 2004] Failed to activate SuperNode"),
    "keyless": (True, None, "SuperNode authentication is enabled. All SuperNodes must be registered"),
    "no-ca": (False, "node-2", "CERTIFICATE_VERIFY_FAILED"),
}


@pytest.mark.skipif(not DATA.is_dir(), reason=f"no local data directory at {DATA}")
def test_secured_flwr_run_equals_our_simulator_and_refuses_unauthorised_nodes(tiny_models, tmp_path):
    keys = tmp_path / "credentials"
    subprocess.run([sys.executable, str(CREDENTIALS), str(keys), "4"], check=True, capture_output=True)
    home = tmp_path / "flwr-home"
    home.mkdir()
    port = free_port()
    link = f"127.0.0.1:{port}"
    (home / "config.toml").write_text(
        f'[superlink]\ndefault = "test"\n\n[superlink.test]\naddress = "{link}"\nroot-certificates = "{keys / "ca.crt"}"\n'
    )
    env = {**os.environ, "FLWR_HOME": str(home), "FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1"}

    def supernode(name, partition, ca, key):
        node_config = f'partition-id={partition} data-dir="{DATA}"'
        options = node_credentials(keys, ca, key)
        return start(
            name, "flower-supernode", "--superlink", link, "--port", str(free_port()), *options, "--node-config", node_config
        )

    with flower_processes(tmp_path, env) as start:
        superlink, log = start(
            "superlink",
            "flower-superlink",
            *("--ssl-ca-certfile", str(keys / "ca.crt")),
            *("--ssl-certfile", str(keys / "superlink.crt")),
            *("--ssl-keyfile", str(keys / "superlink.key")),
            "--enable-supernode-auth",
            "--disable-runtime-dependency-installation",
            *("--port", str(port)),
        )
        wait_for_port(port, superlink, log)
        # no mutual TLS: the CA lets a caller check the SuperLink, the SuperLink asks nothing of the caller
        assert handshake_without_ca(port).startswith("TLS")
        # registering takes nothing but the CA certificate; node-2 is registered but will not have the CA
        for key in ("node-0", "node-1", "node-2"):
            registered = subprocess.run(
                [flower_cli("flwr"), "supernode", "register", str(keys / f"{key}.pub")],
                env=env,
                capture_output=True,
                text=True,
                timeout=60,
            )
            assert registered.returncode == 0 and "registered successfully" in registered.stdout, registered
        for client in range(2):
            supernode(f"node{client}", client, True, f"node-{client}")
        submitted, run_log = start(
            "flwr-run",
            "flwr",
            "run",
            str(REPO_ROOT / "flower_app"),
            "--stream",
            "--run-config",
            run_config(tmp_path, tiny_models),
        )
        refused = {name: supernode(name, 0, ca, key) for name, (ca, key, _) in REFUSED.items()}
        try:
            submitted.wait(timeout=420)
        except subprocess.TimeoutExpired:
            pytest.fail(f"flwr run did not finish in 420 s:\n{run_log.read_text()[-4000:]}")
        assert submitted.returncode == 0 and (tmp_path / "deployed" / "summary.md").exists(), run_log.read_text()[-4000:]
        for name, (process, node_log) in refused.items():
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(timeout=30)
            refusal = REFUSED[name][2]
            assert process.poll() not in (None, 0) and refusal in node_log.read_text(), f"{name}: {node_log.read_text()[-3000:]}"
    config = tiny_config(
        tiny_models,
        tmp_path,
        f"methods.names={METHODS}".replace("'", '"'),
        "federation.clients=2",
        "federation.fraction=0.5",
        "train.eval_every=1",
    )
    same_run(tmp_path / "deployed", simulated(config, "local"), METHODS)
