"""Detector benchmark: train the demo TEE on a freshly generated synthetic world, report held-out mAP.

    python benchmarks/detector.py [--out runs/bench-detector] [--images 1000] [--epochs E | --max-steps N]

Prints a table, writes OUT/detector_benchmark.json and a picture of detections on test images
(OUT/detections.png). Training and evaluation run on whatever device is there (CPU is the target).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from minivlm.config import get_tee  # noqa: E402
from minivlm.data.synthetic import generate_world  # noqa: E402
from minivlm.data.world import World  # noqa: E402
from minivlm.io import write_json  # noqa: E402
from minivlm.vision.draw import contact_sheet, draw_regions, save_png  # noqa: E402
from minivlm.vision.train import DETECTOR_RECIPE, DetectorSetup, evaluate_detector, train_detector  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("runs/bench-detector"))
    p.add_argument("--images", type=int, default=1000, help="world size (70%% train, 15%% val, 15%% test)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--preset", default="tee-demo")
    p.add_argument("--image-size", type=int, default=None, help="canvas (default: the preset's)")
    p.add_argument("--epochs", type=int, default=DETECTOR_RECIPE.epochs)
    p.add_argument("--max-steps", type=int, default=None)
    p.add_argument("--lr", type=float, default=DETECTOR_RECIPE.lr)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--pictures", type=int, default=6, help="test images drawn into detections.png")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    t0 = time.perf_counter()
    world_root = args.out / "world"
    generate_world(world_root, args.images, args.seed, nlvr2_pairs=0)
    t_data = time.perf_counter() - t0

    cfg = dataclasses.replace(DETECTOR_RECIPE, epochs=args.epochs, max_steps=args.max_steps, lr=args.lr,
                              seed=args.seed)
    det_dir = args.out / "detector"
    t1 = time.perf_counter()
    model, last = train_detector(DetectorSetup(out=det_dir, data=world_root, preset=args.preset, image_size=args.image_size,
                                               eval_split=None, train=cfg))
    t_train = time.perf_counter() - t1

    world = World(world_root)
    t2 = time.perf_counter()
    test = evaluate_detector(model, world, "test")
    t_eval = time.perf_counter() - t2
    val = evaluate_detector(model, world, "val")

    inst = world.instances("test")
    ids = sorted(inst.images)[: args.pictures]
    paths = [world.image_path("test", inst.images[i]) for i in ids]
    drawn = [draw_regions(pth, r, max_boxes=10, min_score=0.3) for pth, r in zip(paths, model.extract(paths))]
    picture = save_png(contact_sheet(drawn, columns=3), args.out / "detections.png")

    tee = dataclasses.replace(get_tee(args.preset), image_size=model.cfg.image_size)
    result = {
        "preset": args.preset, "image_size": tee.image_size, "backbone": tee.backbone,
        "world_images": args.images, "train_images": len(world.instances(world.train_split()).images),
        "test_images": test["images"], "steps": last.get("step"), "epochs": args.epochs,
        "batch_size": cfg.batch_size, "lr": cfg.lr, "optimizer": cfg.optimizer, "schedule": cfg.schedule,
        "final_loss": last.get("loss"), "test_map50": test["map50"], "test_map": test["map"],
        "val_map50": val["map50"], "val_map": val["map"], "data_s": round(t_data, 1), "train_s": round(t_train, 1),
        "eval_s_per_image": round(t_eval / max(1, test["images"]), 4), "threads": torch.get_num_threads(),
        "device": "cuda" if torch.cuda.is_available() else f"cpu ({platform.processor() or platform.machine()})",
        "picture": str(picture),
    }
    write_json(args.out / "detector_benchmark.json", result, indent=1)
    rows = [("mAP@0.5 (test, held out)", f"{result['test_map50']:.3f}"), ("mAP@[.5:.95] (test)", f"{result['test_map']:.3f}"),
            ("mAP@0.5 (val)", f"{result['val_map50']:.3f}"), ("training steps", str(result["steps"])),
            ("training wall time (s)", f"{result['train_s']:.0f}"), ("world generation (s)", f"{result['data_s']:.0f}"),
            ("inference (s/image)", f"{result['eval_s_per_image']:.3f}"), ("canvas", f"{tee.image_size}x{tee.image_size}"),
            ("threads / device", f"{result['threads']} / {result['device']}")]
    width = max(len(r[0]) for r in rows)
    print(f"\nTEE detector on the synthetic world ({args.preset}, {result['train_images']} training images)")
    for name, value in rows:
        print(f"  {name:<{width}}  {value}")
    print(f"  JSON: {args.out / 'detector_benchmark.json'}\n  picture: {picture}")
    print(json.dumps({"test_map50": result["test_map50"]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
