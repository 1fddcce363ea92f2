"""benchmarks/region_probe.py: objects are matched to their regions, and a probe reads what features encode."""

import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import region_probe  # noqa: E402

from minivlm.data.feature_store import FeatureStoreWriter  # noqa: E402
from minivlm.data.synthetic import generate_world  # noqa: E402
from minivlm.data.world import World  # noqa: E402
from minivlm.regions import Regions  # noqa: E402


def write_colour_store(world: World, root: Path, carries_colour=lambda ann: True) -> None:
    """Regions on each object's true box (plus a decoy elsewhere) whose features are noise, plus a one-hot of the
    object's colour where `carries_colour(ann)`. The stored tag is the true class, except in odd-numbered images."""
    g = torch.Generator().manual_seed(0)
    vocab = world.class_names() + ["blob", "decoy"]
    with FeatureStoreWriter(root, meta={"class_names": vocab}) as w:
        for split in ("train", "test"):
            inst = world.instances(split)
            attrs = inst.attribute_index()
            colour = {a.id for a in inst.attributes if a.group == "colour"}
            names = {c.id: c.name for c in inst.categories}
            for iid, anns in inst.annotations.items():
                boxes, feats = [], []
                tags = [names[a.category_id] if iid % 2 == 0 else "blob" for a in anns] + ["decoy"]
                for a in anns:
                    x, y, bw, bh = a.bbox
                    boxes.append([x, y, x + bw, y + bh])
                    f = torch.randn(12, generator=g) * 0.1
                    if carries_colour(a):
                        f[[attrs[i] for i in a.attribute_ids if i in colour][0]] += 3.0
                    feats.append(f)
                boxes.append([0.0, 0.0, 1.0, 1.0])  # a decoy no object overlaps
                feats.append(torch.randn(12, generator=g))
                k = len(boxes)
                w.add(iid, Regions(boxes=torch.tensor(boxes), features=torch.stack(feats), scores=torch.ones(k),
                                   labels=torch.tensor([vocab.index(t) for t in tags]), image_size=(512, 512),
                                   tags=tags))


def test_probe_reads_the_colour_the_features_carry_and_not_the_class(tmp_path):
    """Features = one-hot colour + noise, on each object's true box (plus a decoy region elsewhere): the
    colour probe must be near perfect and the class probe near the majority rate."""
    generate_world(tmp_path / "world", images=100, seed=0, nlvr2_pairs=0, workers=1)
    world = World(tmp_path / "world")
    write_colour_store(world, tmp_path / "store")
    assert region_probe.main(["--data", str(tmp_path / "world"), "--features", str(tmp_path / "store"),
                              "--out", str(tmp_path / "out")]) == 0
    report = json.loads((tmp_path / "out" / "region_probe.json").read_text())
    rows = {r["target"]: r for r in report["rows"]}
    test_anns = world.instances("test").annotations
    right = sum(len(a) for i, a in test_anns.items() if i % 2 == 0) / sum(len(a) for a in test_anns.values())
    assert report["detector_labels"]["accuracy"] == round(100 * right, 1)
    assert all(k.endswith(" -> blob") for k in report["detector_labels"]["confusions"])
    assert set(rows) == {"class", "colour", "size", "texture"}
    n_test = sum(len(a) for a in world.instances("test").annotations.values())
    assert rows["colour"]["n_eval"] == n_test  # every object found its own box, never the decoy
    assert rows["colour"]["probe_eval_acc"] > 90
    assert rows["class"]["probe_eval_acc"] < rows["class"]["majority_acc"] + 25


def test_probe_accuracy_per_object_size_finds_where_an_attribute_is_lost(tmp_path):
    """Only medium and large objects carry their colour: the colour probe is right on those and near chance on
    the small ones, and the detector's own class (right in even images only) is split by size too."""
    generate_world(tmp_path / "world", images=100, seed=0, nlvr2_pairs=0, workers=1)
    world = World(tmp_path / "world")
    size_of = {a.id: a.name for a in world.instances("train").attributes if a.group == "size"}
    is_small = lambda ann: any(size_of.get(i) == "small" for i in ann.attribute_ids)  # noqa: E731
    write_colour_store(world, tmp_path / "store", carries_colour=lambda ann: not is_small(ann))
    assert region_probe.main(["--data", str(tmp_path / "world"), "--features", str(tmp_path / "store"),
                              "--out", str(tmp_path / "out")]) == 0
    report = json.loads((tmp_path / "out" / "region_probe.json").read_text())
    by_size = next(r for r in report["rows"] if r["target"] == "colour")["eval_acc_by_size"]
    assert set(by_size) == {"small", "medium", "large"}
    assert by_size["medium"] > 90 and by_size["large"] > 90
    assert by_size["small"] < 50
    test = world.instances("test").annotations
    for size in by_size:  # the tags are right exactly in the even-numbered images
        objs = [(i, a) for i, anns in test.items() for a in anns if size_of[[x for x in a.attribute_ids
                                                                          if x in size_of][0]] == size]
        right = sum(i % 2 == 0 for i, _ in objs) / len(objs)
        assert report["detector_labels"]["accuracy_by_size"][size] == round(100 * right, 1)


