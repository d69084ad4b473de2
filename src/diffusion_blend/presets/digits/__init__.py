"""The embedded default: a class-conditional diffusion model of handwritten digits, its rewards and basis models.

Trained here on scikit-learn's digits (``python -m diffusion_blend.presets.digits.train``); the weights ship inside
the package (``weights/``, with ``manifest.json``: how each file was made and what it reaches).

    pipe = load_pipeline()                                  # a DigitsPipeline: pipe("3").images
    blend = Blend(pipe, basis=basis_models())               # legible, bold, stencil
"""

from __future__ import annotations

import json
from pathlib import Path

from .pipeline import DigitsPipeline, digit_labels

WEIGHTS = Path(__file__).parent / "weights"
BASE_FOLDER = "base"
BASIS_FOLDER = "basis"
ORACLE_FOLDER = "oracles"
MANIFEST = "manifest.json"


def weights_folder() -> Path:
    return WEIGHTS


def manifest() -> dict:
    """What the shipped weights are: the settings that made each and the numbers it reached."""
    return json.loads((WEIGHTS / MANIFEST).read_text())


def basis_alpha() -> float:
    """α, the KL weight the shipped basis models were fine-tuned with (their target is p_base·exp(r/α))."""
    return float(manifest()["basis"]["settings"]["alpha"])


def load_pipeline(device: str | None = None, folder: str | Path | None = None) -> DigitsPipeline:
    """The shipped base pipeline (or one saved in ``folder``), quiet, on ``device``."""
    from diffusers import DDIMScheduler, UNet2DConditionModel

    root = Path(folder) if folder is not None else WEIGHTS / BASE_FOLDER
    if not (root / "unet" / "config.json").is_file():
        raise ValueError(f"digits: {root} holds no trained model (run python -m diffusion_blend.presets.digits.train)")
    pipe = DigitsPipeline(
        UNet2DConditionModel.from_pretrained(root / "unet"), DDIMScheduler.from_pretrained(root / "scheduler")
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device) if device is not None else pipe


def basis_models(folder: str | Path | None = None) -> dict[str, Path]:
    """The shipped basis models by reward name: LoRA folders ``Blend`` loads."""
    root = Path(folder) if folder is not None else WEIGHTS / BASIS_FOLDER
    return {path.name: path for path in sorted(root.iterdir()) if path.is_dir()} if root.is_dir() else {}


def oracles(folder: str | Path | None = None) -> dict[str, Path]:
    """The shipped MORL oracles by name (``bold=0.5,stencil=0.5``): LoRA folders fine-tuned on the mixed reward."""
    root = Path(folder) if folder is not None else WEIGHTS / ORACLE_FOLDER
    return {path.name: path for path in sorted(root.iterdir()) if path.is_dir()} if root.is_dir() else {}


__all__ = [
    "BASE_FOLDER",
    "BASIS_FOLDER",
    "MANIFEST",
    "ORACLE_FOLDER",
    "WEIGHTS",
    "basis_alpha",
    "basis_models",
    "digit_labels",
    "load_pipeline",
    "manifest",
    "oracles",
    "weights_folder",
]
