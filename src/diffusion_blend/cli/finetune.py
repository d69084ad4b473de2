"""``diffusion-blend finetune``: a basis model (or a MORL oracle) fine-tuned for a reward as a LoRA, on the
embedded digits model or a Stable Diffusion pipeline."""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Annotated

import typer

from .parsing import parse_options, parse_weights_paths
from .running import CommandError, quiet_libraries, run_reporting_errors


def finetune(
    reward: Annotated[
        str, typer.Option(help="Reward: a name, NAME=W,... (a mix: the MORL oracle) or module:function.")
    ],
    alpha: Annotated[float, typer.Option(help="KL weight α: the basis model samples p_base·exp(r/α).")],
    out: Annotated[Path, typer.Option(help="Folder for the LoRA (a basis Blend loads), finetune.json, metrics.jsonl.")],
    base: Annotated[
        str | None,
        typer.Option(
            help="Base pipeline (Stable Diffusion 1.x/2.x): a local folder or a hub "
            "id (default: the embedded digits model)."
        ),
    ] = None,
    prompts: Annotated[
        Path | None,
        typer.Option(help="A text file, one prompt per line (default with the digits model: the ten digits)."),
    ] = None,
    method: Annotated[
        str | None, typer.Option(help="weighted-dsm (default), adjoint-matching or policy-gradient.")
    ] = None,
    lora_rank: Annotated[int, typer.Option(help="LoRA rank.")] = 4,
    steps: Annotated[int, typer.Option(help="Optimizer updates.")] = 200,
    batch_size: Annotated[int, typer.Option(help="Samples per update (rollouts, or regression rows).")] = 8,
    lr: Annotated[float, typer.Option(help="Learning rate.")] = 1e-4,
    seed: Annotated[int, typer.Option(help="Random seed (the same seed gives the same adapter).")] = 0,
    sampler: Annotated[str, typer.Option(help="The sampling path: ddim or ddpm.")] = "ddim",
    sampler_steps: Annotated[int, typer.Option(help="Steps of the sampling path.")] = 50,
    eta: Annotated[float, typer.Option(help="DDIM η of the path (1: DDPM's noise; 0 only for weighted-dsm).")] = 1.0,
    guidance: Annotated[float, typer.Option(help="Classifier-free guidance of the rollouts (1: none).")] = 1.0,
    option: Annotated[
        list[str] | None,
        typer.Option(
            help="A method option NAME=VALUE (e.g. round_samples=512, regressed_steps=10); repeat for several."
        ),
    ] = None,
    weights_path: Annotated[list[str] | None, typer.Option(help="Reward weights: PATH or NAME=PATH.")] = None,
    checkpoint_every: Annotated[int, typer.Option(help="Checkpoint every N updates.")] = 50,
    eval_samples: Annotated[
        int, typer.Option(help="Samples of the closing evaluation (reward and KL vs the base).")
    ] = 16,
    resume: Annotated[bool, typer.Option(help="Continue the run in --out from its last checkpoint.")] = False,
    overwrite: Annotated[bool, typer.Option(help="Replace the run in --out.")] = False,
    device: Annotated[str | None, typer.Option(help="torch device (default: cuda when available, else cpu).")] = None,
    mixed_precision: Annotated[str, typer.Option(help="no, fp16 or bf16 (accelerate's autocast).")] = "no",
    gradient_checkpointing: Annotated[bool, typer.Option(help="Recompute the UNet's activations in backward.")] = False,
    log_with: Annotated[
        list[str] | None, typer.Option(help="An accelerate tracker (tensorboard, wandb) for the metrics.")
    ] = None,
) -> None:
    """Fine-tune a basis model: a LoRA whose sampler follows p_base·exp(r/α) (runs under accelerate launch too)."""
    run_reporting_errors(_finetune, **locals())


def _finetune(
    base,
    reward,
    alpha,
    prompts,
    out,
    method,
    lora_rank,
    steps,
    batch_size,
    lr,
    seed,
    sampler,
    sampler_steps,
    eta,
    guidance,
    option,
    weights_path,
    checkpoint_every,
    eval_samples,
    resume,
    overwrite,
    device,
    mixed_precision,
    gradient_checkpointing,
    log_with,
) -> None:
    from ..finetune import finetune as run_finetune
    from ..finetune import read_prompts
    from ..rewards import parse_weighted

    quiet_libraries()
    if base is None:
        from ..presets.digits.finetune import ALL_DIGITS, finetune_digits

        chosen = read_prompts(prompts) if prompts is not None else ALL_DIGITS
        run_finetune = functools.partial(finetune_digits, prompts=chosen)  # noqa: F811 (the embedded model's)
    elif prompts is None:
        raise CommandError("--prompts: give a prompts file (one prompt per line) for --base")
    else:
        run_finetune = functools.partial(run_finetune, base, prompts=prompts)
    record = run_finetune(
        reward,
        alpha,
        out=out,
        method=method,
        lora_rank=lora_rank,
        steps=steps,
        batch_size=batch_size,
        lr=lr,
        seed=seed,
        sampler=sampler,
        sampler_steps=sampler_steps,
        eta=eta,
        guidance_scale=guidance,
        weights_paths=parse_weights_paths(weights_path, list(parse_weighted(reward))),
        options=parse_options(option or []),
        checkpoint_every=checkpoint_every,
        eval_samples=eval_samples,
        resume=resume,
        overwrite=overwrite,
        device=device,
        mixed_precision=mixed_precision,
        gradient_checkpointing=gradient_checkpointing,
        log_with=tuple(log_with or ()),
    )
    from accelerate import PartialState

    if PartialState().is_main_process:  # (under accelerate launch, one process reports)
        evaluation = record["evaluation"]
        typer.echo(str(out / "pytorch_lora_weights.safetensors"))
        typer.echo(
            f"reward {evaluation['finetuned_reward']:.4g} (base {evaluation['base_reward']:.4g}), path KL "
            f"{evaluation['kl']:.4g}",
            err=True,
        )
