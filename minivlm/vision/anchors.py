"""Anchors (one size per level: anchor_scale x stride, several aspect ratios) and the box delta code."""

from __future__ import annotations

import math

import torch
from torch import Tensor


def level_anchors(height: int, width: int, stride: int, size: float, ratios: tuple[float, ...],
                  device: torch.device | str = "cpu") -> Tensor:
    """[height*width*A, 4] xyxy anchors in canvas pixels, ordered (y, x, ratio) to match a conv output
    permuted to [H, W, A]. ratio = height / width, area = size^2."""
    r = torch.tensor(ratios, dtype=torch.float32, device=device)
    ws, hs = size / r.sqrt(), size * r.sqrt()
    base = torch.stack([-ws, -hs, ws, hs], dim=1) / 2  # [A, 4] centred on 0
    ys = (torch.arange(height, device=device, dtype=torch.float32) + 0.5) * stride
    xs = (torch.arange(width, device=device, dtype=torch.float32) + 0.5) * stride
    cy, cx = torch.meshgrid(ys, xs, indexing="ij")
    centres = torch.stack([cx, cy, cx, cy], dim=-1).reshape(-1, 1, 4)
    return (centres + base).reshape(-1, 4)


class BoxCoder:
    """Faster R-CNN box parameterisation: (dx, dy, dw, dh) relative to a reference box, scaled by weights."""

    def __init__(self, weights: tuple[float, float, float, float] = (1.0, 1.0, 1.0, 1.0),
                 max_log_scale: float = math.log(1000.0 / 16)):
        self.weights = weights
        self.max_log_scale = max_log_scale

    @staticmethod
    def _centre(b: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        w = b[:, 2] - b[:, 0]
        h = b[:, 3] - b[:, 1]
        return b[:, 0] + 0.5 * w, b[:, 1] + 0.5 * h, w, h

    def encode(self, ref: Tensor, boxes: Tensor) -> Tensor:
        wx, wy, ww, wh = self.weights
        rx, ry, rw, rh = self._centre(ref)
        bx, by, bw, bh = self._centre(boxes)
        rw, rh = rw.clamp(min=1e-3), rh.clamp(min=1e-3)
        return torch.stack([wx * (bx - rx) / rw, wy * (by - ry) / rh,
                            ww * torch.log(bw.clamp(min=1e-3) / rw), wh * torch.log(bh.clamp(min=1e-3) / rh)], dim=1)

    def decode(self, ref: Tensor, deltas: Tensor) -> Tensor:
        wx, wy, ww, wh = self.weights
        rx, ry, rw, rh = self._centre(ref.to(deltas.dtype))
        dx, dy = deltas[:, 0] / wx, deltas[:, 1] / wy
        dw = (deltas[:, 2] / ww).clamp(max=self.max_log_scale)
        dh = (deltas[:, 3] / wh).clamp(max=self.max_log_scale)
        cx, cy = rx + dx * rw, ry + dy * rh
        w, h = rw * torch.exp(dw), rh * torch.exp(dh)
        return torch.stack([cx - 0.5 * w, cy - 0.5 * h, cx + 0.5 * w, cy + 0.5 * h], dim=1)


def clip_boxes(boxes: Tensor, height: float | Tensor, width: float | Tensor) -> Tensor:
    """Boxes clipped to the image. The size may be 0-d tensors: the exported detector takes it as an input."""
    x = boxes[:, 0::2].clamp(min=0).clamp(max=width)
    y = boxes[:, 1::2].clamp(min=0).clamp(max=height)
    return torch.stack([x[:, 0], y[:, 0], x[:, 1], y[:, 1]], dim=1)
