"""Heads on top of `MultimodalBert`'s hidden states.

* `MLMHead`: BERT's prediction head (dense + GELU + LayerNorm, then an UNTIED decoder over the vocabulary,
  which is how Table 2 counts the "decoding layer"). Also the captioning head.
* `Pooler` + `ITMHead`: [CLS] -> dense + tanh -> 2-way classifier (image-text matched / polluted).
* `RegionAttention`: the question's state scores the final region states (top-down attention), for the
  VQA head that reads the regions it picked.
* `ClassifierHead`: [CLS] pooled -> MLP -> N outputs, for the tasks' VQA (3129 answers), NLVR2 (two
  pooled vectors concatenated) and retrieval (1 score) heads.

Attribute names follow Hugging Face's `BertForPreTraining` heads so `fusion.loading` maps them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from minivlm.config import BertConfig
from minivlm.fusion.transformer import init_bert_weights, linear


class MLMHead(nn.Module):
    def __init__(self, cfg: BertConfig):
        super().__init__()
        self.dense = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.LayerNorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.decoder = nn.Linear(cfg.hidden_size, cfg.vocab_size)
        self.apply(init_bert_weights)

    def forward(self, hidden: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
        """[..., H] -> [..., vocab] logits, or [..., len(rows)]: the logits of those vocabulary rows only."""
        h = self.LayerNorm(F.gelu(linear(self.dense, hidden)))
        if rows is not None:
            return F.linear(h, self.decoder.weight[rows], self.decoder.bias[rows])
        # `linear`: a decoding step reads this 30522-word layer for one row; see fusion.transformer.linear.
        return linear(self.decoder, h)


class Pooler(nn.Module):
    """BERT's pooler: the [CLS] (first) token through dense + tanh."""

    def __init__(self, cfg: BertConfig):
        super().__init__()
        self.dense = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.apply(init_bert_weights)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.dense(hidden[:, 0]))


class ITMHead(nn.Module):
    """Image-text matching on [CLS]: logits [B, 2], class 1 = polluted (text or tags from another image)."""

    def __init__(self, cfg: BertConfig):
        super().__init__()
        self.pooler = Pooler(cfg)
        self.dropout = nn.Dropout(cfg.dropout)
        self.classifier = nn.Linear(cfg.hidden_size, 2)
        init_bert_weights(self.classifier)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.dropout(self.pooler(hidden)))


class ClassifierHead(nn.Module):
    """Pooled vector(s) -> Linear -> GELU -> LayerNorm -> Linear (OSCAR's VQA/NLVR2 classifier shape).
    `in_mult` = number of pooled vectors concatenated (2 for NLVR2's two images)."""

    def __init__(self, cfg: BertConfig, num_outputs: int, in_mult: int = 1):
        super().__init__()
        h = cfg.hidden_size
        self.net = nn.Sequential(nn.Dropout(cfg.dropout), nn.Linear(in_mult * h, 2 * h), nn.GELU(),
                                 nn.LayerNorm(2 * h, eps=cfg.layer_norm_eps), nn.Linear(2 * h, num_outputs))
        self.apply(init_bert_weights)

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        return self.net(pooled)


class RegionAttention(nn.Module):
    """Top-down attention over the transformer's final region states (Anderson et al.'s VQA model, on top of
    the fusion model): a query from the question scores each region, and the result is the weighted sum of
    the region states. It gives the answer head a direct path from a question word to the region it names,
    where otherwise that binding has to form inside the transformer's self-attention first."""

    def __init__(self, cfg: BertConfig):
        super().__init__()
        self.query = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.key = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.apply(init_bert_weights)

    def forward(self, question: torch.Tensor, regions: torch.Tensor, region_mask: torch.Tensor) -> torch.Tensor:
        """question [B, H], regions [B, R, H], region_mask [B, R] -> [B, H] (zeros for an image without regions)."""
        scores = (self.key(regions) @ self.query(question).unsqueeze(-1)).squeeze(-1) / regions.shape[-1] ** 0.5
        weights = scores.masked_fill(~region_mask, -1e4).softmax(-1) * region_mask.to(scores.dtype)
        return (weights.unsqueeze(-1) * regions).sum(1)


def masked_mean(states: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """[B, T, H] states, [B, T] bool mask -> [B, H] mean of the masked-in states."""
    m = mask.unsqueeze(-1).to(states.dtype)
    return (states * m).sum(1) / m.sum(1).clamp(min=1)


def pooled_text_mean(hidden: torch.Tensor, text_mask: torch.Tensor, pooler: Pooler) -> torch.Tensor:
    """[B, H]: the mean of the token segment's final states (text and tags) through the pooler."""
    return pooler(masked_mean(hidden[:, :text_mask.shape[1]], text_mask).unsqueeze(1))


def text_and_picked_region(hidden: torch.Tensor, text_mask: torch.Tensor, token_type_ids: torch.Tensor,
                           region_mask: torch.Tensor, pooler: Pooler, attention: RegionAttention) -> torch.Tensor:
    """The "region-attention" pooling of VQA and NLVR2, [B, 2H]: the pooled mean of the token segment (text and
    tags) beside the final region states weighted by a query from the text's own tokens (segment 0)."""
    t = text_mask.shape[1]
    query = masked_mean(hidden[:, :t], text_mask & (token_type_ids == 0))
    return torch.cat([pooled_text_mean(hidden, text_mask, pooler), attention(query, hidden[:, t:], region_mask)],
                     dim=-1)
