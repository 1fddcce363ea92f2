"""`minivlm.tasks.decode` in numpy, for the torch-free ONNX runtime: greedy and beam search over a stepper.

The stepper is called with each row's previous token (`[N]` int64, [CLS] first) and returns the next-token
logits `[N, V]`; `reorder(rows)` keeps the given rows when beam search reshuffles them. The token rules are
decode.py's: [PAD], [CLS] and [MASK] are never generated, [SEP] ends a caption (barred before `min_len`
tokens), and ended rows emit [PAD]. tests/test_export.py holds both searches to the PyTorch originals.

Unlike decode.py, rows that are done leave the batch (`prune`, through `reorder`): on the CPU a step costs
about its number of rows, and a batch's captions end at different lengths. Rows never interact, so the
tokens are the same either way (tests/test_edge_decode.py).
"""

from __future__ import annotations

from typing import Protocol

import numpy as np


class Stepper(Protocol):
    def __call__(self, last: np.ndarray) -> np.ndarray: ...  # [N] previous tokens -> [N, V] logits

    def reorder(self, rows: np.ndarray) -> None: ...


def next_token_logprobs(logits: np.ndarray, ids: dict, step: int, min_len: int) -> np.ndarray:
    """Log-softmax in float32 with the banned tokens at -inf (step counts from 1)."""
    x = logits.astype(np.float32)
    x = x - x.max(axis=-1, keepdims=True)
    logp = x - np.log(np.exp(x).sum(axis=-1, keepdims=True))
    logp[:, [ids["pad"], ids["cls"], ids["mask"]] + ([ids["sep"]] if step <= min_len else [])] = -np.inf
    return logp


def greedy_search(stepper: Stepper, n: int, max_len: int, ids: dict, min_len: int = 0,
                  prune: bool = True) -> list[list[int]]:
    out = np.full((n, max_len), ids["pad"], dtype=np.int64)
    rows = np.arange(n)  # the caption each row of the stepper writes
    last = np.full(n, ids["cls"], dtype=np.int64)
    done = np.zeros(n, dtype=bool)
    for step in range(1, max_len + 1):
        last = np.where(done, ids["pad"], next_token_logprobs(stepper(last), ids, step, min_len).argmax(-1))
        out[rows, step - 1] = last
        done |= last == ids["sep"]
        if done.all():
            break
        if prune and done.any():
            keep = np.flatnonzero(~done)
            stepper.reorder(keep)
            rows, last, done = rows[keep], last[keep], done[keep]
    return strip(out, ids)


def beam_search(stepper: Stepper, batch: int, beam: int, max_len: int, ids: dict, min_len: int = 0,
                length_penalty: float = 1.0, prune: bool = True) -> list[list[int]]:
    """Each image's best beam; rows are image-major (row b * beam + k). See `decode.beam_search`: candidates
    rank by sum(log p) / length ** length_penalty, and a finished beam keeps its score and competes on.
    An image whose beams have all finished cannot change any more (each beam's one continuation is [PAD]
    at no cost), so with `prune` its best beam is taken then and its rows leave the batch."""
    k = beam
    images = np.arange(batch)  # the image each group of k rows belongs to
    best: list[np.ndarray | None] = [None] * batch
    scores = np.zeros((batch, k), dtype=np.float32)
    scores[:, 1:] = -np.inf  # all beams start identical: let only the first one expand at step 1
    lengths = np.zeros((batch, k), dtype=np.float32)
    finished = np.zeros((batch, k), dtype=bool)
    tokens = np.full((batch * k, 1), ids["cls"], dtype=np.int64)

    def take_best(which: np.ndarray) -> None:
        final = scores[which] / np.maximum(lengths[which], np.float32(1.0)) ** np.float32(length_penalty)
        for b, j in zip(np.flatnonzero(which), final.argmax(axis=1)):
            best[images[b]] = tokens[b * k + j, 1:]

    for step in range(1, max_len + 1):
        b = len(images)
        logp = next_token_logprobs(stepper(tokens[:, -1]), ids, step, min_len).reshape(b, k, -1)
        vocab = logp.shape[-1]
        logp[finished] = -np.inf
        logp[..., ids["pad"]] = np.where(finished, 0.0, -np.inf)
        cand = scores[..., None] + logp  # [B, K, V] summed log-probabilities
        cand_len = np.where(finished, lengths, np.float32(step))[..., None]
        ranked = (cand / np.maximum(cand_len, np.float32(1.0)) ** np.float32(length_penalty)).reshape(b, -1)
        pick = top_k(ranked, k)
        src, tok = pick // vocab, pick % vocab
        was_done = np.take_along_axis(finished, src, 1)
        scores = np.take_along_axis(cand.reshape(b, -1), pick, 1)
        lengths = np.where(was_done, np.take_along_axis(lengths, src, 1), np.float32(step))
        finished = was_done | (tok == ids["sep"])
        rows = (np.arange(b)[:, None] * k + src).reshape(-1)
        tokens = np.concatenate([tokens[rows], tok.reshape(-1, 1)], axis=1)
        if finished.all():
            break
        ended = finished.all(axis=1)
        if prune and ended.any():
            take_best(ended)
            keep = ~ended
            rows, tokens = rows.reshape(b, k)[keep].reshape(-1), tokens.reshape(b, k, -1)[keep].reshape(-1, step + 1)
            images, scores, lengths, finished = images[keep], scores[keep], lengths[keep], finished[keep]
        stepper.reorder(rows)
    take_best(np.ones(len(images), dtype=bool))
    return [strip(t[None], ids)[0] for t in best]


def top_k(x: np.ndarray, k: int) -> np.ndarray:
    """Column indices of each row's k largest values, largest first (`torch.topk`)."""
    part = np.argpartition(-x, k - 1, axis=1)[:, :k]  # no need to sort all K x 30522 candidates
    order = np.argsort(-np.take_along_axis(x, part, 1), axis=1, kind="stable")
    return np.take_along_axis(part, order, 1)


def strip(tokens: np.ndarray, ids: dict) -> list[list[int]]:
    """Rows of generated ids -> lists ending before the first [SEP] (pads dropped)."""
    out = []
    for row in tokens.tolist():
        seq = []
        for t in row:
            if t == ids["sep"]:
                break
            if t != ids["pad"]:
                seq.append(t)
        out.append(seq)
    return out
