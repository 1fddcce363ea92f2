"""A second, independent renderer of the synthetic world, used only for evaluation.

Why it exists: the detector (TEE) is trained on images drawn by `minivlm.data.synthetic`, so a good score on
that generator's own test split may only mean the detector learnt its drawing style (its polygons, flat
fills, palette and backgrounds). This module draws the same world (the same 12 classes, 9 colours,
3 sizes, 5 textures, the same captions and questions) with its own geometry and in another style, so a
score here measures how far the detector generalises beyond the generator. Nothing trains on it.

What differs from the generator (no drawing code is shared):
- shapes built here: rounded squares, hearts from two discs and a wedge, jittered star, cross, arrow,
  crescent and diamond proportions, flat- or pointy-topped hexagons; supersampled 4x and box-filtered;
- outlines on about half the objects: a dark or light border 2.5-7% of the object wide;
- palette: each colour name is a box in HSV (hue range, saturation, value) sampled per object; the hue
  ranges leave gaps so no jittered colour crosses into another name (the hue is the label);
- textures as anti-aliased analytic patterns at their own angles (not tied to the object's rotation),
  periods, duty cycles, dot sizes and grids;
- backgrounds: flat, vignette, soft two-tone split, photo-like multi-scale noise, faint wavy stripes;
- every fourth image drawn at 96-160 px on its shorter side and upscaled (a blurry low-resolution photo);
- object counts stratified by image: a single object, 2-4, or 5-10.
Kept on purpose: an object's extent (the larger side of its unrotated box) as a fraction of the image's
shorter side follows `synthetic.SIZE_RANGES`, so "small/medium/large" keep their meaning; and the text is
made by `synthetic_text` from this renderer's own scene objects (boxes measured from the drawn pixels),
so the questions come from the same language and stay true for these images.

`make_render2_world(OUT, images, seed)` writes one split, "test", in the layout `World` reads:

    OUT/world.json                                     renderer, version, parameters, counts
    OUT/test/COCO_test_{id:012d}.jpg
    OUT/annotations/instances_test.json                COCO instances + the attribute extension; images carry
                                                       a "style" record, annotations an "outline" width
    OUT/annotations/captions_test.json, OUT/annotations/dataset_coco.json
    OUT/vqa/v2_OpenEnded_mscoco_test_questions.json, OUT/vqa/v2_mscoco_test_annotations.json

Each image has its own random streams, so the same arguments give byte-identical files.
"""

from __future__ import annotations

import colorsys
import math
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw
from pycocotools import mask as mask_utils
from tqdm import tqdm

from minivlm.data.synthetic import SIZE_RANGES  # the size words' meaning, shared on purpose
from minivlm.data.synthetic_text import (ATTRIBUTE_GROUPS, ATTRIBUTES, BACKGROUNDS, CLASSES, COLOURS, SIZES,
                                         TEXTURES, Scene, SceneObject, captions, human_answers, questions, tokenize)
from minivlm.errors import MiniVLMError
from minivlm.io import atomic_path, read_json, write_json

RENDERER = "minivlm.data.render2"
RENDER2_VERSION = 1
SPLIT = "test"
SS = 4  # supersampling factor of every shape mask
CAPTIONS_PER_IMAGE = 5
QUESTIONS_PER_IMAGE = (4, 6)  # as the main world (VQA v2 has about 5.4)
MIN_VISIBLE = 0.8  # as the generator: an object keeps this fraction of its pixels, so counts stay fair
_SALT = 2002  # keeps these random streams apart from the generator's SeedSequence([seed, stream, index])

