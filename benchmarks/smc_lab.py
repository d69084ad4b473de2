"""The SMC corrector on the lab: how far the corrected blend falls short of the exact target as particles grow.

For α ∈ {1, 0.5} at w = (0.5, 0.5) on the default scenario, DDIM with η = 1, runs ``diffusion-blend lab run --smc K``
for K = 1, 2, 4, 8, 16, 32 (each in its own process, one after the other) and prints the Markdown table of
docs/lab.md: the blend's and the corrected blend's shortfall (the mean of E[r1] and E[r2] against the exact value),
their SW₂ distance to exact samples, and the cost — denoiser rows per sample and the wall-time ratio to the plain
blend, measured side by side in the same process.

    python benchmarks/smc_lab.py [--samples 10000] [--steps 100] [--out results.json]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

PARTICLES = (1, 2, 4, 8, 16, 32)
ALPHAS = (1.0, 0.5)


def run(alpha: float, particles: int, samples: int, steps: int) -> dict:
    command = [
        sys.executable,
        "-m",
        "diffusion_blend",
        "lab",
        "run",
        "--weights",
        "r1=0.5,r2=0.5",
        "--alpha",
        str(alpha),
        "--eta",
        "1",
        "--samples",
        str(samples),
        "--steps",
        str(steps),
        "--smc",
        str(particles),
        "--json",
    ]
    return json.loads(subprocess.run(command, capture_output=True, text=True, check=True).stdout)


def shortfall(values: dict, exact: dict) -> float:
    return sum(values[name] - exact[name] for name in ("r1", "r2")) / sum(exact[name] for name in ("r1", "r2"))


def row(report: dict) -> str:
    blend, corrected, smc = report["methods"]["db-mpa"], report["methods"]["db-smc"], report["smc"]
    return (
        f"| {report['alpha']:g} | {smc['particles']} | {shortfall(blend, report['exact']):+.1%} | "
        f"{shortfall(corrected, report['exact']):+.1%} | {blend['distance']:.3f} | {corrected['distance']:.3f} | "
        f"{report['distance_floor']:.3f} | {smc['denoiser_rows_per_sample']:.0f} / "
        f"{smc['blend_denoiser_rows_per_sample']:.0f} | {smc['time_ratio_to_blend']:.1f} | "
        f"{smc['resampling_steps']} |"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=10_000)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--out", type=Path, default=None, help="also write every report as JSON")
    args = parser.parse_args()
    print(
        "| α | K | blend | blend + SMC | SW₂ blend | SW₂ SMC | SW₂ floor | denoiser rows per sample (SMC / blend) "
        "| time ratio | resampling steps |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    reports = []
    for alpha in ALPHAS:
        for particles in PARTICLES:
            reports.append(run(alpha, particles, args.samples, args.steps))
            print(row(reports[-1]), flush=True)
    if args.out:
        args.out.write_text(json.dumps(reports, indent=2) + "\n")


if __name__ == "__main__":
    main()
