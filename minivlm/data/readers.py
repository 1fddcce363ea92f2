"""Readers of the real dataset formats: COCO instances and captions, the Karpathy split, VQA v2, NLVR2,
Visual Genome objects/attributes and the bottom-up-attention vocabularies.

The synthetic world is written in these same formats, so nothing downstream knows which one it reads.
Keys that the real files carry and we do not need are ignored. Every problem in a file raises
`DataFormatError` naming the file and the record/field (e.g. `annotations[3].bbox: expected 4 numbers,
got 3`): user data never surfaces as a bare KeyError or TypeError.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from minivlm.errors import DataFormatError
from minivlm.io import read_json


@dataclass
class ImageInfo:
    id: int
    file_name: str
    width: int
    height: int


@dataclass
class Category:
    id: int
    name: str
    group: str = ""  # attribute group (colour, material, ...); COCO's supercategory for object classes


@dataclass
class ObjectAnn:
    id: int
    image_id: int
    category_id: int
    bbox: tuple[float, float, float, float]  # x, y, w, h in pixels (COCO convention)
    area: float
    iscrowd: int
    attribute_ids: tuple[int, ...] = ()


def _names(cats: list[Category]) -> list[str]:
    return [c.name for c in sorted(cats, key=lambda c: c.id)]


def _index(cats: list[Category]) -> dict[int, int]:
    return {c.id: i for i, c in enumerate(sorted(cats, key=lambda c: c.id))}


@dataclass
class CocoInstances:
    path: Path
    images: dict[int, ImageInfo]
    annotations: dict[int, list[ObjectAnn]]  # by image id; every image has an entry (maybe empty)
    categories: list[Category]
    attributes: list[Category]  # empty unless the file has the project's "attribute_categories"

    def class_names(self) -> list[str]:
        """Category names sorted by id: position i is contiguous class index i."""
        return _names(self.categories)

    def category_index(self) -> dict[int, int]:
        """COCO category id (sparse, 1..90) -> 0-based contiguous class index."""
        return _index(self.categories)

    def attribute_names(self) -> list[str]:
        return _names(self.attributes)

    def attribute_index(self) -> dict[int, int]:
        return _index(self.attributes)


@dataclass
class CocoCaptions:
    path: Path
    images: dict[int, ImageInfo]
    captions: dict[int, list[str]]  # by image id; every image has an entry (maybe empty)


@dataclass
class KarpathyImage:
    image_id: int  # the COCO id ("cocoid"), which the COCO caption/VQA files use
    filepath: str  # folder under the dataset root, e.g. "val2014"
    filename: str
    split: str  # train / val / test, with "restval" folded into train
    raw_split: str  # the split as written in the file (keeps "restval")
    sentences: list[str]  # the raw captions


@dataclass
class VQAQuestion:
    question_id: int
    image_id: int
    question: str
    question_type: str = ""
    answer_type: str = ""
    answers: list[str] = field(default_factory=list)  # the 10 human answers; empty when unannotated
    multiple_choice_answer: str = ""


@dataclass
class NLVR2Example:
    identifier: str  # split-set-pair-sentence, e.g. "dev-850-0-0"
    sentence: str
    label: bool
    left_image: str  # split-set-pair-img0.png
    right_image: str  # split-set-pair-img1.png


@dataclass
class VGObject:
    object_id: int
    image_id: int
    bbox: tuple[float, float, float, float]  # x, y, w, h
    names: list[str]
    attributes: list[str] = field(default_factory=list)


@dataclass
class VisualGenome:
    images: dict[int, ImageInfo]
    objects: dict[int, list[VGObject]]


# ---------------------------------------------------------------- field checks

_KINDS: dict[str, tuple[type, ...]] = {
    "int": (int,), "number": (int, float), "str": (str,), "list": (list,), "object": (dict,),
}

_KIND_NAMES = {"int": "an integer", "number": "a number", "str": "a string", "list": "a list", "object": "an object"}


def _type_name(v: Any) -> str:
    return {dict: "object", list: "list", str: "string", bool: "boolean", type(None): "null",
            int: "integer", float: "number"}.get(type(v), type(v).__name__)


def _is(v: Any, kind: str) -> bool:
    # JSON true/false are Python bools, which are ints: never accept them where a number is expected.
    return isinstance(v, _KINDS[kind]) and not isinstance(v, bool)


def _get(path: Path, rec: Any, key: str, where: str, kind: str, default: Any = ...) -> Any:
    """rec[key], checked to be of `kind`; `where` names rec in messages (e.g. "annotations[3]")."""
    if not isinstance(rec, dict):
        raise DataFormatError(path, f"{where}: expected an object, got {_type_name(rec)}")
    if key not in rec:
        if default is not ...:
            return default
        raise DataFormatError(path, f"{where}.{key}: missing" if where else f"missing top-level key '{key}'")
    v = rec[key]
    if not _is(v, kind):
        name = f"{where}.{key}" if where else key
        raise DataFormatError(path, f"{name}: expected {_KIND_NAMES[kind]}, got {_type_name(v)}")
    return v


def _top(path: Path, obj: Any, key: str, kind: str = "list") -> Any:
    if not isinstance(obj, dict):
        raise DataFormatError(path, f"expected a JSON object at top level, got {_type_name(obj)}")
    return _get(path, obj, key, "", kind)


def _box(path: Path, vals: Any, where: str) -> tuple[float, float, float, float]:
    if not isinstance(vals, list) or len(vals) != 4 or not all(_is(v, "number") for v in vals):
        got = f"{len(vals)}" if isinstance(vals, list) else _type_name(vals)
        raise DataFormatError(path, f"{where}: expected 4 numbers, got {got}")
    x, y, w, h = (float(v) for v in vals)
    if not all(math.isfinite(v) for v in (x, y, w, h)):
        raise DataFormatError(path, f"{where}: non-finite value in {vals}")
    # Real COCO has a few zero-width slivers: keep them (callers filter), but a negative size is a bug.
    if w < 0 or h < 0:
        raise DataFormatError(path, f"{where}: negative width or height in {vals}")
    return x, y, w, h


def _images(path: Path, obj: Any) -> dict[int, ImageInfo]:
    images: dict[int, ImageInfo] = {}
    for i, rec in enumerate(_top(path, obj, "images")):
        where = f"images[{i}]"
        iid = _get(path, rec, "id", where, "int")
        info = ImageInfo(iid, _get(path, rec, "file_name", where, "str"),
                         _get(path, rec, "width", where, "int"), _get(path, rec, "height", where, "int"))
        if info.width <= 0 or info.height <= 0:
            raise DataFormatError(path, f"{where}: width and height must be positive, got {info.width}x{info.height}")
        if iid in images:
            raise DataFormatError(path, f"{where}.id: duplicate image id {iid}")
        images[iid] = info
    return images


def _categories(path: Path, obj: Any, key: str) -> list[Category]:
    cats: list[Category] = []
    seen: set[int] = set()
    for i, rec in enumerate(_top(path, obj, key)):
        where = f"{key}[{i}]"
        cid = _get(path, rec, "id", where, "int")
        if cid in seen:
            raise DataFormatError(path, f"{where}.id: duplicate id {cid}")
        seen.add(cid)
        group = _get(path, rec, "group", where, "str", default=None)
        if group is None:
            group = _get(path, rec, "supercategory", where, "str", default="")
        cats.append(Category(cid, _get(path, rec, "name", where, "str"), group))
    return cats


def _image_ref(path: Path, rec: dict, where: str, images: dict) -> int:
    iid = _get(path, rec, "image_id", where, "int")
    if iid not in images:
        raise DataFormatError(path, f"{where}.image_id: unknown image id {iid} (not in 'images')")
    return iid


# ---------------------------------------------------------------- COCO

def read_coco_instances(path: str | Path) -> CocoInstances:
    """COCO `instances_*.json`. Also reads the project's optional attribute extension: a top-level
    "attribute_categories" [{id, name, group}] and per-annotation "attribute_ids" [...]."""
    path = Path(path)
    obj = read_json(path)
    images = _images(path, obj)
    categories = _categories(path, obj, "categories")
    attributes = _categories(path, obj, "attribute_categories") if isinstance(obj, dict) and "attribute_categories" in obj else []
    cat_ids = {c.id for c in categories}
    attr_ids = {a.id for a in attributes}
    anns: dict[int, list[ObjectAnn]] = {iid: [] for iid in images}
    for i, rec in enumerate(_top(path, obj, "annotations")):
        where = f"annotations[{i}]"
        iid = _image_ref(path, rec, where, images)
        cid = _get(path, rec, "category_id", where, "int")
        if cid not in cat_ids:
            raise DataFormatError(path, f"{where}.category_id: unknown category id {cid} (not in 'categories')")
        bbox = _box(path, _get(path, rec, "bbox", where, "list"), f"{where}.bbox")
        area = float(_get(path, rec, "area", where, "number", default=bbox[2] * bbox[3]))
        iscrowd = _get(path, rec, "iscrowd", where, "int", default=0)
        attrs = _get(path, rec, "attribute_ids", where, "list", default=[])
        for j, a in enumerate(attrs):
            if not _is(a, "int") or a not in attr_ids:
                raise DataFormatError(path, f"{where}.attribute_ids[{j}]: unknown attribute id {a!r} "
                                            "(not in 'attribute_categories')")
        anns[iid].append(ObjectAnn(_get(path, rec, "id", where, "int"), iid, cid, bbox, area, iscrowd, tuple(attrs)))
    return CocoInstances(path, images, anns, categories, attributes)


def read_coco_captions(path: str | Path) -> CocoCaptions:
    """COCO `captions_*.json`: images plus annotations [{id, image_id, caption}]."""
    path = Path(path)
    obj = read_json(path)
    images = _images(path, obj)
    captions: dict[int, list[str]] = {iid: [] for iid in images}
    for i, rec in enumerate(_top(path, obj, "annotations")):
        where = f"annotations[{i}]"
        iid = _image_ref(path, rec, where, images)
        captions[iid].append(_get(path, rec, "caption", where, "str"))
    return CocoCaptions(path, images, captions)


_KARPATHY_SPLITS = {"train": "train", "restval": "train", "val": "val", "test": "test"}


def read_karpathy(path: str | Path) -> list[KarpathyImage]:
    """Karpathy's `dataset_coco.json` (also dataset_flickr30k.json, which has no "cocoid": imgid is used)."""
    path = Path(path)
    obj = read_json(path)
    out: list[KarpathyImage] = []
    for i, rec in enumerate(_top(path, obj, "images")):
        where = f"images[{i}]"
        key = "cocoid" if isinstance(rec, dict) and "cocoid" in rec else "imgid"
        raw_split = _get(path, rec, "split", where, "str")
        if raw_split not in _KARPATHY_SPLITS:
            raise DataFormatError(path, f"{where}.split: expected one of {sorted(_KARPATHY_SPLITS)}, got {raw_split!r}")
        sents = [_get(path, s, "raw", f"{where}.sentences[{j}]", "str")
                 for j, s in enumerate(_get(path, rec, "sentences", where, "list"))]
        out.append(KarpathyImage(_get(path, rec, key, where, "int"), _get(path, rec, "filepath", where, "str", default=""),
                                 _get(path, rec, "filename", where, "str"), _KARPATHY_SPLITS[raw_split], raw_split, sents))
    return out


