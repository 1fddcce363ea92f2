"""`minivlm.tasks.decode` in numpy, for the torch-free ONNX runtime: greedy and beam search over a stepper.

The stepper is called with each row's previous token (`[N]` int64, [CLS] first) and returns the next-token
logits `[N, V]`; `reorder(rows)` keeps the given rows when beam search reshuffles them. The token rules are
decode.py's: [PAD], [CLS] and [MASK] are never generated, [SEP] ends a caption (barred before `min_len`
tokens), and ended rows emit [PAD]. tests/test_export.py holds both searches to the PyTorch originals.
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


def greedy_search(stepper: Stepper, n: int, max_len: int, ids: dict, min_len: int = 0) -> list[list[int]]:
    last = np.full(n, ids["cls"], dtype=np.int64)
    done = np.zeros(n, dtype=bool)
    generated = []
    for step in range(1, max_len + 1):
        last = np.where(done, ids["pad"], next_token_logprobs(stepper(last), ids, step, min_len).argmax(-1))
        generated.append(last)
        done |= last == ids["sep"]
        if done.all():
            break
    return strip(np.stack(generated, axis=1), ids)


def beam_search(stepper: Stepper, batch: int, beam: int, max_len: int, ids: dict, min_len: int = 0,
                length_penalty: float = 1.0) -> list[list[int]]:
    """Each image's best beam; rows are image-major (row b * beam + k). See `decode.beam_search`: candidates
    rank by sum(log p) / length ** length_penalty, and a finished beam keeps its score and competes on."""
    k = beam
    scores = np.zeros((batch, k), dtype=np.float32)
    scores[:, 1:] = -np.inf  # all beams start identical: let only the first one expand at step 1
    lengths = np.zeros((batch, k), dtype=np.float32)
    finished = np.zeros((batch, k), dtype=bool)
    tokens = np.full((batch * k, 1), ids["cls"], dtype=np.int64)
    offsets = np.arange(batch)[:, None] * k
    for step in range(1, max_len + 1):
        logp = next_token_logprobs(stepper(tokens[:, -1]), ids, step, min_len).reshape(batch, k, -1)
        vocab = logp.shape[-1]
        logp[finished] = -np.inf
        logp[..., ids["pad"]] = np.where(finished, 0.0, -np.inf)
        cand = scores[..., None] + logp  # [B, K, V] summed log-probabilities
        cand_len = np.where(finished, lengths, np.float32(step))[..., None]
        ranked = (cand / np.maximum(cand_len, np.float32(1.0)) ** np.float32(length_penalty)).reshape(batch, -1)
        pick = top_k(ranked, k)
        src, tok = pick // vocab, pick % vocab
        was_done = np.take_along_axis(finished, src, 1)
        scores = np.take_along_axis(cand.reshape(batch, -1), pick, 1)
        lengths = np.where(was_done, np.take_along_axis(lengths, src, 1), np.float32(step))
        finished = was_done | (tok == ids["sep"])
        rows = (offsets + src).reshape(-1)
        tokens = np.concatenate([tokens[rows], tok.reshape(-1, 1)], axis=1)
        stepper.reorder(rows)
        if finished.all():
            break
    final = scores / np.maximum(lengths, np.float32(1.0)) ** np.float32(length_penalty)
    return strip(tokens[offsets[:, 0] + final.argmax(axis=1), 1:], ids)


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
