"""A sweep's configuration: the setting, the methods, the weight grid — read from YAML and checked before any sampling.

    setting: digits                 # or lab
    rewards: [bold, stencil]        # the basis models' rewards, in the order weights are written
    methods: [base, db-mpa, db-mpa-ls, db-smc, soup, soup-published, code, guidance, oracle]
    grid: 0.1                       # m = 2: w ∈ {0, 0.1, ..., 1}; m = 3: the simplex grid of that step
    # weights: [[0.25, 0.75], ...]  # or the weights themselves, one list (or name → value) per point
    kl_scales: [1.0]                # λ for the joint method (DB-KLA with one reward)
    seeds: [0]
    images_per_prompt: 10
    steps: 25
    batch_images: 100               # rows of one pipeline call (the blend batches its points up to this)
    # the lab only: scenario: FILE (default: the built-in one), basis: exact | learned, basis_steps: N
    # diffusers only: base: PIPELINE, basis: {NAME: LORA}, oracles: {"a=0.5,b=0.5": LORA}, reward_models: {NAME: SPEC},
    #                 height, width, alpha (the basis models' KL weight: db-smc's target)

A method is a name or ``{name: ..., weights: [...], <option>: value}`` (its own weights: the oracle only exists where
it was fine-tuned; CoDe's ``candidates`` and ``block``; guidance's ``scale``; DB-MPA + SMC's ``particles``; ...).
"""

from __future__ import annotations

import itertools
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ..blend import validate_weights

PRESETS = Path(__file__).parent / "presets"
#: the prompt sets of the published experiments (SD 1.5, ImageReward and VILA): ``prompts: NAME`` names one
PROMPT_SETS = Path(__file__).parent / "prompts"
#: what text-to-image settings draw by default: the 1 000 "Short-DrawBench" prompts of the published comparison
DEFAULT_PROMPT_SET = "short-drawbench"
SETTINGS = ("digits", "lab", "diffusers")
#: method → the options it takes, with their defaults
METHOD_OPTIONS: dict[str, dict[str, Any]] = {
    "base": {},
    "db-mpa": {},
    "db-mpa-ls": {},
    "joint": {},
    "db-smc": {"particles": 8, "ess_threshold": 0.5, "potential_every": 1},
    "soup": {},
    "soup-published": {},
    "code": {"candidates": 20, "block": 5, "branching": "block"},
    "guidance": {"scale": 0.1, "through_denoiser": True, "probes": 8},
    "oracle": {},
}
#: methods whose samples do not depend on the weights: evaluated once, scored at every weight
WEIGHTLESS = ("base",)
KEYS = {
    "setting",
    "rewards",
    "methods",
    "grid",
    "weights",
    "kl_scales",
    "seeds",
    "images_per_prompt",
    "steps",
    "guidance_scale",
    "eta",
    "prompts",
    "batch_images",
}
#: the keys each setting reads beside those every setting reads
SETTING_KEYS = {
    "digits": (),
    "lab": ("scenario", "basis", "basis_steps"),
    "diffusers": ("base", "basis", "oracles", "reward_models", "height", "width", "alpha"),
}
LAB_BASIS = ("exact", "learned")
#: coordinates closer than this are the same weight point (grid steps, oracles' names, results' entries)
POINT_TOLERANCE = 1e-9


class ConfigError(ValueError):
    """A sweep configuration that cannot run; raised before any sampling."""


@dataclass(frozen=True)
class Method:
    name: str
    options: dict[str, Any] = field(default_factory=dict)
    weights: tuple[tuple[float, ...], ...] | None = None  # its own points, else the grid's


