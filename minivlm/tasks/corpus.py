"""The pre-training corpus: (image, text, tags) triples from caption and VQA files, plus pseudo-captions.

* Text: every reference caption of the split (`World.caption_references`: its COCO captions file, else its
  Karpathy split), and every VQA question followed by its answer.
* Tags, from a selectable source (the paper's Table 9 compares them):
    "gt"    ground-truth object names from the split's instances file (no detector involved);
    "store" the class names a TEE feature store predicted for the image's top regions (TEE-0's own
            store, or the store of a stronger tagger such as TEE-3: `tag_store`);
    "none"  no tags.
  Tags are the image's distinct names, most salient first (largest ground-truth box / highest region
  score), so that a short tag budget keeps the informative ones.
* Pseudo-captions: a COCO captions JSON written by a teacher (`minivlm distill`) over other images, with
  its own feature store; their tags come from that store ("gt" falls back to the store: there is none).

Every example names its feature source (`source`: index into the list of stores) and image key.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from minivlm.data.feature_store import FeatureStore
from minivlm.data.readers import read_coco_captions
from minivlm.data.world import World
from minivlm.errors import MiniVLMError
from minivlm.tasks.data import RegionSource

TAG_SOURCES = ("gt", "store", "none")


@dataclass
class PretrainExample:
    image_key: int | str  # key of the image in its feature store
    source: int  # which feature store holds it (0: the dataset's, 1: the pseudo-captions')
    text: str
    tags: list[str]
    kind: str = "caption"  # caption | vqa | pseudo


def unique(names: list[str]) -> list[str]:
    seen: dict[str, None] = {}
    for n in names:
        if n and n not in seen:
            seen[n] = None
    return list(seen)


def store_tags(store: RegionSource, key: int | str, max_regions: int, min_score: float = 0.0) -> list[str]:
    return store[key].object_tags(max_regions, min_score) if key in store else []


def gt_tags(world: World, split: str) -> dict[int, list[str]]:
    """Image id -> distinct ground-truth class names, largest object first."""
    inst = world.instances(split)
    names = inst.class_names()
    index = inst.category_index()
    return {iid: unique([names[index[a.category_id]] for a in sorted(anns, key=lambda a: -a.area)])
            for iid, anns in inst.annotations.items()}


def split_texts(world: World, split: str, use_captions: bool = True, use_vqa: bool = True,
                vqa_per_image: int | None = None) -> list[tuple[int, str, str]]:
    """(image id, text, kind) for the split's captions and VQA question + answer pairs (at most
    `vqa_per_image` of them per image, in file order: None keeps all)."""
    if vqa_per_image is not None and vqa_per_image < 0:
        raise MiniVLMError(f"--vqa-per-image must not be negative (got {vqa_per_image})")
    out: list[tuple[int, str, str]] = []
    if use_captions and split in world.splits("captions"):
        for iid, caps in world.caption_references(split).items():
            out += [(iid, c, "caption") for c in caps]
    if use_vqa and world.vqa_questions_path(split).is_file():
        taken: Counter[int] = Counter()
        for q in world.vqa(split):
            answer = q.multiple_choice_answer or (q.answers[0] if q.answers else "")
            if not answer:  # questions without annotations teach nothing here
                continue
            if vqa_per_image is None or taken[q.image_id] < vqa_per_image:
                taken[q.image_id] += 1
                out.append((q.image_id, f"{q.question} {answer}", "vqa"))
    return out


def build_corpus(world: World, split: str, store: RegionSource, tag_source: str = "gt",
                 tag_store: RegionSource | None = None, max_regions: int = 50, tag_min_score: float = 0.0,
                 use_captions: bool = True, use_vqa: bool = True,
                 vqa_per_image: int | None = None) -> tuple[list[PretrainExample], int]:
    """Examples of one split whose image is in `store`; returns (examples, number skipped for lack of
    features)."""
    if tag_source not in TAG_SOURCES:
        raise MiniVLMError(f"unknown tag source {tag_source!r}; choose one of: {', '.join(TAG_SOURCES)}")
    texts = split_texts(world, split, use_captions, use_vqa, vqa_per_image)
    if not texts:
        raise MiniVLMError(f"{world.root}: split {split!r} has no captions (captions_{split}.json or a Karpathy "
                           f"split) and no VQA questions with answers")
    truth = gt_tags(world, split) if tag_source == "gt" else {}
    if tag_source == "gt" and not world.instances_path(split).is_file():
        raise MiniVLMError(f"{world.instances_path(split)}: needed for --tags gt (or use --tags store/none)")
    tag_store = tag_store if tag_store is not None else store
    tag_cache: dict[int, list[str]] = {}
    examples, skipped = [], 0
    for iid, text, kind in texts:
        if iid not in store:
            skipped += 1
            continue
        if tag_source == "gt":
            tags = truth.get(iid, [])
        elif tag_source == "store":
            if iid not in tag_cache:
                tag_cache[iid] = store_tags(tag_store, iid, max_regions, tag_min_score)
            tags = tag_cache[iid]
        else:
            tags = []
        examples.append(PretrainExample(iid, 0, text, tags, kind))
    return examples, skipped


def pseudo_caption_corpus(captions_json: str | Path, store: FeatureStore, tag_source: str = "store",
                          max_regions: int = 50, source: int = 1, tag_store: RegionSource | None = None,
                          tag_min_score: float = 0.0
                          ) -> tuple[list[PretrainExample], int]:
    """A teacher's pseudo-captions (COCO captions format) over images of `store`. An image is found in
    the store (`FeatureStore.find`) by its id, or else by its `file_name` (the key `extract --images DIR` gives,
    which is what `minivlm distill` writes). Tags come from `tag_store` (e.g. a stronger tagger's store) or
    `store`."""
    caps = read_coco_captions(captions_json)
    tag_store = tag_store if tag_store is not None else store
    examples, skipped = [], 0
    for iid, texts in caps.captions.items():
        info = caps.images.get(iid)
        key = store.find(iid)
        if key is None and info is not None:
            key = store.find(info.file_name)
        if key is None:
            skipped += len(texts)
            continue
        tags = store_tags(tag_store, key, max_regions, tag_min_score) if tag_source != "none" else []
        examples += [PretrainExample(key, source, t, tags, "pseudo") for t in texts]
    return examples, skipped
