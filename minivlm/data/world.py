"""`World`: one dataset root laid out like COCO, with VQA v2 and NLVR2 beside it.

The synthetic world is written in this layout, and real data works when arranged the same way:

    root/annotations/instances_{S}.json, captions_{S}.json, dataset_coco.json (Karpathy split)
    root/vqa/v2_OpenEnded_mscoco_{S}_questions.json, v2_mscoco_{S}_annotations.json
    root/nlvr2/{S}.json, images under root/nlvr2/images/{S}/ (or numbered subfolders of it)
    root/{S}/<file_name>  (real COCO: split "train2014" -> root/train2014/)

Parsed files are cached per World, so asking twice costs nothing.

The World also chooses splits, by one rule for every kind of data (`SPLIT_FILES`: COCO instances or
captions, VQA, NLVR2, and what pre-training reads):

    splits(kind)        the split names of the kind's files, sorted (captions: then Karpathy's train, val and
                        test that no captions file has)
    train_split(kind)   the one named, else the first name in sorted order that starts with "train"
    eval_splits(kind)   the held-out splits: every split whose name does not start with "train", in `splits` order
    val_split(kind)     the one to watch during training: the first held-out name, sorted, that starts with "val"
    test_split(kind)    the one to report: the first held-out name, sorted, that starts with "test", else the last

and reads caption references with one precedence: captions_{S}.json, else the Karpathy file's split S.
Tasks ask the World; none lists files itself.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from minivlm.data.readers import (CocoCaptions, CocoInstances, ImageInfo, KarpathyImage, NLVR2Example,
                                  VQAQuestion, read_coco_captions, read_coco_instances, read_karpathy,
                                  read_nlvr2, read_vqa)
from minivlm.errors import DataFormatError

# The files whose names make a split of each kind ({S}: the split), relative to the root.
_COCO = ("annotations/instances_{S}.json", "annotations/captions_{S}.json")
_VQA = ("vqa/v2_OpenEnded_mscoco_{S}_questions.json",)
SPLIT_FILES = {
    "coco": _COCO,  # every COCO-style image split (detection, extraction)
    "instances": _COCO[:1],
    "captions": _COCO[1:],  # and the Karpathy splits
    "vqa": _VQA,
    "nlvr2": ("nlvr2/{S}.json",),
    "pretrain": _COCO + _VQA,  # the corpus: captions, VQA questions, and instances for ground-truth tags
}
KARPATHY_SPLITS = ("train", "val", "test")  # as read: Karpathy's "restval" is part of "train"


class World:
    def __init__(self, root: str | Path):
        self.root = Path(root)
        self._cache: dict[tuple, Any] = {}

    def __repr__(self) -> str:
        return f"World({str(self.root)!r})"

    # ------------------------------------------------------------ paths

    def instances_path(self, split: str) -> Path:
        return self.root / "annotations" / f"instances_{split}.json"

    def captions_path(self, split: str) -> Path:
        return self.root / "annotations" / f"captions_{split}.json"

    def karpathy_path(self) -> Path:
        return self.root / "annotations" / "dataset_coco.json"

    def vqa_questions_path(self, split: str) -> Path:
        return self.root / "vqa" / f"v2_OpenEnded_mscoco_{split}_questions.json"

    def vqa_annotations_path(self, split: str) -> Path:
        return self.root / "vqa" / f"v2_mscoco_{split}_annotations.json"

    def nlvr2_path(self, split: str) -> Path:
        return self.root / "nlvr2" / f"{split}.json"

    def nlvr2_instances_path(self, split: str) -> Path:
        """The objects of the NLVR2 images (COCO instances): written by the synthetic world, not in real NLVR2.
        A folder of its own, so that the files do not read as NLVR2 splits (nlvr2/{S}.json)."""
        return self.root / "nlvr2" / "annotations" / f"instances_{split}.json"

    def image_path(self, split: str, image: ImageInfo | str) -> Path:
        """Where an image of `split` lives (its existence not checked: `load_image` reports a missing file);
        a name that would leave the split's folder is refused (`inside`)."""
        return inside(self.root / split, image.file_name if isinstance(image, ImageInfo) else image)

    def vqa_image_path(self, split: str, image_id: int) -> Path:
        """The image behind a VQA question: by the split's COCO file names when an instances or captions
        file exists, else by the official naming COCO_{split}_{id:012d}.jpg."""
        for path, read in ((self.instances_path(split), self.instances), (self.captions_path(split), self.captions)):
            if path.is_file():
                info = read(split).images.get(image_id)
                if info is not None:
                    return self.image_path(split, info)
        return self.image_path(split, f"COCO_{split}_{image_id:012d}.jpg")

    def nlvr2_image_path(self, split: str, name: str) -> Path:
        """An NLVR2 image; real train images sit in numbered subfolders (images/train/0..99/), so when
        the file is not directly under images/{split}/ the subfolders are indexed once and searched."""
        folder = self.root / "nlvr2" / "images" / split
        direct = inside(folder, name)
        if direct.is_file():
            return direct
        index = self._cached(("nlvr2_index", split), lambda: {p.name: p for p in folder.rglob("*") if p.is_file()})
        if name not in index:
            raise DataFormatError(direct, "NLVR2 image not found (subfolders searched too)")
        return inside(folder, index[name].relative_to(folder).as_posix())

    # ------------------------------------------------------------ parsed files

    def _cached(self, key: tuple, make: Callable[[], Any]) -> Any:
        if key not in self._cache:
            self._cache[key] = make()
        return self._cache[key]

    @staticmethod
    def _need(path: Path, missing: str = "expected file not found") -> Path:
        if not path.is_file():
            raise DataFormatError(path, missing)
        return path

    def instances(self, split: str) -> CocoInstances:
        return self._cached(("instances", split), lambda: read_coco_instances(self._need(self.instances_path(split))))

    def captions(self, split: str) -> CocoCaptions:
        return self._cached(("captions", split), lambda: read_coco_captions(self._need(self.captions_path(split))))

    def karpathy(self) -> list[KarpathyImage]:
        return self._cached(("karpathy",), lambda: read_karpathy(self._need(self.karpathy_path())))

    def vqa(self, split: str) -> list[VQAQuestion]:
        """Questions of `split`, with answers when the annotations file exists (not for test splits)."""
        ann = self.vqa_annotations_path(split)
        return self._cached(("vqa", split), lambda: read_vqa(self._need(self.vqa_questions_path(split)),
                                                             ann if ann.is_file() else None))

    def nlvr2(self, split: str) -> list[NLVR2Example]:
        return self._cached(("nlvr2", split), lambda: read_nlvr2(self._need(self.nlvr2_path(split))))

    def nlvr2_instances(self, split: str) -> CocoInstances:
        missing = ("not found: only synthetic worlds made since 2026-12-07 hold the NLVR2 images' objects "
                   "(make the world again: the same arguments give the same files)")
        return self._cached(("nlvr2_instances", split),
                            lambda: read_coco_instances(self._need(self.nlvr2_instances_path(split), missing)))

    # ------------------------------------------------------------ what is there

    def splits(self, kind: str = "coco") -> list[str]:
        """The splits that have files of `kind` (a key of `SPLIT_FILES`), sorted; for "captions" followed by
        the Karpathy splits that no captions file has, when dataset_coco.json exists."""
        if kind not in SPLIT_FILES:
            raise ValueError(f"unknown kind of split {kind!r}: expected one of {', '.join(SPLIT_FILES)}")
        found = set()
        for pattern in SPLIT_FILES[kind]:
            folder, name = (self.root / pattern).parent, Path(pattern).name
            pre, suf = name.split("{S}")
            if folder.is_dir():
                found.update(p.name[len(pre):-len(suf)] for p in folder.iterdir()
                             if p.is_file() and p.name.startswith(pre) and p.name.endswith(suf))
        out = sorted(s for s in found if s)
        if kind == "captions" and self.karpathy_path().is_file():
            out += [s for s in KARPATHY_SPLITS if s not in out]
        return out

    def train_split(self, kind: str = "instances", wanted: str | None = None) -> str:
        """The training split of `kind`: `wanted` when given (it must exist), else the first split in sorted
        order whose name starts with "train" ("train" in the synthetic world, "train2014" in real COCO; for
        captions Karpathy's "train", which sorts first)."""
        splits = self.splits(kind)
        if wanted:
            if wanted not in splits:
                raise DataFormatError(self.root, f"no {kind} split {wanted!r} (found: {', '.join(splits) or 'none'})")
            return wanted
        names = sorted(s for s in splits if s.startswith("train"))
        if not names:
            files = " or ".join(f.replace("{S}", "train*") for f in SPLIT_FILES[kind])
            karpathy = " or a Karpathy split file" if kind == "captions" else ""
            raise DataFormatError(self.root / SPLIT_FILES[kind][0].replace("{S}", "train"),
                                  f"expected file not found (no {kind} training split: {files}{karpathy})")
        return names[0]

    def eval_splits(self, kind: str) -> list[str]:
        """The held-out splits of `kind`: every split whose name does not start with "train", in `splits` order."""
        return [s for s in self.splits(kind) if not s.startswith("train")]

    def val_split(self, kind: str) -> str | None:
        """The held-out split to watch during training: the first, in sorted order, whose name starts with "val"."""
        return next((s for s in sorted(self.eval_splits(kind)) if s.startswith("val")), None)

    def test_split(self, kind: str) -> str | None:
        """The held-out split to report: the first, in sorted order, whose name starts with "test" ("test",
        NLVR2's "test1"), else the last held-out split."""
        held_out = sorted(self.eval_splits(kind))
        return next((s for s in held_out if s.startswith("test")), held_out[-1] if held_out else None)

    def caption_references(self, split: str) -> dict[int, list[str]]:
        """Image id -> reference captions of `split` (images without any left out): captions_{split}.json,
        else the Karpathy file's split when the dataset has one."""
        if self.captions_path(split).is_file():
            return {iid: caps for iid, caps in self.captions(split).captions.items() if caps}
        if self.karpathy_path().is_file() and split in KARPATHY_SPLITS:
            return {im.image_id: im.sentences for im in self.karpathy() if im.split == split and im.sentences}
        raise DataFormatError(self.captions_path(split), f"not found, and no Karpathy split {split!r} in "
                                                         f"{self.karpathy_path()}")

    def class_names(self) -> list[str]:
        return self.instances(self.train_split()).class_names()

    def attribute_names(self) -> list[str]:
        return self.instances(self.train_split()).attribute_names()


def inside(folder: Path, name: str) -> Path:
    """`folder / name` for a file name read from an annotation file, refused (DataFormatError) when it
    would leave the folder: an absolute path, a `..` part, or a symbolic link inside the folder that points
    out of it. The folder itself may be a link (datasets are often linked into place)."""
    if not name or "\0" in name:
        raise DataFormatError(folder, f"image file name {name!r} is empty or holds a NUL character")
    rel = Path(name)
    if rel.is_absolute() or ".." in rel.parts:
        raise DataFormatError(folder / name, "image file name leaves the dataset folder (absolute or '..'); refused")
    path = folder / rel
    if path.exists() and not path.resolve().is_relative_to(folder.resolve()):
        raise DataFormatError(path, "a link that points out of the dataset folder; refused")
    return path
