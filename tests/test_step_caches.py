"""diffusers' step caches (``enable_cache``: First Block Cache here) in a blend: each of the blend's denoiser calls
keeps a cache state of its own (members stacked, one call per member, chunks), as separate models each with its own
cache would; a pipeline call starts afresh; the stochastic mode, which switches members every step, is refused.

A threshold of 1e9 makes First Block Cache compute the whole model at the first step only and reuse the residual of
the blocks after the first at every later step: the same decisions for every model, so that a stacked call (one
decision for all its rows) and separate models (one each) must agree exactly."""

from __future__ import annotations

import contextlib

import pytest
import torch
from diffusers.hooks import FirstBlockCacheConfig

from diffusion_blend import Blend
from helpers import references, tiny
from helpers.calls import lora_denoiser, max_diff

WEIGHTS, KL_SCALE = {"ir": 0.6, "aes": 0.2}, 1.4
_generator = torch.Generator().manual_seed(5)
EMBEDS = {
    name: torch.randn(*shape, generator=_generator)
    for name, shape in {
        "prompt_embeds": (1, 6, tiny.FLUX_CONTEXT),
        "pooled_prompt_embeds": (1, tiny.FLUX_CONTEXT),
        "negative_prompt_embeds": (1, 6, tiny.FLUX_CONTEXT),
        "negative_pooled_prompt_embeds": (1, tiny.FLUX_CONTEXT),
    }.items()
}


def _call(seed=0):
    """FLUX.1 with true CFG: its pipeline calls the transformer in a "cond" and an "uncond" cache context."""
    return dict(
        prompt=None,
        **EMBEDS,
        true_cfg_scale=2.0,
        guidance_scale=3.5,
        height=16,
        width=16,
        num_inference_steps=4,
        output_type="np",
        generator=torch.Generator().manual_seed(seed),
    )


def _cached(module):
    module.enable_cache(FirstBlockCacheConfig(threshold=1e9))
    return module


def _cached_pipeline():
    pipe = tiny.flux_pipeline()
    _cached(pipe.transformer)
    return pipe


class SeparatelyCachedBlend(references.ExpandedBlend):
    """The reference: the expanded formula over separate models, each with its own step cache, each called in the
    pipeline's cache context."""

    @contextlib.contextmanager
    def cache_context(self, name, **kwargs):
        with contextlib.ExitStack() as stack:
            for model in self.models.values():
                stack.enter_context(model.cache_context(name, **kwargs))
            yield


@pytest.fixture(scope="module")
def separately_cached(flux_loras):
    """The reference images, and the blend's without any cache (the cache must change them)."""
    models = {
        "base": _cached(tiny.flux_transformer(0)),
        **{
            name: _cached(lora_denoiser(tiny.flux_transformer, path, prefix="transformer"))
            for name, path in flux_loras.items()
        },
    }
    pipe = tiny.flux_pipeline()
    pipe.transformer = SeparatelyCachedBlend(models, WEIGHTS, KL_SCALE)
    uncached = Blend(tiny.flux_pipeline(), flux_loras).blend(weights=WEIGHTS, kl_scale=KL_SCALE, **_call()).images
    return pipe(**_call()).images, uncached


@pytest.mark.parametrize(
    "options", [{}, {"batch_members": False}, {"max_batch_size": 2}], ids=["stacked", "one-call-per-member", "chunked"]
)
def test_each_call_of_the_blend_keeps_its_own_step_cache(flux_loras, separately_cached, options):
    expected, uncached = separately_cached
    out = Blend(_cached_pipeline(), flux_loras, **options).blend(weights=WEIGHTS, kl_scale=KL_SCALE, **_call()).images
    assert max_diff(out, expected) <= 1e-5
    assert max_diff(expected, uncached) > 1e-3


def test_full_members_with_step_caches_of_their_own(flux_loras, separately_cached):
    """The blended denoiser's enable_cache enables one on the base and on each full member, and each gets the
    pipeline's context (without one, First Block Cache raises)."""
    fused = {
        name: tiny.fused_copy(tiny.flux_transformer, path, prefix="transformer") for name, path in flux_loras.items()
    }
    blend = Blend(tiny.flux_pipeline(), fused)
    _cached(blend.denoiser)
    out = blend.blend(weights=WEIGHTS, kl_scale=KL_SCALE, **_call()).images
    assert max_diff(out, separately_cached[0]) <= 1e-4


def test_a_pipeline_call_starts_its_step_cache_afresh(flux_loras):
    """diffusers' pipelines reset their denoisers' step caches at the end of a call: the blend's too."""
    blend = Blend(_cached_pipeline(), flux_loras)
    blend.blend(weights=WEIGHTS, kl_scale=KL_SCALE, **_call(seed=0))
    second = blend.blend(weights=WEIGHTS, kl_scale=KL_SCALE, **_call(seed=1)).images
    fresh = Blend(_cached_pipeline(), flux_loras).blend(weights=WEIGHTS, kl_scale=KL_SCALE, **_call(seed=1)).images
    assert max_diff(second, fresh) == 0


def test_disable_cache_disables_every_members_cache(flux_loras):
    fused = {
        name: tiny.fused_copy(tiny.flux_transformer, path, prefix="transformer") for name, path in flux_loras.items()
    }
    blend = Blend(tiny.flux_pipeline(), fused)
    _cached(blend.denoiser).disable_cache()
    assert not any(module.is_cache_enabled for module in (blend.base, *fused.values()))


def test_stochastic_mode_with_a_step_cache_is_refused_before_the_pipeline_runs(flux_loras):
    call = _call()
    with pytest.raises(ValueError, match=r"the base has a step cache enabled \(enable_cache\).*use mode='mix'"):
        Blend(_cached_pipeline(), flux_loras).blend(weights={"ir": 0.5, "aes": 0.5}, mode="stochastic", **call)
    assert torch.equal(call["generator"].get_state(), torch.Generator().manual_seed(0).get_state())
