"""Feature store: region features written once by `minivlm extract`, read by pre-training and fine-tuning.

Layout of a store folder::

    meta.json                          vocabularies (class_names, attribute_names), feature_dim, extractor
    shard-r{rank}-{n:05d}.safetensors  many images each: concatenated per-region tensors + per-image rows

A shard holds the tensors `boxes` [R,4] f32, `features` [R,D] (float16 by default), `scores` [R] f32,
`labels` [R] i64, `attributes` [R] i64, and per image `image_sizes` [M,2] i64 and `flags` [M] u8, where
R is the sum of the M images' region counts. The header metadata carries the image keys and the region
offsets as JSON, so the key -> (shard, rows) index is built from headers alone and `store[key]` reads
just that image's rows through a lazily opened, memory-mapped `safe_open` handle.

Tags and attribute names are not stored per region: `labels` / `attributes` index the vocabularies in
meta.json, and the reader turns them back into names.

Shards are written through `minivlm.io.write_safetensors` (hidden temp file, then rename), so a shard is either
complete or invisible. A rerun after a kill asks `done_keys()` and skips what complete shards hold; images
still buffered at kill time are simply redone. Under torchrun each rank writes its own shards (the rank is
in the file name) for its own images.
"""

from __future__ import annotations

import itertools
import json
import os
import re
import struct
import threading
from collections import OrderedDict
from pathlib import Path
from typing import Any, Iterable, Iterator

import torch
from safetensors import safe_open

from minivlm.errors import DataFormatError, MiniVLMError
from minivlm.io import read_json, write_json, write_safetensors
from minivlm.regions import Regions

Key = int | str

META_FILE = "meta.json"
STORE_FORMAT = "minivlm-feature-store"
SHARD_FORMAT = "minivlm-feature-shard"
SHARD_GLOB = "shard-r*-*.safetensors"
_SHARD_RE = re.compile(r"^shard-r(\d+)-(\d+)\.safetensors$")
_HAS_TAGS, _HAS_ATTRS = 1, 2
_FEATURE_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
_MAX_OPEN = 32  # memory maps kept open per process; enough for shuffled reads over a cached working set


class MissingKeyError(MiniVLMError, KeyError):
    """A key that the store does not hold. Also a KeyError, so `dict`-style callers keep working."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0])


# ----------------------------------------------------------------------------------------------- shards


def _read_header(path: Path) -> dict[str, Any]:
    """The safetensors JSON header of a shard, checked enough to name the file when it is damaged."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise DataFormatError(path, "corrupt shard: file too short for a safetensors header")
            (n,) = struct.unpack("<Q", head)
            if n <= 0 or 8 + n > size:
                raise DataFormatError(path, f"corrupt shard: header length {n} does not fit a {size}-byte file")
            header = json.loads(f.read(n))
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise DataFormatError(path, "corrupt shard: header is not valid JSON") from None
    except OSError as err:
        raise DataFormatError(path, f"cannot read shard ({err.strerror})") from None
    if not isinstance(header, dict):
        raise DataFormatError(path, "corrupt shard: header is not a JSON object")
    data_len = size - 8 - n
    for name, info in header.items():
        if name != "__metadata__" and (not isinstance(info, dict) or info.get("data_offsets", [0, 0])[1] > data_len):
            raise DataFormatError(path, f"corrupt shard: tensor {name!r} lies beyond the end of the file (truncated?)")
    meta = header.get("__metadata__") or {}
    if meta.get("format") != SHARD_FORMAT:
        raise DataFormatError(path, f"not a feature-store shard (__metadata__.format is {meta.get('format')!r})")
    try:
        keys, offsets = json.loads(meta["keys"]), json.loads(meta["offsets"])
    except (KeyError, json.JSONDecodeError):
        raise DataFormatError(path, "corrupt shard: __metadata__ lacks valid 'keys'/'offsets'") from None
    if len(offsets) != len(keys) + 1 or header.get("boxes", {}).get("shape", [None])[0] != offsets[-1]:
        raise DataFormatError(path, "corrupt shard: 'offsets' do not match 'keys' and the 'boxes' rows")
    return header


def _shard_keys(path: Path) -> tuple[list[Key], list[int], dict[str, Any]]:
    header = _read_header(path)
    meta = header["__metadata__"]
    return json.loads(meta["keys"]), json.loads(meta["offsets"]), header


