"""SMC inside a diffusers pipeline call: each requested image is K particles, rows of the same call.

``Blend.blend(prompt, weights=..., corrector=SMC(particles=K, rewards={name: reward}, alpha=α))`` asks the pipeline
for K times the images (an image's particles side by side, drawing from its generator), has the blended denoiser
hand over the base's prediction from the same batched call as the members' (:attr:`BlendedDenoiser.observe_base`),
and takes over the scheduler's step. At each step the particles are reweighed — the base's Gaussian transition
against the blend's, and the change of the potential λ Σ_i w_i r_i(x̂₀) / α on the base's Tweedie estimate x̂₀
(decoded, for a latent model) — resampled where an image's effective sample size falls, and moved by the blend
(:class:`~diffusion_blend.smc.particles.Particles`). The pipeline decodes every particle; the one drawn by its
final weight is returned for each image, and the run's :class:`~diffusion_blend.smc.particles.Trace` is kept.

Classifier-free guidance is followed: the pipeline combines the denoiser's [unconditional; conditional] rows as
u + s (c − u), and the base's rows are combined alike, checked at every step against the prediction the pipeline
hands the scheduler (a pipeline combining them otherwise, as ``guidance_rescale`` does, is refused there). The
target is then the guided base's law tilted by the mixed reward.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import inspect
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from diffusers import DDIMScheduler, DDPMScheduler
from diffusers.schedulers.scheduling_ddim import DDIMSchedulerOutput
from diffusers.schedulers.scheduling_ddpm import DDPMSchedulerOutput

from ..blend import validate_kl_scale, validate_weights, weighed_names
from ..finetune.path import Step, StochasticPath
from ..images import decoded
from .particles import SMC, Particles, Trace, check_alpha

#: the guided blend recomputed from the denoiser's rows may differ from the pipeline's by rounding only
GUIDANCE_TOLERANCE = 1e-4


class PipelineCorrection:
    """One corrected pipeline call: the call's arguments for K particles per image, the installed step, the choice.

    Everything is checked here, before the pipeline runs: the corrector's rewards and α, the scheduler (DDIM with
    η > 0 or DDPM, a Gaussian step), and how many images the call makes.
    """

    def __init__(
        self,
        pipe: Any,
        options: SMC,
        weights: Mapping[str, float] | Sequence[Mapping[str, float]],
        kl_scale: float | Sequence[float],
        images: int | None,
        names: Sequence[str],
        args: tuple,
        pipeline_kwargs: dict,
    ):
        self.pipe, self.options, self.count = pipe, options, options.particles
        parameters = inspect.signature(pipe.__call__).parameters
        self.images, self.rows_argument = _images_and_argument(images, parameters, pipeline_kwargs)
        per_image = (
            [validate_weights(sample, names) for sample in _per_image(weights, self.images)],
            [validate_kl_scale(value) for value in _per_image(kl_scale, self.images)],
        )
        self.rewards = _checked_rewards(options, per_image[0], per_image[1])
        check_alpha(options.alpha)
        self.eta = _checked_scheduler(pipe.scheduler, parameters, pipeline_kwargs)
        #: λ w_i per particle, [rows, rewards]
        self.table = torch.tensor(
            [[kl * w.get(name, 0.0) for name in self.rewards] for w, kl in zip(*per_image)], dtype=torch.float64
        ).repeat_interleave(self.count, 0)
        self.weights = [w for w in per_image[0] for _ in range(self.count)]
        self.kl_scale = [kl for kl in per_image[1] for _ in range(self.count)]
        self.pipeline_kwargs, generators = self._expanded(parameters, pipeline_kwargs)
        default_guidance = parameters["guidance_scale"].default if "guidance_scale" in parameters else 1.0
        self.guidance_scale = pipeline_kwargs.get("guidance_scale", default_guidance)
        prompts = _prompts(args, pipeline_kwargs, self.images)
        if prompts is None and "prompt" in parameters:
            raise ValueError(
                "SMC: the rewards score each image with its prompt: pass prompt (not only prompt embeddings)"
            )
        self.prompts = [prompt for prompt in prompts or [""] * self.images for _ in range(self.count)]
        self.particles = Particles(self.images, options, self._log_target, generators)
        self.chosen: torch.Tensor | None = None
        self._seen: tuple[torch.Tensor, torch.Tensor] | None = None
        self._steps: dict[int, Step] | None = None

    @property
    def trace(self) -> Trace:
        return self.particles.trace

    def _expanded(self, parameters: Mapping, pipeline_kwargs: dict) -> tuple[dict, Any]:
        """The call's arguments for K particles per image: K times the images, an image's generator (and latents)
        repeated for its particles."""
        kwargs = dict(pipeline_kwargs)
        per_row = kwargs.get(self.rows_argument, parameters[self.rows_argument].default)
        kwargs[self.rows_argument] = (per_row or 1) * self.count
        generators = kwargs.get("generator")
        if isinstance(generators, list):
            if len(generators) != self.images:
                raise ValueError(
                    f"SMC: give one generator or one per image ({self.images}), got a list of {len(generators)}"
                )
            kwargs["generator"] = [generator for generator in generators for _ in range(self.count)]
        latents = kwargs.get("latents")
        if isinstance(latents, torch.Tensor):
            if len(latents) != self.images:
                raise ValueError(f"SMC: latents must have one row per image ({self.images}), got {len(latents)}")
            kwargs["latents"] = latents.repeat_interleave(self.count, 0)
        return kwargs, generators

    @contextlib.contextmanager
    def installed(self, denoiser) -> Iterator[None]:
        """During the call: the denoiser hands over the base's prediction, the scheduler steps the particles."""
        scheduler = self.pipe.scheduler
        patched = scheduler.__dict__.get("step")  # (a step set on the instance by someone else is put back)
        denoiser.observe_base = self._observe
        scheduler.step = self._step
        try:
            yield
        finally:
            denoiser.observe_base = None
            if patched is None:
                del scheduler.step
            else:
                scheduler.step = patched

    def selected(self, output: Any) -> Any:
        """The pipeline's output with one particle per image: every field with a value per particle is narrowed."""
        if self.chosen is None:
            raise RuntimeError("SMC: the pipeline returned before its last denoising step")
        rows, total = self.chosen, self.images * self.count

        def pick(value):
            if isinstance(value, torch.Tensor) and value.ndim and len(value) == total:
                return value[rows.to(value.device)]
            if isinstance(value, np.ndarray) and value.ndim and len(value) == total:
                return value[rows.numpy()]
            if isinstance(value, list) and len(value) == total:
                return [value[row] for row in rows.tolist()]
            return value

        if isinstance(output, tuple):
            return tuple(pick(value) for value in output)
        fields = dataclasses.fields(output)  # (a diffusers output's items() leaves out fields that are None)
        return type(output)(**{field.name: pick(getattr(output, field.name)) for field in fields})

    # -------------------------------------------------------------------------------------------- during the call
    def _observe(self, blended: Any, base: Any) -> None:
        if not (isinstance(blended, torch.Tensor) and isinstance(base, torch.Tensor)):
            raise ValueError("SMC corrects denoisers with one prediction tensor; this one returns several outputs")
        self._seen = blended, base

    def _step(self, model_output: torch.Tensor, timestep: Any, sample: torch.Tensor, *args: Any, **kwargs: Any):
        """The scheduler's step for the particles (DDIM's and DDPM's outputs: the new sample and the blend's x̂₀)."""
        if args:
            raise ValueError("SMC: the pipeline passed the scheduler's step options by position; pass them by name")
        step = self._step_at(int(timestep), kwargs.get("eta", self.eta))
        base = self._guided_base(model_output, sample)
        order = self.particles.reweigh(step, sample, base)
        if order is not None:
            order = order.to(sample.device)
            sample, model_output, base = sample[order], model_output[order], base[order]
        moved = self.particles.move(step, sample, model_output, base)
        if int(timestep) == int(self.pipe.scheduler.timesteps[-1]):
            self.chosen = self.particles.finish(moved)
        clean = step.clean(sample, model_output)
        if not kwargs.get("return_dict", True):
            return moved, clean
        output = DDPMSchedulerOutput if isinstance(self.pipe.scheduler, DDPMScheduler) else DDIMSchedulerOutput
        return output(prev_sample=moved, pred_original_sample=clean)

    def _step_at(self, timestep: int, eta: float) -> Step:
        """The Gaussian transition at ``timestep`` of the schedule the pipeline set (read once per call)."""
        if self._steps is None:
            scheduler = self.pipe.scheduler
            path = StochasticPath.from_scheduler(copy.deepcopy(scheduler), scheduler.num_inference_steps, eta)
            if [step.timestep for step in path.steps] != [int(t) for t in scheduler.timesteps]:
                raise ValueError("SMC follows the scheduler's own timesteps; custom timesteps are not supported")
            self._steps = {step.timestep: step for step in path.steps}
        return self._steps[timestep]

    def _guided_base(self, guided: torch.Tensor, sample: torch.Tensor) -> torch.Tensor:
        """The base's prediction combined as the pipeline combined the blend's: as is, or u + s (c − u) for the
        [unconditional; conditional] halves of classifier-free guidance; refused where that does not reproduce
        the prediction the pipeline passed on."""
        if self._seen is None:
            raise ValueError("SMC: the scheduler stepped without a call of the blended denoiser before it")
        (blended, base), self._seen = self._seen, None
        if len(blended) == 2 * len(sample):
            scale = float(getattr(self.pipe, "guidance_scale", self.guidance_scale))
            blended, base = (_guidance(prediction, scale) for prediction in (blended, base))
        if blended.shape != guided.shape or not torch.allclose(
            blended.to(guided.dtype), guided, rtol=GUIDANCE_TOLERANCE, atol=GUIDANCE_TOLERANCE
        ):
            raise ValueError(
                "SMC: the pipeline combined the denoiser's outputs other than as classifier-free guidance "
                "u + s (c − u) (guidance_rescale?), so the base's transition cannot be followed"
            )
        return base.to(guided.dtype)

    def _log_target(self, clean: torch.Tensor) -> torch.Tensor:
        """λ Σ_i w_i r_i / α of each particle's decoded x̂₀."""
        images = _images(self.pipe, clean)
        values = torch.stack(
            [_reward_values(name, reward, images, self.prompts) for name, reward in self.rewards.items()], 1
        )
        return (values * self.table).sum(1) / self.options.alpha


