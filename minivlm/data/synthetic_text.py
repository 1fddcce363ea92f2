"""The synthetic world's vocabulary and its language: captions, VQA questions with human-style answers,
and NLVR2 statements about image pairs.

Every sentence is built from a structured claim and its truth is *computed* from the scene (never
assumed from how the sentence was built), so captions are true, answers are correct, and a question is
only asked when its referent is unique.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass

import numpy as np

CLASSES: list[str] = ["circle", "square", "triangle", "star", "hexagon", "heart", "cross", "ring", "arrow",
                      "crescent", "diamond", "pentagon"]
COLOURS: list[str] = ["red", "orange", "yellow", "green", "blue", "purple", "pink", "white", "black"]
SIZES: list[str] = ["small", "medium", "large"]
TEXTURES: list[str] = ["solid", "striped", "dotted", "checkered", "crosshatched"]
ATTRIBUTE_GROUPS: dict[str, list[str]] = {"colour": COLOURS, "size": SIZES, "texture": TEXTURES}
ATTRIBUTES: list[str] = COLOURS + SIZES + TEXTURES  # attribute id = index + 1
BACKGROUNDS: list[str] = ["plain", "gradient", "noisy", "striped"]

# (singular, plural); the first pair is the canonical name.
NOUNS: dict[str, list[tuple[str, str]]] = {
    "circle": [("circle", "circles"), ("round shape", "round shapes"), ("disc", "discs")],
    "square": [("square", "squares"), ("box", "boxes")],
    "triangle": [("triangle", "triangles")],
    "star": [("star", "stars"), ("five-pointed star", "five-pointed stars")],
    "hexagon": [("hexagon", "hexagons"), ("six-sided shape", "six-sided shapes")],
    "heart": [("heart", "hearts"), ("heart shape", "heart shapes")],
    "cross": [("cross", "crosses"), ("plus sign", "plus signs")],
    "ring": [("ring", "rings"), ("donut", "donuts"), ("hoop", "hoops")],
    "arrow": [("arrow", "arrows")],
    "crescent": [("crescent", "crescents"), ("crescent moon", "crescent moons")],
    "diamond": [("diamond", "diamonds"), ("rhombus", "rhombuses")],
    "pentagon": [("pentagon", "pentagons"), ("five-sided shape", "five-sided shapes")],
}
TEXTURE_ADJ: dict[str, list[str]] = {"solid": ["solid", "plain"], "striped": ["striped"],
                                     "dotted": ["dotted", "polka-dot"], "checkered": ["checkered"],
                                     "crosshatched": ["crosshatched"]}
BACKGROUND_PHRASES: dict[str, list[str]] = {
    "plain": ["a plain background", "a plain grey background", "a flat background"],
    "gradient": ["a gradient background", "a shaded background"],
    "noisy": ["a noisy background", "a textured background", "a speckled background"],
    "striped": ["a striped background", "a faintly striped background"],
}
# What an annotator might write instead of the canonical answer.
ANSWER_SYNONYMS: dict[str, list[str]] = {
    "purple": ["violet"], "pink": ["magenta"], "circle": ["round", "disc"], "square": ["box"],
    "cross": ["plus", "plus sign"], "ring": ["donut"], "crescent": ["moon"], "diamond": ["rhombus"],
    "star": ["stars"], "heart": ["hearts"], "small": ["tiny"], "large": ["big"], "medium": ["medium sized"],
    "striped": ["stripes", "stripy"], "dotted": ["polka dots", "spotted"], "checkered": ["checkerboard"],
    "crosshatched": ["hatched"], "solid": ["plain"], "yes": ["yeah"],
    **{str(n): [w] for n, w in enumerate(["zero", "one", "two", "three", "four", "five", "six", "seven",
                                           "eight", "nine"])},
}
NUMBER_WORDS = ["no", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten"]
RELATIONS = ["left of", "right of", "above", "below"]
_REL_PHRASES = {"left of": ["to the left of", "left of"], "right of": ["to the right of", "right of"],
                "above": ["above", "over"], "below": ["below", "under", "beneath"],
                "next to": ["next to", "beside"]}
_OPPOSITE = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}


@dataclass
class SceneObject:
    cls: str
    colour: str
    size: str
    texture: str
    box: tuple[float, float, float, float]  # x, y, w, h in pixels
    area: float = 0.0


@dataclass
class Scene:
    width: int
    height: int
    background: str
    objects: list[SceneObject]


# ---------------------------------------------------------------------------------------------------
# Geometry: relations hold only when they are clear (boxes fully separated along that axis)
# ---------------------------------------------------------------------------------------------------

def relation_holds(a: SceneObject, b: SceneObject, rel: str, scene: Scene) -> bool:
    ax, ay, aw, ah = a.box
    bx, by, bw, bh = b.box
    if rel == "left of":
        return ax + aw <= bx
    if rel == "right of":
        return bx + bw <= ax
    if rel == "above":
        return ay + ah <= by
    if rel == "below":
        return by + bh <= ay
    if rel == "next to":  # close, side by side or one over the other, not overlapping
        hgap = max(bx - (ax + aw), ax - (bx + bw))
        vgap = max(by - (ay + ah), ay - (by + bh))
        near = 0.12 * min(scene.width, scene.height)
        return (0 <= hgap <= near and vgap < 0) or (0 <= vgap <= near and hgap < 0)
    raise ValueError(rel)


def _region_name(o: SceneObject, scene: Scene) -> str | None:
    cx = (o.box[0] + o.box[2] / 2) / scene.width
    cy = (o.box[1] + o.box[3] / 2) / scene.height
    col = 0 if cx < 0.3 else 2 if cx > 0.7 else 1 if 0.37 < cx < 0.63 else None
    row = 0 if cy < 0.3 else 2 if cy > 0.7 else 1 if 0.37 < cy < 0.63 else None
    if col is None or row is None:  # near a border between regions: do not claim one
        return None
    return [["in the top left corner", "at the top", "in the top right corner"],
            ["on the left side", "in the center", "on the right side"],
            ["in the bottom left corner", "at the bottom", "in the bottom right corner"]][row][col]


# ---------------------------------------------------------------------------------------------------
# Phrases
# ---------------------------------------------------------------------------------------------------

def _pick(rng: np.random.Generator, seq):
    return seq[int(rng.integers(len(seq)))]


def noun(cls: str, rng: np.random.Generator, plural: bool = False, canonical_p: float = 0.6) -> str:
    options = NOUNS[cls]
    pair = options[0] if len(options) == 1 or rng.random() < canonical_p else _pick(rng, options[1:])
    return pair[1] if plural else pair[0]


def with_article(phrase: str) -> str:
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


def describe(o: SceneObject, rng: np.random.Generator, size: bool = False, texture: bool = False,
             article: bool = True) -> str:
    """'a large striped red circle' (size and texture on request; a plain texture may go unsaid)."""
    words = [o.size] if size else []
    if texture and (o.texture != "solid" or rng.random() < 0.5):
        words.append(_pick(rng, TEXTURE_ADJ[o.texture]))
    words += [o.colour, noun(o.cls, rng)]
    return with_article(" ".join(words)) if article else " ".join(words)


def count_phrase(n: int, colour: str | None, cls: str | None, rng: np.random.Generator) -> str:
    """'two red circles', 'a blue star', 'three shapes'."""
    plural = n != 1
    head = noun(cls, rng, plural) if cls else ("shapes" if plural else "shape")
    body = f"{colour} {head}" if colour else head
    return with_article(body) if n == 1 else f"{number_word(n)} {body}"


def number_word(n: int) -> str:
    return NUMBER_WORDS[n] if n < len(NUMBER_WORDS) else str(n)


def join_list(items: list[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def tokenize(sentence: str) -> list[str]:
    """Karpathy-style tokens: lower case, punctuation dropped."""
    return re.findall(r"[a-z0-9]+", sentence.lower())


def _sentence(text: str) -> str:
    return text[0].upper() + text[1:] + "."


# ---------------------------------------------------------------------------------------------------
# Captions
# ---------------------------------------------------------------------------------------------------

def _salient(scene: Scene) -> list[SceneObject]:
    return sorted(scene.objects, key=lambda o: -o.area)


def _groups(scene: Scene) -> list[tuple[str, str, int]]:
    """(colour, class, count) ordered by the area of their largest member."""
    counts = Counter((o.colour, o.cls) for o in scene.objects)
    seen: list[tuple[str, str, int]] = []
    for o in _salient(scene):
        key = (o.colour, o.cls)
        if key in counts:
            seen.append((o.colour, o.cls, counts.pop(key)))
    return seen


def _cap_enumerate(scene: Scene, rng) -> str | None:
    groups = _groups(scene)
    parts = [count_phrase(n, c, k, rng) for c, k, n in groups[:3 if len(groups) > 4 else 4]]
    if len(groups) > 4:  # name the salient groups, count the rest
        rest = sum(n for _, _, n in groups[3:])
        parts.append(f"{number_word(rest)} other shape{'s' if rest != 1 else ''}")
    text = join_list(parts)
    if rng.random() < 0.5:
        text += " on " + _pick(rng, BACKGROUND_PHRASES[scene.background])
    return text


def _cap_picture(scene: Scene, rng) -> str | None:
    lead = _pick(rng, ["a picture of", "an image of", "a drawing of", "a photo of"])
    top = _salient(scene)[0]
    n = len(scene.objects)
    if n == 1:
        return f"{lead} {describe(top, rng, size=rng.random() < 0.5, texture=True)}"
    return f"{lead} {number_word(n)} shapes, including {describe(top, rng, size=True)}"


def _cap_relation(scene: Scene, rng) -> str | None:
    objs = _salient(scene)[:4]
    pairs = [(a, b) for a in objs for b in objs if a is not b]
    rng.shuffle(pairs)
    for a, b in pairs:
        rels = [r for r in ("left of", "right of", "above", "below", "next to") if relation_holds(a, b, r, scene)]
        if rels:
            rel = _pick(rng, _REL_PHRASES[_pick(rng, rels)])
            texture = rng.random() < 0.3
            return f"{describe(a, rng, texture=texture)} {rel} {describe(b, rng, texture=texture)}"
    return None


def _cap_there_are(scene: Scene, rng) -> str | None:
    bg = _pick(rng, BACKGROUND_PHRASES[scene.background])
    n = len(scene.objects)
    if n == 1:
        return f"there is a single {scene.objects[0].colour} {noun(scene.objects[0].cls, rng)} on {bg}"
    if rng.random() < 0.5:
        return f"there are {number_word(n)} shapes on {bg}"
    groups = _groups(scene)
    if len(groups) > 4:
        return None
    verb = "is" if groups[0][2] == 1 else "are"
    return f"there {verb} {join_list([count_phrase(n, c, k, rng) for c, k, n in groups])} on {bg}"


def _cap_attributes(scene: Scene, rng) -> str | None:
    objs = _salient(scene)
    if len(objs) == 1:
        return f"a single {describe(objs[0], rng, size=True, texture=True, article=False)}"
    return " and ".join(describe(o, rng, size=True, texture=True) for o in objs[:2])


def _cap_position(scene: Scene, rng) -> str | None:
    for o in _salient(scene)[:2]:
        where = _region_name(o, scene)
        if where:
            frame = _pick(rng, ["image", "picture"])
            return f"{describe(o, rng, texture=rng.random() < 0.3)} {where} of the {frame}"
    return None


def _cap_colours(scene: Scene, rng) -> str | None:
    n = len(scene.objects)
    k = len({o.colour for o in scene.objects})
    if n < 2:
        return None
    if k == 1:
        colour = scene.objects[0].colour
        if len({o.cls for o in scene.objects}) == n:
            return f"{number_word(n)} {colour} shapes of different kinds"
        return f"{number_word(n)} shapes, all of them {colour}"
    colours = sorted({o.colour for o in scene.objects}, key=COLOURS.index)
    if k <= 3:
        return f"{number_word(n)} shapes in {join_list(colours)}"
    return f"{number_word(n)} shapes in {number_word(k)} different colors"


_CAPTIONERS = [_cap_enumerate, _cap_picture, _cap_relation, _cap_there_are, _cap_attributes, _cap_position,
               _cap_colours]


def captions(scene: Scene, rng: np.random.Generator, n: int = 5) -> list[str]:
    """n distinct true captions, each from a different kind of sentence when the scene allows it."""
    out: list[str] = []
    for attempt in range(60):
        if attempt % len(_CAPTIONERS) == 0:
            order = rng.permutation(len(_CAPTIONERS))
        text = _CAPTIONERS[int(order[attempt % len(_CAPTIONERS)])](scene, rng)
        if text and _sentence(text) not in out:
            out.append(_sentence(text))
            if len(out) == n:
                return out
    return out + [out[0]] * (n - len(out))  # a one-object scene may run out of distinct phrasings


# ---------------------------------------------------------------------------------------------------
# VQA questions
# ---------------------------------------------------------------------------------------------------

@dataclass
class Question:
    question: str
    answer: str
    answer_type: str  # "yes/no" | "number" | "other"
    question_type: str  # the VQA-style question prefix
    family: str  # colour | shape | count | exists | spatial | size | texture: drives plausible mistakes


def refer(o: SceneObject, scene: Scene, rng, exclude: str = "") -> str | None:
    """The shortest unique definite description of `o` ('the star', 'the red circle'), not using the
    attribute group named in `exclude`; None when no such description singles it out."""
    others = [p for p in scene.objects if p is not o]
    for group in ("", "colour", "size", "texture"):
        if group and group == exclude:
            continue
        same = [p for p in others if p.cls == o.cls and (not group or getattr(p, group) == getattr(o, group))]
        if not same:
            if not group:
                return f"the {noun(o.cls, rng, canonical_p=0.8)}"
            value = getattr(o, group) if group != "texture" else _pick(rng, TEXTURE_ADJ[o.texture])
            return f"the {value} {noun(o.cls, rng, canonical_p=0.8)}"
    return None


def _q_colour(scene, rng):
    o = _pick(rng, scene.objects)
    ref = refer(o, scene, rng, exclude="colour")
    return ref and Question(f"what color is {ref}?", o.colour, "other", "what color is the", "colour")


def _q_shape(scene, rng):
    o = _pick(rng, scene.objects)
    if sum(p.colour == o.colour for p in scene.objects) == 1:
        thing = _pick(rng, ["object", "thing"])
        return Question(f"what shape is the {o.colour} {thing}?", o.cls, "other", "what shape is the", "shape")
    if sum(p.colour == o.colour and p.size == o.size for p in scene.objects) == 1:
        return Question(f"what shape is the {o.size} {o.colour} object?", o.cls, "other", "what shape is the",
                        "shape")
    return None


def _q_count(scene, rng):
    r = rng.random()
    if r < 0.15:
        n = len(scene.objects)
        return Question(_pick(rng, ["how many shapes are there?", "how many objects are in the picture?"]),
                        str(n), "number", "how many", "count")
    if r < 0.25:  # a class that is absent: answer 0
        cls = _pick(rng, CLASSES)
        colour = None
    else:
        o = _pick(rng, scene.objects)
        cls, colour = o.cls, (o.colour if rng.random() < 0.35 else None)
    n = sum(p.cls == cls and (colour is None or p.colour == colour) for p in scene.objects)
    what = f"{colour} {noun(cls, rng, True, 0.8)}" if colour else noun(cls, rng, True, 0.8)
    tail = _pick(rng, ["are there?", "are in the image?", "can you see?"])
    return Question(f"how many {what} {tail}", str(n), "number", "how many", "count")


def _q_exists(scene, rng):
    present = {(o.colour, o.cls) for o in scene.objects}
    if rng.random() < 0.5:
        colour, cls = _pick(rng, sorted(present))
    else:  # near misses: a present class in another colour, or a present colour on another class
        o = _pick(rng, scene.objects)
        misses = [(c, o.cls) for c in COLOURS] if rng.random() < 0.5 else [(o.colour, k) for k in CLASSES]
        colour, cls = _pick(rng, [m for m in misses if m not in present])
    answer = "yes" if (colour, cls) in present else "no"
    return Question(f"is there {with_article(colour)} {noun(cls, rng, canonical_p=0.8)}?", answer, "yes/no",
                    "is there a", "exists")


def _q_spatial_what(scene, rng):
    o = _pick(rng, scene.objects)
    ref = refer(o, scene, rng)
    if ref is None:
        return None
    for rel in rng.permutation(RELATIONS).tolist():
        hits = [p for p in scene.objects if p is not o and relation_holds(p, o, rel, scene)]
        if len(hits) == 1:  # the answer must be one object
            break
    else:
        return None
    phrase = {"left of": "to the left of", "right of": "to the right of", "above": "above",
              "below": "below"}[rel]
    return Question(f"what is {phrase} {ref}?", hits[0].cls, "other", "what is", "spatial")


def _q_spatial_yn(scene, rng):
    if len(scene.objects) < 2:
        return None
    i, j = rng.choice(len(scene.objects), size=2, replace=False)
    a, b = scene.objects[int(i)], scene.objects[int(j)]
    ra, rb = refer(a, scene, rng), refer(b, scene, rng)
    holds = [r for r in RELATIONS if relation_holds(a, b, r, scene)]
    if not (ra and rb and holds):
        return None
    rel = _pick(rng, holds)
    if rng.random() < 0.5:
        rel = _OPPOSITE[rel]  # clearly false: the opposite relation holds
    answer = "yes" if relation_holds(a, b, rel, scene) else "no"
    return Question(f"is {ra} {_pick(rng, _REL_PHRASES[rel])} {rb}?", answer, "yes/no", "is the",
                    "spatial")


def _q_size(scene, rng):
    o = _pick(rng, scene.objects)
    ref = refer(o, scene, rng, exclude="size")
    if ref is None:
        return None
    if rng.random() < 0.5:
        return Question(f"what size is {ref}?", o.size, "other", "what size is the", "size")
    size = o.size if rng.random() < 0.5 else _pick(rng, [s for s in SIZES if s != o.size])
    word = {"small": "small", "medium": "medium sized", "large": _pick(rng, ["large", "big"])}[size]
    return Question(f"is {ref} {word}?", "yes" if size == o.size else "no", "yes/no", "is the", "size")


def _q_texture(scene, rng):
    o = _pick(rng, scene.objects)
    ref = refer(o, scene, rng, exclude="texture")
    if ref is None:
        return None
    if rng.random() < 0.5:
        q = _pick(rng, [f"what pattern is {ref}?", f"what pattern does {ref} have?"])
        return Question(q, o.texture, "other", "what pattern", "texture")
    texture = o.texture if rng.random() < 0.5 else _pick(rng, [t for t in TEXTURES if t != o.texture])
    return Question(f"is {ref} {texture}?", "yes" if texture == o.texture else "no", "yes/no", "is the", "texture")


_ASKERS = [_q_colour, _q_shape, _q_count, _q_exists, _q_spatial_what, _q_spatial_yn, _q_size, _q_texture]


def questions(scene: Scene, rng: np.random.Generator, n: int) -> list[Question]:
    """Up to n distinct answerable questions about `scene`, cycling through the question families."""
    out: list[Question] = []
    for attempt in range(max(8, n) * len(_ASKERS)):
        if attempt % len(_ASKERS) == 0:
            order = rng.permutation(len(_ASKERS))
        q = _ASKERS[int(order[attempt % len(_ASKERS)])](scene, rng)
        if q and all(q.question != p.question for p in out):
            out.append(q)
            if len(out) == n:
                break
    return out


def _mistake(q: Question, rng) -> str:
    if q.answer_type == "yes/no":
        return "no" if q.answer == "yes" else "yes"
    if q.answer_type == "number":
        n = int(q.answer)
        return str(n + 1 if n == 0 or rng.random() < 0.5 else n - 1)
    pool = {"colour": COLOURS, "shape": CLASSES, "spatial": CLASSES, "size": SIZES, "texture": TEXTURES}[q.family]
    return _pick(rng, [a for a in pool if a != q.answer])


def human_answers(q: Question, rng: np.random.Generator) -> list[dict]:
    """Ten annotator answers: mostly the canonical answer (always the majority), some synonyms, a few
    mistakes, with VQA's answer_confidence."""
    n_right = int(rng.choice([10, 9, 8, 7, 6], p=[0.3, 0.25, 0.2, 0.15, 0.1]))
    answers = [(q.answer, "yes" if rng.random() < 0.85 else "maybe") for _ in range(n_right)]
    for _ in range(10 - n_right):
        synonyms = ANSWER_SYNONYMS.get(q.answer, [])
        if synonyms and rng.random() < 0.5:
            answers.append((_pick(rng, synonyms), "yes" if rng.random() < 0.6 else "maybe"))
        else:
            answers.append((_mistake(q, rng), str(rng.choice(["maybe", "no", "yes"], p=[0.5, 0.3, 0.2]))))
    order = rng.permutation(10)
    return [{"answer": answers[k][0], "answer_confidence": answers[k][1], "answer_id": i + 1}
            for i, k in enumerate(order)]