# ---------------------------------------------------------------- VQA v2

def read_vqa(questions_path: str | Path, annotations_path: str | Path | None = None) -> list[VQAQuestion]:
    """VQA v2 questions, joined with their annotations when given (test questions have none)."""
    qpath = Path(questions_path)
    qobj = read_json(qpath)
    questions: dict[int, VQAQuestion] = {}
    for i, rec in enumerate(_top(qpath, qobj, "questions")):
        where = f"questions[{i}]"
        qid = _get(qpath, rec, "question_id", where, "int")
        if qid in questions:
            raise DataFormatError(qpath, f"{where}.question_id: duplicate question id {qid}")
        questions[qid] = VQAQuestion(qid, _get(qpath, rec, "image_id", where, "int"),
                                     _get(qpath, rec, "question", where, "str"))
    if annotations_path is not None:
        apath = Path(annotations_path)
        aobj = read_json(apath)
        for i, rec in enumerate(_top(apath, aobj, "annotations")):
            where = f"annotations[{i}]"
            qid = _get(apath, rec, "question_id", where, "int")
            q = questions.get(qid)
            if q is None:
                raise DataFormatError(apath, f"{where}.question_id: question id {qid} is not in {qpath}")
            iid = _get(apath, rec, "image_id", where, "int")
            if iid != q.image_id:
                raise DataFormatError(apath, f"{where}.image_id: {iid} differs from the question's image id {q.image_id}")
            answers = _get(apath, rec, "answers", where, "list")
            if not answers:
                raise DataFormatError(apath, f"{where}.answers: empty")
            q.answers = [_get(apath, a, "answer", f"{where}.answers[{j}]", "str") for j, a in enumerate(answers)]
            q.question_type = _get(apath, rec, "question_type", where, "str", default="")
            q.answer_type = _get(apath, rec, "answer_type", where, "str", default="")
            q.multiple_choice_answer = _get(apath, rec, "multiple_choice_answer", where, "str", default="")
    return list(questions.values())


