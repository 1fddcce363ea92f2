"""The synthetic world: scenes of coloured, textured shapes written in the real datasets' formats.

`minivlm make-data OUT --images N --seed S [--unlabeled M]` writes

    OUT/world.json                                   parameters, counts, vocabularies, version
    OUT/{train,val,test}/COCO_{split}_{id:012d}.jpg   the captioning / VQA / detection images (70/15/15 of N)
    OUT/annotations/instances_{split}.json           COCO instances + the attribute extension
    OUT/annotations/captions_{split}.json            COCO captions, 5 per image
    OUT/annotations/dataset_coco.json                Karpathy split file
    OUT/vqa/v2_OpenEnded_mscoco_{split}_questions.json, OUT/vqa/v2_mscoco_{split}_annotations.json
    OUT/nlvr2/{train,dev,test1}.json + nlvr2/images/{split}/{split}-{set}-{pair}-img{0,1}.png
    OUT/nlvr2/annotations/instances_{split}.json     the NLVR2 images' objects (COCO instances; not in real
                                                     NLVR2: for oracle regions in benchmarks/grounding.py)
    OUT/unlabeled/unlabeled_{i:06d}.jpg              images without labels (data distillation)

Every image has its own random stream, `SeedSequence([seed, stream, index])`, so images can be made in
parallel and in any order, and the same arguments give byte-identical files. Attributes follow Visual
Genome: an object's colour, size and texture are its attributes (COCO JSON: top-level
`attribute_categories` and per annotation `attribute_ids`).
"""

from __future__ import annotations

import colorsys
import json
import math
import multiprocessing
import time
from collections import Counter
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw
from tqdm import tqdm

from minivlm.data.synthetic_text import (  # noqa: F401  (re-exported: the world's public vocabulary)
    ATTRIBUTE_GROUPS, ATTRIBUTES, BACKGROUNDS, CLASSES, COLOURS, SIZES, TEXTURES, Scene, SceneObject, captions,
    human_answers, nlvr2_statement, questions, tokenize,
)
from minivlm.errors import MiniVLMError
from minivlm.io import atomic_path, read_json, write_json

GENERATOR_VERSION = 1
SPLITS = ("train", "val", "test")
NLVR2_SPLITS = ("train", "dev", "test1")  # the real NLVR2 file names
SPLIT_FRACTIONS = (0.70, 0.15, 0.15)
MAX_OBJECTS = 8
MIN_OBJECT_PX = 28  # smallest extent; thin shapes (arrow, crescent) are about half as wide
MIN_VISIBLE = 0.8  # an object may be covered by later ones, but keeps this fraction of its pixels
CAPTIONS_PER_IMAGE = 5
QUESTIONS_PER_IMAGE = (4, 6)  # drawn per image by default: VQA v2 has about 5.4
MAX_QUESTIONS_PER_IMAGE = 40  # the askers give up before this on small scenes (fewer come back)
MAX_NLVR2_STATEMENTS = 8
_STREAM_UNLABELED = 20  # random streams: COCO splits 0..2, NLVR2 splits 10..12, unlabeled 20

COLOUR_RGB: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 35), "orange": (245, 135, 20), "yellow": (245, 225, 40), "green": (40, 170, 60),
    "blue": (35, 80, 225), "purple": (140, 50, 190), "pink": (250, 125, 195), "white": (245, 245, 245),
    "black": (20, 20, 20),
}
# An object's extent (its nominal diameter) as a fraction of the image's shorter side; gaps between the
# bins keep "small", "medium" and "large" unambiguous.
SIZE_RANGES: dict[str, tuple[float, float]] = {"small": (0.13, 0.17), "medium": (0.22, 0.28),
                                                "large": (0.34, 0.42)}
_SIZE_P = (0.4, 0.38, 0.22)
# Rotations are limited where turning a shape would make it look like another one (a square turned by
# 45 degrees is a diamond, a cross an "x").
_MAX_ROTATION = {"circle": 0, "square": 10, "triangle": 15, "star": 36, "hexagon": 30, "heart": 20, "cross": 10,
                 "ring": 0, "arrow": 180, "crescent": 180, "diamond": 10, "pentagon": 36}


