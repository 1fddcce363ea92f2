"""What the detector's regions allow on the synthetic NLVR2: a symbolic reader of its tags against the model.

The generator writes NLVR2 statements from eight templates (counts, comparisons of counts, existence,
relations; `minivlm.data.synthetic_text`). This benchmark parses each statement back into its template and
evaluates it on the detector's own decisions for the two images: the class (tag) of every region that scores at
least `--min-score`, its colour (read from the region code that ends the feature, or its best attribute when that
is a colour) and its box. No learning:
if this reader is right far more often than the fine-tuned model, the regions carry the answer and the model
has not learnt to count and compare from its training statements; if not, the detector is the limit.

Per kind of statement, beside the reader and the model (`--results`, the `results_<split>.json` a fine-tuned
NLVR2 folder writes), the kind prior: a blind model that knows which template a statement comes from and answers
its majority label in the training split (NLVR2's counterpart of VQA's per-question-type prior).

    python benchmarks/nlvr2_symbolic.py --data runs/demo/world --features runs/demo/features_nlvr2 \
        --results runs/demo/nlvr2/results_test1.json       # -> benchmarks/results/nlvr2_symbolic.json

For the synthetic world only: real NLVR2 statements are free text.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from minivlm.data.feature_store import FeatureStore  # noqa: E402
from minivlm.data.synthetic_text import COLOURS, NOUNS, NUMBER_WORDS  # noqa: E402
from minivlm.data.world import World  # noqa: E402
from minivlm.io import write_json  # noqa: E402
from minivlm.regions import Regions  # noqa: E402


@dataclass(frozen=True)
class Thing:
    """One object as the reader sees it: class, colour (None if unknown) and box x1, y1, x2, y2."""
    cls: str
    colour: str | None
    box: tuple[float, float, float, float]


Reader = Callable[[list[Thing], list[Thing]], bool]  # (left objects, right objects) -> is the statement true?

_NOUN = {word: cls for cls, forms in NOUNS.items() for pair in forms for word in pair}
_NOUN_RE = "|".join(sorted(map(re.escape, _NOUN), key=len, reverse=True))  # longest first: "crescent moon"
_COLOUR_RE = "|".join(COLOURS)
_NUMBER = {w: i for i, w in enumerate(NUMBER_WORDS)}
_NUMBER_RE = "|".join(NUMBER_WORDS) + r"|\d+"
_RELATION = {"to the left of": "left of", "left of": "left of", "to the right of": "right of",
             "right of": "right of", "above": "above", "over": "above", "below": "below", "under": "below",
             "beneath": "below"}
_RELATION_RE = "|".join(sorted(map(re.escape, _RELATION), key=len, reverse=True))


def _count(things: list[Thing], cls: str, colour: str | None = None) -> int:
    return sum(t.cls == cls and (colour is None or t.colour == colour) for t in things)


def _number(word: str) -> int:
    return _NUMBER[word] if word in _NUMBER else int(word)


def _holds(a: Thing, b: Thing, relation: str) -> bool:
    """The generator's relations on boxes: strictly apart along one axis."""
    return {"left of": a.box[2] <= b.box[0], "right of": b.box[2] <= a.box[0],
            "above": a.box[3] <= b.box[1], "below": b.box[3] <= a.box[1]}[relation]


def _sides(first: str) -> tuple[int, int]:
    return (0, 1) if first == "left" else (1, 0)


