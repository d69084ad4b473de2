"""Reading basis models: every accepted LoRA format, full denoisers, and a clear ValueError for each bad basis,
raised before anything is loaded into the pipeline or denoised."""

from __future__ import annotations

import json
import shutil

import pytest
import safetensors.torch
import torch
from peft import get_peft_model, set_peft_model_state_dict

from diffusion_blend import Blend
from helpers import tiny
from helpers.calls import call_kwargs, forward_calls, max_diff


def _attention_processor_checkpoint(lora_file, path, prefix=""):
    """The published format (diffusers <= 0.20 LoRAAttnProcessor, torch.save'd), built from a current LoRA file.

    Those processors had no alpha: the peft scaling alpha/r (here 4/2, exact in binary) is folded into `up`."""
    config = json.loads(safetensors.safe_open(str(lora_file), "pt").metadata()["lora_adapter_metadata"])
    scale = config["unet.lora_alpha"] / config["unet.r"]
    old = {}
    for key, value in safetensors.torch.load_file(str(lora_file)).items():
        module, projection, side = _split(key.removeprefix("unet."))
        name = "to_out_lora" if projection == "to_out.0" else f"{projection}_lora"
        up = side == "lora_B"
        old[f"{prefix}{module}.processor.{name}.{'up' if up else 'down'}.weight"] = value * scale if up else value
    torch.save(old, path)
    return path


def _split(key):
    module_and_projection, side, _ = key.rsplit(".", 2)
    for projection in ("to_out.0", "to_q", "to_k", "to_v"):
        if module_and_projection.endswith("." + projection):
            return module_and_projection[: -len(projection) - 1], projection, side
    raise AssertionError(key)


# ---------------------------------------------------------------------------------------------------- formats
@pytest.mark.parametrize("prefix", ["", "unet."])
def test_attention_processor_checkpoint_equals_the_current_format(sd_loras, tmp_path, prefix):
    old = _attention_processor_checkpoint(sd_loras["ir"], tmp_path / "pytorch_lora_weights.bin", prefix)
    from_old = Blend(tiny.sd_pipeline(), {"ir": tmp_path}).blend(weights={"ir": 1.0}, **call_kwargs()).images
    current = Blend(tiny.sd_pipeline(), {"ir": sd_loras["ir"]}).blend(weights={"ir": 1.0}, **call_kwargs()).images
    assert old.is_file()
    assert max_diff(from_old, current) <= 1e-5
    assert max_diff(current, tiny.sd_pipeline()(**call_kwargs()).images) > 1e-2


def test_peft_adapter_folder_equals_the_diffusers_file(sd_loras, tmp_path):
    peft_model = get_peft_model(tiny.unet(0), tiny.lora_config())
    state = safetensors.torch.load_file(str(sd_loras["ir"]))  # the same adapter, saved peft's way
    set_peft_model_state_dict(peft_model, {"base_model.model." + k.removeprefix("unet."): v for k, v in state.items()})
    peft_model.save_pretrained(tmp_path / "peft")
    assert (tmp_path / "peft" / "adapter_config.json").is_file()
    from_peft = Blend(tiny.sd_pipeline(), {"ir": tmp_path / "peft"}).blend(weights={"ir": 1.0}, **call_kwargs())
    from_file = Blend(tiny.sd_pipeline(), {"ir": sd_loras["ir"]}).blend(weights={"ir": 1.0}, **call_kwargs())
    assert max_diff(from_peft.images, from_file.images) <= 1e-5


def test_lora_folder_is_read_like_its_file(sd_loras):
    by_folder = Blend(tiny.sd_pipeline(), {"ir": sd_loras["ir"].parent}).blend(weights={"ir": 1.0}, **call_kwargs())
    by_file = Blend(tiny.sd_pipeline(), {"ir": sd_loras["ir"]}).blend(weights={"ir": 1.0}, **call_kwargs())
    assert max_diff(by_folder.images, by_file.images) == 0.0


def test_unload_removes_the_basis_adapters(sd_loras):
    pipe = tiny.sd_pipeline()
    blend = Blend(pipe, sd_loras)
    blend.unload()
    assert not getattr(pipe.unet, "peft_config", {})


# ------------------------------------------------------------------------------------------------ bad bases
def test_empty_basis_raises():
    with pytest.raises(ValueError, match="basis is empty"):
        Blend(tiny.sd_pipeline(), {})


def test_missing_path_raises(tmp_path):
    with pytest.raises(ValueError, match=r"basis 'ir': .*missing does not exist"):
        Blend(tiny.sd_pipeline(), {"ir": tmp_path / "missing"})


