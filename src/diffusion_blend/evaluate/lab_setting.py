"""The lab as a sweep setting: every method on the Gaussian-mixture scenario, against its exact front.

Samples are points of R^d and every method runs on the same per-sample noise along one DDIM (η) path: the base and
the MORL oracle are exact denoisers (the oracle of *any* mix exists in closed form), the blend's basis models are
exact (``basis: exact``) or the fine-tuner's networks (``basis: learned``, fine-tuned into ``out/basis/`` once and
reused), and the soup — which needs parameters to interpolate — takes the learned ones. The exact front is each
reward's expectation under p_base·exp(Σ w_i r_i / α), for every point of the grid.
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch

from .. import BlendedDenoiser
from ..baselines import BaseSampler, code_sample, guided_sample
from ..baselines.soup import interpolate_parameters
from ..finetune.path import StochasticPath
from ..lab.exact import ExactDenoiser
from ..lab.experiment import make_scheduler, sliced_wasserstein
from ..lab.mixture import DTYPE, weighted_reward
from ..lab.scenario import Scenario, default_scenario, load_scenario
from ..smc import SMC, smc_sample
from .config import ConfigError, Method, SweepConfig
from .settings import SEED_STRIDE, Counter

#: pixels a side of the density picture of one point's samples in the grid
DENSITY_PIXELS = 48
#: the square the density pictures show, [−EXTENT, EXTENT]² (the default scenario's modes are at ±2)
EXTENT = 4.0
#: seeds the exact target's samples that distances are measured to
TARGET_SEED = 10_000


class LabSetting:
    """The lab's scenario with exact or learned basis models (``--preset lab``)."""

    def __init__(self, config: SweepConfig, out: Path):
        self.config = config
        scenario = config.options["scenario"]
        self.scenario: Scenario = load_scenario(scenario) if scenario else default_scenario()
        unknown = [name for name in config.rewards if name not in self.scenario.rewards]
        if unknown:
            raise ConfigError(
                f"the lab scenario has no reward(s) {', '.join(unknown)}; it has {', '.join(self.scenario.rewards)}"
            )
        for method in config.methods:
            if method.name.startswith("soup") and config.options["basis"] != "learned":
                raise ConfigError(
                    "a soup interpolates parameters: the lab's exact basis models have none (set basis: learned)"
                )
            if method.name == "soup-published":
                raise ConfigError("soup-published averages LoRA A and B matrices; the lab's networks are full models")
        self.scheduler = make_scheduler(self.scenario.schedule, "ddim")
        if self.scenario.schedule.train_steps % config.steps:
            raise ConfigError(
                f"steps must divide the lab's {self.scenario.schedule.train_steps} timesteps, got {config.steps}"
            )
        self.path = StochasticPath.from_scheduler(self.scheduler, config.steps, config.eta)
        alphas = self.scheduler.alphas_cumprod
        self.counter = Counter()
        self.base = self.counted(ExactDenoiser(self.scenario.base, alphas))
        count = config.images_per_prompt * len(config.seeds)
        self.prompts = [""] * count
        self.seeds = [seed * SEED_STRIDE + index for seed in config.seeds for index in range(config.images_per_prompt)]
        self.description = {
            "model": f"lab ({self.scenario.name}, α = {self.scenario.alpha:g})",
            "basis": config.options["basis"],
        }
        self.out = out
        self._basis: dict[str, torch.nn.Module] | None = None

    # ------------------------------------------------------------------------------------------------ models
    def basis(self) -> dict[str, torch.nn.Module]:
        """One basis model per reward: exact, or learned once into ``out/basis/NAME`` and read back after."""
        if self._basis is None:
            if self.config.options["basis"] == "exact":
                self._basis = {
                    name: ExactDenoiser(
                        self.scenario.base.tilted(self.scenario.rewards[name], self.scenario.alpha),
                        self.scheduler.alphas_cumprod,
                    )
                    for name in self.config.rewards
                }
            else:
                self._basis = {name: self.learned(name) for name in self.config.rewards}
            for module in self._basis.values():
                self.counted(module)
        return self._basis

    def learned(self, name: str) -> torch.nn.Module:
        from ..finetune.lab import WEIGHTS_FILE, lab_finetune, load_lab_model

        folder = self.out / "basis" / name
        if not (folder / WEIGHTS_FILE).is_file():
            lab_finetune(
                self.scenario,
                {name: 1.0},
                steps=self.config.options["basis_steps"],
                out=folder,
                resume=True,
                samples=2_000,
            )
        return load_lab_model(folder, self.scenario)

    def blend_base(self) -> torch.nn.Module:
        """The base as the blend takes it: a module of the basis models' class (learned: their common initial
        network, whose zero last layer makes it the exact base, prediction for prediction)."""
        return self.base if self.config.options["basis"] == "exact" else self.counted(self.initial_network())

    def initial_network(self) -> torch.nn.Module:
        """The fine-tuner's initialisation of the learned basis models (seed 0), θ_base of the soup."""
        first = next(iter(self.basis().values()))
        with torch.random.fork_rng():
            torch.manual_seed(0)
            return type(first)(first.base, *network_shape(first))

    def target(self, point: tuple[float, ...]):
        """The exact target of ``point``: p_base·exp(Σ w_i r_i / α), a Gaussian mixture in closed form."""
        return self.scenario.base.tilted(weighted_reward(self.scenario.rewards, self.named(point)), self.scenario.alpha)

    def oracle(self, point: tuple[float, ...]) -> ExactDenoiser:
        return self.counted(ExactDenoiser(self.target(point), self.scheduler.alphas_cumprod))

    def counted(self, module: torch.nn.Module) -> torch.nn.Module:
        """``module`` with its forward calls counted (the blend's members are counted one by one)."""
        module.register_forward_pre_hook(self.counter, with_kwargs=True)
        return module

    def oracle_points(self) -> tuple[tuple[float, ...], ...]:
        return self.config.weights  # the exact oracle exists at every point

    def exact(self, point: tuple[float, ...]) -> dict[str, float]:
        """Each reward's expectation under the exact target of ``point``: the front every method is measured on."""
        target = self.target(point)
        return {name: target.expected(self.scenario.rewards[name]) for name in self.config.rewards}

    def target_samples(self, point: tuple[float, ...], copy_index: int = 0) -> torch.Tensor:
        """Exact samples of ``point``'s target, as many as each method draws at a point."""
        return self.target(point).sample(len(self.seeds), torch.Generator().manual_seed(TARGET_SEED + copy_index))

    def metrics(self, samples: torch.Tensor, points) -> list[dict[str, float]]:
        """Per point, the sliced Wasserstein-2 distance of its samples to exact samples of its target (the reward
        alone cannot tell a method that reaches the target from one that overshoots it)."""
        chunks = samples.view(len(points), -1, samples.shape[-1])
        return [
            {"distance_to_target": sliced_wasserstein(chunk, self.target_samples(point))}
            for chunk, point in zip(chunks, points)
        ]

    def distance_floor(self, point: tuple[float, ...]) -> float:
        """The distance between two exact sample sets of that size: what sampling noise alone gives."""
        return sliced_wasserstein(self.target_samples(point, 1), self.target_samples(point))

    def named(self, point: tuple[float, ...]) -> dict[str, float]:
        return dict(zip(self.config.rewards, point))

    # ---------------------------------------------------------------------------------------------- sampling
    def sampler(self, denoiser) -> BaseSampler:
        def predict(x, timestep, rows):
            return denoiser(x, timestep)

        def rewards(x0, rows):
            return torch.stack([self.scenario.rewards[name](x0) for name in self.config.rewards], 1)

        return BaseSampler(
            self.path, predict, rewards, [True] * len(self.config.rewards), (self.scenario.base.dim,), "cpu", DTYPE
        )

    def images(self, method: Method, points, kl_scale: float = 1.0) -> torch.Tensor:
        """The samples of ``method`` at each point, [points · samples, d], point after point."""
        return torch.cat([self.samples(method, point, kl_scale) for point in points])

    def samples(self, method: Method, point: tuple[float, ...], kl_scale: float) -> torch.Tensor:
        generators = [torch.Generator().manual_seed(seed) for seed in self.seeds]
        name = method.name
        if name == "db-smc":
            return self.corrected(method, point, kl_scale, generators)
        if name in ("code", "guidance"):
            weights = torch.tensor([point] * len(self.seeds), dtype=torch.float64)
            steer = code_sample if name == "code" else guided_sample
            return steer(self.sampler(self.base), generators, weights, **method.options)
        return self.sampler(self.denoiser(method, point, kl_scale)).sample(generators)

    def corrected(self, method: Method, point: tuple[float, ...], kl_scale: float, generators) -> torch.Tensor:
        """DB-MPA + SMC towards the exact target of ``point``, from the same starting noise as the other methods."""
        blended = self.denoiser(Method("db-mpa"), point, kl_scale)

        def predict(x, timestep):
            return blended(x, timestep), self.base(x, timestep)

        def rewards(x0):
            return torch.stack([self.scenario.rewards[name](x0) for name in self.config.rewards], 1)

        samples, _ = smc_sample(
            self.path,
            predict,
            rewards,
            torch.tensor(point, dtype=torch.float64),
            alpha=self.scenario.alpha,
            kl_scale=kl_scale,
            start=self.sampler(self.base).initial(generators),
            generator=generators,
            options=SMC(**method.options),
        )
        return samples

    def denoiser(self, method: Method, point: tuple[float, ...], kl_scale: float):
        name = method.name
        if name == "base":
            return self.base
        if name == "oracle":
            return self.oracle(point)
        if name in ("db-mpa", "db-mpa-ls", "joint"):
            blended = BlendedDenoiser(self.blend_base(), self.basis())
            blended.set_blend(
                self.named(point),
                kl_scale=kl_scale,
                mode="stochastic" if name == "db-mpa-ls" else "mix",
                generator=torch.Generator().manual_seed(self.config.seeds[0] + 1),
            )
            return blended
        if name == "soup":
            members = self.basis()
            soup = interpolate_parameters(
                copy.deepcopy(next(iter(members.values()))), self.initial_network(), members, self.named(point)
            )
            soup._forward_pre_hooks.clear()  # the copy's counter is a copy too
            return self.counted(soup)
        raise ValueError(f"unknown method {name!r}")

    # ----------------------------------------------------------------------------------------------- scoring
    @torch.no_grad()
    def score(self, samples: torch.Tensor) -> torch.Tensor:
        return torch.stack([self.scenario.rewards[name](samples).double() for name in self.config.rewards], 1)

    def thumbnails(self, samples: torch.Tensor, points: int) -> torch.Tensor:
        """Each point's samples as a density picture (darker: denser), [points, 1, 3, P, P]."""
        pictures = []
        for chunk in samples.view(points, -1, samples.shape[-1]):
            histogram = torch.histogramdd(
                chunk[:, :2].float().flip(1) * torch.tensor([-1.0, 1.0]),
                bins=[DENSITY_PIXELS] * 2,
                range=[-EXTENT, EXTENT] * 2,
            ).hist
            picture = 1 - (histogram / histogram.max().clamp_min(1)).sqrt()
            pictures.append(picture.expand(3, -1, -1)[None])
        return torch.stack(pictures)


def network_shape(model) -> tuple[int, int, int]:
    linear = [module for module in model.net if isinstance(module, torch.nn.Linear)]
    return linear[0].out_features, len(linear) - 1, len(model.frequencies)
