"""Latency, throughput and peak memory of MiniVLM against its baselines, measured side by side.

    python benchmarks/latency.py [--threads 2] [--warmup 1] [--repeats 3] [--batches 1 8 32]
                                 [--sections vision transformer e2e throughput memory]
                                 [--out benchmarks/results/latency.json]

Sections (every model has random weights: nothing is downloaded and speed does not depend on weights):
  vision       TEE-0 on a 600x600 canvas (300 proposals, 50 regions) vs R101-F on 600x800 (300 proposals),
               one image, from the normalised image tensor: the paper's Sec. 4.2 comparison (3.2% there).
  transformer  captioning one image with MiniLM vs BERT-base: the same 50 regions and tags, greedy, exactly
               20 tokens, KV-cached (paper: 346.7 vs 712.6 ms, 48.7%).
  e2e          image file -> caption text. MiniVLM (TEE-0 600 px + MiniLM, 50 regions, 20 tokens) against
               Hugging Face BLIP-base (ViT-B/16 384 px + BERT-base decoder) and GIT-base (CLIP ViT-B/16
               224 px + 6-layer decoder), each from its own default config, greedy, exactly 20 new tokens,
               with each model's own preprocessing (BlipImageProcessor / CLIPImageProcessor).
  throughput   MiniVLM images per second, image files -> captions, batches of --batches images.
  memory       peak memory of each model above, each in a FRESH subprocess (see `probe_memory`).

Timing: models of one comparison live in one process and are run interleaved (A B A B ...) after
--warmup untimed rounds, so load from other processes hits them alike; the median of --repeats is
reported and comparisons are quoted as ratios of medians. Threads: the paper used 4 on a Xeon E5-2620;
this machine has 2 cores (shared), so --threads defaults to 2 (torch.set_num_threads), with
OMP_WAIT_POLICY=PASSIVE unless it is set already.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

# OpenMP threads that busy-wait between ops fight the other processes on a shared CPU: with 2 spinning threads
# one MiniVLM caption took 2-12 s here instead of 1.1 s. Passive waiting must be set before torch loads libgomp.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from minivlm.config import get_bert, get_butd, get_tee  # noqa: E402
from minivlm.io import write_json  # noqa: E402
from minivlm.regions import Regions  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
TEE_SIZE = 600  # TEE-0's canvas in the paper's cost setting (README "Cost"); R101-F: shorter side 600
BUTD_HW = (600, 800)
TOKENS = 20  # the paper's caption length; every model is forced to exactly this many new tokens
GOALS = {"vision": 0.02, "transformer": 0.35, "e2e_blip": 8.0}
TAGS = ["man", "horse", "grass", "tree", "sky", "fence", "hat", "shirt", "cloud", "dog", "field", "road"]


# ---------------------------------------------------------------------------------------------- inputs


def make_image(path: Path, size: tuple[int, int] = (640, 480), seed: int = 0) -> Path:
    """A 640x480 JPEG (COCO's typical size) with smooth shapes and noise, so decoding it costs what a photo does."""
    rng = np.random.default_rng(seed)
    w, h = size
    yy, xx = np.mgrid[0:h, 0:w]
    img = np.stack([128 + 100 * np.sin(xx / (20 + 10 * c) + c) * np.cos(yy / 30) for c in range(3)], -1)
    img += rng.normal(0, 12, img.shape)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(path, quality=90)
    return path


def random_regions(k: int, dim: int, seed: int) -> Regions:
    g = torch.Generator().manual_seed(seed)
    xy = torch.rand(k, 2, generator=g) * 300
    wh = torch.rand(k, 2, generator=g) * 300 + 4
    labels = torch.randint(len(TAGS), (k,), generator=g)
    return Regions(boxes=torch.cat([xy, xy + wh], 1), features=torch.rand(k, dim, generator=g),
                   scores=torch.rand(k, generator=g), labels=labels, image_size=(640, 480),
                   tags=[TAGS[i] for i in labels.tolist()])


# ---------------------------------------------------------------------------------------------- models


def build_tee():
    """TEE-0 with Visual Genome's 1600 classes / 400 attributes on a 600-px canvas."""
    from minivlm.vision.tee import TEE

    torch.manual_seed(0)
    return TEE(dataclasses.replace(get_tee("tee0"), image_size=TEE_SIZE)).eval()


def build_butd():
    from minivlm.vision.butd import BUTD

    torch.manual_seed(0)
    return BUTD(get_butd("butd-r101")).eval()


def build_caption(preset: str):
    from minivlm.tasks.caption_model import CaptionModel

    cfg = get_bert(preset)
    cfg.dropout = 0.0
    torch.manual_seed(0)
    return CaptionModel(cfg).eval()


def build_minivlm(batch_size: int = 16):
    from minivlm.model import MiniVLM

    return MiniVLM(build_tee(), {"caption": build_caption("minilm")}, batch_size=batch_size).eval()


def minivlm_captioner(model) -> Callable[[list], list[str]]:
    """Image files -> captions through MiniVLM's own path (`MiniVLM.regions` -> `build_prefix` ->
    `CaptionModel.generate`), as `MiniVLM.caption` does, but with min_len = max_len = 20 so that every
    model writes the same number of tokens."""
    from minivlm.tasks.caption_model import build_prefix

    cap, tok = model.task("caption"), model.tokenizer

    def run(paths: list) -> list[str]:
        model.batch_size = len(paths)
        prefix = build_prefix(tok, model.regions(paths), cap.cfg)
        return [tok.decode(ids) for ids in cap.generate(prefix, max_len=TOKENS, min_len=TOKENS)]
    return run


def hf_captioner(kind: str) -> tuple[torch.nn.Module, Callable[[list], list[str]]]:
    """BLIP-base or GIT-base from its default config (random weights), with its own image processor."""
    import transformers as tf

    from minivlm.data.images import load_image
    from minivlm.text.tokenizer import get_tokenizer

    torch.manual_seed(0)
    if kind == "blip":
        model, proc = tf.BlipForConditionalGeneration(tf.BlipConfig()).eval(), tf.BlipImageProcessor()
    else:
        model, proc = tf.GitForCausalLM(tf.GitConfig()).eval(), tf.CLIPImageProcessor()
    tok = get_tokenizer()  # both use bert-base-uncased's WordPiece vocabulary

    def run(paths: list) -> list[str]:
        pixels = proc(images=[load_image(p) for p in paths], return_tensors="pt")["pixel_values"]
        out = model.generate(pixel_values=pixels, max_new_tokens=TOKENS, min_new_tokens=TOKENS, do_sample=False,
                             num_beams=1)
        run.new_tokens = out.shape[1] - (1 if kind == "blip" else 1)  # both start from one [CLS]/BOS token
        return [tok.decode([t for t in row if t < tok.vocab_size]) for row in out.tolist()]
    return model, run


# ---------------------------------------------------------------------------------------------- timing


def interleaved(fns: dict[str, Callable[[], object]], warmup: int, repeats: int) -> dict[str, dict]:
    """Runs every function warmup + repeats times, round robin; median and spread of the timed runs (ms)."""
    times: dict[str, list[float]] = {k: [] for k in fns}
    for r in range(warmup + repeats):
        for name, fn in fns.items():
            t = time.perf_counter()
            fn()
            if r >= warmup:
                times[name].append(1000 * (time.perf_counter() - t))
    return {k: {"median_ms": statistics.median(v), "min_ms": min(v), "max_ms": max(v), "runs": len(v)}
            for k, v in times.items()}


def _status_mb(field: str) -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":")) / 1024


