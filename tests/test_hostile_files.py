"""Files from the internet cannot run code or slip through broken: a pickle payload that would create a file is
refused on every loading route (and the file never appears); truncated, garbage and wrong-class files are refused
in one line naming them. (Non-finite tensors: test_reliability.py; random bytes, wrong shapes: test_properties.py.)"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import safetensors.torch
import torch

from diffusion_blend import Blend
from diffusion_blend.rewards import get_reward
from helpers import tiny


class Payload:
    """Unpickling this creates ``marker``: the proof that a loader ran code from a file."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def payload_file(path: Path, marker: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"weight": torch.zeros(1), "payload": Payload(marker)}, path)
    return path


def test_the_payload_does_run_when_unpickled(tmp_path):
    """The check below is not vacuous: loading the file with pickle enabled creates the marker."""
    marker = tmp_path / "ran"
    torch.load(payload_file(tmp_path / "p.bin", marker), weights_only=False)
    assert marker.exists()


def _lora_bin(root: Path, marker: Path) -> Path:
    return payload_file(root / "lora" / "pytorch_lora_weights.bin", marker).parent


def _lora_pt(root: Path, marker: Path) -> Path:
    return payload_file(root / "lora.pt", marker)


def _denoiser_folder(root: Path, marker: Path) -> Path:
    folder = root / "unet"
    tiny.unet(0).save_pretrained(folder, safe_serialization=False)
    payload_file(folder / "diffusion_pytorch_model.bin", marker)
    return folder


def _pipeline_folder(root: Path, marker: Path) -> Path:
    folder = root / "pipeline"
    tiny.sd_pipeline().save_pretrained(folder, safe_serialization=False)
    payload_file(folder / "unet" / "diffusion_pytorch_model.bin", marker)
    return folder


@pytest.mark.parametrize("route", [_lora_bin, _lora_pt, _denoiser_folder, _pipeline_folder])
def test_a_pickle_payload_is_refused_on_every_basis_route(tmp_path, route):
    marker = tmp_path / "ran"
    source = route(tmp_path, marker)
    with pytest.raises(ValueError, match="basis 'x'") as raised:
        Blend(tiny.sd_pipeline(), {"x": source})
    assert "\n" not in str(raised.value).strip()
    assert not marker.exists()


def test_a_pickle_payload_is_refused_as_a_reward_checkpoint(tmp_path):
    marker = tmp_path / "ran"
    folder = tmp_path / "aesthetic"
    payload_file(folder / "sac+logos+ava1-l14-linearMSE.pth", marker)
    with pytest.raises(ValueError, match="aesthetic: .* holds Python objects besides tensors"):
        get_reward("aesthetic", folder)
    assert not marker.exists()


def test_a_truncated_lora_file_is_refused_naming_it(sd_loras, tmp_path):
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(Path(sd_loras["ir"]).read_bytes()[:-100])
    with pytest.raises(ValueError, match=f"{truncated} is not a valid safetensors file"):
        Blend(tiny.sd_pipeline(), {"ir": truncated})


def test_a_lora_of_another_model_size_is_refused_naming_it(tmp_path):
    other = tiny.make_lora_file(tmp_path / "sdxl", 3, builder=tiny.sdxl_unet)
    with pytest.raises(ValueError, match=f"basis 'ir': .*{other.parent.name}"):
        Blend(tiny.sd_pipeline(), {"ir": other})


def test_a_denoiser_folder_naming_another_class_is_refused(tmp_path):
    folder = tmp_path / "vae"
    tiny.vae().save_pretrained(folder)
    config = json.loads((folder / "config.json").read_text())
    assert config["_class_name"] == "AutoencoderKL"
    with pytest.raises(ValueError, match="basis 'x'.*AutoencoderKL"):
        Blend(tiny.sd_pipeline(), {"x": folder})


def test_a_nan_safetensors_denoiser_is_refused(tmp_path):
    folder = tmp_path / "unet"
    member = tiny.unet(1)
    member.save_pretrained(folder)
    weights = folder / "diffusion_pytorch_model.safetensors"
    state = safetensors.torch.load_file(weights)
    state["conv_out.bias"] = torch.full_like(state["conv_out.bias"], float("inf"))
    safetensors.torch.save_file(state, weights)
    with pytest.raises(ValueError, match="non-finite.*conv_out.bias"):
        Blend(tiny.sd_pipeline(), {"x": folder})


def test_a_file_that_is_no_checkpoint_is_not_called_a_payload(tmp_path):
    """A Git LFS pointer where the weights should be: not a pickle at all, reported as such."""
    pointer = tmp_path / "lora" / "pytorch_lora_weights.bin"
    pointer.parent.mkdir()
    pointer.write_text("version https://git-lfs.github.com/spec/v1\noid sha256:0\nsize 1\n")
    with pytest.raises(ValueError, match=f"basis 'x': {pointer} is not a torch checkpoint"):
        Blend(tiny.sd_pipeline(), {"x": pointer.parent})
