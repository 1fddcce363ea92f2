"""kill -9 through the real commands (issue 18, "Reliability", item 2).

`minivlm train-detector`, `pretrain` and `finetune --task vqa` are each started as a process of their own,
SIGKILLed (the whole process group) at kill points drawn by a seeded RNG - one before the first checkpoint,
one between checkpoints (possibly while a checkpoint is being written), one near the end - and started again
with the very same command line after every kill; the last start runs to the end. Its final weights must equal
those of one uninterrupted run of the same command (same --seed, OMP_NUM_THREADS=1) bit for bit, and its log
must hold every step once, with the uninterrupted run's numbers: data order, the RNG (dropout, MLM masks, ITM
pollution, detector flips and RoI sampling), the learning-rate schedule and the optimizer state all resume.
Each run has several steps per epoch and checkpoints that do not fall on epoch ends, so resumes land mid-epoch.

`minivlm extract` is killed once a random number of shards is on disk, then rerun: the store must hold every
image exactly once, with the regions of an uninterrupted extraction.

The kill points come from random.Random(f"{KILL_SEED}-{command}"); KILL_SEED is 0 unless the environment sets
MINIVLM_KILL_SEED (to soak the tests with other seeds). Every wait polls the run's own files against a deadline.
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from minivlm import checkpoint
from minivlm.config import get_bert, get_tee, to_dict
from minivlm.data import feature_store as fs
from minivlm.data.feature_store import FeatureStore, FeatureStoreWriter
from minivlm.data.synthetic import generate_world
from minivlm.data.world import World
from minivlm.regions import Regions

import helpers
from helpers import finish, kill_group, shard_key_counts, tail, wait_until

ROOT = Path(__file__).resolve().parents[1]
# Unbuffered, so that what a killed run printed (its "resumed from" line) is in its stdout file.
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
KILL_SEED = int(os.environ.get("MINIVLM_KILL_SEED", "0"))
DIM = 32  # region feature width of the fixture's store
STEPS, CKPT = 12, 4  # every training run: 12 optimizer steps, a checkpoint every 4 (and at the end)
DEADLINE = 120  # seconds for any one launch; a run takes a few


# ------------------------------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    """A generated world (16 images: 12 train, 2 val, 2 test), a store of random regions for each of its images,
    a small WordPiece vocabulary of the world's words (keeps the MLM decoder and each checkpoint small), and a
    pre-trained folder of bert-demo's shape in that vocabulary (`pretrain --init-text`, `finetune --pretrained`)."""
    root = tmp_path_factory.mktemp("kill")
    generate_world(root / "world", images=16, seed=3, nlvr2_pairs=0, workers=1)
    world = World(root / "world")
    names = world.class_names()
    g = torch.Generator().manual_seed(0)
    with FeatureStoreWriter(root / "store", meta={"class_names": names}) as w:
        for split in world.splits():
            for iid in sorted(world.instances(split).images):
                k = 5
                xy = torch.rand(k, 2, generator=g) * 60
                labels = torch.randint(len(names), (k,), generator=g)
                w.add(iid, Regions(boxes=torch.cat([xy, xy + 5 + torch.rand(k, 2, generator=g) * 30], 1),
                                   features=torch.randn(k, DIM, generator=g), scores=torch.linspace(0.9, 0.5, k),
                                   labels=labels, image_size=(100, 100), tags=[names[i] for i in labels.tolist()]))
    words = set()
    for path in [*(root / "world" / "annotations").glob("*.json"), *(root / "world" / "vqa").glob("*.json")]:
        words.update(re.findall(r"[a-z]+", path.read_text().lower()))
    vocab = root / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *sorted(words)]) + "\n")
    n_vocab = len(vocab.read_text().splitlines())

    from minivlm.tasks.pretrain import PretrainModel

    torch.manual_seed(0)
    demo = dataclasses.replace(get_bert("bert-demo"), vocab_size=n_vocab, region_dim=DIM)
    checkpoint.write(root / "pretrained", "pretrain", {"bert": to_dict(demo)}, PretrainModel(demo).state_dict(),
                     vocab=vocab)
    return root


# ------------------------------------------------------------------------------------------------ processes


def start(args: list[str], logs: Path, name: str) -> subprocess.Popen:
    """`python -m minivlm.cli ARGS` in a session of its own, its output into LOGS/NAME.out.txt and .err.txt."""
    return helpers.start([sys.executable, "-m", "minivlm.cli", *args], logs, name, ENV)


