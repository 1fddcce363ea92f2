"""Fixed texture descriptors of the pixels under a box, for detectors whose learnt layers see too little of
them (the CPU demo's: trained for minutes at 256 px, RoIAlign 4x4 over P2's stride-4 features).

Two kinds, both off for the paper's TEE-X (`TEEConfig.roi_texture_pool`, `roi_spectrum_pool`):
* texture-energy maps: local derivative magnitudes of the image's luminance at strides 1, 2 and 4, RoIAlign-ed
  on the head's 4x4 grid (`texture_roi_align`);
* the box's power spectrum: the luminance under the box resampled to a P x P patch (anti-aliased), its 2-D
  power spectrum summed in rings of frequency, and per ring the strength of its 2-, 4- and 8-fold angular
  harmonics (`box_spectrum`). Frequencies are relative to the box, so a pattern that repeats a fixed number
  of times across its object gives the same rings at any size; the harmonics' magnitudes do not change when
  the object turns. Stripes put their power at one angle, checks and hatching at two (4-fold), solid objects
  little anywhere.
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

    Plain matrix products only (the DFT as cosine and sine matrices, the rings and harmonics as one fixed
    [patch^2, rings x (1 + 2 harmonics)] matrix), so the ONNX graph computes it exactly as PyTorch does."""

    def __init__(self, patch: int = SPECTRUM_PATCH, harmonics: tuple[int, ...] = SPECTRUM_HARMONICS):
        super().__init__()
        self.patch, self.harmonics = patch, harmonics
        n = torch.arange(patch, dtype=torch.float64)
        phase = 2 * math.pi * n[:, None] * n[None] / patch
        window = torch.hann_window(patch, periodic=False, dtype=torch.float64)
        freq = torch.fft.fftfreq(patch, dtype=torch.float64) * patch
        fy, fx = torch.meshgrid(freq, freq, indexing="ij")
        radius, angle = (fx**2 + fy**2).sqrt().round(), torch.atan2(fy, fx)
        self.rings = patch // 2 - 1
        cols = []
        for r in range(1, self.rings + 1):
            ring = (radius == r).to(torch.float64)
            cols.append(ring)
            for k in harmonics:
                cols += [ring * torch.cos(k * angle), ring * torch.sin(k * angle)]
        self.register_buffer("cos", torch.cos(phase).float(), persistent=False)
        self.register_buffer("sin", torch.sin(phase).float(), persistent=False)
        self.register_buffer("window", (window[:, None] * window[None]).float(), persistent=False)
        self.register_buffer("ring_basis", torch.stack([c.flatten() for c in cols], 1).float(), persistent=False)

    @property
    def dim(self) -> int:
        return self.rings * (1 + len(self.harmonics))

    def patches(self, canvas: Tensor, rois: Tensor) -> Tensor:
        """[R, P, P] luminance under each RoI ([R, 5]: image index, x1, y1, x2, y2), resampled with RoIAlign's adaptive sampling (every canvas pixel
        of a bin averaged, so a fine pattern is not aliased by a few sample points)."""
        lum = canvas.mean(1, keepdim=True)
        return roi_align(lum, rois.to(lum.dtype), self.patch, spatial_scale=1.0, sampling_ratio=0,
                         aligned=True)[:, 0]

    def describe(self, patches: Tensor) -> Tensor:
        """[R, P, P] patches -> [R, dim] descriptors."""
        x = (patches - patches.mean((1, 2), keepdim=True)) * self.window
        c, s = self.cos.to(x.dtype), self.sin.to(x.dtype)
        re = c @ x @ c - s @ x @ s
        im = c @ x @ s + s @ x @ c
        sums = ((re * re + im * im).flatten(1) @ self.ring_basis.to(x.dtype)).view(-1, self.rings,
                                                                                    1 + 2 * len(self.harmonics))
        power = sums[:, :, 0]
        strength = sums[:, :, 1:].view(-1, self.rings, len(self.harmonics), 2).norm(dim=3) / (power[:, :, None] + 1e-2)
        return torch.cat([torch.log1p(power)[:, :, None] / 8, strength], dim=2).flatten(1)

    def cells(self, canvas: Tensor, rois: Tensor, output_size: int) -> Tensor:
        """The descriptors laid out as [R, c, s, s] (zero-padded to whole channels), to join the head's RoI
        grid: its first linear layer reads the flattened grid, so the layout only has to be fixed."""
        d = self.describe(self.patches(canvas, rois))
        channels = self.channels(output_size)  # Python ints: a traced shape would be divided by ONNX's rules
        return F.pad(d, (0, channels * output_size**2 - self.dim)).view(-1, channels, output_size, output_size)

    def channels(self, output_size: int) -> int:
        return -(-self.dim // (output_size * output_size))
