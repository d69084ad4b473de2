"""Lab reports: a readable table of one run, and sweeps over weights × α × λ written as CSV, JSON and plots."""

from __future__ import annotations

import csv
import io
import itertools
import json
import math
from collections.abc import Callable, Iterable
from pathlib import Path

import torch

from .experiment import blend_method_name, run_lab
from .mixture import weighted_reward
from .scenario import Scenario

#: A Jensen gap below this is numerical noise: the blend is exact there.
EXACT_GAP = 1e-20


def run_table(report: dict) -> str:
    """One lab run as a plain-text table: per method, each reward's mean (and its error against the exact value),
    the distance to the exact target; then the noise floor and the Jensen gap."""
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    rewards = list(report["exact"])
    table = Table(
        title=escape(
            f"{report['scenario']}: α = {report['alpha']:g}, λ = {report['kl_scale']:g}, weights "
            + ", ".join(f"{k}={v:g}" for k, v in report["weights"].items())
        )
    )
    table.add_column("method")
    for reward in rewards:
        table.add_column(escape(f"E[{reward}]"), justify="right")  # (not rich markup)
        table.add_column("error", justify="right")
    table.add_column("SW₂ to exact target", justify="right")
    table.add_row(
        "exact target",
        *[cell for r in rewards for cell in (f"{report['exact'][r]:.4f}", "")],
        f"{report['distance_floor']:.4f} (floor)",
    )
    for method, values in report["methods"].items():
        cells = [cell for r in rewards for cell in (f"{values[r]:.4f}", f"{values[r] - report['exact'][r]:+.4f}")]
        table.add_row(method, *cells, f"{values['distance']:.4f}")
    console = Console(file=io.StringIO(), width=120, force_terminal=False)
    console.print(table)
    gap = report["jensen_gap"]
    console.print(
        f"Jensen gap of {gap['method']} (mean ‖ε*_oracle − ε_blend‖² over {len(gap['per_step'])} steps): "
        f"{gap['mean_sq']:.3e}"
    )
    if "smc" in report:
        smc = report["smc"]
        console.print(
            f"db-smc: {smc['particles']} particles per sample, {smc['denoiser_rows_per_sample']:.0f} "
            f"denoiser rows per sample (the blend: {smc['blend_denoiser_rows_per_sample']:.0f}), "
            f"{smc['time_ratio_to_blend']:.1f}× the blend's time, resampled at {smc['resampling_steps']} "
            f"steps, lowest ESS {smc['min_ess']:.2f}"
        )
    return console.file.getvalue()


def finetune_table(report: dict) -> str:
    """A lab fine-tuning run as a table: each reward's exact expectation under the tilted target, what the
    fine-tuned model reaches, and the relative error; then the path KL against the exact KL(p* ‖ p_base)."""
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    weights = ", ".join(f"{name}={weight:g}" for name, weight in report["reward"].items())
    table = Table(
        title=escape(
            f"{report['method']}: α = {report['alpha']:g}, reward {weights}, "
            f"{report['steps']} updates in {report['training_seconds']:.0f} s"
        )
    )
    for column in ("reward", "exact", "achieved", "error"):
        table.add_column(column, justify="left" if column == "reward" else "right")
    for name, exact in report["exact"].items():
        achieved = report["achieved"][name]
        relative = f"{(achieved - exact) / abs(exact):+.2%}" if abs(exact) > 1e-9 else f"{achieved - exact:+.4f}"
        table.add_row(escape(f"E[{name}]"), f"{exact:.4f}", f"{achieved:.4f}", relative)
    console = Console(file=io.StringIO(), width=120, force_terminal=False)
    console.print(table)
    console.print(f"path KL {report['kl']:.4f} (exact KL(p* ‖ p_base) = {report['exact_kl']:.4f})")
    return console.file.getvalue()


def simplex_points(names: list[str], points: int) -> list[dict[str, float]]:
    """Weights on the simplex: a line of ``points`` for two rewards; corners, midpoints and centre beyond."""
    if len(names) == 2:
        return [{names[0]: 1 - i / (points - 1), names[1]: i / (points - 1)} for i in range(points)]
    grid = [dict.fromkeys(names, 0.0) | {name: 1.0} for name in names]
    grid += [dict.fromkeys(names, 0.0) | {a: 0.5, b: 0.5} for a, b in itertools.combinations(names, 2)]
    grid.append(dict.fromkeys(names, 1 / len(names)))
    return grid


