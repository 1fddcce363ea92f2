"""`minivlm caption | vqa | nlvr2 | retrieve`: a model folder (`MiniVLM.save_pretrained`) on raw images.

    minivlm caption  MODEL IMG [IMG ...] [--beam-size N]
    minivlm vqa      MODEL IMG "question" ["question" ...] [--top K]
    minivlm nlvr2    MODEL LEFT RIGHT "statement"
    minivlm retrieve MODEL --images DIR --query "text" [--top K]

`--json` prints one JSON document instead of text. Every image is opened (by `load_image`) before the
model runs, so an unreadable image stops the command at once with its name (exit 1, no traceback).
`--backend auto` (the default) runs the ONNX graphs of `minivlm export MODEL` when they are there and
fresh, without importing PyTorch, and PyTorch otherwise (`minivlm.backend`); `torch` / `onnx` force one.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from minivlm.errors import MiniVLMError

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


def run(args: argparse.Namespace) -> int:
    from minivlm.backend import load
    from minivlm.data.images import load_image

    for flag in ("top", "beam_size", "batch_size"):
        if getattr(args, flag, 1) < 1:
            raise MiniVLMError(f"--{flag.replace('_', '-')} must be at least 1")
    paths = {"caption": lambda: args.images, "vqa": lambda: [args.image], "nlvr2": lambda: [args.left, args.right],
             "retrieve": lambda: list_images(args.images)}[args.command]()
    images = [load_image(p) for p in paths]  # all images checked before the model is loaded
    model = load(args.model, args.backend, args.device, int8=args.int8)
    model.batch_size = args.batch_size
    regions = model.regions(images)

    if args.command == "caption":
        caps = model.caption(regions, beam_size=args.beam_size)
        _emit(args, [{"image": str(p), "caption": c} for p, c in zip(paths, caps)],
              [f"{p}\t{c}" for p, c in zip(paths, caps)])
    elif args.command == "vqa":
        scores = model.answer_scores(regions, args.questions, top_k=args.top)
        doc = [{"image": str(args.image), "question": q, "answer": s[0][0], "confidence": round(s[0][1], 4),
                "top": [{"answer": a, "confidence": round(c, 4)} for a, c in s]} for q, s in zip(args.questions, scores)]
        _emit(args, doc, [f"{q}\t" + ", ".join(f"{a} ({c:.2f})" for a, c in s) for q, s in zip(args.questions, scores)])
    elif args.command == "nlvr2":
        p = model.verify_proba(regions[:1], regions[1:], [args.statement])[0]
        _emit(args, {"left": str(args.left), "right": str(args.right), "statement": args.statement,
                     "prediction": p > 0.5, "probability": round(p, 4)},
              [f"{'true' if p > 0.5 else 'false'} (p = {p:.3f})"])
    else:
        ranked = model.retrieve(regions, args.query, top_k=args.top)
        doc = {"query": args.query, "n_images": len(paths),
               "results": [{"rank": r + 1, "image": str(paths[i]), "score": round(s, 4)} for r, (i, s) in enumerate(ranked)]}
        _emit(args, doc, [f"{r + 1}\t{s:.3f}\t{paths[i]}" for r, (i, s) in enumerate(ranked)])
    return 0
