"""Feature store (sharded safetensors, resumable, lazy) and Oscar/VinVL TSV interop."""

from __future__ import annotations

import base64
import json
import os
import pickle
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

import minivlm.data.feature_store as fs
from minivlm.data.feature_store import FeatureStore, FeatureStoreWriter, MissingKeyError
from minivlm.data.oscar_tsv import OscarTSV, export_oscar_tsv, image_id_from_key, import_oscar_tsv
from minivlm.errors import DataFormatError, MiniVLMError
from minivlm.regions import Regions

from helpers import shard_key_counts

REPO = Path(__file__).resolve().parents[1]
FORMATS = Path(__file__).resolve().parent / "fixtures" / "formats"  # copy of ../shared/formats
CLASSES = ["dog", "cat", "man", "helmet", "tree"]
ATTRS = ["red", "big", "wooden"]
D = 8


def make_regions(seed: int, k: int | None = None, tags: bool = True, attrs: bool = True) -> Regions:
    g = torch.Generator().manual_seed(seed)
    k = int(torch.randint(0, 6, (1,), generator=g)) if k is None else k
    w, h = 100 + seed, 80 + 2 * seed
    xy = torch.rand(k, 2, generator=g) * torch.tensor([w / 2, h / 2])
    wh = torch.rand(k, 2, generator=g) * torch.tensor([w / 2, h / 2]) + 1
    labels = torch.randint(0, len(CLASSES), (k,), generator=g)
    at = torch.randint(0, len(ATTRS), (k,), generator=g)
    return Regions(
        boxes=torch.cat([xy, xy + wh], 1), features=torch.randn(k, D, generator=g),
        scores=torch.rand(k, generator=g), labels=labels, image_size=(w, h),
        tags=[CLASSES[i] for i in labels.tolist()] if tags else [],
        attributes=at if attrs else None, attribute_names=[ATTRS[i] for i in at.tolist()] if attrs else [],
    )


META = {"class_names": CLASSES, "attribute_names": ATTRS, "extractor": {"name": "test"}}


def assert_same(a: Regions, b: Regions, atol: float = 1e-2) -> None:
    assert a.boxes.shape == b.boxes.shape and a.features.shape == b.features.shape
    assert torch.allclose(a.boxes, b.boxes, atol=1e-4)
    assert torch.allclose(a.features, b.features, atol=atol, rtol=1e-3)
    assert torch.allclose(a.scores, b.scores)
    assert torch.equal(a.labels, b.labels)
    assert a.image_size == b.image_size
    assert a.tags == b.tags and a.attribute_names == b.attribute_names
    assert (a.attributes is None) == (b.attributes is None)
    if a.attributes is not None:
        assert torch.equal(a.attributes, b.attributes)


# ------------------------------------------------------------------------------------------------ store


def test_round_trip_float16_and_names(tmp_path):
    keys = [0, 7, "COCO_val2014_000000000042", "empty", 12]
    regs = {k: make_regions(i, k=0 if k == "empty" else 4, tags=i != 4, attrs=i % 2 == 0) for i, k in enumerate(keys)}
    with FeatureStoreWriter(tmp_path / "st", shard_size=2, meta=META) as w:
        for k in keys:
            assert w.add(k, regs[k])
        assert not w.add(7, regs[7])  # duplicate within one run is ignored
    store = FeatureStore(tmp_path / "st")
    assert len(store) == 5 and store.keys() == keys
    assert store.meta["class_names"] == CLASSES and store.meta["feature_dim"] == D
    assert store.meta["extractor"] == {"name": "test"}
    for k in keys:
        got = store[k]
        assert got.features.dtype == torch.float32
        assert_same(got, regs[k])
        assert torch.equal(got.features, regs[k].features.half().float())  # exactly the float16 values
    assert store[12].tags == [] and store[0].tags == [CLASSES[i] for i in regs[0].labels.tolist()]
    assert store[7].attributes is None and store[0].attributes is not None
    assert len(store["empty"]) == 0
    assert "7" in store and store["7"].image_size == regs[7].image_size  # "7" and 7 are the same id
    assert 99 not in store
    assert len(list((tmp_path / "st").glob("shard-r0-*.safetensors"))) == 3


