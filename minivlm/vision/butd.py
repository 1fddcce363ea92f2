"""R101-F: the ResNet-101 C4 Faster R-CNN of bottom-up attention, built for side-by-side cost and speed.

    ResNet-101 conv1-res4 (stride 16, 1024 ch) -> RPN (3x3 conv 512, 1x1 objectness 12, 1x1 box 48)
    -> top proposals after NMS -> RoIAlign 14x14 -> res5 (stride 2 -> 7x7) -> mean pool: 2048-d features
    -> class Linear(2048 -> 1601) + per-class boxes Linear(2048 -> 1601*4) (+ attribute head, training only)
Weights are random (never downloaded): the model exists to be counted and timed, not to detect.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import torchvision
from torch import Tensor, nn
from torchvision.ops import roi_align

from minivlm.config import BUTDConfig
from minivlm.vision.anchors import BoxCoder, clip_boxes, level_anchors
from minivlm.vision.roi_head import AttributeHead
from minivlm.vision.rpn import nms_top

STRIDE = 16
ANCHOR_SIZES = (64, 128, 256, 512)  # 4 scales x 3 ratios = 12 anchors at stride 16
ANCHOR_RATIOS = (0.5, 1.0, 2.0)


class BUTD(nn.Module):
    def __init__(self, cfg: BUTDConfig):
        super().__init__()
        self.cfg = cfg
        r = torchvision.models.resnet101(weights=None)
        self.backbone = nn.Sequential(r.conv1, r.bn1, r.relu, r.maxpool, r.layer1, r.layer2, r.layer3)
        self.rpn_conv = nn.Conv2d(1024, cfg.rpn_channels, 3, padding=1)
        self.rpn_objectness = nn.Conv2d(cfg.rpn_channels, cfg.num_anchors, 1)
        self.rpn_box = nn.Conv2d(cfg.rpn_channels, 4 * cfg.num_anchors, 1)
        self.res5 = r.layer4  # its first block has stride 2: 14x14 RoIs -> 7x7
        self.cls = nn.Linear(cfg.region_dim, cfg.num_classes + 1)
        self.bbox = nn.Linear(cfg.region_dim, 4 * (cfg.num_classes + 1))  # per-class boxes
        self.attribute_head = AttributeHead(cfg.region_dim, cfg.num_classes, cfg.num_attributes)
        self.coder = BoxCoder()

    def rpn(self, feat: Tensor) -> tuple[Tensor, Tensor]:
        h = F.relu(self.rpn_conv(feat))
        return self.rpn_objectness(h), self.rpn_box(h)

    def box_head(self, pooled: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        feat = self.res5(pooled).mean(dim=(2, 3))
        return feat, self.cls(feat), self.bbox(feat)

    @torch.no_grad()
    def forward(self, image: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """One normalised image [1, 3, H, W] -> (boxes [R, 4], region features [R, 2048], class scores)."""
        feat = self.backbone(image)
        logits, deltas = self.rpn(feat)
        h, w = feat.shape[-2:]
        anchors = torch.cat([level_anchors(h, w, STRIDE, s, (r,), feat.device)
                             for s in ANCHOR_SIZES for r in ANCHOR_RATIOS]).view(-1, h * w, 4)
        anchors = anchors.permute(1, 0, 2).reshape(-1, 4)  # (y, x, anchor) like the conv outputs
        scores = logits[0].permute(1, 2, 0).reshape(-1)
        deltas = deltas[0].view(-1, 4, h, w).permute(2, 3, 0, 1).reshape(-1, 4)
        top = scores.topk(min(6000, scores.numel())).indices
        boxes = clip_boxes(self.coder.decode(anchors[top], deltas[top]), *image.shape[-2:])
        boxes = boxes[nms_top(boxes, scores[top], 0.7, self.cfg.num_proposals)]  # as TEE's RPN
        rois = torch.cat([boxes.new_zeros(boxes.shape[0], 1), boxes], dim=1)
        pooled = roi_align(feat, rois, self.cfg.roi_size, spatial_scale=1.0 / STRIDE, sampling_ratio=2, aligned=True)
        region, cls_logits, _ = self.box_head(pooled)
        return boxes, region, cls_logits.softmax(1)
