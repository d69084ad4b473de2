"""Host synchronisations of blended steps on a GPU, against those of one plain call of the same denoiser.

    python benchmarks/host_sync_check.py [--config tiny|mid|sd15] [--members M] [--json]

A synchronisation (``.item()``, ``nonzero``, a blocking copy) makes the host wait for every queued GPU kernel, so
the next launches start late: it costs time the benchmarks' side-by-side ratios do not isolate. CUDA's sync debug
mode reports each one as a warning; this script counts them for a plain call and for blended steps (DB-MPA,
joint with λ ≠ 1, DB-MPA-LS at λ = 1 and 0.5), at a new step and again at the same step (two-call CFG). The tests
check the same with a dispatch-mode proxy on the CPU (tests/test_batching.py); this is the real thing.
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings

import torch

from blend_speed import CONFIGS, blended_denoiser, build, inputs


def count_syncs(call) -> int:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            call()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(warning.message).lower() for warning in caught)


def run(config: str, members: int) -> dict:
    unet, names, size = build(config, members, torch.float16, "cuda", None)
    args, kwargs = inputs(unet, 1, size, CONFIGS[config]["context"])
    sample, timestep = args
    results = {"config": config, "members": members, "gpu": torch.cuda.get_device_name()}
    with torch.no_grad():
        unet(*args, **kwargs)
        results["plain_call"] = count_syncs(lambda: unet(*args, **kwargs))
        for key, blend in (
            ("mpa", {}),
            ("joint", {"kl_scale": 1.5}),
            ("ls", {"mode": "stochastic", "generator": torch.Generator().manual_seed(0)}),
            ("ls_kl_half", {"mode": "stochastic", "kl_scale": 0.5, "generator": torch.Generator().manual_seed(0)}),
        ):
            denoiser = blended_denoiser(unet, names, **blend)
            with denoiser.routing():
                denoiser(sample, timestep, **kwargs)
                results[f"{key}_new_step"] = count_syncs(lambda d=denoiser: d(sample, timestep - 1, **kwargs))
                results[f"{key}_same_step"] = count_syncs(lambda d=denoiser: d(sample.clone(), timestep - 1, **kwargs))
    return results


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", choices=sorted(CONFIGS), default="sd15")
    parser.add_argument("--members", type=int, default=2)
    parser.add_argument("--json", action="store_true")
    options = parser.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("host_sync_check.py needs a CUDA GPU")
    result = run(options.config, options.members)
    print(json.dumps(result) if options.json else "\n".join(f"{k}: {v}" for k, v in result.items()))


if __name__ == "__main__":
    main()
