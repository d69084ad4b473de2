"""Blend speed and memory, as ratios measured side by side in one run (never a bare absolute time).

    python benchmarks/blend_speed.py [--config tiny|tiny-r8-b2|mid|sd15] [--members M] [--batch B] [--steps S] [--json]

Every timed quantity is the denoiser work of S denoising steps (default 1) with classifier-free guidance (2·B rows
per step), on random-weight UNets of the named architecture (``sd15`` is the Stable Diffusion 1.5 UNet: same FLOPs
as the real one) with rank-4 LoRA basis members on to_q/to_k/to_v/to_out, as the method's published checkpoints
(``tiny-r8-b2``: rank 8, batch 2 by default).
Reported ratios:

  (a) mpa_over_single     DB-MPA (λ = 1, Σw = 1, M members)      / one fine-tuned model (base + one active LoRA)
  (b) ls_over_single      DB-MPA-LS (stochastic, M members)      / one fine-tuned model
  (c) overhead            joint blend (λ ≠ 1: base + M members)  / the M + 1 plain calls it replaces
      sequential_overhead the same blend with one call per member (batch_members=False)
  (d) memory              base + M adapters / one model, in parameter bytes
      peak_memory         the peak memory of a DB-MPA step / a single model's (stacked; _chunked: chunked to the
                          single model's rows): on CUDA the allocator's peak, elsewhere the weights plus the peak
                          bytes of live tensors made in the step (allocator-independent, the same on any machine)
  --full                  also full-module members: the joint blend one call per member, and vmapped over their
                          stacked weights, each over the M + 1 separate model calls
  --compile [MODE]        also everything above under torch.compile (static shapes; MODE: default,
                          reduce-overhead, max-autotune), in a second rotation: compiled_* ratios over compiled plain
                          calls, and compile_speedup = eager single model / compiled single model
  host_share_*            on CUDA: the time the host took to issue a variant's calls over its whole time (near 1:
                          the GPU waited for Python, so per-call host work shows in the ratios)
  launches_*              operations launched per denoising step (views excluded; a kernel each on a GPU) over the
                          single model's: what (a) and (b) tend to when the host is the bottleneck (any device)
  --sweep N               also (e) sweep_over_separate: the joint blend at N weight mixes in one batch (weights per
                          sample) / N joint blends, one per mix (a sweep over weights)
  --no-sequential         skip the joint blend with one call per member (sequential_overhead)
  --clock cpu             time the CPU time of the timing thread with torch on that one thread (default: wall-clock
                          time): on a machine whose cores other work shares, the host work of each variant, without
                          the time spent waiting for a core (CPU only)
  --summarize FILE        only print the runs saved in a JSON-lines file (gpu_check.sh's results.jsonl) as a table

Each repeat times every variant once, in a rotating order, after warm-up (runs of two steps: kernels chosen,
memory allocated, graphs compiled or recorded); the ratios are medians over repeats of per-repeat ratios, so slow
drifts of a shared machine cancel.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import statistics
import sys
import time
import weakref
from collections.abc import Callable
from pathlib import Path

import torch
from diffusers import UNet2DConditionModel
from peft import LoraConfig
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from diffusion_blend import BlendedDenoiser

#: the tests' tiny UNet (tests/helpers/tiny.py)
TINY_UNET = dict(
    block_out_channels=(4, 8),
    layers_per_block=1,
    sample_size=8,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
    cross_attention_dim=8,
    norm_num_groups=2,
    attention_head_dim=2,
)
CONFIGS = {
    # the tests' tiny UNet: a call's fixed cost dominates
    "tiny": dict(
        unet=TINY_UNET,
        latent=8,
        context=(77, 8),
    ),
    # the tests' tiny UNet with rank-8 members, batch 2 = two images with CFG: 4 rows per plain call, 12 in the joint
    # blend's stacked call (base + 2 members). A call costs its host work (Python, dispatch), as a GPU's at batch 1
    "tiny-r8-b2": dict(
        unet=TINY_UNET,
        latent=8,
        context=(77, 8),
        rank=8,
        batch=2,
    ),
    # a mid-size UNet: FLOPs dominate on a CPU
    "mid": dict(
        unet=dict(
            block_out_channels=(64, 128),
            layers_per_block=1,
            sample_size=32,
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
            cross_attention_dim=128,
            attention_head_dim=8,
        ),
        latent=32,
        context=(77, 128),
    ),
    # Stable Diffusion 1.5's UNet (diffusers' defaults with its 768-wide text context), 512² images
    "sd15": dict(unet=dict(cross_attention_dim=768, sample_size=64), latent=64, context=(77, 768)),
}
#: steps per warm-up run: the second call of a CUDA-graph-compiled function is the one that records its graph
WARMUP_STEPS = 2
#: what a run is timed with: wall-clock time, or the CPU time of the timing thread (torch then runs on that thread
#: alone), which leaves out the time spent waiting for a core that other processes share
CLOCKS = {"wall": time.perf_counter, "cpu": time.thread_time}
#: every ratio a run may report, with what it is
RATIOS = {
    "mpa_over_single": "(a) DB-MPA / single model",
    "ls_over_single": "(b) DB-MPA-LS / single model",
    "overhead": "(c) blend / the M+1 calls it replaces",
    "sequential_overhead": "(c) the same, one call per member",
    "memory": "(d) parameter memory / single model",
    "peak_memory": "(d) peak memory / single model",
    "peak_memory_chunked": "(d) the same, chunked to the single's rows",
    "full_sequential_overhead": "(c) full members one by one / M+1 calls",
    "full_vmap_overhead": "(c) full members vmapped / M+1 calls",
    "sweep_over_separate": "(e) N mixes in one batch / one blend each",
    "compiled_mpa_over_single": "(a) compiled",
    "compiled_ls_over_single": "(b) compiled",
    "compiled_overhead": "(c) compiled",
    "compile_speedup": "eager single / compiled single",
    "host_share_single": "issue time / time: single (1 = host-bound)",
    "host_share_mpa": "issue time / time: DB-MPA",
    "host_share_ls": "issue time / time: DB-MPA-LS",
    "launches_mpa_over_single": "(a) operations launched per step",
    "launches_ls_over_single": "(b) operations launched per step",
}
#: dispatched operations that compute nothing (a view or other metadata change, no kernel)
METADATA_ONLY = {"detach", "lift_fresh", "_unsafe_view", "_reshape_alias"}
LORA = dict(lora_alpha=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"], init_lora_weights=False)


def build(config: str, members: int, dtype: torch.dtype, device: str, latent: int | None):
    """A random UNet of the named architecture with ``members`` LoRA adapters (loaded, inactive) and CFG inputs."""
    torch.manual_seed(0)
    spec = CONFIGS[config]
    unet = random_unet(config, device)
    names = [f"m{i}" for i in range(members)]
    for name in names:
        unet.add_adapter(LoraConfig(r=spec.get("rank", 4), **LORA), adapter_name=name)
    unet.set_adapter([])
    unet.requires_grad_(False)
    unet.to(device=device, dtype=dtype)
    size = latent or spec["latent"]
    return unet, names, size


def random_unet(config: str, device: str) -> UNet2DConditionModel:
    """A random-weight UNet of the named architecture, initialised on ``device`` (an SD1.5 UNet takes seconds to
    initialise on a CPU, a fraction of that on a GPU)."""
    with torch.device(device):
        return UNet2DConditionModel(**CONFIGS[config]["unet"]).eval().requires_grad_(False)


def inputs(unet, batch: int, size: int, context: tuple[int, int]):
    """A classifier-free-guidance batch: [uncond; cond] share their latents."""
    parameter = next(unet.parameters())
    latents = torch.randn(batch, unet.config.in_channels, size, size, device=parameter.device, dtype=parameter.dtype)
    hidden = torch.randn(2 * batch, *context, device=parameter.device, dtype=parameter.dtype)
    return (torch.cat([latents, latents]), torch.tensor(500, device=parameter.device)), {
        "encoder_hidden_states": hidden
    }


def blended_denoiser(unet, names, batch_members=True, compile=False, max_batch_size=None, **blend) -> BlendedDenoiser:
    denoiser = BlendedDenoiser(
        unet,
        {name: name for name in names},
        batch_members=batch_members,
        compile=compile,
        max_batch_size=max_batch_size,
    )
    denoiser.set_blend({name: 1.0 / len(names) for name in names}, **blend)
    return denoiser


def variants(
    unet, names, args, kwargs, compile: dict | None = None, sequential: bool = True
) -> dict[str, tuple[Callable[[], object], Callable[[int], object]]]:
    """Each timed quantity as (untimed setup, timed call) doing the denoiser work of the given number of denoising
    steps.

    A plain call is the model alone with its adapter already active (switching adapters is not timed: the
    baseline is as fast as separate models would be). Blended calls run inside one routing context, as in a
    pipeline call (Blend installs the LoRA routing once per image). With ``compile`` (torch.compile
    options) the plain calls and the blends are compiled alike; ``sequential`` adds the joint blend called one
    member at a time (eager only).
    """
    options = compile if compile is not None else False
    denoisers = {
        "mpa": blended_denoiser(unet, names, compile=options),
        "ls": blended_denoiser(
            unet, names, compile=options, mode="stochastic", generator=torch.Generator().manual_seed(0)
        ),
        "joint": blended_denoiser(unet, names, compile=options, kl_scale=1.5),
    }
    if compile is None and sequential:
        denoisers["joint_sequential"] = blended_denoiser(unet, names, batch_members=False, kl_scale=1.5)
    plain = torch.compile(unet, **compile) if compile is not None else unet

    def plain_steps(steps: int):
        for _ in range(steps):
            plain(*args, **kwargs)

    def blended_steps(denoiser, steps: int):
        with denoiser.routing():
            for _ in range(steps):
                denoiser(*args, **kwargs)

    functions = {}
    for adapter in [None, *names]:
        functions[f"plain:{adapter or 'base'}"] = (
            lambda adapter=adapter: unet.set_adapter([adapter] if adapter else []),
            plain_steps,
        )
    for key, denoiser in denoisers.items():
        functions[key] = (lambda: unet.set_adapter([]), functools.partial(blended_steps, denoiser))
    return functions


def time_variants(
    functions: dict, repeats: int, warmup: int, device: str, steps: int, clock: str = "wall"
) -> dict[str, list[float]]:
    """Per variant, the times of ``repeats`` runs of ``steps`` steps, after ``warmup`` runs of two steps each; under
    ``host:<variant>`` the time the host took to issue them (on a GPU: when it is the whole time, the GPU waited
    for Python). ``clock``: a key of :data:`CLOCKS`."""
    now = CLOCKS[clock]
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    times: dict[str, list[float]] = {key: [] for name in functions for key in (name, f"host:{name}")}
    order = list(functions)
    with torch.no_grad():
        for _ in range(warmup):
            for setup, call in functions.values():
                setup()
                call(WARMUP_STEPS)
        for repeat in range(repeats):
            for name in order[repeat % len(order) :] + order[: repeat % len(order)]:
                setup, call = functions[name]
                setup()
                sync()
                start = now()
                call(steps)
                issued = now()
                sync()
                times[name].append(now() - start)
                times[f"host:{name}"].append(issued - start)
    return times


class Launches(TorchDispatchMode):
    """Counts the operations dispatched inside the block that compute something: a kernel launch each on a GPU, the
    same count on every device."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not func.is_view and func.overloadpacket.__name__ not in METADATA_ONLY:
            self.count += 1
        return func(*args, **(kwargs or {}))


