"""OSCAR-style inputs as torch tensors: the word pieces of `minivlm.fusion.layout` (`[CLS] text [SEP] tags
[SEP]`, segments 0 text / 1 tags, cut to `max_text_len` / `max_tag_len`, pads at the end), then the
image's region tokens.

Regions carry no position or segment: each is its feature vector concatenated with the paper's 6-d box
code (`Regions.box_encoding()`), projected in the embeddings. Regions are padded to the batch's largest
region count (at most `max_regions`).
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Sequence

import torch

from minivlm.config import BertConfig
from minivlm.errors import MiniVLMError
from minivlm.fusion.layout import encode_text_and_tags, pad_encoded
from minivlm.regions import Regions
from minivlm.text.tokenizer import Tokenizer


@dataclass
class FusionBatch:
    """One batch for the multi-modal transformer. Text tensors are [B, T], region tensors [B, R, ...]."""

    input_ids: torch.Tensor  # [B, T] long
    token_type_ids: torch.Tensor  # [B, T] long: 0 text, 1 tags
    position_ids: torch.Tensor  # [B, T] long
    text_mask: torch.Tensor  # [B, T] bool: True on real tokens, False on pads
    maskable: torch.Tensor  # [B, T] bool: word pieces of text or tags (never [CLS]/[SEP]/[PAD])
    region_feats: torch.Tensor  # [B, R, region_dim] float
    region_boxes: torch.Tensor  # [B, R, 6] float, the paper's box code
    region_mask: torch.Tensor  # [B, R] bool
    mlm_labels: torch.Tensor | None = None  # [B, T] long, -100 where nothing is predicted
    itm_labels: torch.Tensor | None = None  # [B] long, 1 = polluted (text/tags from another image)

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])

    def attention_mask(self) -> torch.Tensor:
        """[B, T + R] bool key mask (text first, then regions): every token sees every real token."""
        return torch.cat([self.text_mask, self.region_mask], dim=1)

    def model_inputs(self) -> dict[str, torch.Tensor]:
        """Keyword arguments of `MultimodalBert.forward` for a full (uncached) pass."""
        return {"input_ids": self.input_ids, "token_type_ids": self.token_type_ids,
                "position_ids": self.position_ids, "region_feats": self.region_feats,
                "region_boxes": self.region_boxes, "attention_mask": self.attention_mask()}

    def to(self, device: torch.device | str) -> "FusionBatch":
        moved = {f.name: getattr(self, f.name) for f in fields(self)}
        return FusionBatch(**{k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in moved.items()})


def collate_regions(regions_list: Sequence[Regions | None], region_dim: int, max_regions: int, min_score: float = 0.0
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The top `max_regions` regions of each image that score at least `min_score`, padded:
    (feats [B,R,D], boxes [B,R,6], mask [B,R])."""
    kept: list[Regions | None] = []
    for i, r in enumerate(regions_list):
        if r is None or len(r) == 0:
            kept.append(None)
            continue
        if r.features.ndim != 2 or r.features.shape[1] != region_dim:
            raise MiniVLMError(
                f"region features of example {i} have shape {tuple(r.features.shape)}; the transformer "
                f"expects [K, {region_dim}] (BertConfig.region_dim)")
        r = r.confident(max_regions, min_score)
        kept.append(r if len(r) else None)
    b = len(kept)
    n = max([len(r) for r in kept if r is not None], default=0)
    feats = torch.zeros((b, n, region_dim), dtype=torch.float32)
    boxes = torch.zeros((b, n, 6), dtype=torch.float32)
    mask = torch.zeros((b, n), dtype=torch.bool)
    for i, r in enumerate(kept):
        if r is None:
            continue
        k = len(r)
        feats[i, :k] = r.features.float()
        boxes[i, :k] = r.box_encoding()
        mask[i, :k] = True
    return feats, boxes, mask


def build_batch(tokenizer: Tokenizer, texts: Sequence[str], tags_list: Sequence[str | Sequence[str] | None] | None,
                regions_list: Sequence[Regions | None], cfg: BertConfig, max_text_len: int | None = None,
                max_tag_len: int | None = None, max_regions: int | None = None) -> FusionBatch:
    """Tokenizes, cuts and pads one batch. `tags_list=None` takes each image's tags from its `Regions`
    (the detector's predicted class names); pass a list of empty lists for no tags."""
    if len(texts) != len(regions_list):
        raise ValueError(f"{len(texts)} texts but {len(regions_list)} region sets")
    if tags_list is None:
        tags_list = [r.object_tags(max_regions or cfg.max_regions, cfg.tag_min_score) if r is not None else []
                     for r in regions_list]
    if len(tags_list) != len(texts):
        raise ValueError(f"{len(texts)} texts but {len(tags_list)} tag lists")
    max_text_len = max_text_len or cfg.max_text_len
    max_tag_len = cfg.max_tag_len if max_tag_len is None else max_tag_len
    encoded = [encode_text_and_tags(tokenizer, t, g, max_text_len, max_tag_len) for t, g in zip(texts, tags_list)]
    feats, boxes, rmask = collate_regions(regions_list, cfg.region_dim, max_regions or cfg.max_regions,
                                         cfg.region_min_score)
    text = {name: torch.from_numpy(array) for name, array in pad_encoded(encoded, tokenizer.pad_id).items()}
    return FusionBatch(**text, region_feats=feats, region_boxes=boxes, region_mask=rmask)
