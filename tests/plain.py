"""Plain, loop-based reference implementations written straight from the definitions in the
docs/how-it-works.md.

These functions are deliberately slow and simple: they exist so that tests can
compare the project's vectorised code against something obviously correct.
They follow those definitions (windows, sequence distance, evaluation, training) literally, with
explicit Python loops, and compute in float64 where that helps accuracy.

Ranking (``plain_topk``, ``plain_rerank``) orders exactly equal scores by
ascending database index, so every ranking has one right answer.

This module is a helper, not a test file: it defines no ``test_*`` functions.
Its own checks on hand-worked examples are ``test_plain_*`` in
``tests/test_seqmatch.py``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch

METHODS = ("centerOnly", "meanOfPairs")


# --------------------------------------------------------------------------
# windows
# --------------------------------------------------------------------------

def plain_window(i: int, lo: int, hi: int, seq_len: int) -> list[int]:
    """Window of length ``seq_len`` centred on frame ``i`` in segment [lo, hi).

    The window definition of docs/how-it-works.md, literally:
      1. w = [max(lo, i - L//2), min(i + L - L//2, hi))
      2. missing = L - len(w); if w starts at lo, append the next ``missing``
         indices after its end; else if missing > 0 and w ends at hi-1,
         prepend ``missing`` indices before its start.

    Note: when the segment is shorter than L, step 2 (taken literally) runs
    past ``hi``; this function does not guard against that.
    """
    i, lo, hi, seq_len = int(i), int(lo), int(hi), int(seq_len)
    if seq_len < 1:
        raise ValueError(f"seq_len must be >= 1, got {seq_len}")
    if not (lo <= i < hi):
        raise ValueError(f"frame {i} is outside its segment [{lo}, {hi})")

    # Step 1.
    start = max(lo, i - seq_len // 2)
    stop = min(i + seq_len - seq_len // 2, hi)
    w = list(range(start, stop))

    # Step 2.
    missing = seq_len - len(w)
    if w[0] == lo:
        last = w[-1]
        for k in range(1, missing + 1):
            w.append(last + k)
    elif missing > 0 and w[-1] == hi - 1:
        first = w[0]
        before = [first - k for k in range(missing, 0, -1)]
        w = before + w
    return w


def plain_windows(bounds, seq_len: int) -> np.ndarray:
    """Windows of all frames: row n is ``plain_window(n, lo_n, hi_n, L)``.

    ``bounds``: (N, 2) integer array, per frame its segment [lo, hi).
    Returns an (N, seq_len) int64 array.
    """
    bounds = np.asarray(bounds)
    out = np.zeros((len(bounds), int(seq_len)), dtype=np.int64)
    for n in range(len(bounds)):
        lo, hi = int(bounds[n][0]), int(bounds[n][1])
        w = plain_window(n, lo, hi, seq_len)
        for k in range(len(w)):
            out[n, k] = w[k]
    return out


def segments_of(lengths) -> np.ndarray:
    """Per-frame sequence bounds ``[N, 2]`` (``[lo, hi)`` of its sequence) of consecutive sequences of the
    given lengths."""
    rows, lo = [], 0
    for n in lengths:
        rows += [[lo, lo + n]] * n
        lo += n
    return np.array(rows, dtype=np.int64)


def plain_valid(bounds, seq_len: int) -> np.ndarray:
    """(N,) bool: frame n is valid for length L when step 2 adds nothing."""
    bounds = np.asarray(bounds)
    seq_len = int(seq_len)
    out = np.zeros(len(bounds), dtype=bool)
    for n in range(len(bounds)):
        lo, hi = int(bounds[n][0]), int(bounds[n][1])
        start = max(lo, n - seq_len // 2)
        stop = min(n + seq_len - seq_len // 2, hi)
        missing = seq_len - (stop - start)
        out[n] = missing == 0
    return out


def default_bounds(num_db: int, num_q: int) -> tuple[np.ndarray, np.ndarray]:
    """Default segments: the whole db part / the whole query part.

    Each traversal is indexed from 0 in its own list, so db frames get
    [0, num_db) and query frames get [0, num_q).
    Returns (db_bounds (num_db, 2), q_bounds (num_q, 2)), int64.
    """
    db_bounds = np.zeros((int(num_db), 2), dtype=np.int64)
    for n in range(int(num_db)):
        db_bounds[n, 0] = 0
        db_bounds[n, 1] = num_db
    q_bounds = np.zeros((int(num_q), 2), dtype=np.int64)
    for n in range(int(num_q)):
        q_bounds[n, 0] = 0
        q_bounds[n, 1] = num_q
    return db_bounds, q_bounds


# --------------------------------------------------------------------------
# sequence-matching distance
# --------------------------------------------------------------------------

def frame_distance(a, b) -> float:
    """||a - b|| of two L2-normalised vectors, as sqrt(max(0, 2 - 2 a.b)).

    The clamp at 0 avoids the NaN of the reference.
    """
    a = np.asarray(a, dtype=np.float64).reshape(-1)
    b = np.asarray(b, dtype=np.float64).reshape(-1)
    if a.shape != b.shape:
        raise ValueError(f"shape mismatch {a.shape} vs {b.shape}")
    dot = 0.0
    for k in range(a.shape[0]):
        dot += float(a[k]) * float(b[k])
    return math.sqrt(max(0.0, 2.0 - 2.0 * dot))


def plain_seq_distance(a_seq, b_seq, method: str) -> float:
    """Sequence distance of two (L, D) sequences with L2-normalised rows.

    'centerOnly' -> d_{L//2}; 'meanOfPairs' -> (1/L) sum_k d_k, where
    d_k = frame_distance(a_k, b_k).
    """
    a_seq = np.asarray(a_seq, dtype=np.float64)
    b_seq = np.asarray(b_seq, dtype=np.float64)
    if a_seq.ndim != 2 or a_seq.shape != b_seq.shape:
        raise ValueError(f"need two (L, D) arrays of one shape, got "
                         f"{a_seq.shape} and {b_seq.shape}")
    seq_len = a_seq.shape[0]
    if method == "centerOnly":
        c = seq_len // 2
        return frame_distance(a_seq[c], b_seq[c])
    if method == "meanOfPairs":
        total = 0.0
        for k in range(seq_len):
            total += frame_distance(a_seq[k], b_seq[k])
        return total / seq_len
    raise ValueError(f"unknown method {method!r}; expected one of {METHODS}")


def plain_score_matrix(db_feats, q_feats, db_windows, q_windows,
                       method: str = "meanOfPairs") -> np.ndarray:
    """(num_db_windows, num_q_windows) matrix of sequence distances.

    S[i, j] = plain_seq_distance(db_feats[db_windows[i]],
                                 q_feats[q_windows[j]], method).
    """
    db_feats = np.asarray(db_feats, dtype=np.float64)
    q_feats = np.asarray(q_feats, dtype=np.float64)
    db_windows = np.asarray(db_windows)
    q_windows = np.asarray(q_windows)
    S = np.zeros((len(db_windows), len(q_windows)), dtype=np.float64)
    for i in range(len(db_windows)):
        a_seq = db_feats[db_windows[i]]
        for j in range(len(q_windows)):
            b_seq = q_feats[q_windows[j]]
            S[i, j] = plain_seq_distance(a_seq, b_seq, method)
    return S


def plain_cache_matrix(db_feats, q_feats, db_windows, q_windows,
                       method: str) -> np.ndarray:
    """Training-cache distance matrix (training step 1), db x query.

    'meanOfPairs': sequence matching over the windows; 'centerOnly': the
    distance between the windows' centre frames only (position L//2 of each
    window; for the valid frames used in training that is the frame itself).
    """
    db_windows = np.asarray(db_windows)
    q_windows = np.asarray(q_windows)
    if method == "centerOnly":
        db_feats = np.asarray(db_feats, dtype=np.float64)
        q_feats = np.asarray(q_feats, dtype=np.float64)
        c = db_windows.shape[1] // 2
        S = np.zeros((len(db_windows), len(q_windows)), dtype=np.float64)
        for i in range(len(db_windows)):
            for j in range(len(q_windows)):
                S[i, j] = frame_distance(db_feats[db_windows[i][c]],
                                         q_feats[q_windows[j][c]])
        return S
    if method == "meanOfPairs":
        return plain_score_matrix(db_feats, q_feats, db_windows, q_windows,
                                  method)
    raise ValueError(f"unknown method {method!r}; expected one of {METHODS}")


# --------------------------------------------------------------------------
# evaluation
# --------------------------------------------------------------------------

def plain_rerank(db_feats, q_feats, db_windows, q_windows, candidates,
                 method: str = "meanOfPairs") -> tuple[np.ndarray, np.ndarray]:
    """Re-rank each query's candidate db indices by sequence distance.

    ``candidates``: (numQ, C) db indices. Returns (reranked indices (numQ, C)
    int64, their scores (numQ, C) float64 ascending); equal scores by
    ascending db index.
    """
    db_feats = np.asarray(db_feats, dtype=np.float64)
    q_feats = np.asarray(q_feats, dtype=np.float64)
    db_windows = np.asarray(db_windows)
    q_windows = np.asarray(q_windows)
    candidates = np.asarray(candidates)
    num_q, num_c = candidates.shape
    out_idx = np.zeros((num_q, num_c), dtype=np.int64)
    out_score = np.zeros((num_q, num_c), dtype=np.float64)
    for j in range(num_q):
        b_seq = q_feats[q_windows[j]]
        scores = []
        for c in range(num_c):
            db_i = int(candidates[j, c])
            scores.append(plain_seq_distance(db_feats[db_windows[db_i]],
                                             b_seq, method))
        order = sorted(range(num_c), key=lambda c: (scores[c], int(candidates[j, c])))
        for r in range(num_c):
            out_idx[j, r] = int(candidates[j, order[r]])
            out_score[j, r] = scores[order[r]]
    return out_idx, out_score


def plain_topk(S, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Per query column j: db indices by ascending S[:, j] (stable, so equal
    scores by ascending db index), first k.

    Returns (indices (numQ, k) int64, scores (numQ, k) float64); k is capped
    at the number of db rows.
    """
    S = np.asarray(S, dtype=np.float64)
    num_db, num_q = S.shape
    k = min(int(k), num_db)
    idx = np.zeros((num_q, k), dtype=np.int64)
    scores = np.zeros((num_q, k), dtype=np.float64)
    for j in range(num_q):
        order = sorted(range(num_db), key=lambda i: S[i, j])  # stable
        for r in range(k):
            idx[j, r] = order[r]
            scores[j, r] = S[order[r], j]
    return idx, scores


def plain_recall_at_n(preds, positives: list,
                      n_values: Sequence[int] = (1, 5, 10, 20, 100)) -> dict:
    """Recall@N: {N: share of queries with >= 1 positive among their top N}.

    Queries with no positive are left out of the denominator; if no query has
    a positive every recall is NaN. Values are fractions in [0, 1].
    """
    preds = np.asarray(preds)
    out = {}
    for n in n_values:
        n = int(n)
        num_with_gt = 0
        hits = 0
        for j in range(len(preds)):
            pos = {int(x) for x in np.asarray(positives[j]).reshape(-1)}
            if len(pos) == 0:
                continue
            num_with_gt += 1
            for r in range(min(n, len(preds[j]))):
                if int(preds[j][r]) in pos:
                    hits += 1
                    break
        out[n] = hits / num_with_gt if num_with_gt > 0 else float("nan")
    return out


def plain_positives(db_pos, q_pos, radius: float) -> list:
    """Per query: db indices (ascending, int64) within Euclidean ``radius``.

    Positions are (N, k) arrays with k = 1 or 2 (a 1-D (N,) array is taken
    as k = 1). Inclusive: distance <= radius.
    """
    db_pos = np.asarray(db_pos, dtype=np.float64)
    q_pos = np.asarray(q_pos, dtype=np.float64)
    if db_pos.ndim == 1:
        db_pos = db_pos.reshape(-1, 1)
    if q_pos.ndim == 1:
        q_pos = q_pos.reshape(-1, 1)
    out = []
    for j in range(len(q_pos)):
        found = []
        for i in range(len(db_pos)):
            sq = 0.0
            for c in range(q_pos.shape[1]):
                diff = float(db_pos[i, c]) - float(q_pos[j, c])
                sq += diff * diff
            if math.sqrt(sq) <= radius:
                found.append(i)
        out.append(np.array(found, dtype=np.int64))
    return out


NO_HIT = np.iinfo(np.int64).max


def plain_first_hits(preds, db_pos, q_pos, radius: float) -> np.ndarray:
    """Per query: the rank of its first prediction within ``radius`` (<=) of it,
    ``NO_HIT`` (above every N) when none is, and -1 when no db frame at all is within
    ``radius`` (the query has no positive).

    A quicker form of ``plain_positives`` + ``plain_recall_at_n`` for the
    sizes of real splits: one query at a time, Euclidean distances in float64.
    """
    preds = np.asarray(preds)
    db_pos = np.asarray(db_pos, dtype=np.float64).reshape(len(db_pos), -1)
    q_pos = np.asarray(q_pos, dtype=np.float64).reshape(len(q_pos), -1)
    out = np.zeros(len(q_pos), dtype=np.int64)
    for j in range(len(q_pos)):
        within = np.sqrt(((db_pos - q_pos[j]) ** 2).sum(axis=1)) <= radius
        if not within.any():
            out[j] = -1
            continue
        hits = np.flatnonzero(within[preds[j]])
        out[j] = hits[0] if len(hits) else NO_HIT      # nothing retrieved is a hit, at any N
    return out


def plain_recall_from_first_hits(first_hits, n_values: Sequence[int] = (1, 5, 10, 20, 100)) -> dict:
    """Recall@N from ``plain_first_hits``: {N: share of the queries with a
    positive whose first hit has rank < N}; NaN when no query has a positive."""
    first_hits = np.asarray(first_hits)
    with_pos = first_hits[first_hits >= 0]
    return {int(n): (float(np.mean(with_pos < n)) if len(with_pos) else float("nan")) for n in n_values}


# --------------------------------------------------------------------------
# training
# --------------------------------------------------------------------------

def plain_mine_query(dist_col, nontriv_pos, sampled_negs, neg_cache,
                     margin: float, n_neg: int = 10,
                     n_neg_candidates: int = 100
                     ) -> tuple[int, np.ndarray, np.ndarray] | None:
    """Mining (training step 2) for one query.

    ``dist_col``: (num_db,) cached distances of this query to every db frame.
    ``nontriv_pos``: its non-trivial positives (db indices).
    ``sampled_negs``: the already-drawn potential negatives (may repeat).
    ``neg_cache``: its negative cache (db indices, maybe empty).

    Returns None when the query is skipped (no non-trivial positive, or no
    negative violates the margin); else (pos_index, neg_indices, new_cache)
    where neg_indices (at most n_neg, ascending distance) is also the new
    negative cache.
    """
    dist_col = np.asarray(dist_col, dtype=np.float64).reshape(-1)
    nontriv_pos = [int(x) for x in np.asarray(nontriv_pos).reshape(-1)]
    if len(nontriv_pos) == 0:
        return None

    # Positive: smallest cached distance, first on ties.
    pos_index = nontriv_pos[0]
    d_pos = dist_col[pos_index]
    for p in nontriv_pos[1:]:
        if dist_col[p] < d_pos:
            pos_index = p
            d_pos = dist_col[p]

    # Negatives: sorted unique set of cache + samples.
    pool = [int(x) for x in np.asarray(neg_cache).reshape(-1)]
    pool += [int(x) for x in np.asarray(sampled_negs).reshape(-1)]
    unique_negs = sorted(set(pool))

    # The n_neg_candidates closest, stable by distance.
    by_dist = sorted(unique_negs, key=lambda n: dist_col[n])
    closest = by_dist[:int(n_neg_candidates)]

    # Those violating the margin.
    threshold = d_pos + math.sqrt(margin)
    violating = [n for n in closest if dist_col[n] < threshold]
    if len(violating) == 0:
        return None
    kept = np.array(violating[:int(n_neg)], dtype=np.int64)
    return int(pos_index), kept, kept.copy()


def _torch_seq_distance(a_seq: torch.Tensor, b_seq: torch.Tensor,
                        method: str) -> torch.Tensor:
    """Differentiable sequence distance with per-frame torch.norm."""
    if a_seq.shape != b_seq.shape or a_seq.dim() != 2:
        raise ValueError(f"need two (L, D) tensors of one shape, got "
                         f"{tuple(a_seq.shape)} and {tuple(b_seq.shape)}")
    seq_len = a_seq.shape[0]
    if method == "centerOnly":
        c = seq_len // 2
        return torch.norm(a_seq[c] - b_seq[c])
    if method == "meanOfPairs":
        total = torch.norm(a_seq[0] - b_seq[0])
        for k in range(1, seq_len):
            total = total + torch.norm(a_seq[k] - b_seq[k])
        return total / seq_len
    raise ValueError(f"unknown method {method!r}; expected one of {METHODS}")


def plain_triplet_loss(q_seqs, p_seqs, n_seqs, method: str,
                       margin: float) -> torch.Tensor:
    """The loss (training step 3): mean over all (q, p, n) of relu(d(q,p) - d(q,n) + sqrt(m)).

    ``q_seqs``, ``p_seqs``: lists of (L, D) tensors; ``n_seqs``: per query a
    list of (L, D) negative tensors (counts may differ). Differentiable.
    """
    if not (len(q_seqs) == len(p_seqs) == len(n_seqs)):
        raise ValueError("q_seqs, p_seqs and n_seqs must have one length each")
    sqrt_m = math.sqrt(margin)
    total = None
    count = 0
    for q, p, negs in zip(q_seqs, p_seqs, n_seqs):
        d_qp = _torch_seq_distance(q, p, method)
        for n in negs:
            d_qn = _torch_seq_distance(q, n, method)
            term = torch.relu(d_qp - d_qn + sqrt_m)
            total = term if total is None else total + term
            count += 1
    if count == 0:
        raise ValueError("no (q, p, n) triplet given")
    return total / count
