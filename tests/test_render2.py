"""The second renderer (evaluation only): it loads with the project's readers, its labels are true for its
own pixels, it is deterministic, and its style is not the generator's."""

from __future__ import annotations

import colorsys
import json
import re
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pycocotools.coco import COCO

from minivlm.data.render2 import BACKGROUND_KINDS, make_render2_world, render_image
from minivlm.data.synthetic import COLOUR_RGB, SIZE_RANGES, generate_world
from minivlm.data.synthetic_text import (ATTRIBUTES, CLASSES, COLOURS, NOUNS, SIZES, TEXTURE_ADJ, TEXTURES, Scene,
                                         SceneObject, relation_holds)
from minivlm.data.world import World
from minivlm.errors import MiniVLMError

N_IMAGES, SEED = 12, 3
# Classes whose box centre lies inside the shape (not a ring's or a crescent's; a turned arrow's may miss).
_FILLED_AT_CENTRE = {"circle", "square", "triangle", "star", "hexagon", "pentagon", "heart", "cross",
                     "diamond"}
_NOUN_CLASS = {form: cls for cls, pairs in NOUNS.items() for pair in pairs for form in pair}
_TEXTURE_WORD = {adj: t for t, adjs in TEXTURE_ADJ.items() for adj in adjs}


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("render2") / "w"
    make_render2_world(out, images=N_IMAGES, seed=SEED, questions_per_image=10)
    return out


def _load(root: Path, rel: str):
    return json.loads((root / rel).read_text())


def _objects(root: Path) -> tuple[dict[int, dict], dict[int, list[dict]]]:
    """image records by id, and image id -> [{cls, colour, size, texture, bbox, outline}] from the files."""
    inst = _load(root, "annotations/instances_test.json")
    attrs = {a["id"]: a for a in inst["attribute_categories"]}
    cats = {c["id"]: c["name"] for c in inst["categories"]}
    objs: dict[int, list[dict]] = {im["id"]: [] for im in inst["images"]}
    for a in inst["annotations"]:
        o = {"cls": cats[a["category_id"]], "bbox": a["bbox"], "outline": a["outline"]}
        o.update({attrs[i]["group"]: attrs[i]["name"] for i in a["attribute_ids"]})
        objs[a["image_id"]].append(o)
    return {im["id"]: im for im in inst["images"]}, objs


def _colour_name(rgb) -> str:
    """Name a pixel colour by the *main* generator's palette hues (not render2's own table)."""
    h, s, v = colorsys.rgb_to_hsv(*(np.asarray(rgb, float) / 255))
    if v < 0.25:
        return "black"
    if s < 0.15:
        return "white" if v > 0.75 else "grey"
    hues = {c: colorsys.rgb_to_hsv(*(np.array(COLOUR_RGB[c]) / 255))[0] for c in COLOURS if c not in ("white", "black")}
    return min(hues, key=lambda c: min(abs(h - hues[c]), 1 - abs(h - hues[c])))


def test_world_loads_with_project_readers(world, tmp_path):
    w = World(world)
    assert w.splits("coco") == ["test"] and w.splits("vqa") == ["test"]
    inst, caps, vqa = w.instances("test"), w.captions("test"), w.vqa("test")
    assert len(inst.images) == N_IMAGES and set(caps.images) == set(inst.images)
    assert inst.class_names() == CLASSES and inst.attribute_names() == ATTRIBUTES
    assert all(len(caps.captions[i]) == 5 for i in caps.images)
    assert vqa and all(len(q.answers) == 10 and q.multiple_choice_answer and q.image_id in inst.images for q in vqa)
    assert len(w.karpathy()) == N_IMAGES
    for info in inst.images.values():
        with Image.open(w.image_path("test", info)) as im:
            assert im.format == "JPEG" and im.size == (info.width, info.height)
    assert all(w.vqa_image_path("test", q.image_id).is_file() for q in vqa)
    meta = _load(world, "world.json")
    assert meta["complete"] and meta["generator"] == "minivlm.data.render2" and meta["version"] >= 1

    # The same category and attribute ids, names and groups as the main world: one detector vocabulary.
    main = tmp_path / "main"
    generate_world(main, images=1, seed=0, nlvr2_pairs=0, workers=1)
    ours, theirs = _load(world, "annotations/instances_test.json"), _load(main, "annotations/instances_train.json")
    assert ours["categories"] == theirs["categories"]
    assert ours["attribute_categories"] == theirs["attribute_categories"]

    coco = COCO(str(world / "annotations" / "instances_test.json"))  # and the RLE masks are usable
    for a in coco.loadAnns(coco.getAnnIds()):
        assert abs(coco.annToMask(a).sum() - a["area"]) <= 1 and len(a["attribute_ids"]) == 3


