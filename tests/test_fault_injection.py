"""Fault injection (issue 18, "Reliability"): a rank killed under torchrun, and an output folder that cannot
be written.

* Under `torchrun --nproc_per_node 2` (gloo), SIGKILL to one worker rank brings the whole run down (torchrun
  exits non-zero, the surviving rank does not hang), and rerunning the same command resumes from the last
  checkpoint and finishes.
* A read-only output folder (a feature store that `extract` would add to, a run folder that a training stage
  would resume into) fails with a one-line error naming the folder, and leaves every file that was there
  byte-identical.

The tests run as root, which ignores permission bits (CAP_DAC_OVERRIDE). Switching to `nobody` does not
work here: the interpreter lives under /root (mode 0700), out of nobody's reach. So the command runs as root
without CAP_DAC_OVERRIDE and CAP_DAC_READ_SEARCH (dropped from the bounding set before exec, so the new
process never has them): root then obeys the mode bits of its own files like any owner, and a 0555 folder
is really read-only to it.
"""

from __future__ import annotations

import ctypes
import dataclasses
import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from PIL import Image

from minivlm.config import get_tee
from minivlm.data.synthetic import generate_world
from minivlm.train.trainer import read_log

from helpers import finish, free_port, kill_group, start, tail, wait_until

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
SIZE = 64  # detector canvas: TEE-0's architecture, a fraction of a second per step


@pytest.fixture(scope="module")
def world_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("world") / "w"
    generate_world(root, images=12, seed=3, nlvr2_pairs=0, workers=1)
    return root


def detector_args(world_root, out, steps: int) -> list[str]:
    """`minivlm train-detector` on 4 images of the tiny world, one global batch of 4 per step, a checkpoint
    every 2 steps."""
    return ["train-detector", "--data", str(world_root), "--out", str(out), "--image-size", str(SIZE),
            "--max-train-images", "4", "--epochs", "100", "--max-steps", str(steps), "--batch-size", "4",
            "--optimizer", "sgd", "--lr", "0.02", "--eval-split", "none", "--no-flip", "--ckpt-every", "2",
            "--log-every", "1", "--tee", "rpn_post_nms_topk=50", "--tee", "roi_batch_per_image=32"]


def tree_hashes(folder: Path) -> dict[str, str]:
    """sha256 of every file under `folder`, by relative path."""
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if "error" in line.lower()]


# ------------------------------------------------------------------------------------ a killed rank


def _children(pid: int) -> list[int]:
    """Processes whose parent is `pid` (from /proc/*/stat: no psutil in the venv)."""
    out = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:  # gone meanwhile
            continue
        if int(stat[stat.rindex(")") + 2:].split()[1]) == pid:  # fields after "(comm)": state, ppid, ...
            out.append(int(entry.name))
    return out


def _rank_of(pid: int) -> int | None:
    try:
        env = (Path("/proc") / str(pid) / "environ").read_bytes().split(b"\0")
    except OSError:
        return None
    ranks = [int(v[5:]) for v in env if v.startswith(b"RANK=")]
    return ranks[0] if ranks else None


def _alive(pid: int) -> bool:
    """Running, not a zombie waiting for a reaper."""
    try:
        stat = (Path("/proc") / str(pid) / "stat").read_text()
    except OSError:
        return False
    return stat[stat.rindex(")") + 2] != "Z"


