"""EfficientDet's weighted bidirectional FPN (effdet's `BiFpn`), set to levels P2-P6.

TEE feeds the BiFPN four backbone maps (strides 4-32) instead of EfficientDet's three (8-32) and adds
P6 by down-sampling P5. effdet sizes every resampling step from `image_size`, so the model works on a
fixed square canvas; timm's symmetric padding and effdet's size rule both round up, so any canvas size
lines up (multiples of 64 need no rounding at all).
"""

from __future__ import annotations

import warnings

from torch import Tensor, nn

from minivlm.config import TEEConfig

with warnings.catch_warnings():  # effdet scripts a helper with the deprecated torch.jit at import
    warnings.simplefilter("ignore", FutureWarning)
    from effdet.config.model_config import default_detection_model_configs
    from effdet.efficientdet import BiFpn, FpnCombine


def effdet_config(cfg: TEEConfig):
    c = default_detection_model_configs()
    c.min_level, c.max_level = cfg.min_level, cfg.max_level
    c.num_levels = cfg.max_level - cfg.min_level + 1
    c.fpn_channels = cfg.fpn_channels
    c.fpn_cell_repeats = cfg.fpn_layers
    c.image_size = (cfg.image_size, cfg.image_size)
    c.pad_type = ""  # PyTorch-style symmetric padding (effdet's `efficientdet_dX`, not the TF port)
    c.redundant_bias = False
    # effdet keeps TF's BN momentum (0.99, i.e. PyTorch 0.01): running statistics then trail a detector
    # trained from scratch by hundreds of steps and eval-mode outputs lag far behind. PyTorch's 0.1 keeps up.
    c.norm_kwargs = dict(eps=1e-3, momentum=0.1)
    return c


class SummedCombine(FpnCombine):
    """effdet's fast normalised fusion, summed as it goes. effdet stacks the weighted inputs on a new last
    axis and sums over it, which exports as Unsqueeze + Concat + ReduceSum over a stride-C axis of 2-3
    (ReduceSum and Concat ~21 of onnxruntime's 182 ms for TEE-0 at 600 px, one thread). A running sum does
    the same additions in the same order, in elementwise ops: 182 -> 173 ms."""

    def forward(self, x: list[Tensor]) -> Tensor:
        if self.weight_method != "fastattn":
            return super().forward(x)
        weights = nn.functional.relu(self.edge_weights.to(dtype=x[0].dtype))
        total = weights.sum() + 0.0001
        out = None
        for i, (offset, resample) in enumerate(zip(self.inputs_offsets, self.resample.values())):
            term = resample(x[offset]) * weights[i] / total
            out = term if out is None else out + term
        return out


class BiFPN(nn.Module):
    def __init__(self, cfg: TEEConfig, backbone_channels: list[int]):
        super().__init__()
        feature_info = [dict(num_chs=c) for c in backbone_channels]  # effdet writes sizes into these
        self.fpn = BiFpn(effdet_config(cfg), feature_info)
        for module in self.fpn.modules():
            if type(module) is FpnCombine:
                module.__class__ = SummedCombine  # same parameters and state-dict keys
        self.strides = [2**level for level in range(cfg.min_level, cfg.max_level + 1)]

    def forward(self, feats: list[Tensor]) -> list[Tensor]:
        return self.fpn(list(feats))  # effdet appends to its input list