def test_boxes_inside_images_sizes_keep_their_meaning_and_centres_have_the_colour(world):
    images, objects = _objects(world)
    checked = 0
    extents = {s: [] for s in SIZES}
    for iid, objs in objects.items():
        im = images[iid]
        pixels = np.asarray(Image.open(world / "test" / im["file_name"]).convert("RGB"))
        short = min(im["width"], im["height"])
        for k, o in enumerate(objs):
            x, y, bw, bh = o["bbox"]
            assert 0 <= x and 0 <= y and x + bw <= im["width"] and y + bh <= im["height"]
            # The extent is the unrotated shape's larger side (as in the generator). Arrows and crescents
            # turn freely, which changes their box by up to a factor sqrt(2); the others turn a little.
            lo, hi = SIZE_RANGES[o["size"]]
            free = o["cls"] in ("arrow", "crescent")
            assert (0.7 if free else 0.93) * lo <= max(bw, bh) / short <= (1.27 if free else 1.16) * hi, o
            if not free:
                extents[o["size"]].append(max(bw, bh) / short)
            cx, cy = x + bw / 2, y + bh / 2
            covered = any(p[0] - 2 <= cx <= p[0] + p[2] + 2 and p[1] - 2 <= cy <= p[1] + p[3] + 2
                          for p in (q["bbox"] for q in objs[k + 1:]))  # later objects are drawn on top
            if o["texture"] == "solid" and o["cls"] in _FILLED_AT_CENTRE and not covered and max(bw, bh) >= 30:
                patch = pixels[int(cy) - 1:int(cy) + 2, int(cx) - 1:int(cx) + 2].reshape(-1, 3)
                assert _colour_name(np.median(patch, 0)) == o["colour"], (im["file_name"], o)
                checked += 1
    assert checked >= 3
    present = [s for s in SIZES if extents[s]]
    assert all(max(extents[a]) < min(extents[b]) for a, b in zip(present, present[1:]))


def test_boxes_and_colours_match_the_drawn_masks():
    for index in range(6):  # every stratum, low resolution (index 2) included
        r = render_image(SEED, index)
        assert r.image.size == (r.scene.width, r.scene.height) and r.owner.shape == (r.scene.height, r.scene.width)
        # The box holds every drawn sub-pixel, the mask only pixels at least half covered: a sharp tip
        # (a star's) can end in a pixel or two of low coverage; upscaling scales that.
        scale = r.scene.width / r.style["drawn_size"][0]
        tol = 2.0 * scale + (1.0 if r.style["low_res"] else 0.0)
        pixels = np.asarray(r.image, float)
        for k, (o, m) in enumerate(zip(r.scene.objects, r.masks)):
            rows, cols = np.flatnonzero(m.any(1)), np.flatnonzero(m.any(0))
            x, y, bw, bh = o.box
            slack = 0.01 if not r.style["low_res"] else scale  # the box holds the mask's pixel centres
            assert x - slack <= cols[0] + 0.5 and cols[-1] + 0.5 <= x + bw + slack, (index, o)
            assert y - slack <= rows[0] + 0.5 and rows[-1] + 0.5 <= y + bh + slack, (index, o)
            assert cols[0] - x <= tol and x + bw - (cols[-1] + 1) <= tol, (index, o)
            assert rows[0] - y <= tol and y + bh - (rows[-1] + 1) <= tol, (index, o)
            shown = r.owner == k
            assert shown.sum() >= 0.75 * m.sum()  # occlusion kept within the generator's limit
            if o.texture == "solid" and not r.style["low_res"]:
                # Pixels the object shows, away from its edge and border: the colour's name.
                inner = shown & _shrink(m, int(np.ceil(r.outlines[k])) + 2)
                if inner.sum() >= 9:
                    assert _colour_name(np.median(pixels[inner], 0)) == o.colour, (index, o)


