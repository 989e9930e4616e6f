"""Where the bundled reference model lives; answerable without importing torch (for Slicer's first run)."""

from __future__ import annotations

import os
from pathlib import Path

MODELS_DIR = Path(__file__).resolve().parents[1] / "Resources" / "Models"
DEFAULT_MODEL_FILE = "covidct-drenet-lite0.pt"
MODEL_CARD_FILE = "MODEL_CARD.md"  # a model's card (figures, limits) in the model file's folder
MODEL_DIR_ENV = "COVIDCT_MODEL_DIR"  # overrides MODELS_DIR, e.g. for a site's own fine-tuned model


def default_model_path() -> Path | None:
    """The bundled reference model file, or None if it is not installed."""
    path = Path(os.environ.get(MODEL_DIR_ENV, MODELS_DIR)) / DEFAULT_MODEL_FILE
    return path if path.is_file() else None