def log_entries(out: Path) -> list[dict]:
    """The trainer's log.jsonl, read while it may be written (a half-written last line is left out)."""
    try:
        text = (out / "log.jsonl").read_text()
    except FileNotFoundError:
        return []
    entries = []
    for line in text.splitlines():
        try:
            entries.append(json.loads(line))
        except json.JSONDecodeError:
            break
    return entries


def trained_steps(out: Path) -> list[int]:
    return [e["step"] for e in log_entries(out) if "loss" in e]


def latest_checkpoint(out: Path) -> int:
    """Step of the checkpoint a rerun resumes from (0: none)."""
    pointer = out / "checkpoint" / "latest"
    return int(re.fullmatch(r"step-(\d+)", pointer.read_text().strip()).group(1)) if pointer.is_file() else 0


def assert_same_tensors(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor], what: str) -> None:
    assert sorted(got) == sorted(want), f"{what}: tensor names differ"
    differ = [k for k in want if got[k].dtype != want[k].dtype or not torch.equal(got[k], want[k])]
    assert not differ, (f"{what}: {len(differ)} of {len(want)} tensors differ from the uninterrupted run's, e.g. "
                        f"{differ[:3]} (max abs diff {(got[differ[0]].double() - want[differ[0]].double()).abs().max()})")


def without_time(entries: list[dict]) -> list[dict]:
    return [{k: v for k, v in e.items() if k != "elapsed_s"} for e in entries]


def differences(a, b, where: str = "") -> list[str]:
    """Where two nests of dicts, lists and tensors differ (tensors: dtype, shape and every bit)."""
    if torch.is_tensor(a) or torch.is_tensor(b):
        same = torch.is_tensor(a) and torch.is_tensor(b) and a.dtype == b.dtype and torch.equal(a, b)
        return [] if same else [where]
    if isinstance(a, dict) and isinstance(b, dict):
        if sorted(a, key=str) != sorted(b, key=str):
            return [f"{where} (keys)"]
        return [d for k in a for d in differences(a[k], b[k], f"{where}/{k}")]
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        if len(a) != len(b):
            return [f"{where} (length)"]
        return [d for i, (x, y) in enumerate(zip(a, b)) for d in differences(x, y, f"{where}/{i}")]
    return [] if a == b else [where]


# ------------------------------------------------------------------------------------------------ training


def kill_points(command: str) -> list[int]:
    """Steps after whose log line the run is killed: before the first checkpoint, between checkpoints (at one
    sometimes: mid-save), and near the end (after the last checkpoint before the final one)."""
    rng = random.Random(f"{KILL_SEED}-{command}")
    return [rng.randint(1, CKPT - 2), rng.randint(CKPT, STEPS - CKPT - 1), rng.randint(STEPS - CKPT + 1, STEPS - 2)]


def kill_and_resume(command: str, args, tmp_path: Path) -> None:
    """Runs ARGS(ref) uninterrupted (alongside the rest) and ARGS(run) killed at each of `kill_points`, started
    again after each kill and at last run to the end; compares the two."""
    ref_out, out, logs = tmp_path / "ref", tmp_path / "run", tmp_path / "logs"
    ref = start(args(ref_out), logs, "ref")
    try:
        killed_after, resumed_from = [], []  # the last step logged before each kill; the checkpoint then
        for i, point in enumerate(kill_points(command)):
            point = max(point, max(trained_steps(out), default=0) + 1)  # past what the last killed start logged
            proc = start(args(out), logs, f"kill{i}")
            try:
                wait_until(lambda p=point: max(trained_steps(out), default=0) >= p, proc, logs,
                           f"{command}: start {i} logging step {point}", DEADLINE)
            finally:
                rc = kill_group(proc)
            assert rc == -signal.SIGKILL, f"{command}: start {i} ended with rc {rc}, not by SIGKILL:\n{tail(logs)}"
            assert not (out / "model.safetensors").exists(), f"{command}: start {i} finished before the kill"
            killed_after.append(max(trained_steps(out)))
            resumed_from.append(latest_checkpoint(out))
            if i:
                assert_resumed(logs / f"kill{i}.out.txt", resumed_from[i - 1])
        last = start(args(out), logs, "last")
        assert finish(last, logs, f"{command}: the last start", DEADLINE) == 0, tail(logs)
        assert_resumed(logs / "last.out.txt", resumed_from[-1])
        assert finish(ref, logs, f"{command}: the uninterrupted run", DEADLINE) == 0, tail(logs)
    finally:
        if ref.poll() is None:
            kill_group(ref)
    where = f"{command} killed after logging steps {killed_after} (resumed from {resumed_from})"
    # The first kill came before any checkpoint (the next start began afresh), the last one after several.
    assert resumed_from[0] == 0 and CKPT <= resumed_from[-1] < STEPS, where

    ref_log, log = log_entries(ref_out), log_entries(out)
    assert trained_steps(out) == list(range(1, STEPS + 1)), f"{where}: each step logged once"
    first = next((i for i, (a, b) in enumerate(zip(without_time(log), without_time(ref_log))) if a != b), None)
    assert first is None and len(log) == len(ref_log), (
        f"{where}: the log departs from the uninterrupted run's" +
        (f" at step {ref_log[first].get('step')}:\n{log[first]}\n{ref_log[first]}" if first is not None else ""))
    assert_same_tensors(load_file(out / "model.safetensors"), load_file(ref_out / "model.safetensors"), where)
    # The training state at the end, as a further resume would read it: optimizer moments, schedule, RNG.
    name = f"step-{STEPS:07d}"
    assert latest_checkpoint(out) == latest_checkpoint(ref_out) == STEPS
    state = torch.load(out / "checkpoint" / name / "state.pt", weights_only=True)
    ref_state = torch.load(ref_out / "checkpoint" / name / "state.pt", weights_only=True)
    assert set(state) >= {"optimizer", "scheduler", "torch_rng", "step"}
    assert not differences(state, ref_state), f"{where}: final training state differs at {differences(state, ref_state)[:5]}"


