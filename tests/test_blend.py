"""blend_predictions and the validation of weights and λ, against an independent float64 computation."""

import math

import pytest
import torch

from diffusion_blend import blend_predictions, validate_kl_scale, validate_weights


def _tensors(count, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(2, 3, 4, 4, generator=generator) for _ in range(count)]


def _expanded_reference(base, members, weights, kl_scale):
    """(1 − λΣw)·base + Σ λ w_i m_i in float64: the formula expanded, computed another way."""
    out = (1 - kl_scale * math.fsum(weights)) * base.double()
    for member, weight in zip(members, weights):
        out = out + kl_scale * weight * member.double()
    return out


@pytest.mark.parametrize(
    "weights, kl_scale",
    [([0.3, 0.7], 1.0), ([1.0, 0.0], 0.5), ([1.0, 0.0], 2.0), ([0.25, 0.5], 1.7), ([1.5, -0.5], 1.0)],
)
def test_blend_matches_expanded_formula(weights, kl_scale):
    base, *members = _tensors(3)
    out = blend_predictions(base, members, weights, kl_scale)
    assert torch.allclose(out.double(), _expanded_reference(base, members, weights, kl_scale), atol=1e-6)


def test_base_may_be_omitted_when_weights_sum_to_one():
    base, *members = _tensors(3)
    with_base = blend_predictions(base, members, [0.3, 0.7])
    without_base = blend_predictions(None, members, [0.3, 0.7])
    assert torch.allclose(with_base, without_base, atol=1e-6)
    assert torch.equal(without_base, members[0] * 0.3 + members[1] * 0.7)


def test_one_hot_weight_returns_the_member_exactly():
    _, member = _tensors(2)
    assert torch.equal(blend_predictions(None, [member], [1.0]), member)


def test_kl_scale_zero_returns_the_base_exactly():
    base, member = _tensors(2)
    assert torch.equal(blend_predictions(base, [member], [1.0], kl_scale=0.0), base)


def test_missing_base_raises_when_it_is_needed():
    _, *members = _tensors(3)
    with pytest.raises(ValueError, match="base may be None only"):
        blend_predictions(None, members, [0.3, 0.3])


def test_blend_keeps_half_precision():
    base, member = (t.half() for t in _tensors(2))
    assert blend_predictions(base, [member], [1.0], kl_scale=0.5).dtype == torch.float16


def test_shape_mismatch_raises():
    base = torch.zeros(1, 4, 8, 8)
    with pytest.raises(ValueError, match="shape"):
        blend_predictions(base, [torch.zeros(1, 4, 4, 4)], [1.0], 0.5)


def test_missing_names_count_as_zero():
    assert validate_weights({"a": 0.4}, ["a", "b"]) == {"a": 0.4, "b": 0.0}


def test_unknown_weight_name_raises():
    with pytest.raises(ValueError, match="unknown weight name.*'c'"):
        validate_weights({"a": 0.5, "c": 0.5}, ["a", "b"])


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_weight_raises(bad):
    with pytest.raises(ValueError, match="weight 'a' is .*finite"):
        validate_weights({"a": bad}, ["a"])


def test_non_numeric_weight_raises():
    with pytest.raises(ValueError, match="must be a number"):
        validate_weights({"a": "0.5"}, ["a"])


def test_negative_weights_are_allowed_in_mix():
    assert validate_weights({"a": 1.5, "b": -0.5}, ["a", "b"]) == {"a": 1.5, "b": -0.5}


def test_simplex_rejects_negative_weights():
    with pytest.raises(ValueError, match="non-negative"):
        validate_weights({"a": 1.5, "b": -0.5}, ["a", "b"], simplex=True)


def test_simplex_rejects_weights_not_summing_to_one():
    with pytest.raises(ValueError, match="sum to 1"):
        validate_weights({"a": 0.5, "b": 0.3}, ["a", "b"], simplex=True)


@pytest.mark.parametrize("bad", [-0.1, float("nan"), float("inf")])
def test_bad_kl_scale_raises(bad):
    with pytest.raises(ValueError, match="kl_scale must be a finite number >= 0"):
        validate_kl_scale(bad)


def test_the_blend_is_a_new_tensor_even_for_one_member_of_weight_one():
    member = torch.ones(2)
    blend_predictions(None, [member], [1.0]).mul_(3)
    assert torch.equal(member, torch.ones(2))
