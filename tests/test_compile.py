"""torch.compile: compiled blends equal eager ones, one graph serves every routing, and denoisers the user compiled
(wrapped or in place, whole or by regions) never hide the LoRA routing.

TorchDynamo's own backend ("eager": graph capture, no code generation) keeps these tests fast; one slow test runs
the default inductor backend."""

from __future__ import annotations

import pytest
import torch
import torch._dynamo

from diffusion_blend import Blend, BlendedDenoiser
from diffusion_blend.adapters import ROUTED_FORWARD_ATTRIBUTE
from diffusion_blend.compiled import compile_options
from helpers import tiny
from helpers.calls import call_kwargs, cfg_inputs, lora_base, max_diff

CAPTURE = {"backend": "eager", "fullgraph": True}
MEMBERS = {"ir": "ir", "aes": "aes"}


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    yield
    torch._dynamo.reset()


def _graphs() -> int:
    return torch._dynamo.utils.counters["stats"]["unique_graphs"]


def _steps(denoiser, weights, kl_scale=1.0, mode="mix", timesteps=(900, 500, 100), seed=0):
    """The blended predictions of a few denoising steps on one CFG batch."""
    denoiser.set_blend(weights, kl_scale=kl_scale, mode=mode, generator=torch.Generator().manual_seed(seed))
    sample, _, context = cfg_inputs()
    with torch.no_grad():
        return [denoiser(sample, torch.tensor(t), encoder_hidden_states=context).sample for t in timesteps]


@pytest.mark.parametrize(
    "mode, weights, kl_scale",
    [
        ("mix", {"ir": 0.3, "aes": 0.5}, 1.5),
        ("stochastic", {"ir": 0.4, "aes": 0.6}, 0.5),
    ],
)
def test_compiled_lora_blend_equals_the_eager_blend(mode, weights, kl_scale):
    base = lora_base()
    eager = _steps(BlendedDenoiser(base, MEMBERS), weights, kl_scale, mode)
    compiled = _steps(BlendedDenoiser(base, MEMBERS, compile=CAPTURE), weights, kl_scale, mode)
    assert _graphs() == 1
    assert max(max_diff(a, b) for a, b in zip(eager, compiled)) <= 1e-5


@pytest.mark.slow
def test_compiled_blend_with_lora_and_full_members_equals_the_eager_blend():
    base = lora_base(("ir",))
    members = {"ir": "ir", "aes": tiny.unet(3)}
    eager = _steps(BlendedDenoiser(base, members), {"ir": 0.3, "aes": 0.5}, kl_scale=1.5)
    compiled = _steps(BlendedDenoiser(base, members, compile=CAPTURE), {"ir": 0.3, "aes": 0.5}, kl_scale=1.5)
    assert max(max_diff(a, b) for a, b in zip(eager, compiled)) <= 1e-5


@pytest.mark.slow
def test_compiled_blend_at_each_lora_scale_equals_the_eager_blend():
    base = lora_base()
    eager, compiled = BlendedDenoiser(base, MEMBERS), BlendedDenoiser(base, MEMBERS, compile=CAPTURE)
    sample, t, context = cfg_inputs()
    for denoiser in (eager, compiled):
        denoiser.set_blend({"ir": 0.3, "aes": 0.5}, kl_scale=1.5)
    with torch.no_grad():
        for scale in (0.5, 2.0):  # a graph traced at one scale must not serve another
            kwargs = dict(encoder_hidden_states=context, cross_attention_kwargs={"scale": scale})
            assert max_diff(eager(sample, t, **kwargs).sample, compiled(sample, t, **kwargs).sample) <= 1e-5


def test_fresh_stochastic_draws_reuse_one_graph():
    denoiser = BlendedDenoiser(lora_base(), MEMBERS, compile=CAPTURE)
    denoiser.set_blend({"ir": 0.5, "aes": 0.5}, mode="stochastic", generator=torch.Generator().manual_seed(3))
    sample, _, context = cfg_inputs(samples=4)
    draws = []
    with torch.no_grad():
        denoiser(sample, torch.tensor(999), encoder_hidden_states=context)
        with torch._dynamo.config.patch(error_on_recompile=True):
            for t in range(900, 0, -100):
                denoiser(sample, torch.tensor(t), encoder_hidden_states=context)
                draws.append(tuple(denoiser._draws.previous.draws.tolist()))
    assert len(set(draws)) > 1  # the routing did change between steps
    assert _graphs() == 1


