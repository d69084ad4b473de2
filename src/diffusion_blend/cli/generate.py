"""``diffusion-blend generate``: images from a blend of basis models, as a grid image or a folder of PNGs with a
settings file that is enough to redo the run.

The story of a call: the options checked (``request.py``), the blend loaded, the pipeline's arguments made
(``pipeline_call.py``), the images sampled with a progress bar, then written (``output.py``).
"""

from __future__ import annotations

import dataclasses
import inspect
from pathlib import Path
from typing import Annotated, Any

import typer

from ..schedulers import SCHEDULERS
from .output import save_images
from .pipeline_call import PipelineCall, pipeline_call
from .request import COMPILE_MODES, DTYPES, Request, check_request
from .running import CommandError, quiet_libraries, run_reporting_errors


def generate(
    weights: Annotated[
        list[str],
        typer.Option(
            help="NAME=W,... blend weights; names left out count as 0. Repeat it for a sweep in one batch: a grid "
            "row of --num-images images per setting, the same starting noise in every row."
        ),
    ],
    prompt: Annotated[str, typer.Option(help="The prompt (for the embedded digits model: the digit, 0-9).")],
    out: Annotated[
        str,
        typer.Option(
            help="An image file, .png, .jpg or .webp (a grid of all images), or a folder "
            "(one PNG per image; a name ending in /)."
        ),
    ],
    kl_scale: Annotated[
        list[float] | None,
        typer.Option(
            help="λ: 1 = the basis models' KL strength, 0 = the base (default 1). Repeat it to sweep λ too: a grid "
            "row per (weights, λ) pair."
        ),
    ] = None,
    mode: Annotated[str, typer.Option(help="mix (DB-MPA/DB-KLA) or stochastic (DB-MPA-LS).")] = "mix",
    negative_prompt: Annotated[str | None, typer.Option(help="Negative prompt.")] = None,
    steps: Annotated[int | None, typer.Option(help="Denoising steps (default: the pipeline's).")] = None,
    guidance: Annotated[
        float | None, typer.Option(help="Classifier-free guidance scale (default: the pipeline's).")
    ] = None,
    seed: Annotated[
        int,
        typer.Option(help="Random seed of the first image (image j: seed + j); the same seed gives the same images."),
    ] = 0,
    num_images: Annotated[int, typer.Option(help="Images to generate (per --weights and --kl-scale pair).")] = 1,
    height: Annotated[int | None, typer.Option(help="Image height in pixels.")] = None,
    width: Annotated[int | None, typer.Option(help="Image width in pixels.")] = None,
    scheduler: Annotated[str | None, typer.Option(help=f"Scheduler: {', '.join(SCHEDULERS)} or a class name.")] = None,
    dtype: Annotated[str, typer.Option(help="fp32, fp16 or bf16.")] = "fp32",
    device: Annotated[str | None, typer.Option(help="torch device (default: cuda when available, else cpu).")] = None,
    compile: Annotated[
        str | None,
        typer.Option(
            help=f"torch.compile the denoiser calls, in this mode: {', '.join(COMPILE_MODES)} (first image slower)."
        ),
    ] = None,
    max_batch_size: Annotated[
        str | None,
        typer.Option(
            help="At most this many rows per denoiser call, or 'input': as many as a single model's call (the memory "
            "of one model)."
        ),
    ] = None,
    lora_scale: Annotated[
        float | None,
        typer.Option(help="Scale every LoRA basis model's update, as the pipeline's own LoRA scale does (default 1)."),
    ] = None,
    denoiser: Annotated[
        str | None,
        typer.Option(
            help="The pipeline's denoiser to blend, where it has several (Wan 2.2: transformer or transformer_2)."
        ),
    ] = None,
    eta: Annotated[
        float | None, typer.Option(help="DDIM's η: 0 deterministic, 1 DDPM's noise (default: the pipeline's).")
    ] = None,
    smc: Annotated[
        int | None,
        typer.Option(
            help="Correct the blend by sequential Monte Carlo with this many particles per image, towards "
            "p_base·exp(λ Σ w r / α) (needs a stochastic sampler: --eta 1, or --scheduler ddpm)."
        ),
    ] = None,
    smc_reward: Annotated[
        list[str] | None,
        typer.Option(help="NAME=SPEC: the reward of basis NAME for --smc (default: the reward named NAME); repeat it."),
    ] = None,
    alpha: Annotated[
        float | None,
        typer.Option(
            help="The KL weight α the basis models were fine-tuned with, for --smc (embedded model: its own)."
        ),
    ] = None,
    base: Annotated[
        str | None, typer.Option(help="Base pipeline: a local folder or a hub id (default: the embedded digits model).")
    ] = None,
    basis: Annotated[
        list[str] | None,
        typer.Option(
            help="NAME=PATH of a basis model (LoRA or denoiser); repeat it. NAME@DENOISER=PATH gives one per "
            "denoiser of a pipeline that has several (Wan 2.2: NAME@transformer=..., NAME@transformer_2=...; "
            "PATH 'base': that denoiser unchanged). Default with the embedded model: its legible, bold and stencil."
        ),
    ] = None,
) -> None:
    """Generate images from a blend of basis models (by default the embedded digits model's)."""
    run_reporting_errors(_generate, **locals())