def _raise_duplicate(shards: list[Path]) -> None:
    """Names the first image that two shards (or one, twice) hold; the index build found there is one."""
    where: dict[Key, Path] = {}
    for path in shards:
        for key in _shard_keys(path)[0]:
            if key in where:
                raise DataFormatError(path, f"image {key!r} is also in {where[key].name}")
            where[key] = path
    raise DataFormatError(shards[-1], "an image is stored twice")


def _list_shards(root: Path) -> list[Path]:
    # Temp files from atomic_path start with "." and end in ".tmp", so they never match.
    return sorted(p for p in root.glob(SHARD_GLOB) if _SHARD_RE.match(p.name))


def _alt_key(key: Key) -> Key | None:
    """The same id spelled the other way (COCO image 42 vs TSV key "42")."""
    if isinstance(key, int):
        return str(key)
    if isinstance(key, str) and key.isdigit():
        return int(key)
    return None


def _spellings(key: Key) -> list[Key]:
    """The names under which a store may hold one image: as given, the id spelled the other way, the file
    name without its extension."""
    out = [key]
    if (alt := _alt_key(key)) is not None:
        out.append(alt)
    if isinstance(key, str) and (stem := Path(key).stem) != key:
        out.append(stem)
    return out


def _check_key(key: Any) -> Key:
    if isinstance(key, bool) or not isinstance(key, (int, str)):
        if hasattr(key, "item"):  # numpy / torch scalars
            return _check_key(key.item())
        raise MiniVLMError(f"feature-store keys must be int or str, got {type(key).__name__} {key!r}")
    return key


# ----------------------------------------------------------------------------------------------- writer


