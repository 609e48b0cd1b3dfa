"""Peak memory of scoring a 20000 x 20000 split depends on the chunk size, not on the number of queries.

    python bench/bench_memory_chunks.py [--quick] [--db 20000 --dim 64 --seqL 5]

``search.rank`` on 20000 database frames (D small so that it runs fast), each case in a fresh
subprocess (peak = RSS high-water mark above the RSS after the inputs are allocated):
(a) fixed ``query_chunk`` (1024), 5000 vs 20000 queries;
(b) fixed 20000 queries, ``query_chunk`` 512 vs 4096.
Blocks are kept above 32 MiB, glibc's largest dynamic mmap threshold: smaller freed blocks may stay
in the heap, which adds a floor of fragmentation (about 20-150 MiB here) to the small-chunk peaks.
The only memory that must grow with the query count is the result (``Nq x 100`` distances and
indices, 12 bytes per entry), printed beside the peaks.
Goals: (a) 4x the queries costs at most 1.25x the peak; (b) 8x the chunk costs at least 3x the peak.
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
import torch
from common import (
    PeakMemory,
    add_size_options,
    child_report,
    goal,
    machine_line,
    mib,
    ran_as_child,
    run_child,
    table,
    unit_rows,
)

TOP_K = 100


def child(args: argparse.Namespace) -> None:
    from seqmatchnet.data.windows import segment_bounds, sequence_windows
    from seqmatchnet.search import diagonal
    from seqmatchnet.search.sides import Windows

    torch.set_grad_enabled(False)
    db = unit_rows(args.db, args.dim, args.seed)
    q = unit_rows(args.n_queries, args.dim, args.seed + 1)
    db_starts, _ = sequence_windows(segment_bounds(args.db), args.seqL)
    q_starts, _ = sequence_windows(segment_bounds(args.n_queries), args.seqL)
    # warm-up on a few frames: library code pages and allocator pools are touched before the measurement
    diagonal.rank(Windows(db[:64], db_starts[:32]), Windows(q[:64], q_starts[:32]), args.seqL, k=10, quiet=True)
    with PeakMemory() as pm:
        t0 = time.perf_counter()
        idx, dists = diagonal.rank(Windows(db, db_starts), Windows(q, q_starts), args.seqL, k=TOP_K,
                                   query_chunk=args.query_chunk, quiet=True)
        rank_s = time.perf_counter() - t0
    child_report(base=pm.base, peak=pm.peak, delta=pm.delta, reset=pm.reset, maxrss=pm.maxrss_after, rank_s=rank_s,
                 result_bytes=int(idx.nbytes + dists.nbytes))


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_size_options(p, "12000 database frames, 3000 vs 12000 queries, query_chunk 1024 vs 8192",
                     db=20000, queries=None, dim=64)
    p.add_argument("--queries", type=int, nargs=2, default=[5000, 20000], help="(a): the two query counts")
    p.add_argument("--fixed-chunk", dest="fixed_chunk", type=int, default=1024, help="(a): query_chunk")
    p.add_argument("--chunks", type=int, nargs=2, default=[512, 4096], help="(b): the two query_chunk values")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--n-queries", dest="n_queries", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--query-chunk", dest="query_chunk", type=int, default=1024, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.quick:
        args.db, args.queries, args.chunks = 12000, [3000, 12000], [1024, 8192]
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if ran_as_child(args, child):
        return 0
    n_small, n_large = args.queries
    c_small, c_large = args.chunks
    print(f"bench_memory_chunks: search.rank on {args.db} database frames, D = {args.dim}, L = {args.seqL}, "
          f"top-{TOP_K}; {machine_line()}")
    cases = [("a", n_small, args.fixed_chunk), ("a", n_large, args.fixed_chunk),
             ("b", n_large, c_small), ("b", n_large, c_large)]
    res = {}
    for part, nq, qc in cases:
        res[(part, nq, qc)] = run_child(Path(__file__), [
            "--db", str(args.db), "--dim", str(args.dim), "--seqL", str(args.seqL), "--seed", str(args.seed),
            "--threads", str(args.threads), "--n-queries", str(nq), "--query-chunk", str(qc)])
    rows = []
    for (part, nq, qc), r in res.items():
        block = args.db * (min(qc, nq) + args.seqL - 1) * 4
        rows.append([part, nq, qc, mib(r["delta"]), mib(r["result_bytes"]), mib(block),
                     f"{(r['delta'] - r['result_bytes']) / block:.1f}", f"{r['rank_s']:.1f}"])
    print(table(rows, ["case", "queries", "query_chunk", "peak over inputs", "result (Nq x k)",
                       "one Nd x chunk float32 block", "peak - result, in blocks", "time s"]))
    a_small, a_large = res[("a", n_small, args.fixed_chunk)], res[("a", n_large, args.fixed_chunk)]
    b_small, b_large = res[("b", n_large, c_small)], res[("b", n_large, c_large)]
    ra = a_large["delta"] / a_small["delta"]
    rb = b_large["delta"] / b_small["delta"]
    print(f"(a) {n_large / n_small:.0f}x the queries at query_chunk {args.fixed_chunk}: peak x{ra:.2f} "
          f"({mib(a_small['delta'])} -> {mib(a_large['delta'])}; the result alone grows by "
          f"{mib(a_large['result_bytes'] - a_small['result_bytes'])})")
    print(f"(b) {c_large / c_small:.0f}x the query_chunk at {n_large} queries: peak x{rb:.2f} "
          f"({mib(b_small['delta'])} -> {mib(b_large['delta'])})")
    ok = goal(ra <= 1.25, f"(a) peak memory does not track the number of queries: x{ra:.2f} for "
                          f"x{n_large / n_small:.0f} queries (goal <= 1.25)")
    ok &= goal(rb >= 3.0, f"(b) peak memory tracks the chunk size: x{rb:.2f} for x{c_large / c_small:.0f} "
                          f"query_chunk (goal >= 3)")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
