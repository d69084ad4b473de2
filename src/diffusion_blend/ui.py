"""``diffusion-blend ui``: a local Gradio page with one slider per basis model — move a slider, press Generate, see.

A new preference mix costs one sampling run, so the page samples on every click: the prompt, a weight per basis
model, λ, the mode, the seed, the steps and the number of images go to :meth:`Blend.blend`; the images come back with
each one's rewards (when reward models are configured) and a plot of them in reward space — beside the front of a
sweep of the same setting (``diffusion-blend sweep``'s ``results.json``) when one is given. Requests are queued and
served one at a time (a ``Blend`` samples one call at a time), so concurrent clicks wait instead of being lost; a bad
value is reported on the page and the server keeps serving.
"""

from __future__ import annotations

from typing import Any

import torch

from .blend import validate_kl_scale, validate_weights

INSTALL = "the web page needs Gradio: pip install 'diffusion-blend[ui]'"
#: the sweep's methods drawn behind the images (the others would crowd a small plot)
FRONT_METHODS = ("db-mpa", "oracle", "soup")


def require_gradio():
    try:
        import gradio
    except ImportError as error:
        raise ImportError(INSTALL) from error
    return gradio


class Page:
    """What the page samples with: a ``Blend``, its reward models (name → model) and the defaults shown."""

    def __init__(
        self,
        blend,
        rewards: dict[str, Any],
        *,
        prompt: str = "3",
        steps: int = 25,
        images: int = 8,
        guidance_scale: float | None = None,
        plotted: tuple[str, str] | None = None,
        front: dict | None = None,
    ):
        self.blend, self.rewards = blend, rewards
        self.plotted = plotted or tuple(rewards)[:2]
        self.front = front
        self.names = list(blend.names)
        self.prompt, self.steps, self.images, self.guidance_scale = prompt, steps, images, guidance_scale

    def generate(
        self, prompt: str, mode: str, kl_scale: float, seed: float, steps: float, count: float, *weights: float
    ):
        """Images, a table of their rewards, the reward-space plot and a status line; a bad value gives no images
        and says why."""
        try:
            chosen = dict(zip(self.names, (float(w) for w in weights)))
            validate_weights(chosen, self.names, simplex=mode == "stochastic")
            validate_kl_scale(kl_scale)
            if not prompt or not prompt.strip():
                raise ValueError("write a prompt")
            options = {"guidance_scale": self.guidance_scale} if self.guidance_scale is not None else {}
            generators = [torch.Generator().manual_seed(int(seed) + index) for index in range(int(count))]
            images = self.blend.blend(
                prompt=[prompt.strip()] * int(count),
                weights=chosen,
                kl_scale=float(kl_scale),
                mode=mode,
                num_inference_steps=int(steps),
                generator=generators,
                output_type="pt",
                **options,
            ).images
        except (ValueError, TypeError) as error:
            return [], [], None, f"**Not generated:** {error}"
        scores = {
            name: model(images, [prompt.strip()] * len(images)).detach().double().cpu()
            for name, model in self.rewards.items()
        }
        table = [[index, *(round(float(scores[name][index]), 4) for name in scores)] for index in range(len(images))]
        mix = ", ".join(f"{name} = {value:g}" for name, value in chosen.items())
        plotted = {name: scores[name] for name in self.plotted if name in scores}
        status = (
            f"{len(images)} images for “{prompt.strip()}”, {mix}, λ = {float(kl_scale):g}, {mode}, seed {int(seed)}"
        )
        return to_pil(images), table, reward_plot(plotted, self.front), status

    def build(self):
        gr = require_gradio()
        with gr.Blocks(title="Diffusion Blend") as app:
            gr.Markdown("# Diffusion Blend\nOne slider per basis model: the images follow the mix of preferences.")
            with gr.Row():
                with gr.Column(scale=1):
                    prompt = gr.Textbox(self.prompt, label="Prompt", elem_id="prompt")
                    sliders = [
                        gr.Slider(
                            0, 1, value=round(1 / len(self.names), 3), step=0.01, label=name, elem_id=f"weight-{name}"
                        )
                        for name in self.names
                    ]
                    kl_scale = gr.Slider(0, 2, value=1, step=0.05, label="λ (KL scale)", elem_id="kl-scale")
                    mode = gr.Radio(["mix", "stochastic"], value="mix", label="Mode", elem_id="mode")
                    seed = gr.Number(0, label="Seed", precision=0, elem_id="seed")
                    steps = gr.Slider(1, 100, value=self.steps, step=1, label="Steps", elem_id="steps")
                    count = gr.Slider(1, 16, value=self.images, step=1, label="Images", elem_id="count")
                    button = gr.Button("Generate", variant="primary", elem_id="generate")
                with gr.Column(scale=2):
                    status = gr.Markdown(elem_id="status")
                    gallery = gr.Gallery(label="Images", columns=4, elem_id="gallery")
                    table = gr.Dataframe(headers=["image", *self.rewards], label="Rewards", elem_id="rewards")
                    plot = gr.Plot(label="Reward space", elem_id="plot")
            button.click(
                self.generate,
                [prompt, mode, kl_scale, seed, steps, count, *sliders],
                [gallery, table, plot, status],
                concurrency_limit=1,
            )
        return app


