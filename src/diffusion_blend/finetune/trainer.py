"""The training loop around a method: optimizer, processes, checkpoints, metrics and the run's outputs.

One run is ``steps`` optimizer updates of the method's loss. It runs as a plain process or, unchanged, under
``accelerate launch`` (data parallel: each process draws its own rollouts, gradients are averaged before every
update, so every process holds the same weights; only the first writes). Every ``checkpoint_every`` updates the
whole state — trainable weights, optimizer, learning-rate schedule, every process's RNG and the method's buffers —
is checkpointed, so a killed run resumed with ``resume=True`` ends bit-identical to an uninterrupted one.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import shutil
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

from ..files import write_atomically
from . import checkpoint as checkpoints
from .adjoint_matching import AdjointMatching
from .method import Collective, Method
from .policy_gradient import PolicyGradient
from .target import Target, rollout
from .weighted_dsm import WeightedDsm

METHODS: dict[str, type[Method]] = {cls.name: cls for cls in (WeightedDsm, AdjointMatching, PolicyGradient)}
#: the one accurate on every cell of the lab validation (docs/finetune.md)
DEFAULT_METHOD = WeightedDsm.name
METRICS = "metrics.jsonl"
RECORD = "finetune.json"
#: what a run folder holds: another run's files make it refuse the folder unless resumed or overwritten
RUN_FILES = (RECORD, METRICS, checkpoints.CHECKPOINTS)
#: seeds of the processes after the first are drawn apart by this stride
RANK_SEED_STRIDE = 1_000_003
#: accelerate's trackers and the packages each needs
TRACKERS = {
    "tensorboard": ("tensorboard", "tensorboardX"),
    "wandb": ("wandb",),
    "comet_ml": ("comet_ml",),
    "mlflow": ("mlflow",),
    "aim": ("aim",),
    "clearml": ("clearml",),
    "dvclive": ("dvclive",),
}


@dataclasses.dataclass(frozen=True)
class Settings:
    """What a run is (recorded in finetune.json and in every checkpoint)."""

    method: str = DEFAULT_METHOD
    alpha: float = 1.0
    steps: int = 200
    lr: float = 1e-3
    seed: int = 0
    #: method options by name (``batch_size``, ``regressed_steps``, ...); the method's defaults for the rest
    options: dict = dataclasses.field(default_factory=dict)
    checkpoint_every: int = 50
    #: gradients are clipped to this norm before every update (0: no clipping)
    max_grad_norm: float = 1.0
    #: samples of the closing evaluation (the fine-tuned model's reward and KL, beside the base's)
    eval_samples: int = 256
    mixed_precision: str = "no"
    #: accelerate trackers ("tensorboard", "wandb", ...) that also receive the metrics
    log_with: tuple[str, ...] = ()

    def check(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"unknown method {self.method!r}; choose one of {', '.join(METHODS)}")
        if not (isinstance(self.alpha, (int, float)) and math.isfinite(self.alpha) and self.alpha > 0):
            raise ValueError(f"alpha must be a finite number > 0, got {self.alpha!r}")
        for name in ("steps", "checkpoint_every", "eval_samples"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name.replace('_', '-')} must be a positive integer, got {value!r}")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"lr must be a finite number > 0, got {self.lr}")
        if not (math.isfinite(self.max_grad_norm) and self.max_grad_norm >= 0):
            raise ValueError(f"max-grad-norm must be a finite number >= 0, got {self.max_grad_norm}")
        if self.mixed_precision not in ("no", "fp16", "bf16"):
            raise ValueError(f"mixed precision must be no, fp16 or bf16, got {self.mixed_precision!r}")
        method_options(self.method, self.options)
        check_trackers(self.log_with)

    def record(self) -> dict:
        return {**dataclasses.asdict(self), "log_with": list(self.log_with)}


def method_options(method: str, options: dict):
    """The method's options dataclass from ``options``; raise naming an option the method does not take."""
    options_class = METHODS[method].options_class
    known = {field.name for field in dataclasses.fields(options_class)}
    unknown = sorted(set(options) - known)
    if unknown:
        raise ValueError(f"{method} takes no option {', '.join(unknown)} (it takes {', '.join(sorted(known))})")
    built = options_class(**options)
    built.check()
    return built


def check_trackers(names) -> None:
    """Every tracker is one accelerate knows and its package is installed (accelerate would drop it with a warning)."""
    import importlib.util

    for name in names:
        if name not in TRACKERS:
            raise ValueError(f"unknown tracker {name!r}; choose among {', '.join(TRACKERS)}")
        if not any(importlib.util.find_spec(package) for package in TRACKERS[name]):
            raise ValueError(f"tracker {name!r} needs {' or '.join(TRACKERS[name])}: pip install {TRACKERS[name][0]}")


