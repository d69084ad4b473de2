"""Fine-tune a basis model for a reward on a diffusers pipeline: every input checked before any model is loaded.

    record = finetune("path/to/sd-1.5", reward="imagereward", alpha=1.0, prompts="prompts.txt", out="ir-basis/")
    blend = Blend.from_pretrained("path/to/sd-1.5", basis={"ir": "ir-basis/", ...})

A weighted reward (``"ir=0.5,aes=0.5"``) gives the MORL oracle of that mix.
"""

from __future__ import annotations

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


def finetune(base: str, reward: str, alpha: float, prompts: str | Path, out: str | Path, *,
             method: str | None = None, lora_rank: int = 4, steps: int = 200, batch_size: int = 8, lr: float = 1e-4,
             seed: int = 0, sampler_steps: int = 50, eta: float = 1.0, sampler: str = "ddim",
             guidance_scale: float = 1.0, height: int | None = None, width: int | None = None,
             weights_paths: dict[str, str] | None = None, options: dict | None = None, checkpoint_every: int = 50,
             eval_samples: int = 16, resume: bool = False, overwrite: bool = False, device: str | None = None,
             mixed_precision: str = "no", gradient_checkpointing: bool = False, log_with: tuple[str, ...] = (),
             progress: bool = True) -> dict:
    """Fine-tune a LoRA on ``base``'s UNet for ``reward`` at KL weight ``alpha``; write it to ``out`` (a folder
    ``Blend`` loads as a basis model) with ``finetune.json`` and ``metrics.jsonl``; return the run's record."""
    import torch
    from diffusers import DiffusionPipeline

    from ..rewards import check_reward_spec, parse_reward
    from .denoiser_target import StableDiffusionLoraTarget, check_pipeline
    from .trainer import DEFAULT_METHOD

    method = method or DEFAULT_METHOD
    settings = Settings(method=method, alpha=alpha, steps=steps, lr=lr, seed=seed,
                        options={"batch_size": batch_size, **(options or {})}, checkpoint_every=checkpoint_every,
                        eval_samples=eval_samples, mixed_precision=mixed_precision, log_with=tuple(log_with))
    settings.check()
    method_class = METHODS[method]
    if method_class.needs_noise and (sampler == "ddim" and eta == 0):
        raise ValueError(f"{method} needs a stochastic sampler: eta = 0 makes every DDIM step deterministic")
    if not (math.isfinite(eta) and 0 <= eta <= 1):
        raise ValueError(f"eta must lie in [0, 1], got {eta}")
    prompt_list = read_prompts(prompts)
    differentiable = check_reward_spec(reward)
    if method_class.needs_gradient and not differentiable:
        raise ValueError(f"{method} needs a differentiable reward and {reward!r} is not; use policy-gradient or "
                         "weighted-dsm")
    out = Path(out).expanduser()
    check_run_folder(out, resume=resume, overwrite=overwrite)
    base_path = Path(base).expanduser()
    if not base_path.exists() and (base.startswith((".", "/", "~")) or base.count("/") != 1):
        raise ValueError(f"base: {base} is neither a local folder nor a hub repository id")
    if base_path.is_dir():
        check_pipeline_folder(base_path)

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        pipe = DiffusionPipeline.from_pretrained(base)
    except (OSError, ValueError) as error:
        raise ValueError(f"base: cannot load a pipeline from {base} ({str(error).splitlines()[0]})") from error
    check_pipeline(pipe)
    pipe = pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    reward_model = parse_reward(reward, weights_paths, device=device)
    target = StableDiffusionLoraTarget(pipe, reward_model, prompt_list, rank=lora_rank, steps=sampler_steps, eta=eta,
                                       sampler=sampler, guidance_scale=guidance_scale, height=height, width=width,
                                       seed=seed, gradient_checkpointing=gradient_checkpointing)
    describe = {"base": str(base_path.resolve()) if base_path.exists() else base, "reward": reward,
                "prompts_file": str(Path(prompts).expanduser().resolve()), **target.describe()}
    return train(target, settings, out, resume=resume, overwrite=overwrite, describe=describe,
                 outputs=target.outputs, progress=progress)
