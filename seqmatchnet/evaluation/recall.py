"""Retrieval metrics: Recall@N, recall at localisation radii, top-1 outcomes and the
precision-recall of the top-1 match. Pure NumPy on predictions and positions; nothing here knows
models, datasets or figures.
"""
from __future__ import annotations

import numpy as np

N_VALUES = (1, 5, 10, 20, 100)
RADII = (1, 5, 10, 20, 40, 100, 200)
_NO_HIT = np.iinfo(np.int64).max


def nearest_db_distance(db_positions: np.ndarray, q_positions: np.ndarray) -> np.ndarray:
    """``[Nq]``: each query's distance to its nearest database frame (one tree over the
    database)."""
    from sklearn.neighbors import NearestNeighbors

    nearest, _ = NearestNeighbors(n_neighbors=1).fit(db_positions).kneighbors(q_positions)
    return nearest[:, 0]


def has_positive(db_positions: np.ndarray, q_positions: np.ndarray, radius: float,
                 nearest: np.ndarray | None = None) -> np.ndarray:
    """``[Nq]`` bool: the query has a database frame within ``radius`` (<=); ``nearest``
    (``nearest_db_distance``) spares building the tree again."""
    if nearest is None:
        nearest = nearest_db_distance(db_positions, q_positions)
    return nearest <= radius


def recall_table(preds: np.ndarray, db_positions: np.ndarray, q_positions: np.ndarray,
                 radius: float,
                 n_values=N_VALUES, nearest: np.ndarray | None = None) -> tuple[dict, int]:
    """Recall@N with positives within ``radius`` (<=); queries without any positive are left out.

    ``preds`` ``[Nq, k]`` indexes ``db_positions``. Only what was retrieved counts: for ``N > k`` a
    query is a hit only when one of its ``k`` predictions is (the reference's ``pred[:N]``). Returns
    ``({N: recall}, queries with a positive)``.
    """
    has_pos = has_positive(db_positions, q_positions, radius, nearest)
    hit = np.linalg.norm(q_positions[:, None, :] - db_positions[preds], axis=-1) <= radius
    first_hit = np.where(hit.any(axis=1), hit.argmax(axis=1), _NO_HIT)[has_pos]
    n = int(has_pos.sum())
    return {int(k): (float(np.mean(first_hit < k)) if n else float("nan")) for k in n_values}, n


def radius_table(preds: np.ndarray, db_positions: np.ndarray, q_positions: np.ndarray, radii=RADII,
                 n_values=N_VALUES,
                 nearest: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Recall@N at each localisation radius: ``([len(radii), len(n_values)], queries with a positive
    [len(radii)])``; each row has its own denominator (queries with a positive within that
    radius)."""
    if nearest is None:
        nearest = nearest_db_distance(db_positions, q_positions)
    rows = [recall_table(preds, db_positions, q_positions, r, n_values, nearest) for r in radii]
    return np.array([list(t.values()) for t, _ in rows]), np.array([n for _, n in rows])


def top1_outcomes(top1: np.ndarray, db_positions: np.ndarray, q_positions: np.ndarray,
                  radius: float) -> tuple[np.ndarray, np.ndarray]:
    """``(top1_correct [Nq], has_positive [Nq])`` for ``precision_recall``.

    ``top1`` ``[Nq]`` indexes ``db_positions`` ``[Nd, k]``; ``q_positions`` is ``[Nq, k]``; a match
    is correct within ``radius`` (<=, as ``recall_table``).
    """
    q_positions = np.asarray(q_positions, dtype=float)
    db_positions = np.asarray(db_positions, dtype=float)
    has_pos = has_positive(db_positions, q_positions, radius)
    correct = np.linalg.norm(q_positions - db_positions[np.asarray(top1)], axis=1) <= radius
    return correct & has_pos, has_pos


def precision_recall(top1_dists: np.ndarray, top1_correct: np.ndarray,
                     has_positive: np.ndarray) -> dict:
    """Precision-recall of the top-1 match over the distance threshold.

    All inputs ``[Nq]``. A query is accepted when its top-1 distance is <= the threshold (non-finite
    distances are never accepted); precision = correct accepted / accepted, recall = correct
    accepted / queries with a positive. A top-1 of a query without a positive is never correct.
    Thresholds are the distinct finite distances, ascending. ``auc`` is the trapezoid area over
    recall from recall 0, where the curve starts at the precision of the smallest threshold;
    ``recall_at_100_precision`` is the largest recall whose precision is exactly 1 (0 when none).
    Both are NaN when no query has a positive.
    """
    d = np.asarray(top1_dists, dtype=float).ravel()
    has_pos = np.asarray(has_positive, dtype=bool).ravel()
    correct = np.asarray(top1_correct, dtype=bool).ravel() & has_pos
    if not (len(d) == len(has_pos) == len(correct)):
        raise ValueError(f"top1_dists, top1_correct and has_positive differ in length: "
                         f"{len(d)}, {len(correct)}, {len(has_pos)}")
    n_pos = int(has_pos.sum())
    ok = np.isfinite(d)
    order = np.argsort(d[ok], kind="stable")
    d_sorted, c_sorted = d[ok][order], correct[ok][order]
    if len(d_sorted) == 0 or n_pos == 0:
        nan = float("nan")
        return {"precision": [], "recall": [], "thresholds": [], "auc": nan if n_pos == 0 else 0.0,
                "recall_at_100_precision": nan if n_pos == 0 else 0.0}
    last = np.r_[d_sorted[1:] != d_sorted[:-1], True]     # ties are accepted together
    tp = np.cumsum(c_sorted)[last]
    accepted = np.arange(1, len(d_sorted) + 1)[last]
    precision = tp / accepted
    recall = tp / n_pos
    r = np.r_[0.0, recall]
    p = np.r_[precision[0], precision]
    auc = float(np.sum(np.diff(r) * (p[1:] + p[:-1]) / 2))
    perfect = recall[precision == 1.0]
    return {"precision": precision.tolist(), "recall": recall.tolist(),
            "thresholds": d_sorted[last].tolist(),
            "auc": auc, "recall_at_100_precision": float(perfect.max()) if len(perfect) else 0.0}