def test_find_resolves_the_names_datasets_give_images(tmp_path):
    keys = [42, "1001", "x_7", "dev/dev-3-1-img0.png", "train/5/train-9-0-img1.png"]
    with FeatureStoreWriter(tmp_path / "st", meta=META) as w:
        for i, k in enumerate(keys):
            w.add(k, make_regions(i, k=1))
    store = FeatureStore(tmp_path / "st")
    assert store.find(42) == 42 and store.find("42") == "42" and store.find(1001) == 1001  # either spelling reads
    assert store.find("x_7.jpg") == "x_7"  # a file name, stored without its extension
    assert store.find("dev-3-1-img0.png") == "dev/dev-3-1-img0.png"  # a bare NLVR2 name, stored by its path
    assert store.find("train-9-0-img1.png") == "train/5/train-9-0-img1.png"  # real train images sit deeper
    assert store.find(7) is None and store.find("nowhere.png") is None
    assert all(store[store.find(k)] is not None for k in (42, "42", "x_7.jpg", "dev-3-1-img0.png"))


def test_float32_option_is_exact(tmp_path):
    r = make_regions(1, k=3)
    with FeatureStoreWriter(tmp_path, meta=META, dtype="float32") as w:
        w.add("a", r)
    assert torch.equal(FeatureStore(tmp_path)["a"].features, r.features)


def test_reading_one_key_opens_one_shard(tmp_path, monkeypatch):
    with FeatureStoreWriter(tmp_path, shard_size=1, meta=META) as w:
        for i in range(12):
            w.add(i, make_regions(i, k=3))
    opened = []
    real = fs.safe_open

    def counting(path, *a, **kw):
        opened.append(Path(path).name)
        return real(path, *a, **kw)

    monkeypatch.setattr(fs, "safe_open", counting)
    store = FeatureStore(tmp_path)
    assert len(store) == 12 and opened == []  # the index comes from headers, no tensor is mapped
    r = store[5]
    store[5]
    assert len(opened) == 1 and len(r) == 3
    assert_same(r, make_regions(5, k=3))


def test_resume_after_exception_and_after_abandoned_writer(tmp_path):
    keys = list(range(11))
    root = tmp_path / "st"
    with pytest.raises(RuntimeError):
        with FeatureStoreWriter(root, shard_size=3, meta=META) as w:
            for k in keys:
                if k == 5:
                    raise RuntimeError("extractor crashed")
                w.add(k, make_regions(k))
    assert set(FeatureStore(root).keys()) == set(range(5))  # buffered images were flushed on the way out

    w = FeatureStoreWriter(root, shard_size=3, meta=META)
    assert w.done_keys() == set(range(5))
    assert w.todo(keys) == list(range(5, 11))
    for k in w.todo(keys)[:4]:
        w.add(k, make_regions(k))
    del w  # abandoned without close(): the shard of 5,6,7 is on disk, key 8 was only buffered

    w = FeatureStoreWriter(root, shard_size=3, meta=META)
    assert w.done_keys() == set(range(8))
    reader = FeatureStore(root)
    assert len(reader) == 8
    with w:
        for k in w.todo(keys):
            w.add(k, make_regions(k))
        assert not w.add(3, make_regions(3))  # already in a complete shard
    assert shard_key_counts(root) == {k: 1 for k in keys}
    assert len(reader) == 8  # a reader's index is cached until refresh()
    reader.refresh()
    assert len(reader) == 11 and len(reader[10]) == len(make_regions(10))
    store = FeatureStore(root)
    for k in keys:
        assert_same(store[k], make_regions(k))


KILL_SCRIPT = textwrap.dedent("""
    import os, signal, sys, torch
    from minivlm.data.feature_store import FeatureStoreWriter
    from minivlm.regions import Regions
    root, kill_after = sys.argv[1], int(sys.argv[2])
    with FeatureStoreWriter(root, shard_size=3, meta={"class_names": ["a"], "feature_dim": 4}) as w:
        for k in w.todo(range(40)):
            n = k % 4
            w.add(k, Regions(boxes=torch.full((n, 4), float(k)), features=torch.full((n, 4), float(k)),
                             scores=torch.ones(n), labels=torch.zeros(n, dtype=torch.long), image_size=(10, 10)))
            if k == kill_after:
                os.kill(os.getpid(), signal.SIGKILL)  # kill -9: no exception, no `with` exit, no flush
""")


