"""Basis models from the Hugging Face hub: only the files a basis needs are downloaded (a pipeline repository's
denoiser, not its text encoders or VAE; no .bin copies or precision variants), one file of a repository can be
named, and offline the cache is used. The hub is replaced by a local folder served through huggingface_hub's own
pattern filter, so the files a pattern selects are exactly those the hub would send."""

from __future__ import annotations

import shutil
from pathlib import Path

import huggingface_hub
import pytest
from huggingface_hub.utils import filter_repo_objects

from diffusion_blend import Blend
from diffusion_blend.loading import basis_files
from helpers import tiny
from helpers.calls import call_kwargs, max_diff

PIPELINE_REPOSITORY = [
    "model_index.json",
    "scheduler/scheduler_config.json",
    "text_encoder/config.json",
    "text_encoder/model.safetensors",
    "tokenizer/vocab.json",
    "vae/config.json",
    "vae/diffusion_pytorch_model.safetensors",
    "unet/config.json",
    "unet/diffusion_pytorch_model.safetensors",
    "unet/diffusion_pytorch_model.fp16.safetensors",
    "unet/diffusion_pytorch_model.bin",
    "README.md",
]


def _selected(files, patterns):
    return set(filter_repo_objects(files, allow_patterns=patterns))


def test_of_a_pipeline_repository_only_the_denoiser_and_scheduler_config_are_fetched():
    assert _selected(PIPELINE_REPOSITORY, basis_files("o/p", PIPELINE_REPOSITORY, ("unet",))) == {
        "model_index.json",
        "scheduler/scheduler_config.json",
        "unet/config.json",
        "unet/diffusion_pytorch_model.safetensors",
    }


def test_of_a_sharded_denoiser_repository_the_plain_safetensors_shards_are_fetched():
    files = [
        "config.json",
        "diffusion_pytorch_model.safetensors.index.json",
        "diffusion_pytorch_model-00001-of-00002.safetensors",
        "diffusion_pytorch_model-00002-of-00002.safetensors",
        "diffusion_pytorch_model.fp16-00001-of-00001.safetensors",
        "diffusion_pytorch_model.bin",
    ]
    assert _selected(files, basis_files("o/t", files)) == set(files[:4])


def test_a_denoiser_repository_whose_only_safetensors_are_variants_is_fetched_as_bin():
    files = ["config.json", "diffusion_pytorch_model.bin", "diffusion_pytorch_model.fp16.safetensors"]
    assert _selected(files, basis_files("o/t", files)) == {"config.json", "diffusion_pytorch_model.bin"}


def test_a_denoiser_repository_without_safetensors_is_fetched_as_bin():
    files = ["config.json", "diffusion_pytorch_model.bin", "notes.txt"]
    assert _selected(files, basis_files("o/t", files)) == {"config.json", "diffusion_pytorch_model.bin"}


@pytest.mark.parametrize(
    "files, expected",
    [
        (
            ["pytorch_lora_weights.safetensors", "samples/0.png", "old/pytorch_lora_weights.safetensors"],
            {"pytorch_lora_weights.safetensors"},
        ),
        (
            ["adapter_config.json", "adapter_model.safetensors", "README.md"],
            {"adapter_config.json", "adapter_model.safetensors"},
        ),
        (["my_style.safetensors", "preview.png"], {"my_style.safetensors"}),
    ],
)
def test_of_a_lora_repository_its_weights_are_fetched(files, expected):
    assert _selected(files, basis_files("o/l", files)) == expected