def launches_per_step(setup: Callable[[], object], call: Callable[[int], object]) -> int:
    """Operations one more denoising step launches (a run of three steps minus a run of two: what is done once per
    run, such as a routing context's masks, cancels), after a run that fills the caches kept across runs."""
    counts = []
    with torch.no_grad():
        for steps in (1, 2, 3):
            setup()
            with Launches() as launches:
                call(steps)
            counts.append(launches.count)
    return counts[2] - counts[1]


def median_ratio(times: dict[str, list[float]], numerator: str, denominator: str) -> float:
    """The median over repeats of the per-repeat ratio of two timed quantities (slow drifts cancel)."""
    return statistics.median(a / b for a, b in zip(times[numerator], times[denominator]))


def summed(times: dict[str, list[float]], keys: list[str]) -> list[float]:
    """Per repeat, the total time of several timed quantities (the separate calls a blend replaces)."""
    return [sum(parts) for parts in zip(*(times[key] for key in keys))]


def parameter_memory_ratio(unet, names) -> float:
    """(d) on any device: parameter bytes of the base + M adapters over one fine-tuned model (base + 1 adapter)."""
    total = sum(p.numel() * p.element_size() for p in unet.parameters())
    adapters = sum(p.numel() * p.element_size() for n, p in unet.named_parameters() if "lora_" in n)
    return total / (total - adapters + adapters / len(names))