@pytest.mark.parametrize("kill_after", [4, 8, 20])  # mid-shard, right after a shard is written, later
def test_kill_minus_9_then_rerun(tmp_path, kill_after):
    root = tmp_path / "st"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-c", KILL_SCRIPT, str(root), str(kill_after)], env=env)
    assert proc.returncode == -signal.SIGKILL
    partial = shard_key_counts(root)
    assert set(partial) <= set(range(kill_after + 1)) and len(partial) >= (kill_after + 1) // 3 * 3 - 3
    assert set(partial.values()) <= {1}
    (root / ".shard-r0-00099.safetensors.junk.tmp").write_bytes(b"half a shard")  # what a kill mid-save leaves

    subprocess.run([sys.executable, "-c", KILL_SCRIPT, str(root), "-1"], env=env, check=True)
    assert shard_key_counts(root) == {k: 1 for k in range(40)}  # every image exactly once
    assert not list(root.glob("*.tmp"))
    store = FeatureStore(root)
    assert len(store) == 40
    for k in (0, 13, 39):
        assert len(store[k]) == k % 4 and bool((store[k].features == k).all())


def test_rank_split_into_one_store(tmp_path):
    keys = [f"img{i}" for i in range(9)]
    w0 = FeatureStoreWriter(tmp_path, rank=0, world_size=2, shard_size=2, meta=META)
    w1 = FeatureStoreWriter(tmp_path, rank=1, world_size=2, shard_size=2, meta=META)
    mine0, mine1 = w0.todo(keys), w1.todo(keys)
    assert set(mine0).isdisjoint(mine1) and set(mine0) | set(mine1) == set(keys)
    for w, mine in ((w0, mine0), (w1, mine1)):
        with w:
            for k in mine:
                w.add(k, make_regions(int(k[3:])))
    names = sorted(p.name for p in tmp_path.glob("shard-*.safetensors"))
    assert any(n.startswith("shard-r0-") for n in names) and any(n.startswith("shard-r1-") for n in names)
    store = FeatureStore(tmp_path)
    assert sorted(store.keys()) == sorted(keys)
    for k in keys:
        assert_same(store[k], make_regions(int(k[3:])))
    # A rerun (on any world size) finds nothing left to do.
    assert FeatureStoreWriter(tmp_path, rank=0, world_size=1, meta=META).todo(keys) == []


def test_store_pickles_and_serves_dataloader_workers(tmp_path):
    with FeatureStoreWriter(tmp_path, shard_size=2, meta=META) as w:
        for i in range(6):
            w.add(i, make_regions(i, k=2))
    store = FeatureStore(tmp_path)
    store[0]  # parent has an open handle; workers must open their own
    clone = pickle.loads(pickle.dumps(store))
    assert_same(clone[3], make_regions(3, k=2))

    class DS(torch.utils.data.Dataset):
        def __len__(self):
            return 6

        def __getitem__(self, i):
            return store[i].features

    loader = torch.utils.data.DataLoader(DS(), batch_size=None, num_workers=2)
    got = list(loader)
    for i in range(6):
        assert torch.equal(got[i], make_regions(i, k=2).features.half().float())


