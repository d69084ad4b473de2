"""Property tests over the public API's and the CLI's argument space: every case either works — and gives what an
independent computation gives — or is refused with one clean line, with nothing written. Seeded (``derandomize``)
and bounded, so CI runs the same examples every time; ``pytest tests/test_properties.py
--hypothesis-show-statistics`` prints how many worked and how many were refused (docs/reliability.md)."""

from __future__ import annotations

import pytest
import safetensors.torch
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from diffusion_blend import Blend, BlendedDenoiser
from diffusion_blend.cli.request import check_request
from diffusion_blend.cli.running import CommandError
from helpers import tiny
from helpers.calls import cfg_inputs, lora_base
from helpers.references import expanded_blend

EXAMPLES = settings(
    max_examples=60,
    derandomize=True,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
#: the cheap properties (no model call) run more examples
MANY = settings(EXAMPLES, max_examples=300)
NAMES = ("ir", "aes")

#: what a user might pass as a number: mostly ordinary ones, and extreme floats, NaN and inf, and things that are
#: not numbers at all
weird = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True), st.integers(-(10**9), 10**9), st.booleans(), st.text(max_size=3)
)
weights = st.one_of(st.floats(-2, 2), st.floats(0, 1), st.integers(-1, 2), weird)
kl_scales = st.one_of(st.floats(0, 3), st.floats(0, 3), st.just(1.0), weird)


def one_line(error: BaseException) -> bool:
    text = str(error)
    return bool(text.strip()) and "\n" not in text.strip()


@pytest.fixture(scope="module")
def lora_blend():
    """A BlendedDenoiser over LoRA members, a CFG input, and each model's own prediction on it (no blend involved)."""
    base = lora_base(NAMES)
    sample, timestep, context = cfg_inputs()
    predictions = {}
    with torch.no_grad():
        for name in ("base", *NAMES):
            base.set_adapter([] if name == "base" else name)
            predictions[name] = base(sample, timestep, encoder_hidden_states=context).sample
    base.set_adapter([])
    return BlendedDenoiser(base, {name: name for name in NAMES}), (sample, timestep, context), predictions


@EXAMPLES
@given(
    weights=st.dictionaries(st.sampled_from([*NAMES, *NAMES, "other"]), weights, max_size=3),
    kl_scale=kl_scales,
    mode=st.sampled_from(["mix", "mix", "stochastic", "average"]),
)
def test_a_blend_either_is_the_expanded_formula_or_is_refused_in_one_line(lora_blend, weights, kl_scale, mode):
    denoiser, (sample, timestep, context), predictions = lora_blend
    try:
        denoiser.set_blend(weights, kl_scale=kl_scale, mode=mode, generator=torch.Generator().manual_seed(0))
    except ValueError as error:
        event("refused")
        assert one_line(error), error
        return
    event(f"blended ({mode})")
    with torch.no_grad():
        out = denoiser(sample, timestep, encoder_hidden_states=context).sample
    assert torch.isfinite(out).all()
    if mode == "mix":
        checked = {name: float(weights.get(name, 0.0)) for name in NAMES}
        expected = expanded_blend(predictions, checked, float(kl_scale))
        scale = 1 + float(kl_scale) * sum(abs(w) for w in checked.values())
        assert (out - expected).abs().max() <= 1e-5 * scale * predictions["base"].abs().max()


@pytest.fixture(scope="module")
def pipe():
    return tiny.sd_pipeline()


@MANY
@given(
    content=st.one_of(
        st.binary(max_size=300), st.builds(lambda n: b"\x08\x00\x00\x00\x00\x00\x00\x00{}" * n, st.integers(0, 3))
    )
)
def test_a_broken_basis_file_is_refused_in_one_line(pipe, tmp_path_factory, content):
    path = tmp_path_factory.mktemp("broken") / "lora.safetensors"
    path.write_bytes(content)
    with pytest.raises(ValueError) as raised:
        Blend(pipe, {"ir": path})
    event("refused")
    assert one_line(raised.value) and str(path) in str(raised.value)
    assert not getattr(pipe.unet, "peft_config", None)  # nothing left loaded


