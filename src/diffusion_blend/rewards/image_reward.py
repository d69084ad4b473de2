"""ImageReward (Xu et al., 2023), reimplemented on current transformers.

The released model is BLIP: a ViT (ViT-L/16 at 224 px) encodes the image, a BERT text encoder with cross-attention
reads the prompt while attending to the image, and an MLP on the [CLS] state gives the reward, normalised with the
published mean and standard deviation. transformers' ``BlipVisionModel`` and ``BlipTextModel`` are the same networks
(ports of BLIP's ``vit.py`` and ``med.py``), so the released ``ImageReward.pt`` loads into them after renaming keys;
the ImageReward package itself (which does not import with transformers 5) is not needed.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from transformers import BertTokenizer, BlipTextConfig, BlipTextModel, BlipVisionConfig, BlipVisionModel

from .base import (
    Reward,
    ScoreHead,
    load_checkpoint,
    load_exactly,
    load_or_explain,
    missing_weights,
    normalize,
    resize_and_crop,
    weights_source,
)
from .clip import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

#: ImageReward.score's normalisation of the MLP output.
REWARD_MEAN, REWARD_STD = 0.16717362830052426, 1.0333394966054072
#: ImageReward.score's tokenisation.
MAX_TOKENS = 35
#: BLIP's ViTs use 64-wide attention heads (ViT-B: 12 heads, ViT-L: 16), which fixes the head count from the width.
HEAD_WIDTH = 64


def blip_vision_from_original(state: dict[str, torch.Tensor], prefix: str = "blip.visual_encoder."):
    """BLIP's ViT weights (``cls_token``, ``blocks.N.attn.qkv``, ...) as a ``BlipVisionModel`` config and state dict."""
    state = {key[len(prefix) :]: value for key, value in state.items() if key.startswith(prefix)}
    patch = state["patch_embed.proj.weight"]
    width, patch_size = patch.shape[0], patch.shape[-1]
    layers = len({key.split(".")[1] for key in state if key.startswith("blocks.")})
    positions = state["pos_embed"].shape[1]
    config = BlipVisionConfig(
        hidden_size=width,
        intermediate_size=state["blocks.0.mlp.fc1.weight"].shape[0],
        num_hidden_layers=layers,
        num_attention_heads=max(1, width // HEAD_WIDTH),
        patch_size=patch_size,
        image_size=patch_size * round((positions - 1) ** 0.5),
        layer_norm_eps=1e-6,
        hidden_act="gelu",
    )
    renames = {
        "norm1": "layer_norm1",
        "norm2": "layer_norm2",
        "attn.qkv": "self_attn.qkv",
        "attn.proj": "self_attn.projection",
        "mlp.fc1": "mlp.fc1",
        "mlp.fc2": "mlp.fc2",
    }
    converted = {
        "embeddings.class_embedding": state["cls_token"],
        "embeddings.position_embedding": state["pos_embed"],
        "embeddings.patch_embedding.weight": patch,
        "embeddings.patch_embedding.bias": state["patch_embed.proj.bias"],
        "post_layernorm.weight": state["norm.weight"],
        "post_layernorm.bias": state["norm.bias"],
    }
    for i in range(layers):
        for old, new in renames.items():
            for kind in ("weight", "bias"):
                converted[f"encoder.layers.{i}.{new}.{kind}"] = state[f"blocks.{i}.{old}.{kind}"]
    return config, converted


def blip_text_from_original(
    state: dict[str, torch.Tensor], med_config: dict, encoder_width: int, prefix: str = "blip.text_encoder."
):
    """BLIP's BERT-with-cross-attention (``med.py``) weights as a ``BlipTextModel`` config and state dict: the
    port keeps BLIP's parameter names, so only the prefix goes."""
    converted = {
        key[len(prefix) :]: value
        for key, value in state.items()
        if key.startswith(prefix) and not key.endswith("position_ids")
    }
    config = BlipTextConfig(
        vocab_size=converted["embeddings.word_embeddings.weight"].shape[0],
        hidden_size=med_config["hidden_size"],
        encoder_hidden_size=encoder_width,
        intermediate_size=med_config["intermediate_size"],
        num_hidden_layers=med_config["num_hidden_layers"],
        num_attention_heads=med_config["num_attention_heads"],
        max_position_embeddings=med_config["max_position_embeddings"],
        layer_norm_eps=med_config.get("layer_norm_eps", 1e-12),
        hidden_act=med_config.get("hidden_act", "gelu"),
        is_decoder=True,  # builds the cross-attention layers; the forward pass runs bidirectionally
    )
    return config, converted


class ImageReward(Reward):
    """ImageReward: MLP([CLS] of BERT(prompt ⟂ cross-attending to ViT(image))), normalised by its published mean/std."""

    name = "imagereward"
    differentiable = True
    repo, files = "THUDM/ImageReward", ("ImageReward.pt", "med_config.json")
    tokenizer_id = "bert-base-uncased"

    def __init__(self, vision: BlipVisionModel, text: BlipTextModel, head: ScoreHead, tokenizer):
        super().__init__()
        self.vision = vision.eval().requires_grad_(False)
        self.text = text.eval().requires_grad_(False)
        self.head = head
        self.tokenizer = tokenizer
        self.image_size = vision.config.image_size

    @classmethod
    def load(cls, path_or_id=None) -> ImageReward:
        """``path_or_id``: a folder with ImageReward.pt, med_config.json and BERT's vocab.txt (the tokenizer then
        comes from the folder; otherwise from the hub's bert-base-uncased)."""
        needed = f"{', '.join(cls.files)} ({cls.repo}) and the {cls.tokenizer_id} tokenizer"
        source = weights_source(cls.name, path_or_id)
        folder = source if isinstance(source, Path) else None
        if folder is None:
            from huggingface_hub import hf_hub_download

            repo = source or cls.repo
            folder = load_or_explain(cls.name, needed, repo, lambda: Path(hf_hub_download(repo, cls.files[0])).parent)
            load_or_explain(cls.name, needed, repo, lambda: hf_hub_download(repo, cls.files[1]))
        if not all((folder / name).is_file() for name in cls.files):
            raise missing_weights(cls.name, needed, f"the folder {folder}")
        tokenizer_source = folder if (folder / "vocab.txt").is_file() else cls.tokenizer_id
        tokenizer = load_or_explain(
            cls.name, needed, "the Hugging Face hub", lambda: BertTokenizer.from_pretrained(str(tokenizer_source))
        )
        state = load_checkpoint(cls.name, folder / cls.files[0])
        state = state.get("state_dict", state)
        vision_config, vision_state = blip_vision_from_original(state)
        vision = BlipVisionModel(vision_config)
        load_exactly(vision, vision_state, cls.name)
        med_config = json.loads((folder / cls.files[1]).read_text())
        text_config, text_state = blip_text_from_original(state, med_config, vision_config.hidden_size)
        text = BlipTextModel(text_config, add_pooling_layer=False)
        load_exactly(text, text_state, cls.name)
        return cls(vision, text, ScoreHead.from_state_dict(state, prefix="mlp.layers."), tokenizer)

    def score(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        pixels = normalize(
            resize_and_crop(images, self.image_size, (self.image_size,) * 2), OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
        ).to(self.vision.dtype)
        image_embeds = self.vision(pixel_values=pixels).last_hidden_state
        tokens = self.tokenizer(
            prompts, padding="max_length", truncation=True, max_length=MAX_TOKENS, return_tensors="pt"
        ).to(image_embeds.device)
        text = self.text(
            input_ids=tokens.input_ids,
            attention_mask=tokens.attention_mask,
            encoder_hidden_states=image_embeds,
            encoder_attention_mask=torch.ones(image_embeds.shape[:-1], dtype=torch.long, device=image_embeds.device),
        )
        features = text.last_hidden_state[:, 0, :]
        rewards = self.head(features.to(self.head.layers[0].weight.dtype)).float()
        return ((rewards - REWARD_MEAN) / REWARD_STD).squeeze(-1)
