"""Tiny random models of the real architectures, built in the test (no downloads), in the style of diffusers' tests.

Every builder seeds torch itself, so two calls give identical weights: a test can build the same pipeline twice
to compare a blend with the plain pipeline.
"""

from __future__ import annotations

import string
from pathlib import Path

import torch
from diffusers import (
    AllegroTransformer3DModel,
    AuraFlowTransformer2DModel,
    AutoencoderKL,
    AutoencoderKLQwenImage,
    AutoencoderKLWan,
    BriaFiboTransformer2DModel,
    BriaTransformer2DModel,
    ChromaTransformer2DModel,
    ChronoEditTransformer3DModel,
    CogVideoXTransformer3DModel,
    CogView4Transformer2DModel,
    ControlNetModel,
    CosmosTransformer3DModel,
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerDiscreteScheduler,
    FlowMatchEulerDiscreteScheduler,
    Flux2Transformer2DModel,
    Flux3Transformer2DModel,
    FluxPipeline,
    FluxTransformer2DModel,
    HeliosTransformer3DModel,
    HiDreamImageTransformer2DModel,
    HunyuanVideo15Transformer3DModel,
    HunyuanVideoFramepackTransformer3DModel,
    HunyuanVideoTransformer3DModel,
    I2VGenXLUNet,
    Kandinsky6Transformer3DModel,
    LongCatImageTransformer2DModel,
    LTX2VideoTransformer3DModel,
    LTXVideoTransformer3DModel,
    Lumina2Transformer2DModel,
    MochiTransformer3DModel,
    OvisImageTransformer2DModel,
    PixArtTransformer2DModel,
    QwenImage21Transformer2DModel,
    QwenImagePipeline,
    QwenImageTransformer2DModel,
    SanaTransformer2DModel,
    SD3Transformer2DModel,
    SkyReelsV2Transformer3DModel,
    StableDiffusion3PAGPipeline,
    StableDiffusion3Pipeline,
    StableDiffusionControlNetPipeline,
    StableDiffusionImg2ImgPipeline,
    StableDiffusionInpaintPipeline,
    StableDiffusionPAGPipeline,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
    UNetSpatioTemporalConditionModel,
    WanAnimateTransformer3DModel,
    WanPipeline,
    WanTransformer3DModel,
    WanVACETransformer3DModel,
    ZImagePipeline,
    ZImageTransformer2DModel,
)
from peft import LoraConfig, get_peft_model_state_dict
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

TEXT_HIDDEN = 8
MAX_TOKENS = 16
LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
FLUX_CONTEXT = 32
QWEN_CONTEXT = 16
ZIMAGE_CONTEXT = 16
IMAGE_EMBED = 6


def tokenizer() -> CLIPTokenizer:
    """A CLIP BPE tokenizer over single letters and digits (no merges): enough to encode any short prompt."""
    symbols = list(string.ascii_lowercase + string.digits)
    vocab = ["<|startoftext|>", "<|endoftext|>", *symbols, *(s + "</w>" for s in symbols), ".", ".</w>"]
    return CLIPTokenizer(vocab={token: i for i, token in enumerate(vocab)}, merges=[], model_max_length=MAX_TOKENS)


def _text_config(seed_offset: int = 0, projection_dim: int = TEXT_HIDDEN) -> CLIPTextConfig:
    return CLIPTextConfig(
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=1,
        hidden_size=TEXT_HIDDEN,
        intermediate_size=16,
        num_attention_heads=2,
        num_hidden_layers=2,
        vocab_size=len(tokenizer()),
        max_position_embeddings=MAX_TOKENS,
        projection_dim=projection_dim,
    )


def text_encoder(seed: int = 1) -> CLIPTextModel:
    torch.manual_seed(seed)
    return CLIPTextModel(_text_config()).eval()


def text_encoder_with_projection(seed: int = 2) -> CLIPTextModelWithProjection:
    torch.manual_seed(seed)
    return CLIPTextModelWithProjection(_text_config()).eval()


def vae(seed: int = 3, **overrides) -> AutoencoderKL:
    torch.manual_seed(seed)
    config = dict(
        block_out_channels=[4, 8],
        in_channels=3,
        out_channels=3,
        down_block_types=["DownEncoderBlock2D"] * 2,
        up_block_types=["UpDecoderBlock2D"] * 2,
        latent_channels=4,
        norm_num_groups=2,
    )
    config.update(overrides)
    return AutoencoderKL(**config).eval()


def unet(seed: int = 0, **overrides) -> UNet2DConditionModel:
    """A two-block SD-style UNet (one cross-attention block) with 8×8 latents."""
    torch.manual_seed(seed)
    config = dict(
        block_out_channels=(4, 8),
        layers_per_block=1,
        sample_size=8,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=TEXT_HIDDEN,
        norm_num_groups=2,
        attention_head_dim=2,
    )
    config.update(overrides)
    return UNet2DConditionModel(**config).eval()


def sdxl_unet(seed: int = 0) -> UNet2DConditionModel:
    """The SDXL variant: linear projections, two text encoders' context, text+time added conditioning."""
    return unet(
        seed,
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=4,
        transformer_layers_per_block=(1, 2),
        projection_class_embeddings_input_dim=6 * 4 + TEXT_HIDDEN,
        cross_attention_dim=2 * TEXT_HIDDEN,
    )