class FeatureStoreWriter:
    """Appends images to a store, `shard_size` images per shard file; resumable after a kill.

    >>> with FeatureStoreWriter(root, rank, world_size, meta={"class_names": names}) as w:
    ...     for key in w.todo(all_keys):
    ...         w.add(key, extract(key))
    """

    def __init__(self, root: str | Path, rank: int = 0, world_size: int = 1, shard_size: int = 256,
                 meta: dict[str, Any] | None = None, dtype: torch.dtype | str = torch.float16):
        if not 0 <= rank < world_size:
            raise MiniVLMError(f"rank {rank} is not in [0, world_size={world_size})")
        if shard_size < 1:
            raise MiniVLMError(f"shard_size must be >= 1, got {shard_size}")
        self.root, self.rank, self.world_size, self.shard_size = Path(root), rank, world_size, shard_size
        self.dtype = _FEATURE_DTYPES[dtype] if isinstance(dtype, str) else dtype
        if self.dtype not in _FEATURE_DTYPES.values():
            raise MiniVLMError(f"feature dtype must be one of {list(_FEATURE_DTYPES)}, got {dtype}")
        self.root.mkdir(parents=True, exist_ok=True)
        # Only this rank writes files with this prefix, so its stale temp files (from a kill) are garbage.
        for tmp in self.root.glob(f".shard-r{rank}-*.tmp"):
            tmp.unlink(missing_ok=True)
        self.meta = self._merge_meta(meta or {})
        self._class_names = self.meta.get("class_names") or []
        self._attr_names = self.meta.get("attribute_names") or []
        self._done: set[Key] = set()
        self._next = 0
        for path in _list_shards(self.root):
            self._done.update(_shard_keys(path)[0])
            r, n = map(int, _SHARD_RE.match(path.name).groups())
            if r == rank:
                self._next = max(self._next, n + 1)
        self._buffer: list[tuple[Key, Regions]] = []
        self._buffered: set[Key] = set()
        self.closed = False

    def _merge_meta(self, meta: dict[str, Any]) -> dict[str, Any]:
        path = self.root / META_FILE
        old = read_json(path) if path.exists() else {}
        for name, value in meta.items():
            if name in old and old[name] != value:
                raise MiniVLMError(f"{path}: the store was written with a different {name!r}; resuming would mix "
                                   f"two kinds of features - use a new folder or the original settings")
        merged = {"format": STORE_FORMAT, "version": 1, **old, **meta}
        if merged != old:
            write_json(path, merged, indent=1)
        return merged

    def done_keys(self) -> set[Key]:
        """Keys held by complete shards (of every rank), including the ones this writer has flushed."""
        return set(self._done)

    def todo(self, keys: Iterable[Key]) -> list[Key]:
        """This rank's share of `keys` (round-robin by position) minus the ones already stored."""
        return [k for i, k in enumerate(keys) if i % self.world_size == self.rank and k not in self._done]

    def add(self, key: Key, regions: Regions) -> bool:
        """Buffers one image; returns False (and stores nothing) if the key is already stored or buffered."""
        if self.closed:
            raise MiniVLMError(f"{self.root}: add() after close()")
        key = _check_key(key)
        if key in self._done or key in self._buffered:
            return False
        self._validate(key, regions)
        self._buffer.append((key, _to_cpu(regions)))
        self._buffered.add(key)
        if len(self._buffer) >= self.shard_size:
            self.flush()
        return True

    def _validate(self, key: Key, r: Regions) -> None:
        k = r.boxes.shape[0]
        where = f"image {key!r}"
        if r.boxes.shape != (k, 4) or r.features.dim() != 2 or r.features.shape[0] != k:
            raise MiniVLMError(f"{where}: boxes must be [K,4] and features [K,D], got {tuple(r.boxes.shape)} "
                               f"and {tuple(r.features.shape)}")
        if r.scores.shape != (k,) or r.labels.shape != (k,):
            raise MiniVLMError(f"{where}: scores and labels must be [K={k}]")
        if r.attributes is not None and r.attributes.shape != (k,):
            raise MiniVLMError(f"{where}: attributes must be [K={k}] or None")
        dim = self.meta.get("feature_dim")
        if dim is None:
            self.meta = self._merge_meta({"feature_dim": int(r.features.shape[1])})
        elif r.features.shape[1] != dim:
            raise MiniVLMError(f"{where}: feature dim {r.features.shape[1]} != the store's feature_dim {dim}")
        _check_names(where, "tags", r.tags, r.labels, self._class_names, "class_names", k)
        if r.attribute_names:
            if r.attributes is None:
                raise MiniVLMError(f"{where}: attribute_names given without attributes")
            _check_names(where, "attribute_names", r.attribute_names, r.attributes, self._attr_names,
                         "attribute_names", k)

    def flush(self) -> None:
        """Writes the buffered images as one complete shard (no-op when the buffer is empty)."""
        if not self._buffer:
            return
        keys = [k for k, _ in self._buffer]
        regs = [r for _, r in self._buffer]
        offsets = [0]
        for r in regs:
            offsets.append(offsets[-1] + len(r))
        dim = int(self.meta["feature_dim"])
        tensors = {
            "boxes": torch.cat([r.boxes.float().reshape(-1, 4) for r in regs]),
            "features": torch.cat([r.features.reshape(-1, dim).to(self.dtype) for r in regs]),
            "scores": torch.cat([r.scores.float().reshape(-1) for r in regs]),
            "labels": torch.cat([r.labels.long().reshape(-1) for r in regs]),
            "attributes": torch.cat([(r.attributes if r.attributes is not None else
                                      torch.full((len(r),), -1)).long().reshape(-1) for r in regs]),
            "image_sizes": torch.tensor([[int(r.image_size[0]), int(r.image_size[1])] for r in regs],
                                        dtype=torch.long),
            "flags": torch.tensor([(_HAS_TAGS if r.tags else 0) | (_HAS_ATTRS if r.attributes is not None else 0)
                                   for r in regs], dtype=torch.uint8),
        }
        metadata = {"format": SHARD_FORMAT, "keys": json.dumps(keys), "offsets": json.dumps(offsets),
                    "rank": str(self.rank)}
        path = self.root / f"shard-r{self.rank}-{self._next:05d}.safetensors"
        write_safetensors({n: t.contiguous() for n, t in tensors.items()}, path, metadata)
        self._next += 1
        self._done.update(keys)
        self._buffer.clear()
        self._buffered.clear()

    def close(self) -> None:
        """Flushes the last, partial shard."""
        if not self.closed:
            self.flush()
            self.closed = True

    def __enter__(self) -> "FeatureStoreWriter":
        return self

    def __exit__(self, *exc) -> None:
        # Buffered images are complete and validated, so they are worth keeping even when the loop failed.
        self.close()


