"""CLIP-based rewards on transformers' ``CLIPModel``: CLIPScore, PickScore, the LAION aesthetic predictor v2, HPSv2.

They share one thing, :class:`ClipTower`: a CLIP model with its tokenizer and its image preprocessing (resize of the
shorter side, centre crop, normalisation) done in torch, so that gradients reach the pixels.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from torch import nn
from transformers import CLIPConfig, CLIPModel, CLIPTokenizer

from .base import (
    Reward,
    ScoreHead,
    cosine,
    letterbox,
    load_checkpoint,
    load_exactly,
    load_or_explain,
    missing_weights,
    normalize,
    resize_and_crop,
    weights_source,
)

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
LAION_VIT_H = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"
OPENAI_VIT_L = "openai/clip-vit-large-patch14"
OPENAI_VIT_B32 = "openai/clip-vit-base-patch32"


def read_preprocessing(source: str | os.PathLike) -> dict:
    """Resize / crop / normalisation settings from a ``preprocessor_config.json`` (folder or hub id); CLIP's
    defaults (224, OpenAI mean and std) where there is none."""
    config = {}
    path = Path(source)
    if path.is_dir() and (path / "preprocessor_config.json").is_file():
        config = json.loads((path / "preprocessor_config.json").read_text())
    elif not path.exists():
        from huggingface_hub import hf_hub_download

        config = json.loads(Path(hf_hub_download(str(source), "preprocessor_config.json")).read_text())
    size = config.get("size", {"shortest_edge": 224})
    shortest = size.get("shortest_edge", size) if isinstance(size, dict) else size
    crop = config.get("crop_size", shortest)
    crop = (crop["height"], crop["width"]) if isinstance(crop, dict) else (crop, crop)
    return {
        "shortest_edge": int(shortest),
        "crop": tuple(int(c) for c in crop),
        "mean": tuple(config.get("image_mean", OPENAI_CLIP_MEAN)),
        "std": tuple(config.get("image_std", OPENAI_CLIP_STD)),
        "letterbox": False,
    }


class ClipTower(nn.Module):
    """A CLIP model, its tokenizer and its image preprocessing."""

    def __init__(self, model: CLIPModel, tokenizer, preprocessing: dict):
        super().__init__()
        self.model = model.eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.preprocessing = preprocessing

    @classmethod
    def load(cls, reward: str, model_source, processor_source=None) -> ClipTower:
        """Model from ``model_source``; tokenizer and preprocessing from ``processor_source`` (default: the same)."""
        processor_source = processor_source or model_source

        def load():
            return cls(
                CLIPModel.from_pretrained(model_source),
                CLIPTokenizer.from_pretrained(processor_source),
                read_preprocessing(processor_source),
            )

        files = f"a transformers CLIP model ({model_source}) and its tokenizer ({processor_source})"
        return load_or_explain(reward, files, "the Hugging Face hub", load)

    def pixels(self, images: torch.Tensor) -> torch.Tensor:
        """Images in [0, 1] → the model's normalised input (resized in float32, then cast to the model's dtype)."""
        settings = self.preprocessing
        if settings["letterbox"]:
            pixels = letterbox(images, settings["crop"][0])
        else:
            pixels = resize_and_crop(images, settings["shortest_edge"], settings["crop"])
        return normalize(pixels, settings["mean"], settings["std"]).to(self.model.dtype)

    def image_features(self, images: torch.Tensor) -> torch.Tensor:
        """Projected image embeddings of images in [0, 1]."""
        return self.model.get_image_features(pixel_values=self.pixels(images)).pooler_output

    def text_features(self, prompts: list[str]) -> torch.Tensor:
        tokens = self.tokenizer(
            prompts,
            padding="max_length",
            truncation=True,
            return_tensors="pt",
            max_length=self.model.config.text_config.max_position_embeddings,
        )
        tokens = {key: value.to(self.model.device) for key, value in tokens.items()}
        return self.model.get_text_features(**tokens).pooler_output


class ClipScore(Reward):
    """CLIPScore (Hessel et al., 2021): w · max(cos(E_image, E_text), 0) with w = 2.5 and the paper's text prefix
    "A photo depicts "; the paper's ViT-B/32 by default, any CLIP checkpoint by ``path_or_id``."""

    name = "clipscore"
    differentiable = True
    prefix = "A photo depicts "

    def __init__(self, tower: ClipTower, weight: float = 2.5):
        super().__init__()
        self.tower, self.weight = tower, weight

    @classmethod
    def load(cls, path_or_id=None) -> ClipScore:
        return cls(ClipTower.load(cls.name, weights_source(cls.name, path_or_id) or OPENAI_VIT_B32))

    def score(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        texts = [self.prefix + prompt for prompt in prompts]
        similarity = cosine(self.tower.image_features(images), self.tower.text_features(texts))
        return self.weight * similarity.clamp(min=0)


class PickScore(Reward):
    """PickScore (Kirstain et al., 2023): logit_scale · cos(E_image, E_text) with the PickScore_v1 CLIP-H model."""

    name = "pickscore"
    differentiable = True
    model_id, processor_id = "yuvalkirstain/PickScore_v1", LAION_VIT_H

    def __init__(self, tower: ClipTower):
        super().__init__()
        self.tower = tower

    @classmethod
    def load(cls, path_or_id=None) -> PickScore:
        """``path_or_id``: a folder holding the model, its tokenizer and preprocessor config, or a hub model id
        (the tokenizer and preprocessing then come from the CLIP-H processor, as upstream does)."""
        source = weights_source(cls.name, path_or_id)
        if isinstance(source, Path):
            return cls(ClipTower.load(cls.name, source))
        return cls(ClipTower.load(cls.name, source or cls.model_id, cls.processor_id))

    def score(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        similarity = cosine(self.tower.image_features(images), self.tower.text_features(prompts))
        return self.tower.model.logit_scale.exp() * similarity


class LaionAesthetic(Reward):
    """LAION aesthetic predictor v2 ("improved-aesthetic-predictor"): an MLP on the L2-normalised CLIP ViT-L/14
    image embedding (sac+logos+ava1-l14-linearMSE), scores roughly 1–10."""

    name = "aesthetic"
    differentiable = True
    head_file = "sac+logos+ava1-l14-linearMSE.pth"
    head_repo = "camenduru/improved-aesthetic-predictor"

    def __init__(self, tower: ClipTower, head: ScoreHead):
        super().__init__()
        self.tower, self.head = tower, head.eval().requires_grad_(False)

    @classmethod
    def load(cls, path_or_id=None) -> LaionAesthetic:
        """``path_or_id``: the head file, or a folder with it and optionally a CLIP model (in the folder itself or in
        ``clip/``; ViT-L/14 from the hub otherwise), or a hub repository holding the head file."""
        source = weights_source(cls.name, path_or_id)
        files = f"{cls.head_file} (github.com/christophschuhmann/improved-aesthetic-predictor) and {OPENAI_VIT_L}"
        clip_source = OPENAI_VIT_L
        if isinstance(source, Path):
            head_path = source / cls.head_file if source.is_dir() else source
            if not head_path.is_file():
                raise missing_weights(cls.name, files, f"the folder {source}")
            for candidate in (source / "clip", source):
                if (candidate / "config.json").is_file():
                    clip_source = candidate
                    break
        else:
            from huggingface_hub import hf_hub_download

            repo = source or cls.head_repo
            head_path = load_or_explain(cls.name, files, repo, lambda: Path(hf_hub_download(repo, cls.head_file)))
        state = load_checkpoint(cls.name, head_path)
        return cls(ClipTower.load(cls.name, clip_source), ScoreHead.from_state_dict(state))

    def score(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        embeddings = nn.functional.normalize(self.tower.image_features(images), dim=-1)
        return self.head(embeddings.to(self.head.layers[0].weight.dtype)).squeeze(-1)


# ------------------------------------------------------------------------------------------------------ HPSv2
#: open_clip's ViT-H-14 (the architecture HPSv2 fine-tunes): heads are not recoverable from weight shapes.
VIT_H_14 = {"embed_dim": 1024, "vision_heads": 16, "text_heads": 16}


def open_clip_to_transformers(state: dict[str, torch.Tensor], heads: dict) -> tuple[CLIPConfig, dict]:
    """An open_clip CLIP state dict (``visual.*``, ``transformer.*``, ...) as a transformers ``CLIPModel`` config and
    state dict: the same network, renamed (fused in_proj split into q/k/v, projections transposed)."""
    vision_layers = _count_blocks(state, "visual.transformer.resblocks.")
    text_layers = _count_blocks(state, "transformer.resblocks.")
    patch = state["visual.conv1.weight"]
    vision_width, text_width = patch.shape[0], state["token_embedding.weight"].shape[1]
    positions = state["visual.positional_embedding"].shape[0]
    config = CLIPConfig(
        text_config=dict(
            vocab_size=state["token_embedding.weight"].shape[0],
            hidden_size=text_width,
            intermediate_size=state["transformer.resblocks.0.mlp.c_fc.weight"].shape[0],
            num_hidden_layers=text_layers,
            num_attention_heads=heads["text_heads"],
            max_position_embeddings=state["positional_embedding"].shape[0],
            hidden_act="gelu",
            # open_clip pools the text at its highest token id (the end-of-text token); transformers does the same
            # for eos_token_id=2 (its legacy CLIP behaviour)
            projection_dim=state["text_projection"].shape[1],
            eos_token_id=2,
        ),
        vision_config=dict(
            hidden_size=vision_width,
            intermediate_size=state["visual.transformer.resblocks.0.mlp.c_fc.weight"].shape[0],
            num_hidden_layers=vision_layers,
            num_attention_heads=heads["vision_heads"],
            patch_size=patch.shape[-1],
            image_size=patch.shape[-1] * round((positions - 1) ** 0.5),
            hidden_act="gelu",
            projection_dim=state["visual.proj"].shape[1],
        ),
        projection_dim=state["text_projection"].shape[1],
    )
    converted = {
        "logit_scale": state["logit_scale"],
        "text_model.embeddings.token_embedding.weight": state["token_embedding.weight"],
        "text_model.embeddings.position_embedding.weight": state["positional_embedding"],
        "text_model.final_layer_norm.weight": state["ln_final.weight"],
        "text_model.final_layer_norm.bias": state["ln_final.bias"],
        "text_projection.weight": state["text_projection"].T,
        "vision_model.embeddings.class_embedding": state["visual.class_embedding"],
        "vision_model.embeddings.patch_embedding.weight": patch,
        "vision_model.embeddings.position_embedding.weight": state["visual.positional_embedding"],
        "vision_model.pre_layrnorm.weight": state["visual.ln_pre.weight"],
        "vision_model.pre_layrnorm.bias": state["visual.ln_pre.bias"],
        "vision_model.post_layernorm.weight": state["visual.ln_post.weight"],
        "vision_model.post_layernorm.bias": state["visual.ln_post.bias"],
        "visual_projection.weight": state["visual.proj"].T,
    }
    for source, target, layers in (
        ("transformer.resblocks", "text_model.encoder.layers", text_layers),
        ("visual.transformer.resblocks", "vision_model.encoder.layers", vision_layers),
    ):
        for i in range(layers):
            converted.update(_residual_block(state, f"{source}.{i}", f"{target}.{i}"))
    return config, {key: value.contiguous() for key, value in converted.items()}


def _count_blocks(state: dict, prefix: str) -> int:
    return len({key[len(prefix) :].split(".")[0] for key in state if key.startswith(prefix)})


def _residual_block(state: dict, source: str, target: str) -> dict[str, torch.Tensor]:
    q_weight, k_weight, v_weight = state[f"{source}.attn.in_proj_weight"].chunk(3)
    q_bias, k_bias, v_bias = state[f"{source}.attn.in_proj_bias"].chunk(3)
    block = {
        f"{target}.self_attn.q_proj.weight": q_weight,
        f"{target}.self_attn.q_proj.bias": q_bias,
        f"{target}.self_attn.k_proj.weight": k_weight,
        f"{target}.self_attn.k_proj.bias": k_bias,
        f"{target}.self_attn.v_proj.weight": v_weight,
        f"{target}.self_attn.v_proj.bias": v_bias,
    }
    renames = {
        "attn.out_proj": "self_attn.out_proj",
        "ln_1": "layer_norm1",
        "ln_2": "layer_norm2",
        "mlp.c_fc": "mlp.fc1",
        "mlp.c_proj": "mlp.fc2",
    }
    for old, new in renames.items():
        for kind in ("weight", "bias"):
            block[f"{target}.{new}.{kind}"] = state[f"{source}.{old}.{kind}"]
    return block


class HPSv2(Reward):
    """Human Preference Score v2 / v2.1 (Wu et al., 2023): cos(E_image, E_text) of open_clip's ViT-H-14 fine-tuned
    on HPD v2, with images letterboxed as its evaluation transform does. The released open_clip checkpoint is
    converted once, at load, into a transformers CLIPModel (the same network), so open_clip is not needed."""

    differentiable = True
    checkpoints = {"hpsv2": "HPS_v2_compressed.pt", "hpsv2.1": "HPS_v2.1_compressed.pt"}
    repo = "xswu/HPSv2"

    def __init__(self, tower: ClipTower, name: str = "hpsv2.1"):
        super().__init__()
        self.tower, self.name = tower, name

    @classmethod
    def load(cls, path_or_id=None, version: str = "hpsv2.1") -> HPSv2:
        """``path_or_id``: a folder with the checkpoint and CLIP's tokenizer files (vocab.json, merges.txt), or the
        checkpoint file itself (the tokenizer then comes from the hub). An ``open_clip_config.json`` beside the
        checkpoint overrides the ViT-H-14 head counts."""
        checkpoint_name = cls.checkpoints[version]
        files = f"{checkpoint_name} ({cls.repo}) and the tokenizer of {LAION_VIT_H}"
        source = weights_source(version, path_or_id)
        tokenizer_source = LAION_VIT_H
        if isinstance(source, Path):
            checkpoint = source / checkpoint_name if source.is_dir() else source
            if source.is_dir() and (source / "vocab.json").is_file():
                tokenizer_source = source
            if not checkpoint.is_file():
                raise missing_weights(version, files, f"the folder {source}")
        else:
            from huggingface_hub import hf_hub_download

            repo = source or cls.repo
            checkpoint = load_or_explain(version, files, repo, lambda: Path(hf_hub_download(repo, checkpoint_name)))
        heads = VIT_H_14
        if (checkpoint.parent / "open_clip_config.json").is_file():
            heads = {**heads, **json.loads((checkpoint.parent / "open_clip_config.json").read_text())}
        state = load_checkpoint(version, checkpoint)
        state = state.get("state_dict", state)
        state = {key.removeprefix("module."): value for key, value in state.items()}
        config, converted = open_clip_to_transformers(state, heads)
        model = CLIPModel(config)
        load_exactly(model, converted, version)
        tokenizer = load_or_explain(
            version, files, "the Hugging Face hub", lambda: CLIPTokenizer.from_pretrained(tokenizer_source)
        )
        size = config.vision_config.image_size  # upstream evaluates with open_clip's ResizeMaxSize: letterboxed
        preprocessing = {
            "shortest_edge": size,
            "crop": (size, size),
            "mean": OPENAI_CLIP_MEAN,
            "std": OPENAI_CLIP_STD,
            "letterbox": True,
        }
        return cls(ClipTower(model, tokenizer, preprocessing), name=version)

    def score(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        return cosine(self.tower.image_features(images), self.tower.text_features(prompts))
