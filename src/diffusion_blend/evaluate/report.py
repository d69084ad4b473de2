"""A sweep's result set, built from its unit files: ``results.json``, ``samples.csv``, ``pareto.png``, ``grid.png``,
``report.md`` — written together, atomically."""

from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path

import safetensors.torch
import torch

from ..files import write_atomically
from .config import WEIGHTLESS, SweepConfig, same_point
from .sweep import Unit, summary

LABELS = {
    "base": "base",
    "db-mpa": "DB-MPA",
    "db-mpa-ls": "DB-MPA-LS",
    "db-smc": "DB-MPA + SMC",
    "joint": "joint (w, λ)",
    "soup": "soup",
    "soup-published": "soup (published: A, B averaged)",
    "code": "CoDe",
    "guidance": "guidance",
    "oracle": "MORL oracle",
}
#: largest side of one grid tile, in pixels
TILE = 96


def write_results(config: SweepConfig, setting, units: list[Unit], cells: Path, out: Path) -> list[Path]:
    records = [(unit, json.loads((cells / f"{unit.key(config)}.json").read_text())) for unit in units]
    results = build_results(config, setting.description, records)
    if hasattr(setting, "exact"):  # the lab: the exact front at every point, and its sampling-noise floor
        results["exact"] = [
            {**exact_entry(config, point, setting.exact(point)), "distance_floor": setting.distance_floor(point)}
            for point in config.weights
        ]
    files = {
        out / "results.json": lambda temp: temp.write_text(json.dumps(results, indent=2) + "\n"),
        out / "samples.csv": lambda temp: temp.write_text(samples_csv(config, setting, records)),
        out / "pareto.png": lambda temp: plot_pareto(results, temp),
        out / "grid.png": lambda temp: draw_grid(config, units, cells, temp),
        out / "report.md": lambda temp: temp.write_text(report_markdown(results)),
    }
    write_atomically(files)
    return list(files)


def series_name(unit: Unit) -> str:
    """The name a method's curve goes by (the joint method has one per λ)."""
    return f"joint λ={unit.kl_scale:g}" if unit.method.name == "joint" else unit.method.name


def build_results(config: SweepConfig, description: dict, records) -> dict:
    methods: dict[str, list[dict]] = {}
    for unit, record in records:
        rewards = torch.tensor(record["rewards"], dtype=torch.float64)
        per_point = record["images_per_point"]
        points = list(config.weights) if unit.method.name in WEIGHTLESS else [tuple(p) for p in record["points"]]
        share = 1 if unit.method.name in WEIGHTLESS else len(points)
        for index, point in enumerate(points):
            block = rewards if unit.method.name in WEIGHTLESS else rewards[index * per_point : (index + 1) * per_point]
            weighted = block @ torch.tensor(point, dtype=torch.float64)
            methods.setdefault(series_name(unit), []).append(
                {
                    "weights": dict(zip(config.rewards, point)),
                    "kl_scale": record["kl_scale"],
                    "rewards": {name: summary(block[:, i].tolist()) for i, name in enumerate(config.rewards)},
                    "weighted": summary(weighted.tolist()),
                    "seconds": record["seconds"] / share,
                    "seconds_per_image": record["seconds"] / share / per_point,
                    "denoiser_calls": record["denoiser_calls"] / share,
                    "denoiser_rows": record["denoiser_rows"] // share,
                    "peak_memory_mb": record["peak_memory_mb"],
                    **(record["metrics"][index] if "metrics" in record and unit.method.name not in WEIGHTLESS else {}),
                }
            )
    return {"setting": {**description, **config.describe()}, "rewards": list(config.rewards), "methods": methods}


def exact_entry(config: SweepConfig, point: tuple[float, ...], expected: dict[str, float]) -> dict:
    return {
        "weights": dict(zip(config.rewards, point)),
        "rewards": expected,
        "weighted": sum(w * expected[name] for name, w in zip(config.rewards, point)),
    }


