"""One training epoch on the reference fixture: the project's ``train_epoch`` against a straightforward
per-query implementation of the same steps (docs/how-it-works.md), written here.

    python bench/bench_train.py [--quick] [--baseline-queries 120 --baseline-batches 6 --repeats 2]

Data: the fixture's Oxford split (``../shared/reference``, copied to a temporary folder), options
``--seqL 5 --pooling --dataset oxford-v1.0 --outDims 64`` and the defaults (cacheRefreshRate 1000,
batchSize 16, meanOfPairs for mining and loss). Skipped (exit 0) when the fixture is absent.

Baseline, per chunk of queries as in train_epoch (same query order, same chunks, same batches):
1. cache: pool every frame (eval, batches of cacheBatchSize), then per query ``cdist`` of its window's
   frames against all database windows' frames and the mean of the diagonals;
2. mining: per query, draw 1000 potential negatives, then ``tests/plain.py: plain_mine_query``;
3. loss: per batch, every query, positive and negative window pooled separately, the distances and
   hinge per triplet in a loop (``plain_triplet_loss``), backward, SGD step.
The baseline is slow, so each phase is timed on part of the epoch (the first ``--baseline-queries``
queries of the first chunk for steps 1-2, the first ``--baseline-batches`` batches for step 3) and
extrapolated to the whole epoch; the project's epoch is timed whole. Before timing, the plain mining
and loss are checked against the project's on the same inputs.
Goal: the project's epoch >= 10x faster than the baseline's. Also prints the project's phase profile
(``train_epoch`` timings) and the cProfile entries where the remaining time goes. Exits 1 when missed.
"""
from __future__ import annotations

import argparse
import copy
import cProfile
import io
import math
import pstats
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402,F401,I001  (first: sets OMP_WAIT_POLICY before torch loads)

sys.path.insert(0, str(ROOT / "tests"))

import numpy as np
import torch

from common import CPU_NOTE, add_threads_option, apply_threads, goal, machine_line, median, table

REFERENCE = ROOT.parent / "shared" / "reference"
FIXTURE_ARGS = ["--mode", "train", "--seqL", "5", "--pooling", "--dataset", "oxford-v1.0", "--outDims", "64",
                "--nocuda", "--threads", "0", "--quiet"]


def copy_fixture(dst: Path) -> Path:
    """The Oxford files of the reference fixture in a writable folder (like tests/conftest.py reference_copy)."""
    for sub, pattern in (("data/descData/netvlad-pytorch", "oxford_*"), ("structFiles", "oxford-v1.0_*")):
        (dst / sub).mkdir(parents=True, exist_ok=True)
        for f in (REFERENCE / sub).glob(pattern):
            shutil.copyfile(f, dst / sub / f.name)
    return dst


# ---------------------------------------------------------------- the baseline, per query

def plain_pool(model, desc: np.ndarray, batch_size: int) -> torch.Tensor:
    """Pool every frame in eval mode, batch by batch: ``[N, C] -> [N, outDims]``."""
    model.eval()
    with torch.no_grad():
        return torch.cat([model.encode(torch.from_numpy(np.ascontiguousarray(desc[lo:lo + batch_size])))
                          for lo in range(0, len(desc), batch_size)])


