"""``diffusion-blend demo``: Diffusion Blend on the embedded digits model, as two pictures.

A sweep over the weight w of the conflicting pair (``legible`` = w, ``bold`` = 1 − w; DB-MPA), all weights in one
batch: ``sweep.png`` (rows = digits, columns = weights, the same starting noise along a row), ``rewards.png``
(each reward's mean ± standard error per weight, against the base and the MORL oracles fine-tuned for the mixes)
and ``rewards.json`` (those numbers).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from ...files import write_atomically
from ...rewards import get_reward
from . import basis_models, load_pipeline, oracles
from .data import DIGITS
from .train import CONFLICTING

WEIGHTS = (0.0, 0.25, 0.5, 0.75, 1.0)  # the oracles are at 0.25, 0.5 and 0.75
#: digits drawn per weight and their DDIM steps; guidance 1, the sampler the basis models were fine-tuned for
SAMPLES_PER_DIGIT, STEPS, GUIDANCE = 10, 25, 1.0


def run_demo(
    out: Path,
    *,
    seed: int = 0,
    samples_per_digit: int = SAMPLES_PER_DIGIT,
    steps: int = STEPS,
    device: str | None = None,
) -> list[Path]:
    """Write ``sweep.png`` and ``rewards.png`` into ``out``; return their paths."""
    from ...pipeline import Blend

    first, second = CONFLICTING
    shipped = basis_models()
    pipe = load_pipeline(device)
    blend = Blend(pipe, basis={first: shipped[first], second: shipped[second]})
    rewards = {name: get_reward(name, device=device) for name in CONFLICTING}
    digits = [str(digit) for digit in range(DIGITS) for _ in range(samples_per_digit)]
    seeds = [seed + index for index in range(len(digits))]  # sample j of every weight from the same noise

    def call(weights: list[dict[str, float]] | None, model=None) -> torch.Tensor:
        prompts = digits * (len(weights) if weights else 1)
        generators = [torch.Generator().manual_seed(s) for s in seeds * (len(weights) if weights else 1)]
        arguments = dict(
            prompt=prompts, num_inference_steps=steps, generator=generators, output_type="pt", guidance_scale=GUIDANCE
        )
        if weights is None:
            return (model or pipe)(**arguments).images
        per_image = [w for w in weights for _ in digits]
        return blend.blend(weights=per_image, **arguments).images

    sweep = [{first: w, second: 1 - w} for w in WEIGHTS]
    images = call(sweep).view(len(WEIGHTS), len(digits), *call_shape(pipe))
    points = {
        "DB-MPA": [scores(images[index], digits, rewards) for index in range(len(WEIGHTS))],
        "base": [scores(call(None), digits, rewards)],
    }
    points["MORL oracle"] = []
    for name, folder in oracles().items():
        oracle = Blend(load_pipeline(device), basis={"oracle": folder})
        oracle_images = oracle.blend(
            prompt=digits,
            num_inference_steps=steps,
            output_type="pt",
            weights={"oracle": 1},
            guidance_scale=GUIDANCE,
            generator=[torch.Generator().manual_seed(s) for s in seeds],
        ).images
        points["MORL oracle"].append({**scores(oracle_images, digits, rewards), "label": name})
    grid = images[:, ::samples_per_digit]  # the first sample of each digit, at every weight
    record = {
        "weights": {first: list(WEIGHTS), second: [1 - w for w in WEIGHTS]},
        "steps": steps,
        "seed": seed,
        "guidance_scale": GUIDANCE,
        "samples_per_weight": len(digits),
        **points,
    }
    files = {
        out / "sweep.png": lambda temp: save_sweep(grid, WEIGHTS, temp),
        out / "rewards.png": lambda temp: plot_rewards(points, WEIGHTS, temp),
        out / "rewards.json": lambda temp: temp.write_text(json.dumps(record, indent=2) + "\n"),
    }
    write_atomically(files)
    return list(files)


def call_shape(pipe) -> tuple[int, int, int]:
    size = pipe.unet.config.sample_size
    return 3, size, size


def scores(images: torch.Tensor, prompts: list[str], rewards: dict) -> dict[str, tuple[float, float]]:
    """Each reward's mean and standard error over the images."""
    result = {}
    for name, reward in rewards.items():
        values = reward(images, prompts).double()
        result[name] = (float(values.mean()), float(values.std() / math.sqrt(len(values))))
    return result


def save_sweep(grid: torch.Tensor, weights: tuple[float, ...], path: Path) -> None:
    """Rows = digits, columns = weights (16×16 images shown without smoothing), each column titled by its weight."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    first, second = CONFLICTING
    columns, rows, size = grid.shape[0], grid.shape[1], grid.shape[-1]
    tiles = grid[:, :, 0].permute(1, 2, 0, 3).reshape(rows * size, columns * size).clamp(0, 1).cpu().numpy()
    figure, axes = plt.subplots(figsize=(0.55 * columns + 1.2, 0.55 * rows + 0.9), dpi=120)
    axes.imshow(tiles, cmap="gray", vmin=0, vmax=1, interpolation="nearest")
    axes.set_xticks([size * (index + 0.5) for index in range(columns)], [f"{w:g}" for w in weights], fontsize=7)
    axes.set_yticks([size * (index + 0.5) for index in range(rows)], [str(index) for index in range(rows)], fontsize=7)
    axes.set_xlabel(f"w: {first} = w, {second} = 1 − w", fontsize=8)
    axes.tick_params(length=0)
    figure.tight_layout()
    figure.savefig(path, format="png")
    plt.close(figure)


def plot_rewards(points: dict, weights: tuple[float, ...], path: Path) -> None:
    """``bold`` against ``legible``: the sweep (weights annotated), the base and the oracles, with standard errors."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    first, second = CONFLICTING
    figure, axes = plt.subplots(figsize=(5.5, 4.5), dpi=120)
    styles = {
        "DB-MPA": dict(fmt="-o", color="C0"),
        "base": dict(fmt="s", color="gray"),
        "MORL oracle": dict(fmt="D", color="C3"),
    }
    for method, entries in points.items():
        if not entries:
            continue
        xs, xe = zip(*(entry[second] for entry in entries))
        ys, ye = zip(*(entry[first] for entry in entries))
        axes.errorbar(xs, ys, xerr=xe, yerr=ye, label=method, capsize=2, **styles[method])
    for w, entry in zip(weights, points["DB-MPA"]):
        axes.annotate(
            f"w={w:g}", (entry[second][0], entry[first][0]), textcoords="offset points", xytext=(4, 4), fontsize=7
        )
    for entry in points["MORL oracle"]:  # labelled "bold=0.25,stencil=0.75"
        w = entry["label"].split(",")[0].split("=")[1]
        axes.annotate(
            f"w={w}",
            (entry[second][0], entry[first][0]),
            textcoords="offset points",
            xytext=(4, -9),
            fontsize=7,
            color="C3",
        )
    axes.set_xlabel(f"{second} (mean ± s.e.)")
    axes.set_ylabel(f"{first} (mean ± s.e.)")
    axes.set_title(f"DB-MPA sweep: {first} = w, {second} = 1 − w")
    axes.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, format="png")
    plt.close(figure)
