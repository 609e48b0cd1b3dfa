"""Test-mode ranking with 1 and 2 ranks under torchrun (gloo on the CPU): speed-up and memory per rank.

    python bench/bench_distributed.py [--quick] [--db 20000 --queries 2000 --dim 256 --seqL 5] [--nproc 2]

Each world size runs in a fresh ``torchrun --standalone`` job (127.0.0.1) whose ranks call
``search.rank`` (the path of ``--mode test``: each rank scores its share of the database windows with
the chunked top-k, then the top-100 lists are merged). Reported per world size: the ranking time
(slowest rank, median of the repeats), the speed-up over one rank, and each rank's peak RSS above
its RSS before ranking (the inputs, which every rank holds, do not count). The predictions of every
world size are checked against one rank's. Goal: identical predictions; the speed-up is printed, not
required (on a shared 2-core machine it is bounded by the cores the other processes leave).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402,F401,I001  (first: sets OMP_WAIT_POLICY before torch loads)
import numpy as np
import torch
from common import PeakMemory, add_size_options, machine_line, median, mib, route_features, table

from seqmatchnet.common import distributed


def worker(args) -> None:
    """One rank of the job: rank the queries, report time and memory to ``args.out``."""
    import time

    from seqmatchnet.search import diagonal, entry
    from seqmatchnet.search.sides import Windows

    distributed.init(cuda=args.cuda)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    db, q = route_features(args.db, args.queries, args.dim, seed=args.seed)
    if args.cuda:       # NCCL; the predictions are checked against the CPU's by the caller (bench/gpu_check.sh)
        db, q = db.cuda(), q.cuda()
    starts_db = np.arange(args.db - args.seqL + 1)
    starts_q = np.arange(args.queries - args.seqL + 1)
    times, peaks = [], []
    if args.streamed:               # the database streamed from its descriptors, --mapChunk frames at a time
        from seqmatchnet.models.sequence import Projection, SeqMatchModel

        model = SeqMatchModel(args.dim, False, args.dim)
        desc = db.cpu().numpy()
        q_emb = model.embed_windows(q.cpu().numpy(), starts_q, args.seqL,
                                    Projection(torch.device("cpu"), 4096, quiet=True),
                                    all_frames=True)
        config = diagonal.SearchConfig(map_chunk=args.map_chunk, quiet=True)
    for _ in range(args.repeats):
        distributed.barrier()
        with PeakMemory() as mem:
            t0 = time.perf_counter()
            if args.streamed:
                idx = entry.search_streamed(config, model, Windows(desc, starts_db), Windows.of(q_emb), args.seqL,
                                            torch.device("cpu")).preds
            else:
                idx, dists = diagonal.rank(Windows(db, starts_db), Windows(q, starts_q), args.seqL, quiet=True)
            elapsed = time.perf_counter() - t0
        slowest = distributed.all_reduce_sum(torch.zeros(distributed.world_size()).index_fill_(
            0, torch.tensor(distributed.rank()), elapsed)).max().item()
        times.append(slowest)
        peaks.append(mem.delta)
    report = {"rank": distributed.rank(), "world": distributed.world_size(), "seconds": times,
              "peak_bytes": max(peaks), "threads": torch.get_num_threads()}
    Path(args.out, f"rank{distributed.rank()}.json").write_text(json.dumps(report))
    if distributed.is_main():
        np.save(Path(args.out, "preds.npy"), idx)
    distributed.shutdown()


def run_world(nproc: int, args, out: Path) -> list[dict]:
    out.mkdir(parents=True)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
           str(Path(__file__).resolve()), "--worker", "--out", str(out), "--db", str(args.db), "--queries",
           str(args.queries), "--dim", str(args.dim), "--seqL", str(args.seqL), "--seed", str(args.seed),
           "--repeats", str(args.repeats), "--map-chunk", str(args.map_chunk)]
    cmd += ["--streamed"] if args.streamed else []
    # one OpenMP thread per rank, as torchrun sets by default for several ranks; 1 rank: torch's default
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads_per_rank or max((os.cpu_count() or 1) // nproc, 1))}
    subprocess.run(cmd, check=True, env=env, timeout=1800, capture_output=True, text=True, start_new_session=True)
    return [json.loads(p.read_text()) for p in sorted(out.glob("rank*.json"))]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_size_options(parser, "small sizes (a smoke run)", db=20000, queries=2000, dim=256)
    parser.add_argument("--nproc", type=int, default=2, help="the larger world size (compared with 1)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads-per-rank", type=int, default=0,
                        help="OMP_NUM_THREADS of each rank (0: the CPUs divided by the ranks)")
    parser.add_argument("--streamed", action="store_true",
                        help="stream the database from its descriptors (entry.search_streamed, the path of a map "
                             "larger than --mapChunk): each rank reads and projects only its share")
    parser.add_argument("--map-chunk", type=int, default=4096, help="with --streamed: frames per chunk")
    parser.add_argument("--worker", action="store_true",
                        help="run as one rank of a torchrun job (what this script starts itself)")
    parser.add_argument("--cuda", action="store_true", help="with --worker: rank on CUDA (NCCL)")
    parser.add_argument("--out", help="with --worker: the folder for rank*.json and preds.npy")
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return 0
    if args.quick:
        args.db, args.queries, args.dim, args.repeats = 4000, 500, 64, 2
    print(machine_line())
    print(f"database {args.db} frames, {args.queries} queries, D={args.dim}, seqL {args.seqL}, top-100; "
          f"{args.repeats} repeats")
    rows, preds, base = [], {}, None
    with tempfile.TemporaryDirectory() as tmp:
        for nproc in (1, args.nproc):
            reports = run_world(nproc, args, Path(tmp) / f"world{nproc}")
            seconds = median(reports[0]["seconds"])
            base = seconds if base is None else base
            preds[nproc] = np.load(Path(tmp) / f"world{nproc}" / "preds.npy")
            per_rank = ", ".join(mib(r["peak_bytes"]) for r in reports)
            rows.append([nproc, reports[0]["threads"], f"{seconds:.2f}", f"{base / seconds:.2f}x", per_rank])
    print(table(rows, ["ranks", "threads/rank", "ranking s", "speed-up", "peak above inputs, per rank"]))
    same = bool(np.array_equal(preds[1], preds[args.nproc]))
    print(f"{'GOAL MET' if same else 'GOAL MISSED'}: predictions of {args.nproc} ranks identical to one rank's")
    if args.streamed:
        ratio = float(rows[1][2]) / float(rows[0][2])
        print(f"{'GOAL MET' if ratio <= 0.6 else 'GOAL MISSED'}: streamed map, {args.nproc} ranks take {ratio:.2f}x "
              "one process's time (goal <= 0.6x at equal threads per process)")
        same = same and (ratio <= 0.6 or args.quick)
    print("note: each rank holds all frame features (the inputs); what is divided is the distance blocks and the "
          "top-k work. Timings are medians on a possibly shared CPU: only the ratio is meaningful.")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
