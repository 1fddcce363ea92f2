"""Data distillation (paper Sec. 3.2): a larger teacher captions unlabeled images, and the pseudo-captions
join the small model's pre-training corpus (the paper's OI-Caps-7M).

    minivlm distill --teacher MODEL_FOLDER --images DIR --out pseudo_captions.json

The output is a COCO captions file. Image ids are 1..N over the images sorted by relative path, and each
image's `file_name` is that relative path, the key `minivlm extract --images DIR` gives the same image in a
feature store; `minivlm pretrain --extra-captions FILE --extra-features STORE` joins the two.

The job is resumable: finished batches are appended to `OUT.partial.jsonl`; a rerun skips them, and the
final file is written atomically once every image is captioned.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from tqdm.auto import tqdm

from minivlm.data.images import load_image
from minivlm.errors import ImageError, MiniVLMError
from minivlm.inference import add_backend_arguments
from minivlm.io import write_json


def image_files(folder: str | Path) -> list[tuple[str, Path]]:
    from minivlm.vision.extract import folder_sources  # the same keys `extract --images` writes

    return folder_sources(folder)


def distill(teacher, folder: str | Path, out: str | Path, batch_size: int = 8, beam_size: int = 1,
            limit: int | None = None, teacher_name: str = "") -> dict:
    """Captions every image under `folder` with `teacher` (a `MiniVLM` or `EdgeMiniVLM`); returns a summary."""
    out = Path(out)
    files = image_files(folder)[:limit]
    partial = out.with_name(out.name + ".partial.jsonl")
    done: dict[str, dict] = {}
    if partial.is_file():
        for line in partial.read_text().splitlines():
            if line.strip():
                row = json.loads(line)
                done[row["file_name"]] = row
    todo = [(key, path) for key, path in files if key not in done]
    failed: list[tuple[str, str]] = []
    with open(partial, "a") as log, tqdm(total=len(files), initial=len(files) - len(todo), desc="distill") as bar:
        for start in range(0, len(todo), batch_size):
            chunk = todo[start:start + batch_size]
            images, keys = [], []
            for key, path in chunk:
                try:
                    images.append(load_image(path))
                    keys.append(key)
                except ImageError as err:
                    failed.append((key, str(err)))
            if images:
                captions = teacher.caption(images, beam_size=beam_size)
                for key, image, caption in zip(keys, images, captions):
                    row = {"file_name": key, "width": image.width, "height": image.height, "caption": caption}
                    done[key] = row
                    log.write(json.dumps(row) + "\n")
                log.flush()
            bar.update(len(chunk))
    rows = [done[key] for key, _ in files if key in done]
    coco = {
        "info": {"description": f"pseudo-captions written by the teacher {teacher_name}".strip()},
        "licenses": [],
        "images": [{"id": i + 1, "file_name": r["file_name"], "width": r["width"], "height": r["height"]}
                   for i, r in enumerate(rows)],
        "annotations": [{"id": i + 1, "image_id": i + 1, "caption": r["caption"]} for i, r in enumerate(rows)],
    }
    write_json(out, coco)
    partial.unlink(missing_ok=True)
    return {"images": len(rows), "failed": failed, "out": str(out)}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--teacher", required=True, help="teacher model folder (MiniVLM.save_pretrained)")
    parser.add_argument("--images", required=True, help="folder of unlabeled images (searched recursively)")
    parser.add_argument("--out", required=True, help="pseudo-captions, COCO captions JSON")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--beam-size", type=int, default=1, help="teacher's beam (offline, so it may be large)")
    parser.add_argument("--limit", type=int, help="caption only the first N images")
    add_backend_arguments(parser)


def run(args: argparse.Namespace) -> int:
    from minivlm.backend import load

    teacher = load(args.teacher, args.backend, args.device, int8=args.int8, bf16=args.bf16, int4=args.int4)
    if "caption" not in teacher.tasks:
        raise MiniVLMError(f"{args.teacher}: the teacher has no caption task (tasks: {', '.join(teacher.tasks)})")
    summary = distill(teacher, args.images, args.out, args.batch_size, args.beam_size, args.limit,
                      teacher_name=str(args.teacher))
    print(f"wrote {summary['images']} pseudo-captions to {summary['out']}")
    for key, reason in summary["failed"]:
        print(f"minivlm distill: error: skipped {key}: {reason}", file=sys.stderr)
    return 1 if summary["failed"] else 0
