"""The synthetic world generator: determinism, the real formats, and labels that are true for the images."""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

import pytest
from PIL import Image
from pycocotools.coco import COCO

from minivlm.cli import main
from minivlm.data import readers
from minivlm.data.synthetic import (ATTRIBUTE_GROUPS, ATTRIBUTES, CLASSES, COLOURS, NLVR2_SPLITS, SIZES, SPLITS,
                                    TEXTURES, generate_world, split_sizes)
from minivlm.data.synthetic_text import NOUNS, NUMBER_WORDS
from minivlm.errors import MiniVLMError

N_IMAGES, N_PAIRS, N_UNLABELED = 30, 8, 2


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("world") / "w"
    generate_world(out, images=N_IMAGES, seed=7, unlabeled=N_UNLABELED, nlvr2_pairs=N_PAIRS, workers=2)
    return out


def _labels(root: Path) -> dict[str, bytes]:
    """Every label file (all but images), by relative path."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*.json"))}


def _load(root: Path, rel: str):
    return json.loads((root / rel).read_text())


# Plural and singular noun forms -> class, to read questions back without the generator's help.
_NOUN_CLASS = {form: cls for cls, pairs in NOUNS.items() for pair in pairs for form in pair}


def _objects(root: Path) -> dict[int, list[dict]]:
    """image id -> [{cls, colour, size, texture, bbox}] from the instances files."""
    out: dict[int, list[dict]] = {}
    for split in SPLITS:
        inst = _load(root, f"annotations/instances_{split}.json")
        attrs = {a["id"]: a for a in inst["attribute_categories"]}
        cats = {c["id"]: c["name"] for c in inst["categories"]}
        for im in inst["images"]:
            out[im["id"]] = []
        for a in inst["annotations"]:
            obj = {"cls": cats[a["category_id"]], "bbox": a["bbox"]}
            obj.update({attrs[i]["group"]: attrs[i]["name"] for i in a["attribute_ids"]})
            out[a["image_id"]].append(obj)
    return out


def _vqa(root: Path) -> list[tuple[dict, dict]]:
    pairs = []
    for split in SPLITS:
        qs = _load(root, f"vqa/v2_OpenEnded_mscoco_{split}_questions.json")
        anns = _load(root, f"vqa/v2_mscoco_{split}_annotations.json")
        assert qs["data_subtype"] == anns["data_subtype"] == split and qs["task_type"] == "Open-Ended"
        by_id = {a["question_id"]: a for a in anns["annotations"]}
        pairs += [(q, by_id[q["question_id"]]) for q in qs["questions"]]
    return pairs


def test_same_seed_same_bytes_other_seed_differs(world, tmp_path):
    again = tmp_path / "again"
    generate_world(again, images=N_IMAGES, seed=7, unlabeled=N_UNLABELED, nlvr2_pairs=N_PAIRS, workers=1)
    assert _labels(again) == _labels(world)  # also across worker counts
    images = sorted(p.relative_to(world) for p in world.rglob("*") if p.suffix in (".jpg", ".png"))
    assert images == sorted(p.relative_to(again) for p in again.rglob("*") if p.suffix in (".jpg", ".png"))
    assert all((world / p).read_bytes() == (again / p).read_bytes() for p in images)

    other = tmp_path / "other"
    generate_world(other, images=N_IMAGES, seed=8, unlabeled=0, nlvr2_pairs=N_PAIRS, workers=1)
    for rel in ("annotations/instances_train.json", "annotations/captions_train.json", "nlvr2/train.json"):
        assert (other / rel).read_bytes() != (world / rel).read_bytes()


def test_layout_and_world_summary(world):
    meta = _load(world, "world.json")
    assert meta["complete"] and meta["params"]["seed"] == 7
    assert meta["classes"] == CLASSES and len(CLASSES) >= 12
    assert meta["attributes"] == ATTRIBUTE_GROUPS and ATTRIBUTES == COLOURS + SIZES + TEXTURES
    assert len(COLOURS) >= 8 and len(SIZES) == 3 and len(TEXTURES) >= 3
    sizes = split_sizes(N_IMAGES)
    assert sum(sizes) == N_IMAGES and meta["splits"] == dict(zip(SPLITS, sizes))
    for split, n in zip(SPLITS, sizes):
        assert len(list((world / split).glob(f"COCO_{split}_*.jpg"))) == n
    assert len(list((world / "unlabeled").glob("*.jpg"))) == N_UNLABELED
    assert sum(meta["nlvr2_splits"].values()) == N_PAIRS


def test_coco_files_load_with_pycocotools_and_are_valid(world):
    seen_ids: set[int] = set()
    n_attr_groups = {g: 0 for g in ATTRIBUTE_GROUPS}
    for split in SPLITS:
        inst = COCO(str(world / "annotations" / f"instances_{split}.json"))
        caps = COCO(str(world / "annotations" / f"captions_{split}.json"))
        assert [c["name"] for c in inst.loadCats(inst.getCatIds())] == CLASSES
        assert set(inst.getImgIds()) == set(caps.getImgIds()) and not seen_ids & set(inst.getImgIds())
        seen_ids |= set(inst.getImgIds())
        attr_cats = {a["id"]: a for a in inst.dataset["attribute_categories"]}
        assert [attr_cats[i]["name"] for i in sorted(attr_cats)] == ATTRIBUTES
        for img in inst.loadImgs(inst.getImgIds()):
            assert img["file_name"] == f"COCO_{split}_{img['id']:012d}.jpg"
            with Image.open(world / split / img["file_name"]) as im:
                assert im.format == "JPEG" and im.size == (img["width"], img["height"])
            assert 192 <= min(im.size) and max(im.size) <= 512
            anns = inst.loadAnns(inst.getAnnIds(imgIds=img["id"]))
            assert 1 <= len(anns) <= 8
            for a in anns:
                x, y, w, h = a["bbox"]
                assert x >= 0 and y >= 0 and x + w <= img["width"] and y + h <= img["height"]
                assert max(w, h) >= 24 and a["area"] > 0 and a["iscrowd"] == 0
                assert inst.annToMask(a).sum() > 0  # the outline polygon is usable
                groups = [attr_cats[i]["group"] for i in a["attribute_ids"]]
                assert sorted(groups) == sorted(ATTRIBUTE_GROUPS)  # one colour, one size, one texture
                for g in groups:
                    n_attr_groups[g] += 1
            assert len(caps.getAnnIds(imgIds=img["id"])) == 5
    assert all(n_attr_groups.values())


def test_karpathy_file_matches_captions(world):
    data = _load(world, "annotations/dataset_coco.json")
    assert data["dataset"] == "coco" and len(data["images"]) == N_IMAGES
    captions = {}
    for split in SPLITS:
        for a in _load(world, f"annotations/captions_{split}.json")["annotations"]:
            captions[a["id"]] = (a["image_id"], a["caption"])
    for k, rec in enumerate(data["images"]):
        assert rec["imgid"] == k and rec["filepath"] == rec["split"]
        assert (world / rec["filepath"] / rec["filename"]).is_file()
        assert rec["sentids"] == [s["sentid"] for s in rec["sentences"]] and len(rec["sentids"]) == 5
        for s in rec["sentences"]:
            assert captions[s["sentid"]] == (rec["cocoid"], s["raw"]) and s["imgid"] == k
            assert s["tokens"] == re.findall(r"[a-z0-9]+", s["raw"].lower())


def test_vqa_answers_and_question_types(world):
    pairs = _vqa(world)
    assert 4 * N_IMAGES <= len(pairs) <= 6 * N_IMAGES
    assert len({a["question_type"] for _, a in pairs}) >= 6
    assert {a["answer_type"] for _, a in pairs} == {"yes/no", "number", "other"}
    for q, a in pairs:
        assert q["image_id"] == a["image_id"] and q["question"].endswith("?")
        assert len(a["answers"]) == 10 and [x["answer_id"] for x in a["answers"]] == list(range(1, 11))
        assert {x["answer_confidence"] for x in a["answers"]} <= {"yes", "maybe", "no"}
        counts = Counter(x["answer"] for x in a["answers"])
        assert counts[a["multiple_choice_answer"]] >= 6 and counts.most_common(1)[0][0] == a["multiple_choice_answer"]
    assert any(len(set(x["answer"] for x in a["answers"])) > 1 for _, a in pairs)  # annotators disagree
    yes = [a["multiple_choice_answer"] == "yes" for _, a in pairs if a["answer_type"] == "yes/no"]
    assert 0.3 <= sum(yes) / len(yes) <= 0.7


def test_answers_agree_with_annotations(world):
    objects = _objects(world)
    checked = Counter()
    for q, a in _vqa(world):
        objs, text, ans = objects[q["image_id"]], q["question"].lower(), a["multiple_choice_answer"]
        if m := re.fullmatch(r"how many ([\w -]+?) (?:are there|are in the (?:image|picture)|can you see)\?", text):
            colour, _, noun = m.group(1).partition(" ") if m.group(1).split()[0] in COLOURS else (None, "", m.group(1))
            if noun in ("shapes", "objects"):
                assert int(ans) == len(objs), text
            else:
                cls = _NOUN_CLASS[noun]
                assert int(ans) == sum(o["cls"] == cls and colour in (None, o["colour"]) for o in objs), text
            checked["count"] += 1
        elif m := re.fullmatch(r"is there an? (\w+) ([\w -]+)\?", text):
            colour, cls = m.group(1), _NOUN_CLASS[m.group(2)]
            assert ans == ("yes" if any(o["cls"] == cls and o["colour"] == colour for o in objs) else "no"), text
            checked["exists"] += 1
        elif m := re.fullmatch(r"what color is the ([\w -]+)\?", text):
            if m.group(1) in _NOUN_CLASS:  # "the star": the only star
                matches = [o for o in objs if o["cls"] == _NOUN_CLASS[m.group(1)]]
                assert len(matches) == 1 and matches[0]["colour"] == ans, text
                checked["colour"] += 1
        elif m := re.fullmatch(r"what shape is the (\w+) (?:object|thing)\?", text):
            matches = [o for o in objs if o["colour"] == m.group(1)]
            assert len(matches) == 1 and matches[0]["cls"] == ans, text
            checked["shape"] += 1
    assert min(checked.values()) >= 1 and len(checked) == 4, checked


def test_captions_agree_with_annotations(world):
    objects = _objects(world)
    words = {w: n for n, w in enumerate(NUMBER_WORDS)}
    checked = 0
    for split in SPLITS:
        for c in _load(world, f"annotations/captions_{split}.json")["annotations"]:
            text, objs = c["caption"].lower(), objects[c["image_id"]]
            if m := re.match(r"(?:there are|a picture of|an image of|a drawing of|a photo of) (\w+) shapes\b", text):
                assert words[m.group(1)] == len(objs), text
                checked += 1
            if m := re.match(r"there is a single (\w+) ([\w -]+) on ", text):
                assert len(objs) == 1 and objs[0]["colour"] == m.group(1) and objs[0]["cls"] == _NOUN_CLASS[m.group(2)]
                checked += 1
            # Every colour a caption names belongs to some object in the image.
            named = {w for w in re.findall(r"[a-z]+", text) if w in COLOURS}
            assert named <= {o["colour"] for o in objs}, text
    assert checked >= 5


def test_nlvr2_pairs(world):
    examples = []
    for split in NLVR2_SPLITS:
        lines = (world / "nlvr2" / f"{split}.json").read_text().splitlines()
        for line in lines:
            rec = json.loads(line)
            assert rec["identifier"].startswith(f"{split}-") and rec["label"] in ("True", "False")
            assert set(rec) >= {"sentence", "left_url", "right_url", "writer", "synset", "query", "validation"}
            stem = rec["identifier"].rsplit("-", 1)[0]
            for side in ("img0", "img1"):
                with Image.open(world / "nlvr2" / "images" / split / f"{stem}-{side}.png") as im:
                    assert im.format == "PNG"
            examples.append(rec)
    assert len(examples) == 2 * N_PAIRS and len({e["identifier"] for e in examples}) == len(examples)
    n_true = sum(e["label"] == "True" for e in examples)
    assert abs(n_true - len(examples) / 2) <= 0.1 * len(examples)


def test_world_loads_with_project_readers(world):
    n = 0
    for split in SPLITS:
        inst = readers.read_coco_instances(world / "annotations" / f"instances_{split}.json")
        caps = readers.read_coco_captions(world / "annotations" / f"captions_{split}.json")
        assert inst.class_names() == CLASSES and inst.attribute_names() == ATTRIBUTES
        assert all(len(caps.captions[i]) == 5 for i in caps.images)
        qs = readers.read_vqa(world / "vqa" / f"v2_OpenEnded_mscoco_{split}_questions.json",
                              world / "vqa" / f"v2_mscoco_{split}_annotations.json")
        assert qs and all(len(q.answers) == 10 and q.image_id in inst.images for q in qs)
        n += len(inst.images)
    assert len(readers.read_karpathy(world / "annotations" / "dataset_coco.json")) == n == N_IMAGES
    assert sum(len(readers.read_nlvr2(world / "nlvr2" / f"{s}.json")) for s in NLVR2_SPLITS) == 2 * N_PAIRS


def test_refuses_foreign_folders_and_reruns_same_arguments(tmp_path, capsys):
    out = tmp_path / "w"
    assert main(["make-data", str(out), "--images", "4", "--seed", "1", "--nlvr2-pairs", "2"]) == 0
    printed = capsys.readouterr().out
    assert "questions by type" in printed and "NLVR2 pairs" in printed
    before = _labels(out)
    assert main(["make-data", str(out), "--images", "4", "--seed", "1", "--nlvr2-pairs", "2"]) == 0
    assert _labels(out) == before
    assert main(["make-data", str(out), "--images", "5", "--seed", "1"]) == 1  # other parameters
    assert "params" in capsys.readouterr().err
    stray = tmp_path / "stray"
    stray.mkdir()
    (stray / "notes.txt").write_text("mine")
    with pytest.raises(MiniVLMError, match="not empty"):
        generate_world(stray, images=4, seed=1)


def test_more_questions_and_statements_keep_the_images(world, tmp_path, capsys):
    """--questions-per-image / --nlvr2-statements add supervision to the same images (features can be reused)."""
    rich = tmp_path / "rich"
    assert main(["make-data", str(rich), "--images", str(N_IMAGES), "--seed", "7", "--nlvr2-pairs", str(N_PAIRS),
                 "--questions-per-image", "12", "--nlvr2-statements", "4"]) == 0
    for split in SPLITS:
        for image in (world / split).glob("*.jpg"):
            assert (rich / split / image.name).read_bytes() == image.read_bytes()
    pairs = _vqa(rich)
    per_image = Counter(q["image_id"] for q, _ in pairs)
    assert len(per_image) == N_IMAGES and max(per_image.values()) == 12 and sum(per_image.values()) > 10 * N_IMAGES
    for iid in per_image:  # distinct questions per image, and VQA's id convention still holds
        asked = [q for q, _ in pairs if q["image_id"] == iid]
        assert len({q["question"] for q in asked}) == len(asked)
        assert all(q["question_id"] // 1000 == iid for q in asked)
    lines = [json.loads(x) for s in NLVR2_SPLITS for x in (rich / "nlvr2" / f"{s}.json").read_text().splitlines()]
    by_pair = Counter(x["identifier"].rsplit("-", 1)[0] for x in lines)
    assert len(by_pair) == N_PAIRS and set(by_pair.values()) == {4}
    for stem in by_pair:  # half true, all different
        mine = [x for x in lines if x["identifier"].startswith(stem + "-")]
        assert sum(x["label"] == "True" for x in mine) == 2 and len({x["sentence"] for x in mine}) == 4
    capsys.readouterr()
    for bad in (["--questions-per-image", "0"], ["--nlvr2-statements", "3"], ["--nlvr2-statements", "0"]):
        assert main(["make-data", str(tmp_path / "bad"), "--images", "4", *bad]) == 1
        assert bad[0] in capsys.readouterr().err
