"""Captioning data: (image, caption) items of a dataset split whose image a feature store holds, tokenised,
masked and padded into the `CaptionBatch` that `CaptionModel` trains on.

References come from the dataset root (`World.caption_references`); images are matched to the store by
`FeatureStore.find`. Items keep the dataset's image id: results files and CIDEr-D references are keyed by it.
"""

from __future__ import annotations

from typing import Any, Hashable, Mapping, Sequence

import torch
from torch.utils.data import Dataset

from minivlm.config import CAPTION_OBJECTIVES, BertConfig, CaptionTaskConfig
from minivlm.data.feature_store import FeatureStore
from minivlm.data.world import World
from minivlm.errors import MiniVLMError
from minivlm.fusion.layout import caption_text
from minivlm.regions import Regions
from minivlm.tasks.caption_model import IGNORE, TAG_CHOICES, CaptionBatch, build_prefix
from minivlm.text.tokenizer import Tokenizer


def mask_captions(ids: torch.Tensor, valid: torch.Tensor, mask_prob: float, mask_id: int,
                  generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Replaces each word piece and the final [SEP] (never [CLS], never pads) by [MASK] with probability
    `mask_prob`, at least one per caption. Returns (masked input ids, labels)."""
    candidates = valid.clone()
    candidates[:, 0] = False  # [CLS]
    chosen = (torch.rand(ids.shape, generator=generator) < mask_prob) & candidates
    for i in torch.nonzero(~chosen.any(dim=1)).flatten().tolist():
        pos = torch.nonzero(candidates[i]).flatten()
        if len(pos):
            chosen[i, pos[torch.randint(len(pos), (1,), generator=generator)]] = True
    labels = torch.where(chosen, ids, torch.full_like(ids, IGNORE))
    return torch.where(chosen, torch.full_like(ids, mask_id), ids), labels


class CaptionDataset(Dataset):
    """(image key, caption) pairs with their regions (`store[key]`); `collate` tokenizes, masks and pads."""

    def __init__(self, items: Sequence[tuple[Hashable, str]], store: Mapping[Any, Regions], tokenizer: Tokenizer,
                 cfg: BertConfig, task_cfg: CaptionTaskConfig | None = None, tags: str = "predicted"):
        if tags not in TAG_CHOICES:
            raise MiniVLMError(f"tags must be one of {TAG_CHOICES}, got {tags!r}")
        if task_cfg is not None and task_cfg.objective not in CAPTION_OBJECTIVES:
            raise MiniVLMError(f"caption objective must be one of {CAPTION_OBJECTIVES}, got {task_cfg.objective!r}")
        self.items, self.store = list(items), store
        self.tokenizer, self.cfg, self.task = tokenizer, cfg, task_cfg or CaptionTaskConfig()
        self.tags = tags

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> tuple[Hashable, str, Regions]:
        key, caption = self.items[i]
        return key, caption, self.store[key]

    def collate(self, items: Sequence[tuple[Hashable, str, Regions]], generator: torch.Generator | None = None
                ) -> CaptionBatch:
        tok, cfg = self.tokenizer, self.cfg
        ids, valid = map(torch.from_numpy, caption_text(tok, [c for _, c, _ in items], cfg.max_text_len))
        prefix = build_prefix(tok, [r for _, _, r in items], cfg, tags=self.tags)
        keys = [k for k, _, _ in items]
        if self.task.objective == "every-token":
            return CaptionBatch(keys, ids, valid, torch.where(valid, ids, IGNORE), prefix, "every-token")
        masked, labels = mask_captions(ids, valid, self.task.mask_prob, tok.mask_id, generator)
        return CaptionBatch(keys, masked, valid, labels, prefix)


def output_vocabulary(dataset: CaptionDataset) -> torch.Tensor:
    """The word pieces the dataset's captions are made of, and [SEP] (the decoder's stop): what
    `CaptionModel.restrict_output` lets it emit. [CLS] is never predicted."""
    tok = dataset.tokenizer
    ids, valid = caption_text(tok, [c for _, c in dataset.items], dataset.cfg.max_text_len)
    used = torch.from_numpy(ids)[torch.from_numpy(valid).bool()]
    return torch.unique(torch.cat([used[used != tok.cls_id], torch.tensor([tok.sep_id])]))


def references_in_store(world: World, split: str, store: FeatureStore) -> dict[int, list[str]]:
    """Image id -> reference captions of `split`, for the images `store` holds."""
    return {k: v for k, v in world.caption_references(split).items() if store.find(k) is not None}


def caption_dataset_from_world(world: World, split: str, store: FeatureStore, tokenizer: Tokenizer, cfg: BertConfig,
                               task_cfg: CaptionTaskConfig | None = None, tags: str = "predicted",
                               one_per_image: bool = False) -> CaptionDataset:
    """Every (image, caption) of `split` whose image is in `store` (one item per image when
    `one_per_image`, as SCST and evaluation want)."""
    refs = references_in_store(world, split, store)
    items = [(iid, c) for iid, caps in refs.items() for c in (caps[:1] if one_per_image else caps)]
    if not items:
        raise MiniVLMError(f"none of the images of split {split!r} is in the feature store {store!r}")
    return CaptionDataset(items, store, tokenizer, cfg, task_cfg, tags)
