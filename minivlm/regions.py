"""`Regions`: the one value that passes from the vision module to the fusion module.

Whether region features are computed on the fly by TEE-X or read back from a feature store (or from an
Oscar/VinVL TSV), every task sees this type.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch


@dataclass
class Regions:
    boxes: torch.Tensor  # [K, 4] float, x1 y1 x2 y2 in pixels of the original image
    features: torch.Tensor  # [K, D] float, D = 1024 for TEE-X (2048 for R101-F / VinVL)
    scores: torch.Tensor  # [K] float, the class confidence of each region's tag
    labels: torch.Tensor  # [K] long, class ids (0-based, background excluded)
    image_size: tuple[int, int]  # (width, height) of the original image
    tags: list[str] = field(default_factory=list)  # class names of `labels`: the object tags
    attributes: torch.Tensor | None = None  # [K] long, best attribute id per region (or None)
    attribute_names: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return int(self.boxes.shape[0])

    def box_encoding(self) -> torch.Tensor:
        """The paper's 6-d box code: normalised x1, y1, x2, y2, width, height."""
        w, h = self.image_size
        b = self.boxes.float() / torch.tensor([w, h, w, h], dtype=torch.float32)
        b = b.clamp(0.0, 1.0)
        return torch.cat([b, b[:, 2:3] - b[:, 0:1], b[:, 3:4] - b[:, 1:2]], dim=1)

    def object_tags(self, max_regions: int, min_score: float = 0.0) -> list[str]:
        """OSCAR's object tags: the class names of the confident regions among the top `max_regions`,
        highest score first, each name once. Low-scoring regions still enter the transformer as region
        tokens, but naming them would list nearly every class for every image."""
        if not self.tags:
            return []
        order = torch.argsort(self.scores, descending=True)[:max_regions].tolist()
        seen: dict[str, None] = {}
        for i in order:
            if self.tags[i] and float(self.scores[i]) >= min_score:
                seen.setdefault(self.tags[i], None)
        return list(seen)

    def confident(self, k: int, min_score: float = 0.0) -> "Regions":
        """What enters the transformer: the top `k` regions whose score reaches `min_score`, and at least the
        best one (as BUTD keeps a minimum number of boxes under its score threshold), so that every image
        has something to look at."""
        n = min(k, max(1, int((self.scores >= min_score).sum())), len(self))
        return self if n == len(self) else self.top(n)

    def mirrored(self) -> "Regions":
        """The same regions in the image flipped left to right (boxes only: a feature describes what is in its
        box, and the classes and attributes here do not depend on the side they face)."""
        w = float(self.image_size[0])
        boxes = torch.stack([w - self.boxes[:, 2], self.boxes[:, 1], w - self.boxes[:, 0], self.boxes[:, 3]], dim=1)
        return replace(self, boxes=boxes)

    def top(self, k: int) -> "Regions":
        """The k highest-scoring regions (already sorted stores return a prefix)."""
        order = torch.argsort(self.scores, descending=True)[:k]
        pick = order.tolist()
        return Regions(
            boxes=self.boxes[order], features=self.features[order], scores=self.scores[order],
            labels=self.labels[order], image_size=self.image_size,
            tags=[self.tags[i] for i in pick] if self.tags else [],
            attributes=None if self.attributes is None else self.attributes[order],
            attribute_names=[self.attribute_names[i] for i in pick] if self.attribute_names else [],
        )
