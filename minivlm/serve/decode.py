"""Batched caption decoding whose rows finish independently, on either runtime.

The library's searches (`minivlm.tasks.decode` for PyTorch, `minivlm.edge_decode` for ONNX Runtime) decode
a batch until every row has ended. The server wants more: each request's caption returned as soon as its
own row ends (or reaches that request's `max_tokens`), and its tokens streamed while it decodes. Rather
than restate the searches, `Tap` wraps the stepper they drive: each call to the stepper carries the
token every live row produced at the previous step, so the tap sees each token one step after it is
chosen and hands it to a `Rows` tracker. The search itself, and so every caption, is the library's.

Greedy decoding (beam 1) is a prefix of itself: the first m tokens of a row decoded for M >= m steps are
the row decoded for m steps. So one batch decodes for the largest `max_tokens` among its rows and every
row stops counting at its own. Beam search has no such property; the batcher groups beam requests by
(beam size, max_tokens) and their rows finish together, at the end.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np

# called with (row, token ids, finish reason) when a row ends: "stop" ([SEP]) or "length" (max_tokens)
OnDone = Callable[[int, list[int], str], None]
OnToken = Callable[[int, int], None]  # (row, token id) as each content token is chosen


@dataclass
class Rows:
    """Tokens of each row as they come; a row is done at [SEP] or at its own max_len."""

    max_lens: list[int]
    sep: int
    pad: int
    on_done: OnDone
    on_token: OnToken | None = None
    ids: list[list[int]] = field(init=False)
    done: list[bool] = field(init=False)

    def __post_init__(self):
        self.ids = [[] for _ in self.max_lens]
        self.done = [False] * len(self.max_lens)

    def add(self, row: int, token: int) -> None:
        if self.done[row] or token == self.pad:
            return
        if token == self.sep:
            return self.finish(row, "stop")
        self.ids[row].append(token)
        if self.on_token is not None:
            self.on_token(row, token)
        if len(self.ids[row]) >= self.max_lens[row]:
            self.finish(row, "length")

    def finish(self, row: int, reason: str) -> None:
        if not self.done[row]:
            self.done[row] = True
            self.on_done(row, self.ids[row], reason)

    def close(self, final: Sequence[Sequence[int]]) -> None:
        """The search's own output for the rows still open when it returned (their last token, and the
        [SEP] that ended them, came after the tap's last look)."""
        for row, ids in enumerate(final):
            if self.done[row]:
                continue
            for token in list(ids)[len(self.ids[row]):]:
                self.add(row, int(token))
            if not self.done[row]:  # ended by [SEP] (stripped from `final`) before its max_len
                self.finish(row, "stop")


class Tap:
    """A stepper that reports each live row's previous token, then defers to the real stepper.

    `batch_first`: PyTorch steppers get the tokens so far ([N, t]: the last column is new); ONNX steppers
    get only the previous token ([N]) and drop finished rows through `reorder`, which the tap follows."""

    def __init__(self, inner: Any, rows: Rows, torch_tokens: bool):
        self.inner, self.rows, self.torch_tokens = inner, rows, torch_tokens
        self.live = np.arange(len(rows.max_lens))  # the caption row behind each stepper row
        self.calls = 0

    def __call__(self, tokens):
        if self.calls:  # the first call carries only [CLS]
            last = tokens[:, -1] if self.torch_tokens else tokens
            for row, token in zip(self.live.tolist(), last.tolist()):
                self.rows.add(row, int(token))
        self.calls += 1
        return self.inner(tokens)

    def reorder(self, keep):
        kept = self.live[np.asarray(keep.tolist() if hasattr(keep, "tolist") else keep, dtype=np.int64)]
        for row in sorted(set(self.live.tolist()) - set(kept.tolist())):
            self.rows.finish(row, "stop")  # the ONNX search drops a row once its [SEP] is out
        self.live = kept
        self.inner.reorder(keep)


def model_max_len(model: Any) -> int:
    """The longest caption the model's caption segment holds ([CLS] + tokens)."""
    task = model.task("caption")
    return (task["max_text_len"] if isinstance(task, dict) else task.cfg.max_text_len) - 1


def decode_captions(model: Any, regions: Sequence[Any], max_lens: Sequence[int], beam_size: int,
                    on_done: OnDone, on_token: OnToken | None = None) -> None:
    """Captions of `regions` (one per row) with greedy or beam search; `on_done` fires once per row, as
    early as the row is known to have ended. Tokens stream through `on_token` for greedy search only (beam
    search settles its rows at the end)."""
    from minivlm.edge import EdgeMiniVLM

    horizon = max(max_lens)
    if isinstance(model, EdgeMiniVLM):
        from minivlm.edge import CachedSteps
        from minivlm.edge_decode import beam_search, greedy_search

        cfg, ids = model.task("caption"), model.ids
        sep, pad = ids["sep"], ids["pad"]
        rows = Rows(list(max_lens), sep, pad, on_done, on_token if beam_size == 1 else None)
        steps = CachedSteps(model, cfg, list(regions), beam_size)
        if beam_size == 1:
            final = greedy_search(Tap(steps, rows, torch_tokens=False), len(regions), horizon, ids)
        else:
            final = beam_search(steps, len(regions), beam_size, horizon, ids)
    else:
        from minivlm.tasks.caption_model import CachedSteps, build_prefix
        from minivlm.tasks.decode import beam_search, greedy_search, strip
        import torch

        task = model.task("caption")
        sep, pad = task.ids.sep, task.ids.pad
        rows = Rows(list(max_lens), sep, pad, on_done, on_token if beam_size == 1 else None)
        with torch.no_grad():  # as `MiniVLM.caption` -> `CaptionModel.generate`, step for step
            task.eval()
            prefix = build_prefix(model.tokenizer, list(regions), task.cfg).to(task.device)
            if beam_size == 1:
                tokens, _ = greedy_search(Tap(CachedSteps(task, prefix), rows, torch_tokens=True), len(regions),
                                          horizon, task.ids, task.device)
            else:
                tokens, _ = beam_search(CachedSteps(task, prefix, beam_size), len(regions), beam_size, horizon,
                                        task.ids, task.device)
            final = strip(tokens, task.ids)
    rows.close(final)
