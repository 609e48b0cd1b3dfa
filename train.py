"""Training (docs/how-it-works.md): sequence-matching triplet loss with hard negatives
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
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

import distributed
import report
import runs
from datasets import Split, sequence_windows
from get_datasets import get_split, prepare_dataset
from get_models import SeqMatchModel, get_model, load_state, parallelize
from metrics import recall_table
from seqMatchNet import topk_smallest, triplet_loss, window_distances
from utils import (
    MetricsWriter,
    UserError,
    add_log_file,
    check_wandb,
    get_device,
    make_deterministic,
    plain_floats,
    progress_enabled,
    write_json_atomic,
)

log = logging.getLogger(__name__)

N_NEG = 10                 # negatives kept per query
N_NEG_SAMPLE = 1000        # potential negatives drawn per query and refresh
N_NEG_CANDIDATES = N_NEG * 10


# ---------------------------------------------------------------- who is who

@dataclass
class TrainingSet:
    """Valid windows of a training split and their relations.

    Database and query windows are those that needed no shift (docs/how-it-works.md).
    Indices below are positions in ``db_frames`` / ``q_frames``.
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
    def build(cls, split: Split, seq_len: int) -> TrainingSet:
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
    """The mining matrix ``[Nd, len(queries)]`` for ``model``: every valid database window against
    the given queries' windows (frame models project only the frames these windows cover)."""
    split = tset.split
    db = model.embed_windows(split.db_desc, tset.db_starts, tset.seq_len, device, opt.cacheBatchSize, "cache db",
                             opt.quiet)
    q = model.embed_windows(split.q_desc, tset.q_starts[queries], tset.seq_len, device, opt.cacheBatchSize,
                            "cache queries", opt.quiet)
    return model.window_distance_matrix(db, q, tset.seq_len, opt.neg_trip_method)


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
    """Hard triplets for a set of queries (docs/how-it-works.md), all at once.

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
               distance: str, margin: float, device: torch.device, forward=None,
               total_valid: int | None = None) -> torch.Tensor:
    """Mean triplet loss of a batch: ``q_idx`` ``[B]`` query positions, ``pos``
    ``[B]`` database positions, ``negs`` ``[B, K]`` (-1 = none).

    Every distinct frame of the batch is read (and, by frame models, projected)
    once; the distances of all triplets are computed together. ``forward`` computes them
    (default ``model.triplet_distances``; under torchrun the DistributedDataParallel module). With
    ``total_valid`` the sum over the valid triplets is divided by that count instead of their own
    (when these triplets are one rank's part of a batch of ``total_valid``).
    """
    seq = np.arange(tset.seq_len)
    num_db = tset.split.num_db
    q_rows = tset.q_starts[q_idx][:, None] + seq + num_db                 # [B, L] rows in db+query stack
    p_rows = tset.db_starts[pos][:, None] + seq                            # [B, L]
    n_rows = tset.db_starts[np.maximum(negs, 0)][..., None] + seq          # [B, K, L]
    b, k, L = n_rows.shape
    uniq, inverse = np.unique(np.concatenate([q_rows.ravel(), p_rows.ravel(), n_rows.ravel()]), return_inverse=True)
    inverse = torch.as_tensor(inverse, device=device)
    frames = torch.from_numpy(_stacked_rows(tset, uniq)).to(device)
    d_pos, d_neg = (forward or model.triplet_distances)(frames, inverse[:b * L].view(b, L),
                                                        inverse[b * L:2 * b * L].view(b, L),
                                                        inverse[2 * b * L:].view(b, k, L), distance)
    loss = triplet_loss(d_pos, d_neg, torch.as_tensor(negs >= 0, device=device), margin)
    if total_valid is not None:     # the mean over these triplets -> their sum over the batch's count
        loss = loss * (max(int((negs >= 0).sum()), 1) / max(int(total_valid), 1))
    return loss


def _stacked_rows(tset: TrainingSet, rows: np.ndarray) -> np.ndarray:
    """Raw descriptors of rows of the database + query stack (queries offset by numDb): ``[len(rows), D]``.

    Each row is copied once, straight into the result: one gather per run of rows from the same
    side (the sorted rows of a batch are two runs), else one gather + scatter per side.
    """
    split = tset.split
    num_db, db, q = split.num_db, split.db_desc, split.q_desc
    rows = np.asarray(rows, dtype=np.int64)
    if len(rows) and (rows.min() < 0 or rows.max() >= num_db + split.num_q):
        raise IndexError(f"rows must lie in [0, {num_db + split.num_q})")
    out = np.empty((len(rows), split.dim), dtype=np.result_type(db.dtype, q.dtype))
    is_q = rows >= num_db
    cuts = np.flatnonzero(is_q[1:] != is_q[:-1]) + 1
    if len(cuts) <= 8:
        bounds = [0, *cuts.tolist(), len(rows)]
        for lo, hi in zip(bounds[:-1], bounds[1:]):
            if hi > lo:
                side, offset = (q, num_db) if is_q[lo] else (db, 0)
                np.take(side, rows[lo:hi] - offset, axis=0, out=out[lo:hi], mode="clip")   # in range: checked above
    else:
        out[~is_q] = db[rows[~is_q]]
        out[is_q] = q[rows[is_q] - num_db]
    return out


# ---------------------------------------------------------------- one epoch

def refresh_chunks(queries: np.ndarray, refresh_rate: int) -> list[np.ndarray]:
    """The reference's cache-refresh chunks: ``ceil(len / refresh_rate)`` consecutive
    pieces of the queries in route order (``np.array_split`` sizes); 0 = one chunk."""
    n_chunks = math.ceil(len(queries) / refresh_rate) if refresh_rate > 0 else 1
    return np.array_split(np.asarray(queries), max(n_chunks, 1))


@dataclass
class EpochStats:
    avg_loss: float = float("nan")
    batches: int = 0
    triplet_queries: int = 0
    skipped: int = 0
    train_recalls: dict = field(default_factory=dict)
    timings: dict = field(default_factory=lambda: {"cache_s": 0.0, "mining_s": 0.0, "batches_s": 0.0})


@dataclass
class MinedChunk:
    """Triplets of one refresh chunk: ``positive [B]``, ``negatives [B, N_NEG]`` (-1 padded),
    ``kept [B]`` (queries with a hard negative) and the chunk's top-100 by the cached distances."""

    queries: np.ndarray
    positive: np.ndarray
    negatives: np.ndarray
    kept: np.ndarray
    top: np.ndarray


def refresh_and_mine(model: SeqMatchModel, tset: TrainingSet, chunk: np.ndarray, neg_cache: np.ndarray,
                     opt: argparse.Namespace, rng: np.random.Generator, device: torch.device,
                     timings: dict) -> MinedChunk:
    """Refresh and mine one chunk (docs/how-it-works.md, steps 1-2): the mining matrix with the
    current model, then the triplets; with ``--negCache on`` the kept queries' negatives become their
    cache (in place).

    Under torchrun each rank computes the mining matrix of its consecutive share of the chunk's
    queries and mines them; the triplets (and top-100 lists) are gathered, so every rank ends with
    those of the whole chunk. The potential negatives are drawn for the whole chunk on every rank
    from the shared ``rng``: the draws, and so the triplets, are those of one process.
    """
    t0 = time.perf_counter()
    part = chunk[distributed.shard(len(chunk))]
    n_top = min(100, len(tset.db_frames))
    if len(part):
        dists = model_cache_distances(model, tset, part, opt, device)
        top = topk_smallest(dists, 100)[1].cpu().numpy()
        dists = dists.cpu().numpy()
    t1 = time.perf_counter()
    use_cache = opt.negCache == "on"
    previous = neg_cache[part] if use_cache else np.full((len(part), N_NEG), -1, dtype=np.int64)
    sampled = sample_negatives(tset, chunk, rng)[distributed.shard(len(chunk))]
    if len(part):
        pos, negs, kept = mine(dists, [tset.nontriv_pos[i] for i in part], sampled, previous, opt.margin)
    else:           # more ranks than queries in this chunk
        pos, negs = np.zeros(0, dtype=np.int64), np.zeros((0, N_NEG), dtype=np.int64)
        kept, top = np.zeros(0, dtype=bool), np.zeros((0, n_top), dtype=np.int64)
    if distributed.active():
        pos, negs, kept, top = distributed.all_gather_arrays(pos, negs, kept, top, what="gathering the mined triplets")
    if use_cache:
        neg_cache[chunk[kept]] = negs[kept]
    timings["cache_s"] += t1 - t0
    timings["mining_s"] += time.perf_counter() - t1
    return MinedChunk(chunk, pos, negs, kept, top)


def step_batches(model: SeqMatchModel, tset: TrainingSet, mined: MinedChunk, optimizer,
                 opt: argparse.Namespace, rng: np.random.Generator, device: torch.device, step: int, label: str,
                 writer=None, ddp=None) -> list[float]:
    """Step 3 of docs/how-it-works.md: shuffled batches of the chunk's queries, one optimiser step each
    (queries without a hard negative are left out, as in the reference). Returns the batch losses;
    ``step`` numbers the first batch for TensorBoard (empty batches count, as in the reference).

    Under torchrun (``ddp``, see ``data_parallel``) every rank draws the same shuffle and batches and
    computes its share of each batch (``part_loss``); the batch losses are summed over the ranks."""
    model.train()
    local = rng.permutation(len(mined.queries))
    losses, steps = [], []
    bar = tqdm(range(0, len(local), opt.batchSize), desc=label, unit="batch",
               disable=not progress_enabled(opt.quiet) or not distributed.is_main(), leave=False)
    for i, lo in enumerate(bar):
        sel = local[lo:lo + opt.batchSize]
        sel = sel[mined.kept[sel]]
        if len(sel) == 0:
            continue
        optimizer.zero_grad(set_to_none=True)
        if ddp is None:
            loss = batch_loss(model, tset, mined.queries[sel], mined.positive[sel], mined.negatives[sel],
                              opt.loss_trip_method, opt.margin, device)
            loss.backward()
            share = loss.item()
        else:
            loss = part_loss(model, ddp, tset, mined, sel, opt, device)
            with distributed.collective("the gradient sum of a training batch"):
                loss.backward()
            share = loss.item() / distributed.world_size()
        optimizer.step()
        losses.append(share)
        steps.append(step + i)
        if writer is not None and ddp is None:
            writer.scalar("Train/Loss", losses[-1], step + i)
        bar.set_postfix(loss=f"{losses[-1]:.4f}")
    if ddp is not None and losses:
        losses = distributed.all_reduce_sum(torch.tensor(losses, dtype=torch.float64), "summing the batch losses")
        losses = losses.tolist()
        for s, value in zip(steps, losses):
            if writer is not None:
                writer.scalar("Train/Loss", value, s)
    return losses


def part_loss(model: SeqMatchModel, ddp, tset: TrainingSet, mined: MinedChunk, sel: np.ndarray,
              opt: argparse.Namespace, device: torch.device) -> torch.Tensor:
    """This rank's part of the loss of batch ``sel`` (positions in ``mined``): the sum over its
    consecutive share of the batch's triplets divided by the number of valid triplets of the whole
    batch, times the world size, because DistributedDataParallel averages the gradients over the
    ranks: one step then equals one process's step on the whole batch. A rank with no share still
    takes part in the gradient sum, with the first triplet times 0."""
    world = distributed.world_size()
    part = sel[distributed.shard(len(sel))]
    weight = float(world)
    if len(part) == 0:
        part, weight = sel[:1], 0.0
    total = int((mined.negatives[sel] >= 0).sum())
    loss = batch_loss(model, tset, mined.queries[part], mined.positive[part], mined.negatives[part],
                      opt.loss_trip_method, opt.margin, device, forward=ddp, total_valid=total)
    return loss * weight


class TripletDistances(torch.nn.Module):
    """``model.triplet_distances`` as a module's forward, for DistributedDataParallel to wrap."""

    def __init__(self, model: SeqMatchModel) -> None:
        super().__init__()
        self.model = model

    def forward(self, frames, q_idx, p_idx, n_idx, distance):
        return self.model.triplet_distances(frames, q_idx, p_idx, n_idx, distance)


def data_parallel(model: SeqMatchModel, device: torch.device):
    """Under torchrun, DistributedDataParallel around the model's triplet distances (its construction
    gives every rank rank 0's weights; each backward averages the gradients over the ranks); else None."""
    if not distributed.active():
        return None
    ids = [device.index if device.index is not None else torch.cuda.current_device()] if device.type == "cuda" else None
    with distributed.collective("starting DistributedDataParallel"):
        return torch.nn.parallel.DistributedDataParallel(TripletDistances(model), device_ids=ids)


def train_epoch(model: SeqMatchModel, tset: TrainingSet, optimizer: torch.optim.Optimizer, neg_cache: np.ndarray,
                opt: argparse.Namespace, epoch: int, device: torch.device, writer=None, ddp=None) -> EpochStats:
    """One epoch: per consecutive chunk of queries, refresh the cache and mine, then step over
    shuffled batches. ``neg_cache`` ``[len(q_frames), N_NEG]`` is updated in place.

    The average loss is the reference's: the sum of batch losses over ``ceil(queries / batchSize)``.
    The training recall is measured on each chunk's mining matrix (the training queries, with the
    model of that chunk's refresh); the reference used the last chunk's matrix over all valid queries.

    The epoch's stream ``rng`` (negative draws, shuffles) depends on ``--seed`` and the epoch only, not
    on the rank: under torchrun (``ddp``) all ranks take the same decisions and split the work.
    """
    rng = np.random.default_rng([opt.seed, epoch])
    chunks = refresh_chunks(tset.queries, opt.cacheRefreshRate)
    n_batches = math.ceil(len(tset.queries) / opt.batchSize)
    stats, losses, tops = EpochStats(), [], []
    step = (epoch - 1) * n_batches + 1
    for c, chunk in enumerate(chunks):
        mined = refresh_and_mine(model, tset, chunk, neg_cache, opt, rng, device, stats.timings)
        t0 = time.perf_counter()
        losses += step_batches(model, tset, mined, optimizer, opt, rng, device, step,
                               f"epoch {epoch} chunk {c + 1}/{len(chunks)}", writer, ddp)
        step += math.ceil(len(chunk) / opt.batchSize)
        stats.timings["batches_s"] += time.perf_counter() - t0
        stats.skipped += int((~mined.kept).sum())
        stats.triplet_queries += int(mined.kept.sum())
        tops.append(mined.top)
    split = tset.split
    stats.train_recalls, _ = recall_table(np.concatenate(tops), split.db_positions[tset.db_frames],
                                          split.q_positions[tset.q_frames[np.concatenate(chunks)]],
                                          split.pos_dist_thr)
    stats.batches = len(losses)
    stats.avg_loss = float(np.sum(losses)) / n_batches if losses else float("nan")
    return stats


# ---------------------------------------------------------------- the run

def make_optimizer(opt: argparse.Namespace, model: SeqMatchModel):
    params = [p for p in model.parameters() if p.requires_grad]
    if opt.optim == "SGD":
        optimizer = torch.optim.SGD(params, lr=opt.lr, momentum=opt.momentum, weight_decay=opt.weightDecay)
        scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=max(int(opt.lrStep), 1), gamma=opt.lrGamma)
    else:
        optimizer = torch.optim.Adam(params, lr=opt.lr)
        scheduler = None
    return optimizer, scheduler


