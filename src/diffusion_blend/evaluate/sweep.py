"""``diffusion-blend sweep``: every method at every weight point, scored by every reward, into one result set.

The work is planned as *units* — a method at one weight point, or the blend at all its points in one batch (the
core's per-sample weights) — each identified by a hash of everything its images depend on. A unit's result (each
image's rewards, a few of its images for the grid, seconds, denoiser calls, peak memory) is written atomically to
``cells/``; a rerun skips the units found there, and ``accelerate launch`` splits the units across processes, the
main one gathering them. The result set is built from the unit files alone, so it is the same however the work was
split or resumed: ``results.json``, ``samples.csv``, ``pareto.png``, ``grid.png`` and ``report.md``.
"""

from __future__ import annotations

import hashlib
import json
import math
import resource
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import safetensors.torch
import torch

from ..files import write_atomically
from .config import WEIGHTLESS, Method, SweepConfig, load_config

CELLS = "cells"


@dataclass(frozen=True)
class Unit:
    method: Method
    points: tuple[tuple[float, ...], ...]
    kl_scale: float

    def key(self, config: SweepConfig) -> str:
        identity = {
            "config": config.describe(),
            "prompts": list(config.prompts or []),
            "method": self.method.name,
            "options": self.method.options,
            "points": self.points,
            "kl_scale": self.kl_scale,
        }
        digest = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]
        return f"{self.method.name}-{digest}"


def plan(config: SweepConfig, setting) -> list[Unit]:
    """The units of a sweep, in a fixed order: the blend's points in one batch per λ, other methods point by point;
    the oracle, unless told its points, where the setting has one."""
    units = []
    for method in config.methods:
        points = config.points(method)
        if method.name == "oracle" and method.weights is None:
            points = setting.oracle_points()
        if method.name in WEIGHTLESS:
            units.append(Unit(method, (points[0],), 1.0))
        elif method.name in ("db-mpa", "db-mpa-ls"):
            units.append(Unit(method, points, 1.0))
        elif method.name == "joint":
            units.extend(Unit(method, points, kl_scale) for kl_scale in config.kl_scales)
        else:
            units.extend(Unit(method, (point,), 1.0) for point in points)
    return units


def run_sweep(
    config: str | Path | SweepConfig | None,
    out: str | Path,
    *,
    preset: str | None = None,
    device: str | None = None,
    progress: bool = True,
) -> list[Path]:
    """Run (or finish) the sweep of a YAML file, a loaded configuration or a built-in ``preset`` ("digits", "lab")
    into ``out``; return the files written (by the main process; the others return []). The setting is built, and the
    configuration checked against it, before any sampling."""
    from accelerate import PartialState

    from .settings import make_setting

    if not isinstance(config, SweepConfig):
        config = load_config(config, preset=preset)
    out = Path(out)
    state = PartialState(cpu=not torch.cuda.is_available())  # on CPUs, accelerate's processes join over gloo
    setting = make_setting(config, out, device)
    units = plan(config, setting)
    cells = out / CELLS
    cells.mkdir(parents=True, exist_ok=True)
    mine = [unit for index, unit in enumerate(units) if index % state.num_processes == state.process_index]
    todo = [unit for unit in mine if not (cells / f"{unit.key(config)}.json").is_file()]
    with _progress(progress and state.is_main_process, len(todo)) as advance:
        for unit in todo:
            run_unit(setting, unit, cells / unit.key(config))
            advance(unit)
    state.wait_for_everyone()
    if not state.is_main_process:
        return []
    from .report import write_results

    return write_results(config, setting, units, cells, out)


def run_unit(setting, unit: Unit, stem: Path) -> None:
    """Sample and score one unit; write its record and grid images atomically."""
    setting.counter.calls = setting.counter.rows = 0
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    began = time.perf_counter()
    samples = setting.images(unit.method, unit.points, unit.kl_scale)
    seconds = time.perf_counter() - began
    rewards = setting.score(samples)
    per_point = len(setting.prompts)
    record = {
        "method": unit.method.name,
        "options": unit.method.options,
        "kl_scale": unit.kl_scale,
        "points": [list(point) for point in unit.points],
        "images_per_point": per_point,
        "rewards": rewards.tolist(),
        "seconds": seconds,
        "denoiser_calls": setting.counter.calls,
        "denoiser_rows": setting.counter.rows,
        "peak_memory_mb": peak_memory_mb(),
    }
    if hasattr(setting, "metrics"):  # the lab: each point's distance to its exact target
        record["metrics"] = setting.metrics(samples, unit.points)
    grid = setting.thumbnails(samples, len(unit.points)).contiguous().cpu()
    write_atomically(
        {
            stem.with_suffix(".json"): lambda temp: temp.write_text(json.dumps(record) + "\n"),
            stem.with_suffix(".safetensors"): lambda temp: safetensors.torch.save_file({"images": grid.float()}, temp),
        }
    )


def peak_memory_mb() -> float:
    """The accelerator's peak allocated memory since the unit began; on a CPU, the process's peak resident size."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 2**10


class _progress:
    """A rich progress bar over the units to run (nothing when off)."""

    def __init__(self, enabled: bool, total: int):
        self.enabled, self.total = enabled, total

    def __enter__(self):
        if not self.enabled:
            return lambda unit: None
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        self.bar = Progress(
            TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), transient=True
        )
        self.bar.start()
        task = self.bar.add_task("sweep", total=self.total)
        return lambda unit: self.bar.update(task, advance=1, description=f"sweep: {unit.method.name} done")

    def __exit__(self, *exc) -> None:
        if self.enabled:
            self.bar.stop()


def summary(values: list[float]) -> dict[str, float]:
    mean = math.fsum(values) / len(values)
    variance = math.fsum((v - mean) ** 2 for v in values) / max(len(values) - 1, 1)
    return {"mean": mean, "se": math.sqrt(variance / len(values))}
