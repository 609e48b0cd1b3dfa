"""Vectorised sequence matching against plain loops written from SPEC sections 3, 5 and 6."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import plain
from conftest import unit_rows
from datasets import segment_bounds, sequence_windows
from seqMatchNet import (candidate_distances, chunked_topk, diagonal_sums, frame_distances, sequence_distance,
                         window_distances)
from test import recall_table, rerank

LENGTHS = [1, 2, 3, 4, 5, 6]


def msls_like_bounds(sizes: list[int]) -> np.ndarray:
    """Per-frame [lo, hi) of consecutive capture sequences of the given sizes."""
    out, lo = [], 0
    for s in sizes:
        out += [[lo, lo + s]] * s
        lo += s
    return np.array(out)


@pytest.mark.parametrize("seq_len", LENGTHS)
@pytest.mark.parametrize("bounds", [segment_bounds(23), msls_like_bounds([7, 9, 6, 11])])
def test_windows_match_spec(seq_len, bounds):
    starts, valid = sequence_windows(bounds, seq_len)
    expected = plain.plain_windows(bounds, seq_len)
    np.testing.assert_array_equal(starts[:, None] + np.arange(seq_len), expected)
    np.testing.assert_array_equal(valid, plain.plain_valid(bounds, seq_len))
    # never crosses a segment bound
    assert np.all(expected[:, 0] >= bounds[:, 0]) and np.all(expected[:, -1] < bounds[:, 1])


def test_windows_shift_at_both_ends():
    starts, valid = sequence_windows(segment_bounds(10), 5)
    assert starts.tolist() == [0, 0, 0, 1, 2, 3, 4, 5, 5, 5]
    assert valid.tolist() == [False, False, True, True, True, True, True, True, False, False]


def test_frame_distances_never_nan():
    a = torch.nn.functional.normalize(torch.randn(50, 8), dim=1)
    d = frame_distances(a, a)   # a.a rounds above 1 on the diagonal
    assert torch.isfinite(d).all() and (d >= 0).all()
    assert torch.allclose(torch.diagonal(d), torch.zeros(50), atol=1e-3)


@pytest.mark.parametrize("seq_len", LENGTHS)
@pytest.mark.parametrize("method", ["meanOfPairs", "centerOnly"])
@pytest.mark.parametrize("layout", ["contiguous", "bounds"])
def test_window_distances_equal_plain_loop(seq_len, method, layout):
    rng = np.random.default_rng(seq_len)
    if layout == "contiguous":
        db_b, q_b = segment_bounds(31), segment_bounds(27)
    else:
        db_b, q_b = msls_like_bounds([8, 12, 11]), msls_like_bounds([9, 6, 12])
    db, q = unit_rows(rng, len(db_b), 12), unit_rows(rng, len(q_b), 12)
    db_s, _ = sequence_windows(db_b, seq_len)
    q_s, _ = sequence_windows(q_b, seq_len)
    got = window_distances(torch.from_numpy(db), torch.from_numpy(q), torch.as_tensor(db_s), torch.as_tensor(q_s),
                           seq_len, method).numpy()
    want = plain.plain_score_matrix(db, q, plain.plain_windows(db_b, seq_len), plain.plain_windows(q_b, seq_len),
                                    method)
    np.testing.assert_allclose(got, want, atol=2e-5)


@pytest.mark.parametrize("seq_len", [1, 2, 5])
def test_diagonal_sums_is_identity_convolution(seq_len):
    f = torch.rand(9, 7, dtype=torch.float64)
    kernel = torch.eye(seq_len, dtype=torch.float64)[None, None]
    conv = torch.nn.functional.conv2d(f[None, None], kernel)[0, 0] / seq_len
    assert torch.allclose(diagonal_sums(f, seq_len), conv)


@pytest.mark.parametrize("seq_len", LENGTHS)
@pytest.mark.parametrize("chunks", [(1024, None), (7, None), (5, 6), (3, 1)])
def test_chunked_topk_equals_plain_topk(seq_len, chunks):
    rng = np.random.default_rng(10 + seq_len)
    db_b, q_b = segment_bounds(40), segment_bounds(33)
    db, q = unit_rows(rng, 40, 10), unit_rows(rng, 33, 10)
    db_s, _ = sequence_windows(db_b, seq_len)
    q_s, _ = sequence_windows(q_b, seq_len)
    S = plain.plain_score_matrix(db, q, plain.plain_windows(db_b, seq_len), plain.plain_windows(q_b, seq_len))
    want_i, want_d = plain.plain_topk(S, 12)
    d, i = chunked_topk(torch.from_numpy(db), torch.from_numpy(q), torch.as_tensor(db_s), torch.as_tensor(q_s),
                        seq_len, 12, query_chunk=chunks[0], db_chunk=chunks[1])
    np.testing.assert_allclose(d.numpy(), want_d, atol=2e-5)
    # indices agree except among equal scores (shifted windows at the ends share one window)
    np.testing.assert_allclose(np.take_along_axis(S.T, i.numpy(), 1), want_d, atol=2e-5)


@pytest.mark.parametrize("seq_len", LENGTHS)
def test_rerank_candidates_equals_plain(seq_len):
    rng = np.random.default_rng(20 + seq_len)
    db_b, q_b = msls_like_bounds([15, 13, 12]), segment_bounds(25)
    db, q = unit_rows(rng, 40, 8), unit_rows(rng, 25, 8)
    db_s, _ = sequence_windows(db_b, seq_len)
    q_s, _ = sequence_windows(q_b, seq_len)
    cand = np.stack([rng.permutation(40)[:20] for _ in range(25)])
    got_i, got_d = rerank(torch.from_numpy(db), torch.from_numpy(q), db_s, q_s, cand, seq_len)
    want_i, want_d = plain.plain_rerank(db, q, plain.plain_windows(db_b, seq_len), plain.plain_windows(q_b, seq_len),
                                        cand)
    np.testing.assert_allclose(got_d, want_d, atol=2e-5)
    S = plain.plain_score_matrix(db, q, plain.plain_windows(db_b, seq_len), plain.plain_windows(q_b, seq_len))
    np.testing.assert_allclose(np.take_along_axis(S.T, got_i, 1), want_d, atol=2e-5)
    assert all(set(a) == set(b) for a, b in zip(got_i, cand))


@pytest.mark.parametrize("method", ["meanOfPairs", "centerOnly"])
def test_candidate_distances_match_window_distances(method):
    rng = np.random.default_rng(3)
    db, q = torch.from_numpy(unit_rows(rng, 30, 6)), torch.from_numpy(unit_rows(rng, 20, 6))
    db_s, _ = sequence_windows(segment_bounds(30), 4)
    q_s, _ = sequence_windows(segment_bounds(20), 4)
    db_s, q_s = torch.as_tensor(db_s), torch.as_tensor(q_s)
    full = window_distances(db, q, db_s, q_s, 4, method)
    cand = torch.arange(30).repeat(20, 1)
    assert torch.allclose(candidate_distances(db, q, db_s, q_s, cand, 4, method), full.T, atol=1e-5)


@pytest.mark.parametrize("method", ["meanOfPairs", "centerOnly"])
def test_sequence_distance_matches_plain(method):
    rng = np.random.default_rng(4)
    a, b = unit_rows(rng, 5, 7), unit_rows(rng, 5, 7)
    got = sequence_distance(torch.from_numpy(a), torch.from_numpy(b), method).item()
    assert got == pytest.approx(plain.plain_seq_distance(a, b, method), abs=1e-5)


@pytest.mark.parametrize("dims", [1, 2])
def test_recall_table_matches_plain(dims):
    rng = np.random.default_rng(5)
    db_pos = rng.uniform(0, 50, (60, dims))
    q_pos = np.concatenate([rng.uniform(0, 50, (30, dims)), rng.uniform(500, 600, (5, dims))])  # 5 without positives
    preds = np.stack([rng.permutation(60)[:20] for _ in range(35)])
    for radius in (1.0, 3.0, 10.0):
        got, n = recall_table(preds, db_pos, q_pos, radius, (1, 5, 10, 20))
        positives = plain.plain_positives(db_pos, q_pos, radius)
        want = plain.plain_recall_at_n(preds, positives, (1, 5, 10, 20))
        assert n == sum(len(p) > 0 for p in positives)
        for k in (1, 5, 10, 20):
            assert got[k] == pytest.approx(want[k])


@pytest.mark.parametrize("seq_len", [1, 2, 5])
@pytest.mark.parametrize("method", ["meanOfPairs", "centerOnly"])
@pytest.mark.parametrize("query_chunk", [2048, 3])
def test_window_distances_for_scattered_queries(seq_len, method, query_chunk):
    """A random mining chunk takes the per-offset route; chunking the queries changes nothing."""
    rng = np.random.default_rng(30 + seq_len)
    db, q = unit_rows(rng, 45, 9), unit_rows(rng, 60, 9)
    db_s, _ = sequence_windows(segment_bounds(45), seq_len)
    q_s, _ = sequence_windows(segment_bounds(60), seq_len)
    chosen = np.sort(rng.choice(60, 7, replace=False))
    got = window_distances(torch.from_numpy(db), torch.from_numpy(q), torch.as_tensor(db_s),
                           torch.as_tensor(q_s[chosen]), seq_len, method, query_chunk=query_chunk).numpy()
    want = plain.plain_score_matrix(db, q, plain.plain_windows(segment_bounds(45), seq_len),
                                    plain.plain_windows(segment_bounds(60), seq_len)[chosen], method)
    np.testing.assert_allclose(got, want, atol=2e-5)
