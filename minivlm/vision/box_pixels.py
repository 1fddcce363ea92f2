"""Fixed (unlearnt) descriptors of the pixels under a box, for detectors whose learnt layers see too little of
them: the CPU demo's, trained for minutes at 256 px, whose RoIAlign 4x4 over P2's stride-4 features blurs
patterns and outlines away. All off for the paper's TEE-X (`TEEConfig.roi_texture_pool`, `roi_spectrum_pool`,
`roi_silhouette`); each joins the region head's RoI grid as more channels.

* texture-energy maps: local derivative magnitudes of the image's luminance at strides 1, 2 and 4, RoIAlign-ed
  on the head's 4x4 grid (`texture_roi_align`);
* the box's power spectrum (`BoxSpectrum`): the luminance under the box resampled to a P x P patch, its 2-D
  power spectrum summed in rings of frequency, and per ring the strength of its 2-, 4- and 8-fold angular
  harmonics. Frequencies are relative to the box, so a pattern that repeats a fixed number of times across
  its object gives the same rings at any size; the harmonics' magnitudes do not change when the object
  turns. Stripes put their power at one angle, checks and hatching at two (4-fold), solid objects little
  anywhere;
* the object's silhouette (`BoxSilhouette`): how far each pixel under the box is in colour from the box's
  border (the background around a boxed object), scaled to the box's largest distance, at 12 x 12.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import roi_align

TEXTURE_STRIDES = (1, 2, 4)
SPECTRUM_PATCH = 24  # pixels a side of the resampled box: ~5 samples per period of a pattern repeated 4.5 times
SPECTRUM_HARMONICS = (2, 4, 8)
SILHOUETTE_PATCH, SILHOUETTE_SIDE = 24, 12  # sampled at 24 x 24, averaged down to 12 x 12


def texture_kernel() -> Tensor:
    """[5, 1, 3, 3]: forward differences along x, y and both diagonals, and the 4-neighbour Laplacian."""
    k = torch.zeros(5, 1, 3, 3)
    for i, (dy, dx) in enumerate([(0, 1), (1, 0), (1, 1), (1, -1)]):
        k[i, 0, 1, 1], k[i, 0, 1 + dy, 1 + dx] = -1.0, 1.0
    k[4, 0] = torch.tensor([[0.0, 1.0, 0.0], [1.0, -4.0, 1.0], [0.0, 1.0, 0.0]])
    return k


def texture_roi_align(canvas: Tensor, rois: Tensor, output_size: int, sampling_ratio: int, kernel: Tensor) -> Tensor:
    """RoIAlign of fixed texture-energy maps under each box: log(1 + |filter response| / 0.05) / 4 of the
    image's luminance, at each of TEXTURE_STRIDES (the image average-pooled first). [R, 5 x strides, s, s].
    Zero where the image is flat and about 1 at its strongest edges, the range of the other inputs of the
    head: with log(0.05 + |r|) (-3 where flat) the detector trained to mAP@0.5 0.50 instead of 0.64-0.67.
    `rois`: torchvision's [R, 5] (image index, x1, y1, x2, y2), canvas pixels."""
    rois = rois.to(canvas.dtype)
    lum = canvas.mean(1, keepdim=True)
    out = []
    for stride in TEXTURE_STRIDES:
        x = F.avg_pool2d(lum, stride) if stride > 1 else lum
        energy = torch.log1p(F.conv2d(x, kernel.to(x.dtype), padding=1).abs() / 0.05) / 4
        out.append(roi_align(energy, rois, output_size, spatial_scale=1.0 / stride, sampling_ratio=sampling_ratio,
                             aligned=True))
    return torch.cat(out, dim=1)


