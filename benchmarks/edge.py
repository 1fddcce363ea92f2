"""Edge inference: PyTorch eager fp32 vs ONNX Runtime fp32, int8 and int8 with the caption step's weights in 4 bits
(`--int4`) (and, where the CPU has bfloat16 units, each with the detector's backbone in bfloat16 on OpenVINO:
`--bf16`), speed and quality.

    python benchmarks/edge.py [--model runs/demo/model] [--world runs/demo/world] [--split test]
                              [--images 60] [--latency-images 10] [--repeats 5] [--threads 1]
                              [--edge DIR] [--out benchmarks/results/edge.json]

The model folder is exported (`minivlm export --int4 --bf16`, which writes the int8 graphs too) into `--edge` (default: a temporary folder), then:

* latency: image file -> greedy caption, one image at a time (the paper's per-image setting), for the
  first `--latency-images` images; after one warm-up image per system, every image is run `--repeats`
  times by each system in turn (interleaved, so machine load hits all three alike). Reported: the median
  over all runs, and each system's ratio to PyTorch eager (speed-up = PyTorch ms / system ms). The
  detector alone (image file -> regions) is timed the same way.
* quality: captions of the first `--images` images of the split (CIDEr against their references, PTB
  tokenizer) and every VQA question on those images (official VQA accuracy), for each system, with the
  share of captions / answers identical to PyTorch's.

All three run on `--threads` CPU threads (torch.set_num_threads and onnxruntime's intra-op threads).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

# The repository instead of this script's folder first on the path: a benchmark named like a standard
# module (profile.py) would otherwise shadow it for everything that imports it (torch._dynamo -> cProfile).
sys.path[0] = str(Path(__file__).resolve().parents[1])

from minivlm.data.world import World  # noqa: E402
from minivlm.edge import EdgeMiniVLM, cpu_has_bf16  # noqa: E402
from minivlm.eval.caption_metrics import score_captions  # noqa: E402
from minivlm.eval.vqa_eval import vqa_accuracy  # noqa: E402
from minivlm.export import export_model  # noqa: E402
from minivlm.io import write_json  # noqa: E402
from minivlm.model import MiniVLM  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
# name -> EdgeMiniVLM options (the first system, PyTorch, is the reference)
EDGE = {"onnxruntime_fp32": {}, "onnxruntime_int8": {"int8": True}, "onnxruntime_int4": {"int4": True}}
if cpu_has_bf16():
    EDGE.update({"bf16_detector_fp32": {"bf16": True}, "bf16_detector_int8": {"bf16": True, "int8": True},
                 "bf16_detector_int4": {"bf16": True, "int4": True}})
SYSTEMS = ("pytorch_fp32", *EDGE)


def load_systems(model_dir: Path, edge_dir: Path, threads: int) -> dict:
    return {"pytorch_fp32": MiniVLM.from_pretrained(model_dir, backend="torch").eval(),
            **{name: EdgeMiniVLM(edge_dir, threads=threads, **options) for name, options in EDGE.items()}}


def latency(systems: dict, paths: list[Path], repeats: int) -> dict[str, dict[str, float]]:
    """Median ms per image: image file -> caption, and image file -> regions."""
    out = {}
    for what, call in (("caption", lambda m, p: m.caption([p])), ("detector", lambda m, p: m.regions([p]))):
        for m in systems.values():
            call(m, paths[0])  # warm-up: sessions, allocator, caches
        times: dict[str, list[float]] = {name: [] for name in systems}
        for _ in range(repeats):
            for p in paths:
                for name, m in systems.items():
                    t = time.perf_counter()
                    call(m, p)
                    times[name].append(1000 * (time.perf_counter() - t))
        out[what] = {name: statistics.median(ts) for name, ts in times.items()}
        print(f"  {what}: " + ", ".join(f"{n} {v:.1f} ms" for n, v in out[what].items()), flush=True)
    return out


def quality(systems: dict, world: World, split: str, n_images: int) -> tuple[dict, dict]:
    caps = world.captions(split)
    ids = [iid for iid in sorted(caps.captions) if caps.captions[iid]][:n_images]
    paths = [world.image_path(split, caps.images[i]) for i in ids]
    refs = {i: caps.captions[i] for i in ids}
    questions = [q for q in world.vqa(split) if q.image_id in set(ids) and q.answers]
    index = {i: k for k, i in enumerate(ids)}
    captions, answers, scores = {}, {}, {}
    for name, m in systems.items():
        regions = m.regions(paths)  # once per image: the questions reuse them
        captions[name] = dict(zip(ids, m.caption(regions)))
        answers[name] = dict(zip([q.question_id for q in questions],
                                 m.answer([regions[index[q.image_id]] for q in questions], [q.question for q in questions])))
        cider = score_captions(captions[name], refs, meteor=False, spice=False)["CIDEr"]
        vqa = vqa_accuracy(answers[name], questions)["overall"]
        scores[name] = {"CIDEr": 100 * cider, "vqa_accuracy": vqa,
                        "captions_same_as_pytorch": _same(captions[name], captions[SYSTEMS[0]]),
                        "answers_same_as_pytorch": _same(answers[name], answers[SYSTEMS[0]])}
        print(f"  {name}: CIDEr {scores[name]['CIDEr']:.2f}, VQA {vqa:.2f}", flush=True)
    sizes = {"images": len(ids), "questions": len(questions)}
    return scores, {"sizes": sizes, "captions": {n: {str(k): v for k, v in c.items()} for n, c in captions.items()}}


def _same(a: dict, b: dict) -> float:
    return sum(a[k] == b[k] for k in b) / max(1, len(b))


def format_table(lat: dict, scores: dict) -> str:
    base_c, base_d = lat["caption"][SYSTEMS[0]], lat["detector"][SYSTEMS[0]]
    ref = scores[SYSTEMS[0]]
    head = (f"{'system':<18} {'caption ms/img':>14} {'speed-up':>8} {'detector ms':>11} {'speed-up':>8} "
            f"{'CIDEr':>6} {'% of PT':>7} {'VQA acc':>7} {'% of PT':>7} {'same cap':>8} {'same ans':>8}")
    lines = [head, "-" * len(head)]
    for name in SYSTEMS:
        c, d, s = lat["caption"][name], lat["detector"][name], scores[name]
        lines.append(f"{name:<18} {c:>14.1f} {base_c / c:>7.2f}x {d:>11.1f} {base_d / d:>7.2f}x "
                     f"{s['CIDEr']:>6.2f} {100 * s['CIDEr'] / ref['CIDEr']:>6.1f}% "
                     f"{s['vqa_accuracy']:>7.2f} {100 * s['vqa_accuracy'] / ref['vqa_accuracy']:>6.1f}% "
                     f"{100 * s['captions_same_as_pytorch']:>7.1f}% {100 * s['answers_same_as_pytorch']:>7.1f}%")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, default=ROOT / "runs" / "demo" / "model")
    p.add_argument("--world", type=Path, default=ROOT / "runs" / "demo" / "world")
    p.add_argument("--split", default="test")
    p.add_argument("--images", type=int, default=60, help="images of the quality check")
    p.add_argument("--latency-images", type=int, default=10)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--edge", type=Path, default=None, help="export folder (default: a temporary one)")
    p.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results" / "edge.json")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    env = {"torch": torch.__version__, "onnxruntime": __import__("onnxruntime").__version__,
           "threads": args.threads, "cpu": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
           "load_avg_start": list(os.getloadavg()), "model": str(args.model), "world": str(args.world),
           "split": args.split}
    print(f"edge benchmark: {args.model} on {args.threads} thread(s), load {env['load_avg_start'][0]:.1f}")
    with tempfile.TemporaryDirectory() as tmp:
        edge_dir = args.edge or Path(tmp) / "edge"
        t = time.perf_counter()
        export_model(args.model, edge_dir, int8=True, bf16=True, int4=True)
        env["export_s"] = time.perf_counter() - t
        env["graph_mb"] = {f.name: round(f.stat().st_size / 2**20, 1) for f in sorted(edge_dir.glob("*.onnx"))}
        systems = load_systems(args.model, edge_dir, args.threads)
        world = World(args.world)
        caps = world.captions(args.split)
        lat_ids = [i for i in sorted(caps.captions) if caps.captions[i]][: args.latency_images]
        with torch.inference_mode():
            print("latency (median ms per image):")
            lat = latency(systems, [world.image_path(args.split, caps.images[i]) for i in lat_ids], args.repeats)
            print(f"quality on {args.split}:")
            scores, detail = quality(systems, world, args.split, args.images)
    env["load_avg_end"] = list(os.getloadavg())
    print()
    print(format_table(lat, scores))
    rows = [{"system": n, "caption_ms": lat["caption"][n], "caption_speedup": lat["caption"][SYSTEMS[0]] / lat["caption"][n],
             "detector_ms": lat["detector"][n], "detector_speedup": lat["detector"][SYSTEMS[0]] / lat["detector"][n],
             **scores[n], "CIDEr_ratio": scores[n]["CIDEr"] / scores[SYSTEMS[0]]["CIDEr"],
             "vqa_ratio": scores[n]["vqa_accuracy"] / scores[SYSTEMS[0]]["vqa_accuracy"]} for n in SYSTEMS]
    settings = {"latency_images": len(lat_ids), "repeats": args.repeats, **detail["sizes"]}
    write_json(args.out, {"env": env, "settings": settings, "rows": rows, "captions": detail["captions"]}, indent=1)
    print(f"\nwrote {args.out}")
    for name in ("onnxruntime_int8", "onnxruntime_int4"):
        row = rows[SYSTEMS.index(name)]
        ok = row["caption_speedup"] >= 2 and row["CIDEr_ratio"] >= 0.99 and row["vqa_ratio"] >= 0.99
        print(f"{name} goal (>= 2x PyTorch eager, >= 99% of its CIDEr and VQA accuracy): {'met' if ok else 'NOT met'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
