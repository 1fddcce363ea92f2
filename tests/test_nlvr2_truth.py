"""NLVR2 statements of the synthetic world are true (or false) exactly as labelled, for the scenes they describe.

The checker below is independent of the generator: it parses each statement with its own grammar of the
generator's templates (minivlm/data/synthetic_text.py, `_s_*`), names the shapes with its own word list,
and evaluates the claim on the two scenes' ground-truth objects. Only the scene data structures are shared.
Every template the generator uses is covered; a statement the grammar does not parse fails the test.

Relations follow the world's documented convention (synthetic_text.py, "Geometry"): "A left of B" holds
when A's box ends at or before B's box begins along x (likewise for right / above / below); nothing
weaker counts.
"""

from __future__ import annotations

import re
from collections import Counter, defaultdict

import numpy as np
import pytest

from minivlm.data import synthetic
from minivlm.data.synthetic_text import Scene, SceneObject, nlvr2_statement
from minivlm.data.world import World

# ------------------------------------------------------------------------------------------------
# The checker's own vocabulary
# ------------------------------------------------------------------------------------------------

# phrase -> (class, plural)
SHAPE_WORDS: dict[str, tuple[str, bool]] = {}
for _cls, _pairs in {
    "circle": ["circle/circles", "round shape/round shapes", "disc/discs"],
    "square": ["square/squares", "box/boxes"],
    "triangle": ["triangle/triangles"],
    "star": ["star/stars", "five-pointed star/five-pointed stars"],
    "hexagon": ["hexagon/hexagons", "six-sided shape/six-sided shapes"],
    "heart": ["heart/hearts", "heart shape/heart shapes"],
    "cross": ["cross/crosses", "plus sign/plus signs"],
    "ring": ["ring/rings", "donut/donuts", "hoop/hoops"],
    "arrow": ["arrow/arrows"],
    "crescent": ["crescent/crescents", "crescent moon/crescent moons"],
    "diamond": ["diamond/diamonds", "rhombus/rhombuses"],
    "pentagon": ["pentagon/pentagons", "five-sided shape/five-sided shapes"],
}.items():
    for _pair in _pairs:
        _one, _many = _pair.split("/")
        SHAPE_WORDS[_one], SHAPE_WORDS[_many] = (_cls, False), (_cls, True)

COLOUR_WORDS = ["red", "orange", "yellow", "green", "blue", "purple", "pink", "white", "black"]
NUMBERS = {w: i for i, w in enumerate(["one", "two", "three", "four", "five", "six", "seven", "eight", "nine",
                                       "ten"], start=1)}  # zero is written "no"
RELATION_WORDS = {"to the left of": "left", "left of": "left", "to the right of": "right", "right of": "right",
                  "above": "above", "over": "above", "below": "below", "under": "below", "beneath": "below"}

_alt = lambda words: "|".join(re.escape(w) for w in sorted(words, key=len, reverse=True))  # noqa: E731
SHAPE = f"(?:{_alt(SHAPE_WORDS)})"
COLOUR = f"(?:{_alt(COLOUR_WORDS)})"
NUM = f"(?:{_alt(NUMBERS)}|[0-9]+)"
REL = f"(?:{_alt(RELATION_WORDS)})"
SIDE = "(?:left|right)"
ART = "(?:an|a)"

