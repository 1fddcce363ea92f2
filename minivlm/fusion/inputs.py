"""OSCAR-style inputs: `[CLS] text [SEP] tags [SEP]` word pieces, then the image's region tokens.

Text is segment 0 and the tags segment 1 (as OSCAR); position ids run over the whole word-piece sequence
(tags continue the text's positions). Regions carry no position or segment: each is its feature vector
concatenated with the paper's 6-d box code (`Regions.box_encoding()`), projected in the embeddings.

Length budget: the text segment `[CLS] text [SEP]` holds at most `max_text_len` tokens and the tag
segment `tags [SEP]` at most `max_tag_len`; longer text or tag lists are cut. Batches are padded to their
longest member (pads at the end), regions to the batch's largest region count (at most `max_regions`).
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Sequence

import torch

from minivlm.config import BertConfig
from minivlm.errors import MiniVLMError
from minivlm.regions import Regions
from minivlm.text.tokenizer import Tokenizer

TEXT_SEGMENT = 0
TAG_SEGMENT = 1


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


@dataclass
class EncodedText:
    """One example's word-piece sequence before padding."""

    ids: list[int]
    segments: list[int]
    maskable: list[bool]


def tags_to_text(tags: str | Sequence[str] | None) -> str:
    if tags is None:
        return ""
    return tags if isinstance(tags, str) else " ".join(t for t in tags if t)


def encode_text_and_tags(tokenizer: Tokenizer, text: str, tags: str | Sequence[str] | None,
                         max_text_len: int, max_tag_len: int) -> EncodedText:
    """`[CLS] text [SEP]` (+ `tags [SEP]` when there are tags), each part cut to its budget."""
    text_ids = tokenizer.encode(text or "", max(0, max_text_len - 2))
    tag_ids = tokenizer.encode(tags_to_text(tags), max(0, max_tag_len - 1))
    ids = [tokenizer.cls_id, *text_ids, tokenizer.sep_id]
    segments = [TEXT_SEGMENT] * len(ids)
    maskable = [False, *([True] * len(text_ids)), False]
    if tag_ids:
        ids += [*tag_ids, tokenizer.sep_id]
        segments += [TAG_SEGMENT] * (len(tag_ids) + 1)
        maskable += [*([True] * len(tag_ids)), False]
    return EncodedText(ids, segments, maskable)


def pad_encoded(encoded: Sequence[EncodedText], pad_id: int) -> dict[str, torch.Tensor]:
    """Pads a list of sequences at the end; position ids count 0.. over each sequence."""
    b, t = len(encoded), max(len(e.ids) for e in encoded)
    input_ids = torch.full((b, t), pad_id, dtype=torch.long)
    token_type_ids = torch.zeros((b, t), dtype=torch.long)
    text_mask = torch.zeros((b, t), dtype=torch.bool)
    maskable = torch.zeros((b, t), dtype=torch.bool)
    for i, e in enumerate(encoded):
        n = len(e.ids)
        input_ids[i, :n] = torch.tensor(e.ids, dtype=torch.long)
        token_type_ids[i, :n] = torch.tensor(e.segments, dtype=torch.long)
        text_mask[i, :n] = True
        maskable[i, :n] = torch.tensor(e.maskable, dtype=torch.bool)
    position_ids = torch.arange(t, dtype=torch.long).expand(b, t).clone()
    return {"input_ids": input_ids, "token_type_ids": token_type_ids, "position_ids": position_ids,
            "text_mask": text_mask, "maskable": maskable}


def collate_regions(regions_list: Sequence[Regions | None], region_dim: int, max_regions: int
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top-`max_regions` regions of each image, padded: (feats [B,R,D], boxes [B,R,6], mask [B,R])."""
    kept: list[Regions | None] = []
    for i, r in enumerate(regions_list):
        if r is None or len(r) == 0:
            kept.append(None)
            continue
        if r.features.ndim != 2 or r.features.shape[1] != region_dim:
            raise MiniVLMError(
                f"region features of example {i} have shape {tuple(r.features.shape)}; the transformer "
                f"expects [K, {region_dim}] (BertConfig.region_dim)")
        kept.append(r.top(max_regions) if len(r) > max_regions else r)
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
    feats, boxes, rmask = collate_regions(regions_list, cfg.region_dim, max_regions or cfg.max_regions)
    return FusionBatch(**pad_encoded(encoded, tokenizer.pad_id), region_feats=feats, region_boxes=boxes,
                       region_mask=rmask)