@dataclass(frozen=True)
class SweepConfig:
    setting: str
    rewards: tuple[str, ...]
    methods: tuple[Method, ...]
    weights: tuple[tuple[float, ...], ...]
    kl_scales: tuple[float, ...] = (1.0,)
    seeds: tuple[int, ...] = (0,)
    images_per_prompt: int = 10
    steps: int = 25
    guidance_scale: float = 1.0
    eta: float = 1.0
    prompts: tuple[str, ...] | None = None
    batch_images: int = 100
    options: dict[str, Any] = field(default_factory=dict)  # the setting's own keys (SETTING_KEYS)

    def points(self, method: Method) -> tuple[tuple[float, ...], ...]:
        return method.weights if method.weights is not None else self.weights

    def describe(self) -> dict:
        return {
            "setting": self.setting,
            "rewards": list(self.rewards),
            "steps": self.steps,
            "guidance_scale": self.guidance_scale,
            "eta": self.eta,
            "seeds": list(self.seeds),
            "images_per_prompt": self.images_per_prompt,
            "kl_scales": list(self.kl_scales),
            "batch_images": self.batch_images,
            **self.options,
            "methods": {m.name: m.options for m in self.methods},
        }


def load_config(path: str | Path | None = None, *, preset: str | None = None) -> SweepConfig:
    """Read a YAML configuration (or a built-in preset by name) and check it."""
    if (path is None) == (preset is None):
        raise ConfigError("give a configuration file or --preset, not both")
    if preset is not None:
        available = sorted(file.stem for file in PRESETS.glob("*.yaml"))
        if preset not in available:
            raise ConfigError(f"unknown preset {preset!r}; choose from {', '.join(available)}")
        path = PRESETS / f"{preset}.yaml"
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"configuration file {path} does not exist")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as error:
        raise ConfigError(f"{path} is not valid YAML: {error}") from error
    if not isinstance(raw, dict):
        raise ConfigError(f"{path} must hold a mapping of settings, got {type(raw).__name__}")
    return parse_config(raw, base=path.parent)


def parse_config(raw: dict, base: Path = Path(".")) -> SweepConfig:
    unknown = sorted(set(raw) - KEYS - {key for keys in SETTING_KEYS.values() for key in keys})
    if unknown:
        raise ConfigError(f"unknown configuration key(s) {', '.join(unknown)}; known: {', '.join(sorted(KEYS))}")
    setting = raw.get("setting")
    if setting not in SETTINGS:
        raise ConfigError(f"setting must be one of {', '.join(SETTINGS)}, got {setting!r}")
    rewards = raw.get("rewards")
    if (
        not isinstance(rewards, list)
        or len(rewards) < 2
        or not all(isinstance(r, str) for r in rewards)
        or len(set(rewards)) != len(rewards)
    ):
        raise ConfigError(f"rewards must be a list of two or more distinct names, got {rewards!r}")
    rewards = tuple(rewards)
    if "grid" in raw and "weights" in raw:
        raise ConfigError("give the weights as a grid step or as a list, not both")
    weights = (
        parse_points(raw["weights"], rewards, "weights")
        if "weights" in raw
        else simplex_grid(len(rewards), positive_number(raw.get("grid", 0.1), "grid"))
    )
    methods = tuple(parse_method(entry, rewards) for entry in raw.get("methods") or [])
    if not methods:
        raise ConfigError("no methods to sweep")
    names = [method.name for method in methods]
    if len(set(names)) != len(names):
        raise ConfigError(f"a method is listed twice: {names}")
    for method in methods:
        if method.name == "db-mpa-ls":  # one member per step, drawn with probability w
            for point in method.weights or weights:
                try:
                    validate_weights(dict(zip(rewards, point)), rewards, simplex=True)
                except ValueError as error:
                    raise ConfigError(
                        f"db-mpa-ls samples one member per step with probability w: its weights must "
                        f"sum to 1, got {list(point)} ({error})"
                    ) from error
        if method.name == "db-smc":
            from ..smc import SMC

            try:
                SMC(**method.options)
            except (TypeError, ValueError) as error:
                raise ConfigError(f"db-smc: {error}") from error
            if non_negative(raw.get("eta", 1.0), "eta") == 0:
                raise ConfigError("db-smc reweighs the sampler's Gaussian steps: set eta > 0 (1: DDPM's)")
    kl_scales = tuple(non_negative(value, "kl_scales") for value in raw.get("kl_scales", [1.0]))
    seeds = raw.get("seeds", [0])
    if not isinstance(seeds, list) or not seeds or not all(isinstance(s, int) and s >= 0 for s in seeds):
        raise ConfigError(f"seeds must be a list of non-negative integers, got {seeds!r}")
    prompts = raw.get("prompts")
    if prompts is not None:
        prompts = tuple(read_prompts(prompts, base))
    return SweepConfig(
        setting,
        rewards,
        methods,
        weights,
        kl_scales,
        tuple(seeds),
        positive_integer(raw.get("images_per_prompt", 10), "images_per_prompt"),
        positive_integer(raw.get("steps", 25), "steps"),
        non_negative(raw.get("guidance_scale", 1.0), "guidance_scale"),
        non_negative(raw.get("eta", 1.0), "eta"),
        prompts,
        positive_integer(raw.get("batch_images", 100), "batch_images"),
        setting_options(setting, raw, base),
    )


