"""Region head: FPN level assignment (Lin et al. eq. 1), RoIAlign 4x4, two linear layers to 1024-d
region features, and the class / box / attribute heads on top of them (with `object_class_head`, a second class
head that names the regions the class layer keeps)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import box_iou, roi_align

from minivlm.config import TEEConfig
from minivlm.vision.anchors import BoxCoder, clip_boxes
from minivlm.vision.box_pixels import (TEXTURE_STRIDES, BoxSilhouette, BoxSpectrum, grid_cells, grid_channels,
                                       texture_kernel, texture_roi_align)
from minivlm.vision.rpn import _subsample, nms_top

ROI_MAX_LEVEL = 5  # Lin et al. pool RoIs from P2-P5; P6 serves only the RPN's largest anchors


def assign_levels(boxes: Tensor, min_level: int = 2, max_level: int = ROI_MAX_LEVEL,
                  canonical_size: float = 224.0, canonical_level: int = 4) -> Tensor:
    """FPN eq. 1: k = floor(k0 + log2(sqrt(wh) / 224)), clamped to the available levels."""
    wh = (boxes[:, 2] - boxes[:, 0]).clamp(min=0) * (boxes[:, 3] - boxes[:, 1]).clamp(min=0)
    k = torch.floor(canonical_level + torch.log2(wh.sqrt().clamp(min=1e-6) / canonical_size))
    return k.clamp(min_level, max_level).long()


def batch_rois(boxes: list[Tensor]) -> Tensor:
    """Per-image boxes -> torchvision's [R, 5] RoIs (image index, x1, y1, x2, y2)."""
    return torch.cat([torch.cat([torch.full_like(b[:, :1], i), b], dim=1) for i, b in enumerate(boxes)])


def image_roi_align(canvas: Tensor, rois: Tensor, output_size: int, sampling_ratio: int) -> Tensor:
    """RoIAlign of the (normalised) image itself under each RoI ([R, 5], `batch_rois`): [R, 3, s, s]."""
    return roi_align(canvas, rois.to(canvas.dtype), output_size, spatial_scale=1.0, sampling_ratio=sampling_ratio,
                     aligned=True)


def box_size_cells(boxes: list[Tensor], over: float | Tensor, output_size: int) -> Tensor:
    """[R, 3, s, s]: each box's width, height and sqrt(area) over `over` (a length, or one per box: [R]),
    constant over the grid."""
    b = torch.cat(boxes)
    w, h = (b[:, 2] - b[:, 0]).clamp(min=0), (b[:, 3] - b[:, 1]).clamp(min=0)
    over = over[:, None] if isinstance(over, Tensor) else over
    size = torch.stack([w, h, (w * h).sqrt()], dim=1) / over
    return size[:, :, None, None].expand(-1, -1, output_size, output_size)


def box_image_size_cells(boxes: list[Tensor], image_hw: list[tuple], output_size: int) -> Tensor:
    """`box_size_cells` over the short side of each box's image (the resized image, not the square canvas it
    is padded into). (h, w) may be traced tensors."""
    short = torch.cat([b.new_ones(b.shape[0]) * torch.minimum(torch.as_tensor(h, dtype=b.dtype),
                                                              torch.as_tensor(w, dtype=b.dtype))
                       for b, (h, w) in zip(boxes, image_hw)])
    return box_size_cells(boxes, short, output_size)


def multilevel_roi_align(feats: list[Tensor], boxes: list[Tensor], min_level: int, levels: Tensor,
                         output_size: int, sampling_ratio: int) -> Tensor:
    """RoIAlign of each box on its own level. feats[i] is level min_level+i (stride 2**level);
    boxes are per image, canvas pixels; levels [R] for the concatenated boxes. Returns [R, C, s, s]."""
    rois = batch_rois(boxes)
    out = feats[0].new_zeros(rois.shape[0], feats[0].shape[1], output_size, output_size)
    # A trace (the ONNX export) would freeze the levels present in its example, so it visits every level;
    # a level without boxes pools none (NonZero and ScatterND in the graph). `index_put`, not `out[idx] = ...`:
    # traced where a level held exactly one box, the assignment exported a Reshape to that one box's shape,
    # and the graph failed on every image with no box on that level (the demo's model folder, 2026-12-07).
    present = range(min_level, min_level + len(feats)) if torch.jit.is_tracing() else levels.unique().tolist()
    for level in present:
        idx = torch.where(levels == level)[0]
        f = feats[level - min_level]
        out = out.index_put((idx,), roi_align(f, rois[idx].to(f.dtype), output_size, spatial_scale=1.0 / 2**level,
                                              sampling_ratio=sampling_ratio, aligned=True))
    return out


