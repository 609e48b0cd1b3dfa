"""Frames by distance travelled (``--spacing``): Recall@1 of query traversals recorded like real ones.

The route, place signal and conditions are the speed benchmark's (``bench_speeds.py``: the synthetic route
of ``synthetic.py``, raw 64-D descriptors, a database frame every 2 m, seqL 5, Recall@1 within 10 m on
the test split). The query traversals are built here, each the same stretch of road driven like a
recording: its frames' arc lengths, and what the recording knows of them (positions or odometry):

- ``2m (1x)``: the equal-speed reference, a frame every 2 m (the diagonal's Recall@1 here is the baseline);
  like every profile it starts at a random point of the first 2 m (``bench_speeds.py``'s 1x within 0.5 m of
  the database's frames: with the place signal's 1 m scale that alignment alone is worth a few points);
- ``video+stops``: 30 fps-like, 0.1-0.2 m a frame (smoothly varying), standing still for 200-400 frames at
  3 stops per km; spacing along the exact positions;
- ``slow 0.1m``, ``fast 0.5m``: constant 0.1 and 0.5 m a frame (3 and 15 m/s at 30 fps);
- ``odometry 2%``: the video+stops drive, spaced by an odometry that reads 2 % long;
- ``GPS 1-3m``: the video+stops drive, spaced along GPS positions with a slowly varying error of 1-3 m
  (smoothed over about 5 s of frames, its size drawn per traversal in 1-3 m).

Rows: single frames (L 1) and the diagonal (L 5) on every frame; ``--velocities`` (the default rule) on
every frame; ``--spacing S`` (the query's kept frames: ``data.spacing.spaced_rows``, the same code as
``--mode prepare``) along the diagonal; and both, with a narrow speed range around 1
(``--spaced-velocities``, default 0.8:1.2:0.1): what spacing leaves is a scale error, not a speed ratio.
Recall@1 is over the evaluated query frames (every frame, or the kept ones) with a database frame within
10 m, measured at the true positions. The goal: with spacing (and the velocity search) every profile
>= 0.95x the equal-speed diagonal's Recall@1.

    python bench/bench_spacing.py [--quick] [--seeds 0 1 2 3 4 5] [--frames 1500] [--spacing 2] [--velocities 0.5:2:0.5]
                                  [--spaced-velocities 0.8:1.2:0.1]
    python bench/bench_spacing.py --extract 600    # NetVLAD extraction: the kept frames against every frame
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
from scipy.ndimage import gaussian_filter1d

from bench_speeds import BASE, recall_at_1, search
from common import goal, table
from seqmatchnet.data import synthetic as syn
from seqmatchnet.data.spacing import path_distance, spaced_rows
from seqmatchnet.speeds import rules as rules_mod
from seqmatchnet.speeds import trajectories as trajectories_mod

PROFILES = ("2m (1x)", "video+stops", "slow 0.1m", "fast 0.5m", "odometry 2%", "GPS 1-3m")
GOAL = 0.95


def drive(rng: np.random.Generator, lo: float, hi: float, step: tuple[float, float], stops_per_km: float) -> np.ndarray:
    """Arc lengths in [lo, hi) of a drive at ``step`` metres a frame (a smooth mix of the two ends), standing
    still for 200-400 frames at ``stops_per_km``."""
    n = int((hi - lo) / step[0]) + 10
    mix = 0.5 + 0.5 * np.tanh(gaussian_filter1d(rng.standard_normal(n), 60.0) * 20)
    steps = step[0] + (step[1] - step[0]) * mix
    pieces, prev = [], 0
    for at in np.sort(rng.integers(0, n, rng.poisson(stops_per_km * (hi - lo) / 1000))):
        pieces += [steps[prev:at], np.zeros(int(rng.integers(200, 401)))]
        prev = at
    pieces.append(steps[prev:])
    s = lo + rng.uniform(0, 2.0) + np.concatenate([[0.0], np.cumsum(np.concatenate(pieces))])
    return s[s < hi]


def route(seed: int, frames: int) -> dict:
    """The database's test split and what the query traversals need (the place signal, the route)."""
    params = syn.SyntheticParams(seed=seed, frames=frames, **BASE)
    rng = np.random.default_rng(seed)
    length = params.frames * params.spacing_m
    grid = np.arange(0.0, length + syn._GRID_M, syn._GRID_M)
    ranges = syn._split_ranges(params, length)
    xy, normal = syn._route_xy(rng, grid)
    place = syn._place_signal(rng, params, grid, ranges)
    basis_db, basis_q = syn._nuisance_bases(rng, params)
    lo, hi = ranges["test"][0], length - 1.0
    s_db = np.arange(lo, hi, params.spacing_m)
    return {"params": params, "grid": grid, "xy": xy, "normal": normal, "place": place, "basis_q": basis_q,
            "rng": rng, "lo": lo, "hi": hi, "db": syn._traversal(rng, params, grid, place, s_db, basis_db),
            "db_pos": syn._interp_rows(s_db, grid, xy)}


