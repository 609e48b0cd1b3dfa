"""Retrieval metrics against plain loops: Recall@N counts only what was retrieved, radius rows
have their own denominators."""
from __future__ import annotations

import numpy as np
import pytest

import plain
from seqmatchnet.evaluation.recall import RADII, radius_table, recall_table


@pytest.mark.parametrize("width", [1, 5, 20, 100])
def test_recall_counts_only_retrieved_candidates(width):
    """preds narrower than the largest N: a query whose k predictions hold no positive is a miss
    at every N, also N > k (it used to be counted as a hit at N = 100 with 20 predictions)."""
    rng = np.random.default_rng(width)
    db_pos = np.stack([np.arange(300) * 2.0, np.zeros(300)], 1)
    q_pos = db_pos[rng.integers(0, 300, 80)] + rng.normal(0, 3, (80, 2))
    preds = np.stack([rng.permutation(300)[:width] for _ in range(80)])
    got, n = recall_table(preds, db_pos, q_pos, 5.0)
    want = plain.plain_recall_at_n(preds, plain.plain_positives(db_pos, q_pos, 5.0))
    assert got == pytest.approx(want)
    assert n == sum(len(p) > 0 for p in plain.plain_positives(db_pos, q_pos, 5.0))
    if width < 100:
        assert got[100] == got[max(k for k in got if k <= width)]     # nothing beyond the retrieved counts


def test_hvpr_style_twenty_candidates_never_reach_recall_one():
    db_pos = np.stack([np.arange(50) * 10.0, np.zeros(50)], 1)
    q_pos = db_pos.copy()
    preds = np.tile((np.arange(20) + 25) % 50, (50, 1))          # never the query's own place for most
    got, _ = recall_table(preds, db_pos, q_pos, 1.0)
    assert got[100] == got[20] == pytest.approx(20 / 50)


def test_radius_table_rows_have_their_own_denominators():
    rng = np.random.default_rng(1)
    db_pos = np.stack([np.arange(100) * 4.0, np.zeros(100)], 1)
    q_pos = db_pos[rng.integers(0, 100, 60)] + np.stack([rng.uniform(-3, 3, 60), rng.uniform(0, 30, 60)], 1)
    preds = np.argsort(np.linalg.norm(q_pos[:, None] - db_pos[None], axis=-1), axis=1)[:, :100]
    table, counts = radius_table(preds, db_pos, q_pos)
    for i, r in enumerate(RADII):
        positives = plain.plain_positives(db_pos, q_pos, r)
        assert counts[i] == sum(len(p) > 0 for p in positives)
        np.testing.assert_allclose(table[i], list(plain.plain_recall_at_n(preds, positives).values()))
    assert counts[0] < counts[-1]                                # small radii leave queries out
    assert counts[0] == 0 and np.isnan(table[0]).all()           # no positive within 1 m: no recall at all


def test_one_nearest_distance_serves_every_radius():
    """``nearest_db_distance`` equals a plain loop's minimum; passing it gives the same tables as
    building the tree per call."""
    from seqmatchnet.evaluation.recall import nearest_db_distance

    rng = np.random.default_rng(2)
    db_pos = rng.uniform(0, 200, (150, 2))
    q_pos = rng.uniform(0, 200, (40, 2))
    nearest = nearest_db_distance(db_pos, q_pos)
    want = [min(float(np.hypot(*(q - d))) for d in db_pos) for q in q_pos]
    np.testing.assert_allclose(nearest, want, rtol=1e-12)
    preds = np.stack([rng.permutation(150)[:20] for _ in range(40)])
    assert recall_table(preds, db_pos, q_pos, 10.0, nearest=nearest) == recall_table(preds, db_pos, q_pos, 10.0)
    for a, b in zip(radius_table(preds, db_pos, q_pos, nearest=nearest), radius_table(preds, db_pos, q_pos)):
        np.testing.assert_array_equal(a, b)
