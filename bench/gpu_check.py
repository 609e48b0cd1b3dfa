"""GPU check: the project's CUDA paths against its CPU results on the same inputs, plus CPU/GPU ratios.

    python bench/gpu_check.py            (bench/gpu_check.sh runs it after printing versions)

Checks (each prints its max |difference|; any difference >= 1e-3 fails):
- ``seqMatchNet.window_distances`` (meanOfPairs and centerOnly);
- ``search.rank`` (top-100 distances, top-1 agreement ties aside), dense and with database chunks;
- a training batch: ``train.batch_loss`` and its gradient (asserted with TF32 off, the default-settings
  difference printed too);
- faiss on the GPU (``search.faiss_search`` with CUDA features) when ``faiss.StandardGpuResources``
  exists, else skipped.
Timings (CPU / GPU): ``search.rank`` at 3000 x 3000, D = 4096, L = 5, and one ``train.train_epoch`` on
synthetic data. On a machine without CUDA it prints "CUDA not available: nothing to check" and exits 0.
``--self-test`` runs everything with the CPU standing in for the GPU (to test this script itself).
"""
from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402,F401,I001  (first: sets OMP_WAIT_POLICY before torch loads)
import numpy as np
import torch

TOL = 1e-3


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device: torch.device, repeats: int = 3) -> float:
    """Median seconds of ``repeats`` runs after one warm-up run."""
    fn()
    sync(device)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def make_split(n: int, dim: int, seed: int):
    from common import route_features
    from seqmatchnet.data.windows import Split, segment_bounds

    db, q = route_features(n, n, dim, seed=seed)
    pos = np.stack([np.arange(n) * 2.0, np.zeros(n)], axis=1)
    return Split(name="train", db_desc=db.numpy(), q_desc=q.numpy(), db_positions=pos, q_positions=pos.copy(),
                 pos_dist_thr=10.0, non_triv_pos_dist_sq_thr=25.0, db_bounds=segment_bounds(n),
                 q_bounds=segment_bounds(n))


class Report:
    def __init__(self) -> None:
        self.failed = []

    def check(self, name: str, diff: float, tol: float = TOL, extra: str = "") -> None:
        ok = bool(diff < tol)
        print(f"{'ok  ' if ok else 'FAIL'} {name}: max |GPU - CPU| = {diff:.2e} (tolerance {tol:g}){extra}")
        if not ok:
            self.failed.append(name)


def check_distances(rep: Report, gpu: torch.device) -> None:
    from common import route_features
    from seqmatchnet.data.windows import segment_bounds, sequence_windows
    from seqmatchnet.matching.seqmatch import window_distances

    db, q = route_features(1500, 1200, 256, seed=1)
    for seq_len in (1, 2, 5):
        ds, _ = sequence_windows(segment_bounds(len(db)), seq_len)
        qs, _ = sequence_windows(segment_bounds(len(q)), seq_len)
        for method in ("meanOfPairs", "centerOnly"):
            cpu = window_distances(db, q, torch.as_tensor(ds), torch.as_tensor(qs), seq_len, method)
            dev = window_distances(db.to(gpu), q.to(gpu), torch.as_tensor(ds, device=gpu),
                                   torch.as_tensor(qs, device=gpu), seq_len, method)
            rep.check(f"window_distances L={seq_len} {method}", float((cpu - dev.cpu()).abs().max()))


def check_rank(rep: Report, gpu: torch.device) -> None:
    from common import route_features
    from seqmatchnet.data.windows import segment_bounds, sequence_windows
    from seqmatchnet.search import diagonal
    from seqmatchnet.search.sides import Windows

    db, q = route_features(3000, 2000, 512, seed=2)
    ds, _ = sequence_windows(segment_bounds(len(db)), 5)
    qs, _ = sequence_windows(segment_bounds(len(q)), 5)
    for db_chunk in (0, 700):
        i_cpu, d_cpu = diagonal.rank(Windows(db, ds), Windows(q, qs), 5, db_chunk=db_chunk, quiet=True)
        i_gpu, d_gpu = diagonal.rank(Windows(db.to(gpu), ds), Windows(q.to(gpu), qs), 5, db_chunk=db_chunk,
                                     quiet=True)
        same = (i_cpu[:, 0] == i_gpu[:, 0]) | (ds[i_cpu[:, 0]] == ds[i_gpu[:, 0]]) | \
               (np.abs(d_cpu[:, 0] - d_gpu[:, 0]) <= 1e-5)
        rep.check(f"search.rank top-100 distances, db_chunk {db_chunk or 'automatic'}",
                  float(np.abs(d_cpu - d_gpu).max()),
                  extra=f"; top-1 agrees on {same.mean():.4f} of queries (ties aside)")
        if not same.all():
            rep.failed.append(f"search.rank top-1, db_chunk {db_chunk}")