def peak_memory_ratios(unet, names, args, kwargs, device: str) -> dict[str, float]:
    """(d): peak memory of a DB-MPA step over a single-model step, stacked in one call and chunked to the single
    model's rows (``max_batch_size``). On CUDA the allocator's peak allocated bytes; elsewhere the weights plus the
    peak bytes of live tensors made during the step (:class:`LiveBytes`: what any allocator must hold at least)."""
    candidates = {
        "peak_memory": blended_denoiser(unet, names),
        "peak_memory_chunked": blended_denoiser(unet, names, max_batch_size="input"),
    }
    peak = (
        cuda_peak_bytes
        if device.startswith("cuda")
        else functools.partial(live_peak_bytes, weights=sum(p.numel() * p.element_size() for p in unet.parameters()))
    )
    with torch.no_grad():
        unet.set_adapter([names[0]])
        single = peak(lambda: unet(*args, **kwargs))
        unet.set_adapter([])
        return {key: peak(lambda d=denoiser: d(*args, **kwargs)) / single for key, denoiser in candidates.items()}


def cuda_peak_bytes(call: Callable[[], object]) -> int:
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    call()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated()


def live_peak_bytes(call: Callable[[], object], weights: int) -> int:
    """``weights`` plus the peak of :class:`LiveBytes` over a call (after a first call has filled the caches)."""
    call()
    with LiveBytes() as live:
        call()
    return weights + live.peak