# ---------------------------------------------------------------------------------------------------
# NLVR2 statements about a pair of scenes
# ---------------------------------------------------------------------------------------------------

def _count(scene: Scene, cls: str | None = None, colour: str | None = None) -> int:
    return sum((cls is None or o.cls == cls) and (colour is None or o.colour == colour) for o in scene.objects)


def _has(scene: Scene, cls: str, colour: str | None = None) -> bool:
    return _count(scene, cls, colour) > 0


def _s_more(l: Scene, r: Scene, rng):
    cls = _pick(rng, [o.cls for o in l.objects + r.objects])
    big, small = ("left", "right") if rng.random() < 0.5 else ("right", "left")
    counts = {"left": _count(l, cls), "right": _count(r, cls)}
    text = _pick(rng, [f"there are more {noun(cls, rng, True)} in the {big} image than in the {small} image",
                       f"the {big} image contains more {noun(cls, rng, True)} than the {small} image"])
    return text, counts[big] > counts[small]


def _s_same(l: Scene, r: Scene, rng):
    cls = _pick(rng, [o.cls for o in l.objects + r.objects])
    return f"both images contain the same number of {noun(cls, rng, True)}", _count(l, cls) == _count(r, cls)


def _s_both(l: Scene, r: Scene, rng):
    o = _pick(rng, l.objects + r.objects)
    colour = o.colour if rng.random() < 0.7 else None
    what = f"{colour} {noun(o.cls, rng)}" if colour else noun(o.cls, rng)
    text = _pick(rng, [f"both images contain {with_article(what)}",
                       f"each image contains at least one {what}"])
    return text, _has(l, o.cls, colour) and _has(r, o.cls, colour)


