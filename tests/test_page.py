"""What the slider page computes on a click, without a browser: images, rewards, the plot, messages for bad values."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image

from diffusion_blend import Blend
from diffusion_blend.presets import digits
from diffusion_blend.rewards import get_reward
from diffusion_blend.ui import Page, read_front, reward_plot


@pytest.fixture(scope="module")
def page() -> Page:
    basis = digits.basis_models()
    return Page(
        Blend(digits.load_pipeline(), basis=basis),
        {name: get_reward(name) for name in basis},
        guidance_scale=1.0,
        plotted=("bold", "stencil"),
    )


def click(page: Page, weights=(0.5, 0.0, 0.5), mode="mix", seed=0):
    return page.generate("3", mode, 1.0, seed, 4, 3, *weights)  # names in order: bold, legible, stencil


def test_a_click_gives_images_their_rewards_and_a_plot(page):
    images, table, plot, status = click(page)
    assert len(images) == 3 and len(table) == 3 and len(table[0]) == 4 and plot is not None
    assert "bold = 0.5, legible = 0, stencil = 0.5" in status


def test_the_page_samples_what_the_blend_samples(page):
    images, *_ = click(page, seed=5)
    blend = Blend(digits.load_pipeline(), basis=digits.basis_models())
    expected = blend.blend(
        prompt=["3"] * 3,
        weights={"bold": 0.5, "legible": 0.0, "stencil": 0.5},
        guidance_scale=1.0,
        num_inference_steps=4,
        output_type="pt",
        generator=[torch.Generator().manual_seed(5 + i) for i in range(3)],
    ).images
    shown = torch.stack(
        [torch.tensor(list(image.resize((16, 16), Image.NEAREST).getdata())).float() for image in images]
    )  # shown 8× larger, pixel for pixel
    assert torch.allclose(shown[..., 0].view(3, 16, 16) / 255, expected[:, 0], atol=1 / 255 + 1e-6)


def test_weights_off_the_simplex_in_stochastic_mode_are_reported_not_sampled(page):
    images, table, plot, status = click(page, weights=(0.9, 0.3, 0.3), mode="stochastic")
    assert images == [] and plot is None and status.startswith("**Not generated:**") and "sum to 1" in status


def test_the_plot_draws_a_sweeps_front_behind_the_images(tmp_path):
    front = {
        "methods": {
            "db-mpa": [
                {"rewards": {"bold": {"mean": b}, "stencil": {"mean": s}}} for b, s in ((28, 0.1), (33, 0.02), (38, 0))
            ],
            "code": [{"rewards": {"bold": {"mean": 40}, "stencil": {"mean": 0}}}] * 2,
        }
    }
    figure = reward_plot({"bold": torch.tensor([30.0, 31.0]), "stencil": torch.tensor([0.0, 1.0])}, front)
    labels = [line.get_label() for line in figure.axes[0].get_lines()]
    assert labels == ["sweep: db-mpa"]
    path = tmp_path / "results.json"
    path.write_text(json.dumps(front))
    assert read_front(path) == front
    path.write_text("[]")
    with pytest.raises(ValueError, match="not a sweep"):
        read_front(path)
