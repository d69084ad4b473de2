"""The fine-tuner on the lab, where every fine-tuned target is known exactly.

The trained model is the exact base ε* plus a small network (:class:`ResidualDenoiser`); the target of fine-tuning
for the reward r at KL weight α is p_base·exp(r/α), a Gaussian mixture in closed form. So what a method reaches —
each reward's expectation under the fine-tuned sampler — is compared with the exact value, and the fine-tuned
networks can serve as the lab's basis models.
"""

from __future__ import annotations

import contextlib
import math
from typing import Any

import torch
from torch import nn

from ..lab.exact import ExactDenoiser
from ..lab.experiment import make_scheduler, sample
from ..lab.mixture import DTYPE, QuadraticReward, weighted_reward
from ..lab.scenario import Scenario
from .path import StochasticPath


class ResidualDenoiser(nn.Module):
    """ε_θ(x, t) = ε_base(x, t) + √(1 − ᾱ_t) · g_θ(x, t), with ε_base the exact base.

    For the tilt p_t·h_t, h_t(x) = E[exp(r(x₀)/α) | x_t = x], the exact target is g* = −∇log h_t: bounded and smooth
    in score units, where ε-units would vanish at small t. g is an MLP of x and Fourier features of the log
    signal-to-noise ratio; its last layer starts at zero, so the model starts as the base.
    """

    def __init__(self, base: ExactDenoiser, hidden: int = 128, layers: int = 3, frequencies: int = 8):
        super().__init__()
        self.base = base.requires_grad_(False)
        dim = base.means.shape[1]
        self.register_buffer("frequencies", torch.arange(1, frequencies + 1, dtype=torch.float32) * math.pi / 12)
        sizes = [dim + 2 * frequencies, *[hidden] * layers]
        blocks: list[nn.Module] = []
        for inputs, outputs in zip(sizes, sizes[1:]):
            blocks += [nn.Linear(inputs, outputs), nn.SiLU()]
        self.net = nn.Sequential(*blocks, nn.Linear(hidden, dim))
        nn.init.zeros_(self.net[-1].weight)
        nn.init.zeros_(self.net[-1].bias)

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor | float) -> torch.Tensor:
        alpha_bars = self._alpha_bars(sample, timestep)
        return self.base(sample, timestep) + ((1 - alpha_bars) ** 0.5)[:, None] * self.correction(sample, alpha_bars)

    def correction(self, sample: torch.Tensor, alpha_bars: torch.Tensor) -> torch.Tensor:
        log_snr = torch.log(alpha_bars / (1 - alpha_bars)).float()[:, None]
        angles = log_snr * self.frequencies
        features = torch.cat([sample.float(), angles.sin(), angles.cos()], dim=1)
        return self.net(features).to(sample.dtype)

    def _alpha_bars(self, sample: torch.Tensor, timestep: torch.Tensor | float) -> torch.Tensor:
        timesteps = torch.as_tensor(timestep).reshape(-1)
        values, inverse = timesteps.unique(return_inverse=True)
        levels = torch.tensor([self.base.alpha_bar(value) for value in values], dtype=sample.dtype)[inverse]
        return levels.expand(len(sample)).to(sample.device) if len(levels) == 1 else levels.to(sample.device)