def _torchrun(args: list[str], logs: Path, name: str) -> subprocess.Popen:
    """Starts `torchrun --nproc_per_node 2 -m minivlm.cli ARGS` in its own session (so that a timeout can kill
    the whole tree), stdout and stderr into files under `logs`."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
           "-m", "minivlm.cli", *args]
    return start(cmd, logs, name, ENV)


def test_a_killed_rank_stops_torchrun_and_a_rerun_resumes(tmp_path, world_root):
    """SIGKILL to rank 1 of a two-rank `train-detector` once a checkpoint exists: torchrun's agent tears the
    group down (rank 0, blocked in a collective, must not hang) and exits non-zero; the same command again
    resumes from that checkpoint (not from step 0) and finishes every step, each logged once."""
    out, logs, steps = tmp_path / "det", tmp_path / "logs", 8
    args = detector_args(world_root, out, steps)
    latest = out / "checkpoint" / "latest"
    first = _torchrun(args, logs, "first")
    try:
        deadline = time.monotonic() + 120  # two ranks importing torch on a shared 2-core machine: ~10 s

        def workers() -> dict[int, int] | None:  # rank -> pid, once both ranks run
            found = {_rank_of(pid): pid for pid in _children(first.pid)}
            return found if {0, 1} <= set(found) else None

        ranks = wait_until(workers, first, logs, "two worker ranks", deadline - time.monotonic(), poll=0.05)
        wait_until(lambda: latest.is_file() and latest.read_text().strip(), first, logs, "a checkpoint",
                   deadline - time.monotonic(), poll=0.05)
        os.kill(ranks[1], signal.SIGKILL)
        killed = time.monotonic()
        rc = finish(first, logs, "torchrun after SIGKILL to rank 1", 90)
        teardown = time.monotonic() - killed
    finally:
        kill_group(first)
    assert rc != 0, f"torchrun reported success although rank 1 was killed:\n{tail(logs)}"
    assert not _alive(ranks[0]), "the surviving rank 0 outlived torchrun"
    # The agent notices within its monitor interval (0.1 s) and SIGTERMs rank 0; only a rank that ignored
    # SIGTERM would wait out the 30 s grace before SIGKILL.
    assert teardown < 25, f"torchrun took {teardown:.1f} s to stop after rank 1 died"
    assert "Signal 9 (SIGKILL) received by PID " + str(ranks[1]) in (logs / "first.err.txt").read_text(), tail(logs)
    saved = int(re.fullmatch(r"step-(\d+)", latest.read_text().strip()).group(1))
    assert 2 <= saved < steps, saved  # killed mid-run, after at least one checkpoint

    again = _torchrun(args, logs, "again")
    try:
        rc = finish(again, logs, "the torchrun rerun", 240)
    finally:
        kill_group(again)
    assert rc == 0, tail(logs)
    stdout = (logs / "again.out.txt").read_text()
    assert re.search(rf"\[detector\] resumed from \S+step-{saved:07d} \(step {saved}\)", stdout), stdout[-3000:]
    assert latest.read_text().strip() == f"step-{steps:07d}"
    state = torch.load(out / "checkpoint" / f"step-{steps:07d}" / "state.pt", weights_only=True)
    assert state["step"] == steps
    logged = [e["step"] for e in read_log(out / "log.jsonl") if "loss" in e]
    assert logged == list(range(1, steps + 1))  # the killed run's steps past the checkpoint were trimmed
    assert (out / "model.safetensors").is_file() and (out / "config.json").is_file()


# ------------------------------------------------------------------------------ a read-only output


_CAP_DAC_OVERRIDE, _CAP_DAC_READ_SEARCH, _PR_CAPBSET_DROP = 1, 2, 24
# Looked up here: the child only calls it, between fork and exec. Linux only (as /proc above).
_prctl = getattr(ctypes.CDLL(None, use_errno=True), "prctl", None)


def _drop_dac_override() -> None:
    """preexec_fn (root only): remove the capabilities that let root ignore mode bits from the bounding set,
    so the exec'd command runs without them."""
    if _prctl is None:
        raise OSError("no prctl(2) here")
    for cap in (_CAP_DAC_OVERRIDE, _CAP_DAC_READ_SEARCH):
        if _prctl(_PR_CAPBSET_DROP, cap, 0, 0, 0) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"prctl(PR_CAPBSET_DROP, {cap}): {os.strerror(err)}")


def run_unprivileged(args: list[str], timeout: float = 180) -> subprocess.CompletedProcess:
    """`python ARGS` unable to write where the mode bits forbid it, root or not."""
    return subprocess.run([sys.executable, *args], env=ENV, capture_output=True, text=True, timeout=timeout,
                          preexec_fn=_drop_dac_override if os.geteuid() == 0 else None)


def make_read_only(folder: Path) -> None:
    for p in [folder, *folder.rglob("*")]:
        os.chmod(p, 0o555 if p.is_dir() else 0o444)


def make_writable(folder: Path) -> None:  # so that pytest can remove tmp_path when not root
    for p in [folder, *folder.rglob("*")]:
        os.chmod(p, 0o755 if p.is_dir() else 0o644)


