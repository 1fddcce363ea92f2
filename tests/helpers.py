"""What several test files need to run, watch and kill real processes, and to look inside a feature store.

Not a test module (pytest collects test_*.py only); the test files import it as `helpers` (tests/ is on
sys.path, pytest's default rootdir import mode)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest

from minivlm.data import feature_store as fs


def free_port() -> int:
    with socket.socket() as sock:  # a free port: torchrun's static rendezvous hangs on port 0
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start(cmd: list[str], logs: Path, name: str, env: dict) -> subprocess.Popen:
    """CMD in a session of its own (so that its whole process group can be killed), its stdout and stderr
    into LOGS/NAME.out.txt and .err.txt."""
    logs.mkdir(parents=True, exist_ok=True)
    with open(logs / f"{name}.out.txt", "w") as out, open(logs / f"{name}.err.txt", "w") as err:
        return subprocess.Popen(cmd, env=env, stdout=out, stderr=err, start_new_session=True)


def tail(logs: Path, chars: int = 3000) -> str:
    """The end of every log under LOGS, for an assertion's message."""
    return "\n".join(f"--- {p.name}\n{p.read_text(errors='replace')[-chars:]}" for p in sorted(logs.glob("*.txt")))


def kill_group(proc: subprocess.Popen) -> int:
    """SIGKILL to the process's whole group (unless it has already been reaped); its exit status."""
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:  # exited meanwhile
            pass
    return proc.wait()


def finish(proc: subprocess.Popen, logs: Path, what: str, timeout: float) -> int:
    """The process's exit status; past `timeout` its group is killed and the test fails."""
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_group(proc)
        pytest.fail(f"{what}: still running after {timeout:.0f} s (killed its process group):\n{tail(logs)}")


def wait_until(condition, proc: subprocess.Popen, logs: Path, what: str, timeout: float, poll: float = 0.005):
    """Polls `condition` until it returns something true (returned); the test fails if the process exits
    first or time runs out (then the process group is killed)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        if proc.poll() is not None:
            pytest.fail(f"{what}: the process exited (rc {proc.returncode}) before that:\n{tail(logs)}")
        time.sleep(poll)
    kill_group(proc)
    pytest.fail(f"{what}: not within {timeout:.0f} s:\n{tail(logs)}")


def shard_key_counts(store: Path) -> dict:
    """How many times each key is stored across a feature store's shards."""
    counts: dict = {}
    for path in sorted(store.glob("shard-*.safetensors")):
        for key in fs._shard_keys(path)[0]:
            counts[key] = counts.get(key, 0) + 1
    return counts