def _s_exactly(l: Scene, r: Scene, rng):
    side, scene = ("left", l) if rng.random() < 0.5 else ("right", r)
    cls = _pick(rng, [o.cls for o in l.objects + r.objects])
    n = max(0, _count(scene, cls) + int(rng.choice([-1, 0, 0, 1])))
    what = f"no {noun(cls, rng, True)}" if n == 0 else f"exactly {number_word(n)} {noun(cls, rng, n != 1)}"
    return f"the {side} image contains {what}", _count(scene, cls) == n


def _s_only_one(l: Scene, r: Scene, rng):
    o = _pick(rng, l.objects + r.objects)
    what = noun(o.cls, rng)
    text = _pick(rng, [f"one image contains {with_article(what)} and the other does not",
                       f"only one of the images contains {with_article(what)}"])
    return text, _has(l, o.cls) != _has(r, o.cls)


def _s_total(l: Scene, r: Scene, rng):
    cls = _pick(rng, [o.cls for o in l.objects + r.objects])
    true_n = _count(l, cls) + _count(r, cls)
    n = max(1, true_n + int(rng.choice([-1, 0, 0, 1])))
    return f"there {'is' if n == 1 else 'are'} {number_word(n)} {noun(cls, rng, n != 1)} in total", true_n == n