# template name -> (family, pattern). Families are the generator's kinds of claim; a family may have
# several wordings.
TEMPLATES: dict[str, tuple[str, re.Pattern]] = {name: (family, re.compile(pattern)) for name, family, pattern in [
    ("more/there-are", "more",
     rf"there are more (?P<shapes>{SHAPE}) in the (?P<a>{SIDE}) image than in the (?P<b>{SIDE}) image"),
    ("more/contains", "more",
     rf"the (?P<a>{SIDE}) image contains more (?P<shapes>{SHAPE}) than the (?P<b>{SIDE}) image"),
    ("same", "same", rf"both images contain the same number of (?P<shapes>{SHAPE})"),
    ("both/both", "both", rf"both images contain (?P<art>{ART}) (?:(?P<colour>{COLOUR}) )?(?P<shape>{SHAPE})"),
    ("both/each", "both", rf"each image contains at least one (?:(?P<colour>{COLOUR}) )?(?P<shape>{SHAPE})"),
    ("exactly/no", "exactly", rf"the (?P<side>{SIDE}) image contains no (?P<shapes>{SHAPE})"),
    ("exactly/n", "exactly", rf"the (?P<side>{SIDE}) image contains exactly (?P<n>{NUM}) (?P<shape_n>{SHAPE})"),
    ("only-one/other", "only-one", rf"one image contains (?P<art>{ART}) (?P<shape>{SHAPE}) and the other does not"),
    ("only-one/only", "only-one", rf"only one of the images contains (?P<art>{ART}) (?P<shape>{SHAPE})"),
    ("total", "total", rf"there (?P<verb>is|are) (?P<n>{NUM}) (?P<shape_n>{SHAPE}) in total"),
    ("shapes", "shapes", rf"the (?P<a>{SIDE}) image has more shapes than the (?P<b>{SIDE}) image"),
    ("relation", "relation",
     rf"in the (?P<side>{SIDE}) image, there is (?P<art>{ART}) (?P<colour>{COLOUR}) (?P<shape>{SHAPE}) "
     rf"(?P<rel>{REL}) (?P<art2>{ART}) (?P<colour2>{COLOUR}) (?P<shape2>{SHAPE})"),
]}
FAMILIES = sorted({family for family, _ in TEMPLATES.values()})


def _number(word: str) -> int:
    return NUMBERS[word] if word in NUMBERS else int(word)


def _shape(word: str, plural: bool | None) -> str:
    cls, is_plural = SHAPE_WORDS[word]
    if plural is not None:
        assert is_plural == plural, f"{word!r}: expected the {'plural' if plural else 'singular'}"
    return cls


def _article_ok(article: str, word: str) -> None:
    assert article == ("an" if word[0] in "aeiou" else "a"), f"{article!r} before {word!r}"


def _n(scene: Scene, cls: str, colour: str | None = None) -> int:
    return sum(o.cls == cls and (colour is None or o.colour == colour) for o in scene.objects)


def _rel(a: SceneObject, b: SceneObject, rel: str) -> bool:
    (ax, ay, aw, ah), (bx, by, bw, bh) = a.box, b.box
    return {"left": ax + aw <= bx, "right": bx + bw <= ax, "above": ay + ah <= by, "below": by + bh <= ay}[rel]


def parse(sentence: str) -> tuple[str, dict]:
    """(template name, its fields); exactly one template must match."""
    assert sentence.endswith(".") and sentence[0].isupper(), sentence
    text = sentence[0].lower() + sentence[1:-1]
    hits = [(name, m.groupdict()) for name, (_, pat) in TEMPLATES.items() if (m := pat.fullmatch(text))]
    assert len(hits) == 1, f"{sentence!r} matches {len(hits)} templates: {[h[0] for h in hits]}"
    return hits[0]


def evaluate(sentence: str, left: Scene, right: Scene) -> tuple[str, bool]:
    """(template name, whether the statement holds for the pair)."""
    name, g = parse(sentence)
    side = {"left": left, "right": right}
    if g.get("art"):
        _article_ok(g["art"], g.get("colour") or g["shape"])
    if name.startswith("more/"):
        assert g["a"] != g["b"], sentence
        cls = _shape(g["shapes"], plural=True)
        return name, _n(side[g["a"]], cls) > _n(side[g["b"]], cls)
    if name == "same":
        cls = _shape(g["shapes"], plural=True)
        return name, _n(left, cls) == _n(right, cls)
    if name.startswith("both/"):
        cls = _shape(g["shape"], plural=False)
        return name, _n(left, cls, g["colour"]) >= 1 and _n(right, cls, g["colour"]) >= 1
    if name == "exactly/no":
        return name, _n(side[g["side"]], _shape(g["shapes"], plural=True)) == 0
    if name == "exactly/n":
        n = _number(g["n"])
        return name, _n(side[g["side"]], _shape(g["shape_n"], plural=n != 1)) == n
    if name.startswith("only-one/"):
        cls = _shape(g["shape"], plural=False)
        return name, (_n(left, cls) >= 1) != (_n(right, cls) >= 1)
    if name == "total":
        n = _number(g["n"])
        assert g["verb"] == ("is" if n == 1 else "are"), f"{g['verb']!r} before {n}"
        cls = _shape(g["shape_n"], plural=n != 1)
        return name, _n(left, cls) + _n(right, cls) == n
    if name == "shapes":
        assert g["a"] != g["b"], sentence
        return name, len(side[g["a"]].objects) > len(side[g["b"]].objects)
    if name == "relation":
        _article_ok(g["art2"], g["colour2"])
        scene = side[g["side"]]
        first = (g["colour"], _shape(g["shape"], plural=False))
        second = (g["colour2"], _shape(g["shape2"], plural=False))
        rel = RELATION_WORDS[g["rel"]]
        return name, any(_rel(p, q, rel) for p in scene.objects for q in scene.objects
                         if p is not q and (p.colour, p.cls) == first and (q.colour, q.cls) == second)
    raise AssertionError(name)


