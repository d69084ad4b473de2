"""Tiny random reward models of the real architectures, saved in their released formats.

CLIP-based rewards are transformers folders; HPSv2 is an open_clip state dict and ImageReward a BLIP state dict —
written here by renaming a tiny transformers model's keys to the released names (the inverse of the library's
conversion), so the files go through the same loading path as the real downloads.
"""

from __future__ import annotations

import json
import string
from pathlib import Path

import torch
from transformers import (
    BertTokenizer,
    BlipTextConfig,
    BlipTextModel,
    BlipVisionConfig,
    BlipVisionModel,
    CLIPConfig,
    CLIPModel,
    CLIPTokenizer,
)

IMAGE = 32  # tiny models see 32×32 images
MEAN = [0.48145466, 0.4578275, 0.40821073]
STD = [0.26862954, 0.26130258, 0.27577711]


def clip_tokenizer(eos_last: bool = False) -> CLIPTokenizer:
    """A CLIP BPE tokenizer over letters and digits; with ``eos_last`` the special tokens get the highest ids, as in
    the real CLIP vocabulary (open_clip pools at the highest id)."""
    symbols = list(string.ascii_lowercase + string.digits)
    tokens = [*symbols, *(s + "</w>" for s in symbols), ".", ".</w>"]
    specials = ["<|startoftext|>", "<|endoftext|>"]
    vocab = tokens + specials if eos_last else specials + tokens
    return CLIPTokenizer(vocab={t: i for i, t in enumerate(vocab)}, merges=[], model_max_length=16)


def clip_model(tokenizer: CLIPTokenizer, seed: int = 0, legacy_eos: bool = False) -> CLIPModel:
    torch.manual_seed(seed)
    config = CLIPConfig(
        text_config=dict(
            vocab_size=len(tokenizer),
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            max_position_embeddings=16,
            hidden_act="gelu",
            eos_token_id=2 if legacy_eos else tokenizer.eos_token_id,
            bos_token_id=tokenizer.bos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        ),
        vision_config=dict(
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            image_size=IMAGE,
            patch_size=8,
            hidden_act="gelu",
        ),
        projection_dim=8,
        logit_scale_init_value=2.0,
    )
    return CLIPModel(config).eval()


def save_clip_folder(folder: Path, seed: int = 0, flip_image_projection: bool = False) -> Path:
    """A transformers CLIP folder (model, tokenizer, preprocessor config), as PickScore / CLIPScore ship.

    ``flip_image_projection`` negates the image projection: the tiny random model's cosines are all negative,
    which CLIPScore's max(cos, 0) would turn into zeros."""
    tokenizer = clip_tokenizer()
    model = clip_model(tokenizer, seed)
    if flip_image_projection:
        with torch.no_grad():
            model.visual_projection.weight.neg_()
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    (folder / "preprocessor_config.json").write_text(
        json.dumps(
            {
                "size": {"shortest_edge": IMAGE},
                "crop_size": {"height": IMAGE, "width": IMAGE},
                "image_mean": MEAN,
                "image_std": STD,
            }
        )
    )
    return folder


def aesthetic_head(seed: int = 0, width: int = 8) -> torch.nn.Sequential:
    """The released head's layout: Linear, Dropout, Linear, Dropout, Linear, Dropout, Linear, Linear."""
    torch.manual_seed(seed)
    nn = torch.nn
    return nn.Sequential(
        nn.Linear(width, 16),
        nn.Dropout(0.2),
        nn.Linear(16, 8),
        nn.Dropout(0.2),
        nn.Linear(8, 4),
        nn.Dropout(0.1),
        nn.Linear(4, 2),
        nn.Linear(2, 1),
    ).eval()


def save_aesthetic_folder(folder: Path, seed: int = 0) -> Path:
    save_clip_folder(folder / "clip", seed)
    head = {f"layers.{key}": value for key, value in aesthetic_head(seed).state_dict().items()}  # the MLP's names
    torch.save(head, folder / "sac+logos+ava1-l14-linearMSE.pth")
    return folder


