"""Does the extractor generalise beyond the generator's drawing style? Detector and VQA on a second renderer.

    python benchmarks/render2.py --model runs/demo/model --data runs/demo/world [--images 200] [--out runs/render2]

`minivlm.data.render2` draws the synthetic world's vocabulary with its own shapes, outlines, palettes,
backgrounds and low-resolution images; nothing trains on it. On its test split and on the generator's own
test split this reports, side by side:

    detector   mAP@0.5 and mAP (COCOeval), and tag precision / recall: the object tags the transformer sees
               (class names of the regions scoring >= BertConfig.tag_min_score) against the classes present;
    vqa        the model folder's VQA accuracy beside the per-question-type prior and the most frequent
               answer of the main world's training questions (a model that ignores the image gets the prior).

Prints a table and writes OUT/render2.json (docs/RESULTS.md quotes benchmarks/results/render2.json).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from minivlm.data.render2 import make_render2_world  # noqa: E402
from minivlm.data.world import World  # noqa: E402
from minivlm.eval.vqa_eval import vqa_accuracy  # noqa: E402
from minivlm.io import write_json  # noqa: E402
from minivlm.batching import chunks  # noqa: E402
from minivlm.tasks.vqa import baseline_results  # noqa: E402
from minivlm.vision.train import evaluate_detector  # noqa: E402


def tag_precision_recall(model, world: World, split: str, batch_size: int = 16) -> dict:
    """Micro-averaged precision / recall of each image's object tags against the classes it shows."""
    inst = world.instances(split)
    names = inst.class_names()
    index = inst.category_index()
    cfg = model.task("vqa").cfg  # the transformer's tag settings (every task shares them)
    hit = predicted = present = 0
    ids = sorted(inst.images)
    for chunk in chunks(ids, batch_size):
        regions = model.regions([world.image_path(split, inst.images[i]) for i in chunk])
        for iid, r in zip(chunk, regions):
            tags = set(r.object_tags(cfg.max_regions, cfg.tag_min_score))
            truth = {names[index[a.category_id]] for a in inst.annotations[iid]}
            hit, predicted, present = hit + len(tags & truth), predicted + len(tags), present + len(truth)
    return {"tag_precision": hit / max(1, predicted), "tag_recall": hit / max(1, present), "images": len(ids)}


def vqa_scores(model, world: World, split: str, train_questions) -> dict:
    questions = [q for q in world.vqa(split) if q.answers]
    inst = world.instances(split)
    by_image: dict[int, list] = {}
    for q in questions:
        by_image.setdefault(q.image_id, []).append(q)
    rows = []
    for iid, qs in by_image.items():  # one image, all its questions: the detector runs once per image
        answers = model.answer(world.image_path(split, inst.images[iid]), [q.question for q in qs])
        rows += [{"question_id": q.question_id, "answer": a} for q, a in zip(qs, answers)]
    acc = vqa_accuracy(rows, questions)
    out = {"accuracy": acc["overall"], "per_question_type": acc["perQuestionType"], "questions": len(questions)}
    for name, rows in baseline_results(train_questions, questions).items():
        b = vqa_accuracy(rows, questions)
        out[f"baseline_{name}"] = b["overall"]
        out[f"baseline_{name}_per_type"] = b["perQuestionType"]
    return out


def main(argv: list[str] | None = None) -> int:
    from minivlm.model import MiniVLM

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, required=True, help="model folder (detector + VQA), e.g. runs/demo/model")
    p.add_argument("--data", type=Path, required=True, help="the world the model was trained on (its test split and "
                                                             "training questions are the comparison)")
    p.add_argument("--images", type=int, default=200, help="second-renderer images")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=Path("runs/render2"))
    args = p.parse_args(argv)

    render2 = args.out / "world"
    if not (render2 / "world.json").is_file():
        make_render2_world(render2, args.images, args.seed, questions_per_image=12)
    model = MiniVLM.from_pretrained(args.model, backend="torch")  # evaluates model.detector
    main_world, second = World(args.data), World(render2)
    train_q = main_world.vqa("train")
    rows = {}
    for name, world in (("generator", main_world), ("render2", second)):
        det = evaluate_detector(model.detector, world, "test")
        rows[name] = {**det, **tag_precision_recall(model, world, "test"),
                      "vqa": vqa_scores(model, world, "test", train_q) if "vqa" in model.tasks else None}
    print(f"model {args.model}; test splits of {args.data} (generator) and {render2} (second renderer)")
    print(f"{'split':<10} {'mAP@0.5':>8} {'mAP':>6} {'tag P':>6} {'tag R':>6} {'VQA':>6} {'prior':>6} {'top ans':>7}")
    for name, r in rows.items():
        v = r["vqa"] or {}
        print(f"{name:<10} {r['map50']:>8.3f} {r['map']:>6.3f} {r['tag_precision']:>6.2f} {r['tag_recall']:>6.2f} "
              f"{v.get('accuracy', float('nan')):>6.1f} {v.get('baseline_per_question_type', float('nan')):>6.1f} "
              f"{v.get('baseline_most_frequent', float('nan')):>7.1f}")
    args.out.mkdir(parents=True, exist_ok=True)
    write_json(args.out / "render2.json", {"model": str(args.model), "data": str(args.data),
                                           "render2_images": args.images, "seed": args.seed, "rows": rows}, indent=1)
    print(f"wrote {args.out / 'render2.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
