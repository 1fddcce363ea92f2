"""OSCAR's input layout, torch-free: `[CLS] text [SEP] tags [SEP]` word-piece ids as lists and numpy arrays.

Text is segment 0 and the tags segment 1 (as OSCAR). The text part `[CLS] text [SEP]` holds at most
`max_text_len` tokens and the tag part `tags [SEP]` at most `max_tag_len`; longer text or tag lists are cut.
Without tags there is no tag part at all (no lone [SEP]). Pads are `pad_id` and masked out.

The PyTorch model (`minivlm.fusion.inputs`, `minivlm.tasks.caption_model`, `minivlm.tasks.retrieval`) and the ONNX
runtime (`minivlm.edge`, which must not import torch) build their inputs here, in three arrangements,
each for a caller's reason:

- `encode_text_and_tags` + `pad_encoded`: one sequence per example, pads at the end of the batch, position
  ids 0.. over the padded width (`build_batch`, the edge VQA graph).
- `caption_text` + `tag_prefix`: captioning keeps the caption and the tags apart and puts the tags at the
  fixed positions `max_text_len + 0..`, whatever the caption's length, so the tags (with the regions) can
  be encoded once and cached while the caption grows.
- `join_slots` (`PairSlots`): retrieval scores every image against every text from captions and tags
  tokenised once, gathered into fixed-width slots; the pads stay inside each slot and the position ids skip
  them, so the model sees what `pad_encoded` would give it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from minivlm.text.tokenizer import Tokenizer

TEXT_SEGMENT = 0
TAG_SEGMENT = 1


def tags_to_text(tags: str | Sequence[str] | None) -> str:
    if tags is None:
        return ""
    return tags if isinstance(tags, str) else " ".join(t for t in tags if t)


def text_budget(max_text_len: int) -> int:
    """Word pieces of text that fit beside [CLS] and [SEP]."""
    return max(0, max_text_len - 2)


def tag_budget(max_tag_len: int) -> int:
    """Word pieces of tags that fit before the closing [SEP]."""
    return max(0, max_tag_len - 1)


def encode_text(tokenizer: Tokenizer, text: str | None, max_text_len: int) -> list[int]:
    return tokenizer.encode(text or "", text_budget(max_text_len))


def encode_tags(tokenizer: Tokenizer, tags: str | Sequence[str] | None, max_tag_len: int) -> list[int]:
    return tokenizer.encode(tags_to_text(tags), tag_budget(max_tag_len))


def text_part(tokenizer: Tokenizer, text: list[int]) -> list[int]:
    return [tokenizer.cls_id, *text, tokenizer.sep_id]


def tag_part(tokenizer: Tokenizer, tags: list[int]) -> list[int]:
    return [*tags, tokenizer.sep_id] if tags else []


@dataclass
class EncodedText:
    """One example's word-piece sequence before padding."""

    ids: list[int]
    segments: list[int]
    maskable: list[bool]  # word pieces of text or tags (never [CLS]/[SEP]): what MLM may mask


def encode_text_and_tags(tokenizer: Tokenizer, text: str | None, tags: str | Sequence[str] | None,
                         max_text_len: int, max_tag_len: int) -> EncodedText:
    """`[CLS] text [SEP]` (+ `tags [SEP]` when there are tags), each part cut to its budget."""
    words, names = encode_text(tokenizer, text, max_text_len), encode_tags(tokenizer, tags, max_tag_len)
    first, second = text_part(tokenizer, words), tag_part(tokenizer, names)
    maskable = [False, *([True] * len(words)), False] + ([*([True] * len(names)), False] if names else [])
    return EncodedText(first + second, [TEXT_SEGMENT] * len(first) + [TAG_SEGMENT] * len(second), maskable)


def pad_rows(rows: Sequence[Sequence[int | bool]], pad: int | bool, min_len: int = 0, dtype: type = np.int64
             ) -> tuple[np.ndarray, np.ndarray]:
    """Rows padded at the end to the longest (at least `min_len`): (values [B, T], valid [B, T] bool)."""
    t = max(min_len, max((len(r) for r in rows), default=0))
    values = np.full((len(rows), t), pad, dtype=dtype)
    valid = np.zeros((len(rows), t), dtype=bool)
    for i, r in enumerate(rows):
        values[i, : len(r)] = r
        valid[i, : len(r)] = True
    return values, valid