def read_statement(text: str) -> tuple[str, Reader] | None:
    """(kind, reader) for a statement of one of the generator's templates, else None."""
    s = text.lower().strip().rstrip(".")
    m = re.fullmatch(r"the (left|right) image has more shapes than the (?:left|right) image", s)
    if m:
        a, b = _sides(m.group(1))
        return "more shapes", lambda l, r: len((l, r)[a]) > len((l, r)[b])
    m = re.fullmatch(rf"both images contain the same number of ({_NOUN_RE})", s)
    if m:
        cls = _NOUN[m.group(1)]
        return "same number", lambda l, r: _count(l, cls) == _count(r, cls)
    m = (re.fullmatch(rf"there are more ({_NOUN_RE}) in the (left|right) image than in the (?:left|right) image", s)
         or re.fullmatch(rf"the (left|right) image contains more ({_NOUN_RE}) than the (?:left|right) image", s))
    if m:
        noun, side = (m.group(1), m.group(2)) if m.group(1) in _NOUN else (m.group(2), m.group(1))
        cls, (a, b) = _NOUN[noun], _sides(side)
        return "more X", lambda l, r: _count((l, r)[a], cls) > _count((l, r)[b], cls)
    m = re.fullmatch(rf"there (?:is|are) ({_NUMBER_RE}) ({_NOUN_RE}) in total", s)
    if m:
        n, cls = _number(m.group(1)), _NOUN[m.group(2)]
        return "N in total", lambda l, r: _count(l, cls) + _count(r, cls) == n
    m = re.fullmatch(rf"(?:both images contain an?|each image contains at least one) (?:({_COLOUR_RE}) )?({_NOUN_RE})", s)
    if m:
        colour, cls = m.group(1), _NOUN[m.group(2)]
        return "both contain", lambda l, r: _count(l, cls, colour) > 0 and _count(r, cls, colour) > 0
    m = (re.fullmatch(rf"one image contains an? ({_NOUN_RE}) and the other does not", s)
         or re.fullmatch(rf"only one of the images contains an? ({_NOUN_RE})", s))
    if m:
        cls = _NOUN[m.group(1)]
        return "only one", lambda l, r: (_count(l, cls) > 0) != (_count(r, cls) > 0)
    m = re.fullmatch(rf"the (left|right) image contains (?:no ({_NOUN_RE})|exactly ({_NUMBER_RE}) ({_NOUN_RE}))", s)
    if m:
        i = _sides(m.group(1))[0]
        n, cls = (0, _NOUN[m.group(2)]) if m.group(2) else (_number(m.group(3)), _NOUN[m.group(4)])
        return "exactly N", lambda l, r: _count((l, r)[i], cls) == n
    m = re.fullmatch(rf"in the (left|right) image, there is an? ({_COLOUR_RE}) ({_NOUN_RE}) ({_RELATION_RE}) "
                     rf"an? ({_COLOUR_RE}) ({_NOUN_RE})", s)
    if m:
        i, relation = _sides(m.group(1))[0], _RELATION[m.group(4)]
        first, second = (m.group(2), _NOUN[m.group(3)]), (m.group(5), _NOUN[m.group(6)])

        def related(l: list[Thing], r: list[Thing]) -> bool:
            things = (l, r)[i]
            return any(_holds(p, q, relation) for p in things for q in things
                       if p is not q and (p.colour, p.cls) == first and (q.colour, q.cls) == second)
        return "relation", related
    return None


def colours_of(regions: Regions, attribute_names: list[str]) -> list[str | None]:
    """Each region's colour as the detector decided it: from the region code that ends its feature when the
    detector appends one (`TEEConfig.region_label_code`: per attribute group a scaled one-hot, so exactly one
    colour entry is set), else its best attribute when that is a colour (None when it is not)."""
    colour_ids = [i for i, name in enumerate(attribute_names) if name in COLOURS]
    if colour_ids and regions.features.shape[1] >= len(attribute_names):
        block = regions.features[:, regions.features.shape[1] - len(attribute_names):][:, colour_ids]
        if len(regions) and bool(((block != 0).sum(1) == 1).all()) and len(set(block[block != 0].tolist())) == 1:
            return [attribute_names[colour_ids[int(j)]] for j in block.argmax(1)]
    names = regions.attribute_names or [None] * len(regions)
    return [name if name in COLOURS else None for name in names]


def things_of(regions: Regions, min_score: float, attribute_names: list[str] = ()) -> list[Thing]:
    """The regions the reader trusts: tag, colour (`colours_of`), box."""
    colours = colours_of(regions, list(attribute_names))
    return [Thing(regions.tags[i], colours[i], tuple(regions.boxes[i].tolist()))
            for i in range(len(regions)) if float(regions.scores[i]) >= min_score]