class LabTarget:
    """The lab as a fine-tuning :class:`~diffusion_blend.finetune.target.Target`: samples are points of R^d, the
    reward is the scenario's weighted quadratic reward, the path a DDPM sampler on the scenario's schedule."""

    differentiable = True

    def __init__(
        self,
        scenario: Scenario,
        weights: dict[str, float],
        *,
        steps: int = 100,
        hidden: int = 128,
        layers: int = 3,
        seed: int = 0,
    ):
        self.scenario = scenario
        self.reward_function: QuadraticReward = weighted_reward(scenario.rewards, weights)
        scheduler = make_scheduler(scenario.schedule, "ddpm")
        self.alphas_cumprod = scheduler.alphas_cumprod.to(DTYPE)
        self.path = StochasticPath.from_scheduler(scheduler, steps)
        base = ExactDenoiser(scenario.base, scheduler.alphas_cumprod)
        torch.manual_seed(seed)
        self.model = ResidualDenoiser(base, hidden, layers)

    def parameters(self) -> list[nn.Parameter]:
        return list(self.model.net.parameters())

    def conditions(self, count: int, generator: torch.Generator) -> None:
        return None

    def initial_noise(self, count: int, generator: torch.Generator) -> torch.Tensor:
        return torch.randn(count, self.scenario.base.dim, generator=generator, dtype=DTYPE)

    def predict(
        self, x: torch.Tensor, timestep, conditions: Any = None, *, base: bool = False, guided: bool = True
    ) -> torch.Tensor:
        return self.model.base(x, timestep) if base else self.model(x, timestep)

    def base_context(self) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()  # the base is a module of its own

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        alpha_bars = self.alphas_cumprod[timesteps][:, None]
        return alpha_bars.sqrt() * x0 + (1 - alpha_bars).sqrt() * noise

    def regression_target(self, x0: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        return noise

    def reward(self, x0: torch.Tensor, conditions: Any = None) -> torch.Tensor:
        return self.reward_function(x0)

    @property
    def train_timesteps(self) -> int:
        return len(self.alphas_cumprod)


def exact_expectations(scenario: Scenario, weights: dict[str, float]) -> dict[str, float]:
    """Each reward's expectation under the exact fine-tuned target p_base·exp(Σ w_i r_i / α)."""
    target = scenario.base.tilted(weighted_reward(scenario.rewards, weights), scenario.alpha)
    return {name: target.expected(reward) for name, reward in scenario.rewards.items()}


@torch.no_grad()
def achieved_expectations(
    model: nn.Module, scenario: Scenario, *, samples: int = 20_000, steps: int = 200, seed: int = 0
) -> dict[str, float]:
    """Each reward's mean over ``samples`` drawn from N(0, I) with ``model`` and the lab's DDIM sampler (η = 0,
    200 steps: a different sampler from the training path, as a user's would be)."""
    scheduler = make_scheduler(scenario.schedule, "ddim")
    start = torch.randn(samples, scenario.base.dim, generator=torch.Generator().manual_seed(seed), dtype=DTYPE)
    x, _ = sample(model, scheduler, start, steps, seed=seed)
    return {name: float(reward(x).mean()) for name, reward in scenario.rewards.items()}


#: Per method: (updates, learning rate, sampling-path steps, options) that reach the exact targets of the default
#: scenario within a few minutes on two CPU cores (docs/finetune.md has what each reaches). weighted-dsm samples its
#: training set along the path, so it takes DDPM's full chain: with 100 steps the base's own samples already weigh
#: E[x₁] 1.8% short at α = 1 (discretisation).
LAB_DEFAULTS: dict[str, tuple[int, float, int, dict]] = {
    "adjoint-matching": (200, 1e-3, 100, {"batch_size": 256, "regressed_steps": 20}),
    "policy-gradient": (400, 3e-4, 100, {"batch_size": 256, "regressed_steps": 20, "updates_per_rollout": 4}),
    "weighted-dsm": (3000, 1e-3, 1000, {"batch_size": 512, "round_samples": 20_000, "round_updates": 1000}),
}
WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "lab_model.json"


def lab_finetune(
    scenario: Scenario,
    weights: dict[str, float],
    *,
    method: str | None = None,
    steps: int | None = None,
    lr: float | None = None,
    seed: int = 0,
    options: dict | None = None,
    out=None,
    checkpoint_every: int = 50,
    resume: bool = False,
    overwrite: bool = False,
    path_steps: int | None = None,
    samples: int = 20_000,
    progress: bool = False,
) -> dict:
    """Fine-tune the lab's residual network for Σ w_i r_i at the scenario's α; return
    ``{"alpha", "reward", "method", "exact", "achieved", "seconds", ...}`` (``achieved``: each reward's mean over
    ``samples`` of the fine-tuned model, sampled from N(0, I) with 200 DDIM steps). With ``out`` the network is saved
    there (:func:`load_lab_model` reads it back) with ``finetune.json``."""
    import time

    from ..blend import validate_weights
    from .trainer import DEFAULT_METHOD, Settings, train

    method = method or DEFAULT_METHOD
    if method not in LAB_DEFAULTS:
        raise ValueError(f"unknown method {method!r}; choose one of {', '.join(LAB_DEFAULTS)}")
    unknown = sorted(set(weights) - set(scenario.rewards))
    if unknown:
        raise ValueError(
            f"unknown reward(s) {', '.join(map(repr, unknown))}; the scenario has {', '.join(scenario.rewards)}"
        )
    weights = validate_weights(weights, scenario.rewards)
    default_steps, default_lr, default_path_steps, default_options = LAB_DEFAULTS[method]
    settings = Settings(
        method=method,
        alpha=scenario.alpha,
        steps=steps or default_steps,
        lr=lr or default_lr,
        seed=seed,
        options={**default_options, **(options or {})},
        checkpoint_every=checkpoint_every,
    )
    settings.check()
    target = LabTarget(scenario, weights, steps=path_steps or default_path_steps, seed=seed)
    began = time.perf_counter()
    record = train(
        target,
        settings,
        out,
        resume=resume,
        overwrite=overwrite,
        progress=progress,
        describe={"scenario": scenario.name, "reward": weights},
        outputs=lambda folder: _model_files(target, folder),
    )
    achieved = achieved_expectations(target.model, scenario, samples=samples, seed=seed)
    return {
        "alpha": scenario.alpha,
        "reward": weights,
        "method": method,
        "exact": exact_expectations(scenario, weights),
        "achieved": achieved,
        "seconds": time.perf_counter() - began,
        "training_seconds": record["seconds"],
        "steps": settings.steps,
        "lr": settings.lr,
        "seed": seed,
        "options": settings.options,
        "kl": record["evaluation"]["kl"],
        "exact_kl": exact_kl(scenario, weights),
    }


def exact_kl(scenario: Scenario, weights: dict[str, float]) -> float:
    """KL(p* ‖ p_base) = E*[r]/α − log E_base[exp(r/α)] for p* ∝ p_base·exp(r/α): the least path KL that reaches p*
    (the path KL of the optimal fine-tuned sampler equals it where the path is memoryless)."""
    reward = weighted_reward(scenario.rewards, weights)
    target = scenario.base.tilted(reward, scenario.alpha)
    log_normaliser = _log_normaliser(scenario, reward)
    return target.expected(reward) / scenario.alpha - log_normaliser


def _log_normaliser(scenario: Scenario, reward: QuadraticReward) -> float:
    """log E_base[exp(r/α)], component by component (the π'_k normalisers of :meth:`GaussianMixture.tilted`)."""
    base, alpha = scenario.base, scenario.alpha
    precisions = torch.linalg.inv(base.covs)
    covs = torch.linalg.inv(precisions + reward.A / alpha)
    shifts = (precisions @ base.means[..., None])[..., 0] + reward.b / alpha
    means = (covs @ shifts[..., None])[..., 0]
    per_component = (
        0.5 * (torch.logdet(covs) - torch.logdet(base.covs))
        + 0.5 * torch.einsum("ki,ki->k", means, shifts)
        - 0.5 * torch.einsum("ki,kij,kj->k", base.means, precisions, base.means)
    )
    return float(torch.logsumexp(torch.log(base.weights) + per_component, 0))


def _model_files(target: LabTarget, folder) -> dict:
    import json

    import safetensors.torch

    linear = [module for module in target.model.net if isinstance(module, nn.Linear)]
    config = {
        "hidden": linear[0].out_features,
        "layers": len(linear) - 1,
        "frequencies": len(target.model.frequencies),
        "scenario": target.scenario.name,
    }
    state = {key: value.detach().contiguous() for key, value in target.model.net.state_dict().items()}
    return {
        folder / WEIGHTS_FILE: lambda temp: safetensors.torch.save_file(state, temp),
        folder / CONFIG_FILE: lambda temp: temp.write_text(json.dumps(config, indent=2) + "\n"),
    }


def load_lab_model(folder, scenario: Scenario) -> ResidualDenoiser:
    """A fine-tuned lab network saved by :func:`lab_finetune`, on ``scenario``'s exact base: a denoiser the lab's
    samplers and ``BlendedDenoiser`` take as a basis model."""
    import json
    from pathlib import Path

    import safetensors.torch

    folder = Path(folder)
    try:
        config = json.loads((folder / CONFIG_FILE).read_text())
        state = safetensors.torch.load_file(folder / WEIGHTS_FILE)
    except (OSError, ValueError) as error:
        raise ValueError(f"lab model: cannot read {folder} ({error})") from error
    scheduler = make_scheduler(scenario.schedule, "ddpm")
    model = ResidualDenoiser(
        ExactDenoiser(scenario.base, scheduler.alphas_cumprod),
        config["hidden"],
        config["layers"],
        config["frequencies"],
    )
    try:
        model.net.load_state_dict(state)
    except RuntimeError as error:
        raise ValueError(f"lab model: {folder} does not fit the scenario {scenario.name!r} ({error})") from error
    return model