def pad_encoded(encoded: Sequence[EncodedText], pad_id: int) -> dict[str, np.ndarray]:
    """One batch, pads at the end: input_ids, token_type_ids, position_ids (int64), text_mask, maskable (bool)."""
    ids, mask = pad_rows([e.ids for e in encoded], pad_id)
    segments, _ = pad_rows([e.segments for e in encoded], TEXT_SEGMENT)
    maskable, _ = pad_rows([e.maskable for e in encoded], False, dtype=bool)
    positions = np.broadcast_to(np.arange(ids.shape[1], dtype=np.int64), ids.shape).copy()
    return {"input_ids": ids, "token_type_ids": segments, "position_ids": positions, "text_mask": mask,
            "maskable": maskable}


def caption_text(tokenizer: Tokenizer, captions: Sequence[str], max_text_len: int) -> tuple[np.ndarray, np.ndarray]:
    """Captioning's text part `[CLS] caption [SEP]` per caption, padded: (ids [B, S], valid [B, S]).
    Its positions are 0.. and its segment is text; the decoder grows it token by token."""
    return pad_rows([text_part(tokenizer, encode_text(tokenizer, c, max_text_len)) for c in captions], tokenizer.pad_id)


def tag_prefix(tokenizer: Tokenizer, tags_list: Sequence[str | Sequence[str] | None], max_text_len: int,
               max_tag_len: int, min_len: int = 0) -> dict[str, np.ndarray]:
    """Captioning's tag part `tags [SEP]` per image, padded: tag_ids, tag_pos [B, G] int64 and tag_mask [B, G]
    bool. The positions start at `max_text_len`, after any caption (see the module's docstring)."""
    ids, mask = pad_rows([tag_part(tokenizer, encode_tags(tokenizer, t, max_tag_len)) for t in tags_list],
                         tokenizer.pad_id, min_len)
    positions = max_text_len + np.broadcast_to(np.arange(ids.shape[1], dtype=np.int64), ids.shape)
    return {"tag_ids": ids, "tag_pos": positions, "tag_mask": mask}


def join_slots(tokenizer: Tokenizer, text: np.ndarray, text_valid: np.ndarray, tags: np.ndarray,
               tags_valid: np.ndarray) -> dict[str, np.ndarray]:
    """`[CLS] text-slot [SEP] tag-slot [SEP]` from word pieces padded within their slots (text [N, Lc], tags
    [N, Lg], pads at each slot's end, as `pad_rows` gives them): input_ids, token_type_ids, position_ids
    [N, Lc + Lg + 3] int64 and text_mask bool. Every slot keeps its width, so rows gathered from a cache
    line up without re-tokenising; the pads are masked and skipped by the position ids, so each real
    token gets its `pad_encoded` position. The closing [SEP] is masked where there are no tags."""
    n, lc, lg = text.shape[0], text.shape[1], tags.shape[1]
    col = lambda value: np.full((n, 1), value, dtype=np.int64)  # noqa: E731
    real = np.ones((n, 1), dtype=bool)
    ids = np.concatenate([col(tokenizer.cls_id), text, col(tokenizer.sep_id), tags, col(tokenizer.sep_id)], axis=1)
    mask = np.concatenate([real, text_valid, real, tags_valid, tags_valid.any(axis=1, keepdims=True)], axis=1)
    segments = np.concatenate([np.full((n, lc + 2), TEXT_SEGMENT, dtype=np.int64),
                               np.full((n, lg + 1), TAG_SEGMENT, dtype=np.int64)], axis=1)
    positions = np.maximum(mask.cumsum(axis=1, dtype=np.int64) - 1, 0)
    return {"input_ids": np.where(mask, ids, tokenizer.pad_id), "token_type_ids": segments,
            "position_ids": positions, "text_mask": mask}


class PairSlots:
    """Texts and the images' tag lists tokenised once, from which any (image, text) pair's row is
    gathered (`join_slots`): retrieval scores every image against every text."""

    def __init__(self, tokenizer: Tokenizer, texts: Sequence[str], tags_per_image: Sequence[Sequence[str]],
                 max_text_len: int, max_tag_len: int):
        self.tokenizer = tokenizer
        # one batched call: evaluation tokenises thousands of captions
        texts_ids = tokenizer.encode_batch([t or "" for t in texts], text_budget(max_text_len)) if texts else []
        self.text, self.text_valid = pad_rows(texts_ids, tokenizer.pad_id)  # [n_texts, Lc]
        self.tags, self.tags_valid = pad_rows([encode_tags(tokenizer, t, max_tag_len) for t in tags_per_image],
                                              tokenizer.pad_id)  # [n_images, Lg]

    def rows(self, image_idx: np.ndarray, text_idx: np.ndarray) -> dict[str, np.ndarray]:
        """`join_slots` of the pairs (image_idx[n], text_idx[n])."""
        return join_slots(self.tokenizer, self.text[text_idx], self.text_valid[text_idx], self.tags[image_idx],
                          self.tags_valid[image_idx])
