"""How a checked ``generate`` request becomes the arguments of the diffusers pipeline's own call: its defaults,
the argument that carries guidance (or a LoRA scale) on this pipeline, and one seeded generator per image."""

from __future__ import annotations

import dataclasses
import inspect
from typing import Any

from .request import NO_LORA_TO_SCALE, Request
from .running import CommandError

#: Qwen-Image's name for classifier-free guidance (its ``guidance_scale`` feeds a guidance embedding)
TRUE_CFG = "true_cfg_scale"


@dataclasses.dataclass(frozen=True)
class PipelineCall:
    """The pipeline call's arguments, and the steps and guidance they came to (the settings file records them)."""

    kwargs: dict[str, Any]
    steps: int | None
    guidance: float | None
    guidance_argument: str


def pipeline_call(request: Request, blend: Any) -> PipelineCall:
    """The arguments of ``blend.pipe``'s call for ``request``; the pipeline's defaults where an option is not given."""
    import torch

    pipe = blend.pipe
    defaults = call_defaults_of(pipe)
    steps = request.steps if request.steps is not None else defaults.get("num_inference_steps")
    guidance_argument, guidance = guidance_setting(
        request.guidance, request.negative_prompt, pipe, defaults, blend.base
    )
    rows = len(request.sweep.rows)
    # image j of every setting from seed + j: a sweep's rows differ by their weights alone, each as its own run
    generators = [
        torch.Generator(device="cpu").manual_seed(request.seed + image)
        for _ in range(rows)
        for image in range(request.num_images)
    ]
    kwargs = dict(
        prompt=request.prompt if rows == 1 else [request.prompt] * rows,
        num_inference_steps=steps,
        num_images_per_prompt=request.num_images,
        generator=generators,
        output_type="pil",
    )
    kwargs[guidance_argument] = guidance
    for name in ("negative_prompt", "height", "width"):  # given, else the pipeline's own default
        if getattr(request, name) is not None:
            kwargs[name] = getattr(request, name)
    if request.eta is not None:
        if "eta" not in defaults:
            raise CommandError(f"--eta: {type(pipe).__name__} takes no eta (its scheduler sets the noise)")
        kwargs["eta"] = request.eta
    if request.lora_scale is not None:
        kwargs[lora_scale_argument(blend, defaults)] = {"scale": request.lora_scale}
    return PipelineCall(kwargs, steps, guidance, guidance_argument)


def call_defaults_of(pipe: Any) -> dict[str, Any]:
    """The pipeline's call arguments and their defaults."""
    return {name: parameter.default for name, parameter in inspect.signature(pipe.__call__).parameters.items()}


def guidance_setting(
    guidance: float | None, negative_prompt: str | None, pipe: Any, defaults: dict[str, Any], denoiser: Any
) -> tuple:
    """``--guidance`` as (the pipeline argument it sets, its value; the pipeline's default when not given), from the
    pipeline's call ``defaults`` (:func:`call_defaults_of`).

    The argument is ``guidance_scale`` (classifier-free guidance, or the guidance distilled into FLUX.1-dev's
    embedding), but ``true_cfg_scale`` where ``guidance_scale`` defaults to None and the denoiser has no guidance
    embedding to feed it to (Qwen-Image would ignore it); that guidance runs only with a negative prompt."""
    distilled = getattr(getattr(denoiser, "config", None), "guidance_embeds", False)
    argument = (
        TRUE_CFG
        if TRUE_CFG in defaults and defaults.get("guidance_scale") is None and not distilled
        else "guidance_scale"
    )
    if argument == TRUE_CFG and guidance is not None and guidance > 1 and negative_prompt is None:
        raise CommandError(
            f"--guidance for {type(pipe).__name__} is its true classifier-free guidance "
            "(true_cfg_scale), which runs only with a negative prompt: give --negative-prompt (' ' for none)"
        )
    return argument, guidance if guidance is not None else defaults.get(argument)


def lora_scale_argument(blend: Any, call_parameters: dict) -> str:
    """The pipeline argument that carries a LoRA scale (``cross_attention_kwargs`` for SD, ``joint_attention_kwargs``
    for SD3/Flux, ...), for ``--lora-scale``; raise where no basis model is a LoRA or the pipeline takes none."""
    from ..arguments import lora_scale_parameter

    if not blend.has_lora_members:  # (a hub id is known to be a LoRA or a denoiser once it is read)
        raise CommandError(NO_LORA_TO_SCALE)
    argument = lora_scale_parameter(call_parameters)
    if argument is None:
        raise CommandError(f"--lora-scale: {type(blend.pipe).__name__} takes no LoRA scale")
    return argument