def assert_resumed(stdout: Path, step: int) -> None:
    text = stdout.read_text()
    found = [int(s) for s in re.findall(r"\] resumed from \S+ \(step (\d+)\)", text)]
    assert found == ([step] if step else []), f"{stdout.name}: expected to resume from step {step}:\n{text[-2000:]}"


def test_train_detector_killed_three_times_ends_as_an_uninterrupted_run(data, tmp_path):
    """SGD with momentum, random flips (the dataset draws from torch's RNG) and RoI sampling; 6 images in
    batches of 2: 3 steps an epoch, so the checkpoints at steps 4 and 8 fall mid-epoch."""
    def args(out: Path) -> list[str]:
        return ["train-detector", "--data", str(data / "world"), "--out", str(out), "--image-size", "64",
                "--max-train-images", "6", "--epochs", "100", "--max-steps", str(STEPS), "--batch-size", "2",
                "--optimizer", "sgd", "--lr", "0.02", "--warmup-steps", "3", "--eval-split", "none",
                "--ckpt-every", str(CKPT), "--log-every", "1", "--seed", "7",
                "--tee", "rpn_post_nms_topk=50", "--tee", "roi_batch_per_image=32"]

    kill_and_resume("train-detector", args, tmp_path)
    run, ref = tmp_path / "run", tmp_path / "ref"
    assert json.loads((run / "config.json").read_text()) == json.loads((ref / "config.json").read_text())
    # the last step's losses (metrics.json) as the uninterrupted run's
    assert without_time([json.loads((run / "metrics.json").read_text())]) == \
        without_time([json.loads((ref / "metrics.json").read_text())])


def test_pretrain_killed_three_times_ends_as_an_uninterrupted_run(data, tmp_path):
    """AdamW, dropout, MLM masks and ITM pollution (all from torch's RNG), and held-out evaluations between
    steps; batches of 8 over the corpus of 12 images' captions and questions."""
    def args(out: Path) -> list[str]:
        return ["pretrain", "--data", str(data / "world"), "--features", str(data / "store"), "--out", str(out),
                "--preset", "bert-demo", "--init-text", str(data / "pretrained"), "--tags", "store",
                "--batch-size", "8", "--max-steps", str(STEPS), "--lr", "1e-3", "--warmup-steps", "2",
                "--ckpt-every", str(CKPT), "--log-every", "1", "--eval-every", "5", "--eval-examples", "8",
                "--seed", "7"]

    kill_and_resume("pretrain", args, tmp_path)
    run, ref = tmp_path / "run", tmp_path / "ref"
    assert_same_tensors(load_file(run / "model" / "model.safetensors"), load_file(ref / "model" / "model.safetensors"),
                        "pretrain's model folder")
    assert json.loads((run / "result.json").read_text())["eval"] == json.loads((ref / "result.json").read_text())["eval"]


