"""Lab runs: sample every method with real diffusers schedulers and measure it against the exact target.

Methods (all through the product's code path, ``BlendedDenoiser``, with exact denoisers as members):

- ``oracle``: the exact ε* of the model fine-tuned for λ·Σ w_i r_i at KL weight α (the "MORL oracle"),
- ``db-mpa`` (λ = 1, Σw = 1), ``db-kla`` (one reward, λ ≠ 1) or ``joint`` (otherwise): the blend, mode "mix",
- ``db-mpa-ls``: the stochastic blend (weights on the simplex),
- ``base``: the base model.

Metrics: each reward's expectation (sampled, against the exact value under the oracle target), the sliced
Wasserstein-2 distance to exact samples of that target (with its sampling-noise floor: the distance between two
exact sample sets of the same size), and the Jensen gap Δ(x, t) = ε*_oracle(x, t) − ε_blend(x, t) measured along the
blended trajectories: mean ‖Δ‖² per step and over all steps.
"""

from __future__ import annotations

import contextlib
import inspect
import time
from collections.abc import Iterable

import torch

from .. import BlendedDenoiser, base_coefficient, validate_kl_scale, validate_weights
from ..schedulers import scheduler_class
from .exact import ExactDenoiser
from .mixture import DTYPE, weighted_reward
from .scenario import Scenario, Schedule

METHOD_KINDS = ("oracle", "base", "blend", "stochastic")
#: The schedulers a lab run may use (short names of the shared table in ``schedulers.py``)
LAB_SCHEDULERS = ("ddim", "ddpm", "euler", "dpm")


def make_scheduler(schedule: Schedule, name: str = "ddim"):
    """A diffusers scheduler on the scenario's β schedule, ε-prediction, with sample clipping off (the samples are
    not images: clipping to [−1, 1] would destroy modes at ±2) and, for DDIM/DDPM, "trailing" timestep spacing:
    the default "leading" spacing starts 400 steps at t = 798, where the data still shows through the noise that
    the sampler starts from, and biases every method."""
    if name not in LAB_SCHEDULERS:
        raise ValueError(f"scheduler must be one of {', '.join(LAB_SCHEDULERS)}, got {name!r}")
    config = dict(
        num_train_timesteps=schedule.train_steps,
        beta_start=schedule.beta_start,
        beta_end=schedule.beta_end,
        beta_schedule="linear",
        prediction_type="epsilon",
    )
    if name in ("ddim", "ddpm"):
        config.update(clip_sample=False, timestep_spacing="trailing")
    return scheduler_class(name)(**config)


@torch.no_grad()
def sample(
    denoiser, scheduler, start: torch.Tensor, steps: int, *, eta: float = 0.0, seed: int = 0, reference=None
) -> tuple[torch.Tensor, list[float]]:
    """Run ``scheduler`` with ``denoiser`` from ``start`` (x_T, in the scheduler's own scale); with a ``reference``
    denoiser, also return the mean ‖ε_reference − ε_denoiser‖² at every step (the Jensen gap along these
    trajectories). ``seed`` drives the scheduler's own noise (DDIM with η > 0, DDPM, ...)."""
    generator = torch.Generator().manual_seed(seed)
    scheduler.set_timesteps(steps)
    accepted = inspect.signature(scheduler.step).parameters
    step_kwargs = {key: value for key, value in (("eta", eta), ("generator", generator)) if key in accepted}
    x, gaps = start, []
    for t in scheduler.timesteps:
        model_input = scheduler.scale_model_input(x, t)
        prediction = denoiser(model_input, t)
        if reference is not None:
            gaps.append(float(((reference(model_input, t) - prediction) ** 2).sum(1).mean()))
        x = scheduler.step(prediction, t, x, **step_kwargs).prev_sample
    return x, gaps


def initial_noise(scheduler, steps: int, n: int, target, prior: str, seed: int) -> torch.Tensor:
    """x_T for every method: the exact law of the oracle target at the first timestep (``prior="exact"``), or
    N(0, I) (``"gaussian"``, what a deployed sampler uses), in the scheduler's scale.

    With diffusers' linear schedule ᾱ_T ≈ 4·10⁻⁵ is not 0: the data still shows through (mean ≈ 0.011 in the default
    scenario), and starting from N(0, I) biases every expectation by about −0.013 there — the same for every
    method, but it would blur the comparison with the exact target that the lab is for.
    """
    generator = torch.Generator().manual_seed(seed)
    scheduler.set_timesteps(steps)
    if prior == "gaussian":
        start = torch.randn(n, target.dim, generator=generator, dtype=DTYPE)
    elif prior == "exact":
        alpha_bar = ExactDenoiser(target, scheduler.alphas_cumprod).alpha_bar(scheduler.timesteps[0])
        start = target.diffused(alpha_bar).sample(n, generator)
    else:
        raise ValueError(f"prior must be 'exact' or 'gaussian', got {prior!r}")
    return start * scheduler.init_noise_sigma


