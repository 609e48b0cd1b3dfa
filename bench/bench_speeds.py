"""Sequence matching across speeds (--velocities): Recall@1 per query speed profile and the search cost.

The speed benchmark: the synthetic route (``synthetic.py``) with a constant-speed database (a frame every
2 m, ``--synth_speed_var 0``), raw 64-D descriptors, and one query traversal per speed profile: 0.5x, 1x,
1.5x and 2x the database's speed, and stops-and-speed-changes (stretches at 0.5x..2x, 3 stops per km of
about 15 frames). Sequence length 5, Recall@1 within the split's posDistThr (10 m) on the test split.
Rows: single frames (L 1), the diagonal (today's sequence matching), the plain minimum over the
trajectories of ``--velocities``, and each scoring rule of ``--rules`` (``velocity.ScoringRule``; the
first rule listed is the project's default). Columns: Recall@1 per profile and the ratios of the
acceptance goals: every constant off-speed profile >= 0.75x the diagonal's equal-speed Recall@1, stops
>= 0.65x, equal speed >= 0.9x.

The cost: ``--mode test`` scoring of 3000 x 3000 frames of 4096-D (``speeds.rank_across_speeds_in_memory``:
frame distances once per query chunk, sums along the trajectories, the rule, one top-100 per chunk) against
the diagonal's (``search.rank``: the same product, the diagonal sums, one top-100), interleaved repeats
in one run, and one localisation step with the trajectories
against one matrix-vector product; also the block search of streamed maps (per-trajectory top-k lists,
no goal). Only ratios are printed as results.

    python bench/bench_speeds.py [--small] [--split test] [--velocities 0.5:2:0.5] [--grid half] [--seeds 0 1]
                                 [--rules consensus:10:1 min zscore ...] [--skip-cost] [--skip-recall]

The range comparison (``--ranges``): Recall@1 of the default rule with each candidate ``--velocities`` range on
constant-speed profiles between the grid's values (``--profiles``, e.g. 0.6x .. 0.9x and 1.2x .. 1.8x) and on
the grid's own speeds, each as a ratio to the diagonal's equal-speed Recall@1, with each range's trajectory
count and, unless ``--skip-cost``, its cost over the diagonal's on the cost problem:

    python bench/bench_speeds.py --ranges 0.5:2:0.5 0.5:2:0.25 --profiles 0.6x 0.7x 1x 1.5x [--skip-cost]
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np
import torch

from common import CPU_NOTE, goal, interleaved, median, table, timed
from seqmatchnet.data.synthetic import SyntheticParams, generate
from seqmatchnet.data.windows import segment_bounds, sequence_windows
from seqmatchnet.matching.seqmatch import frame_distances
from seqmatchnet.search import diagonal as diagonal_mod
from seqmatchnet.search import speeds
from seqmatchnet.search.sides import Windows
from seqmatchnet.speeds import kernel, streaming
from seqmatchnet.speeds import rules as rules_mod
from seqmatchnet.speeds import trajectories as trajectories_mod

PROFILES = {                               # name -> SyntheticParams fields of the query traversal
    "0.5x": {"query_speed": 0.5},
    "1x": {},
    "1.5x": {"query_speed": 1.5},
    "2x": {"query_speed": 2.0},
    "stops": {"query_speed_changes": 1.0, "query_stops_per_km": 3.0, "query_stop_frames": 15},
}
BASE = {"dim": 64, "speed_var": 0.0, "query_ratio": 1.0, "place_scale_m": 1.0, "scene_share": 0.2,
        "nuisance_std": 2.0}
DEFAULT_RULES = ("consensus:20:3:z", "min", "zscore", "consensus:20:3", "consensus:5:3:z", "consensus:20:1:z",
                 "consensus:20:10:z", "prior:0:0.1")
SPEED_PROFILES = ("0.5x", "0.6x", "0.7x", "0.8x", "0.9x", "1x", "1.2x", "1.5x", "1.8x", "2x")
GOALS = {"0.5x": 0.75, "1.5x": 0.75, "2x": 0.75, "stops": 0.65, "1x": 0.9}


def parse_rule(text: str) -> rules_mod.ScoringRule:
    """``kind[:window[:weight[:z]]]`` -> ``ScoringRule`` (``z``: z-normalise first)."""
    parts = text.split(":")
    kw = {"kind": parts[0], "window": 0, "weight": 0.0, "normalise": False}
    if len(parts) > 1:
        kw["window"] = int(parts[1])
    if len(parts) > 2:
        kw["weight"] = float(parts[2])
    kw["normalise"] = len(parts) > 3 and parts[3] == "z"
    return rules_mod.ScoringRule(**kw)


def profile_fields(profile: str) -> dict:
    """``SyntheticParams`` fields of a profile: a name of ``PROFILES`` or a constant speed ``"0.7x"``."""
    return PROFILES[profile] if profile in PROFILES else {"query_speed": float(profile.rstrip("x"))}


def profile_split(seed: int, frames: int, profile: str, split: str) -> dict:
    """One profile's split: unit-row features, positions and the positive radius."""
    params = SyntheticParams(seed=seed, frames=frames, **BASE, **profile_fields(profile))
    data = generate(params)
    db_rows, q_rows = data[f"{split}_inds"]
    return {"db": torch.from_numpy(data["db"][db_rows]), "q": torch.from_numpy(data["query"][q_rows]),
            "db_pos": data["db_pos"][db_rows], "q_pos": data["query_pos"][q_rows], "radius": 10.0}