class Standardise(nn.BatchNorm1d):
    """Each input standardised over the batch in training, by the running statistics at inference: a
    BatchNorm without affine weights, written out at inference so its ONNX graph does not need the input's
    width as a static shape (a flattened RoI's is not). A training batch of one row (an image whose only
    foreground RoI is its one object) has no spread to standardise by: the running statistics stand in."""

    def __init__(self, dim: int):
        super().__init__(dim, affine=False)

    def forward(self, x: Tensor) -> Tensor:
        if self.training and x.shape[0] > 1:
            return super().forward(x)
        return (x - self.running_mean) * torch.rsqrt(self.running_var + self.eps)


class BoxHead(nn.Module):
    """Two linear layers on the flattened 4x4 RoI (16*C -> 1024 -> 1024) give the region feature; the
    class layer (num_classes + background) and a class-agnostic box refinement sit on it. With
    `reads_pooled` the class layer also reads the flattened RoI (`TEEConfig.head_reads_pooled`)."""

    def __init__(self, in_dim: int, region_dim: int, num_classes: int, reads_pooled: bool = False):
        super().__init__()
        self.fc1 = nn.Linear(in_dim, region_dim)
        self.fc2 = nn.Linear(region_dim, region_dim)
        self.cls = nn.Linear(region_dim, num_classes + 1)
        self.cls_from_pooled = nn.Linear(in_dim, num_classes + 1, bias=False) if reads_pooled else None
        self.box = nn.Linear(region_dim, 4)
        nn.init.normal_(self.cls.weight, std=0.01)
        nn.init.normal_(self.box.weight, std=0.001)
        nn.init.zeros_(self.cls.bias)
        nn.init.zeros_(self.box.bias)
        if self.cls_from_pooled is not None:
            nn.init.zeros_(self.cls_from_pooled.weight)

    def region_feature(self, pooled: Tensor) -> Tensor:
        return F.relu(self.fc2(F.relu(self.fc1(pooled.flatten(1)))))

    def forward(self, pooled: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        feat = self.region_feature(pooled)
        cls_logits = self.cls(feat)
        if self.cls_from_pooled is not None:
            cls_logits = cls_logits + self.cls_from_pooled(pooled.flatten(1))
        return feat, cls_logits, self.box(feat)


class AttributeHead(nn.Module):
    """Bottom-up attention's attribute head: the region feature concatenated with an embedding of the
    region's class (ground truth in training, predicted at inference) -> hidden -> attributes + "none".
    A training-time head: it shapes the region features and is not counted in the paper's totals. With
    `pooled_dim` it also reads the flattened RoI, and with `norm_pooled` (`TEEConfig.attribute_pooled_norm`)
    each of those inputs standardised over the sampled RoIs (running statistics at inference)."""

    def __init__(self, region_dim: int, num_classes: int, num_attributes: int, embed_dim: int = 256,
                 hidden_dim: int = 512, pooled_dim: int = 0, norm_pooled: bool = False):
        super().__init__()
        self.pooled_norm = Standardise(pooled_dim) if pooled_dim and norm_pooled else nn.Identity()
        self.embed = nn.Embedding(num_classes + 1, embed_dim)
        self.hidden = nn.Linear(region_dim + embed_dim + pooled_dim, hidden_dim)
        self.out = nn.Linear(hidden_dim, num_attributes + 1)

    def forward(self, feat: Tensor, class_ids: Tensor, pooled: Tensor | None = None) -> Tensor:
        """class_ids: 1-based (0 = background); `pooled`: the flattened RoI where the head reads it (pooled_dim
        > 0). Returns logits [R, num_attributes + 1], index 0 = none."""
        parts = [feat, self.embed(class_ids)] + ([self.pooled_norm(pooled.flatten(1))] if pooled is not None else [])
        return self.out(F.relu(self.hidden(torch.cat(parts, dim=1))))


class ObjectClassHead(nn.Module):
    """`TEEConfig.object_class_head`: the class of a region already taken for an object, from the flattened
    RoI standardised (as the attribute head's), through one hidden layer. Logits [R, num_classes], no
    background: the class layer decides what is an object and how sure, this head what it is."""

    def __init__(self, in_dim: int, num_classes: int, hidden_dim: int = 512):
        super().__init__()
        self.norm = Standardise(in_dim)
        self.hidden = nn.Linear(in_dim, hidden_dim)
        self.out = nn.Linear(hidden_dim, num_classes)

    def forward(self, pooled: Tensor) -> Tensor:
        return self.out(F.relu(self.hidden(self.norm(pooled.flatten(1)))))


class RoIHead(nn.Module):
    def __init__(self, cfg: TEEConfig):
        super().__init__()
        self.cfg = cfg
        self.roi_max_level = min(cfg.max_level, ROI_MAX_LEVEL)
        self.spectrum = BoxSpectrum() if cfg.roi_spectrum_pool else None
        self.silhouette = BoxSilhouette(side=cfg.roi_silhouette_side) if cfg.roi_silhouette else None
        # A plain tuple (the modules are registered above): the order `pool` appends their channels in.
        self.descriptors = tuple(m for m in (self.spectrum, self.silhouette) if m is not None)
        in_channels = (cfg.fpn_channels + (3 if cfg.roi_image_pool else 0)
                       + (5 * len(TEXTURE_STRIDES) if cfg.roi_texture_pool else 0)
                       + sum(grid_channels(m.dim, cfg.roi_size) for m in self.descriptors)
                       + (3 if cfg.roi_box_size else 0) + (3 if cfg.roi_box_image_size else 0))
        in_dim = cfg.roi_size**2 * in_channels
        self.box_head = BoxHead(in_dim, cfg.region_dim, cfg.num_classes, cfg.head_reads_pooled)
        self.register_buffer("texture_kernel", texture_kernel(), persistent=False)
        self.attribute_head = AttributeHead(cfg.region_dim, cfg.num_classes, cfg.num_attributes,
                                            pooled_dim=in_dim if cfg.head_reads_pooled else 0,
                                            norm_pooled=cfg.attribute_pooled_norm)
        self.object_class = ObjectClassHead(in_dim, cfg.num_classes) if cfg.object_class_head else None
        self.coder = BoxCoder((10.0, 10.0, 5.0, 5.0))

    def pool(self, feats: list[Tensor], boxes: list[Tensor], canvas: Tensor | None = None,
             image_hw: list[tuple] | None = None) -> Tensor:
        """[R, C, s, s] RoIAlign of each box on its level; with `roi_image_pool`, the canvas's pixels under
        the same grid are appended as 3 more channels, with `roi_texture_pool` its texture-energy maps (15),
        with `roi_spectrum_pool` the box's power-spectrum rings (3), with `roi_silhouette` the object's outline
        (9 at 12 x 12, 36 at 24 x 24), with `roi_box_size` the box's size over the canvas (3), with
        `roi_box_image_size` over its image's short side (3; `image_hw`: each image's resized (h, w))."""
        cfg = self.cfg
        levels = assign_levels(torch.cat(boxes), cfg.min_level, self.roi_max_level, cfg.canonical_box_size,
                               cfg.canonical_level)
        pooled = multilevel_roi_align(feats[: self.roi_max_level - cfg.min_level + 1], boxes, cfg.min_level, levels,
                                      cfg.roi_size, cfg.roi_sampling_ratio)
        extra = []
        if cfg.roi_image_pool or cfg.roi_texture_pool or cfg.roi_spectrum_pool or cfg.roi_silhouette:
            if canvas is None:
                raise ValueError("this TEE pools the image under each box (roi_image_pool / roi_texture_pool / "
                                 "roi_spectrum_pool / roi_silhouette): pass the canvas")
            rois = batch_rois(boxes)
            if cfg.roi_image_pool:
                extra.append(image_roi_align(canvas, rois, cfg.roi_size, cfg.roi_sampling_ratio))
            if cfg.roi_texture_pool:
                extra.append(texture_roi_align(canvas, rois, cfg.roi_size, cfg.roi_sampling_ratio, self.texture_kernel))
            extra += [grid_cells(m(canvas, rois), m.dim, cfg.roi_size) for m in self.descriptors]
        if cfg.roi_box_size:
            extra.append(box_size_cells(boxes, cfg.image_size, cfg.roi_size))
        if cfg.roi_box_image_size:
            if image_hw is None:
                raise ValueError("this TEE gives the head each box's size in its image (roi_box_image_size): "
                                 "pass image_hw")
            extra.append(box_image_size_cells(boxes, image_hw, cfg.roi_size))
        return torch.cat([pooled, *(e.to(pooled.dtype) for e in extra)], dim=1) if extra else pooled

    def loss(self, feats: list[Tensor], proposals: list[Tensor], targets: list[dict],
             canvas: Tensor | None = None, image_hw: list[tuple] | None = None) -> dict[str, Tensor]:
        """Samples RoIs (ground-truth boxes included; IoU >= roi_fg_iou foreground), then class CE,
        class-agnostic smooth-L1 box refinement and the attribute loss on foreground RoIs."""
        cfg = self.cfg
        rois, labels, box_tgt, attr_tgt = [], [], [], []
        for props, t in zip(proposals, targets):
            gt, gl = t["boxes"].to(props), t["labels"]
            cand = torch.cat([props, gt])
            if gt.numel():
                best, match = box_iou(cand, gt).max(1)
                lab = torch.where(best >= cfg.roi_fg_iou, gl[match] + 1, torch.zeros_like(match))
            else:
                match = torch.zeros(cand.shape[0], dtype=torch.long, device=cand.device)
                lab = match.clone()
            keep = _subsample(lab, cfg.roi_batch_per_image, cfg.roi_fg_fraction) >= 0
            cand, lab, match = cand[keep], lab[keep], match[keep]
            rois.append(cand)
            labels.append(lab)
            box_tgt.append(self.coder.encode(cand, gt[match]) if gt.numel() else torch.zeros_like(cand))
            attr_tgt.append(_attribute_targets(t.get("attributes"), match, lab > 0, cfg.num_attributes))
        labels, box_tgt, attr_tgt = torch.cat(labels), torch.cat(box_tgt), torch.cat(attr_tgt)
        pooled = self.pool(feats, rois, canvas, image_hw)
        feat, cls_logits, box_deltas = self.box_head(pooled)
        fg = labels > 0
        losses = {
            "cls": F.cross_entropy(cls_logits.float(), labels),
            "box": F.smooth_l1_loss(box_deltas[fg].float(), box_tgt[fg], beta=1.0, reduction="sum")
            / max(labels.numel(), 1),
        }
        if fg.any():
            attr_feat, attr_pooled = feat[fg], pooled[fg]
            if cfg.attribute_backbone_scale != 1.0:
                # The same features, but the attribute loss reaches the backbone scaled: the two linear
                # layers learn to keep attributes at full weight without the backbone trading detection away.
                s = cfg.attribute_backbone_scale
                attr_pooled = pooled[fg] * s + pooled[fg].detach() * (1 - s)
                attr_feat = self.box_head.region_feature(attr_pooled)
            attr_logits = self.attribute_head(attr_feat, labels[fg],
                                              attr_pooled if cfg.head_reads_pooled else None).float()
            losses["attr"] = cfg.attribute_loss_weight * attribute_loss(attr_logits, attr_tgt[fg], cfg.attribute_groups,
                                                                        cfg.attribute_group_weights)
            if self.object_class is not None:
                # The RoI as the attribute head reads it: the backbone gets this loss scaled as that one.
                losses["object_cls"] = F.cross_entropy(self.object_class(attr_pooled).float(), labels[fg] - 1)
        else:
            losses["attr"] = feat.sum() * 0.0
            if self.object_class is not None:
                losses["object_cls"] = feat.sum() * 0.0
        with torch.no_grad():
            hit = cls_logits.argmax(1) == labels
            losses["cls_acc"] = hit.float().mean()
            losses["fg_acc"] = hit[fg].float().mean() if fg.any() else hit.new_zeros((), dtype=torch.float)
        return losses

    def label_code(self, labels: Tensor, attr_logits: Tensor) -> Tensor:
        """[R, C + A]: `region_label_code` times a one-hot of each region's class and, per attribute group
        (one group when the attributes have none), a one-hot of its best attribute."""
        cfg = self.cfg
        groups = torch.tensor(cfg.attribute_groups or (0,) * cfg.num_attributes, device=labels.device)
        attrs = attr_logits.new_zeros(attr_logits.shape)
        for g in sorted(set(groups.tolist())):
            best = attr_logits.masked_fill(groups != g, float("-inf")).argmax(1)
            attrs = attrs + F.one_hot(best, cfg.num_attributes).to(attrs.dtype)
        return cfg.region_label_code * torch.cat([F.one_hot(labels, cfg.num_classes).to(attrs.dtype), attrs], 1)

    @torch.no_grad()
    def detect(self, feats: list[Tensor], proposals: list[Tensor], image_hw: list[tuple[int, int]],
               max_regions: int, canvas: Tensor | None = None) -> list[dict[str, Tensor]]:
        """Per image: the top `max_regions` regions after one class-agnostic NMS on refined boxes, sorted
        by score. Features come from the proposal each region was pooled from (as bottom-up attention)."""
        cfg = self.cfg
        counts = [p.shape[0] for p in proposals]
        if sum(counts) == 0:
            feat = feats[0].new_zeros(0, cfg.region_dim)
            cls_logits, deltas = feats[0].new_zeros(0, cfg.num_classes + 1), feats[0].new_zeros(0, 4)
        else:
            pooled = self.pool(feats, proposals, canvas, image_hw)
            feat, cls_logits, deltas = self.box_head(pooled)
        probs = cls_logits.float().softmax(1)[:, 1:]
        scores, labels = probs.max(1)
        out, start = [], 0
        for props, n, (h, w) in zip(proposals, counts, image_hw):
            sl = slice(start, start + n)
            start += n
            boxes = clip_boxes(self.coder.decode(props, deltas[sl].float()), h, w)
            sc = scores[sl]
            keep = torch.where(sc > cfg.region_score_thresh)[0]
            keep = keep[nms_top(boxes[keep], sc[keep], cfg.region_nms_iou, max_regions)]  # sorted by score
            # Attributes for the kept regions only (max_regions of up to rpn_post_nms_topk proposals).
            f, lab, class_probs = feat[sl][keep], labels[sl][keep], probs[sl][keep]
            roi = pooled[sl][keep] if f.shape[0] > 0 else None  # no `pooled` at all when no image has proposals
            if self.object_class is not None and roi is not None:
                class_probs = self.object_class(roi).float().softmax(1)
                lab = class_probs.argmax(1)
            named = cfg.num_attributes > 0 and roi is not None
            p = roi if cfg.head_reads_pooled and named else None
            attr_logits = (self.attribute_head(f, lab + 1, p)[:, 1:] if named
                           else f.new_zeros(f.shape[0], cfg.num_attributes))
            attrs = attr_logits.argmax(1) if named else torch.zeros_like(lab)
            f = f.float()
            if cfg.region_label_code:
                f = torch.cat([f, self.label_code(lab, attr_logits.float())], 1)
            out.append(dict(boxes=boxes[keep], scores=sc[keep], labels=lab, features=f, attributes=attrs,
                            class_probs=class_probs))
        return out


def attribute_loss(logits: Tensor, targets: Tensor, groups: tuple[int, ...] = (),
                   group_weights: tuple[float, ...] = ()) -> Tensor:
    """logits and soft targets [R, 1 + A] (index 0 = none). Without groups: one cross-entropy over all. With
    groups (one index per attribute): a cross-entropy per group over its attributes, for the regions whose
    object has an attribute of that group, summed over groups (each times `group_weights[g]`, default 1)."""
    if not groups:
        return F.cross_entropy(logits, targets)
    group = torch.tensor(groups, device=logits.device)
    total = logits.new_zeros(())
    for g in group.unique().tolist():
        cols = torch.nonzero(group == g).flatten() + 1
        t = targets[:, cols]
        has = t.sum(1) > 0
        if has.any():
            weight = group_weights[g] if g < len(group_weights) else 1.0
            total = total + weight * F.cross_entropy(logits[has][:, cols], t[has] / t[has].sum(1, keepdim=True))
    return total


def _attribute_targets(attributes: Tensor | None, match: Tensor, fg: Tensor, num_attributes: int) -> Tensor:
    """Soft targets over (none, attr_1..attr_n): uniform over the matched object's attributes, or all mass
    on "none" for objects without any. attributes: [G, M] 0-based ids, -1 padded."""
    tgt = torch.zeros(match.shape[0], num_attributes + 1, device=match.device)
    if attributes is None or attributes.numel() == 0:
        tgt[:, 0] = 1.0
        return tgt
    a = attributes.to(match.device)[match]  # [R, M]
    valid = a >= 0
    tgt.scatter_(1, (a + 1).clamp(min=0), valid.float())
    tgt[:, 0] = 0.0
    has = valid.any(1)
    tgt[~has, 0] = 1.0
    return tgt / tgt.sum(1, keepdim=True)