# ---------------------------------------------------------------------------------------------------
# Shapes: outline polygons in unit coordinates (y down), a hole for the ring
# ---------------------------------------------------------------------------------------------------

def _regular(n: int, phase: float = -math.pi / 2, radius: float = 1.0) -> np.ndarray:
    t = phase + 2 * math.pi * np.arange(n) / n
    return radius * np.stack([np.cos(t), np.sin(t)], axis=1)


def _fit(pts: np.ndarray, half: float = 1.0) -> np.ndarray:
    """Centre the outline's box on the origin and scale its larger half-side to `half`."""
    lo, hi = pts.min(0), pts.max(0)
    return (pts - (lo + hi) / 2) * (2 * half / (hi - lo).max())


def _unit_shapes() -> dict[str, tuple[np.ndarray, np.ndarray | None]]:
    star = _regular(10) * np.where(np.arange(10) % 2 == 0, 1.0, 0.45)[:, None]
    t = np.linspace(0, 2 * math.pi, 72, endpoint=False)
    heart = np.stack([16 * np.sin(t) ** 3,
                      -(13 * np.cos(t) - 5 * np.cos(2 * t) - 2 * np.cos(3 * t) - np.cos(4 * t))], 1)
    w = 0.34
    cross = np.array([(-w, -1), (w, -1), (w, -w), (1, -w), (1, w), (w, w), (w, 1), (-w, 1), (-w, w), (-1, w),
                      (-1, -w), (-w, -w)])
    arrow = np.array([(-1, -0.22), (0.2, -0.22), (0.2, -0.55), (1, 0), (0.2, 0.55), (0.2, 0.22), (-1, 0.22)])
    # Crescent: the unit disc minus a disc of radius 0.8 centred at (0.5, 0); both arcs end where they meet.
    d, r2 = 0.5, 0.8
    ix = (1 - r2 ** 2 + d ** 2) / (2 * d)
    iy = math.sqrt(1 - ix ** 2)
    a_out, a_in = math.atan2(iy, ix), math.atan2(iy, ix - d)
    outer = np.linspace(a_out, 2 * math.pi - a_out, 40)
    inner = np.linspace(2 * math.pi - a_in, a_in, 32)
    crescent = np.concatenate([np.stack([np.cos(outer), np.sin(outer)], 1),
                               np.stack([d + r2 * np.cos(inner), r2 * np.sin(inner)], 1)])
    circle = _regular(48)
    return {
        "circle": (circle, None), "square": (_regular(4, math.pi / 4) / math.sqrt(0.5) * 0.85, None),
        "triangle": (_fit(_regular(3)), None), "star": (_fit(star), None), "hexagon": (_regular(6, 0.0), None),
        "heart": (_fit(heart), None), "cross": (cross, None), "ring": (circle, circle * 0.55),
        "arrow": (arrow, None), "crescent": (_fit(crescent), None),
        "diamond": (np.array([(0, -1), (0.62, 0), (0, 1), (-0.62, 0)]), None), "pentagon": (_fit(_regular(5)), None),
    }


UNIT_SHAPES = _unit_shapes()


# ---------------------------------------------------------------------------------------------------
# Drawing
# ---------------------------------------------------------------------------------------------------

def _image_size(rng: np.random.Generator) -> tuple[int, int]:
    short = int(rng.integers(192, 449))
    long = min(512, int(round(short * rng.uniform(1.0, 1.6))))
    return (short, long) if rng.random() < 0.35 else (long, short)


