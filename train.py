"""Training (SPEC section 7): sequence-matching triplet loss with hard negatives
mined by the same sequence distance.

The pieces are separate and testable alone: ``TrainingSet`` (who may be a
query, positive or negative), ``cache_distances`` (the mining matrix),
``sample_negatives`` and ``mine`` (triplets, under no_grad), ``batch_loss``
(the loss of a batch of triplets), then ``train_epoch`` and ``train`` which
tie them together with checkpoints and logging.
"""
from __future__ import annotations

import argparse
import logging
import math
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from datasets import Split, sequence_windows
from get_models import SeqMatchModel
from seqMatchNet import frame_distances, sequence_distance, topk_smallest, triplet_loss, window_distances
from utils import UserError, progress_enabled

log = logging.getLogger(__name__)

N_NEG = 10                 # negatives kept per query
N_NEG_SAMPLE = 1000        # potential negatives drawn per query and refresh
N_NEG_CANDIDATES = N_NEG * 10


# ---------------------------------------------------------------- who is who

@dataclass
class TrainingSet:
    """Valid windows of a training split and their relations.

    Database and query windows are those that needed no shift (SPEC section
    7). Indices below are positions in ``db_frames`` / ``q_frames``.
    """

    split: Split
    seq_len: int
    db_frames: np.ndarray        # [Nd] split rows of the valid database frames
    q_frames: np.ndarray         # [Nq] split rows of the valid query frames
    db_starts: np.ndarray        # [Nd] first frame of each database window (split row)
    q_starts: np.ndarray         # [Nq]
    nontriv_pos: list            # [Nq] sorted database positions within sqrt(nonTrivPosDistSqThr)
    queries: np.ndarray          # positions in q_frames of queries with a non-trivial positive and a negative
    close: list                  # [Nq] sorted database positions within posDistThr (not potential negatives)

    @classmethod
    def build(cls, split: Split, seq_len: int) -> "TrainingSet":
        from sklearn.neighbors import NearestNeighbors

        db_starts, db_valid = sequence_windows(split.db_bounds, seq_len)
        q_starts, q_valid = sequence_windows(split.q_bounds, seq_len)
        db_frames, q_frames = np.flatnonzero(db_valid), np.flatnonzero(q_valid)
        if len(db_frames) == 0 or len(q_frames) == 0:
            raise UserError(f"no {split.name} frames have a full window of {seq_len} frames: use a smaller --seqL")
        knn = NearestNeighbors().fit(split.db_positions[db_frames])
        q_pos = split.q_positions[q_frames]
        nontriv = knn.radius_neighbors(q_pos, radius=math.sqrt(split.non_triv_pos_dist_sq_thr), return_distance=False)
        nontriv = [np.sort(p).astype(np.int64) for p in nontriv]
        close = [np.sort(p).astype(np.int64)
                 for p in knn.radius_neighbors(q_pos, radius=split.pos_dist_thr, return_distance=False)]
        n_close = np.array([len(p) for p in close])
        has_pos = np.array([len(p) > 0 for p in nontriv], dtype=bool)
        queries = np.flatnonzero(has_pos & (n_close < len(db_frames)))
        if len(queries) == 0:
            raise UserError(f"split {split.name}: no query has a non-trivial positive (within "
                            f"{math.sqrt(split.non_triv_pos_dist_sq_thr):g}) and a negative: check the positions")
        return cls(split, seq_len, db_frames, q_frames, db_starts[db_frames], q_starts[q_frames], nontriv, queries,
                   close)

    def summary(self) -> str:
        return (f"{self.split.num_db + self.split.num_q} frames ({self.split.num_db} database, {self.split.num_q} "
                f"query); {len(self.db_frames)} database and {len(self.q_frames)} query windows of {self.seq_len}; "
                f"{len(self.queries)} training queries with a non-trivial positive")


# ---------------------------------------------------------------- mining

@torch.no_grad()
def cache_distances(db_feats: torch.Tensor, q_feats: torch.Tensor, tset: TrainingSet, queries: np.ndarray,
                    method: str) -> torch.Tensor:
    """The mining matrix ``[Nd, len(queries)]``: sequence distances (``method``)
    between every valid database window and the given queries' windows.
    ``db_feats`` / ``q_feats`` are pooled features of all split frames."""
    device = db_feats.device
    return window_distances(db_feats, q_feats, torch.as_tensor(tset.db_starts, device=device),
                            torch.as_tensor(tset.q_starts[queries], device=device), tset.seq_len, method)


