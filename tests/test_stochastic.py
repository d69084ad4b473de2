"""Stochastic mode (DB-MPA-LS): one member per sample and call, drawn with probability w."""

import pytest
import torch
from torch import nn

from diffusion_blend import BlendedDenoiser
from helpers import tiny


class Constant(nn.Module):
    """A denoiser that predicts its own constant everywhere: its output tells which member was used."""

    def __init__(self, value: float):
        super().__init__()
        self.value = nn.Parameter(torch.tensor(float(value)))

    def forward(self, sample, timestep):
        return torch.ones_like(sample) * self.value


def _members():
    return Constant(0.0), {"a": Constant(1.0), "b": Constant(2.0), "c": Constant(3.0)}


def _even_coin() -> BlendedDenoiser:
    """Constant members "a" and "b" drawn with probability ½ each."""
    base, members = _members()
    denoiser = BlendedDenoiser(base, members)
    denoiser.set_blend({"a": 0.5, "b": 0.5}, mode="stochastic", generator=torch.Generator().manual_seed(0))
    return denoiser


def _drawn(out):
    return out.flatten(1)[:, 0].round().long().tolist()


def test_same_generator_seed_gives_the_same_draws():
    base, members = _members()
    denoiser = BlendedDenoiser(base, members)
    x = torch.randn(16, 2)
    results = []
    for _ in range(2):
        denoiser.set_blend(
            {"a": 0.2, "b": 0.3, "c": 0.5}, mode="stochastic", generator=torch.Generator().manual_seed(7)
        )
        results.append([_drawn(denoiser(x, 0)) for _ in range(5)])
    assert results[0] == results[1]


def test_member_frequencies_match_the_weights():
    base, members = _members()
    denoiser = BlendedDenoiser(base, members)
    weights = {"a": 0.2, "b": 0.3, "c": 0.5}
    denoiser.set_blend(weights, mode="stochastic", generator=torch.Generator().manual_seed(0))
    draws = torch.tensor([_drawn(denoiser(torch.randn(20, 2), 0)) for _ in range(500)]).flatten()
    total = draws.numel()  # 10 000 draws
    for value, name in ((1, "a"), (2, "b"), (3, "c")):
        p = weights[name]
        sigma = (p * (1 - p) / total) ** 0.5
        assert abs((draws == value).float().mean().item() - p) < 4 * sigma


def test_cfg_halves_of_a_sample_share_a_member():
    denoiser = _even_coin()
    latents = torch.randn(3, 2)
    pairs = []
    for step in range(50):
        drawn = _drawn(denoiser(torch.cat([latents, latents]), step))  # [uncond; cond] as pipelines batch CFG
        assert drawn[:3] == drawn[3:]
        pairs.append(drawn[:3])
    assert len({tuple(p) for p in pairs}) > 1  # the samples themselves still draw anew at every step


#: timesteps as pipelines pass them: Python numbers (compared on the host) or tensors (compared on the device)
TIMESTEP_KINDS = [int, torch.tensor]


@pytest.mark.parametrize("timestep", TIMESTEP_KINDS)
def test_cfg_halves_in_two_calls_share_a_member(timestep):
    """Pipelines that run the unconditional and conditional passes as two calls at the same timestep."""
    denoiser = _even_coin()
    for step in range(40):
        latents = torch.randn(4, 2)
        assert _drawn(denoiser(latents, timestep(step))) == _drawn(denoiser(latents.clone(), timestep(step)))


class ConstantTransformer(Constant):
    """Constant, called as SD3's and Flux's transformers are: the text comes second, the timestep by name."""

    def forward(self, hidden_states, encoder_hidden_states=None, timestep=None):
        return torch.ones_like(hidden_states) * self.value


def test_the_two_calls_of_a_step_share_a_member_when_the_timestep_is_not_second():
    """Flux's true CFG: the prompt's and the negative prompt's calls at one timestep."""
    members = {"a": ConstantTransformer(1.0), "b": ConstantTransformer(2.0)}
    denoiser = BlendedDenoiser(ConstantTransformer(0.0), members)
    denoiser.set_blend({"a": 0.5, "b": 0.5}, mode="stochastic", generator=torch.Generator().manual_seed(0))
    latents, prompt, negative = torch.randn(16, 2), torch.randn(16, 3), torch.randn(16, 3)
    for step in (0.9, 0.5):
        timestep = torch.full((16,), step)
        conditional = _drawn(denoiser(latents, encoder_hidden_states=prompt, timestep=timestep))
        assert _drawn(denoiser(latents, encoder_hidden_states=negative, timestep=timestep)) == conditional
        assert _drawn(denoiser(latents, negative, timestep)) == conditional  # given by position too


@pytest.mark.parametrize("timestep", TIMESTEP_KINDS)
def test_a_new_step_draws_again(timestep):
    denoiser = _even_coin()
    latents = torch.randn(16, 2)
    first = _drawn(denoiser(latents, timestep(10)))
    assert _drawn(denoiser(latents, timestep(10))) == first
    assert _drawn(denoiser(latents, timestep(9))) != first


