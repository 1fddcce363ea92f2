"""Caption decoding speed: key/value-cached vs recompute-everything, greedy and beam search.

    python benchmarks/decoding.py [--presets minilm bert-demo] [--images 3] [--max-len 20] [--beams 1 3]
                                  [--threads 1] [--device cpu] [--out benchmarks/results/decoding.json]

For each transformer preset (random weights: speed does not depend on them), each of a few images with
the preset's region count (50 for minilm) and a tag segment is captioned one image at a time (the paper's
per-image setting) with exactly `--max-len` tokens (min_len = max_len, so both decoders do the same
work), first with the KV cache, then recomputing everything at every step. Both must produce the same
tokens (checked). The speed-up is the ratio of the two mean times measured in the same run, on the same
images, interleaved, so machine load affects both alike.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from minivlm.config import get_bert  # noqa: E402
from minivlm.io import write_json  # noqa: E402
from minivlm.regions import Regions  # noqa: E402
from minivlm.tasks.caption_model import CaptionModel, build_prefix  # noqa: E402
from minivlm.text.tokenizer import get_tokenizer  # noqa: E402

TAG_NAMES = ["man", "horse", "grass", "tree", "sky", "fence", "hat", "shirt", "cloud", "dog", "field", "road"]


def random_regions(k: int, dim: int, seed: int) -> Regions:
    g = torch.Generator().manual_seed(seed)
    xy = torch.rand(k, 2, generator=g) * 300
    wh = torch.rand(k, 2, generator=g) * 300 + 4
    labels = torch.randint(len(TAG_NAMES), (k,), generator=g)
    return Regions(boxes=torch.cat([xy, xy + wh], 1), features=torch.rand(k, dim, generator=g), scores=torch.rand(k, generator=g),
                   labels=labels, image_size=(640, 480), tags=[TAG_NAMES[i] for i in labels.tolist()])


def timed(fn, device: torch.device) -> tuple[float, object]:
    if device.type == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    out = fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t, out


def bench_preset(name: str, images: int, max_len: int, beams: list[int], device: torch.device) -> list[dict]:
    tok = get_tokenizer()
    cfg = get_bert(name)
    cfg.dropout = 0.0
    torch.manual_seed(0)
    model = CaptionModel(cfg).to(device).eval()
    prefixes = [build_prefix(tok, [random_regions(cfg.max_regions, cfg.region_dim, seed=i)], cfg).to(device)
                for i in range(images)]
    rows = []
    for beam in beams:
        # warm-up (allocator, kernels) on one image, both ways
        for use_cache in (True, False):
            model.generate(prefixes[0], max_len=max_len, min_len=max_len, beam_size=beam, use_cache=use_cache)
        times: dict[bool, list[float]] = {True: [], False: []}
        same = True
        for p in prefixes:
            t_c, cached = timed(lambda: model.generate(p, max_len=max_len, min_len=max_len, beam_size=beam), device)
            t_u, full = timed(lambda: model.generate(p, max_len=max_len, min_len=max_len, beam_size=beam,
                                                     use_cache=False), device)
            times[True].append(t_c)
            times[False].append(t_u)
            same = same and cached == full
        c_ms = [1000 * t for t in times[True]]
        u_ms = [1000 * t for t in times[False]]
        rows.append({
            "preset": name, "layers": cfg.num_layers, "hidden": cfg.hidden_size, "intermediate": cfg.intermediate_size,
            "regions": cfg.max_regions, "tag_tokens": int(prefixes[0].tag_mask.sum()), "tokens": max_len,
            "beam": beam, "images": images,
            "cached_ms_mean": statistics.mean(c_ms), "cached_ms_std": statistics.pstdev(c_ms),
            "uncached_ms_mean": statistics.mean(u_ms), "uncached_ms_std": statistics.pstdev(u_ms),
            "speedup": statistics.mean(u_ms) / statistics.mean(c_ms), "same_tokens": same,
        })
        r = rows[-1]
        print(f"  {name} beam {beam}: cached {r['cached_ms_mean']:.1f} ms, uncached {r['uncached_ms_mean']:.1f} ms, "
              f"x{r['speedup']:.2f}, same tokens: {same}", flush=True)
    return rows


def format_table(rows: list[dict]) -> str:
    head = f"{'preset':<10} {'L/H/I':<13} {'regions':>7} {'tags':>4} {'tokens':>6} {'beam':>4} " \
           f"{'cached ms/img':>15} {'uncached ms/img':>17} {'speed-up':>8} {'same':>5}"
    lines = [head, "-" * len(head)]
    for r in rows:
        shape = f"{r['layers']}/{r['hidden']}/{r['intermediate']}"
        lines.append(f"{r['preset']:<10} {shape:<13} {r['regions']:>7} "
                     f"{r['tag_tokens']:>4} {r['tokens']:>6} {r['beam']:>4} "
                     f"{r['cached_ms_mean']:>8.1f} ± {r['cached_ms_std']:<5.1f}"
                     f"{r['uncached_ms_mean']:>10.1f} ± {r['uncached_ms_std']:<5.1f}"
                     f"{r['speedup']:>7.2f}x {str(r['same_tokens']):>5}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--presets", nargs="+", default=["minilm", "bert-demo"])
    p.add_argument("--images", type=int, default=3)
    p.add_argument("--max-len", type=int, default=20)
    p.add_argument("--beams", type=int, nargs="+", default=[1, 3])
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results" / "decoding.json")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    env = {"device": str(device), "torch": torch.__version__, "threads": torch.get_num_threads(),
           "cpu": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
           "load_avg_start": list(os.getloadavg()),
           "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None}
    print(f"decoding benchmark on {env['device']} ({env['threads']} threads, load {env['load_avg_start'][0]:.1f})")
    rows = []
    with torch.inference_mode():
        for name in args.presets:
            rows += bench_preset(name, args.images, args.max_len, args.beams, device)
    env["load_avg_end"] = list(os.getloadavg())
    print()
    print(format_table(rows))
    write_json(args.out, {"env": env, "rows": rows}, indent=1)
    print(f"\nwrote {args.out}")
    return 0 if all(r["same_tokens"] for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