def rss_mb() -> float:
    return _status_mb("VmRSS")


def peak_rss_mb() -> float:
    """The process's resident high-water mark. VmHWM, not getrusage's ru_maxrss: a child keeps the ru_maxrss
    of the parent it was forked from (here 5.5 GB after the batch-32 run), while exec starts a fresh VmHWM."""
    return _status_mb("VmHWM")


# ---------------------------------------------------------------------------------------------- sections


def bench_vision(image: Path, warmup: int, repeats: int) -> dict:
    from minivlm.vision.tee import letterbox, pad_to_canvas

    tee, butd = build_tee(), build_butd()
    t, _, _ = letterbox(image, TEE_SIZE)
    canvas, hw = pad_to_canvas([t], TEE_SIZE), [tuple(t.shape[1:])]
    x = torch.nn.functional.interpolate(t[None], size=BUTD_HW, mode="bilinear", align_corners=False)
    res = interleaved({"tee0": lambda: tee.detect(canvas, hw, 50), "butd-r101": lambda: butd(x)}, warmup, repeats)
    ratio = res["tee0"]["median_ms"] / res["butd-r101"]["median_ms"]
    return {"rows": res, "ratio": ratio, "goal": GOALS["vision"], "met": ratio <= GOALS["vision"], "paper": 0.032,
            "setting": f"TEE-0 {TEE_SIZE}x{TEE_SIZE} canvas, 300 proposals, 50 regions; R101-F {BUTD_HW[0]}x"
                       f"{BUTD_HW[1]}, 300 proposals; 1600 VG classes; from the normalised tensor"}


