"""The captioning model (Sec. 4.4): OSCAR's layout, its training passes, and cached decoding.

Input layout (OSCAR's captioning layout, built by `minivlm.fusion.layout.caption_text` / `tag_prefix`)::

    caption  [CLS] w1 .. wn [SEP] [PAD]..   segment 0, positions 0 .. S-1       (S <= max_text_len)
    tags     t1 .. tm [SEP]                 segment 1, positions max_text_len + 0 .. m
    regions  feature ++ 6-d box code        no position, no segment

The tags sit at a FIXED position offset (max_text_len), whatever the caption's length, so the tags and
regions (the "prefix") can be encoded once and cached while the caption grows.

Training (`CaptionModel.forward` on a `CaptionBatch`, built by `minivlm.tasks.caption_data`): each caption word
piece (and the closing [SEP], so the model learns to stop) is replaced by [MASK] with probability `mask_prob`
(at least one per caption) and predicted from its output; the mask is prefix-causal (`prefix_causal_mask`): a
caption token sees the tags, the regions and the caption tokens up to itself; tags and regions see only tags
and regions. Loss: cross-entropy over the masked tokens. `CaptionTaskConfig.objective="every-token"` instead
predicts every token at once from the clean caption before it (the one-pass teacher forcing of
`teacher_forced_hidden`, which SCST also uses): the decoder's exact situation at each step, and ~7x the
predictions per step of 15% masking. While `model.scst` is set, the loss is SCST's
(`minivlm.tasks.caption_train`).

Inference (OSCAR): [CLS] [MASK] -> predict w1 at the [MASK]; the token replaces the [MASK], a new [MASK]
is appended, and so on until [SEP] or `max_len` tokens. With the key/value cache each step feeds two
tokens, [w_{t-1} at position t-1, MASK at position t]: w_{t-1} is recomputed as a real token (it sees
the prefix, [CLS] .. itself) and only its keys/values are kept; the [MASK]'s are dropped after use. Since
no caption token ever sees a later one, this equals recomputing the whole sequence at every step
(`use_cache=False`), token for token.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any, Hashable, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from minivlm.checkpoint import HF_BERT
from minivlm.checkpoint import read as read_checkpoint
from minivlm.config import BertConfig
from minivlm.errors import MiniVLMError
from minivlm.fusion.heads import MLMHead
from minivlm.fusion.inputs import collate_regions
from minivlm.fusion.layout import TAG_SEGMENT, TEXT_SEGMENT, tag_prefix
from minivlm.fusion.loading import LoadReport, load_text_weights
from minivlm.fusion.transformer import KVCache, MultimodalBert, prefix_causal_mask, trim_cache
from minivlm.regions import Regions
from minivlm.tasks.decode import SpecialIds, beam_search, greedy_search, strip
from minivlm.text.tokenizer import Tokenizer, get_tokenizer

if TYPE_CHECKING:
    from minivlm.tasks.caption_train import ScstObjective

log = logging.getLogger(__name__)

IGNORE = -100
DEFAULT_MAX_LEN = 20  # the paper's generation length
OUTSIDE_VOCAB_BIAS = -1e4  # decoder bias of the word pieces outside a restricted output vocabulary
TAG_CHOICES = ("predicted", "none")


# ---------------------------------------------------------------------------------------------- inputs


@dataclass
class CaptionPrefix:
    """What a caption is conditioned on: tag tokens and regions, padded per batch."""

    tag_ids: torch.Tensor  # [B, G] long: tag word pieces then [SEP]; pads at the end
    tag_pos: torch.Tensor  # [B, G] long: max_text_len + 0.., after any caption
    tag_mask: torch.Tensor  # [B, G] bool
    region_feats: torch.Tensor  # [B, R, D]
    region_boxes: torch.Tensor  # [B, R, 6]
    region_mask: torch.Tensor  # [B, R] bool

    def __len__(self) -> int:
        return int(self.tag_ids.shape[0])

    def valid(self) -> torch.Tensor:
        """[B, G + R] key mask of the prefix (tags first, then regions, as the transformer orders them)."""
        return torch.cat([self.tag_mask, self.region_mask], dim=1)

    def select(self, index: torch.Tensor) -> "CaptionPrefix":
        return CaptionPrefix(**{f.name: getattr(self, f.name).index_select(0, index) for f in fields(self)})

    def repeat(self, n: int) -> "CaptionPrefix":
        """Each image n times in a row (image-major), as beams and SCST samples are laid out."""
        if n == 1:
            return self
        return CaptionPrefix(**{f.name: getattr(self, f.name).repeat_interleave(n, dim=0) for f in fields(self)})

    def to(self, device: torch.device | str) -> "CaptionPrefix":
        return CaptionPrefix(**{f.name: getattr(self, f.name).to(device) for f in fields(self)})


def build_prefix(tokenizer: Tokenizer, regions_list: Sequence[Regions | None], cfg: BertConfig,
                 tags_list: Sequence[Sequence[str]] | None = None, tags: str = "predicted") -> CaptionPrefix:
    """Tags (`tags_list`, else each image's own predicted tags, unless tags="none") + regions, padded."""
    if tags not in TAG_CHOICES:
        raise MiniVLMError(f"tags must be one of {TAG_CHOICES}, got {tags!r}")
    if tags_list is None:
        tags_list = [r.object_tags(cfg.max_regions, cfg.tag_min_score) if tags == "predicted" and r is not None else []
                     for r in regions_list]
    if len(tags_list) != len(regions_list):
        raise ValueError(f"{len(regions_list)} region sets but {len(tags_list)} tag lists")
    parts = tag_prefix(tokenizer, tags_list, cfg.max_text_len, cfg.max_tag_len)
    feats, boxes, rmask = collate_regions(regions_list, cfg.region_dim, cfg.max_regions, cfg.region_min_score)
    return CaptionPrefix(**{name: torch.from_numpy(array) for name, array in parts.items()}, region_feats=feats,
                         region_boxes=boxes, region_mask=rmask)


@dataclass
class CaptionBatch:
    keys: list  # image keys (ids), one per row
    input_ids: torch.Tensor  # [B, S] caption with the chosen tokens replaced by [MASK]
    caption_mask: torch.Tensor  # [B, S] bool: real tokens ([CLS] .. [SEP])
    labels: torch.Tensor  # [B, S] long: the token to predict (masked: the original where masked), IGNORE elsewhere
    prefix: CaptionPrefix
    objective: str = "masked"  # "every-token": input_ids are the clean caption, every token is predicted

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])


