"""Shared fixtures: LoRA files for the tiny denoisers, written once per test session."""

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from diffusers import (  # noqa: E402
    FluxPipeline,
    QwenImagePipeline,
    StableDiffusion3Pipeline,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    WanPipeline,
    ZImagePipeline,
)

from helpers import tiny  # noqa: E402


def _two_loras(tmp_path_factory, folder: str, seeds: tuple[int, int], **make) -> dict[str, Path]:
    """Two random LoRA files, "ir" and "aes", written with ``tiny.make_lora_file(..., **make)``."""
    root = tmp_path_factory.mktemp(folder)
    return {name: tiny.make_lora_file(root / name, seed, **make) for name, seed in zip(("ir", "aes"), seeds)}


@pytest.fixture(scope="session")
def sd_loras(tmp_path_factory) -> dict[str, Path]:
    """Two random LoRAs ("ir", "aes") for tiny.unet()."""
    return _two_loras(tmp_path_factory, "sd_loras", (10, 11))


@pytest.fixture(scope="session")
def sdxl_loras(tmp_path_factory) -> dict[str, Path]:
    return _two_loras(
        tmp_path_factory, "sdxl_loras", (20, 21), builder=tiny.sdxl_unet, pipe_class=StableDiffusionXLPipeline
    )


@pytest.fixture(scope="session")
def sd3_loras(tmp_path_factory) -> dict[str, Path]:
    return _two_loras(
        tmp_path_factory,
        "sd3_loras",
        (30, 31),
        builder=tiny.sd3_transformer,
        pipe_class=StableDiffusion3Pipeline,
        prefix="transformer",
    )


@pytest.fixture(scope="session")
def flux_loras(tmp_path_factory) -> dict[str, Path]:
    return _two_loras(
        tmp_path_factory,
        "flux_loras",
        (40, 41),
        builder=tiny.flux_transformer,
        pipe_class=FluxPipeline,
        prefix="transformer",
    )


@pytest.fixture(scope="session")
def qwen_loras(tmp_path_factory) -> dict[str, Path]:
    return _two_loras(
        tmp_path_factory,
        "qwen_loras",
        (50, 51),
        builder=tiny.qwen_transformer,
        pipe_class=QwenImagePipeline,
        prefix="transformer",
    )


@pytest.fixture(scope="session")
def zimage_loras(tmp_path_factory) -> dict[str, Path]:
    return _two_loras(
        tmp_path_factory,
        "zimage_loras",
        (60, 61),
        builder=tiny.zimage_transformer,
        pipe_class=ZImagePipeline,
        prefix="transformer",
    )


@pytest.fixture(scope="session")
def wan_loras(tmp_path_factory) -> dict[str, Path]:
    """Two random LoRAs for tiny.wan_transformer(), saved as diffusers saves Wan LoRAs (keys ``transformer.…``)."""
    return _two_loras(
        tmp_path_factory,
        "wan_loras",
        (70, 71),
        builder=tiny.wan_transformer,
        pipe_class=WanPipeline,
        prefix="transformer",
    )


@pytest.fixture(scope="session")
def sd_pipeline_folder(tmp_path_factory) -> Path:
    """The tiny SD pipeline saved as a diffusers folder (what --base / from_pretrained read)."""
    folder = tmp_path_factory.mktemp("sd_pipeline")
    tiny.sd_pipeline().save_pretrained(folder)
    return folder


__all__ = ["StableDiffusionPipeline"]