@pytest.fixture
def read_only(tmp_path):
    """Makes folders read-only for the test's commands (checked: a file cannot be created in one) and writable
    again afterwards."""
    made: list[Path] = []

    def apply(folder: Path) -> None:
        make_read_only(folder)
        made.append(folder)
        try:
            r = run_unprivileged(["-c", "import sys; open(sys.argv[1], 'w')", str(folder / "probe")], timeout=60)
        except subprocess.SubprocessError as err:  # the preexec_fn failed (no CAP_SETPCAP, or no prctl)
            pytest.skip(f"running as root and unable to drop CAP_DAC_OVERRIDE, so no folder is read-only to the "
                        f"command ({err})")
        assert r.returncode != 0 and "PermissionError" in r.stderr, "the folder is still writable: " + r.stderr
        assert not (folder / "probe").exists()

    yield apply
    for folder in made:
        make_writable(folder)


def cli(*args: str) -> list[str]:
    return ["-m", "minivlm.cli", *args]


def test_extract_into_a_read_only_store_fails_clearly_and_keeps_it(tmp_path, read_only):
    """A complete store made read-only: rerunning `extract` with nothing new succeeds without writing; with
    new images it fails with one line naming the store (no traceback), and every file stays as it was."""
    from minivlm.cli import main
    from minivlm.data.feature_store import FeatureStore
    from minivlm.vision.tee import TEE, save_detector

    torch.manual_seed(0)
    cfg = dataclasses.replace(get_tee("tee-demo"), image_size=SIZE, rpn_pre_nms_topk=200, rpn_post_nms_topk=40,
                              max_regions=10)
    save_detector(TEE(cfg).eval(), tmp_path / "det")
    images, store = tmp_path / "imgs", tmp_path / "store"
    images.mkdir()
    for i in range(3):
        Image.new("RGB", (60 + 10 * i, 50), (40 * i, 200, 40)).save(images / f"{i}.png")
    args = cli("extract", "--detector", str(tmp_path / "det"), "--images", str(images), "--out", str(store),
               "--shard-size", "2")
    assert main(args[2:]) == 0  # the complete store, written in-process (as root: writable)
    before = tree_hashes(store)
    assert "meta.json" in before and len([n for n in before if n.startswith("shard-")]) == 2

    read_only(store)
    done = run_unprivileged(args)  # everything already stored: nothing to write, nothing to fail
    assert done.returncode == 0, done.stderr[-2000:]
    assert "0 images written" in done.stdout and "3 already there" in done.stdout
    assert tree_hashes(store) == before

    for i in range(3, 6):
        Image.new("RGB", (70, 40 + 5 * i), (200, 20 * i, 40)).save(images / f"{i}.png")
    r = run_unprivileged(args)
    assert r.returncode == 1, (r.returncode, r.stderr[-2000:])
    assert "Traceback" not in r.stderr, r.stderr[-3000:]
    errors = error_lines(r.stderr)
    assert len(errors) == 1, r.stderr[-3000:]
    # on a line of its own (not glued to the progress bar), naming the shard it could not write, not a temp name
    assert errors == [f"minivlm extract: error: Permission denied: {store / 'shard-r0-00002.safetensors'}"], errors
    assert tree_hashes(store) == before  # same names (no temp file left behind), same bytes
    assert sorted(FeatureStore(store).keys()) == ["0.png", "1.png", "2.png"]


def test_training_resumed_into_a_read_only_run_folder_fails_clearly_and_keeps_it(tmp_path, world_root, read_only):
    """A run folder with a checkpoint at step 2, made read-only: resuming to step 4 fails with one line naming
    the folder (no traceback), and the checkpoint, log and weights are byte-identical afterwards."""
    from minivlm.cli import main

    out = tmp_path / "det"
    assert main(detector_args(world_root, out, 2)) == 0
    assert (out / "checkpoint" / "latest").read_text().strip() == "step-0000002"
    before = tree_hashes(out)
    assert {"checkpoint/step-0000002/state.pt", "checkpoint/step-0000002/model.safetensors", "log.jsonl",
            "model.safetensors", "config.json"} <= set(before)

    read_only(out)
    r = run_unprivileged(cli(*detector_args(world_root, out, 4)))
    assert r.returncode == 1, (r.returncode, r.stderr[-2000:])
    assert "Traceback" not in r.stderr, r.stderr[-3000:]
    errors = error_lines(r.stderr)
    assert len(errors) == 1, r.stderr[-3000:]
    assert errors == [f"minivlm train-detector: error: Permission denied: {out / 'log.jsonl'}"], errors
    assert tree_hashes(out) == before
    assert [e["step"] for e in read_log(out / "log.jsonl") if "loss" in e] == [1, 2]
