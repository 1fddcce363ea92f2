"""Where the VQA model's attribute answers fail: in the detector's regions, or in the fusion model reading them.

    python benchmarks/vqa_binding.py --data runs/demo/world --features runs/demo/features \
        --results runs/demo/vqa/results_test.json [--split test] [--out runs/vqa_binding]

Every held-out question that asks one attribute of one named object of the synthetic world ("what color is
the star?", "what pattern is the red circle?", "what size is the heart?") is traced to its object: the class
named in the question with the answer as its attribute of that group (a question where that is not exactly one
object is counted apart). The object is matched to the stored region that overlaps it most (IoU >= 0.5), and
the question falls into one bucket:

    object missed       no region overlaps the object
    wrong tag           its region carries another class's tag
    right tag, shared   its region is tagged right, and so is another region of the image
    right tag, unique   its region is the only one tagged with its class: nothing to disambiguate

Per bucket and question type: the questions, the VQA model's exact accuracy (its answer is the canonical one)
and how often the detector's own attribute for that region (its attribute head's best attribute, stored with
the region) is the answer. Where the detector names the answer and the tag is right and unique but the model
answers wrong, the loss is the fusion model's. Prints a table and writes OUT/vqa_binding.json.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from region_probe import best_regions  # noqa: E402

from minivlm.data.feature_store import FeatureStore  # noqa: E402
from minivlm.data.synthetic_text import NOUNS  # noqa: E402
from minivlm.data.world import World  # noqa: E402
from minivlm.io import write_json  # noqa: E402

# VQA question type -> the attribute group its answer names
ATTRIBUTE_QUESTIONS = {"what color is the": "colour", "what pattern": "texture", "what size is the": "size"}
BUCKETS = ("right tag, unique", "right tag, shared", "wrong tag", "object missed", "not one object")

# Every noun of every class, longest first, so "five-pointed star" is found before "star".
_WORDS = sorted(((word, cls) for cls, forms in NOUNS.items() for form in forms for word in form),
                key=lambda w: -len(w[0]))


def named_class(question: str) -> str | None:
    text = question.lower()
    return next((cls for word, cls in _WORDS if re.search(rf"\b{re.escape(word)}\b", text)), None)


def bucket_of(question, anns, regions, class_names: dict[int, str], attribute: dict[int, tuple[str, str]],
              group: str, min_iou: float) -> tuple[str, int | None]:
    """(bucket, index of the object's region or None) for one attribute question."""
    cls, gold = named_class(question.question), question.multiple_choice_answer
    objects = [a for a in anns if class_names[a.category_id] == cls
               and (gold, group) in (attribute[i] for i in a.attribute_ids)]
    if len(objects) != 1:
        return "not one object", None
    if regions is None or len(regions) == 0:
        return "object missed", None
    if not regions.tags:
        raise SystemExit("the region store keeps no tags (class names); extract it with a detector")
    (iou,), (j,) = best_regions(objects, regions)
    if iou < min_iou:
        return "object missed", None
    if regions.tags[j] != cls:
        return "wrong tag", j
    return ("right tag, unique" if sum(t == cls for t in regions.tags) == 1 else "right tag, shared"), j


def binding_report(world: World, split: str, store: FeatureStore, answers: dict[int, str],
                   min_iou: float = 0.5) -> dict:
    inst = world.instances(split)
    class_names = {c.id: c.name for c in inst.categories}
    attribute = {a.id: (a.name, a.group) for a in inst.attributes}
    counts: dict[str, dict[str, list[int]]] = defaultdict(lambda: defaultdict(lambda: [0, 0, 0]))
    for q in world.vqa(split):
        group = ATTRIBUTE_QUESTIONS.get(q.question_type)
        if group is None or q.question_id not in answers:
            continue
        regions = store[q.image_id] if q.image_id in store else None
        bucket, j = bucket_of(q, inst.annotations.get(q.image_id, []), regions, class_names, attribute, group,
                              min_iou)
        gold = q.multiple_choice_answer
        named = j is not None and bool(regions.attribute_names) and regions.attribute_names[j] == gold
        for key in (q.question_type, "all"):
            c = counts[key][bucket]
            c[0] += 1
            c[1] += answers[q.question_id] == gold
            c[2] += named
    if not counts:
        raise SystemExit(f"no attribute question of split {split!r} has an answer in the results")
    out = {}
    for qtype, per in counts.items():
        total = sum(c[0] for c in per.values())
        out[qtype] = {b: {"questions": per[b][0], "share": round(100 * per[b][0] / total, 1),
                          "vqa_exact": round(100 * per[b][1] / per[b][0], 1),
                          "detector_attribute_is_answer": round(100 * per[b][2] / per[b][0], 1)}
                      for b in BUCKETS if per[b][0]}
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", required=True, help="the synthetic world (minivlm make-data)")
    ap.add_argument("--features", required=True, help="the region store the VQA model read")
    ap.add_argument("--results", required=True, help="the VQA model's results list for the split (results_SPLIT.json)")
    ap.add_argument("--split", default="test")
    ap.add_argument("--min-iou", type=float, default=0.5)
    ap.add_argument("--out", default="runs/vqa_binding")
    args = ap.parse_args(argv)
    answers = {int(r["question_id"]): str(r["answer"]) for r in json.loads(Path(args.results).read_text())}
    report = binding_report(World(Path(args.data)), args.split, FeatureStore(args.features), answers, args.min_iou)
    print(f"{'question type':20s} {'bucket':18s} {'questions':>9s} {'share':>6s} {'VQA exact':>9s} "
          f"{'detector attr':>13s}")
    for qtype, rows in report.items():
        for bucket, r in rows.items():
            print(f"{qtype:20s} {bucket:18s} {r['questions']:9d} {r['share']:5.1f}% {r['vqa_exact']:8.1f}% "
                  f"{r['detector_attribute_is_answer']:12.1f}%")
    out = Path(args.out)
    write_json(out / "vqa_binding.json", {"data": args.data, "features": args.features, "results": args.results,
                                          "split": args.split, "buckets": report})
    print(f"wrote {out / 'vqa_binding.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