def test_errors_name_file_key_and_field(tmp_path):
    with pytest.raises(DataFormatError, match="not found"):
        FeatureStore(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataFormatError, match="meta.json"):
        FeatureStore(tmp_path / "empty")

    root = tmp_path / "st"
    with FeatureStoreWriter(root, shard_size=2, meta=META) as w:
        for i in range(4):
            w.add(i, make_regions(i, k=3))
    store = FeatureStore(root)
    with pytest.raises(MissingKeyError, match=r"'zebra'.*st") as err:
        store["zebra"]
    assert isinstance(err.value, KeyError) and isinstance(err.value, MiniVLMError)

    with pytest.raises(MiniVLMError, match="different 'class_names'"):
        FeatureStoreWriter(root, meta={**META, "class_names": ["x"]})
    with FeatureStoreWriter(root, meta=META) as w:
        with pytest.raises(MiniVLMError, match="feature dim 5"):
            w.add(9, Regions(torch.zeros(1, 4), torch.zeros(1, 5), torch.zeros(1), torch.zeros(1, dtype=torch.long), (1, 1)))
        bad = make_regions(1, k=2)
        bad.tags = [bad.tags[0], "not-a-class"]
        with pytest.raises(MiniVLMError, match="not-a-class"):
            w.add(10, bad)

    shard = sorted(root.glob("shard-*.safetensors"))[1]
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) - 40])  # truncated
    with pytest.raises(DataFormatError, match=shard.name):
        len(FeatureStore(root))
    shard.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
    with pytest.raises(DataFormatError, match=rf"{shard.name}.*corrupt"):
        FeatureStore(root)[0]


# -------------------------------------------------------------------------------------------------- TSV


def decode_sample(path: Path) -> dict:
    """Independent decoding of the sample, straight from the published layout."""
    out = {}
    for line in path.read_text().splitlines():
        key, value = line.split("\t")
        entry = json.loads(value)
        arr = np.frombuffer(base64.b64decode(entry["features"]), dtype=np.float32)
        out[key] = arr.reshape(entry["num_boxes"], -1)
    return out


def test_reads_oscar_sample(tmp_path):
    folder = FORMATS
    feats, labels = folder / "oscar_features_sample.tsv", folder / "oscar_labels_sample.tsv"
    assert feats.is_file(), f"sample missing: {feats}"
    expected = decode_sample(feats)
    tsv = OscarTSV(feats, labels)
    assert tsv.keys() == list(expected) and len(tsv) == 2
    assert tsv.class_names == ["helmet", "man"]
    for row, (key, arr) in enumerate(expected.items()):
        r = tsv[key]
        assert r.features.shape == (arr.shape[0], 2048)
        assert np.array_equal(r.features.numpy(), arr[:, :-6])
        assert np.array_equal(r.boxes.numpy(), arr[:, -6:-2])  # no image size known: normalised, (1, 1)
        assert r.image_size == (1, 1)
        assert torch.equal(tsv[row].features, r.features)
    # 3 regions, 2 label entries and no image size: no label can be tied to a region.
    assert tsv["COCO_val2014_000000391895"].tags == ["", "", ""]
    assert tsv["COCO_val2014_000000057870"].tags == []

    # Without a .lineidx the index is built in memory, and nothing is written beside the data.
    copy = tmp_path / "features.tsv"
    shutil.copy(feats, copy)
    assert [int(x) for x in (folder / "oscar_features_sample.lineidx").read_text().split()] == OscarTSV(copy).features.offsets
    assert not (tmp_path / "features.lineidx").exists()

    store = import_oscar_tsv(feats, tmp_path / "st", labels, image_sizes={391895: (640, 480)}, key_fn=image_id_from_key)
    assert sorted(store.keys()) == [57870, 391895] and store.feature_dim == 2048
    assert store[391895].image_size == (640, 480) and store[57870].image_size == (1, 1)
    code = expected["COCO_val2014_000000391895"][:, -6:-2]
    assert np.allclose(store[391895].boxes.numpy(), code * np.array([640, 480, 640, 480], dtype=np.float32))
    assert np.allclose(store[391895].features.numpy(), expected["COCO_val2014_000000391895"][:, :-6], atol=1e-2)