# name: (hue range in degrees, saturation range, value range). Neighbouring hue ranges stay on their side
# of the midpoint between the main palette's hues (red 358, orange 31, yellow 54, green 129, blue 226,
# purple 282, pink 326), so the name is never in doubt; white and black are told by saturation and value.
PALETTE: dict[str, tuple[tuple[float, float], tuple[float, float], tuple[float, float]]] = {
    "red": ((-8, 6), (0.72, 0.95), (0.70, 0.95)),
    "orange": ((23, 34), (0.80, 0.97), (0.88, 1.0)),
    "yellow": ((50, 60), (0.70, 0.92), (0.90, 1.0)),
    "green": ((108, 148), (0.55, 0.85), (0.50, 0.80)),
    "blue": ((212, 232), (0.65, 0.90), (0.72, 0.95)),
    "purple": ((272, 292), (0.50, 0.78), (0.52, 0.80)),
    "pink": ((318, 334), (0.35, 0.55), (0.92, 1.0)),
    "white": ((0, 360), (0.0, 0.05), (0.93, 1.0)),
    "black": ((0, 360), (0.0, 0.25), (0.04, 0.15)),
}
# This renderer's background styles and the caption word that stays true for each.
BACKGROUND_KINDS: dict[str, str] = {"flat": "plain", "vignette": "gradient", "two-tone": "gradient",
                                    "photo": "noisy", "wavy-stripes": "striped"}
# Limits chosen here for the same reason as the generator's: a square turned 45 degrees is a diamond.
_MAX_TURN = {"circle": 0, "square": 8, "triangle": 12, "star": 30, "hexagon": 25, "heart": 15, "cross": 8,
             "ring": 0, "arrow": 180, "crescent": 180, "diamond": 8, "pentagon": 30}
_COUNTS = ((1, 1), (2, 4), (5, 10))  # object-count strata, cycled by image index
_SIZE_P = {1: (0.3, 0.4, 0.3), 4: (0.4, 0.38, 0.22), 10: (0.55, 0.33, 0.12)}  # many objects: mostly small


def _rng(*key: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([_SALT, *key]))


# ---------------------------------------------------------------------------------------------------
# Shapes: lists of (polygon, fill) in unit coordinates (y down); fill 0 cuts a hole. Each shape is
# scaled so the larger side of its box is 2, i.e. its extent.
# ---------------------------------------------------------------------------------------------------

def _ngon(n: int, phase: float, r: float = 1.0, cx: float = 0.0, cy: float = 0.0) -> np.ndarray:
    t = phase + np.linspace(0, 2 * math.pi, n, endpoint=False)
    return np.stack([cx + r * np.cos(t), cy + r * np.sin(t)], 1)


def _disc(r: float = 1.0, cx: float = 0.0, cy: float = 0.0) -> np.ndarray:
    return _ngon(96, 0.0, r, cx, cy)


def _rounded_square(corner: float) -> np.ndarray:
    pts = []
    for k, (sx, sy) in enumerate(((1, 1), (-1, 1), (-1, -1), (1, -1))):  # one quarter arc per corner
        t = np.linspace(k * math.pi / 2, (k + 1) * math.pi / 2, 10)
        pts.append(np.stack([sx * (1 - corner) + corner * np.cos(t), sy * (1 - corner) + corner * np.sin(t)], 1))
    return np.concatenate(pts)


def _heart() -> list[tuple[np.ndarray, int]]:
    """Two discs and the wedge of their outer tangents down to the tip."""
    r, cy, tip = 0.5, -0.35, np.array([0.0, 1.0])
    ops = [(_disc(r, -0.5, cy), 255), (_disc(r, 0.5, cy), 255)]
    wedge = []
    for cx in (-0.5, 0.5):
        c = np.array([cx, cy])
        d = tip - c
        phi, alpha = math.atan2(d[1], d[0]), math.acos(r / np.hypot(*d))
        # of the two tangent points, the one farther from the middle gives the heart's outer flank
        t = max((c + r * np.array([math.cos(phi + s * alpha), math.sin(phi + s * alpha)]) for s in (-1, 1)),
                key=lambda p: abs(p[0]))
        wedge += [c, t]
    ops.append((np.array([wedge[0], wedge[1], tip, wedge[3], wedge[2]]), 255))
    return ops


