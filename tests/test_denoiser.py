"""BlendedDenoiser on its own: it stands in for the denoiser, evaluates only what the formula needs, and checks
its members."""

import inspect

import pytest
import torch
from diffusers.models.unets.unet_2d_condition import UNet2DConditionOutput
from torch import nn

from diffusion_blend import BlendedDenoiser
from helpers import references, tiny
from helpers.calls import forward_calls, max_diff


def _inputs(batch=2, seed=0):
    generator = torch.Generator().manual_seed(seed)
    sample = torch.randn(batch, 4, 8, 8, generator=generator)
    context = torch.randn(batch, 5, tiny.TEXT_HIDDEN, generator=generator)
    return sample, torch.tensor(500), context


@pytest.fixture
def full_members():
    return tiny.unet(0), {"ir": tiny.unet(1), "aes": tiny.unet(2)}


def test_exposes_what_pipelines_read(full_members):
    base, members = full_members
    denoiser = BlendedDenoiser(base, members)
    assert denoiser.config is base.config
    assert denoiser.dtype == base.dtype and denoiser.device == base.device
    assert denoiser.conv_in is base.conv_in  # any other attribute comes from the base


def test_forward_has_the_wrapped_signature(full_members):
    denoiser = BlendedDenoiser(*full_members)
    assert inspect.signature(denoiser.forward) == inspect.signature(full_members[0].forward)


@pytest.mark.parametrize("return_dict", [True, False])
def test_returns_the_wrapped_denoisers_output_type(full_members, return_dict):
    base, members = full_members
    denoiser = BlendedDenoiser(base, members)
    denoiser.set_blend({"ir": 0.5, "aes": 0.5})
    sample, t, context = _inputs()
    out = denoiser(sample, t, encoder_hidden_states=context, return_dict=return_dict)
    assert type(out) is (UNet2DConditionOutput if return_dict else tuple)


def test_mix_is_the_formula_on_separate_calls(full_members):
    base, members = full_members
    denoiser = BlendedDenoiser(base, members)
    denoiser.set_blend({"ir": 0.3, "aes": 0.5}, kl_scale=1.5)
    sample, t, context = _inputs()
    with torch.no_grad():
        out = denoiser(sample, t, encoder_hidden_states=context).sample
        e0 = base(sample, t, encoder_hidden_states=context).sample.double()
        e1 = members["ir"](sample, t, encoder_hidden_states=context).sample.double()
        e2 = members["aes"](sample, t, encoder_hidden_states=context).sample.double()
    expected = (1 - 1.5 * 0.8) * e0 + 1.5 * 0.3 * e1 + 1.5 * 0.5 * e2
    assert torch.allclose(out.double(), expected, atol=1e-6)


def test_base_is_not_evaluated_when_weights_sum_to_one(full_members):
    base, members = full_members
    base_calls = forward_calls(base)
    denoiser = BlendedDenoiser(base, members)
    denoiser.set_blend({"ir": 0.3, "aes": 0.7})
    denoiser(*_inputs()[:2], encoder_hidden_states=_inputs()[2])
    assert base_calls == []


def test_zero_weight_member_is_not_evaluated(full_members):
    base, members = full_members
    unused = forward_calls(members["aes"])
    denoiser = BlendedDenoiser(base, members)
    denoiser.set_blend({"ir": 1.0}, kl_scale=0.5)
    denoiser(*_inputs()[:2], encoder_hidden_states=_inputs()[2])
    assert unused == []


def test_lora_members_route_to_their_adapter():
    base = tiny.unet(0)
    tiny.add_lora(base, "ir", seed=5)
    reference = tiny.unet(0)
    tiny.add_lora(reference, "ir", seed=5)  # same weights, used the plain peft way
    denoiser = BlendedDenoiser(base, {"ir": "ir"})
    denoiser.set_blend({"ir": 1.0})
    sample, t, context = _inputs()
    with torch.no_grad():
        blended = denoiser(sample, t, encoder_hidden_states=context).sample
        reference.set_adapter("ir")
        expected = reference(sample, t, encoder_hidden_states=context).sample
        reference.disable_adapters()
        plain_base = reference(sample, t, encoder_hidden_states=context).sample
    assert torch.allclose(blended, expected, atol=1e-6)
    assert not torch.allclose(blended, plain_base, atol=1e-3)  # the adapter does something


def test_set_blend_is_required():
    denoiser = BlendedDenoiser(tiny.unet(0), {"ir": tiny.unet(1)})
    with pytest.raises(RuntimeError, match="set_blend"):
        denoiser(*_inputs()[:2], encoder_hidden_states=_inputs()[2])


def test_unknown_mode_raises(full_members):
    with pytest.raises(ValueError, match="mode must be one of"):
        BlendedDenoiser(*full_members).set_blend({"ir": 1.0}, mode="average")


def test_empty_members_raise():
    with pytest.raises(ValueError, match="at least one basis member"):
        BlendedDenoiser(tiny.unet(0), {})


def test_member_of_another_class_raises():
    with pytest.raises(ValueError, match="member 'ir' is a SD3Transformer2DModel"):
        BlendedDenoiser(tiny.unet(0), {"ir": tiny.sd3_transformer()})


def test_member_with_other_in_channels_raises():
    with pytest.raises(ValueError, match="in_channels: 8 vs base 4"):
        BlendedDenoiser(tiny.unet(0), {"ir": tiny.unet(1, in_channels=8)})


