"""Heads on top of `MultimodalBert`'s hidden states.

* `MLMHead`: BERT's prediction head (dense + GELU + LayerNorm, then an UNTIED decoder over the vocabulary,
  which is how Table 2 counts the "decoding layer"). Also the captioning head.
* `Pooler` + `ITMHead`: [CLS] -> dense + tanh -> 2-way classifier (image-text matched / polluted).
* `RegionAttention`: the question's state scores the final region states (top-down attention), for the
  VQA head that reads the regions it picked.
* `RegionCount`: soft counts of the regions the question names (sums of sigmoids), embedded for the answer head.
* `WordPooling` + `PickCompare`: two picks, each with its own learned weighting of the question's words, and
  products that compare the predicate with the first pick and the two picks with each other; with `match`, also
  what the first pick's scores say (a soft count, the null slot's weight, the predicate's fit).
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
    where otherwise that binding has to form inside the transformer's self-attention first.

    `null_slot`: one more, learned slot beside the regions (a key and a value of its own: the "sentinel" of Lu et
    al.'s adaptive attention). Softmax weights always sum to one over the regions, so without it the result is
    some region's state whether or not the image holds what the question names, and "is there a purple
    crescent?" has no clean "nothing" to read; the null slot takes the weight when no region fits. In the
    demo's VQA stage it took "is there a" from its prior (72.2 against 71.8) to 85.7 (docs/RESULTS.md)."""

    def __init__(self, cfg: BertConfig, null_slot: bool = False):
        super().__init__()
        self.query = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.key = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.apply(init_bert_weights)
        self.null_key = nn.Parameter(torch.zeros(cfg.hidden_size)) if null_slot else None
        self.null_value = nn.Parameter(torch.zeros(cfg.hidden_size)) if null_slot else None

    def logits(self, question: torch.Tensor, regions: torch.Tensor, region_mask: torch.Tensor,
               keys: torch.Tensor | None = None) -> torch.Tensor:
        """[B, R] (+1 first with the null slot): how well each region (and the null slot) fits the query;
        masked-out regions at -1e4. `keys`: `self.key(regions)` when a caller already has them."""
        query, scale = self.query(question), regions.shape[-1] ** 0.5
        keys = self.key(regions) if keys is None else keys
        scores = ((keys @ query.unsqueeze(-1)).squeeze(-1) / scale).masked_fill(~region_mask, -1e4)
        if self.null_key is None:
            return scores
        # a product and a sum, not a MatMul: onnxruntime's int8 quantiser mangles a MatMul with a 1-d weight
        null = (query * self.null_key.to(query.dtype)).sum(-1, keepdim=True) / scale
        return torch.cat([null, scores], -1)

    def weights(self, logits: torch.Tensor, region_mask: torch.Tensor) -> torch.Tensor:
        """Softmax of `logits` with the masked-out regions at exactly zero."""
        keep = region_mask.to(logits.dtype)
        if self.null_key is not None:  # the slot's column from the logits: an image may have no region at all
            keep = torch.cat([torch.ones_like(logits[:, :1]), keep], -1)
        return logits.softmax(-1) * keep

    def read(self, weights: torch.Tensor, regions: torch.Tensor) -> torch.Tensor:
        """The regions (and the null slot's value) summed under `weights` -> [B, H]."""
        if self.null_key is None:
            return (weights.unsqueeze(-1) * regions).sum(1)
        # the slot's value scaled on its own, not concatenated to the regions: with no region at all it still counts
        return weights[:, :1] * self.null_value.to(regions.dtype) + (weights[:, 1:].unsqueeze(-1) * regions).sum(1)

    def forward(self, question: torch.Tensor, regions: torch.Tensor, region_mask: torch.Tensor) -> torch.Tensor:
        """question [B, H], regions [B, R, H], region_mask [B, R] -> [B, H] (for an image without regions: zeros,
        or the null slot's value)."""
        return self.read(self.weights(self.logits(question, regions, region_mask), region_mask), regions)


def count_bins(counts: torch.Tensor, max_count: int) -> torch.Tensor:
    """[...] soft counts -> [..., max_count + 1]: bin k gets max(0, 1 - |count - k|), so a count of 2.3 is 0.7 of
    bin 2 and 0.3 of bin 3 and an answer head reads it as it reads a region."""
    grid = torch.arange(max_count + 1, device=counts.device, dtype=counts.dtype)
    return (1 - (counts.clamp(max=max_count).unsqueeze(-1) - grid).abs()).clamp(min=0)