DRIVES = {"2m (1x)": 0, "slow 0.1m": 2, "fast 0.5m": 3}     # every other profile: the video+stops drive (1)


def query(r: dict, profile: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(descriptors, true positions, distance travelled as the recording knows it) of one profile. The
    video+stops, odometry and GPS profiles are one drive with the same descriptors (random streams seeded by
    the drive): they differ only in what the recording knows of the distance, so their rows are paired."""
    drive_id = DRIVES.get(profile, 1)
    rng = np.random.default_rng([r["params"].seed, drive_id])
    steps = {"2m (1x)": (2.0, 2.0), "slow 0.1m": (0.1, 0.1), "fast 0.5m": (0.5, 0.5)}.get(profile, (0.1, 0.2))
    stops = 3.0 if steps == (0.1, 0.2) else 0.0
    s = drive(rng, r["lo"], r["hi"], steps, stops)
    lateral = r["params"].lane_offset_m * syn._interp_rows(s, r["grid"], r["normal"])
    pos = syn._interp_rows(s, r["grid"], r["xy"]) + lateral
    known = s - s[0]
    if profile == "odometry 2%":
        known = 1.02 * known
    elif profile == "GPS 1-3m":
        size = rng.uniform(1.0, 3.0)
        noise = gaussian_filter1d(rng.standard_normal((len(s), 2)), 150.0, axis=0)
        known = path_distance(pos + size * noise / noise.std(axis=0), None)
    desc = syn._traversal(np.random.default_rng([r["params"].seed, drive_id, 1]), r["params"], r["grid"],
                          r["place"], s, r["basis_q"])
    return desc, pos, known


def recall(db: np.ndarray, db_pos: np.ndarray, q: np.ndarray, q_pos: np.ndarray, seq_len: int, traj, rule) -> float:
    split = {"db": torch.from_numpy(db), "q": torch.from_numpy(q), "db_pos": db_pos, "q_pos": q_pos, "radius": 10.0}
    ids = search(split, seq_len, traj).finish(np.zeros(len(q), dtype=np.int64), rule)[0]
    return recall_at_1(ids, split)


def measure(args) -> tuple[dict, dict]:
    grid = trajectories_mod.GRIDS["half"]
    one = trajectories_mod.trajectories((1.0,), args.seqL)
    speeds = trajectories_mod.trajectories(trajectories_mod.parse_velocities(args.velocities), args.seqL, grid=grid)
    near = trajectories_mod.trajectories(trajectories_mod.parse_velocities(args.spaced_velocities), args.seqL,
                                         grid=grid)
    rule = rules_mod.DEFAULT_RULE
    names = ["single frame (L 1)", f"diagonal (L {args.seqL})", f"--velocities {args.velocities}",
             f"--spacing {args.spacing:g}", f"--spacing {args.spacing:g} --velocities {args.spaced_velocities}"]
    res = {n: {p: [] for p in PROFILES} for n in names}
    frames = {p: [] for p in PROFILES}
    for seed in args.seeds:
        r = route(seed, args.frames)
        for p in PROFILES:
            q, q_pos, known = query(r, p)
            kept = spaced_rows(known, None, args.spacing)
            frames[p].append((len(q), len(kept)))
            t0 = time.perf_counter()
            for name, rows, L, traj, rl in (
                    (names[0], slice(None), 1, trajectories_mod.trajectories((1.0,), 1), rules_mod.PLAIN_MIN),
                    (names[1], slice(None), args.seqL, one, rules_mod.PLAIN_MIN),
                    (names[2], slice(None), args.seqL, speeds, rule),
                    (names[3], kept, args.seqL, one, rules_mod.PLAIN_MIN),
                    (names[4], kept, args.seqL, near, rule)):
                if args.skip_dense and rows is not kept and len(q) > 4 * len(r["db"]) and name != names[1]:
                    res[name][p].append(np.nan)
                    continue
                res[name][p].append(recall(r["db"], r["db_pos"], q[rows], q_pos[rows], L, traj, rl))
            print(f"  seed {seed} {p}: {len(r['db'])} database / {len(q)} query frames, {len(kept)} kept "
                  f"({time.perf_counter() - t0:.1f} s)", flush=True)
    return {n: {p: float(np.nanmean(v)) if not np.all(np.isnan(v)) else np.nan for p, v in d.items()}
            for n, d in res.items()}, frames


def extraction(args) -> None:
    """``--extract N``: a video-rate traversal of N 640x480 frames (the video+stops drive) extracted with
    NetVLAD (random weights, the released layout): the kept frames at ``--spacing`` measured; every frame
    estimated as N times the kept frames' time per image (the same model, image size and settings)."""
    import tempfile

    from bench_extract import build, write_jpegs
    from seqmatchnet.images.extraction import ExtractSettings, extract_descriptors

    rng = np.random.default_rng(0)
    s = drive(rng, 0.0, 10_000.0, (0.1, 0.2), 3.0)[:args.extract]
    kept = spaced_rows(s - s[0], None, args.spacing)
    model = build("netvlad", False, 0)
    settings = ExtractSettings(model.default_size, batch_size=4, threads=1, device="cpu")
    with tempfile.TemporaryDirectory() as tmp:
        paths = write_jpegs(Path(tmp), args.extract, (640, 480), 0)
        extract_descriptors(model, paths[:2], Path(tmp) / "warm.npy", checkpoint_id="b", settings=settings)
        t0 = time.perf_counter()
        extract_descriptors(model, [paths[i] for i in kept.tolist()], Path(tmp) / "kept.npy", checkpoint_id="b",
                            settings=settings)
        kept_s = time.perf_counter() - t0
    print(f"\nNetVLAD (VGG16 + NetVLAD 64 + WPCA 4096) at 640x480 on the CPU ({torch.get_num_threads()} threads): "
          f"{args.extract} frames 0.1-0.2 m apart with stops ({s[-1] - s[0]:.0f} m); --spacing {args.spacing:g} "
          f"keeps {len(kept)}")
    per_image = kept_s / len(kept)
    print(f"  the kept frames: {kept_s:.0f} s measured ({per_image:.2f} s an image)")
    print(f"  every frame: {per_image * args.extract:.0f} s estimated at that rate "
          f"({args.extract / len(kept):.1f}x the kept frames' time)")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="one seed, a shorter route")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4, 5])
    p.add_argument("--frames", type=int, default=1500, help="database frames of the whole route (2 m apart)")
    p.add_argument("--seqL", type=int, default=5)
    p.add_argument("--spacing", type=float, default=2.0)
    p.add_argument("--velocities", default="0.5:2:0.5", help="the speed search on every frame")
    p.add_argument("--spaced-velocities", default="0.8:1.2:0.1",
                   help="the speed search on the kept frames (what spacing leaves: scale errors, noise)")
    p.add_argument("--skip-dense", action="store_true",
                   help="leave out single frames and --velocities on the unspaced video-rate profiles")
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--extract", type=int, default=0, metavar="N",
                   help="instead: time extracting a video-rate traversal of N frames with --spacing")
    args = p.parse_args(argv)
    if args.quick:
        args.seeds, args.frames = [0], 1000
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.extract:
        extraction(args)
        return 0
    res, frames = measure(args)
    base = res[f"diagonal (L {args.seqL})"]["2m (1x)"]
    print(f"\nRecall@1 within 10 m, test split, seqL {args.seqL}, seeds {args.seeds}, {args.frames} database frames "
          f"per route; ratio to the equal-speed diagonal ({base:.3f}) in brackets")
    rows = [[n] + [f"{v:.3f} ({v / base:.2f})" if np.isfinite(v) else "-" for v in d.values()] for n, d in res.items()]
    rows.append(["query frames / kept"] + [f"{np.mean([a for a, _ in frames[q]]):.0f} / "
                                           f"{np.mean([b for _, b in frames[q]]):.0f}" for q in PROFILES])
    print(table(rows, ["method"] + list(PROFILES)))
    ok = True
    spaced = [n for n in res if n.startswith("--spacing")]
    for q in PROFILES:
        best = max(res[n][q] for n in spaced)
        ok &= goal(best >= GOAL * base, f"{q}: with --spacing {best:.3f} >= {GOAL} x {base:.3f}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