# ---------------------------------------------------------------- NLVR2

def _nlvr2_label(path: Path, v: Any, where: str) -> bool:
    if isinstance(v, bool):
        return v
    if isinstance(v, str) and v.lower() in ("true", "false"):
        return v.lower() == "true"
    raise DataFormatError(path, f"{where}.label: expected \"True\" or \"False\", got {v!r}")


def read_nlvr2(path: str | Path) -> list[NLVR2Example]:
    """NLVR2 `{train,dev,test1}.json`: one JSON object per line; blank lines are skipped."""
    path = Path(path)
    if not path.is_file():
        raise DataFormatError(path, "file not found")
    out: list[NLVR2Example] = []
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError:
        raise DataFormatError(path, "not a UTF-8 text file") from None
    for n, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        where = f"line {n}"
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as err:
            raise DataFormatError(path, f"{where}: not valid JSON ({err.msg})") from None
        ident = _get(path, rec, "identifier", where, "str")
        parts = ident.split("-")
        if len(parts) < 4 or not all(parts):
            raise DataFormatError(path, f"{where}.identifier: expected split-set-pair-sentence, got {ident!r}")
        stem = ident.rsplit("-", 1)[0]
        if "label" not in rec:
            raise DataFormatError(path, f"{where}.label: missing")
        out.append(NLVR2Example(ident, _get(path, rec, "sentence", where, "str"), _nlvr2_label(path, rec["label"], where),
                                f"{stem}-img0.png", f"{stem}-img1.png"))
    return out


