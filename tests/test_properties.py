"""Property tests over the public API's and the CLI's argument space: every case either works — and gives what an
independent computation gives — or is refused with one clean line, with nothing written. Seeded (``derandomize``)
and bounded, so CI runs the same examples every time; ``pytest tests/test_properties.py
--hypothesis-show-statistics`` prints how many worked and how many were refused (docs/reliability.md)."""

from __future__ import annotations

import numpy as np
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


@pytest.fixture(scope="module")
def sd_blend(sd_loras):
    return Blend(tiny.sd_pipeline(), dict(sd_loras))


@EXAMPLES
@given(
    steps=st.one_of(st.integers(1, 4), st.integers(-2, 0)),
    size=st.one_of(st.sampled_from([8, 16, 24]), st.integers(-8, 40)),
    scheduler=st.sampled_from(sorted(tiny.SCHEDULERS)),
    guidance=st.one_of(st.floats(0, 8), st.floats(allow_nan=True, allow_infinity=True)),
    seed=st.integers(0, 2**32),
    weight=st.floats(-1, 2),
)
def test_a_pipeline_call_either_samples_finite_images_or_is_refused(
    sd_blend, steps, size, scheduler, guidance, seed, weight
):
    """Through a whole tiny Stable Diffusion call: schedulers, step counts, sizes, guidance, seeds."""
    sd_blend.pipe.scheduler = tiny.SCHEDULERS[scheduler]()
    try:
        images = sd_blend.blend(
            "a cat",
            weights={"ir": weight, "aes": 1 - weight},
            num_inference_steps=steps,
            height=size,
            width=size,
            guidance_scale=guidance,
            generator=torch.Generator().manual_seed(seed),
            output_type="np",
        ).images
    except ValueError as error:
        event("refused")
        assert one_line(error), error
        return
    event("sampled")
    assert images.shape == (1, size, size, 3) and np.isfinite(images).all()


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


#: each option of ``generate``: what a user means (VALID) and anything at all (WIDE)
VALID = {
    "weights": st.sampled_from([["bold=0.5,stencil=0.5"], ["legible=1"], ["bold=1", "stencil=1"]]),
    "kl_scale": st.sampled_from([None, [1.0], [0.5, 1.5]]),
    "mode": st.just("mix"),
    "prompt": st.sampled_from(["3", "7"]),
    "out": st.sampled_from(["out.png", "out/", "deep/er/out.webp", "out.jpeg"]),
    "steps": st.one_of(st.none(), st.integers(1, 50)),
    "height": st.none(),
    "width": st.none(),
    "guidance": st.one_of(st.none(), st.floats(0, 10)),
    "seed": st.integers(0, 1000),
    "num_images": st.integers(1, 4),
    "scheduler": st.sampled_from([None, "ddim", "euler", "DDPMScheduler"]),
    "dtype": st.sampled_from(["fp32", "fp16"]),
    "eta": st.one_of(st.none(), st.floats(0, 1)),
    "smc": st.one_of(st.none(), st.integers(1, 4)),
}
WIDE = {
    "weights": st.lists(st.text(alphabet="boldstencilgbe=,.0123456789-+ ", max_size=16), max_size=2),
    "kl_scale": st.one_of(st.none(), st.lists(st.floats(allow_nan=True, allow_infinity=True), max_size=2)),
    "mode": st.sampled_from(["stochastic", "x", ""]),
    "prompt": st.sampled_from(["12", "", "seven", " "]),
    "out": st.sampled_from(["out.gif", "", "/proc/out.png", "out", "."]),
    "steps": st.integers(-3, 0),
    "height": st.integers(-3, 40),
    "width": st.integers(-3, 40),
    "guidance": st.floats(allow_nan=True, allow_infinity=True),
    "seed": st.integers(-5, 2**64 + 5),
    "num_images": st.integers(-1, 0),
    "scheduler": st.sampled_from(["nope", "flow", ""]),
    "dtype": st.sampled_from(["int8", "float32", ""]),
    "eta": st.floats(allow_nan=True, allow_infinity=True),
    "smc": st.integers(-2, 0),
}


@MANY
@given(data=st.data())
def test_generate_options_either_make_a_request_or_one_clean_error_writing_nothing(tmp_path_factory, data):
    """A meant request with up to two options drawn from anything at all."""
    folder = tmp_path_factory.mktemp("generate")
    broken = data.draw(st.sets(st.sampled_from(sorted(VALID)), max_size=2), label="options drawn from anything")
    options = {name: data.draw((WIDE if name in broken else VALID)[name], label=name) for name in VALID}
    fixed = dict(base=None, basis=None, negative_prompt=None, device="cpu", compile=None, max_batch_size=None)
    fixed |= dict(lora_scale=None, denoiser=None, smc_reward=None, alpha=None)
    options["out"] = (
        str(folder / options["out"]) if options["out"] and not options["out"].startswith("/") else options["out"]
    )
    try:
        check_request(**options, **fixed)
        event("accepted")
    except (CommandError, ValueError) as error:
        event("refused")
        assert one_line(error), error
    assert not any(folder.iterdir())