def plain_cache_column(db_window_frames: torch.Tensor, q_feats: torch.Tensor, q_start: int, seq_len: int,
                       method: str) -> np.ndarray:
    """One query's distances to every database window: cdist of its frames against all windows' frames."""
    with torch.no_grad():
        block = torch.cdist(q_feats[q_start:q_start + seq_len], db_window_frames)    # [L, Nd * L]
        block = block.view(seq_len, -1, seq_len).permute(1, 0, 2)                    # [Nd, L, L]
        diag = torch.diagonal(block, dim1=1, dim2=2)                                  # [Nd, L]
        col = diag[:, seq_len // 2] if method == "centerOnly" else diag.mean(dim=1)
    return col.numpy()


def plain_sample(db_pos: np.ndarray, q_pos: np.ndarray, thr: float, rng: np.random.Generator, n: int) -> np.ndarray:
    """``n`` potential negatives of one query, with replacement, among database windows farther than thr."""
    far = np.flatnonzero(np.linalg.norm(db_pos - q_pos, axis=1) > thr)
    return rng.choice(far, size=n, replace=True)


def plain_batch_loss(model, tset, queries, positives, negatives, method: str, margin: float) -> torch.Tensor:
    """Every window pooled on its own, the triplet loss by loops (tests/plain.py)."""
    from plain import plain_triplet_loss

    split, L = tset.split, tset.seq_len

    def pool(desc: np.ndarray, start: int) -> torch.Tensor:
        return model.encode(torch.from_numpy(np.ascontiguousarray(desc[start:start + L])))

    q_seqs = [pool(split.q_desc, int(tset.q_starts[qi])) for qi in queries]
    p_seqs = [pool(split.db_desc, int(tset.db_starts[p])) for p in positives]
    n_seqs = [[pool(split.db_desc, int(tset.db_starts[n])) for n in negs] for negs in negatives]
    return plain_triplet_loss(q_seqs, p_seqs, n_seqs, method, margin)


def baseline_epoch_parts(model, tset, optimizer, neg_cache: np.ndarray, opt, epoch: int, n_queries: int,
                         n_batches: int) -> dict:
    """Time the baseline on part of the epoch; return per-unit times and the epoch's unit counts."""
    from plain import plain_mine_query
    from seqmatchnet.training.mining import N_NEG_SAMPLE

    split, L = tset.split, tset.seq_len
    rng = np.random.default_rng([opt.seed, epoch])
    gen = torch.Generator().manual_seed(opt.seed * 1000 + epoch)
    order = tset.queries[torch.randperm(len(tset.queries), generator=gen).numpy()]
    refresh = opt.cacheRefreshRate or len(order)
    n_chunks = math.ceil(len(order) / refresh)
    chunk = np.sort(order[:refresh])
    db_pos = split.db_positions[tset.db_frames]
    q_pos = split.q_positions[tset.q_frames]

    # 1. cache: pooling (once per chunk) and per-query columns
    t0 = time.perf_counter()
    db_feats = plain_pool(model, split.db_desc, opt.cacheBatchSize)
    q_feats = plain_pool(model, split.q_desc, opt.cacheBatchSize)
    rows = torch.as_tensor(tset.db_starts)[:, None] + torch.arange(L)
    db_window_frames = db_feats[rows].reshape(-1, db_feats.shape[1])
    t1 = time.perf_counter()
    measured = chunk[:n_queries]
    dists = np.full((len(tset.db_starts), len(chunk)), np.inf, dtype=np.float32)
    for col, qi in enumerate(measured):
        dists[:, col] = plain_cache_column(db_window_frames, q_feats, int(tset.q_starts[qi]), L, opt.neg_trip_method)
    t2 = time.perf_counter()
    # the rest of the chunk untimed (vectorised), so that mining and batches see a complete cache
    from seqmatchnet.training.mining import cache_distances
    with torch.no_grad():
        dists[:, len(measured):] = cache_distances(db_feats, q_feats, tset, chunk[len(measured):],
                                                   opt.neg_trip_method).numpy()

    # 2. mining, per query
    t3 = time.perf_counter()
    mined = {}
    for col, qi in enumerate(measured):
        sampled = plain_sample(db_pos, q_pos[qi], split.pos_dist_thr, rng, N_NEG_SAMPLE)
        cache = neg_cache[qi][neg_cache[qi] >= 0]
        mined[col] = plain_mine_query(dists[:, col], tset.nontriv_pos[qi], sampled, cache, opt.margin)
    t4 = time.perf_counter()
    for col in range(len(measured), len(chunk)):     # untimed rest, same code
        qi = chunk[col]
        sampled = plain_sample(db_pos, q_pos[qi], split.pos_dist_thr, rng, N_NEG_SAMPLE)
        mined[col] = plain_mine_query(dists[:, col], tset.nontriv_pos[qi], sampled,
                                      neg_cache[qi][neg_cache[qi] >= 0], opt.margin)
    for col, res in mined.items():
        if res is not None:
            neg_cache[chunk[col], :] = -1
            neg_cache[chunk[col], :len(res[2])] = res[2]

    # 3. batches: each window pooled on its own, the loss by loops
    model.train()
    local = rng.permutation(len(chunk))
    t5 = time.perf_counter()
    done = 0
    for lo in range(0, len(local), opt.batchSize):
        if done == n_batches:
            break
        sel = [c for c in local[lo:lo + opt.batchSize] if mined[c] is not None]
        done += 1
        if not sel:
            continue
        optimizer.zero_grad(set_to_none=True)
        loss = plain_batch_loss(model, tset, chunk[sel], [mined[c][0] for c in sel], [mined[c][1] for c in sel],
                                opt.loss_trip_method, opt.margin)
        loss.backward()
        optimizer.step()
    t6 = time.perf_counter()
    total_batches = sum(math.ceil(len(order[c * refresh:(c + 1) * refresh]) / opt.batchSize) for c in range(n_chunks))
    return {"pool_per_chunk_s": t1 - t0, "cache_per_query_s": (t2 - t1) / len(measured),
            "mining_per_query_s": (t4 - t3) / len(measured), "per_batch_s": (t6 - t5) / max(done, 1),
            "chunks": n_chunks, "queries": len(order), "batches": total_batches,
            "timed_queries": len(measured), "timed_batches": done}


def extrapolate(parts: dict) -> dict:
    cache = parts["pool_per_chunk_s"] * parts["chunks"] + parts["cache_per_query_s"] * parts["queries"]
    mining = parts["mining_per_query_s"] * parts["queries"]
    batches = parts["per_batch_s"] * parts["batches"]
    return {"cache_s": cache, "mining_s": mining, "batches_s": batches, "total_s": cache + mining + batches}


# ---------------------------------------------------------------- equivalence on the same inputs

def check_equivalence(model, tset, opt) -> tuple[int, int, float, float]:
    """Plain mining and loss against the project's ``mine`` / ``batch_loss`` on one chunk's inputs.
    Returns (queries compared, mismatching queries, |loss difference|, max |gradient difference|)."""
    from plain import plain_mine_query
    from seqmatchnet.models.sequence import project_frames
    from seqmatchnet.training.mining import N_NEG, cache_distances, mine, sample_negatives
    from seqmatchnet.training.steps import LossSettings, Triplets, batch_loss

    model = copy.deepcopy(model)
    cpu = torch.device("cpu")
    chunk = np.sort(tset.queries[:200])
    rng = np.random.default_rng(0)
    db_feats = project_frames(model, tset.split.db_desc, cpu, 256, quiet=True)
    q_feats = project_frames(model, tset.split.q_desc, cpu, 256, quiet=True)
    with torch.no_grad():
        dists = cache_distances(db_feats, q_feats, tset, chunk, opt.neg_trip_method).numpy()
    sampled = sample_negatives(tset, chunk, rng)
    empty = np.full((len(chunk), N_NEG), -1)
    pos, negs, kept = mine(dists, [tset.nontriv_pos[i] for i in chunk], sampled, empty, opt.margin)
    bad = 0
    for c, qi in enumerate(chunk):
        res = plain_mine_query(dists[:, c], tset.nontriv_pos[qi], sampled[c], [], opt.margin)
        if (res is None) != (not kept[c]) or (res is not None and (res[0] != pos[c] or
                                                                   not np.array_equal(res[1], negs[c][negs[c] >= 0]))):
            bad += 1
    sel = np.flatnonzero(kept)[:opt.batchSize]
    model.train()
    model.zero_grad()
    loss = batch_loss(model, tset, Triplets(chunk[sel], pos[sel], negs[sel]),
                      LossSettings(opt.loss_trip_method, opt.margin), cpu)
    loss.backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    plain = plain_batch_loss(model, tset, chunk[sel], pos[sel], [n[n >= 0] for n in negs[sel]],
                             opt.loss_trip_method, opt.margin)
    plain.backward()
    gdiff = max(float((g - p.grad).abs().max()) for g, p in zip(grads, model.parameters()))
    return len(chunk), bad, abs(loss.item() - plain.item()), gdiff


# ---------------------------------------------------------------- main

def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="baseline on 40 queries and 2 batches, 1 repeat")
    p.add_argument("--baseline-queries", dest="baseline_queries", type=int, default=120,
                   help="queries on which the baseline's cache and mining are timed (then extrapolated)")
    p.add_argument("--baseline-batches", dest="baseline_batches", type=int, default=6,
                   help="batches on which the baseline's loss steps are timed (then extrapolated)")
    p.add_argument("--repeats", type=int, default=2, help="interleaved rounds (project epoch, baseline part)")
    add_threads_option(p)
    p.add_argument("--profile-top", dest="profile_top", type=int, default=15, help="cProfile entries printed")
    args = p.parse_args(argv)
    if args.quick:
        args.baseline_queries, args.baseline_batches, args.repeats = 40, 2, 1
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if not REFERENCE.is_dir():
        print(f"bench_train: SKIPPED: the reference fixture {REFERENCE} is absent")
        return 0
    apply_threads(args.threads)
    from seqmatchnet.cli.options import parse_options
    from seqmatchnet.cli.train import make_optimizer
    from seqmatchnet.common.runtime import make_deterministic
    from seqmatchnet.data.specs import get_split
    from seqmatchnet.models.sequence import get_model
    from seqmatchnet.training.mining import N_NEG, TrainingSet
    from seqmatchnet.training.steps import Learner, TrainConfig, train_epoch

    with tempfile.TemporaryDirectory(prefix="bench_train_") as tmp:
        fixture = copy_fixture(Path(tmp) / "reference")
        opt = parse_options(FIXTURE_ARGS + ["--dataPath", str(fixture / "data"),
                                            "--structPath", str(fixture / "structFiles")])
        split = get_split(opt, "train")
    tset = TrainingSet.build(split, opt.seqL)
    make_deterministic(opt.seed)
    model0 = get_model(opt, split.dim)
    cpu = torch.device("cpu")
    print(f"bench_train: reference fixture, {' '.join(FIXTURE_ARGS[2:9])}; {tset.summary()}; "
          f"cacheRefreshRate {opt.cacheRefreshRate}, batchSize {opt.batchSize}; {machine_line()}")

    n_q, bad, dloss, dgrad = check_equivalence(model0, tset, opt)
    print(f"equivalence on the same inputs: plain mining differs on {bad} of {n_q} queries; one batch: "
          f"|loss difference| {dloss:.1e}, max |gradient difference| {dgrad:.1e}")

    def fresh():
        model = copy.deepcopy(model0)
        optimizer, _ = make_optimizer(opt, model)
        return model, optimizer, np.full((len(tset.q_frames), N_NEG), -1, dtype=np.int64)

    project_runs, baseline_runs = [], []
    for _ in range(args.repeats):
        model, optimizer, neg_cache = fresh()
        t0 = time.perf_counter()
        stats = train_epoch(Learner(model, optimizer, cpu), tset, neg_cache,
                            TrainConfig.from_options(opt), 1)
        project_runs.append((time.perf_counter() - t0, stats))
        model, optimizer, neg_cache = fresh()
        parts = baseline_epoch_parts(model, tset, optimizer, neg_cache, opt, 1, args.baseline_queries,
                                     args.baseline_batches)
        baseline_runs.append(extrapolate(parts))
    t_proj = median([r[0] for r in project_runs])
    stats = project_runs[-1][1]
    base = {k: median([r[k] for r in baseline_runs]) for k in baseline_runs[0]}
    proj_phase = {k: median([r[1].timings[k] for r in project_runs]) for k in stats.timings}

    rows = []
    for k in ("cache_s", "mining_s", "batches_s"):
        rows.append([k.replace("_s", ""), f"{proj_phase[k]:.2f}", f"{base[k]:.1f}", f"{base[k] / proj_phase[k]:.0f}x"])
    rows.append(["whole epoch", f"{t_proj:.2f}", f"{base['total_s']:.1f}", f"{base['total_s'] / t_proj:.0f}x"])
    print(f"baseline timed on {parts['timed_queries']} of {parts['queries']} queries (cache, mining) and "
          f"{parts['timed_batches']} of {parts['batches']} batches, EXTRAPOLATED to the epoch "
          f"({parts['chunks']} chunks); median of {args.repeats} interleaved round(s)")
    print(table(rows, ["phase", "project s", "baseline s (extrapolated)", "baseline / project"]))
    other = t_proj - sum(proj_phase.values())
    print(f"project epoch: {stats.batches} batches, average loss {stats.avg_loss:.4f}, train R@1 "
          f"{stats.train_recalls[1]:.4f}; phases: " + ", ".join(f"{k} {v:.2f} s ({v / t_proj:.0%})"
                                                                 for k, v in proj_phase.items())
          + f", rest (training recall) {other:.2f} s")
    print(CPU_NOTE)

    # where the project's epoch spends its time
    model, optimizer, neg_cache = fresh()
    prof = cProfile.Profile()
    prof.enable()
    train_epoch(Learner(model, optimizer, cpu), tset, neg_cache, TrainConfig.from_options(opt), 1)
    prof.disable()
    out = io.StringIO()
    pstats.Stats(prof, stream=out).sort_stats("tottime").print_stats(args.profile_top)
    print(f"cProfile of one project epoch, top {args.profile_top} by own time:")
    print("\n".join(line for line in out.getvalue().splitlines()[4:] if line.strip()))

    ok = goal(bad == 0 and dloss < 1e-5 and dgrad < 1e-5,
              "the baseline computes the same mining and loss as the project on the same inputs")
    ok &= goal(base["total_s"] >= 10 * t_proj, f"project epoch {base['total_s'] / t_proj:.0f}x faster than the "
                                               "per-query baseline (goal >= 10x; baseline extrapolated)")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
