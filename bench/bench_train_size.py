"""Training at Nordland's size: each step against its compute floor, measured in one run.

    python bench/bench_train_size.py [--small | --quick] [--db 15000 --queries 15000 --dim 4096 --seqL 5
                                      --outDims 4096 --batchSize 16 --cacheRefreshRate 1000 --refreshes 2
                                      --batches 6 --conv-batches 1 --threads 0]

Data: two contiguous synthetic traversals of one route (``common.route_features``, unit rows), frames 2 m
apart, positives within 10 m, non-trivial positives within 5 m, one segment per traversal; the model is
``--pooling`` with a random projection ``dim -> outDims`` and the training defaults (SGD, lr 0.001,
momentum 0.9, meanOfPairs). ``--small`` is 3000 + 3000 frames; ``--quick`` a smoke run (600 + 600, D 256).

Measured, interleaved (each project step is followed by its floor on the same sizes; medians):
- cache refresh, as ``train_epoch`` does it for one chunk of ``--cacheRefreshRate`` queries:
  ``train.model_cache_distances`` (pool the frames, then the mining matrix), its top-100 and the copy to
  numpy. Floor: one product ``x @ W.T + b`` of exactly the frames the refresh pools (every frame of the
  database windows and of the chunk's query windows, gathered beforehand) plus one product ``db @ q.T``
  of the results (the mining matrix products). The issue's looser floor (projecting all frames) is printed too.
- mining (``sample_negatives`` + ``mine``) per refresh: reported, no floor.
- training batch, as ``train_epoch`` does it: ``zero_grad``, ``train.batch_loss``, ``backward``, optimiser
  step. Floor: ``F.linear`` forward + backward + the same optimiser's step on a copy of the projection, on as
  many frames as the batch pools (its distinct frames).
- for context, ``--conv-batches`` batches with the projection computed by ``conv1d`` on ``[N, C, 1]`` (the
  reference's layer; 0 skips it).
Epoch estimate: chunks x (refresh + mining) + batches x batch time. Goals: batch <= 1.3x its floor,
refresh <= 1.5x its floor (ratios of the medians). Exits 1 when a goal is missed.
"""
from __future__ import annotations

import argparse
import contextlib
import math
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import numpy as np  # noqa: E402
import torch  # noqa: E402

import common  # noqa: E402  (first: sets OMP_WAIT_POLICY before torch loads)
from common import CPU_NOTE, goal, machine_line, median, route_split, table  # noqa: E402

BATCH_GOAL = 1.3
REFRESH_GOAL = 1.5


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    common.add_size_options(p, "smoke run: 600 + 600 frames, D 256, outDims 256", db=15000, queries=15000, dim=4096)
    p.add_argument("--small", action="store_true", help="3000 + 3000 frames (D and outDims unchanged)")
    p.add_argument("--outDims", type=int, default=None, help="projection output dimensions (default: --dim)")
    p.add_argument("--batchSize", type=int, default=16)
    p.add_argument("--cacheRefreshRate", type=int, default=1000)
    p.add_argument("--refreshes", type=int, default=2, help="timed cache refreshes (plus one warm-up)")
    p.add_argument("--batches", type=int, default=6, help="timed training batches (plus one warm-up)")
    p.add_argument("--conv-batches", type=int, default=1, help="batches timed with the conv1d projection (0: skip)")
    args = p.parse_args(argv)
    if args.quick:
        args.db, args.queries, args.dim = 600, 600, 256
        args.outDims = args.outDims or 256
        args.cacheRefreshRate = min(args.cacheRefreshRate, 200)
    elif args.small:
        args.db, args.queries = 3000, 3000
    args.outDims = args.outDims or args.dim
    return args


def refresh_chunk(steps, tset, rate: int, seed: int) -> np.ndarray:
    """The first cache-refresh chunk of an epoch, as ``train_epoch`` forms it."""
    if hasattr(steps, "refresh_chunks"):          # consecutive pieces of the queries in route order
        return np.asarray(steps.refresh_chunks(tset.queries, rate)[0])
    gen = torch.Generator().manual_seed(seed * 1000 + 1)          # random order, each chunk sorted
    order = tset.queries[torch.randperm(len(tset.queries), generator=gen).numpy()]
    return np.sort(order[:rate or len(order)])


@contextlib.contextmanager
def conv1d_projection():
    """The projection computed as the reference's layer: conv1d on ``[N, C, 1]``."""
    from seqmatchnet.models.sequence import WXpB

    fast = WXpB.forward
    WXpB.forward = lambda self, x: self.conv(x.flatten(2)).permute(0, 2, 1)
    try:
        yield
    finally:
        WXpB.forward = fast


