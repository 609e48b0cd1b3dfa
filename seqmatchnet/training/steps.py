"""``--mode train`` (docs/how-it-works.md): sequence-matching triplet loss with hard negatives
mined by the same sequence distance.

The pieces are separate and testable alone: ``mining.py`` (who may be a query, positive or
negative; the mining matrix; the triplets), ``batch_loss`` (the loss of a batch of triplets),
``refresh_and_mine`` and ``step_batches`` (one refresh chunk), ``train_epoch``, ``run_epochs`` and
``train``, which tie them together with validation, checkpoints and logging. The options become
a ``TrainConfig`` once, in ``train``.
"""
from __future__ import annotations

import argparse
import math
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from seqmatchnet.common import distributed
from seqmatchnet.common.logs import progress, progress_enabled
from seqmatchnet.evaluation.evaluate import EvalConfig
from seqmatchnet.evaluation.recall import recall_table
from seqmatchnet.matching.seqmatch import triplet_loss
from seqmatchnet.matching.topk import topk_smallest
from seqmatchnet.models.sequence import Projection, SeqMatchModel
from seqmatchnet.speeds import loss as loss_mod
from seqmatchnet.speeds import trajectories as trajectories_mod
from seqmatchnet.training.mining import (
    N_NEG,
    TrainingSet,
    mine,
    sample_negatives,
    stacked_rows,
    trajectory_cache_distances,
)

INITS = ("random", "identity")      # --init values that are not a run folder


@dataclass(frozen=True)
class TrainConfig:
    """What the epochs need from the options, read once (``from_options``)."""

    seq_len: int
    batch_size: int = 16                 # queries per optimiser step
    cache_batch_size: int = 64           # frames per projection batch
    refresh_rate: int = 1000             # queries per mining-cache refresh (0: one per epoch)
    margin: float = 0.1                  # --margin (its square root is the hinge margin)
    loss_distance: str = "meanOfPairs"   # sequence distance of the loss
    mining_distance: str = "meanOfPairs"  # sequence distance of the mining
    # previous hard negatives are candidates at the next refresh
    neg_cache: bool = True
    seed: int = 123
    quiet: bool = False
    figures: str = "epoch"               # validation figures: epoch, end or none
    n_epochs: int = 50
    eval_every: int = 1                  # validate every N epochs
    patience: int = 0                    # stop after this many epochs without improvement (0: off)
    eval: EvalConfig | None = None       # the validation's settings
    velocities: tuple[float, ...] = (1.0,)   # the loss and the mining match across these speeds too
    grid: int = 2                            # --trajectoryGrid: positions per database frame

    @classmethod
    def from_options(cls, opt: argparse.Namespace) -> TrainConfig:
        return cls(opt.seqL, opt.batchSize, opt.cacheBatchSize, opt.cacheRefreshRate, opt.margin,
                   opt.loss_trip_method, opt.neg_trip_method, opt.negCache == "on", opt.seed,
                   opt.quiet,
                   opt.figures, opt.nEpochs, opt.evalEvery, opt.patience,
                   EvalConfig.from_options(opt),
                   trajectories_mod.parse_velocities(opt.velocities),
                   trajectories_mod.GRIDS[opt.trajectoryGrid])

    @property
    def trajectories(self) -> trajectories_mod.Trajectories | None:
        """The trajectories of ``velocities`` (centred windows), or None for the diagonal alone."""
        traj = trajectories_mod.trajectories(self.velocities, self.seq_len, grid=self.grid)
        return None if traj.is_diagonal else traj

    @property
    def loss(self) -> LossSettings:
        """The training loss's settings: ``loss_distance``, ``margin`` and the trajectories."""
        return LossSettings(self.loss_distance, self.margin, self.trajectories)


@dataclass(frozen=True)
class Learner:
    """What the optimiser steps change and report to: the model and its optimiser on ``device``,
    the metrics ``writer`` (None: none) and, under torchrun, the DistributedDataParallel module
    around the model (``data_parallel``; None otherwise)."""

    model: SeqMatchModel
    optimizer: torch.optim.Optimizer
    device: torch.device
    writer: object = None
    ddp: object = None