def to_pil(images: torch.Tensor) -> list:
    from PIL import Image

    pixels = (images.clamp(0, 1) * 255).round().byte().permute(0, 2, 3, 1).cpu().numpy()
    return [
        Image.fromarray(image).resize((max(128, image.shape[1]), max(128, image.shape[0])), Image.NEAREST)
        for image in pixels
    ]


def reward_plot(scores: dict[str, torch.Tensor], front: dict | None = None):
    """The images in the plane of the first two rewards, their mean marked, and each method of a sweep's ``front``
    (its results.json) that scored both; None with fewer than two rewards."""
    if len(scores) < 2:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    (x_name, xs), (y_name, ys) = list(scores.items())[:2]
    figure, axis = plt.subplots(figsize=(4, 3), dpi=100)
    for method, entries in (front or {}).get("methods", {}).items():
        points = [
            (e["rewards"][x_name]["mean"], e["rewards"][y_name]["mean"])
            for e in entries
            if x_name in e["rewards"] and y_name in e["rewards"]
        ]
        if len(points) > 1 and method in FRONT_METHODS:
            axis.plot(*zip(*points), "-", linewidth=1, alpha=0.7, label=f"sweep: {method}")
    axis.scatter(xs.numpy(), ys.numpy(), s=12, alpha=0.6, label="images")
    axis.scatter([float(xs.mean())], [float(ys.mean())], marker="*", s=120, color="C3", label="mean")
    axis.set_xlabel(x_name)
    axis.set_ylabel(y_name)
    axis.legend(fontsize=7)
    figure.tight_layout()
    plt.close(figure)
    return figure


def read_front(path) -> dict:
    """A sweep's results.json, checked enough to plot."""
    import json
    from pathlib import Path

    try:
        front = json.loads(Path(path).read_text())
    except (OSError, ValueError) as error:
        raise ValueError(f"--front: cannot read {path} ({error})") from error
    if not isinstance(front, dict) or not isinstance(front.get("methods"), dict):
        raise ValueError(f"--front: {path} is not a sweep's results.json")
    return front


def digits_page(front: dict | None = None) -> Page:
    """The embedded digits model with its three basis models and rewards."""
    from .pipeline import Blend
    from .presets import digits
    from .rewards import get_reward

    basis = digits.basis_models()
    blend = Blend(digits.load_pipeline(), basis=basis)
    return Page(
        blend,
        {name: get_reward(name) for name in basis},
        prompt="3",
        guidance_scale=1.0,
        plotted=("bold", "stencil"),
        front=front,
    )


def serve(page: Page, host: str = "127.0.0.1", port: int = 7860, *, block: bool = True):
    """Serve the page (queued: one generation at a time, the others wait); returns the Gradio app."""
    app = page.build()
    app.queue(default_concurrency_limit=1)
    app.launch(server_name=host, server_port=port, prevent_thread_lock=not block, show_error=True, quiet=not block)
    return app


def free_port() -> int:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


__all__ = ["Page", "digits_page", "free_port", "read_front", "require_gradio", "reward_plot", "serve"]