def search(split: dict, seq_len: int, traj: trajectories_mod.Trajectories, k: int = 1) -> streaming.TrajectoryTopK:
    """Every query window against every database window in one block (one segment each side)."""
    nd, nq = len(split["db"]), len(split["q"])
    db_starts, _ = sequence_windows(segment_bounds(nd), seq_len)
    q_starts, _ = sequence_windows(segment_bounds(nq), seq_len)
    fd = frame_distances(split["db"], split["q"])
    dists = kernel.trajectory_distances(fd, db_starts + seq_len // 2, np.tile([[0, nd]], (nd, 1)),
                                   q_starts + seq_len // 2, traj)
    acc = streaming.TrajectoryTopK(nq, traj, k)
    acc.add(0, dists, np.arange(nd))
    return acc


def recall_at_1(ids: torch.Tensor, split: dict) -> float:
    """Share of the queries with a database frame within the radius whose top-1 is within it."""
    q_pos, db_pos = split["q_pos"], split["db_pos"]
    near = np.linalg.norm(q_pos[:, None, :] - db_pos[None, :, :], axis=2) <= split["radius"]
    has = near.any(axis=1)
    hit = near[np.arange(len(q_pos)), ids[:, 0].numpy()]
    return float(hit[has].mean())


def recall_rows(args) -> tuple[list[list], dict]:
    """Recall@1 of every method on every profile, averaged over the seeds."""
    rules = [(r, parse_rule(r)) for r in args.rules]
    names = ["single frame (L 1)", f"diagonal (L {args.seqL})", "oracle (true speed only)"] + [r for r, _ in rules]
    res = {n: {p: [] for p in PROFILES} for n in names}
    velocities = trajectories_mod.parse_velocities(args.velocities)
    traj = trajectories_mod.trajectories(velocities, args.seqL, grid=trajectories_mod.GRIDS[args.grid])
    print(trajectories_mod.describe(traj))
    q_seg = None
    for seed in args.seeds:
        for p in PROFILES:
            split = profile_split(seed, args.frames, p, args.split)
            q_seg = np.zeros(len(split["q"]), dtype=np.int64)
            for name, L, tr in ((names[0], 1, trajectories_mod.trajectories((1.0,), 1)),
                                (names[1], args.seqL, trajectories_mod.trajectories((1.0,), args.seqL))):
                res[name][p].append(recall_at_1(search(split, L, tr).finish(q_seg, rules_mod.PLAIN_MIN)[0], split))
            speed = PROFILES[p].get("query_speed", 1.0) if "query_stops_per_km" not in PROFILES[p] else None
            true = None if speed is None else trajectories_mod.trajectories(
                (speed,), args.seqL, grid=trajectories_mod.GRIDS[args.grid])
            oracle = np.nan if speed is None else recall_at_1(
                search(split, args.seqL, true).finish(q_seg, rules_mod.PLAIN_MIN)[0], split)
            res[names[2]][p].append(oracle)
            acc = search(split, args.seqL, traj)
            for r, rule in rules:
                res[r][p].append(recall_at_1(acc.finish(q_seg, rule)[0], split))
            print(f"  seed {seed} {p}: {len(split['db'])} database / {len(split['q'])} query frames", flush=True)
    return [[n] + [float(np.mean(res[n][p])) for p in PROFILES] for n in names], res


def print_recall(rows: list[list], args) -> bool:
    """The table and the goal lines (every rule against the diagonal's equal-speed Recall@1)."""
    diag_1x = rows[1][1 + list(PROFILES).index("1x")]
    out, ok = [], True
    for r in rows:
        ratios = {p: r[1 + i] / diag_1x for i, p in enumerate(PROFILES)}
        met = all(ratios[p] >= g for p, g in GOALS.items() if np.isfinite(ratios[p]))
        out.append([r[0]] + [f"{v:.3f}" for v in r[1:]] + [" ".join(f"{ratios[p]:.2f}" for p in PROFILES),
                                                          "yes" if met else "no"])
    print(f"\nRecall@1 within 10 m, {args.split} split, seqL {args.seqL}, --velocities {args.velocities}, "
          f"seeds {args.seeds}, {args.frames} frames per route")
    print(table(out, ["method"] + list(PROFILES) + ["/ diagonal 1x", "goals"]))
    default = rows[3]
    for i, p in enumerate(PROFILES):
        ok &= goal(default[1 + i] / diag_1x >= GOALS[p],
                   f"{args.rules[0]} on {p}: {default[1 + i]:.3f} >= {GOALS[p]} x diagonal 1x {diag_1x:.3f}")
    return ok


def range_rows(args) -> list[list]:
    """Recall@1 of the first rule of ``--rules`` with each range of ``--ranges`` on each profile of
    ``--profiles`` (averaged over the seeds), the diagonal's first; with each range's trajectory count."""
    grid, rule = trajectories_mod.GRIDS[args.grid], parse_rule(args.rules[0])
    ranges = {r: trajectories_mod.trajectories(trajectories_mod.parse_velocities(r), args.seqL, grid=grid)
              for r in ["1", *args.ranges]}
    res = {r: {p: [] for p in args.profiles} for r in ranges}
    for seed in args.seeds:
        for p in args.profiles:
            split = profile_split(seed, args.frames, p, args.split)
            q_seg = np.zeros(len(split["q"]), dtype=np.int64)
            for r, traj in ranges.items():
                ids = search(split, args.seqL, traj).finish(q_seg, rules_mod.PLAIN_MIN if r == "1" else rule)[0]
                res[r][p].append(recall_at_1(ids, split))
            print(f"  seed {seed} {p}: {len(split['db'])} database / {len(split['q'])} query frames", flush=True)
    return [[r, ranges[r].count] + [float(np.mean(res[r][p])) for p in args.profiles] for r in ranges]


def print_ranges(rows: list[list], args) -> None:
    """The range table: Recall@1 per profile, then each as a ratio to the diagonal's at 1x (when measured)."""
    base = rows[0][2 + args.profiles.index("1x")] if "1x" in args.profiles else None
    out = [[("diagonal (1)" if r[0] == "1" else r[0]), str(r[1])] + [f"{v:.3f}" for v in r[2:]]
           + ([f"{np.mean(r[2:]) / base:.3f}"] if base else []) for r in rows]
    print(f"\nRecall@1 within 10 m, {args.split} split, seqL {args.seqL}, {args.grid} grid, rule {args.rules[0]}, "
          f"seeds {args.seeds}, {args.frames} frames per route")
    print(table(out, ["--velocities", "T"] + list(args.profiles) + (["mean / diag 1x"] if base else [])))


def range_costs(args) -> None:
    """Each range's ``--mode test`` scoring time over the diagonal's, interleaved in one run (the cost problem)."""
    n, dim, L, k = args.cost_frames, args.cost_dim, args.seqL, 100
    gen = torch.Generator().manual_seed(0)
    db = torch.nn.functional.normalize(torch.randn(n, dim, generator=gen), dim=1)
    q = torch.nn.functional.normalize(torch.randn(n, dim, generator=gen), dim=1)
    starts, _ = sequence_windows(segment_bounds(n), L)
    bounds = np.tile([[0, n]], (n, 1))
    runs = {"diagonal": lambda: diagonal_mod.rank(Windows(db, starts), Windows(q, starts), L, k, quiet=True)}
    for r in args.ranges:
        traj = trajectories_mod.trajectories(trajectories_mod.parse_velocities(r), L,
                                             grid=trajectories_mod.GRIDS[args.grid])
        runs[r] = (lambda traj=traj: speeds.rank_across_speeds_in_memory(
            Windows(db, starts, bounds), Windows(q, starts, bounds), traj, rules_mod.DEFAULT_RULE, k))
    wall, cpu = {r: [] for r in runs}, {r: [] for r in runs}
    for fn in runs.values():                                   # warm up
        fn()
    for _ in range(args.repeats):
        for r, fn in runs.items():
            c0 = time.process_time()
            wall[r].append(timed(fn)[0])
            cpu[r].append(time.process_time() - c0)
    print(f"\n--mode test scoring, {n} x {n} frames, D {dim}, seqL {L}, top-{k}, {torch.get_num_threads()} "
          f"thread(s) (medians of {args.repeats} interleaved repeats), over the diagonal's: wall-clock time "
          + ", ".join(f"{r} {median(wall[r]) / median(wall['diagonal']):.2f}x" for r in args.ranges)
          + "; CPU time of this process (what other processes on the machine change least) "
          + ", ".join(f"{r} {median(cpu[r]) / median(cpu['diagonal']):.2f}x" for r in args.ranges))


def cost_ratios(args) -> bool:
    """Search and localisation cost of the trajectories against the diagonal, interleaved in one run."""
    n, dim, L, k = args.cost_frames, args.cost_dim, args.seqL, 100
    gen = torch.Generator().manual_seed(0)
    db = torch.nn.functional.normalize(torch.randn(n, dim, generator=gen), dim=1)
    q = torch.nn.functional.normalize(torch.randn(n, dim, generator=gen), dim=1)
    velocities = trajectories_mod.parse_velocities(args.velocities)
    traj = trajectories_mod.trajectories(velocities, L, grid=trajectories_mod.GRIDS[args.grid])
    starts, _ = sequence_windows(segment_bounds(n), L)
    bounds = np.tile([[0, n]], (n, 1))

    def diagonal():                        # what --mode test runs for the diagonal
        return diagonal_mod.rank(Windows(db, starts), Windows(q, starts), L, k, quiet=True)

    def trajectories():                    # what --mode test runs with --velocities for a map in memory
        return speeds.rank_across_speeds_in_memory(Windows(db, starts, bounds), Windows(q, starts, bounds), traj,
                                                   rules_mod.DEFAULT_RULE, k)

    def blocks():                          # the same as one streamed block (maps over --mapChunk, torchrun)
        return speeds.rank_across_speeds(Windows([(0, db, np.arange(n))], starts, bounds), Windows(q, starts, bounds),
                                         traj, rules_mod.DEFAULT_RULE, k)

    def product():
        return frame_distances(db, q)

    t = interleaved({"product": product, "diagonal": diagonal, "trajectories": trajectories, "blocks": blocks},
                    args.repeats)
    search = median(t["trajectories"]) / median(t["diagonal"])
    print(f"\n--mode test scoring, {n} x {n} frames, D {dim}, seqL {L}, {traj.count} trajectories, top-{k} "
          f"(medians of {args.repeats} interleaved repeats): trajectories / diagonal = {search:.2f}, "
          f"diagonal / product = {median(t['diagonal']) / median(t['product']):.2f}; the block search "
          f"(streamed maps, torchrun) / diagonal = {median(t['blocks']) / median(t['diagonal']):.2f}")
    ok = goal(search <= 2.0, f"trajectories search <= 2x the diagonal's: {search:.2f}")
    return localisation_ratio(args, db[:args.loc_frames] if args.loc_frames <= n else None) and ok


def localisation_ratio(args, db: torch.Tensor | None) -> bool:
    """Median ``Localizer.step`` with the trajectories over one matrix-vector product on the same database."""
    from seqmatchnet.online.localizer import Localizer, SearchSettings

    gen = torch.Generator().manual_seed(1)
    if db is None:
        db = torch.nn.functional.normalize(torch.randn(args.loc_frames, args.cost_dim, generator=gen), dim=1)
    frames = torch.nn.functional.normalize(torch.randn(64, db.shape[1], generator=gen), dim=1)
    search = SearchSettings(trajectories_mod.parse_velocities(args.velocities),
                            grid=trajectories_mod.GRIDS[args.grid])
    loc = Localizer(db, seq_len=args.seqL, search=search)
    for f in frames[:args.seqL]:
        loc.step(f)
    steps, mvs = [], []
    for f in frames[args.seqL:]:
        steps.append(timed(lambda f=f: loc.step(f))[0])
        mvs.append(timed(lambda f=f: torch.mv(loc.db_feats, f))[0])
    ratio = median(steps) / median(mvs)
    print(f"localisation step, {len(db)} database frames, D {db.shape[1]}: step / matrix-vector product = "
          f"{ratio:.2f} (medians over {len(steps)} interleaved frames)")
    return goal(ratio <= 1.5, f"localisation step <= 1.5x one matrix-vector product: {ratio:.2f}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--small", action="store_true", help="one seed, a shorter route, a smaller cost problem")
    ap.add_argument("--split", default="test", choices=("train", "val", "test"))
    ap.add_argument("--frames", type=int, default=5000, help="database frames of the whole route")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--seqL", type=int, default=5)
    ap.add_argument("--velocities", default=trajectories_mod.RECOMMENDED)
    ap.add_argument("--grid", default="half", choices=sorted(trajectories_mod.GRIDS), help="--trajectoryGrid")
    ap.add_argument("--rules", nargs="+", default=list(DEFAULT_RULES),
                    help="kind[:window[:weight[:z]]]; the first is the one held to the goals")
    ap.add_argument("--skip-recall", action="store_true")
    ap.add_argument("--skip-cost", action="store_true")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--cost-frames", type=int, default=3000, help="database = query frames of the cost problem")
    ap.add_argument("--cost-dim", type=int, default=4096)
    ap.add_argument("--loc-frames", type=int, default=30000, help="database frames of the localisation step")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--ranges", nargs="+", help="compare these --velocities ranges (the range comparison)")
    ap.add_argument("--profiles", nargs="+", default=list(SPEED_PROFILES),
                    help="profiles of the range comparison: constant speeds NNx or names of the main table")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.small:
        args.seeds, args.frames = args.seeds[:1], min(args.frames, 3000)
        args.cost_frames, args.loc_frames, args.repeats = 1000, 10000, 2
    ok = True
    if args.ranges:
        if not args.skip_recall:
            print_ranges(range_rows(args), args)
        if not args.skip_cost:
            print(CPU_NOTE)
            range_costs(args)
        return 0
    if not args.skip_recall:
        rows, _ = recall_rows(args)
        ok &= print_recall(rows, args)
    if not args.skip_cost:
        print(CPU_NOTE)
        ok &= cost_ratios(args)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