class BoxSpectrum(nn.Module):
    """Rotation-invariant power-spectrum rings of the luminance under each box: [R, dim], dim = rings x (1 +
    harmonics), rings = patch / 2 - 1 (frequencies 1 .. patch/2 - 1 cycles per box; the Nyquist ring would not
    be symmetric under a quarter turn). Per ring: log(1 + power) / 8 (0 where flat, ~1 for strong stripes) and,
    for each harmonic k, |sum of power x e^(ik angle)| / (ring power + 0.01), in [0, 1) (the 0.01 keeps
    rounding noise in a flat box from reading as a pattern).

    Two fixed matrix products, so the ONNX graph computes what PyTorch does and both are cheap: the patch ->
    the real and imaginary parts of its DFT at the ring frequencies (the mean removed and a Hann window applied
    first, folded into the matrix; one of each pair of opposite frequencies, whose powers are equal for a real
    patch and whose angles differ by a half turn, which even harmonics do not see), then the powers -> each
    ring's sum and harmonics."""

    def __init__(self, patch: int = SPECTRUM_PATCH, harmonics: tuple[int, ...] = SPECTRUM_HARMONICS):
        super().__init__()
        assert all(k % 2 == 0 for k in harmonics), "odd harmonics would tell opposite frequencies apart"
        self.patch, self.harmonics = patch, harmonics
        self.rings = patch // 2 - 1
        freq = torch.fft.fftfreq(patch, dtype=torch.float64) * patch
        fy, fx = torch.meshgrid(freq, freq, indexing="ij")
        radius, angle = (fx**2 + fy**2).sqrt().round(), torch.atan2(fy, fx)
        keep = ((radius >= 1) & (radius <= self.rings) & ((fy > 0) | ((fy == 0) & (fx > 0)))).flatten()
        # DFT of the windowed, mean-removed patch: x -> D (w * (x - mean x)) = (D diag(w) - D w 1^T / n) x
        n = torch.arange(patch, dtype=torch.float64)
        wave = torch.exp(-2j * math.pi * n[:, None] * n[None] / patch)  # [frequency, pixel] along one axis
        dft = torch.einsum("ay,bx->abyx", wave, wave).reshape(patch * patch, patch * patch)[keep]
        window = torch.hann_window(patch, periodic=False, dtype=torch.float64)
        window = (window[:, None] * window[None]).flatten()
        lin = dft * window - (dft @ window.to(dft.dtype))[:, None] / window.numel()
        self.register_buffer("dft", torch.cat([lin.real, lin.imag]).T.float().contiguous(), persistent=False)
        cols, kept_angle = [], angle.flatten()[keep]
        for r in range(1, self.rings + 1):
            ring = (radius.flatten()[keep] == r).to(torch.float64)
            cols.append(ring)
            for k in harmonics:
                cols += [ring * torch.cos(k * kept_angle), ring * torch.sin(k * kept_angle)]
        self.register_buffer("ring_basis", 2 * torch.stack(cols, 1).float(), persistent=False)

    @property
    def dim(self) -> int:
        return self.rings * (1 + len(self.harmonics))

    def patches(self, canvas: Tensor, rois: Tensor) -> Tensor:
        """[R, P, P] luminance under each RoI ([R, 5]: image index, x1, y1, x2, y2), one bilinear sample per
        cell (texture probes on the demo world's boxes: 86.5% against 86.4% averaging every pixel of a cell, at a
        fraction of the cost)."""
        lum = canvas.mean(1, keepdim=True)
        return roi_align(lum, rois.to(lum.dtype), self.patch, spatial_scale=1.0, sampling_ratio=1,
                         aligned=True)[:, 0]

    def describe(self, patches: Tensor) -> Tensor:
        """[R, P, P] patches -> [R, dim] descriptors."""
        z = patches.flatten(1) @ self.dft.to(patches.dtype)
        half = z.shape[1] // 2
        power = z[:, :half] ** 2 + z[:, half:] ** 2
        sums = (power @ self.ring_basis.to(power.dtype)).view(-1, self.rings, 1 + 2 * len(self.harmonics))
        ring = sums[:, :, 0]
        cs = sums[:, :, 1:].reshape(-1, self.rings, len(self.harmonics), 2)
        # sqrt of a sum, not Tensor.norm: torch's vector norm over a short inner axis took ~40 ms a training step
        strength = (cs[..., 0] ** 2 + cs[..., 1] ** 2).sqrt() / (ring[:, :, None] + 1e-2)
        return torch.cat([torch.log1p(ring)[:, :, None] / 8, strength], dim=2).flatten(1)

    def forward(self, canvas: Tensor, rois: Tensor) -> Tensor:
        return self.describe(self.patches(canvas, rois))


def grid_cells(values: Tensor, dim: int, output_size: int) -> Tensor:
    """[R, dim] -> [R, c, s, s], zero-padded to whole channels: the head's first linear layer reads the
    flattened grid, so a per-box vector only needs a fixed place in it. `dim` is a Python int: a traced shape
    would be divided by ONNX's rules, which round -44 / 16 towards zero."""
    channels = grid_channels(dim, output_size)
    return F.pad(values, (0, channels * output_size**2 - dim)).view(-1, channels, output_size, output_size)


def grid_channels(dim: int, output_size: int) -> int:
    return -(-dim // (output_size * output_size))


class BoxSilhouette(nn.Module):
    """[R, side^2]: the colour distance of each cell under the box from the mean colour of the box's border,
    over the largest such distance in the box (0 where the pixels match the background, 1 at the object's
    most distinct colour). The background is what a detected box holds besides its object, and its border
    is mostly background, so the map is the object's outline at `side` x `side` (TEEConfig.roi_silhouette_side;
    the samples are averaged down from 24 x 24): at 12 x 12 on the demo world's ground-truth
    boxes a linear probe names the class from these 144 values 93% right (96% at 24 x 24, 85% at 8 x 8),
    where the detector's own class is ~87%."""

    def __init__(self, patch: int = SILHOUETTE_PATCH, side: int = SILHOUETTE_SIDE):
        super().__init__()
        if side < 1 or patch % side:
            raise ValueError(f"the silhouette's side must divide its {patch} samples (got {side})")
        self.patch, self.side = patch, side

    @property
    def dim(self) -> int:
        return self.side * self.side

    def forward(self, canvas: Tensor, rois: Tensor) -> Tensor:
        p = roi_align(canvas, rois.to(canvas.dtype), self.patch, spatial_scale=1.0, sampling_ratio=1, aligned=True)
        border = torch.cat([p[:, :, 0], p[:, :, -1], p[:, :, 1:-1, 0], p[:, :, 1:-1, -1]], dim=2).mean(2)
        distance = ((p - border[:, :, None, None]) ** 2).sum(1, keepdim=True).sqrt()
        distance = distance / (distance.amax(dim=(2, 3), keepdim=True) + 1e-3)
        return F.avg_pool2d(distance, self.patch // self.side).flatten(1)
