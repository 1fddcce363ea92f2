"""TEE-X: the Two-stage Efficient feature Extractor (paper Sec. 3.1), image in, `Regions` out.

    image -> letterbox to a square canvas (longest side = image_size)
          -> EfficientNet-BX (strides 4-32) -> BiFPN (P2-P6)
          -> RPN (two 1x1 convs) -> one class-agnostic NMS -> <= rpn_post_nms_topk proposals
          -> RoIAlign 4x4 on the level of FPN eq. 1 -> Linear -> ReLU -> Linear -> ReLU: 1024-d features
          -> class / box / attribute heads -> top-K regions, boxes in original image pixels
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from PIL import Image
from torch import Tensor, nn

from minivlm import checkpoint
from minivlm.config import TEEConfig
from minivlm.data.images import image_to_tensor, load_image
from minivlm.errors import ImageError
from minivlm.regions import Regions
from minivlm.vision.backbone import build_backbone
from minivlm.vision.bifpn import BiFPN
from minivlm.vision.roi_head import RoIHead
from minivlm.vision.rpn import RPN

LOSS_KEYS = ("rpn_obj", "rpn_box", "cls", "box", "attr", "object_cls")  # object_cls: with object_class_head


# ----------------------------------------------------------------------------------------------------
# Images -> canvas
# ----------------------------------------------------------------------------------------------------


def to_pil(image: Any) -> Image.Image:
    """PIL images and paths pass through `load_image`; HxW / HxWxC arrays and CxHxW tensors (uint8, or
    float in 0..1) become PIL images first, so every input takes the same resize path."""
    if isinstance(image, (str, Path, Image.Image)):
        return load_image(image)
    if isinstance(image, Tensor):
        t = image.detach().cpu()
        image = (t if t.ndim == 2 else t.permute(1, 2, 0)).numpy()
    if not isinstance(image, np.ndarray):
        raise ImageError(f"unsupported image type {type(image).__name__}")
    a = image
    if a.dtype != np.uint8:
        a = np.clip(np.rint(a.astype(np.float64) * 255.0), 0, 255).astype(np.uint8)
    if a.ndim == 3 and a.shape[2] == 1:
        a = a[:, :, 0]
    if a.ndim not in (2, 3) or (a.ndim == 3 and a.shape[2] not in (3, 4)) or min(a.shape[:2]) < 1:
        raise ImageError(f"cannot read an image array of shape {tuple(image.shape)}")
    return load_image(Image.fromarray(a))


def letterbox(image: Any, size: int) -> tuple[Tensor, float, tuple[int, int]]:
    """The longest side resized to `size` and ImageNet-normalised (`minivlm.data.images`, the one place
    images become model input). Returns the resized image [3, h, w], the scale from original to canvas
    pixels, and the original (w, h)."""
    pil = to_pil(image)
    t, scale = image_to_tensor(pil, size, stride=1)
    return t, scale, pil.size


def pad_to_canvas(images: Sequence[Tensor], size: int) -> Tensor:
    """Stacks resized images into [B, 3, size, size], top-left aligned; padding is 0 (the mean colour)."""
    canvas = images[0].new_zeros(len(images), 3, size, size)
    for i, t in enumerate(images):
        canvas[i, :, : t.shape[1], : t.shape[2]] = t
    return canvas


# ----------------------------------------------------------------------------------------------------
# The model
# ----------------------------------------------------------------------------------------------------


class TEE(nn.Module):
    def __init__(self, cfg: TEEConfig, class_names: list[str] | None = None,
                 attribute_names: list[str] | None = None):
        super().__init__()
        self.cfg = cfg
        self.class_names = list(class_names) if class_names else [f"class{i}" for i in range(cfg.num_classes)]
        self.attribute_names = (list(attribute_names) if attribute_names
                                else [f"attribute{i}" for i in range(cfg.num_attributes)])
        if len(self.class_names) != cfg.num_classes or len(self.attribute_names) != cfg.num_attributes:
            raise ValueError(f"{len(self.class_names)} class / {len(self.attribute_names)} attribute names for a "
                             f"model with {cfg.num_classes} / {cfg.num_attributes}")
        self.backbone = build_backbone(cfg)
        self.fpn = BiFPN(cfg, self.backbone.feature_info.channels())
        self.rpn = RPN(cfg)
        self.roi_head = RoIHead(cfg)

    def features(self, canvas: Tensor) -> list[Tensor]:
        """Backbone + BiFPN: P2..P6 at strides 4..64."""
        s = self.cfg.image_size
        if canvas.shape[-2:] != (s, s):
            raise ValueError(f"TEE expects a {s}x{s} canvas (letterbox + pad_to_canvas), got {tuple(canvas.shape)}")
        return self.fpn(self.backbone(canvas))

    def forward(self, batch: dict) -> dict[str, Tensor]:
        """Training step: batch = {"images": [B,3,S,S], "image_hw": [(h, w)] resized sizes, "targets":
        [{"boxes": [G,4] canvas px, "labels": [G] 0-based, "attributes": [G,M] -1 padded}]}."""
        images = batch["images"]
        targets = [{k: v.to(images.device) for k, v in t.items()} for t in batch["targets"]]
        feats = self.features(images)
        # Under bf16 autocast (TrainConfig.cpu_amp / amp) only the backbone and BiFPN run in bf16: box deltas,
        # NMS, RoIAlign and the region head stay fp32 (bf16's 8-bit mantissa is a pixel at 256 px), as `--bf16`
        # splits the exported detector.
        with torch.autocast(images.device.type, enabled=False):
            feats = [f.float() for f in feats]
            proposals, losses = self.rpn(feats, batch["image_hw"], [t["boxes"] for t in targets])
            losses.update(self.roi_head.loss(feats, proposals, targets, images, batch["image_hw"]))
        losses["loss"] = sum(losses[k] for k in LOSS_KEYS if k in losses)
        return losses

    @torch.no_grad()
    def detect(self, canvas: Tensor, image_hw: list[tuple[int, int]], max_regions: int | None = None
               ) -> list[dict[str, Tensor]]:
        """Regions per image in canvas pixels: boxes, scores, labels, features, attributes, class_probs."""
        if canvas.device.type == "cpu" and canvas.shape[0] > 1:
            # On a CPU one image's early activations (150x150 at 600 px) fit in the cache, a batch's do not:
            # batch 8 ran ~2x slower per image than one by one. Eval-mode layers are per image: same result.
            feats = [torch.cat(level) for level in zip(*(self.features(c[None]) for c in canvas))]
        else:
            feats = self.features(canvas)
        return self.detect_from_features(feats, image_hw, max_regions, canvas)

    def detect_from_features(self, feats: list[Tensor], image_hw: list[tuple[int, int]],
                             max_regions: int | None = None, canvas: Tensor | None = None) -> list[dict[str, Tensor]]:
        """`detect` after the backbone + BiFPN: RPN, NMS, RoIAlign and the region head on P2..P6 (the canvas for
        region heads that pool the image's pixels)."""
        proposals, _ = self.rpn(feats, image_hw)
        return self.roi_head.detect(feats, proposals, image_hw, max_regions or self.cfg.max_regions, canvas)

    @torch.no_grad()
    def extract(self, images: Sequence[Any], batch_size: int = 8, max_regions: int | None = None) -> list[Regions]:
        """Images (PIL, arrays, tensors or paths) -> one `Regions` per image, boxes in original pixels."""
        was_training = self.training
        self.eval()
        device = next(self.parameters()).device
        out: list[Regions] = []
        for start in range(0, len(images), batch_size):
            chunk = [letterbox(im, self.cfg.image_size) for im in images[start:start + batch_size]]
            canvas = pad_to_canvas([c[0] for c in chunk], self.cfg.image_size).to(device)
            dets = self.detect(canvas, [tuple(c[0].shape[1:]) for c in chunk], max_regions)
            out += [self.to_regions(d, scale, size) for d, (_, scale, size) in zip(dets, chunk)]
        self.train(was_training)
        return out

    def to_regions(self, det: dict[str, Tensor], scale: float, size: tuple[int, int]) -> Regions:
        """Canvas detections -> `Regions` in original pixels (padding is bottom/right: no offset)."""
        w, h = size
        boxes = det["boxes"].float().cpu() / scale
        boxes[:, 0::2] = boxes[:, 0::2].clamp(0, w)
        boxes[:, 1::2] = boxes[:, 1::2].clamp(0, h)
        labels = det["labels"].cpu()
        attrs = det["attributes"].cpu() if self.attribute_names else None
        return Regions(boxes=boxes, features=det["features"].cpu(), scores=det["scores"].float().cpu(),
                       labels=labels, image_size=(w, h), tags=[self.class_names[i] for i in labels.tolist()],
                       attributes=attrs,
                       attribute_names=[self.attribute_names[i] for i in attrs.tolist()] if attrs is not None else [])


# ----------------------------------------------------------------------------------------------------
# Detector folders: a "detector" checkpoint (minivlm.checkpoint)
# ----------------------------------------------------------------------------------------------------


def save_detector(model: TEE, folder: str | Path) -> Path:
    spec = checkpoint.DetectorSpec(model.cfg, model.class_names, model.attribute_names)
    return checkpoint.write(folder, "detector", spec.to_json(), model.state_dict())


def load_detector(folder: str | Path, device: str | torch.device = "cpu") -> TEE:
    ckpt = checkpoint.read(folder, "detector")
    spec = ckpt.detector_spec()
    model = TEE(spec.tee, spec.class_names, spec.attribute_names)
    checkpoint.load_state_strict(model, ckpt.weights)
    # Channels-last convolutions run faster on the CPU, in inference as in training (oneDNN's native layout;
    # the demo's detector, 64 images, 2 threads: 18 -> 22 images/s, features equal to 3e-5). Weights are
    # saved contiguous as ever.
    return model.to(device, memory_format=torch.channels_last).eval()