def bench_transformer(warmup: int, repeats: int) -> dict:
    from minivlm.tasks.caption_model import build_prefix
    from minivlm.text.tokenizer import get_tokenizer

    tok = get_tokenizer()
    models = {name: build_caption(name) for name in ("minilm", "bert-base")}
    regions = random_regions(50, 1024, seed=0)
    prefixes = {n: build_prefix(tok, [regions], m.cfg) for n, m in models.items()}
    res = interleaved({n: (lambda n=n: models[n].generate(prefixes[n], max_len=TOKENS, min_len=TOKENS))
                       for n in models}, warmup, repeats)
    ratio = res["minilm"]["median_ms"] / res["bert-base"]["median_ms"]
    return {"rows": res, "ratio": ratio, "goal": GOALS["transformer"], "met": ratio <= GOALS["transformer"],
            "paper": 346.7 / 712.6, "tag_tokens": int(prefixes["minilm"].tag_mask.sum()),
            "setting": "50 regions (1024-d), the same tags, greedy, KV cache, exactly 20 tokens, one image"}


def bench_e2e(image: Path, warmup: int, repeats: int) -> dict:
    mini = minivlm_captioner(build_minivlm())
    _, blip = hf_captioner("blip")
    _, git = hf_captioner("git")
    fns = {"minivlm": lambda: mini([image]), "blip-base": lambda: blip([image]), "git-base": lambda: git([image])}
    res = interleaved(fns, warmup, repeats)
    tokens = {"minivlm": TOKENS, "blip-base": blip.new_tokens, "git-base": git.new_tokens}
    for k in res:
        res[k]["new_tokens"] = tokens[k]
    m = res["minivlm"]["median_ms"]
    speedups = {k: res[k]["median_ms"] / m for k in ("blip-base", "git-base")}
    return {"rows": res, "speedup_vs_blip": speedups["blip-base"], "speedup_vs_git": speedups["git-base"],
            "goal": GOALS["e2e_blip"], "met": speedups["blip-base"] >= GOALS["e2e_blip"],
            "setting": "JPEG 640x480 file -> caption text, greedy, exactly 20 new tokens, batch 1"}


def bench_throughput(image: Path, batches: list[int], warmup: int, repeats: int) -> dict:
    model = build_minivlm()
    run = minivlm_captioner(model)
    paths = [make_image(image.parent / f"tp_{i}.jpg", seed=i) for i in range(max(batches))]
    rows = {}
    for b in batches:
        r = interleaved({f"batch {b}": lambda b=b: run(paths[:b])}, warmup, repeats)[f"batch {b}"]
        r["images_per_s"] = 1000 * b / r["median_ms"]
        r["ms_per_image"] = r["median_ms"] / b
        rows[b] = r
        print(f"  throughput batch {b}: {r['images_per_s']:.2f} images/s", flush=True)
    return {"rows": rows, "setting": "MiniVLM, distinct 640x480 JPEG files -> captions, 20 tokens each"}


# ---------------------------------------------------------------------------------------------- memory

PROBES = ["tee0", "butd-r101", "minilm", "bert-base", "minivlm", "blip-base", "git-base"]


