"""`World`: one dataset root laid out like COCO, with VQA v2 and NLVR2 beside it.

The synthetic world is written in this layout, and real data works when arranged the same way:

    root/annotations/instances_{S}.json, captions_{S}.json, dataset_coco.json (Karpathy split)
    root/vqa/v2_OpenEnded_mscoco_{S}_questions.json, v2_mscoco_{S}_annotations.json
    root/nlvr2/{S}.json, images under root/nlvr2/images/{S}/ (or numbered subfolders of it)
    root/{S}/<file_name>  (real COCO: split "train2014" -> root/train2014/)

Parsed files are cached per World, so asking twice costs nothing.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from minivlm.data.readers import (CocoCaptions, CocoInstances, ImageInfo, KarpathyImage, NLVR2Example,
                                  VQAQuestion, read_coco_captions, read_coco_instances, read_karpathy,
                                  read_nlvr2, read_vqa)
from minivlm.errors import DataFormatError


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

    def image_path(self, split: str, image: ImageInfo | str) -> Path:
        """Where an image of `split` lives (not checked: `load_image` reports a missing file)."""
        return self.root / split / (image.file_name if isinstance(image, ImageInfo) else image)

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
        direct = folder / name
        if direct.is_file():
            return direct
        index = self._cached(("nlvr2_index", split), lambda: {p.name: p for p in folder.rglob("*") if p.is_file()})
        if name not in index:
            raise DataFormatError(direct, "NLVR2 image not found (subfolders searched too)")
        return index[name]

    # ------------------------------------------------------------ parsed files

    def _cached(self, key: tuple, make: Callable[[], Any]) -> Any:
        if key not in self._cache:
            self._cache[key] = make()
        return self._cache[key]

    @staticmethod
    def _need(path: Path) -> Path:
        if not path.is_file():
            raise DataFormatError(path, "expected file not found")
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

    # ------------------------------------------------------------ what is there

    def splits(self, task: str = "coco") -> list[str]:
        """Splits that have files: task "coco" (instances or captions), "vqa" (questions) or "nlvr2"."""
        if task == "coco":
            pats = [(self.root / "annotations", "instances_", ".json"), (self.root / "annotations", "captions_", ".json")]
        elif task == "vqa":
            pats = [(self.root / "vqa", "v2_OpenEnded_mscoco_", "_questions.json")]
        elif task == "nlvr2":
            pats = [(self.root / "nlvr2", "", ".json")]
        else:
            raise ValueError(f"unknown task {task!r}: expected coco, vqa or nlvr2")
        found = set()
        for folder, pre, suf in pats:
            if folder.is_dir():
                found.update(p.name[len(pre):-len(suf)] for p in folder.iterdir()
                             if p.is_file() and p.name.startswith(pre) and p.name.endswith(suf))
        return sorted(s for s in found if s)

    def train_split(self) -> str:
        """The training split: "train" in the synthetic world, "train2014"/"train2017" in real COCO."""
        names = [s for s in self.splits() if s.startswith("train") and self.instances_path(s).is_file()]
        if not names:
            raise DataFormatError(self.instances_path("train"), "expected file not found (no instances_train*.json)")
        return names[0]

    def class_names(self) -> list[str]:
        return self.instances(self.train_split()).class_names()

    def attribute_names(self) -> list[str]:
        return self.instances(self.train_split()).attribute_names()