@torch.no_grad()
def model_cache_distances(model: SeqMatchModel, tset: TrainingSet, queries: np.ndarray,
                          config: TrainConfig,
                          device: torch.device) -> torch.Tensor:
    """The mining matrix ``[Nd, len(queries)]`` for ``model``: every valid database window against
    the given queries' windows (frame models project only the frames these windows cover)."""
    split = tset.split
    traj = config.trajectories
    if traj is not None and config.mining_distance == "meanOfPairs":
        db = model.embed_windows(split.db_desc, tset.db_starts, tset.seq_len,
                                 Projection(device, config.cache_batch_size, "cache db",
                                            config.quiet), all_frames=True)
        q = model.embed_windows(split.q_desc, tset.q_starts[queries], tset.seq_len,
                                Projection(device, config.cache_batch_size, "cache queries",
                                           config.quiet))
        return trajectory_cache_distances(db.feats, q.feats, tset, q.starts.cpu().numpy(), traj)
    db = model.embed_windows(split.db_desc, tset.db_starts, tset.seq_len,
                             Projection(device, config.cache_batch_size, "cache db", config.quiet))
    q = model.embed_windows(split.q_desc, tset.q_starts[queries], tset.seq_len,
                            Projection(device, config.cache_batch_size, "cache queries",
                                       config.quiet))
    return model.window_distance_matrix(db, q, tset.seq_len, config.mining_distance)


# ---------------------------------------------------------------- loss

@dataclass(frozen=True)
class Triplets:
    """A batch of triplets: ``queries`` ``[B]`` query positions, ``positives`` ``[B]`` database
    positions, ``negatives`` ``[B, K]`` database positions (-1 = none)."""

    queries: np.ndarray
    positives: np.ndarray
    negatives: np.ndarray


@dataclass(frozen=True)
class LossSettings:
    """The loss of a batch: sequence distance ``distance``, ``margin`` (``--margin``, its square
    root is the hinge margin) and, across speeds (``--velocities``), the trajectories ``traj``."""

    distance: str = "meanOfPairs"
    margin: float = 0.1
    traj: trajectories_mod.Trajectories | None = None


def batch_loss(model: SeqMatchModel, tset: TrainingSet, triplets: Triplets, loss: LossSettings,
               device: torch.device, forward=None, total_valid: int | None = None) -> torch.Tensor:
    """Mean triplet loss of a batch of ``triplets`` under the ``loss`` settings.

    Every distinct frame of the batch is read (and, by frame models, projected) once; the distances
    of all triplets are computed together. ``forward`` computes them (default
    ``model.triplet_distances``; under torchrun the DistributedDataParallel module). With
    ``total_valid`` the sum over the valid triplets is divided by that count instead of their own
    (when these triplets are one rank's part of a batch of ``total_valid``). With ``loss.traj``
    (``--velocities``) a positive's or negative's distance is the smallest over its trajectories
    (``velocity``).
    """
    q_idx, pos, negs = triplets.queries, triplets.positives, triplets.negatives
    distance, margin, traj = loss.distance, loss.margin, loss.traj
    seq = np.arange(tset.seq_len)
    num_db = tset.split.num_db
    # [B, L] rows in db+query stack
    q_rows = tset.q_starts[q_idx][:, None] + seq + num_db
    if traj is None:
        p_rows = tset.db_starts[pos][:, None] + seq                        # [B, L]
        n_rows = tset.db_starts[np.maximum(negs, 0)][..., None] + seq      # [B, K, L]
        valid = ()
    else:
        (p_rows, p_valid), (n_rows, n_valid) = (_trajectory_rows(tset, w, traj)
                                                for w in (pos, np.maximum(negs, 0)))
        valid = (torch.as_tensor(p_valid, device=device), torch.as_tensor(n_valid, device=device),
                 loss_mod.tap_weights(traj))
    uniq, inverse = np.unique(np.concatenate([q_rows.ravel(), p_rows.ravel(), n_rows.ravel()]),
                              return_inverse=True)
    inverse = torch.as_tensor(inverse, device=device)
    frames = torch.from_numpy(stacked_rows(tset, uniq)).to(device)
    n_q, n_p = q_rows.size, p_rows.size
    d_pos, d_neg = (forward or model.triplet_distances)(frames, inverse[:n_q].view(q_rows.shape),
                                                        inverse[n_q:n_q + n_p].view(p_rows.shape),
                                                        inverse[n_q + n_p:].view(n_rows.shape),
                                                        distance, *valid)
    usable = torch.as_tensor(negs >= 0,
                             device=device) & torch.isfinite(d_neg) & torch.isfinite(d_pos)[:, None]
    d_pos, d_neg = torch.where(torch.isfinite(d_pos), d_pos,
                               0.0), torch.where(torch.isfinite(d_neg), d_neg, 0.0)
    loss = triplet_loss(d_pos, d_neg, usable, margin)
    # the mean over these triplets -> their sum over the batch's count
    if total_valid is not None:
        loss = loss * (max(int((negs >= 0).sum()), 1) / max(int(total_valid), 1))
    return loss


def _trajectory_rows(tset: TrainingSet, windows: np.ndarray, traj: trajectories_mod.Trajectories):
    """The database rows of every trajectory of the database windows ``windows`` ``[...]``
    (positions in ``tset.db_frames``): ``(rows [..., T, L] (``[..., T, L, 2]`` with midpoints),
    valid [..., T])`` (``velocity.trajectory_frames``)."""
    split = tset.split
    frames, valid = loss_mod.trajectory_frames(tset.db_starts[windows] + tset.seq_len // 2,
                                               split.db_bounds[tset.db_frames[windows]], traj)
    return frames.numpy(), valid.numpy()


