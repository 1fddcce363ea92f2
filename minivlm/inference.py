"""`minivlm caption | vqa | nlvr2 | retrieve`: a model folder (`MiniVLM.save_pretrained`) on raw images.

    minivlm caption  MODEL IMG [IMG ...] [--beam-size N]
    minivlm vqa      MODEL IMG "question" ["question" ...] [--top K]
    minivlm nlvr2    MODEL LEFT RIGHT "statement"
    minivlm retrieve MODEL --images DIR --query "text" [--top K]

`--json` prints one JSON document instead of text. Every image is opened (by `load_image`) before the
model runs. A batch goes on past a bad item: an image that cannot be read, or an empty question, gets one
line on stderr naming it and why, an `error` entry in `--json` output, and the exit code 1; every good item
still gets its result. Where there is only one item (the image of `vqa`, the pair and statement of `nlvr2`,
the query of `retrieve`), a bad one stops the command at once with a one-line error.
`--backend auto` (the default) runs the ONNX graphs of `minivlm export MODEL` when they are there and
fresh, without importing PyTorch, and PyTorch otherwise (`minivlm.backend`); `torch` / `onnx` force one.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from minivlm.errors import MiniVLMError

if TYPE_CHECKING:
    from PIL.Image import Image

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm"}


def add_arguments(parser: argparse.ArgumentParser, name: str) -> None:
    parser.add_argument("model", help="model folder (MiniVLM.save_pretrained / the demo's model/)")
    if name == "caption":
        parser.add_argument("images", nargs="+", help="image files")
        parser.add_argument("--beam-size", type=int, default=1, help="1 = greedy (the paper's speed setting)")
    elif name == "vqa":
        parser.add_argument("image", help="image file")
        parser.add_argument("questions", nargs="+", help="one or more questions about the image")
        parser.add_argument("--top", type=int, default=1, help="answers to show per question")
    elif name == "nlvr2":
        parser.add_argument("left", help="left image file")
        parser.add_argument("right", help="right image file")
        parser.add_argument("statement", help="statement about the two images")
    elif name == "retrieve":
        parser.add_argument("--images", required=True, help="folder of images to rank")
        parser.add_argument("--query", required=True, help="text to match")
        parser.add_argument("--top", type=int, default=5, help="how many images to list")
    else:
        raise ValueError(f"minivlm.inference serves caption, vqa, nlvr2 and retrieve, not {name!r}")
    parser.add_argument("--json", action="store_true", help="print JSON")
    add_backend_arguments(parser)
    parser.add_argument("--batch-size", type=int, default=16, help="images per detector / transformer batch")


def add_backend_arguments(parser: argparse.ArgumentParser) -> None:
    from minivlm.backend import BACKENDS

    parser.add_argument("--backend", choices=BACKENDS, default="auto",
                        help="auto: the ONNX graphs of `minivlm export MODEL` when present and fresh, else PyTorch")
    parser.add_argument("--int8", action="store_true", help="run the int8 ONNX graphs (`minivlm export --int8`)")
    parser.add_argument("--int4", action="store_true",
                        help="--int8 with the caption decoder's step in 4-bit weights (`minivlm export --int4`)")
    parser.add_argument("--bf16", action="store_true",
                        help="run the detector's backbone in bfloat16 with OpenVINO (`minivlm export --bf16`; "
                             "CPUs with AVX512-BF16 or AMX)")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ... (ONNX Runtime runs on the CPU)")


def list_images(folder: str | Path) -> list[Path]:
    folder = Path(folder)
    if not folder.is_dir():
        raise MiniVLMError(f"{folder}: image folder not found")
    found = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not found:
        raise MiniVLMError(f"{folder}: no image files ({', '.join(sorted(IMAGE_SUFFIXES))})")
    return found


def _emit(args: argparse.Namespace, doc, lines: list[str]) -> None:
    print(json.dumps(doc, indent=1, ensure_ascii=False) if args.json else "\n".join(lines))


def _report(command: str, failures: list[str]) -> int:
    """One stderr line per bad item; the exit code (1 when any item failed)."""
    for reason in failures:
        print(f"minivlm {command}: error: {reason}", file=sys.stderr)
    return 1 if failures else 0


def load_images(paths: list) -> tuple[dict[int, Image], dict[int, str]]:
    """{index: image} of the paths that load and {index: reason} of those that do not."""
    from minivlm.data.images import load_image

    images, failures = {}, {}
    for i, p in enumerate(paths):
        try:
            images[i] = load_image(p)
        except MiniVLMError as err:
            failures[i] = str(err)
    return images, failures


def run(args: argparse.Namespace) -> int:
    from minivlm.backend import load
    from minivlm.text.checks import text_problem, user_texts

    for flag in ("top", "beam_size", "batch_size"):
        if getattr(args, flag, 1) < 1:
            raise MiniVLMError(f"--{flag.replace('_', '-')} must be at least 1")
    if args.command == "nlvr2":
        user_texts(args.statement, "statement")
    if args.command == "retrieve":
        user_texts(args.query, "query")
    paths = {"caption": lambda: args.images, "vqa": lambda: [args.image], "nlvr2": lambda: [args.left, args.right],
             "retrieve": lambda: list_images(args.images)}[args.command]()
    images, failures = load_images(paths)  # all images checked before the model is loaded
    if args.command in ("vqa", "nlvr2") and failures:
        raise MiniVLMError(next(iter(failures.values())))
    good = sorted(images)
    model = load(args.model, args.backend, args.device, int8=args.int8, bf16=args.bf16, int4=args.int4) if good else None
    if model is not None:
        model.batch_size = args.batch_size
    regions = dict(zip(good, model.regions([images[i] for i in good]))) if model is not None else {}

    if args.command == "caption":
        caps = dict(zip(good, model.caption([regions[i] for i in good], beam_size=args.beam_size))) if good else {}
        _emit(args, [{"image": str(p), "caption": caps[i]} if i in caps else {"image": str(p), "error": failures[i]}
                     for i, p in enumerate(paths)], [f"{paths[i]}\t{caps[i]}" for i in good])
        return _report(args.command, list(failures.values()))
    if args.command == "vqa":
        problems = {j: f"question {j + 1} {why}" for j, q in enumerate(args.questions) if (why := text_problem(q))}
        asked = [j for j in range(len(args.questions)) if j not in problems]
        scores = dict(zip(asked, model.answer_scores(regions[0], [args.questions[j] for j in asked], top_k=args.top)
                          if asked else []))
        doc = [{"image": str(args.image), "question": q, "error": problems[j]} if j in problems else
               {"image": str(args.image), "question": q, "answer": scores[j][0][0],
                "confidence": round(scores[j][0][1], 4),
                "top": [{"answer": a, "confidence": round(c, 4)} for a, c in scores[j]]}
               for j, q in enumerate(args.questions)]
        _emit(args, doc, [f"{args.questions[j]}\t" + ", ".join(f"{a} ({c:.2f})" for a, c in scores[j]) for j in asked])
        return _report(args.command, list(problems.values()))
    if args.command == "nlvr2":
        p = model.verify_proba([regions[0]], [regions[1]], [args.statement])[0]
        _emit(args, {"left": str(args.left), "right": str(args.right), "statement": args.statement,
                     "prediction": p > 0.5, "probability": round(p, 4)},
              [f"{'true' if p > 0.5 else 'false'} (p = {p:.3f})"])
        return 0
    ranked = [(good[k], s) for k, s in model.retrieve([regions[i] for i in good], args.query, top_k=args.top)] if good else []
    doc = {"query": args.query, "n_images": len(good),
           "results": [{"rank": r + 1, "image": str(paths[i]), "score": round(s, 4)} for r, (i, s) in enumerate(ranked)],
           "errors": [{"image": str(paths[i]), "error": why} for i, why in failures.items()]}
    _emit(args, doc, [f"{r + 1}\t{s:.3f}\t{paths[i]}" for r, (i, s) in enumerate(ranked)])
    return _report(args.command, list(failures.values()))