class FakeHub:
    """A hub holding local folders as repositories: listing, pattern-filtered snapshots and single files, each call
    recorded."""

    def __init__(self, monkeypatch, repositories: dict[str, Path], cache: Path, online: bool = True):
        self.repositories, self.cache, self.online, self.calls = repositories, cache, online, []
        monkeypatch.setattr(huggingface_hub.HfApi, "list_repo_files", self.list_repo_files)
        monkeypatch.setattr(huggingface_hub, "snapshot_download", self.snapshot_download)
        monkeypatch.setattr(huggingface_hub, "hf_hub_download", self.hf_hub_download)

    def _files(self, repo_id):
        root = self.repositories[repo_id]
        return [str(p.relative_to(root)) for p in sorted(root.rglob("*")) if p.is_file()]

    def list_repo_files(self, repo_id, **_):
        self.calls.append(("list", repo_id))
        if not self.online:
            raise huggingface_hub.errors.OfflineModeIsEnabled("offline")
        return self._files(repo_id)

    def snapshot_download(self, repo_id, allow_patterns=None, local_files_only=False, **_):
        self.calls.append(("snapshot", repo_id, allow_patterns, local_files_only))
        target = self.cache / repo_id
        for file in filter_repo_objects(self._files(repo_id), allow_patterns=allow_patterns):
            (target / file).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(self.repositories[repo_id] / file, target / file)
        return str(target)

    def hf_hub_download(self, repo_id, filename, **_):
        self.calls.append(("file", repo_id, filename))
        return str(self.repositories[repo_id] / filename)


def test_a_full_member_from_a_pipeline_repository_blends_without_its_other_components(monkeypatch, tmp_path):
    tiny.sd_pipeline(denoiser_seed=7).save_pretrained(tmp_path / "remote")
    hub = FakeHub(monkeypatch, {"someone/tiny-sd-ft": tmp_path / "remote"}, tmp_path / "cache")
    out = Blend(tiny.sd_pipeline(), {"ft": "someone/tiny-sd-ft"}).blend(weights={"ft": 1.0}, **call_kwargs()).images
    assert max_diff(out, tiny.sd_pipeline(denoiser_seed=7)(**call_kwargs()).images) <= 1e-5
    snapshot = tmp_path / "cache" / "someone/tiny-sd-ft"
    assert {p.relative_to(snapshot).parts[0] for p in snapshot.rglob("*") if p.is_file()} == {
        "model_index.json",
        "scheduler",
        "unet",
    }
    assert ("list", "someone/tiny-sd-ft") in hub.calls


def test_one_lora_file_of_a_repository_can_be_named(monkeypatch, tmp_path, sd_loras):
    shutil.copy(sd_loras["ir"], tmp_path / "ir_v2.safetensors")
    hub = FakeHub(monkeypatch, {"someone/loras": tmp_path}, tmp_path / "cache")
    out = (
        Blend(tiny.sd_pipeline(), {"ir": "someone/loras/ir_v2.safetensors"})
        .blend(weights={"ir": 1.0}, **call_kwargs())
        .images
    )
    local = Blend(tiny.sd_pipeline(), {"ir": sd_loras["ir"]}).blend(weights={"ir": 1.0}, **call_kwargs()).images
    assert max_diff(out, local) == 0
    assert hub.calls == [("file", "someone/loras", "ir_v2.safetensors")]


def test_a_lora_repository_of_several_files_asks_for_one_before_downloading(monkeypatch, tmp_path, sd_loras):
    for version in ("v1", "v2"):
        shutil.copy(sd_loras["ir"], tmp_path / f"ir_{version}.safetensors")
    hub = FakeHub(monkeypatch, {"someone/loras": tmp_path}, tmp_path / "cache")
    with pytest.raises(
        ValueError,
        match=r"basis 'ir': someone/loras holds no .*name one of its files as "
        r"someone/loras/FILE \(found: ir_v1.safetensors, ir_v2.safetensors\)",
    ):
        Blend(tiny.sd_pipeline(), {"ir": "someone/loras"})
    assert [call[0] for call in hub.calls] == ["list"]


def test_offline_the_repository_comes_from_the_cache(monkeypatch, tmp_path, sd_loras):
    """No listing (offline, or the hub failing): the snapshot the cache holds, never a download of the whole
    repository."""
    shutil.copy(sd_loras["ir"], tmp_path / "pytorch_lora_weights.safetensors")
    hub = FakeHub(monkeypatch, {"someone/ir": tmp_path}, tmp_path / "cache", online=False)
    out = Blend(tiny.sd_pipeline(), {"ir": "someone/ir"}).blend(weights={"ir": 1.0}, **call_kwargs()).images
    local = Blend(tiny.sd_pipeline(), {"ir": sd_loras["ir"]}).blend(weights={"ir": 1.0}, **call_kwargs()).images
    assert max_diff(out, local) == 0
    assert ("snapshot", "someone/ir", None, True) in hub.calls