def test_unreachable_hub_id_raises():
    with pytest.raises(ValueError, match="neither a local path nor a reachable hub repository"):
        Blend(tiny.sd_pipeline(), {"ir": "nobody/no-such-lora"})


def test_folder_without_weights_raises(tmp_path):
    (tmp_path / "notes.txt").write_text("nothing here")
    with pytest.raises(ValueError, match="holds no LoRA weights"):
        Blend(tiny.sd_pipeline(), {"ir": tmp_path})


@pytest.mark.parametrize("damage", ["garbage", "truncated"])
def test_corrupt_safetensors_raises(sd_loras, tmp_path, damage):
    corrupt = tmp_path / "lora.safetensors"
    data = sd_loras["ir"].read_bytes()
    corrupt.write_bytes(b"\x13\x37 not a safetensors file" if damage == "garbage" else data[: len(data) // 2])
    with pytest.raises(ValueError, match="is not a valid safetensors file"):
        Blend(tiny.sd_pipeline(), {"ir": corrupt})


def test_lora_matching_no_module_raises(sd3_loras):
    with pytest.raises(ValueError, match="match no module of the pipeline's unet"):
        Blend(tiny.sd_pipeline(), {"ir": sd3_loras["ir"]})


def _lora_with_extra_module(lora_file, folder, module):
    """The LoRA file plus a rank-2 adapter on ``module`` (a key path inside the file's naming)."""
    state = safetensors.torch.load_file(str(lora_file))
    state[f"{module}.lora_A.weight"] = torch.zeros(2, 8)
    state[f"{module}.lora_B.weight"] = torch.zeros(8, 2)
    safetensors.torch.save_file(state, str(folder / "lora.safetensors"))
    return folder / "lora.safetensors"


def test_lora_with_unknown_modules_raises(sd_loras, tmp_path):
    lora = _lora_with_extra_module(sd_loras["ir"], tmp_path, "unet.no_such_block.to_q")
    with pytest.raises(ValueError, match="not in the pipeline's unet: no_such_block.to_q"):
        Blend(tiny.sd_pipeline(), {"ir": lora})


def test_text_encoder_lora_is_refused(sd_loras, tmp_path):
    lora = _lora_with_extra_module(
        sd_loras["ir"], tmp_path, "text_encoder.text_model.encoder.layers.0.self_attn.q_proj"
    )
    with pytest.raises(ValueError, match="also adapts a text encoder"):
        Blend(tiny.sd_pipeline(), {"ir": lora})


def test_basis_name_colliding_with_a_pipeline_adapter_raises(sd_loras):
    pipe = tiny.sd_pipeline()
    pipe.load_lora_weights(str(sd_loras["ir"]), adapter_name="ir")
    with pytest.raises(ValueError, match="'ir' collide with adapters already on the pipeline"):
        Blend(pipe, {"ir": sd_loras["aes"]})


def test_denoiser_folder_with_other_in_channels_raises(tmp_path):
    tiny.unet(1, in_channels=8).save_pretrained(tmp_path / "ft")
    with pytest.raises(ValueError, match="in_channels: 8 vs base 4"):
        Blend(tiny.sd_pipeline(), {"ft": tmp_path / "ft"})


def test_folder_of_another_model_class_raises(tmp_path):
    tiny.sd_pipeline().vae.save_pretrained(tmp_path / "vae")
    with pytest.raises(
        ValueError,
        match=r"basis 'ft': .*vae holds a AutoencoderKL, but the pipeline's unet is a "
        "UNet2DConditionModel",
    ):
        Blend(tiny.sd_pipeline(), {"ft": tmp_path / "vae"})


def test_a_pixart_fine_tune_saved_under_its_old_class_name_loads(tmp_path):
    """PixArt-α checkpoints declare Transformer2DModel, which diffusers loads as PixArtTransformer2DModel."""
    from types import SimpleNamespace

    from diffusers import DDIMScheduler, PixArtTransformer2DModel

    def pixart(seed):
        torch.manual_seed(seed)
        return PixArtTransformer2DModel(
            num_attention_heads=2,
            attention_head_dim=8,
            in_channels=4,
            out_channels=8,
            num_layers=1,
            cross_attention_dim=16,
            sample_size=8,
            patch_size=2,
            caption_channels=16,
        )

    pixart(1).save_pretrained(tmp_path / "ft")
    config = json.loads((tmp_path / "ft" / "config.json").read_text())
    (tmp_path / "ft" / "config.json").write_text(json.dumps(config | {"_class_name": "Transformer2DModel"}))
    base = pixart(0)  # (the parts of a PixArt pipeline a Blend reads)
    pipe = SimpleNamespace(transformer=base, scheduler=DDIMScheduler(), components={"transformer": base})
    blend = Blend(pipe, {"ft": tmp_path / "ft"})
    assert all(
        torch.equal(a, b) for a, b in zip(blend.owned["ft"].state_dict().values(), pixart(1).state_dict().values())
    )


def test_pipeline_folder_without_the_denoiser_raises(tmp_path):
    tiny.sd_pipeline().save_pretrained(tmp_path / "other")
    shutil.rmtree(tmp_path / "other" / "unet")
    with pytest.raises(ValueError, match=r"basis 'ft': the pipeline folder .*other has no unet"):
        Blend(tiny.sd_pipeline(), {"ft": tmp_path / "other"})


def test_denoiser_folder_missing_weights_raises(tmp_path):
    """(Loaded, diffusers would leave them uninitialised on the meta device.)"""
    tiny.unet(1).save_pretrained(tmp_path / "ft")
    weights = safetensors.torch.load_file(tmp_path / "ft" / "diffusion_pytorch_model.safetensors")
    safetensors.torch.save_file(
        {key: value for key, value in weights.items() if not key.startswith("conv_out.")},
        tmp_path / "ft" / "diffusion_pytorch_model.safetensors",
    )
    with pytest.raises(
        ValueError,
        match=r"basis 'ft': the weights in .*ft lack 2 of the UNet2DConditionModel's "
        r"parameters \(conv_out.bias, conv_out.weight, ...\)",
    ):
        Blend(tiny.sd_pipeline(), {"ft": tmp_path / "ft"})


def test_denoiser_folder_with_more_layers_raises(tmp_path):
    tiny.unet(1, layers_per_block=2).save_pretrained(tmp_path / "ft")
    with pytest.raises(ValueError, match="member 'ft' has a different architecture"):
        Blend(tiny.sd_pipeline(), {"ft": tmp_path / "ft"})


def test_pipeline_folder_with_other_prediction_type_raises(tmp_path):
    pipe = tiny.sd_pipeline(denoiser_seed=7)
    pipe.scheduler = type(pipe.scheduler).from_config(pipe.scheduler.config, prediction_type="v_prediction")
    pipe.save_pretrained(tmp_path / "ft")
    with pytest.raises(ValueError, match="predicts v_prediction but the pipeline's scheduler expects epsilon"):
        Blend(tiny.sd_pipeline(), {"ft": tmp_path / "ft"})


def test_failed_basis_leaves_the_pipeline_untouched(sd_loras, tmp_path):
    tiny.unet(1, sample_size=16).save_pretrained(tmp_path / "wrong")
    pipe = tiny.sd_pipeline()
    with pytest.raises(ValueError, match="sample_size"):
        Blend(pipe, {"ir": sd_loras["ir"], "wrong": tmp_path / "wrong"})
    assert not getattr(pipe.unet, "peft_config", {})
    assert max_diff(pipe(**call_kwargs()).images, tiny.sd_pipeline()(**call_kwargs()).images) == 0.0


# ------------------------------------------------------------------------------- bad blends, before denoising
@pytest.mark.parametrize(
    "weights, kl_scale, mode, message",
    [
        ({"ir": 0.5, "style": 0.5}, 1.0, "mix", "unknown weight name"),
        ({"ir": float("nan")}, 1.0, "mix", "finite"),
        ({"ir": float("inf")}, 1.0, "mix", "finite"),
        ({"ir": 1.0}, -0.5, "mix", "kl_scale must be"),
        ({"ir": 0.7, "aes": 0.7}, 1.0, "stochastic", "sum to 1"),
        ({"ir": 1.5, "aes": -0.5}, 1.0, "stochastic", "non-negative"),
        ({"ir": 1.0}, 1.0, "average", "mode must be one of"),
    ],
)
def test_bad_blend_raises_before_denoising(sd_loras, weights, kl_scale, mode, message):
    pipe = tiny.sd_pipeline()
    blend = Blend(pipe, sd_loras)
    calls = forward_calls(pipe.unet)
    with pytest.raises(ValueError, match=message):
        blend.blend(weights=weights, kl_scale=kl_scale, mode=mode, **call_kwargs())
    assert calls == []
    assert pipe.unet is blend.base


def test_lora_for_another_model_size_raises(tmp_path):
    wider = tiny.make_lora_file(
        tmp_path / "wide", seed=3, builder=lambda seed=0: tiny.unet(seed, block_out_channels=(4, 16))
    )
    pipe = tiny.sd_pipeline()
    with pytest.raises(ValueError, match="does not fit the pipeline's unet"):
        Blend(pipe, {"ir": wider})
    assert not getattr(pipe.unet, "peft_config", {})