def _shrink(m: np.ndarray, r: int) -> np.ndarray:
    out = m.copy()
    for _ in range(r):
        out[1:] &= out[:-1].copy()
        out[:-1] &= out[1:].copy()
        out[:, 1:] &= out[:, :-1].copy()
        out[:, :-1] &= out[:, 1:].copy()
    return out


def _resolve(ref: str, objs: list[dict]) -> dict:
    """The single object a definite description ('the red circle', 'the small box') refers to."""
    words = ref.removeprefix("the ").split(" ", 1)
    want: dict[str, str] = {}
    if len(words) == 2 and words[0] in COLOURS + SIZES + list(_TEXTURE_WORD) and words[1] in _NOUN_CLASS:
        group = "colour" if words[0] in COLOURS else "size" if words[0] in SIZES else "texture"
        want[group] = _TEXTURE_WORD.get(words[0], words[0]) if group == "texture" else words[0]
        noun = words[1]
    else:
        noun = ref.removeprefix("the ")
    want["cls"] = _NOUN_CLASS[noun]
    matches = [o for o in objs if all(o[k] == v for k, v in want.items())]
    assert len(matches) == 1, (ref, objs)
    return matches[0]


def _obj(o: dict) -> SceneObject:
    return SceneObject(o["cls"], o["colour"], o["size"], o["texture"], tuple(o["bbox"]))


_REL = {"to the left of": "left of", "left of": "left of", "to the right of": "right of", "right of": "right of",
        "above": "above", "over": "above", "below": "below", "under": "below", "beneath": "below"}
_REL_RE = "|".join(sorted(_REL, key=len, reverse=True))


def test_vqa_answers_and_captions_agree_with_the_annotations(world):
    images, objects = _objects(world)
    qs = _load(world, "vqa/v2_OpenEnded_mscoco_test_questions.json")["questions"]
    anns = {a["question_id"]: a for a in _load(world, "vqa/v2_mscoco_test_annotations.json")["annotations"]}
    checked = Counter()
    for q in qs:
        objs, text = objects[q["image_id"]], q["question"].lower()
        ans = anns[q["question_id"]]["multiple_choice_answer"]
        scene = Scene(images[q["image_id"]]["width"], images[q["image_id"]]["height"], "plain", [_obj(o) for o in objs])
        if m := re.fullmatch(r"how many ([\w -]+?) (?:are there|are in the (?:image|picture)|can you see)\?", text):
            colour, _, noun = m.group(1).partition(" ") if m.group(1).split()[0] in COLOURS else (None, "", m.group(1))
            n = len(objs) if noun in ("shapes", "objects") else \
                sum(o["cls"] == _NOUN_CLASS[noun] and colour in (None, o["colour"]) for o in objs)
            assert int(ans) == n, text
            checked["count"] += 1
        elif m := re.fullmatch(r"is there an? (\w+) ([\w -]+)\?", text):
            hit = any(o["cls"] == _NOUN_CLASS[m.group(2)] and o["colour"] == m.group(1) for o in objs)
            assert ans == ("yes" if hit else "no"), text
            checked["exists"] += 1
        elif m := re.fullmatch(r"what color is (the [\w -]+)\?", text):
            assert _resolve(m.group(1), objs)["colour"] == ans, text
            checked["colour"] += 1
        elif m := re.fullmatch(r"what shape is the (?:(\w+) )?(\w+) (?:object|thing)\?", text):
            matches = [o for o in objs if o["colour"] == m.group(2) and m.group(1) in (None, o["size"])]
            assert len(matches) == 1 and matches[0]["cls"] == ans, text
            checked["shape"] += 1
        elif m := re.fullmatch(rf"what is ({_REL_RE}) (the [\w -]+)\?", text):
            ref = _obj(_resolve(m.group(2), objs))
            hits = [o for o in scene.objects if o != ref and relation_holds(o, ref, _REL[m.group(1)], scene)]
            assert len(hits) == 1 and hits[0].cls == ans, text
            checked["spatial"] += 1
        elif m := re.fullmatch(rf"is (the [\w -]+?) ({_REL_RE}) (the [\w -]+)\?", text):
            a, b = _obj(_resolve(m.group(1), objs)), _obj(_resolve(m.group(3), objs))
            assert ans == ("yes" if relation_holds(a, b, _REL[m.group(2)], scene) else "no"), text
            checked["spatial"] += 1
        elif m := re.fullmatch(r"what size is (the [\w -]+)\?", text):
            assert _resolve(m.group(1), objs)["size"] == ans, text
            checked["size"] += 1
        elif m := re.fullmatch(r"what pattern (?:is|does) (the [\w -]+?)(?: have)?\?", text):
            assert _resolve(m.group(1), objs)["texture"] == ans, text
            checked["texture"] += 1
        elif m := re.fullmatch(r"is (the [\w -]+?) (small|medium sized|large|big|" + "|".join(TEXTURES) + r")\?", text):
            o = _resolve(m.group(1), objs)
            word = m.group(2)
            size = {"big": "large", "medium sized": "medium"}.get(word, word)
            truth = o["texture"] == word if word in TEXTURES else o["size"] == size
            assert ans == ("yes" if truth else "no"), text
            checked["size" if word not in TEXTURES else "texture"] += 1
        else:
            raise AssertionError(f"question not understood by the test: {text}")
    assert set(checked) == {"count", "exists", "colour", "shape", "spatial", "size", "texture"}, checked

    for c in _load(world, "annotations/captions_test.json")["annotations"]:
        named = {w for w in re.findall(r"[a-z]+", c["caption"].lower()) if w in COLOURS}
        assert named <= {o["colour"] for o in objects[c["image_id"]]}, c["caption"]


