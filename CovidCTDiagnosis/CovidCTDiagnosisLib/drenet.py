"""DRENet (Song et al., IEEE/ACM TCBB 2021): a slice classifier that also says where it looked.

DRENet extends NTS-Net (Yang et al., ECCV 2018). One backbone is shared by four readings of a
slice:
1. the whole image -> last feature map (14x14 at 448 px) -> global feature and the backbone's
   own classifier;
2. a navigator on that (detached) feature map scores one square anchor per cell of the 14x14
   map (48 px, stride 32) and of a 7x7 map below it (96 px, stride 64); hard NMS keeps the
   top K regions, chosen only among the anchors over the lungs when the lung mask is given
   (`anchors_over_lungs`: a region over no lung is never a lesion region);
3. the K regions, cropped and resized to half the input size, each read by the backbone
   ("part" features, each with the shared part classifier);
4. the paper's "generated image": the input with the K regions kept, each weighted by its
   normalised navigator confidence, and everything else zeroed, read by the backbone.
The global, K part and generated features are concatenated into an MLP that gives the
image-level prediction.

Choices where the authors' released code departs from the paper, made explicit:
- the generated image is built as in the paper; the code's third anchor group (192 px on a 4x4
  map) and zoom branch are not;
- dropout is an `nn.Dropout` module, so evaluation is deterministic (NTS-Net built its dropout
  inside `forward`, which stayed active in eval mode);
- when BatchNorm trains, only the whole image updates its statistics; crops and the generated
  image are normalised with them (`batchnorm_statistics_frozen`), as they are at inference;
- crops are taken with RoIAlign (He et al., Mask R-CNN 2017; `roi_align` below, the semantics of
  torchvision.ops.roi_align with aligned=True) on the unpadded image; samples beyond the border
  read zero, which is what the released code's 224 px zero padding achieves, without
  materialising a padded copy of the batch. RoIAlign and NMS are written here because importing
  torchvision loads torch._dynamo, which doubled the start-up of `covidct analyze`; tests hold
  both to torchvision's results.
Anchor sizes and the part size scale with `input_size` (given here for 448 px, the paper's).
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from .backbones import FEATURE_STRIDE, build_backbone

PAPER_INPUT_SIZE = 448
ANCHOR_SIZES_AT_PAPER_INPUT = (48, 96)  # one square anchor per cell of the 1/32 and 1/64 maps
NAVIGATOR_STRIDES = (FEATURE_STRIDE, 2 * FEATURE_STRIDE)
NMS_IOU = 0.1  # the authors' threshold: regions barely overlap
ROI_SAMPLING_RATIO = 2  # bilinear samples per crop pixel along each axis
# An anchor is "over the lungs" when at least this fraction of its area is lung (of the model
# input's lung mask; the anchor's part beyond the image counts as not lung). Half: the region
# is mostly lung, yet one centred on a subpleural lesion, half lung and half chest wall, still counts.
MIN_ANCHOR_LUNG_FRACTION = 0.5
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
MLP_HIDDEN = 512


@dataclass(frozen=True)
class DRENetConfig:
    """Everything needed to rebuild a DRENet and to prepare its input; stored in every checkpoint."""

    backbone: str = "efficientnet_lite0"
    classes: tuple[str, ...] = ("COVID-19", "Non-COVID-19")
    positive_class: str = "COVID-19"  # the disease class: ranks slices, drives Noisy-OR
    input_size: int = PAPER_INPUT_SIZE
    top_k: int = 3
    navigator_channels: int = 128
    dropout: float = 0.5
    window_level: float = -700.0  # lung window in HU (the paper's)
    window_width: float = 1500.0
    extra: dict = field(default_factory=dict, compare=False)  # free-form provenance, not architecture

    def __post_init__(self):
        object.__setattr__(self, "classes", tuple(self.classes))
        if not 2 <= len(self.classes) <= 3:
            raise ValueError(f"DRENet needs 2 or 3 classes, got {list(self.classes)}")
        if self.positive_class not in self.classes:
            raise ValueError(f"positive class {self.positive_class!r} is not one of {list(self.classes)}")
        if self.input_size % (2 * FEATURE_STRIDE):
            raise ValueError(f"input_size must be a multiple of {2 * FEATURE_STRIDE}, got {self.input_size}")

    @property
    def part_size(self) -> int:
        return self.input_size // 2

    def to_dict(self) -> dict:
        d = asdict(self)
        d["classes"] = list(self.classes)
        return d


@dataclass
class DRENetOutput:
    logits: torch.Tensor  # (B, n) the image-level prediction (concatenated features -> MLP)
    global_logits: torch.Tensor  # (B, n) the backbone's own classifier
    part_logits: torch.Tensor  # (B, M, n) the part classifier on each selected region
    region_scores: torch.Tensor  # (B, M) navigator scores of the selected regions, best first
    region_boxes: torch.Tensor  # (B, M, 4) (x0, y0, x1, y1) in input pixels
    anchor_scores: torch.Tensor  # (B, A) navigator scores of all anchors
    feature_map: torch.Tensor  # (B, C, S/32, S/32) of the whole image
    part_features: torch.Tensor  # (B, K, C)
    generated_features: torch.Tensor  # (B, C)


def nms(boxes: torch.Tensor, scores: torch.Tensor, iou_threshold: float) -> torch.Tensor:
    """Greedy non-maximum suppression: indices of the kept (N, 4) x1, y1, x2, y2 boxes, by
    decreasing score (equal scores: the lower index first); a box is dropped when its IoU with a
    kept one exceeds `iou_threshold`."""
    order = scores.argsort(descending=True, stable=True)
    boxes = boxes[order]
    area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    lo = torch.maximum(boxes[:, None, :2], boxes[None, :, :2])
    hi = torch.minimum(boxes[:, None, 2:], boxes[None, :, 2:])
    inter = (hi - lo).clamp(min=0).prod(-1)
    overlaps = (inter / (area[:, None] + area[None, :] - inter) > iou_threshold).cpu()
    keep = []
    suppressed = torch.zeros(len(boxes), dtype=torch.bool)
    for i in range(len(boxes)):
        if not suppressed[i]:
            keep.append(i)
            suppressed |= overlaps[i]
    return order[torch.tensor(keep, dtype=torch.long, device=order.device)]


def roi_align(x: torch.Tensor, rois: torch.Tensor, output_size: int, sampling_ratio: int) -> torch.Tensor:
    """RoIAlign with pixel-centre alignment: (B, C, H, W) images and (R, 5) rois (batch index,
    x1, y1, x2, y2 in pixels) -> (R, C, S, S); each output bin is the mean of sampling_ratio^2
    bilinear samples; samples more than a pixel beyond the image read zero, nearer ones the edge."""
    h, w = x.shape[-2:]
    r = rois.shape[0]
    steps = (torch.arange(output_size * sampling_ratio, device=x.device, dtype=x.dtype) + 0.5) / (output_size * sampling_ratio)
    start, extent = rois[:, 1:3] - 0.5, rois[:, 3:5] - rois[:, 1:3]
    xs = start[:, 0:1] + steps[None] * extent[:, 0:1]  # (R, n) sample columns
    ys = start[:, 1:2] + steps[None] * extent[:, 1:2]  # (R, n) sample rows

    def corners(t: torch.Tensor, size: int):
        inside = (t >= -1.0) & (t <= size)
        t = t.clamp(min=0.0, max=size - 1)
        low = t.floor().long().clamp(max=size - 1)
        high = (low + 1).clamp(max=size - 1)
        frac = t - low.to(t.dtype)
        return low, high, frac, inside

    y0, y1, fy, iny = corners(ys, h)
    x0, x1, fx, inx = corners(xs, w)
    images = x[rois[:, 0].long()]  # (R, C, H, W)
    c = images.shape[1]

    def gather(rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
        flat = (rows[:, :, None] * w + cols[:, None, :]).reshape(r, 1, -1).expand(r, c, -1)
        return images.reshape(r, c, -1).gather(2, flat).reshape(r, c, rows.shape[1], cols.shape[1])

    fy, fx = fy[:, None, :, None], fx[:, None, None, :]
    samples = ((1 - fy) * (1 - fx) * gather(y0, x0) + (1 - fy) * fx * gather(y0, x1)
               + fy * (1 - fx) * gather(y1, x0) + fy * fx * gather(y1, x1))
    samples = samples * (iny[:, None, :, None] & inx[:, None, None, :]).to(x.dtype)
    return F.avg_pool2d(samples, sampling_ratio)


def make_anchors(input_size: int) -> torch.Tensor:
    """(A, 4) square anchors (x0, y0, x1, y1): one per cell, centred at stride/2 + k*stride."""
    scale = input_size / PAPER_INPUT_SIZE
    boxes = []
    for stride, size in zip(NAVIGATOR_STRIDES, ANCHOR_SIZES_AT_PAPER_INPUT):
        cells = -(-input_size // stride)  # ceil, as the stride-2 navigator conv gives
        centres = torch.arange(cells, dtype=torch.float32) * stride + stride / 2
        cy, cx = torch.meshgrid(centres, centres, indexing="ij")
        half = size * scale / 2
        boxes.append(torch.stack([cx - half, cy - half, cx + half, cy + half], -1).reshape(-1, 4))
    return torch.cat(boxes)


def anchor_lung_fraction(anchors: torch.Tensor, lung_mask: torch.Tensor) -> torch.Tensor:
    """(B, A) fraction of each anchor's area that is lung.

    anchors: (A, 4) (x0, y0, x1, y1) in input pixels (pixel edges: pixel i spans [i, i + 1));
    lung_mask: (B, S, S) bool or {0, 1}, the model input's lung mask (rows y, columns x). A pixel
    belongs to an anchor when its centre lies inside, as in `DRENet.generate_image`; the
    anchor's pixels beyond the image count in its area and are not lung.
    """
    _, h, w = lung_mask.shape
    integral = F.pad(lung_mask.float().cumsum(1).cumsum(2), (1, 0, 1, 0))  # (B, S+1, S+1): sum of mask[:y, :x]
    first = torch.ceil(anchors - 0.5)  # (A, 4): first pixel index with centre >= edge, per edge
    x0, y0, x1, y1 = first.unbind(1)
    area = ((x1 - x0) * (y1 - y0)).clamp_min(1)  # (A,) pixels whose centres lie inside, in or beyond the image
    cx0, cx1 = x0.clamp(0, w).long(), x1.clamp(0, w).long()
    cy0, cy1 = y0.clamp(0, h).long(), y1.clamp(0, h).long()
    lung = integral[:, cy1, cx1] - integral[:, cy0, cx1] - integral[:, cy1, cx0] + integral[:, cy0, cx0]  # (B, A)
    return lung / area


def anchors_over_lungs(anchors: torch.Tensor, lung_mask: torch.Tensor, count: int,
                       min_fraction: float = MIN_ANCHOR_LUNG_FRACTION) -> torch.Tensor:
    """(B, A) bool: the anchors regions may be chosen from.

    An anchor qualifies when at least `min_fraction` of its area is lung (`anchor_lung_fraction`).
    Fallback, where fewer than `count` anchors qualify (little lung in the image): the `count`
    anchors with the most lung (and any tied with the last of them) qualify. An image without
    lung (an all-zero mask) therefore leaves every anchor free, as without a mask.
    """
    fraction = anchor_lung_fraction(anchors, lung_mask)  # (B, A)
    kth = fraction.topk(min(count, fraction.shape[1]), dim=1).values[:, -1:]  # (B, 1) the count-th largest
    return fraction >= torch.minimum(kth, torch.full_like(kth, min_fraction))


@contextmanager
def batchnorm_statistics_frozen(module: nn.Module):
    """BatchNorm layers that are training use (and leave unchanged) their running statistics inside.

    When the backbone's BatchNorm trains, only whole images set its statistics: crops and the
    mostly-zero generated image are normalised with them, in training as in use. Otherwise their
    different statistics would be averaged into the running ones and every reading at inference
    (the whole image included) would be normalised with a mixture that training never used.
    """
    training = [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training]
    for m in training:
        m.eval()
    try:
        yield
    finally:
        for m in training:
            m.train()


class Navigator(nn.Module):
    """FPN-style region scorer: one score per anchor on the 1/32 map and on a 1/64 map below it."""

    def __init__(self, in_channels: int, channels: int):
        super().__init__()
        self.down1 = nn.Conv2d(in_channels, channels, 3, 1, 1)
        self.down2 = nn.Conv2d(channels, channels, 3, 2, 1)
        self.tidy1 = nn.Conv2d(channels, 1, 1)
        self.tidy2 = nn.Conv2d(channels, 1, 1)
        self.relu = nn.ReLU()

    def forward(self, fmap: torch.Tensor) -> torch.Tensor:
        d1 = self.relu(self.down1(fmap))  # (B, 128, S/32, S/32)
        d2 = self.relu(self.down2(d1))  # (B, 128, S/64, S/64)
        b = fmap.shape[0]
        return torch.cat([self.tidy1(d1).reshape(b, -1), self.tidy2(d2).reshape(b, -1)], 1)  # (B, A)


class DRENet(nn.Module):
    def __init__(self, config: DRENetConfig, pretrained_backbone: bool = False, backbone: nn.Module | None = None):
        """`backbone` overrides config.backbone with any module mapping (B, 3, S, S) to (B, out_channels, S/32, S/32)."""
        super().__init__()
        self.config = config
        n = len(config.classes)
        self.backbone = backbone if backbone is not None else build_backbone(config.backbone, pretrained_backbone)
        c = self.backbone.out_channels
        self.navigator = Navigator(c, config.navigator_channels)
        self.dropout = nn.Dropout(config.dropout)
        self.global_head = nn.Linear(c, n)  # the backbone's own classifier
        self.part_head = nn.Linear(c, n)  # shared by all regions
        self.concat_head = nn.Sequential(  # global + K parts + generated -> prediction
            nn.Linear((config.top_k + 2) * c, MLP_HIDDEN),
            nn.ReLU(),
            nn.Dropout(config.dropout),
            nn.Linear(MLP_HIDDEN, n),
        )
        self.register_buffer("anchors", make_anchors(config.input_size), persistent=False)
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Backbone feature map of images in [0, 1] (ImageNet normalisation applied here)."""
        return self.backbone((x - self.mean) / self.std)

    def select_regions(self, anchor_scores: torch.Tensor, count: int, allowed: torch.Tensor | None = None) -> torch.Tensor:
        """(B, count) anchor indices: hard NMS over the anchors, best first.

        anchor_scores: (B, A); allowed: optional (B, A) bool, the anchors each image's regions may
        come from (`anchors_over_lungs`); NMS then runs over those only. Where NMS keeps fewer
        than `count`, the best remaining allowed anchors top it up, then the best of the rest.
        """
        picks = []
        allowed = torch.ones_like(anchor_scores, dtype=torch.bool) if allowed is None else allowed.to(anchor_scores.device)
        for scores, ok in zip(anchor_scores.detach().float(), allowed):
            candidates = ok.nonzero().squeeze(1)
            keep = candidates[nms(self.anchors[candidates], scores[candidates], NMS_IOU)][:count]
            if keep.numel() < count:  # tiny inputs, few allowed anchors: top up, allowed ones first
                rest = scores.argsort(descending=True)
                rest = rest[(~ok[rest]).int().argsort(stable=True)]
                rest = rest[~torch.isin(rest, keep)]
                keep = torch.cat([keep, rest[: count - keep.numel()]])
            picks.append(keep)
        return torch.stack(picks)

    def crop_regions(self, x: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
        """(B, M, 4) boxes -> (B*M, 3, P, P) crops, bilinear; zero outside the image."""
        b, m, _ = boxes.shape
        rois = torch.cat([torch.arange(b, device=x.device, dtype=boxes.dtype).repeat_interleave(m)[:, None], boxes.reshape(-1, 4)], 1)
        return roi_align(x, rois.to(x.dtype), self.config.part_size, ROI_SAMPLING_RATIO)

    def generate_image(self, x: torch.Tensor, boxes: torch.Tensor, confidence: torch.Tensor) -> torch.Tensor:
        """The paper's generated image: the regions weighted by confidence (best = 1), the rest zero."""
        size = x.shape[-1]
        grid = torch.arange(size, device=x.device, dtype=x.dtype) + 0.5
        inside_x = (grid >= boxes[..., 0:1]) & (grid < boxes[..., 2:3])  # (B, K, S)
        inside_y = (grid >= boxes[..., 1:2]) & (grid < boxes[..., 3:4])
        inside = inside_y[..., :, None] & inside_x[..., None, :]  # (B, K, S, S)
        weight = confidence / confidence.amax(1, keepdim=True)  # (B, K)
        weight_map = (inside.to(x.dtype) * weight[..., None, None].to(x.dtype)).amax(1, keepdim=True)  # (B, 1, S, S)
        return x * weight_map

    def forward(self, x: torch.Tensor, proposals: int | None = None, lung_mask: torch.Tensor | None = None) -> DRENetOutput:
        """x: (B, 3, S, S) in [0, 1]. `proposals` >= K regions get part logits (for the ranking loss).

        lung_mask: optional (B, S, S) bool, the input's lung mask (`preprocessing.crop_mask`): the
        regions are then chosen among the anchors over the lungs (`anchors_over_lungs`); None
        chooses among all anchors.
        """
        k = self.config.top_k
        m = max(k, proposals or k)
        b = x.shape[0]
        fmap = self.features(x)  # (B, C, S/32, S/32)
        global_feat = fmap.mean((2, 3))  # (B, C)
        anchor_scores = self.navigator(fmap.detach())  # (B, A)
        allowed = None if lung_mask is None else anchors_over_lungs(self.anchors, lung_mask.to(x.device), m)
        idx = self.select_regions(anchor_scores, m, allowed)  # (B, M)
        boxes = self.anchors[idx]  # (B, M, 4)
        region_scores = anchor_scores.gather(1, idx)  # (B, M)
        with batchnorm_statistics_frozen(self.backbone):
            part_feat = self.features(self.crop_regions(x, boxes)).mean((2, 3)).reshape(b, m, -1)  # (B, M, C)
            confidence = torch.softmax(region_scores[:, :k].detach(), 1)  # (B, K)
            generated_feat = self.features(self.generate_image(x, boxes[:, :k], confidence)).mean((2, 3))  # (B, C)
        concat = torch.cat([global_feat, part_feat[:, :k].flatten(1), generated_feat], 1)  # (B, (K+2)C)
        return DRENetOutput(
            logits=self.concat_head(self.dropout(concat)),
            global_logits=self.global_head(self.dropout(global_feat)),
            part_logits=self.part_head(self.dropout(part_feat)),
            region_scores=region_scores,
            region_boxes=boxes,
            anchor_scores=anchor_scores,
            feature_map=fmap,
            part_features=part_feat[:, :k],
            generated_features=generated_feat,
        )

    def gradcam(self, out: DRENetOutput, class_index: torch.Tensor) -> torch.Tensor:
        """Grad-CAM of the image-level prediction on the whole image's feature map: (B, S/32, S/32) in [0, 1].

        Gradients flow only from the class score through the MLP head back to the feature map;
        the backbone is not differentiated, so this costs almost nothing after a forward pass.
        """
        fmap = out.feature_map.detach().float().requires_grad_(True)
        with torch.enable_grad():
            concat = torch.cat(
                [fmap.mean((2, 3)), out.part_features.detach().float().flatten(1), out.generated_features.detach().float()], 1
            )
            logits = self.concat_head.float()(concat)
            score = logits.gather(1, class_index.view(-1, 1)).sum()
            (grad,) = torch.autograd.grad(score, fmap)
        weights = grad.mean((2, 3), keepdim=True)  # (B, C, 1, 1)
        cam = F.relu((weights * fmap.detach()).sum(1))  # (B, h, w)
        peak = cam.flatten(1).amax(1).clamp_min(1e-12)
        return cam / peak[:, None, None]