# ------------------------------------------------------------------------------------------------
# The checker itself is checked on hand-made scenes, so a lenient checker cannot pass the test below.
# ------------------------------------------------------------------------------------------------

def _obj(cls, colour, x, y, w=20, h=20):
    return SceneObject(cls, colour, "small", "solid", (x, y, w, h), w * h)


def test_the_checker_on_hand_made_scenes():
    left = Scene(200, 200, "plain", [_obj("circle", "red", 10, 10), _obj("circle", "blue", 100, 10),
                                     _obj("star", "red", 10, 100)])
    right = Scene(200, 200, "plain", [_obj("circle", "red", 50, 50), _obj("ring", "green", 40, 60)])
    cases = {
        "There are more circles in the left image than in the right image.": True,
        "The right image contains more discs than the left image.": False,
        "Both images contain the same number of round shapes.": False,
        "Both images contain a red circle.": True,
        "Both images contain a blue circle.": False,
        "Each image contains at least one star.": False,
        "The right image contains no stars.": True,
        "The left image contains exactly two circles.": True,
        "The left image contains exactly one circle.": False,
        "One image contains a donut and the other does not.": True,
        "Only one of the images contains a circle.": False,
        "There are three circles in total.": True,
        "There are four circles in total.": False,
        "There is one ring in total.": True,
        "The left image has more shapes than the right image.": True,
        "In the left image, there is a red circle to the left of a blue circle.": True,
        "In the left image, there is a red circle above a red star.": True,
        "In the left image, there is a red star over a red circle.": False,
        # Overlapping along x: neither "left of" nor "right of" holds.
        "In the right image, there is a red circle left of a green ring.": False,
        "In the right image, there is a green ring right of a red circle.": False,
        "In the right image, there is a green ring beneath a red circle.": False,  # boxes overlap along y too
    }
    for sentence, truth in cases.items():
        assert evaluate(sentence, left, right)[1] is truth, sentence
    for bad in ["There are more circles in the left image than in the left image.",  # same side twice
                "The left image contains exactly two circle.",  # number agreement
                "There are one ring in total.",  # the verb's number
                "Both images contain an red circle.",  # article
                "Both images contain a purple squircle.",  # unknown shape
                "The left image contains exactly no circles."]:
        with pytest.raises(AssertionError):
            evaluate(bad, left, right)


# ------------------------------------------------------------------------------------------------
# The generator's pairs
# ------------------------------------------------------------------------------------------------

SEEDS = (0, 1, 2, 3)
PAIRS_PER_SEED = 50  # 200 pairs in all
STATEMENTS_PER_PAIR = 8  # the most make-data allows, for the most statements per rendered pair


@pytest.fixture(scope="module")
def generated(tmp_path_factory, request):
    """(pairs, scenes): every NLVR2 line make-data wrote, as read back by World, with its pair's two
    scenes (captured from the generator's own render_scene calls; images are not saved, to save time)."""
    mp = pytest.MonkeyPatch()
    request.addfinalizer(mp.undo)
    scenes: dict[str, list[Scene]] = defaultdict(list)  # left image path -> [left, right]
    current: list[str] = []
    real_item, real_render = synthetic._nlvr2_item, synthetic.render_scene

    def item(seed, stream, index, left_path, right_path, n):
        current[:] = [left_path]
        try:
            return real_item(seed, stream, index, left_path, right_path, n)
        finally:
            current.clear()  # the next COCO image is no NLVR2 scene

    def render(rng, *args, **kwargs):
        image, scene, polygons = real_render(rng, *args, **kwargs)
        if current:
            scenes[current[0]].append(scene)
        return image, scene, polygons

    mp.setattr(synthetic, "_nlvr2_item", item)
    mp.setattr(synthetic, "render_scene", render)
    mp.setattr(synthetic, "_save", lambda *a, **k: None)
    out = []
    for seed in SEEDS:
        root = tmp_path_factory.mktemp(f"nlvr2_seed{seed}")
        synthetic.generate_world(root, images=1, seed=seed, nlvr2_pairs=PAIRS_PER_SEED, workers=1,
                                 nlvr2_statements=STATEMENTS_PER_PAIR)
        world = World(root)
        for split in synthetic.NLVR2_SPLITS:
            folder = root / "nlvr2" / "images" / split
            for ex in world.nlvr2(split):
                pair = scenes[str(folder / ex.left_image)]
                assert len(pair) == 2, ex.identifier
                out.append((seed, ex, pair))
    mp.undo()
    return out