def sweep(
    scenarios: Iterable[Scenario],
    alphas: list[float],
    kl_scales: list[float],
    points: int = 5,
    *,
    samples: int = 5000,
    steps: int = 100,
    seed: int = 0,
    scheduler: str = "ddim",
    progress: Callable[[], None] | None = None,
) -> list[dict]:
    """Run the lab over scenarios × α × λ × weights; one row per (run, method)."""
    rows = []
    for scenario in scenarios:
        names = list(scenario.rewards)
        for alpha, kl_scale, weights in itertools.product(alphas, kl_scales, simplex_points(names, points)):
            report = run_lab(
                scenario.with_alpha(alpha),
                weights,
                kl_scale,
                samples=samples,
                steps=steps,
                seed=seed,
                scheduler=scheduler,
                methods=("oracle", "blend", "stochastic"),
            )
            for method, values in report["methods"].items():
                rows.append(
                    {
                        "scenario": scenario.name,
                        "alpha": alpha,
                        "kl_scale": kl_scale,
                        **{f"w_{name}": weights[name] for name in names},
                        "method": method,
                        **{f"E_{name}": values[name] for name in names},
                        **{f"exact_{name}": report["exact"][name] for name in names},
                        "distance": values["distance"],
                        "distance_floor": report["distance_floor"],
                        "jensen_gap": report["jensen_gap"]["mean_sq"]
                        if method == report["jensen_gap"]["method"]
                        else "",
                    }
                )
            if progress is not None:
                progress()
    return rows


def sweep_size(scenarios: Iterable[Scenario], alphas: list[float], kl_scales: list[float], points: int) -> int:
    return sum(len(alphas) * len(kl_scales) * len(simplex_points(list(s.rewards), points)) for s in scenarios)


def rows_as_csv(rows: list[dict]) -> str:
    columns = list(dict.fromkeys(key for row in rows for key in row))
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, restval="")
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()


def rows_as_json(rows: list[dict]) -> str:
    return json.dumps(rows, indent=1) + "\n"