def setting_options(setting: str, raw: dict, base: Path) -> dict[str, Any]:
    """The keys of ``setting`` (SETTING_KEYS), checked, with their defaults; another setting's keys are refused."""
    foreign = sorted(key for key in raw if key not in KEYS and key not in SETTING_KEYS[setting])
    if foreign:
        raise ConfigError(
            f"{', '.join(foreign)}: the {setting} setting does not read {'it' if len(foreign) == 1 else 'them'}"
        )
    if setting == "lab":
        scenario = raw.get("scenario")
        if scenario is not None:
            if not isinstance(scenario, str) or not (base / scenario).expanduser().is_file():
                raise ConfigError(f"scenario file {scenario!r} does not exist")
            scenario = str((base / scenario).expanduser())
        if raw.get("basis", "exact") not in LAB_BASIS:
            raise ConfigError(f"basis must be one of {', '.join(LAB_BASIS)}, got {raw.get('basis')!r}")
        steps = raw.get("basis_steps")
        return {
            "scenario": scenario,
            "basis": raw.get("basis", "exact"),
            "basis_steps": None if steps is None else positive_integer(steps, "basis_steps"),
        }
    if setting == "diffusers":
        if not isinstance(raw.get("base"), str):
            raise ConfigError("the diffusers setting needs base: the pipeline (a folder or a hub id)")
        options = {"base": raw["base"]}
        for key in ("basis", "oracles", "reward_models"):
            value = raw.get(key, {} if key != "basis" else None)
            if not isinstance(value, dict) or not all(
                isinstance(k, str) and isinstance(v, str) for k, v in value.items()
            ):
                raise ConfigError(f"{key} must be a mapping of names to paths, got {value!r}")
            options[key] = (
                {name: resolved(path, base) for name, path in value.items()} if key != "reward_models" else dict(value)
            )
        for key in ("height", "width"):
            options[key] = None if raw.get(key) is None else positive_integer(raw[key], key)
        options["alpha"] = None if raw.get("alpha") is None else positive_number(raw["alpha"], "alpha")
        return options
    return {}


def resolved(path: str, base: Path) -> str:
    """A path relative to the configuration's folder where it exists there; otherwise as written (a hub id)."""
    candidate = (base / path).expanduser()
    return str(candidate) if candidate.exists() else path


def parse_method(entry: Any, rewards: tuple[str, ...]) -> Method:
    if isinstance(entry, str):
        entry = {"name": entry}
    if not isinstance(entry, dict) or not isinstance(entry.get("name"), str):
        raise ConfigError(f"a method is a name or a mapping with a name, got {entry!r}")
    name = entry["name"]
    if name not in METHOD_OPTIONS:
        raise ConfigError(f"unknown method {name!r}; choose from {', '.join(METHOD_OPTIONS)}")
    options = {key: value for key, value in entry.items() if key not in ("name", "weights")}
    unknown = sorted(set(options) - set(METHOD_OPTIONS[name]))
    if unknown:
        known = ", ".join(METHOD_OPTIONS[name]) or "none"
        raise ConfigError(f"method {name!r} takes no option(s) {', '.join(unknown)} (its options: {known})")
    weights = parse_points(entry["weights"], rewards, f"{name}'s weights") if "weights" in entry else None
    return Method(name, {**METHOD_OPTIONS[name], **options}, weights)


