"""Region proposal network: two 1x1 convolutions shared by all levels, then ONE class-agnostic NMS.

The paper keeps the RPN minimal (no 3x3 conv tower): objectness and box regression straight off each
BiFPN level. Proposals of all levels compete in a single NMS, so the box head sees at most
`rpn_post_nms_topk` regions per image.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import box_iou, nms, remove_small_boxes

from minivlm.config import TEEConfig
from minivlm.vision.anchors import BoxCoder, clip_boxes, level_anchors


class RPNHead(nn.Module):
    def __init__(self, channels: int, num_anchors: int):
        super().__init__()
        self.objectness = nn.Conv2d(channels, num_anchors, kernel_size=1)
        self.box = nn.Conv2d(channels, 4 * num_anchors, kernel_size=1)
        for conv in (self.objectness, self.box):
            nn.init.normal_(conv.weight, std=0.01)
            nn.init.zeros_(conv.bias)

    def forward(self, feats: list[Tensor]) -> tuple[list[Tensor], list[Tensor]]:
        """Per level: objectness logits [B, H*W*A] and box deltas [B, H*W*A, 4], ordered (y, x, anchor)."""
        logits, deltas = [], []
        for f in feats:
            b, _, h, w = f.shape
            logits.append(self.objectness(f).permute(0, 2, 3, 1).reshape(b, -1))
            d = self.box(f).view(b, -1, 4, h, w).permute(0, 3, 4, 1, 2)
            deltas.append(d.reshape(b, -1, 4))
        return logits, deltas


class RPN(nn.Module):
    def __init__(self, cfg: TEEConfig):
        super().__init__()
        self.cfg = cfg
        self.head = RPNHead(cfg.fpn_channels, len(cfg.anchor_ratios))
        self.strides = [2**level for level in range(cfg.min_level, cfg.max_level + 1)]
        self.coder = BoxCoder()
        self._anchor_cache: dict[tuple, list[Tensor]] = {}

    def anchors(self, feats: list[Tensor]) -> list[Tensor]:
        key = tuple((f.shape[-2], f.shape[-1]) for f in feats) + (str(feats[0].device),)
        if key not in self._anchor_cache:
            self._anchor_cache[key] = [
                level_anchors(f.shape[-2], f.shape[-1], s, self.cfg.anchor_scale * s, self.cfg.anchor_ratios,
                              f.device) for f, s in zip(feats, self.strides)]
        return self._anchor_cache[key]

    def forward(self, feats: list[Tensor], image_hw: list[tuple[int, int]],
                gt_boxes: list[Tensor] | None = None) -> tuple[list[Tensor], dict[str, Tensor]]:
        """Returns proposals per image ([P, 4] canvas pixels, detached) and, given ground truth, the losses."""
        logits, deltas = self.head(feats)
        anchors = self.anchors(feats)
        proposals = self.propose(logits, deltas, anchors, image_hw)
        losses = {} if gt_boxes is None else self.loss(torch.cat(logits, 1), torch.cat(deltas, 1),
                                                         torch.cat(anchors, 0), gt_boxes)
        return proposals, losses

    @torch.no_grad()
    def propose(self, logits: list[Tensor], deltas: list[Tensor], anchors: list[Tensor],
                image_hw: list[tuple[int, int]]) -> list[Tensor]:
        cfg = self.cfg
        out = []
        for i, (h, w) in enumerate(image_hw):
            boxes, scores = [], []
            for lg, dl, an in zip(logits, deltas, anchors):
                k = min(cfg.rpn_pre_nms_topk, lg.shape[1])
                top, idx = lg[i].float().topk(k)
                boxes.append(self.coder.decode(an[idx], dl[i, idx].float()))
                scores.append(top)
            boxes = clip_boxes(torch.cat(boxes), h, w)
            scores = torch.cat(scores)
            keep = remove_small_boxes(boxes, cfg.rpn_min_size)
            boxes, scores = boxes[keep], scores[keep]
            keep = nms_top(boxes, scores, cfg.rpn_nms_iou, cfg.rpn_post_nms_topk)  # one NMS, all levels
            out.append(boxes[keep])
        return out

    def loss(self, logits: Tensor, deltas: Tensor, anchors: Tensor, gt_boxes: list[Tensor]) -> dict[str, Tensor]:
        """Objectness BCE over sampled anchors (IoU >= 0.7 or best for a ground-truth box: positive;
        < 0.3: negative) and smooth-L1 box deltas on the positives."""
        cfg = self.cfg
        labels, targets = [], []
        for gt in gt_boxes:
            lab = torch.full((anchors.shape[0],), -1.0, device=anchors.device)
            tgt = torch.zeros_like(anchors)
            if gt.numel() == 0:
                lab.zero_()
            else:
                iou = box_iou(gt.to(anchors), anchors)  # [G, N]
                best, match = iou.max(0)
                lab[best < cfg.rpn_bg_iou] = 0.0
                lab[best >= cfg.rpn_fg_iou] = 1.0
                per_gt = iou.max(1, keepdim=True).values
                lowq = ((iou == per_gt) & (per_gt > 0)).any(0)  # each object gets at least its best anchor
                lab[lowq] = 1.0
                tgt = self.coder.encode(anchors, gt.to(anchors)[match])
            labels.append(_subsample(lab, cfg.rpn_batch_per_image, 0.5))
            targets.append(tgt)
        labels, targets = torch.stack(labels), torch.stack(targets)
        sampled = labels >= 0
        pos = labels > 0
        n = sampled.sum().clamp(min=1)
        obj = F.binary_cross_entropy_with_logits(logits[sampled].float(), labels[sampled], reduction="sum") / n
        box = F.smooth_l1_loss(deltas[pos].float(), targets[pos], beta=1 / 9, reduction="sum") / n
        return {"rpn_obj": obj, "rpn_box": box}


def nms_top(boxes: Tensor, scores: Tensor, iou: float, k: int) -> Tensor:
    """The first `k` survivors of greedy NMS (indices, best first), without running NMS over every box.

    Greedy NMS decides about a box from the higher-scoring survivors alone, so NMS over the best-scoring
    m boxes keeps exactly the survivors that full NMS keeps among them. Once a prefix yields k survivors
    they are the answer; otherwise the prefix grows (up to all boxes). NMS is quadratic: on TEE-0's
    ~7,400 candidates at 600 px, full NMS took ~100 ms of a ~600 ms image, the first 4 x 300 ~ 3 ms."""
    if torch.jit.is_tracing():
        # A trace (the ONNX export) would freeze the loop's data-dependent exit. ONNX NonMaxSuppression asked
        # for k boxes stops at the k-th survivor, which bounds the work the same way.
        return _FirstSurvivors.apply(boxes, scores, iou, k)
    order = torch.sort(scores, descending=True, stable=True).indices
    n = order.numel()
    m = min(n, 4 * k)
    while True:
        sel = order[:m]
        keep = nms(boxes[sel], scores[sel], iou)
        if keep.numel() >= k or m == n:
            return sel[keep[:k]]
        m = min(n, 4 * m)


class _FirstSurvivors(torch.autograd.Function):
    """`nms(boxes, scores, iou)[:k]`, exported as NonMaxSuppression with max_output_boxes_per_class = k.
    torchvision exports nms with no limit, so onnxruntime ran greedy NMS to the end of TEE-0's ~7,400
    proposals at 600 px: 73 of the detector graph's 257 ms (one thread)."""

    @staticmethod
    def forward(ctx, boxes: Tensor, scores: Tensor, iou: float, k: int) -> Tensor:
        return nms(boxes, scores, iou)[:k]

    @staticmethod
    def symbolic(g, boxes, scores, iou: float, k: int):
        def const(value, dtype):
            return g.op("Constant", value_t=torch.tensor(value, dtype=dtype))

        selected = g.op("NonMaxSuppression", g.op("Unsqueeze", boxes, const([0], torch.long)),
                        g.op("Unsqueeze", scores, const([0, 1], torch.long)), const([k], torch.long),
                        const([iou], torch.float))  # [n, 3]: (batch, class, box index), best first
        return g.op("Squeeze", g.op("Gather", selected, const([2], torch.long), axis_i=1), const([1], torch.long))


def _subsample(labels: Tensor, batch: int, pos_fraction: float) -> Tensor:
    """Keeps at most batch*pos_fraction positives (label 1) and fills the rest with negatives (label 0);
    everything else becomes -1 (ignored). Works for any label >= 1 as 'positive'."""
    pos = torch.where(labels >= 1)[0]
    neg = torch.where(labels == 0)[0]
    n_pos = min(pos.numel(), int(batch * pos_fraction))
    n_neg = min(neg.numel(), batch - n_pos)
    pos = pos[torch.randperm(pos.numel(), device=labels.device)[:n_pos]]
    neg = neg[torch.randperm(neg.numel(), device=labels.device)[:n_neg]]
    out = torch.full_like(labels, -1)
    out[pos] = labels[pos]
    out[neg] = 0
    return out
