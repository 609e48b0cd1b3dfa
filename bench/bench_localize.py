"""Online localisation latency: ``localize.Localizer.step`` per query frame against its floor, one
matrix-vector product over the same database features, measured in the same run.

    python bench/bench_localize.py [--quick] [--db 30000 --dim 4096 --seqL 5 --frames 200 --threads 0]

Database: random unit rows (one segment). Each timed round runs both variants on the next query frame,
in alternating order: (a) floor: ``torch.mv(db_feats, q, out=buf)``; (b) ``step(q)``: normalise the frame,
one ``addmv`` into the ring buffer, ``sqrt``, ``L`` shifted additions, argmin and the confidence ratio.
The first ``seqL + 5`` frames are warm-up and not timed. Goal: step p50 <= 1.5x the floor's p50, or
within ``FIXED_MS`` of it: the step's dozen tensor calls cost a fixed ~0.1-0.2 ms per frame, which
dominates on a small database (``--quick``: a 0.13 ms floor) and vanishes beside a large one's product.
Also checks the last match against dense scoring of the last L frames (``seqMatchNet.frame_distances``).
Exits 1 when a goal is missed.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402,F401,I001  (first: sets OMP_WAIT_POLICY before torch loads)
import numpy as np
import torch
from common import CPU_NOTE, add_size_options, apply_threads, goal, machine_line, table, unit_rows

GOAL_RATIO = 1.5
FIXED_MS = 0.3      # the per-call overheads a step may add on a database too small for the ratio


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_size_options(p, "3000 x 512 database, 60 frames", db=30000, queries=None, dim=4096)
    p.add_argument("--frames", type=int, default=200, help="timed query frames")
    args = p.parse_args(argv)
    if args.quick:
        args.db, args.dim, args.frames = 3000, 512, 60
    return args


def dense_last_match(db_feats: torch.Tensor, frames: torch.Tensor, seq_len: int) -> tuple[int, float]:
    """Best trailing database window for the last ``seq_len`` query frames ``[L, D]`` (unit rows), densely."""
    from seqmatchnet.matching.seqmatch import frame_distances

    d = frame_distances(db_feats, frames)                           # [Nd, L]
    n = len(db_feats) - seq_len + 1
    scores = sum(d[seq_len - 1 - k:seq_len - 1 - k + n, seq_len - 1 - k] for k in range(seq_len)) / seq_len
    best = int(torch.argmin(scores))
    return best + seq_len - 1, float(scores[best])


def main(argv=None) -> int:
    from seqmatchnet.online.localizer import Localizer

    args = parse_args(argv)
    apply_threads(args.threads)
    print(machine_line())
    print(f"database {args.db} x {args.dim} (random unit rows), seqL {args.seqL}, {args.frames} timed frames")

    db = unit_rows(args.db, args.dim, seed=args.seed)
    t0 = time.perf_counter()
    loc = Localizer(db, seq_len=args.seqL, conf_radius=10)
    setup_s = time.perf_counter() - t0
    del db                                           # the localiser keeps its own normalised copy
    feats = loc.db_feats
    warmup = args.seqL + 5
    queries = unit_rows(warmup + args.frames, args.dim, seed=args.seed + 1)
    buf = torch.empty(len(feats))

    def floor(q: torch.Tensor) -> None:
        torch.mv(feats, q, out=buf)

    times = {"floor": [], "step": []}
    match = None
    for i, q in enumerate(queries):
        order = (("floor", floor), ("step", loc.step)) if i % 2 == 0 else (("step", loc.step), ("floor", floor))
        for name, fn in order:
            t = time.perf_counter()
            out = fn(q)
            elapsed = time.perf_counter() - t
            if name == "step":
                match = out
            if i >= warmup:
                times[name].append(elapsed * 1e3)

    p50 = {k: float(np.percentile(v, 50)) for k, v in times.items()}
    p99 = {k: float(np.percentile(v, 99)) for k, v in times.items()}
    ratio = p50["step"] / p50["floor"]
    rows = [["floor: one mv over the database", f"{p50['floor']:.3f}", f"{p99['floor']:.3f}", "1.00"],
            ["Localizer.step", f"{p50['step']:.3f}", f"{p99['step']:.3f}", f"{ratio:.2f}"]]
    print(table(rows, ["per frame", "p50 ms", "p99 ms", "p50 ratio"]))
    print(f"setup (normalise and copy the database once): {setup_s:.2f} s; "
          f"{1e3 / p50['step']:.1f} frames/s at the step's p50")
    print(CPU_NOTE)

    best, dist = dense_last_match(feats, queries[-args.seqL:], args.seqL)
    same = match is not None and match.db_frame == best and abs(match.distance - dist) < 1e-4
    bound = max(GOAL_RATIO * p50["floor"], p50["floor"] + FIXED_MS)
    ok = goal(p50["step"] <= bound, f"step p50 {p50['step']:.3f} ms <= max({GOAL_RATIO}x, + {FIXED_MS} ms) "
                                    f"the floor's p50 {p50['floor']:.3f} ms (ratio {ratio:.2f})")
    ok &= goal(same, f"last match (db frame {None if match is None else match.db_frame}) equals dense scoring "
                     f"(db frame {best})")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