class LiveBytes(TorchDispatchMode):
    """The peak bytes of the storages of tensors made inside the block and still referenced: a storage counts from
    the first operation that returns a tensor on it until the last such tensor is freed (views share their base's
    storage). Tensors made before the block (weights, inputs), their views and in-place results are not counted."""

    def __init__(self):
        super().__init__()
        self.live = self.peak = 0
        self._tensors: dict[int, int] = {}  # storage address → tensors referencing it

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        output = func(*args, **(kwargs or {}))
        inputs = {
            leaf.untyped_storage().data_ptr() for leaf in tree_leaves((args, kwargs)) if isinstance(leaf, torch.Tensor)
        }
        for tensor in tree_leaves(output):
            if isinstance(tensor, torch.Tensor):
                address = tensor.untyped_storage().data_ptr()
                if address in self._tensors or address not in inputs:  # (views and in-place results of tensors
                    self._track(tensor)  # made before the block hold no new bytes)
        return output

    def _track(self, tensor: torch.Tensor) -> None:
        storage = tensor.untyped_storage()
        address, size = storage.data_ptr(), storage.nbytes()
        if address not in self._tensors:
            self._tensors[address] = 0
            self.live += size
            self.peak = max(self.peak, self.live)
        self._tensors[address] += 1
        weakref.finalize(tensor, self._release, address, size)

    def _release(self, address: int, size: int) -> None:
        self._tensors[address] -= 1
        if self._tensors[address] == 0:
            del self._tensors[address]
            self.live -= size


