"""Input embeddings: BERT word + position + segment for text and tags; a linear projection for regions.

Attribute names follow Hugging Face's `BertEmbeddings` so text checkpoints map one to one
(see `minivlm.fusion.loading`).
"""

from __future__ import annotations

import torch
from torch import nn

from minivlm.config import BertConfig


class TextEmbeddings(nn.Module):
    def __init__(self, cfg: BertConfig):
        super().__init__()
        self.word_embeddings = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.position_embeddings = nn.Embedding(cfg.max_position, cfg.hidden_size)
        self.token_type_embeddings = nn.Embedding(cfg.type_vocab_size, cfg.hidden_size)
        self.LayerNorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, input_ids: torch.Tensor, token_type_ids: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        x = self.word_embeddings(input_ids) + self.position_embeddings(position_ids)
        x = x + self.token_type_embeddings(token_type_ids)
        return self.dropout(self.LayerNorm(x))


class RegionEmbeddings(nn.Module):
    """Region feature ++ 6-d box code -> Linear -> LayerNorm -> dropout (OSCAR's image embedding with
    its layer norm on). No position or segment embedding: regions form an unordered set."""

    def __init__(self, cfg: BertConfig):
        super().__init__()
        self.proj = nn.Linear(cfg.region_dim + cfg.box_dim, cfg.hidden_size)
        self.LayerNorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, region_feats: torch.Tensor, region_boxes: torch.Tensor) -> torch.Tensor:
        x = torch.cat([region_feats, region_boxes.to(region_feats.dtype)], dim=-1)
        return self.dropout(self.LayerNorm(self.proj(x)))