def batch_inputs(seed: int = 3):
    from seqmatchnet.models.sequence import SeqMatchModel, project_frames
    from seqmatchnet.training.mining import N_NEG, TrainingSet, cache_distances, mine, sample_negatives

    split = make_split(800, 128, seed)
    tset = TrainingSet.build(split, 5)
    torch.manual_seed(seed)
    model = SeqMatchModel(128, pooling=True, out_dims=32)
    cpu = torch.device("cpu")
    chunk = np.sort(tset.queries[:64])
    with torch.no_grad():
        dists = cache_distances(project_frames(model, split.db_desc, cpu, 256, quiet=True),
                                project_frames(model, split.q_desc, cpu, 256, quiet=True), tset, chunk,
                                "meanOfPairs").numpy()
    sampled = sample_negatives(tset, chunk, np.random.default_rng(seed))
    pos, negs, kept = mine(dists, [tset.nontriv_pos[i] for i in chunk], sampled,
                           np.full((len(chunk), N_NEG), -1), 0.1)
    sel = np.flatnonzero(kept)[:16]
    return model, tset, chunk[sel], pos[sel], negs[sel]


def check_batch(rep: Report, gpu: torch.device) -> None:
    from seqmatchnet.training.steps import LossSettings, Triplets, batch_loss

    model, tset, q_idx, pos, negs = batch_inputs()
    results = {}
    for name, device in (("cpu", torch.device("cpu")), ("gpu", gpu)):
        m = copy.deepcopy(model).to(device)
        m.train()
        for tf32 in (False, True):
            if device.type == "cuda":
                torch.backends.cudnn.allow_tf32 = tf32
                torch.backends.cuda.matmul.allow_tf32 = tf32
            m.zero_grad()
            loss = batch_loss(m, tset, Triplets(q_idx, pos, negs), LossSettings("meanOfPairs", 0.1),
                              device)
            loss.backward()
            results[(name, tf32)] = (loss.item(), [p.grad.detach().cpu().clone() for p in m.parameters()])
    if gpu.type == "cuda":
        torch.backends.cudnn.allow_tf32 = True      # torch's defaults
        torch.backends.cuda.matmul.allow_tf32 = False
    for tf32 in (False, True):
        loss_c, grad_c = results[("cpu", tf32)]
        loss_g, grad_g = results[("gpu", tf32)]
        dl = abs(loss_c - loss_g)
        dg = max(float((a - b).abs().max()) for a, b in zip(grad_c, grad_g))
        label = "TF32 allowed (convolutions: torch's default)" if tf32 else "TF32 off"
        if tf32:
            print(f"info training batch, {label}: |loss difference| {dl:.2e}, max |gradient difference| {dg:.2e}"
                  f"{'  (>= tolerance: TF32 rounding, not a code difference)' if max(dl, dg) >= TOL else ''}")
        else:
            rep.check(f"training batch loss, {label}", dl, extra=f" (loss {loss_c:.5f})")
            rep.check(f"training batch gradient, {label}", dg)


def check_faiss(rep: Report, gpu: torch.device) -> None:
    try:
        import faiss
    except ImportError:
        print("skip faiss: not importable")
        return
    if not hasattr(faiss, "StandardGpuResources") or gpu.type != "cuda":
        print(f"skip faiss GPU: this faiss ({getattr(faiss, '__version__', '?')}) has no StandardGpuResources "
              "(CPU build)" if gpu.type == "cuda" else "skip faiss GPU: no CUDA device (self-test)")
        return
    from common import route_features
    from seqmatchnet.search.diagonal import faiss_search

    db, q = route_features(5000, 1000, 256, seed=4)
    i_cpu, d_cpu = faiss_search(db, q, 20)
    i_gpu, d_gpu = faiss_search(db.to(gpu), q.to(gpu), 20)
    rep.check("faiss GPU flat L2 search (top-20 distances)", float(np.abs(d_cpu - d_gpu).max()),
              extra=f"; top-1 identical for {np.mean(i_cpu[:, 0] == i_gpu[:, 0]):.4f} of queries")


def time_rank(gpu: torch.device, n: int, dim: int) -> None:
    from common import route_features
    from seqmatchnet.data.windows import segment_bounds, sequence_windows
    from seqmatchnet.search import diagonal
    from seqmatchnet.search.sides import Windows

    db, q = route_features(n, n, dim, seed=5)
    s, _ = sequence_windows(segment_bounds(n), 5)
    db_g, q_g = db.to(gpu), q.to(gpu)
    t_cpu = timed(lambda: diagonal.rank(Windows(db, s), Windows(q, s), 5, quiet=True), torch.device("cpu"))
    t_gpu = timed(lambda: diagonal.rank(Windows(db_g, s), Windows(q_g, s), 5, quiet=True), gpu)
    print(f"time search.rank {n} x {n}, D = {dim}, L = 5: CPU {t_cpu:.3f} s, GPU {t_gpu:.3f} s, "
          f"CPU / GPU = {t_cpu / t_gpu:.1f}x")


