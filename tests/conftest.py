"""Shared fixtures: LoRA files for the tiny denoisers, written once per test session."""

import os
import sys
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).parents[1] / "benchmarks"))  # the benchmarks' helpers are tested too

import tiny  # noqa: E402
from diffusers import (  # noqa: E402
    FluxPipeline,
    StableDiffusion3Pipeline,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
)


@pytest.fixture(scope="session")
def sd_loras(tmp_path_factory) -> dict[str, Path]:
    """Two random LoRAs ("ir", "aes") for tiny.unet()."""
    root = tmp_path_factory.mktemp("sd_loras")
    return {name: tiny.make_lora_file(root / name, seed) for name, seed in (("ir", 10), ("aes", 11))}


@pytest.fixture(scope="session")
def sdxl_loras(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("sdxl_loras")
    return {
        name: tiny.make_lora_file(root / name, seed, builder=tiny.sdxl_unet, pipe_class=StableDiffusionXLPipeline)
        for name, seed in (("ir", 20), ("aes", 21))
    }


@pytest.fixture(scope="session")
def sd3_loras(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("sd3_loras")
    return {
        name: tiny.make_lora_file(
            root / name, seed, builder=tiny.sd3_transformer, pipe_class=StableDiffusion3Pipeline, prefix="transformer"
        )
        for name, seed in (("ir", 30), ("aes", 31))
    }


@pytest.fixture(scope="session")
def flux_loras(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("flux_loras")
    return {
        name: tiny.make_lora_file(
            root / name, seed, builder=tiny.flux_transformer, pipe_class=FluxPipeline, prefix="transformer"
        )
        for name, seed in (("ir", 40), ("aes", 41))
    }


@pytest.fixture(scope="session")
def sd_pipeline_folder(tmp_path_factory) -> Path:
    """The tiny SD pipeline saved as a diffusers folder (what --base / from_pretrained read)."""
    folder = tmp_path_factory.mktemp("sd_pipeline")
    tiny.sd_pipeline().save_pretrained(folder)
    return folder


__all__ = ["StableDiffusionPipeline"]