# ---------------------------------------------------------------------------------------------- model


def caption_prefix_mask(self_mask: torch.Tensor, prefix_valid: torch.Tensor) -> torch.Tensor:
    """Bool [B, S+P, S+P] from a caption-to-caption mask [B, S, S]: caption tokens also see the valid
    prefix; prefix tokens see only the valid prefix (the general form of `prefix_causal_mask`)."""
    b, s, _ = self_mask.shape
    p = prefix_valid.shape[1]
    pv = prefix_valid.bool()[:, None, :]
    top = torch.cat([self_mask.bool(), pv.expand(b, s, p)], dim=2)
    bottom = torch.cat([torch.zeros(b, p, s, dtype=torch.bool, device=self_mask.device), pv.expand(b, p, p)], dim=2)
    return torch.cat([top, bottom], dim=1)


def token_accuracy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Share of rows whose arg-max is the label, on fp32 logits: over 30,522 words a bf16 arg-max takes ~4x
    the time of an fp32 one on the CPU (26 vs 6 ms for a caption batch), more than the cast it saves."""
    return (logits.argmax(-1) == labels).float().mean()


class CaptionModel(nn.Module):
    """MultimodalBert + MLM head (untied decoder), trained and decoded as OSCAR does for captioning."""

    def __init__(self, cfg: BertConfig, special: SpecialIds | None = None):
        super().__init__()
        self.cfg = cfg
        self.bert = MultimodalBert(cfg)
        self.mlm = MLMHead(cfg)
        self.ids = special or SpecialIds.from_tokenizer(get_tokenizer())
        self.scst: ScstObjective | None = None  # set for the SCST stage (not a module: no weights)
        # restrict_output's word pieces, sorted; not saved: the decoder's bias carries the restriction.
        self.output_ids: torch.Tensor | None = None
        self.load_report: LoadReport | None = None

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    # -- passes ------------------------------------------------------------------------------------
    def encode(self, caption_ids: torch.Tensor, caption_pos: torch.Tensor, full_mask: torch.Tensor,
               prefix: CaptionPrefix) -> torch.Tensor:
        """One pass over caption + tags + regions; returns the caption tokens' hidden states [B, S, H]."""
        s = caption_ids.shape[1]
        ids = torch.cat([caption_ids, prefix.tag_ids], dim=1)
        types = torch.cat([torch.full_like(caption_ids, TEXT_SEGMENT), torch.full_like(prefix.tag_ids, TAG_SEGMENT)], 1)
        has_regions = prefix.region_feats.shape[1] > 0
        out = self.bert(input_ids=ids, token_type_ids=types, position_ids=torch.cat([caption_pos, prefix.tag_pos], 1),
                        region_feats=prefix.region_feats if has_regions else None,
                        region_boxes=prefix.region_boxes if has_regions else None, attention_mask=full_mask)
        return out.hidden_states[:, :s]

    def encode_prefix(self, prefix: CaptionPrefix) -> KVCache | None:
        """Keys/values of tags + regions (each sees only the prefix, as in training), or None if empty."""
        g, r = prefix.tag_ids.shape[1], prefix.region_feats.shape[1]
        if g + r == 0:
            return None
        out = self.bert(input_ids=prefix.tag_ids if g else None, token_type_ids=torch.full_like(prefix.tag_ids, TAG_SEGMENT),
                        position_ids=prefix.tag_pos, region_feats=prefix.region_feats if r else None,
                        region_boxes=prefix.region_boxes if r else None, attention_mask=prefix.valid(), use_cache=True)
        return out.past_key_values

    def _check_len(self, max_len: int | None) -> int:
        """None -> 20 tokens (the paper's), or fewer if the caption segment is shorter."""
        if max_len is None:
            return min(DEFAULT_MAX_LEN, self.cfg.max_text_len - 1)
        if not 1 <= max_len <= self.cfg.max_text_len - 1:
            raise MiniVLMError(f"max_len {max_len} must be in [1, max_text_len - 1 = {self.cfg.max_text_len - 1}] "
                               f"(BertConfig.max_text_len: the caption segment holds [CLS] + the tokens)")
        return max_len

    # -- cross-entropy training ----------------------------------------------------------------------
    def forward(self, batch: CaptionBatch) -> dict[str, torch.Tensor]:
        if self.scst is not None:
            return self.scst.loss(self, batch)
        if batch.objective == "every-token":
            hidden, valid = self.teacher_forced_hidden(batch.prefix, batch.input_ids[:, 1:])
            logits, labels = self.training_logits(hidden[valid], batch.labels[:, 1:][valid])  # no vocab rows for pads
            return {"loss": F.cross_entropy(logits, labels), "acc": token_accuracy(logits, labels)}
        s = batch.input_ids.shape[1]
        pos = torch.arange(s, device=batch.input_ids.device).expand(len(batch), s)
        mask = prefix_causal_mask(batch.caption_mask, batch.prefix.valid())
        hidden = self.encode(batch.input_ids, pos, mask, batch.prefix)
        chosen = batch.labels != IGNORE
        logits, labels = self.training_logits(hidden[chosen], batch.labels[chosen])
        return {"loss": F.cross_entropy(logits, labels), "acc": token_accuracy(logits, labels)}

    def restrict_output(self, token_ids: torch.Tensor) -> None:
        """Lets the decoder emit only `token_ids` (CaptionTaskConfig.output_vocab="train"): training scores
        those rows only, and every other row's bias becomes -1e4, so the full-width decoder that inference
        and the ONNX graphs run gives the same softmax (exp(-1e4) is 0 in fp32) and the same tokens."""
        bias = self.mlm.decoder.bias
        ids = torch.unique(token_ids.to(device=bias.device, dtype=torch.long))  # sorted
        if ids.numel() == 0 or int(ids.min()) < 0 or int(ids.max()) >= self.cfg.vocab_size:
            raise MiniVLMError(f"output vocabulary: {ids.numel()} ids, all must be in [0, {self.cfg.vocab_size})")
        with torch.no_grad():
            shut = torch.ones_like(bias, dtype=torch.bool)
            shut[ids] = False
            bias[shut] = OUTSIDE_VOCAB_BIAS
        self.output_ids = ids

    def training_logits(self, hidden: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """fp32 logits of `hidden` [N, H] and `labels` [N] in the same index space: the whole vocabulary, or
        the output vocabulary's rows only after `restrict_output` (the rest would add nothing but time)."""
        rows = self.output_ids
        if rows is None:
            return self.mlm(hidden).float(), labels
        index = torch.searchsorted(rows, labels)
        if bool((rows[index.clamp(max=len(rows) - 1)] != labels).any()):
            raise MiniVLMError("a training caption holds a word piece outside the caption output vocabulary")
        return self.mlm(hidden, rows).float(), index

    # -- decoding ------------------------------------------------------------------------------------
    @torch.no_grad()
    def generate(self, prefix: CaptionPrefix, max_len: int | None = None, beam_size: int = 1, use_cache: bool = True,
                 min_len: int = 0, length_penalty: float = 1.0) -> list[list[int]]:
        """Caption token ids per image (no [CLS]/[SEP]). Greedy when beam_size == 1. The model's train/eval
        mode is left as it is: call `eval()` first (dropout would make every step different)."""
        max_len = self._check_len(max_len)
        prefix = prefix.to(self.device)
        b = len(prefix)
        if beam_size == 1:
            stepper = CachedSteps(self, prefix) if use_cache else FullSteps(self, prefix)
            tokens, _ = greedy_search(stepper, b, max_len, self.ids, self.device, min_len=min_len)
        else:
            stepper = CachedSteps(self, prefix, beam_size) if use_cache else FullSteps(self, prefix, beam_size)
            tokens, _ = beam_search(stepper, b, beam_size, max_len, self.ids, self.device, min_len=min_len,
                                    length_penalty=length_penalty)
        return strip(tokens, self.ids)

    @torch.no_grad()
    def sample(self, prefix: CaptionPrefix, n: int, max_len: int | None = None, use_cache: bool = True,
               generator: torch.Generator | None = None) -> torch.Tensor:
        """n sampled captions per image, image-major: tokens [B * n, T] with [SEP] / [PAD] (see greedy_search)."""
        max_len = self._check_len(max_len)
        prefix = prefix.to(self.device).repeat(n)
        stepper = CachedSteps(self, prefix) if use_cache else FullSteps(self, prefix)
        return greedy_search(stepper, len(prefix), max_len, self.ids, self.device, sample=True, generator=generator)[0]

    def teacher_forced_hidden(self, prefix: CaptionPrefix, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The decoder's [MASK] states for given captions (tokens [N, T] after [CLS]) in ONE pass: the real
        tokens [CLS] g1 .. g_{T-1} (positions 0 .. T-1, causal among themselves) are followed by T [MASK]s,
        the t-th at position t seeing [CLS] .. g_{t-1} and itself. Returns (hidden [N, T, H] to feed the
        MLM head, valid [N, T]: up to and including each row's [SEP])."""
        n, t = tokens.shape
        dev = tokens.device
        real = torch.cat([torch.full((n, 1), self.ids.cls, dtype=torch.long, device=dev), tokens[:, :-1]], 1)
        caption = torch.cat([real, torch.full_like(tokens, self.ids.mask)], dim=1)
        pos = torch.cat([torch.arange(t, device=dev), torch.arange(1, t + 1, device=dev)]).expand(n, 2 * t)
        tril = torch.ones(t, t, dtype=torch.bool, device=dev).tril()
        eye = torch.eye(t, dtype=torch.bool, device=dev)
        self_mask = torch.cat([torch.cat([tril, torch.zeros_like(tril)], 1), torch.cat([tril, eye], 1)], 0)
        mask = caption_prefix_mask(self_mask.expand(n, 2 * t, 2 * t), prefix.valid())
        hidden = self.encode(caption, pos, mask, prefix)[:, t:]
        ended_before = torch.cumsum((tokens == self.ids.sep).long(), dim=1) - (tokens == self.ids.sep).long()
        return hidden, (ended_before == 0) & (tokens != self.ids.pad)

    def sequence_logprobs(self, prefix: CaptionPrefix, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Teacher-forced log p [N, T] of given captions, as the decoder would have produced them, and
        their valid mask (`teacher_forced_hidden`)."""
        hidden, valid = self.teacher_forced_hidden(prefix, tokens)
        logp = torch.log_softmax(self.mlm(hidden).float(), dim=-1).gather(2, tokens[..., None]).squeeze(2)
        return logp * valid, valid

    # -- convenience ---------------------------------------------------------------------------------
    def caption(self, tokenizer: Tokenizer, regions_list: Sequence[Regions], tags_list: Sequence[Sequence[str]] | None = None,
                max_len: int | None = None, beam_size: int = 1, tags: str = "predicted") -> list[str]:
        prefix = build_prefix(tokenizer, regions_list, self.cfg, tags_list, tags)
        was_training = self.training
        self.eval()
        try:
            ids = self.generate(prefix, max_len=max_len, beam_size=beam_size)
        finally:
            self.train(was_training)
        return [tokenizer.decode(s) for s in ids]

    @classmethod
    def from_pretrained_vl(cls, folder: str | Path, special: SpecialIds | None = None) -> "CaptionModel":
        """Transformer + MLM head from a pretrain or caption task folder, or a text BERT/MiniLM (Hugging
        Face) folder. What was not found stays as initialised and is listed in `model.load_report` (and
        logged)."""
        folder = Path(folder)
        source = read_checkpoint(folder, "pretrain", "task", HF_BERT)
        if special is None and source.vocab is not None:  # the folder's own vocabulary decides the ids
            special = SpecialIds.from_tokenizer(get_tokenizer(str(source.vocab)))
        model = cls(source.bert_config(), special)
        report = load_text_weights(model, folder)
        model.load_report = report
        if report.missing or report.mismatched:
            log.warning("caption model from %s: %d parameters missing, %d mismatched:\n%s", folder,
                        len(report.missing), len(report.mismatched), report.summary())
        return model


class CachedSteps:
    """Key/value-cached stepper: the prefix is encoded once; each step feeds [previous token, [MASK]]."""

    def __init__(self, model: CaptionModel, prefix: CaptionPrefix, expand: int = 1):
        self.model = model
        self.cache = model.encode_prefix(prefix)
        self.prefix_valid = prefix.valid()
        if expand > 1:
            self.prefix_valid = self.prefix_valid.repeat_interleave(expand, dim=0)
            if self.cache is not None:
                self.cache = [(k.repeat_interleave(expand, 0), v.repeat_interleave(expand, 0)) for k, v in self.cache]
        self.seen = 0  # caption tokens in the cache
        self._new = torch.tensor([[True, False], [True, True]], device=self.prefix_valid.device)

    def __call__(self, tokens: torch.Tensor) -> torch.Tensor:
        n, t = tokens.shape
        if t != self.seen + 1:
            raise RuntimeError(f"cached stepper holds {self.seen} caption tokens but was given {t}")
        m, dev = self.model, tokens.device
        ids = torch.stack([tokens[:, -1], torch.full((n,), m.ids.mask, dtype=torch.long, device=dev)], 1)
        pos = torch.tensor([t - 1, t], device=dev).expand(n, 2)
        before = torch.cat([self.prefix_valid, torch.ones(n, self.seen, dtype=torch.bool, device=dev)], 1)
        mask = torch.cat([before[:, None, :].expand(n, 2, before.shape[1]), self._new.expand(n, 2, 2)], dim=2)
        out = m.bert(input_ids=ids, token_type_ids=torch.full_like(ids, TEXT_SEGMENT), position_ids=pos,
                     attention_mask=mask, past_key_values=self.cache, use_cache=True)
        self.cache = trim_cache(out.past_key_values, 1)  # drop the [MASK]
        self.seen += 1
        return m.mlm(out.hidden_states[:, 1])

    def reorder(self, index: torch.Tensor) -> None:
        self.cache = [(k.index_select(0, index), v.index_select(0, index)) for k, v in self.cache]
        self.prefix_valid = self.prefix_valid.index_select(0, index)


class FullSteps:
    """Reference stepper: recomputes [CLS] g1 .. g_{t-1} [MASK] + tags + regions at every step."""

    def __init__(self, model: CaptionModel, prefix: CaptionPrefix, expand: int = 1):
        self.model, self.prefix = model, prefix.repeat(expand)

    def __call__(self, tokens: torch.Tensor) -> torch.Tensor:
        n, t = tokens.shape
        m, dev = self.model, tokens.device
        caption = torch.cat([tokens, torch.full((n, 1), m.ids.mask, dtype=torch.long, device=dev)], 1)
        pos = torch.arange(t + 1, device=dev).expand(n, t + 1)
        mask = prefix_causal_mask(torch.ones(n, t + 1, dtype=torch.bool, device=dev), self.prefix.valid())
        return m.mlm(m.encode(caption, pos, mask, self.prefix)[:, t])

    def reorder(self, index: torch.Tensor) -> None:
        self.prefix = self.prefix.select(index)


# ---------------------------------------------------------------------------------------------- predict


def predict_captions(model: CaptionModel, tokenizer: Tokenizer, keys: Sequence[Hashable], store: Mapping[Any, Regions],
                     batch_size: int = 32, beam_size: int = 1, max_len: int | None = None, tags: str = "predicted",
                     progress: bool = True) -> list[dict]:
    """COCO caption results rows [{"image_id", "caption"}], one per key, in order; regions are `store[key]`."""
    rows: list[dict] = []
    was_training = model.training
    model.eval()
    try:
        for i in tqdm(range(0, len(keys), batch_size), desc="caption", disable=not progress, leave=False):
            chunk = list(keys[i:i + batch_size])
            prefix = build_prefix(tokenizer, [store[k] for k in chunk], model.cfg, tags=tags)
            for key, ids in zip(chunk, model.generate(prefix, max_len=max_len, beam_size=beam_size)):
                rows.append({"image_id": key, "caption": tokenizer.decode(ids)})
    finally:
        model.train(was_training)
    return rows