def test_region_path_probe_finds_colour_in_the_pixels(tmp_path):
    """--detector probes each point of an (untrained) detector's region path on the true boxes: the pixels
    under a box carry its colour whatever the detector learnt."""
    import dataclasses

    from minivlm.config import get_tee
    from minivlm.vision.tee import TEE, save_detector

    generate_world(tmp_path / "world", images=100, seed=0, nlvr2_pairs=0, workers=1)
    world = World(tmp_path / "world")
    cfg = dataclasses.replace(get_tee("tee-demo"), image_size=128, fpn_channels=16, fpn_layers=1, roi_image_pool=True,
                              num_classes=len(world.class_names()), num_attributes=len(world.attribute_names()))
    torch.manual_seed(0)
    save_detector(TEE(cfg, world.class_names(), world.attribute_names()), tmp_path / "det")
    assert region_probe.main(["--data", str(tmp_path / "world"), "--detector", str(tmp_path / "det"),
                              "--out", str(tmp_path / "out")]) == 0
    rows = json.loads((tmp_path / "out" / "region_path_probe.json").read_text())["rows"]
    assert {(r["point"], r["target"]) for r in rows} == {(p, t) for p in region_probe.PATH_POINTS
                                                         for t in ("class", "colour", "size", "texture")}
    colour = next(r for r in rows if (r["point"], r["target"]) == ("pixels", "colour"))
    assert colour["probe_eval_acc"] > colour["majority_acc"] + 30


def test_label_report_counts_each_class_and_confusion():
    rep = region_probe.label_report([("circle", "circle"), ("circle", "hexagon"), ("hexagon", "circle"),
                                     ("star", "star")])
    assert rep["accuracy"] == 50.0
    assert rep["per_class"] == {"circle": 50.0, "hexagon": 0.0, "star": 100.0}
    assert rep["confusions"] == {"circle -> hexagon": 1, "hexagon -> circle": 1}


def test_vqa_binding_puts_each_attribute_question_in_its_bucket(tmp_path):
    """Regions on every object's true box, with the detector's attribute = the object's colour. Even images:
    right tags and a VQA model that answers right; odd images: every tag wrong and every answer wrong. The
    report must split the colour questions exactly along that line."""
    import vqa_binding

    generate_world(tmp_path / "world", images=60, seed=0, nlvr2_pairs=0, workers=1)
    world = World(tmp_path / "world")
    inst = world.instances("test")
    names = {c.id: c.name for c in inst.categories}
    colour_of = {a.id: a.name for a in inst.attributes if a.group == "colour"}
    vocab, attrs = world.class_names() + ["blob"], world.attribute_names()
    with FeatureStoreWriter(tmp_path / "store", meta={"class_names": vocab, "attribute_names": attrs}) as w:
        for iid, anns in inst.annotations.items():
            tags = [names[a.category_id] if iid % 2 == 0 else "blob" for a in anns]
            colours = [next(colour_of[i] for i in a.attribute_ids if i in colour_of) for a in anns]
            w.add(iid, Regions(boxes=region_probe.boxes_xyxy(anns), features=torch.zeros(len(anns), 4),
                               scores=torch.ones(len(anns)), labels=torch.tensor([vocab.index(t) for t in tags]),
                               image_size=(512, 512), tags=tags, attribute_names=colours,
                               attributes=torch.tensor([attrs.index(c) for c in colours])))
    questions = world.vqa("test")
    results = [{"question_id": q.question_id, "answer": q.multiple_choice_answer if q.image_id % 2 == 0 else "no"}
               for q in questions]
    (tmp_path / "results.json").write_text(json.dumps(results))
    assert vqa_binding.main(["--data", str(tmp_path / "world"), "--features", str(tmp_path / "store"),
                             "--results", str(tmp_path / "results.json"), "--out", str(tmp_path / "out")]) == 0
    colour = json.loads((tmp_path / "out" / "vqa_binding.json").read_text())["buckets"]["what color is the"]
    even = [q for q in questions if q.question_type == "what color is the" and q.image_id % 2 == 0]
    odd = [q for q in questions if q.question_type == "what color is the" and q.image_id % 2 == 1]
    assert colour["wrong tag"]["questions"] <= len(odd) and colour["wrong tag"]["vqa_exact"] == 0.0
    right = {b: colour[b] for b in ("right tag, unique", "right tag, shared") if b in colour}
    assert sum(r["questions"] for r in right.values()) <= len(even) and right
    assert all(r["vqa_exact"] == 100.0 and r["detector_attribute_is_answer"] == 100.0 for r in right.values())
    assert colour["wrong tag"]["detector_attribute_is_answer"] == 100.0  # the attribute is right, the tag is not


def test_probe_chooses_its_l2_weight_on_held_out_training_objects():
    """Three dimensions name the class (with noise) among 100 of pure noise, 240 training objects: the weakest
    L2 fits the noise by heart; the weight chosen on a held-out fifth generalises better."""
    g = torch.Generator().manual_seed(0)

    def data(n):
        y = torch.randint(0, 3, (n,), generator=g)
        x = torch.randn(n, 103, generator=g)
        x[:, :3] += 1.0 * torch.nn.functional.one_hot(y, 3)
        return x, y

    (x_tr, y_tr), (x_te, y_te) = data(240), data(600)
    l2 = region_probe.choose_l2(x_tr, y_tr)
    assert l2 in region_probe.L2_GRID and l2 > region_probe.L2_GRID[0]
    weak_train, weak = region_probe.linear_probe(x_tr, y_tr, x_te, l2=region_probe.L2_GRID[0])
    _, chosen = region_probe.linear_probe(x_tr, y_tr, x_te, l2=l2)
    assert weak_train > 0.95  # memorised
    assert (chosen == y_te).float().mean() > (weak == y_te).float().mean() + 0.05