def test_the_draws_do_not_depend_on_how_timesteps_are_given():
    """Compared on the host or on the device, a step takes as many draws from the generator."""
    latents = torch.randn(4, 2)
    draws = {}
    for kind in TIMESTEP_KINDS:
        denoiser = _even_coin()
        draws[kind] = [
            _drawn(denoiser(latents if step % 2 else torch.randn(4, 2), kind(step // 2))) for step in range(12)
        ]
    assert draws[int] == draws[torch.tensor]


@pytest.mark.parametrize("timestep", TIMESTEP_KINDS)
def test_identical_rows_share_the_new_draw_of_a_new_step(timestep):
    """Rows met at the previous step too draw afresh at a new one, identical rows of the call together."""
    denoiser = _even_coin()
    latents = torch.randn(16, 2)
    first = _drawn(denoiser(torch.cat([latents, latents]), timestep(10)))
    again = _drawn(denoiser(torch.cat([latents, latents]), timestep(9)))
    assert first[:16] == first[16:] and again[:16] == again[16:]
    assert again[:16] != first[:16]


def test_stochastic_with_kl_scale_zero_evaluates_only_the_base():
    base, members = _members()
    calls = []
    for module in members.values():
        module.register_forward_hook(lambda *_: calls.append(1))
    denoiser = BlendedDenoiser(base, members)
    denoiser.set_blend({"a": 0.5, "b": 0.5}, kl_scale=0.0, mode="stochastic")
    out = denoiser(torch.randn(4, 2), 3)
    assert calls == [] and torch.equal(out, torch.zeros_like(out))


def test_kl_scale_applies_to_the_drawn_member():
    base, members = _members()
    denoiser = BlendedDenoiser(base, members)
    denoiser.set_blend({"c": 1.0}, kl_scale=0.5, mode="stochastic")
    out = denoiser(torch.randn(4, 2), 0)
    assert torch.equal(out, torch.full_like(out, 0.0 + 0.5 * (3.0 - 0.0)))


def _stochastic_and_mix(sample, context):
    base, member, twin = tiny.unet(0), tiny.unet(1), tiny.unet(1)
    denoiser = BlendedDenoiser(base, {"a": member, "b": twin})
    with torch.no_grad():
        denoiser.set_blend({"a": 0.5, "b": 0.5}, mode="stochastic", generator=torch.Generator().manual_seed(0))
        stochastic = denoiser(sample, 10, encoder_hidden_states=context).sample
        denoiser.set_blend({"a": 0.5, "b": 0.5})
        mixed = denoiser(sample, 10, encoder_hidden_states=context).sample
    return stochastic, mixed


def test_identical_members_equal_the_mix_exactly():
    """One sample (as a CFG pair): the drawn member sees the whole batch, so the result is bit for bit the mix."""
    sample, context = torch.randn(1, 4, 8, 8), torch.randn(2, 5, tiny.TEXT_HIDDEN)
    stochastic, mixed = _stochastic_and_mix(torch.cat([sample, sample]), context)
    assert torch.equal(stochastic, mixed)


def test_identical_members_equal_the_mix_for_a_batch():
    """Several samples split between members: equal up to the rounding of smaller matrix products."""
    stochastic, mixed = _stochastic_and_mix(torch.randn(4, 4, 8, 8), torch.randn(4, 5, tiny.TEXT_HIDDEN))
    assert (stochastic - mixed).abs().max() <= 1e-6


def test_rows_evaluated_once_each():
    """Each sample costs one member evaluation: the members see exactly the batch's rows between them."""
    base, members = _members()
    seen = []
    for module in members.values():
        module.register_forward_hook(lambda _m, inputs, _o: seen.append(len(inputs[0])))
    denoiser = BlendedDenoiser(base, members)
    denoiser.set_blend({"a": 0.2, "b": 0.3, "c": 0.5}, mode="stochastic", generator=torch.Generator().manual_seed(3))
    denoiser(torch.randn(12, 2), 0)
    assert sum(seen) == 12


@pytest.mark.parametrize("weights", [{"a": 0.5, "b": 0.3}, {"a": 1.2, "b": -0.2}])
def test_weights_off_the_simplex_raise(weights):
    base, members = _members()
    with pytest.raises(ValueError, match="stochastic mode needs"):
        BlendedDenoiser(base, members).set_blend(weights, mode="stochastic")


@pytest.mark.parametrize("generator", [123, "cpu"])
def test_a_draw_generator_that_is_not_a_generator_raises(generator):
    denoiser = BlendedDenoiser(tiny.unet(0), {"a": tiny.unet(1), "b": tiny.unet(2)})
    with pytest.raises(ValueError, match="generator must be a torch.Generator or None"):
        denoiser.set_blend({"a": 0.5, "b": 0.5}, mode="stochastic", generator=generator)
