"""``generate``'s options, every one checked before any model is loaded: a :class:`Request` holds them once
they are, the weights and KL scales as a :class:`Sweep` (a grid row per pair)."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any

from ..blend import weighed_names
from ..named_numbers import parse_named_numbers
from ..schedulers import scheduler_class
from .output import Output, check_out
from .parsing import parse_basis, parse_named_texts, paths_of
from .running import CommandError

MODES = ("mix", "stochastic")
DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune")
NO_LORA_TO_SCALE = "--lora-scale scales LoRA basis models, and no --basis is a LoRA"

Basis = dict[str, str | None | dict[str, str | None]]


@dataclasses.dataclass(frozen=True)
class Sweep:
    """Every ``--weights`` setting with every ``--kl-scale``: a grid row per pair (one row: a plain call)."""

    weights: list[dict[str, float]]
    kl_scales: list[float]

    @classmethod
    def parse(cls, weights: list[str], kl_scales: list[float] | None, names: Basis, *, simplex: bool) -> Sweep:
        """``--weights`` (each checked against the basis' names) and ``--kl-scale`` (default 1)."""
        from ..blend import validate_kl_scale, validate_weights

        settings = [
            validate_weights(parse_named_numbers(setting, "--weights"), names, simplex=simplex) for setting in weights
        ]
        return cls(settings, [validate_kl_scale(value) for value in (kl_scales or [1.0])])

    @property
    def rows(self) -> list[tuple[dict[str, float], float]]:
        return [(setting, value) for setting in self.weights for value in self.kl_scales]

    def blend_arguments(self, num_images: int) -> tuple[Any, Any]:
        """``Blend.blend``'s ``weights`` and ``kl_scale``: one value where the sweep has one, else one per image."""
        per_image = [pair for pair in self.rows for _ in range(num_images)]
        weights = self.weights[0] if len(self.weights) == 1 else [setting for setting, _ in per_image]
        kl_scale = self.kl_scales[0] if len(self.kl_scales) == 1 else [value for _, value in per_image]
        return weights, kl_scale

    def recorded(self) -> dict[str, Any]:
        """The settings file's ``weights`` and ``kl_scale``: single values as such, a sweep's as lists."""
        return {
            "weights": self.weights[0] if len(self.weights) == 1 else self.weights,
            "kl_scale": self.kl_scales[0] if len(self.kl_scales) == 1 else self.kl_scales,
        }


@dataclasses.dataclass(frozen=True)
class Correction:
    """``--smc K``: K particles per image towards p_base·exp(λ Σ w r / α), each weighed basis with its reward."""

    particles: int
    alpha: float
    rewards: dict[str, str]  # basis name → reward spec

    def corrector(self, device: str) -> Any:
        """The :class:`~diffusion_blend.smc.SMC` of ``Blend.blend``, its reward models loaded on ``device``."""
        from ..rewards import parse_reward
        from ..smc import SMC

        rewards = {name: parse_reward(spec, device=device) for name, spec in self.rewards.items()}
        return SMC(particles=self.particles, rewards=rewards, alpha=self.alpha)


@dataclasses.dataclass(frozen=True)
class Request:
    """A ``generate`` call, checked: what to load, how to call the pipeline, where to write."""

    base: str | None  # None: the embedded digits model
    basis: Basis
    sweep: Sweep
    mode: str
    prompt: str
    negative_prompt: str | None
    steps: int | None
    guidance: float | None
    seed: int
    num_images: int
    height: int | None
    width: int | None
    scheduler: type | None
    dtype: str
    device: str
    compile: str | None  # as given (recorded); Blend's argument is ``compile_setting``
    max_batch_size: int | str | None
    lora_scale: float | None
    denoiser: str | None
    out: Output
    eta: float | None = None
    smc: Correction | None = None

    @property
    def compile_setting(self) -> bool | dict:
        return compile_option(self.compile)


def check_request(
    base,
    basis,
    weights,
    prompt,
    out,
    kl_scale,
    mode,
    negative_prompt,
    steps,
    guidance,
    seed,
    num_images,
    height,
    width,
    scheduler,
    dtype,
    device,
    compile,
    max_batch_size,
    lora_scale,
    denoiser,
    eta=None,
    smc=None,
    smc_reward=None,
    alpha=None,
) -> Request:
    """``generate``'s options as a :class:`Request`; the first bad one raises (in this order)."""
    import torch

    if mode not in MODES:
        raise CommandError(f"--mode must be mix or stochastic, got {mode!r}")
    sources = basis_sources(base, basis, prompt)
    sweep = Sweep.parse(weights, kl_scale, sources, simplex=mode == "stochastic")
    check_numbers(dtype, num_images, steps, height, width, guidance, seed)
    compile_option(compile)
    rows_per_call = max_batch_size_option(max_batch_size)
    if lora_scale is not None:
        check_lora_scale(lora_scale, sources)
    output = Output.parse(out)
    check_out(output)
    scheduler_cls = scheduler_option(scheduler) if scheduler else None
    if eta is not None and not (math.isfinite(eta) and 0 <= eta <= 1):
        raise CommandError(f"--eta must lie in [0, 1], got {eta}")
    correction = smc_option(smc, smc_reward, alpha, base, mode, sweep, sources)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    return Request(
        base=base,
        basis=sources,
        sweep=sweep,
        mode=mode,
        prompt=prompt,
        negative_prompt=negative_prompt,
        steps=steps,
        guidance=guidance,
        seed=seed,
        num_images=num_images,
        height=height,
        width=width,
        scheduler=scheduler_cls,
        dtype=dtype,
        device=device,
        compile=compile,
        max_batch_size=rows_per_call,
        lora_scale=lora_scale,
        denoiser=denoiser,
        out=output,
        eta=eta,
        smc=correction,
    )


def smc_option(
    particles: int | None, rewards: list[str] | None, alpha: float | None, base: str | None, mode: str, sweep, sources
) -> Correction | None:
    """``--smc K`` with ``--smc-reward NAME=SPEC`` (default: the basis name is the reward's) and ``--alpha`` (the
    basis models' KL weight; the embedded model's by default), every reward spec checked before anything loads."""
    from ..rewards import check_reward_spec

    if particles is None:
        if rewards or alpha is not None:
            raise CommandError("--smc-reward and --alpha set the SMC corrector: give --smc K with them")
        return None
    if particles < 1:
        raise CommandError(f"--smc must be >= 1 particle per image, got {particles}")
    if mode != "mix":
        raise CommandError("--smc weighs the blend's Gaussian step: use --mode mix")
    if alpha is None:
        if base is not None:
            raise CommandError("--smc needs --alpha, the KL weight the basis models were fine-tuned with")
        from ..presets import digits

        alpha = digits.basis_alpha()
    if not (math.isfinite(alpha) and alpha > 0):
        raise CommandError(f"--alpha must be a finite number > 0, got {alpha}")
    given = parse_named_texts(rewards or [], "--smc-reward")
    unknown = sorted(set(given) - set(sources))
    if unknown:
        raise CommandError(
            f"--smc-reward names {', '.join(unknown)}, which no --basis is; the basis: {', '.join(sources)}"
        )
    specs = {name: given.get(name, name) for name in weighed_names(sweep.rows)}
    for name, spec in specs.items():
        try:
            check_reward_spec(spec)
        except ValueError as error:
            hint = "" if name in given else f" (give its reward with --smc-reward {name}=SPEC)"
            raise CommandError(f"--smc: basis {name!r}: {error}{hint}") from None
    return Correction(particles, float(alpha), specs)


def basis_sources(base: str | None, basis: list[str] | None, prompt: str) -> Basis:
    """The basis models by name: ``--basis`` as given, or without ``--base`` the embedded model's own (where the
    prompt must be a digit)."""
    if base is None:
        from ..presets import digits

        digits.digit_labels(prompt)  # the embedded model's prompt is a digit
    if base is None and not basis:
        sources = {name: str(path) for name, path in digits.basis_models().items()}
    else:
        sources = parse_basis(basis or [])
    if not sources:
        raise CommandError("give at least one --basis NAME=PATH")
    return sources


def check_numbers(
    dtype: str,
    num_images: int,
    steps: int | None,
    height: int | None,
    width: int | None,
    guidance: float | None,
    seed: int,
) -> None:
    """A known ``--dtype``; counts and sizes ≥ 1, height and width together; a finite guidance; seeds in range."""
    if dtype not in DTYPES:
        raise CommandError(f"--dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    for option, value in (("--num-images", num_images), ("--steps", steps), ("--height", height), ("--width", width)):
        if value is not None and value < 1:
            raise CommandError(f"{option} must be >= 1, got {value}")
    if (height is None) != (width is None):  # diffusers' SD pipelines would drop the one given for their defaults
        raise CommandError("--height and --width go together: give both, or neither for the pipeline's size")
    if guidance is not None and not math.isfinite(guidance):
        raise CommandError(f"--guidance must be a finite number, got {guidance}")
    if not 0 <= seed <= 2**64 - num_images:
        raise CommandError(f"--seed must be in [0, 2**64 - --num-images], got {seed}")


def compile_option(mode: str | None) -> bool | dict:
    """``--compile MODE`` as Blend's ``compile`` argument (no option: eager calls)."""
    if mode is None:
        return False
    if mode not in COMPILE_MODES:
        raise CommandError(f"--compile must be one of {', '.join(COMPILE_MODES)}, got {mode!r}")
    return True if mode == "default" else {"mode": mode}


def max_batch_size_option(value: str | None) -> int | str | None:
    """``--max-batch-size N|input`` as Blend's ``max_batch_size`` argument."""
    from ..execution import INPUT_ROWS

    if value is None or value == INPUT_ROWS:
        return value
    if not value.isdigit() or int(value) < 1:
        raise CommandError(f"--max-batch-size must be a positive integer or 'input', got {value!r}")
    return int(value)


def check_lora_scale(lora_scale: float, basis: Basis) -> None:
    """``--lora-scale`` is a finite number, and scales LoRA basis models only: not every basis a denoiser folder."""
    from ..loading import is_denoiser_folder

    if not math.isfinite(lora_scale):
        raise CommandError(f"--lora-scale must be a finite number, got {lora_scale}")
    if all(is_denoiser_folder(Path(path).expanduser()) for path in paths_of(basis)):
        raise CommandError(NO_LORA_TO_SCALE)


def scheduler_option(name: str) -> type:
    """``--scheduler``: a short name of the shared table or a diffusers class name."""
    try:
        return scheduler_class(name)
    except ValueError as error:
        raise CommandError(f"--scheduler: {error}") from None