def full_member_ratios(
    config: str, members: int, args, kwargs, dtype, device, repeats: int, warmup: int, steps: int, clock: str = "wall"
) -> dict[str, float]:
    """Full-module members (separate UNets): the joint blend called member by member, and vmapped over stacked
    weights (``vmap_full_members``), each over the M + 1 separate model calls it replaces."""
    models = []
    for seed in range(members + 1):
        torch.manual_seed(seed)
        models.append(random_unet(config, device).to(dtype))
    names = [f"m{i}" for i in range(members)]
    weights = {name: 1.0 / members for name in names}

    def model_steps(model, steps: int):
        for _ in range(steps):
            model(*args, **kwargs)

    functions = {
        f"model:{index}": (lambda: None, functools.partial(model_steps, model)) for index, model in enumerate(models)
    }
    for key, vmap in (("full_sequential", False), ("full_vmap", True)):
        denoiser = BlendedDenoiser(models[0], dict(zip(names, models[1:])), vmap_full_members=vmap)
        denoiser.set_blend(weights, kl_scale=1.5)
        functions[key] = (lambda: None, functools.partial(model_steps, denoiser))
    times = time_variants(functions, repeats, warmup, device, steps, clock)
    times["raw_calls"] = summed(times, [f"model:{i}" for i in range(members + 1)])
    return {f"{key}_overhead": median_ratio(times, key, "raw_calls") for key in ("full_sequential", "full_vmap")}


def compiled_ratios(
    unet,
    names,
    args,
    kwargs,
    steps: int,
    repeats: int,
    warmup: int,
    device: str,
    mode: str,
    backend: str = "inductor",
    clock: str = "wall",
) -> dict[str, float]:
    """The same quantities with every call compiled (static shapes), timed side by side in their own rotation with
    the eager single model (for the compile speedup)."""
    options = {"dynamic": False, "backend": backend} | ({} if mode == "default" else {"mode": mode})
    functions = variants(unet, names, args, kwargs, compile=options)
    functions = {f"compiled_{key}": value for key, value in functions.items()}

    def eager_single(steps: int):
        for _ in range(steps):
            unet(*args, **kwargs)

    functions["eager_single"] = (lambda: unet.set_adapter([names[0]]), eager_single)
    times = time_variants(functions, repeats, warmup, device, steps, clock)
    times["compiled_single"] = times[f"compiled_plain:{names[0]}"]
    times["compiled_raw_calls"] = summed(times, [f"compiled_plain:{a}" for a in ["base", *names]])
    unet.set_adapter([])
    ratio = functools.partial(median_ratio, times)
    return {
        "compile_mode": mode,
        "compiled_mpa_over_single": ratio("compiled_mpa", "compiled_single"),
        "compiled_ls_over_single": ratio("compiled_ls", "compiled_single"),
        "compiled_overhead": ratio("compiled_joint", "compiled_raw_calls"),
        "compile_speedup": ratio("eager_single", "compiled_single"),
    }