def _seeded(seed: int, model_class: type, **config) -> torch.nn.Module:
    """``model_class(**config)`` in eval mode, its random weights drawn from ``seed`` (same seed, same weights)."""
    torch.manual_seed(seed)
    return model_class(**config).eval()


def sd3_transformer(seed: int = 0) -> SD3Transformer2DModel:
    return _seeded(
        seed,
        SD3Transformer2DModel,
        sample_size=8,
        patch_size=1,
        in_channels=4,
        num_layers=1,
        attention_head_dim=4,
        num_attention_heads=2,
        caption_projection_dim=8,
        joint_attention_dim=2 * TEXT_HIDDEN,
        pooled_projection_dim=2 * TEXT_HIDDEN,
        out_channels=4,
    )


def flux_transformer(seed: int = 0) -> FluxTransformer2DModel:
    """Flux (dev): double- and single-stream blocks, rotary position ids, guidance distilled into an embedding."""
    return _seeded(
        seed,
        FluxTransformer2DModel,
        patch_size=1,
        in_channels=4,
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=FLUX_CONTEXT,
        pooled_projection_dim=FLUX_CONTEXT,
        axes_dims_rope=[4, 4, 8],
        guidance_embeds=True,
    )


def qwen_transformer(seed: int = 0, zero_cond_t: bool = False) -> QwenImageTransformer2DModel:
    """Qwen-Image's MMDiT (``zero_cond_t``: Qwen-Image-Edit-2511's second, zero timestep for reference images,
    chosen per token from the per-sample ``img_shapes``)."""
    return _seeded(
        seed,
        QwenImageTransformer2DModel,
        patch_size=2,
        in_channels=16,
        out_channels=4,
        num_layers=2,
        attention_head_dim=16,
        num_attention_heads=3,
        joint_attention_dim=QWEN_CONTEXT,
        guidance_embeds=False,
        axes_dims_rope=(8, 4, 4),
        zero_cond_t=zero_cond_t,
    )


def zimage_transformer(seed: int = 0) -> ZImageTransformer2DModel:
    """Z-Image's single-stream DiT: it takes and returns a list with one tensor per sample (sizes may differ)."""
    return _seeded(
        seed,
        ZImageTransformer2DModel,
        all_patch_size=(2,),
        all_f_patch_size=(1,),
        in_channels=4,
        dim=32,
        n_layers=2,
        n_refiner_layers=1,
        n_heads=2,
        n_kv_heads=2,
        cap_feat_dim=ZIMAGE_CONTEXT,
        axes_dims=[8, 4, 4],
        axes_lens=[256, 32, 32],
    )


def wan_transformer(seed: int = 0) -> WanTransformer3DModel:
    """Wan 2.x (video): latents (batch, channels, frames, height, width)."""
    return _seeded(
        seed,
        WanTransformer3DModel,
        patch_size=(1, 2, 2),
        num_attention_heads=2,
        attention_head_dim=12,
        in_channels=4,
        out_channels=4,
        text_dim=16,
        freq_dim=256,
        ffn_dim=32,
        num_layers=2,
        cross_attn_norm=True,
        qk_norm="rms_norm_across_heads",
        rope_max_seq_len=32,
    )


def wan_flf2v_transformer(seed: int = 0) -> WanTransformer3DModel:
    """Wan 2.1 first-and-last-frame (FLF2V): image tokens of two images per sample (17 tokens each), folded pairwise."""
    return _seeded(
        seed,
        WanTransformer3DModel,
        patch_size=(1, 2, 2),
        num_attention_heads=2,
        attention_head_dim=12,
        in_channels=8,
        out_channels=4,
        text_dim=16,
        freq_dim=256,
        ffn_dim=32,
        num_layers=2,
        cross_attn_norm=True,
        qk_norm="rms_norm_across_heads",
        rope_max_seq_len=32,
        image_dim=4,
        pos_embed_seq_len=2 * 17,
    )


def wan_vace_transformer(seed: int = 0) -> WanVACETransformer3DModel:
    """Wan VACE: control latents enter through control blocks beside the main ones."""
    return _seeded(
        seed,
        WanVACETransformer3DModel,
        patch_size=(1, 2, 2),
        num_attention_heads=2,
        attention_head_dim=12,
        in_channels=4,
        out_channels=4,
        text_dim=16,
        freq_dim=256,
        ffn_dim=32,
        num_layers=2,
        cross_attn_norm=True,
        qk_norm="rms_norm_across_heads",
        rope_max_seq_len=32,
        vace_layers=[0],
        vace_in_channels=8,
    )


def flux2_transformer(seed: int = 0) -> Flux2Transformer2DModel:
    """FLUX.2: position ids with a batch axis, four rotary axes."""
    return _seeded(
        seed,
        Flux2Transformer2DModel,
        patch_size=1,
        in_channels=4,
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=32,
        timestep_guidance_channels=32,
        axes_dims_rope=(4, 4, 4, 4),
    )


