"""Mining cache: time and peak memory of the training distance matrix for a Nordland-train-size split.

    python bench/bench_mining.py [--quick] [--db 15000 --queries 15000 --dim 4096 --seqL 5]

Every measured variant runs in a fresh subprocess (this script with ``--child``); its peak memory is
the RSS high-water mark (``VmHWM``, reset once the inputs are allocated; ``ru_maxrss`` is printed
too) minus the RSS after the inputs are allocated. For each ``--neg_trip_method``:

- baseline: per query, ``cdist`` of its window's frames against every database window's frames and
  the mean of the diagonals (centerOnly: the centre frame against the centre frames); timed on a
  subset of queries and extrapolated;
- project, all at once: ``mining.cache_distances`` on every training query (``--cacheRefreshRate 0``);
- project, default: what ``train_epoch`` does with the default ``--cacheRefreshRate 1000``: chunks of
  1000 queries drawn at random (a permutation, each chunk sorted), ``cache_distances`` per chunk plus
  the top-100 for the training recall; a few chunks are timed and the rest extrapolated.
Goal: peak memory within the matrix itself (``Nd x Nq x 4`` bytes) plus 1 GiB. Exits 1 when the
project misses it (all at once or by default).
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
from common import (
    CPU_NOTE,
    PeakMemory,
    add_size_options,
    child_report,
    gib,
    goal,
    machine_line,
    median,
    mib,
    ran_as_child,
    run_child,
    table,
    unit_rows,
)

METHODS = ("meanOfPairs", "centerOnly")
GIB = 1024 ** 3


# ---------------------------------------------------------------- baseline

def baseline_column(db_windows: torch.Tensor, q_feats: torch.Tensor, q_start: int, seq_len: int,
                    method: str) -> torch.Tensor:
    """One query's cached distances ``[Nd]`` the per-query way (``db_windows`` from ``baseline_windows``)."""
    if method == "centerOnly":
        c = seq_len // 2
        return torch.cdist(q_feats[q_start + c:q_start + c + 1], db_windows)[0]
    block = torch.cdist(q_feats[q_start:q_start + seq_len], db_windows)          # [L, Nd * L]
    block = block.view(seq_len, -1, seq_len).permute(1, 0, 2)                    # [Nd, L, L]
    return torch.diagonal(block, dim1=1, dim2=2).mean(dim=1)