def test_same_seed_same_files_other_seed_differs(world, tmp_path):
    again = tmp_path / "again"
    make_render2_world(again, images=N_IMAGES, seed=SEED, questions_per_image=10)
    files = sorted(p.relative_to(world) for p in world.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(again) for p in again.rglob("*") if p.is_file())
    assert all((world / p).read_bytes() == (again / p).read_bytes() for p in files)
    make_render2_world(again, images=N_IMAGES, seed=SEED, questions_per_image=10)  # a rerun in place is fine
    other = tmp_path / "other"
    make_render2_world(other, images=2, seed=SEED + 1)
    first = "test/COCO_test_000000000001.jpg"
    assert (other / first).read_bytes() != (world / first).read_bytes()
    with pytest.raises(MiniVLMError, match="not empty"):
        make_render2_world(other, images=3, seed=SEED + 1)  # another world's folder


def test_style_is_not_the_generators(world):
    images, objects = _objects(world)
    styles = [im["style"] for im in images.values()]
    assert {s["background"] for s in styles} == set(BACKGROUND_KINDS)
    low = [s for s in styles if s["low_res"]]
    assert low and len(low) < len(styles) and all(96 <= min(s["drawn_size"]) <= 160 for s in low)
    counts = [len(o) for o in objects.values()]
    assert 1 in counts and max(counts) >= 6  # the generator draws 1-8
    borders = [o["outline"] for objs in objects.values() for o in objs]
    assert 0.2 * len(borders) <= sum(b > 0 for b in borders) <= 0.8 * len(borders)
    assert len({round(b, 1) for b in borders if b > 0}) >= 3  # varied widths

    # An outlined object's rim really is drawn in another colour than its fill.
    seen = 0
    for index in range(2 * N_IMAGES):  # beyond the world's images: outlined *solid* ones can be rare
        r = render_image(SEED, index)
        pixels = np.asarray(r.image, float)
        for k, (o, m, b) in enumerate(zip(r.scene.objects, r.masks, r.outlines)):
            shown = r.owner == k
            rim = shown & _shrink(m, 1) & ~_shrink(m, 2)  # the second pixel in: inside the border, not blended
            inner = shown & _shrink(m, int(np.ceil(b)) + 2)
            if b >= 2 and o.texture == "solid" and rim.sum() >= 20 and inner.sum() >= 20:
                diff = np.abs(np.median(pixels[rim], 0) - np.median(pixels[inner], 0)).max()
                assert diff > 40, (index, o, diff)
                seen += 1
    assert seen >= 1