def hidream_transformer(seed: int = 0) -> HiDreamImageTransformer2DModel:
    """HiDream-I1: mixture-of-experts feed-forwards, Llama-3 states of several layers stacked before the batch."""
    return _seeded(
        seed,
        HiDreamImageTransformer2DModel,
        patch_size=2,
        in_channels=4,
        out_channels=4,
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=8,
        num_attention_heads=4,
        caption_channels=[32, 16],
        text_emb_dim=64,
        num_routed_experts=4,
        num_activated_experts=2,
        axes_dims_rope=(4, 2, 2),
        max_resolution=(32, 32),
        llama_layers=(0, 1),
    )


def lumina2_transformer(seed: int = 0) -> Lumina2Transformer2DModel:
    """Lumina-Image 2.0: caption and image refiners, a caption padding mask per row."""
    return _seeded(
        seed,
        Lumina2Transformer2DModel,
        sample_size=8,
        patch_size=2,
        in_channels=4,
        hidden_size=32,
        num_layers=1,
        num_refiner_layers=1,
        num_attention_heads=2,
        num_kv_heads=1,
        multiple_of=16,
        axes_dim_rope=(8, 4, 4),
        axes_lens=(64, 16, 16),
        cap_feat_dim=16,
    )


def hunyuan_video_transformer(seed: int = 0) -> HunyuanVideoTransformer3DModel:
    """HunyuanVideo: double- and single-stream blocks, a token refiner, an attention mask, distilled guidance."""
    return _seeded(
        seed,
        HunyuanVideoTransformer3DModel,
        in_channels=4,
        out_channels=4,
        num_attention_heads=2,
        attention_head_dim=10,
        num_layers=1,
        num_single_layers=1,
        num_refiner_layers=1,
        patch_size=1,
        patch_size_t=1,
        guidance_embeds=True,
        text_embed_dim=16,
        pooled_projection_dim=8,
        rope_axes_dim=(2, 4, 4),
    )


def ltx_video_transformer(seed: int = 0) -> LTXVideoTransformer3DModel:
    """LTX-Video: latents packed into tokens (batch, frames·height·width, channels), sizes given as integers."""
    return _seeded(
        seed,
        LTXVideoTransformer3DModel,
        in_channels=8,
        out_channels=8,
        patch_size=1,
        patch_size_t=1,
        num_attention_heads=4,
        attention_head_dim=8,
        cross_attention_dim=32,
        num_layers=1,
        caption_channels=16,
    )


def framepack_transformer(seed: int = 0) -> HunyuanVideoFramepackTransformer3DModel:
    """HunyuanVideo-Framepack: the window's latents beside clean and 2×/4×-compressed history latents, located by
    1-D frame indices."""
    return _seeded(
        seed,
        HunyuanVideoFramepackTransformer3DModel,
        in_channels=4,
        out_channels=4,
        num_attention_heads=2,
        attention_head_dim=10,
        num_layers=1,
        num_single_layers=1,
        num_refiner_layers=1,
        patch_size=2,
        patch_size_t=1,
        guidance_embeds=True,
        text_embed_dim=16,
        pooled_projection_dim=8,
        rope_axes_dim=(2, 4, 4),
        image_condition_type=None,
        has_image_proj=True,
        image_proj_dim=16,
        has_clean_x_embedder=True,
    )


def cosmos_transformer(seed: int = 0) -> CosmosTransformer3DModel:
    """Cosmos: a padding mask concatenated to the latents as a channel (resized with torchvision)."""
    return _seeded(
        seed,
        CosmosTransformer3DModel,
        in_channels=4,
        out_channels=4,
        num_attention_heads=2,
        attention_head_dim=12,
        num_layers=2,
        mlp_ratio=2,
        text_embed_dim=16,
        adaln_lora_dim=4,
        max_size=(4, 32, 32),
        patch_size=(1, 2, 2),
        rope_scale=(2.0, 1.0, 1.0),
        concat_padding_mask=True,
        extra_pos_embed_type="learnable",
    )


def chroma_transformer(seed: int = 0) -> ChromaTransformer2DModel:
    """Chroma: FLUX.1's blocks, modulation from a distilled approximator, an attention mask over text and image."""
    return _seeded(
        seed,
        ChromaTransformer2DModel,
        patch_size=1,
        in_channels=4,
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=32,
        axes_dims_rope=[4, 4, 8],
    )


def cogview4_transformer(seed: int = 0) -> CogView4Transformer2DModel:
    """CogView4: size and crop conditions (original_size, target_size, crop_coords) per sample."""
    return _seeded(
        seed,
        CogView4Transformer2DModel,
        patch_size=2,
        in_channels=4,
        num_layers=2,
        attention_head_dim=4,
        num_attention_heads=4,
        out_channels=4,
        text_embed_dim=8,
        time_embed_dim=8,
        condition_dim=4,
    )


def mochi_transformer(seed: int = 0) -> MochiTransformer3DModel:
    """Mochi: attention over each sample's own prompt tokens (its mask), swiglu feed-forwards."""
    return _seeded(
        seed,
        MochiTransformer3DModel,
        patch_size=2,
        num_attention_heads=2,
        attention_head_dim=8,
        num_layers=2,
        pooled_projection_dim=16,
        in_channels=4,
        out_channels=None,
        qk_norm="rms_norm",
        text_embed_dim=16,
        time_embed_dim=4,
        activation_fn="swiglu",
        max_sequence_length=16,
    )


