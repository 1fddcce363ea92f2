"""`minivlm evaluate`: score a results file against the references of one task and print the metrics.

Result and reference files by task:

  caption    --results  [{"image_id": 9, "caption": "a tray of food"}, ...]   (COCO results format)
             --references  COCO captions file (captions_val2014.json) or Karpathy dataset_coco.json
  vqa        --results  [{"question_id": 458752000, "answer": "net"}, ...]    (VQA results format)
             --references  VQA v2 questions file   --annotations  VQA v2 annotations file
  retrieval  --results  {"scores": [[s(image 0, text 0), s(image 0, text 1), ...], ...],   one row per image
                         "text_to_image": [image row of text 0, image row of text 1, ...]}
             (no references: the results carry the ground truth pairing)
  nlvr2      --results  [{"identifier": "dev-850-0-0", "prediction": true}, ...]
             --references  NLVR2 JSONL (dev.json / test1.json)

Caption metrics are reported x100 in the table (the JSON keeps pycocoevalcap's 0..1); VQA, retrieval and
NLVR2 numbers are percentages.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from minivlm.errors import MiniVLMError
from minivlm.io import write_json

TASKS = ("caption", "vqa", "retrieval", "nlvr2")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = __doc__.split("\n\n", 1)[1]
    parser.add_argument("--task", required=True, choices=TASKS)
    parser.add_argument("--results", required=True, help="the model's results file (format below)")
    parser.add_argument("--references", help="ground truth: captions / VQA questions / NLVR2 JSONL")
    parser.add_argument("--annotations", help="VQA v2 annotations file (vqa only)")
    parser.add_argument("--out", help="also write the metrics as JSON to this file")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.add_argument("--tokenizer", choices=("ptb", "simple"), default="ptb",
                        help="caption tokenisation: the official PTB tokenizer (java) or a java-free one")
    parser.add_argument("--no-meteor", action="store_true", help="caption: skip METEOR (java)")
    parser.add_argument("--no-spice", action="store_true", help="caption: skip SPICE (java, CoreNLP 3.6.0)")
    parser.add_argument("--fold-size", type=int, default=None,
                        help="retrieval: images per fold for the 1K-style average (default min(1000, n/5))")


def evaluate(args: argparse.Namespace) -> dict[str, Any]:
    """The metrics for the parsed arguments (also usable from Python with an argparse.Namespace)."""
    if args.task in ("caption", "vqa", "nlvr2") and not args.references:
        raise MiniVLMError(f"--task {args.task} needs --references")
    if args.task == "caption":
        from minivlm.eval.caption_metrics import evaluate_caption_file

        return evaluate_caption_file(args.results, args.references, tokenizer=args.tokenizer,
                                     meteor=not args.no_meteor, spice=not args.no_spice)
    if args.task == "vqa":
        if not args.annotations:
            raise MiniVLMError("--task vqa needs --annotations (the VQA v2 annotations file)")
        from minivlm.eval.vqa_eval import evaluate_vqa_file

        return evaluate_vqa_file(args.results, args.references, args.annotations)
    if args.task == "retrieval":
        from minivlm.eval.retrieval import evaluate_retrieval_file

        return evaluate_retrieval_file(args.results, args.fold_size)
    from minivlm.eval.nlvr2 import evaluate_nlvr2_file

    return evaluate_nlvr2_file(args.results, args.references)


def format_metrics(task: str, m: dict[str, Any]) -> str:
    if task == "caption":
        from minivlm.eval.caption_metrics import format_caption_metrics

        return f"captions: {m['n_images']} images (x100)\n" + format_caption_metrics(m)
    if task == "vqa":
        lines = [f"VQA accuracy: {m['n_questions']} questions", f"{'overall':<28} {m['overall']:7.2f}"]
        lines += [f"{'answer type: ' + k:<28} {v:7.2f}" for k, v in sorted(m["perAnswerType"].items())]
        lines += [f"{'question type: ' + k:<28} {v:7.2f}" for k, v in sorted(m["perQuestionType"].items())]
        return "\n".join(lines)
    if task == "retrieval":
        keys = [k for k in m["full"] if k != "rsum"] + ["rsum"]
        header = f"{'set':<22}" + "".join(f"{k:>8}" for k in keys)
        rows = [f"{'full (' + str(m['n_images']) + ' images)':<22}" + "".join(f"{m['full'][k]:8.2f}" for k in keys)]
        if "folds" in m:
            name = f"{m['n_folds']} folds x {m['fold_size']}"
            rows.append(f"{name:<22}" + "".join(f"{m['folds'][k]:8.2f}" for k in keys))
        return "\n".join([f"retrieval: {m['n_images']} images, {m['n_texts']} texts (TR: image->text, "
                          f"IR: text->image)", header, *rows])
    return (f"NLVR2: {m['n_examples']} examples, {m['n_sentences']} sentences\n"
            f"{'accuracy':<12} {m['accuracy']:7.2f}\n{'consistency':<12} {m['consistency']:7.2f}")


def run(args: argparse.Namespace) -> int:
    metrics = evaluate(args)
    if args.out:
        write_json(args.out, metrics, indent=1)
    shown = {k: v for k, v in metrics.items() if k != "per_question"}
    print(json.dumps(shown, indent=1) if args.json else format_metrics(args.task, shown))
    return 0
