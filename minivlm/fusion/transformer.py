"""The multi-modal transformer: post-LN BERT encoder over text/tag tokens followed by region tokens.

Attention runs through `torch.nn.functional.scaled_dot_product_attention`. The forward pass has no Python
branching on tensor values (only on which inputs are given and on tensor ranks), so it exports to ONNX.

Attention mask, `attention_mask` argument:
  * [B, Kv] key mask (True / 1 = attend), every query sees the same keys;
  * [B, 1, Kv] the same, already broadcastable;
  * [B, Q, Kv] one row per query, e.g. the captioning mask where a caption token sees the regions, the
    tags and the caption tokens before it (`prefix_causal_mask` builds it).
  Boolean masks are turned into an additive mask (0 / -10000, BERT's value: it survives fp16); a float
  mask is taken as already additive. Kv counts the cached keys first, then the new tokens.

Incremental decoding (captioning) — encode a prefix once, then append one token at a time:

    out = bert(input_ids=tag_ids, token_type_ids=ones, position_ids=tag_pos,
               region_feats=feats, region_boxes=boxes, attention_mask=prefix_valid, use_cache=True)
    cache = out.past_key_values                      # per layer (k, v): [B, heads, P, head_dim]
    for t in range(max_len):
        out = bert(input_ids=tok[:, None], token_type_ids=zeros[:, None], position_ids=pos[:, None],
                   attention_mask=torch.cat([prefix_valid, seen_tokens], 1)[:, None],  # [B, 1, P + t + 1]
                   past_key_values=cache, use_cache=True)
        cache = out.past_key_values; h = out.hidden_states[:, -1]

OSCAR predicts the next word at a trailing [MASK]: feed [previous token, [MASK]] as two new tokens, read
the prediction at the [MASK], then `trim_cache(cache, 1)` so the [MASK] is not kept as context.

With a cache, `position_ids` and `token_type_ids` are required: the model cannot know where in the text
the new token sits (the cache may hold regions). Keys are order-free apart from their position
embeddings, so a cached [tags, regions] prefix followed by caption tokens gives the same result as one
pass over [caption, tags, regions] with `prefix_causal_mask` (tests/test_fusion.py checks it).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from minivlm.config import BertConfig
from minivlm.fusion.embeddings import RegionEmbeddings, TextEmbeddings

KVCache = list[tuple[torch.Tensor, torch.Tensor]]
MASK_VALUE = -10000.0
# Decoding steps feed 1-2 rows per image. For so few rows a CPU linear layer only streams its weights, and
# PyTorch's `x @ W.T` GEMM reads them at about half the memory bandwidth that `W @ x.T` reaches (measured
# with MKL: 12 vs 24 GB/s for 2 rows, one thread; with 2 threads it can collapse to ~1 GB/s). So rows up
# to this count take the `W @ x.T` form (same maths, a different summation order: ~1e-7 differences).
SMALL_ROWS = 6


def linear(layer: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """`layer(x)`, through the bandwidth-friendly form for a few rows at CPU inference."""
    rows = x.numel() // layer.in_features
    if rows > SMALL_ROWS or x.device.type != "cpu" or torch.is_grad_enabled():
        return layer(x)
    y = (layer.weight @ x.reshape(rows, -1).t()).t().contiguous()  # row-major again: the next layer's x
    if layer.bias is not None:
        y = y + layer.bias
    return y.reshape(*x.shape[:-1], layer.out_features)


class FusionOutput(NamedTuple):
    hidden_states: torch.Tensor  # [B, T + R, H]: text/tag tokens first, then regions
    past_key_values: KVCache | None  # per layer (k, v), [B, heads, Kv, head_dim], when use_cache


class BertLayer(nn.Module):
    """Post-LN transformer layer (attention -> add & norm -> GELU MLP -> add & norm), as BERT."""

    def __init__(self, cfg: BertConfig):
        super().__init__()
        if cfg.hidden_size % cfg.num_heads:
            raise ValueError(f"hidden_size {cfg.hidden_size} is not a multiple of num_heads {cfg.num_heads}")
        h = cfg.hidden_size
        self.num_heads, self.head_dim = cfg.num_heads, h // cfg.num_heads
        self.query, self.key, self.value = nn.Linear(h, h), nn.Linear(h, h), nn.Linear(h, h)
        self.attn_out = nn.Linear(h, h)
        self.attn_ln = nn.LayerNorm(h, eps=cfg.layer_norm_eps)
        self.ffn_in = nn.Linear(h, cfg.intermediate_size)
        self.ffn_out = nn.Linear(cfg.intermediate_size, h)
        self.ffn_ln = nn.LayerNorm(h, eps=cfg.layer_norm_eps)
        self.dropout = nn.Dropout(cfg.dropout)
        self.attn_dropout = cfg.dropout

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        return x.reshape(b, n, self.num_heads, self.head_dim).transpose(1, 2)

    def _qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if torch.jit.is_tracing():
            # One product for the three in an exported graph: a decoding step has fewer nodes and, in int8,
            # quantises x once instead of three times (the same numbers: each output column is its own dot product).
            w = torch.cat([self.query.weight, self.key.weight, self.value.weight])
            b = torch.cat([self.query.bias, self.key.bias, self.value.bias])
            return F.linear(x, w, b).split(self.query.out_features, dim=-1)
        return linear(self.query, x), linear(self.key, x), linear(self.value, x)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None,
                past: tuple[torch.Tensor, torch.Tensor] | None = None
                ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        b, n, h = x.shape
        q, k, v = (self._heads(t) for t in self._qkv(x))
        if past is not None:
            k, v = torch.cat([past[0], k], dim=2), torch.cat([past[1], v], dim=2)
        # The scale SDPA would derive from q's shape, given as a constant: an export then has no shape
        # arithmetic for it in every layer.
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=1.0 / math.sqrt(self.head_dim),
                                           dropout_p=self.attn_dropout if self.training else 0.0)
        a = a.transpose(1, 2).reshape(b, n, h)
        x = self.attn_ln(x + self.dropout(linear(self.attn_out, a)))
        x = self.ffn_ln(x + self.dropout(linear(self.ffn_out, F.gelu(linear(self.ffn_in, x)))))
        return x, (k, v)


class MultimodalBert(nn.Module):
    """Text/tag embeddings + region embeddings -> N BERT layers -> hidden states (no pooler: heads own it)."""

    def __init__(self, cfg: BertConfig):
        super().__init__()
        self.cfg = cfg
        self.embeddings = TextEmbeddings(cfg)
        self.region_embeddings = RegionEmbeddings(cfg)
        self.layers = nn.ModuleList(BertLayer(cfg) for _ in range(cfg.num_layers))
        self.apply(init_bert_weights)

    def forward(self, input_ids: torch.Tensor | None = None, token_type_ids: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, region_feats: torch.Tensor | None = None,
                region_boxes: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                past_key_values: KVCache | None = None, use_cache: bool = False) -> FusionOutput:
        parts = []
        if input_ids is not None:
            if past_key_values is not None and (position_ids is None or token_type_ids is None):
                raise ValueError("with past_key_values, pass position_ids and token_type_ids explicitly")
            if position_ids is None:
                position_ids = torch.arange(input_ids.shape[1], device=input_ids.device).expand_as(input_ids)
            if token_type_ids is None:
                token_type_ids = torch.zeros_like(input_ids)
            parts.append(self.embeddings(input_ids, token_type_ids, position_ids))
        if region_feats is not None:
            parts.append(self.region_embeddings(region_feats, region_boxes))
        if not parts:
            raise ValueError("give input_ids, region_feats or both")
        x = parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)
        mask = additive_mask(attention_mask, x.dtype)
        new_cache: KVCache = []
        for i, layer in enumerate(self.layers):
            x, kv = layer(x, mask, None if past_key_values is None else past_key_values[i])
            new_cache.append(kv)
        return FusionOutput(x, new_cache if use_cache else None)


def additive_mask(mask: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """[B, Kv] / [B, 1|Q, Kv] bool or 0/1 (or already additive float) -> [B, 1, 1|Q, Kv] additive."""
    if mask is None:
        return None
    if mask.dim() == 2:
        mask = mask[:, None, :]
    if mask.dtype == torch.bool or not mask.is_floating_point():
        mask = torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(mask == 0, MASK_VALUE)
    return mask[:, None].to(dtype)


def trim_cache(cache: KVCache, n: int) -> KVCache:
    """Drops the last `n` cached positions of every layer (e.g. a [MASK] fed only to read a prediction)."""
    return [(k[:, :, : k.shape[2] - n], v[:, :, : v.shape[2] - n]) for k, v in cache]


def prefix_causal_mask(seq_valid: torch.Tensor, prefix_valid: torch.Tensor) -> torch.Tensor:
    """Bool [B, S+P, S+P] mask for a sequence of S caption tokens followed by P prefix tokens (tags,
    regions): a caption token sees the whole prefix and the caption tokens up to itself; a prefix token
    sees only the prefix. Padded keys are hidden; padded queries still see the prefix (no empty rows)."""
    b, s = seq_valid.shape
    p = prefix_valid.shape[1]
    causal = torch.ones(s, s, dtype=torch.bool, device=seq_valid.device).tril()
    top = torch.cat([causal.expand(b, s, s) & seq_valid[:, None, :].bool(),
                     prefix_valid[:, None, :].bool().expand(b, s, p)], dim=2)
    bottom = torch.cat([torch.zeros(b, p, s, dtype=torch.bool, device=seq_valid.device),
                        prefix_valid[:, None, :].bool().expand(b, p, p)], dim=2)
    return torch.cat([top, bottom], dim=1)


def init_bert_weights(module: nn.Module) -> None:
    """BERT's initialisation: N(0, 0.02) weights, zero biases, unit layer norms."""
    if isinstance(module, (nn.Linear, nn.Embedding)):
        nn.init.normal_(module.weight, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)