def hunyuan_video15_transformer(seed: int = 0) -> HunyuanVideo15Transformer3DModel:
    """HunyuanVideo 1.5: two text encoders' states, each with its mask, and image embeddings."""
    return _seeded(
        seed,
        HunyuanVideo15Transformer3DModel,
        in_channels=4,
        out_channels=4,
        num_attention_heads=2,
        attention_head_dim=8,
        num_layers=2,
        num_refiner_layers=1,
        mlp_ratio=2.0,
        patch_size=1,
        patch_size_t=1,
        text_embed_dim=16,
        text_embed_2_dim=8,
        image_embed_dim=12,
        rope_axes_dim=(2, 2, 4),
        target_size=16,
        task_type="t2v",
    )


def kandinsky22_unet(seed: int = 0) -> UNet2DConditionModel:
    """Kandinsky 2.2's decoder: image embeddings (``added_cond_kwargs``) instead of text, learned variance."""
    return _seeded(
        seed,
        UNet2DConditionModel,
        in_channels=4,
        out_channels=8,
        addition_embed_type="image",
        down_block_types=("ResnetDownsampleBlock2D", "SimpleCrossAttnDownBlock2D"),
        up_block_types=("SimpleCrossAttnUpBlock2D", "ResnetUpsampleBlock2D"),
        mid_block_type="UNetMidBlock2DSimpleCrossAttn",
        block_out_channels=(32, 64),
        layers_per_block=1,
        encoder_hid_dim=32,
        encoder_hid_dim_type="image_proj",
        cross_attention_dim=32,
        attention_head_dim=4,
        resnet_time_scale_shift="scale_shift",
        class_embed_type=None,
    )


def flux3_transformer(seed: int = 0) -> Flux3Transformer2DModel:
    """FLUX.3: (sequence, 4) position ids for text, image and an optional reference image's tokens."""
    return _seeded(
        seed,
        Flux3Transformer2DModel,
        in_channels=8,
        cond_in_channels=8,
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=12,
        timestep_channels=32,
        mlp_ratio=2.0,
        axes_dims_rope=(4, 4, 4, 4),
    )


def kandinsky6_transformer(seed: int = 0) -> Kandinsky6Transformer3DModel:
    """Kandinsky 6: video (channels last) and audio predicted together; an image condition adds a tail frame located
    by shared rotary positions."""
    return _seeded(
        seed,
        Kandinsky6Transformer3DModel,
        in_visual_dim=4,
        out_visual_dim=4,
        in_text_dim=12,
        in_text_dim2=8,
        time_dim=16,
        patch_size=(1, 2, 2),
        model_dim=24,
        ff_dim=32,
        num_text_blocks=1,
        num_visual_blocks=2,
        axes_dims=(4, 4, 4),
        visual_cond=True,
        in_audio_dim=4,
        out_audio_dim=4,
        visual_token_type_num_embeddings=2,
    )


def allegro_transformer(seed: int = 0) -> AllegroTransformer3DModel:
    """Allegro (no peft support: full-module members): rotary tables and positions given precomputed."""
    return _seeded(
        seed,
        AllegroTransformer3DModel,
        patch_size=2,
        patch_size_t=1,
        num_attention_heads=2,
        attention_head_dim=12,
        in_channels=4,
        out_channels=4,
        num_layers=2,
        cross_attention_dim=24,
        sample_height=8,
        sample_width=8,
        sample_frames=4,
        caption_channels=16,
    )


def qwen21_transformer(seed: int = 0) -> QwenImage21Transformer2DModel:
    """Qwen-Image 2.1: one stream; text and condition-image tokens modulated from t = 0 (``causal_condition``), so
    their keys and values can be cached from the first step."""
    return _seeded(
        seed,
        QwenImage21Transformer2DModel,
        in_channels=8,
        out_channels=8,
        num_layers=2,
        attention_head_dim=16,
        num_attention_heads=2,
        context_in_dim=12,
        mlp_ratio=2,
        axes_dims_rope=(4, 6, 6),
    )


def ltx2_transformer(seed: int = 0) -> LTX2VideoTransformer3DModel:
    """LTX-2: video and audio tokens denoised together; it returns two predictions, the video's and the audio's."""
    return _seeded(
        seed,
        LTX2VideoTransformer3DModel,
        in_channels=4,
        out_channels=4,
        patch_size=1,
        patch_size_t=1,
        num_attention_heads=2,
        attention_head_dim=8,
        cross_attention_dim=16,
        audio_in_channels=4,
        audio_out_channels=4,
        audio_num_attention_heads=2,
        audio_attention_head_dim=4,
        audio_cross_attention_dim=8,
        num_layers=2,
        qk_norm="rms_norm_across_heads",
        caption_channels=16,
        rope_double_precision=False,
    )