def test_export_import_round_trip(tmp_path):
    keys = [3, "b", 11, 4]
    regs = {k: make_regions(i + 2, k=0 if k == 4 else 4) for i, k in enumerate(keys)}
    with FeatureStoreWriter(tmp_path / "a", shard_size=3, meta=META) as w:
        for k in keys:
            w.add(k, regs[k])
    src = FeatureStore(tmp_path / "a")
    n = export_oscar_tsv(src, tmp_path / "features.tsv", tmp_path / "labels.tsv")
    assert n == 4
    lines = (tmp_path / "features.tsv").read_bytes().splitlines(keepends=True)
    offsets = [int(x) for x in (tmp_path / "features.lineidx").read_text().split()]
    assert offsets == [sum(map(len, lines[:i])) for i in range(len(lines))]
    first = json.loads(lines[0].split(b"\t")[1])
    arr = np.frombuffer(base64.b64decode(first["features"]), dtype=np.float32).reshape(first["num_boxes"], D + 6)
    assert np.allclose(arr[:, D:], src[3].box_encoding().numpy())  # VinVL's 6-d box code
    assert json.loads((tmp_path / "labels.tsv").read_text().splitlines()[0].split("\t")[1])[0]["class"] == regs[3].tags[0]

    # Sizes come back from the labels' pixel rects, so no image_sizes are needed.
    dst = import_oscar_tsv(tmp_path / "features.tsv", tmp_path / "b", tmp_path / "labels.tsv",
                           class_names=CLASSES, attribute_names=ATTRS)
    assert dst.keys() == ["3", "b", "11", "4"]
    for k in keys:
        got, want = dst[k], src[k]
        assert torch.equal(got.features, want.features)  # float16 -> float32 -> float16 is lossless
        assert torch.allclose(got.boxes, want.boxes)
        assert got.image_size == (want.image_size if len(want) else (1, 1))  # nothing to recover it from
        assert got.tags == want.tags and got.attribute_names == want.attribute_names
        assert torch.allclose(got.scores, want.scores)

    # Resuming an import that already finished writes nothing new.
    before = sorted(p.name for p in (tmp_path / "b").glob("shard-*"))
    import_oscar_tsv(tmp_path / "features.tsv", tmp_path / "b", tmp_path / "labels.tsv",
                     class_names=CLASSES, attribute_names=ATTRS)
    assert sorted(p.name for p in (tmp_path / "b").glob("shard-*")) == before


def test_tsv_labels_matched_by_overlap_and_bad_rows(tmp_path):
    w, h = 200, 100
    boxes = np.array([[10, 10, 50, 50], [100, 20, 180, 90], [0, 0, 20, 20]], dtype=np.float32)
    code = boxes / [w, h, w, h]
    rows = np.concatenate([np.ones((3, 4), np.float32), code, code[:, 2:] - code[:, :2]], 1).astype(np.float32)
    entry = {"num_boxes": 3, "features": base64.b64encode(rows.tobytes()).decode()}
    (tmp_path / "f.tsv").write_text(f"img1\t{json.dumps(entry)}\nimg2\t{{\"num_boxes\": 2, \"features\": \"{'A' * 16}\"}}\n"
                                    f"img3\t{{\"num_boxes\": 1, \"features\": \"AAAA\"}}\n")
    objs = [{"class": "cat", "rect": [101, 21, 179, 89], "conf": 0.8}, {"class": "dog", "rect": [11, 9, 49, 51], "conf": 0.6}]
    (tmp_path / "l.tsv").write_text(f"img1\t{json.dumps(objs)}\n")
    tsv = OscarTSV(tmp_path / "f.tsv", tmp_path / "l.tsv", image_sizes={"img1": (w, h)}, class_names=CLASSES)
    r = tsv["img1"]
    assert r.tags == ["dog", "cat", ""] and r.labels.tolist() == [0, 1, -1]
    assert np.allclose(r.boxes.numpy(), boxes, atol=1e-3) and r.scores.tolist() == pytest.approx([0.6, 0.8, 0.0])
    with pytest.raises(DataFormatError, match=r"f\.tsv.*img2.*num_boxes=2"):
        tsv["img2"]
    with pytest.raises(DataFormatError, match=r"img3.*not base64 float32"):
        tsv["img3"]
    with pytest.raises(MissingKeyError, match="img4"):
        tsv["img4"]
    with pytest.raises(DataFormatError, match=r"l\.tsv.*'cat' is not in the given class_names"):
        OscarTSV(tmp_path / "f.tsv", tmp_path / "l.tsv", {"img1": (w, h)}, class_names=["dog"])["img1"]
    (tmp_path / "f.lineidx").write_text("0\n5\n")  # stale index
    with pytest.raises(DataFormatError, match="stale"):
        OscarTSV(tmp_path / "f.tsv")[1]