def masked_mean(states: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """[B, T, H] states, [B, T] bool mask -> [B, H] mean of the masked-in states."""
    m = mask.unsqueeze(-1).to(states.dtype)
    return (states * m).sum(1) / m.sum(1).clamp(min=1)


def pooled_text_mean(hidden: torch.Tensor, text_mask: torch.Tensor, pooler: Pooler) -> torch.Tensor:
    """[B, H]: the mean of the token segment's final states (text and tags) through the pooler."""
    return pooler(masked_mean(hidden[:, :text_mask.shape[1]], text_mask).unsqueeze(1))


def text_and_picked_region(hidden: torch.Tensor, text_mask: torch.Tensor, token_type_ids: torch.Tensor,
                           region_mask: torch.Tensor, pooler: Pooler, attention: RegionAttention,
                           counter: RegionCount | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The "region-attention" pooling of VQA and NLVR2, [B, 2H]: the pooled mean of the token segment (text and
    tags) beside the final region states weighted by a query from the text's own tokens (segment 0). With a
    `counter` ("region-count"), the embedding of its counts under the same query follows, [B, 3H], and the
    counts [B, heads] come back beside it (else None)."""
    t = text_mask.shape[1]
    query, regions = masked_mean(hidden[:, :t], text_mask & (token_type_ids == 0)), hidden[:, t:]
    parts = [pooled_text_mean(hidden, text_mask, pooler), attention(query, regions, region_mask)]
    if counter is None:
        return torch.cat(parts, dim=-1), None
    counts, counted = counter(query, regions, region_mask)
    return torch.cat([*parts, counted], dim=-1), counts


class WordPooling(nn.Module):
    """A learned weighting of the text's words (MCAN's AttFlat, Yu et al. 2019): each word's final state scores
    itself through a small MLP, softmax over the words, weighted sum. Unlike the plain mean a pick's query can
    leave out the words it should not match, such as the predicate of "is the red star striped?"."""

    def __init__(self, cfg: BertConfig):
        super().__init__()
        self.score = nn.Sequential(nn.Linear(cfg.hidden_size, cfg.hidden_size), nn.GELU(),
                                   nn.Linear(cfg.hidden_size, 1))
        self.apply(init_bert_weights)

    def weights(self, tokens: torch.Tensor, words: torch.Tensor, only: torch.Tensor | None = None) -> torch.Tensor:
        """[B, T] softmax over the words; `only` [B, T] in 0..1 scales each word's share (a soft mask)."""
        scores = self.score(tokens).squeeze(-1)
        if only is not None:
            scores = scores + torch.log(only.clamp(min=0) + 1e-4)
        return scores.masked_fill(~words, -1e4).softmax(-1)

    def forward(self, tokens: torch.Tensor, words: torch.Tensor, only: torch.Tensor | None = None) -> torch.Tensor:
        """tokens [B, T, H], words [B, T] bool -> [B, H]."""
        return (self.weights(tokens, words, only).unsqueeze(-1) * tokens).sum(1)


def box_gaps(boxes: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """boxes [B, R, 6] and one box per row ref [B, 6] (the paper's box code: x1, y1, x2, y2, w, h, normalised) ->
    [B, R, 4]: how clearly each box is left of, right of, above and below `ref` (the gap between the two boxes'
    facing edges, positive when the relation holds, squashed to -1..1: a gap of a tenth of the image is 0.66)."""
    r, f = boxes[..., :4], ref[:, None, :4]
    gaps = torch.stack([f[..., 0] - r[..., 2], r[..., 0] - f[..., 2], f[..., 1] - r[..., 3], r[..., 1] - f[..., 3]], -1)
    return torch.tanh(8 * gaps)


class PickCompare(nn.Module):
    """Two picks and two comparisons, for questions that name an object and ask something of it ("is the red star
    striped?") or of its neighbour ("what is left of the arrow?"). Each pick is a `RegionAttention` whose query is
    its own `WordPooling` of the question; a third pooling reads the predicate; the comparisons are products of
    linear maps, predicate x pick 1 and pick 1 x pick 2 (the low-rank bilinear form of Kim et al.'s MLB), which
    an MLP on the concatenation learns only slowly. With one plain-mean pick the relations ("what is left of the
    X?") stayed at 39-44% on oracle regions at the demo's budget; with these, 80-85 (docs/RESULTS.md).

    `match` ("pick-match"): the scores behind the first pick are a match of the question against every region, and
    "how many red stars?", "is there a red star?" and "is the red star striped?" are questions about those scores,
    not about the picked state: the answer head also reads the soft count of the regions that match (a sum of
    sigmoids of the first pick's own scores, fitted to the counting answers by the task: `counts`), how much weight
    each pick gave the null slot, how well the picked region fits the predicate (the first pick's scores with the
    predicate as query, averaged under its weights), and the product predicate x pick 1 x pick 2 (spatial checks:
    "is the star left of the arrow?"). On oracle regions at the demo's budget counting went from 70 to 96%
    (docs/RESULTS.md).

    `relate` ("pick-relate", with `match`): relations between the two objects, for "is the star left of the arrow?"
    and "what is left of the arrow?". Only the answer trains the picks, and with pick-match they did not land on the
    two noun phrases (pick 1 took words of both; the spatial checks stayed at their prior on oracle regions). Here
    a fourth word weighting marks the relation word, the split: pick 1 reads only the words before it and pick 2
    only those after, both through the first pick's matcher (the one counting trains), and the relation's vector
    weights four box gaps to pick 2's box (`box_gaps`, from the box code): added to pick 1's scores, so "what is left
    of the arrow?" picks the region left of the arrow; and, for the region pick 1 matches by its words alone, read
    by the answer head with its four gaps ("is the star left of the arrow?"). On oracle regions at the demo's budget:
    91.8 -> 97.3% of the ceiling, the spatial checks 69.0 -> 96.1, "what is" 56.7 -> 98.9 (docs/RESULTS.md)."""

    def __init__(self, cfg: BertConfig, null_slot: bool = False, match: bool = False, max_count: int = 10,
                 relate: bool = False):
        super().__init__()
        if relate and not match:
            raise ValueError("relate needs match: its relation check is read beside the match vector")
        h = cfg.hidden_size
        # pick 1, pick 2, predicate (and the split: where the relation word is)
        self.words = nn.ModuleList([WordPooling(cfg) for _ in range(4 if relate else 3)])
        # relate: both picks through the first's matcher
        self.picks = nn.ModuleList([RegionAttention(cfg, null_slot) for _ in range(1 if relate else 2)])
        self.compare = nn.ModuleList([nn.Linear(h, h) for _ in range(6 if match else 4)])
        self.compare.apply(init_bert_weights)
        self.match, self.relate, self.max_count = match, relate, max_count
        if match:
            self.match_bias = nn.Parameter(torch.tensor([0.0, -2.0]))  # predicate fit; count (sigmoid(-2) = 0.12)
            # two null weights, the predicate's fit, the count's bins (relate: the relation's fit, four gaps) -> H
            self.match_embed = nn.Linear(3 + max_count + 1 + (5 if relate else 0), h)
            init_bert_weights(self.match_embed)
        if relate:
            # The relation's weights of the four gaps: for pick 1's scores (zero at first: pick 1 starts as the plain
            # match) and for the answer head's check.
            self.relation_pick, self.relation_check = nn.Linear(h, 4), nn.Linear(h, 4)
            nn.init.zeros_(self.relation_pick.weight)
            nn.init.zeros_(self.relation_pick.bias)
            init_bert_weights(self.relation_check)

    def forward(self, tokens: torch.Tensor, words: torch.Tensor, regions: torch.Tensor, region_mask: torch.Tensor,
                boxes: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """tokens [B, T, H], words [B, T] bool, regions [B, R, H], region_mask [B, R] (`relate`: boxes [B, R, 6],
        the box code) -> ([B, 4H]: pick 1, pick 2, predicate x pick 1, pick 1 x pick 2; with `match` [B, 6H]: and
        the match vector and predicate x pick 1 x pick 2, and the soft counts [B, 1], else None)."""
        predicate = self.words[2](tokens, words)
        a = self.picks[0]
        keys = a.key(regions)  # the first pick's region keys, read by its own query and by the predicate's
        n = 1 if a.null_key is not None else 0  # the null slot's column comes first
        if self.relate:
            if boxes is None:
                raise ValueError("pick-relate reads the regions' box codes: pass boxes")
            split = self.words[3].weights(tokens, words)
            relation = (split.unsqueeze(-1) * tokens).sum(1)
            after = torch.cumsum(split, -1) - split  # the split's weight on the words before each word
            q1, q2 = self.words[0](tokens, words, 1 - after - split), self.words[1](tokens, words, after)
            s2 = a.logits(q2, regions, region_mask, keys)
            w2 = a.weights(s2, region_mask)
            boxes = boxes.to(w2.dtype)
            ref = (w2[:, n:, None] * boxes).sum(1) / w2[:, n:].sum(-1, keepdim=True).clamp(min=1e-6)
            gaps = box_gaps(boxes, ref)  # [B, R, 4]: each region against pick 2's box
            matched1 = a.logits(q1, regions, region_mask, keys)
            toward = (gaps * self.relation_pick(relation)[:, None]).sum(-1).masked_fill(~region_mask, 0)
            s1 = torch.cat([matched1[:, :n], matched1[:, n:] + toward], -1)
            w1 = a.weights(s1, region_mask)
            p1, p2 = a.read(w1, regions), a.read(w2, regions)
        else:
            q1, q2 = self.words[0](tokens, words), self.words[1](tokens, words)
            b = self.picks[1]
            s1 = matched1 = a.logits(q1, regions, region_mask, keys)
            s2 = b.logits(q2, regions, region_mask)
            w1, w2 = a.weights(s1, region_mask), b.weights(s2, region_mask)
            p1, p2 = a.read(w1, regions), b.read(w2, regions)
        c = self.compare
        parts = [p1, p2, c[0](predicate) * c[1](p1), c[2](p1) * c[3](p2)]
        if not self.match:
            return torch.cat(parts, dim=-1), None
        fit = torch.sigmoid(a.logits(predicate, regions, region_mask, keys)[:, n:] + self.match_bias[0])
        fits_predicate = (w1[:, n:] * fit).sum(-1, keepdim=True)
        counts = (torch.sigmoid(matched1[:, n:] + self.match_bias[1]) * region_mask.to(s1.dtype)).sum(-1, keepdim=True)
        nulls = torch.stack([w1[:, 0], w2[:, 0]], -1) if n else torch.zeros_like(fits_predicate).expand(-1, 2)
        matched = [nulls, fits_predicate, count_bins(counts[:, 0], self.max_count)]
        if self.relate:  # the first object by its words alone, against pick 2's box
            by_words = a.weights(matched1, region_mask)[:, n:, None]
            check = (gaps * self.relation_check(relation)[:, None]).sum(-1, keepdim=True)
            matched += [(by_words * check).sum(1), (by_words * gaps).sum(1)]
        parts += [self.match_embed(torch.cat(matched, -1)), c[4](predicate) * c[2](p1) * c[5](p2)]
        return torch.cat(parts, dim=-1), counts


# How many H-wide vectors each pooling of VQA and NLVR2 hands the classifier (per image for NLVR2).
POOLED_VECTORS = {"cls": 1, "text-mean": 1, "region-attention": 2, "region-count": 3, "pick-compare": 5,
                  "pick-match": 7, "pick-relate": 7}


def text_and_picks(hidden: torch.Tensor, text_mask: torch.Tensor, token_type_ids: torch.Tensor,
                   region_mask: torch.Tensor, pooler: Pooler, pick_compare: PickCompare,
                   region_boxes: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The "pick-compare", "pick-match" and "pick-relate" pooling of VQA and NLVR2, [B, 5H] / [B, 7H]: the pooled mean
    of the token segment beside `PickCompare` over the text's own words (segment 0) and the final region states (and,
    for pick-relate, their box codes); and the soft counts of pick-match and pick-relate (else None)."""
    t = text_mask.shape[1]
    words = text_mask & (token_type_ids == 0)
    picked, counts = pick_compare(hidden[:, :t], words, hidden[:, t:], region_mask, region_boxes)
    return torch.cat([pooled_text_mean(hidden, text_mask, pooler), picked], dim=-1), counts


class RegionCount(nn.Module):
    """How many regions a question names: per head, Σ_r sigmoid(query . key_r + b) over the final region
    states, the query from the question's tokens (Zhang et al.'s counting idea, simplified). Softmax attention
    cannot count (two identical circles give the same weighted mean as one); a sum of independent sigmoids can.
    Each head's count is spread over soft bins 0..`max_count` (bin k gets max(0, 1 - |count - k|)) and embedded,
    so the answer head reads a count as it reads a region. The first head's count is also what a task can fit
    to a number it knows (VQA: the answer of a counting question), which tells the key which regions to count:
    the answer alone, through the bins, barely does."""

    def __init__(self, cfg: BertConfig, heads: int = 4, max_count: int = 10):
        super().__init__()
        self.heads, self.max_count = heads, max_count
        self.query = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.key = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.bias = nn.Parameter(torch.full((heads,), -2.0))  # sigmoid(-2) = 0.12: most regions start uncounted
        self.embed = nn.Linear(heads * (max_count + 1), cfg.hidden_size)
        self.apply(init_bert_weights)

    def counts(self, question: torch.Tensor, regions: torch.Tensor, region_mask: torch.Tensor) -> torch.Tensor:
        """question [B, H], regions [B, R, H], region_mask [B, R] -> [B, heads] soft counts."""
        b, r, h = regions.shape
        q = self.query(question).view(b, 1, self.heads, h // self.heads)
        k = self.key(regions).view(b, r, self.heads, h // self.heads)
        scores = (q * k).sum(-1) / (h // self.heads) ** 0.5 + self.bias  # [B, R, heads]
        return (torch.sigmoid(scores.float()) * region_mask.unsqueeze(-1)).sum(1)

    def forward(self, question: torch.Tensor, regions: torch.Tensor,
                region_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """-> (counts [B, heads], their embedding [B, H])."""
        counts = self.counts(question, regions, region_mask)
        bins = self.bins(counts)
        return counts, self.embed(bins.flatten(1).to(self.embed.weight.dtype))

    def bins(self, counts: torch.Tensor) -> torch.Tensor:
        return count_bins(counts, self.max_count)
