"""Oscar / VinVL TSV interop: read their released region features, and write ours in their layout.

features.tsv:  `image_key \\t {"num_boxes": N, "features": base64(float32[N, D + 6])}`, where the last 6
               values of each row are the box code: normalised x1, y1, x2, y2, width, height (the same code
               as `Regions.box_encoding()`).
labels.tsv:    `image_key \\t [{"class": "dog", "rect": [x1, y1, x2, y2], "conf": 0.93}, ...]` (VinVL's
               predictions may also be `{"objects": [...], "image_w": W, "image_h": H}`; both are read).
*.lineidx:     the byte offset of each line, one per line, beside the TSV (`features.tsv` ->
               `features.lineidx`); when missing it is built in memory by one scan of the TSV.

Boxes in pixels come back from the normalised code times the image size. The size is taken, first match
wins, from: `image_sizes[key]`; `image_w`/`image_h` in the labels entry; the labels' pixel rects when they
line up one-to-one with the regions (then the rects themselves are the boxes, exactly). Without any of
these the boxes stay normalised and `image_size` is (1, 1): the box code, which is all the fusion model
sees, is unaffected.

Labels line up with regions by position when their counts agree (VinVL writes them that way); otherwise
each region takes the label whose rect overlaps its box best (IoU >= 0.5), when the size is known. A
region without a label gets class id -1 and tag "".
"""

from __future__ import annotations

import base64
import binascii
import json
import os
import re
import threading
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

import numpy as np
import torch
from torchvision.ops import box_iou
from tqdm import tqdm

from minivlm.data.feature_store import FeatureStore, FeatureStoreWriter, Key, MissingKeyError, _alt_key
from minivlm.errors import DataFormatError, MiniVLMError
from minivlm.io import atomic_path, write_text
from minivlm.regions import Regions

BOX_DIMS = 6
_TRAILING_ID = re.compile(r"^(?:.*_)?0*(\d+)$")


def lineidx_path(tsv: str | Path) -> Path:
    return Path(tsv).with_suffix(".lineidx")


def build_lineidx(tsv: str | Path) -> list[int]:
    """Byte offset of every non-empty line."""
    offsets, pos = [], 0
    with open(tsv, "rb") as f:
        for line in f:
            if line.strip():
                offsets.append(pos)
            pos += len(line)
    return offsets


