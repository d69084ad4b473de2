"""``diffusion-blend lab``: the exact ground truth (``diffusion_blend.lab``) run, swept and fine-tuned against."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Annotated

import typer

from ..files import write_atomically
from .parsing import float_list
from .running import CommandError, run_reporting_errors

lab_app = typer.Typer(
    help="The exact ground truth: a Gaussian-mixture base, quadratic rewards, closed-form targets.",
    no_args_is_help=True,
)


def _lab_scenario(scenario: Path | None, alpha: float | None, dim: int = 2):
    """The ``--scenario`` file (default: the built-in one in ``dim`` dimensions), with ``--alpha`` where given."""
    from ..lab import grid_scenario, load_scenario

    loaded = load_scenario(scenario) if scenario is not None else grid_scenario(dim)
    return loaded.with_alpha(alpha) if alpha is not None else loaded


@lab_app.command("run")
def lab_run(
    weights: Annotated[str, typer.Option(help="NAME=W,... over the scenario's rewards (r1, r2 by default).")],
    scenario: Annotated[
        Path | None, typer.Option(help="A scenario YAML/JSON file (default: the built-in one).")
    ] = None,
    alpha: Annotated[
        float | None, typer.Option(help="KL weight α of the fine-tuning (default: the scenario's).")
    ] = None,
    kl_scale: Annotated[float, typer.Option(help="λ: the target is fine-tuned with α/λ.")] = 1.0,
    samples: Annotated[int, typer.Option(help="Samples per method.")] = 20_000,
    steps: Annotated[int, typer.Option(help="Sampler steps.")] = 200,
    eta: Annotated[float, typer.Option(help="DDIM η (0: deterministic, 1: DDPM-like).")] = 0.0,
    seed: Annotated[int, typer.Option(help="Random seed.")] = 0,
    scheduler: Annotated[str, typer.Option(help="ddim, ddpm, euler or dpm.")] = "ddim",
    prior: Annotated[str, typer.Option(help="x_T: exact (the target's law at T) or gaussian (N(0, I)).")] = "exact",
    smc: Annotated[
        int | None,
        typer.Option(
            help="Also run db-smc: the blend corrected by sequential Monte Carlo "
            "with this many particles per sample (--eta > 0 or ddpm)."
        ),
    ] = None,
    smc_tempering: Annotated[str, typer.Option(help="The SMC potential's tempering: none or sqrt_alpha_bar.")] = "none",
    json_output: Annotated[bool, typer.Option("--json", help="Print exactly one JSON object.")] = False,
) -> None:
    """Sample the oracle, the blends and the base, and measure them against the exact target."""
    run_reporting_errors(_lab_run, **locals())


def _lab_run(
    weights, scenario, alpha, kl_scale, samples, steps, eta, seed, scheduler, prior, smc, smc_tempering, json_output
) -> None:
    from ..lab import run_lab
    from ..lab.report import run_table
    from ..named_numbers import parse_named_numbers
    from ..smc import SMC

    chosen = _lab_scenario(scenario, alpha)
    corrector = None if smc is None else SMC(particles=smc, tempering=smc_tempering)
    report = run_lab(
        chosen,
        parse_named_numbers(weights, "--weights"),
        kl_scale,
        samples=samples,
        steps=steps,
        eta=eta,
        seed=seed,
        scheduler=scheduler,
        prior=prior,
        smc=corrector,
    )
    typer.echo(json.dumps(report) if json_output else run_table(report), nl=json_output)


@lab_app.command("sweep")
def lab_sweep(
    out: Annotated[Path, typer.Option(help="Folder for sweep.csv, sweep.json and the plots.")],
    scenario: Annotated[Path | None, typer.Option(help="A scenario file (default: the built-in 2-d one).")] = None,
    alphas: Annotated[str, typer.Option(help="Comma-separated KL weights α.")] = "2,1,0.5,0.25",
    kl_scales: Annotated[str, typer.Option(help="Comma-separated λ.")] = "0.5,1,2",
    points: Annotated[int, typer.Option(help="Weight points along the simplex (two rewards).")] = 5,
    three_rewards: Annotated[bool, typer.Option(help="Also run m = 3 rewards in d = 3.")] = True,
    samples: Annotated[int, typer.Option(help="Samples per method and grid point.")] = 5000,
    steps: Annotated[int, typer.Option(help="Sampler steps.")] = 100,
    seed: Annotated[int, typer.Option(help="Random seed.")] = 0,
) -> None:
    """Run the lab over weights × α × λ; write a table (CSV, JSON, Markdown summary) and plots (reward fronts, gap
    against α)."""
    run_reporting_errors(_lab_sweep, **locals())


def _lab_sweep(out, scenario, alphas, kl_scales, points, three_rewards, samples, steps, seed) -> None:
    from rich.console import Console
    from rich.progress import Progress

    from ..blend import validate_kl_scale
    from ..lab.report import plot_fronts, plot_gap, rows_as_csv, rows_as_json, rows_as_markdown, sweep, sweep_size

    alpha_values, kl_values = float_list(alphas, "--alphas"), float_list(kl_scales, "--kl-scales")
    kl_values = [validate_kl_scale(value) for value in kl_values]
    bad_alphas = [value for value in alpha_values if not (math.isfinite(value) and value > 0)]
    if bad_alphas:
        raise CommandError(f"--alphas must be finite numbers > 0, got {bad_alphas[0]}")
    if points < 2:
        raise CommandError(f"--points must be >= 2, got {points}")
    if out.exists() and not out.is_dir():
        raise CommandError(f"--out: {out} exists and is not a folder")
    scenarios = [_lab_scenario(scenario, None)] + ([_lab_scenario(None, None, dim=3)] if three_rewards else [])
    with Progress(transient=True, console=Console(stderr=True)) as progress:
        task = progress.add_task("sweeping", total=sweep_size(scenarios, alpha_values, kl_values, points))
        rows = sweep(
            scenarios,
            alpha_values,
            kl_values,
            points,
            samples=samples,
            steps=steps,
            seed=seed,
            progress=lambda: progress.advance(task),
        )
    writers = {
        out / "sweep.csv": lambda temp: temp.write_text(rows_as_csv(rows)),
        out / "sweep.json": lambda temp: temp.write_text(rows_as_json(rows)),
        out / "summary.md": lambda temp: temp.write_text(rows_as_markdown(rows)),
        out / "fronts.png": lambda temp: plot_fronts(rows, scenarios[0], alpha_values, temp),
        out / "gap_vs_alpha.png": lambda temp: plot_gap(rows, scenarios[0], temp),
    }
    write_atomically(writers)
    for path in writers:
        typer.echo(str(path))


@lab_app.command("finetune")
def lab_finetune(
    reward: Annotated[
        str,
        typer.Option(
            help="NAME=W,... over the scenario's rewards: the reward to fine-tune for (a mix gives the MORL oracle)."
        ),
    ] = "r1=1",
    alpha: Annotated[float | None, typer.Option(help="KL weight α (default: the scenario's).")] = None,
    method: Annotated[
        str | None, typer.Option(help="weighted-dsm (default), adjoint-matching or policy-gradient.")
    ] = None,
    steps: Annotated[int | None, typer.Option(help="Optimizer updates (default: the method's lab default).")] = None,
    lr: Annotated[float | None, typer.Option(help="Learning rate (default: the method's lab default).")] = None,
    seed: Annotated[int, typer.Option(help="Random seed.")] = 0,
    scenario: Annotated[
        Path | None, typer.Option(help="A scenario YAML/JSON file (default: the built-in one).")
    ] = None,
    samples: Annotated[int, typer.Option(help="Samples measuring what the fine-tuned model reaches.")] = 20_000,
    out: Annotated[
        Path | None, typer.Option(help="Folder for the network, finetune.json, metrics and checkpoints.")
    ] = None,
    checkpoint_every: Annotated[int, typer.Option(help="Checkpoint the run every N updates.")] = 50,
    resume: Annotated[bool, typer.Option(help="Continue the run in --out from its last checkpoint.")] = False,
    overwrite: Annotated[bool, typer.Option(help="Replace the run in --out.")] = False,
    json_output: Annotated[bool, typer.Option("--json", help="Print exactly one JSON object.")] = False,
) -> None:
    """Fine-tune a network on the lab's exact base and compare what it reaches with the exact tilted target."""
    run_reporting_errors(_lab_finetune, **locals())


def _lab_finetune(
    reward, alpha, method, steps, lr, seed, scenario, samples, out, checkpoint_every, resume, overwrite, json_output
) -> None:
    from ..finetune.lab import lab_finetune as finetune_lab
    from ..lab.report import finetune_table
    from ..named_numbers import parse_named_numbers

    if (resume or overwrite) and out is None:
        raise CommandError("--resume and --overwrite need --out")
    if alpha is not None and not (math.isfinite(alpha) and alpha > 0):
        raise CommandError(f"--alpha must be a finite number > 0, got {alpha}")
    chosen = _lab_scenario(scenario, alpha)
    report = finetune_lab(
        chosen,
        parse_named_numbers(reward, "--reward"),
        method=method,
        steps=steps,
        lr=lr,
        seed=seed,
        samples=samples,
        out=out,
        checkpoint_every=checkpoint_every,
        resume=resume,
        overwrite=overwrite,
        progress=not json_output,
    )
    typer.echo(json.dumps(report) if json_output else finetune_table(report), nl=json_output)