def cogvideox_transformer(seed: int = 0) -> CogVideoXTransformer3DModel:
    """CogVideoX: latents (batch, frames, channels, height, width), text and video tokens in one sequence."""
    return _seeded(
        seed,
        CogVideoXTransformer3DModel,
        num_attention_heads=2,
        attention_head_dim=8,
        in_channels=4,
        out_channels=4,
        time_embed_dim=2,
        text_embed_dim=8,
        num_layers=1,
        sample_width=8,
        sample_height=8,
        sample_frames=8,
        patch_size=2,
        temporal_compression_ratio=4,
        max_text_seq_length=8,
    )


def sana_transformer(seed: int = 0) -> SanaTransformer2DModel:
    """Sana: linear attention over the image, cross-attention to the caption."""
    return _seeded(
        seed,
        SanaTransformer2DModel,
        patch_size=1,
        in_channels=4,
        out_channels=4,
        num_layers=1,
        num_attention_heads=2,
        attention_head_dim=4,
        num_cross_attention_heads=2,
        cross_attention_head_dim=4,
        cross_attention_dim=8,
        caption_channels=8,
        sample_size=8,
    )


def auraflow_transformer(seed: int = 0) -> AuraFlowTransformer2DModel:
    """AuraFlow: joint (MMDiT) and single DiT blocks, register tokens, a learned position table cropped to the image."""
    return _seeded(
        seed,
        AuraFlowTransformer2DModel,
        sample_size=8,
        patch_size=2,
        in_channels=4,
        out_channels=4,
        num_mmdit_layers=1,
        num_single_dit_layers=1,
        attention_head_dim=8,
        num_attention_heads=2,
        joint_attention_dim=16,
        caption_projection_dim=16,
        pos_embed_max_size=64,
    )


def pixart_sigma_transformer(seed: int = 0) -> PixArtTransformer2DModel:
    """PixArt-Σ: adaLN-single DiT with cross-attention to the caption, learned variance (twice the channels out)."""
    return _seeded(
        seed,
        PixArtTransformer2DModel,
        num_attention_heads=2,
        attention_head_dim=8,
        in_channels=4,
        out_channels=8,
        num_layers=1,
        norm_num_groups=1,
        cross_attention_dim=16,
        sample_size=8,
        patch_size=2,
        caption_channels=16,
        use_additional_conditions=False,
    )


def skyreels_v2_transformer(seed: int = 0) -> SkyReelsV2Transformer3DModel:
    """SkyReels-V2 image-to-video: Wan's blocks, an image's CLIP tokens before the caption's."""
    return _seeded(
        seed,
        SkyReelsV2Transformer3DModel,
        patch_size=(1, 2, 2),
        num_attention_heads=2,
        attention_head_dim=12,
        in_channels=12,
        out_channels=4,
        text_dim=16,
        freq_dim=256,
        ffn_dim=32,
        num_layers=1,
        image_dim=4,
        rope_max_seq_len=32,
    )


def skyreels_v2_df_transformer(seed: int = 0, fps_embedding: bool = True) -> SkyReelsV2Transformer3DModel:
    """SkyReels-V2 diffusion forcing: a timestep per latent frame, causal blocks of frames, an fps embedding (the
    released models' ``inject_sample_info``; diffusers adds it right only to a batch of one sample)."""
    return _seeded(
        seed,
        SkyReelsV2Transformer3DModel,
        patch_size=(1, 2, 2),
        num_attention_heads=2,
        attention_head_dim=12,
        in_channels=4,
        out_channels=4,
        text_dim=16,
        freq_dim=256,
        ffn_dim=32,
        num_layers=1,
        rope_max_seq_len=32,
        inject_sample_info=fps_embedding,
        num_frame_per_block=2,
    )


def chronoedit_transformer(seed: int = 0) -> ChronoEditTransformer3DModel:
    """ChronoEdit: Wan image-to-video's blocks (the input image's CLIP tokens, its latents beside the video's), rotary
    positions that skip frames for temporal reasoning."""
    return _seeded(
        seed,
        ChronoEditTransformer3DModel,
        patch_size=(1, 2, 2),
        num_attention_heads=2,
        attention_head_dim=12,
        in_channels=12,
        out_channels=4,
        text_dim=16,
        freq_dim=256,
        ffn_dim=32,
        num_layers=1,
        image_dim=4,
        rope_max_seq_len=32,
    )


def wan_animate_transformer(seed: int = 0) -> WanAnimateTransformer3DModel:
    """Wan-Animate: pose latents added to the video's, a face video encoded by a motion encoder and attended to
    frame by frame (a face adapter after every block)."""
    return _seeded(
        seed,
        WanAnimateTransformer3DModel,
        patch_size=(1, 2, 2),
        num_attention_heads=2,
        attention_head_dim=12,
        in_channels=12,
        latent_channels=4,
        out_channels=4,
        text_dim=16,
        freq_dim=256,
        ffn_dim=32,
        num_layers=1,
        image_dim=4,
        rope_max_seq_len=32,
        motion_encoder_channel_sizes={"4": 8, "8": 8},
        motion_encoder_size=8,
        motion_style_dim=8,
        motion_dim=4,
        motion_encoder_dim=8,
        face_encoder_hidden_dim=8,
        face_encoder_num_heads=2,
        inject_face_latents_blocks=1,
    )


