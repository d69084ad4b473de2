"""The blend on the denoisers of other model families, each called as its pipeline calls it: video transformers
(Wan, Wan VACE, Wan first-and-last-frame, HunyuanVideo and 1.5, HunyuanVideo-Framepack, Cosmos, Mochi, LTX-Video,
LTX-2 — two predictions, video and audio —, CogVideoX, SkyReels-V2 image-to-video and diffusion forcing — a timestep
per frame —, ChronoEdit, Wan-Animate — pose latents and a face video —, Helios — compressed history latents), Sana,
Chroma, CogView4, FLUX.2 (batched position ids), HiDream (Llama-3 states with the batch second), Lumina 2, Kandinsky
2.2's UNet (image embeddings), Qwen-Image-Edit-2511 (per-sample ``img_shapes`` choosing each token's timestep), Z-Image
(a list with one tensor per sample, of different sizes, in and out), AuraFlow, Bria, Bria FIBO (a list of per-block
text states, an attention mask in ``joint_attention_kwargs``), LongCat-Image, Ovis-Image and the SD x4 upscaler's UNet
(the noise level as ``class_labels``). The reference is peft's own forward with one adapter active, combined by the
equation sample by sample. PixArt-Σ (``added_cond_kwargs``), Stable Video Diffusion (``added_time_ids``) and
I2VGen-XL (image latents and embeddings, fps), on which diffusers loads no LoRA, blend full members instead."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from diffusion_blend import Blend, BlendedDenoiser, blend_predictions
from helpers import tiny
from helpers.calls import forward_calls, max_diff

ROWS = 3
WEIGHTS, KL_SCALE = {"a": 0.3, "b": 0.5}, 1.5


def _randn(*shape, generator):
    return torch.randn(*shape, generator=generator)


def _wan_inputs(g):
    return dict(
        hidden_states=_randn(ROWS, 4, 2, 8, 8, generator=g),
        timestep=torch.tensor([500] * ROWS),
        encoder_hidden_states=_randn(ROWS, 12, 16, generator=g),
    )


def _wan_vace_inputs(g):
    return _wan_inputs(g) | dict(
        control_hidden_states=_randn(ROWS, 8, 2, 8, 8, generator=g), control_hidden_states_scale=torch.tensor([1.0])
    )


def _flux2_inputs(g):
    """Position ids with a batch axis (as FLUX.2's pipeline makes them), 4×4 image and 6 text tokens."""
    image_ids = torch.cartesian_prod(torch.zeros(1), torch.arange(4.0), torch.arange(4.0), torch.zeros(1))
    text_ids = torch.cartesian_prod(torch.zeros(1), torch.zeros(1), torch.zeros(1), torch.arange(6.0))
    return dict(
        hidden_states=_randn(ROWS, 16, 4, generator=g),
        encoder_hidden_states=_randn(ROWS, 6, 32, generator=g),
        timestep=torch.tensor([0.5] * ROWS),
        img_ids=image_ids.expand(ROWS, -1, -1),
        txt_ids=text_ids.expand(ROWS, -1, -1),
        guidance=torch.tensor([4.0] * ROWS),
    )


def _wan_flf2v_inputs(g, rows=ROWS):
    """The first and last frames' image tokens, repeated per sample as the pipeline does: 2 rows per sample."""
    return dict(
        hidden_states=_randn(rows, 8, 2, 8, 8, generator=g),
        timestep=torch.tensor([500] * rows),
        encoder_hidden_states=_randn(rows, 12, 16, generator=g),
        encoder_hidden_states_image=_randn(2, 17, 4, generator=g).repeat(rows, 1, 1),
    )


def _framepack_inputs(g, rows=ROWS):
    """A window of 3 latent frames, history of 1 clean, 2 (2×) and 4 (4×) frames, indexed as the pipeline splits
    ``arange``: 1-D indices of lengths 3, 2 (prefix and clean), 2 and 4."""
    prefix, window, history_4x, history_2x, history_1x = torch.arange(11).split([1, 3, 4, 2, 1])
    return dict(
        hidden_states=_randn(rows, 4, 3, 4, 4, generator=g),
        timestep=torch.tensor([700] * rows),
        encoder_hidden_states=_randn(rows, 12, 16, generator=g),
        encoder_attention_mask=torch.ones(rows, 12),
        pooled_projections=_randn(rows, 8, generator=g),
        guidance=torch.tensor([6000.0] * rows),
        image_embeds=_randn(rows, 12, 16, generator=g),
        indices_latents=window,
        latents_clean=_randn(rows, 4, 2, 4, 4, generator=g),
        indices_latents_clean=torch.cat([prefix, history_1x]),
        latents_history_2x=_randn(rows, 4, 2, 4, 4, generator=g),
        indices_latents_history_2x=history_2x,
        latents_history_4x=_randn(rows, 4, 4, 4, 4, generator=g),
        indices_latents_history_4x=history_4x,
    )


def _chroma_inputs(g):
    """Unbatched position ids, as FLUX.1's; a mask over text and image tokens, one sample's prompt shorter."""
    mask = torch.ones(ROWS, 6 + 16, dtype=torch.bool)
    mask[1, 4:6] = False
    return dict(
        hidden_states=_randn(ROWS, 16, 4, generator=g),
        encoder_hidden_states=_randn(ROWS, 6, 32, generator=g),
        timestep=torch.tensor([0.7] * ROWS),
        txt_ids=torch.zeros(6, 3),
        attention_mask=mask,
        img_ids=torch.cartesian_prod(torch.zeros(1), torch.arange(4.0), torch.arange(4.0)),
    )


def _cogview4_inputs(g):
    size = torch.tensor([[64, 64]] * ROWS)
    return dict(
        hidden_states=_randn(ROWS, 4, 8, 8, generator=g),
        encoder_hidden_states=_randn(ROWS, 8, 8, generator=g),
        timestep=torch.tensor([600] * ROWS),
        original_size=size,
        target_size=size,
        crop_coords=torch.zeros(ROWS, 2),
    )


def _mochi_inputs(g):
    mask = torch.ones(ROWS, 16, dtype=torch.bool)
    mask[1, 10:] = False  # a shorter prompt
    return dict(
        hidden_states=_randn(ROWS, 4, 2, 8, 8, generator=g),
        encoder_hidden_states=_randn(ROWS, 16, 16, generator=g),
        timestep=torch.tensor([600] * ROWS),
        encoder_attention_mask=mask,
    )


def _hunyuan_video15_inputs(g):
    mask = torch.ones(ROWS, 6)
    mask[1, 4:] = 0
    return dict(
        hidden_states=_randn(ROWS, 4, 1, 8, 8, generator=g),
        timestep=torch.tensor([700.0] * ROWS),
        encoder_hidden_states=_randn(ROWS, 6, 16, generator=g),
        encoder_hidden_states_2=_randn(ROWS, 4, 8, generator=g),
        encoder_attention_mask=mask,
        encoder_attention_mask_2=torch.ones(ROWS, 4),
        image_embeds=torch.zeros(ROWS, 3, 12),
    )


def _kandinsky22_inputs(g):
    return dict(
        sample=_randn(ROWS, 4, 8, 8, generator=g),
        timestep=torch.tensor(500),
        encoder_hidden_states=None,
        added_cond_kwargs={"image_embeds": _randn(ROWS, 32, generator=g)},
    )


def _flux3_inputs(g):
    """A reference image of 3 tokens (as many as the rows): its (3, 4) position ids are not rows."""

    def ids(height, width, layer=0):
        return torch.cartesian_prod(
            *(torch.arange(float(size)) for size in (1, height, width)), torch.tensor([float(layer)])
        )

    return dict(
        hidden_states=_randn(ROWS, 16, 8, generator=g),
        encoder_hidden_states=_randn(ROWS, 5, 12, generator=g),
        timestep=torch.tensor([0.7] * ROWS),
        img_ids=ids(4, 4),
        txt_ids=torch.zeros(5, 4),
        image_cond_hidden_states=_randn(1, 3, 8, generator=g).repeat(ROWS, 1, 1),
        image_cond_ids=ids(1, 3, -1),
    )


def _kandinsky6_inputs(g, frames=2):
    """Video with an image condition (a tail frame: 3 frames, as many as the rows, located by shared rotary
    positions) and audio; the latents carry the condition and mask channels."""
    latents = _randn(ROWS, frames + 1, 4, 4, 4, generator=g)
    token_types = torch.zeros(ROWS, frames + 1, dtype=torch.long)
    token_types[:, -1] = 1
    return dict(
        hidden_states=torch.cat([latents, torch.zeros_like(latents), torch.zeros(*latents.shape[:-1], 1)], -1),
        encoder_hidden_states=_randn(ROWS, 5, 12, generator=g),
        pooled_projections=_randn(ROWS, 8, generator=g),
        timestep=torch.tensor([700.0] * ROWS),
        audio_hidden_states=_randn(ROWS, 7, 4, generator=g),
        visual_token_type_ids=token_types,
        visual_rope_pos=(
            torch.cat([torch.arange(frames), torch.zeros(1, dtype=torch.long)]),
            torch.arange(2),
            torch.arange(2),
        ),
    )


def _cosmos_inputs(g, rows=ROWS):
    """The padding mask as every Cosmos pipeline makes it: (1, 1, height, width) whatever the batch."""
    return dict(
        hidden_states=_randn(rows, 4, 1, 8, 8, generator=g),
        timestep=torch.tensor([500.0] * rows),
        encoder_hidden_states=_randn(rows, 12, 16, generator=g),
        fps=30,
        padding_mask=torch.zeros(1, 1, 8, 8),
    )


def _hidream_inputs(g):
    """Llama-3 states of two layers, stacked before the batch axis (layers, batch, tokens, width)."""
    return dict(
        hidden_states=_randn(ROWS, 4, 8, 8, generator=g),
        timesteps=torch.tensor([500] * ROWS),
        encoder_hidden_states_t5=_randn(ROWS, 8, 32, generator=g),
        encoder_hidden_states_llama3=_randn(2, ROWS, 8, 16, generator=g),
        pooled_embeds=_randn(ROWS, 64, generator=g),
    )


def _lumina2_inputs(g):
    mask = torch.ones(ROWS, 6, dtype=torch.bool)
    mask[1, 4:] = False  # a shorter caption
    return dict(
        hidden_states=_randn(ROWS, 4, 8, 8, generator=g),
        timestep=torch.tensor([0.3] * ROWS),
        encoder_hidden_states=_randn(ROWS, 6, 16, generator=g),
        encoder_attention_mask=mask,
    )


def _hunyuan_inputs(g):
    return dict(
        hidden_states=_randn(ROWS, 4, 1, 8, 8, generator=g),
        timestep=torch.tensor([3] * ROWS),
        encoder_hidden_states=_randn(ROWS, 12, 16, generator=g),
        pooled_projections=_randn(ROWS, 8, generator=g),
        encoder_attention_mask=torch.ones(ROWS, 12),
        guidance=torch.tensor([3000.0] * ROWS),
    )


def _ltx_inputs(g):
    return dict(
        hidden_states=_randn(ROWS, 2 * 4 * 4, 8, generator=g),
        encoder_hidden_states=_randn(ROWS, 6, 16, generator=g),
        timestep=torch.tensor([700] * ROWS),
        encoder_attention_mask=torch.ones(ROWS, 6).bool(),
        num_frames=2,
        height=4,
        width=4,
    )


def _ltx2_inputs(g, frames=2, size=4, audio_frames=5):
    """Video and audio latents, each with its captions and position coordinates (batched, as the pipeline makes
    them)."""
    rope = tiny.ltx2_transformer()
    video_coords = rope.rope.prepare_video_coords(ROWS, frames, size, size, torch.device("cpu"), fps=25.0)
    audio_coords = rope.audio_rope.prepare_audio_coords(ROWS, audio_frames, torch.device("cpu"))
    return dict(
        hidden_states=_randn(ROWS, frames * size * size, 4, generator=g),
        audio_hidden_states=_randn(ROWS, audio_frames, 4, generator=g),
        encoder_hidden_states=_randn(ROWS, 6, 16, generator=g),
        audio_encoder_hidden_states=_randn(ROWS, 6, 16, generator=g),
        timestep=torch.tensor([700.0] * ROWS),
        sigma=torch.tensor([700.0] * ROWS),
        encoder_attention_mask=torch.ones(ROWS, 6),
        audio_encoder_attention_mask=torch.ones(ROWS, 6),
        num_frames=frames,
        height=size,
        width=size,
        fps=25.0,
        audio_num_frames=audio_frames,
        video_coords=video_coords,
        audio_coords=audio_coords,
    )


def _cogvideox_inputs(g):
    return dict(
        hidden_states=_randn(ROWS, 1, 4, 8, 8, generator=g),
        encoder_hidden_states=_randn(ROWS, 8, 8, generator=g),
        timestep=torch.tensor([600] * ROWS),
    )


def _sana_inputs(g):
    return dict(
        hidden_states=_randn(ROWS, 4, 8, 8, generator=g),
        encoder_hidden_states=_randn(ROWS, 5, 8, generator=g),
        timestep=torch.tensor([10] * ROWS),
    )


def _qwen_edit_inputs(g):
    """A target image and a reference image of 4×4 tokens each per sample."""
    return dict(
        hidden_states=_randn(ROWS, 2 * 16, 16, generator=g),
        encoder_hidden_states=_randn(ROWS, 7, 16, generator=g),
        encoder_hidden_states_mask=torch.ones(ROWS, 7),
        timestep=torch.tensor([0.6] * ROWS),
        img_shapes=[[(1, 4, 4), (1, 4, 4)] for _ in range(ROWS)],
    )


def _zimage_inputs(g):
    """Samples of three sizes and captions of three lengths (Z-Image takes them as lists)."""
    return dict(
        x=[_randn(4, 1, 8, 8, generator=g), _randn(4, 1, 4, 8, generator=g), _randn(4, 1, 8, 4, generator=g)],
        t=torch.tensor([0.5] * ROWS),
        cap_feats=[_randn(6, 16, generator=g), _randn(9, 16, generator=g), _randn(3, 16, generator=g)],
    )


def _auraflow_inputs(g):
    return dict(
        hidden_states=_randn(ROWS, 4, 8, 8, generator=g),
        timestep=torch.tensor([0.7] * ROWS),
        encoder_hidden_states=_randn(ROWS, 6, 16, generator=g),
    )


def _pixart_sigma_inputs(g):
    """PixArt-Σ's pipeline passes its size conditions as None in ``added_cond_kwargs``; one caption shorter."""
    mask = torch.ones(ROWS, 6)
    mask[1, 4:] = 0
    return dict(
        hidden_states=_randn(ROWS, 4, 8, 8, generator=g),
        timestep=torch.tensor([500] * ROWS),
        encoder_hidden_states=_randn(ROWS, 6, 16, generator=g),
        encoder_attention_mask=mask,
        added_cond_kwargs={"resolution": None, "aspect_ratio": None},
    )


def _wan_i2v_inputs(g):
    """Wan image-to-video's call (SkyReels-V2 I2V, ChronoEdit): the latents beside the frame mask and the image's
    latents (12 channels), the image's CLIP tokens repeated for each sample."""
    return dict(
        hidden_states=_randn(ROWS, 12, 2, 8, 8, generator=g),
        timestep=torch.tensor([500] * ROWS),
        encoder_hidden_states=_randn(ROWS, 12, 16, generator=g),
        encoder_hidden_states_image=_randn(1, 17, 4, generator=g).repeat(ROWS, 1, 1),
    )


def _skyreels_df_inputs(g, rows=ROWS):
    """Diffusion forcing: a timestep per latent frame (the first block's frames less noisy), fps as a list of one
    flag per sample."""
    timestep = torch.tensor([[100, 100, 700, 700]] * rows)
    return dict(
        hidden_states=_randn(rows, 4, 4, 8, 8, generator=g),
        timestep=timestep,
        enable_diffusion_forcing=True,
        encoder_hidden_states=_randn(rows, 12, 16, generator=g),
        fps=[1] * rows,
    )


def _wan_animate_inputs(g, frames=2):
    """A reference frame before 2 latent frames, pose latents of those 2, and 4·(2 − 1) + 1 face frames in pixels."""
    return dict(
        hidden_states=_randn(ROWS, 12, frames + 1, 8, 8, generator=g),
        timestep=torch.tensor([500] * ROWS),
        encoder_hidden_states=_randn(ROWS, 12, 16, generator=g),
        encoder_hidden_states_image=_randn(1, 17, 4, generator=g).repeat(ROWS, 1, 1),
        pose_hidden_states=_randn(ROWS, 4, frames, 8, 8, generator=g),
        face_pixel_values=_randn(ROWS, 3, 4 * (frames - 1) + 1, 8, 8, generator=g),
        motion_encode_batch_size=None,
    )


def _helios_inputs(g, rows=ROWS):
    """A window of 2 latent frames after history of 4 (long), 2 (mid) and 2 (short: the first frame and the last)
    frames, indexed as the pipeline splits ``arange``: (1, frames) indices, whatever the batch."""
    prefix, long, mid, short_1x, window = torch.arange(10).split([1, 4, 2, 1, 2])
    return dict(
        hidden_states=_randn(rows, 4, 2, 8, 8, generator=g),
        timestep=torch.tensor([700.0] * rows),
        encoder_hidden_states=_randn(rows, 12, 16, generator=g),
        indices_hidden_states=window[None],
        indices_latents_history_short=torch.cat([prefix, short_1x])[None],
        indices_latents_history_mid=mid[None],
        indices_latents_history_long=long[None],
        latents_history_short=_randn(rows, 4, 2, 8, 8, generator=g),
        latents_history_mid=_randn(rows, 4, 2, 8, 8, generator=g),
        latents_history_long=_randn(rows, 4, 4, 8, 8, generator=g),
    )


def _image_ids(height=4, width=4, modality=0.0, start=0.0):
    """FLUX.1-style (tokens, 3) position ids of a height × width image, unbatched."""
    rows, columns = start + torch.arange(float(height)), start + torch.arange(float(width))
    return torch.cartesian_prod(torch.tensor([modality]), rows, columns)


def _bria_inputs(g):
    return dict(
        hidden_states=_randn(ROWS, 16, 4, generator=g),
        encoder_hidden_states=_randn(ROWS, 6, 32, generator=g),
        timestep=torch.tensor([700.0] * ROWS),
        txt_ids=torch.zeros(6, 3),
        img_ids=_image_ids(),
    )


def _bria_fibo_inputs(g):
    """One text-encoder layer per block (a list), and the attention mask over text and image tokens FIBO's pipeline
    passes in ``joint_attention_kwargs`` when a prompt is padded."""
    mask = torch.ones(ROWS, 6 + 16, dtype=torch.bool)
    mask[1, 4:6] = False
    return dict(
        hidden_states=_randn(ROWS, 16, 4, generator=g),
        encoder_hidden_states=_randn(ROWS, 6, 32, generator=g),
        text_encoder_layers=[_randn(ROWS, 6, 16, generator=g) for _ in range(2)],
        timestep=torch.tensor([700.0] * ROWS),
        txt_ids=torch.zeros(6, 3),
        img_ids=_image_ids(),
        joint_attention_kwargs={"attention_mask": mask[:, None, None, :]},
    )


def _longcat_image_inputs(g):
    """Text ids of modality 0 along the diagonal, image ids of modality 1 after the tokenizer's length (6)."""
    text_ids = torch.stack([torch.zeros(6), torch.arange(6.0), torch.arange(6.0)], -1)
    return dict(
        hidden_states=_randn(ROWS, 16, 4, generator=g),
        timestep=torch.tensor([0.7] * ROWS),
        guidance=None,
        encoder_hidden_states=_randn(ROWS, 6, 32, generator=g),
        txt_ids=text_ids,
        img_ids=_image_ids(modality=1.0, start=6.0),
    )


def _ovis_image_inputs(g):
    text_ids = torch.stack([torch.zeros(6), torch.arange(6.0), torch.arange(6.0)], -1)
    return dict(
        hidden_states=_randn(ROWS, 16, 4, generator=g),
        timestep=torch.tensor([0.7] * ROWS),
        encoder_hidden_states=_randn(ROWS, 6, 32, generator=g),
        txt_ids=text_ids,
        img_ids=_image_ids(),
        joint_attention_kwargs={},
    )


def _svd_inputs(g):
    """Two frames of latents beside the image's latents (channels), a 0-d timestep (an EDM noise level)."""
    return dict(
        sample=_randn(ROWS, 2, 8, 8, 8, generator=g),
        timestep=torch.tensor(0.9),
        encoder_hidden_states=_randn(ROWS, 1, 16, generator=g),
        added_time_ids=torch.tensor([[6.0, 127.0, 0.02]]).repeat(ROWS, 1),
    )


def _i2vgen_xl_inputs(g):
    """The image's latents and frame-position mask as 2 frames, its CLIP embedding, fps per row, a 0-d timestep."""
    return dict(
        sample=_randn(ROWS, 4, 2, 8, 8, generator=g),
        timestep=torch.tensor(500),
        encoder_hidden_states=_randn(ROWS, 6, 16, generator=g),
        fps=torch.tensor([16] * ROWS),
        image_latents=_randn(ROWS, 4, 2, 8, 8, generator=g),
        image_embeddings=_randn(ROWS, 1, 16, generator=g),
    )


def _sd_upscaler_inputs(g):
    """The noisy low-resolution image beside the latents, its noise level as ``class_labels``."""
    return dict(
        sample=_randn(ROWS, 7, 8, 8, generator=g),
        timestep=torch.tensor(500),
        encoder_hidden_states=_randn(ROWS, 6, 8, generator=g),
        class_labels=torch.tensor([20] * ROWS),
    )


FAMILIES = {  # name: (builder, the denoiser's arguments as its pipeline passes them)
    "wan": (tiny.wan_transformer, _wan_inputs),
    "wan_vace": (tiny.wan_vace_transformer, _wan_vace_inputs),
    "wan_flf2v": (tiny.wan_flf2v_transformer, _wan_flf2v_inputs),
    "framepack": (tiny.framepack_transformer, _framepack_inputs),
    "cosmos": (tiny.cosmos_transformer, _cosmos_inputs),
    "hunyuan_video": (tiny.hunyuan_video_transformer, _hunyuan_inputs),
    "ltx_video": (tiny.ltx_video_transformer, _ltx_inputs),
    "ltx2": (tiny.ltx2_transformer, _ltx2_inputs),
    "cogvideox": (tiny.cogvideox_transformer, _cogvideox_inputs),
    "mochi": (tiny.mochi_transformer, _mochi_inputs),
    "hunyuan_video15": (tiny.hunyuan_video15_transformer, _hunyuan_video15_inputs),
    "chroma": (tiny.chroma_transformer, _chroma_inputs),
    "flux3": (tiny.flux3_transformer, _flux3_inputs),
    "kandinsky6": (tiny.kandinsky6_transformer, _kandinsky6_inputs),
    "cogview4": (tiny.cogview4_transformer, _cogview4_inputs),
    "kandinsky22": (tiny.kandinsky22_unet, _kandinsky22_inputs),
    "sana": (tiny.sana_transformer, _sana_inputs),
    "flux2": (tiny.flux2_transformer, _flux2_inputs),
    "hidream": (tiny.hidream_transformer, _hidream_inputs),
    "lumina2": (tiny.lumina2_transformer, _lumina2_inputs),
    "qwen_image_edit": (lambda seed=0: tiny.qwen_transformer(seed, zero_cond_t=True), _qwen_edit_inputs),
    "zimage": (tiny.zimage_transformer, _zimage_inputs),
    "auraflow": (tiny.auraflow_transformer, _auraflow_inputs),
    "skyreels_v2_i2v": (tiny.skyreels_v2_transformer, _wan_i2v_inputs),
    "skyreels_v2_df": (lambda seed=0: tiny.skyreels_v2_df_transformer(seed, fps_embedding=False), _skyreels_df_inputs),
    "chronoedit": (tiny.chronoedit_transformer, _wan_i2v_inputs),
    "wan_animate": (tiny.wan_animate_transformer, _wan_animate_inputs),
    "helios": (tiny.helios_transformer, _helios_inputs),
    "bria": (tiny.bria_transformer, _bria_inputs),
    "bria_fibo": (tiny.bria_fibo_transformer, _bria_fibo_inputs),
    "longcat_image": (tiny.longcat_image_transformer, _longcat_image_inputs),
    "ovis_image": (tiny.ovis_image_transformer, _ovis_image_inputs),
    "sd_upscaler": (tiny.sd_upscaler_unet, _sd_upscaler_inputs),
}

#: Families whose denoiser diffusers cannot load LoRAs on (no PeftAdapterMixin): their members are full modules.
FULL_MEMBER_FAMILIES = {
    "pixart_sigma": (tiny.pixart_sigma_transformer, _pixart_sigma_inputs),
    "svd": (tiny.svd_unet, _svd_inputs),
    "i2vgen_xl": (tiny.i2vgen_xl_unet, _i2vgen_xl_inputs),
}


@pytest.fixture(autouse=True)
def _cosmos_mask_resize(monkeypatch):
    """Cosmos resizes its padding mask with torchvision, which is not a dependency here: where it is missing, a
    nearest-neighbour stand-in (the tests' mask already has the latents' size)."""
    import diffusers.models.transformers.transformer_cosmos as cosmos

    if not hasattr(cosmos, "transforms"):
        functional = SimpleNamespace(resize=lambda mask, size, interpolation: F.interpolate(mask, size=size))
        monkeypatch.setattr(
            cosmos,
            "transforms",
            SimpleNamespace(functional=functional, InterpolationMode=SimpleNamespace(NEAREST="nearest")),
            raising=False,
        )


#: LoRA targets of families whose attention projections are not named to_q, to_k, to_v, to_out.0, or whose random
#: attention barely moves the prediction (AuraFlow's is gated by ~0.03: its feed-forwards and timestep MLP too)
LORA_TARGETS_OF = {
    "kandinsky6": ["to_query", "to_key", "to_value"],
    "auraflow": [*tiny.LORA_TARGETS, "linear_1", "linear_2"],
}


def _with_two_loras(family):
    base = FAMILIES[family][0]()
    config = tiny.lora_config(targets=LORA_TARGETS_OF[family]) if family in LORA_TARGETS_OF else None
    for seed, name in enumerate("ab", start=1):
        tiny.add_lora(base, name, seed, config)
    base.set_adapter([])
    return base


def _inputs(family):
    return FAMILIES[family][1](torch.Generator().manual_seed(0))


def _samples(output):
    """A denoiser's output (``return_dict=False``) as a list of samples: its prediction's rows (Z-Image's list is
    one already); a several-output denoiser's (LTX-2's video and audio) fields flattened and joined row by row."""
    fields = [field for field in output if field is not None]
    if len(fields) > 1:
        return [torch.cat([field[row].flatten() for field in fields]) for row in range(len(fields[0]))]
    return list(fields[0]) if isinstance(fields[0], torch.Tensor) else fields[0]


def _peft_outputs(base, inputs):
    """Each adapter's predictions by peft's own forward with that adapter active, and the base's, sample by sample."""
    outputs = {}
    with torch.no_grad():
        for name in ("a", "b"):
            base.set_adapter(name)
            outputs[name] = _samples(base(**inputs, return_dict=False))
        base.set_adapter([])
        outputs["base"] = _samples(base(**inputs, return_dict=False))
    return outputs


def _equation(outputs, weights, kl_scale):
    """base + λ Σ w_i (member_i − base), sample by sample, on peft's outputs."""
    return [
        blend_predictions(b, [a_i, b_i], [weights["a"], weights["b"]], kl_scale)
        for b, a_i, b_i in zip(outputs["base"], outputs["a"], outputs["b"])
    ]


def _blended(denoiser, inputs, weights, kl_scale, mode="mix", seed=3):
    denoiser.set_blend(weights, kl_scale=kl_scale, mode=mode, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return _samples(denoiser(**inputs, return_dict=False))


def _largest_diff(samples, expected):
    """The largest max_diff over the paired samples of two outputs."""
    return max(max_diff(sample, reference) for sample, reference in zip(samples, expected, strict=True))


@pytest.mark.parametrize("batch_members", [True, False])
@pytest.mark.parametrize("family", FAMILIES)
def test_lora_mix_equals_the_equation_on_peft_outputs(family, batch_members):
    """... in one call of the base and both members' rows (batch_members), or one call each."""
    base, inputs = _with_two_loras(family), _inputs(family)
    outputs = _peft_outputs(base, inputs)
    expected = _equation(outputs, WEIGHTS, KL_SCALE)
    calls = forward_calls(base)
    blended = _blended(
        BlendedDenoiser(base, {"a": "a", "b": "b"}, batch_members=batch_members), inputs, WEIGHTS, KL_SCALE
    )
    assert _largest_diff(blended, expected) <= 1e-5
    assert _largest_diff(outputs["a"], outputs["base"]) > 1e-2
    assert len(calls) == (1 if batch_members else 3)


@pytest.mark.parametrize("family, rows", [("cosmos", 1), ("framepack", 2), ("wan_flf2v", 1), ("helios", 1)])
def test_arguments_whose_first_size_is_not_the_batch_follow_the_rows(family, rows):
    """At the batch sizes their pipelines call them with: Cosmos's (1, 1, H, W) padding mask at batch 1 (each
    guidance half alone), Framepack's 1-D frame indices of length 2 at batch 2, FLF2V's two image rows per sample,
    Helios's (1, frames) indices at batch 1 (each guidance half alone)."""
    base = _with_two_loras(family)
    inputs = FAMILIES[family][1](torch.Generator().manual_seed(0), rows=rows)
    expected = _equation(_peft_outputs(base, inputs), WEIGHTS, KL_SCALE)
    assert (
        _largest_diff(_blended(BlendedDenoiser(base, {"a": "a", "b": "b"}), inputs, WEIGHTS, KL_SCALE), expected)
        <= 1e-5
    )


def _flux2_reference_steps(g, steps=3, reference=4):
    """FLUX.2 Klein's KV pipeline: at the first step a reference image's 4 tokens precede the latents (their keys and
    values are extracted into a cache), later steps take the latents alone and the cache."""
    inputs = _flux2_inputs(g)
    reference_ids = torch.cartesian_prod(torch.ones(1), torch.zeros(1), torch.arange(4.0), torch.zeros(1))
    first = inputs | dict(
        hidden_states=torch.cat([_randn(ROWS, reference, 4, generator=g), inputs["hidden_states"]], 1),
        img_ids=torch.cat([reference_ids.expand(ROWS, -1, -1), inputs["img_ids"]], 1),
        kv_cache_mode="extract",
        num_ref_tokens=reference,
    )
    later = [
        inputs | dict(hidden_states=_randn(ROWS, 16, 4, generator=g), kv_cache_mode="cached") for _ in range(steps - 1)
    ]
    return first, later


def _with_reference_cache(denoiser, first, later):
    """Each step's prediction of a denoiser run as the pipeline runs it: the first step's cache passed to the others."""
    with torch.no_grad():
        prediction, cache = denoiser(**first, return_dict=False)
        return [_samples((prediction,))] + [
            _samples(denoiser(**step, kv_cache=cache, return_dict=False)) for step in later
        ]


def _with_kv_processors(transformer):
    """As FLUX.2 Klein's KV pipeline sets up its transformer: attention processors that fill and read the cache."""
    from diffusers.models.transformers.transformer_flux2 import Flux2KVAttnProcessor, Flux2KVParallelSelfAttnProcessor

    for block in transformer.transformer_blocks:
        block.attn.set_processor(Flux2KVAttnProcessor())
    for block in transformer.single_transformer_blocks:
        block.attn.set_processor(Flux2KVParallelSelfAttnProcessor())
    return transformer


@pytest.mark.parametrize("batch_members", [True, False])
def test_a_reference_key_value_cache_is_each_members_own(batch_members):
    """Every step after the first equals the equation on peft's outputs where each adapter made its own cache."""
    base = _with_kv_processors(_with_two_loras("flux2"))
    first, later = _flux2_reference_steps(torch.Generator().manual_seed(0))
    outputs = {}
    for name in ("a", "b", []):
        base.set_adapter(name)
        outputs[name or "base"] = _with_reference_cache(base, first, later)
    base.set_adapter([])
    denoiser = BlendedDenoiser(base, {"a": "a", "b": "b"}, batch_members=batch_members)
    denoiser.set_blend(WEIGHTS, kl_scale=KL_SCALE)
    blended = _with_reference_cache(denoiser, first, later)
    for step, samples in enumerate(blended):
        expected = _equation({name: per_step[step] for name, per_step in outputs.items()}, WEIGHTS, KL_SCALE)
        assert _largest_diff(samples, expected) <= 1e-5
    assert _largest_diff(outputs["a"][-1], outputs["b"][-1]) > 1e-2


def test_full_members_keep_their_own_reference_cache():
    base, a, b = (_with_kv_processors(tiny.flux2_transformer(seed)) for seed in range(3))
    first, later = _flux2_reference_steps(torch.Generator().manual_seed(0))
    outputs = {
        name: _with_reference_cache(module, first, later) for name, module in (("base", base), ("a", a), ("b", b))
    }
    denoiser = BlendedDenoiser(base, {"a": a, "b": b})
    denoiser.set_blend(WEIGHTS, kl_scale=KL_SCALE)
    expected = _equation({name: per_step[-1] for name, per_step in outputs.items()}, WEIGHTS, KL_SCALE)
    assert _largest_diff(_with_reference_cache(denoiser, first, later)[-1], expected) <= 1e-5


def test_the_blends_caches_go_with_the_one_the_pipeline_holds():
    """(FLUX.2 hands back the first call's cache: the blend keeps the other calls' only as long as the pipeline
    keeps that one.)"""
    import gc

    denoiser = BlendedDenoiser(_with_kv_processors(_with_two_loras("flux2")), {"a": "a", "b": "b"}, batch_members=False)
    denoiser.set_blend(WEIGHTS, kl_scale=KL_SCALE)
    for _ in range(2):
        _with_reference_cache(denoiser, *_flux2_reference_steps(torch.Generator().manual_seed(0)))
        gc.collect()
        assert denoiser.executor.caches._kept == {}


def test_a_full_member_without_the_cache_processors_blends_where_no_cache_is_used():
    """(Without a cache the key/value-cache processors compute plain attention.)"""
    base, a = _with_kv_processors(tiny.flux2_transformer(0)), tiny.flux2_transformer(1)
    inputs = _inputs("flux2")
    with torch.no_grad():
        expected = _equation(
            {
                "base": _samples(base(**inputs, return_dict=False)),
                "a": _samples(a(**inputs, return_dict=False)),
                "b": [0] * ROWS,
            },
            {"a": 1.0, "b": 0.0},
            1.0,
        )
    assert _largest_diff(_blended(BlendedDenoiser(base, {"a": a}), inputs, {"a": 1.0}, 1.0), expected) <= 1e-5


def test_a_fine_tune_a_blend_loads_gets_the_pipelines_cache_processors(tmp_path):
    """(FLUX.2 Klein's KV pipeline gives them to its own transformer when it is made, before the Blend loads.)"""
    from diffusers import FlowMatchEulerDiscreteScheduler

    from diffusion_blend import Blend

    tiny.flux2_transformer(1).save_pretrained(tmp_path / "ft")
    base = _with_kv_processors(tiny.flux2_transformer(0))  # (the parts of the pipeline a Blend reads)
    pipe = SimpleNamespace(
        transformer=base, scheduler=FlowMatchEulerDiscreteScheduler(), components={"transformer": base}
    )
    member = Blend(pipe, {"ft": tmp_path / "ft"}).owned["ft"]
    assert {name: type(processor) for name, processor in member.attn_processors.items()} == {
        name: type(processor) for name, processor in base.attn_processors.items()
    }


def test_a_full_member_without_the_cache_processors_is_refused():
    """(FLUX.2 Klein's KV pipeline sets them on its own transformer; a member without them would ignore the cache.)"""
    denoiser = BlendedDenoiser(_with_kv_processors(tiny.flux2_transformer(0)), {"a": tiny.flux2_transformer(1)})
    first, _ = _flux2_reference_steps(torch.Generator().manual_seed(0))
    with pytest.raises(
        ValueError, match="member 'a' has key/value-cache processors on 2 attention layer.s. where the base"
    ):
        _blended(denoiser, first, {"a": 1.0}, 1.0)


def _qwen21_steps(g, steps=3, text=6):
    """Qwen-Image 2.1 with a condition image (2×2 tokens before the target's 4×4) as its pipeline calls it at every
    step: the same condition, new latents, the cache filled at the first step ("extract") and read after."""
    slots = torch.cat([torch.zeros(text + 1, dtype=torch.bool), torch.ones(4, dtype=torch.bool)])
    slots[3] = True  # the condition image's slot among the prompt's tokens
    condition, prompt = _randn(1, 4, 8, generator=g).repeat(ROWS, 1, 1), _randn(ROWS, text + 1, 12, generator=g)
    return [
        dict(
            hidden_states=torch.cat([condition, _randn(ROWS, 16, 8, generator=g)], 1),
            timestep=torch.tensor([0.9 - 0.2 * step] * ROWS),
            encoder_hidden_states=prompt,
            encoder_hidden_states_mask=None,
            img_shapes=[[(1, 2, 2), (1, 4, 4)]] * ROWS,
            img_mask=slots[None].repeat(ROWS, 1),
            kv_cache_mode="extract" if step == 0 else "cached",
        )
        for step in range(steps)
    ]


def _with_given_cache(denoiser, steps, layers=2):
    """Each step's prediction with one cache object passed at every step, as Qwen-Image 2.1's pipeline passes it."""
    from diffusers.models.transformers.transformer_qwenimage21 import QwenImage21KVCache

    cache = QwenImage21KVCache(layers)
    with torch.no_grad():
        return [_samples(denoiser(**step, kv_cache=cache, return_dict=False)) for step in steps]


@pytest.mark.parametrize("batch_members", [True, False])
def test_a_cache_the_pipeline_passes_is_filled_for_each_member(batch_members):
    base = tiny.qwen21_transformer(0)
    for seed, name in enumerate("ab", start=1):
        tiny.add_lora(base, name, seed)
    base.set_adapter([])
    steps = _qwen21_steps(torch.Generator().manual_seed(0))
    outputs = {}
    for name in ("a", "b", []):
        base.set_adapter(name)
        outputs[name or "base"] = _with_given_cache(base, steps)
    base.set_adapter([])
    denoiser = BlendedDenoiser(base, {"a": "a", "b": "b"}, batch_members=batch_members)
    denoiser.set_blend(WEIGHTS, kl_scale=KL_SCALE)
    blended = _with_given_cache(denoiser, steps)
    expected = _equation({name: per_step[-1] for name, per_step in outputs.items()}, WEIGHTS, KL_SCALE)
    assert _largest_diff(blended[-1], expected) <= 1e-5
    assert _largest_diff(outputs["a"][-1], outputs["base"][-1]) > 1e-2


def test_a_key_value_cache_is_refused_in_stochastic_mode():
    """(A member drawn at a later step would read another member's cache.)"""
    denoiser = BlendedDenoiser(_with_kv_processors(_with_two_loras("flux2")), {"a": "a", "b": "b"})
    first, _ = _flux2_reference_steps(torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="the stochastic mode draws another member at every step: use mode='mix'"):
        _blended(denoiser, first, {"a": 0.5, "b": 0.5}, 1.0, mode="stochastic")


@pytest.mark.parametrize("use_kv_cache", [None, True])
def test_qwen_image_21_stochastic_with_its_cache_is_refused_before_the_pipeline_runs(use_kv_cache):
    """Qwen-Image 2.1 caches its condition by default: refused before the prompt is encoded or noise drawn. (The
    pipeline is made without its constructor, which reads the chat template of a Qwen3-VL processor.)"""
    from diffusers import DiffusionPipeline, FlowMatchEulerDiscreteScheduler, QwenImage21Pipeline

    pipe = QwenImage21Pipeline.__new__(QwenImage21Pipeline)
    DiffusionPipeline.__init__(pipe)
    pipe.register_modules(
        scheduler=FlowMatchEulerDiscreteScheduler(),
        vae=None,
        text_encoder=None,
        processor=None,
        transformer=tiny.qwen21_transformer(0),
    )
    blend = Blend(pipe, {"a": tiny.qwen21_transformer(1), "b": tiny.qwen21_transformer(2)})
    generator = torch.Generator().manual_seed(0)
    cache = {} if use_kv_cache is None else {"use_kv_cache": use_kv_cache}
    with pytest.raises(ValueError, match="the stochastic mode draws another member at every step: use mode='mix'"):
        blend.blend(prompt="a cat", weights={"a": 0.5, "b": 0.5}, mode="stochastic", generator=generator, **cache)
    assert torch.equal(generator.get_state(), torch.Generator().manual_seed(0).get_state())


def test_a_cache_the_blend_did_not_make_is_refused():
    base = _with_kv_processors(_with_two_loras("flux2"))
    first, later = _flux2_reference_steps(torch.Generator().manual_seed(0))
    with torch.no_grad():
        _, plain_cache = base(**first, return_dict=False)
    denoiser = BlendedDenoiser(base, {"a": "a", "b": "b"})
    with pytest.raises(ValueError, match="with a cache this blend did not make"):
        _blended(denoiser, later[0] | {"kv_cache": plain_cache}, WEIGHTS, KL_SCALE)


def test_glm_images_key_value_caches_are_refused():
    denoiser = BlendedDenoiser(_with_two_loras("flux2"), {"a": "a", "b": "b"})
    with pytest.raises(ValueError, match="kv_caches .GLM-Image's image-to-image.: a key/value cache"):
        _blended(denoiser, _inputs("flux2") | {"kv_caches": object()}, WEIGHTS, KL_SCALE)


def test_zimage_compiled_blend_equals_the_equation():
    """Traced by TorchDynamo (its eager backend: the tracing is what lists could break), rows routed by a mask."""
    base, inputs = _with_two_loras("zimage"), _inputs("zimage")
    outputs = _peft_outputs(base, inputs)
    expected = _equation(outputs, WEIGHTS, KL_SCALE)
    denoiser = BlendedDenoiser(base, {"a": "a", "b": "b"}, compile={"backend": "eager"})
    assert _largest_diff(_blended(denoiser, inputs, WEIGHTS, KL_SCALE), expected) <= 1e-5


@pytest.mark.parametrize("mode", ["mix", "stochastic"])
def test_zimage_kl_scale_zero_is_the_base(mode):
    base, inputs = _with_two_loras("zimage"), _inputs("zimage")
    expected = _peft_outputs(base, inputs)["base"]
    blended = _blended(BlendedDenoiser(base, {"a": "a", "b": "b"}), inputs, {"a": 0.5, "b": 0.5}, 0.0, mode=mode)
    assert _largest_diff(blended, expected) == 0


@pytest.mark.parametrize("batch_members", [True, False])
@pytest.mark.parametrize("family", FAMILIES)
def test_stochastic_mode_gives_each_sample_its_drawn_member(family, batch_members):
    base, inputs = _with_two_loras(family), _inputs(family)
    outputs = _peft_outputs(base, inputs)
    weights, kl_scale = {"a": 0.5, "b": 0.5}, 0.5
    denoiser = BlendedDenoiser(base, {"a": "a", "b": "b"}, batch_members=batch_members)
    blended = _blended(denoiser, inputs, weights, kl_scale, mode="stochastic")
    denoiser.set_blend(weights, kl_scale=kl_scale, mode="stochastic", generator=torch.Generator().manual_seed(3))
    drawn = denoiser.draw_members(next(iter(inputs.values()))).tolist()  # the same first draw, made again
    assert set(drawn) == {0, 1}  # both members drawn: the rows were split between them
    expected = [
        blend_predictions(outputs["base"][row], [outputs["ab"[member]][row]], [1.0], kl_scale)
        for row, member in enumerate(drawn)
    ]
    assert _largest_diff(blended, expected) <= 1e-5


@pytest.mark.parametrize("max_batch_size", [None, "input", 2])
def test_zimage_full_members_blend_sample_by_sample(max_batch_size):
    """Full members on per-sample lists: stacked or chunked calls of the list's items, blended sample by sample."""
    base, a, b = (tiny.zimage_transformer(seed) for seed in range(3))
    inputs = _inputs("zimage")
    with torch.no_grad():
        outputs = [_samples(module(**inputs, return_dict=False)) for module in (base, a, b)]
    expected = [blend_predictions(o, [o_a, o_b], list(WEIGHTS.values()), KL_SCALE) for o, o_a, o_b in zip(*outputs)]
    denoiser = BlendedDenoiser(base, {"a": a, "b": b}, max_batch_size=max_batch_size)
    assert _largest_diff(_blended(denoiser, inputs, WEIGHTS, KL_SCALE), expected) <= 1e-5


def _allegro_inputs(samples=2, frames=2):
    """Two samples, two latent frames: the rotary tables' first size (frames, 2×2 tokens per frame) is the batch's."""
    from diffusers.models.embeddings import get_3d_rotary_pos_embed_allegro

    *tables, grid_t, grid_h, grid_w = get_3d_rotary_pos_embed_allegro(
        embed_dim=12,
        crops_coords=((0, 0), (4, 4)),
        grid_size=(4, 4),
        temporal_size=frames,
        interpolation_scale=(2.2, 2.0, 2.0),
    )
    positions = torch.cartesian_prod(grid_t.long(), grid_h.long(), grid_w.long()).T.reshape(3, 1, -1).contiguous()
    g = torch.Generator().manual_seed(0)
    return dict(
        hidden_states=_randn(samples, 4, frames, 8, 8, generator=g),
        timestep=torch.tensor([500] * samples),
        encoder_hidden_states=_randn(samples, 6, 16, generator=g),
        encoder_attention_mask=torch.ones(samples, 6),
        image_rotary_emb=(tuple(tables), tuple(positions)),
    )


@pytest.mark.parametrize("mode", ["mix", "stochastic"])
def test_precomputed_rotary_tables_are_not_rows(mode):
    """Allegro's rotary tables and positions, shared by the batch, on calls of some samples only (full members one
    row at a time; the stochastic draws)."""
    base, a, b = (tiny.allegro_transformer(seed) for seed in range(3))
    inputs = _allegro_inputs()
    with torch.no_grad():
        outputs = [_samples(module(**inputs, return_dict=False)) for module in (base, a, b)]
    denoiser = BlendedDenoiser(base, {"a": a, "b": b}, max_batch_size=1)
    weights = WEIGHTS if mode == "mix" else {"a": 0.5, "b": 0.5}
    blended = _blended(denoiser, inputs, weights, KL_SCALE, mode=mode, seed=2)
    if mode == "mix":
        expected = [blend_predictions(o, [o_a, o_b], list(WEIGHTS.values()), KL_SCALE) for o, o_a, o_b in zip(*outputs)]
    else:
        denoiser.set_blend(weights, kl_scale=KL_SCALE, mode=mode, generator=torch.Generator().manual_seed(2))
        drawn = denoiser.draw_members(inputs["hidden_states"]).tolist()
        assert set(drawn) == {0, 1}
        expected = [
            blend_predictions(outputs[0][row], [outputs[1 + member][row]], [1.0], KL_SCALE)
            for row, member in enumerate(drawn)
        ]
    assert _largest_diff(blended, expected) <= 1e-5


@pytest.mark.parametrize("mode", ["mix", "stochastic"])
@pytest.mark.parametrize("family", FULL_MEMBER_FAMILIES)
def test_full_members_of_families_without_lora_support(family, mode):
    """Fine-tuned copies as members, called on chunks of 2 rows (mix) or on the rows each drew (stochastic): every
    argument with a batch axis follows the rows."""
    builder, make_inputs = FULL_MEMBER_FAMILIES[family]
    base, a, b = (builder(seed) for seed in range(3))
    inputs = make_inputs(torch.Generator().manual_seed(0))
    with torch.no_grad():
        outputs = [_samples(module(**inputs, return_dict=False)) for module in (base, a, b)]
    denoiser = BlendedDenoiser(base, {"a": a, "b": b}, max_batch_size=2 if mode == "mix" else None)
    weights = WEIGHTS if mode == "mix" else {"a": 0.5, "b": 0.5}
    blended = _blended(denoiser, inputs, weights, KL_SCALE, mode=mode)
    if mode == "mix":
        expected = [blend_predictions(o, [o_a, o_b], list(WEIGHTS.values()), KL_SCALE) for o, o_a, o_b in zip(*outputs)]
    else:
        denoiser.set_blend(weights, kl_scale=KL_SCALE, mode=mode, generator=torch.Generator().manual_seed(3))
        drawn = denoiser.draw_members(next(iter(inputs.values()))).tolist()
        assert set(drawn) == {0, 1}
        expected = [
            blend_predictions(outputs[0][row], [outputs[1 + member][row]], [1.0], KL_SCALE)
            for row, member in enumerate(drawn)
        ]
    assert _largest_diff(blended, expected) <= 1e-5
    assert _largest_diff(outputs[1], outputs[0]) > 1e-2


def test_skyreels_df_fps_embedding_at_the_one_sample_its_pipeline_passes():
    """SkyReels-V2 diffusion forcing with its fps embedding, called as its pipeline calls it (one sample per guidance
    half, fps a list of one flag: diffusers adds the embedding right only to a batch of one), in one stacked call."""
    base = tiny.skyreels_v2_df_transformer()
    for seed, name in enumerate("ab", start=1):
        tiny.add_lora(base, name, seed)
    base.set_adapter([])
    inputs = _skyreels_df_inputs(torch.Generator().manual_seed(0), rows=1)
    outputs = _peft_outputs(base, inputs)
    calls = forward_calls(base)
    blended = _blended(BlendedDenoiser(base, {"a": "a", "b": "b"}), inputs, WEIGHTS, KL_SCALE)
    assert _largest_diff(blended, _equation(outputs, WEIGHTS, KL_SCALE)) <= 1e-5
    assert _largest_diff(outputs["a"], outputs["base"]) > 1e-2
    assert len(calls) == 1


def test_zimage_full_members_cannot_be_vmapped():
    """Z-Image pads its samples' sequences, an operation torch.vmap has no batching rule for: said, not a crash."""
    base, a, b = (tiny.zimage_transformer(seed) for seed in range(3))
    denoiser = BlendedDenoiser(base, {"a": a, "b": b}, vmap_full_members=True)
    with pytest.raises(
        ValueError, match="ZImageTransformer2DModel's forward cannot be vmapped.*vmap_full_members=False"
    ):
        _blended(denoiser, _inputs("zimage"), WEIGHTS, KL_SCALE)


def test_zimage_guidance_halves_share_their_draw():
    """Z-Image's pipeline passes [samples; the same samples] for its two guidance halves, as a list: a sample and
    its copy draw one member, as the rows of a tensor batch do."""
    g = torch.Generator().manual_seed(1)
    samples = [_randn(4, 1, 8, 8, generator=g) for _ in range(4)]
    denoiser = BlendedDenoiser(_with_two_loras("zimage"), {"a": "a", "b": "b"})
    denoiser.set_blend({"a": 0.5, "b": 0.5}, mode="stochastic", generator=torch.Generator().manual_seed(0))
    drawn = denoiser.draw_members(samples + [sample.clone() for sample in samples]).tolist()
    assert drawn[:4] == drawn[4:] and set(drawn) == {0, 1}


MODULATION_TARGETS = ["to_q", "img_mod.1", "timestep_embedder.linear_1"]


def _qwen_edit_with_modulation_loras():
    """Qwen-Image-Edit-2511 computes its modulation on twice the rows (a zero timestep's beside each sample's): LoRAs
    on those layers meet rows that cannot be told apart per adapter."""
    base = tiny.qwen_transformer(0, zero_cond_t=True)
    for seed, name in enumerate("ab", start=1):
        tiny.add_lora(base, name, seed, tiny.lora_config(targets=MODULATION_TARGETS))
    base.set_adapter([])
    return base


@pytest.mark.parametrize("mode", ["mix", "stochastic"])
def test_members_of_a_denoiser_that_reshapes_its_batch_are_called_one_by_one(mode):
    """Stacking is tried, found impossible at the first call, and every call from then on is one per member."""
    base, inputs = _qwen_edit_with_modulation_loras(), _inputs("qwen_image_edit")
    outputs = _peft_outputs(base, inputs)
    weights, kl_scale = ({"a": 0.3, "b": 0.5}, 1.5) if mode == "mix" else ({"a": 1.0, "b": 0.0}, 0.5)
    expected = _equation(outputs, weights, kl_scale)
    denoiser = BlendedDenoiser(base, {"a": "a", "b": "b"})
    calls = forward_calls(base)
    for _ in range(2):
        assert _largest_diff(_blended(denoiser, inputs, weights, kl_scale, mode=mode), expected) <= 1e-5
    per_blend = {"mix": 3, "stochastic": 2}[mode]  # base and both members; base and the drawn member
    assert len(calls) == 1 + 2 * per_blend  # the one stacked try, then calls per member


def test_compiled_members_of_a_denoiser_that_reshapes_its_batch_are_refused():
    denoiser = BlendedDenoiser(_qwen_edit_with_modulation_loras(), {"a": "a", "b": "b"}, compile={"backend": "eager"})
    with pytest.raises(ValueError, match="reshapes its batch inside.*use compile=False"):
        _blended(denoiser, _inputs("qwen_image_edit"), WEIGHTS, KL_SCALE)


def _stochastic_steps(denoiser, inputs, steps=4, seed=7):
    """A few denoising steps of the stochastic mode, as a pipeline call makes them: new latents, new timestep."""
    denoiser.set_blend({"a": 0.5, "b": 0.5}, mode="stochastic", generator=torch.Generator().manual_seed(seed))
    sample = inputs["hidden_states"]
    with torch.no_grad():
        for step in range(steps):
            timestep = torch.tensor([0.9 - 0.2 * step] * ROWS)
            prediction = denoiser(**inputs | {"hidden_states": sample, "timestep": timestep}, return_dict=False)[0]
            sample = sample - 0.1 * prediction
    return sample


def test_a_call_redone_one_member_at_a_time_keeps_the_seeds_draws():
    """The call found to need one call per member is redone with the draws it made: the next steps draw as a run
    of one call per member from the start does (a second draw would shift every later one)."""
    base, inputs = _qwen_edit_with_modulation_loras(), _inputs("qwen_image_edit")
    first = _stochastic_steps(BlendedDenoiser(base, {"a": "a", "b": "b"}), inputs)
    one_by_one = _stochastic_steps(BlendedDenoiser(base, {"a": "a", "b": "b"}, batch_members=False), inputs)
    assert _largest_diff(first, one_by_one) == 0


@pytest.mark.parametrize("max_batch_size", [1, 2, "input"])
def test_zimage_lora_calls_chunked_within_the_list_equal_the_equation(max_batch_size):
    base, inputs = _with_two_loras("zimage"), _inputs("zimage")
    expected = _equation(_peft_outputs(base, inputs), WEIGHTS, KL_SCALE)
    denoiser = BlendedDenoiser(base, {"a": "a", "b": "b"}, max_batch_size=max_batch_size)
    assert _largest_diff(_blended(denoiser, inputs, WEIGHTS, KL_SCALE), expected) <= 1e-5


def _zimage_omni_inputs(samples=2):
    """Z-Image's omni mode: per sample, a list of a condition image's latents and the target's, two captions."""
    g = torch.Generator().manual_seed(0)
    return dict(
        x=[[_randn(4, 1, 8, 8, generator=g), _randn(4, 1, 8, 8, generator=g)] for _ in range(samples)],
        t=torch.tensor([0.5] * samples),
        cap_feats=[[_randn(6, 16, generator=g), _randn(5, 16, generator=g)] for _ in range(samples)],
        siglip_feats=[None] * samples,
        image_noise_mask=[[0, 1] for _ in range(samples)],
    )


@pytest.mark.parametrize("mode", ["mix", "stochastic"])
def test_zimage_omni_samples_of_several_tensors_blend(mode):
    base, inputs = _with_two_loras("zimage"), _zimage_omni_inputs()
    outputs = _peft_outputs(base, inputs)
    weights = {"a": 0.3, "b": 0.5} if mode == "mix" else {"a": 1.0, "b": 0.0}
    blended = _blended(BlendedDenoiser(base, {"a": "a", "b": "b"}), inputs, weights, KL_SCALE, mode=mode)
    assert _largest_diff(blended, _equation(outputs, weights, KL_SCALE)) <= 1e-5


def _zimage_controlnet_inputs():
    """Two samples whose captions pad to 32 and 64 tokens: the ControlNet residuals are padded to the longer."""
    g = torch.Generator().manual_seed(0)
    return dict(
        x=[_randn(4, 1, 8, 8, generator=g) for _ in range(2)],
        t=torch.tensor([0.5, 0.5]),
        cap_feats=[_randn(6, 16, generator=g), _randn(40, 16, generator=g)],
        controlnet_block_samples={0: _randn(2, 96, 32, generator=g)},
    )


def test_zimage_controlnet_residuals_follow_the_rows_of_a_stacked_call():
    base, inputs = _with_two_loras("zimage"), _zimage_controlnet_inputs()
    expected = _equation(_peft_outputs(base, inputs), WEIGHTS, KL_SCALE)
    assert (
        _largest_diff(_blended(BlendedDenoiser(base, {"a": "a", "b": "b"}), inputs, WEIGHTS, KL_SCALE), expected)
        <= 1e-5
    )


def test_zimage_controlnet_residuals_refuse_a_call_on_some_samples():
    denoiser = BlendedDenoiser(_with_two_loras("zimage"), {"a": "a", "b": "b"}, max_batch_size=1)
    with pytest.raises(ValueError, match="pads controlnet_block_samples to the longest sample of the whole batch"):
        _blended(denoiser, _zimage_controlnet_inputs(), WEIGHTS, KL_SCALE)


def test_wan_vace_control_scales_are_per_layer_even_at_a_batch_of_their_number():
    """One sample and one VACE layer: the layer's scale is not a row of the batch."""
    base = _with_two_loras("wan_vace")
    inputs = {
        key: value[:1] if key != "control_hidden_states_scale" else value for key, value in _inputs("wan_vace").items()
    }
    outputs = _peft_outputs(base, inputs)
    assert (
        _largest_diff(
            _blended(BlendedDenoiser(base, {"a": "a", "b": "b"}), inputs, WEIGHTS, KL_SCALE),
            _equation(outputs, WEIGHTS, KL_SCALE),
        )
        <= 1e-5
    )


def test_full_members_torch_vmap_cannot_run_are_refused_with_the_reason():
    """HiDream's experts read routing counts back to the host, which a vmapped call cannot."""
    base, a, b = (tiny.hidream_transformer(seed) for seed in range(3))
    denoiser = BlendedDenoiser(base, {"a": a, "b": b}, vmap_full_members=True)
    with pytest.raises(
        ValueError, match="HiDreamImageTransformer2DModel's forward cannot be vmapped .*use vmap_full_members=False"
    ):
        _blended(denoiser, _inputs("hidream"), WEIGHTS, KL_SCALE)


@pytest.mark.parametrize("batch_members", [True, False])
def test_a_member_that_is_the_base_draws_the_base(batch_members):
    """Stochastic rows drawing a member given as the base module itself get the base's prediction."""
    base, inputs = _with_two_loras("wan"), _inputs("wan")
    outputs = _peft_outputs(base, inputs)
    denoiser = BlendedDenoiser(base, {"a": "a", "b": base}, batch_members=batch_members)
    blended = _blended(denoiser, inputs, {"a": 0.5, "b": 0.5}, 0.5, mode="stochastic")
    denoiser.set_blend(
        {"a": 0.5, "b": 0.5}, kl_scale=0.5, mode="stochastic", generator=torch.Generator().manual_seed(3)
    )
    drawn = denoiser.draw_members(inputs["hidden_states"]).tolist()
    assert set(drawn) == {0, 1}
    expected = [
        blend_predictions(outputs["base"][row], [outputs["a" if member == 0 else "base"][row]], [1.0], 0.5)
        for row, member in enumerate(drawn)
    ]
    assert _largest_diff(blended, expected) <= 1e-5