def _generate(**options: Any) -> None:
    """A ``generate`` call from its options to its files: checked, loaded, sampled, written."""
    quiet_libraries()
    request = check_request(**options)
    blend = load_blend(request)
    call = pipeline_call(request, blend)
    images = sample_with_progress(blend, request, call)
    settings = _jsonable(settings_record(request, blend, call, images))
    columns = request.num_images if len(request.sweep.rows) > 1 else None
    for path in save_images(images, request.out, settings, columns=columns):
        typer.echo(str(path))


def load_blend(request: Request) -> Any:
    """The base pipeline (the embedded digits model without ``--base``) with its basis models, on the request's
    scheduler and device."""
    import torch

    from ..pipeline import Blend

    torch_dtype = getattr(torch, DTYPES[request.dtype])
    options = dict(
        basis=request.basis,
        compile=request.compile_setting,
        max_batch_size=request.max_batch_size,
        denoiser=request.denoiser,
    )
    if request.base is None:
        from ..presets import digits

        blend = Blend(digits.load_pipeline().to(dtype=torch_dtype), **options)
    else:
        blend = Blend.from_pretrained(request.base, torch_dtype=torch_dtype, **options)
    if request.scheduler is not None:
        check_scheduler_fits(request.scheduler, blend.pipe)
        blend.pipe.scheduler = request.scheduler.from_config(blend.pipe.scheduler.config)
    blend.to(request.device)
    return blend


def check_scheduler_fits(scheduler: type, pipe: Any) -> None:
    """``--scheduler`` among those diffusers lists as compatible with the pipeline's own (a flow-matching scheduler
    on an ε-prediction model would fail deep inside the first step)."""
    own = type(pipe.scheduler)
    compatible = {own, *getattr(pipe.scheduler, "compatibles", ())}
    if scheduler not in compatible:
        names = ", ".join(sorted(cls.__name__ for cls in compatible))
        raise CommandError(
            f"--scheduler {scheduler.__name__} does not fit {type(pipe).__name__} (its {own.__name__} is "
            f"compatible with {names})"
        )


