"""How much sub-frame alignment could lift the half-speed profile: the true-speed oracle (v = 0.5 alone)
with integer trajectories (``velocity``) against one with interpolated frame distances and half-frame
anchors, on the speed benchmark's 0.5x route (``bench/bench_speeds.py``), per seed.

    python bench/subframe_oracle.py [--seeds 0 1] [--split test]

A sub-frame trajectory anchored at ``j + s`` (s in {0, 0.5}) uses the database positions
``j + s + 0.5 k``; the distance at a fractional position is the linear interpolation of the frame
distances of its two neighbouring database frames; the match is the database frame nearest the anchor.
A plain loop over anchors: a measurement, not the project's search.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from bench_speeds import profile_split, recall_at_1, search  # noqa: E402

import velocity as V  # noqa: E402
from seqMatchNet import frame_distances  # noqa: E402


def subframe_oracle(split: dict, seq_len: int, speed: float) -> torch.Tensor:
    """Top-1 database frame per query window by the best sub-frame trajectory at ``speed``: ``[Nq, 1]``."""
    fd = frame_distances(split["db"], split["q"]).numpy()
    nd, nq = fd.shape
    k = np.arange(seq_len) - seq_len // 2
    centres = np.clip(np.arange(nq), seq_len // 2, nq - 1 - seq_len // 2)       # shifted at the ends
    cols = centres[:, None] + k[None, :]
    best, arg = np.full(nq, np.inf), np.zeros(nq, dtype=np.int64)
    for shift in (0.0, 0.5):
        for j in range(nd):
            pos = j + shift + speed * k
            lo = np.floor(pos).astype(int)
            if lo.min() < 0 or lo.max() + 1 >= nd:
                continue
            w = pos - lo
            s = ((1 - w) * fd[lo[None, :], cols] + w * fd[lo[None, :] + 1, cols]).mean(axis=1)
            better = s < best
            best[better], arg[better] = s[better], int(round(j + shift))
    return torch.as_tensor(arg)[:, None]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--split", default="test")
    p.add_argument("--seqL", type=int, default=5)
    a = p.parse_args()
    for seed in a.seeds:
        split = profile_split(seed, 5000, "0.5x", a.split)
        segments = np.zeros(len(split["q"]), dtype=np.int64)
        integer = recall_at_1(search(split, a.seqL, V.trajectories((0.5,), a.seqL)).finish(segments, V.PLAIN_MIN)[0],
                              split)
        print(f"seed {seed}, 0.5x: Recall@1 of the true-speed oracle, integer trajectories {integer:.3f}, "
              f"sub-frame trajectories {recall_at_1(subframe_oracle(split, a.seqL, 0.5), split):.3f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
