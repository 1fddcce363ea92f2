"""The fixed descriptors of the pixels under a box (minivlm/vision/box_pixels.py): the box spectrum's rings and
harmonics, the object's silhouette."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from minivlm.config import get_tee
from minivlm.vision.box_pixels import BoxSilhouette, BoxSpectrum
from minivlm.vision.tee import TEE

P = 24


def stripes(angle: float, period: float, size: int = P) -> torch.Tensor:
    yy, xx = torch.meshgrid(torch.arange(size, dtype=torch.float32), torch.arange(size, dtype=torch.float32),
                            indexing="ij")
    return ((xx * math.cos(angle) + yy * math.sin(angle)) % period < period / 2).float()


def split(d: torch.Tensor, spec: BoxSpectrum) -> tuple[torch.Tensor, torch.Tensor]:
    """[dim] -> ring power [rings], harmonic strengths [rings, harmonics]."""
    d = d.view(spec.rings, 1 + len(spec.harmonics))
    return d[:, 0], d[:, 1:]


def test_flat_patches_give_zero_and_quarter_turns_change_nothing():
    spec = BoxSpectrum()
    assert spec.dim == 11 * 4
    flat = torch.full((1, P, P), 0.7)
    torch.testing.assert_close(spec.describe(flat), torch.zeros(1, spec.dim), atol=1e-6, rtol=0)
    g = torch.Generator().manual_seed(0)
    patches = torch.stack([stripes(0.4, 6.0), torch.rand(P, P, generator=g), stripes(1.1, 4.0) * stripes(2.0, 5.0)])
    d = spec.describe(patches)
    for turned in (torch.rot90(patches, 1, (1, 2)), torch.rot90(patches, 2, (1, 2)), patches.transpose(1, 2)):
        torch.testing.assert_close(spec.describe(turned), d, atol=2e-4, rtol=1e-4)


def test_stripes_are_two_fold_and_checks_four_fold_at_their_frequency():
    spec = BoxSpectrum()
    n = torch.arange(P, dtype=torch.float32)
    checks = ((n[:, None] // 3 + n[None] // 3) % 2).float()  # period 6 pixels along both axes
    power_s, harm_s = split(spec.describe(stripes(0.3, 6.0)[None])[0], spec)
    power_c, harm_c = split(spec.describe(checks[None])[0], spec)
    ring_s = int(power_s.argmax())
    assert ring_s + 1 == 4  # 24 px / 6 px per period = 4 cycles across the box
    assert harm_s[ring_s, 0] > 0.9  # one orientation: all of the ring's power at one angle (and its opposite)
    ring_c = int(power_c.argmax())
    assert harm_c[ring_c, 1] > 0.9 and harm_c[ring_c, 0] < 0.1  # two orientations a quarter turn apart


def test_rings_are_relative_to_the_box():
    """The same pattern, four periods across its box, on a small and on a large box: the same strongest ring."""
    spec = BoxSpectrum()
    canvas = torch.zeros(1, 3, 200, 200)
    canvas[0, :, 10:50, 10:50] = stripes(0.0, 10.0, 40)  # 40 px box, period 10
    canvas[0, :, 60:180, 60:180] = stripes(0.0, 30.0, 120)  # 120 px box, period 30
    rois = torch.tensor([[0, 10.0, 10.0, 50.0, 50.0], [0, 60.0, 60.0, 180.0, 180.0]])
    power = spec.describe(spec.patches(canvas, rois)).view(2, spec.rings, -1)[:, :, 0]
    assert power.argmax(1).tolist() == [3, 3]


def test_the_region_head_reads_the_spectrum_as_three_more_channels():
    cfg = dataclasses.replace(get_tee("tee-demo"), image_size=64, roi_spectrum_pool=True)
    model = TEE(cfg).eval()
    canvas = torch.zeros(1, 3, 64, 64)
    canvas[0, :, :32, :32] = stripes(0.5, 4.0, 32)
    boxes = [torch.tensor([[0.0, 0.0, 32.0, 32.0], [32.0, 32.0, 64.0, 64.0]])]
    with torch.no_grad():
        pooled = model.roi_head.pool(model.features(canvas), boxes, canvas)
    assert tuple(pooled.shape) == (2, cfg.fpn_channels + 3, 4, 4)
    assert model.roi_head.box_head.fc1.in_features == 16 * (cfg.fpn_channels + 3)
    cells = pooled[:, cfg.fpn_channels:].flatten(1)
    assert cells[0, :44].abs().sum() > 1 and cells[1].abs().max() < 1e-5  # striped box / flat box
    assert torch.equal(cells[:, 44:], torch.zeros(2, 4))  # padding to whole channels


def test_the_silhouette_is_the_object_against_its_background():
    """A red disc on a grey, noisy background: ~1 inside the disc, ~0 at the corners, whatever the box's size."""
    sil = BoxSilhouette()
    noise = torch.randn(1, 3, 128, 128, generator=torch.Generator().manual_seed(0))
    canvas = torch.full((1, 3, 128, 128), 0.5) + 0.02 * noise
    yy, xx = torch.meshgrid(torch.arange(128.0), torch.arange(128.0), indexing="ij")
    for cx, r in [(32.0, 12.0), (88.0, 30.0)]:
        disc = (xx - cx) ** 2 + (yy - 64) ** 2 < r * r
        canvas[0, 0][disc], canvas[0, 1][disc], canvas[0, 2][disc] = 1.0, 0.0, 0.0
    rois = torch.tensor([[0, 32 - 14, 64 - 14, 32 + 14, 64 + 14], [0, 88 - 34, 64 - 34, 88 + 34, 64 + 34]])
    maps = sil(canvas, rois).view(2, 12, 12)
    assert sil.dim == 144
    assert (maps[:, 5:7, 5:7] > 0.9).all() and (maps[:, 0, 0] < 0.15).all()
    assert (maps[0] - maps[1]).abs().mean() < 0.1  # the same outline at 28 and 68 pixels


@pytest.mark.parametrize("side, channels", [(12, 9), (24, 36)])
def test_the_region_head_reads_the_silhouette_as_more_channels(side, channels):
    cfg = dataclasses.replace(get_tee("tee-demo"), image_size=64, roi_silhouette=True, roi_spectrum_pool=True,
                              roi_silhouette_side=side)
    model = TEE(cfg).eval()
    canvas = torch.zeros(1, 3, 64, 64)
    canvas[:, :, 8:24, 8:24] = 1.0  # a square in the first box
    boxes = [torch.tensor([[0.0, 0.0, 32.0, 32.0]])]
    with torch.no_grad():
        pooled = model.roi_head.pool(model.features(canvas), boxes, canvas)
        outline = model.roi_head.silhouette(canvas, torch.tensor([[0.0, 0.0, 0.0, 32.0, 32.0]]))
    assert tuple(pooled.shape) == (1, cfg.fpn_channels + 3 + channels, 4, 4)
    assert model.roi_head.box_head.fc1.in_features == 16 * (cfg.fpn_channels + 3 + channels)
    assert outline.shape == (1, side * side)
    grid = outline.view(side, side)  # the square fills the middle half of the box
    assert grid[side // 4 + 1:side // 2 - 1, side // 4 + 1:side // 2 - 1].min() > 0.9 and grid[-1, -1] < 0.1


def test_a_silhouette_side_that_does_not_divide_its_samples_is_refused():
    with pytest.raises(ValueError, match="must divide"):
        BoxSilhouette(side=10)
