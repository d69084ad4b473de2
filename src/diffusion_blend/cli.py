"""The ``diffusion-blend`` command line.

Every command validates its inputs before it loads a model, reports a bad input as one line on stderr with a
non-zero exit code, and writes its outputs only once everything succeeded (temp file, then rename).
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import json
import math
import os
from pathlib import Path
from typing import Annotated, Any

import typer

from .files import write_atomically

app = typer.Typer(
    name="diffusion-blend",
    help="Align a diffusion model with any mix of preferences at inference time (Diffusion Blend).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune")
#: Short names for the usual diffusers schedulers; any diffusers scheduler class name works too.
SCHEDULERS = {
    "ddim": "DDIMScheduler",
    "ddpm": "DDPMScheduler",
    "dpm": "DPMSolverMultistepScheduler",
    "dpm++": "DPMSolverMultistepScheduler",
    "euler": "EulerDiscreteScheduler",
    "euler-a": "EulerAncestralDiscreteScheduler",
    "heun": "HeunDiscreteScheduler",
    "lms": "LMSDiscreteScheduler",
    "pndm": "PNDMScheduler",
    "unipc": "UniPCMultistepScheduler",
    "flow-euler": "FlowMatchEulerDiscreteScheduler",
}


#: ``--basis NAME@DENOISER=base``: the pipeline's own denoiser (a basis fine-tuned on another denoiser only)
BASE_SOURCE = "base"
NO_LORA_TO_SCALE = "--lora-scale scales LoRA basis models, and no --basis is a LoRA"


class CommandError(Exception):
    """A bad input or a failed step, reported as one line without a traceback."""


def fail(message: str) -> None:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code=2)


@app.callback()
def main() -> None:
    """Diffusion Blend: blend basis models fine-tuned for single rewards, at every denoising step."""


# ------------------------------------------------------------------------------------------------------ parsing
def parse_basis(items: list[str]) -> dict[str, str | None | dict[str, str | None]]:
    """``["a=lora", "b@transformer=high", "b@transformer_2=base"]`` → ``{"a": "lora", "b": {"transformer": "high",
    "transformer_2": None}}``: a path, or a path per denoiser of a pipeline that has several (Wan 2.2), where
    ``base`` names the pipeline's own denoiser (one the basis leaves unchanged; a folder called base is ``./base``)."""
    basis: dict[str, str | None | dict[str, str | None]] = {}
    for item in items:
        key, sep, path = item.partition("=")
        name, at, denoiser = (part.strip() for part in key.partition("@"))
        if not sep or not name or not path.strip() or (at and not denoiser):
            raise CommandError(f"--basis: {item!r} is not NAME=PATH or NAME@DENOISER=PATH")
        given = basis.get(name)
        if name in basis and (not at or not isinstance(given, dict) or denoiser in given):
            raise CommandError(f"--basis: {name!r}{f' for {denoiser}' if at else ''} is given twice")
        source = None if path.strip() == BASE_SOURCE else path.strip()
        if at:
            basis.setdefault(name, {})[denoiser] = source
        else:
            basis[name] = source
    return basis


def _paths_of(basis: dict[str, str | None | dict[str, str | None]]) -> list[str]:
    """Every path of a parsed ``--basis`` (not the base's own denoisers)."""
    return [
        path
        for source in basis.values()
        for path in (source.values() if isinstance(source, dict) else [source])
        if path is not None
    ]


def scheduler_class(name: str) -> type:
    import diffusers

    class_name = SCHEDULERS.get(name.lower(), name)
    cls = getattr(diffusers, class_name, None)
    if not (isinstance(cls, type) and class_name.endswith("Scheduler")):
        raise CommandError(f"--scheduler: unknown scheduler {name!r} (try {', '.join(SCHEDULERS)} or a class name)")
    return cls


