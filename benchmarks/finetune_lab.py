"""The fine-tuner's lab validation: every method × {r1, the equal mix} × α ∈ {1, 0.5}, against the exact targets.

Runs ``diffusion-blend lab finetune --json`` for each cell (each in its own process, one after the other, with the
method's lab defaults) and prints the Markdown table of docs/finetune.md: what each method reaches against the exact
expectation, the path KL against the exact KL, and the minutes it took.

    python benchmarks/finetune_lab.py [--methods adjoint-matching,policy-gradient] [--out results.json]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

METHODS = ("adjoint-matching", "policy-gradient", "weighted-dsm")
REWARDS = {"r1": "r1=1", "mix": "r1=0.5,r2=0.5"}
ALPHAS = (1.0, 0.5)


def run(method: str, reward: str, alpha: float, seed: int) -> dict:
    command = [
        sys.executable,
        "-m",
        "diffusion_blend",
        "lab",
        "finetune",
        "--method",
        method,
        "--reward",
        reward,
        "--alpha",
        str(alpha),
        "--seed",
        str(seed),
        "--json",
    ]
    result = subprocess.run(command, capture_output=True, text=True, check=True)
    return json.loads(result.stdout)


def row(report: dict, label: str) -> str:
    cells = []
    for name, exact in report["exact"].items():
        if report["reward"].get(name, 0) == 0:
            continue
        achieved = report["achieved"][name]
        cells.append(f"{name}: {achieved:.3f} / {exact:.3f} ({(achieved - exact) / abs(exact):+.1%})")
    return (
        f"| {report['method']} | {label} | {report['alpha']:g} | {'; '.join(cells)} | "
        f"{report['kl']:.3f} / {report['exact_kl']:.3f} | {report['seconds'] / 60:.1f} |"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, help="also write every run's JSON here")
    args = parser.parse_args()
    reports = []
    print("| method | reward | α | achieved / exact E[r] (error) | path KL / exact KL | minutes |")
    print("| --- | --- | --- | --- | --- | --- |")
    for method in args.methods.split(","):
        for label, reward in REWARDS.items():
            for alpha in ALPHAS:
                report = run(method, reward, alpha, args.seed)
                reports.append(report)
                print(row(report, label), flush=True)
    if args.out is not None:
        args.out.write_text(json.dumps(reports, indent=2) + "\n")


if __name__ == "__main__":
    main()