@dataclass
class TrainState:
    """What training carries from epoch to epoch; a checkpoint holds all of it except
    ``last_val`` and ``timings``."""

    epoch: int
    neg_cache: np.ndarray                  # [len(q_frames), N_NEG] database positions, -1 = empty
    best_score: float = 0.0                # best validation Recall@5
    not_improved: int = 0                  # validations since the best one
    recalls: dict = field(default_factory=dict)     # the last epoch's validation recalls ({} when not run)
    history: dict = field(default_factory=lambda: {"epochs": [], "loss": [], "val_epochs": [], "val_recalls": {}})
    last_val: tuple | None = None          # (epoch, EvalResult) of the last validation
    timings: dict = field(default_factory=lambda: {"epochs_s": 0.0})

    @classmethod
    def fresh(cls, num_queries: int, start_epoch: int = 0) -> TrainState:
        return cls(start_epoch, np.full((num_queries, N_NEG), -1, dtype=np.int64))

    @classmethod
    def from_checkpoint(cls, ckpt: dict, source: str, model: SeqMatchModel, optimizer, scheduler,
                        num_queries: int) -> TrainState:
        """Restore the model, optimiser and scheduler from ``ckpt`` and return the loop state.
        Reference checkpoints carry no scheduler, cache or history: those start afresh."""
        load_state(model, ckpt["state_dict"], source)
        try:
            optimizer.load_state_dict(ckpt["optimizer"])
        except (KeyError, ValueError, TypeError) as exc:
            raise UserError(f"checkpoint {source}: its optimiser state is missing or does not fit this model "
                            f"({type(exc).__name__}: {exc}); resume another checkpoint (--ckpt latest|best) "
                            "or start a new run") from exc
        state = cls.fresh(num_queries, int(ckpt["epoch"]))
        state.best_score = float(ckpt.get("best_score", 0.0))
        state.not_improved = int(ckpt.get("not_improved", 0))
        state.history = ckpt.get("history") or state.history
        if scheduler is not None:
            if ckpt.get("scheduler"):
                scheduler.load_state_dict(ckpt["scheduler"])
            else:   # one step per finished epoch
                scheduler.last_epoch = state.epoch
        cache = ckpt.get("neg_cache")
        if cache is not None and tuple(cache.shape) == state.neg_cache.shape:
            state.neg_cache = cache.numpy().copy()
        return state

    def to_checkpoint(self, model: SeqMatchModel, optimizer, scheduler) -> dict:
        """The reference's checkpoint keys plus what exact resumption needs; plain types only."""
        weights = {k.replace("pool.module.", "pool."): v.detach().cpu() for k, v in model.state_dict().items()}
        return {"epoch": self.epoch, "state_dict": weights, "recalls": plain_floats(self.recalls),
                "best_score": float(self.best_score), "optimizer": optimizer.state_dict(), "parallel": False,
                "scheduler": scheduler.state_dict() if scheduler is not None else None,
                "not_improved": int(self.not_improved), "neg_cache": torch.from_numpy(self.neg_cache.copy()),
                "history": self.history}

    def record_epoch(self, epoch: int, stats: EpochStats, seconds: float) -> None:
        self.epoch = epoch
        self.history["epochs"].append(epoch)
        self.history["loss"].append(stats.avg_loss)
        self.timings["epochs_s"] += seconds
        for k, v in stats.timings.items():
            self.timings[k] = self.timings.get(k, 0.0) + v


