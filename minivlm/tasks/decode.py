"""Search over caption tokens: greedy (the paper's speed setting), sampling (SCST) and beam search.

The searches know nothing about the transformer. They drive a *stepper*: an object called once per step
with the tokens so far (`[N, t]`: [CLS] then the t - 1 generated tokens) that returns the next-token logits
`[N, V]`, and told by `reorder(index)` when beam search reshuffles its rows. `minivlm.tasks.caption_model`
provides two steppers over one model, a key/value-cached one and a recompute-everything one, so both run
through exactly the same search code and must agree token for token.

Token rules shared by every search: [PAD], [CLS] and [MASK] are never generated; [SEP] ends a caption
(and is barred before `min_len` tokens); rows that have ended emit [PAD] at zero cost from then on.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch

NEG_INF = float("-inf")


@dataclass(frozen=True)
class SpecialIds:
    pad: int
    cls: int
    sep: int
    mask: int

    @classmethod
    def from_tokenizer(cls, tokenizer) -> "SpecialIds":
        return cls(tokenizer.pad_id, tokenizer.cls_id, tokenizer.sep_id, tokenizer.mask_id)


class Stepper(Protocol):
    def __call__(self, tokens: torch.Tensor) -> torch.Tensor: ...  # [N, t] -> [N, V] logits

    def reorder(self, index: torch.Tensor) -> None: ...  # keep rows `index` (long [N]) in that order


def next_token_logprobs(logits: torch.Tensor, ids: SpecialIds, step: int, min_len: int) -> torch.Tensor:
    """Log-softmax in float32 with the banned tokens at -inf (step counts from 1)."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    banned = [ids.pad, ids.cls, ids.mask] + ([ids.sep] if step <= min_len else [])
    logp[:, banned] = NEG_INF
    return logp


def greedy_search(stepper: Stepper, n: int, max_len: int, ids: SpecialIds, device: torch.device,
                  min_len: int = 0, sample: bool = False, generator: torch.Generator | None = None
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedy (argmax) or sampled decoding of `n` rows. Returns (tokens [N, T] long: the generated tokens
    with [SEP] where a row ended and [PAD] after it; logp [N, T] float: each token's log-probability, 0 on
    pads). T <= max_len: the loop stops once every row has ended."""
    tokens = torch.full((n, 1), ids.cls, dtype=torch.long, device=device)
    done = torch.zeros(n, dtype=torch.bool, device=device)
    logps = []
    for step in range(1, max_len + 1):
        logp = next_token_logprobs(stepper(tokens), ids, step, min_len)
        if sample:
            nxt = torch.multinomial(logp.exp(), 1, generator=generator).squeeze(1)
        else:
            nxt = logp.argmax(-1)
        nxt = torch.where(done, torch.full_like(nxt, ids.pad), nxt)
        logps.append(torch.where(done, torch.zeros_like(logp[:, 0]), logp.gather(1, nxt[:, None]).squeeze(1)))
        tokens = torch.cat([tokens, nxt[:, None]], dim=1)
        done = done | (nxt == ids.sep)
        if bool(done.all()):
            break
    return tokens[:, 1:], torch.stack(logps, dim=1)


def beam_search(stepper: Stepper, batch: int, beam: int, max_len: int, ids: SpecialIds, device: torch.device,
                min_len: int = 0, length_penalty: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Beam search over `batch` images, `beam` rows each (the stepper's rows are image-major: row b * beam + k).

    Candidates are ranked by length-normalised log-probability, sum(log p) / length ** length_penalty, where
    the length counts the generated tokens including [SEP]. A beam that emits [SEP] is finished: it stays in
    the beam with its score frozen (its only continuation is [PAD] at zero cost) and competes with the
    live beams until the end. So beam 1 is exactly greedy decoding. Returns (tokens [B, T] of each image's
    best beam, its normalised score [B])."""
    k = beam
    scores = torch.zeros(batch, k, device=device)
    scores[:, 1:] = NEG_INF  # all beams start identical: let only the first one expand at step 1
    lengths = torch.zeros(batch, k, device=device)
    finished = torch.zeros(batch, k, dtype=torch.bool, device=device)
    tokens = torch.full((batch * k, 1), ids.cls, dtype=torch.long, device=device)
    offsets = (torch.arange(batch, device=device) * k)[:, None]
    for step in range(1, max_len + 1):
        logp = next_token_logprobs(stepper(tokens), ids, step, min_len).view(batch, k, -1)
        vocab = logp.shape[-1]
        logp[finished] = NEG_INF
        logp[..., ids.pad] = torch.where(finished, 0.0, NEG_INF)
        cand = scores[..., None] + logp  # [B, K, V] summed log-probabilities
        cand_len = torch.where(finished, lengths, float(step))[..., None]
        ranked = (cand / cand_len.clamp(min=1.0) ** length_penalty).view(batch, -1)
        pick = ranked.topk(k, dim=1).indices  # [B, K]
        src, tok = pick // vocab, pick % vocab
        was_done = finished.gather(1, src)
        scores = cand.view(batch, -1).gather(1, pick)
        lengths = torch.where(was_done, lengths.gather(1, src), float(step))
        finished = was_done | (tok == ids.sep)
        rows = (offsets + src).view(-1)
        tokens = torch.cat([tokens[rows], tok.view(-1, 1)], dim=1)
        stepper.reorder(rows)
        if bool(finished.all()):
            break
    final = scores / lengths.clamp(min=1.0) ** length_penalty
    best = final.argmax(dim=1)
    rows = (offsets.squeeze(1) + best)
    return tokens[rows, 1:], final.gather(1, best[:, None]).squeeze(1)


def strip(tokens: torch.Tensor, ids: SpecialIds) -> list[list[int]]:
    """Rows of generated ids -> lists ending before the first [SEP] (pads dropped)."""
    out = []
    for row in tokens.tolist():
        seq = []
        for t in row:
            if t == ids.sep:
                break
            if t != ids.pad:
                seq.append(t)
        out.append(seq)
    return out