def check_run_folder(out: Path, *, resume: bool, overwrite: bool) -> None:
    """A run writes into a new or empty folder, or one of its own runs when resuming (``overwrite`` replaces it)."""
    if out.exists() and not out.is_dir():
        raise ValueError(f"out: {out} exists and is not a folder")
    if resume and overwrite:
        raise ValueError("give resume or overwrite, not both")
    earlier = [name for name in RUN_FILES if (out / name).exists()]
    if earlier and not (resume or overwrite):
        raise ValueError(
            f"out: {out} already holds a run ({', '.join(earlier)}); resume it with --resume, replace "
            "it with --overwrite, or give a new folder"
        )


class ProcessGroup(Collective):
    """The processes of ``accelerate launch``."""

    def __init__(self, accelerator):
        self.accelerator = accelerator
        self.rank, self.world_size = accelerator.process_index, accelerator.num_processes

    def gather(self, tensor: torch.Tensor) -> torch.Tensor:
        return self.accelerator.gather(tensor.contiguous().to(self.accelerator.device)).cpu()

    def mean_gradients(self, parameters) -> None:
        for parameter in parameters:
            if parameter.grad is not None:
                parameter.grad = self.accelerator.reduce(parameter.grad, reduction="mean")

    def barrier(self) -> None:
        self.accelerator.wait_for_everyone()


def linear_decay(steps: int) -> Callable[[int], float]:
    """Constant learning rate for the first half, then linearly down to zero at the last update."""
    return lambda step: min(1.0, 2.0 * (1 - step / steps))


def train(
    target: Target,
    settings: Settings,
    out: Path | None = None,
    *,
    resume: bool = False,
    overwrite: bool = False,
    describe: dict | None = None,
    outputs: Callable[[Path], dict[Path, Callable[[Path], object]]] | None = None,
    progress: bool = True,
) -> dict:
    """Fine-tune ``target``; return the run's record (also written to ``out/finetune.json`` with the trained weights:
    ``outputs(out)`` maps each weight file to its writer). Without ``out`` nothing is written or resumable."""
    settings.check()
    if out is not None:
        check_run_folder(out, resume=resume, overwrite=overwrite)
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    if AcceleratorState._shared_state and AcceleratorState().mixed_precision != settings.mixed_precision:
        AcceleratorState._reset_state()  # one process, several runs (accelerate keeps one precision per process)
    accelerator = Accelerator(
        mixed_precision=settings.mixed_precision,
        log_with=list(settings.log_with) or None,
        project_dir=str(out) if out is not None else None,
        cpu=not torch.cuda.is_available(),
    )
    collective = ProcessGroup(accelerator) if accelerator.num_processes > 1 else Collective()
    writer = accelerator.is_main_process and out is not None
    method = METHODS[settings.method](
        target, settings.alpha, method_options(settings.method, settings.options), collective
    )
    parameters = list(target.parameters())
    optimizer = torch.optim.AdamW(parameters, lr=settings.lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, linear_decay(settings.steps))
    generator = torch.Generator().manual_seed(settings.seed + RANK_SEED_STRIDE * collective.rank)
    state = TrainingState(parameters, optimizer, schedule, generator, method)

    start = 0
    if out is not None and overwrite and writer:
        _remove_run(out)
    _wait(collective)
    found = checkpoints.latest(out) if (out is not None and resume) else None
    if found is not None:
        start = state.restore(found, collective.rank, settings)
    if writer:
        out.mkdir(parents=True, exist_ok=True)
        _keep_metrics_until(out / METRICS, start)
    if settings.log_with:
        accelerator.init_trackers(
            "diffusion-blend-finetune", config={"method": settings.method, "alpha": settings.alpha}
        )

    began = time.perf_counter()
    last: dict[str, float] = {}
    with _progress_bar(progress and accelerator.is_main_process, settings.steps, start) as advance:
        for step in range(start, settings.steps):
            with accelerator.autocast():
                loss, last = method.loss(generator)
            optimizer.zero_grad(set_to_none=True)
            accelerator.backward(loss)
            collective.mean_gradients(parameters)
            if settings.max_grad_norm > 0:
                last["grad_norm"] = float(torch.nn.utils.clip_grad_norm_(parameters, settings.max_grad_norm))
            optimizer.step()
            schedule.step()
            last = {"step": step + 1, **last, "lr": schedule.get_last_lr()[0]}
            if writer:
                with open(out / METRICS, "a") as handle:
                    handle.write(json.dumps(last) + "\n")
            if settings.log_with:
                accelerator.log(last, step=step + 1)
            advance(last)
            if out is not None and ((step + 1) % settings.checkpoint_every == 0 or step + 1 == settings.steps):
                state.save(out, step + 1, collective, settings)
    seconds = time.perf_counter() - began

    record = {
        **(describe or {}),
        **settings.record(),
        "path": target.path.describe(),
        "evaluation": evaluate(target, settings.eval_samples, settings.seed, collective),
        "last_metrics": last,
        "seconds": seconds,
        "resumed_from": start or None,
        "processes": collective.world_size,
        "version": _version(),
        "command": sys.argv,
    }
    if writer:
        files = dict(outputs(out)) if outputs is not None else {}
        files[out / RECORD] = lambda temp: temp.write_text(json.dumps(record, indent=2) + "\n")
        write_atomically(files)
    if settings.log_with:
        accelerator.end_training()
    _wait(collective)
    return record


