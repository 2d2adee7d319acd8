"""Shared fixtures of the end-to-end tests: building the Rust binaries once, free loopback
ports, and child processes that are always killed at the end, even on failure."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "examples" / "python"))

from sluice_client import SluiceClient  # noqa: E402


def _die_with_parent() -> None:
    """Runs in each child before exec: the kernel SIGKILLs it if pytest dies, whatever
    kills pytest (even SIGKILL), so no broker or worker outlives a test run."""
    import ctypes

    pr_set_pdeathsig = 1
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(pr_set_pdeathsig, signal.SIGKILL)


def _exit_on_sigterm(signum, frame):
    # Turn SIGTERM (from `timeout`, CI) into what Ctrl-C does: pytest stops the session
    # and still runs fixture teardown, which kills the child processes.
    raise KeyboardInterrupt(f"terminated by signal {signum}")


signal.signal(signal.SIGTERM, _exit_on_sigterm)


def target_dir() -> Path:
    return Path(os.environ.get("CARGO_TARGET_DIR", ROOT / "target"))


def binary(name: str) -> Path:
    """Path of a built binary (`sluice`) or example (`todo_app`, ...)."""
    debug = target_dir() / "debug"
    path = debug / name if name == "sluice" else debug / "examples" / name
    assert path.exists(), f"{path} missing: the build fixture should have built it"
    return path


@pytest.fixture(scope="session", autouse=True)
def built() -> None:
    """Builds the broker and the examples once per session (incremental: fast when fresh)."""
    subprocess.run(
        ["cargo", "build", "--examples", "--bins"],
        cwd=ROOT,
        check=True,
        timeout=1200,
    )


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(predicate, timeout: float, what: str, interval: float = 0.05):
    """Polls ``predicate`` until it returns a truthy value; fails naming ``what``."""
    deadline = time.monotonic() + timeout
    last_error = None
    while time.monotonic() < deadline:
        try:
            value = predicate()
            if value:
                return value
        except Exception as e:  # noqa: BLE001 - retried until the deadline
            last_error = e
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what} (last error: {last_error!r})")


class Processes:
    """Child processes of one test module, logged to files and killed at teardown."""

    def __init__(self, log_dir: Path):
        self.log_dir = log_dir
        self.procs: dict[str, subprocess.Popen] = {}
        # Every process ever started, including killed and replaced ones.
        self.every: list[subprocess.Popen] = []

    def start(self, name: str, args: list, env: dict | None = None) -> subprocess.Popen:
        full_env = {**os.environ, "RUST_LOG": "info", "NO_COLOR": "1", **(env or {})}
        with open(self.log_dir / f"{name}.log", "ab") as log:
            proc = subprocess.Popen(
                [str(a) for a in args],
                stdout=log,
                stderr=subprocess.STDOUT,
                env=full_env,
                preexec_fn=_die_with_parent,
            )
        self.procs[name] = proc
        self.every.append(proc)
        return proc

    def log(self, name: str) -> str:
        path = self.log_dir / f"{name}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def check_alive(self, name: str) -> None:
        code = self.procs[name].poll()
        assert code is None, f"{name} exited with {code}:\n{self.log(name)[-3000:]}"

    def kill(self, name: str, sig: int = signal.SIGKILL) -> int:
        """Sends ``sig`` to a process and waits for it to exit; returns its exit code."""
        proc = self.procs.pop(name)
        if proc.poll() is None:
            proc.send_signal(sig)
        return proc.wait(timeout=15)

    def kill_all(self) -> None:
        for proc in self.every:
            if proc.poll() is None:
                proc.kill()
        for proc in self.every:
            proc.wait(timeout=10)


@pytest.fixture(scope="module")
def processes(tmp_path_factory, request):
    log_dir = tmp_path_factory.mktemp(f"logs-{request.module.__name__.split('.')[-1]}")
    procs = Processes(log_dir)
    failed_before = request.session.testsfailed
    try:
        yield procs
    finally:
        procs.kill_all()
        if request.session.testsfailed > failed_before:
            for log in sorted(log_dir.glob("*.log")):
                tail = log.read_text(errors="replace")[-4000:]
                sys.stderr.write(f"\n===== {log.name} (tail) =====\n{tail}\n")


def start_broker(processes: Processes, name: str = "broker") -> str:
    """Starts `sluice serve` on a free port; returns ``host:port`` once it answers."""
    port = free_port()
    # A fresh write-ahead log per broker, so no state leaks between tests or runs.
    data_dir = tempfile.mkdtemp(prefix=f"sluice-e2e-{name}-")
    processes.start(name, [binary("sluice"), "serve", "--listen", f"127.0.0.1:{port}", "--data-dir", data_dir])
    target = f"127.0.0.1:{port}"
    client = SluiceClient(target)
    try:
        def ready():
            processes.check_alive(name)
            client.stats()
            return True

        wait_until(ready, 15, f"broker {name} on {target}")
    finally:
        client.close()
    return target


@pytest.fixture(scope="module")
def broker(processes) -> str:
    return start_broker(processes)