@torch.no_grad()
def model_cache_distances(model: SeqMatchModel, tset: TrainingSet, queries: np.ndarray, opt: argparse.Namespace,
                          device: torch.device) -> torch.Tensor:
    """The mining matrix for ``model``: sequence matching of pooled frames, or the
    Euclidean distance of sequence descriptors (smooth, delta, seqnet)."""
    from test import describe_windows, extract_features

    split = tset.split
    if model.describes_sequences:
        db_d = describe_windows(model, split.db_desc, tset.db_starts, tset.seq_len, device, opt.cacheBatchSize)
        q_d = describe_windows(model, split.q_desc, tset.q_starts[queries], tset.seq_len, device, opt.cacheBatchSize)
        return frame_distances(db_d, q_d)
    db_feats = extract_features(model, split.db_desc, device, opt.cacheBatchSize, "cache db", opt.quiet)
    q_feats = extract_features(model, split.q_desc, device, opt.cacheBatchSize, "cache queries", opt.quiet)
    return cache_distances(db_feats, q_feats, tset, queries, opt.neg_trip_method)


def sample_negatives(tset: TrainingSet, queries: np.ndarray, rng: np.random.Generator,
                     n: int = N_NEG_SAMPLE) -> np.ndarray:
    """``n`` potential negatives per query, drawn uniformly with replacement from
    the database windows farther than posDistThr: ``[len(queries), n]``.

    Each query draws from its own candidates directly (no rejection), so a query
    with only a handful of potential negatives costs the same as any other: draw
    ``u`` uniformly among the ``Nd - |close|`` candidates, then step over the
    sorted close windows at or below it (``u + #{j: close_j - j <= u}``).
    """
    n_db = len(tset.db_frames)
    close = [tset.close[i] for i in queries]
    width = max((len(c) for c in close), default=0)
    shifted = np.full((len(queries), max(width, 1)), n_db, dtype=np.int64)   # n_db: above every draw
    for i, c in enumerate(close):   # ragged -> padded (no arithmetic here)
        shifted[i, :len(c)] = c - np.arange(len(c))
    n_free = n_db - np.array([len(c) for c in close], dtype=np.int64)
    draws = rng.integers(0, n_free[:, None], size=(len(queries), n))
    # per-row searchsorted as one search: rows are offset so that each row's values stay apart
    offset = (np.arange(len(queries), dtype=np.int64) * (n_db + 1))[:, None]
    below = np.searchsorted((shifted + offset).ravel(), (draws + offset).ravel(), side="right").reshape(draws.shape)
    return draws + below - np.arange(len(queries))[:, None] * shifted.shape[1]