def _check_names(where: str, field: str, names: list[str], ids: torch.Tensor, vocab: list[str], vocab_field: str,
                 k: int) -> None:
    """Names are stored as ids into meta.json's vocabulary, so they must agree with it to round-trip."""
    if not names:
        return
    if len(names) != k:
        raise MiniVLMError(f"{where}: {len(names)} {field} for {k} regions")
    if not vocab:
        raise MiniVLMError(f"{where}: regions carry {field} but the store's meta has no {vocab_field!r}; pass "
                           f"meta={{{vocab_field!r}: [...]}} to FeatureStoreWriter")
    for name, i in zip(names, ids.tolist()):
        expected = vocab[i] if 0 <= i < len(vocab) else ""
        if name != expected:
            raise MiniVLMError(f"{where}: {field} entry {name!r} has id {i}, but {vocab_field}[{i}] is {expected!r}")


def _to_cpu(r: Regions) -> Regions:
    # Detach and copy so the buffer never pins GPU memory or a large tensor that a slice points into.
    def c(t):
        return None if t is None else t.detach().to("cpu", copy=True)

    return Regions(boxes=c(r.boxes), features=c(r.features), scores=c(r.scores), labels=c(r.labels),
                   image_size=(int(r.image_size[0]), int(r.image_size[1])), tags=list(r.tags),
                   attributes=c(r.attributes), attribute_names=list(r.attribute_names))


# ----------------------------------------------------------------------------------------------- reader