@EXAMPLES
@given(shape=st.tuples(st.integers(1, 6), st.integers(1, 6)), key=st.sampled_from(["lora_A", "lora_B", "x"]))
def test_a_lora_of_the_wrong_shapes_is_refused_in_one_line(pipe, tmp_path_factory, sd_loras, shape, key):
    state = safetensors.torch.load_file(sd_loras["ir"])
    name = next(k for k in sorted(state) if key in k) if key != "x" else sorted(state)[0]
    state[name] = torch.zeros(shape)
    path = tmp_path_factory.mktemp("shapes") / "lora.safetensors"
    safetensors.torch.save_file(state, path)
    try:
        Blend(pipe, {"ir": path}).unload()
        event("loaded (shape as the original)")
    except ValueError as error:
        event("refused")
        assert one_line(error) and str(path) in str(error)
    assert not getattr(pipe.unet, "peft_config", None)


weight_texts = st.lists(
    st.one_of(
        st.sampled_from(["bold=0.5,stencil=0.5", "legible=1", "bold=1", "stencil=0.3,bold=0.7", "bold=2,legible=-1"]),
        st.text(alphabet="boldstencilgbe=,.0123456789-+ ", max_size=16),
    ),
    max_size=2,
)
sizes = st.one_of(st.none(), st.none(), st.integers(-3, 40))
maybe_floats = st.one_of(st.none(), st.floats(0, 10), st.floats(allow_nan=True, allow_infinity=True))


@MANY
@given(
    weights=weight_texts,
    kl_scale=st.one_of(
        st.none(), st.lists(st.one_of(st.floats(0, 2), st.floats(allow_nan=True, allow_infinity=True)), max_size=2)
    ),
    mode=st.sampled_from(["mix", "mix", "stochastic", "x"]),
    prompt=st.sampled_from(["3", "3", "12", "", "seven"]),
    out=st.sampled_from(["out.png", "out/", "out.png", "out.gif", "", "out.jpeg", "deep/er/out.webp", "/proc/out.png"]),
    steps=sizes,
    height=sizes,
    width=sizes,
    guidance=maybe_floats,
    seed=st.one_of(st.integers(0, 100), st.integers(-5, 2**64 + 5)),
    num_images=st.integers(-1, 4),
    scheduler=st.sampled_from([None, None, "ddim", "euler", "nope", "DDPMScheduler"]),
    dtype=st.sampled_from(["fp32", "fp32", "fp16", "int8"]),
    eta=st.one_of(st.none(), st.none(), st.floats(-1, 2)),
    smc=st.one_of(st.none(), st.none(), st.integers(-1, 4)),
)
def test_generate_options_either_make_a_request_or_one_clean_error_writing_nothing(
    tmp_path_factory, monkeypatch, weights, kl_scale, mode, prompt, out, steps, height, width, guidance, seed,
    num_images, scheduler, dtype, eta, smc,
):  # fmt: skip
    folder = tmp_path_factory.mktemp("generate")
    monkeypatch.chdir(folder)
    options = dict(
        base=None, basis=None, weights=weights, prompt=prompt, out=out, kl_scale=kl_scale, mode=mode,
        negative_prompt=None, steps=steps, guidance=guidance, seed=seed, num_images=num_images, height=height,
        width=width, scheduler=scheduler, dtype=dtype, device="cpu", compile=None, max_batch_size=None,
        lora_scale=None, denoiser=None, eta=eta, smc=smc, smc_reward=None, alpha=None,
    )  # fmt: skip
    try:
        check_request(**options)
        event("accepted")
    except (CommandError, ValueError) as error:
        event("refused")
        assert one_line(error), error
    assert not any(folder.iterdir())
