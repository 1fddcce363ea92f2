"""Image-text retrieval Recall@K, with the COCO 1K (5 folds, averaged) and 5K (full set) protocols.

A score matrix holds one row per image and one column per text (caption); `text_to_image[t]` is the
image that caption t describes. Text retrieval (TR, image -> text) asks, for each image, whether any of
its captions is in the top K texts; image retrieval (IR, text -> image) asks, for each caption, whether
its image is in the top K images. Ties count against the model (an item tied with the correct one ranks
above it), so a constant scorer gets no credit it did not earn.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch

from minivlm.errors import DataFormatError
from minivlm.io import read_json


def _check(scores: torch.Tensor, t2i: torch.Tensor) -> None:
    if scores.dim() != 2:
        raise ValueError(f"scores must be [n_images, n_texts], got shape {tuple(scores.shape)}")
    n_images, n_texts = scores.shape
    if t2i.numel() != n_texts:
        raise ValueError(f"text_to_image has {t2i.numel()} entries for {n_texts} texts (score columns)")
    if n_texts and (t2i.min() < 0 or t2i.max() >= n_images):
        raise ValueError(f"text_to_image holds image indices outside 0..{n_images - 1}")
    if n_images and torch.bincount(t2i, minlength=n_images).min() == 0:
        raise ValueError("every image needs at least one text (caption)")
    if not torch.isfinite(scores).all():
        raise ValueError("scores contain NaN or infinite values")


def recall_at_k(scores: Any, text_to_image: Sequence[int], ks: Sequence[int] = (1, 5, 10)) -> dict[str, float]:
    """{"TR@k", "IR@k" for k in ks, "rsum"}: recalls in percent; rsum is their sum (the usual summary)."""
    scores = torch.as_tensor(scores, dtype=torch.float64)
    t2i = torch.as_tensor(list(text_to_image), dtype=torch.long)
    _check(scores, t2i)
    n_images, n_texts = scores.shape
    positive = t2i.unsqueeze(0) == torch.arange(n_images).unsqueeze(1)  # [I, T]: text t describes image i

    # TR: the best-scoring caption of each image, ranked among the other images' captions.
    best_pos = scores.masked_fill(~positive, float("-inf")).max(dim=1).values  # [I]
    tr_rank = ((scores >= best_pos.unsqueeze(1)) & ~positive).sum(dim=1)  # negatives at or above it
    # IR: each caption's own image, ranked among the other images.
    correct = scores[t2i, torch.arange(n_texts)]  # [T]
    ir_rank = (scores >= correct.unsqueeze(0)).sum(dim=0) - 1  # minus the correct image itself

    out: dict[str, float] = {}
    for k in ks:
        out[f"TR@{k}"] = 100.0 * (tr_rank < k).double().mean().item()
    for k in ks:
        out[f"IR@{k}"] = 100.0 * (ir_rank < k).double().mean().item()
    out["rsum"] = sum(out[f"TR@{k}"] + out[f"IR@{k}"] for k in ks)
    return out


def subset_splits(n_images: int, size: int | None = None, n_folds: int = 5) -> list[torch.Tensor]:
    """Consecutive folds of image indices for the COCO "1K test" protocol: 5 folds of 1,000 of the 5K test
    images, recalls averaged. Scaled to smaller sets: folds of min(1000, n_images // n_folds) images.
    Every full fold is returned (a remainder smaller than `size` is left out, as in the 1K protocol)."""
    if size is None:
        size = min(1000, n_images // n_folds)
    if size < 1:
        raise ValueError(f"{n_images} images are too few for folds (size {size})")
    return [torch.arange(i * size, (i + 1) * size) for i in range(n_images // size)]


def retrieval_metrics(scores: Any, text_to_image: Sequence[int], fold_size: int | None = None,
                      ks: Sequence[int] = (1, 5, 10)) -> dict[str, Any]:
    """Recall@K on the full set ("full", the 5K-style number) and averaged over image folds ("folds", the
    1K-style number), with the fold size used."""
    scores = torch.as_tensor(scores, dtype=torch.float64)
    t2i = torch.as_tensor(list(text_to_image), dtype=torch.long)
    _check(scores, t2i)
    out: dict[str, Any] = {"n_images": scores.shape[0], "n_texts": scores.shape[1],
                           "full": recall_at_k(scores, t2i.tolist(), ks)}
    size = fold_size or min(1000, scores.shape[0] // 5)
    if size >= 1 and scores.shape[0] // size >= 2:  # folds only mean something when there are several
        folds = subset_splits(scores.shape[0], size)
        per_fold = []
        for images in folds:
            texts = torch.nonzero((t2i >= images[0]) & (t2i <= images[-1])).squeeze(1)
            per_fold.append(recall_at_k(scores[images][:, texts], (t2i[texts] - images[0]).tolist(), ks))
        out["folds"] = {key: sum(f[key] for f in per_fold) / len(per_fold) for key in per_fold[0]}
        out["fold_size"], out["n_folds"] = len(folds[0]), len(folds)
    return out


def read_retrieval_results(path: Any) -> tuple[torch.Tensor, list[int]]:
    """A retrieval results file: {"scores": [[score of text t for image i, ...] per image i],
    "text_to_image": [image index of text t, ...]}."""
    obj = read_json(path)
    if not isinstance(obj, dict):
        raise DataFormatError(path, "expected an object {\"scores\": [[...]], \"text_to_image\": [...]}")
    for key in ("scores", "text_to_image"):
        if key not in obj:
            raise DataFormatError(path, f"{key}: missing")
    rows, t2i = obj["scores"], obj["text_to_image"]
    if not isinstance(rows, list) or not rows or not all(isinstance(r, list) for r in rows):
        raise DataFormatError(path, "scores: expected a non-empty list of rows (one per image)")
    width = len(rows[0])
    for i, r in enumerate(rows):
        if len(r) != width:
            raise DataFormatError(path, f"scores[{i}]: {len(r)} values, expected {width} (one per text)")
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in r):
            raise DataFormatError(path, f"scores[{i}]: expected numbers")
    if not isinstance(t2i, list) or not all(isinstance(v, int) and not isinstance(v, bool) for v in t2i):
        raise DataFormatError(path, "text_to_image: expected a list of integer image indices")
    scores = torch.tensor(rows, dtype=torch.float64)
    try:
        _check(scores, torch.as_tensor(t2i, dtype=torch.long))
    except ValueError as err:
        raise DataFormatError(path, str(err)) from None
    return scores, t2i


def evaluate_retrieval_file(results_json: Any, fold_size: int | None = None) -> dict[str, Any]:
    scores, t2i = read_retrieval_results(results_json)
    return retrieval_metrics(scores, t2i, fold_size)