def time_epoch(gpu: torch.device, n: int) -> None:
    from seqmatchnet.cli.options import parse_options
    from seqmatchnet.cli.train import make_optimizer
    from seqmatchnet.models.sequence import SeqMatchModel
    from seqmatchnet.training.mining import N_NEG, TrainingSet
    from seqmatchnet.training.steps import Learner, TrainConfig, train_epoch

    split = make_split(n, 256, 6)
    tset = TrainingSet.build(split, 5)
    opt = parse_options(["--mode", "train", "--seqL", "5", "--pooling", "--outDims", "64", "--quiet", "--nocuda"])
    torch.manual_seed(6)
    model0 = SeqMatchModel(256, pooling=True, out_dims=64)
    times, losses = {}, {}
    for name, device in (("cpu", torch.device("cpu")), ("gpu", gpu)):
        for _run in range(2):   # the first run warms up (CUDA context, cuBLAS/cuDNN handles)
            model = copy.deepcopy(model0).to(device)
            optimizer, _ = make_optimizer(opt, model)
            neg_cache = np.full((len(tset.q_frames), N_NEG), -1, dtype=np.int64)
            sync(device)
            t0 = time.perf_counter()
            stats = train_epoch(Learner(model, optimizer, device), tset, neg_cache,
                                TrainConfig.from_options(opt), 1)
            sync(device)
            times[name] = time.perf_counter() - t0
            losses[name] = stats.avg_loss
    print(f"time one train_epoch on synthetic data ({tset.summary()}): CPU {times['cpu']:.2f} s, "
          f"GPU {times['gpu']:.2f} s, CPU / GPU = {times['cpu'] / times['gpu']:.1f}x; average loss CPU "
          f"{losses['cpu']:.5f}, GPU {losses['gpu']:.5f}")


def check_speeds(rep: Report, gpu: torch.device) -> None:
    """The search across speeds (the recommended ``--velocities`` on the half grid) kept in memory: the
    device's top-100 scores against the CPU's, and the top-1 velocity (ties aside)."""
    from common import route_features
    from seqmatchnet.data.windows import segment_bounds, sequence_windows
    from seqmatchnet.search import speeds
    from seqmatchnet.search.sides import Windows
    from seqmatchnet.speeds import rules, trajectories

    db, q = route_features(3000, 1500, 512, seed=4)
    b_db, b_q = segment_bounds(len(db)), segment_bounds(len(q))
    ds, qs = sequence_windows(b_db, 5)[0], sequence_windows(b_q, 5)[0]
    traj = trajectories.trajectories(trajectories.parse_velocities(trajectories.RECOMMENDED), 5, grid=2)
    i_c, d_c, v_c = speeds.rank_across_speeds_in_memory(Windows(db, ds, b_db), Windows(q, qs, b_q), traj,
                                                        rules.DEFAULT_RULE)
    i_g, d_g, v_g = speeds.rank_across_speeds_in_memory(Windows(db.to(gpu), ds, b_db), Windows(q.to(gpu), qs, b_q),
                                                        traj, rules.DEFAULT_RULE)
    same = (v_c[:, 0] == v_g[:, 0]) | (np.abs(d_c[:, 0] - d_g[:, 0]) <= 1e-5)
    rep.check("--velocities top-100 scores (in memory)", float(np.abs(d_c - d_g).max()),
              extra=f"; top-1 velocity agrees on {same.mean():.4f} of queries (ties aside)")
    if not same.all():
        rep.failed.append("--velocities top-1 velocity")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--self-test", action="store_true", help="run every step with the CPU standing in for the GPU")
    p.add_argument("--rank-size", type=int, default=3000, help="frames per side for the rank timing")
    p.add_argument("--rank-dim", type=int, default=4096, help="descriptor dimensions for the rank timing")
    p.add_argument("--epoch-frames", type=int, default=3000, help="frames per traversal for the epoch timing")
    args = p.parse_args(argv)
    if args.self_test:
        gpu = torch.device("cpu")
        print("self-test: the CPU stands in for the GPU (differences must be ~0)")
    elif not torch.cuda.is_available():
        print("CUDA not available: nothing to check")
        return 0
    else:
        gpu = torch.device("cuda")
        print(f"device: {torch.cuda.get_device_name(0)}; torch {torch.__version__}, CUDA {torch.version.cuda}, "
              f"cuDNN {torch.backends.cudnn.version()}; {torch.get_num_threads()} CPU threads")
    t0 = time.perf_counter()
    torch.set_grad_enabled(True)
    rep = Report()
    with torch.no_grad():
        check_distances(rep, gpu)
        check_rank(rep, gpu)
        check_speeds(rep, gpu)
    check_batch(rep, gpu)
    check_faiss(rep, gpu)
    with torch.no_grad():
        time_rank(gpu, args.rank_size, args.rank_dim)
    time_epoch(gpu, args.epoch_frames)
    print(f"gpu_check finished in {time.perf_counter() - t0:.0f} s: "
          + ("all checks passed" if not rep.failed else f"FAILED: {', '.join(rep.failed)}"))
    return 0 if not rep.failed else 1


if __name__ == "__main__":
    sys.exit(main())