def mine(dists: np.ndarray, nontriv_pos: list, sampled: np.ndarray, neg_cache: np.ndarray, margin: float,
         n_neg: int = N_NEG, n_candidates: int = N_NEG_CANDIDATES) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Hard triplets for a set of queries (SPEC section 7 step 2), all at once.

    ``dists`` ``[Nd, B]`` cached distances; ``nontriv_pos`` B arrays of database
    indices; ``sampled`` ``[B, S]`` drawn potential negatives; ``neg_cache``
    ``[B, n_neg]`` previous negatives (-1 = empty). Returns ``(positive [B],
    negatives [B, n_neg] (-1 padded, ascending distance), kept [B])``; a query
    with no negative inside the margin is not kept. The new negative cache of
    the kept queries is their ``negatives``.
    """
    b = dists.shape[1]
    cols = np.arange(b)
    width = max(len(p) for p in nontriv_pos)
    pos = np.full((b, width), -1, dtype=np.int64)
    for i, p in enumerate(nontriv_pos):  # ragged -> padded (no arithmetic here)
        pos[i, :len(p)] = p
    d_pos_all = np.where(pos >= 0, dists[np.maximum(pos, 0), cols[:, None]], np.inf)
    best = np.argmin(d_pos_all, axis=1)
    positive = pos[cols, best]
    d_pos = d_pos_all[cols, best]

    cand = np.sort(np.concatenate([neg_cache, sampled], axis=1), axis=1)
    unique = np.ones_like(cand, dtype=bool)
    unique[:, 1:] = cand[:, 1:] != cand[:, :-1]
    usable = unique & (cand >= 0)
    d = np.where(usable, dists[np.maximum(cand, 0), cols[:, None]], np.inf)
    order = np.argsort(d, axis=1, kind="stable")[:, :n_candidates]
    d_sorted = np.take_along_axis(d, order, axis=1)
    violating = d_sorted < (d_pos + math.sqrt(margin))[:, None]     # a prefix of each row
    take = np.minimum(violating.sum(axis=1), n_neg)
    slots = np.arange(min(n_neg, order.shape[1]))
    chosen = np.take_along_axis(cand, order[:, :len(slots)], axis=1)
    negatives = np.full((b, n_neg), -1, dtype=np.int64)
    negatives[:, :len(slots)] = np.where(slots[None, :] < take[:, None], chosen, -1)
    return positive, negatives, take > 0


# ---------------------------------------------------------------- loss

def batch_loss(model: SeqMatchModel, tset: TrainingSet, q_idx: np.ndarray, pos: np.ndarray, negs: np.ndarray,
               method: str, margin: float, device: torch.device) -> torch.Tensor:
    """Mean triplet loss of a batch: ``q_idx`` ``[B]`` query positions, ``pos``
    ``[B]`` database positions, ``negs`` ``[B, K]`` (-1 = none).

    Every distinct frame of the batch is pooled once; the sequence distances
    of all triplets are computed together.
    """
    seq = np.arange(tset.seq_len)
    num_db = tset.split.num_db
    q_rows = tset.q_starts[q_idx][:, None] + seq + num_db                 # [B, L] rows in db+query stack
    p_rows = tset.db_starts[pos][:, None] + seq                            # [B, L]
    n_mask = negs >= 0
    n_rows = tset.db_starts[np.maximum(negs, 0)][..., None] + seq          # [B, K, L]
    b, k, L = n_rows.shape
    rows = np.concatenate([q_rows.ravel(), p_rows.ravel(), n_rows.ravel()])
    if model.describes_sequences:   # one descriptor per window, compared by Euclidean distance
        desc = model.describe(torch.from_numpy(_stacked_rows(tset, rows)).to(device).view(-1, L, tset.split.dim))
        fq, fp, fn = desc[:b, None], desc[b:2 * b, None], desc[2 * b:].view(b, k, 1, -1)
        d_pos = sequence_distance(fq, fp)
        d_neg = sequence_distance(fq[:, None], fn)
    else:                           # every distinct frame pooled once, then sequence distances
        uniq, inverse = np.unique(rows, return_inverse=True)
        feats = model.encode(torch.from_numpy(_stacked_rows(tset, uniq)).to(device))
        feats = feats[torch.as_tensor(inverse, device=device)]
        fq = feats[:b * L].view(b, L, -1)
        fp = feats[b * L:2 * b * L].view(b, L, -1)
        fn = feats[2 * b * L:].view(b, k, L, -1)
        d_pos = sequence_distance(fq, fp, method)
        d_neg = sequence_distance(fq[:, None], fn, method)
    return triplet_loss(d_pos, d_neg, torch.as_tensor(n_mask, device=device), margin)


def _stacked_rows(tset: TrainingSet, rows: np.ndarray) -> np.ndarray:
    """Raw descriptors of rows of the database + query stack (queries offset by numDb)."""
    num_db = tset.split.num_db
    return np.where((rows >= num_db)[:, None], tset.split.q_desc[np.maximum(rows - num_db, 0)],
                    tset.split.db_desc[np.minimum(rows, num_db - 1)])


# ---------------------------------------------------------------- one epoch

def refresh_chunks(queries: np.ndarray, refresh_rate: int) -> list[np.ndarray]:
    """The reference's cache-refresh chunks: ``ceil(len / refresh_rate)`` consecutive
    pieces of the queries in route order (``np.array_split`` sizes); 0 = one chunk."""
    n_chunks = math.ceil(len(queries) / refresh_rate) if refresh_rate > 0 else 1
    return np.array_split(np.asarray(queries), max(n_chunks, 1))


@dataclass
class EpochStats:
    avg_loss: float
    batches: int
    triplet_queries: int
    skipped: int
    train_recalls: dict
    timings: dict


def train_epoch(model: SeqMatchModel, tset: TrainingSet, optimizer: torch.optim.Optimizer, neg_cache: np.ndarray,
                opt: argparse.Namespace, epoch: int, device: torch.device, writer=None) -> EpochStats:
    """One epoch: per chunk of queries, refresh the cache, mine, then step over shuffled batches.

    ``neg_cache`` ``[len(q_frames), N_NEG]`` is updated in place.
    """
    from test import recall_table

    rng = np.random.default_rng([opt.seed, epoch])
    chunks = refresh_chunks(tset.queries, opt.cacheRefreshRate)
    n_chunks = len(chunks)
    n_batches = math.ceil(len(tset.queries) / opt.batchSize)     # the reference's denominator of the average loss
    use_cache = getattr(opt, "negCache", "on") == "on"
    quiet = opt.quiet
    losses, kept_total, skipped = [], 0, 0
    preds_all, q_all = [], []
    timings = {"cache_s": 0.0, "mining_s": 0.0, "batches_s": 0.0}
    step = (epoch - 1) * n_batches
    for c, chunk in enumerate(chunks):
        t0 = time.perf_counter()
        dists = model_cache_distances(model, tset, chunk, opt, device)
        _, top = topk_smallest(dists, 100)
        preds_all.append(top.cpu().numpy())
        q_all.append(chunk)
        dists = dists.cpu().numpy()
        t1 = time.perf_counter()
        sampled = sample_negatives(tset, chunk, rng)
        previous = neg_cache[chunk] if use_cache else np.full((len(chunk), N_NEG), -1, dtype=np.int64)
        pos, negs, kept = mine(dists, [tset.nontriv_pos[i] for i in chunk], sampled, previous, opt.margin)
        if use_cache:
            neg_cache[chunk[kept]] = negs[kept]
        skipped += int((~kept).sum())
        t2 = time.perf_counter()
        timings["cache_s"] += t1 - t0
        timings["mining_s"] += t2 - t1

        model.train()
        local = rng.permutation(len(chunk))
        batches = range(0, len(local), opt.batchSize)
        bar = tqdm(batches, desc=f"epoch {epoch} chunk {c + 1}/{n_chunks}", unit="batch",
                   disable=not progress_enabled(quiet), leave=False)
        for lo in bar:
            sel = local[lo:lo + opt.batchSize]
            sel = sel[kept[sel]]          # queries without a hard negative are skipped, as in the reference
            step += 1
            if len(sel) == 0:
                continue
            optimizer.zero_grad(set_to_none=True)
            loss = batch_loss(model, tset, chunk[sel], pos[sel], negs[sel], opt.loss_trip_method,
                              opt.margin, device)
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
            kept_total += len(sel)
            if writer is not None:
                writer.scalar("Train/Loss", losses[-1], step)
            bar.set_postfix(loss=f"{losses[-1]:.4f}")
        timings["batches_s"] += time.perf_counter() - t2

    preds = np.concatenate(preds_all)
    q_idx = np.concatenate(q_all)
    split = tset.split
    recalls, _ = recall_table(preds, split.db_positions[tset.db_frames],
                              split.q_positions[tset.q_frames[q_idx]], split.pos_dist_thr)
    avg = float(np.sum(losses)) / n_batches if losses else float("nan")
    return EpochStats(avg, len(losses), kept_total, skipped, recalls, timings)


# ---------------------------------------------------------------- the run

def make_run_dir(opt: argparse.Namespace) -> Path:
    """``<runsPath>/<Mon><DD>_<HH-MM-SS>_l<seqL>_<expName>``, created exclusively
    (a suffix is added when another run took the name in the same second)."""
    runs = Path(opt.runsPath)
    try:
        runs.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"cannot create --runsPath {runs} ({exc.strerror}): choose a writable folder") from exc
    base = f"{datetime.now().strftime('%b%d_%H-%M-%S')}_l{opt.seqL}_{opt.expName}"
    for i in range(1000):
        run_dir = runs / (base if i == 0 else f"{base}_{i}")
        try:
            run_dir.mkdir()
            return run_dir
        except FileExistsError:
            continue
        except OSError as exc:
            raise UserError(f"cannot write to --runsPath {runs} ({exc.strerror}): choose a writable folder") from exc
    raise UserError(f"could not find a free run folder name under {runs}")


def make_optimizer(opt: argparse.Namespace, model: SeqMatchModel):
    params = [p for p in model.parameters() if p.requires_grad]
    if opt.optim == "SGD":
        optimizer = torch.optim.SGD(params, lr=opt.lr, momentum=opt.momentum, weight_decay=opt.weightDecay)
        scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=max(int(opt.lrStep), 1), gamma=opt.lrGamma)
    else:
        optimizer = torch.optim.Adam(params, lr=opt.lr)
        scheduler = None
    return optimizer, scheduler


def checkpoint_state(epoch: int, model: SeqMatchModel, optimizer, scheduler, recalls: dict, best_score: float,
                     not_improved: int, neg_cache: np.ndarray, history: dict) -> dict:
    """The reference's checkpoint keys plus what exact resumption needs; plain types only."""
    from utils import plain_floats

    state = {k.replace("pool.module.", "pool."): v.detach().cpu() for k, v in model.state_dict().items()}
    return {"epoch": epoch, "state_dict": state, "recalls": plain_floats(recalls), "best_score": float(best_score),
            "optimizer": optimizer.state_dict(), "parallel": False,
            "scheduler": scheduler.state_dict() if scheduler is not None else None,
            "not_improved": int(not_improved), "neg_cache": torch.from_numpy(neg_cache.copy()),
            "history": history}