@torch.no_grad()
def evaluate(target: Target, samples: int, seed: int, collective: Collective | None = None) -> dict[str, float]:
    """The fine-tuned model's mean reward and path KL over ``samples`` rollouts, and the base's reward from the same
    noise (the same seed on every run, so runs compare); ``reward_gain`` is the mean paired difference."""
    collective = collective or Collective()
    results, rewards = {}, {}
    for name, base in (("finetuned", False), ("base", True)):
        generator = torch.Generator().manual_seed(seed + 1 + RANK_SEED_STRIDE * collective.rank)
        trajectory = rollout(target, samples, generator, base=base, with_kl=not base)
        rewards[name] = collective.gather(target.reward(trajectory.samples, trajectory.conditions).double().cpu())
        results[f"{name}_reward"], results[f"{name}_reward_se"] = _mean_and_error(rewards[name])
        if not base:  # (a deterministic sampler's path has no KL)
            kls = collective.gather(trajectory.kls.sum(0))
            results["kl"] = float(kls.mean()) if target.path.stochastic else None
    results["reward_gain"], results["reward_gain_se"] = _mean_and_error(rewards["finetuned"] - rewards["base"])
    return results


def _mean_and_error(values: torch.Tensor) -> tuple[float, float]:
    """The mean and its standard error."""
    return float(values.mean()), float(values.std() / math.sqrt(len(values))) if len(values) > 1 else 0.0


@dataclasses.dataclass
class TrainingState:
    """Everything a resumed run needs to continue exactly where the checkpoint left it."""

    parameters: list[torch.nn.Parameter]
    optimizer: torch.optim.Optimizer
    schedule: Any
    generator: torch.Generator
    method: Method

    def save(self, out: Path, step: int, collective: Collective, settings: Settings) -> None:
        staged = checkpoints.staging_folder(out, step)
        checkpoints.save_rank(
            staged,
            collective.rank,
            {
                "step": step,
                "settings": settings.record(),
                "world_size": collective.world_size,
                "parameters": [parameter.detach() for parameter in self.parameters],
                "optimizer": self.optimizer.state_dict(),
                "schedule": self.schedule.state_dict(),
                "generator": self.generator.get_state(),
                "method": self.method.state_dict(),
            },
        )
        _wait(collective)
        if collective.rank == 0:
            checkpoints.publish(out, step, collective.world_size)
        _wait(collective)

    def restore(self, folder: Path, rank: int, settings: Settings) -> int:
        state = checkpoints.load_rank(folder, rank)
        saved = {key: value for key, value in state["settings"].items() if key not in RESUMABLE_CHANGES}
        asked = {key: value for key, value in settings.record().items() if key not in RESUMABLE_CHANGES}
        if saved != asked:
            changed = sorted(key for key in asked if saved.get(key) != asked[key])
            raise ValueError(
                f"resume: {folder.parent.parent} was trained with other settings ({', '.join(changed)} differ)"
            )
        with torch.no_grad():
            for parameter, saved_value in zip(self.parameters, state["parameters"], strict=True):
                parameter.copy_(saved_value)
        self.optimizer.load_state_dict(state["optimizer"])
        self.schedule.load_state_dict(state["schedule"])
        self.generator.set_state(state["generator"])
        self.method.load_state_dict(state["method"])
        return state["step"]


#: settings a resumed run may change (how often it checkpoints, where its metrics also go)
RESUMABLE_CHANGES = ("checkpoint_every", "log_with", "eval_samples")


def _wait(collective: Collective) -> None:
    if hasattr(collective, "barrier"):
        collective.barrier()


def _remove_run(out: Path) -> None:
    for name in RUN_FILES:
        path = out / name
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()


def _keep_metrics_until(path: Path, step: int) -> None:
    """Drop the metric lines a killed run wrote after its last checkpoint (the resumed run writes them again)."""
    if not path.exists():
        return
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    kept = [line for line in lines if json.loads(line)["step"] <= step]
    write_atomically({path: lambda temp: temp.write_text("".join(line + "\n" for line in kept))})


@contextlib.contextmanager
def _progress_bar(show: bool, total: int, start: int) -> Iterator[Callable[[dict], None]]:
    """A rich progress bar on stderr with the reward, the KL and the update rate."""
    if not show:
        yield lambda metrics: None
        return
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    columns = (
        TextColumn("fine-tuning"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[status]}"),
        TimeRemainingColumn(),
    )
    began, done = time.perf_counter(), [0]
    with Progress(*columns, console=Console(stderr=True), transient=True) as bar:
        task = bar.add_task("fine-tuning", total=total, completed=start, status="")

        def advance(metrics: dict) -> None:
            done[0] += 1
            shown = [f"{key} {metrics[key]:.4g}" for key in ("reward", "kl", "loss") if key in metrics]
            shown.append(f"{done[0] / max(time.perf_counter() - began, 1e-9):.2f} it/s")
            bar.update(task, advance=1, status="  ".join(shown))

        yield advance


def _version() -> str:
    from .. import __version__

    return __version__
