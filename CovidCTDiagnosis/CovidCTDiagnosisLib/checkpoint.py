"""DRENet model files: one file holding the weights and the full configuration.

A checkpoint is a `torch.save`d dict: format tag, format version, the DRENetConfig, whether the
weights were trained, free-form training metadata, and the state dict (float16 allowed). Files
are loaded with `weights_only=True`, so a model file cannot run code.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path

import torch

from .bundled_model import DEFAULT_MODEL_FILE, MODELS_DIR, default_model_path
from .drenet import DRENet, DRENetConfig
from .errors import ModelFileError
from .performance import validated_performance
from .result import ModelInfo

CHECKPOINT_FORMAT = "covidct-drenet"
CHECKPOINT_VERSION = 1
UNTRAINED = "untrained"  # `--model untrained` or `untrained:resnet50`


def torch_save_atomic(payload, path) -> Path:
    """`torch.save` to a temporary file in the same folder, then rename: an interrupted save leaves the old file intact."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(fd)
    try:
        torch.save(payload, tmp)
        os.chmod(tmp, 0o644)  # mkstemp's 0600 would hide a shared model from other users
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def save_checkpoint(path, model: DRENet, *, trained: bool, metadata: dict | None = None, half: bool = False) -> Path:
    """Write the model file atomically. `half`: convolution and linear weights in float16; vectors
    (biases, BatchNorm statistics, whose small variances float16 would round coarsely) stay float32."""
    state = {k: (v.half() if half and v.is_floating_point() and v.dim() >= 2 else v).detach().cpu()
             for k, v in model.state_dict().items()}
    payload = {
        "format": CHECKPOINT_FORMAT,
        "version": CHECKPOINT_VERSION,
        "config": model.config.to_dict(),
        "trained": bool(trained),
        "metadata": metadata or {},
        "state_dict": state,
    }
    torch_save_atomic(payload, path)
    return path


def check_ensemble(configs, names, identities) -> None:
    """ModelFileError unless the models are distinct and agree on classes and input preparation: an
    ensemble feeds every member the same prepared slices and averages their probabilities class by
    class, and a model averaged with itself is that model, not an ensemble.

    identities: one key per member that is equal only for the same weights (a file's SHA-256).
    """
    def signature(c):
        return tuple(c.classes), c.positive_class, c.input_size, c.window_level, c.window_width

    seen = {}
    for name, identity in zip(names, identities):
        if identity in seen:
            raise ModelFileError(f"{name} and {seen[identity]} are the same model (identical weights): "
                                 "an ensemble needs different model files")
        seen[identity] = name
    for name, config in zip(names[1:], configs[1:]):
        if signature(config) != signature(configs[0]):
            raise ModelFileError(f"cannot average {name} with {names[0]}: classes or input preparation differ")


def read_checkpoint(path) -> dict:
    """The checkpoint dict, checked for format and version; ModelFileError with one line otherwise."""
    path = Path(path)
    if not path.is_file():
        raise ModelFileError(f"model file not found: {path}")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises several types for truncated or foreign files
        raise ModelFileError(f"cannot read model file {path}: not a CovidCT model or corrupt ({type(exc).__name__})") from exc
    if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
        raise ModelFileError(f"{path} is not a CovidCT DRENet model file")
    if payload.get("version") != CHECKPOINT_VERSION:
        raise ModelFileError(f"{path} has model-file version {payload.get('version')}; this program reads version {CHECKPOINT_VERSION}")
    return payload


def file_sha256(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def load_model(path, expected_classes=None) -> tuple[DRENet, ModelInfo]:
    """Rebuild a DRENet from its file (eval mode, float32, CPU) and describe it."""
    payload = read_checkpoint(path)
    try:
        config = DRENetConfig(**payload["config"])
        model = DRENet(config)
        model.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in payload["state_dict"].items()})
    except (TypeError, ValueError, KeyError, RuntimeError) as exc:
        raise ModelFileError(f"{path} does not match the DRENet architecture: {str(exc).splitlines()[0]}") from exc
    if expected_classes is not None and list(expected_classes) != list(config.classes):
        raise ModelFileError(f"{path} predicts {list(config.classes)}, not the expected classes {list(expected_classes)}")
    info = ModelInfo(
        name=payload["metadata"].get("name", Path(path).stem),
        file=str(Path(path).resolve()),
        sha256=file_sha256(path),
        classes=list(config.classes),
        backbone=config.backbone,
        input_size=config.input_size,
        trained=bool(payload["trained"]),
        performance=validated_performance(payload["metadata"]),
    )
    return model.eval(), info


def untrained_model(spec: str = UNTRAINED) -> tuple[DRENet, ModelInfo]:
    """A DRENet with random heads (ImageNet backbone where offline weights exist): for testing the pipeline only."""
    backbone = spec.partition(":")[2] or "efficientnet_lite0"
    config = DRENetConfig(backbone=backbone)
    torch.manual_seed(0)
    model = DRENet(config, pretrained_backbone=backbone == "efficientnet_lite0")
    info = ModelInfo(
        name=f"{UNTRAINED}:{backbone}",
        file=None,
        sha256=None,
        classes=list(config.classes),
        backbone=backbone,
        input_size=config.input_size,
        trained=False,
    )
    return model.eval(), info


def resolve_model(spec=None, expected_classes=None) -> tuple[DRENet, ModelInfo]:
    """`None` -> the bundled model; "untrained[:backbone]" -> untrained network; else a file path."""
    if spec is None:
        path = default_model_path()
        if path is None:
            raise ModelFileError(
                f"no trained model is installed ({MODELS_DIR / DEFAULT_MODEL_FILE} is missing): pass --model FILE, "
                f"or --model {UNTRAINED} to exercise the pipeline with an untrained network (not a diagnosis)"
            )
        return load_model(path, expected_classes)
    if str(spec) == UNTRAINED or str(spec).startswith(UNTRAINED + ":"):
        return untrained_model(str(spec))
    return load_model(spec, expected_classes)
