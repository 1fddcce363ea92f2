"""Vision rows of `minivlm cost`: TEE-0..3 and R101-F, per component, beside Tables 4, 5 and 10.

Models are built on the meta device (no memory, no init cost) and counted by PyTorch's FLOP counter
through the same modules that run inference, so the table cannot drift from the code.
"""

from __future__ import annotations

import dataclasses

import torch

from minivlm.config import VG_NUM_ATTRIBUTES, VG_NUM_CLASSES, get_butd, get_tee
from minivlm.cost import CostRow, count_macs, count_params
from minivlm.vision.butd import BUTD
from minivlm.vision.tee import TEE

TEE_NAMES = ("tee0", "tee1", "tee2", "tee3")
NUM_PROPOSALS = 300  # TEE-0's box head at 3.74 M multiply-adds per region x 300 = the paper's 1.1 G
TEE0_COST_SIZE = 600  # the 600-px scale of Visual Genome detectors reproduces Table 5's 3.3 G
BUTD_COST_SIZE = (600, 800)  # (height, width)
META = torch.device("meta")


def tee_cost_rows(name: str, image_size: int | None = None, num_proposals: int = NUM_PROPOSALS) -> list[CostRow]:
    cfg = dataclasses.replace(get_tee(name), num_classes=VG_NUM_CLASSES, num_attributes=VG_NUM_ATTRIBUTES)
    if image_size:
        cfg.image_size = image_size
    with META:
        model = TEE(cfg)
        x = torch.zeros(1, 3, cfg.image_size, cfg.image_size)
        feats = model.features(x)
        rois = torch.zeros(num_proposals, model.roi_head.box_head.fc1.in_features)
        region = torch.zeros(num_proposals, cfg.region_dim)
        labels = torch.zeros(num_proposals, dtype=torch.long)
        head = model.roi_head
        g = {
            "backbone": count_macs(lambda: model.features(x)) / 1e9,
            "rpn": count_macs(lambda: model.rpn.head(feats)) / 1e9,
            "box_head": count_macs(lambda: head.box_head(rois)) / 1e9,
            "attribute_head": count_macs(lambda: head.attribute_head(region, labels)) / 1e9,
        }
    p = {
        "backbone": count_params(model.backbone, model.fpn) / 1e6,
        "rpn": count_params(model.rpn) / 1e6,
        "box_head": count_params(head.box_head) / 1e6,
        "attribute_head": count_params(head.attribute_head) / 1e6,
    }
    setting = f"{cfg.image_size}x{cfg.image_size}, {num_proposals} proposals"
    return _rows(cfg.name, p, g, cfg.paper, setting, {
        "backbone": "EfficientNet + BiFPN P2-P6", "rpn": "two 1x1 convs, all levels",
        "box_head": "2 FC + class + box refinement", "attribute_head": "training only, not in total"})


def butd_cost_rows(size: tuple[int, int] = BUTD_COST_SIZE, num_proposals: int | None = None) -> list[CostRow]:
    cfg = dataclasses.replace(get_butd("butd-r101"))
    n = num_proposals or cfg.num_proposals
    with META:
        model = BUTD(cfg)
        x = torch.zeros(1, 3, *size)
        feat = model.backbone(x)
        pooled = torch.zeros(n, 1024, cfg.roi_size, cfg.roi_size)
        region = torch.zeros(n, cfg.region_dim)
        labels = torch.zeros(n, dtype=torch.long)
        g = {
            "backbone": count_macs(lambda: model.backbone(x)) / 1e9,
            "rpn": count_macs(lambda: model.rpn(feat)) / 1e9,
            "box_head": count_macs(lambda: model.box_head(pooled)) / 1e9,
            "attribute_head": count_macs(lambda: model.attribute_head(region, labels)) / 1e9,
        }
    p = {
        "backbone": count_params(model.backbone) / 1e6,
        "rpn": count_params(model.rpn_conv, model.rpn_objectness, model.rpn_box) / 1e6,
        "box_head": count_params(model.res5, model.cls, model.bbox) / 1e6,
        "attribute_head": count_params(model.attribute_head) / 1e6,
    }
    per_roi = g["box_head"] / n
    setting = f"{size[0]}x{size[1]}, {n} proposals"
    return _rows(cfg.name, p, g, cfg.paper, setting, {
        "backbone": "ResNet-101 conv1-res4", "rpn": "3x3 conv 512 + two 1x1",
        "box_head": f"res5 stride 2 on 14x14 RoIs, {per_roi:.2f} G/RoI; paper's "
                    f"{cfg.paper.box_head_gflops} G would need {cfg.paper.box_head_gflops / per_roi:.0f} RoIs",
        "attribute_head": "training only, not in total"})


def _rows(model: str, p: dict, g: dict, paper, setting: str, notes: dict[str, str]) -> list[CostRow]:
    rows = []
    for comp in ("backbone", "rpn", "box_head", "attribute_head"):
        rows.append(CostRow(model, comp, p[comp], g[comp], getattr(paper, f"{comp}_params_m", None),
                            getattr(paper, f"{comp}_gflops", None), f"{setting}; {notes[comp]}"))
    parts = ("backbone", "rpn", "box_head")
    rows.append(CostRow(model, "total", sum(p[c] for c in parts), sum(g[c] for c in parts),
                        paper.total_params_m, paper.total_gflops, setting))
    return rows


def vision_cost_rows() -> list[CostRow]:
    rows = []
    for name in TEE_NAMES:
        rows += tee_cost_rows(name, TEE0_COST_SIZE if name == "tee0" else None)
    return rows + butd_cost_rows()