def sliced_wasserstein(x: torch.Tensor, y: torch.Tensor, projections: int = 128, seed: int = 0) -> float:
    """Sliced Wasserstein-2 distance between two equally sized sample sets (random unit directions)."""
    if x.shape != y.shape:
        raise ValueError(f"sample sets must have equal shapes, got {tuple(x.shape)} and {tuple(y.shape)}")
    directions = torch.randn(x.shape[1], projections, generator=torch.Generator().manual_seed(seed), dtype=DTYPE)
    directions = directions / directions.norm(dim=0, keepdim=True)
    projected_x = torch.sort(x.to(DTYPE) @ directions, dim=0).values
    projected_y = torch.sort(y.to(DTYPE) @ directions, dim=0).values
    return float(((projected_x - projected_y) ** 2).mean().sqrt())


def blend_method_name(weights: dict[str, float], kl_scale: float) -> str:
    """DB-MPA where λ = 1 and the base drops out of the formula (Σw = 1), DB-KLA for a single reward, the joint
    blend otherwise."""
    if kl_scale == 1 and base_coefficient(weights.values(), kl_scale) == 0:
        return "db-mpa"
    if sum(1 for weight in weights.values() if weight != 0) == 1:
        return "db-kla"
    return "joint"


def on_simplex(weights: dict[str, float]) -> bool:
    """Whether the stochastic mode accepts these weights."""
    try:
        validate_weights(weights, weights, simplex=True)
    except ValueError:
        return False
    return True


#: |λ·w_i / α| above this tilts the scenario's base into targets far narrower than any sampler step resolves (and,
#: further, past float64's closed forms): the lab's numbers would mean nothing
MAX_TILT = 1e4


def check_tilt(weights: dict[str, float], kl_scale: float, alpha: float) -> None:
    """Refuse weights, λ and α whose tilt λ·w_i/α leaves the range where the lab's exact targets mean something."""
    strengths = {name: kl_scale * weight / alpha for name, weight in weights.items()}
    beyond = [f"{name}: {value:.3g}" for name, value in strengths.items() if not abs(value) <= MAX_TILT]
    if beyond:
        raise ValueError(
            f"kl_scale·w/α ({', '.join(beyond)}; kl_scale = {kl_scale:g}, α = {alpha:g}) is beyond ±{MAX_TILT:g}: "
            "the exact targets are then narrower than any sampler resolves; use smaller weights or a larger α"
        )