def run_probe(name: str, image: Path, batch: int) -> dict:
    """In a fresh process: RSS after imports, after building the model, and the peak after one inference."""
    before = rss_mb()
    if name in ("tee0", "butd-r101"):
        from minivlm.vision.tee import letterbox, pad_to_canvas

        t, _, _ = letterbox(image, TEE_SIZE)
        if name == "tee0":
            m = build_tee()
            canvas, hw = pad_to_canvas([t], TEE_SIZE), [tuple(t.shape[1:])]
            fn = lambda: m.detect(canvas, hw, 50)  # noqa: E731
        else:
            m = build_butd()
            x = torch.nn.functional.interpolate(t[None], size=BUTD_HW, mode="bilinear", align_corners=False)
            fn = lambda: m(x)  # noqa: E731
    elif name in ("minilm", "bert-base"):
        from minivlm.tasks.caption_model import build_prefix
        from minivlm.text.tokenizer import get_tokenizer

        m = build_caption(name)
        prefix = build_prefix(get_tokenizer(), [random_regions(50, 1024, seed=0)], m.cfg)
        fn = lambda: m.generate(prefix, max_len=TOKENS, min_len=TOKENS)  # noqa: E731
    elif name == "minivlm":
        paths = [make_image(image.parent / f"tp_{i}.jpg", seed=i) for i in range(batch)]
        run = minivlm_captioner(build_minivlm())
        fn = lambda: run(paths)  # noqa: E731
    else:
        _, run = hf_captioner(name.split("-")[0])
        fn = lambda: run([image])  # noqa: E731
    built = rss_mb()
    with torch.inference_mode():
        fn()
    return {"rss_after_imports_mb": before, "rss_after_build_mb": built, "peak_rss_mb": peak_rss_mb(),
            "model_and_run_mb": peak_rss_mb() - before}


def probe_memory(image: Path, threads: int, batches: list[int]) -> dict:
    """Peak memory per model, each in a fresh subprocess (PyTorch's allocator keeps freed memory and
    tracemalloc does not see it, so only the OS's high-water mark of a process running just that model is
    honest). `peak_rss_mb` is VmHWM: everything resident at the worst moment, the Python + PyTorch
    runtime included; `model_and_run_mb` subtracts the RSS measured after the imports, before the model
    was built (weights + activations + workspace + the libraries loaded lazily)."""
    out = {}
    cases = [(p, 1) for p in PROBES] + [("minivlm", b) for b in batches if b > 1]
    for name, batch in cases:
        key = name if batch == 1 else f"{name} batch {batch}"
        cmd = [sys.executable, __file__, "--probe", name, "--probe-batch", str(batch), "--threads", str(threads),
               "--image", str(image)]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            out[key] = {"error": proc.stderr.strip().splitlines()[-1:]}
        else:
            out[key] = json.loads(proc.stdout.strip().splitlines()[-1])
        print(f"  memory {key}: {out[key]}", flush=True)
    return out


# ---------------------------------------------------------------------------------------------- report


def fmt(ms: float) -> str:
    return f"{ms:,.0f}" if ms >= 100 else f"{ms:.1f}"