def draw_training_curves(history: dict, run_dir: Path, writer, epoch: int) -> None:
    import plots

    fig = plots.training_curves_figure(history["epochs"], history["loss"], history["val_recalls"],
                                       val_epochs=history["val_epochs"])
    writer.figure("Train/Curves", fig, epoch)
    plots.save_figure(fig, run_dir / "training_curves.png")


def resume_command(opt: argparse.Namespace, argv: list[str] | None, run_dir: Path) -> str:
    """The command that continues this run: the original arguments with ``--resume RUNDIR``."""
    import shlex

    if argv is None:
        argv = ["--mode", "train", "--seqL", str(opt.seqL), "--dataset", opt.dataset, "--dataPath", opt.dataPath,
                "--structPath", opt.structPath, "--nEpochs", str(opt.nEpochs)]
        argv += ["--pooling"] if opt.pooling else ["--method", opt.method]
    args, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a == "--resume":
            skip = True
        elif not a.startswith("--resume="):
            args.append(a)
    return "python main.py " + " ".join(shlex.quote(a) for a in args + ["--resume", str(run_dir)])


def train(opt: argparse.Namespace, argv: list[str] | None = None) -> Path:
    """``--mode train``: returns the run folder. ``argv`` (the command line) only
    serves the resume hint printed on Ctrl-C."""
    from get_datasets import get_split, prepare_dataset
    from get_models import get_model, load_state, open_run, parallelize
    from options import options_dict
    import report
    from test import evaluate, format_recalls, top1_precision_recall, write_figures
    from utils import (MetricsWriter, add_log_file, atomic_write, check_wandb, get_device, make_deterministic,
                       save_checkpoint_atomic, write_json_atomic)

    if not (opt.pooling or opt.method == "seqnet"):
        raise UserError("training learns the projection: add --pooling (or use --method seqnet)")
    device = get_device(opt.nocuda, opt.device)
    check_wandb(opt.wandb)
    ckpt = None
    if opt.resume:
        opt, run_dir, ckpt_file, ckpt = open_run(opt)
        for stale in (run_dir / opt.savePath).glob(".*.tmp"):   # left by a run killed mid-write
            stale.unlink(missing_ok=True)
    make_deterministic(opt.seed)
    prepare_dataset(opt)
    train_split = get_split(opt, "train")
    val_split = get_split(opt, "val")
    tset = TrainingSet.build(train_split, opt.seqL)
    model = get_model(opt, train_split.dim).to(device)
    optimizer, scheduler = make_optimizer(opt, model)
    neg_cache = np.full((len(tset.q_frames), N_NEG), -1, dtype=np.int64)
    start_epoch, best_score, not_improved = opt.start_epoch, 0.0, 0
    history = {"epochs": [], "loss": [], "val_epochs": [], "val_recalls": {}}
    if ckpt is not None:
        load_state(model, ckpt["state_dict"], str(ckpt_file))
        model.to(device)
        try:
            optimizer.load_state_dict(ckpt["optimizer"])
        except (KeyError, ValueError, TypeError) as exc:
            raise UserError(f"checkpoint {ckpt_file}: its optimiser state is missing or does not fit this model and "
                            f"--optim {opt.optim} ({type(exc).__name__}: {exc}); resume another checkpoint "
                            "(--ckpt latest|best) or start a new run") from exc
        start_epoch = int(ckpt["epoch"])
        best_score = float(ckpt.get("best_score", 0.0))
        not_improved = int(ckpt.get("not_improved", 0))
        if scheduler is not None:
            if ckpt.get("scheduler"):
                scheduler.load_state_dict(ckpt["scheduler"])
            else:   # reference checkpoints carry no scheduler: one step per finished epoch
                scheduler.last_epoch = start_epoch
        history = ckpt.get("history") or history
        cache = ckpt.get("neg_cache")
        if cache is not None and tuple(cache.shape) == neg_cache.shape:
            neg_cache = cache.numpy().copy()
    else:
        run_dir = make_run_dir(opt)
    parallelize(model, opt.nGPU, device)
    ckpt_dir = run_dir / opt.savePath
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    add_log_file(run_dir / "train.log")
    write_json_atomic(options_dict(opt), ckpt_dir / "flags.json")
    log.info("run folder: %s", run_dir)
    log.info("training set: %s", tset.summary())

    writer = MetricsWriter(run_dir, opt)
    epoch = start_epoch
    recalls, pr, timings, last_val = {}, None, {"epochs_s": 0.0}, None
    try:
        for epoch in range(start_epoch + 1, opt.nEpochs + 1):
            t0 = time.perf_counter()
            stats = train_epoch(model, tset, optimizer, neg_cache, opt, epoch, device, writer)
            if scheduler is not None:
                scheduler.step()
            log.info("epoch %d: average loss %.4f over %d batches (%d triplet queries, %d skipped); "
                     "train R@1 %.4f R@5 %.4f [%s]", epoch, stats.avg_loss, stats.batches, stats.triplet_queries,
                     stats.skipped, stats.train_recalls[1], stats.train_recalls[5],
                     ", ".join(f"{k} {v:.1f}" for k, v in stats.timings.items()))
            history["epochs"].append(epoch)
            history["loss"].append(stats.avg_loss)
            writer.scalar("Train/AvgLoss", stats.avg_loss, epoch)
            for n, r in stats.train_recalls.items():
                writer.scalar(f"Train/Recall@{n}", r, epoch)
            recalls, is_best = {}, False
            if epoch % opt.evalEvery == 0:
                result = evaluate(opt, val_split, model, device)
                recalls = result.recalls
                log.info(format_recalls(result, f"epoch {epoch} validation"))
                for n, r in recalls.items():
                    writer.scalar(f"Val/Recall@{n}", r, epoch)
                history["val_epochs"].append(epoch)
                for n, r in recalls.items():
                    history["val_recalls"].setdefault(n, []).append(r)
                last_val = (epoch, result)
                if opt.figures == "epoch":
                    pr = write_figures(result, val_split, opt.seqL, run_dir, f"epoch {epoch} validation", "Val",
                                       writer, epoch)
                is_best = recalls[5] > best_score
                if is_best:
                    best_score, not_improved = recalls[5], 0
                else:
                    not_improved += 1
            if opt.figures == "epoch":
                draw_training_curves(history, run_dir, writer, epoch)
            timings["epochs_s"] += time.perf_counter() - t0
            for k, v in stats.timings.items():
                timings[k] = timings.get(k, 0.0) + v
            state = checkpoint_state(epoch, model, optimizer, scheduler, recalls, best_score, not_improved, neg_cache,
                                     history)
            save_checkpoint_atomic(state, ckpt_dir / "checkpoint.pth.tar")
            if is_best:
                atomic_write(ckpt_dir / "model_best.pth.tar",
                             lambda f: f.write((ckpt_dir / "checkpoint.pth.tar").read_bytes()))
            if opt.patience > 0 and not_improved > opt.patience / opt.evalEvery:
                log.info("no improvement for %d validations: stopping early", not_improved)
                break
    except KeyboardInterrupt:
        last = ckpt_dir / "checkpoint.pth.tar"
        where = f"the last checkpoint is {last}" if last.exists() else "no checkpoint was written yet"
        log.warning("interrupted during epoch %d: %s; continue with: %s", epoch, where,
                    resume_command(opt, argv, run_dir))
        raise
    else:
        if opt.figures == "end" and last_val is not None:
            pr = write_figures(last_val[1], val_split, opt.seqL, run_dir, f"epoch {last_val[0]} validation", "Val",
                               writer, last_val[0])
            draw_training_curves(history, run_dir, writer, epoch)
        elif opt.figures == "none" and last_val is not None:
            pr = top1_precision_recall(last_val[1], val_split)
    finally:
        writer.close()
    log.info("best validation Recall@5 %.4f; checkpoints in %s", best_score, ckpt_dir)
    summary = report.build_summary("train", options_dict(opt), recalls, {}, pr, timings,
                                   train_split.files + val_split.files,
                                   extra={"best_recall@5": best_score, "epochs": epoch, "run_dir": str(run_dir),
                                          "training_set": tset.summary()})
    write_json_atomic(summary, run_dir / "summary.json")
    return run_dir