# ---------------------------------------------------------------- one epoch

def refresh_chunks(queries: np.ndarray, refresh_rate: int) -> list[np.ndarray]:
    """The reference's cache-refresh chunks: ``ceil(len / refresh_rate)`` consecutive pieces of the
    queries in route order (``np.array_split`` sizes); 0 = one chunk."""
    n_chunks = math.ceil(len(queries) / refresh_rate) if refresh_rate > 0 else 1
    return np.array_split(np.asarray(queries), max(n_chunks, 1))


@dataclass
class EpochStats:
    avg_loss: float = float("nan")
    batches: int = 0
    triplet_queries: int = 0
    skipped: int = 0
    train_recalls: dict = field(default_factory=dict)
    timings: dict = field(default_factory=lambda: {"cache_s": 0.0, "mining_s": 0.0,
                                                   "batches_s": 0.0})


@dataclass
class MinedChunk:
    """Triplets of one refresh chunk: ``positive [B]``, ``negatives [B, N_NEG]`` (-1 padded),
    ``kept [B]`` (queries with a hard negative) and the chunk's top-100 by the cached distances."""

    queries: np.ndarray
    positive: np.ndarray
    negatives: np.ndarray
    kept: np.ndarray
    top: np.ndarray
    # per valid query of the chunk (route order): its row above, -1 = none
    slots: np.ndarray | None = None

    def batch_slots(self) -> np.ndarray:
        """What the batches are cut from: the chunk's valid queries, a query without a positive (or
        a negative) being an empty slot (-1), as in the reference's data loader."""
        return np.arange(len(self.queries)) if self.slots is None else self.slots

    def triplets(self, sel: np.ndarray) -> Triplets:
        """The triplets of the rows ``sel``."""
        return Triplets(self.queries[sel], self.positive[sel], self.negatives[sel])


def refresh_and_mine(model: SeqMatchModel, tset: TrainingSet, chunk: np.ndarray,
                     neg_cache: np.ndarray,
                     config: TrainConfig, rng: np.random.Generator, device: torch.device,
                     timings: dict) -> MinedChunk:
    """Refresh and mine one chunk (docs/how-it-works.md, steps 1-2): the mining matrix with the
    current model, then the triplets; with ``--negCache on`` the kept queries' negatives become
    their cache (in place).

    Under torchrun each rank computes the mining matrix of its consecutive share of the chunk's
    queries and mines them; the triplets (and top-100 lists) are gathered, so every rank ends with
    those of the whole chunk. The potential negatives are drawn for the whole chunk on every rank
    from the shared ``rng``: the draws, and so the triplets, are those of one process.
    """
    t0 = time.perf_counter()
    part = chunk[distributed.shard(len(chunk))]
    n_top = min(100, len(tset.db_frames))
    if len(part):
        dists = model_cache_distances(model, tset, part, config, device)
        top = topk_smallest(dists, 100)[1].cpu().numpy()
        dists = dists.cpu().numpy()
    t1 = time.perf_counter()
    use_cache = config.neg_cache
    previous = neg_cache[part] if use_cache else np.full((len(part), N_NEG), -1, dtype=np.int64)
    sampled = sample_negatives(tset, chunk, rng)[distributed.shard(len(chunk))]
    if len(part):
        pos, negs, kept = mine(dists, [tset.nontriv_pos[i] for i in part], sampled, previous,
                               config.margin)
    else:           # more ranks than queries in this chunk
        pos, negs = np.zeros(0, dtype=np.int64), np.zeros((0, N_NEG), dtype=np.int64)
        kept, top = np.zeros(0, dtype=bool), np.zeros((0, n_top), dtype=np.int64)
    if distributed.active():
        pos, negs, kept, top = distributed.all_gather_arrays(pos, negs, kept, top,
                                                             what="gathering the mined triplets")
    if use_cache:
        neg_cache[chunk[kept]] = negs[kept]
    timings["cache_s"] += t1 - t0
    timings["mining_s"] += time.perf_counter() - t1
    return MinedChunk(chunk, pos, negs, kept, top)


