"""Large maps: ``search.rank`` on 200k database x 5k query frames (D = 256, L = 5).

    python bench/bench_scale.py [--quick] [--db 200000 --queries 5000 --dim 256 --seqL 5 --db-chunk 0]

``search.rank`` splits the queries into chunks (``--queryChunk``, 1024) and, when one query chunk's
block of distances would exceed ``search.DENSE_LIMIT_BYTES``, the database too (automatically, or with
an explicit ``db_chunk``), merging a running top-k. Each variant runs in a fresh subprocess; its peak
memory is the RSS high-water mark above the RSS after the inputs are allocated. Printed: peak memory,
throughput (queries per second), the time against a floor (the same matrix products alone, chunked),
and the top-1 agreement with exact dense scoring (``seqMatchNet.window_distances`` + argmin, one query
at a time) on a subset of queries.
Goals: peak <= 4 GiB over the inputs; top-1 identical to exact scoring (ties aside). Exits 1 when missed.
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
    ran_as_child,
    route_features,
    run_child,
    table,
)

GIB = 1024 ** 3


def floor_products(db: torch.Tensor, q: torch.Tensor, query_chunk: int, db_chunk: int) -> float:
    """Time of the plain products ``db @ q_chunk.T`` covering the same pairs, in the same chunks."""
    t0 = time.perf_counter()
    for lo in range(0, len(q), query_chunk):
        qc = q[lo:lo + query_chunk]
        for d_lo in range(0, len(db), db_chunk):
            db[d_lo:d_lo + db_chunk] @ qc.T
    return time.perf_counter() - t0


def child(args: argparse.Namespace) -> None:
    from seqmatchnet.data.windows import segment_bounds, sequence_windows
    from seqmatchnet.matching.seqmatch import window_distances
    from seqmatchnet.search import diagonal
    from seqmatchnet.search.sides import Windows

    torch.set_grad_enabled(False)
    db, q = route_features(args.db, args.queries, args.dim, seed=args.seed)
    db_starts, _ = sequence_windows(segment_bounds(args.db), args.seqL)
    q_starts, _ = sequence_windows(segment_bounds(args.queries), args.seqL)
    # warm-up on a few frames: library code pages and allocator pools are touched before the measurement
    diagonal.rank(Windows(db[:64], db_starts[:32]), Windows(q[:64], q_starts[:32]), args.seqL, k=10, db_chunk=16,
                  quiet=True)
    with PeakMemory() as pm:
        t0 = time.perf_counter()
        idx, dists = diagonal.rank(Windows(db, db_starts), Windows(q, q_starts), args.seqL,
                                   query_chunk=args.query_chunk, db_chunk=args.db_chunk, quiet=True)
        rank_s = time.perf_counter() - t0
    # what rank chose (mirrors its rule, for the report)
    block = len(db_starts) * min(args.query_chunk, len(q_starts)) * 12
    chosen = args.db_chunk if args.db_chunk > 0 else (
        len(db_starts) if block <= diagonal.DENSE_LIMIT_BYTES
        else max(diagonal.DENSE_LIMIT_BYTES // (12 * args.query_chunk), 1024))
    floor_s = floor_products(db, q, args.query_chunk, chosen)

    # exact dense scoring, one query window at a time, on a subset
    rng = np.random.default_rng(args.seed)
    subset = np.unique(np.r_[0, len(q_starts) - 1, rng.choice(len(q_starts), args.subset, replace=False)])
    subset = subset[:max(args.subset, 1)]
    t_db = torch.as_tensor(db_starts)
    exact_i, exact_d = [], []
    t1 = time.perf_counter()
    for j in subset:
        col = window_distances(db, q, t_db, torch.as_tensor(q_starts[j:j + 1]), args.seqL)[:, 0]
        i = int(torch.argmin(col))
        exact_i.append(i)
        exact_d.append(float(col[i]))
    exact_s = time.perf_counter() - t1
    exact_i, exact_d = np.array(exact_i), np.array(exact_d)
    p1 = idx[subset, 0]
    same = p1 == exact_i
    same_window = db_starts[p1] == db_starts[exact_i]
    tie = np.abs(dists[subset, 0] - exact_d) <= 1e-5
    child_report(base=pm.base, peak=pm.peak, delta=pm.delta, reset=pm.reset, maxrss=pm.maxrss_after,
                 rank_s=rank_s, floor_s=floor_s, db_chunk=int(chosen), n_q=len(q_starts), n_db=len(db_starts),
                 subset=len(subset), identical=int(same.sum()), same_window=int((~same & same_window).sum()),
                 tie=int((~same & ~same_window & tie).sum()), differ=int((~(same | same_window | tie)).sum()),
                 max_d_diff=float(np.abs(dists[subset, 0] - exact_d).max()), exact_per_query_s=exact_s / len(subset))


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_size_options(p, "50k x 1k frames", db=200_000, queries=5000, dim=256)
    p.add_argument("--query-chunk", dest="query_chunk", type=int, default=1024, help="search.rank query_chunk")
    p.add_argument("--db-chunk", dest="db_chunk", type=int, nargs="+", default=None,
                   help="search.rank db_chunk values to run (0: automatic; default 0 and 50000, --quick 0 and 20000)")
    p.add_argument("--subset", type=int, default=200, help="queries checked against exact dense scoring")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.quick:
        args.db, args.queries, args.subset = 50_000, 1000, 100
    if args.db_chunk is None:
        args.db_chunk = [0, 20_000] if args.quick else [0, 50_000]
    if args.child:
        args.db_chunk = args.db_chunk[0]
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if ran_as_child(args, child):
        return 0
    from seqmatchnet.search import diagonal

    print(f"bench_scale: {args.db} database x {args.queries} query frames, D = {args.dim}, L = {args.seqL}, "
          f"query_chunk {args.query_chunk}, search.DENSE_LIMIT_BYTES {gib(diagonal.DENSE_LIMIT_BYTES)}; "
          f"{machine_line()}")
    child_args = ["--db", str(args.db), "--queries", str(args.queries), "--dim", str(args.dim),
                  "--seqL", str(args.seqL),
              "--query-chunk", str(args.query_chunk), "--subset", str(args.subset), "--seed", str(args.seed),
              "--threads", str(args.threads)]
    rows, ok = [], True
    for db_chunk in args.db_chunk:
        r = run_child(Path(__file__), child_args + ["--db-chunk", str(db_chunk)])
        name = f"rank, db_chunk {'automatic' if db_chunk <= 0 else db_chunk} (-> {r['db_chunk']})"
        rows.append([name, f"{r['rank_s']:.1f}", f"{r['n_q'] / r['rank_s']:.0f}", f"{r['rank_s'] / r['floor_s']:.2f}",
                     gib(r["delta"]), gib(r["peak"]),
                     f"{r['identical']}+{r['same_window']}+{r['tie']} / {r['subset']}"])
        ok &= goal(r["delta"] <= 4 * GIB, f"{name}: peak {gib(r['delta'])} over the inputs <= 4 GiB "
                                          f"(whole process {gib(r['peak'])})")
        ok &= goal(r["differ"] == 0, f"{name}: top-1 equals exact dense scoring on {r['subset']} queries "
                                     f"({r['identical']} identical, {r['same_window']} same shifted window, "
                                     f"{r['tie']} ties; max |top-1 distance difference| {r['max_d_diff']:.1e})")
    print(table(rows, ["variant", "time s", "queries/s", "time / products alone", "peak over inputs",
                       "peak process", "top-1 agree (same+window+tie)"]))
    print(CPU_NOTE)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
