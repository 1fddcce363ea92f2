"""EfficientNet-BX backbone from timm: four feature maps at strides 4, 8, 16, 32.

Never downloads: `pretrained=False` always, and ImageNet weights come only from a local state dict
(`TEEConfig.pretrained_backbone`). Without one the backbone trains from scratch.
"""

from __future__ import annotations

from pathlib import Path

import timm
import torch
from torch import nn

from minivlm.config import TEEConfig
from minivlm.errors import DataFormatError

OUT_INDICES = (1, 2, 3, 4)  # timm stages with reduction 4, 8, 16, 32


def build_backbone(cfg: TEEConfig) -> nn.Module:
    model = timm.create_model(cfg.backbone, pretrained=False, features_only=True, out_indices=OUT_INDICES)
    if cfg.pretrained_backbone:
        load_backbone_weights(model, cfg.pretrained_backbone)
    return model


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """A plain state dict from a .safetensors file or a torch checkpoint (tensors only, no pickled code);
    the common wrappers {"state_dict": ...} / {"model": ...} are unwrapped."""
    path = Path(path)
    if not path.is_file():
        raise DataFormatError(path, "backbone weights file not found")
    if path.suffix == ".safetensors":
        from minivlm.io import load_weights

        return load_weights(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise DataFormatError(path, f"not a readable PyTorch state dict ({err})") from None
    for key in ("state_dict", "model", "state_dict_ema"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
            break
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise DataFormatError(path, "expected a dict of parameter name -> tensor")
    return {k.removeprefix("module."): v for k, v in state.items()}


def load_backbone_weights(model: nn.Module, path: str | Path) -> tuple[list[str], list[str]]:
    """Loads an ImageNet classifier's weights into the features-only backbone. The classifier's head
    (conv_head, bn2, classifier) has no place here and is skipped. Returns (loaded, skipped) key lists."""
    state = read_state_dict(path)
    own = model.state_dict()
    loaded, skipped = [], []
    for key, value in state.items():
        if key not in own:
            skipped.append(key)
            continue
        if own[key].shape != value.shape:
            raise DataFormatError(path, f"{key}: shape {tuple(value.shape)} does not fit "
                                        f"{tuple(own[key].shape)} of timm {type(model).__name__}")
        loaded.append(key)
    if not loaded:
        raise DataFormatError(path, "no key matches the timm backbone (is it an EfficientNet state dict?)")
    model.load_state_dict({k: state[k] for k in loaded}, strict=False)
    missing = [k for k in own if k not in state]
    if missing:
        raise DataFormatError(path, f"backbone keys missing from the file: {', '.join(missing[:5])}"
                                    f"{' ...' if len(missing) > 5 else ''}")
    return loaded, skipped