def main(argv=None) -> int:
    args = parse_args(argv)
    common.apply_threads(args.threads)
    from seqmatchnet.cli import train as train_mod
    from seqmatchnet.cli.options import parse_options
    from seqmatchnet.matching.topk import topk_smallest
    from seqmatchnet.models.sequence import get_model
    from seqmatchnet.training import mining as mining_mod
    from seqmatchnet.training import steps

    print(machine_line())
    print(CPU_NOTE)
    t0 = time.perf_counter()
    db, q = common.route_features(args.db, args.queries, args.dim, seed=args.seed)
    split = route_split(db, q, "train")
    tset = mining_mod.TrainingSet.build(split, args.seqL)
    opt = parse_options(["--mode", "train", "--pooling", "--seqL", str(args.seqL), "--outDims", str(args.outDims),
                         "--batchSize", str(args.batchSize), "--cacheRefreshRate", str(args.cacheRefreshRate),
                         "--nocuda", "--quiet"])
    torch.manual_seed(args.seed)
    cpu = torch.device("cpu")
    model = get_model(opt, args.dim)
    optimizer, _ = train_mod.make_optimizer(opt, model)
    print(f"data: {args.db} + {args.queries} frames, D {args.dim}, outDims {args.outDims}, L {args.seqL}; "
          f"{tset.summary()}; built in {time.perf_counter() - t0:.1f} s")

    chunk = refresh_chunk(steps, tset, args.cacheRefreshRate, opt.seed)
    n_chunks = math.ceil(len(tset.queries) / len(chunk))
    seq = np.arange(args.seqL)
    db_rows = np.unique((tset.db_starts[:, None] + seq).ravel())
    q_rows = np.unique((tset.q_starts[chunk][:, None] + seq).ravel())
    conv = model.pool[1].conv
    w_view = lambda: conv.weight.detach().view(conv.weight.shape[0], -1)   # noqa: E731

    # ---------------------------------------------------------------- cache refresh
    state = {}

    def refresh():
        dists = steps.model_cache_distances(model, tset, chunk, steps.TrainConfig.from_options(opt), cpu)
        topk_smallest(dists, 100)
        state["dists"] = dists.cpu().numpy()

    x_db, x_q = torch.from_numpy(split.db_desc[db_rows]), torch.from_numpy(split.q_desc[q_rows])   # gathered once

    def refresh_floor():
        with torch.no_grad():
            w, b = w_view(), conv.bias.detach()
            return torch.addmm(b, x_db, w.T) @ torch.addmm(b, x_q, w.T).T

    def all_frames_floor():     # the definition: project every frame, then the same mining product
        with torch.no_grad():
            w, b = w_view(), conv.bias.detach()
            fd = torch.addmm(b, torch.from_numpy(split.db_desc), w.T)
            fq = torch.addmm(b, torch.from_numpy(split.q_desc), w.T)
            return fd[db_rows] @ fq[q_rows].T

    def mining():
        rng = np.random.default_rng(args.seed)
        sampled = mining_mod.sample_negatives(tset, chunk, rng)
        cache = np.full((len(chunk), mining_mod.N_NEG), -1, dtype=np.int64)
        nontriv = [tset.nontriv_pos[i] for i in chunk]
        state["mined"] = mining_mod.mine(state["dists"], nontriv, sampled, cache, opt.margin)

    print(f"\ncache refresh: {len(chunk)} queries -> pools {len(db_rows)} database + {len(q_rows)} query frames; "
          f"mining matrix {len(tset.db_starts)} x {len(chunk)} ({n_chunks} refreshes per epoch)")
    ref_times = common.interleaved({"refresh": refresh, "floor": refresh_floor, "mining": mining}, args.refreshes)
    all_times = common.interleaved({"all_frames_floor": all_frames_floor}, 1, warmup=False)

    # ---------------------------------------------------------------- training batches
    pos, negs, kept = state["mined"]
    model.train()
    local = np.random.default_rng(args.seed).permutation(len(chunk))
    batches = []
    for lo in range(0, len(local), args.batchSize):
        sel = local[lo:lo + args.batchSize]
        sel = sel[kept[sel]]
        if len(sel):
            batches.append(sel)
    n_batches_epoch = n_chunks * len(batches)

    def distinct_frames(sel) -> int:
        q_r = tset.q_starts[chunk[sel]][:, None] + seq + split.num_db
        p_r = tset.db_starts[pos[sel]][:, None] + seq
        n_r = tset.db_starts[np.maximum(negs[sel], 0)][..., None] + seq
        return len(np.unique(np.concatenate([q_r.ravel(), p_r.ravel(), n_r.ravel()])))

    floor_w = torch.nn.Parameter(w_view().clone())
    floor_b = torch.nn.Parameter(conv.bias.detach().clone())
    floor_opt = torch.optim.SGD([floor_w, floor_b], lr=opt.lr, momentum=opt.momentum, weight_decay=opt.weightDecay)
    x_all = torch.from_numpy(split.db_desc)

    def batch_step(sel):
        optimizer.zero_grad(set_to_none=True)
        loss = steps.batch_loss(model, tset, steps.Triplets(chunk[sel], pos[sel], negs[sel]),
                                steps.LossSettings(opt.loss_trip_method, opt.margin), cpu)
        loss.backward()
        optimizer.step()
        return loss.item()

    def floor_step(n):
        floor_opt.zero_grad(set_to_none=True)
        y = torch.nn.functional.linear(x_all[:n], floor_w, floor_b)
        y.sum().backward()
        floor_opt.step()

    n_timed = min(args.batches, len(batches) - 1)
    sizes = [distinct_frames(s) for s in batches[:n_timed + 1]]
    batch_step(batches[0])
    floor_step(sizes[0])        # warm-up
    b_times, f_times = [], []
    for i in range(1, n_timed + 1):
        b_times.append(common.timed(lambda i=i: batch_step(batches[i]))[0])
        f_times.append(common.timed(lambda i=i: floor_step(sizes[i]))[0])
    conv_times = []
    with conv1d_projection():
        for i in range(min(args.conv_batches, n_timed)):
            conv_times.append(common.timed(lambda i=i: batch_step(batches[1 + i]))[0])

    # ---------------------------------------------------------------- report
    refresh_s, refresh_floor_s, mining_s = (median(ref_times[k]) for k in ("refresh", "floor", "mining"))
    batch_s, batch_floor_s = median(b_times), median(f_times)
    rows = [["cache refresh (pool + mining matrix + top-100)", f"{refresh_s:.3f}", f"{refresh_floor_s:.3f}",
             f"{refresh_s / refresh_floor_s:.2f}x"],
            ["  issue's floor: project all frames + matrix", "", f"{median(all_times['all_frames_floor']):.3f}",
             f"{refresh_s / median(all_times['all_frames_floor']):.2f}x"],
            ["mining (sample_negatives + mine)", f"{mining_s:.3f}", "", ""],
            [f"training batch ({median(sizes[1:]):.0f} distinct frames)", f"{batch_s:.3f}", f"{batch_floor_s:.3f}",
             f"{batch_s / batch_floor_s:.2f}x"]]
    if conv_times:
        rows.append(["  the same batch with conv1d (reference's layer)", f"{median(conv_times):.3f}",
                     f"{batch_floor_s:.3f}", f"{median(conv_times) / batch_floor_s:.2f}x"])
    print()
    print(table(rows, ["step", "project s", "floor s", "ratio"]))
    epoch_s = n_chunks * (refresh_s + mining_s) + n_batches_epoch * batch_s
    floor_epoch_s = n_chunks * refresh_floor_s + n_batches_epoch * batch_floor_s
    print(f"\nestimated epoch: {n_chunks} refreshes x ({refresh_s:.2f} + {mining_s:.2f} s) + {n_batches_epoch} "
          f"batches x {batch_s:.3f} s = {epoch_s:.0f} s ({epoch_s / 60:.1f} min); at the floors {floor_epoch_s:.0f} s "
          f"(ratio {epoch_s / floor_epoch_s:.2f}x)")
    print(f"batch times {[round(t, 3) for t in b_times]}; floors {[round(t, 3) for t in f_times]}")
    print(f"refresh times {[round(t, 2) for t in ref_times['refresh']]}; floors "
          f"{[round(t, 2) for t in ref_times['floor']]}")
    ok = goal(batch_s <= BATCH_GOAL * batch_floor_s,
              f"training batch {batch_s / batch_floor_s:.2f}x its floor (<= {BATCH_GOAL}x)")
    ok &= goal(refresh_s <= REFRESH_GOAL * refresh_floor_s,
               f"cache refresh {refresh_s / refresh_floor_s:.2f}x its floor (<= {REFRESH_GOAL}x)")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