def _background(rng: np.random.Generator, kind: str, w: int, h: int) -> np.ndarray:
    """Low-saturation, mid-brightness backgrounds, so every object colour (white and black included)
    stands out."""
    hue, sat, val = rng.random(), rng.uniform(0.0, 0.25), rng.uniform(0.35, 0.72)
    base = np.array(colorsys.hsv_to_rgb(hue, sat, val), np.float32) * 255
    yy, xx = np.arange(h, dtype=np.float32)[:, None], np.arange(w, dtype=np.float32)[None, :]
    img = np.broadcast_to(base, (h, w, 3))
    if kind == "gradient":
        val2 = float(np.clip(val + rng.choice([-1, 1]) * rng.uniform(0.15, 0.3), 0.25, 0.8))
        other = np.array(colorsys.hsv_to_rgb((hue + rng.uniform(-0.1, 0.1)) % 1, sat, val2), np.float32) * 255
        a = rng.uniform(0, 2 * math.pi)
        t = xx * math.cos(a) + yy * math.sin(a)
        t = (t - t.min()) / max(1e-6, float(t.max() - t.min()))
        img = base + (other - base) * t[..., None]
    elif kind == "noisy":
        cells = rng.normal(0, 1, (int(rng.integers(4, 10)), int(rng.integers(4, 10)))).astype(np.float32)
        blobs = np.asarray(Image.fromarray(cells).resize((w, h), Image.BICUBIC))
        grain = (rng.random((h, w, 1), dtype=np.float32) - 0.5) * 30
        img = img + (blobs[..., None] * rng.uniform(12, 25) + grain)
    elif kind == "striped":
        a, period = rng.uniform(0, math.pi), rng.uniform(14, 40)
        stripes = ((xx * math.cos(a) + yy * math.sin(a)) % period < period / 2).astype(np.float32)
        img = img + (stripes[..., None] - 0.5) * rng.uniform(14, 26)
    # Sensor-like noise; uniform because drawing normal variates costs 7x more and looks the same here.
    return img + (rng.random((h, w, 3), dtype=np.float32) - 0.5) * 10


def _pattern(texture: str, u: np.ndarray, v: np.ndarray, period: float) -> np.ndarray | None:
    """Where the second shade of a textured object goes; (u, v) are coordinates in the object's frame."""
    if texture == "striped":
        return (u + v) / math.sqrt(2) % period < 0.45 * period
    if texture == "dotted":
        du, dv = u % period - period / 2, v % period - period / 2
        return du * du + dv * dv < (0.28 * period) ** 2
    if texture == "checkered":
        cell = 0.6 * period
        return (np.floor(u / cell) + np.floor(v / cell)) % 2 == 1
    if texture == "crosshatched":
        a, b = (u + v) / math.sqrt(2), (u - v) / math.sqrt(2)
        return (a % period < 0.22 * period) | (b % period < 0.22 * period)
    return None


def _shade(rgb: np.ndarray) -> np.ndarray:
    lum = 0.299 * rgb[0] + 0.587 * rgb[1] + 0.114 * rgb[2]
    return rgb * 0.5 if lum > 100 else rgb + (255 - rgb) * 0.5


def _coverage(outline: np.ndarray, hole: np.ndarray | None, x0: int, y0: int, w: int, h: int) -> np.ndarray:
    """Anti-aliased coverage (0..1) of the shape over the pixel box [x0, x0+w) x [y0, y0+h), drawn at 4x."""
    ss = 4
    canvas = Image.new("L", (w * ss, h * ss), 0)
    draw = ImageDraw.Draw(canvas)
    for pts, fill in ((outline, 255), (hole, 0)):
        if pts is not None:
            draw.polygon([tuple(p) for p in ((pts - (x0, y0)) * ss - 0.5).tolist()], fill=fill)
    return np.asarray(canvas.resize((w, h), Image.BOX), np.float32) / 255.0


def _paint(img: np.ndarray, x0: int, y0: int, alpha: np.ndarray, rgb: np.ndarray, texture: str,
           centre: np.ndarray, angle: float, extent: float) -> None:
    """Blend the object's colour (and texture, which turns with the object) into `img` by coverage."""
    h, w = alpha.shape
    yy, xx = np.mgrid[y0:y0 + h, x0:x0 + w].astype(np.float32) + 0.5 - centre[::-1, None, None]
    u = xx * math.cos(angle) + yy * math.sin(angle)
    v = -xx * math.sin(angle) + yy * math.cos(angle)
    pat = _pattern(texture, u, v, max(6.0, extent / 4.5))
    paint = np.broadcast_to(rgb, alpha.shape + (3,))
    if pat is not None:
        paint = np.where(pat[..., None], _shade(rgb), paint)
    a = alpha[..., None]
    img[y0:y0 + h, x0:x0 + w] = img[y0:y0 + h, x0:x0 + w] * (1 - a) + paint * a