def log_epoch(epoch: int, stats: EpochStats, writer) -> None:
    log.info("epoch %d: average loss %.4f over %d batches (%d triplet queries, %d skipped); train R@1 %.4f "
             "R@5 %.4f [%s]", epoch, stats.avg_loss, stats.batches, stats.triplet_queries, stats.skipped,
             stats.train_recalls[1], stats.train_recalls[5],
             ", ".join(f"{k} {v:.1f}" for k, v in stats.timings.items()))
    writer.scalar("Train/AvgLoss", stats.avg_loss, epoch)
    for n, r in stats.train_recalls.items():
        writer.scalar(f"Train/Recall@{n}", r, epoch)


def validate(opt: argparse.Namespace, epoch: int, model: SeqMatchModel, val_split: Split, device: torch.device,
             state: TrainState, run_dir: Path, writer) -> bool:
    """Evaluate on the validation split, log and draw it, and update the best score (validation
    Recall@5, as the reference). Returns True when this epoch is the best so far."""
    from test import evaluate, format_recalls, write_figures

    result = evaluate(opt, val_split, model, device)
    state.recalls, state.last_val = result.recalls, (epoch, result)
    log.info(format_recalls(result, f"epoch {epoch} validation"))
    state.history["val_epochs"].append(epoch)
    for n, r in result.recalls.items():
        writer.scalar(f"Val/Recall@{n}", r, epoch)
        state.history["val_recalls"].setdefault(n, []).append(r)
    if opt.figures == "epoch" and distributed.is_main():
        write_figures(result, val_split, opt.seqL, run_dir, f"epoch {epoch} validation", "Val", writer, epoch)
    if result.recalls[5] > state.best_score:
        state.best_score, state.not_improved = result.recalls[5], 0
        return True
    state.not_improved += 1
    return False