def _s_shapes(l: Scene, r: Scene, rng):
    big, small = ("left", "right") if rng.random() < 0.5 else ("right", "left")
    counts = {"left": len(l.objects), "right": len(r.objects)}
    return f"the {big} image has more shapes than the {small} image", counts[big] > counts[small]


def _s_relation(l: Scene, r: Scene, rng):
    side, scene = ("left", l) if rng.random() < 0.5 else ("right", r)
    if len(scene.objects) < 2:
        return None
    i, j = rng.choice(len(scene.objects), size=2, replace=False)
    a, b = scene.objects[int(i)], scene.objects[int(j)]
    rel = _pick(rng, RELATIONS)
    # Existential claim: true if any object matching the first description has that relation to any
    # object matching the second one.
    truth = any(relation_holds(p, q, rel, scene) for p in scene.objects for q in scene.objects
                if p is not q and (p.colour, p.cls) == (a.colour, a.cls) and (q.colour, q.cls) == (b.colour, b.cls))
    text = (f"in the {side} image, there is {with_article(a.colour)} {noun(a.cls, rng)} "
            f"{_pick(rng, _REL_PHRASES[rel])} {with_article(b.colour)} {noun(b.cls, rng)}")
    return text, truth


_STATERS = [_s_more, _s_same, _s_both, _s_exactly, _s_only_one, _s_total, _s_shapes, _s_relation]


def nlvr2_statement(left: Scene, right: Scene, label: bool, rng: np.random.Generator,
                    avoid: tuple[str, ...] = ()) -> str:
    """A statement about the pair whose truth value is `label`."""
    for _ in range(200):
        made = _STATERS[int(rng.integers(len(_STATERS)))](left, right, rng)
        if made and made[1] == label and _sentence(made[0]) not in avoid:
            return _sentence(made[0])
    raise RuntimeError("no statement with the requested label")  # unreachable: _s_exactly always can