def render_scene(rng: np.random.Generator, classes: list[str] = CLASSES, colours: list[str] = COLOURS
                 ) -> tuple[Image.Image, Scene, list[list[float]]]:
    """One scene: the image, its objects (boxes, attributes, pixel areas) and each outline polygon."""
    w, h = _image_size(rng)
    short = min(w, h)
    scene = Scene(w, h, BACKGROUNDS[int(rng.integers(len(BACKGROUNDS)))], [])
    img = _background(rng, scene.background, w, h)
    owner = np.full((h, w), -1, np.int16)  # which object each pixel shows, for the occlusion limit
    full: list[int] = []
    visible: list[int] = []
    polygons: list[list[float]] = []
    for _ in range(int(rng.integers(1, MAX_OBJECTS + 1))):
        cls = classes[int(rng.integers(len(classes)))]
        colour = colours[int(rng.integers(len(colours)))]
        size = SIZES[int(rng.choice(len(SIZES), p=_SIZE_P))]
        texture = TEXTURES[int(rng.integers(len(TEXTURES)))]
        extent = max(MIN_OBJECT_PX, rng.uniform(*SIZE_RANGES[size]) * short)
        rgb = np.clip(np.array(COLOUR_RGB[colour], np.float32) + rng.uniform(-12, 12, 3), 0, 255)
        outline, hole = UNIT_SHAPES[cls]
        for _attempt in range(20):
            angle = math.radians(rng.uniform(-1, 1) * _MAX_ROTATION[cls])
            rot = np.array([[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]])
            scale = extent / 2 * np.array([rng.uniform(0.9, 1.1), 1.0])
            pts = (outline * scale) @ rot.T
            lo, hi = pts.min(0), pts.max(0)
            if (hi - lo)[0] > w - 4 or (hi - lo)[1] > h - 4:
                break
            centre = np.array([rng.uniform(2 - lo[0], w - 2 - hi[0]), rng.uniform(2 - lo[1], h - 2 - hi[1])])
            pts = pts + centre
            x0, y0 = (int(v) for v in np.floor(pts.min(0)))
            x1, y1 = (int(v) + 1 for v in np.ceil(pts.max(0)))
            hole_pts = None if hole is None else (hole * scale) @ rot.T + centre
            alpha = _coverage(pts, hole_pts, x0, y0, x1 - x0, y1 - y0)
            mask = alpha >= 0.5
            under = owner[y0:y1, x0:x1][mask]
            covered = np.bincount(under[under >= 0], minlength=len(full))
            # Same-coloured shapes must not overlap: they would merge into one blob.
            if any(vis - c < MIN_VISIBLE * f or (c and o.colour == colour)
                   for vis, c, f, o in zip(visible, covered, full, scene.objects)):
                continue
            _paint(img, x0, y0, alpha, rgb, texture, centre, angle, extent)
            visible = [vis - int(c) for vis, c in zip(visible, covered)] + [int(mask.sum())]
            full.append(int(mask.sum()))
            owner[y0:y1, x0:x1][mask] = len(full) - 1
            lo, hi = pts.min(0), pts.max(0)  # inside the image: the centre was drawn to keep a 2-px margin
            box = (round(float(lo[0]), 2), round(float(lo[1]), 2), round(float(hi[0] - lo[0]), 2),
                   round(float(hi[1] - lo[1]), 2))
            scene.objects.append(SceneObject(cls, colour, size, texture, box, float(mask.sum())))
            polygons.append([round(float(c), 2) for c in pts.reshape(-1)])
            break
    image = Image.fromarray(np.clip(img + 0.5, 0, 255).astype(np.uint8), "RGB")
    return image, scene, polygons


def _save(image: Image.Image, path: str, **kwargs) -> None:
    with atomic_path(path) as tmp:
        image.save(tmp, **kwargs)


# ---------------------------------------------------------------------------------------------------
# Work items (run in worker processes; everything they return is plain data)
# ---------------------------------------------------------------------------------------------------

def _rng(*key: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence(list(key)))