def draw_training_curves(history: dict, run_dir: Path, writer, epoch: int) -> None:
    import plots

    fig = plots.training_curves_figure(history["epochs"], history["loss"], history["val_recalls"],
                                       val_epochs=history["val_epochs"])
    writer.figure("Train/Curves", fig, epoch)
    plots.save_figure(fig, run_dir / "training_curves.png")


def final_precision_recall(opt: argparse.Namespace, state: TrainState, val_split: Split, run_dir: Path,
                           writer) -> dict | None:
    """Precision-recall of the last validation (and, with ``--figures end``, its figures); under
    torchrun on rank 0 only (None elsewhere)."""
    from test import top1_precision_recall, write_figures

    if state.last_val is None or not distributed.is_main():
        return None
    epoch, result = state.last_val
    if opt.figures == "end":
        draw_training_curves(state.history, run_dir, writer, state.epoch)
        return write_figures(result, val_split, opt.seqL, run_dir, f"epoch {epoch} validation", "Val", writer, epoch)
    return top1_precision_recall(result, val_split)


def open_run_folder(opt: argparse.Namespace, tset: TrainingSet, model: SeqMatchModel, optimizer, scheduler,
                    resumed: tuple | None, device: torch.device) -> tuple[TrainState, Path]:
    """A new run folder, or the resumed one with the model, optimiser and loop state restored from
    ``resumed`` = ``(run_dir, ckpt_file, ckpt)``; then the log file and ``flags.json``."""
    if resumed is None:
        state, run_dir = TrainState.fresh(len(tset.q_frames), opt.start_epoch), runs.make_run_dir(opt)
    else:
        run_dir, ckpt_file, ckpt = resumed
        state = TrainState.from_checkpoint(ckpt, str(ckpt_file), model, optimizer, scheduler, len(tset.q_frames))
        model.to(device)
    ckpt_dir = run_dir / opt.savePath
    if distributed.is_main():
        ckpt_dir.mkdir(parents=True, exist_ok=True)
    add_log_file(run_dir / "train.log")
    runs.write_flags(argparse.Namespace(**{**vars(opt), "outDims": model.out_dims}), ckpt_dir)
    log.info("run folder: %s\ntraining set: %s", run_dir, tset.summary())
    return state, run_dir