def baseline_windows(db_feats: torch.Tensor, db_starts: np.ndarray, seq_len: int, method: str) -> torch.Tensor:
    """Database window frames flattened ``[Nd * L, D]`` (centerOnly: centre frames ``[Nd, D]``)."""
    if method == "centerOnly":
        return db_feats[torch.as_tensor(db_starts) + seq_len // 2]
    rows = torch.as_tensor(db_starts)[:, None] + torch.arange(seq_len)
    return db_feats[rows].reshape(-1, db_feats.shape[1])


# ---------------------------------------------------------------- setup shared by the children

def make_training_set(n_db: int, n_q: int, dim: int, seq_len: int, seed: int):
    """Random unit features (timing and memory do not depend on content) and a TrainingSet over them."""
    from seqmatchnet.data.windows import Split, segment_bounds
    from seqmatchnet.training.mining import TrainingSet

    db = unit_rows(n_db, dim, seed)
    q = unit_rows(n_q, dim, seed + 1)
    db_pos = np.stack([np.arange(n_db) * 2.0, np.zeros(n_db)], axis=1)
    q_pos = np.stack([np.arange(n_q) * 2.0 * n_db / n_q, np.zeros(n_q)], axis=1)
    split = Split(name="train", db_desc=db.numpy(), q_desc=q.numpy(), db_positions=db_pos, q_positions=q_pos,
                  pos_dist_thr=10.0, non_triv_pos_dist_sq_thr=25.0, db_bounds=segment_bounds(n_db),
                  q_bounds=segment_bounds(n_q))
    return db, q, TrainingSet.build(split, seq_len)


def _head(tset, n: int):
    """The first ``n`` database windows of a TrainingSet (for warm-up calls on small data)."""
    import dataclasses

    return dataclasses.replace(tset, db_starts=tset.db_starts[:n], db_frames=tset.db_frames[:n])


def default_chunks(n_queries: int, refresh: int, seed: int) -> list[np.ndarray]:
    """train_epoch's chunks: a random order of the queries cut into ``refresh``-sized pieces, each sorted."""
    order = np.random.default_rng(seed).permutation(n_queries)
    return [np.sort(order[lo:lo + refresh]) for lo in range(0, n_queries, refresh)]


def child(args: argparse.Namespace) -> None:
    from seqmatchnet.matching.topk import topk_smallest
    from seqmatchnet.training.mining import cache_distances

    torch.set_grad_enabled(False)
    method, variant = args.method, args.variant
    db, q, tset = make_training_set(args.db, args.queries, args.dim, args.seqL, args.seed)
    queries = np.arange(len(tset.q_frames))
    info: dict = {"n_db_windows": len(tset.db_starts), "n_queries": len(queries)}
    # warm-up on a few queries: library code pages and allocator pools are touched before the measurement
    few = queries[:8]
    cache_distances(db[:64], q[:64], _head(tset, 32), few[:4], method)
    baseline_column(baseline_windows(db[:64], tset.db_starts[:32], args.seqL, method), q, int(tset.q_starts[0]),
                    args.seqL, method)
    with PeakMemory() as pm:
        t0 = time.perf_counter()
        if variant == "baseline":
            windows = baseline_windows(db, tset.db_starts, args.seqL, method)
            info["build_s"] = time.perf_counter() - t0
            subset = np.random.default_rng(args.seed).choice(queries, args.subset, replace=False)
            t1 = time.perf_counter()
            cols = [baseline_column(windows, q, int(tset.q_starts[j]), args.seqL, method) for j in subset]
            info["per_query_s"] = (time.perf_counter() - t1) / len(subset)
            info["matrix_bytes"] = len(cols[0]) * 4 * len(subset)
            del cols, windows
        elif variant == "all":
            d = cache_distances(db, q, tset, queries, method)
            info["time_s"] = time.perf_counter() - t0
            info["matrix_bytes"] = d.numel() * d.element_size()
            info["shape"] = list(d.shape)
            del d
        else:   # default: chunks of cacheRefreshRate random queries
            chunks = default_chunks(len(queries), args.refresh, args.seed)
            timed = chunks[:args.timed_chunks]
            for chunk in timed:
                d = cache_distances(db, q, tset, chunk, method)
                topk_smallest(d, 100)          # train_epoch's training-recall predictions
                d = d.cpu().numpy()
                del d
            info["timed_chunks"] = len(timed)
            info["chunks"] = len(chunks)
            info["time_s"] = (time.perf_counter() - t0) / len(timed) * len(chunks)
            info["matrix_bytes"] = len(tset.db_starts) * len(timed[0]) * 4
    child_report(variant=variant, method=method, base=pm.base, peak=pm.peak, delta=pm.delta, reset=pm.reset,
                 maxrss=pm.maxrss_after, **info)


# ---------------------------------------------------------------- parent

def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_size_options(p, "4000 x 4000 frames, D 1024", db=15000, queries=15000, dim=4096)
    p.add_argument("--subset", type=int, default=4, help="queries on which the baseline is timed")
    p.add_argument("--refresh", type=int, default=1000, help="queries per chunk (train_epoch's cacheRefreshRate)")
    p.add_argument("--timed-chunks", dest="timed_chunks", type=int, default=1,
                   help="chunks timed in the chunked variants (the rest extrapolated)")
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS, help="neg_trip_method values")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--variant", default="all", help=argparse.SUPPRESS)
    p.add_argument("--method", default="meanOfPairs", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.quick:
        args.db, args.queries, args.dim, args.subset, args.timed_chunks = 4000, 4000, 1024, 4, 2
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if ran_as_child(args, child):
        return 0
    print(f"bench_mining: {args.db} database x {args.queries} query frames, D = {args.dim}, L = {args.seqL}, "
          f"chunks of {args.refresh} queries; {machine_line()}")
    child_args = ["--db", str(args.db), "--queries", str(args.queries), "--dim", str(args.dim),
                  "--seqL", str(args.seqL),
              "--subset", str(args.subset), "--refresh", str(args.refresh), "--timed-chunks", str(args.timed_chunks),
              "--seed", str(args.seed), "--threads", str(args.threads)]
    variants = ["all", "default"]
    ok = True
    for method in args.methods:
        res = {}
        # the baseline brackets the project variants (before and after) so that both see the same load
        base_runs = [run_child(Path(__file__), child_args + ["--variant", "baseline", "--method", method])]
        for v in variants:
            res[v] = run_child(Path(__file__), child_args + ["--variant", v, "--method", method])
        base_runs.append(run_child(Path(__file__), child_args + ["--variant", "baseline", "--method", method]))
        b = base_runs[0]
        n_q = b["n_queries"]
        per_q = median([r["per_query_s"] for r in base_runs])
        t_base = median([r["build_s"] for r in base_runs]) + per_q * n_q
        full_bytes = b["n_db_windows"] * n_q * 4
        rows = [[f"baseline per-query loop ({args.subset} queries x2, EXTRAPOLATED to {n_q})", f"{t_base:.0f}",
                 "", mib(max(r["delta"] for r in base_runs)), "(window frames + one column per query)"]]
        names = {"all": "project cache_distances, all queries at once (cacheRefreshRate 0)",
                 "default": f"project default: chunks of {args.refresh} random queries (cacheRefreshRate "
                            f"{args.refresh})"}
        for v in variants:
            r = res[v]
            extrap = f" ({r['timed_chunks']} of {r['chunks']} chunks timed, EXTRAPOLATED)" if "chunks" in r else ""
            rows.append([names[v] + extrap, f"{r['time_s']:.1f}", f"{t_base / r['time_s']:.0f}x", gib(r["delta"]),
                         f"matrix {gib(r['matrix_bytes'])}, limit {gib(r['matrix_bytes'] + GIB)}"])
        print(f"\nneg_trip_method {method}: {b['n_db_windows']} database x {n_q} query windows "
              f"(full matrix {gib(full_bytes)}); inputs {gib(2 * args.db * args.dim * 4)}")
        print(table(rows, ["variant", "time s", "baseline/variant", "peak over inputs", "memory goal"]))
        print("peaks: " + ", ".join(f"{v} VmHWM {gib(r['peak'])} ru_maxrss {gib(r['maxrss'])} "
                                    f"(after inputs {gib(r['base'])}{'' if r['reset'] else ', no HWM reset'})"
                                    for v, r in res.items()))
        for v in ("all", "default"):
            r = res[v]
            ok &= goal(r["delta"] <= r["matrix_bytes"] + GIB,
                       f"{method}: {names[v]}: peak {gib(r['delta'])} over the inputs <= matrix "
                       f"{gib(r['matrix_bytes'])} + 1 GiB")
    print(CPU_NOTE)
    print("the project's default is --cacheRefreshRate 1000: train_epoch calls cache_distances once per chunk of "
          "1000 randomly drawn training queries (row 'project default' above)")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