def _coco_item(seed: int, stream: int, index: int, path: str, n_questions: int | None) -> dict:
    rng = _rng(seed, stream, index)
    image, scene, polygons = render_scene(rng)
    _save(image, path, format="JPEG", quality=int(rng.integers(55, 93)))
    text_rng = _rng(seed, stream, index, 1)  # its own stream: changing the language leaves images alone
    caps = captions(scene, text_rng, CAPTIONS_PER_IMAGE)
    if n_questions is None:
        n_questions = int(text_rng.integers(QUESTIONS_PER_IMAGE[0], QUESTIONS_PER_IMAGE[1] + 1))
    qs = questions(scene, text_rng, n_questions)
    return {"scene": scene, "polygons": polygons, "captions": caps, "questions": qs,
            "answers": [human_answers(q, text_rng) for q in qs]}


def _nlvr2_item(seed: int, stream: int, index: int, left_path: str, right_path: str, n_statements: int) -> dict:
    rng = _rng(seed, stream, index)
    # Both images draw from the same few classes and colours, so comparisons between them are interesting.
    classes = [CLASSES[i] for i in rng.choice(len(CLASSES), 3, replace=False)]
    colours = [COLOURS[i] for i in rng.choice(len(COLOURS), 3, replace=False)]
    scenes, polygons = [], []
    for path in (left_path, right_path):
        image, scene, outline = render_scene(rng, classes, colours)
        _save(image, path, format="PNG", compress_level=1)
        scenes.append(scene)
        polygons.append(outline)
    sentences: list[tuple[str, bool]] = []
    for label in rng.permutation([True, False] * (n_statements // 2)).tolist():  # half of them true
        text = nlvr2_statement(scenes[0], scenes[1], bool(label), rng, tuple(s for s, _ in sentences))
        sentences.append((text, bool(label)))
    return {"sentences": sentences, "query": classes[0], "scenes": scenes, "polygons": polygons}


def _unlabeled_item(seed: int, stream: int, index: int, path: str) -> dict:
    rng = _rng(seed, stream, index)
    image, _, _ = render_scene(rng)
    _save(image, path, format="JPEG", quality=int(rng.integers(55, 93)))
    return {}


def _do(task: tuple) -> dict:
    kind, *args = task
    return {"coco": _coco_item, "nlvr2": _nlvr2_item, "unlabeled": _unlabeled_item}[kind](*args)


def _run_all(tasks: list[tuple], workers: int) -> list[dict]:
    bar = tqdm(total=len(tasks), desc="make-data", unit="img", leave=False)
    if workers <= 1 or len(tasks) < 16:
        results = []
        for t in tasks:
            results.append(_do(t))
            bar.update()
    else:
        ctx = multiprocessing.get_context("fork")
        with ctx.Pool(workers) as pool:
            results = []
            for r in pool.imap(_do, tasks, chunksize=4):  # ordered: output does not depend on scheduling
                results.append(r)
                bar.update()
    bar.close()
    return results


# ---------------------------------------------------------------------------------------------------
# The world
# ---------------------------------------------------------------------------------------------------

def split_sizes(n: int) -> list[int]:
    """70/15/15 (train/val/test), rounded; train takes the remainder."""
    val = int(n * SPLIT_FRACTIONS[1] + 0.5)
    test = int(n * SPLIT_FRACTIONS[2] + 0.5)
    return [n - val - test, val, test]


def default_nlvr2_pairs(images: int) -> int:
    return max(4, images // 4)


def _attribute_ids(o: SceneObject) -> list[int]:
    return [ATTRIBUTES.index(o.colour) + 1, ATTRIBUTES.index(o.size) + 1, ATTRIBUTES.index(o.texture) + 1]


def _check_out(out: Path, params: dict) -> None:
    if out.exists() and not out.is_dir():
        raise MiniVLMError(f"{out}: exists and is not a folder")
    if not out.is_dir() or not any(out.iterdir()):
        return
    meta = out / "world.json"
    if not meta.is_file():
        raise MiniVLMError(f"{out}: folder is not empty and holds no world.json; choose a new or empty folder")
    old = read_json(meta).get("params")
    if old != params:
        raise MiniVLMError(f"{meta}: field 'params' is {old}, not {params}: this folder holds another world; "
                           "choose a new folder or rerun with the same parameters")


def _world_meta(params: dict, sizes: list[int], pair_sizes: list[int]) -> dict:
    return {
        "generator": "minivlm.data.synthetic", "version": GENERATOR_VERSION, "seed": params["seed"], "params": params,
        "splits": dict(zip(SPLITS, sizes)), "split_fractions": dict(zip(SPLITS, SPLIT_FRACTIONS)),
        "nlvr2_splits": dict(zip(NLVR2_SPLITS, pair_sizes)), "unlabeled": params["unlabeled"],
        "classes": CLASSES, "attributes": ATTRIBUTE_GROUPS, "attribute_names": ATTRIBUTES,
        "backgrounds": BACKGROUNDS, "captions_per_image": CAPTIONS_PER_IMAGE,
        "image_size_range": [192, 512], "complete": False,
    }


def generate_world(out: Path, images: int, seed: int, unlabeled: int = 0, nlvr2_pairs: int | None = None,
                   workers: int = 2, questions_per_image: int | None = None, nlvr2_statements: int = 2) -> dict:
    """Write the synthetic world into `out` (see the module docstring); returns the summary.

    `questions_per_image` None draws 4-6 per image as VQA v2; more give the same images more supervision
    (a scene supports about 20 distinct questions). `nlvr2_statements` per pair, half of them true."""
    start = time.perf_counter()
    out = Path(out)
    if images < 1:
        raise MiniVLMError(f"--images must be at least 1 (got {images})")
    if unlabeled < 0 or (nlvr2_pairs is not None and nlvr2_pairs < 0):
        raise MiniVLMError("--unlabeled and --nlvr2-pairs must not be negative")
    if questions_per_image is not None and not 1 <= questions_per_image <= MAX_QUESTIONS_PER_IMAGE:
        raise MiniVLMError(f"--questions-per-image must be between 1 and {MAX_QUESTIONS_PER_IMAGE} "
                           f"(got {questions_per_image})")
    if nlvr2_statements < 2 or nlvr2_statements % 2 or nlvr2_statements > MAX_NLVR2_STATEMENTS:
        raise MiniVLMError(f"--nlvr2-statements must be an even number from 2 to {MAX_NLVR2_STATEMENTS} "
                           f"(got {nlvr2_statements})")
    pairs = default_nlvr2_pairs(images) if nlvr2_pairs is None else nlvr2_pairs
    params = {"images": images, "seed": seed, "unlabeled": unlabeled, "nlvr2_pairs": pairs,
              "questions_per_image": questions_per_image or list(QUESTIONS_PER_IMAGE),
              "nlvr2_statements": nlvr2_statements, "version": GENERATOR_VERSION}
    _check_out(out, params)
    sizes, pair_sizes = split_sizes(images), split_sizes(pairs)
    meta = _world_meta(params, sizes, pair_sizes)
    write_json(out / "world.json", meta, indent=1)  # first, so an interrupted run can be rerun here

    tasks: list[tuple] = []
    image_ids: list[list[int]] = []
    next_id = 1  # image ids are unique across splits
    for s, (split, n) in enumerate(zip(SPLITS, sizes)):
        (out / split).mkdir(parents=True, exist_ok=True)
        image_ids.append(list(range(next_id, next_id + n)))
        next_id += n
        tasks += [("coco", seed, s, i, str(out / split / f"COCO_{split}_{iid:012d}.jpg"), questions_per_image)
                  for i, iid in enumerate(image_ids[-1])]
    pair_names: list[list[str]] = []
    for s, (split, n) in enumerate(zip(NLVR2_SPLITS, pair_sizes)):
        folder = out / "nlvr2" / "images" / split
        folder.mkdir(parents=True, exist_ok=True)
        pair_names.append([f"{split}-{p // 4}-{p % 4}" for p in range(n)])  # set, pair within the set
        tasks += [("nlvr2", seed, 10 + s, p, str(folder / f"{name}-img0.png"), str(folder / f"{name}-img1.png"),
                   nlvr2_statements)
                  for p, name in enumerate(pair_names[-1])]
    if unlabeled:
        (out / "unlabeled").mkdir(parents=True, exist_ok=True)
    tasks += [("unlabeled", seed, _STREAM_UNLABELED, i, str(out / "unlabeled" / f"unlabeled_{i:06d}.jpg"))
              for i in range(unlabeled)]
    results = iter(_run_all(tasks, workers))

    coco = [[next(results) for _ in ids] for ids in image_ids]
    nlvr2 = [[next(results) for _ in names] for names in pair_names]
    summary = _write_coco(out, image_ids, coco)
    summary.update(_write_nlvr2(out, pair_names, nlvr2))
    meta.update(complete=True, counts=summary)
    write_json(out / "world.json", meta, indent=1)
    return {"out": str(out), "seed": seed, "images": dict(zip(SPLITS, sizes)), "unlabeled": unlabeled,
            "classes": CLASSES, "attributes": ATTRIBUTE_GROUPS, **summary,
            "seconds": round(time.perf_counter() - start, 2)}


_COCO_INFO = {"description": "minivlm synthetic world", "version": str(GENERATOR_VERSION),
              "contributor": "minivlm.data.synthetic"}


def _instances_file(images: list[dict], instances: list[dict]) -> dict:
    """A COCO instances file (with the attribute extension) over the world's classes and attributes."""
    categories = [{"id": i + 1, "name": c, "supercategory": "shape"} for i, c in enumerate(CLASSES)]
    attribute_categories = [{"id": i + 1, "name": a, "group": g}
                            for i, (a, g) in enumerate((a, g) for g, names in ATTRIBUTE_GROUPS.items() for a in names)]
    return {"info": _COCO_INFO, "licenses": [], "images": images, "annotations": instances, "categories": categories,
            "attribute_categories": attribute_categories}


def _instance(ann_id: int, image_id: int, o: SceneObject, polygon: list[float]) -> dict:
    return {"id": ann_id, "image_id": image_id, "category_id": CLASSES.index(o.cls) + 1, "bbox": list(o.box),
            "area": o.area, "iscrowd": 0, "segmentation": [polygon], "attribute_ids": _attribute_ids(o)}


def _write_coco(out: Path, image_ids: list[list[int]], coco: list[list[dict]]) -> dict:
    info = _COCO_INFO
    karpathy: list[dict] = []
    ann_id = cap_id = 1
    n_objects, qtypes, atypes = 0, Counter(), Counter()
    for split, ids, items in zip(SPLITS, image_ids, coco):
        images, instances, caps, vqa_q, vqa_a = [], [], [], [], []
        for iid, item in zip(ids, items):
            scene = item["scene"]
            file_name = f"COCO_{split}_{iid:012d}.jpg"
            images.append({"id": iid, "file_name": file_name, "width": scene.width, "height": scene.height})
            for o, poly in zip(scene.objects, item["polygons"]):
                instances.append(_instance(ann_id, iid, o, poly))
                ann_id += 1
            n_objects += len(scene.objects)
            sentences = []
            for text in item["captions"]:
                caps.append({"id": cap_id, "image_id": iid, "caption": text})
                sentences.append({"raw": text, "tokens": tokenize(text), "imgid": len(karpathy), "sentid": cap_id})
                cap_id += 1
            karpathy.append({"filepath": split, "filename": file_name, "imgid": len(karpathy), "cocoid": iid,
                             "split": split, "sentids": [s["sentid"] for s in sentences], "sentences": sentences})
            for k, (q, answers) in enumerate(zip(item["questions"], item["answers"])):
                qid = iid * 1000 + k  # VQA's convention
                vqa_q.append({"image_id": iid, "question": q.question[0].upper() + q.question[1:], "question_id": qid})
                vqa_a.append({"question_id": qid, "image_id": iid, "question_type": q.question_type,
                              "answer_type": q.answer_type, "multiple_choice_answer": q.answer, "answers": answers})
                qtypes[q.question_type] += 1
                atypes[q.answer_type] += 1
        ann = out / "annotations"
        write_json(ann / f"instances_{split}.json", _instances_file(images, instances))
        write_json(ann / f"captions_{split}.json", {"info": info, "licenses": [], "images": images,
                                                    "annotations": caps})
        header = {"info": info, "license": {}, "data_type": "mscoco", "data_subtype": split}
        write_json(out / "vqa" / f"v2_OpenEnded_mscoco_{split}_questions.json",
                   {**header, "task_type": "Open-Ended", "questions": vqa_q})
        write_json(out / "vqa" / f"v2_mscoco_{split}_annotations.json", {**header, "annotations": vqa_a})
    write_json(out / "annotations" / "dataset_coco.json", {"dataset": "coco", "images": karpathy})
    return {"objects": n_objects, "captions": cap_id - 1, "questions": sum(qtypes.values()),
            "questions_by_type": dict(sorted(qtypes.items())), "answer_types": dict(sorted(atypes.items()))}


def _write_nlvr2(out: Path, pair_names: list[list[str]], nlvr2: list[list[dict]]) -> dict:
    n_true = n_all = 0
    for split, names, items in zip(NLVR2_SPLITS, pair_names, nlvr2):
        lines, images, instances = [], [], []
        for name, item in zip(names, items):
            for side, (scene, polygons) in enumerate(zip(item["scenes"], item["polygons"])):
                iid = len(images) + 1
                images.append({"id": iid, "file_name": f"{name}-img{side}.png", "width": scene.width,
                               "height": scene.height})
                instances += [_instance(len(instances) + 1, iid, o, poly) for o, poly in zip(scene.objects, polygons)]
            for k, (sentence, label) in enumerate(item["sentences"]):
                lines.append({"identifier": f"{name}-{k}", "sentence": sentence, "label": str(label),
                              "left_url": f"images/{split}/{name}-img0.png",
                              "right_url": f"images/{split}/{name}-img1.png", "writer": "synthetic",
                              "synset": f"synthetic.{item['query']}", "query": item["query"], "validation": {}})
                n_true += label
                n_all += 1
        with atomic_path(out / "nlvr2" / f"{split}.json") as tmp:
            tmp.write_text("".join(json.dumps(x) + "\n" for x in lines), encoding="utf-8")
        write_json(out / "nlvr2" / "annotations" / f"instances_{split}.json", _instances_file(images, instances))
    return {"nlvr2_pairs": {s: len(n) for s, n in zip(NLVR2_SPLITS, pair_names)}, "nlvr2_statements": n_all,
            "nlvr2_true": n_true}


# ---------------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------------

def add_arguments(parser) -> None:
    parser.add_argument("out", type=Path, help="output folder (new or empty, or a world made with the same arguments)")
    parser.add_argument("--images", type=int, default=1000,
                        help="captioned/VQA/detection images, split 70/15/15 into train/val/test (default 1000)")
    parser.add_argument("--seed", type=int, default=0, help="random seed; the same seed gives identical files")
    parser.add_argument("--unlabeled", type=int, default=0, help="extra unlabeled JPEGs in OUT/unlabeled (default 0)")
    parser.add_argument("--nlvr2-pairs", type=int, default=None,
                        help="NLVR2 image pairs, split 70/15/15 (default max(4, images/4))")
    parser.add_argument("--nlvr2-statements", type=int, default=2,
                        help="statements per NLVR2 pair, half of them true (even, default 2)")
    parser.add_argument("--questions-per-image", type=int, default=None,
                        help="VQA questions per image (fewer where a scene supports fewer distinct ones; "
                             "default 4-6, as VQA v2)")
    parser.add_argument("--workers", type=int, default=2, help="worker processes (default 2)")


def run(args) -> int:
    s = generate_world(args.out, args.images, args.seed, args.unlabeled, args.nlvr2_pairs, args.workers,
                       args.questions_per_image, args.nlvr2_statements)
    print(f"synthetic world in {s['out']} (seed {s['seed']}, {s['seconds']:.1f} s)")
    print("  images: " + ", ".join(f"{k} {v}" for k, v in s["images"].items()) + f"; unlabeled {s['unlabeled']}")
    print(f"  {len(CLASSES)} classes: {', '.join(CLASSES)}")
    for group, names in ATTRIBUTE_GROUPS.items():
        print(f"  {group}: {', '.join(names)}")
    print(f"  objects {s['objects']}, captions {s['captions']}, questions {s['questions']}")
    print("  questions by type: " + ", ".join(f"{k!r} {v}" for k, v in s["questions_by_type"].items()))
    print("  NLVR2 pairs: " + ", ".join(f"{k} {v}" for k, v in s["nlvr2_pairs"].items())
          + f"; statements {s['nlvr2_statements']} ({s['nlvr2_true']} true)")
    return 0