def _shape(cls: str, rng: np.random.Generator) -> list[tuple[np.ndarray, int]]:
    if cls == "circle":
        ops = [(_disc(), 255)]
    elif cls == "square":
        ops = [(_rounded_square(rng.uniform(0.0, 0.25)), 255)]
    elif cls == "triangle":
        ops = [(np.array([(0, -1), (1, 0.73), (-1, 0.73)]), 255)]
    elif cls == "star":
        inner = rng.uniform(0.38, 0.5)
        ops = [(_ngon(10, -math.pi / 2) * np.where(np.arange(10) % 2, inner, 1.0)[:, None], 255)]
    elif cls == "hexagon":
        ops = [(_ngon(6, 0.0 if rng.random() < 0.5 else math.pi / 6), 255)]
    elif cls == "pentagon":
        ops = [(_ngon(5, -math.pi / 2), 255)]
    elif cls == "heart":
        ops = _heart()
    elif cls == "cross":
        w = rng.uniform(0.26, 0.36)
        ops = [(np.array([(-w, -1), (w, -1), (w, 1), (-w, 1)]), 255),
               (np.array([(-1, -w), (1, -w), (1, w), (-1, w)]), 255)]
    elif cls == "ring":
        ops = [(_disc(), 255), (_disc(rng.uniform(0.5, 0.62)), 0)]
    elif cls == "arrow":
        shaft, head, neck = rng.uniform(0.18, 0.26), rng.uniform(0.5, 0.62), rng.uniform(0.05, 0.25)
        ops = [(np.array([(-1, -shaft), (neck + 0.02, -shaft), (neck + 0.02, shaft), (-1, shaft)]), 255),
               (np.array([(neck, -head), (1, 0), (neck, head)]), 255)]
    elif cls == "crescent":
        d, r2 = rng.uniform(0.35, 0.55), rng.uniform(0.8, 0.9)  # the cut disc pokes out past the right edge
        ops = [(_disc(), 255), (_disc(r2, d, 0.0), 0)]
    elif cls == "diamond":
        a = rng.uniform(0.55, 0.68)
        ops = [(np.array([(0, -1), (a, 0), (0, 1), (-a, 0)]), 255)]
    else:
        raise ValueError(cls)
    # Centre the filled parts' box on the origin, larger half-side 1 (a hole never widens the box; the
    # crescent's cut disc leaves its top and bottom points, so its height stays 2).
    filled = np.concatenate([p for p, f in ops if f])
    lo, hi = filled.min(0), filled.max(0)
    return [((p - (lo + hi) / 2) * (2 / (hi - lo).max()), f) for p, f in ops]


# ---------------------------------------------------------------------------------------------------
# Pixels
# ---------------------------------------------------------------------------------------------------

def _sample_colour(colour: str, rng: np.random.Generator) -> np.ndarray:
    (h0, h1), (s0, s1), (v0, v1) = PALETTE[colour]
    return np.array(colorsys.hsv_to_rgb(rng.uniform(h0, h1) % 360 / 360, rng.uniform(s0, s1), rng.uniform(v0, v1)),
                    np.float32) * 255


def _mask(ops: list[tuple[np.ndarray, int]], x0: int, y0: int, w: int, h: int) -> np.ndarray:
    """The shape over pixels [x0, x0+w) x [y0, y0+h) at SS x resolution (bool)."""
    canvas = Image.new("L", (w * SS, h * SS), 0)
    draw = ImageDraw.Draw(canvas)
    for pts, fill in ops:
        draw.polygon([tuple(p) for p in ((pts - (x0, y0)) * SS).tolist()], fill=fill)
    return np.asarray(canvas) > 0


def _down(big: np.ndarray) -> np.ndarray:
    """Box-filter an SS x mask to pixel coverage (0..1): the anti-aliasing."""
    h, w = big.shape[0] // SS, big.shape[1] // SS
    return big.reshape(h, SS, w, SS).mean((1, 3), dtype=np.float32)