def kind_of(sentence: str) -> str:
    read = read_statement(sentence)
    return read[0] if read else "unparsed"


def kind_majorities(statements) -> dict[str, bool]:
    """Per kind of statement, its majority label among `statements` (NLVR2Example); ties: True."""
    labels: dict[str, Counter] = defaultdict(Counter)
    for e in statements:
        labels[kind_of(e.sentence)][e.label] += 1
    return {k: c[True] >= c[False] for k, c in labels.items()}


def kind_prior(train, statements) -> dict[str, bool]:
    """Each of `statements` answered with its kind's majority label in `train`: a blind model that knows the
    template (NLVR2's counterpart of VQA's per-question-type prior)."""
    majority = kind_majorities(train)
    return {e.identifier: majority.get(kind_of(e.sentence), True) for e in statements}


def accuracy_by_kind(statements, answers: dict[str, dict[str, bool]]) -> dict:
    """Per kind of statement and over all ("all", last): n and each column's accuracy in percent. `answers` maps a
    column to its {identifier: label}; a column is scored on the statements it answers (None if on none)."""
    hits: dict[str, dict[str, list[bool]]] = defaultdict(lambda: defaultdict(list))
    n: Counter = Counter()
    for e in statements:
        kind = kind_of(e.sentence)
        for key in (kind, "all"):
            n[key] += 1
            for column, labels in answers.items():
                if e.identifier in labels:
                    hits[key][column].append(labels[e.identifier] == e.label)
    return {k: {"n": n[k], **{c: 100.0 * sum(hits[k][c]) / len(hits[k][c]) if hits[k][c] else None for c in answers}}
            for k in sorted(n, key=lambda k: (k == "all", k))}


def evaluate(world: World, store: FeatureStore, split: str, min_score: float,
             results: dict[str, bool] | None = None) -> dict:
    """Per kind of statement and over all: n, the accuracy of the reader, of the model (if `results`) and of the
    kind prior."""
    statements, names = world.nlvr2(split), store.attribute_names
    reader = {}
    for e in statements:
        left, right = store.get(store.find(e.left_image)), store.get(store.find(e.right_image))
        read = read_statement(e.sentence)
        reader[e.identifier] = read[1](things_of(left, min_score, names), things_of(right, min_score, names)) \
            if read else False
    prior = kind_prior(world.nlvr2(world.train_split("nlvr2")), statements)
    return accuracy_by_kind(statements, {"reader": reader, "prior": prior, "model": results or {}})


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", type=Path, required=True, help="the synthetic world (`minivlm make-data` output)")
    p.add_argument("--features", type=Path, required=True, help="the feature store of its NLVR2 images")
    p.add_argument("--split", default="test1")
    p.add_argument("--min-score", type=float, default=0.3, help="regions under this score are not counted")
    p.add_argument("--results", type=Path, help="a fine-tuned model's results_<split>.json, to compare per kind")
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "nlvr2_symbolic.json")
    args = p.parse_args(argv)
    results = None
    if args.results:
        results = {r["identifier"]: bool(r["prediction"]) for r in json.loads(args.results.read_text())}
    table = evaluate(World(args.data), FeatureStore(args.features), args.split, args.min_score, results)
    print(f"NLVR2 {args.split}, regions scoring >= {args.min_score}")
    print("| kind | statements | kind prior | model | symbolic reader of the detector's tags |")
    print("|---|---|---|---|---|")
    for kind, r in table.items():
        cell = lambda v: "-" if v is None else f"{v:.1f}"  # noqa: E731
        print(f"| {kind} | {r['n']} | {cell(r['prior'])} | {cell(r['model'])} | {r['reader']:.1f} |")
    write_json(args.out, {"data": str(args.data), "features": str(args.features), "split": args.split,
                          "min_score": args.min_score, "results": str(args.results) if args.results else None,
                          "kinds": table})
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
