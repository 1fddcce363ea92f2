"""Where one image's time goes: image file -> caption through MiniVLM's own code, stage by stage.

    python benchmarks/profile_stages.py [--threads 2] [--warmup 1] [--repeats 5] [--out benchmarks/results/profile.json]

The stages are the calls `MiniVLM.caption` makes (TEE-0 on a 600x600 canvas with 300 proposals and 50
regions, VG's 1600 classes; MiniLM greedy, exactly 20 tokens, KV cache), timed one after another:
  load/resize        load_image + letterbox + pad_to_canvas (the one image path of the package)
  backbone           EfficientNet-B0, strides 4-32
  BiFPN              3 BiFPN layers, P2-P6
  RPN+NMS            two 1x1 convs, top-k per level, box decoding, one class-agnostic NMS
  RoIAlign+head      RoIAlign 4x4, 2 FC, class / box / attribute heads, final NMS, top 50 -> Regions
  transformer prefix tags + regions -> inputs, their keys/values through the 12 layers (once)
  decoding steps     20 cached steps: [previous token, MASK] through 12 layers + the 30522-word head
  text               token ids -> caption string
Random weights (speed does not depend on them). Median over --repeats after --warmup; the table gives
each stage's share of the summed medians.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # see benchmarks/latency.py: spinning threads on a shared CPU

import torch  # noqa: E402

import latency  # noqa: E402  (benchmarks/latency.py, this script's folder is on the path)

TEE_SIZE, TOKENS, build_minivlm, make_image = latency.TEE_SIZE, latency.TOKENS, latency.build_minivlm, latency.make_image

from minivlm.data.images import load_image  # noqa: E402
from minivlm.io import write_json  # noqa: E402
from minivlm.tasks.caption_model import CachedSteps, build_prefix  # noqa: E402
from minivlm.tasks.decode import greedy_search, strip  # noqa: E402
from minivlm.vision.tee import letterbox, pad_to_canvas  # noqa: E402

STAGES = ["load/resize", "backbone", "BiFPN", "RPN+NMS", "RoIAlign+head", "transformer prefix", "decoding steps",
          "text"]


def one_image(model, path: Path) -> tuple[dict[str, float], str]:
    """One caption, the same calls as MiniVLM.caption (regions -> build_prefix -> generate), each stage timed."""
    det, cap, tok = model.detector, model.task("caption"), model.tokenizer
    times: dict[str, float] = {}
    t = time.perf_counter()

    def lap(name: str) -> None:
        nonlocal t
        now = time.perf_counter()
        times[name] = 1000 * (now - t)
        t = now

    pil = load_image(path)
    img, scale, size = letterbox(pil, det.cfg.image_size)
    canvas, hw = pad_to_canvas([img], det.cfg.image_size), [tuple(img.shape[1:])]
    lap("load/resize")
    feats = det.backbone(canvas)
    lap("backbone")
    feats = det.fpn(feats)
    lap("BiFPN")
    proposals, _ = det.rpn(feats, hw)
    lap("RPN+NMS")
    regions = det.to_regions(det.roi_head.detect(feats, proposals, hw, det.cfg.max_regions, canvas)[0], scale, size)
    lap("RoIAlign+head")
    prefix = build_prefix(tok, [regions], cap.cfg)
    stepper = CachedSteps(cap, prefix)
    lap("transformer prefix")
    tokens, _ = greedy_search(stepper, 1, TOKENS, cap.ids, cap.device, min_len=TOKENS)
    lap("decoding steps")
    text = tok.decode(strip(tokens, cap.ids)[0])
    lap("text")
    return times, text


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--out", type=Path, default=HERE / "results" / "profile.json")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    path = make_image(Path("runs/bench-latency/image.jpg"))
    model = build_minivlm()
    runs = []
    with torch.inference_mode():
        for r in range(args.warmup + args.repeats):
            times, text = one_image(model, path)
            if r >= args.warmup:
                runs.append(times)
        # the whole call, for comparison with the sum of the stages
        whole = []
        run = latency.minivlm_captioner(model)
        for _ in range(args.repeats):
            t = time.perf_counter()
            run([path])
            whole.append(1000 * (time.perf_counter() - t))
    med = {s: statistics.median(r[s] for r in runs) for s in STAGES}
    total = sum(med.values())
    rows = [{"stage": s, "median_ms": med[s], "share": med[s] / total,
             "min_ms": min(r[s] for r in runs), "max_ms": max(r[s] for r in runs)} for s in STAGES]
    result = {"env": {"torch": torch.__version__, "threads": torch.get_num_threads(), "warmup": args.warmup,
                      "repeats": args.repeats, "load_avg": list(os.getloadavg()),
                      "omp_wait_policy": os.environ["OMP_WAIT_POLICY"]},
              "setting": f"TEE-0 {TEE_SIZE}x{TEE_SIZE}, 300 proposals, 50 regions, 1600 classes; MiniLM greedy "
                         f"{TOKENS} tokens", "rows": rows, "sum_of_stages_ms": total,
              "whole_call_median_ms": statistics.median(whole), "caption": text}
    print(f"one 640x480 JPEG -> caption, {result['env']['threads']} threads, median of {args.repeats}")
    head = f"{'stage':<20} {'median ms':>10} {'share':>7} {'min-max ms':>14}"
    print(head + "\n" + "-" * len(head))
    for r in rows:
        print(f"{r['stage']:<20} {r['median_ms']:>10.1f} {100 * r['share']:>6.1f}% "
              f"{r['min_ms']:>6.1f}-{r['max_ms']:<7.1f}")
    print(f"{'sum of stages':<20} {total:>10.1f}\n{'whole call':<20} {result['whole_call_median_ms']:>10.1f}")
    write_json(args.out, result, indent=1)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