def sweep_ratio(
    unet,
    names,
    config: str,
    batch: int,
    size: int,
    mixes: int,
    steps: int,
    repeats: int,
    warmup: int,
    device: str,
    clock: str = "wall",
) -> dict[str, float]:
    """(e) The joint blend (λ = 1.5) at ``mixes`` weight mixes, from all weight on the first member to all on the
    others, in one batch of ``mixes`` times the rows (weights per sample) / one blend per mix on its own rows."""
    spread = [k / (mixes - 1) for k in range(mixes)] if mixes > 1 else [0.0]
    settings = [{name: 1 - s if i == 0 else s / (len(names) - 1) for i, name in enumerate(names)} for s in spread]
    context = CONFIGS[config]["context"]
    swept_args, swept_kwargs = inputs(unet, mixes * batch, size, context)
    args, kwargs = inputs(unet, batch, size, context)
    denoiser = BlendedDenoiser(unet, {name: name for name in names})

    def swept(steps: int):
        denoiser.set_blend([mix for mix in settings for _ in range(batch)], kl_scale=1.5)
        with denoiser.routing():
            for _ in range(steps):
                denoiser(*swept_args, **swept_kwargs)

    def separate(steps: int):
        for mix in settings:
            denoiser.set_blend(mix, kl_scale=1.5)
            with denoiser.routing():
                for _ in range(steps):
                    denoiser(*args, **kwargs)

    functions = {
        name: (lambda: unet.set_adapter([]), call) for name, call in (("sweep", swept), ("separate", separate))
    }
    times = time_variants(functions, repeats, warmup, device, steps, clock)
    return {"sweep_over_separate": median_ratio(times, "sweep", "separate"), "sweep_mixes": mixes}


def run(
    config: str = "tiny",
    members: int = 2,
    batch: int | None = None,
    repeats: int = 20,
    warmup: int = 3,
    dtype: str = "fp32",
    device: str = "cpu",
    latent: int | None = None,
    steps: int = 1,
    full: bool = False,
    compile: str | None = None,
    compile_backend: str = "inductor",
    sequential: bool = True,
    sweep: int | None = None,
    clock: str = "wall",
) -> dict:
    if clock not in CLOCKS:
        raise ValueError(f"clock must be one of {', '.join(CLOCKS)}, got {clock!r}")
    if clock == "cpu" and device.startswith("cuda"):
        raise ValueError("clock='cpu' times the host thread alone, not a GPU's work: use the wall clock on CUDA")
    # (the timing thread's CPU time holds all of torch's work only where torch works on that thread alone)
    with torch_threads(1 if clock == "cpu" else None):
        torch_dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[dtype]
        batch = batch or CONFIGS[config].get("batch", 1)
        unet, names, size = build(config, members, torch_dtype, device, latent)
        args, kwargs = inputs(unet, batch, size, CONFIGS[config]["context"])
        functions = variants(unet, names, args, kwargs, sequential=sequential)
        times = time_variants(functions, repeats, warmup, device, steps, clock)
        times["single"] = times[f"plain:{names[0]}"]
        times["raw_calls"] = summed(times, [f"plain:{a}" for a in ["base", *names]])
        ratio = functools.partial(median_ratio, times)
        memory = {"memory": parameter_memory_ratio(unet, names)}
        compared = {"single": f"plain:{names[0]}", "mpa": "mpa", "ls": "ls"}  # key → the variant it reports on
        launches = {key: launches_per_step(*functions[variant]) for key, variant in compared.items()}
        memory.update({f"launches_{key}_over_single": launches[key] / launches["single"] for key in ("mpa", "ls")})
        memory.update(peak_memory_ratios(unet, names, args, kwargs, device))
        if device.startswith("cuda"):
            memory.update({f"host_share_{key}": ratio(f"host:{variant}", variant) for key, variant in compared.items()})
        if sweep:
            memory.update(sweep_ratio(unet, names, config, batch, size, sweep, steps, repeats, warmup, device, clock))
        if full:
            memory.update(
                full_member_ratios(config, members, args, kwargs, torch_dtype, device, repeats, warmup, steps, clock)
            )
        if compile:
            memory.update(
                compiled_ratios(
                    unet, names, args, kwargs, steps, repeats, warmup, device, compile, compile_backend, clock
                )
            )
        return {
            "config": config,
            "members": members,
            "batch": batch,
            "rows_per_call_cfg": 2 * batch,
            "latent": size,
            "steps": steps,
            "dtype": dtype,
            "device": device,
            "repeats": repeats,
            "clock": clock,
            "threads": torch.get_num_threads(),
            "gpu": torch.cuda.get_device_name() if device.startswith("cuda") else None,
            "mpa_over_single": ratio("mpa", "single"),
            "ls_over_single": ratio("ls", "single"),
            "overhead": ratio("joint", "raw_calls"),
            **({"sequential_overhead": ratio("joint_sequential", "raw_calls")} if sequential else {}),
            **memory,
        }


