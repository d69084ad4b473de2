"""Fine-tune a basis model for a reward on a diffusers pipeline: every input checked before any model is loaded.

    record = finetune("path/to/sd-1.5", reward="imagereward", alpha=1.0, prompts="prompts.txt", out="ir-basis/")
    blend = Blend.from_pretrained("path/to/sd-1.5", basis={"ir": "ir-basis/", ...})

A weighted reward (``"ir=0.5,aes=0.5"``) gives the MORL oracle of that mix.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

from .trainer import METHODS, Settings, check_run_folder, train


def read_prompts(path: str | Path) -> list[str]:
    """One prompt per line (blank lines skipped); raise on a missing, unreadable or empty file."""
    path = Path(path).expanduser()
    try:
        prompts = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    except OSError as error:
        raise ValueError(f"prompts: cannot read {path} ({error.strerror or error})") from error
    except UnicodeDecodeError:
        raise ValueError(f"prompts: {path} is not a text file") from None
    if not prompts:
        raise ValueError(f"prompts: {path} holds no prompt")
    return prompts


def check_pipeline_folder(folder: Path) -> None:
    """A local pipeline folder is one the fine-tuner trains (read from its ``model_index.json``, before loading)."""
    import json

    import diffusers

    from .denoiser_target import check_pipeline_class

    try:
        class_name = json.loads((folder / "model_index.json").read_text())["_class_name"]
    except (OSError, ValueError, KeyError, TypeError):
        raise ValueError(f"base: {folder} is not a diffusers pipeline folder (no readable model_index.json)") from None
    check_pipeline_class(getattr(diffusers, class_name, None), class_name)


@dataclasses.dataclass(frozen=True)
class Request:
    """A fine-tuning run as asked for, whatever the model: the reward, α, the output folder and every option.
    :meth:`check` validates it all before any model is loaded; :meth:`run` trains a target made for it."""

    reward: str
    alpha: float
    out: Path
    method: str | None = None
    lora_rank: int = 4
    steps: int = 200
    batch_size: int = 8
    lr: float = 1e-4
    seed: int = 0
    sampler_steps: int = 50
    eta: float = 1.0
    sampler: str = "ddim"
    guidance_scale: float = 1.0
    weights_paths: dict | None = None
    options: dict | None = None
    checkpoint_every: int = 50
    eval_samples: int = 16
    resume: bool = False
    overwrite: bool = False
    device: str | None = None
    mixed_precision: str = "no"
    gradient_checkpointing: bool = False
    log_with: tuple[str, ...] = ()
    progress: bool = True

    @property
    def settings(self) -> Settings:
        from .trainer import DEFAULT_METHOD

        return Settings(
            method=self.method or DEFAULT_METHOD,
            alpha=self.alpha,
            steps=self.steps,
            lr=self.lr,
            seed=self.seed,
            options={"batch_size": self.batch_size, **(self.options or {})},
            checkpoint_every=self.checkpoint_every,
            eval_samples=self.eval_samples,
            mixed_precision=self.mixed_precision,
            log_with=tuple(self.log_with),
        )

    def check(self) -> None:
        """Everything that can be wrong without loading a model: the settings, the sampler against the method, the
        reward's names (and its gradient where the method needs one), the output folder."""
        from ..rewards import check_reward_spec

        settings = self.settings
        settings.check()
        method = METHODS[settings.method]
        if not (math.isfinite(self.eta) and 0 <= self.eta <= 1):
            raise ValueError(f"eta must lie in [0, 1], got {self.eta}")
        if method.needs_noise and self.sampler == "ddim" and self.eta == 0:
            raise ValueError(
                f"{settings.method} needs a stochastic sampler: eta = 0 makes every DDIM step deterministic"
            )
        if method.needs_gradient and not check_reward_spec(self.reward):
            raise ValueError(
                f"{settings.method} needs a differentiable reward and {self.reward!r} is not; use "
                "policy-gradient or weighted-dsm"
            )
        check_reward_spec(self.reward)
        check_run_folder(Path(self.out), resume=self.resume, overwrite=self.overwrite)

    @property
    def target_options(self) -> dict:
        """The options of a :class:`~.denoiser_target.LoraTarget`."""
        return dict(
            rank=self.lora_rank,
            steps=self.sampler_steps,
            eta=self.eta,
            sampler=self.sampler,
            guidance_scale=self.guidance_scale,
            seed=self.seed,
            gradient_checkpointing=self.gradient_checkpointing,
        )

    @property
    def torch_device(self) -> str:
        import torch

        return self.device or ("cuda" if torch.cuda.is_available() else "cpu")

    def reward_model(self):
        from ..rewards import parse_reward

        return parse_reward(self.reward, self.weights_paths, device=self.torch_device)

    def run(self, target, describe: dict) -> dict:
        return train(
            target,
            self.settings,
            Path(self.out),
            resume=self.resume,
            overwrite=self.overwrite,
            describe={**describe, "reward": self.reward, **target.describe()},
            outputs=target.outputs,
            progress=self.progress,
        )


def finetune(
    base: str,
    reward: str,
    alpha: float,
    out: str | Path,
    *,
    prompts: str | Path,
    height: int | None = None,
    width: int | None = None,
    **options,
) -> dict:
    """Fine-tune a LoRA on ``base``'s UNet (Stable Diffusion 1.x/2.x) for ``reward`` at KL weight ``alpha``; write it
    to ``out`` (a folder ``Blend`` loads as a basis model) with ``finetune.json`` and ``metrics.jsonl``; return the
    run's record. ``options`` are :class:`Request`'s fields."""
    from diffusers import DiffusionPipeline

    from .denoiser_target import StableDiffusionLoraTarget, check_pipeline

    request = Request(reward, alpha, Path(out).expanduser(), **options)
    request.check()
    prompt_list = read_prompts(prompts)
    base_path = Path(base).expanduser()
    if not base_path.exists() and (base.startswith((".", "/", "~")) or base.count("/") != 1):
        raise ValueError(f"base: {base} is neither a local folder nor a hub repository id")
    if base_path.is_dir():
        check_pipeline_folder(base_path)
    try:
        pipe = DiffusionPipeline.from_pretrained(base)
    except (OSError, ValueError) as error:
        raise ValueError(f"base: cannot load a pipeline from {base} ({str(error).splitlines()[0]})") from error
    check_pipeline(pipe)
    pipe = pipe.to(request.torch_device)
    pipe.set_progress_bar_config(disable=True)
    target = StableDiffusionLoraTarget(
        pipe, request.reward_model(), prompt_list, height=height, width=width, **request.target_options
    )
    describe = {
        "base": str(base_path.resolve()) if base_path.exists() else base,
        "prompts_file": str(Path(prompts).expanduser().resolve()),
    }
    return request.run(target, describe)