def rows_as_markdown(rows: list[dict]) -> str:
    """The rows of the weights nearest equal ones (equal where the grid has them; with an even number of points
    along two rewards, the two beside the middle) as a Markdown table: per scenario, α and λ, each method's reward
    errors against the exact target, its distance to it (and the sampling-noise floor), and the blend's Jensen gap."""
    lines = [
        "| scenario | α | λ | weights | method | mean reward error | SW₂ to target (floor) | Jensen gap |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    nearest = _nearest_equal_weights(rows)
    for row in rows:
        names = _weight_names(row)
        if _off_equal_weights(row) > nearest[row["scenario"]] + 1e-9:
            continue
        weights = ", ".join(f"{n}={row[f'w_{n}']:.3g}" for n in names)
        errors = ", ".join(f"{row[f'E_{n}'] - row[f'exact_{n}']:+.3f}" for n in names)
        gap = f"{row['jensen_gap']:.2e}" if row["jensen_gap"] != "" else ""
        lines.append(
            f"| {row['scenario']} | {row['alpha']:g} | {row['kl_scale']:g} | {weights} | {row['method']} | "
            f"{errors} | {row['distance']:.3f} ({row['distance_floor']:.3f}) | {gap} |"
        )
    return "\n".join(lines) + "\n"


def _weight_names(row: dict) -> list[str]:
    return [key[2:] for key in row if key.startswith("w_") and row[key] != ""]


def _off_equal_weights(row: dict) -> float:
    """How far a row's weights lie from equal ones (the largest difference)."""
    names = _weight_names(row)
    return max(abs(row[f"w_{name}"] - 1 / len(names)) for name in names)


def _nearest_equal_weights(rows: list[dict]) -> dict[str, float]:
    """Per scenario, the smallest distance of its rows' weights from equal ones."""
    nearest: dict[str, float] = {}
    for row in rows:
        nearest[row["scenario"]] = min(nearest.get(row["scenario"], math.inf), _off_equal_weights(row))
    return nearest


def exact_front(scenario: Scenario, kl_scale: float, grid: int = 101) -> torch.Tensor:
    """The oracle's exact reward front: (E[r1], E[r2]) of the tilted target along w = (1 − s, s)."""
    first, second = list(scenario.rewards)[:2]
    front = []
    for s in torch.linspace(0, 1, grid).tolist():
        target = scenario.base.tilted(
            weighted_reward(scenario.rewards, {first: 1 - s, second: s}).scaled(kl_scale), scenario.alpha
        )
        front.append((target.expected(scenario.rewards[first]), target.expected(scenario.rewards[second])))
    return torch.tensor(front)


def plot_fronts(rows: list[dict], scenario: Scenario, alphas: list[float], path: Path) -> None:
    """Reward space at λ = 1: the oracle's exact front against the blends' sampled points, one panel per α."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    first, second = list(scenario.rewards)[:2]
    figure, axes = plt.subplots(1, len(alphas), figsize=(4 * len(alphas), 4), squeeze=False)
    for axis, alpha in zip(axes[0], alphas):
        front = exact_front(scenario.with_alpha(alpha), 1.0)
        axis.plot(front[:, 0], front[:, 1], color="black", label="oracle (exact)")
        for method, marker in (("db-mpa", "o"), ("db-mpa-ls", "x")):
            points = [
                r
                for r in rows
                if r["scenario"] == scenario.name
                and r["alpha"] == alpha
                and r["kl_scale"] == 1.0
                and r["method"] == method
            ]
            axis.scatter(
                [r[f"E_{first}"] for r in points], [r[f"E_{second}"] for r in points], marker=marker, label=method
            )
        axis.set_title(f"α = {alpha:g}")
        axis.set_xlabel(f"E[{first}]")
        axis.set_ylabel(f"E[{second}]")
        axis.legend(fontsize="small")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def plot_gap(rows: list[dict], scenario: Scenario, path: Path) -> None:
    """The Jensen gap of the mix blend against α, at equal weights (the grid's nearest: an even number of points has
    none), one line per λ."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(scenario.rewards)
    in_scenario = [r for r in rows if r["scenario"] == scenario.name]
    nearest = min(in_scenario, key=lambda r: (_off_equal_weights(r), [r[f"w_{name}"] for name in names]))
    weights = {name: nearest[f"w_{name}"] for name in names}
    figure, axis = plt.subplots(figsize=(5.5, 4))
    exact_lines = []
    for kl_scale in sorted({r["kl_scale"] for r in rows}):
        points = sorted(
            (r["alpha"], r["jensen_gap"])
            for r in in_scenario
            if r["kl_scale"] == kl_scale
            and r["jensen_gap"] != ""
            and all(abs(r[f"w_{name}"] - value) < 1e-9 for name, value in weights.items())
        )
        label = f"λ = {kl_scale:g} ({blend_method_name(weights, kl_scale)})"
        if points and max(gap for _, gap in points) < EXACT_GAP:
            exact_lines.append((points, label))  # at numerical noise: drawn at the bottom, not on a 1e-30 scale
        elif points:
            axis.plot(*zip(*points), marker="o", label=label)
    axis.set_xscale("log")
    axis.set_yscale("log")
    alphas = sorted({r["alpha"] for r in rows if r["scenario"] == scenario.name})
    axis.set_xticks(alphas, [f"{a:g}" for a in alphas])
    axis.minorticks_off()
    bottom = axis.get_ylim()[0]
    for points, label in exact_lines:
        axis.plot(
            [a for a, _ in points],
            [bottom] * len(points),
            marker="v",
            linestyle="--",
            label=f"{label}: exact (gap < {EXACT_GAP:g})",
        )
    axis.set_xlabel("α (KL weight)")
    axis.set_ylabel("Jensen gap: mean ‖ε*_oracle − ε_blend‖²")
    axis.set_title(f"{scenario.name}, weights " + ", ".join(f"{name}={value:.3g}" for name, value in weights.items()))
    axis.legend(fontsize="small")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