class TSVFile:
    """Random access to the lines of a TSV through its .lineidx: `row(i) -> (key, value)`."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not self.path.is_file():
            raise DataFormatError(self.path, "TSV file not found")
        idx = lineidx_path(self.path)
        if idx.is_file():
            try:
                self.offsets = [int(x) for x in idx.read_text().split()]
            except ValueError:
                raise DataFormatError(idx, "line index must hold one integer byte offset per line") from None
        else:  # kept in memory: reading a dataset should not write into its folder
            self.offsets = build_lineidx(self.path)
        self._size = self.path.stat().st_size
        self._keys: list[str] | None = None
        self._key_rows: dict[str, int] | None = None
        self._file, self._pid, self._lock = None, os.getpid(), threading.Lock()

    def __len__(self) -> int:
        return len(self.offsets)

    def _open(self):
        # A forked DataLoader worker would share the parent's file position: give each process its own.
        if self._file is None or self._pid != os.getpid():
            self._file, self._pid = open(self.path, "rb"), os.getpid()
        return self._file

    def row(self, i: int) -> tuple[str, str]:
        if not 0 <= i < len(self.offsets):
            raise IndexError(f"{self.path}: row {i} out of range (0..{len(self.offsets) - 1})")
        with self._lock:  # seek + read must not interleave between threads
            return self._row(i)

    def _row(self, i: int) -> tuple[str, str]:
        off, f = self.offsets[i], self._open()
        if off >= self._size:
            raise DataFormatError(lineidx_path(self.path), f"offset {off} of row {i} is past the end of {self.path.name}")
        if off > 0:  # a stale index lands mid-line: say so instead of returning garbage
            f.seek(off - 1)
            if f.read(1) != b"\n":
                raise DataFormatError(lineidx_path(self.path), f"offset {off} of row {i} is not at a line start "
                                                               f"(stale .lineidx? delete it to rebuild)")
        f.seek(off)
        line = f.readline().decode("utf-8").rstrip("\r\n")
        key, sep, value = line.partition("\t")
        if not sep:
            raise DataFormatError(self.path, f"row {i}: expected 'key<TAB>value', found no tab")
        return key, value

    def keys(self) -> list[str]:
        """Row keys in file order (one short read per row, not the whole line)."""
        if self._keys is None:
            with self._lock:
                self._keys = self._scan_keys()
        return self._keys

    def _rows(self) -> dict[str, int]:
        if self._key_rows is None:
            self._key_rows = {k: i for i, k in enumerate(self.keys())}
        return self._key_rows

    def _scan_keys(self) -> list[str]:
        keys, f = [], self._open()
        for off in self.offsets:
            f.seek(off)
            # Keys are short; read up to the tab without pulling in megabytes of base64.
            head = b""
            while b"\t" not in head:
                chunk = f.read(256)
                if not chunk:
                    break
                head += chunk
            keys.append(head.split(b"\t", 1)[0].decode("utf-8"))
        return keys

    def find(self, key: Key) -> int | None:
        return self._rows().get(str(key))

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_file": None, "_lock": None}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()


def _json(tsv: TSVFile, key: str, value: str, field: str) -> Any:
    try:
        return json.loads(value)
    except json.JSONDecodeError as err:
        raise DataFormatError(tsv.path, f"image {key!r}: {field} is not valid JSON ({err.msg})") from None


def _label_objects(tsv: TSVFile, key: str, value: str) -> tuple[list[dict], tuple[int, int] | None]:
    data = _json(tsv, key, value, "labels")
    size = None
    if isinstance(data, dict):
        if "image_w" in data and "image_h" in data:
            size = (int(data["image_w"]), int(data["image_h"]))
        data = data.get("objects", [])
    if not isinstance(data, list) or not all(isinstance(o, dict) and "class" in o and "rect" in o for o in data):
        raise DataFormatError(tsv.path, f"image {key!r}: labels must be a list of {{'class', 'rect', 'conf'}}")
    return data, size


def image_id_from_key(key: str) -> Key:
    """COCO-style keys to ids: "COCO_val2014_000000391895" -> 391895, "42" -> 42; other keys unchanged."""
    m = _TRAILING_ID.match(key)
    return int(m.group(1)) if m else key


def _lookup(mapping: Mapping | None, key: str):
    """`mapping[key]`, also trying the key as an int and as a COCO image id."""
    if not mapping:
        return None
    for k in (key, _alt_key(key), image_id_from_key(key)):
        if k is not None and k in mapping:
            return mapping[k]
    return None


class OscarTSV:
    """Random-access reader: `tsv[key] -> Regions` (a str is an image key, an int a row number)."""

    def __init__(self, features_tsv: str | Path, labels_tsv: str | Path | None = None,
                 image_sizes: Mapping[Key, tuple[int, int]] | None = None, class_names: list[str] | None = None,
                 attribute_names: list[str] | None = None):
        self.features = TSVFile(features_tsv)
        self.labels = TSVFile(labels_tsv) if labels_tsv is not None else None
        self.image_sizes = image_sizes
        self._class_names = list(class_names) if class_names is not None else None
        self._attr_names = list(attribute_names) if attribute_names is not None else None
        self.feature_dim: int | None = None

    def __len__(self) -> int:
        return len(self.features)

    def keys(self) -> list[str]:
        return self.features.keys()

    def __contains__(self, key: object) -> bool:
        return isinstance(key, (int, str)) and self.features.find(key) is not None

    @property
    def class_names(self) -> list[str]:
        """The given vocabulary, or (without one) the sorted classes found in the labels file."""
        if self._class_names is None:
            self._scan_vocab()
        return self._class_names

    @property
    def attribute_names(self) -> list[str]:
        if self._attr_names is None:
            self._scan_vocab()
        return self._attr_names

    def _scan_vocab(self) -> None:
        classes, attrs = set(), set()
        if self.labels is not None:
            for i in range(len(self.labels)):
                key, value = self.labels.row(i)
                for o in _label_objects(self.labels, key, value)[0]:
                    if o["class"]:
                        classes.add(o["class"])
                    attrs.update(a for a in o.get("attributes", [])[:1] if a)
        if self._class_names is None:
            self._class_names = sorted(classes)
        if self._attr_names is None:
            self._attr_names = sorted(attrs)

    def __getitem__(self, key: Key) -> Regions:
        if isinstance(key, str):
            row = self.features.find(key)
            if row is None:
                raise MissingKeyError(f"image {key!r} is not in {self.features.path}")
        else:
            row = int(key)
        return self.read_row(row)[1]

    def __iter__(self) -> Iterator[tuple[str, Regions]]:
        for i in range(len(self)):
            yield self.read_row(i)

    def read_row(self, row: int) -> tuple[str, Regions]:
        key, value = self.features.row(row)
        feats, code = self._decode(key, value)
        n = feats.shape[0]
        size = _lookup(self.image_sizes, key)
        objects: list[dict] = []
        if self.labels is not None and (lrow := self.labels.find(key)) is not None:
            objects, label_size = _label_objects(self.labels, key, self.labels.row(lrow)[1])
            size = size or label_size
        rects = None
        if objects and len(objects) == n:
            rects = torch.tensor([[float(v) for v in o["rect"]] for o in objects], dtype=torch.float32).reshape(n, 4)
            if size is None:
                size = _size_from_rects(rects, code)
        if size is not None:
            w, h = int(size[0]), int(size[1])
            boxes = code[:, :4] * torch.tensor([w, h, w, h], dtype=torch.float32)
            if rects is not None and _agrees(rects, boxes, w, h):
                boxes = rects
        else:
            w, h = 1, 1
            boxes = code[:, :4].clone()

        labels = torch.full((n,), -1, dtype=torch.long)
        attrs = torch.full((n,), -1, dtype=torch.long)
        scores = torch.zeros(n)
        match = _match(objects, n, rects, boxes, size is not None)
        has_attrs = any(o.get("attributes") for o in objects)
        for i, j in enumerate(match):
            if j < 0:
                continue
            o = objects[j]
            labels[i] = self._vocab_id(self.class_names, o["class"], key, "class", "class_names")
            scores[i] = float(o.get("conf", 1.0))
            if o.get("attributes"):
                attrs[i] = self._vocab_id(self.attribute_names, o["attributes"][0], key, "attribute",
                                          "attribute_names")
        tags = [self.class_names[i] if i >= 0 else "" for i in labels.tolist()] if objects else []
        return key, Regions(
            boxes=boxes, features=feats, scores=scores, labels=labels, image_size=(w, h), tags=tags,
            attributes=attrs if has_attrs else None,
            attribute_names=[self.attribute_names[i] if i >= 0 else "" for i in attrs.tolist()] if has_attrs else [],
        )

    def _vocab_id(self, vocab: list[str], name: str, key: str, field: str, vocab_field: str) -> int:
        if not name:
            return -1
        try:
            return vocab.index(name)  # vocabularies are small (1,600 / 400)
        except ValueError:
            raise DataFormatError(self.labels.path, f"image {key!r}: {field} {name!r} is not in the given "
                                                    f"{vocab_field} ({len(vocab)} names)") from None

    def _decode(self, key: str, value: str) -> tuple[torch.Tensor, torch.Tensor]:
        data = _json(self.features, key, value, "features entry")
        if not isinstance(data, dict) or "num_boxes" not in data or "features" not in data:
            raise DataFormatError(self.features.path, f"image {key!r}: expected {{'num_boxes', 'features'}}")
        n = int(data["num_boxes"])
        try:
            flat = np.frombuffer(base64.b64decode(data["features"], validate=True), dtype=np.float32)
        except (binascii.Error, ValueError):
            raise DataFormatError(self.features.path, f"image {key!r}: 'features' is not base64 float32") from None
        if n == 0:
            if flat.size:
                raise DataFormatError(self.features.path, f"image {key!r}: num_boxes is 0 but 'features' is not empty")
            d = self.feature_dim or 0
            return torch.zeros(0, d), torch.zeros(0, BOX_DIMS)
        if flat.size % n or flat.size // n <= BOX_DIMS:
            raise DataFormatError(self.features.path, f"image {key!r}: {flat.size} floats do not split into "
                                                      f"num_boxes={n} rows of feature_dim + 6")
        arr = torch.from_numpy(flat.copy()).reshape(n, -1)
        d = arr.shape[1] - BOX_DIMS
        if self.feature_dim is None:
            self.feature_dim = d
        elif d != self.feature_dim:
            raise DataFormatError(self.features.path, f"image {key!r}: feature dim {d} != {self.feature_dim} "
                                                      f"of earlier rows")
        return arr[:, :d], arr[:, d:]


def _size_from_rects(rects: torch.Tensor, code: torch.Tensor) -> tuple[int, int] | None:
    """The image size that maps the normalised box code onto the pixel rects (least squares), if any."""
    size = []
    for cols in ((0, 2), (1, 3)):
        c, r = code[:, cols].double().reshape(-1), rects[:, cols].double().reshape(-1)
        denom = float((c * c).sum())
        if denom <= 0:
            return None
        size.append(int(round(float((c * r).sum()) / denom)))
    w, h = size
    if w < 1 or h < 1:
        return None
    boxes = code[:, :4] * torch.tensor([w, h, w, h], dtype=torch.float32)
    return (w, h) if _agrees(rects, boxes, w, h) else None


def _agrees(rects: torch.Tensor, boxes: torch.Tensor, w: int, h: int) -> bool:
    # The code is float32 and VinVL clamps it to the image, so allow a pixel (or 1%) of slack.
    tol = max(1.0, 0.01 * max(w, h))
    return bool(((rects - boxes).abs() <= tol).all())


def _match(objects: list[dict], n: int, rects: torch.Tensor | None, boxes: torch.Tensor, sized: bool) -> list[int]:
    """For each region, the index of its label entry, or -1."""
    if not objects:
        return [-1] * n
    if rects is not None:  # same count: VinVL's predictions are written in region order
        return list(range(n))
    if not sized or n == 0:
        return [-1] * n  # pixel rects cannot be compared with normalised boxes
    obj_rects = torch.tensor([[float(v) for v in o["rect"]] for o in objects], dtype=torch.float32).reshape(-1, 4)
    iou = box_iou(boxes, obj_rects)
    best, idx = iou.max(dim=1)
    return [int(j) if b >= 0.5 else -1 for b, j in zip(best.tolist(), idx.tolist())]


# ------------------------------------------------------------------------------------------- store <-> TSV


def import_oscar_tsv(features_tsv: str | Path, out_store_root: str | Path, labels_tsv: str | Path | None = None,
                     image_sizes: Mapping[Key, tuple[int, int]] | None = None, class_names: list[str] | None = None,
                     attribute_names: list[str] | None = None, shard_size: int = 256,
                     dtype: torch.dtype | str = torch.float16, rank: int = 0, world_size: int = 1,
                     key_fn: Callable[[str], Key] | None = None) -> FeatureStore:
    """Copies an Oscar/VinVL features TSV (+ labels) into a feature store; resumable like any store write.

    Keys stay the TSV's strings unless `key_fn` maps them (e.g. `image_id_from_key` for COCO ids);
    `FeatureStore` also finds "42" when asked for 42. `image_sizes` may be keyed by the TSV key or the
    COCO id. See the module doc for how boxes and image sizes are recovered.
    """
    tsv = OscarTSV(features_tsv, labels_tsv, image_sizes, class_names, attribute_names)
    meta = {"class_names": tsv.class_names, "attribute_names": tsv.attribute_names,
            "extractor": {"name": "oscar-tsv", "features_tsv": str(Path(features_tsv).resolve()),
                          "labels_tsv": str(Path(labels_tsv).resolve()) if labels_tsv else None}}
    with FeatureStoreWriter(out_store_root, rank, world_size, shard_size, meta=meta, dtype=dtype) as writer:
        keys = [key_fn(k) if key_fn else k for k in tsv.keys()]
        todo = [i for i in range(len(keys)) if i % world_size == rank and keys[i] not in writer.done_keys()]
        for i in tqdm(todo, desc="import tsv", unit="img", disable=len(todo) < 100):
            writer.add(keys[i], tsv.read_row(i)[1])
    return FeatureStore(out_store_root)


def export_oscar_tsv(store: FeatureStore | str | Path, features_tsv: str | Path,
                     labels_tsv: str | Path | None = None) -> int:
    """Writes the store as an Oscar/VinVL features TSV (+ labels TSV), each with its .lineidx; returns rows."""
    if not isinstance(store, FeatureStore):
        store = FeatureStore(store)
    keys = store.keys()
    for key in keys:
        if "\t" in str(key) or "\n" in str(key):
            raise MiniVLMError(f"image key {key!r} contains a tab or newline; it cannot be a TSV key")
    # Drop old indexes first: a kill mid-export then leaves TSVs whose index is rebuilt, never a stale one.
    for path in (features_tsv, labels_tsv):
        if path is not None:
            lineidx_path(path).unlink(missing_ok=True)
    feat_offsets, label_offsets = [], []
    with atomic_path(features_tsv) as ftmp, open(ftmp, "wb") as f, \
            _maybe_atomic(labels_tsv) as ltmp, _maybe_open(ltmp) as lf:
        for key in tqdm(keys, desc="export tsv", unit="img", disable=len(keys) < 100):
            r = store[key]
            rows = torch.cat([r.features.float(), r.box_encoding()], dim=1).numpy().astype(np.float32)
            b64 = base64.b64encode(rows.tobytes()).decode("ascii")
            feat_offsets.append(f.tell())
            f.write(f"{key}\t{json.dumps({'num_boxes': len(r), 'features': b64})}\n".encode("utf-8"))
            if lf is not None:
                objects = []
                for i in range(len(r)):
                    o = {"class": r.tags[i] if r.tags else "", "rect": [float(v) for v in r.boxes[i].tolist()],
                         "conf": float(r.scores[i])}
                    if r.attribute_names and r.attribute_names[i]:
                        o["attributes"] = [r.attribute_names[i]]
                    objects.append(o)
                label_offsets.append(lf.tell())
                lf.write(f"{key}\t{json.dumps(objects)}\n".encode("utf-8"))
    write_text(lineidx_path(features_tsv), "".join(f"{o}\n" for o in feat_offsets))
    if labels_tsv is not None:
        write_text(lineidx_path(labels_tsv), "".join(f"{o}\n" for o in label_offsets))
    return len(keys)


class _Null:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


def _maybe_atomic(path):
    return atomic_path(path) if path is not None else _Null()


def _maybe_open(path):
    return open(path, "wb") if path is not None else _Null()