def step_batches(learner: Learner, tset: TrainingSet, mined: MinedChunk, config: TrainConfig,
                 rng: np.random.Generator, step: int, label: str) -> list[float]:
    """Step 3 of docs/how-it-works.md: shuffled batches of the chunk's queries, one optimiser step
    each (queries without a hard negative are left out, as in the reference). Returns the batch
    losses; ``step`` numbers the first batch for TensorBoard (empty batches count, as in the
    reference).

    Under torchrun (``learner.ddp``, see ``data_parallel``) every rank draws the same shuffle and
    batches and computes its share of each batch (``part_loss``); the batch losses are summed over
    the ranks."""
    model, optimizer, device, writer, ddp = (learner.model, learner.optimizer, learner.device,
                                             learner.writer, learner.ddp)
    model.train()
    slots = mined.batch_slots()
    local = slots[rng.permutation(len(slots))]
    losses, steps = [], []
    bar = progress(range(0, len(local), config.batch_size), desc=label, unit="batch",
               disable=not progress_enabled(config.quiet) or not distributed.is_main(), leave=False)
    for i, lo in enumerate(bar):
        sel = local[lo:lo + config.batch_size]
        sel = sel[sel >= 0]
        sel = sel[mined.kept[sel]]
        if len(sel) == 0:
            continue
        optimizer.zero_grad(set_to_none=True)
        if ddp is None:
            loss = batch_loss(model, tset, mined.triplets(sel), config.loss, device)
            loss.backward()
            share = loss.item()
        else:
            loss = part_loss(model, ddp, tset, mined, sel, config, device)
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
        losses = distributed.all_reduce_sum(torch.tensor(losses, dtype=torch.float64),
                                            "summing the batch losses")
        losses = losses.tolist()
        for s, value in zip(steps, losses):
            if writer is not None:
                writer.scalar("Train/Loss", value, s)
    return losses


def part_loss(model: SeqMatchModel, ddp, tset: TrainingSet, mined: MinedChunk, sel: np.ndarray,
              config: TrainConfig, device: torch.device) -> torch.Tensor:
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
    loss = batch_loss(model, tset, mined.triplets(part), config.loss, device, forward=ddp,
                      total_valid=total)
    return loss * weight


class TripletDistances(torch.nn.Module):
    """``model.triplet_distances`` as a module's forward, for DistributedDataParallel to wrap."""

    def __init__(self, model: SeqMatchModel) -> None:
        super().__init__()
        self.model = model

    def forward(self, frames, q_idx, p_idx, n_idx, distance, *valid):
        return self.model.triplet_distances(frames, q_idx, p_idx, n_idx, distance, *valid)


def data_parallel(model: SeqMatchModel, device: torch.device):
    """Under torchrun, DistributedDataParallel around the model's triplet distances (its
    construction gives every rank rank 0's weights; each backward averages the gradients over the
    ranks); else None."""
    if not distributed.active():
        return None
    ids = [device.index if device.index is not None
           else torch.cuda.current_device()] if device.type == "cuda" else None
    with distributed.collective("starting DistributedDataParallel"):
        return torch.nn.parallel.DistributedDataParallel(TripletDistances(model), device_ids=ids)


def train_epoch(learner: Learner, tset: TrainingSet, neg_cache: np.ndarray, config: TrainConfig,
                epoch: int) -> EpochStats:
    """One epoch: per consecutive chunk of the valid queries (the reference's ``np.array_split`` of
    all of them), refresh the cache and mine the chunk's training queries (those with a non-trivial
    positive), then step over shuffled batches of the chunk's valid queries, where a query that is
    not trained leaves an empty slot, as in the reference. ``neg_cache`` ``[len(q_frames), N_NEG]``
    is updated in place.

    The average loss is the reference's: the sum of batch losses over ``ceil(valid queries /
    batchSize)``. TensorBoard steps count every batch of every chunk, so they never repeat across
    epochs. The training recall is measured on each chunk's mining matrix (the training queries,
    with the model of that chunk's refresh); the reference used the last chunk's matrix over all
    valid queries.

    The epoch's stream ``rng`` (negative draws, shuffles) depends on ``--seed`` and the epoch only,
    not on the rank: under torchrun (``learner.ddp``) all ranks take the same decisions and split
    the work.
    """
    rng = np.random.default_rng([config.seed, epoch])
    valid = refresh_chunks(np.arange(len(tset.q_frames)), config.refresh_rate)
    chunks = [c[np.isin(c, tset.queries)] for c in valid]
    n_batches = math.ceil(len(tset.q_frames) / config.batch_size)
    steps_per_epoch = sum(math.ceil(len(c) / config.batch_size) for c in valid)
    stats, losses, tops = EpochStats(), [], []
    step = (epoch - 1) * steps_per_epoch + 1
    for c, (chunk, all_valid) in enumerate(zip(chunks, valid)):
        mined = refresh_and_mine(learner.model, tset, chunk, neg_cache, config, rng, learner.device,
                                 stats.timings)
        mined.slots = np.where(np.isin(all_valid, chunk), np.cumsum(np.isin(all_valid, chunk)) - 1,
                               -1)
        t0 = time.perf_counter()
        losses += step_batches(learner, tset, mined, config, rng, step,
                               f"epoch {epoch} chunk {c + 1}/{len(chunks)}")
        step += math.ceil(len(all_valid) / config.batch_size)
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
