"""Scale of the feature store (issue 18): a store of N images (default 1,000,000) with small features in
many shards, written by the real `FeatureStoreWriter` and read by the real `FeatureStore`.

    python benchmarks/store_scale.py [--images 1000000] [--regions 2] [--dim 8] [--shard-size 256]

Reports: the write rate; opening the store (construction plus the first lookup, which builds the key index
from the shard headers); resident memory over many random reads (it must stay flat: shards are memory-mapped
on demand and at most a few stay open); and a resumed write of more images, which must append new shards
without touching the existing ones. Prints a table, writes JSON (benchmarks/results/store_scale.json).
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from minivlm.data.feature_store import FeatureStore, FeatureStoreWriter  # noqa: E402
from minivlm.regions import Regions  # noqa: E402


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:")) / 1024


def regions(i: int, k: int, dim: int) -> Regions:
    return Regions(boxes=torch.full((k, 4), float(i % 97)), features=torch.full((k, dim), float(i % 13)),
                   scores=torch.ones(k), labels=torch.zeros(k, dtype=torch.long), image_size=(64, 48))


def write(root: Path, keys: range, k: int, dim: int, shard_size: int) -> float:
    t = time.perf_counter()
    with FeatureStoreWriter(root, shard_size=shard_size, meta={"class_names": ["thing"], "feature_dim": dim}) as w:
        for i in w.todo(keys):
            w.add(i, regions(i, k, dim))
    return time.perf_counter() - t


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=1_000_000)
    p.add_argument("--regions", type=int, default=2, help="regions per image")
    p.add_argument("--dim", type=int, default=8, help="feature width")
    p.add_argument("--shard-size", type=int, default=256)
    p.add_argument("--reads", type=int, default=20_000, help="random reads, in 4 rounds")
    p.add_argument("--append", type=int, default=1_000, help="images added by the resumed write")
    p.add_argument("--dir", type=Path, default=None, help="store folder (default: a temporary one)")
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "store_scale.json")
    args = p.parse_args(argv)

    with tempfile.TemporaryDirectory() as tmp:
        root = args.dir or Path(tmp) / "store"
        print(f"writing {args.images:,} images to {root} ...", flush=True)
        write_s = write(root, range(args.images), args.regions, args.dim, args.shard_size)
        shards = sorted(root.glob("shard-*.safetensors"))
        size_mb = sum(s.stat().st_size for s in shards) / 2 ** 20

        t = time.perf_counter()
        store = FeatureStore(root)
        first = store[args.images // 2]
        open_s = time.perf_counter() - t
        assert float(first.features[0, 0]) == float((args.images // 2) % 13)
        rng = random.Random(0)
        rss = [rss_mb()]
        t = time.perf_counter()
        for _ in range(4):
            for key in rng.sample(range(args.images), args.reads // 4):
                r = store[key]
                assert len(r) == args.regions
            rss.append(rss_mb())
        read_us = (time.perf_counter() - t) / args.reads * 1e6

        before = {s.name: (s.stat().st_mtime_ns, s.stat().st_size) for s in shards}
        append_s = write(root, range(args.images + args.append), args.regions, args.dim, args.shard_size)
        after = {s.name: (s.stat().st_mtime_ns, s.stat().st_size) for s in root.glob("shard-*.safetensors")}
        untouched = all(after.get(n) == v for n, v in before.items())
        new_shards = len(after) - len(before)
        store.refresh()
        assert len(store) == args.images + args.append

    result = {
        "images": args.images, "regions_per_image": args.regions, "feature_dim": args.dim, "shards": len(shards),
        "store_mb": round(size_mb, 1), "write_s": round(write_s, 1), "write_images_per_s": round(args.images / write_s),
        "open_and_first_read_s": round(open_s, 3), "random_reads": args.reads, "read_us": round(read_us, 1),
        "rss_mb_after_open_and_each_quarter_of_reads": [round(x, 1) for x in rss],
        "resumed_write": {"images_added": args.append, "seconds": round(append_s, 2), "new_shards": new_shards,
                          "existing_shards_untouched": untouched},
        "goals": {"open_under_1s": open_s < 1.0, "reads_flat_in_memory": rss[-1] - rss[1] < 20,
                  "resume_appends_without_rewriting": untouched},
    }
    rows = [("images / shards / size", f"{args.images:,} / {len(shards):,} / {size_mb:,.0f} MB"),
            ("write (FeatureStoreWriter)", f"{write_s:.0f} s, {args.images / write_s:,.0f} images/s"),
            ("open + first read (index from headers)", f"{open_s:.3f} s (goal < 1 s)"),
            (f"{args.reads:,} random reads", f"{read_us:.0f} us each"),
            ("RSS after open, then after each quarter of reads", " / ".join(f"{x:.0f}" for x in rss) + " MB"),
            (f"resumed write of {args.append:,} more images", f"{append_s:.2f} s, {new_shards} new shards, "
                                                              f"existing shards untouched: {untouched}")]
    print("| measure | result |\n|---|---|")
    for name, value in rows:
        print(f"| {name} | {value} |")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