# ------------------------------------------------------------------------------------------------------- output
def image_grid(images: list, columns: int | None = None) -> Any:
    """The images side by side in a grid of ``columns`` (default: near-square)."""
    from PIL import Image

    columns = columns or math.ceil(math.sqrt(len(images)))
    rows = math.ceil(len(images) / columns)
    width, height = images[0].size
    grid = Image.new("RGB", (columns * width, rows * height))
    for index, image in enumerate(images):
        grid.paste(image, ((index % columns) * width, (index // columns) * height))
    return grid


#: Image files ``--out`` may name (a grid of all images); any other ``--out`` is a folder (one PNG per image)
IMAGE_FORMATS = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".webp": "WEBP"}
#: What ``generate`` writes into an output folder (an earlier run's would mix with a new one's)
FOLDER_OUTPUTS = ("image-*.png", "settings.json")


@dataclasses.dataclass(frozen=True)
class Output:
    """Where ``generate`` writes: a grid image file (and its settings beside it), or a folder of one PNG per image
    (and ``settings.json``)."""

    path: Path
    image: bool

    @classmethod
    def parse(cls, text: str) -> Output:
        """``--out``: an image file by its suffix, a folder where it ends in a slash, has no suffix or exists."""
        path = Path(text).expanduser()
        if text.endswith(("/", os.sep)):
            return cls(path, image=False)
        if path.suffix.lower() in IMAGE_FORMATS:
            return cls(path, image=True)
        if path.suffix and not path.is_dir():
            raise CommandError(
                f"--out: {text} is neither an image file ({', '.join(IMAGE_FORMATS)}) nor a folder "
                "(end it with / for a folder)"
            )
        return cls(path, image=False)

    @property
    def sidecar(self) -> Path:
        """The settings file: beside a grid image (``car.json`` for ``car.png``), or in the output folder."""
        return self.path.with_suffix(".json") if self.image else self.path / "settings.json"


def save_images(images: list, out: Output, settings: dict, columns: int | None = None) -> list[Path]:
    """A grid image, or one PNG per image in a folder; plus the settings file."""
    if out.image:
        targets = [(out.path, image_grid(images, columns), IMAGE_FORMATS[out.path.suffix.lower()])]
    else:
        targets = [(out.path / f"image-{index:03d}.png", image, "PNG") for index, image in enumerate(images)]
    settings = {**settings, "outputs": [path.name for path, _, _ in targets]}
    files = {
        path: lambda temp, image=image, image_format=image_format: image.save(temp, format=image_format)
        for path, image, image_format in targets
    }
    files[out.sidecar] = lambda temp: temp.write_text(json.dumps(settings, indent=2, allow_nan=False) + "\n")
    write_atomically(files)
    return list(files)


def _check_out(out: Output) -> None:
    """``--out`` can be written, before any model is loaded: an image file (not a folder) or a folder without an
    earlier run's outputs, its settings file not a folder, somewhere writable."""
    path = out.path
    if out.image and path.is_dir():
        raise CommandError(f"--out: {path} is a folder")
    if not out.image:
        if path.exists() and not path.is_dir():
            raise CommandError(f"--out: {path} exists and is not a folder")
        earlier = (
            sorted(found.name for pattern in FOLDER_OUTPUTS for found in path.glob(pattern)) if path.is_dir() else []
        )
        if earlier:
            raise CommandError(
                f"--out: {path} holds an earlier run's outputs ({', '.join(earlier[:3])}"
                f"{', ...' if len(earlier) > 3 else ''}); give a new or empty folder"
            )
    if out.sidecar.is_dir():
        raise CommandError(f"--out: the settings file {out.sidecar} would replace a folder")
    existing = next(parent for parent in (path.parent if out.image else path, *path.parents) if parent.exists())
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        raise CommandError(f"--out: cannot write under {existing}")


# ----------------------------------------------------------------------------------------------------- generate
@app.command()
def generate(
    weights: Annotated[
        list[str],
        typer.Option(
            help="NAME=W,... blend weights; names left out count as 0. Repeat it for a sweep in one batch: a grid "
            "row of --num-images images per setting, the same starting noise in every row."
        ),
    ],
    prompt: Annotated[str, typer.Option(help="The prompt (for the embedded digits model: the digit, 0-9).")],
    out: Annotated[
        str,
        typer.Option(
            help="An image file, .png, .jpg or .webp (a grid of all images), or a folder "
            "(one PNG per image; a name ending in /)."
        ),
    ],
    kl_scale: Annotated[
        list[float] | None,
        typer.Option(
            help="λ: 1 = the basis models' KL strength, 0 = the base (default 1). Repeat it to sweep λ too: a grid "
            "row per (weights, λ) pair."
        ),
    ] = None,
    mode: Annotated[str, typer.Option(help="mix (DB-MPA/DB-KLA) or stochastic (DB-MPA-LS).")] = "mix",
    negative_prompt: Annotated[str | None, typer.Option(help="Negative prompt.")] = None,
    steps: Annotated[int | None, typer.Option(help="Denoising steps (default: the pipeline's).")] = None,
    guidance: Annotated[
        float | None, typer.Option(help="Classifier-free guidance scale (default: the pipeline's).")
    ] = None,
    seed: Annotated[
        int,
        typer.Option(help="Random seed of the first image (image j: seed + j); the same seed gives the same images."),
    ] = 0,
    num_images: Annotated[int, typer.Option(help="Images to generate (per --weights and --kl-scale pair).")] = 1,
    height: Annotated[int | None, typer.Option(help="Image height in pixels.")] = None,
    width: Annotated[int | None, typer.Option(help="Image width in pixels.")] = None,
    scheduler: Annotated[str | None, typer.Option(help=f"Scheduler: {', '.join(SCHEDULERS)} or a class name.")] = None,
    dtype: Annotated[str, typer.Option(help="fp32, fp16 or bf16.")] = "fp32",
    device: Annotated[str | None, typer.Option(help="torch device (default: cuda when available, else cpu).")] = None,
    compile: Annotated[
        str | None,
        typer.Option(
            help=f"torch.compile the denoiser calls, in this mode: {', '.join(COMPILE_MODES)} (first image slower)."
        ),
    ] = None,
    max_batch_size: Annotated[
        str | None,
        typer.Option(
            help="At most this many rows per denoiser call, or 'input': as many as a single model's call (the memory "
            "of one model)."
        ),
    ] = None,
    lora_scale: Annotated[
        float | None,
        typer.Option(help="Scale every LoRA basis model's update, as the pipeline's own LoRA scale does (default 1)."),
    ] = None,
    denoiser: Annotated[
        str | None,
        typer.Option(
            help="The pipeline's denoiser to blend, where it has several (Wan 2.2: transformer or transformer_2)."
        ),
    ] = None,
    base: Annotated[
        str | None, typer.Option(help="Base pipeline: a local folder or a hub id (default: the embedded digits model).")
    ] = None,
    basis: Annotated[
        list[str] | None,
        typer.Option(
            help="NAME=PATH of a basis model (LoRA or denoiser); repeat it. NAME@DENOISER=PATH gives one per "
            "denoiser of a pipeline that has several (Wan 2.2: NAME@transformer=..., NAME@transformer_2=...; "
            "PATH 'base': that denoiser unchanged). Default with the embedded model: its legible, bold and stencil."
        ),
    ] = None,
) -> None:
    """Generate images from a blend of basis models (by default the embedded digits model's)."""
    run_reporting_errors(_generate, **locals())


def run_reporting_errors(command: Any, **kwargs: Any) -> None:
    """Run a command; any failure becomes one line on stderr and exit code 2.

    ``DIFFUSION_BLEND_DEBUG=1`` shows the traceback instead."""
    try:
        command(**kwargs)
    except typer.Exit:
        raise
    except Exception as error:
        if os.environ.get("DIFFUSION_BLEND_DEBUG"):
            raise
        text = str(error).strip().splitlines()
        fail(
            text[0]
            if text and isinstance(error, (CommandError, ValueError))
            else f"{type(error).__name__}: {' '.join(text)}"
        )


def _generate(
    base,
    basis,
    weights,
    prompt,
    out,
    kl_scale,
    mode,
    negative_prompt,
    steps,
    guidance,
    seed,
    num_images,
    height,
    width,
    scheduler,
    dtype,
    device,
    compile,
    max_batch_size,
    lora_scale,
    denoiser,
) -> None:
    import torch

    from . import __version__
    from .blend import parse_named_numbers, validate_kl_scale, validate_weights
    from .pipeline import Blend

    quiet_libraries()

    if mode not in ("mix", "stochastic"):
        raise CommandError(f"--mode must be mix or stochastic, got {mode!r}")
    if base is None:
        from .presets import digits

        digits.digit_labels(prompt)  # the embedded model's prompt is a digit
    if base is None and not basis:
        basis_sources = {name: str(path) for name, path in digits.basis_models().items()}
    else:
        basis_sources = parse_basis(basis or [])
    if not basis_sources:
        raise CommandError("give at least one --basis NAME=PATH")
    settings_weights = [
        validate_weights(parse_named_numbers(setting, "--weights"), basis_sources, simplex=mode == "stochastic")
        for setting in weights
    ]
    kl_scales = [validate_kl_scale(value) for value in (kl_scale or [1.0])]
    sweep = [(setting, value) for setting in settings_weights for value in kl_scales]  # a grid row each
    if dtype not in DTYPES:
        raise CommandError(f"--dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    for option, value in (("--num-images", num_images), ("--steps", steps), ("--height", height), ("--width", width)):
        if value is not None and value < 1:
            raise CommandError(f"{option} must be >= 1, got {value}")
    if (height is None) != (width is None):  # diffusers' SD pipelines would drop the one given for their defaults
        raise CommandError("--height and --width go together: give both, or neither for the pipeline's size")
    if guidance is not None and not math.isfinite(guidance):
        raise CommandError(f"--guidance must be a finite number, got {guidance}")
    if not 0 <= seed <= 2**64 - num_images:
        raise CommandError(f"--seed must be in [0, 2**64 - --num-images], got {seed}")
    compile_setting = compile_option(compile)
    rows_per_call = max_batch_size_option(max_batch_size)
    if lora_scale is not None:
        _check_lora_scale(lora_scale, basis_sources)
    out = Output.parse(out)
    _check_out(out)
    scheduler_cls = scheduler_class(scheduler) if scheduler else None
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")

    if base is None:
        from .presets import digits

        blend = Blend(
            digits.load_pipeline().to(dtype=getattr(torch, DTYPES[dtype])),
            basis=basis_sources,
            compile=compile_setting,
            max_batch_size=rows_per_call,
            denoiser=denoiser,
        )
    else:
        blend = Blend.from_pretrained(
            base,
            basis=basis_sources,
            torch_dtype=getattr(torch, DTYPES[dtype]),
            compile=compile_setting,
            max_batch_size=rows_per_call,
            denoiser=denoiser,
        )
    pipe = blend.pipe
    if scheduler_cls is not None:
        pipe.scheduler = scheduler_cls.from_config(pipe.scheduler.config)
    blend.to(device)
    call_defaults = call_defaults_of(pipe)
    steps = steps if steps is not None else call_defaults.get("num_inference_steps")
    guidance_argument, guidance = guidance_setting(guidance, negative_prompt, pipe, call_defaults, blend.base)
    # image j of every setting from seed + j: a sweep's rows differ by their weights alone, each as its own run
    generators = [torch.Generator(device="cpu").manual_seed(seed + image) for _ in sweep for image in range(num_images)]
    kwargs = dict(
        prompt=prompt if len(sweep) == 1 else [prompt] * len(sweep),
        num_inference_steps=steps,
        num_images_per_prompt=num_images,
        generator=generators,
        output_type="pil",
    )
    per_image = [pair for pair in sweep for _ in range(num_images)]
    blend_weights = settings_weights[0] if len(settings_weights) == 1 else [setting for setting, _ in per_image]
    blend_kl_scale = kl_scales[0] if len(kl_scales) == 1 else [value for _, value in per_image]
    kwargs[guidance_argument] = guidance
    if negative_prompt is not None:
        kwargs["negative_prompt"] = negative_prompt
    if height is not None:
        kwargs["height"] = height
    if width is not None:
        kwargs["width"] = width
    if lora_scale is not None:
        if not blend.has_lora_members:  # (a hub id is known to be a LoRA or a denoiser once it is read)
            raise CommandError(NO_LORA_TO_SCALE)
        kwargs[_lora_scale_argument(pipe, call_defaults)] = {"scale": lora_scale}
    images = _run_with_progress(blend, pipe, kwargs, blend_weights, blend_kl_scale, mode, steps)

    import diffusers

    settings = {
        "base": _reproducible_source(base) if base is not None else "digits (embedded)",
        "basis": {
            name: {denoiser: _reproducible_source(path) for denoiser, path in source.items()}
            if isinstance(source, dict)
            else _reproducible_source(source)
            for name, source in basis_sources.items()
        },
        "weights": settings_weights[0] if len(settings_weights) == 1 else settings_weights,
        "kl_scale": kl_scales[0] if len(kl_scales) == 1 else kl_scales,
        "mode": mode,
        "prompt": prompt,
        "negative_prompt": negative_prompt,
        "steps": steps,
        "guidance": guidance,
        "guidance_argument": guidance_argument,
        "seed": seed,
        "num_images": num_images,
        "height": images[0].size[1],
        "width": images[0].size[0],
        "scheduler": {"class": type(pipe.scheduler).__name__, "config": dict(pipe.scheduler.config)},
        "dtype": dtype,
        "device": str(device),
        "compile": compile,
        "max_batch_size": rows_per_call,
        "lora_scale": lora_scale,
        "denoiser": blend.denoiser_names if blend.experts else blend.denoiser_name,
        "versions": {"diffusion_blend": __version__, "diffusers": diffusers.__version__, "torch": torch.__version__},
    }
    for path in save_images(images, out, _jsonable(settings), columns=num_images if len(sweep) > 1 else None):
        typer.echo(str(path))


def _reproducible_source(source: str | None) -> str | None:
    """A model source as the settings file records it: a local path made absolute (the run can be redone from
    anywhere), a hub id as given."""
    if source is None or not Path(source).expanduser().exists():
        return source
    return str(Path(source).expanduser().resolve())


def compile_option(mode: str | None) -> bool | dict:
    """``--compile MODE`` as Blend's ``compile`` argument (no option: eager calls)."""
    if mode is None:
        return False
    if mode not in COMPILE_MODES:
        raise CommandError(f"--compile must be one of {', '.join(COMPILE_MODES)}, got {mode!r}")
    return True if mode == "default" else {"mode": mode}


def max_batch_size_option(value: str | None) -> int | str | None:
    """``--max-batch-size N|input`` as Blend's ``max_batch_size`` argument."""
    from .denoiser import INPUT_ROWS

    if value is None or value == INPUT_ROWS:
        return value
    if not value.isdigit() or int(value) < 1:
        raise CommandError(f"--max-batch-size must be a positive integer or 'input', got {value!r}")
    return int(value)


#: Qwen-Image's name for classifier-free guidance (its ``guidance_scale`` feeds a guidance embedding)
TRUE_CFG = "true_cfg_scale"


def call_defaults_of(pipe: Any) -> dict[str, Any]:
    """The pipeline's call arguments and their defaults."""
    return {name: parameter.default for name, parameter in inspect.signature(pipe.__call__).parameters.items()}


def guidance_setting(
    guidance: float | None, negative_prompt: str | None, pipe: Any, defaults: dict[str, Any], denoiser: Any
) -> tuple:
    """``--guidance`` as (the pipeline argument it sets, its value; the pipeline's default when not given), from the
    pipeline's call ``defaults`` (:func:`call_defaults_of`).

    The argument is ``guidance_scale`` (classifier-free guidance, or the guidance distilled into FLUX.1-dev's
    embedding), but ``true_cfg_scale`` where ``guidance_scale`` defaults to None and the denoiser has no guidance
    embedding to feed it to (Qwen-Image would ignore it); that guidance runs only with a negative prompt."""
    distilled = getattr(getattr(denoiser, "config", None), "guidance_embeds", False)
    argument = (
        TRUE_CFG
        if TRUE_CFG in defaults and defaults.get("guidance_scale") is None and not distilled
        else "guidance_scale"
    )
    if argument == TRUE_CFG and guidance is not None and guidance > 1 and negative_prompt is None:
        raise CommandError(
            f"--guidance for {type(pipe).__name__} is its true classifier-free guidance "
            "(true_cfg_scale), which runs only with a negative prompt: give --negative-prompt (' ' for none)"
        )
    return argument, guidance if guidance is not None else defaults.get(argument)


def _check_lora_scale(lora_scale: float, basis: dict[str, str | None | dict[str, str | None]]) -> None:
    """``--lora-scale`` is a finite number, and scales LoRA basis models only: not every basis a denoiser folder."""
    from .loading import is_denoiser_folder

    if not math.isfinite(lora_scale):
        raise CommandError(f"--lora-scale must be a finite number, got {lora_scale}")
    if all(is_denoiser_folder(Path(path).expanduser()) for path in _paths_of(basis)):
        raise CommandError(NO_LORA_TO_SCALE)


def _lora_scale_argument(pipe: Any, call_parameters: dict) -> str:
    """The pipeline argument that carries a LoRA scale (``cross_attention_kwargs`` for SD, ``joint_attention_kwargs``
    for SD3/Flux, ...), for ``--lora-scale``."""
    from .denoiser import lora_scale_parameter

    argument = lora_scale_parameter(call_parameters)
    if argument is None:
        raise CommandError(f"--lora-scale: {type(pipe).__name__} takes no LoRA scale")
    return argument


def quiet_libraries() -> None:
    """Silence the libraries' own logs, warnings and progress bars: the CLI reports progress and errors itself."""
    import warnings

    import diffusers
    import transformers

    warnings.filterwarnings("ignore")
    for library in (diffusers, transformers):
        library.utils.logging.set_verbosity_error()
        library.utils.logging.disable_progress_bar()


def _run_with_progress(blend, pipe, kwargs, weights, kl_scale, mode, steps) -> list:
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    pipe.set_progress_bar_config(disable=True)
    with Progress(
        TextColumn("denoising"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total}"),
        TimeElapsedColumn(),
        transient=True,
        console=Console(stderr=True),
    ) as progress:  # stdout: the paths
        task = progress.add_task("denoising", total=steps)

        def on_step_end(_pipe, _step, _timestep, callback_kwargs):
            progress.advance(task)
            return callback_kwargs

        if "callback_on_step_end" in inspect.signature(pipe.__call__).parameters:
            kwargs["callback_on_step_end"] = on_step_end
        return blend.blend(weights=weights, kl_scale=kl_scale, mode=mode, **kwargs).images


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(key): _jsonable(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(item) for item in value]
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return str(value)


# --------------------------------------------------------------------------------------------------------- demo
@app.command()
def demo(
    out: Annotated[Path, typer.Option(help="Folder for sweep.png and rewards.png.")] = Path("diffusion-blend-demo"),
    seed: Annotated[int, typer.Option(help="Random seed (the same seed gives the same pictures).")] = 0,
    device: Annotated[str | None, typer.Option(help="torch device (default: cuda when available, else cpu).")] = None,
) -> None:
    """Blend the embedded digits model's basis models across weights: a picture of the sweep and one of the rewards."""
    run_reporting_errors(_demo, out=out, seed=seed, device=device)


def _demo(out: Path, seed: int, device: str | None) -> None:
    import torch

    from .presets.digits.demo import run_demo

    quiet_libraries()
    if out.exists() and not out.is_dir():
        raise CommandError(f"--out: {out} exists and is not a folder")
    for path in run_demo(out, seed=seed, device=device or ("cuda" if torch.cuda.is_available() else "cpu")):
        typer.echo(str(path))


# ----------------------------------------------------------------------------------------------------------- ui
@app.command()
def ui(
    base: Annotated[
        str | None,
        typer.Option(
            help="Base pipeline (folder or hub id); default: the embedded digits "
            "model with its basis models and rewards."
        ),
    ] = None,
    basis: Annotated[list[str] | None, typer.Option(help="NAME=PATH of a basis model (with --base); repeat.")] = None,
    reward: Annotated[
        list[str] | None,
        typer.Option(help="A reward model to score each image with: a registry name or module:function; repeat it."),
    ] = None,
    prompt: Annotated[str, typer.Option(help="The prompt the page opens with.")] = "3",
    front: Annotated[
        Path | None,
        typer.Option(
            help="A sweep's results.json of this setting: its fronts are drawn behind the images in reward space."
        ),
    ] = None,
    host: Annotated[
        str,
        typer.Option(
            help="Address to bind: 127.0.0.1 serves this machine only; 0.0.0.0 serves "
            "anyone who can reach it (no authentication)."
        ),
    ] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to serve on.")] = 7860,
) -> None:
    """Serve a local web page with one slider per basis model: move the sliders, press Generate."""
    run_reporting_errors(
        _ui, base=base, basis=basis or [], reward=reward or [], prompt=prompt, front=front, host=host, port=port
    )


def _ui(
    base: str | None, basis: list[str], reward: list[str], prompt: str, front: Path | None, host: str, port: int
) -> None:
    from .ui import Page, digits_page, read_front, require_gradio, serve

    require_gradio()
    quiet_libraries()
    sweep_front = read_front(front) if front is not None else None
    if base is None:
        if basis or reward:
            raise CommandError("--basis and --reward go with --base (the embedded model brings its own)")
        page = digits_page(sweep_front)
    else:
        from diffusers import DiffusionPipeline

        from .pipeline import Blend
        from .rewards import parse_reward

        if not basis:
            raise CommandError("--base needs at least one --basis NAME=PATH")
        if base.startswith((".", "/", "~")) and not Path(base).expanduser().is_dir():
            raise CommandError(f"--base: {base} is not a folder")
        blend = Blend(DiffusionPipeline.from_pretrained(base), basis=parse_basis(basis))
        page = Page(blend, {spec: parse_reward(spec) for spec in reward}, prompt=prompt, front=sweep_front)
    typer.echo(f"serving on http://{host}:{port}/ (Ctrl+C stops)", err=True)
    serve(page, host=host, port=port)


# -------------------------------------------------------------------------------------------------------- sweep
@app.command()
def sweep(
    config: Annotated[Path | None, typer.Argument(help="The sweep's YAML configuration.")] = None,
    out: Annotated[
        Path,
        typer.Option(
            help="Folder for results.json, samples.csv, pareto.png, grid.png, report.md (and the resumable cells/)."
        ),
    ] = Path("sweep"),
    preset: Annotated[str | None, typer.Option(help="A built-in configuration instead: digits or lab.")] = None,
    device: Annotated[str | None, typer.Option(help="torch device (default: cuda when available, else cpu).")] = None,
) -> None:
    """Every method at every preference weight, scored by every reward: a Pareto plot, an image grid, a report.

    A rerun into the same --out finishes what is missing; under ``accelerate launch -m diffusion_blend sweep`` the
    processes share the work."""
    run_reporting_errors(_sweep, config=config, out=out, preset=preset, device=device)


def _sweep(config: Path | None, out: Path, preset: str | None, device: str | None) -> None:
    from .evaluate import run_sweep

    quiet_libraries()
    if out.exists() and not out.is_dir():
        raise CommandError(f"--out: {out} exists and is not a folder")
    for path in run_sweep(config, out, preset=preset, device=device or default_device()):
        typer.echo(str(path))


def default_device() -> str:
    """cuda when available, else cpu; under accelerate, this process's device."""
    import torch

    if torch.cuda.is_available():
        from accelerate import PartialState

        return str(PartialState().device)
    return "cpu"


# ----------------------------------------------------------------------------------------------------- finetune
@app.command()
def finetune(
    reward: Annotated[
        str, typer.Option(help="Reward: a name, NAME=W,... (a mix: the MORL oracle) or module:function.")
    ],
    alpha: Annotated[float, typer.Option(help="KL weight α: the basis model samples p_base·exp(r/α).")],
    out: Annotated[Path, typer.Option(help="Folder for the LoRA (a basis Blend loads), finetune.json, metrics.jsonl.")],
    base: Annotated[
        str | None,
        typer.Option(
            help="Base pipeline (Stable Diffusion 1.x/2.x): a local folder or a hub "
            "id (default: the embedded digits model)."
        ),
    ] = None,
    prompts: Annotated[
        Path | None,
        typer.Option(help="A text file, one prompt per line (default with the digits model: the ten digits)."),
    ] = None,
    method: Annotated[
        str | None, typer.Option(help="weighted-dsm (default), adjoint-matching or policy-gradient.")
    ] = None,
    lora_rank: Annotated[int, typer.Option(help="LoRA rank.")] = 4,
    steps: Annotated[int, typer.Option(help="Optimizer updates.")] = 200,
    batch_size: Annotated[int, typer.Option(help="Samples per update (rollouts, or regression rows).")] = 8,
    lr: Annotated[float, typer.Option(help="Learning rate.")] = 1e-4,
    seed: Annotated[int, typer.Option(help="Random seed (the same seed gives the same adapter).")] = 0,
    sampler: Annotated[str, typer.Option(help="The sampling path: ddim or ddpm.")] = "ddim",
    sampler_steps: Annotated[int, typer.Option(help="Steps of the sampling path.")] = 50,
    eta: Annotated[float, typer.Option(help="DDIM η of the path (1: DDPM's noise; 0 only for weighted-dsm).")] = 1.0,
    guidance: Annotated[float, typer.Option(help="Classifier-free guidance of the rollouts (1: none).")] = 1.0,
    option: Annotated[
        list[str] | None,
        typer.Option(
            help="A method option NAME=VALUE (e.g. round_samples=512, regressed_steps=10); repeat for several."
        ),
    ] = None,
    weights_path: Annotated[list[str] | None, typer.Option(help="Reward weights: PATH or NAME=PATH.")] = None,
    checkpoint_every: Annotated[int, typer.Option(help="Checkpoint every N updates.")] = 50,
    eval_samples: Annotated[
        int, typer.Option(help="Samples of the closing evaluation (reward and KL vs the base).")
    ] = 16,
    resume: Annotated[bool, typer.Option(help="Continue the run in --out from its last checkpoint.")] = False,
    overwrite: Annotated[bool, typer.Option(help="Replace the run in --out.")] = False,
    device: Annotated[str | None, typer.Option(help="torch device (default: cuda when available, else cpu).")] = None,
    mixed_precision: Annotated[str, typer.Option(help="no, fp16 or bf16 (accelerate's autocast).")] = "no",
    gradient_checkpointing: Annotated[bool, typer.Option(help="Recompute the UNet's activations in backward.")] = False,
    log_with: Annotated[
        list[str] | None, typer.Option(help="An accelerate tracker (tensorboard, wandb) for the metrics.")
    ] = None,
) -> None:
    """Fine-tune a basis model: a LoRA whose sampler follows p_base·exp(r/α) (runs under accelerate launch too)."""
    run_reporting_errors(_finetune, **locals())


def _finetune(
    base,
    reward,
    alpha,
    prompts,
    out,
    method,
    lora_rank,
    steps,
    batch_size,
    lr,
    seed,
    sampler,
    sampler_steps,
    eta,
    guidance,
    option,
    weights_path,
    checkpoint_every,
    eval_samples,
    resume,
    overwrite,
    device,
    mixed_precision,
    gradient_checkpointing,
    log_with,
) -> None:
    from .finetune import finetune as run_finetune
    from .finetune import read_prompts
    from .rewards import parse_weighted

    quiet_libraries()
    if base is None:
        from .presets.digits.finetune import ALL_DIGITS, finetune_digits

        chosen = read_prompts(prompts) if prompts is not None else ALL_DIGITS
        run_finetune = functools.partial(finetune_digits, prompts=chosen)  # noqa: F811 (the embedded model's)
    elif prompts is None:
        raise CommandError("--prompts: give a prompts file (one prompt per line) for --base")
    else:
        run_finetune = functools.partial(run_finetune, base, prompts=prompts)
    record = run_finetune(
        reward,
        alpha,
        out=out,
        method=method,
        lora_rank=lora_rank,
        steps=steps,
        batch_size=batch_size,
        lr=lr,
        seed=seed,
        sampler=sampler,
        sampler_steps=sampler_steps,
        eta=eta,
        guidance_scale=guidance,
        weights_paths=parse_weights_paths(weights_path, list(parse_weighted(reward))),
        options=parse_options(option or []),
        checkpoint_every=checkpoint_every,
        eval_samples=eval_samples,
        resume=resume,
        overwrite=overwrite,
        device=device,
        mixed_precision=mixed_precision,
        gradient_checkpointing=gradient_checkpointing,
        log_with=tuple(log_with or ()),
    )
    from accelerate import PartialState

    if PartialState().is_main_process:  # (under accelerate launch, one process reports)
        evaluation = record["evaluation"]
        typer.echo(str(out / "pytorch_lora_weights.safetensors"))
        typer.echo(
            f"reward {evaluation['finetuned_reward']:.4g} (base {evaluation['base_reward']:.4g}), path KL "
            f"{evaluation['kl']:.4g}",
            err=True,
        )


def parse_options(items: list[str]) -> dict[str, int | float | bool]:
    """``--option NAME=VALUE`` → a method option (an integer, a number, or true/false)."""
    options: dict[str, int | float | bool] = {}
    for item in items:
        name, sep, value = (part.strip() for part in item.partition("="))
        if not sep or not name or not value:
            raise CommandError(f"--option: {item!r} is not NAME=VALUE")
        name = name.replace("-", "_")
        if value.lower() in ("true", "false"):
            options[name] = value.lower() == "true"
            continue
        try:
            options[name] = int(value)
        except ValueError:
            try:
                options[name] = float(value)
            except ValueError:
                raise CommandError(f"--option: {name} = {value!r} is not a number") from None
    return options


# ---------------------------------------------------------------------------------------------------------- lab
lab_app = typer.Typer(
    help="The exact ground truth: a Gaussian-mixture base, quadratic rewards, closed-form targets.",
    no_args_is_help=True,
)
app.add_typer(lab_app, name="lab")


def _lab_scenario(scenario: Path | None, alpha: float | None, dim: int = 2):
    from .lab import grid_scenario, load_scenario

    loaded = load_scenario(scenario) if scenario is not None else grid_scenario(dim)
    return loaded.with_alpha(alpha) if alpha is not None else loaded


def _float_list(text: str, what: str) -> list[float]:
    try:
        values = [float(item) for item in text.split(",") if item.strip()]
    except ValueError:
        raise CommandError(f"{what}: {text!r} is not a comma-separated list of numbers") from None
    if not values:
        raise CommandError(f"{what}: give at least one number")
    return values


@lab_app.command("run")
def lab_run(
    weights: Annotated[str, typer.Option(help="NAME=W,... over the scenario's rewards (r1, r2 by default).")],
    scenario: Annotated[
        Path | None, typer.Option(help="A scenario YAML/JSON file (default: the built-in one).")
    ] = None,
    alpha: Annotated[
        float | None, typer.Option(help="KL weight α of the fine-tuning (default: the scenario's).")
    ] = None,
    kl_scale: Annotated[float, typer.Option(help="λ: the target is fine-tuned with α/λ.")] = 1.0,
    samples: Annotated[int, typer.Option(help="Samples per method.")] = 20_000,
    steps: Annotated[int, typer.Option(help="Sampler steps.")] = 200,
    eta: Annotated[float, typer.Option(help="DDIM η (0: deterministic, 1: DDPM-like).")] = 0.0,
    seed: Annotated[int, typer.Option(help="Random seed.")] = 0,
    scheduler: Annotated[str, typer.Option(help="ddim, ddpm, euler or dpm.")] = "ddim",
    prior: Annotated[str, typer.Option(help="x_T: exact (the target's law at T) or gaussian (N(0, I)).")] = "exact",
    smc: Annotated[
        int | None,
        typer.Option(
            help="Also run db-smc: the blend corrected by sequential Monte Carlo "
            "with this many particles per sample (--eta > 0 or ddpm)."
        ),
    ] = None,
    smc_tempering: Annotated[str, typer.Option(help="The SMC potential's tempering: none or sqrt_alpha_bar.")] = "none",
    json_output: Annotated[bool, typer.Option("--json", help="Print exactly one JSON object.")] = False,
) -> None:
    """Sample the oracle, the blends and the base, and measure them against the exact target."""
    run_reporting_errors(_lab_run, **locals())


def _lab_run(
    weights, scenario, alpha, kl_scale, samples, steps, eta, seed, scheduler, prior, smc, smc_tempering, json_output
) -> None:
    from .blend import parse_named_numbers
    from .lab import run_lab
    from .lab.report import run_table
    from .smc import SMC

    chosen = _lab_scenario(scenario, alpha)
    corrector = None if smc is None else SMC(particles=smc, tempering=smc_tempering)
    report = run_lab(
        chosen,
        parse_named_numbers(weights, "--weights"),
        kl_scale,
        samples=samples,
        steps=steps,
        eta=eta,
        seed=seed,
        scheduler=scheduler,
        prior=prior,
        smc=corrector,
    )
    typer.echo(json.dumps(report) if json_output else run_table(report), nl=json_output)


@lab_app.command("sweep")
def lab_sweep(
    out: Annotated[Path, typer.Option(help="Folder for sweep.csv, sweep.json and the plots.")],
    scenario: Annotated[Path | None, typer.Option(help="A scenario file (default: the built-in 2-d one).")] = None,
    alphas: Annotated[str, typer.Option(help="Comma-separated KL weights α.")] = "2,1,0.5,0.25",
    kl_scales: Annotated[str, typer.Option(help="Comma-separated λ.")] = "0.5,1,2",
    points: Annotated[int, typer.Option(help="Weight points along the simplex (two rewards).")] = 5,
    three_rewards: Annotated[bool, typer.Option(help="Also run m = 3 rewards in d = 3.")] = True,
    samples: Annotated[int, typer.Option(help="Samples per method and grid point.")] = 5000,
    steps: Annotated[int, typer.Option(help="Sampler steps.")] = 100,
    seed: Annotated[int, typer.Option(help="Random seed.")] = 0,
) -> None:
    """Run the lab over weights × α × λ; write a table (CSV, JSON, Markdown summary) and plots (reward fronts, gap
    against α)."""
    run_reporting_errors(_lab_sweep, **locals())


def _lab_sweep(out, scenario, alphas, kl_scales, points, three_rewards, samples, steps, seed) -> None:
    from rich.console import Console
    from rich.progress import Progress

    from .blend import validate_kl_scale
    from .lab.report import plot_fronts, plot_gap, rows_as_csv, rows_as_json, rows_as_markdown, sweep, sweep_size

    alpha_values, kl_values = _float_list(alphas, "--alphas"), _float_list(kl_scales, "--kl-scales")
    kl_values = [validate_kl_scale(value) for value in kl_values]
    bad_alphas = [value for value in alpha_values if not (math.isfinite(value) and value > 0)]
    if bad_alphas:
        raise CommandError(f"--alphas must be finite numbers > 0, got {bad_alphas[0]}")
    if points < 2:
        raise CommandError(f"--points must be >= 2, got {points}")
    if out.exists() and not out.is_dir():
        raise CommandError(f"--out: {out} exists and is not a folder")
    scenarios = [_lab_scenario(scenario, None)] + ([_lab_scenario(None, None, dim=3)] if three_rewards else [])
    with Progress(transient=True, console=Console(stderr=True)) as progress:
        task = progress.add_task("sweeping", total=sweep_size(scenarios, alpha_values, kl_values, points))
        rows = sweep(
            scenarios,
            alpha_values,
            kl_values,
            points,
            samples=samples,
            steps=steps,
            seed=seed,
            progress=lambda: progress.advance(task),
        )
    writers = {
        out / "sweep.csv": lambda temp: temp.write_text(rows_as_csv(rows)),
        out / "sweep.json": lambda temp: temp.write_text(rows_as_json(rows)),
        out / "summary.md": lambda temp: temp.write_text(rows_as_markdown(rows)),
        out / "fronts.png": lambda temp: plot_fronts(rows, scenarios[0], alpha_values, temp),
        out / "gap_vs_alpha.png": lambda temp: plot_gap(rows, scenarios[0], temp),
    }
    write_atomically(writers)
    for path in writers:
        typer.echo(str(path))


@lab_app.command("finetune")
def lab_finetune(
    reward: Annotated[
        str,
        typer.Option(
            help="NAME=W,... over the scenario's rewards: the reward to fine-tune for (a mix gives the MORL oracle)."
        ),
    ] = "r1=1",
    alpha: Annotated[float | None, typer.Option(help="KL weight α (default: the scenario's).")] = None,
    method: Annotated[
        str | None, typer.Option(help="adjoint-matching (default), policy-gradient or weighted-dsm.")
    ] = None,
    steps: Annotated[int | None, typer.Option(help="Optimizer updates (default: the method's lab default).")] = None,
    lr: Annotated[float | None, typer.Option(help="Learning rate (default: the method's lab default).")] = None,
    seed: Annotated[int, typer.Option(help="Random seed.")] = 0,
    scenario: Annotated[
        Path | None, typer.Option(help="A scenario YAML/JSON file (default: the built-in one).")
    ] = None,
    samples: Annotated[int, typer.Option(help="Samples measuring what the fine-tuned model reaches.")] = 20_000,
    out: Annotated[
        Path | None, typer.Option(help="Folder for the network, finetune.json, metrics and checkpoints.")
    ] = None,
    checkpoint_every: Annotated[int, typer.Option(help="Checkpoint the run every N updates.")] = 50,
    resume: Annotated[bool, typer.Option(help="Continue the run in --out from its last checkpoint.")] = False,
    overwrite: Annotated[bool, typer.Option(help="Replace the run in --out.")] = False,
    json_output: Annotated[bool, typer.Option("--json", help="Print exactly one JSON object.")] = False,
) -> None:
    """Fine-tune a network on the lab's exact base and compare what it reaches with the exact tilted target."""
    run_reporting_errors(_lab_finetune, **locals())


def _lab_finetune(
    reward, alpha, method, steps, lr, seed, scenario, samples, out, checkpoint_every, resume, overwrite, json_output
) -> None:
    from .blend import parse_named_numbers
    from .finetune.lab import lab_finetune as finetune_lab
    from .lab.report import finetune_table

    if (resume or overwrite) and out is None:
        raise CommandError("--resume and --overwrite need --out")
    if alpha is not None and not (math.isfinite(alpha) and alpha > 0):
        raise CommandError(f"--alpha must be a finite number > 0, got {alpha}")
    chosen = _lab_scenario(scenario, alpha)
    report = finetune_lab(
        chosen,
        parse_named_numbers(reward, "--reward"),
        method=method,
        steps=steps,
        lr=lr,
        seed=seed,
        samples=samples,
        out=out,
        checkpoint_every=checkpoint_every,
        resume=resume,
        overwrite=overwrite,
        progress=not json_output,
    )
    typer.echo(json.dumps(report) if json_output else finetune_table(report), nl=json_output)


# ------------------------------------------------------------------------------------------------------ rewards
rewards_app = typer.Typer(help="The reward models that define preferences.", no_args_is_help=True)
app.add_typer(rewards_app, name="rewards")


@rewards_app.command("list")
def rewards_list() -> None:
    """List the registered rewards: what each measures, where its weights come from, whether it is differentiable."""
    from rich.console import Console
    from rich.table import Table

    from .rewards import ALIASES, list_rewards

    table = Table(title="rewards (also: lab:<name>, module:function, weighted sums like ir=0.5,aes=0.5)")
    for column in ("name", "aliases", "measures", "weights", "differentiable", "licence"):
        table.add_column(column)
    for name, info in list_rewards().items():
        aliases = ", ".join(alias for alias, target in ALIASES.items() if target == name)
        table.add_row(name, aliases, info.measures, info.weights, "yes" if info.differentiable else "no", info.licence)
    Console(width=160).print(table)


@app.command()
def score(
    images: Annotated[list[Path], typer.Argument(help="Image files to score.")],
    reward: Annotated[str, typer.Option(help="A reward name, a weighted sum (ir=0.5,aes=0.5) or module:function.")],
    prompt: Annotated[str, typer.Option(help="The prompt the images were made for.")],
    weights_path: Annotated[
        list[str] | None,
        typer.Option(
            help="A reward's weights (folder, file or hub id): PATH for a single reward, NAME=PATH in a sum; repeat."
        ),
    ] = None,
    batch_size: Annotated[int, typer.Option(help="Images scored per batch.")] = 16,
    device: Annotated[str | None, typer.Option(help="torch device (default: cuda when available, else cpu).")] = None,
    json_output: Annotated[bool, typer.Option("--json", help="Print a JSON list of {image, score}.")] = False,
) -> None:
    """Score images with a reward model."""
    run_reporting_errors(_score, **locals())


def parse_weights_paths(items: list[str] | None, names: list[str]) -> dict[str, str]:
    """``--weights-path`` values → reward name → path: ``NAME=PATH``, or a bare ``PATH`` when there is one reward."""
    paths: dict[str, str] = {}
    for item in items or []:
        name, sep, path = item.partition("=")
        if sep and name in names:
            paths[name] = path
        elif len(names) == 1:
            paths[names[0]] = item
        else:
            raise CommandError(f"--weights-path: {item!r} must be NAME=PATH with NAME one of {', '.join(names)}")
    return paths


def _score(images, reward, prompt, weights_path, batch_size, device, json_output) -> None:
    import numpy as np
    import torch
    from PIL import Image, UnidentifiedImageError

    from .rewards import parse_reward, parse_weighted

    quiet_libraries()
    pixels = []
    for path in images:
        try:
            with Image.open(path) as image:
                pixels.append(np.asarray(image.convert("RGB")))
        except (OSError, UnidentifiedImageError) as error:
            raise CommandError(f"{path}: not a readable image ({error})") from error
    if len({p.shape for p in pixels}) > 1:
        raise CommandError("images must share one size to be scored as a batch")
    if batch_size < 1:
        raise CommandError(f"--batch-size must be >= 1, got {batch_size}")
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    paths = parse_weights_paths(weights_path, list(parse_weighted(reward)))
    model = parse_reward(reward, paths=paths, device=device)
    scores = []
    for start in range(0, len(pixels), batch_size):
        chunk = torch.from_numpy(np.stack(pixels[start : start + batch_size])).permute(0, 3, 1, 2)
        scores += model(chunk.float().div(255).to(device), [prompt] * len(chunk)).tolist()
    if json_output:
        typer.echo(json.dumps([{"image": str(path), "score": value} for path, value in zip(images, scores)]))
        return
    width = max(len(str(path)) for path in images)
    for path, value in zip(images, scores):
        typer.echo(f"{str(path):<{width}}  {value:.6g}")


if __name__ == "__main__":
    app()