def train(opt: argparse.Namespace, argv: list[str] | None = None) -> Path:
    """``--mode train``: build, resume, then per epoch train, validate, checkpoint and stop
    early; returns the run folder. ``argv`` only serves the resume hint printed on Ctrl-C."""
    if not (opt.pooling or opt.method == "seqnet"):
        raise UserError("training learns the projection: add --pooling (or use --method seqnet)")
    if distributed.active() and opt.nGPU > 1:
        raise UserError("--nGPU (DataParallel) does not combine with torchrun: start one process per GPU "
                        "(torchrun --nproc_per_node N) and leave --nGPU at 1")
    device = get_device(opt.nocuda, opt.device)
    check_wandb(opt.wandb)
    resumed = None
    if opt.resume:
        opt, *resumed = runs.open_run(opt)
        runs.remove_stale_temporaries(resumed[0] / opt.savePath)
    make_deterministic(opt.seed, distributed.rank())
    if distributed.is_main():       # may write the synthetic benchmark: once, before the others read it
        prepare_dataset(opt)
    distributed.barrier("waiting for rank 0 to prepare the dataset")
    if not distributed.is_main():
        prepare_dataset(opt)
    train_split, val_split = get_split(opt, "train"), get_split(opt, "val")
    tset = TrainingSet.build(train_split, opt.seqL)
    model = get_model(opt, train_split.dim).to(device)
    optimizer, scheduler = make_optimizer(opt, model)
    state, run_dir = open_run_folder(opt, tset, model, optimizer, scheduler, resumed, device)
    parallelize(model, opt.nGPU, device)
    ddp = data_parallel(model, device)
    ckpt_dir = run_dir / opt.savePath
    writer = MetricsWriter(run_dir, opt)
    try:
        for epoch in range(state.epoch + 1, opt.nEpochs + 1):
            t0 = time.perf_counter()
            stats = train_epoch(model, tset, optimizer, state.neg_cache, opt, epoch, device, writer, ddp)
            if scheduler is not None:
                scheduler.step()
            log_epoch(epoch, stats, writer)
            state.recalls, is_best = {}, False
            if epoch % opt.evalEvery == 0:
                is_best = validate(opt, epoch, model, val_split, device, state, run_dir, writer)
            state.record_epoch(epoch, stats, time.perf_counter() - t0)
            if opt.figures == "epoch" and distributed.is_main():
                draw_training_curves(state.history, run_dir, writer, epoch)
            checkpoint = state.to_checkpoint(model, optimizer, scheduler)
            runs.save_checkpoint_atomic(checkpoint, ckpt_dir / "checkpoint.pth.tar")
            if is_best:
                runs.copy_as_best(ckpt_dir)
            if opt.patience > 0 and state.not_improved > opt.patience / opt.evalEvery:
                log.info("no improvement for %d validations: stopping early", state.not_improved)
                break
        pr = final_precision_recall(opt, state, val_split, run_dir, writer)
    except KeyboardInterrupt:
        if distributed.is_main():
            runs.log_interrupted(ckpt_dir, state.epoch + 1, runs.resume_command(opt, argv, run_dir))
        raise
    finally:
        writer.close()
    log.info("best validation Recall@5 %.4f; checkpoints in %s", state.best_score, ckpt_dir)
    summary = report.build_summary("train", runs.options_dict(opt), state.recalls, {}, pr, state.timings,
                                   train_split.files + val_split.files,
                                   extra={"best_recall@5": state.best_score, "epochs": state.epoch,
                                          "run_dir": str(run_dir), "training_set": tset.summary()})
    if distributed.is_main():
        write_json_atomic(summary, run_dir / "summary.json")
    return run_dir
