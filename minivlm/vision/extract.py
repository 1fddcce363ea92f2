"""`minivlm extract`: images -> top-K regions per image (boxes, 1024-d features, tags) in a feature store.

The paper's setting: region features are extracted once, offline, and the transformer trains on them.
`OnTheFlyRegions` is the other way: the detector runs when an image's regions are first asked for
(`minivlm pretrain --detector`), for when storing features is not worth it.
Sources are the splits of a World (keys: COCO image ids) or a folder of images (keys: paths relative to
the folder). Under torchrun every rank takes its own share of the images (each image exactly once) and
writes its own shards; a rerun skips the images that complete shards already hold.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from tqdm.auto import tqdm

from minivlm.data.feature_store import FeatureStoreWriter
from minivlm.data.world import World
from minivlm.errors import ImageError, MiniVLMError
from minivlm.regions import Regions
from minivlm.vision.tee import TEE, letterbox, load_detector, pad_to_canvas

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"}


def world_sources(root: str | Path, splits: list[str] | None = None) -> list[tuple[int, Path]]:
    """(image id, path) for every image of the given COCO splits (default: all), instances or captions."""
    world = World(root)
    splits = splits or world.splits()
    if not splits:
        raise MiniVLMError(f"{root}: no annotations/instances_*.json or captions_*.json found")
    out: dict[int, Path] = {}
    for split in splits:
        has_inst = world.instances_path(split).is_file()
        images = (world.instances(split) if has_inst else world.captions(split)).images
        for iid in sorted(images):
            out.setdefault(iid, world.image_path(split, images[iid]))
    return list(out.items())


def folder_sources(folder: str | Path) -> list[tuple[str, Path]]:
    """(relative path, path) for every image file under `folder`, sorted."""
    folder = Path(folder)
    if not folder.is_dir():
        raise MiniVLMError(f"{folder}: not a folder")
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise MiniVLMError(f"{folder}: no image files ({', '.join(sorted(IMAGE_SUFFIXES))})")
    return [(p.relative_to(folder).as_posix(), p) for p in files]


@torch.no_grad()
def extract_to_store(model: TEE, sources: list[tuple[int | str, Path]], store: str | Path, batch_size: int = 8,
                     max_regions: int | None = None, shard_size: int = 256, rank: int = 0, world_size: int = 1,
                     dtype: str = "float16") -> dict:
    """Writes this rank's share of `sources` into the store; unreadable images are skipped and listed.
    Returns {"written", "skipped_done", "failed": [(key, reason)]}."""
    model.eval()
    device = next(model.parameters()).device
    cfg = model.cfg
    meta = {"class_names": model.class_names, "attribute_names": model.attribute_names,
            "extractor": {"name": cfg.name, "backbone": cfg.backbone, "image_size": cfg.image_size,
                          "max_regions": max_regions or cfg.max_regions}}
    paths = dict(sources)
    written, failed = 0, []
    with FeatureStoreWriter(store, rank, world_size, shard_size=shard_size, meta=meta, dtype=dtype) as writer:
        todo = writer.todo([k for k, _ in sources])
        mine = len([k for i, (k, _) in enumerate(sources) if i % world_size == rank])
        # closed on the way out of an error too, so the error message starts a line of its own
        with tqdm(total=len(todo), desc=f"extract r{rank}", dynamic_ncols=True, disable=not todo) as bar:
            for start in range(0, len(todo), batch_size):
                keys, chunk = [], []
                for key in todo[start:start + batch_size]:
                    try:
                        chunk.append(letterbox(paths[key], cfg.image_size))
                        keys.append(key)
                    except ImageError as err:
                        failed.append((key, str(err)))
                if chunk:
                    canvas = pad_to_canvas([c[0] for c in chunk], cfg.image_size).to(device)
                    dets = model.detect(canvas, [tuple(c[0].shape[1:]) for c in chunk], max_regions)
                    for key, det, (_, scale, size) in zip(keys, dets, chunk):
                        written += writer.add(key, model.to_regions(det, scale, size))
                bar.update(len(todo[start:start + batch_size]))
    return {"written": written, "skipped_done": mine - len(todo), "failed": failed}


class OnTheFlyRegions:
    """A region source (like a `FeatureStore`) that runs the detector on the image file when its regions are
    first read, and keeps them: pre-training revisits every image every epoch, and a demo-sized image's
    regions are ~40 kB in float16. Keys are those of `world_sources` / `folder_sources`."""

    def __init__(self, detector: TEE, sources: list[tuple[int | str, Path]], max_regions: int | None = None):
        self.detector = detector.eval()
        self.paths = dict(sources)
        self.max_regions = max_regions
        self.feature_dim = detector.cfg.feature_dim
        self.root = f"on-the-fly {detector.cfg.name}"
        self._cache: dict[int | str, Regions] = {}

    def __contains__(self, key: object) -> bool:
        return key in self.paths

    def __len__(self) -> int:
        return len(self.paths)

    def keys(self) -> list[int | str]:
        return list(self.paths)

    def __getitem__(self, key: int | str) -> Regions:
        if key not in self._cache:
            if key not in self.paths:
                raise KeyError(key)
            with torch.no_grad():
                r = self.detector.extract([self.paths[key]], max_regions=self.max_regions)[0]
            r.features = r.features.half()  # as a feature store keeps them
            self._cache[key] = r
        return self._cache[key]


def add_arguments(parser) -> None:
    parser.add_argument("--detector", type=Path, required=True, help="detector folder (config.json + model.safetensors)")
    src = parser.add_mutually_exclusive_group(required=True)
    src.add_argument("--data", type=Path, help="dataset root laid out like minivlm.data.world.World")
    src.add_argument("--images", type=Path, help="a folder of images (searched recursively)")
    parser.add_argument("--split", nargs="+", default=None, help="World splits to extract (default: all)")
    parser.add_argument("--out", type=Path, required=True, help="feature store folder")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-regions", type=int, default=None, help="top-K regions per image (default: config's)")
    parser.add_argument("--shard-size", type=int, default=256, help="images per shard file")
    parser.add_argument("--dtype", choices=["float16", "bfloat16", "float32"], default="float16",
                        help="stored feature precision")


def extract(detector: str | Path, out: str | Path, data: str | Path | None = None, images: str | Path | None = None,
            splits: list[str] | None = None, batch_size: int = 8, max_regions: int | None = None,
            shard_size: int = 256, dtype: str = "float16") -> dict:
    """`minivlm extract` from Python: the regions of a world's images (`data`) or of a folder of images
    into the feature store `out`. Under torchrun each rank writes its share."""
    from minivlm.train.trainer import init_distributed

    rank, world_size, device = init_distributed()
    model = load_detector(detector, device)
    sources = world_sources(data, splits) if data else folder_sources(images)
    summary = extract_to_store(model, sources, out, batch_size, max_regions, shard_size, rank, world_size, dtype)
    return {**summary, "rank": rank, "world_size": world_size}


def run(args) -> int:
    summary = extract(args.detector, args.out, args.data, args.images, args.split, args.batch_size, args.max_regions,
                      args.shard_size, args.dtype)
    rank = summary["rank"]
    print(f"[rank {rank}] {summary['written']} images written to {args.out}, {summary['skipped_done']} already "
          f"there, {len(summary['failed'])} unreadable")
    for key, reason in summary["failed"]:
        print(f"minivlm extract: error: skipped {key}: {reason}", file=sys.stderr)
    if summary["world_size"] > 1:
        torch.distributed.barrier()
    return 1 if summary["failed"] else 0
