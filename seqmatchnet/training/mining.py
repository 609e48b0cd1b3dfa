"""Who is who in a training split, and hard-negative mining (docs/how-it-works.md, steps 1-2).

``TrainingSet`` says which windows may be queries, positives and negatives; ``cache_distances``
is the mining matrix (sequence distances of every database window to a chunk of queries);
``sample_negatives`` draws potential negatives and ``mine`` picks the hard triplets, all at once;
``stacked_rows`` reads a batch's raw descriptors. Pure numpy/torch: nothing here reads the command
line.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from seqmatchnet.common.errors import UserError
from seqmatchnet.data.windows import Split, sequence_windows
from seqmatchnet.matching.seqmatch import window_distances
from seqmatchnet.speeds import kernel, trajectories

N_NEG = 10                 # negatives kept per query
N_NEG_SAMPLE = 1000        # potential negatives drawn per query and refresh
N_NEG_CANDIDATES = N_NEG * 10


# ---------------------------------------------------------------- who is who

@dataclass
class TrainingSet:
    """Valid windows of a training split and their relations.

    Database and query windows are those that needed no shift (docs/how-it-works.md). Indices below
    are positions in ``db_frames`` / ``q_frames``.
    """

    split: Split
    seq_len: int
    db_frames: np.ndarray        # [Nd] split rows of the valid database frames
    q_frames: np.ndarray         # [Nq] split rows of the valid query frames
    db_starts: np.ndarray        # [Nd] first frame of each database window (split row)
    q_starts: np.ndarray         # [Nq]
    nontriv_pos: list            # [Nq] sorted database positions within sqrt(nonTrivPosDistSqThr)
    # positions in q_frames of queries with a non-trivial positive and a negative
    queries: np.ndarray
    # [Nq] sorted database positions within posDistThr (not potential negatives)
    close: list

    @classmethod
    def build(cls, split: Split, seq_len: int) -> TrainingSet:
        from sklearn.neighbors import NearestNeighbors

        db_starts, db_valid = sequence_windows(split.db_bounds, seq_len)
        q_starts, q_valid = sequence_windows(split.q_bounds, seq_len)
        db_frames, q_frames = np.flatnonzero(db_valid), np.flatnonzero(q_valid)
        if len(db_frames) == 0 or len(q_frames) == 0:
            raise UserError(f"no {split.name} frames have a full window of {seq_len} frames: use "
                            "a smaller --seqL")
        knn = NearestNeighbors().fit(split.db_positions[db_frames])
        q_pos = split.q_positions[q_frames]
        nontriv = knn.radius_neighbors(q_pos, radius=math.sqrt(split.non_triv_pos_dist_sq_thr),
                                       return_distance=False)
        nontriv = [np.sort(p).astype(np.int64) for p in nontriv]
        close = [np.sort(p).astype(np.int64)
                 for p in knn.radius_neighbors(q_pos, radius=split.pos_dist_thr,
                                               return_distance=False)]
        n_close = np.array([len(p) for p in close])
        has_pos = np.array([len(p) > 0 for p in nontriv], dtype=bool)
        queries = np.flatnonzero(has_pos & (n_close < len(db_frames)))
        if len(queries) == 0:
            raise UserError(f"split {split.name}: no query has a non-trivial positive (within "
                            f"{math.sqrt(split.non_triv_pos_dist_sq_thr):g} "
                            f"{split.position_unit}) and a negative (farther than "
                            f"{split.pos_dist_thr:g} {split.position_unit}): check the positions")
        return cls(split, seq_len, db_frames, q_frames, db_starts[db_frames], q_starts[q_frames],
                   nontriv, queries,
                   close)

    def summary(self) -> str:
        return (f"{self.split.num_db + self.split.num_q} frames ({self.split.num_db} database, "
                f"{self.split.num_q} query); {len(self.db_frames)} database and "
                f"{len(self.q_frames)} query windows of {self.seq_len}; {len(self.queries)} "
                "training queries with a non-trivial positive")


# ---------------------------------------------------------------- mining

@torch.no_grad()
def cache_distances(db_feats: torch.Tensor, q_feats: torch.Tensor, tset: TrainingSet,
                    queries: np.ndarray,
                    method: str) -> torch.Tensor:
    """The mining matrix ``[Nd, len(queries)]``: sequence distances (``method``) between every valid
    database window and the given queries' windows. ``db_feats`` / ``q_feats`` are pooled features
    of all split frames."""
    device = db_feats.device
    return window_distances(db_feats, q_feats, torch.as_tensor(tset.db_starts, device=device),
                            torch.as_tensor(tset.q_starts[queries], device=device), tset.seq_len,
                            method)


@torch.no_grad()
def trajectory_cache_distances(db_feats: torch.Tensor, q_feats: torch.Tensor, tset: TrainingSet,
                               q_starts: np.ndarray, traj: trajectories.Trajectories,
                               query_chunk: int = 1024) -> torch.Tensor:
    """The mining matrix across speeds ``[Nd, len(q_starts)]``: for every valid database window and
    query window, the smallest meanOfPairs distance over the trajectories ``traj`` (``velocity``).
    ``db_feats`` holds every database frame of the split (row = frame), ``q_feats`` the query frames
    with the windows starting at rows ``q_starts``; ``query_chunk`` query windows at a time."""
    anchors, bounds = tset.db_starts + tset.seq_len // 2, tset.split.db_bounds[tset.db_frames]
    out = torch.empty((len(anchors), len(q_starts)), dtype=torch.float32, device=db_feats.device)
    for lo, d in kernel.chunk_distances(db_feats, q_feats, anchors, bounds, q_starts, traj,
                                        query_chunk):
        # one chunk of [T, Nd, chunk] at a time: bounded memory
        out[:, lo:lo + d.shape[2]] = d.amin(dim=0)
    return out


def sample_negatives(tset: TrainingSet, queries: np.ndarray, rng: np.random.Generator,
                     n: int = N_NEG_SAMPLE) -> np.ndarray:
    """``n`` potential negatives per query, drawn uniformly with replacement from the database
    windows farther than posDistThr: ``[len(queries), n]``.

    Each query draws from its own candidates directly (no rejection), so a query with only a handful
    of potential negatives costs the same as any other: draw ``u`` uniformly among the ``Nd -
    |close|`` candidates, then step over the sorted close windows at or below it (``u + #{j: close_j
    - j <= u}``).
    """
    n_db = len(tset.db_frames)
    close = [tset.close[i] for i in queries]
    width = max((len(c) for c in close), default=0)
    # n_db: above every draw
    shifted = np.full((len(queries), max(width, 1)), n_db, dtype=np.int64)
    for i, c in enumerate(close):   # ragged -> padded (no arithmetic here)
        shifted[i, :len(c)] = c - np.arange(len(c))
    n_free = n_db - np.array([len(c) for c in close], dtype=np.int64)
    draws = rng.integers(0, n_free[:, None], size=(len(queries), n))
    # per-row searchsorted as one search: rows are offset so that each row's values stay apart
    offset = (np.arange(len(queries), dtype=np.int64) * (n_db + 1))[:, None]
    below = np.searchsorted((shifted + offset).ravel(), (draws + offset).ravel(),
                            side="right").reshape(draws.shape)
    return draws + below - np.arange(len(queries))[:, None] * shifted.shape[1]


def mine(dists: np.ndarray, nontriv_pos: list, sampled: np.ndarray, neg_cache: np.ndarray,
         margin: float,
         n_neg: int = N_NEG,
         n_candidates: int = N_NEG_CANDIDATES) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Hard triplets for a set of queries (docs/how-it-works.md), all at once.

    ``dists`` ``[Nd, B]`` cached distances; ``nontriv_pos`` B arrays of database indices;
    ``sampled`` ``[B, S]`` drawn potential negatives; ``neg_cache`` ``[B, n_neg]`` previous
    negatives (-1 = empty). Returns ``(positive [B], negatives [B, n_neg] (-1 padded, ascending
    distance), kept [B])``; a query with no negative inside the margin is not kept. The new negative
    cache of the kept queries is their ``negatives``.
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


def stacked_rows(tset: TrainingSet, rows: np.ndarray) -> np.ndarray:
    """Raw descriptors of rows of the database + query stack (queries offset by numDb):
    ``[len(rows), D]``.

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
                # in range: checked above
                np.take(side, rows[lo:hi] - offset, axis=0, out=out[lo:hi], mode="clip")
    else:
        out[~is_q] = db[rows[~is_q]]
        out[is_q] = q[rows[is_q] - num_db]
    return out
