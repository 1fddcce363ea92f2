"""Detector training, evaluation, --init across class sets, and extraction into the feature store."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from PIL import Image

from minivlm.config import TrainConfig, get_tee
from minivlm.data.feature_store import FeatureStore
from minivlm.data.synthetic import generate_world
from minivlm.data.world import World
from minivlm.regions import Regions
from minivlm.train.trainer import read_log
from minivlm.vision.extract import extract_to_store, folder_sources, world_sources
from minivlm.vision.tee import TEE, load_detector, save_detector
from minivlm.vision.train import (DetectionCollate, DetectionDataset, DetectorSetup, evaluate_detector, load_init,
                                  train_detector)

SIZE = 64  # tiny canvas: TEE-0's architecture, seconds per run



@pytest.fixture(scope="module")
def world_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("world") / "w"
    generate_world(root, images=12, seed=3, nlvr2_pairs=0, workers=1)
    return root


def tiny_cfg(steps: int, **kw) -> TrainConfig:
    base = dict(epochs=50, max_steps=steps, batch_size=2, lr=0.02, optimizer="sgd", schedule="constant",
                warmup_steps=0, weight_decay=0.0, grad_clip=10.0, log_every=1, ckpt_every=4, seed=0)
    return TrainConfig(**{**base, **kw})


def train(out, world_root, steps, **kw):
    return train_detector(DetectorSetup(out=out, data=world_root, train=tiny_cfg(steps, **kw), image_size=SIZE,
                                        eval_split=None, max_train_images=2, flip=False,
                                        tee=dict(rpn_post_nms_topk=50, roi_batch_per_image=32)))


def test_dataset_scales_boxes_onto_the_canvas(world_root):
    world = World(world_root)
    ds = DetectionDataset(world, "train", SIZE, flip=False)
    inst = world.instances("train")
    iid = sorted(inst.images)[0]
    item = ds[0]
    info = inst.images[iid]
    scale = SIZE / max(info.width, info.height)
    ann = inst.annotations[iid][0]
    x, y, w, h = ann.bbox
    assert item["boxes"][0].tolist() == pytest.approx([x * scale, y * scale, (x + w) * scale, (y + h) * scale], rel=1e-4)
    assert item["labels"][0].item() == inst.category_index()[ann.category_id]
    assert max(item["image"].shape[1:]) == SIZE
    batch = DetectionCollate(SIZE)([ds[0], ds[1]])
    assert tuple(batch["images"].shape) == (2, 3, SIZE, SIZE)


def test_training_decreases_loss_and_writes_a_detector_folder(tmp_path, world_root):
    model, last = train(tmp_path / "det", world_root, 10)
    losses = [e["loss"] for e in read_log(tmp_path / "det" / "log.jsonl") if "loss" in e]
    assert len(losses) == 10
    assert sum(losses[-3:]) / 3 < 0.8 * sum(losses[:3]) / 3
    loaded = load_detector(tmp_path / "det")
    assert loaded.class_names == World(world_root).class_names()
    assert loaded.attribute_names == World(world_root).attribute_names()
    assert loaded.cfg.image_size == SIZE
    for k, v in model.state_dict().items():
        assert torch.equal(v.cpu(), loaded.state_dict()[k]), k


def test_resume_continues_where_the_run_stopped(tmp_path, world_root):
    straight, _ = train(tmp_path / "a", world_root, 6)
    train(tmp_path / "b", world_root, 4)
    resumed, _ = train(tmp_path / "b", world_root, 6)  # same folder: picks up the step-4 checkpoint
    steps = [e["step"] for e in read_log(tmp_path / "b" / "log.jsonl") if "loss" in e]
    assert steps == [1, 2, 3, 4, 5, 6]
    a, b = straight.state_dict(), resumed.state_dict()
    assert all(torch.allclose(a[k].float(), b[k].float(), atol=1e-5) for k in a)


def test_init_from_a_detector_with_another_class_set(tmp_path, world_root):
    cfg = dataclasses.replace(get_tee("tee-demo"), image_size=SIZE, num_classes=5, num_attributes=3)
    torch.manual_seed(0)
    source = TEE(cfg, [f"obj{i}" for i in range(5)], ["a", "b", "c"])
    save_detector(source, tmp_path / "src")
    world = World(world_root)
    target_cfg = dataclasses.replace(cfg, num_classes=len(world.class_names()), num_attributes=len(world.attribute_names()))
    torch.manual_seed(1)
    target = TEE(target_cfg, world.class_names(), world.attribute_names())
    before = {k: v.clone() for k, v in target.state_dict().items()}
    report = load_init(target, tmp_path / "src")
    src, tgt = source.state_dict(), target.state_dict()
    assert torch.equal(tgt["backbone.conv_stem.weight"], src["backbone.conv_stem.weight"])
    assert torch.equal(tgt["roi_head.box_head.fc2.weight"], src["roi_head.box_head.fc2.weight"])
    assert torch.equal(tgt["roi_head.attribute_head.hidden.weight"], src["roi_head.attribute_head.hidden.weight"])
    for key in ("roi_head.box_head.cls.weight", "roi_head.attribute_head.embed.weight",
                "roi_head.attribute_head.out.weight"):
        assert torch.equal(tgt[key], before[key]), key  # re-initialised, i.e. left as built
        assert any(s.startswith(key) for s in report["skipped"])
    assert "backbone.conv_stem.weight" in report["loaded"]
    # through train_detector (--init): the report is written next to the run
    model, _ = train_detector(DetectorSetup(out=tmp_path / "run", data=world_root, train=tiny_cfg(1), image_size=SIZE,
                                            init=tmp_path / "src", eval_split=None, max_train_images=2))
    saved = json.loads((tmp_path / "run" / "init_report.json").read_text())
    assert "backbone.conv_stem.weight" in saved["loaded"] and saved["skipped"]


def test_evaluate_detector_scores_ground_truth_as_perfect(world_root, monkeypatch):
    world = World(world_root)
    inst = world.instances("val")
    cfg = dataclasses.replace(get_tee("tee-demo"), image_size=SIZE, num_classes=len(world.class_names()),
                              num_attributes=len(world.attribute_names()))
    model = TEE(cfg, world.class_names(), world.attribute_names())
    ids = sorted(inst.images)
    cat = inst.category_index()

    def oracle(paths, batch_size=8, max_regions=None):
        out = []
        for iid in ids[: len(paths)]:
            anns = inst.annotations[iid]
            boxes = torch.tensor([[a.bbox[0], a.bbox[1], a.bbox[0] + a.bbox[2], a.bbox[1] + a.bbox[3]] for a in anns])
            out.append(Regions(boxes=boxes.reshape(-1, 4), features=torch.zeros(len(anns), 1024),
                               scores=torch.ones(len(anns)), labels=torch.tensor([cat[a.category_id] for a in anns]),
                               image_size=(inst.images[iid].width, inst.images[iid].height)))
        return out

    monkeypatch.setattr(model, "extract", oracle)
    res = evaluate_detector(model, world, "val")
    assert res["map50"] == pytest.approx(1.0) and res["map"] == pytest.approx(1.0)
    monkeypatch.undo()
    res = evaluate_detector(model, world, "val")  # an untrained model: a valid, low score
    assert 0.0 <= res["map50"] < 0.5 and res["images"] == len(ids)


def test_extract_splits_images_across_ranks_exactly_once(tmp_path, world_root):
    cfg = dataclasses.replace(get_tee("tee-demo"), image_size=SIZE, max_regions=5)
    world = World(world_root)
    cfg.num_classes, cfg.num_attributes = len(world.class_names()), len(world.attribute_names())
    model = TEE(cfg, world.class_names(), world.attribute_names())
    sources = world_sources(world_root)
    assert len(sources) == 12
    store = tmp_path / "store"
    counts = [extract_to_store(model, sources, store, batch_size=3, shard_size=2, rank=r, world_size=2)["written"]
              for r in (0, 1)]
    assert counts == [6, 6]
    fs = FeatureStore(store)
    assert sorted(fs.keys()) == sorted(k for k, _ in sources)
    r = fs[sources[0][0]]
    assert r.features.shape[1] == 1024 and len(r) <= 5 and r.tags and all(t in world.class_names() for t in r.tags)
    again = extract_to_store(model, sources, store, rank=0, world_size=1)  # rerun: nothing left to do
    assert again["written"] == 0 and again["skipped_done"] == 12


def test_extract_from_a_folder_skips_unreadable_images(tmp_path):
    folder = tmp_path / "imgs"
    (folder / "sub").mkdir(parents=True)
    Image.new("RGB", (64, 40), (200, 10, 10)).save(folder / "a.jpg")
    Image.new("L", (31, 77), 90).save(folder / "sub" / "b.png")
    (folder / "broken.jpg").write_bytes(b"not an image")
    sources = folder_sources(folder)
    assert [k for k, _ in sources] == ["a.jpg", "broken.jpg", "sub/b.png"]
    model = TEE(dataclasses.replace(get_tee("tee-demo"), image_size=SIZE))
    summary = extract_to_store(model, sources, tmp_path / "store")
    assert summary["written"] == 2 and [k for k, _ in summary["failed"]] == ["broken.jpg"]
    assert FeatureStore(tmp_path / "store")["sub/b.png"].image_size == (31, 77)


def test_attribute_loss_per_group_gives_each_group_a_full_target():
    import torch.nn.functional as F

    from minivlm.data.readers import Category
    from minivlm.vision.roi_head import attribute_loss
    from minivlm.vision.train import attribute_groups

    attrs = [Category(1, "red", "colour"), Category(2, "blue", "colour"), Category(3, "small", "size"),
             Category(4, "large", "size"), Category(5, "dotted", "texture")]
    groups = attribute_groups(attrs)
    assert groups == (0, 0, 1, 1, 2)  # groups sorted by name: colour, size, texture
    assert attribute_groups([Category(1, "red"), Category(2, "wooden")]) == ()  # Visual Genome: ungrouped
    logits = torch.randn(2, 6)
    # region 0: red + small + dotted; region 1: blue only (no size or texture annotated)
    targets = torch.tensor([[0, 1, 0, 1, 0, 1], [0, 0, 1, 0, 0, 0]], dtype=torch.float)
    expected = (F.cross_entropy(logits[:, 1:3], torch.tensor([0, 1]))
                + F.cross_entropy(logits[:1, 3:5], torch.tensor([0])) + F.cross_entropy(logits[:1, 5:6], torch.tensor([0])))
    assert attribute_loss(logits, targets, groups).item() == pytest.approx(expected.item(), rel=1e-5)
    # A weight per group scales that group's term only (texture x3: the demo's lever for what the head loses).
    weighted = (F.cross_entropy(logits[:, 1:3], torch.tensor([0, 1]))
                + 0.5 * F.cross_entropy(logits[:1, 3:5], torch.tensor([0]))
                + 3.0 * F.cross_entropy(logits[:1, 5:6], torch.tensor([0])))
    assert attribute_loss(logits, targets, groups, (1.0, 0.5, 3.0)).item() == pytest.approx(weighted.item(), rel=1e-5)
    # Without groups: bottom-up attention's single softmax with the mass shared among the attributes.
    shared = targets / targets.sum(1, keepdim=True)
    assert attribute_loss(logits, shared).item() == pytest.approx(F.cross_entropy(logits, shared).item(), rel=1e-5)


def test_train_detector_under_torchrun(tmp_path, world_root, torchrun):
    """`minivlm train-detector` on two CPU ranks (gloo) finishes its steps and writes one detector folder
    (the batch is global: 2 images per rank, as BatchNorm at the 1x1 P6 level needs more than one)."""
    r = torchrun("train-detector", "--data", world_root, "--out", tmp_path / "det", "--image-size", SIZE,
                 "--max-train-images", 4, "--max-steps", 3, "--batch-size", 4, "--optimizer", "sgd", "--lr", 0.02,
                 "--eval-split", "none", "--no-flip", "--tee", "rpn_post_nms_topk=50", "--tee", "roi_batch_per_image=32")
    assert r.returncode == 0, r.stderr[-3000:]
    steps = [e["step"] for e in read_log(tmp_path / "det" / "log.jsonl") if "loss" in e]
    assert steps and steps[-1] == 3
    loaded = load_detector(tmp_path / "det")
    assert loaded.class_names == World(world_root).class_names()