def helios_transformer(seed: int = 0) -> HeliosTransformer3DModel:
    """Helios: a window of latents after short, mid (2×) and long (4×) compressed history latents, each located by
    frame indices; history tokens modulated from t = 0."""
    return _seeded(
        seed,
        HeliosTransformer3DModel,
        patch_size=(1, 2, 2),
        num_attention_heads=2,
        attention_head_dim=12,
        in_channels=4,
        out_channels=4,
        text_dim=16,
        freq_dim=256,
        ffn_dim=32,
        num_layers=1,
        rope_dim=(4, 4, 4),
    )


def bria_transformer(seed: int = 0) -> BriaTransformer2DModel:
    """Bria 3.x: FLUX.1's double- and single-stream blocks without pooled text, unbatched position ids."""
    return _seeded(
        seed,
        BriaTransformer2DModel,
        patch_size=1,
        in_channels=4,
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=32,
        axes_dims_rope=[4, 4, 8],
    )


def bria_fibo_transformer(seed: int = 0) -> BriaFiboTransformer2DModel:
    """Bria FIBO: FLUX.1's blocks, each fed its own text-encoder layer (a list, one tensor per block)."""
    return _seeded(
        seed,
        BriaFiboTransformer2DModel,
        patch_size=1,
        in_channels=4,
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=32,
        axes_dims_rope=[4, 4, 8],
        text_encoder_dim=16,
    )


def longcat_image_transformer(seed: int = 0) -> LongCatImageTransformer2DModel:
    """LongCat-Image: FLUX.1's blocks; text and image position ids of different modalities."""
    return _seeded(
        seed,
        LongCatImageTransformer2DModel,
        patch_size=1,
        in_channels=4,
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=32,
        pooled_projection_dim=32,
        axes_dims_rope=[4, 4, 8],
    )


def ovis_image_transformer(seed: int = 0) -> OvisImageTransformer2DModel:
    """Ovis-Image: FLUX.1's double- and single-stream blocks, no pooled text nor guidance."""
    return _seeded(
        seed,
        OvisImageTransformer2DModel,
        patch_size=1,
        in_channels=4,
        out_channels=4,
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=32,
        axes_dims_rope=(4, 4, 8),
    )


def svd_unet(seed: int = 0) -> UNetSpatioTemporalConditionModel:
    """Stable Video Diffusion: latents (batch, frames, channels, height, width) beside the image's latents, one image
    embedding as the context, (fps, motion bucket, noise augmentation) as ``added_time_ids``; one resolution level
    (its GroupNorms have 32 groups)."""
    return _seeded(
        seed,
        UNetSpatioTemporalConditionModel,
        sample_size=8,
        in_channels=8,
        out_channels=4,
        block_out_channels=(32,),
        down_block_types=("CrossAttnDownBlockSpatioTemporal",),
        up_block_types=("CrossAttnUpBlockSpatioTemporal",),
        addition_time_embed_dim=4,
        projection_class_embeddings_input_dim=3 * 4,
        layers_per_block=1,
        cross_attention_dim=16,
        num_attention_heads=(2,),
        num_frames=2,
    )


def i2vgen_xl_unet(seed: int = 0) -> I2VGenXLUNet:
    """I2VGen-XL: the first frame's latents encoded into context tokens and beside every frame, a CLIP image
    embedding projected to context tokens, an fps embedding; one resolution level."""
    return _seeded(
        seed,
        I2VGenXLUNet,
        sample_size=8,
        in_channels=4,
        out_channels=4,
        block_out_channels=(8,),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock3D",),
        up_block_types=("CrossAttnUpBlock3D",),
        norm_num_groups=2,
        cross_attention_dim=16,
        attention_head_dim=4,
    )


def sd_upscaler_unet(seed: int = 0) -> UNet2DConditionModel:
    """SD x4 upscaler: the low-resolution image beside the latents (7 channels), its noise level a class label."""
    return unet(
        seed,
        in_channels=7,
        num_class_embeds=1000,
        use_linear_projection=True,
        block_out_channels=(8,),
        down_block_types=("CrossAttnDownBlock2D",),
        up_block_types=("CrossAttnUpBlock2D",),
    )


SCHEDULERS = {
    "ddim": lambda: DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
    ),
    "dpm": lambda: DPMSolverMultistepScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1
    ),
    "euler": lambda: EulerDiscreteScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1
    ),
}


