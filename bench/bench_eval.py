"""Evaluation speed: the project's ``--mode test`` scoring against the per-query algorithm of the
reference and against one plain matrix product of the same size.

    python bench/bench_eval.py [--quick] [--db 3000 --queries 3000 --dim 4096 --seqL 5]

(a) baseline: per query window, ``torch.cdist`` of its L frames against the frames of every database
    window (an ``[Nd, L, L]`` block), the mean of each block's diagonal, then ``argsort``; too slow for
    every query, so it is timed on a subset and extrapolated linearly;
(b) project: ``search.rank`` (chunked top-k) and the whole ``evaluate.evaluate`` (features with a model
    without pooling, ranking, Recall@N and the radius table) on an in-memory ``datasets.Split``;
(c) floor: one matrix product ``db @ q.T``.
Goals: whole evaluate >= 100x faster than the baseline; rank <= 2x the matrix product; the project's
top-1 equals the baseline's on the subset (ties aside). Exits 1 when a goal is missed.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402,F401,I001  (first: sets OMP_WAIT_POLICY before torch loads)
import numpy as np
import torch
from common import (
    CPU_NOTE,
    route_split,
    add_size_options,
    apply_threads,
    goal,
    interleaved,
    machine_line,
    median,
    route_features,
    table,
    timed,
)

TOP_K = 100


def baseline_windows(db_feats: torch.Tensor, db_starts: np.ndarray, seq_len: int) -> torch.Tensor:
    """Frames of every database window, flattened: ``[Nd * L, D]`` (built once, like the reference's
    sequence descriptors)."""
    rows = torch.as_tensor(db_starts)[:, None] + torch.arange(seq_len)
    return db_feats[rows].reshape(-1, db_feats.shape[1])


def baseline_query(db_window_frames: torch.Tensor, q_feats: torch.Tensor, q_start: int, seq_len: int,
                   k: int = TOP_K) -> tuple[np.ndarray, np.ndarray]:
    """One query the reference's way: ``cdist`` of its L frames against all database windows' frames
    -> ``[Nd, L, L]``, mean of each diagonal, argsort. Returns (top-k indices, their distances)."""
    q_win = q_feats[q_start:q_start + seq_len]                                   # [L, D]
    block = torch.cdist(q_win, db_window_frames)                                 # [L, Nd * L]
    block = block.view(seq_len, -1, seq_len).permute(1, 0, 2)                    # [Nd, L, L]
    scores = torch.diagonal(block, dim1=1, dim2=2).mean(dim=1)                   # [Nd]
    order = torch.argsort(scores)[:k]
    return order.numpy(), scores[order].numpy()


def baseline(db_window_frames: torch.Tensor, q_feats: torch.Tensor, q_starts: np.ndarray, subset: np.ndarray,
             seq_len: int) -> tuple[np.ndarray, np.ndarray]:
    out = [baseline_query(db_window_frames, q_feats, int(q_starts[j]), seq_len) for j in subset]
    return np.stack([o[0] for o in out]), np.stack([o[1] for o in out])


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_size_options(p, "small sizes (1000 x 1000, D 1024) for a smoke run", db=3000, queries=3000, dim=4096)
    p.add_argument("--subset", type=int, default=30, help="queries on which the baseline is timed")
    p.add_argument("--repeats", type=int, default=3, help="interleaved timing rounds (median)")
    args = p.parse_args(argv)
    if args.quick:
        args.db, args.queries, args.dim, args.subset, args.repeats = 1000, 1000, 1024, 10, 2
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    apply_threads(args.threads)
    from seqmatchnet.cli.options import parse_options
    from seqmatchnet.data.windows import segment_bounds, sequence_windows
    from seqmatchnet.evaluation import evaluate
    from seqmatchnet.models.sequence import SeqMatchModel
    from seqmatchnet.search import diagonal
    from seqmatchnet.search.sides import Windows

    L = args.seqL
    print(f"bench_eval: {args.db} database x {args.queries} query frames, D = {args.dim}, L = {L}; {machine_line()}")
    db, q = route_features(args.db, args.queries, args.dim, seed=args.seed)
    db_starts, _ = sequence_windows(segment_bounds(args.db), L)
    q_starts, _ = sequence_windows(segment_bounds(args.queries), L)
    rng = np.random.default_rng(args.seed)
    subset = np.unique(np.r_[0, args.queries - 1, rng.choice(args.queries, max(args.subset - 2, 0), replace=False)])
    subset = subset[:max(args.subset, 1)]

    split = route_split(db, q, "bench")
    model = SeqMatchModel(args.dim, pooling=False, out_dims=args.dim)
    config = evaluate.EvalConfig.from_options(parse_options(["--mode", "test", "--seqL", str(L), "--nocuda",
                                                                      "--quiet"]))
    cpu = torch.device("cpu")

    build_s, db_window_frames = timed(lambda: baseline_windows(db, db_starts, L))
    results = {}

    def run_rank():
        results["rank"] = diagonal.rank(Windows(db, db_starts), Windows(q, q_starts), L, quiet=True)

    def run_evaluate():
        results["evaluate"] = evaluate.evaluate(config, split, model, cpu)

    def run_baseline():
        results["baseline"] = baseline(db_window_frames, q, q_starts, subset, L)

    fns = {
        "matrix product db @ q.T": lambda: db @ q.T,
        "project search.rank": run_rank,
        "project evaluate.evaluate": run_evaluate,
        f"baseline, {len(subset)} queries": run_baseline,
    }
    with torch.no_grad():
        baseline(db_window_frames, q, q_starts, subset[:2], L)      # warm up the baseline on 2 queries only
        interleaved({k: v for k, v in fns.items() if not k.startswith("baseline")}, 1, warmup=False)
        times = interleaved(fns, args.repeats, warmup=False)
    med = {k: median(v) for k, v in times.items()}
    t_mm = med["matrix product db @ q.T"]
    t_rank = med["project search.rank"]
    t_eval = med["project evaluate.evaluate"]
    t_base_subset = med[f"baseline, {len(subset)} queries"]
    t_base = build_s + t_base_subset / len(subset) * args.queries

    rows = [[k, f"{v:.3f}", " ".join(f"{x:.3f}" for x in times[k])] for k, v in med.items()]
    rows.append([f"baseline, all {args.queries} queries (EXTRAPOLATED: windows {build_s:.3f} s + "
                 f"{args.queries} x per-query time)", f"{t_base:.1f}", ""])
    print(table(rows, ["variant", "median s", "repeats s"]))
    ev = results["evaluate"]
    print("evaluate phases (last run): " + ", ".join(f"{k} {v:.3f} s" for k, v in ev.timings.items()))
    print(f"ratios: baseline / evaluate = {t_base / t_eval:.0f}x; baseline / rank = {t_base / t_rank:.0f}x; "
          f"rank / matrix product = {t_rank / t_mm:.2f}; evaluate / matrix product = {t_eval / t_mm:.2f}")
    print(CPU_NOTE)

    # top-1 agreement on the subset, ties (identical window or equal distance) aside
    base_idx, base_d = results["baseline"]
    proj_idx, proj_d = results["rank"]
    p1, b1 = proj_idx[subset, 0], base_idx[:, 0]
    same = p1 == b1
    same_window = db_starts[p1] == db_starts[b1]
    tie = np.abs(proj_d[subset, 0] - base_d[:, 0]) <= 1e-5
    agree = same | same_window | tie
    print(f"top-1 on the {len(subset)}-query subset: {int(same.sum())} identical, "
          f"{int((~same & same_window).sum())} another frame of the same (shifted) window, "
          f"{int((~same & ~same_window & tie).sum())} equal distance (tie), {int((~agree).sum())} different; "
          f"max |top-1 distance difference| {np.abs(proj_d[subset, 0] - base_d[:, 0]).max():.2e}; "
          f"evaluate's top-1 windows equal rank's: "
          f"{np.mean(db_starts[ev.preds[:, 0]] == db_starts[proj_idx[:, 0]]):.4f}")
    print(f"Recall@1/5 of this synthetic split (information only): {ev.recalls[1]:.3f} / {ev.recalls[5]:.3f}")

    if args.quick:
        print("note: --quick sizes (small D: fixed costs weigh more); the goals are set for the default sizes")
    ok = goal(t_base >= 100 * t_eval, f"whole evaluate {t_base / t_eval:.0f}x faster than the per-query baseline "
              "(goal >= 100x; baseline extrapolated from the subset)")
    ok &= goal(t_rank <= 2 * t_mm, f"rank takes {t_rank / t_mm:.2f}x the plain matrix product (goal <= 2x)")
    ok &= goal(bool(agree.all()), f"project top-1 equals the baseline's on {len(subset)} queries, ties aside")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
