"""The numpy searches of the ONNX runtime drop rows that are done (`prune`): the same tokens as keeping every
row to the end, for fewer rows fed. A fake stepper stands in for the graphs: each row's logits follow from
its image and its own tokens so far, as in a real model, so dropping or reordering rows changes nothing."""

from __future__ import annotations

import zlib

import numpy as np
import pytest

from minivlm.edge_decode import beam_search, greedy_search

IDS = {"pad": 0, "cls": 1, "sep": 2, "mask": 3}
VOCAB = 12


class FakeSteps:
    """Logits of a row = a hash of (its image, its tokens so far); [SEP] likely enough that captions end
    at different lengths. Counts the rows it is fed, which is what a step costs."""

    def __init__(self, images: int, expand: int = 1, seed: int = 0):
        self.image = np.repeat(np.arange(images), expand)
        self.history: list[tuple[int, ...]] = [()] * len(self.image)
        self.seed, self.rows_fed = seed, 0

    def __call__(self, last: np.ndarray) -> np.ndarray:
        assert len(last) == len(self.history)
        self.history = [h + (int(t),) for h, t in zip(self.history, last)]
        self.rows_fed += len(last)
        out = np.empty((len(last), VOCAB), dtype=np.float32)
        for i, (img, h) in enumerate(zip(self.image, self.history)):
            rng = np.random.default_rng(zlib.crc32(repr((self.seed, int(img), h)).encode()))
            out[i] = rng.normal(0, 2, VOCAB)
            out[i, IDS["sep"]] += 1.5
        return out

    def reorder(self, rows: np.ndarray) -> None:
        self.image = self.image[rows]
        self.history = [self.history[r] for r in rows]


@pytest.mark.parametrize("seed", range(4))
def test_greedy_pruning_gives_the_same_captions_for_fewer_rows(seed):
    n, max_len = 7, 9
    pruned, full = FakeSteps(n, seed=seed), FakeSteps(n, seed=seed)
    got = greedy_search(pruned, n, max_len, IDS, min_len=1)
    want = greedy_search(full, n, max_len, IDS, min_len=1, prune=False)
    assert got == want
    assert len({len(c) for c in want}) > 1  # captions ended at different steps (the test has teeth) ...
    assert pruned.rows_fed < full.rows_fed  # ... and the rows that were done stopped costing


@pytest.mark.parametrize("beam", [2, 3])
@pytest.mark.parametrize("seed", range(4))
def test_beam_pruning_gives_the_same_captions_for_fewer_rows(beam, seed):
    n, max_len = 6, 10
    pruned, full = FakeSteps(n, beam, seed), FakeSteps(n, beam, seed)
    got = beam_search(pruned, n, beam, max_len, IDS, min_len=1)
    want = beam_search(full, n, beam, max_len, IDS, min_len=1, prune=False)
    assert got == want
    assert len({len(c) for c in want}) > 1
    assert pruned.rows_fed < full.rows_fed