def test_member_with_other_sample_size_raises():
    with pytest.raises(ValueError, match="sample_size: 16 vs base 8"):
        BlendedDenoiser(tiny.unet(0), {"ir": tiny.unet(1, sample_size=16)})


def test_member_with_other_prediction_type_raises():
    base, member = tiny.unet(0), tiny.unet(1)
    base.register_to_config(prediction_type="epsilon")
    member.register_to_config(prediction_type="v_prediction")
    with pytest.raises(ValueError, match="one prediction type.*v_prediction"):
        BlendedDenoiser(base, {"ir": member})


class _Tiny(nn.Module):
    def __init__(self, width):
        super().__init__()
        self.proj = nn.Linear(width, width)

    def forward(self, x, t):
        return self.proj(x)


def test_plain_modules_are_compared_by_parameter_shapes():
    with pytest.raises(ValueError, match="different parameters"):
        BlendedDenoiser(_Tiny(4), {"ir": _Tiny(5)})


def test_adapter_not_on_the_base_raises():
    with pytest.raises(ValueError, match="not loaded on the base"):
        BlendedDenoiser(tiny.unet(0), {"ir": "ir"})


def test_member_in_another_dtype_raises():
    denoiser = BlendedDenoiser(tiny.unet(0), {"ir": tiny.unet(1).half()})
    with pytest.raises(ValueError, match="member 'ir' is on cpu in torch.float16"):
        denoiser.set_blend({"ir": 1.0})


@pytest.mark.parametrize("name", ["", "a.b", "a,b", "a=b", "__base__"])
def test_bad_member_names_raise(name):
    with pytest.raises(ValueError, match="basis name"):
        BlendedDenoiser(tiny.unet(0), {name: tiny.unet(1)})


@pytest.mark.parametrize("name", ["train", "to", "keys"])
def test_member_names_that_torch_modules_use_raise(name):
    """(A module dictionary keyed by it, the members' or peft's adapters', would fail with a KeyError.)"""
    with pytest.raises(ValueError, match=f"basis name '{name}' is the name of a torch module attribute"):
        BlendedDenoiser(tiny.unet(0), {name: tiny.unet(1)})


def _with_style():
    """A base with LoRA members "ir" and "aes" and the user's own "style" adapter, active."""
    base = tiny.unet(0)
    for name, seed in (("ir", 5), ("aes", 7), ("style", 6)):
        tiny.add_lora(base, name, seed=seed)
    base.set_adapter("style")
    return base


def _blend_of(base, weights, kl_scale=1.5):
    denoiser = BlendedDenoiser(base, {"ir": "ir", "aes": "aes"})
    denoiser.set_blend(weights, kl_scale=kl_scale)
    sample, t, context = _inputs()
    with torch.no_grad():
        return denoiser(sample, t, encoder_hidden_states=context).sample


def test_a_user_adapter_left_active_belongs_to_the_base():
    base, weights = _with_style(), {"ir": 0.3, "aes": 0.5}
    blended = _blend_of(base, weights)
    assert base.active_adapters() == ["style"]
    sample, t, context = _inputs()
    predictions = {}
    with torch.no_grad():
        for name, active in (("base", ["style"]), ("ir", ["style", "ir"]), ("aes", ["style", "aes"])):
            base.set_adapter(active)  # peft's own forward with those adapters
            predictions[name] = base(sample, t, encoder_hidden_states=context).sample
    assert max_diff(blended, references.expanded_blend(predictions, weights, 1.5)) <= 1e-5


def test_a_fused_user_adapter_belongs_to_the_base():
    active = _blend_of(_with_style(), {"ir": 0.3, "aes": 0.5})
    fused = _with_style()
    fused.fuse_lora(adapter_names=["style"])
    assert max_diff(_blend_of(fused, {"ir": 0.3, "aes": 0.5}), active) <= 1e-5


def test_a_fused_user_adapter_is_left_out_while_lora_is_disabled():
    """peft unfuses a disabled adapter: the base is then the plain base."""
    fused = _with_style()
    fused.fuse_lora(adapter_names=["style"])
    fused.disable_lora()
    sample, t, context = _inputs()
    with torch.no_grad():
        plain = tiny.unet(0)(sample, t, encoder_hidden_states=context).sample
    assert max_diff(_blend_of(fused, {"ir": 0.3, "aes": 0.5}, kl_scale=0.0), plain) <= 1e-5


def test_a_fused_member_is_refused():
    base = _with_style()
    base.fuse_lora(adapter_names=["ir"])
    with pytest.raises(ValueError, match=r"LoRA member\(s\) 'ir' are fused \(merged\) into the denoiser's weights"):
        _blend_of(base, {"ir": 0.3, "aes": 0.5})


def test_a_deep_copy_blends_on_its_own(full_members):
    import copy

    denoiser = BlendedDenoiser(*full_members)
    denoiser.set_blend({"ir": 1.0})
    twin = copy.deepcopy(denoiser)
    twin.set_blend({"ir": 1.0}, kl_scale=0.0)
    sample, t, context = _inputs()
    with torch.no_grad():
        assert torch.equal(
            twin(sample, t, encoder_hidden_states=context).sample,
            full_members[0](sample, t, encoder_hidden_states=context).sample,
        )
        assert torch.equal(
            denoiser(sample, t, encoder_hidden_states=context).sample,
            full_members[1]["ir"](sample, t, encoder_hidden_states=context).sample,
        )


def test_private_attributes_are_not_taken_from_the_base(full_members):
    base, members = full_members
    base._hf_hook = object()
    assert not hasattr(BlendedDenoiser(base, members), "_hf_hook")