def report(res: dict) -> str:
    mem = res.get("memory", {})

    def peak(k):
        m = mem.get(k, {})
        return f"{m['peak_rss_mb']:,.0f} / {m['model_and_run_mb']:,.0f}" if "peak_rss_mb" in m else "-"

    lines = [f"threads {res['env']['threads']}, warm-up {res['env']['warmup']}, median of {res['env']['repeats']} "
             f"(load average {res['env']['load_avg_start'][0]:.1f} at start); memory: peak RSS / over runtime, MB"]
    head = f"{'comparison':<28} {'model':<12} {'median ms':>10} {'min-max ms':>15} {'peak MB':>15}"
    lines += [head, "-" * len(head)]

    def rows(title, sec, names, memkeys):
        for i, n in enumerate(names):
            r = sec["rows"][n]
            lines.append(f"{title if i == 0 else '':<28} {n:<12} {fmt(r['median_ms']):>10} "
                         f"{fmt(r['min_ms']) + '-' + fmt(r['max_ms']):>15} {peak(memkeys[i]):>15}")
    if "vision" in res:
        rows("1 vision, per image", res["vision"], ["tee0", "butd-r101"], ["tee0", "butd-r101"])
    if "transformer" in res:
        rows("2 captioning transformer", res["transformer"], ["minilm", "bert-base"], ["minilm", "bert-base"])
    if "e2e" in res:
        rows("4 image file -> caption", res["e2e"], ["minivlm", "blip-base", "git-base"],
             ["minivlm", "blip-base", "git-base"])
    if "throughput" in res:
        lines.append("")
        lines.append(f"{'5 throughput (MiniVLM)':<28} {'batch':<6} {'images/s':>9} {'ms/image':>9} {'peak MB':>15}")
        for b, r in res["throughput"]["rows"].items():
            key = "minivlm" if int(b) == 1 else f"minivlm batch {b}"
            lines.append(f"{'':<28} {b:<6} {r['images_per_s']:>9.2f} {r['ms_per_image']:>9.0f} {peak(key):>15}")
    lines += ["", f"{'goal':<40} {'measured':>10} {'paper':>8}  met?"]
    if "vision" in res:
        v = res["vision"]
        lines.append(f"{'TEE-0 <= 2% of R101-F latency':<40} {100 * v['ratio']:>9.2f}% {100 * v['paper']:>7.1f}%  "
                     f"{'yes' if v['met'] else 'NO'}")
    if "transformer" in res:
        t = res["transformer"]
        lines.append(f"{'MiniLM <= 35% of BERT-base':<40} {100 * t['ratio']:>9.1f}% {100 * t['paper']:>7.1f}%  "
                     f"{'yes' if t['met'] else 'NO'}")
    if "e2e" in res:
        e = res["e2e"]
        lines.append(f"{'MiniVLM >= 8x faster than BLIP-base':<40} {e['speedup_vs_blip']:>9.1f}x {'-':>8}  "
                     f"{'yes' if e['met'] else 'NO'}")
        lines.append(f"{'(MiniVLM vs GIT-base, no goal)':<40} {e['speedup_vs_git']:>9.1f}x {'-':>8}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads (the paper: 4; this machine: 2 cores)")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32])
    p.add_argument("--sections", nargs="+", default=["vision", "transformer", "e2e", "throughput", "memory"])
    p.add_argument("--image", type=Path, default=None, help="a test image (default: a generated 640x480 JPEG)")
    p.add_argument("--out", type=Path, default=RESULTS / "latency.json")
    p.add_argument("--probe", help=argparse.SUPPRESS)  # internal: one memory probe in this fresh process
    p.add_argument("--probe-batch", type=int, default=1, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    image = args.image or make_image(Path("runs/bench-latency/image.jpg"))
    if args.probe:
        print(json.dumps(run_probe(args.probe, image, args.probe_batch)))
        return 0

    env = {"torch": torch.__version__, "threads": torch.get_num_threads(), "omp_wait_policy": os.environ["OMP_WAIT_POLICY"], "warmup": args.warmup,
           "repeats": args.repeats, "cpu": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
           "load_avg_start": list(os.getloadavg()), "image": str(image)}
    print(f"latency benchmark: {env['threads']} threads, warm-up {args.warmup}, {args.repeats} repeats, "
          f"load {env['load_avg_start'][0]:.1f}", flush=True)
    res: dict = {"env": env}
    t0 = time.perf_counter()
    with torch.inference_mode():
        if "vision" in args.sections:
            res["vision"] = bench_vision(image, args.warmup, args.repeats)
            print(f"  vision: TEE-0 / R101-F = {100 * res['vision']['ratio']:.2f}%", flush=True)
        if "transformer" in args.sections:
            res["transformer"] = bench_transformer(args.warmup, args.repeats)
            print(f"  transformer: MiniLM / BERT-base = {100 * res['transformer']['ratio']:.1f}%", flush=True)
        if "e2e" in args.sections:
            res["e2e"] = bench_e2e(image, args.warmup, args.repeats)
            print(f"  e2e: {res['e2e']['speedup_vs_blip']:.1f}x faster than BLIP-base, "
                  f"{res['e2e']['speedup_vs_git']:.1f}x than GIT-base", flush=True)
        if "throughput" in args.sections:
            res["throughput"] = bench_throughput(image, args.batches, args.warmup, args.repeats)
    if "memory" in args.sections:
        res["memory"] = probe_memory(image, args.threads, args.batches)
    env["load_avg_end"] = list(os.getloadavg())
    env["wall_s"] = round(time.perf_counter() - t0, 1)
    print()
    print(report(res))
    write_json(args.out, res, indent=1)
    print(f"\nwrote {args.out} ({env['wall_s']} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
