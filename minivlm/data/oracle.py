"""Reference region sources of the grounding benchmark: oracle regions (what a perfect extractor would
hand the transformer, built from the ground truth) and blind ones (no regions at all).

Each annotated object becomes one region: its true box, score 1, its class as the tag, and a feature
vector of the usual width (1024 for TEE) that is one-hot in its class and multi-hot in its attributes:

    feature[c] = 1                       c = the object's class index
    feature[C + a] = 1                   a = each attribute index (colour, size, texture)
    feature[C + A:] = 0                  padding to the region width

The grounding benchmark trains the same transformer on these, on the detector's regions and on none, so
the gap between the three says whether a weak task comes from the features or from the fusion model.
"""

from __future__ import annotations

from pathlib import Path

import torch

from minivlm.data.feature_store import FeatureStoreWriter
from minivlm.data.readers import CocoInstances
from minivlm.data.world import World
from minivlm.errors import MiniVLMError
from minivlm.regions import Regions


def oracle_regions(instances: CocoInstances, image_id: int, region_dim: int = 1024) -> Regions:
    """The ground-truth objects of one image as `Regions` (see the module docstring for the feature)."""
    classes, attrs = instances.class_names(), instances.attribute_names()
    if len(classes) + len(attrs) > region_dim:
        raise MiniVLMError(f"{len(classes)} classes + {len(attrs)} attributes do not fit a {region_dim}-d region")
    cls_index, attr_index = instances.category_index(), instances.attribute_index()
    info, anns = instances.images[image_id], instances.annotations[image_id]
    k = len(anns)
    feats = torch.zeros(k, region_dim)
    boxes = torch.zeros(k, 4)
    labels = torch.zeros(k, dtype=torch.long)
    for i, a in enumerate(anns):
        c = cls_index[a.category_id]
        labels[i] = c
        feats[i, c] = 1.0
        for aid in a.attribute_ids:
            feats[i, len(classes) + attr_index[aid]] = 1.0
        x, y, w, h = a.bbox
        boxes[i] = torch.tensor([x, y, x + w, y + h])
    return Regions(boxes=boxes, features=feats, scores=torch.ones(k), labels=labels,
                   image_size=(info.width, info.height), tags=[classes[int(c)] for c in labels])


def blind_regions(instances: CocoInstances, image_id: int, region_dim: int = 1024) -> Regions:
    """No regions and no tags: a model fed these answers from the question alone."""
    info = instances.images[image_id]
    return Regions(boxes=torch.zeros(0, 4), features=torch.zeros(0, region_dim), scores=torch.zeros(0),
                   labels=torch.zeros(0, dtype=torch.long), image_size=(info.width, info.height))


def _write_store(make, source: str, world_root: str | Path, out: str | Path, region_dim: int,
                 splits: list[str] | None, nlvr2: bool = False) -> int:
    """Regions from `make` for every image of `splits`: the COCO images (keyed by image id, as `minivlm
    extract` keys them) or, with `nlvr2`, the NLVR2 images (keyed "{split}/{file name}", as the NLVR2 store)."""
    world = World(world_root)
    kind, read = ("nlvr2", world.nlvr2_instances) if nlvr2 else ("instances", world.instances)
    splits = splits or world.splits(kind)
    if not splits:
        raise MiniVLMError(f"{world_root}: no {'NLVR2 pairs' if nlvr2 else 'annotations/instances_*.json'} to build "
                           f"{source} regions from")
    first = read(splits[0])
    meta = {"class_names": first.class_names(), "attribute_names": first.attribute_names(), "source": source}
    n = 0
    with FeatureStoreWriter(out, meta=meta, dtype="float32") as writer:
        for split in splits:
            inst = read(split)
            keys = {f"{split}/{info.file_name}" if nlvr2 else iid: iid for iid, info in inst.images.items()}
            for key in writer.todo(sorted(keys)):
                writer.add(key, make(inst, keys[key], region_dim))
                n += 1
    return n


def write_oracle_store(world_root: str | Path, out: str | Path, region_dim: int = 1024,
                       splits: list[str] | None = None, nlvr2: bool = False) -> int:
    """A feature store of oracle regions for every annotated image of `splits` (default: all); returns how
    many images it wrote (0 when a complete store is there already). It reads like `minivlm extract` output.
    `nlvr2`: the NLVR2 images instead, from nlvr2/annotations/instances_{split}.json (only the synthetic world
    has them)."""
    return _write_store(oracle_regions, "oracle", world_root, out, region_dim, splits, nlvr2)


def write_blind_store(world_root: str | Path, out: str | Path, region_dim: int = 1024,
                      splits: list[str] | None = None, nlvr2: bool = False) -> int:
    """The same store with no regions per image (the question-only baseline)."""
    return _write_store(blind_regions, "blind", world_root, out, region_dim, splits, nlvr2)
