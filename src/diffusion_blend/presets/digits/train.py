"""Retrain the embedded model's weights: ``python -m diffusion_blend.presets.digits.train [--parts ...] [--out DIR]``.

Parts, in order (each reads the ones before it from ``--out``):

- ``classifier``: the digit classifier behind ``legible`` (held-out accuracy recorded);
- ``base``: the class-conditional diffusion model (its samples' classifier accuracy per digit recorded);
- ``basis``: one LoRA per reward (``legible``, ``bold``, ``stencil``), by the package's fine-tuner;
- ``oracles``: MORL oracles of the conflicting pair at w ∈ {0.25, 0.5, 0.75};
- ``reproduction``: a small retraining of the classifier and of the ``bold`` basis model, whose numbers the tests
  reproduce (:func:`reproduce`).

``manifest.json`` records, per file, the settings that made it, the numbers it reached, the seconds and the command.
Seeded: the same command on the same machine gives the same weights.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from pathlib import Path
from typing import Annotated

import safetensors.torch
import torch
import typer

from . import BASE_FOLDER, BASIS_FOLDER, MANIFEST, ORACLE_FOLDER, WEIGHTS
from .base import train_base
from .classifier import accuracy, train_classifier
from .data import DIGITS, load_digits, split
from .rewards import CLASSIFIER_FILE

PARTS = ("classifier", "base", "basis", "oracles", "reproduction")
#: the rewards the basis models are fine-tuned for, and the conflicting pair the oracles mix
BASIS_REWARDS = ("legible", "bold", "stencil")
CONFLICTING = ("bold", "stencil")
ORACLE_WEIGHTS = (0.25, 0.5, 0.75)
#: the fine-tuning of the shipped basis models and oracles (weighted-dsm, the fine-tuner's default)
BASIS = dict(
    alpha=1.0,
    steps=600,
    batch_size=64,
    lr=2e-3,
    lora_rank=4,
    sampler_steps=30,
    eval_samples=200,
    options={"round_samples": 1024, "round_updates": 60},
    checkpoint_every=100,
)
#: samples (per digit) and steps of the table of every reward under every fine-tuned model (guidance 1, as trained)
TABLE_SAMPLES, TABLE_STEPS = 30, 30
#: the small retraining the tests repeat: classifier epochs and the ``bold`` basis model's fine-tuning
REPRODUCTION = dict(
    epochs=5,
    basis=dict(
        alpha=1.0,
        steps=30,
        batch_size=32,
        lr=2e-3,
        lora_rank=4,
        sampler_steps=15,
        eval_samples=100,
        options={"round_samples": 256, "round_updates": 15},
        checkpoint_every=30,
    ),
)
#: how close a retraining on another machine comes (float rounding differs between CPUs)
REPRODUCTION_TOLERANCE = {"accuracy": 0.02, "reward": 0.5}
#: samples per digit measuring the base's quality, and how they are drawn
QUALITY_SAMPLES, QUALITY_STEPS, QUALITY_GUIDANCE = 50, 50, 2.0

app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)


@app.command()
def main(
    parts: Annotated[str, typer.Option(help=f"Comma-separated parts to train: {', '.join(PARTS)}.")] = ",".join(PARTS),
    out: Annotated[Path, typer.Option(help="Where the weights and manifest.json go.")] = WEIGHTS,
    seed: Annotated[int, typer.Option(help="Random seed of every part.")] = 0,
    base_steps: Annotated[int, typer.Option(help="Optimizer updates of the base model.")] = 2500,
    basis_steps: Annotated[int, typer.Option(help="Updates of each basis model and oracle.")] = BASIS["steps"],
) -> None:
    """Retrain the embedded digits model's weights and record them in manifest.json."""
    chosen = [part.strip() for part in parts.split(",") if part.strip()]
    unknown = sorted(set(chosen) - set(PARTS))
    if unknown or not chosen:
        raise typer.BadParameter(f"unknown part(s) {', '.join(unknown) or '(none)'}; choose from {', '.join(PARTS)}")
    out.mkdir(parents=True, exist_ok=True)
    manifest = json.loads((out / MANIFEST).read_text()) if (out / MANIFEST).is_file() else {}
    images, labels = load_digits()
    train_rows, held_rows = split(len(images))
    for part in PARTS:
        if part not in chosen:
            continue
        began = time.perf_counter()
        if part == "classifier":
            record = make_classifier(images, labels, train_rows, held_rows, out, seed)
        elif part == "base":
            record = make_base(images, labels, train_rows, out, seed, base_steps)
        elif part == "reproduction":
            record = {**reproduce(out / ".reproduction", out), "tolerance": REPRODUCTION_TOLERANCE}
        else:
            record = make_finetunes(part, out, seed, basis_steps)
        manifest[part] = {
            **record,
            "seconds": round(time.perf_counter() - began, 1),
            "command": command(part, seed, base_steps, basis_steps),
        }
        (out / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        typer.echo(f"{part}: {json.dumps(manifest[part])}", err=True)


def command(part: str, seed: int, base_steps: int, basis_steps: int) -> str:
    """The command that retrains ``part`` alone (into the shipped weights folder)."""
    steps = {
        "base": f" --base-steps {base_steps}",
        "basis": f" --basis-steps {basis_steps}",
        "oracles": f" --basis-steps {basis_steps}",
    }.get(part, "")
    return f"python -m diffusion_blend.presets.digits.train --parts {part} --seed {seed}{steps}"


def make_classifier(images, labels, train_rows, held_rows, out: Path, seed: int) -> dict:
    classifier = train_classifier(images[train_rows], labels[train_rows], seed=seed)
    state = {key: value.contiguous() for key, value in classifier.state_dict().items()}
    safetensors.torch.save_file(state, out / CLASSIFIER_FILE)
    return {
        "file": CLASSIFIER_FILE,
        "seed": seed,
        "train_images": len(train_rows),
        "held_out_images": len(held_rows),
        "held_out_accuracy": accuracy(classifier, images[held_rows], labels[held_rows]),
    }


def make_base(images, labels, train_rows, out: Path, seed: int, steps: int) -> dict:
    began = time.perf_counter()
    pipe = train_base(images[train_rows], labels[train_rows], steps=steps, seed=seed)
    training = time.perf_counter() - began
    pipe.save_pretrained(out / BASE_FOLDER)
    return {
        "folder": BASE_FOLDER,
        "seed": seed,
        "steps": steps,
        "training_seconds": round(training, 1),
        "quality": sample_quality(pipe, out / CLASSIFIER_FILE, seed),
    }


@torch.no_grad()
def sample_quality(pipe, classifier_file: Path, seed: int) -> dict:
    """The held-out classifier's accuracy on the model's samples, per digit (``QUALITY_SAMPLES`` each)."""
    from .rewards import Legible

    classifier = Legible.load(classifier_file).classifier
    pipe.set_progress_bar_config(disable=True)
    images = pipe(
        [str(digit) for digit in range(DIGITS)],
        num_images_per_prompt=QUALITY_SAMPLES,
        num_inference_steps=QUALITY_STEPS,
        guidance_scale=QUALITY_GUIDANCE,
        generator=torch.Generator().manual_seed(seed),
        output_type="pt",
    ).images
    wanted = torch.arange(DIGITS).repeat_interleave(QUALITY_SAMPLES)
    right = classifier(images.mean(1, keepdim=True)).argmax(1) == wanted
    return {
        "accuracy": float(right.float().mean()),
        "per_digit": [float(right[wanted == d].float().mean()) for d in range(DIGITS)],
        "samples_per_digit": QUALITY_SAMPLES,
        "steps": QUALITY_STEPS,
        "guidance_scale": QUALITY_GUIDANCE,
    }


def make_finetunes(part: str, out: Path, seed: int, steps: int) -> dict:
    """The basis models (one per reward) or the oracles (mixes of the conflicting pair), each a LoRA folder."""
    from .finetune import finetune_digits

    if part == "basis":
        runs = {name: name for name in BASIS_REWARDS}
        folder = out / BASIS_FOLDER
    else:
        first, second = CONFLICTING
        runs = {f"{first}={w:g},{second}={1 - w:g}": f"{first}={w:g},{second}={1 - w:g}" for w in ORACLE_WEIGHTS}
        folder = out / ORACLE_FOLDER
    settings = {**BASIS, "steps": steps, "seed": seed}
    records = {}
    for name, reward in runs.items():
        with tempfile.TemporaryDirectory() as run:
            record = finetune_digits(
                reward,
                out=run,
                base=out / BASE_FOLDER,
                weights_paths=_classifier_path(reward, out),
                progress=False,
                **settings,
            )
            target = folder / name
            target.mkdir(parents=True, exist_ok=True)
            shutil.copy(Path(run) / "pytorch_lora_weights.safetensors", target / "pytorch_lora_weights.safetensors")
        records[name] = {
            "reward": reward,
            "evaluation": record["evaluation"],
            "seconds": round(record["seconds"], 1),
            "tilt_reached": record["last_metrics"]["beta"] * settings["alpha"],
            "rewards": reward_table(out, target, seed),
        }
    return {
        "folder": folder.name,
        "method": record["method"],
        "settings": {**settings, "options": settings["options"]},
        "base_rewards": reward_table(out, None, seed),
        "runs": records,
    }


@torch.no_grad()
def reward_table(out: Path, lora: Path | None, seed: int) -> dict[str, list[float]]:
    """Every reward's [mean, standard error] under the base (``lora`` None) or a fine-tuned model, from the same
    noise: the effect of fine-tuning for one reward on the others."""
    from ...rewards import get_reward
    from . import load_pipeline

    pipe = load_pipeline(folder=out / BASE_FOLDER)
    if lora is not None:
        pipe.load_lora_weights(str(lora))
    prompts = [str(digit) for digit in range(DIGITS) for _ in range(TABLE_SAMPLES)]
    images = pipe(
        [str(digit) for digit in range(DIGITS)],
        num_images_per_prompt=TABLE_SAMPLES,
        guidance_scale=1.0,
        num_inference_steps=TABLE_STEPS,
        generator=torch.Generator().manual_seed(seed),
        output_type="pt",
    ).images
    table = {}
    for name in BASIS_REWARDS:
        reward = get_reward(name, _classifier_path(name, out)["legible"] if name == "legible" else None)
        values = reward(images, prompts).double()
        table[name] = [float(values.mean()), float(values.std() / len(values) ** 0.5)]
    return table


def reproduce(folder: Path, weights: Path = WEIGHTS, seed: int = 0) -> dict:
    """Retrain the classifier (``REPRODUCTION["epochs"]`` epochs) and the ``bold`` basis model (small settings, on
    the base in ``weights``) from ``seed``; their held-out accuracy and reward, which the manifest records."""
    from .finetune import finetune_digits

    images, labels = load_digits()
    train_rows, held_rows = split(len(images))
    classifier = train_classifier(images[train_rows], labels[train_rows], epochs=REPRODUCTION["epochs"], seed=seed)
    record = finetune_digits(
        "bold",
        out=folder,
        base=weights / BASE_FOLDER,
        progress=False,
        overwrite=True,
        seed=seed,
        **REPRODUCTION["basis"],
    )
    shutil.rmtree(folder, ignore_errors=True)
    evaluation = record["evaluation"]
    return {
        "classifier": {
            "epochs": REPRODUCTION["epochs"],
            "held_out_accuracy": accuracy(classifier, images[held_rows], labels[held_rows]),
        },
        "basis": {
            "reward": "bold",
            **REPRODUCTION["basis"],
            "finetuned_reward": evaluation["finetuned_reward"],
            "reward_gain": evaluation["reward_gain"],
        },
    }


def _classifier_path(reward: str, out: Path) -> dict[str, str] | None:
    """``legible`` reads the classifier trained into ``out`` (the one just made, not the shipped one)."""
    return {"legible": str(out / CLASSIFIER_FILE)} if "legible" in reward else None


if __name__ == "__main__":
    app()