def test_finetune_vqa_killed_three_times_ends_as_an_uninterrupted_run(data, tmp_path):
    """AdamW and dropout from the pre-trained folder; 20 questions in batches of 8: 3 steps an epoch."""
    def args(out: Path) -> list[str]:
        return ["finetune", "--task", "vqa", "--data", str(data / "world"), "--features", str(data / "store"),
                "--pretrained", str(data / "pretrained"), "--out", str(out), "--num-answers", "6",
                "--max-train", "20", "--steps", str(STEPS), "--batch-size", "8", "--lr", "1e-3",
                "--ckpt-every", str(CKPT), "--log-every", "1", "--max-eval", "4", "--eval-batch-size", "8",
                "--no-progress", "--seed", "7"]

    kill_and_resume("finetune-vqa", args, tmp_path)
    run, ref = tmp_path / "run", tmp_path / "ref"
    assert json.loads((run / "metrics.json").read_text())["train"]["step"] == STEPS
    for name in ("answers.txt", "results_val.json", "results_test.json"):  # the same answer set, the same answers
        assert (run / name).read_text() == (ref / name).read_text(), name


# ------------------------------------------------------------------------------------------------ extract


def test_extract_killed_midway_then_rerun_stores_every_image_once(data, tmp_path):
    """20 images, 3 to a shard (7 shards): killed once a random 1-4 shards are complete, then rerun."""
    from PIL import Image

    from minivlm.vision.tee import TEE, save_detector

    images = tmp_path / "images"
    images.mkdir()
    rng = random.Random(1)
    for i in range(20):
        img = Image.new("RGB", (rng.randint(40, 90), rng.randint(40, 90)), (rng.randrange(256), 90, 160))
        img.paste((rng.randrange(256), rng.randrange(256), 40), (5, 5, 5 + rng.randint(8, 30), 5 + rng.randint(8, 30)))
        img.save(images / f"{i:02d}.png")
    torch.manual_seed(0)
    cfg = dataclasses.replace(get_tee("tee-demo"), image_size=64, fpn_channels=16, fpn_layers=1, rpn_pre_nms_topk=100,
                              rpn_post_nms_topk=20, max_regions=6, region_dim=DIM)
    save_detector(TEE(cfg).eval(), tmp_path / "det")

    def args(store: Path) -> list[str]:
        return ["extract", "--detector", str(tmp_path / "det"), "--images", str(images), "--out", str(store),
                "--shard-size", "3", "--batch-size", "2", "--dtype", "float32"]

    ref_store, store, logs = tmp_path / "ref", tmp_path / "store", tmp_path / "logs"
    keys = [f"{i:02d}.png" for i in range(20)]
    shards = random.Random(f"{KILL_SEED}-extract").randint(1, 4)
    ref = start(args(ref_store), logs, "ref")
    try:
        proc = start(args(store), logs, "killed")
        try:
            wait_until(lambda: len(fs._list_shards(store)) >= shards if store.is_dir() else False, proc, logs,
                       f"extract: {shards} shards", DEADLINE)
        finally:
            rc = kill_group(proc)
        assert rc == -signal.SIGKILL, f"extract ended with rc {rc}, not by SIGKILL:\n{tail(logs)}"
        partial = shard_key_counts(store)
        assert set(partial.values()) == {1} and set(partial) < set(keys), partial  # killed midway
        assert len(partial) >= 3 * shards

        again = start(args(store), logs, "again")
        assert finish(again, logs, "extract: the rerun", DEADLINE) == 0, tail(logs)
        assert finish(ref, logs, "extract: the uninterrupted run", DEADLINE) == 0, tail(logs)
    finally:
        if ref.poll() is None:
            kill_group(ref)
    out = (logs / "again.out.txt").read_text()
    assert f"{20 - len(partial)} images written to {store}, {len(partial)} already there, 0 unreadable" in out, out
    assert shard_key_counts(store) == {k: 1 for k in keys}  # every image exactly once, across all shards
    assert not [p.name for p in store.iterdir() if p.name.startswith(".")]  # no temp file left behind
    got, want = FeatureStore(store), FeatureStore(ref_store)
    assert sorted(got.keys()) == sorted(want.keys()) == keys
    for key in keys:
        a, b = got[key], want[key]
        for field in ("boxes", "features", "scores", "labels", "attributes"):
            x, y = getattr(a, field), getattr(b, field)
            assert (x is None and y is None) or torch.equal(x, y), f"{key}: {field} differs from the uninterrupted run's"
        assert a.image_size == b.image_size and a.tags == b.tags
