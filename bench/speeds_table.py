"""The README's "Different speeds" table from the project's own CLI: Recall@1 per query speed profile for
single frames, the diagonal and ``--velocities``, on raw descriptors and after training.

    python bench/speeds_table.py [--velocities 0.5:2:0.5] [--trajectoryGrid half] [--nEpochs 8] [--seed 0]
                                 [--workdir DIR]

The profiles are those of ``bench/bench_speeds.py`` (the synthetic route with a constant-speed database,
64-D descriptors, a query traversal at 0.5x, 1x, 1.5x and 2x the database's speed, and one with stops and
speed changes), each its own ``--dataset synthetic`` with ``--synth_*`` options; seqL 5, test split,
Recall@1 within 10 m. Training (``--pooling --init identity``, ``--nEpochs`` epochs) uses the training
split of the stops-and-speed-changes route, once with the diagonal's loss and mining and once with
``--velocities``; each trained model is then tested on every profile. Every row is a ``python main.py``
command, printed as it runs.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_speeds import BASE, PROFILES  # noqa: E402  (after the path set-up)


def synth_flags(profile: str, seed: int) -> list[str]:
    values = {**BASE, **PROFILES[profile], "seed": seed}
    return [x for k, v in values.items() for x in (f"--synth_{k}", str(v))]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--velocities", default="0.5:2:0.5")
    p.add_argument("--trajectoryGrid", default="half", choices=("half", "whole"))
    p.add_argument("--nEpochs", type=int, default=8)
    p.add_argument("--seqL", type=int, default=5)
    p.add_argument("--seed", type=int, default=0, help="the synthetic route's seed (--synth_seed)")
    p.add_argument("--workdir", default=".", help="folder for the generated data and runs")
    a = p.parse_args()
    os.chdir(a.workdir)

    from seqmatchnet.cli.options import parse_options
    from seqmatchnet.cli.test import evaluate_options
    from seqmatchnet.cli.train import train
    from seqmatchnet.common.logs import setup_logging

    setup_logging(quiet=True)

    def common(profile: str) -> list[str]:
        return ["--dataset", "synthetic", "--dataPath", f"data_{profile}", "--structPath", f"structs_{profile}",
                "--runsPath", "runs", "--nocuda", "--quiet", "--split", "test", "--trajectoryGrid", a.trajectoryGrid,
                *synth_flags(profile, a.seed)]

    def recall(profile: str, extra: list[str]) -> float:
        args = ["--mode", "test", *common(profile), *extra]
        print("  python main.py " + " ".join(args), flush=True)
        return evaluate_options(parse_options(args))[1].recalls[1]

    runs = {}
    for name, train_v in (("trained, diagonal loss", "1"), ("trained, --velocities loss", a.velocities)):
        args = ["--mode", "train", *common("stops"), "--seqL", str(a.seqL), "--pooling", "--init", "identity",
                "--outDims", str(BASE["dim"]), "--nEpochs", str(a.nEpochs), "--velocities", train_v,
                "--figures", "none", "--expName", "speeds"]
        print("  python main.py " + " ".join(args), flush=True)
        # without --quiet: the epochs' progress shows (a bar, or a line every 30 s in a log)
        runs[name] = str(train(parse_options([x for x in args if x != "--quiet"])))
    rows = [("single frame, raw", ["--seqL", "1", "--matcher", "None"]),
            ("diagonal, raw", ["--seqL", str(a.seqL)]),
            ("--velocities, raw", ["--seqL", str(a.seqL), "--velocities", a.velocities])]
    for name, run in runs.items():
        trained = ["--seqL", str(a.seqL), "--pooling", "--resume", run, "--ckpt", "best"]
        if name.endswith("diagonal loss"):
            rows.append((f"diagonal, {name}", trained))
        rows.append((f"--velocities, {name}", trained + ["--velocities", a.velocities]))
    table = {label: {prof: recall(prof, extra) for prof in PROFILES} for label, extra in rows}
    print(f"\nRecall@1 (test split, seqL {a.seqL}, within 10 m, seed {a.seed}); --velocities {a.velocities} "
          f"--trajectoryGrid {a.trajectoryGrid}; "
          f"training on the "
          f"stops-and-speed-changes route, {a.nEpochs} epochs\n")
    print("| | " + " | ".join(PROFILES) + " |")
    print("| --- |" + " --- |" * len(PROFILES))
    for label, values in table.items():
        print(f"| {label} | " + " | ".join(f"{values[p]:.3f}" for p in PROFILES) + " |")
    base = table["diagonal, raw"]["1x"]
    best = table["--velocities, raw"]
    print(f"\nratios to the diagonal's equal-speed Recall@1 ({base:.3f}), --velocities raw: "
          + ", ".join(f"{p} {best[p] / base:.2f}" for p in PROFILES))
    return 0


if __name__ == "__main__":
    sys.exit(main())