def parse_points(raw: Any, rewards: tuple[str, ...], what: str) -> tuple[tuple[float, ...], ...]:
    """Weight points as lists in the rewards' order, or name → value mappings (names left out count as 0)."""
    if not isinstance(raw, list) or not raw:
        raise ConfigError(f"{what} must be a non-empty list of points, got {raw!r}")
    points = []
    for point in raw:
        if isinstance(point, dict):
            unknown = sorted(set(point) - set(rewards))
            if unknown:
                raise ConfigError(
                    f"{what}: unknown reward name(s) {', '.join(map(str, unknown))}; "
                    f"the rewards are {', '.join(rewards)}"
                )
            point = [point.get(name, 0.0) for name in rewards]
        if not isinstance(point, list) or len(point) != len(rewards):
            raise ConfigError(f"{what}: each point needs {len(rewards)} weights ({', '.join(rewards)}), got {point!r}")
        points.append(tuple(non_negative(value, what) for value in point))
    return tuple(points)


def same_point(a, b) -> bool:
    """Whether two weight points (sequences in the rewards' order) are the same."""
    return all(abs(x - y) <= POINT_TOLERANCE for x, y in zip(a, b, strict=True))


def simplex_grid(rewards: int, step: float) -> tuple[tuple[float, ...], ...]:
    """Every point of the probability simplex in ``rewards`` dimensions whose coordinates are multiples of ``step``."""
    count = round(1 / step)
    if abs(count * step - 1) > POINT_TOLERANCE:
        raise ConfigError(f"grid step must divide 1, got {step}")
    points = [combo for combo in itertools.product(range(count + 1), repeat=rewards - 1) if sum(combo) <= count]
    return tuple(tuple(round(c / count, 12) for c in (*combo, count - sum(combo))) for combo in sorted(points))


def prompt_sets() -> list[str]:
    return sorted(path.stem for path in PROMPT_SETS.glob("*.json"))


def read_prompts(raw: Any, base: Path = Path(".")) -> list[str]:
    """Prompts as a list, a built-in set's name (:func:`prompt_sets`), a JSON list file or a text file (one per
    line)."""
    if isinstance(raw, list) and raw and all(isinstance(p, str) for p in raw):
        return raw
    if not isinstance(raw, str):
        raise ConfigError(f"prompts must be a list of strings, a prompt set or a file, got {raw!r}")
    path = (base / raw).expanduser()
    if not path.is_file() and raw in prompt_sets():
        path = PROMPT_SETS / f"{raw}.json"
    if not path.is_file():
        raise ConfigError(f"prompts file {path} does not exist (built-in sets: {', '.join(prompt_sets())})")
    if path.suffix == ".json":
        try:
            prompts = json.loads(path.read_text())
        except json.JSONDecodeError as error:
            raise ConfigError(f"prompts file {path} is not valid JSON: {error}") from error
        if not isinstance(prompts, list) or not all(isinstance(p, str) for p in prompts):
            raise ConfigError(f"prompts file {path} must hold a JSON list of strings")
        prompts = [p.strip() for p in prompts if p.strip()]
    else:
        prompts = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    if not prompts:
        raise ConfigError(f"prompts file {path} holds no prompts")
    return prompts


def positive_integer(value: Any, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{what} must be a positive integer, got {value!r}")
    return value


def positive_number(value: Any, what: str) -> float:
    number = non_negative(value, what)
    if number == 0:
        raise ConfigError(f"{what} must be positive, got {value!r}")
    return number


def non_negative(value: Any, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise ConfigError(f"{what} must be a finite number >= 0, got {value!r}")
    return float(value)