def run_lab(
    scenario: Scenario,
    weights: dict[str, float],
    kl_scale: float = 1.0,
    *,
    samples: int = 20_000,
    steps: int = 200,
    eta: float = 0.0,
    seed: int = 0,
    scheduler: str = "ddim",
    prior: str = "exact",
    methods: Iterable[str] = METHOD_KINDS,
    smc=None,
) -> dict:
    """Sample the methods for one blend and measure them against the exact target; returns the report dict.

    ``methods`` picks among ``oracle``, ``base``, ``blend`` (the mix mode, reported as db-mpa, db-kla or joint) and
    ``stochastic`` (db-mpa-ls, only for weights on the simplex). The Jensen gap needs ``blend``. Every method starts
    from the same x_T (see :func:`initial_noise` for ``prior``). With ``smc`` (a :class:`~diffusion_blend.smc.SMC`)
    the method ``db-smc`` is the blend corrected by sequential Monte Carlo, ``smc.particles`` per sample, with its
    cost in ``report["smc"]``.
    """
    methods = tuple(methods)
    unknown = set(methods) - set(METHOD_KINDS)
    if unknown or "blend" not in methods:
        raise ValueError(f"methods must include 'blend' and come from {', '.join(METHOD_KINDS)}; got {methods}")
    weights = validate_weights(weights, scenario.rewards)
    kl_scale = validate_kl_scale(kl_scale)
    check_tilt(weights, kl_scale, scenario.alpha)
    for option, value in (("samples", samples), ("steps", steps)):
        if not isinstance(value, int) or value < 2:
            raise ValueError(f"{option} must be an integer >= 2, got {value!r}")
    if not 0 <= eta <= 1:
        raise ValueError(f"eta must lie in [0, 1], got {eta}")
    if scheduler in ("ddim", "ddpm") and scenario.schedule.train_steps % steps:
        raise ValueError(
            f"{scheduler} moves {scenario.schedule.train_steps} // steps timesteps per step, so steps must divide "
            f"{scenario.schedule.train_steps} (e.g. 50, 100, 200, 250, 500); got {steps}"
        )
    alpha_bars = make_scheduler(scenario.schedule, scheduler).alphas_cumprod
    target = scenario.base.tilted(weighted_reward(scenario.rewards, weights).scaled(kl_scale), scenario.alpha)
    oracle = ExactDenoiser(target, alpha_bars)
    base = ExactDenoiser(scenario.base, alpha_bars)
    basis = {
        name: ExactDenoiser(scenario.base.tilted(reward, scenario.alpha), alpha_bars)
        for name, reward in scenario.rewards.items()
    }

    denoisers = {name: model for name, model in (("oracle", oracle), ("base", base)) if name in methods}
    blended = BlendedDenoiser(base, basis)
    blended.set_blend(weights, kl_scale=kl_scale)
    blend_name = blend_method_name(weights, kl_scale)
    denoisers[blend_name] = blended
    if "stochastic" in methods and on_simplex(weights):
        stochastic = BlendedDenoiser(base, basis)
        stochastic.set_blend(
            weights, kl_scale=kl_scale, mode="stochastic", generator=torch.Generator().manual_seed(seed + 1)
        )
        denoisers["db-mpa-ls"] = stochastic

    start = initial_noise(make_scheduler(scenario.schedule, scheduler), steps, samples, target, prior, seed)
    exact_samples = target.sample(samples, torch.Generator().manual_seed(seed + 2))
    floor = sliced_wasserstein(exact_samples, target.sample(samples, torch.Generator().manual_seed(seed + 3)))
    report = {
        "scenario": scenario.name,
        "alpha": scenario.alpha,
        "weights": weights,
        "kl_scale": kl_scale,
        "samples": samples,
        "steps": steps,
        "eta": eta,
        "scheduler": scheduler,
        "prior": prior,
        "seed": seed,
        "exact": {name: target.expected(reward) for name, reward in scenario.rewards.items()},
        "methods": {},
        "distance_floor": floor,
    }
    if smc is not None:
        path = smc_path(scenario, scheduler, steps, eta)
    timings, rows = {}, {}
    for name, denoiser in denoisers.items():
        began = time.perf_counter()
        with counted_rows([base, *basis.values()]) as evaluated:
            x, gaps = sample(
                denoiser,
                make_scheduler(scenario.schedule, scheduler),
                start,
                steps,
                eta=eta,
                seed=seed + 4,
                reference=oracle if name == blend_name else None,
            )
        timings[name], rows[name] = time.perf_counter() - began, evaluated[0]
        report["methods"][name] = measured(x, scenario, exact_samples)
        if name == blend_name:
            report["jensen_gap"] = {"method": name, "mean_sq": sum(gaps) / len(gaps), "per_step": gaps}
    if smc is not None:
        from ..smc import smc_sample

        def both(x, timestep):
            return blended(x, timestep), base(x, timestep)

        def rewards(x0):
            return torch.stack([reward(x0) for reward in weighted.values()], 1)

        weighted = {name: scenario.rewards[name] for name in weights}
        began = time.perf_counter()
        with counted_rows([base, *basis.values()]) as evaluated:
            x, trace = smc_sample(
                path,
                both,
                rewards,
                torch.tensor(list(weights.values()), dtype=DTYPE),
                alpha=scenario.alpha,
                kl_scale=kl_scale,
                start=start,
                options=smc,
                generator=torch.Generator().manual_seed(seed + 5),
            )
        seconds = time.perf_counter() - began
        report["methods"]["db-smc"] = measured(x, scenario, exact_samples)
        report["smc"] = {
            "particles": smc.particles,
            "ess_threshold": smc.ess_threshold,
            "denoiser_rows_per_sample": evaluated[0] / samples,
            "blend_denoiser_rows_per_sample": rows[blend_name] / samples,
            "time_ratio_to_blend": seconds / timings[blend_name],
            "resampling_steps": len(trace.resampled),
            "min_ess": min(trace.ess),
            "log_normaliser": float(trace.log_normaliser.mean()),
        }
    return report


@contextlib.contextmanager
def counted_rows(modules):
    """Counts the rows the ``modules`` evaluate inside the block (yields a one-element list holding the count)."""
    count = [0]

    def hook(module, args):
        count[0] += len(args[0])

    handles = [module.register_forward_pre_hook(hook) for module in modules]
    try:
        yield count
    finally:
        for handle in handles:
            handle.remove()


def measured(x: torch.Tensor, scenario: Scenario, exact_samples: torch.Tensor) -> dict:
    return {
        **{name: float(reward(x).mean()) for name, reward in scenario.rewards.items()},
        "distance": sliced_wasserstein(x, exact_samples),
    }


def smc_path(scenario: Scenario, scheduler: str, steps: int, eta: float):
    """The Gaussian steps SMC reweights: DDPM, or DDIM with η > 0; raise for any other sampler."""
    from ..finetune.path import StochasticPath

    if scheduler not in ("ddim", "ddpm"):
        raise ValueError(f"SMC needs a sampler with Gaussian steps (ddim with eta > 0, or ddpm), got {scheduler!r}")
    path = StochasticPath.from_scheduler(make_scheduler(scenario.schedule, scheduler), steps, eta)
    if not path.stochastic:
        raise ValueError("SMC reweights Gaussian steps: with ddim, set eta > 0 (1 is DDPM's posterior)")
    return path
