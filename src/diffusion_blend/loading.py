"""Reading basis models from disk: LoRA files in every format we accept, and full denoiser folders.

Formats:
- diffusers LoRA files (``pytorch_lora_weights.safetensors``, keys ``unet.<module>.lora_A.weight``, with the
  adapter config in the safetensors header), and anything the pipeline's own ``lora_state_dict`` converts
  (kohya/A1111 files for Stable Diffusion);
- peft adapter folders (``adapter_config.json`` + ``adapter_model.safetensors``, keys ``base_model.model.…``);
- the attention-processor LoRA of diffusers ≤ 0.20 (``pytorch_lora_weights.bin``, keys
  ``….processor.to_q_lora.down.weight``), in which the method's published checkpoints were saved: read with
  ``torch.load(weights_only=True)`` and converted to peft keys;
- full denoiser folders (a ``config.json``) and whole pipeline folders (a ``model_index.json``).

Everything is read and checked before anything is loaded into the pipeline, so a bad basis leaves it untouched.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import safetensors
import safetensors.torch
import torch

from .checkpoints import read_weights_only
from .hub import HUB_FILE, is_hub_file, is_hub_id

LORA_WEIGHT_NAMES = ("pytorch_lora_weights.safetensors", "adapter_model.safetensors", "pytorch_lora_weights.bin")
PEFT_PREFIX = "base_model.model."
DIFFUSERS_METADATA_KEY = "lora_adapter_metadata"  # diffusers' safetensors header entry holding the LoraConfig
TEXT_ENCODER_PREFIXES = ("text_encoder", "lora_te", "te_", "te1_", "te2_", "te3_")
#: a key of a peft-adapted layer (``….to_q.lora_A.name.weight``, ``….to_q.base_layer.weight``)
ADAPTER_KEY = re.compile(r"\.(lora_[AB]|lora_magnitude_vector|base_layer)\.")
_OLD_PROCESSOR_KEY = re.compile(
    r"^(?:unet\.)?(?P<module>.+)\.processor\.(?P<proj>to_[qkv]|to_out)_lora\.(?P<side>down|up)\.weight$"
)
#: The pipeline attributes (and folders of a pipeline repository) that may hold its denoiser
DENOISER_FOLDERS = ("unet", "transformer")


@dataclass
class LoraFile:
    """A LoRA read from disk, not yet loaded anywhere."""

    path: Path
    state_dict: dict[str, torch.Tensor]
    metadata: dict | None  # LoraConfig fields (keys prefixed like the state dict), when the file carries them
    network_alphas: dict | None = None  # kohya-style alphas, when the pipeline's converter found them


def resolve_source(name: str, source: str | os.PathLike, denoiser_folders: tuple[str, ...] = DENOISER_FOLDERS) -> Path:
    """The local path of a basis source: an existing path as is; a hub repository ("owner/name") or one file of it
    ("owner/name/lora.safetensors") downloaded, or found in the cache offline. Of a repository only what the basis
    needs is downloaded (:func:`basis_files`)."""
    path = Path(source).expanduser()
    if path.exists():
        return path
    text = str(source)
    if is_hub_id(text) or is_hub_file(text):
        try:
            return _download(text, denoiser_folders)
        except BasisFilesError as error:
            raise ValueError(f"basis {name!r}: {error}") from error
        except Exception as error:  # offline and not cached, unknown repo, no access: one clear message
            raise ValueError(
                f"basis {name!r}: {text} is neither a local path nor a reachable hub repository "
                f"({type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''})"
            ) from error
    raise ValueError(f"basis {name!r}: {text} does not exist")


class BasisFilesError(Exception):
    """A hub repository whose files do not tell which of them the basis is."""


def _download(text: str, denoiser_folders: tuple[str, ...]) -> Path:
    import huggingface_hub

    file = HUB_FILE.match(text)
    if file is not None:
        return Path(huggingface_hub.hf_hub_download(file["repo"], file["file"]))
    try:
        files = huggingface_hub.HfApi().list_repo_files(text)
    except Exception:  # no listing (offline, or the hub failing): the repository as the cache holds it, if it does
        return Path(huggingface_hub.snapshot_download(text, local_files_only=True))
    return Path(huggingface_hub.snapshot_download(text, allow_patterns=basis_files(text, files, denoiser_folders)))


def basis_files(repo: str, files: list[str], denoiser_folders: tuple[str, ...] = DENOISER_FOLDERS) -> list[str]:
    """The files of a hub repository a basis needs, as ``allow_patterns``: of a pipeline, its index, scheduler
    config and denoiser (never its text encoders or VAE); of a denoiser, its config and weights; of a LoRA, its
    weights and adapter config. Denoiser weights in safetensors where the repository has them (not .bin copies), and
    not a precision variant (``.fp16.``: diffusers loads the plain files)."""
    if "model_index.json" in files:
        folders = [f"{folder}/" for folder in denoiser_folders]
        return ["model_index.json", "scheduler/*", *(p for folder in folders for p in _denoiser_weights(files, folder))]
    if "config.json" in files:
        return _denoiser_weights(files, "")
    standard = [name for name in LORA_WEIGHT_NAMES if name in files]
    top_level = [f for f in files if "/" not in f and f.endswith(".safetensors")]
    if not standard and len(top_level) != 1:
        found = ", ".join(f for f in files if f.endswith((".safetensors", ".bin"))) or "no weights"
        raise BasisFilesError(
            f"{repo} holds no {' or '.join(LORA_WEIGHT_NAMES)}, no single .safetensors file and no "
            f"config.json; name one of its files as {repo}/FILE (found: {found})"
        )
    return ["adapter_config.json", *(standard[:1] or top_level)]


def _denoiser_weights(files: list[str], folder: str) -> list[str]:
    """A denoiser's config and plain weights (whole or in shards): safetensors where it has them, else .bin."""
    stem = f"{folder}diffusion_pytorch_model"
    plain = re.compile(rf"^{re.escape(stem)}(?:-\d+-of-\d+)?\.safetensors(?:\.index\.json)?$")
    extension = ".safetensors" if any(plain.match(file) for file in files) else ".bin"
    return [f"{folder}config.json", f"{stem}{extension}", f"{stem}-*{extension}", f"{stem}{extension}.index.json"]


