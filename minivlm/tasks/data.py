"""What the four fine-tuning tasks share: reading an image's regions, building the task transformer's config
and initialising it from a pre-trained folder, and batching.

Which splits a task trains and evaluates on is the dataset root's rule (`minivlm.data.world.World`); which key
a feature store holds an image under is the store's (`FeatureStore.find`): tasks resolve keys once, when they
build their examples, and read regions by the resolved key.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol

import torch

from minivlm.config import BertConfig, get_bert
from minivlm.data.feature_store import Key
from minivlm.errors import MiniVLMError
from minivlm.regions import Regions

TASKS = ("caption", "vqa", "nlvr2", "retrieval")


class RegionSource(Protocol):
    """A feature store, or anything keyed by image that returns `Regions`."""

    def __contains__(self, key: object) -> bool: ...

    def __getitem__(self, key: Any) -> Regions: ...


# ---------------------------------------------------------------------------------------------- regions


def get_regions(store: RegionSource, key: Key) -> Regions:
    """An image's regions by the key `FeatureStore.find` resolved."""
    try:
        return store[key]
    except KeyError:
        raise MiniVLMError(f"image {key!r} has no regions in the feature store {getattr(store, 'root', store)!s} "
                           "(run `minivlm extract` over this split's images)") from None


def check_region_dim(cfg: BertConfig, feature_dim: int | None, where: str) -> None:
    """Region features of another width than the transformer was trained on give garbage silently (the
    classic Oscar "garbage captions" mismatch), so refuse them loudly."""
    if feature_dim is not None and int(feature_dim) != cfg.region_dim:
        raise MiniVLMError(f"{where}: region features are {feature_dim}-d but the transformer expects "
                           f"{cfg.region_dim}-d (BertConfig.region_dim); features and model must come from the "
                           "same extractor")


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


def model_device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device
