"""Plain slice classifiers: the paper's baselines (ResNet50, DenseNet121, VGG16) and DRENet's own backbone.

A baseline is a backbone, global average pooling, dropout and one linear layer: the whole image,
no regions. Training and evaluation treat it like DRENet (same prepared images, augmentation,
split and metrics), so the comparison isolates what DRENet's regions add. Baselines are for the
comparison only (`covidct compare`); they do not draw lesion boxes, so `analyze` does not take them.
Their files are a separate format, `covidct-baseline`, so one can never be mistaken for a DRENet.
"""

from __future__ import annotations

import pickle
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from ..backbones import build_backbone
from ..checkpoint import torch_save_atomic
from ..drenet import IMAGENET_MEAN, IMAGENET_STD, DRENetConfig
from ..errors import ModelFileError

BASELINE_FORMAT = "covidct-baseline"
DROPOUT = 0.5


@dataclass(frozen=True)
class BaselineConfig:
    """What rebuilds a plain classifier and prepares its input (the window and size of DRENet's)."""

    backbone: str
    classes: tuple[str, ...]
    positive_class: str
    input_size: int
    window_level: float = DRENetConfig.window_level
    window_width: float = DRENetConfig.window_width

    def to_dict(self) -> dict:
        return {**asdict(self), "classes": list(self.classes)}


@dataclass
class ClassifierOutput:
    """The fields of DRENetOutput that training and evaluation read; a plain classifier has one head."""

    logits: torch.Tensor  # (B, n)

    @property
    def global_logits(self) -> torch.Tensor:
        return self.logits


class PlainClassifier(nn.Module):
    def __init__(self, config: BaselineConfig, pretrained_backbone: bool = False):
        super().__init__()
        self.config = config
        self.backbone = build_backbone(config.backbone, pretrained_backbone)
        self.dropout = nn.Dropout(DROPOUT)
        self.head = nn.Linear(self.backbone.out_channels, len(config.classes))
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    def forward(self, x: torch.Tensor, proposals: int | None = None, lung_mask: torch.Tensor | None = None) -> ClassifierOutput:
        """x: (B, 3, S, S) in [0, 1]; `proposals` and `lung_mask` (DRENet's region options) are accepted
        and unused, so the training loop can treat all models alike."""
        feat = self.backbone((x - self.mean) / self.std).mean((2, 3))  # (B, C)
        return ClassifierOutput(self.head(self.dropout(feat)))


def save_baseline(path, model: PlainClassifier, metadata: dict | None = None) -> Path:
    """Write the baseline file atomically."""
    payload = {
        "format": BASELINE_FORMAT,
        "config": model.config.to_dict(),
        "metadata": metadata or {},
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
    }
    return torch_save_atomic(payload, path)


def is_baseline_file(path) -> bool:
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, EOFError, ValueError, pickle.UnpicklingError):  # not a torch file: not a baseline either
        return False
    return isinstance(payload, dict) and payload.get("format") == BASELINE_FORMAT


def load_baseline(path) -> tuple[PlainClassifier, dict]:
    """A plain classifier from its file (eval mode) and the file's metadata."""
    payload = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(payload, dict) or payload.get("format") != BASELINE_FORMAT:
        raise ModelFileError(f"{path} is not a CovidCT baseline model file")
    config = BaselineConfig(**{**payload["config"], "classes": tuple(payload["config"]["classes"])})
    model = PlainClassifier(config)
    model.load_state_dict(payload["state_dict"])
    return model.eval(), payload["metadata"]
