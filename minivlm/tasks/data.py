"""What the four fine-tuning tasks share: finding an image's regions in a feature store, choosing splits,
building the task transformer's config and initialising it from a pre-trained folder, and batching.

Feature-store keys: COCO images are stored under their integer image id, NLVR2 images under their path
relative to the image folder given to `minivlm extract` ("dev/dev-850-0-img0.png") or their file name.
Lookups also try the other spelling of an id ("42" / 42), the file name without its extension and (with
`KeyResolver`) the file name inside a relative path, so stores written by other tools (e.g. an Oscar TSV
import) still work.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator, Protocol, Sequence, TypeVar

import torch

from minivlm.config import BertConfig, get_bert
from minivlm.errors import MiniVLMError
from minivlm.regions import Regions

T = TypeVar("T")
Key = int | str
TASKS = ("caption", "vqa", "nlvr2", "retrieval")


class RegionSource(Protocol):
    """A feature store, or anything keyed by image that returns `Regions`."""

    def __contains__(self, key: object) -> bool: ...

    def __getitem__(self, key: Any) -> Regions: ...


# ---------------------------------------------------------------------------------------------- regions


def key_candidates(key: Key) -> list[Key]:
    """The spellings under which a store may hold one image."""
    out: list[Key] = [key]
    if isinstance(key, int):
        out.append(str(key))
    elif isinstance(key, str):
        if key.isdigit():
            out.append(int(key))
        stem = Path(key).stem
        if stem != key:
            out.append(stem)
    return out


def find_key(store: RegionSource, key: Key) -> Key | None:
    """The key under which `store` holds the image, or None."""
    for k in key_candidates(key):
        if k in store:
            return k
    return None


class KeyResolver:
    """Finds an image's key in a store: as given, spelled the other way, or by file name when the store is
    keyed by paths relative to an image folder (`minivlm extract --images nlvr2/images` keys the NLVR2
    image "dev-850-0-img0.png" as "dev/dev-850-0-img0.png"; real NLVR2 train images sit one folder deeper)."""

    def __init__(self, store: RegionSource):
        self.store = store
        self._by_name: dict[str, Key] | None = None

    def __call__(self, key: Key) -> Key | None:
        found = find_key(self.store, key)
        if found is not None or not isinstance(key, str):
            return found
        if self._by_name is None:
            self._by_name = {}
            for k in (self.store.keys() if hasattr(self.store, "keys") else []):
                if isinstance(k, str):
                    self._by_name.setdefault(Path(k).name, k)
                    self._by_name.setdefault(Path(k).stem, k)
        return self._by_name.get(Path(key).name, self._by_name.get(Path(key).stem))


def get_regions(store: RegionSource, key: Key) -> Regions:
    found = find_key(store, key)
    if found is None:
        raise MiniVLMError(f"image {key!r} has no regions in the feature store {getattr(store, 'root', store)!s} "
                           "(run `minivlm extract` over this split's images)")
    return store[found]


def check_region_dim(cfg: BertConfig, feature_dim: int | None, where: str) -> None:
    """Region features of another width than the transformer was trained on give garbage silently (the
    classic Oscar "garbage captions" mismatch), so refuse them loudly."""
    if feature_dim is not None and int(feature_dim) != cfg.region_dim:
        raise MiniVLMError(f"{where}: region features are {feature_dim}-d but the transformer expects "
                           f"{cfg.region_dim}-d (BertConfig.region_dim); features and model must come from the "
                           "same extractor")


# ---------------------------------------------------------------------------------------------- splits


def pick_split(available: Sequence[str], wanted: str | None, prefixes: Sequence[str], what: str,
               where: Any) -> str | None:
    """`wanted` if given (checked), else the first available split starting with one of `prefixes`."""
    if wanted:
        if wanted not in available:
            raise MiniVLMError(f"{where}: no {what} split {wanted!r} (found: {', '.join(available) or 'none'})")
        return wanted
    for p in prefixes:
        found = sorted(s for s in available if s.startswith(p))
        if found:
            return found[0]
    return None


# ---------------------------------------------------------------------------------------------- models


def task_bert_config(pretrained: str | Path | None, preset: str, feature_dim: int | None,
                     vocab_size: int | None = None) -> BertConfig:
    """The transformer's config: the pre-trained folder's own (its region_dim must match the features) or a
    named preset for a random start (its region_dim set from the features)."""
    if pretrained:
        from minivlm.checkpoint import HF_BERT, read

        source = read(pretrained, "pretrain", "task", HF_BERT)
        cfg = source.bert_config()
        if source.kind == HF_BERT:  # a text-only transformer has no region width of its own
            cfg.region_dim = int(feature_dim) if feature_dim else cfg.region_dim
        check_region_dim(cfg, feature_dim, f"{pretrained}/config.json vs the feature store")
    else:
        cfg = get_bert(preset)
        if feature_dim:
            cfg.region_dim = int(feature_dim)
    if vocab_size and vocab_size != cfg.vocab_size:
        cfg.vocab_size = vocab_size
    return cfg


def init_from_pretrained(model: torch.nn.Module, folder: str | Path | None) -> str:
    """Copies what the task model shares with a pre-trained folder (transformer, pooler, ITM head, and the
    head itself from a folder of the same task); returns the load report's summary ("random init" when
    there is no folder)."""
    if not folder:
        return "no pre-trained folder: random initialisation"
    from minivlm.fusion.loading import load_text_weights

    return load_text_weights(model, folder).summary()


# ---------------------------------------------------------------------------------------------- batching


def chunks(items: Sequence[T], size: int) -> Iterator[Sequence[T]]:
    for start in range(0, len(items), size):
        yield items[start:start + size]


def model_device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device