class FeatureStore:
    """Read-only, lazy view of a store folder: `store[key] -> Regions` reads only that image's rows.

    The index is built from shard headers on first use; shard files are memory-mapped on demand, per
    process (a DataLoader worker that inherits the object by fork or pickle opens its own handles).
    """

    def __init__(self, root: str | Path):
        self.root = Path(root)
        if not self.root.is_dir():
            raise DataFormatError(self.root, "feature store folder not found (run `minivlm extract` first)")
        meta_path = self.root / META_FILE
        if not meta_path.is_file():
            raise DataFormatError(meta_path, "not a feature store: meta.json is missing")
        self.meta: dict[str, Any] = read_json(meta_path)
        if self.meta.get("format") != STORE_FORMAT:
            raise DataFormatError(meta_path, f"'format' is {self.meta.get('format')!r}, expected {STORE_FORMAT!r}")
        self.class_names: list[str] = list(self.meta.get("class_names") or [])
        self.attribute_names: list[str] = list(self.meta.get("attribute_names") or [])
        self._lock = threading.Lock()
        self._index: dict[Key, tuple[int, int]] | None = None  # key -> (shard id, image position)
        self._by_name: dict[str, Key] | None = None  # file name and stem -> path-like key (`find`)
        self._shards: list[Path] = []
        self._offsets: list[list[int]] = []
        self._handles: OrderedDict[Path, Any] = OrderedDict()  # LRU of memory-mapped shards
        self._pid = os.getpid()

    # -- index

    def _get_index(self) -> dict[Key, tuple[int, int]]:
        if self._index is None:
            with self._lock:
                if self._index is None:
                    self._build_index()
        return self._index

    def _build_index(self) -> None:
        index: dict[Key, tuple[int, int]] = {}
        shards, all_offsets = _list_shards(self.root), []
        for sid, path in enumerate(shards):
            keys, offsets, _ = _shard_keys(path)
            before = len(index)
            # one C-level update per shard (a million-image store has ~4,000 shards); a duplicate shows as a
            # shortfall in the count, and only then are the keys looked at one by one
            index.update(zip(keys, zip(itertools.repeat(sid), range(len(keys)))))
            if len(index) != before + len(keys):
                _raise_duplicate(shards[: sid + 1])
            all_offsets.append(offsets)
        self._shards, self._offsets, self._index = shards, all_offsets, index

    def refresh(self) -> None:
        """Forget the cached index, to see shards that a running writer has added since."""
        with self._lock:
            self._index, self._by_name, self._handles = None, None, OrderedDict()

    def _locate(self, key: Key) -> tuple[int, int] | None:
        index = self._get_index()
        loc = index.get(key)
        if loc is None and (alt := _alt_key(key)) is not None:
            loc = index.get(alt)
        return loc

    def __contains__(self, key: object) -> bool:
        return isinstance(key, (int, str)) and self._locate(key) is not None

    def find(self, key: Key) -> Key | None:
        """A key under which `store[key]` reads the image that a dataset names `key`, or None.

        Datasets and stores name images differently: a COCO id is 42 in the dataset and "42" in an Oscar TSV
        import; a file name may be stored without its extension; and `extract --images nlvr2/images` keys the
        NLVR2 image "dev-850-0-img0.png" by its path, "dev/dev-850-0-img0.png" (real NLVR2 train images sit
        one folder deeper), so a bare file name is also looked up by the file names of path-like keys."""
        for k in _spellings(key):
            if k in self:
                return k
        if not isinstance(key, str):
            return None
        if self._by_name is None:
            by_name: dict[str, Key] = {}
            for k in self.keys():
                if isinstance(k, str):
                    by_name.setdefault(Path(k).name, k)
                    by_name.setdefault(Path(k).stem, k)
            self._by_name = by_name
        return self._by_name.get(Path(key).name, self._by_name.get(Path(key).stem))

    def __len__(self) -> int:
        return len(self._get_index())

    def keys(self) -> list[Key]:
        """All keys, in shard order."""
        return list(self._get_index())

    def __iter__(self) -> Iterator[Key]:
        return iter(self.keys())

    @property
    def feature_dim(self) -> int | None:
        if self.meta.get("feature_dim") is not None:
            return int(self.meta["feature_dim"])
        shards = _list_shards(self.root)
        return int(_read_header(shards[0])["features"]["shape"][1]) if shards else None

    # -- reading

    def _handle(self, sid: int):
        with self._lock:
            if self._pid != os.getpid():  # forked: mmaps of the parent are not ours to share
                self._handles, self._pid = OrderedDict(), os.getpid()
            path = self._shards[sid]
            h = self._handles.get(path)
            if h is None:
                try:
                    h = safe_open(str(path), framework="pt")
                except Exception as err:
                    raise DataFormatError(path, f"corrupt shard: cannot open ({err})") from None
                self._handles[path] = h
                if len(self._handles) > _MAX_OPEN:
                    self._handles.popitem(last=False)
            else:
                self._handles.move_to_end(path)
            return h

    def __getitem__(self, key: Key) -> Regions:
        loc = self._locate(key)
        if loc is None:
            raise MissingKeyError(f"image {key!r} is not in the feature store {self.root} ({len(self)} images)")
        sid, pos = loc
        a, b = self._offsets[sid][pos], self._offsets[sid][pos + 1]
        h, path = self._handle(sid), self._shards[sid]
        try:
            boxes = h.get_slice("boxes")[a:b].float()
            features = h.get_slice("features")[a:b].float()
            scores = h.get_slice("scores")[a:b].float()
            labels = h.get_slice("labels")[a:b].long()
            attrs = h.get_slice("attributes")[a:b].long()
            w, hgt = h.get_slice("image_sizes")[pos:pos + 1][0].tolist()
            flags = int(h.get_slice("flags")[pos:pos + 1][0])
        except Exception as err:
            raise DataFormatError(path, f"corrupt shard: cannot read image {key!r} ({err})") from None
        tags = _names(labels, self.class_names) if flags & _HAS_TAGS else []
        has_attrs = bool(flags & _HAS_ATTRS)
        return Regions(boxes=boxes, features=features, scores=scores, labels=labels, image_size=(w, hgt), tags=tags,
                       attributes=attrs if has_attrs else None,
                       attribute_names=_names(attrs, self.attribute_names) if has_attrs and self.attribute_names
                       else [])

    def get(self, key: Key, default: Regions | None = None) -> Regions | None:
        return self[key] if key in self else default

    def __getstate__(self) -> dict[str, Any]:
        # Handles and locks do not cross process boundaries; the index (plain data) does.
        state = self.__dict__.copy()
        state["_handles"], state["_lock"] = OrderedDict(), None
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._lock, self._pid = threading.Lock(), os.getpid()

    def __repr__(self) -> str:
        return f"FeatureStore({str(self.root)!r})"


def _names(ids: torch.Tensor, vocab: list[str]) -> list[str]:
    return [vocab[i] if 0 <= i < len(vocab) else "" for i in ids.tolist()]