def check_base_folder(model_id_or_path: str | os.PathLike) -> None:
    """A base that is not a hub id ("owner/name") is a local folder, and must exist (diffusers would report it as an
    invalid repository id)."""
    text = os.fspath(model_id_or_path)
    folder = Path(text).expanduser()
    if not is_hub_id(text) and not folder.is_dir():
        what = "is not a folder" if folder.exists() else "does not exist"
        raise ValueError(f"base {text!r} {what}: give a pipeline folder (model_index.json) or a hub id (owner/name)")
    for name in DENOISER_FOLDERS if folder.is_dir() else ():
        for weights in sorted((folder / name).glob("*.safetensors")):
            with safetensors.safe_open(str(weights), framework="pt") as handle:
                adapted = next((key for key in handle.keys() if ADAPTER_KEY.search(key)), None)
            if adapted is not None:
                raise ValueError(
                    f"base {text!r}: {weights} holds LoRA adapter weights ({adapted}): the pipeline was saved with "
                    "adapters loaded, and diffusers would load its layers with random weights; fuse_lora() and "
                    "unload_lora_weights() before save_pretrained, or save the pipeline without its LoRAs"
                )


def is_denoiser_folder(path: Path) -> bool:
    """A full denoiser (``config.json``) or a whole pipeline (``model_index.json``), as opposed to a LoRA."""
    return path.is_dir() and ((path / "config.json").is_file() or (path / "model_index.json").is_file())


def read_lora(name: str, path: Path) -> LoraFile:
    """Read a LoRA file or folder in any accepted format; keys come back in diffusers' or peft's naming."""
    file = _lora_weight_file(name, path)
    if file.suffix == ".safetensors":
        state_dict, header = _read_safetensors(name, file)
        check_finite(name, file, state_dict)
        metadata = _lora_metadata(name, file, header)
        if (file.parent / "adapter_config.json").is_file() and any(k.startswith(PEFT_PREFIX) for k in state_dict):
            state_dict, metadata = _from_peft_folder(name, file.parent, state_dict)
        return LoraFile(file, state_dict, metadata)
    state_dict = _read_pickle(name, file)
    check_finite(name, file, state_dict)
    if is_attention_processor_lora(state_dict):
        state_dict = convert_attention_processor_lora(state_dict)
    return LoraFile(file, state_dict, None)


def check_finite(name: str, source: object, tensors: Mapping[str, torch.Tensor]) -> None:
    """Weights holding NaN or inf would turn every image they touch into NaN: refused, naming the first tensor."""
    for key, tensor in tensors.items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise ValueError(f"basis {name!r}: {source} holds non-finite values (NaN or inf) in {key!r}")


def _lora_metadata(name: str, file: Path, header: Mapping[str, str]) -> dict | None:
    """The LoraConfig diffusers writes into the safetensors header (None where there is none)."""
    if DIFFUSERS_METADATA_KEY not in header:
        return None
    try:
        metadata = json.loads(header[DIFFUSERS_METADATA_KEY])
    except json.JSONDecodeError as error:
        raise ValueError(f"basis {name!r}: the LoRA metadata in {file} is not JSON ({error})") from error
    from peft import LoraConfig

    fields = set(LoraConfig.__dataclass_fields__)
    # (keys are the LoraConfig's fields, prefixed by the component in a pipeline's file: "unet.lora_alpha")
    unknown = (
        sorted(key for key in metadata if key.rsplit(".", 1)[-1] not in fields) if isinstance(metadata, dict) else []
    )
    if not isinstance(metadata, dict) or unknown:
        raise ValueError(
            f"basis {name!r}: the LoRA metadata in {file} is not a LoraConfig"
            + (f" (unknown fields: {', '.join(unknown[:5])})" if unknown else f" (got {type(metadata).__name__})")
        )
    return metadata


