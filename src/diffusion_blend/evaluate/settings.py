"""Where a sweep samples: a pipeline with basis models, oracles and reward models, and every method on top of it.

A setting draws the images of one *unit* of work — a method at one or several weight points, the same prompts and
the same per-image seeds at every point — and scores them with each reward. It is built, and everything the
configuration names is checked (rewards the basis has, oracles at the asked weights), before any sampling.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ..baselines import RewardedSoup, code_sample, guided_sample
from ..pipeline import Blend
from ..rewards import get_reward
from .config import ConfigError, Method, SweepConfig, same_point

#: seeds of different configuration seeds lie this far apart
SEED_STRIDE = 1_000_000
#: images of each point kept for the grid (the first ones: the same seeds for every method)
GRID_IMAGES = 4


@dataclass
class Counter:
    """Forward calls of the denoiser and the rows they evaluated."""

    calls: int = 0
    rows: int = 0

    def __call__(self, module, args, kwargs) -> None:
        self.calls += 1
        sample = args[0] if args else kwargs.get("sample")
        self.rows += int(sample.shape[0]) if isinstance(sample, torch.Tensor) else 0


class PipelineSetting:
    """A diffusers pipeline, its basis models (one per reward), MORL oracles by weight point and the reward models.

    Args:
        pipe: the base pipeline; ``basis``: reward name → LoRA source; ``oracles``: weight point → LoRA source.
        rewards: reward name → reward model, in the order of the weight points.
        prompts: the evaluation prompts; every method draws ``images_per_prompt`` images per prompt and seed.
        base_sampler: ``(prompts) → BaseSampler`` for CoDe and guidance (None: those methods are unavailable).
        alpha: the KL weight the basis models were fine-tuned with: DB-MPA + SMC's target (None: unavailable).
    """

    def __init__(
        self,
        config: SweepConfig,
        pipe,
        basis: dict,
        oracles: dict,
        rewards: dict,
        prompts: Sequence[str],
        base_sampler=None,
        description: dict | None = None,
        alpha: float | None = None,
    ):
        self.config, self.pipe, self.basis, self.oracles = config, pipe, basis, oracles
        self.rewards, self.base_sampler, self.alpha = rewards, base_sampler, alpha
        self.description = description or {}
        self.prompts = [prompt for seed in config.seeds for prompt in prompts for _ in range(config.images_per_prompt)]
        self.seeds = [
            seed * SEED_STRIDE + index
            for seed in config.seeds
            for index in range(len(prompts) * config.images_per_prompt)
        ]
        self.counter = Counter()
        pipe.unet.register_forward_pre_hook(self.counter, with_kwargs=True)
        self._blend: Blend | None = None
        self._soups: dict[str, RewardedSoup] = {}
        self.check(config)

    # ------------------------------------------------------------------------------------------------- checks
    def check(self, config: SweepConfig) -> None:
        """The methods against what the setting has (its subclasses check the basis before loading anything)."""
        for method in config.methods:
            if method.name in ("code", "guidance") and self.base_sampler is None:
                raise ConfigError(
                    f"method {method.name!r} needs the base sampler as a loop, which this setting does not provide"
                )
            if method.name == "db-smc" and self.alpha is None:
                raise ConfigError(
                    "db-smc targets p_base·exp(Σ w r / α): give alpha, the KL weight the basis models were fine-tuned "
                    "with"
                )
            if method.name == "oracle" and not self.oracles:
                raise ConfigError("no MORL oracle to compare with: the setting has none")
            if method.name == "oracle" and method.weights is not None:
                for point in method.weights:
                    if self.oracle_for(point) is None:
                        trained = ", ".join(str(list(key)) for key in self.oracles) or "none"
                        raise ConfigError(
                            f"no MORL oracle was fine-tuned at weights {list(point)} "
                            f"({', '.join(config.rewards)}); oracles exist at: {trained}"
                        )

    def oracle_points(self) -> tuple[tuple[float, ...], ...]:
        return tuple(sorted(self.oracles))

    def oracle_for(self, point: Sequence[float]):
        return next((source for key, source in self.oracles.items() if same_point(key, point)), None)

    # ----------------------------------------------------------------------------------------------- sampling
    def images(self, method: Method, points: Sequence[tuple[float, ...]], kl_scale: float = 1.0) -> torch.Tensor:
        """The images of ``method`` at each point, [points · images, 3, H, W] in [0, 1], point after point."""
        name = method.name
        if name == "base":
            return self.call(self.pipe, len(points))
        if name in ("db-mpa", "db-mpa-ls", "joint"):
            mode = "stochastic" if name == "db-mpa-ls" else "mix"
            return self.blended(points, mode, kl_scale)
        if name == "db-smc":
            return self.corrected(points, method.options)
        if name in ("soup", "soup-published"):
            soup = self.soup("updates" if name == "soup" else "published")
            return torch.cat([self.call(soup, 1, weights=self.named(point)) for point in points])
        if name in ("code", "guidance"):
            return torch.cat([self.steered(method, point) for point in points])
        if name == "oracle":
            return torch.cat([self.with_oracle(point) for point in points])
        raise ValueError(f"unknown method {name!r}")

    def call(self, function, repeats: int, **options) -> torch.Tensor:
        """``function`` (the pipeline, a blend, a soup) on every image ``repeats`` times, ``batch_images`` a call."""
        prompts, seeds = self.prompts * repeats, self.seeds * repeats
        per_image = options.pop("per_image", {})
        chunks = []
        size = self.config.batch_images
        for start in range(0, len(prompts), size):
            rows = slice(start, start + size)
            chunk = {key: value[rows] for key, value in per_image.items()}
            chunks.append(
                function(
                    prompt=prompts[rows],
                    num_inference_steps=self.config.steps,
                    guidance_scale=self.config.guidance_scale,
                    eta=self.config.eta,
                    output_type="pt",
                    generator=[torch.Generator().manual_seed(seed) for seed in seeds[rows]],
                    **chunk,
                    **options,
                ).images
            )
        return torch.cat(chunks)

    def blended(self, points, mode: str, kl_scale: float) -> torch.Tensor:
        blend = self.blend()
        weights = [self.named(point) for point in points for _ in self.prompts]
        per_image = {"weights": weights, "kl_scale": [kl_scale] * len(weights)}
        return self.call(blend.blend, len(points), per_image=per_image, mode=mode)

    def corrected(self, points, options: dict) -> torch.Tensor:
        """DB-MPA + SMC towards p_base·exp(Σ w r / α), the setting's rewards as potentials."""
        from ..smc import SMC

        corrector = SMC(**options, rewards=self.rewards, alpha=self.alpha)
        weights = [self.named(point) for point in points for _ in self.prompts]
        return self.call(self.blend().blend, len(points), per_image={"weights": weights}, corrector=corrector)

    def steered(self, method: Method, point: tuple[float, ...]) -> torch.Tensor:
        """CoDe or guidance, in groups of images whose rows (CoDe: candidates per image) fill ``batch_images``."""
        rows_per_image = method.options["candidates"] if method.name == "code" else 1
        group = max(1, self.config.batch_images // rows_per_image)
        chunks = []
        for start in range(0, len(self.prompts), group):
            prompts, seeds = self.prompts[start : start + group], self.seeds[start : start + group]
            generators = [torch.Generator().manual_seed(seed) for seed in seeds]
            weights = torch.tensor([point] * len(prompts), dtype=torch.float64)
            steer = code_sample if method.name == "code" else guided_sample
            chunks.append(steer(self.base_sampler(prompts), generators, weights, **method.options))
        return self.decode(torch.cat(chunks))

    def with_oracle(self, point: tuple[float, ...]) -> torch.Tensor:
        oracle = Blend(self.pipe, {"oracle": self.oracle_for(point)})
        try:
            return self.call(oracle.blend, 1, weights={"oracle": 1.0})
        finally:
            oracle.unload()

    def blend(self) -> Blend:
        if self._blend is None:
            self._blend = Blend(self.pipe, {name: self.basis[name] for name in self.config.rewards})
        return self._blend

    def soup(self, variant: str) -> RewardedSoup:
        if variant not in self._soups:
            self._soups[variant] = RewardedSoup(
                self.pipe, {name: self.basis[name] for name in self.config.rewards}, variant=variant
            )
        return self._soups[variant]

    def named(self, point: tuple[float, ...]) -> dict[str, float]:
        return dict(zip(self.config.rewards, point))

    def decode(self, samples: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def thumbnails(self, images: torch.Tensor, points: int) -> torch.Tensor:
        """The grid's images of each point, [points, k, 3, H, W]: ``GRID_IMAGES`` spread evenly over its images
        (different prompts where there are several)."""
        per_point = len(self.prompts)
        chosen = torch.linspace(0, per_point - 1, min(GRID_IMAGES, per_point)).round().long()
        return images.view(points, per_point, *images.shape[1:])[:, chosen]

    # ----------------------------------------------------------------------------------------------- scoring
    @torch.no_grad()
    def score(self, images: torch.Tensor) -> torch.Tensor:
        """Each reward of each image, [images, rewards] (prompts repeat point after point)."""
        prompts = self.prompts * (len(images) // len(self.prompts))
        return torch.stack([self.rewards[name](images, prompts).double().cpu() for name in self.config.rewards], 1)


class DigitsSetting(PipelineSetting):
    """The embedded digits model: its shipped basis models, oracles and rewards (``--preset digits``)."""

    def __init__(self, config: SweepConfig, device: str | None = None):
        from ..presets import digits
        from ..presets.digits.pipeline import digit_labels
        from ..presets.digits.sampler import base_sampler

        prompts = list(config.prompts or [str(digit) for digit in range(10)])
        for prompt in prompts:
            try:
                digit_labels(prompt)
            except ValueError as error:
                raise ConfigError(f"digits setting: {error}") from error
        require_basis(config.rewards, digits.basis_models())  # before the reward models load
        pipe = digits.load_pipeline(device)
        rewards = {name: get_reward(name, device=device) for name in config.rewards}
        oracles = {oracle_point(name, config.rewards): folder for name, folder in digits.oracles().items()}
        oracles.pop(None, None)

        def sampler(asked: list[str]):
            return base_sampler(
                pipe, asked, rewards, steps=config.steps, guidance_scale=config.guidance_scale, eta=config.eta
            )

        super().__init__(
            config,
            pipe,
            digits.basis_models(),
            oracles,
            rewards,
            prompts,
            sampler,
            {"model": "digits (embedded)", "prompts": prompts},
            digits.basis_alpha(),
        )

    def decode(self, samples: torch.Tensor) -> torch.Tensor:
        from ..presets.digits.pipeline import to_images

        return to_images(samples.float())


class DiffusersSetting(PipelineSetting):
    """A diffusers pipeline with basis LoRAs, MORL oracles and reward models named in the configuration
    (``setting: diffusers``); prompts default to the published Short-DrawBench set."""

    def __init__(self, config: SweepConfig, device: str | None = None):
        from diffusers import DiffusionPipeline, StableDiffusionPipeline

        from ..baselines.stable_diffusion import stable_diffusion_sampler
        from ..rewards import parse_reward
        from .config import DEFAULT_PROMPT_SET, read_prompts

        options = config.options
        require_basis(config.rewards, options["basis"])  # before the pipeline loads
        oracles = {}
        for name, source in options["oracles"].items():
            try:
                point = oracle_point(name, config.rewards)
            except ValueError as error:
                raise ConfigError(f"oracles: {name!r} is not NAME=W,...: {error}") from error
            if point is None:
                raise ConfigError(f"oracles: {name!r} names rewards outside {', '.join(config.rewards)}")
            oracles[point] = source
        try:
            pipe = DiffusionPipeline.from_pretrained(options["base"])
        except (OSError, ValueError) as error:
            raise ConfigError(f"base: cannot load the pipeline {options['base']!r} ({error})") from error
        pipe.set_progress_bar_config(disable=True)
        if device is not None:
            pipe.to(device)
        rewards = {
            name: parse_reward(options["reward_models"].get(name, name), device=device) for name in config.rewards
        }
        prompts = list(config.prompts or read_prompts(DEFAULT_PROMPT_SET))
        size = {key: options[key] for key in ("height", "width") if options[key] is not None}
        self._size = size
        sampler = None
        if isinstance(pipe, StableDiffusionPipeline):

            def sampler(asked: list[str]):
                return stable_diffusion_sampler(
                    pipe,
                    asked,
                    rewards,
                    steps=config.steps,
                    eta=config.eta,
                    guidance_scale=config.guidance_scale,
                    **size,
                )

        super().__init__(
            config,
            pipe,
            options["basis"],
            oracles,
            rewards,
            prompts,
            sampler,
            {"model": options["base"], "prompts": len(prompts)},
            options["alpha"],
        )

    def call(self, function, repeats: int, **options) -> torch.Tensor:
        return super().call(function, repeats, **self._size, **options)

    def decode(self, samples: torch.Tensor) -> torch.Tensor:
        from ..images import decoded

        with torch.no_grad():
            return decoded(self.pipe, samples).float()


def require_basis(rewards: Sequence[str], basis: dict) -> None:
    """Every reward swept needs its basis model."""
    missing = [name for name in rewards if name not in basis]
    if missing:
        raise ConfigError(
            f"the basis has no model for reward(s) {', '.join(missing)}; it has {', '.join(basis) or 'none'}"
        )


def oracle_point(name: str, rewards: Sequence[str]) -> tuple[float, ...] | None:
    """``"bold=0.25,stencil=0.75"`` → (0.25, 0.75) in the rewards' order; None for an oracle of other rewards."""
    from ..named_numbers import parse_named_numbers

    weights = parse_named_numbers(name)
    if set(weights) - set(rewards):
        return None
    return tuple(weights.get(reward, 0.0) for reward in rewards)


def make_setting(config: SweepConfig, out, device: str | None = None):
    """The setting a configuration names; ``out`` holds what it makes once (the lab's learned basis models)."""
    if config.setting == "digits":
        return DigitsSetting(config, device)
    if config.setting == "diffusers":
        return DiffusersSetting(config, device)
    from .lab_setting import LabSetting

    return LabSetting(config, out)