def _guidance(prediction: torch.Tensor, scale: float) -> torch.Tensor:
    unconditional, conditional = prediction.chunk(2)
    return unconditional + scale * (conditional - unconditional)


def _images(pipe: Any, clean: torch.Tensor) -> torch.Tensor:
    """x̂₀ as images [B, 3, H, W] in [0, 1]: decoded as the pipeline decodes (an fp16 VAE marked ``force_upcast`` in
    float32), or read as pixels in [−1, 1] (one channel as grey)."""
    if getattr(pipe, "vae", None) is not None:
        with torch.no_grad():
            return decoded(pipe, clean, upcast=True).float()
    images = ((clean.float() + 1) / 2).clamp(0, 1)
    return images.repeat(1, 3, 1, 1) if images.shape[1] == 1 else images


def _reward_values(name: str, reward: Callable, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
    values = reward(images, prompts)
    if not isinstance(values, torch.Tensor) or values.shape != (len(images),):
        got = list(values.shape) if isinstance(values, torch.Tensor) else type(values).__name__
        raise ValueError(f"SMC: reward {name!r} must give one value per image ([{len(images)}]), got {got}")
    if not torch.isfinite(values).all():
        raise ValueError(f"SMC: reward {name!r} returned a non-finite value; the corrector cannot weigh that image")
    return values.detach().double().cpu()


def _images_and_argument(images: int | None, parameters: Mapping, pipeline_kwargs: dict) -> tuple[int, str]:
    """How many images the call makes, and the argument that multiplies them (images per prompt, or the batch
    size of an unconditional pipeline)."""
    for name in ("num_images_per_prompt", "num_videos_per_prompt"):
        if name in parameters and images is not None:
            return images, name
    if "batch_size" in parameters and images is None:
        size = pipeline_kwargs.get("batch_size", parameters["batch_size"].default)
        if isinstance(size, int) and size >= 1:
            return size, "batch_size"
    raise ValueError(
        "SMC: cannot tell how many images the call makes (pass prompt, or batch_size to an unconditional pipeline)"
    )


def _per_image(values: Any, images: int) -> list:
    """Weights or λ, one per image (the call's checks already made a list one per image)."""
    if isinstance(values, Mapping) or not isinstance(values, Sequence):
        return [values] * images
    return list(values)


def _checked_rewards(options: SMC, weights: list[Mapping[str, float]], kl_scales: list[float]) -> dict[str, Callable]:
    """The corrector's rewards: a callable (images, prompts) → values for every basis weighed in the blend."""
    rewards = options.rewards
    if not isinstance(rewards, Mapping) or not rewards:
        raise ValueError("SMC in a pipeline needs rewards: SMC(rewards={basis name: reward(images, prompts)}, ...)")
    weighed = weighed_names(list(zip(weights, kl_scales)))
    missing = [name for name in weighed if name not in rewards]
    if missing:
        raise ValueError(
            f"SMC: no reward for {', '.join(map(repr, missing))} (weighed in the blend); the corrector has rewards "
            f"for {', '.join(map(repr, rewards))}"
        )
    for name in weighed:
        if not callable(rewards[name]):
            raise ValueError(f"SMC: reward {name!r} must be callable as reward(images, prompts), got {rewards[name]!r}")
    return {name: rewards[name] for name in weighed}


def _checked_scheduler(scheduler: Any, parameters: Mapping, pipeline_kwargs: dict) -> float:
    """η of the call's sampler; refused unless its step is Gaussian with σ > 0 (DDPM, DDIM with η > 0)."""
    if not isinstance(scheduler, (DDIMScheduler, DDPMScheduler)):
        raise ValueError(
            f"SMC reweighs Gaussian steps: use DDPMScheduler or DDIMScheduler with eta > 0, not "
            f"{type(scheduler).__name__} (pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config))"
        )
    eta = 1.0
    if isinstance(scheduler, DDIMScheduler):
        eta = pipeline_kwargs.get("eta", parameters["eta"].default if "eta" in parameters else 0.0)
        if not (isinstance(eta, (int, float)) and math.isfinite(eta) and 0 < eta <= 1):
            raise ValueError(f"SMC reweighs stochastic steps: call with DDIM's eta in (0, 1] (1: DDPM's), got {eta!r}")
    steps = pipeline_kwargs.get("num_inference_steps", parameters.get("num_inference_steps"))
    steps = steps.default if isinstance(steps, inspect.Parameter) else steps
    try:
        StochasticPath.from_scheduler(copy.deepcopy(scheduler), steps if steps is not None else 50, eta)
    except ValueError as error:
        raise ValueError(f"SMC: {error}") from error
    return float(eta)


def _prompts(args: tuple, pipeline_kwargs: dict, images: int) -> list[str] | None:
    """The prompt of each image, for the rewards (each prompt's images together); None where the call has none."""
    prompt = pipeline_kwargs.get("prompt", args[0] if args else None)
    prompts = [prompt] if isinstance(prompt, (str, int)) else list(prompt) if isinstance(prompt, Sequence) else []
    if not prompts:
        return None
    return [str(prompt) for prompt in prompts for _ in range(images // len(prompts))]