def samples_csv(config: SweepConfig, setting, records) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(
        ["method", "kl_scale", *(f"w_{name}" for name in config.rewards), "image", "prompt", "seed", *config.rewards]
    )
    for unit, record in records:
        per_point = record["images_per_point"]
        for index, values in enumerate(record["rewards"]):
            point = (
                [""] * len(config.rewards) if unit.method.name in WEIGHTLESS else record["points"][index // per_point]
            )
            image = index % per_point
            writer.writerow(
                [
                    series_name(unit),
                    record["kl_scale"],
                    *point,
                    image,
                    setting.prompts[image],
                    setting.seeds[image],
                    *(repr(value) for value in values),
                ]
            )
    return buffer.getvalue()


def middle_point(results: dict) -> dict[str, float]:
    """The weight point closest to equal weights among the DB-MPA points (or any method's)."""
    entries = [entry for series in results["methods"].values() for entry in series]
    count = len(results["rewards"])
    return min(
        (entry["weights"] for entry in entries),
        key=lambda w: (sum((v - 1 / count) ** 2 for v in w.values()), json.dumps(w)),
    )


def at_point(series: list[dict], point: dict[str, float]) -> dict | None:
    return next(
        (entry for entry in series if same_point([entry["weights"][name] for name in point], point.values())), None
    )


def label(name: str) -> str:
    return LABELS.get(name, name)


def report_markdown(results: dict) -> str:
    rewards, methods = results["rewards"], results["methods"]
    point = middle_point(results)
    point_text = ", ".join(f"{name} = {value:g}" for name, value in point.items())
    lines = [
        f"# Sweep: {results['setting'].get('model', results['setting']['setting'])}",
        "",
        f"Rewards {', '.join(rewards)}; {results['setting']['steps']} steps, guidance "
        f"{results['setting']['guidance_scale']:g}, η = {results['setting']['eta']:g}; mean ± standard error.",
        "",
        f"## At {point_text}",
        "",
        "| method | weighted reward | " + " | ".join(rewards) + " | seconds per image | denoiser rows per image |",
        "| --- | --- | " + " | ".join("---" for _ in rewards) + " | --- | --- |",
    ]
    exact = at_point(results.get("exact", []), point)
    distance = exact is not None and "distance_floor" in exact
    if distance:
        lines[-2] += " distance to the target (sliced W₂) |"
        lines[-1] += " --- |"
    if exact is not None:
        lines.append(
            f"| exact target | {exact['weighted']:.4f} | "
            + " | ".join(f"{exact['rewards'][r]:.4f}" for r in rewards)
            + " | | |"
            + (f" {exact['distance_floor']:.4f} (two exact sample sets) |" if distance else "")
        )
    for name, series in methods.items():
        entry = at_point(series, point)
        if entry is None:
            continue
        images = entry["seconds"] / entry["seconds_per_image"] if entry["seconds_per_image"] else 1
        lines.append(
            f"| {label(name)} | {fmt(entry['weighted'])} | "
            + " | ".join(fmt(entry["rewards"][r]) for r in rewards)
            + f" | {entry['seconds_per_image']:.4f} | {entry['denoiser_rows'] / images:.0f} |"
            + (
                f" {entry['distance_to_target']:.4f} |"
                if distance and "distance_to_target" in entry
                else (" |" if distance else "")
            )
        )
    lines += [
        "",
        "![Pareto front](pareto.png)",
        "",
        "![Samples: rows are methods, columns weights](grid.png)",
        "",
        "## Weighted reward at every point",
        "",
        "| weights | "
        + ("exact | " if "exact" in results else "")
        + " | ".join(label(name) for name in methods)
        + " |",
        "| --- | " + ("--- | " if "exact" in results else "") + " | ".join("---" for _ in methods) + " |",
    ]
    points = []
    for series in methods.values():
        for entry in series:
            if entry["weights"] not in points:
                points.append(entry["weights"])
    for weights in sorted(points, key=lambda w: list(w.values())):
        cells = [at_point(series, weights) for series in methods.values()]
        exact = at_point(results.get("exact", []), weights) if "exact" in results else None
        lines.append(
            "| "
            + ", ".join(f"{v:g}" for v in weights.values())
            + " | "
            + (f"{exact['weighted']:.4f} | " if exact else ("| " if "exact" in results else ""))
            + " | ".join(fmt(cell["weighted"]) if cell else "" for cell in cells)
            + " |"
        )
    return "\n".join(lines) + "\n"


def fmt(stat: dict) -> str:
    digits = max(0, 2 - math.floor(math.log10(stat["se"]))) if stat["se"] > 0 else 3
    return f"{stat['mean']:.{digits}f} ± {stat['se']:.{digits}f}"


def plot_pareto(results: dict, path: Path) -> None:
    """One reward against another, a curve per method (m = 3: each pair in a panel), the first weight annotated."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rewards, methods = results["rewards"], results["methods"]
    pairs = [(rewards[i], rewards[j]) for i in range(len(rewards)) for j in range(i + 1, len(rewards))]
    figure, axes = plt.subplots(1, len(pairs), figsize=(6 * len(pairs), 5), dpi=110, squeeze=False)
    for axis, (x_name, y_name) in zip(axes[0], pairs):
        if "exact" in results:
            front = results["exact"]
            axis.plot(
                [e["rewards"][x_name] for e in front],
                [e["rewards"][y_name] for e in front],
                "k--",
                linewidth=1,
                label="exact target",
            )
        for index, (name, series) in enumerate(methods.items()):
            xs = [entry["rewards"][x_name]["mean"] for entry in series]
            ys = [entry["rewards"][y_name]["mean"] for entry in series]
            xe = [entry["rewards"][x_name]["se"] for entry in series]
            ye = [entry["rewards"][y_name]["se"] for entry in series]
            style = "s" if name == "base" else ("D" if name == "oracle" else "-o")
            axis.errorbar(
                xs[:1] if name == "base" else xs,
                ys[:1] if name == "base" else ys,
                xerr=xe[:1] if name == "base" else xe,
                yerr=ye[:1] if name == "base" else ye,
                fmt=style,
                markersize=4,
                capsize=2,
                label=label(name),
                color=f"C{index % 10}",
            )
            if name == "db-mpa":
                for entry, x, y in zip(series, xs, ys):
                    axis.annotate(
                        f"{entry['weights'][rewards[0]]:g}",
                        (x, y),
                        textcoords="offset points",
                        xytext=(3, 3),
                        fontsize=6,
                        color=f"C{index % 10}",
                    )
        axis.set_xlabel(f"{x_name} (mean ± s.e.)")
        axis.set_ylabel(f"{y_name} (mean ± s.e.)")
    axes[0][0].legend(fontsize=7)
    axes[0][0].set_title(f"labels: DB-MPA's weight on {rewards[0]}", fontsize=8)
    figure.tight_layout()
    figure.savefig(path, format="png")
    plt.close(figure)


def draw_grid(config: SweepConfig, units: list[Unit], cells: Path, path: Path) -> None:
    """Rows = methods, columns = every weight point swept; each tile a few images of its cell (the same seeds)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    columns = list(config.weights)
    for unit in units:
        columns += [tuple(point) for point in unit.points if not any(same_point(point, c) for c in columns)]
    columns.sort()
    rows: dict[str, dict[tuple, torch.Tensor]] = {}
    for unit in units:
        images = safetensors.torch.load_file(cells / f"{unit.key(config)}.safetensors")["images"]
        tiles = rows.setdefault(series_name(unit), {})
        if unit.method.name in WEIGHTLESS:
            tiles.update({point: tile(images[0]) for point in columns})
        else:
            tiles.update({tuple(point): tile(images[index]) for index, point in enumerate(unit.points)})
    size = next(iter(next(iter(rows.values())).values())).shape[-1]
    canvas = torch.ones(3, len(rows) * size, len(columns) * size)
    for r, tiles in enumerate(rows.values()):
        for c, point in enumerate(columns):
            found = next((image for key, image in tiles.items() if same_point(key, point)), None)
            if found is not None:
                canvas[:, r * size : (r + 1) * size, c * size : (c + 1) * size] = found
    figure, axis = plt.subplots(figsize=(1.0 + 0.8 * len(columns), 0.6 + 0.8 * len(rows)), dpi=120)
    axis.imshow(canvas.permute(1, 2, 0).clamp(0, 1).numpy(), interpolation="nearest")
    axis.set_xticks(
        [size * (i + 0.5) for i in range(len(columns))],
        ["\n".join(f"{v:g}" for v in point) for point in columns],
        fontsize=6,
    )
    axis.set_yticks([size * (i + 0.5) for i in range(len(rows))], [label(name) for name in rows], fontsize=7)
    axis.set_xlabel("weights (" + ", ".join(config.rewards) + ")", fontsize=7)
    axis.tick_params(length=0)
    figure.savefig(path, format="png", bbox_inches="tight")
    plt.close(figure)


def tile(images: torch.Tensor) -> torch.Tensor:
    """A cell's first images [k, 3, H, W] side by side in a square-ish block, at most TILE pixels a side."""
    count = images.shape[0]
    side = math.ceil(math.sqrt(count))
    height, width = images.shape[-2:]
    block = torch.ones(3, side * height, side * width)
    for index in range(count):
        r, c = divmod(index, side)
        block[:, r * height : (r + 1) * height, c * width : (c + 1) * width] = images[index]
    if block.shape[-1] > TILE:
        block = torch.nn.functional.interpolate(block[None], size=(TILE, TILE), mode="area")[0]
    elif block.shape[-1] < TILE:
        block = torch.nn.functional.interpolate(block[None], size=(TILE, TILE), mode="nearest")[0]
    pad = 2
    padded = torch.ones(3, TILE + 2 * pad, TILE + 2 * pad)
    padded[:, pad:-pad, pad:-pad] = block
    return padded
