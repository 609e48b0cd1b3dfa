"""Plain, loop-based reference implementations written straight from SPEC.md.

These functions are deliberately slow and simple: they exist so that tests can
compare the project's vectorised code against something obviously correct.
They follow the text of ``SPEC.md`` (sections 3, 5, 6 and 7) literally, with
explicit Python loops, and compute in float64 where that helps accuracy.

This module is a helper, not a test file: it defines no ``test_*`` functions.
Run ``python tests/plain.py`` to exercise every function on tiny random data.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import numpy as np
import torch

METHODS = ("centerOnly", "meanOfPairs")


# --------------------------------------------------------------------------
# SPEC section 3: sequences (windows)
# --------------------------------------------------------------------------

def plain_window(i: int, lo: int, hi: int, seq_len: int) -> list[int]:
    """Window of length ``seq_len`` centred on frame ``i`` in segment [lo, hi).

    SPEC section 3, steps 1-2, literally:
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
    """Default segments (SPEC 3): the whole db part / the whole query part.

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
# SPEC section 5: sequence-matching distance
# --------------------------------------------------------------------------

def frame_distance(a, b) -> float:
    """||a - b|| of two L2-normalised vectors, as sqrt(max(0, 2 - 2 a.b)).

    The clamp at 0 avoids the NaN of the reference (SPEC section 9).
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
    """Training-cache distance matrix (SPEC 7 step 1), db x query.

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
# SPEC section 6: evaluation
# --------------------------------------------------------------------------

def plain_rerank(db_feats, q_feats, db_windows, q_windows, candidates,
                 method: str = "meanOfPairs") -> tuple[np.ndarray, np.ndarray]:
    """Re-rank each query's candidate db indices by sequence distance.

    ``candidates``: (numQ, C) db indices. Returns (reranked indices (numQ, C)
    int64, their scores (numQ, C) float64 ascending); stable sort.
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
        order = sorted(range(num_c), key=lambda c: scores[c])  # stable
        for r in range(num_c):
            out_idx[j, r] = int(candidates[j, order[r]])
            out_score[j, r] = scores[order[r]]
    return out_idx, out_score