def test_every_statement_is_true_exactly_when_labelled_true(generated):
    assert len(generated) == len(SEEDS) * PAIRS_PER_SEED * STATEMENTS_PER_PAIR
    wrong = []
    seen: dict[str, Counter] = defaultdict(Counter)
    for seed, ex, (left, right) in generated:
        name, truth = evaluate(ex.sentence, left, right)
        seen[name][ex.label] += 1
        if truth != ex.label:
            wrong.append(f"seed {seed} {ex.identifier}: {ex.sentence!r} labelled {ex.label}, checker says {truth}")
    assert not wrong, f"{len(wrong)} mislabelled statements:\n" + "\n".join(wrong[:20])

    # Half true, half false per pair (make-data's contract), and both labels in every family of claims: a
    # generator that only ever says True (or only False for a family) fails here.
    labels = Counter(ex.label for _, ex, _ in generated)
    assert labels[True] == labels[False] == len(generated) // 2
    by_family: dict[str, Counter] = defaultdict(Counter)
    for name, counts in seen.items():
        by_family[TEMPLATES[name][0]].update(counts)
    for family in FAMILIES:
        assert by_family[family][True] > 0 and by_family[family][False] > 0, (family, by_family[family])
    # Every wording is generated, so the grammar above has no dead template (and misses none: parse()
    # fails on a sentence no template matches).
    assert set(seen) == set(TEMPLATES), set(TEMPLATES) - set(seen)


def test_statements_of_a_pair_are_distinct_and_half_true(generated):
    by_pair: dict[tuple, list] = defaultdict(list)
    for seed, ex, _ in generated:
        by_pair[seed, ex.identifier.rsplit("-", 1)[0]].append(ex)
    for key, exs in by_pair.items():
        assert len(exs) == STATEMENTS_PER_PAIR, key
        assert len({e.sentence for e in exs}) == len(exs), key
        assert sum(e.label for e in exs) == STATEMENTS_PER_PAIR // 2, key


def _random_scene(rng: np.random.Generator, classes: list[str], colours: list[str]) -> Scene:
    """A scene without pixels: small boxes on a 240 x 180 canvas, many touching or overlapping, so counts
    tie and relations sit on their boundaries more often than in rendered scenes."""
    objects = []
    for _ in range(int(rng.integers(1, 7))):
        x, y = (int(v) for v in rng.integers(0, 10, 2) * 20)
        objects.append(SceneObject(classes[int(rng.integers(len(classes)))], colours[int(rng.integers(len(colours)))],
                                   "small", "solid", (float(x), float(y), float(rng.choice([20, 30])), 20.0), 400.0))
    return Scene(240, 180, "plain", objects)


def test_statements_on_edge_case_scenes():
    """The statement generator alone, on many cheap scenes with ties and touching boxes (a box that ends
    where another begins is "left of" it)."""
    rng = np.random.default_rng(18)
    seen: dict[str, Counter] = defaultdict(Counter)
    for _ in range(600):
        left = _random_scene(rng, ["circle", "star"], ["red", "blue"])
        right = _random_scene(rng, ["circle", "ring"], ["red", "green"])
        for label in (True, False):
            sentence = nlvr2_statement(left, right, label, rng)
            name, truth = evaluate(sentence, left, right)
            assert truth == label, (sentence, label, left, right)
            seen[TEMPLATES[name][0]][label] += 1
    for family in FAMILIES:
        assert seen[family][True] and seen[family][False], (family, seen[family])
