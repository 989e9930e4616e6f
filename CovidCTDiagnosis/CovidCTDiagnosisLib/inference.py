"""Scoring prepared slices with DRENet: probabilities, the top-K regions and Grad-CAM.

Runs the whole batch in inference conditions: eval mode (deterministic), no autograd through
the backbone, channels-last memory, and true float32 on every device (`full_float32`: the
same probabilities on CPU and CUDA). Grad-CAM differentiates only the MLP head (see DRENet.gradcam).
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from .drenet import DRENet
from .errors import DeviceError

DEVICES = ("auto", "cpu", "cuda")
CPU_CHUNK = 16  # slices per forward pass on the CPU (memory stays under ~2 GB at 448 px)
CUDA_CHUNK = 64


def resolve_device(device: str = "auto") -> torch.device:
    if device not in DEVICES:
        raise DeviceError(f"unknown device {device!r}; choose one of {', '.join(DEVICES)}")
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise DeviceError("--device cuda was asked for, but no CUDA GPU is available to PyTorch")
    return torch.device(device)


@dataclass
class SliceScores:
    probabilities: np.ndarray  # (N, n classes)
    boxes: np.ndarray  # (N, K, 4) (x0, y0, x1, y1) in model-input pixels, best region first
    box_scores: np.ndarray  # (N, K) navigator confidence, softmax over the K regions
    cams: np.ndarray  # (N, S, S) Grad-CAM of the explained class in [0, 1], model-input pixels


def full_float32(device: torch.device):
    """A context in which CUDA convolutions compute in true float32, as on the CPU.

    Neither float16 autocast nor cuDNN's default TF32 (both keep a 10-bit mantissa): rounding
    the reference model's weights to float16 moved its probabilities by up to about 0.1, because
    layers whose BatchNorm variance became small on CT amplify rounding. Results must not depend
    on the device. The previous cuDNN settings come back on exit.
    """
    if device.type != "cuda":
        return nullcontext()
    cudnn = torch.backends.cudnn
    return cudnn.flags(enabled=cudnn.enabled, benchmark=cudnn.benchmark, deterministic=cudnn.deterministic, allow_tf32=False)


class SliceScorer:
    """Holds a model on a device; reusable across cases."""

    def __init__(self, model: DRENet, device: str = "auto"):
        self.device = resolve_device(device)
        self.model = model.eval().to(self.device, memory_format=torch.channels_last)
        self.chunk = CUDA_CHUNK if self.device.type == "cuda" else CPU_CHUNK

    @property
    def config(self):
        return self.model.config

    def score(self, images: np.ndarray, explain_class: int, with_cam: bool = True, lung_masks: np.ndarray | None = None) -> SliceScores:
        """images: (N, S, S) float32 in [0, 1]; Grad-CAM explains class index `explain_class`.

        lung_masks: (N, S, S) bool, each input's lung mask in model-input pixels
        (`preprocessing.crop_mask`): the regions are then chosen among the anchors over the
        lungs (`drenet.anchors_over_lungs`). None: among all anchors.
        """
        parts = [
            self._score_chunk(images[i : i + self.chunk], explain_class, with_cam, None if lung_masks is None else lung_masks[i : i + self.chunk])
            for i in range(0, len(images), self.chunk)
        ]
        return SliceScores(*(np.concatenate(arrays) for arrays in zip(*parts)))

    def _score_chunk(self, images: np.ndarray, explain_class: int, with_cam: bool, lung_masks: np.ndarray | None):
        size = images.shape[-1]
        x = torch.from_numpy(np.ascontiguousarray(images, dtype=np.float32)).to(self.device)
        x = x[:, None].expand(-1, 3, -1, -1).contiguous(memory_format=torch.channels_last)  # (B, 3, S, S)
        mask = None if lung_masks is None else torch.from_numpy(np.ascontiguousarray(lung_masks, dtype=bool)).to(self.device)
        with torch.no_grad(), full_float32(self.device):
            out = self.model(x, lung_mask=mask)
        probs = torch.softmax(out.logits.float(), 1)
        k = self.config.top_k
        box_scores = torch.softmax(out.region_scores[:, :k].float(), 1)
        if with_cam:
            cls = torch.full((x.shape[0],), explain_class, device=self.device, dtype=torch.long)
            cam = self.model.gradcam(out, cls)[:, None]  # (B, 1, h, w)
            cam = F.interpolate(cam, size=(size, size), mode="bilinear", align_corners=False)[:, 0]
        else:
            cam = torch.zeros((x.shape[0], size, size), device=self.device)
        return probs.cpu().numpy(), out.region_boxes[:, :k].float().cpu().numpy(), box_scores.cpu().numpy(), cam.float().cpu().numpy()