def plain_topk(S, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Per query column j: db indices by ascending S[:, j] (stable), first k.

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
    """SPEC 6.6: {N: share of queries with >= 1 positive among their top N}.

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
            pos = set(int(x) for x in np.asarray(positives[j]).reshape(-1))
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


# --------------------------------------------------------------------------
# SPEC section 7: training
# --------------------------------------------------------------------------

def plain_mine_query(dist_col, nontriv_pos, sampled_negs, neg_cache,
                     margin: float, n_neg: int = 10,
                     n_neg_candidates: int = 100
                     ) -> Optional[tuple[int, np.ndarray, np.ndarray]]:
    """SPEC 7 step 2 for one query.

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
    """SPEC 7 step 3: mean over all (q, p, n) of relu(d(q,p) - d(q,n) + sqrt(m)).

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


# --------------------------------------------------------------------------
# Self-checks (not collected by pytest): python tests/plain.py
# --------------------------------------------------------------------------

def _normed(rng: np.random.Generator, n: int, d: int) -> np.ndarray:
    x = rng.standard_normal((n, d))
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _selfcheck_windows() -> None:
    # Hand-worked examples, segment [0, 10).
    assert plain_window(0, 0, 10, 5) == [0, 1, 2, 3, 4]
    assert plain_window(1, 0, 10, 5) == [0, 1, 2, 3, 4]
    assert plain_window(2, 0, 10, 5) == [0, 1, 2, 3, 4]
    assert plain_window(3, 0, 10, 5) == [1, 2, 3, 4, 5]
    assert plain_window(7, 0, 10, 5) == [5, 6, 7, 8, 9]
    assert plain_window(8, 0, 10, 5) == [5, 6, 7, 8, 9]
    assert plain_window(9, 0, 10, 5) == [5, 6, 7, 8, 9]
    assert plain_window(0, 0, 10, 4) == [0, 1, 2, 3]
    assert plain_window(2, 0, 10, 4) == [0, 1, 2, 3]
    assert plain_window(8, 0, 10, 4) == [6, 7, 8, 9]
    assert plain_window(9, 0, 10, 4) == [6, 7, 8, 9]
    # L = 1 and L = 2.
    for i in range(10):
        assert plain_window(i, 0, 10, 1) == [i]
    assert plain_window(0, 0, 10, 2) == [0, 1]
    assert plain_window(5, 0, 10, 2) == [4, 5]
    assert plain_window(9, 0, 10, 2) == [8, 9]
    # Non-zero lo (MSLS-like).
    assert plain_window(3, 3, 8, 3) == [3, 4, 5]
    assert plain_window(7, 3, 8, 3) == [5, 6, 7]
    # Segment exactly L long: every frame gets the whole segment.
    for i in range(3, 8):
        assert plain_window(i, 3, 8, 5) == [3, 4, 5, 6, 7]

    # Multi-segment bounds: windows have L frames, contiguous, inside bounds.
    bounds = np.array([[0, 6]] * 6 + [[6, 13]] * 7 + [[13, 18]] * 5)
    for seq_len in range(1, 6):
        W = plain_windows(bounds, seq_len)
        V = plain_valid(bounds, seq_len)
        assert W.shape == (18, seq_len) and W.dtype == np.int64
        assert V.shape == (18,) and V.dtype == bool
        for n in range(18):
            lo, hi = bounds[n]
            assert all(lo <= x < hi for x in W[n]), (seq_len, n, W[n])
            assert all(W[n][k + 1] == W[n][k] + 1 for k in range(seq_len - 1))
            assert n in W[n]
            # Valid frames are centred on themselves.
            if V[n]:
                assert W[n][seq_len // 2] == n
        # Number of valid frames per segment: len - (L - 1).
        assert V.sum() == sum(max(0, s - (seq_len - 1)) for s in (6, 7, 5))
    assert plain_valid(bounds, 1).all()

    db_b, q_b = default_bounds(4, 3)
    assert db_b.tolist() == [[0, 4]] * 4 and q_b.tolist() == [[0, 3]] * 3


def _selfcheck_distances() -> None:
    rng = np.random.default_rng(0)
    a, b = _normed(rng, 2, 8)
    assert abs(frame_distance(a, b) - np.linalg.norm(a - b)) < 1e-12
    # a.a rounds to 1 +- eps: the clamp keeps it finite (never NaN).
    assert 0.0 <= frame_distance(a, a) < 1e-7
    # An un-normalised vector making a.b > 1 gives exactly 0, not NaN.
    assert frame_distance(a * (1 + 1e-9), a) == 0.0

    for seq_len in (1, 2, 3, 5):
        A = _normed(rng, seq_len, 8)
        B = _normed(rng, seq_len, 8)
        mop = plain_seq_distance(A, B, "meanOfPairs")
        co = plain_seq_distance(A, B, "centerOnly")
        assert abs(mop - np.linalg.norm(A - B, axis=1).mean()) < 1e-12
        assert abs(co - np.linalg.norm(A[seq_len // 2] - B[seq_len // 2])) < 1e-12
        assert abs(mop - plain_seq_distance(B, A, "meanOfPairs")) < 1e-15
        assert 0.0 <= plain_seq_distance(A, A, "meanOfPairs") < 1e-7


def _selfcheck_score_matrix() -> None:
    rng = np.random.default_rng(1)
    num_db, num_q, dim = 9, 7, 6
    db = _normed(rng, num_db, dim)
    q = _normed(rng, num_q, dim)
    D = np.linalg.norm(db[:, None, :] - q[None, :, :], axis=2)
    for seq_len in (1, 2, 3, 4, 5):
        db_b, q_b = default_bounds(num_db, num_q)
        Wd = plain_windows(db_b, seq_len)
        Wq = plain_windows(q_b, seq_len)
        S = plain_score_matrix(db, q, Wd, Wq)
        assert S.shape == (num_db, num_q)
        # Diagonal sums over the frame-distance matrix (SPEC 5).
        for i in range(num_db):
            for j in range(num_q):
                diag = sum(D[Wd[i][0] + k, Wq[j][0] + k]
                           for k in range(seq_len)) / seq_len
                assert abs(S[i, j] - diag) < 1e-12
        # Symmetry: same features on both sides -> symmetric, zero diagonal.
        Wd2 = plain_windows(default_bounds(num_db, num_db)[0], seq_len)
        S_self = plain_score_matrix(db, db, Wd2, Wd2)
        assert np.allclose(S_self, S_self.T, atol=1e-15)
        assert np.allclose(np.diag(S_self), 0.0, atol=1e-7)
        # Cache matrix.
        C_mop = plain_cache_matrix(db, q, Wd, Wq, "meanOfPairs")
        assert np.array_equal(C_mop, S)
        C_co = plain_cache_matrix(db, q, Wd, Wq, "centerOnly")
        S_co = plain_score_matrix(db, q, Wd, Wq, "centerOnly")
        assert np.allclose(C_co, S_co, atol=1e-15)
        if seq_len == 1:
            assert np.allclose(S, D, atol=1e-12)

        # Top-k and re-ranking agree on full candidate lists.
        idx, sc = plain_topk(S, 4)
        assert idx.shape == (num_q, 4) and sc.shape == (num_q, 4)
        for j in range(num_q):
            assert all(sc[j][r] <= sc[j][r + 1] for r in range(3))
            assert all(S[idx[j][r], j] == sc[j][r] for r in range(4))
        cands = np.array([rng.permutation(num_db) for _ in range(num_q)])
        rr_idx, rr_sc = plain_rerank(db, q, Wd, Wq, cands)
        full_idx, full_sc = plain_topk(S, num_db)
        assert np.allclose(rr_sc, full_sc, atol=1e-15)
        for j in range(num_q):
            assert sorted(rr_idx[j].tolist()) == list(range(num_db))
            assert all(S[rr_idx[j][r], j] == rr_sc[j][r] for r in range(num_db))

    # Stable tie-breaking: equal scores keep ascending db order (topk) and
    # candidate order (rerank).
    S_tie = np.array([[1.0], [0.5], [0.5], [0.2], [0.5]])
    idx, _ = plain_topk(S_tie, 5)
    assert idx[0].tolist() == [3, 1, 2, 4, 0]
    feats = _normed(rng, 3, dim)
    feats_db = np.stack([feats[0], feats[0], feats[1]])  # db 0 and 1 tie
    wins = np.arange(3).reshape(-1, 1)
    rr_idx, rr_sc = plain_rerank(feats_db, feats[:1], wins, wins[:1],
                                 np.array([[2, 1, 0]]))
    assert rr_idx[0].tolist() == [1, 0, 2] and rr_sc[0][0] == rr_sc[0][1]


def _selfcheck_recall_positives() -> None:
    db_pos = np.arange(10, dtype=np.float64).reshape(-1, 1)
    q_pos = np.array([[0.0], [4.5], [100.0]])
    pos = plain_positives(db_pos, q_pos, 1.0)
    assert pos[0].tolist() == [0, 1]
    assert pos[1].tolist() == [4, 5]
    assert pos[2].tolist() == []
    pos2 = plain_positives(np.array([[0.0, 0.0], [3.0, 4.0]]),
                           np.array([[0.0, 0.0]]), 5.0)
    assert pos2[0].tolist() == [0, 1]  # 5.0 <= 5.0 inclusive

    preds = np.array([[5, 0, 1], [9, 8, 4], [0, 1, 2]])
    rec = plain_recall_at_n(preds, pos, [1, 2, 3])
    # Query 2 has no positive -> denominator 2.
    assert rec == {1: 0.0, 2: 0.5, 3: 1.0}, rec


def _selfcheck_mining() -> None:
    dist = np.array([0.9, 0.1, 0.3, 0.2, 0.15, 0.5, 0.25, 0.8, 0.2, 0.05])
    res = plain_mine_query(dist, [2, 3], sampled_negs=[7, 5, 5, 9, 8, 0],
                           neg_cache=[6], margin=0.01, n_neg=2,
                           n_neg_candidates=4)
    assert res is not None
    pos_index, negs, cache = res
    assert pos_index == 3  # d=0.2 < 0.3
    # unique {0,5,6,7,8,9}; by distance 9(.05), 8(.2), 6(.25), 5(.5) ...
    # threshold 0.2 + 0.1 = 0.3 -> 9, 8, 6 -> first 2.
    assert negs.tolist() == [9, 8] and cache.tolist() == [9, 8]
    # Ties on the positive: first in the given order.
    res = plain_mine_query(dist, [8, 3], [9], [], 0.01)
    assert res is not None and res[0] == 8
    # No violating negative -> skipped.
    assert plain_mine_query(dist, [9], [0, 7], [], 0.01) is None
    # No non-trivial positive -> skipped.
    assert plain_mine_query(dist, [], [0, 7], [], 0.01) is None
    # n_neg_candidates cuts before the margin test.
    res = plain_mine_query(dist, [2], [9, 8, 4], [], 0.01, n_neg=10,
                           n_neg_candidates=1)
    assert res is not None and res[1].tolist() == [9]


def _selfcheck_loss() -> None:
    rng = np.random.default_rng(2)
    for seq_len in (1, 2, 5):
        for method in METHODS:
            def t(n: int) -> torch.Tensor:
                return torch.tensor(_normed(rng, n, 6), dtype=torch.float64)
            q = [t(seq_len).requires_grad_(True) for _ in range(3)]
            p = [t(seq_len) for _ in range(3)]
            n = [[t(seq_len) for _ in range(k)] for k in (1, 3, 2)]
            margin = 0.1
            loss = plain_triplet_loss(q, p, n, method, margin)
            # Compare with numpy sequence distances.
            terms = []
            for qi, pi, ni in zip(q, p, n):
                d_qp = plain_seq_distance(qi.detach().numpy(), pi.numpy(), method)
                for nn in ni:
                    d_qn = plain_seq_distance(qi.detach().numpy(), nn.numpy(),
                                              method)
                    terms.append(max(0.0, d_qp - d_qn + math.sqrt(margin)))
            assert len(terms) == 6
            assert abs(loss.item() - sum(terms) / len(terms)) < 1e-10
            loss.backward()
            assert all(x.grad is not None for x in q)


if __name__ == "__main__":
    _selfcheck_windows()
    _selfcheck_distances()
    _selfcheck_score_matrix()
    _selfcheck_recall_positives()
    _selfcheck_mining()
    _selfcheck_loss()
    print("plain.py self-checks passed")