def _erode(mask: np.ndarray, r: int) -> np.ndarray:
    """Square erosion by r pixels: a running window sum along each axis must see only the mask."""
    out = mask
    for axis in (0, 1):
        m = np.moveaxis(out, axis, 0).astype(np.int32)
        c = np.cumsum(np.pad(m, [(r + 1, r)] + [(0, 0)] * (m.ndim - 1)), 0)
        out = np.moveaxis(c[2 * r + 1:] - c[:-(2 * r + 1)] == 2 * r + 1, 0, axis)
    return out


def _band(u: np.ndarray, period: float, duty: float) -> np.ndarray:
    """Signed distance (pixels, positive inside) to the edges of stripes [0, duty*period) repeating."""
    t = u % period
    on = duty * period
    return np.where(t < on, np.minimum(t, on - t), -np.minimum(t - on, period - t))


def _texture(texture: str, rng: np.random.Generator, xx: np.ndarray, yy: np.ndarray, extent: float
             ) -> np.ndarray | None:
    """Coverage (0..1) of the second shade; signed distance + 0.5 gives one pixel of anti-aliasing."""
    if texture == "solid":
        return None
    a = rng.uniform(0, math.pi)
    u, v = xx * math.cos(a) + yy * math.sin(a), -xx * math.sin(a) + yy * math.cos(a)
    if texture == "striped":
        sd = _band(u, max(4.0, extent * rng.uniform(0.13, 0.24)), rng.uniform(0.35, 0.55))
    elif texture == "dotted":
        p = max(5.0, extent * rng.uniform(0.16, 0.26))
        radius = p * rng.uniform(0.2, 0.34)
        if rng.random() < 0.5:  # staggered rows, a hexagonal grid
            u = u + (np.floor(v / p) % 2) * p / 2
        sd = radius - np.hypot(u % p - p / 2, v % p - p / 2)
    elif texture == "checkered":
        c = max(3.0, extent * rng.uniform(0.12, 0.2))
        fu, fv = u % c, v % c
        edge = np.minimum(np.minimum(fu, c - fu), np.minimum(fv, c - fv))
        sd = np.where((np.floor(u / c) + np.floor(v / c)) % 2 == 1, edge, -edge)
    elif texture == "crosshatched":
        p, duty = max(4.0, extent * rng.uniform(0.14, 0.22)), rng.uniform(0.15, 0.28)
        b = math.radians(rng.uniform(60, 90))  # the second family's angle to the first
        u2 = xx * math.cos(a + b) + yy * math.sin(a + b)
        sd = np.maximum(_band(u, p, duty), _band(u2, p, duty))
    else:
        raise ValueError(texture)
    return np.clip(sd + 0.5, 0, 1).astype(np.float32)


def _second_shade(rgb: np.ndarray, colour: str, rng: np.random.Generator) -> np.ndarray:
    # Mixing with white or black keeps the hue, so a textured object's name does not change.
    lighter = colour == "black" or (colour != "white" and rng.random() < 0.5)
    return rgb + (255 - rgb) * rng.uniform(0.45, 0.6) if lighter else rgb * rng.uniform(0.35, 0.55)