@contextlib.contextmanager
def torch_threads(threads: int | None):
    """Torch's intra-op threads set to ``threads`` inside the block (None: left as they are)."""
    previous = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", choices=sorted(CONFIGS), default="tiny")
    parser.add_argument("--members", type=int, default=2)
    parser.add_argument(
        "--batch", type=int, help="images per step (the denoiser sees 2× with CFG; default: the config's, else 1)"
    )
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--dtype", choices=["fp32", "fp16", "bf16"], default="fp32")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--latent", type=int, default=None, help="latent side (default: the config's)")
    parser.add_argument("--steps", type=int, default=1, help="denoising steps per timed run (a sampling loop)")
    parser.add_argument("--full", action="store_true", help="also time full-module members (sequential and vmapped)")
    parser.add_argument(
        "--compile",
        nargs="?",
        const="default",
        choices=["default", "reduce-overhead", "max-autotune"],
        help="also time everything compiled with torch.compile (this mode)",
    )
    parser.add_argument("--compile-backend", default="inductor", help="torch.compile backend (default: inductor)")
    parser.add_argument(
        "--sequential",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also time the joint blend with one call per member (default: yes)",
    )
    parser.add_argument("--sweep", type=int, metavar="N", help="also time N weight mixes in one batch (e)")
    parser.add_argument(
        "--clock",
        choices=sorted(CLOCKS),
        default="wall",
        help="wall-clock time, or the timing thread's CPU time with torch on that thread (a shared machine; CPU only)",
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--summarize", metavar="RESULTS_JSONL", help="only print the runs saved in this file")
    options = parser.parse_args(argv)
    if options.summarize:
        summarize(options.summarize)
        return
    if options.sweep is not None and (options.sweep < 1 or options.members < 2):
        parser.error("--sweep N needs N >= 1 and --members >= 2 (the mixes move weight from one member to the others)")
    result = run(
        options.config,
        options.members,
        options.batch,
        options.repeats,
        options.warmup,
        options.dtype,
        options.device,
        options.latent,
        options.steps,
        options.full,
        options.compile,
        options.compile_backend,
        options.sequential,
        options.sweep,
        options.clock,
    )
    if options.json:
        json.dump(result, sys.stdout)
        sys.stdout.write("\n")
        return
    title = f"{options.config}, {options.dtype}, {result['gpu'] or options.device}"
    print_ratios([result], title)


def print_ratios(runs: list[dict], title: str) -> None:
    """A table of the ratios of benchmark runs (one column per run), and any host-synchronisation counts."""
    from rich.console import Console
    from rich.table import Table

    timed = [run for run in runs if "mpa_over_single" in run]
    table = Table(title=title)
    table.add_column("ratio")
    for run in timed:
        table.add_column(f"M={run['members']}, batch {run['batch']}", justify="right")
    for key, label in RATIOS.items():
        if any(key in run for run in timed):
            table.add_row(label, *(f"{run[key]:.3f}" if key in run else "-" for run in timed))
    console = Console(width=160)
    console.print(table)
    for run in runs:
        if "plain_call" in run:
            console.print("host synchronisations:", {k: v for k, v in run.items() if k not in ("config", "gpu")})


def summarize(path: str) -> None:
    """Print the runs of a JSON-lines file of results (``gpu_check.sh``'s results.jsonl) as one table."""
    runs = [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
    timed = [run for run in runs if "mpa_over_single" in run]
    first = timed[0] if timed else {}
    print_ratios(
        runs,
        f"{first.get('config')}, {first.get('dtype')}, {first.get('gpu') or first.get('device')}, "
        f"{first.get('steps')} steps per timed run",
    )


if __name__ == "__main__":
    main()