def test_compiled_pipeline_blend_equals_eager_and_compiles_once(sd_loras):
    eager = Blend(tiny.sd_pipeline(), sd_loras)
    compiled = Blend(tiny.sd_pipeline(), sd_loras, compile=CAPTURE)
    weights = {"ir": 0.3, "aes": 0.5}
    expected = eager(weights=weights, kl_scale=1.5, **call_kwargs()).images
    first = compiled(weights=weights, kl_scale=1.5, **call_kwargs()).images
    with torch._dynamo.config.patch(error_on_recompile=True):
        again = compiled(weights={"ir": 0.6, "aes": 0.1}, kl_scale=0.5, **call_kwargs()).images
    assert max_diff(first, expected) <= 1e-5
    assert max_diff(again, eager(weights={"ir": 0.6, "aes": 0.1}, kl_scale=0.5, **call_kwargs()).images) <= 1e-5


def test_a_compiled_pipeline_denoiser_is_unwrapped_and_given_back(sd_loras):
    expected = Blend(tiny.sd_pipeline(), sd_loras)(weights={"ir": 0.3, "aes": 0.7}, **call_kwargs()).images
    pipe = tiny.sd_pipeline()
    compiled_unet = torch.compile(pipe.unet, **CAPTURE)
    pipe.unet = compiled_unet
    blend = Blend(pipe, sd_loras, compile=CAPTURE)
    images = blend(weights={"ir": 0.3, "aes": 0.7}, **call_kwargs()).images
    assert blend.denoiser.base is compiled_unet._orig_mod
    assert pipe.unet is compiled_unet
    assert max_diff(images, expected) <= 1e-5


@pytest.mark.parametrize("how", ["wrapped", "in place", "by regions"])
def test_a_denoiser_given_compiled_is_blended_compiled_by_default(how):
    base = lora_base()
    given = torch.compile(base) if how == "wrapped" else base
    if how == "in place":
        base.compile()
    if how == "by regions":  # as diffusers' compile_repeated_blocks does
        for block in base.down_blocks:
            block.compile()
    assert BlendedDenoiser(given, MEMBERS).compile_options == {}
    assert BlendedDenoiser(lora_base(), MEMBERS).compile_options is None


def _blend_rows(base):
    """The blend's stacked call (base + two members on 4 CFG rows = 12 rows) made directly on ``base``."""
    sample, t, context = cfg_inputs()
    return sample.repeat(3, 1, 1, 1), t, context.repeat(3, 1, 1)


@pytest.mark.parametrize("region", ["whole", "block"])
def test_in_place_compiled_regions_do_not_hide_the_routing(region):
    """A graph compiled before the routing was installed must not run it (TorchDynamo skips hook guards, so such a
    graph would ignore the routing): the blend runs those regions uncompiled, and gives them back compiled after."""
    weights = {"ir": 0.3, "aes": 0.5}
    expected = _steps(BlendedDenoiser(lora_base(), MEMBERS, compile=False), weights, 1.5, timesteps=(400,))[0]
    base = lora_base()
    compiled = base if region == "whole" else base.down_blocks[1]
    compiled.compile(**CAPTURE)
    sample, t, context = _blend_rows(base)
    with torch.no_grad():
        base(sample, t, encoder_hidden_states=context)  # traced without hooks, at the blend's batch size
    blended = _steps(BlendedDenoiser(base, MEMBERS, compile=False), weights, 1.5, timesteps=(400,))[0]
    assert max_diff(blended, expected) <= 1e-5
    assert compiled._compiled_call_impl is not None


def test_the_base_outside_a_compiled_blend_is_the_plain_base():
    base = lora_base()
    sample, t, context = cfg_inputs()
    with torch.no_grad():
        plain = base(sample, t, encoder_hidden_states=context).sample
    denoiser = BlendedDenoiser(base, MEMBERS, compile=CAPTURE)
    _steps(denoiser, {"ir": 0.5, "aes": 0.5}, timesteps=(400,))
    with torch.no_grad():
        after = base(sample, t, encoder_hidden_states=context).sample
    assert torch.equal(after, plain)