# ------------------------------------------------------------------------------------------------- HPSv2
def transformers_to_open_clip(model: CLIPModel) -> dict[str, torch.Tensor]:
    """A transformers CLIPModel's weights under open_clip's names (fused q/k/v, transposed projections)."""
    state = model.state_dict()
    out = {
        "logit_scale": state["logit_scale"],
        "token_embedding.weight": state["text_model.embeddings.token_embedding.weight"],
        "positional_embedding": state["text_model.embeddings.position_embedding.weight"],
        "ln_final.weight": state["text_model.final_layer_norm.weight"],
        "ln_final.bias": state["text_model.final_layer_norm.bias"],
        "text_projection": state["text_projection.weight"].T,
        "visual.class_embedding": state["vision_model.embeddings.class_embedding"],
        "visual.conv1.weight": state["vision_model.embeddings.patch_embedding.weight"],
        "visual.positional_embedding": state["vision_model.embeddings.position_embedding.weight"],
        "visual.ln_pre.weight": state["vision_model.pre_layrnorm.weight"],
        "visual.ln_pre.bias": state["vision_model.pre_layrnorm.bias"],
        "visual.ln_post.weight": state["vision_model.post_layernorm.weight"],
        "visual.ln_post.bias": state["vision_model.post_layernorm.bias"],
        "visual.proj": state["visual_projection.weight"].T,
    }
    for hf, oc, layers in (
        ("text_model.encoder.layers", "transformer.resblocks", model.config.text_config.num_hidden_layers),
        ("vision_model.encoder.layers", "visual.transformer.resblocks", model.config.vision_config.num_hidden_layers),
    ):
        for i in range(layers):
            h, o = f"{hf}.{i}", f"{oc}.{i}"
            out[f"{o}.attn.in_proj_weight"] = torch.cat([state[f"{h}.self_attn.{p}_proj.weight"] for p in "qkv"])
            out[f"{o}.attn.in_proj_bias"] = torch.cat([state[f"{h}.self_attn.{p}_proj.bias"] for p in "qkv"])
            for new, old in (
                ("attn.out_proj", "self_attn.out_proj"),
                ("ln_1", "layer_norm1"),
                ("ln_2", "layer_norm2"),
                ("mlp.c_fc", "mlp.fc1"),
                ("mlp.c_proj", "mlp.fc2"),
            ):
                for kind in ("weight", "bias"):
                    out[f"{o}.{new}.{kind}"] = state[f"{h}.{old}.{kind}"]
    return {key: value.clone() for key, value in out.items()}


def save_hps_folder(
    folder: Path, seed: int = 0, version_file: str = "HPS_v2.1_compressed.pt"
) -> tuple[Path, CLIPModel]:
    tokenizer = clip_tokenizer(eos_last=True)
    model = clip_model(tokenizer, seed, legacy_eos=True)
    folder.mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": transformers_to_open_clip(model)}, folder / version_file)
    (folder / "open_clip_config.json").write_text(json.dumps({"vision_heads": 2, "text_heads": 2}))
    tokenizer.save_pretrained(folder)
    if not (folder / "vocab.json").is_file():  # the tokenizers backend saves tokenizer.json; the loader looks for vocab
        (folder / "vocab.json").write_text(json.dumps(tokenizer.get_vocab()))
        (folder / "merges.txt").write_text("#version: 0.2\n")
    return folder, model


# --------------------------------------------------------------------------------------------- ImageReward
def bert_vocab() -> list[str]:
    return ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *string.ascii_lowercase, *string.digits, "."]


def blip_models(seed: int = 0) -> tuple[BlipVisionModel, BlipTextModel, torch.nn.Sequential, dict]:
    torch.manual_seed(seed)
    vision = BlipVisionModel(
        BlipVisionConfig(
            hidden_size=128,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            image_size=IMAGE,
            patch_size=8,
            layer_norm_eps=1e-6,
        )
    ).eval()
    med = {
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "max_position_embeddings": 64,
        "vocab_size": len(bert_vocab()) + 2,
        "layer_norm_eps": 1e-12,
        "hidden_act": "gelu",
        "add_cross_attention": True,
    }
    text = BlipTextModel(
        BlipTextConfig(
            vocab_size=med["vocab_size"],
            hidden_size=32,
            encoder_hidden_size=128,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            max_position_embeddings=64,
            is_decoder=True,
        ),
        add_pooling_layer=False,
    ).eval()
    head = aesthetic_head(seed, width=32)  # ImageReward's MLP has the same layout
    return vision, text, head, med


def save_image_reward_folder(folder: Path, seed: int = 0):
    vision, text, head, med = blip_models(seed)
    state = {}
    renames = {
        "layer_norm1": "norm1",
        "layer_norm2": "norm2",
        "self_attn.qkv": "attn.qkv",
        "self_attn.projection": "attn.proj",
        "mlp.fc1": "mlp.fc1",
        "mlp.fc2": "mlp.fc2",
    }
    v = vision.state_dict()
    state["blip.visual_encoder.cls_token"] = v["embeddings.class_embedding"]
    state["blip.visual_encoder.pos_embed"] = v["embeddings.position_embedding"]
    state["blip.visual_encoder.patch_embed.proj.weight"] = v["embeddings.patch_embedding.weight"]
    state["blip.visual_encoder.patch_embed.proj.bias"] = v["embeddings.patch_embedding.bias"]
    state["blip.visual_encoder.norm.weight"] = v["post_layernorm.weight"]
    state["blip.visual_encoder.norm.bias"] = v["post_layernorm.bias"]
    for i in range(vision.config.num_hidden_layers):
        for hf, original in renames.items():
            for kind in ("weight", "bias"):
                state[f"blip.visual_encoder.blocks.{i}.{original}.{kind}"] = v[f"encoder.layers.{i}.{hf}.{kind}"]
    for key, value in text.state_dict().items():
        state[f"blip.text_encoder.{key}"] = value
    for key, value in head.state_dict().items():
        state[f"mlp.layers.{key}"] = value
    state["blip.vision_proj.weight"] = torch.zeros(4, 128)  # released checkpoints hold more than scoring needs
    folder.mkdir(parents=True, exist_ok=True)
    torch.save({key: value.clone() for key, value in state.items()}, folder / "ImageReward.pt")
    (folder / "med_config.json").write_text(json.dumps(med))
    (folder / "vocab.txt").write_text("\n".join(bert_vocab()) + "\n")
    return folder, (vision, text, head, BertTokenizer.from_pretrained(str(folder)))