def _lora_weight_file(name: str, path: Path) -> Path:
    if path.is_file():
        return path
    for candidate in LORA_WEIGHT_NAMES:
        if (path / candidate).is_file():
            return path / candidate
    files = sorted(path.glob("*.safetensors"))
    if len(files) == 1:
        return files[0]
    found = ", ".join(p.name for p in sorted(path.iterdir())) or "nothing"
    raise ValueError(
        f"basis {name!r}: {path} holds no LoRA weights (looked for {', '.join(LORA_WEIGHT_NAMES)} or a single "
        f".safetensors file) and no config.json of a full denoiser; found: {found}"
    )


def _read_safetensors(name: str, file: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    try:
        with safetensors.safe_open(str(file), framework="pt") as handle:
            header = handle.metadata() or {}
        return safetensors.torch.load_file(str(file)), header
    except (safetensors.SafetensorError, OSError, ValueError) as error:
        raise ValueError(f"basis {name!r}: {file} is not a valid safetensors file ({error})") from error


def _read_pickle(name: str, file: Path) -> dict[str, torch.Tensor]:
    """A legacy ``.bin`` checkpoint, read without executing code (``weights_only=True``)."""
    try:
        state_dict = read_weights_only(file)
    except ValueError as error:
        raise ValueError(f"basis {name!r}: {error}") from None
    if not isinstance(state_dict, dict) or not all(isinstance(v, torch.Tensor) for v in state_dict.values()):
        raise ValueError(f"basis {name!r}: {file} is not a state dict of tensors")
    return state_dict


def _from_peft_folder(name: str, folder: Path, state_dict: dict) -> tuple[dict[str, torch.Tensor], dict]:
    """peft's ``save_pretrained`` layout: strip ``base_model.model.`` and take the LoraConfig from the folder."""
    from peft import LoraConfig

    try:
        config = json.loads((folder / "adapter_config.json").read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise ValueError(f"basis {name!r}: cannot read {folder / 'adapter_config.json'} ({error})") from error
    fields = set(LoraConfig.__dataclass_fields__) - {"peft_type", "task_type", "base_model_name_or_path", "revision"}
    metadata = {key: value for key, value in config.items() if key in fields}
    return {key.removeprefix(PEFT_PREFIX): value for key, value in state_dict.items()}, metadata


def is_attention_processor_lora(state_dict: dict) -> bool:
    """True for the LoRAAttnProcessor checkpoints of diffusers ≤ 0.20 (``….processor.to_q_lora.down.weight``)."""
    return bool(state_dict) and all(_OLD_PROCESSOR_KEY.match(key) for key in state_dict)


def convert_attention_processor_lora(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Attention-processor LoRA keys → peft keys on the UNet (``unet.<block>.attn1.to_q.lora_A.weight``).

    Those processors computed ``up(down(x))`` with no alpha/rank scaling, which is what peft does with
    ``lora_alpha = r`` — the default diffusers picks when a file carries no alphas.
    """
    converted = {}
    for key, value in state_dict.items():
        match = _OLD_PROCESSOR_KEY.match(key)
        projection = "to_out.0" if match["proj"] == "to_out" else match["proj"]
        side = "lora_A" if match["side"] == "down" else "lora_B"
        converted[f"unet.{match['module']}.{projection}.{side}.weight"] = value
    return converted


def text_encoder_keys(state_dict: dict) -> list[str]:
    """Keys of a LoRA that adapt a text encoder."""
    return [key for key in state_dict if key.startswith(TEXT_ENCODER_PREFIXES)]


def module_path(key: str) -> str | None:
    """The module a LoRA key adapts (``a.b.to_q`` for ``a.b.to_q.lora_A.weight``), or None for a non-LoRA key."""
    match = re.search(r"\.(lora[._]|lokr_|alpha$)", key)
    return key[: match.start()] if match else None


def read_scheduler_prediction_type(folder: Path) -> str | None:
    """The prediction type of a pipeline folder's scheduler (``flow`` for flow-matching schedulers)."""
    config_file = folder / "scheduler" / "scheduler_config.json"
    if not config_file.is_file():
        return None
    return scheduler_prediction_type(json.loads(config_file.read_text()))


def scheduler_prediction_type(config: dict) -> str | None:
    """``prediction_type`` of a scheduler config; flow-matching schedulers predict a velocity (``flow``)."""
    if "FlowMatch" in str(config.get("_class_name", "")):
        return "flow"
    return config.get("prediction_type")