def test_a_compiled_blend_leaves_the_base_as_it_found_it():
    base = lora_base()

    def state():  # (a LoRA layer keeps its routed forward, made once, so that graphs are reused)
        return [
            (sorted(set(m.__dict__) - {ROUTED_FORWARD_ATTRIBUTE}), len(m._forward_hooks), len(m._forward_pre_hooks))
            for m in base.modules()
        ]

    before = state()
    _steps(BlendedDenoiser(base, MEMBERS, compile=CAPTURE), {"ir": 0.5, "aes": 0.5}, timesteps=(400,))
    assert state() == before


def test_compiled_blends_made_one_after_another_share_their_graph():
    """Each pipeline call installs the routing anew: the graph is reused, not retraced per call or blend."""
    base = lora_base()
    _steps(BlendedDenoiser(base, MEMBERS, compile=CAPTURE), {"ir": 0.5, "aes": 0.5}, 1.5, timesteps=(400,))
    with torch._dynamo.config.patch(error_on_recompile=True):
        for weights in ({"ir": 0.2, "aes": 0.3}, {"ir": 0.7, "aes": 0.1}):  # the same plan: base and both members
            _steps(BlendedDenoiser(base, MEMBERS, compile=CAPTURE), weights, 1.5, timesteps=(400,))
    assert _graphs() == 1


@pytest.mark.slow
def test_hooks_added_after_a_compiled_blend_are_honoured():
    """TorchDynamo skips hook guards by default; the blend's compiled calls guard them, so a graph traced before a
    hook was added is not reused after."""
    weights = {"ir": 0.3, "aes": 0.5}
    base = lora_base()
    compiled = BlendedDenoiser(base, MEMBERS, compile=CAPTURE)
    _steps(compiled, weights, 1.5, timesteps=(400,))
    base.mid_block.register_forward_hook(lambda _module, _args, output: 2 * output)
    expected = _steps(BlendedDenoiser(base, MEMBERS), weights, 1.5, timesteps=(400,))[0]
    assert max_diff(_steps(compiled, weights, 1.5, timesteps=(400,))[0], expected) <= 1e-5


def test_compile_options_are_checked():
    with pytest.raises(ValueError, match="unknown torch.compile option"):
        compile_options({"mode": "max-autotune", "fullgrph": True}, given_compiled=False)
    with pytest.raises(ValueError, match="compile must be"):
        compile_options("yes", given_compiled=False)
    assert compile_options(None, given_compiled=False) is None
    assert compile_options(None, given_compiled=True) == {}
    assert compile_options(False, given_compiled=True) is None


@pytest.mark.slow
def test_compiled_vmapped_full_members_equal_eager_ones_in_one_graph():
    members = {"ir": tiny.unet(1), "aes": tiny.unet(2)}
    weights = {"ir": 0.3, "aes": 0.5}
    eager = _steps(BlendedDenoiser(tiny.unet(0), members, vmap_full_members=True), weights, 1.5)
    compiled = BlendedDenoiser(tiny.unet(0), members, vmap_full_members=True, compile=CAPTURE)
    first = _steps(compiled, weights, 1.5, timesteps=(900,))
    with torch._dynamo.config.patch(error_on_recompile=True):
        rest = _steps(compiled, weights, 1.5, timesteps=(500, 100))
    assert all(max_diff(c, e) <= 1e-5 for c, e in zip(first + rest, eager))


@pytest.mark.slow
@pytest.mark.parametrize("options", [True, {"mode": "reduce-overhead"}], ids=["default", "reduce-overhead"])
def test_inductor_compiled_blend_equals_the_eager_blend(options):
    """With the default inductor backend; "reduce-overhead" (CUDA graphs where there is a GPU) takes the path that
    marks a graph step per call and clones each prediction."""
    base = lora_base()
    weights = {"ir": 0.3, "aes": 0.5}
    eager = _steps(BlendedDenoiser(base, MEMBERS), weights, 1.5, timesteps=(900, 400))
    compiled = _steps(BlendedDenoiser(base, MEMBERS, compile=options), weights, 1.5, timesteps=(900, 400))
    assert max(max_diff(a, b) for a, b in zip(eager, compiled)) <= 1e-5
