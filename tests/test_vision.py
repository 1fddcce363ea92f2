"""TEE-X and R101-F: sizes against the paper, shapes, NMS, level assignment, coordinates, odd inputs."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import timm
import torch
from PIL import Image

from minivlm.config import get_tee
from minivlm.errors import DataFormatError
from minivlm.io import save_weights
from minivlm.vision.anchors import BoxCoder
from minivlm.vision.cost import butd_cost_rows, tee_cost_rows, vision_cost_rows
from minivlm.vision.roi_head import RoIHead, assign_levels, multilevel_roi_align
from minivlm.vision.rpn import RPN
from minivlm.vision.tee import TEE, letterbox, load_detector, pad_to_canvas, save_detector
from torchvision.ops import nms as torchvision_nms


def small_cfg(**kw):
    # TEE-0's architecture on a 128-px canvas keeps the tests fast.
    base = dict(image_size=128, rpn_pre_nms_topk=200, rpn_post_nms_topk=40, max_regions=10)
    return dataclasses.replace(get_tee("tee-demo"), **{**base, **kw})


def two_object_batch() -> dict:
    """A training batch of one random 120x100 image on a 128-px canvas with two objects, one with attributes."""
    t, sx, _ = letterbox(torch.rand(3, 100, 120), 128)
    return {
        "images": pad_to_canvas([t], 128), "image_hw": [tuple(t.shape[1:])],
        "targets": [{"boxes": torch.tensor([[10.0, 12.0, 60.0, 70.0], [50.0, 40.0, 110.0, 100.0]]) * sx,
                     "labels": torch.tensor([0, 5]), "attributes": torch.tensor([[1, 3], [-1, -1]])}],
    }


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return TEE(small_cfg()).eval()


def _close(value, paper, tol):
    return abs(value - paper) <= tol * paper


# ----------------------------------------------------------------------------------------------------
# Cost against Tables 4, 5 and 10
# ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["tee0", "tee1", "tee2", "tee3"])
def test_tee_params_match_paper(name):
    rows = tee_cost_rows(name)
    checked = 0
    for r in rows:
        if r.paper_params_m is not None:
            assert _close(r.params_m, r.paper_params_m, 0.03), r
            checked += 1
    assert checked >= 1
    total = next(r for r in rows if r.component == "total")
    parts = sum(r.params_m for r in rows if r.component in ("backbone", "rpn", "box_head"))
    assert total.params_m == pytest.approx(parts)


def test_tee0_flops_match_paper_at_stated_setting():
    rows = {r.component: r for r in tee_cost_rows("tee0", image_size=600, num_proposals=300)}
    for comp in ("backbone", "rpn", "box_head", "total"):
        assert _close(rows[comp].gflops, rows[comp].paper_gflops, 0.15), rows[comp]
    assert "600x600" in rows["total"].setting and "300" in rows["total"].setting
    # the box head scales with the proposal count, the backbone does not
    fewer = {r.component: r for r in tee_cost_rows("tee0", image_size=600, num_proposals=100)}
    assert fewer["box_head"].gflops == pytest.approx(rows["box_head"].gflops / 3, rel=1e-3)
    assert fewer["backbone"].gflops == pytest.approx(rows["backbone"].gflops)


def test_butd_params_and_flops():
    rows = {r.component: r for r in butd_cost_rows()}
    for comp in ("backbone", "rpn", "box_head", "total"):
        assert _close(rows[comp].params_m, rows[comp].paper_params_m, 0.03), rows[comp]
    for comp in ("backbone", "rpn"):
        assert _close(rows[comp].gflops, rows[comp].paper_gflops, 0.15), rows[comp]
    assert "600x800" in rows["total"].setting


def test_vision_cost_rows_cover_every_model_and_component():
    rows = vision_cost_rows()
    keys = {(r.model, r.component) for r in rows}
    for m in ("tee0", "tee1", "tee2", "tee3", "butd-r101"):
        for c in ("backbone", "rpn", "box_head", "attribute_head", "total"):
            assert (m, c) in keys
    tee0 = next(r for r in rows if r.model == "tee0" and r.component == "total")
    butd = next(r for r in rows if r.model == "butd-r101" and r.component == "total")
    assert tee0.gflops < 0.02 * butd.gflops  # the paper's headline: ~1% of R101-F's FLOPs


# ----------------------------------------------------------------------------------------------------
# Shapes
# ----------------------------------------------------------------------------------------------------


def test_pyramid_levels_and_strides(model):
    s = model.cfg.image_size
    feats = model.features(torch.zeros(2, 3, s, s))
    assert len(feats) == 5  # P2..P6
    for f, stride in zip(feats, (4, 8, 16, 32, 64)):
        assert tuple(f.shape) == (2, model.cfg.fpn_channels, s // stride, s // stride)


def test_roi_align_is_4x4_and_region_features_are_1024(model):
    s = model.cfg.image_size
    feats = model.features(torch.zeros(1, 3, s, s))
    boxes = [torch.tensor([[0.0, 0.0, 30.0, 30.0], [10.0, 10.0, 120.0, 100.0]])]
    pooled = model.roi_head.pool(feats, boxes)
    assert tuple(pooled.shape) == (2, model.cfg.fpn_channels, 4, 4)
    feat, cls, box = model.roi_head.box_head(pooled)
    assert tuple(feat.shape) == (2, 1024) and tuple(cls.shape) == (2, model.cfg.num_classes + 1)
    assert tuple(box.shape) == (2, 4)
    regions = model.extract([Image.new("RGB", (100, 80), (200, 30, 30))])[0]
    assert regions.features.shape[1] == 1024 and len(regions) <= model.cfg.max_regions
    assert torch.all(regions.scores[:-1] >= regions.scores[1:])  # sorted by score


def test_roi_align_reads_the_assigned_level():
    # Each level is a constant map equal to its level number: the pooled value tells which level was read.
    feats = [torch.full((1, 2, 64 // 2**lvl, 64 // 2**lvl), float(lvl)) for lvl in range(2, 7)]
    boxes = [torch.tensor([[0.0, 0.0, 20.0, 20.0], [0.0, 0.0, 60.0, 60.0]])]
    levels = torch.tensor([2, 5])
    out = multilevel_roi_align(feats, boxes, 2, levels, 4, 2)
    assert torch.allclose(out[0], torch.full_like(out[0], 2.0))
    assert torch.allclose(out[1], torch.full_like(out[1], 5.0))


def _onnx_run(fn, args: tuple, path) -> list[np.ndarray]:
    """fn traced and exported as the detector graph is (`minivlm.export._export`), run by onnxruntime."""
    import onnxruntime as ort

    from minivlm.export import _export

    class Wrap(torch.nn.Module):
        def forward(self, *a):
            return fn(*a)

    _export(Wrap(), args, path, [f"in{i}" for i in range(len(args))], ["out"], {})
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {f"in{i}": a.numpy() for i, a in enumerate(args)})


def test_traced_roi_align_pools_each_box_once_on_its_level_even_with_levels_empty(tmp_path):
    """The exported form visits every level (the trace cannot know which are present) but pools each box on
    its own: with only P2 and P4 boxes in the image, P3 and P5 pool nothing and the values are eager's."""
    torch.manual_seed(0)
    feats = [torch.randn(1, 3, 64 // 2**lvl, 64 // 2**lvl) for lvl in range(2, 6)]
    boxes = torch.tensor([[0.0, 0.0, 20.0, 20.0], [3.0, 5.0, 40.0, 30.0], [1.0, 2.0, 18.0, 9.0]])
    levels = torch.tensor([2, 4, 2])

    def pool(f2, f3, f4, f5, b, lv):
        return multilevel_roi_align([f2, f3, f4, f5], [b], 2, lv, 4, 2)

    args = (*feats, boxes, levels)
    (got,) = _onnx_run(pool, args, tmp_path / "roi.onnx")
    np.testing.assert_allclose(got, pool(*args).numpy(), atol=1e-6)
    for example_levels in (torch.tensor([3, 3, 3]), torch.tensor([5, 2, 4])):  # traced on other levels
        (again,) = _onnx_run(pool, (*feats, boxes, example_levels), tmp_path / "roi2.onnx")
        np.testing.assert_allclose(again, pool(*feats, boxes, example_levels).numpy(), atol=1e-6)


def test_traced_nms_stops_at_the_kth_survivor_and_keeps_the_same_boxes(tmp_path):
    """`nms_top` exports as NonMaxSuppression asked for k boxes (torchvision's export asks for all, and
    onnxruntime then ran NMS over every proposal): the same first k survivors, fewer when fewer survive."""
    import onnx

    from minivlm.vision.rpn import nms_top

    g = torch.Generator().manual_seed(0)
    xy = torch.rand(400, 2, generator=g) * 200
    boxes = torch.cat([xy, xy + 10 + torch.rand(400, 2, generator=g) * 60], 1)
    scores = torch.rand(400, generator=g)
    survivors = len(torchvision_nms(boxes, scores, 0.5))
    for k in (7, survivors + 50):
        (got,) = _onnx_run(lambda b, s: nms_top(b, s, 0.5, k), (boxes, scores), tmp_path / f"nms{k}.onnx")
        want = torchvision_nms(boxes, scores, 0.5)[:k].tolist()
        assert got.tolist() == nms_top(boxes, scores, 0.5, k).tolist() == want
        graph = onnx.load(str(tmp_path / f"nms{k}.onnx")).graph
        (node,) = [n for n in graph.node if n.op_type == "NonMaxSuppression"]
        limit = {n.output[0]: n for n in graph.node if n.op_type == "Constant"}[node.input[2]]
        assert onnx.numpy_helper.to_array(limit.attribute[0].t).tolist() == [k]


def test_bifpn_fusion_is_effdets_bit_for_bit():
    """`SummedCombine` (a running sum, which exports without Concat/ReduceSum) gives effdet's stacked sum."""
    import copy

    from effdet.efficientdet import FpnCombine

    from minivlm.vision.bifpn import SummedCombine

    torch.manual_seed(0)
    tee = TEE(small_cfg()).eval()
    fpn = tee.fpn
    combines = [m for m in fpn.modules() if isinstance(m, FpnCombine)]
    assert combines and all(type(m) is SummedCombine for m in combines)
    for m in combines:
        m.edge_weights.data.uniform_(0.0, 2.0)  # effdet starts them at 1: unequal weights show the order
    stock = copy.deepcopy(fpn)
    for m in stock.modules():
        if type(m) is SummedCombine:
            m.__class__ = FpnCombine
    with torch.no_grad():
        feats = tee.backbone(torch.randn(2, 3, 128, 128))
        for ours, theirs in zip(fpn(feats), stock(feats)):
            assert torch.equal(ours, theirs)


# ----------------------------------------------------------------------------------------------------
# Proposals, NMS and level assignment
# ----------------------------------------------------------------------------------------------------


def test_level_assignment_follows_fpn_equation_1():
    sides = torch.tensor([10.0, 56.0, 111.0, 112.0, 223.0, 224.0, 447.0, 448.0, 1000.0])
    boxes = torch.stack([torch.zeros_like(sides), torch.zeros_like(sides), sides, sides], dim=1)
    expect = [2, 2, 2, 3, 3, 4, 4, 5, 5]  # floor(4 + log2(side / 224)), clamped to P2..P5
    assert assign_levels(boxes, 2, 5).tolist() == expect
    assert assign_levels(boxes, 2, 6)[-1].item() == 6  # 1000 px: floor(4 + 2.16) = 6 when P6 is allowed
    rect = torch.tensor([[0.0, 0.0, 448.0, 112.0]])  # sqrt(wh) = 224
    assert assign_levels(rect).item() == 4


def test_rpn_nms_is_one_class_agnostic_pass_over_all_levels():
    cfg = small_cfg(rpn_pre_nms_topk=10, rpn_post_nms_topk=10)
    rpn = RPN(cfg)
    # Two levels, one anchor each, almost the same box: only one may survive a single NMS.
    anchors = [torch.tensor([[10.0, 10.0, 60.0, 60.0]]), torch.tensor([[12.0, 11.0, 61.0, 60.0]]),
               torch.tensor([[80.0, 80.0, 120.0, 120.0]])]
    logits = [torch.tensor([[2.0]]), torch.tensor([[3.0]]), torch.tensor([[1.0]])]
    deltas = [torch.zeros(1, 1, 4) for _ in anchors]
    props = rpn.propose(logits, deltas, anchors, [(128, 128)])[0]
    assert props.shape[0] == 2
    assert torch.allclose(props[0], anchors[1][0])  # the higher score wins, across levels


def test_region_label_code_appends_the_detectors_class_and_one_attribute_per_group():
    """With `region_label_code` each region feature ends in scale x one-hot(class) and, per attribute group,
    scale x one-hot(the group's best attribute); the dense part is the feature without it."""
    cfg = small_cfg(num_classes=3, num_attributes=5, attribute_groups=(0, 0, 1, 1, 1))
    torch.manual_seed(0)
    plain = TEE(cfg).eval()
    for p in plain.roi_head.parameters():  # visible score gaps
        p.data.normal_(0, 0.2) if p.dim() > 1 else None
    coded = TEE(dataclasses.replace(cfg, region_label_code=7.0)).eval()
    coded.load_state_dict(plain.state_dict())
    canvas = torch.rand(1, 3, 128, 128)
    with torch.no_grad():
        a, b = plain.detect(canvas, [(128, 128)])[0], coded.detect(canvas, [(128, 128)])[0]
        assert len(a["labels"]) > 0 and b["features"].shape[1] == coded.cfg.feature_dim == cfg.region_dim + 3 + 5
        assert torch.equal(a["features"], b["features"][:, : cfg.region_dim])
        code = b["features"][:, cfg.region_dim:] / 7.0
        assert torch.equal(code[:, :3].argmax(1), b["labels"]) and torch.all(code[:, :3].sum(1) == 1)
        assert torch.all(code[:, 3:5].sum(1) == 1) and torch.all(code[:, 5:].sum(1) == 1)  # one per group
        f = b["features"][:, : cfg.region_dim]
        logits = coded.roi_head.attribute_head(f, b["labels"] + 1)[:, 1:]
        assert torch.equal(code[:, 3:5].argmax(1), logits[:, :2].argmax(1))
        assert torch.equal(code[:, 5:].argmax(1), logits[:, 2:].argmax(1))


def test_heads_reading_the_pooled_roi_see_past_the_two_linear_layers():
    """`head_reads_pooled`: with the two linear layers zeroed (every region feature the same), the class and
    attribute logits still differ between RoIs; without it they cannot. Training reaches the skip weights."""
    cfg = small_cfg(num_classes=3, num_attributes=4, attribute_groups=(0, 0, 1, 1))
    feats = [torch.randn(1, cfg.fpn_channels, 128 // 2**lvl, 128 // 2**lvl) for lvl in range(2, 7)]
    rois = [torch.tensor([[10.0, 10.0, 60.0, 60.0], [70.0, 64.0, 120.0, 126.0]])]
    logits = {}
    for reads in (False, True):
        torch.manual_seed(0)
        head = RoIHead(dataclasses.replace(cfg, head_reads_pooled=reads))
        for p in head.parameters():
            p.data.normal_(0, 0.2) if p.dim() > 1 else None
        head.box_head.fc1.weight.data.zero_()
        head.box_head.fc2.weight.data.zero_()
        pooled = head.pool(feats, rois)
        feat, cls_logits, _ = head.box_head(pooled)
        assert torch.equal(feat[0], feat[1])
        attr = head.attribute_head(feat, torch.tensor([1, 1]), pooled if reads else None)
        logits[reads] = cls_logits, attr
    assert torch.equal(logits[False][0][0], logits[False][0][1]) and torch.equal(*logits[False][1])
    assert not torch.allclose(logits[True][0][0], logits[True][0][1])
    assert not torch.allclose(logits[True][1][0], logits[True][1][1])

    torch.manual_seed(0)
    m = TEE(small_cfg(head_reads_pooled=True, num_attributes=4, attribute_groups=(0, 0, 1, 1))).train()
    t, sx, _ = letterbox(torch.rand(3, 100, 120), 128)
    losses = m({"images": pad_to_canvas([t], 128), "image_hw": [tuple(t.shape[1:])],
                "targets": [{"boxes": torch.tensor([[10.0, 12.0, 60.0, 70.0]]) * sx, "labels": torch.tensor([2]),
                             "attributes": torch.tensor([[1, 3]])}]})
    losses["loss"].backward()
    assert m.roi_head.box_head.cls_from_pooled.weight.grad.abs().sum() > 0
    pooled_part = m.roi_head.attribute_head.hidden.weight.grad[:, cfg.region_dim + 256:]
    assert pooled_part.abs().sum() > 0


def test_attribute_pooled_norm_standardises_what_the_attribute_head_reads_of_the_roi():
    """`attribute_pooled_norm`: in training the attribute head reads each input of the flattened RoI
    standardised over the sampled RoIs, so one channel scaled by 10 (as box sizes sit beside backbone
    activations ten times their spread) leaves its logits as they were; without it they change. In eval
    the running statistics, which training moved, stand in."""
    cfg = small_cfg(num_classes=3, num_attributes=4, attribute_groups=(0, 0, 1, 1), head_reads_pooled=True)
    feats = [torch.randn(1, cfg.fpn_channels, 128 // 2**lvl, 128 // 2**lvl) for lvl in range(2, 7)]
    rois = [torch.tensor([[10.0, 10.0, 60.0, 60.0], [70.0, 64.0, 120.0, 126.0], [5.0, 70.0, 50.0, 120.0]])]
    region_feat, labels = torch.randn(3, cfg.region_dim), torch.tensor([1, 2, 3])
    for norm in (False, True):
        torch.manual_seed(0)
        head = RoIHead(dataclasses.replace(cfg, attribute_pooled_norm=norm)).train()
        pooled = head.pool(feats, rois)
        scaled = pooled.clone()
        scaled[:, 0] *= 10.0
        logits = [head.attribute_head(region_feat, labels, x) for x in (pooled, scaled)]
        assert torch.allclose(*logits, atol=1e-3) == norm  # BatchNorm's eps: equal to ~1e-4
    stats = head.attribute_head.pooled_norm
    assert stats.running_mean.abs().sum() > 0
    assert not torch.allclose(stats.running_var, torch.ones_like(stats.running_var))
    head.eval()
    assert not torch.allclose(head.attribute_head(region_feat, labels, pooled),
                              head.attribute_head(region_feat, labels, scaled), atol=1e-3)
    head.train()  # one foreground RoI in a training batch: BatchNorm would refuse it
    one = head.attribute_head(region_feat[:1], labels[:1], pooled[:1])
    assert torch.isfinite(one).all() and one.shape == (1, cfg.num_attributes + 1)


def test_final_region_nms_is_class_agnostic():
    cfg = small_cfg(num_classes=3, num_attributes=2)
    head = RoIHead(cfg).eval()
    feats = [torch.zeros(1, cfg.fpn_channels, 128 // 2**lvl, 128 // 2**lvl) for lvl in range(2, 7)]
    proposals = [torch.tensor([[10.0, 10.0, 60.0, 60.0], [12.0, 12.0, 62.0, 61.0], [90.0, 90.0, 120.0, 120.0]])]

    logits = torch.tensor([[0.0, 9.0, 0.0, 0.0], [0.0, 0.0, 8.0, 0.0], [0.0, 0.0, 0.0, 7.0]])

    def fake_box_head(pooled):
        return torch.zeros(pooled.shape[0], cfg.region_dim), logits, torch.zeros(pooled.shape[0], 4)

    head.box_head.forward = fake_box_head
    det = head.detect(feats, proposals, [(128, 128)], max_regions=10)[0]
    # The two overlapping boxes have different classes; a per-class NMS would keep both.
    assert det["labels"].tolist() == [0, 2]
    assert det["boxes"].shape == (2, 4)
    assert torch.all(det["scores"][:-1] >= det["scores"][1:])


def test_object_class_head_names_the_kept_regions_and_the_tags_and_codes_follow_it():
    """`object_class_head`: NMS, boxes and scores stay the class layer's; the class of each kept region, its
    class probabilities, its region code and the class the attribute head is told are the object head's."""
    cfg = small_cfg(num_classes=3, num_attributes=2, attribute_groups=(0, 0), region_label_code=5.0,
                    object_class_head=True)
    head = RoIHead(cfg).eval()
    feats = [torch.zeros(1, cfg.fpn_channels, 128 // 2**lvl, 128 // 2**lvl) for lvl in range(2, 7)]
    proposals = [torch.tensor([[10.0, 10.0, 40.0, 40.0], [60.0, 60.0, 90.0, 90.0], [95.0, 5.0, 125.0, 35.0]])]
    logits = torch.tensor([[0.0, 9.0, 0.0, 0.0], [0.0, 8.0, 0.0, 0.0], [0.0, 0.0, 7.0, 0.0]])
    head.box_head.forward = lambda pooled: (torch.zeros(pooled.shape[0], cfg.region_dim), logits,
                                            torch.zeros(pooled.shape[0], 4))
    objects = torch.tensor([[0.0, 0.0, 6.0], [5.0, 0.0, 0.0], [0.0, 4.0, 0.0]])  # per proposal, as pooled
    head.object_class.forward = lambda pooled: objects[: pooled.shape[0]]
    told = []
    attribute_forward = head.attribute_head.forward
    head.attribute_head.forward = lambda f, ids, p=None: told.append(ids.clone()) or attribute_forward(f, ids, p)
    det = head.detect(feats, proposals, [(128, 128)], max_regions=10)[0]
    assert det["scores"].tolist() == pytest.approx(logits.softmax(1)[:, 1:].max(1).values.tolist())
    assert det["labels"].tolist() == [2, 0, 1]  # the class layer said [0, 0, 1]
    assert torch.allclose(det["class_probs"], objects.softmax(1))
    code = det["features"][:, cfg.region_dim: cfg.region_dim + cfg.num_classes]
    assert code.argmax(1).tolist() == [2, 0, 1] and torch.all(code.sum(1) == cfg.region_label_code)
    assert told[0].tolist() == [3, 1, 2]  # 1-based


def test_object_class_head_trains_on_foreground_rois_inside_the_detector_loss():
    torch.manual_seed(0)
    with_head = TEE(small_cfg(object_class_head=True)).train()
    plain = TEE(small_cfg()).train()
    plain.load_state_dict(with_head.state_dict(), strict=False)
    batch = two_object_batch()
    torch.manual_seed(1)
    losses = with_head(batch)
    torch.manual_seed(1)
    without = plain(batch)
    assert "object_cls" not in without and losses["object_cls"].item() > 0
    assert losses["loss"].item() == pytest.approx(without["loss"].item() + losses["object_cls"].item(), rel=1e-5)
    losses["loss"].backward()
    assert with_head.roi_head.object_class.out.weight.grad.abs().sum() > 0
    assert with_head.roi_head.object_class.norm.running_mean.abs().sum() > 0


def test_box_coder_round_trip():
    coder = BoxCoder((10.0, 10.0, 5.0, 5.0))
    ref = torch.tensor([[0.0, 0.0, 10.0, 20.0], [5.0, 5.0, 50.0, 30.0]])
    boxes = torch.tensor([[1.0, 2.0, 12.0, 18.0], [0.0, 10.0, 40.0, 44.0]])
    assert torch.allclose(coder.decode(ref, coder.encode(ref, boxes)), boxes, atol=1e-4)
    # Faster R-CNN's parameterisation by hand: centre shift over the reference size, log size ratio, x weights
    want = torch.tensor([[10 * (6.5 - 5) / 10, 10 * (10 - 10) / 20, 5 * math.log(11 / 10), 5 * math.log(16 / 20)],
                         [10 * (20 - 27.5) / 45, 10 * (27 - 17.5) / 25, 5 * math.log(40 / 45), 5 * math.log(34 / 25)]])
    assert torch.allclose(coder.encode(ref, boxes), want, atol=1e-5)
    # a large predicted scale is capped (max_log_scale) instead of overflowing to inf
    huge = coder.decode(ref[:1], torch.tensor([[0.0, 0.0, 1e4, 1e4]]))
    assert torch.isfinite(huge).all()


# ----------------------------------------------------------------------------------------------------
# Images in, regions out
# ----------------------------------------------------------------------------------------------------


def test_letterbox_scales_and_boxes_map_back_to_original_pixels(model):
    t, scale, (w, h) = letterbox(torch.rand(3, 60, 256), 128)
    assert tuple(t.shape) == (3, 30, 128) and (w, h) == (256, 60)
    assert scale == pytest.approx(0.5)
    det = {"boxes": torch.tensor([[10.0, 5.0, 64.0, 30.0], [0.0, 0.0, 128.0, 40.0]]), "scores": torch.tensor([0.9, 0.5]),
           "labels": torch.tensor([1, 0]), "features": torch.zeros(2, 1024), "attributes": torch.tensor([0, 1])}
    r = model.to_regions(det, scale, (w, h))
    assert r.boxes[0].tolist() == pytest.approx([20.0, 10.0, 128.0, 60.0])
    assert r.boxes[1].tolist() == pytest.approx([0.0, 0.0, 256.0, 60.0])  # clipped to the original image
    assert r.tags == [model.class_names[1], model.class_names[0]]
    assert r.image_size == (256, 60)


def test_grayscale_rgba_and_odd_sizes_work(model):
    images = [Image.new("L", (97, 213), 128), Image.new("RGBA", (301, 17), (0, 255, 0, 100)),
              np.random.randint(0, 255, (33, 45, 3), dtype=np.uint8), torch.rand(1, 50, 7)]
    sizes = [(97, 213), (301, 17), (45, 33), (7, 50)]
    out = model.extract(images, batch_size=3)
    assert len(out) == 4
    for r, (w, h) in zip(out, sizes):
        assert r.image_size == (w, h)
        assert r.features.shape[1] == 1024 and len(r) == len(r.tags) == len(r.attribute_names)
        if len(r):
            assert float(r.boxes[:, 0::2].max()) <= w and float(r.boxes[:, 1::2].max()) <= h
            assert float(r.boxes.min()) >= 0.0


def test_canvas_size_is_checked(model):
    with pytest.raises(ValueError, match="canvas"):
        model.features(torch.zeros(1, 3, 96, 128))


def test_tiny_forward_backward_has_finite_losses():
    torch.manual_seed(0)
    m = TEE(small_cfg()).train()
    batch = two_object_batch()
    losses = m(batch)
    for key in ("loss", "rpn_obj", "rpn_box", "cls", "box", "attr"):
        assert torch.isfinite(losses[key]), key
    assert losses["loss"].item() > 0
    losses["loss"].backward()
    grads = [p.grad for p in m.parameters() if p.grad is not None]
    assert m.backbone.conv_stem.weight.grad is not None and m.roi_head.attribute_head.out.weight.grad is not None
    assert all(torch.isfinite(g).all() for g in grads)


def test_bf16_autocast_keeps_rpn_and_region_head_in_fp32():
    """Under bf16 autocast (a GPU's amp, or `cpu_amp`) only the backbone and BiFPN compute in bf16; box deltas, NMS,
    RoIAlign and the region head see fp32, and the losses stay near fp32's."""
    torch.manual_seed(0)
    m = TEE(small_cfg()).train()
    batch = two_object_batch()
    seen: dict[str, torch.dtype] = {}

    def record(name):
        def hook(module, inputs, output):
            seen.setdefault(name, output.dtype)
        return hook

    def record_input(module, inputs, output):
        seen.setdefault("rpn_in", inputs[0][0].dtype)

    m.backbone.conv_stem.register_forward_hook(record("stem"))
    m.rpn.register_forward_hook(record_input)
    linears = [mod for mod in m.roi_head.modules() if isinstance(mod, torch.nn.Linear)]
    for i, mod in enumerate(linears):
        mod.register_forward_hook(record(f"head{i}"))
    torch.manual_seed(1)
    ref = m(batch)
    seen.clear()
    torch.manual_seed(1)  # the same RoI sampling
    with torch.autocast("cpu", dtype=torch.bfloat16):
        amp = m(batch)
    assert seen["stem"] == torch.bfloat16
    assert seen["rpn_in"] == torch.float32
    ran = [seen[f"head{i}"] for i in range(len(linears)) if f"head{i}" in seen]
    assert ran and all(dtype == torch.float32 for dtype in ran)
    assert amp["loss"].dtype == torch.float32
    assert torch.isfinite(amp["loss"])
    assert 0 < abs(amp["loss"].item() - ref["loss"].item()) < 0.05 * ref["loss"].item()
    amp["loss"].backward()
    assert m.backbone.conv_stem.weight.grad.dtype == torch.float32


# ----------------------------------------------------------------------------------------------------
# Weights: local ImageNet backbone, detector folders
# ----------------------------------------------------------------------------------------------------


def test_backbone_loads_local_imagenet_weights(tmp_path):
    torch.manual_seed(1)
    classifier = timm.create_model("efficientnet_b0", pretrained=False, num_classes=1000)
    path = tmp_path / "effnet_b0.safetensors"
    save_weights(classifier.state_dict(), path)
    m = TEE(small_cfg(pretrained_backbone=str(path)))
    assert torch.equal(m.backbone.conv_stem.weight, classifier.conv_stem.weight)
    assert torch.equal(m.backbone.blocks[6][0].conv_pwl.weight, classifier.blocks[6][0].conv_pwl.weight)
    torch.save(classifier.state_dict(), tmp_path / "effnet_b0.pth")
    m2 = TEE(small_cfg(pretrained_backbone=str(tmp_path / "effnet_b0.pth")))
    assert torch.equal(m2.backbone.bn1.running_var, classifier.bn1.running_var)
    with pytest.raises(DataFormatError, match="not found"):
        TEE(small_cfg(pretrained_backbone=str(tmp_path / "missing.pth")))
    save_weights({"foo": torch.zeros(2)}, tmp_path / "bad.safetensors")
    with pytest.raises(DataFormatError, match="no key"):
        TEE(small_cfg(pretrained_backbone=str(tmp_path / "bad.safetensors")))


def test_detector_folder_round_trip(tmp_path, model):
    names = [f"thing{i}" for i in range(model.cfg.num_classes)]
    attrs = [f"attr{i}" for i in range(model.cfg.num_attributes)]
    m = TEE(model.cfg, names, attrs).eval()
    save_detector(m, tmp_path / "det")
    loaded = load_detector(tmp_path / "det")
    assert loaded.class_names == names and loaded.attribute_names == attrs
    assert loaded.cfg == m.cfg
    image = Image.new("RGB", (90, 70), (10, 200, 40))
    a, b = m.extract([image])[0], loaded.extract([image])[0]
    assert torch.allclose(a.features, b.features) and a.tags == b.tags
    (tmp_path / "det" / "config.json").write_text("{\"backbone\": 3")
    with pytest.raises(DataFormatError, match="config.json"):
        load_detector(tmp_path / "det")


def test_extract_goes_on_past_bad_images(tmp_path, model, capsys):
    from minivlm.cli import main
    from minivlm.data.feature_store import FeatureStore

    save_detector(model, tmp_path / "det")
    (tmp_path / "imgs").mkdir()
    Image.new("RGB", (90, 70), (10, 200, 40)).save(tmp_path / "imgs" / "a.png")
    (tmp_path / "imgs" / "b.jpg").write_bytes(b"\xff\xd8\xff\xe0 not a jpeg")
    Image.new("RGB", (50, 80), (200, 20, 40)).save(tmp_path / "imgs" / "c.png")
    rc = main(["extract", "--detector", str(tmp_path / "det"), "--images", str(tmp_path / "imgs"),
               "--out", str(tmp_path / "store")])
    errors = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
    assert rc == 1 and len(errors) == 1 and "b.jpg" in errors[0]
    assert sorted(FeatureStore(tmp_path / "store").keys()) == ["a.png", "c.png"]


def test_extract_under_torchrun_writes_every_image_once(tmp_path, model, torchrun):
    """Two CPU ranks (gloo) share the images: the store holds each exactly once, as one process would."""
    from minivlm.data.feature_store import FeatureStore

    save_detector(model, tmp_path / "det")
    (tmp_path / "imgs").mkdir()
    for i in range(5):
        Image.new("RGB", (60 + 10 * i, 50), (40 * i, 200, 40)).save(tmp_path / "imgs" / f"{i}.png")
    r = torchrun("extract", "--detector", tmp_path / "det", "--images", tmp_path / "imgs", "--out", tmp_path / "store")
    assert r.returncode == 0, r.stderr[-2000:]
    store = FeatureStore(tmp_path / "store")
    assert sorted(store.keys()) == [f"{i}.png" for i in range(5)]
    assert len(list((tmp_path / "store").glob("shard-r1-*"))) >= 1  # the second rank did its share
    alone = model.extract([Image.open(tmp_path / "imgs" / "3.png").convert("RGB")])[0]
    assert torch.allclose(store["3.png"].features.float(), alone.features, atol=1e-2)  # stored as float16


def test_extract_into_a_full_disk_fails_clearly_and_keeps_the_store(tmp_path, model):
    """A disk that fills up mid-run (simulated: RLIMIT_FSIZE, the per-process file size limit) stops
    `extract` with a one-line error; what the store held before is intact and opens as before."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    from minivlm.data.feature_store import FeatureStore

    save_detector(model, tmp_path / "det")
    (tmp_path / "imgs").mkdir()
    for i in range(3):
        Image.new("RGB", (60 + 10 * i, 50), (40 * i, 200, 40)).save(tmp_path / "imgs" / f"{i}.png")
    cmd = [sys.executable, "-c", "import resource, signal, sys; signal.signal(signal.SIGXFSZ, signal.SIG_IGN); "
           "limit = int(sys.argv[1]); limit and resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit)); "
           "from minivlm.cli import main; sys.exit(main(sys.argv[2:]))", "0", "extract", "--detector",
           str(tmp_path / "det"), "--images", str(tmp_path / "imgs"), "--out", str(tmp_path / "store"),
           "--shard-size", "2"]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    assert subprocess.run(cmd, env=env, capture_output=True).returncode == 0
    before = {p.name: p.read_bytes() for p in (tmp_path / "store").iterdir()}
    for i in range(3, 8):
        Image.new("RGB", (70, 40 + 5 * i), (200, 20 * i, 40)).save(tmp_path / "imgs" / f"{i}.png")
    cmd[3] = "200"  # no file may grow past 200 bytes: the next shard cannot be written
    r = subprocess.run(cmd, env=env, capture_output=True, text=True)
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert "minivlm extract: error: File too large" in r.stderr
    after = {p.name: p.read_bytes() for p in (tmp_path / "store").iterdir()}
    assert {k: after.get(k) for k in before} == before  # every file as it was, none half-written
    assert not [n for n in after if n.endswith(".tmp")]
    assert sorted(FeatureStore(tmp_path / "store").keys()) == ["0.png", "1.png", "2.png"]


def test_batch_norm_statistics_follow_training(model):
    # effdet's TF-style momentum (0.01) left eval-mode BiFPN statistics hundreds of steps behind a detector
    # trained from scratch (held-out mAP ~0 until the learning rate decayed); every BN must use 0.1.
    norms = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert len(norms) > 50
    assert all(m.momentum == pytest.approx(0.1) for m in norms)


def test_roi_image_pool_appends_the_pixels_under_each_box():
    cfg = dataclasses.replace(get_tee("tee-demo"), image_size=64, roi_image_pool=True)
    model = TEE(cfg).eval()
    canvas = torch.zeros(1, 3, 64, 64)
    canvas[0, 0, :32, :32], canvas[0, 2, 32:, 32:] = 1.0, -1.0  # R up top-left, B down bottom-right
    feats = model.features(canvas)
    boxes = [torch.tensor([[0.0, 0.0, 32.0, 32.0], [32.0, 32.0, 64.0, 64.0]])]
    pooled = model.roi_head.pool(feats, boxes, canvas)
    assert tuple(pooled.shape) == (2, cfg.fpn_channels + 3, 4, 4)
    pixels = pooled[:, -3:].mean((2, 3))  # per-box mean of (R, G, B) channels
    assert torch.allclose(pixels, torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.0, -1.0]]), atol=1e-6)
    assert model.roi_head.box_head.fc1.in_features == 16 * (cfg.fpn_channels + 3)
    with pytest.raises(ValueError, match="canvas"):
        model.roi_head.pool(feats, boxes)
    assert model.extract([Image.new("RGB", (100, 80), (200, 30, 30))])[0].features.shape[1] == 1024


def test_roi_texture_pool_tells_stripes_from_flat_and_their_direction():
    from minivlm.vision.box_pixels import TEXTURE_STRIDES

    cfg = dataclasses.replace(get_tee("tee-demo"), image_size=64, roi_texture_pool=True, roi_box_size=True)
    model = TEE(cfg).eval()
    canvas = torch.zeros(1, 3, 64, 64)
    canvas[0, :, :32, :32] = (torch.arange(32) % 2).float()  # vertical stripes (vary along x), top left
    canvas[0, :, 32:, 32:] = (torch.arange(32) % 2).float()[:, None]  # horizontal stripes, bottom right
    boxes = [torch.tensor([[4.0, 4.0, 28.0, 28.0], [36.0, 36.0, 60.0, 60.0], [36.0, 4.0, 60.0, 28.0]])]
    pooled = model.roi_head.pool(model.features(canvas), boxes, canvas)
    n = 5 * len(TEXTURE_STRIDES)
    assert tuple(pooled.shape) == (3, cfg.fpn_channels + n + 3, 4, 4)
    assert model.roi_head.box_head.fc1.in_features == 16 * (cfg.fpn_channels + n + 3)
    energy = pooled[:, cfg.fpn_channels:cfg.fpn_channels + 5].detach().mean((2, 3))  # stride 1: d/dx, d/dy, diagonals, Laplacian
    assert torch.allclose(energy[2], torch.zeros(5), atol=1e-6)  # the flat box: no response at all
    assert energy[0, 0] == pytest.approx(math.log1p(1 / 0.05) / 4) and energy[0, 1].abs() < 1e-6  # vertical stripes: d/dx
    assert energy[1, 1] == pytest.approx(math.log1p(1 / 0.05) / 4) and energy[1, 0].abs() < 1e-6  # horizontal: d/dy
    size = pooled[:, -3:, 0, 0]
    assert torch.allclose(size, torch.tensor([[24 / 64, 24 / 64, 24 / 64]] * 3))
    assert torch.equal(pooled[:, -3:], size[:, :, None, None].expand(-1, -1, 4, 4))
    with pytest.raises(ValueError, match="canvas"):
        model.roi_head.pool(model.features(canvas), boxes)


def test_roi_box_image_size_is_over_the_short_side_of_each_image():
    """Two images letterboxed into one 64-px canvas size, a wide one (64 x 32) and a square one: the same
    16-px box is half the wide image's short side and a quarter of the square one's."""
    cfg = dataclasses.replace(get_tee("tee-demo"), image_size=64, roi_box_size=True, roi_box_image_size=True)
    model = TEE(cfg).eval()
    canvas = torch.zeros(2, 3, 64, 64)
    boxes = [torch.tensor([[8.0, 8.0, 24.0, 24.0]]), torch.tensor([[8.0, 8.0, 24.0, 24.0], [0.0, 0.0, 64.0, 16.0]])]
    with torch.no_grad():
        pooled = model.roi_head.pool(model.features(canvas), boxes, canvas, [(32, 64), (64, 64)])
    assert model.roi_head.box_head.fc1.in_features == 16 * (cfg.fpn_channels + 6)
    image_size = pooled[:, -3:, 0, 0]
    torch.testing.assert_close(image_size, torch.tensor([[0.5, 0.5, 0.5], [0.25, 0.25, 0.25], [1.0, 0.25, 0.5]]))
    torch.testing.assert_close(pooled[:, -6:-3, 0, 0], torch.tensor([[0.25] * 3, [0.25] * 3, [1.0, 0.25, 0.5]]))
    with pytest.raises(ValueError, match="image_hw"):
        model.roi_head.pool(model.features(canvas), boxes, canvas)
    model.train()
    targets = [{"boxes": b, "labels": torch.zeros(len(b), dtype=torch.long)} for b in boxes]
    losses = model({"images": canvas, "image_hw": [(32, 64), (64, 64)], "targets": targets})
    assert torch.isfinite(losses["loss"])


@pytest.mark.parametrize("scale", [0.25, 0.0])
def test_attribute_backbone_scale_scales_only_the_backbones_share_of_the_attribute_gradient(scale):
    torch.manual_seed(0)
    base = small_cfg(image_size=64, num_classes=3, num_attributes=4, attribute_groups=(0, 0, 1, 1))
    targets = [{"boxes": torch.tensor([[4.0, 4.0, 30.0, 30.0], [30.0, 20.0, 60.0, 50.0]]),
                "labels": torch.tensor([0, 2]), "attributes": torch.tensor([[0, 2], [1, 3]])}]
    feats = [torch.randn(1, base.fpn_channels, 64 // 2**lvl, 64 // 2**lvl) for lvl in range(2, 7)]
    proposals = [torch.tensor([[2.0, 2.0, 28.0, 31.0], [29.0, 22.0, 58.0, 52.0], [0.0, 0.0, 20.0, 20.0]])]
    grads = {}
    for s in (1.0, scale):
        torch.manual_seed(0)  # the same weights both times
        head = RoIHead(dataclasses.replace(base, attribute_backbone_scale=s))
        leaf = [f.clone().requires_grad_(True) for f in feats]
        torch.manual_seed(1)  # the same RoI sample both times
        head.loss(leaf, proposals, targets)["attr"].backward()
        grads[s] = (leaf[0].grad.clone(), head.box_head.fc1.weight.grad.clone())
    assert grads[1.0][0].abs().sum() > 0
    assert torch.allclose(grads[scale][0], scale * grads[1.0][0], atol=1e-6)  # backbone: scaled
    assert torch.allclose(grads[scale][1], grads[1.0][1], atol=1e-6)  # the linear layers: the full weight