# ---------------------------------------------------------------- Visual Genome

def _vg_names(path: Path, rec: dict, where: str) -> list[str]:
    # VG 1.2 writes "names": [...]; VG 1.0 wrote a single "name".
    if isinstance(rec, dict) and "names" not in rec and "name" in rec:
        return [_get(path, rec, "name", where, "str").strip().lower()]
    names = _get(path, rec, "names", where, "list")
    if not all(isinstance(n, str) for n in names):
        raise DataFormatError(path, f"{where}.names: expected a list of strings")
    return [n.strip().lower() for n in names]


def _vg_box(path: Path, rec: dict, where: str) -> tuple[float, float, float, float]:
    return _box(path, [_get(path, rec, k, where, "number") for k in ("x", "y", "w", "h")], f"{where}.x/y/w/h")


def read_vg(objects_path: str | Path, attributes_path: str | Path | None = None,
            image_data_path: str | Path | None = None) -> dict[int, list[VGObject]] | VisualGenome:
    """Visual Genome objects (+ attributes merged by object id). Names and attributes are stripped and
    lower-cased, as the bottom-up-attention vocabularies are. With `image_data_path`, returns a
    `VisualGenome` that also holds image sizes; otherwise objects by image id."""
    opath = Path(objects_path)
    obj = read_json(opath)
    if not isinstance(obj, list):
        raise DataFormatError(opath, f"expected a JSON list of images at top level, got {_type_name(obj)}")
    objects: dict[int, list[VGObject]] = {}
    by_id: dict[int, VGObject] = {}
    for i, rec in enumerate(obj):
        iid = _get(opath, rec, "image_id", f"[{i}]", "int")
        lst = objects.setdefault(iid, [])
        for j, o in enumerate(_get(opath, rec, "objects", f"[{i}]", "list")):
            where = f"[{i}].objects[{j}]"
            vo = VGObject(_get(opath, o, "object_id", where, "int"), iid, _vg_box(opath, o, where), _vg_names(opath, o, where))
            lst.append(vo)
            by_id[vo.object_id] = vo
    if attributes_path is not None:
        apath = Path(attributes_path)
        aobj = read_json(apath)
        if not isinstance(aobj, list):
            raise DataFormatError(apath, f"expected a JSON list of images at top level, got {_type_name(aobj)}")
        for i, rec in enumerate(aobj):
            _get(apath, rec, "image_id", f"[{i}]", "int")
            for j, o in enumerate(_get(apath, rec, "attributes", f"[{i}]", "list")):
                where = f"[{i}].attributes[{j}]"
                attrs = _get(apath, o, "attributes", where, "list", default=[])
                if not all(isinstance(a, str) for a in attrs):
                    raise DataFormatError(apath, f"{where}.attributes: expected a list of strings")
                # Objects absent from objects.json (version skew between releases) are skipped.
                vo = by_id.get(_get(apath, o, "object_id", where, "int"))
                if vo is not None:
                    vo.attributes = [a.strip().lower() for a in attrs]
    if image_data_path is None:
        return objects
    ipath = Path(image_data_path)
    iobj = read_json(ipath)
    if not isinstance(iobj, list):
        raise DataFormatError(ipath, f"expected a JSON list of images at top level, got {_type_name(iobj)}")
    images: dict[int, ImageInfo] = {}
    for i, rec in enumerate(iobj):
        where = f"[{i}]"
        key = "image_id" if isinstance(rec, dict) and "image_id" in rec else "id"  # VG 1.0 used "id"
        iid = _get(ipath, rec, key, where, "int")
        url = _get(ipath, rec, "url", where, "str", default="")
        name = url.rsplit("/", 1)[-1] if url else f"{iid}.jpg"
        images[iid] = ImageInfo(iid, name, _get(ipath, rec, "width", where, "int"), _get(ipath, rec, "height", where, "int"))
    for iid in objects:
        if iid not in images:
            raise DataFormatError(opath, f"image id {iid} has objects but is not in {ipath}")
    return VisualGenome(images, objects)


def read_vocab(path: str | Path) -> list[str]:
    """`objects_vocab.txt` / `attributes_vocab.txt`: one class a line; a line "name1,name2" lists
    synonyms and the first is the name. Line i is class i, so blank lines are errors (except at the end)."""
    path = Path(path)
    if not path.is_file():
        raise DataFormatError(path, "file not found")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError:
        raise DataFormatError(path, "not a UTF-8 text file") from None
    while lines and not lines[-1].strip():
        lines.pop()
    names = []
    for n, line in enumerate(lines, start=1):
        name = line.split(",")[0].strip()
        if not name:
            raise DataFormatError(path, f"line {n}: empty class name")
        names.append(name)
    if not names:
        raise DataFormatError(path, "empty vocabulary")
    return names
