"""Regions over the lungs (issue 10, item 3): a region over no lung is never a lesion region.

Crafted masks check the anchors' lung fraction and the fallback; a phantom CT scored by a network
whose navigator prefers dark cells (the zeroed background outside the lungs) checks that the
chosen regions are over the lungs anyway, and that without the mask they would not be.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from CovidCTDiagnosisLib.drenet import (
    MIN_ANCHOR_LUNG_FRACTION,
    DRENet,
    DRENetConfig,
    anchor_lung_fraction,
    anchors_over_lungs,
    make_anchors,
)
from CovidCTDiagnosisLib.inference import SliceScorer
from CovidCTDiagnosisLib.preparation import prepare_ct

SIZE = 128


def test_anchor_lung_fraction_counts_pixel_centres_and_the_part_beyond_the_image():
    anchors = torch.tensor([[0.0, 0.0, 16.0, 16.0], [-8.0, 0.0, 8.0, 16.0], [8.0, 8.0, 24.0, 24.0]])
    mask = torch.zeros(1, 32, 32, dtype=torch.bool)
    mask[0, :16, :8] = True  # left half of the first anchor
    fraction = anchor_lung_fraction(anchors, mask)[0]
    assert fraction.tolist() == pytest.approx([0.5, 0.5, 0.0])  # the second: half beyond the image, not lung
    brute = [mask[0, int(y0):int(y1), max(int(x0), 0):int(x1)].sum() / ((x1 - x0) * (y1 - y0)) for x0, y0, x1, y1 in anchors.tolist()]
    assert fraction.tolist() == pytest.approx([float(b) for b in brute])


def test_anchors_over_lungs_threshold_and_fallback():
    anchors = make_anchors(SIZE)
    mask = torch.zeros(2, SIZE, SIZE, dtype=torch.bool)
    mask[0, 16:112, 8:120] = True  # large lungs: many anchors qualify
    mask[1, 44:50, 44:50] = True  # a speck: no anchor reaches the threshold
    fraction = anchor_lung_fraction(anchors, mask)
    allowed = anchors_over_lungs(anchors, mask, count=3)
    assert torch.equal(allowed[0], fraction[0] >= MIN_ANCHOR_LUNG_FRACTION) and allowed[0].sum() > 3
    assert 0 < fraction[1].max() < MIN_ANCHOR_LUNG_FRACTION
    assert allowed[1].sum() >= 3  # the 3 with most lung, and all tied with the third (here: no lung at all)
    one = anchors_over_lungs(anchors, mask, count=1)[1]
    assert one.sum() == 1 and bool(one[fraction[1].argmax()])  # the one with the most lung
    assert anchors_over_lungs(anchors, torch.zeros(1, SIZE, SIZE, dtype=torch.bool), 3).all()  # no lung: all free


def test_select_regions_skips_the_best_anchor_outside_the_lungs():
    torch.manual_seed(0)
    net = DRENet(DRENetConfig(input_size=SIZE)).eval()
    scores = torch.rand(1, net.anchors.shape[0])
    allowed = torch.ones_like(scores, dtype=torch.bool)
    best = int(scores.argmax())
    allowed[0, best] = False
    assert best in net.select_regions(scores, 3)[0].tolist()
    chosen = net.select_regions(scores, 3, allowed)[0].tolist()
    assert best not in chosen and len(set(chosen)) == 3
    few = torch.zeros_like(allowed)
    few[0, :2] = True  # fewer allowed than asked: those first, then the best of the rest
    chosen = net.select_regions(scores, 3, few)[0].tolist()
    assert set(chosen[:2]) == {0, 1}


class DarknessBackbone(nn.Module):
    """Feature map = mean brightness of each 32-pixel cell, in every channel."""

    out_channels = 4

    def forward(self, x):
        return F.avg_pool2d(x[:, :1], 32).repeat(1, self.out_channels, 1, 1)


def dark_seeking_network(size: int) -> DRENet:
    """A navigator that scores an anchor higher the darker its cell: outside the lungs (zeroed) wins."""
    net = DRENet(DRENetConfig(input_size=size, dropout=0.0), backbone=DarknessBackbone())
    with torch.no_grad():
        for p in net.parameters():
            p.zero_()
        nav = net.navigator
        nav.down1.weight[:, 0, 1, 1] = -1.0
        nav.down1.bias.fill_(3.0)  # normalised brightness is in [-2.2, 2.7]: 3 - it stays positive
        nav.down2.weight[:, :, 1, 1] = 1.0 / nav.down2.in_channels
        nav.tidy1.weight.fill_(1.0 / nav.tidy1.in_channels)
        nav.tidy2.weight.fill_(1.0 / nav.tidy2.in_channels)
    return net.eval()


def test_phantom_regions_lie_over_the_lungs(phantom):
    """On every chosen phantom slice, every region is at least MIN_ANCHOR_LUNG_FRACTION lung; the
    dark-seeking navigator's best anchor (over no lung) is chosen without the mask and never with it."""
    net = dark_seeking_network(256)
    prepared = prepare_ct(phantom.image, 256, net.config.window_level, net.config.window_width)
    scorer = SliceScorer(net, "cpu")
    masks = prepared.masks
    assert masks.shape == prepared.inputs.shape and masks.dtype == bool
    assert (prepared.inputs[~masks] > 0.02).mean() < 0.05, "the input is zero outside its lung mask (edges interpolated)"
    with_mask = scorer.score(prepared.inputs, 0, with_cam=False, lung_masks=masks)
    without = scorer.score(prepared.inputs, 0, with_cam=False)
    anchors = net.anchors
    fraction = anchor_lung_fraction(anchors, torch.from_numpy(masks))  # (N, A)
    for n in range(len(masks)):
        index = {tuple(a): i for i, a in enumerate(anchors.tolist())}
        chosen = [index[tuple(b)] for b in with_mask.boxes[n].tolist()]
        free = [index[tuple(b)] for b in without.boxes[n].tolist()]
        assert fraction[n, chosen].min() >= MIN_ANCHOR_LUNG_FRACTION, f"slice {n}: a region over too little lung"
        x = torch.from_numpy(prepared.inputs[n : n + 1])[:, None].expand(-1, 3, -1, -1)
        with torch.no_grad():
            best = int(net(x).anchor_scores[0].argmax())
        assert fraction[n, best] < MIN_ANCHOR_LUNG_FRACTION and best in free and best not in chosen