def _border_colour(colour: str, rgb: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    dark = colour == "white" or (colour != "black" and rng.random() < 0.6)
    if dark:  # near black, sometimes tinted with the object's own hue
        return rgb * rng.uniform(0.1, 0.25) if rng.random() < 0.5 else np.full(3, rng.uniform(10, 40), np.float32)
    return np.full(3, rng.uniform(220, 250), np.float32)


def _low_sat(rng: np.random.Generator) -> np.ndarray:
    """A background tone: low saturation, middle value, so white, black and every hue stand out."""
    return np.array(colorsys.hsv_to_rgb(rng.random(), rng.uniform(0.0, 0.25), rng.uniform(0.32, 0.66)),
                    np.float32) * 255


def _smooth_noise(rng: np.random.Generator, w: int, h: int, cells: int) -> np.ndarray:
    grid = rng.normal(0, 1, (cells, max(2, round(cells * w / h)))).astype(np.float32)
    return np.asarray(Image.fromarray(grid).resize((w, h), Image.BICUBIC))


def _background(kind: str, rng: np.random.Generator, w: int, h: int) -> np.ndarray:
    base = _low_sat(rng)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    img = np.broadcast_to(base, (h, w, 3)).astype(np.float32)
    if kind == "vignette":  # brighter off-centre spot falling to darker corners, like a lit photo
        cx, cy = w * rng.uniform(0.3, 0.7), h * rng.uniform(0.3, 0.7)
        r = np.hypot((xx - cx) / w, (yy - cy) / h) / 0.75
        img = img * (1 - rng.uniform(0.25, 0.4) * np.clip(r, 0, 1) ** 1.5)[..., None] + rng.uniform(0, 20)
    elif kind == "two-tone":  # two tones split by a random line with a soft edge
        other = _low_sat(rng)
        a = rng.uniform(0, 2 * math.pi)
        t = (xx - w * rng.uniform(0.3, 0.7)) * math.cos(a) + (yy - h * rng.uniform(0.3, 0.7)) * math.sin(a)
        mix = 1 / (1 + np.exp(-t / (min(w, h) * rng.uniform(0.02, 0.12))))
        img = base + (other - base) * mix[..., None]
    elif kind == "photo":  # several octaves of smooth noise, with a little colour of their own
        lum = sum(_smooth_noise(rng, w, h, c) / k for k, c in enumerate((3, 7, 16, 40), 1))
        tint = np.stack([_smooth_noise(rng, w, h, 5) for _ in range(3)], -1)
        img = img + lum[..., None] * rng.uniform(14, 24) + tint * 6
    elif kind == "wavy-stripes":
        a, period = rng.uniform(0, math.pi), rng.uniform(10, 30)
        along = -xx * math.sin(a) + yy * math.cos(a)
        u = xx * math.cos(a) + yy * math.sin(a) + 6 * np.sin(along / rng.uniform(15, 40))
        img = img + (np.sin(2 * math.pi * u / period) * rng.uniform(6, 12))[..., None]
    # Grain, as a camera sensor adds (flat backgrounds get it too).
    return img + rng.normal(0, rng.uniform(2, 5), (h, w, 1)).astype(np.float32)


@dataclass
class Rendered:
    image: Image.Image
    scene: Scene  # boxes and areas at the image's final resolution
    masks: list[np.ndarray]  # each object's full shape (bool, image size), occluded parts included
    owner: np.ndarray  # which object each pixel shows (-1: background), image size
    outlines: list[float]  # each object's border width in final pixels (0: none)
    style: dict


def render_scene(rng: np.random.Generator, n_objects: tuple[int, int] = (1, 10), low_res: bool = False,
                 background: str | None = None) -> Rendered:
    """One scene of 1-10 objects (`n_objects` range) on `background` (a BACKGROUND_KINDS key, random when
    None); `low_res` draws it at 96-160 px on the shorter side and upscales it."""
    short = int(rng.integers(200, 481))
    long = min(640, round(short * rng.uniform(1.0, 1.5)))
    W, H = (short, long) if rng.random() < 0.4 else (long, short)
    r_short = int(rng.integers(96, 161)) if low_res else short
    w, h = round(W * r_short / short), round(H * r_short / short)  # the drawing's size
    kind = background or list(BACKGROUND_KINDS)[int(rng.integers(len(BACKGROUND_KINDS)))]
    img = _background(kind, rng, w, h)
    owner = np.full((h, w), -1, np.int16)
    objects: list[tuple[SceneObject, np.ndarray, float]] = []  # + coverage over the whole drawing, border px
    full: list[int] = []
    visible: list[int] = []
    lo_n, hi_n = n_objects
    n = int(rng.integers(lo_n, hi_n + 1))
    size_p = _SIZE_P[min(k for k in _SIZE_P if k >= n)]
    for _ in range(n):
        cls, colour = CLASSES[int(rng.integers(len(CLASSES)))], COLOURS[int(rng.integers(len(COLOURS)))]
        size = SIZES[int(rng.choice(len(SIZES), p=size_p))]
        texture = TEXTURES[int(rng.integers(len(TEXTURES)))]
        extent = rng.uniform(*SIZE_RANGES[size]) * r_short
        ops = _shape(cls, rng)
        for _attempt in range(30):
            turn = math.radians(rng.uniform(-1, 1) * _MAX_TURN[cls])
            rot = np.array([[math.cos(turn), -math.sin(turn)], [math.sin(turn), math.cos(turn)]])
            placed = [((p * extent / 2) @ rot.T, f) for p, f in ops]
            pts = np.concatenate([p for p, f in placed if f])
            lo, hi = pts.min(0), pts.max(0)
            if hi[0] - lo[0] > w - 4 or hi[1] - lo[1] > h - 4:
                break
            centre = np.array([rng.uniform(2 - lo[0], w - 2 - hi[0]), rng.uniform(2 - lo[1], h - 2 - hi[1])])
            placed = [(p + centre, f) for p, f in placed]
            x0, y0 = (int(math.floor(c)) - 1 for c in lo + centre)
            x1, y1 = (int(math.ceil(c)) + 1 for c in hi + centre)
            x0, y0, x1, y1 = max(0, x0), max(0, y0), min(w, x1), min(h, y1)
            big = _mask(placed, x0, y0, x1 - x0, y1 - y0)
            alpha = _down(big)
            mask = alpha >= 0.5
            under = owner[y0:y1, x0:x1][mask]
            covered = np.bincount(under[under >= 0], minlength=len(full))
            # Same-coloured shapes must not touch (they would read as one blob); none may lose too much.
            if any(vis - c < MIN_VISIBLE * f or (c and o.colour == colour)
                   for vis, c, f, (o, _, _) in zip(visible, covered, full, objects)):
                continue
            rgb = _sample_colour(colour, rng)
            yy, xx = np.mgrid[y0:y1, x0:x1].astype(np.float32) + 0.5
            pattern = _texture(texture, rng, xx - centre[0], yy - centre[1], extent)
            paint = np.broadcast_to(rgb, alpha.shape + (3,))
            if pattern is not None:
                paint = paint + (_second_shade(rgb, colour, rng) - rgb) * pattern[..., None]
            border_px = 0.0
            if rng.random() < 0.5:
                # In supersampled pixels, so small shapes get thin (anti-aliased, sub-pixel) borders.
                border_ss = max(2, round(extent * rng.uniform(0.025, 0.07) * SS))
                border_px = border_ss / SS
                # The border is the rim the shape loses when eroded: inside the shape, so the box stays.
                share = (_down(big & ~_erode(big, border_ss)) / np.maximum(alpha, 1e-6))[..., None]
                paint = paint * (1 - share) + _border_colour(colour, rgb, rng) * share
            a = alpha[..., None]
            img[y0:y1, x0:x1] = img[y0:y1, x0:x1] * (1 - a) + paint * a
            visible = [vis - int(c) for vis, c in zip(visible, covered)] + [int(mask.sum())]
            full.append(int(mask.sum()))
            owner[y0:y1, x0:x1][mask] = len(full) - 1
            # The box is measured from the drawn (supersampled) pixels, not from the geometry.
            rows, cols = np.flatnonzero(big.any(1)), np.flatnonzero(big.any(0))
            box = (x0 + cols[0] / SS, y0 + rows[0] / SS, (cols[-1] + 1 - cols[0]) / SS, (rows[-1] + 1 - rows[0]) / SS)
            full_alpha = np.zeros((h, w), np.float32)
            full_alpha[y0:y1, x0:x1] = alpha
            objects.append((SceneObject(cls, colour, size, texture, box), full_alpha, border_px))
            break

    image = Image.fromarray(np.clip(img + 0.5, 0, 255).astype(np.uint8))
    fx, fy = W / w, H / h
    if low_res:
        image = image.resize((W, H), Image.BICUBIC)
        owner = np.asarray(Image.fromarray(owner.astype(np.int32)).resize((W, H), Image.NEAREST)).astype(np.int16)
    scene = Scene(W, H, BACKGROUND_KINDS[kind], [])
    masks = []
    for o, full_alpha, _ in objects:
        if low_res:
            full_alpha = np.asarray(Image.fromarray(full_alpha).resize((W, H), Image.BILINEAR))
        masks.append(full_alpha >= 0.5)
        x, y, bw, bh = o.box
        o.box = (round(float(x * fx), 2), round(float(y * fy), 2), round(float(bw * fx), 2), round(float(bh * fy), 2))
        o.area = float(masks[-1].sum())
        scene.objects.append(o)
    outlines = [round(float(b * fx), 2) for _, _, b in objects]
    style = {"background": kind, "low_res": low_res, "drawn_size": [w, h], "objects": len(objects),
             "outlined": sum(b > 0 for b in outlines)}
    return Rendered(image, scene, masks, owner, outlines, style)


# ---------------------------------------------------------------------------------------------------
# The world
# ---------------------------------------------------------------------------------------------------

def render_image(seed: int, index: int) -> Rendered:
    """Image `index` of the world with `seed`. Styles are stratified by index, so even a dozen images
    cover every object-count stratum, background kind and the low-resolution path."""
    kinds = list(BACKGROUND_KINDS)
    return render_scene(_rng(seed, index, 0), _COUNTS[index % 3], low_res=index % 4 == 2,
                        background=kinds[index % len(kinds)])


def _attribute_categories() -> list[dict]:
    # Same ids, names and groups as the main world (id = index in ATTRIBUTES + 1), so the detector's
    # attribute vocabulary lines up.
    return [{"id": ATTRIBUTES.index(a) + 1, "name": a, "group": g}
            for g, names in ATTRIBUTE_GROUPS.items() for a in names]


def _check_out(out: Path, params: dict) -> None:
    if out.exists() and not out.is_dir():
        raise MiniVLMError(f"{out}: exists and is not a folder")
    if out.is_dir() and any(out.iterdir()):
        meta = out / "world.json"
        old = read_json(meta).get("params") if meta.is_file() else None
        if old != params:
            raise MiniVLMError(f"{out}: folder is not empty and holds no render2 world with params {params}; "
                               "choose a new or empty folder")


def make_render2_world(out: str | Path, images: int, seed: int, questions_per_image: int | None = None) -> dict:
    """Write the evaluation world (module docstring) into `out`; returns its summary.

    `questions_per_image` None draws 4-6 per image as the main world and VQA v2; a number asks that many
    (fewer where a scene supports fewer distinct questions)."""
    out = Path(out)
    if images < 1:
        raise MiniVLMError(f"images must be at least 1 (got {images})")
    if questions_per_image is not None and questions_per_image < 1:
        raise MiniVLMError(f"questions_per_image must be at least 1 (got {questions_per_image})")
    params = {"images": images, "seed": seed, "questions_per_image": questions_per_image or list(QUESTIONS_PER_IMAGE),
              "version": RENDER2_VERSION}
    _check_out(out, params)
    meta = {"generator": RENDERER, "renderer": "render2", "version": RENDER2_VERSION, "seed": seed,
            "params": params, "splits": {SPLIT: images}, "classes": CLASSES, "attributes": ATTRIBUTE_GROUPS,
            "attribute_names": ATTRIBUTES, "backgrounds": BACKGROUNDS, "background_kinds": BACKGROUND_KINDS,
            "captions_per_image": CAPTIONS_PER_IMAGE, "image_size_range": [200, 640], "low_res_range": [96, 160],
            "complete": False}
    write_json(out / "world.json", meta, indent=1)

    info = {"description": "minivlm render2 evaluation world", "version": str(RENDER2_VERSION), "contributor": RENDERER}
    categories = [{"id": i + 1, "name": c, "supercategory": "shape"} for i, c in enumerate(CLASSES)]
    records, instances, caps, karpathy, vqa_q, vqa_a = [], [], [], [], [], []
    styles, qtypes = Counter(), Counter()
    for index in tqdm(range(images), desc="render2", unit="img", leave=False):
        iid = index + 1
        r = render_image(seed, index)
        name = f"COCO_{SPLIT}_{iid:012d}.jpg"
        with atomic_path(out / SPLIT / name) as tmp:
            r.image.save(tmp, format="JPEG", quality=int(_rng(seed, index, 2).integers(72, 96)))
        scene = r.scene
        records.append({"id": iid, "file_name": name, "width": scene.width, "height": scene.height, "style": r.style})
        styles.update({r.style["background"]: 1, "low_res": int(r.style["low_res"]), "outlined": r.style["outlined"]})
        for o, m, border in zip(scene.objects, r.masks, r.outlines):
            rle = mask_utils.encode(np.asfortranarray(m.astype(np.uint8)))
            instances.append({"id": len(instances) + 1, "image_id": iid, "category_id": CLASSES.index(o.cls) + 1,
                              "bbox": list(o.box), "area": o.area, "iscrowd": 0,
                              "segmentation": {"size": rle["size"], "counts": rle["counts"].decode("ascii")},
                              "attribute_ids": [ATTRIBUTES.index(a) + 1 for a in (o.colour, o.size, o.texture)],
                              "outline": border})
        text_rng = _rng(seed, index, 1)  # its own stream: the language can change without touching images
        sentences = []
        for text in captions(scene, text_rng, CAPTIONS_PER_IMAGE):
            caps.append({"id": len(caps) + 1, "image_id": iid, "caption": text})
            sentences.append({"raw": text, "tokens": tokenize(text), "imgid": index, "sentid": len(caps)})
        karpathy.append({"filepath": SPLIT, "filename": name, "imgid": index, "cocoid": iid, "split": SPLIT,
                         "sentids": [s["sentid"] for s in sentences], "sentences": sentences})
        n_q = questions_per_image or int(text_rng.integers(QUESTIONS_PER_IMAGE[0], QUESTIONS_PER_IMAGE[1] + 1))
        for k, q in enumerate(questions(scene, text_rng, n_q)):
            qid = iid * 1000 + k  # VQA's convention, as the main world
            vqa_q.append({"image_id": iid, "question": q.question[0].upper() + q.question[1:], "question_id": qid})
            vqa_a.append({"question_id": qid, "image_id": iid, "question_type": q.question_type,
                          "answer_type": q.answer_type, "multiple_choice_answer": q.answer,
                          "answers": human_answers(q, text_rng)})
            qtypes[q.question_type] += 1

    write_json(out / "annotations" / f"instances_{SPLIT}.json",
               {"info": info, "licenses": [], "images": records, "annotations": instances, "categories": categories,
                "attribute_categories": _attribute_categories()})
    write_json(out / "annotations" / f"captions_{SPLIT}.json",
               {"info": info, "licenses": [], "images": records, "annotations": caps})
    write_json(out / "annotations" / "dataset_coco.json", {"dataset": "coco", "images": karpathy})
    header = {"info": info, "license": {}, "data_type": "mscoco", "data_subtype": SPLIT}
    write_json(out / "vqa" / f"v2_OpenEnded_mscoco_{SPLIT}_questions.json",
               {**header, "task_type": "Open-Ended", "questions": vqa_q})
    write_json(out / "vqa" / f"v2_mscoco_{SPLIT}_annotations.json", {**header, "annotations": vqa_a})
    counts = {"images": images, "objects": len(instances), "captions": len(caps), "questions": len(vqa_q),
              "questions_by_type": dict(sorted(qtypes.items())), "styles": dict(sorted(styles.items()))}
    meta.update(complete=True, counts=counts)
    write_json(out / "world.json", meta, indent=1)
    return {"out": str(out), "seed": seed, **counts}
