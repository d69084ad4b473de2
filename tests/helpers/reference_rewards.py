"""Independent references for the converted reward models, written directly on the released formats.

- ``blip_image_reward``: BLIP's ViT (``vit.py``) and its BERT with cross-attention (``med.py``, multimodal mode) as
  plain functions over an ImageReward-format state dict, then the MLP and the published normalisation.
- ``OpenClipReference``: open_clip's CLIP built from ``nn.MultiheadAttention`` with open_clip's parameter names, so
  its ``state_dict()`` is an HPSv2-format checkpoint.

Neither uses transformers, so they check the library's key renaming and architecture choices from outside.
"""

from __future__ import annotations

import math
from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import nn

IMAGE_REWARD_MEAN, IMAGE_REWARD_STD = 0.16717362830052426, 1.0333394966054072


def _linear(state, x, name):
    return F.linear(x, state[f"{name}.weight"], state[f"{name}.bias"])


def _layer_norm(state, x, name, eps):
    return F.layer_norm(x, x.shape[-1:], state[f"{name}.weight"], state[f"{name}.bias"], eps)


def blip_vit(state, pixels, heads, prefix="blip.visual_encoder."):
    patch = state[f"{prefix}patch_embed.proj.weight"]
    x = (
        F.conv2d(pixels, patch, state[f"{prefix}patch_embed.proj.bias"], stride=patch.shape[-1])
        .flatten(2)
        .transpose(1, 2)
    )
    x = torch.cat([state[f"{prefix}cls_token"].expand(len(x), -1, -1), x], 1) + state[f"{prefix}pos_embed"]
    block = 0
    while f"{prefix}blocks.{block}.norm1.weight" in state:
        name = f"{prefix}blocks.{block}"
        batch, tokens, width = x.shape
        qkv = _linear(state, _layer_norm(state, x, f"{name}.norm1", 1e-6), f"{name}.attn.qkv")
        q, k, v = qkv.reshape(batch, tokens, 3, heads, width // heads).permute(2, 0, 3, 1, 4)
        attention = ((q @ k.transpose(-2, -1)) * (width // heads) ** -0.5).softmax(-1)
        x = x + _linear(state, (attention @ v).transpose(1, 2).reshape(batch, tokens, width), f"{name}.attn.proj")
        hidden = F.gelu(_linear(state, _layer_norm(state, x, f"{name}.norm2", 1e-6), f"{name}.mlp.fc1"))
        x = x + _linear(state, hidden, f"{name}.mlp.fc2")
        block += 1
    return _layer_norm(state, x, f"{prefix}norm", 1e-6)


def _bert_attention(state, hidden, context, mask, name, heads):
    batch, length, width = hidden.shape
    size = width // heads

    def split(x, which):
        return _linear(state, x, f"{name}.self.{which}").view(batch, x.shape[1], heads, size).transpose(1, 2)

    scores = split(hidden, "query") @ split(context, "key").transpose(-1, -2) / math.sqrt(size)
    scores = scores + (1.0 - mask[:, None, None, :].float()) * -10000.0
    out = (scores.softmax(-1) @ split(context, "value")).transpose(1, 2).reshape(batch, length, width)
    return _layer_norm(state, _linear(state, out, f"{name}.output.dense") + hidden, f"{name}.output.LayerNorm", 1e-12)


def blip_text(state, ids, mask, image, heads, prefix="blip.text_encoder."):
    hidden = state[f"{prefix}embeddings.word_embeddings.weight"][ids]
    hidden = hidden + state[f"{prefix}embeddings.position_embeddings.weight"][: ids.shape[1]]
    hidden = _layer_norm(state, hidden, f"{prefix}embeddings.LayerNorm", 1e-12)
    image_mask = torch.ones(image.shape[:2], dtype=torch.long)
    layer = 0
    while f"{prefix}encoder.layer.{layer}.attention.self.query.weight" in state:
        name = f"{prefix}encoder.layer.{layer}"
        hidden = _bert_attention(state, hidden, hidden, mask, f"{name}.attention", heads)
        hidden = _bert_attention(state, hidden, image, image_mask, f"{name}.crossattention", heads)
        inner = F.gelu(_linear(state, hidden, f"{name}.intermediate.dense"))
        hidden = _layer_norm(
            state, _linear(state, inner, f"{name}.output.dense") + hidden, f"{name}.output.LayerNorm", 1e-12
        )
        layer += 1
    return hidden


def blip_image_reward(state, ids, mask, pixels, vision_heads, text_heads):
    cls = blip_text(state, ids, mask, blip_vit(state, pixels, vision_heads), text_heads)[:, 0]
    for index in (0, 2, 4, 6, 7):
        cls = _linear(state, cls, f"mlp.layers.{index}")
    return ((cls - IMAGE_REWARD_MEAN) / IMAGE_REWARD_STD).squeeze(-1)


class _Block(nn.Module):
    def __init__(self, width, heads):
        super().__init__()
        self.ln_1, self.ln_2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.attn = nn.MultiheadAttention(width, heads)
        self.mlp = nn.Sequential(
            OrderedDict(c_fc=nn.Linear(width, 4 * width), gelu=nn.GELU(), c_proj=nn.Linear(4 * width, width))
        )

    def forward(self, x, mask=None):  # x: [tokens, batch, width], open_clip's classic layout
        y = self.ln_1(x)
        x = x + self.attn(y, y, y, need_weights=False, attn_mask=mask)[0]
        return x + self.mlp(self.ln_2(x))


class _Transformer(nn.Module):
    def __init__(self, width, layers, heads):
        super().__init__()
        self.resblocks = nn.ModuleList(_Block(width, heads) for _ in range(layers))

    def forward(self, x, mask=None):
        for block in self.resblocks:
            x = block(x, mask)
        return x


class _Visual(nn.Module):
    def __init__(self, width, patch, size, layers, heads, dim):
        super().__init__()
        scale = width**-0.5
        self.conv1 = nn.Conv2d(3, width, patch, patch, bias=False)
        self.class_embedding = nn.Parameter(scale * torch.randn(width))
        self.positional_embedding = nn.Parameter(scale * torch.randn((size // patch) ** 2 + 1, width))
        self.ln_pre, self.ln_post = nn.LayerNorm(width), nn.LayerNorm(width)
        self.transformer = _Transformer(width, layers, heads)
        self.proj = nn.Parameter(scale * torch.randn(width, dim))

    def forward(self, pixels):
        x = self.conv1(pixels).flatten(2).permute(0, 2, 1)
        x = torch.cat([self.class_embedding + torch.zeros(len(x), 1, x.shape[-1]), x], 1) + self.positional_embedding
        x = self.transformer(self.ln_pre(x).permute(1, 0, 2)).permute(1, 0, 2)
        return self.ln_post(x[:, 0]) @ self.proj


class OpenClipReference(nn.Module):
    """open_clip's CLIP (image tower ``visual.*``, text tower at the top level) at a tiny size."""

    def __init__(
        self,
        vocab,
        text_width=16,
        context=16,
        text_heads=2,
        vision_width=24,
        vision_heads=3,
        dim=8,
        image=32,
        patch=8,
        layers=2,
    ):
        super().__init__()
        self.visual = _Visual(vision_width, patch, image, layers, vision_heads, dim)
        self.transformer = _Transformer(text_width, layers, text_heads)
        self.token_embedding = nn.Embedding(vocab, text_width)
        self.positional_embedding = nn.Parameter(0.01 * torch.randn(context, text_width))
        self.ln_final = nn.LayerNorm(text_width)
        self.text_projection = nn.Parameter(text_width**-0.5 * torch.randn(text_width, dim))
        self.logit_scale = nn.Parameter(torch.tensor(2.0))
        self.register_buffer("attn_mask", torch.full((context, context), float("-inf")).triu(1), persistent=False)

    def encode_text(self, ids):
        """The text read at its highest token id (open_clip's end-of-text pooling)."""
        x = self.token_embedding(ids) + self.positional_embedding
        x = self.ln_final(self.transformer(x.permute(1, 0, 2), self.attn_mask).permute(1, 0, 2))
        return x[torch.arange(len(x)), ids.argmax(-1)] @ self.text_projection

    def score(self, pixels, ids):
        return F.cosine_similarity(self.visual(pixels), self.encode_text(ids))