def sd_pipeline(scheduler: str = "ddim", denoiser_seed: int = 0) -> StableDiffusionPipeline:
    pipe = StableDiffusionPipeline(
        unet=unet(denoiser_seed),
        vae=vae(),
        text_encoder=text_encoder(),
        tokenizer=tokenizer(),
        scheduler=SCHEDULERS[scheduler](),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def img2img_pipeline() -> StableDiffusionImg2ImgPipeline:
    return _quiet(StableDiffusionImg2ImgPipeline(**sd_pipeline().components))


def inpaint_pipeline() -> StableDiffusionInpaintPipeline:
    """SD inpainting: the UNet reads the noisy latents, the mask and the masked image's latents (9 channels)."""
    return _quiet(StableDiffusionInpaintPipeline(**{**sd_pipeline().components, "unet": unet(0, in_channels=9)}))


def controlnet_pipeline() -> StableDiffusionControlNetPipeline:
    """SD with a ControlNet made from the UNet (diffusers' ``from_unet``): its residuals enter every UNet call."""
    torch.manual_seed(4)
    controlnet = ControlNetModel.from_unet(unet(0), conditioning_embedding_out_channels=(4, 8))
    return _quiet(StableDiffusionControlNetPipeline(**sd_pipeline().components, controlnet=controlnet))


def flux_pipeline() -> FluxPipeline:
    """Flux without its text encoders: called with ``prompt_embeds`` and ``pooled_prompt_embeds`` (FLUX_CONTEXT wide),
    a VAE of one latent channel (packed 2×2 into the transformer's 4)."""
    vae_model = vae(
        block_out_channels=[4],
        down_block_types=["DownEncoderBlock2D"],
        up_block_types=["UpDecoderBlock2D"],
        latent_channels=1,
        norm_num_groups=1,
        use_quant_conv=False,
        use_post_quant_conv=False,
        shift_factor=0.06,
        scaling_factor=1.5,
    )
    return _quiet(
        FluxPipeline(
            scheduler=FlowMatchEulerDiscreteScheduler(),
            vae=vae_model,
            text_encoder=None,
            tokenizer=None,
            text_encoder_2=None,
            tokenizer_2=None,
            transformer=flux_transformer(),
        )
    )


def qwen_pipeline() -> QwenImagePipeline:
    """Qwen-Image without its text encoder (called with ``prompt_embeds``), a tiny video VAE of 4 latent channels."""
    torch.manual_seed(3)
    vae_model = AutoencoderKLQwenImage(
        base_dim=4,
        z_dim=4,
        dim_mult=[1, 2],
        num_res_blocks=1,
        temperal_downsample=[False],
        latents_mean=[0.0] * 4,
        latents_std=[1.0] * 4,
    )
    return _quiet(
        QwenImagePipeline(
            scheduler=FlowMatchEulerDiscreteScheduler(),
            vae=vae_model,
            text_encoder=None,
            tokenizer=None,
            transformer=qwen_transformer(),
        )
    )


def zimage_pipeline() -> ZImagePipeline:
    """Z-Image without its text encoder (called with ``prompt_embeds``, one tensor per prompt)."""
    vae_model = vae(
        latent_channels=4, use_quant_conv=False, use_post_quant_conv=False, shift_factor=0.06, scaling_factor=1.5
    )
    return _quiet(
        ZImagePipeline(
            scheduler=FlowMatchEulerDiscreteScheduler(),
            vae=vae_model,
            text_encoder=None,
            tokenizer=None,
            transformer=zimage_transformer(),
        )
    )


def wan22_pipeline() -> WanPipeline:
    """Wan 2.2 A14B's two experts: ``transformer`` for high noise, ``transformer_2`` below the boundary (half of
    the timesteps here); no text encoder (called with ``prompt_embeds``), a tiny video VAE of 4 latent channels."""
    torch.manual_seed(3)
    vae_model = AutoencoderKLWan(
        base_dim=3,
        z_dim=4,
        dim_mult=[1, 1, 1, 1],
        num_res_blocks=1,
        temperal_downsample=[False, True, True],
        latents_mean=[0.0] * 4,
        latents_std=[1.0] * 4,
    )
    return _quiet(
        WanPipeline(
            tokenizer=None,
            text_encoder=None,
            vae=vae_model,
            scheduler=FlowMatchEulerDiscreteScheduler(),
            transformer=wan_transformer(0),
            transformer_2=wan_transformer(1),
            boundary_ratio=0.5,
        )
    )


def pag_pipeline(unet_model: UNet2DConditionModel | None = None) -> StableDiffusionPAGPipeline:
    """SD with perturbed-attention guidance on the mid block's self-attention: its processor splits the UNet's
    rows into unconditional, conditional and perturbed thirds."""
    components = sd_pipeline().components | ({} if unet_model is None else {"unet": unet_model})
    return _quiet(StableDiffusionPAGPipeline(**components, pag_applied_layers=["mid"]))


def sd3_pag_pipeline() -> StableDiffusion3PAGPipeline:
    """SD3 with perturbed-attention guidance on its first joint block."""
    components = {
        name: part
        for name, part in sd3_pipeline().components.items()
        if name not in ("image_encoder", "feature_extractor")
    }
    return _quiet(StableDiffusion3PAGPipeline(**components, pag_applied_layers=["transformer_blocks.0"]))


def ip_adapter_pipeline() -> StableDiffusionPipeline:
    """SD with an IP-Adapter (random weights): image embeddings enter every cross-attention through the adapter's
    own key/value projections. Call it with ``ip_adapter_image_embeds=[ip_adapter_embeds()]``."""
    pipe = sd_pipeline()
    pipe.unet._load_ip_adapter_weights([ip_adapter_state_dict(pipe.unet)])
    return pipe


def ip_adapter_state_dict(denoiser: UNet2DConditionModel, seed: int = 20) -> dict:
    """An IP-Adapter checkpoint in its published layout: an image projection to 4 tokens, and to_k_ip / to_v_ip
    for each cross-attention, numbered 1, 3, 5, ... in the order of the UNet's attention processors."""
    generator = torch.Generator().manual_seed(seed)
    context, channels = denoiser.config.cross_attention_dim, list(denoiser.config.block_out_channels)
    image_proj = {
        "proj.weight": 0.3 * torch.randn(4 * context, IMAGE_EMBED, generator=generator),
        "proj.bias": torch.zeros(4 * context),
        "norm.weight": torch.ones(context),
        "norm.bias": torch.zeros(context),
    }
    ip_adapter, key = {}, 1
    for name in denoiser.attn_processors:
        if name.endswith("attn1.processor"):  # self-attention: no image tokens
            continue
        block, index = name.split(".")[:2]
        hidden = {
            "mid_block": channels[-1],
            "up_blocks": channels[::-1][int(index) if index.isdigit() else 0],
            "down_blocks": channels[int(index) if index.isdigit() else 0],
        }[block]
        for projection in ("to_k_ip", "to_v_ip"):
            ip_adapter[f"{key}.{projection}.weight"] = 0.3 * torch.randn(hidden, context, generator=generator)
        key += 2
    return {"image_proj": image_proj, "ip_adapter": ip_adapter}


def ip_adapter_embeds(seed: int = 4) -> torch.Tensor:
    """CLIP image embeddings for one image with CFG: [negative; positive] (what ``ip_adapter_image_embeds`` takes)."""
    return torch.randn(2, 1, IMAGE_EMBED, generator=torch.Generator().manual_seed(seed))


def _quiet(pipe):
    pipe.set_progress_bar_config(disable=True)
    return pipe


def sdxl_pipeline(scheduler: str = "euler") -> StableDiffusionXLPipeline:
    pipe = StableDiffusionXLPipeline(
        unet=sdxl_unet(),
        vae=vae(),
        text_encoder=text_encoder(),
        tokenizer=tokenizer(),
        text_encoder_2=text_encoder_with_projection(),
        tokenizer_2=tokenizer(),
        scheduler=SCHEDULERS[scheduler](),
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def sd3_pipeline() -> StableDiffusion3Pipeline:
    """SD3 without its optional T5 encoder (diffusers pads the CLIP embeddings with zeros, as for the real model)."""
    pipe = StableDiffusion3Pipeline(
        transformer=sd3_transformer(),
        scheduler=FlowMatchEulerDiscreteScheduler(),
        vae=vae(use_quant_conv=False, use_post_quant_conv=False, shift_factor=0.06, scaling_factor=1.5),
        text_encoder=text_encoder_with_projection(1),
        tokenizer=tokenizer(),
        text_encoder_2=text_encoder_with_projection(2),
        tokenizer_2=tokenizer(),
        text_encoder_3=None,
        tokenizer_3=None,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def lora_config(rank: int = 2, alpha: int = 4, targets: list[str] = LORA_TARGETS, dropout: float = 0.0) -> LoraConfig:
    """The tests' LoRA configuration: peft's non-zero init, so that an adapter changes the denoiser's output."""
    return LoraConfig(r=rank, lora_alpha=alpha, target_modules=targets, lora_dropout=dropout, init_lora_weights=False)


def add_lora(denoiser: torch.nn.Module, name: str, seed: int, config: LoraConfig | None = None) -> None:
    """A random LoRA adapter on ``denoiser`` (peft's non-zero init: its effect on the images is ~0.05-0.3)."""
    torch.manual_seed(seed)
    denoiser.add_adapter(config or lora_config(), adapter_name=name)


def save_lora(pipe_class, denoiser: torch.nn.Module, name: str, folder: Path, prefix: str = "unet") -> Path:
    """Save one adapter of ``denoiser`` as a current-format diffusers LoRA file (with its LoraConfig metadata)."""
    state_dict = get_peft_model_state_dict(denoiser, adapter_name=name)
    config = denoiser.peft_config[name].to_dict()
    kwargs = {f"{prefix}_lora_layers": state_dict, f"{prefix}_lora_adapter_metadata": config}
    if prefix == "transformer":
        kwargs = {"transformer_lora_layers": state_dict, "transformer_lora_adapter_metadata": config}
    pipe_class.save_lora_weights(folder, **kwargs)
    return folder / "pytorch_lora_weights.safetensors"


def make_lora_file(
    folder: Path, seed: int, *, alpha: int = 4, builder=unet, pipe_class=StableDiffusionPipeline, prefix: str = "unet"
) -> Path:
    """A LoRA file for the denoiser ``builder()`` builds, trained nowhere: random weights from ``seed``."""
    model = builder()
    add_lora(model, "lora", seed, lora_config(alpha=alpha))
    folder.mkdir(parents=True, exist_ok=True)
    return save_lora(pipe_class, model, "lora", folder, prefix=prefix)


def fused_copy(builder, lora_file: Path, seed_builder: int = 0, prefix: str = "unet") -> torch.nn.Module:
    """A full denoiser equal to ``builder()`` with the LoRA file fused into its weights."""
    model = builder(seed_builder)
    model.load_lora_adapter(str(lora_file), prefix=prefix, adapter_name="fuse", use_safetensors=True)
    model.fuse_lora(adapter_names=["fuse"])
    model.unload_lora()
    return model