def sample_with_progress(blend: Any, request: Request, call: PipelineCall) -> list:
    """The blend's images for the request's weights and KL scales, with a progress bar on stderr (stdout carries
    the output paths alone)."""
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    pipe, kwargs, steps = blend.pipe, dict(call.kwargs), call.steps
    weights, kl_scale = request.sweep.blend_arguments(request.num_images)
    pipe.set_progress_bar_config(disable=True)
    with Progress(
        TextColumn("denoising"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total}"),
        TimeElapsedColumn(),
        transient=True,
        console=Console(stderr=True),
    ) as progress:  # stdout: the paths
        task = progress.add_task("denoising", total=steps)

        def on_step_end(_pipe, step, _timestep, callback_kwargs):
            check_finite_latents(callback_kwargs.get("latents"), step)
            progress.advance(task)
            return callback_kwargs

        if "callback_on_step_end" in inspect.signature(pipe.__call__).parameters:
            kwargs["callback_on_step_end"] = on_step_end
        if request.smc is not None:
            kwargs["corrector"] = request.smc.corrector(request.device)
        return blend.blend(weights=weights, kl_scale=kl_scale, mode=request.mode, **kwargs).images


def check_finite_latents(latents: Any, step: int) -> None:
    """Stop at the first step whose latents hold NaN or inf: the images would come out black, and exit 0."""
    import torch

    if isinstance(latents, torch.Tensor) and not bool(torch.isfinite(latents).all()):
        raise CommandError(
            f"the sampling produced non-finite values (NaN or inf) at step {step + 1}; nothing was written "
            "(in half precision, try --dtype fp32 or smaller weights)"
        )


def settings_record(request: Request, blend: Any, call: PipelineCall, images: list) -> dict[str, Any]:
    """What the settings file records: every setting as it took effect (the pipeline's defaults filled in, local
    sources made absolute, the scheduler's config, the versions), enough to redo the run."""
    import diffusers
    import torch

    from .. import __version__

    pipe = blend.pipe
    return {
        "base": _reproducible_source(request.base) if request.base is not None else "digits (embedded)",
        "basis": {
            name: {denoiser: _reproducible_source(path) for denoiser, path in source.items()}
            if isinstance(source, dict)
            else _reproducible_source(source)
            for name, source in request.basis.items()
        },
        **request.sweep.recorded(),
        "mode": request.mode,
        "prompt": request.prompt,
        "negative_prompt": request.negative_prompt,
        "steps": call.steps,
        "guidance": call.guidance,
        "guidance_argument": call.guidance_argument,
        "seed": request.seed,
        "num_images": request.num_images,
        "height": images[0].size[1],
        "width": images[0].size[0],
        "scheduler": {"class": type(pipe.scheduler).__name__, "config": dict(pipe.scheduler.config)},
        "dtype": request.dtype,
        "device": str(request.device),
        "compile": request.compile,
        "max_batch_size": request.max_batch_size,
        "lora_scale": request.lora_scale,
        "denoiser": blend.denoiser_names if blend.experts else blend.denoiser_name,
        "eta": call.kwargs.get("eta"),
        "smc": None if request.smc is None else {**dataclasses.asdict(request.smc), **_trace_summary(blend.smc_trace)},
        "versions": {"diffusion_blend": __version__, "diffusers": diffusers.__version__, "torch": torch.__version__},
    }


def _trace_summary(trace: Any) -> dict[str, Any]:
    """What the settings file records of a corrected run: the lowest mean ESS fraction, the resampling steps, the
    log normalising-constant estimate per image, the calls."""
    return {
        "min_ess": min(trace.ess),
        "resampling_steps": sorted(trace.resampled),
        "log_normaliser": trace.log_normaliser.tolist(),
        "reward_calls": trace.reward_calls,
    }


def _reproducible_source(source: str | None) -> str | None:
    """A model source as the settings file records it: a local path made absolute (the run can be redone from
    anywhere), a hub id as given."""
    if source is None or not Path(source).expanduser().exists():
        return source
    return str(Path(source).expanduser().resolve())


def _jsonable(value: Any) -> Any:
    """Settings as JSON values: anything else (a dtype, a path) as its text."""
    if isinstance(value, dict):
        return {str(key): _jsonable(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(item) for item in value]
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return str(value)
