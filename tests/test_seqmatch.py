"""Vectorised sequence matching against plain loops written from the definitions in docs/how-it-works.md.

Rankings are compared index for index: exactly equal scores (several frames share one shifted
window near the ends of a traversal, or repeated descriptors) are ordered by ascending database
index, whatever the chunk sizes, the candidate order or the order in which ``torch.topk`` and faiss
return equal values. The plain oracle's own checks are the ``test_plain_*`` functions at the end.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import plain
from conftest import unit_rows
from seqmatchnet.data.windows import segment_bounds, sequence_windows
from seqmatchnet.evaluation.recall import recall_table
from seqmatchnet.matching.seqmatch import (
    candidate_distances,
    diagonal_sums,
    frame_distances,
    sequence_distance,
    window_distances,
)
from seqmatchnet.matching.topk import topk_by_value_then_index
from seqmatchnet.search.chunked import chunked_topk
from seqmatchnet.search.diagonal import faiss_search, rerank
from seqmatchnet.search.sides import Windows

LENGTHS = [1, 2, 3, 4, 5, 6]


def msls_like_bounds(sizes: list[int]) -> np.ndarray:
    """Per-frame [lo, hi) of consecutive capture sequences of the given sizes."""
    out, lo = [], 0
    for s in sizes:
        out += [[lo, lo + s]] * s
        lo += s
    return np.array(out)


def onehot_rows(rng: np.random.Generator, n: int, dim: int) -> np.ndarray:
    """Rows that are each one of ``dim`` unit vectors: every frame distance is exactly 0 or sqrt(2)
    in any precision and summation order, so equal scores are equal exactly everywhere."""
    return np.eye(dim, dtype=np.float32)[rng.integers(0, dim, n)]


def tied_features(rng: np.random.Generator, n_db: int, n_q: int, dim: int, data: str):
    """``random``: unit rows, whose only exactly equal scores are those of frames sharing a shifted
    window; ``onehot``: repeated descriptors, so that most scores are tied."""
    if data == "onehot":
        return onehot_rows(rng, n_db, min(dim, 4)), onehot_rows(rng, n_q, min(dim, 4))
    return unit_rows(rng, n_db, dim), unit_rows(rng, n_q, dim)


def tied_pairs(dists: np.ndarray) -> int:
    """How many neighbouring ranks hold exactly equal scores."""
    return int((np.diff(dists, axis=-1) == 0).sum())


def assert_ranking(idx: np.ndarray, dists: np.ndarray) -> None:
    """Ascending scores, no index twice in a row, and equal scores by ascending index."""
    assert (np.diff(dists, axis=1) >= 0).all()
    assert all(len(set(row.tolist())) == len(row) for row in idx)
    tie = np.diff(dists, axis=1) == 0
    assert (np.diff(idx, axis=1)[tie] > 0).all()


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
    d, i = chunked_topk(Windows(torch.from_numpy(db), torch.as_tensor(db_s)),
                        Windows(torch.from_numpy(q), torch.as_tensor(q_s)),
                        seq_len, 12, query_chunk=chunks[0], db_chunk=chunks[1])
    np.testing.assert_allclose(d.numpy(), want_d, atol=2e-5)
    # indices too: the shifted windows at the ends share one window, and ties go by ascending index
    np.testing.assert_array_equal(i.numpy(), want_i)


@pytest.mark.parametrize("seq_len", LENGTHS)
@pytest.mark.parametrize("data", ["random", "onehot"])
def test_rerank_candidates_equals_plain(seq_len, data):
    """Order and distances of the re-ranking equal the plain re-rank's, index for index."""
    rng = np.random.default_rng(20 + seq_len)
    db_b, q_b = msls_like_bounds([15, 13, 12]), segment_bounds(25)
    db, q = tied_features(rng, 40, 25, 8, data)
    db_s, _ = sequence_windows(db_b, seq_len)
    q_s, _ = sequence_windows(q_b, seq_len)
    cand = np.stack([rng.permutation(40)[:20] for _ in range(25)])
    db_w, q_w = plain.plain_windows(db_b, seq_len), plain.plain_windows(q_b, seq_len)
    want_i, want_d = plain.plain_rerank(db, q, db_w, q_w, cand)
    for order in (cand, cand[:, ::-1]):       # the candidates' order does not matter
        got_i, got_d = rerank(Windows(torch.from_numpy(db), db_s), Windows(torch.from_numpy(q), q_s),
                              np.ascontiguousarray(order), seq_len)
        np.testing.assert_array_equal(got_i, want_i)
        np.testing.assert_allclose(got_d, want_d, atol=2e-5)
    if data == "onehot":
        assert tied_pairs(want_d) > 0


@pytest.mark.parametrize("method", ["meanOfPairs", "centerOnly"])
@pytest.mark.parametrize("query_group", [1, 3, 8, 64])
def test_candidate_distances_equal_plain_loop(method, query_group):
    """Grouped queries, candidates shared between queries, repeated within a row, windows sharing
    frames: each distance is the plain definition's, whatever the group size."""
    rng = np.random.default_rng(11 + query_group)
    seq_len = 5
    db, q = unit_rows(rng, 50, 6), unit_rows(rng, 23, 6)
    db_s, _ = sequence_windows(msls_like_bounds([20, 17, 13]), seq_len)
    q_s, _ = sequence_windows(segment_bounds(23), seq_len)
    cand = rng.integers(0, len(db_s), (len(q_s), 12))
    cand[:, 5] = cand[:, 0]                                    # a repeat within each row
    cand[1:, 6] = cand[:-1, 1]                                 # and candidates shared with the previous query
    got = candidate_distances(torch.from_numpy(db), torch.from_numpy(q), torch.as_tensor(db_s), torch.as_tensor(q_s),
                              torch.as_tensor(cand), seq_len, method, query_group=query_group).numpy()
    offsets = np.arange(seq_len)
    want = np.array([[plain.plain_seq_distance(db[db_s[c] + offsets], q[q_s[i] + offsets], method) for c in row]
                     for i, row in enumerate(cand)])
    np.testing.assert_allclose(got, want, atol=2e-6)


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
@pytest.mark.parametrize("grid", [False, True])
def test_recall_table_matches_plain(dims, grid):
    """On a grid of integer positions many distances equal the radius exactly: positives are within
    it inclusively (<=)."""
    rng = np.random.default_rng(5)
    if grid:
        db_pos = rng.integers(0, 12, (60, dims)).astype(float)
        q_pos = np.concatenate([rng.integers(0, 12, (30, dims)), rng.integers(500, 600, (5, dims))]).astype(float)
    else:
        db_pos = rng.uniform(0, 50, (60, dims))
        q_pos = np.concatenate([rng.uniform(0, 50, (30, dims)), rng.uniform(500, 600, (5, dims))])  # 5 without pos.
    preds = np.stack([rng.permutation(60)[:20] for _ in range(35)])
    for radius in (1.0, 3.0, 5.0, 10.0):
        got, n = recall_table(preds, db_pos, q_pos, radius, (1, 5, 10, 20))
        positives = plain.plain_positives(db_pos, q_pos, radius)
        want = plain.plain_recall_at_n(preds, positives, (1, 5, 10, 20))
        assert n == sum(len(p) > 0 for p in positives)
        for k in (1, 5, 10, 20):
            assert got[k] == pytest.approx(want[k])
        assert plain.plain_recall_from_first_hits(plain.plain_first_hits(preds, db_pos, q_pos, radius),
                                                  (1, 5, 10, 20)) == pytest.approx(want)
        if grid:   # some distances equal the radius exactly, and they count
            d = np.linalg.norm(q_pos[:, None] - db_pos[preds], axis=-1)
            assert (d == radius).any()


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


# ---------------------------------------------------------------- exact ties

def test_topk_by_value_then_index_is_lexicographic():
    """Against a lexicographic sort on rows full of ties, with and without explicit ids, for every k."""
    rng = np.random.default_rng(40)
    for trial in range(400):
        n, m = int(rng.integers(1, 5)), int(rng.integers(1, 25))
        values = rng.integers(0, int(rng.integers(1, 5)), (n, m)).astype(np.float32)
        ids = np.stack([rng.permutation(3 * m)[:m] for _ in range(n)]) if trial % 2 else None
        k = int(rng.integers(0, m + 2))
        got_v, got_p = topk_by_value_then_index(torch.from_numpy(values), k,
                                                None if ids is None else torch.from_numpy(ids))
        key = np.tile(np.arange(m), (n, 1)) if ids is None else ids
        want = np.stack([np.lexsort((key[r], values[r]))[:min(k, m)] for r in range(n)])
        np.testing.assert_array_equal(got_p.numpy(), want)
        np.testing.assert_array_equal(got_v.numpy(), np.take_along_axis(values, want, 1))


def test_topk_boundary_takes_the_smaller_index():
    """The tie group of the k-th value crosses the boundary: the smallest indices of it are kept."""
    values = torch.tensor([[3.0, 2.0, 1.0, 2.0, 2.0, 0.0, 2.0],
                           [2.0, 2.0, 2.0, 2.0, 2.0, 2.0, 2.0]])
    got_v, got_p = topk_by_value_then_index(values, 3)
    assert got_p.tolist() == [[5, 2, 1], [0, 1, 2]]
    assert got_v.tolist() == [[0.0, 1.0, 2.0], [2.0, 2.0, 2.0]]
    got_v, got_p = topk_by_value_then_index(values, 3, ids=torch.tensor([[9, 8, 7, 6, 5, 4, 3]] * 2))
    assert got_p.tolist() == [[5, 2, 6], [6, 5, 4]]


def adversarial_topk(mode: str):
    """A ``torch.topk`` (ascending only) that returns the right values but orders equal ones by
    descending index (``reverse``) or at random (``shuffle``), and so also keeps the wrong ones at
    the k boundary, as other devices may."""
    gen = torch.Generator().manual_seed(0)

    def topk(x, k, dim=-1, largest=True, sorted=True):
        assert not largest and x.dim() == 2 and dim in (1, -1)
        m = x.shape[1]
        perm = torch.arange(m - 1, -1, -1) if mode == "reverse" else torch.randperm(m, generator=gen)
        v, p = torch.sort(x[:, perm], dim=1, stable=True)
        return v[:, :k], perm[p[:, :k]]

    return topk


CHUNKS = [(1024, None), (7, None), (5, 6), (3, 1), (4, 13), (1, 40)]


@pytest.mark.parametrize("seq_len", [1, 2, 3, 5])
@pytest.mark.parametrize("method", ["meanOfPairs", pytest.param("centerOnly", marks=pytest.mark.slow)])
@pytest.mark.parametrize("topk", ["torch", pytest.param("reverse", marks=pytest.mark.slow),
                                  pytest.param("shuffle", marks=pytest.mark.slow)])
@pytest.mark.parametrize("data", [pytest.param("random", marks=pytest.mark.slow), "onehot"])
def test_chunked_topk_orders_ties_like_plain(seq_len, method, topk, data, monkeypatch):
    """Shifted windows at the segment ends and repeated descriptors: indices equal the plain
    oracle's exactly, for every query / database chunking, k inside and at the number of windows,
    and even when ``torch.topk`` orders equal values differently (as other devices may)."""
    if topk != "torch":
        monkeypatch.setattr(torch, "topk", adversarial_topk(topk))
    rng = np.random.default_rng(50 + seq_len)
    db_b, q_b = msls_like_bounds([12, 9, 19]), msls_like_bounds([14, 13])
    db, q = tied_features(rng, 40, 27, 10, data)
    db_s, _ = sequence_windows(db_b, seq_len)
    q_s, _ = sequence_windows(q_b, seq_len)
    S = plain.plain_score_matrix(db, q, plain.plain_windows(db_b, seq_len), plain.plain_windows(q_b, seq_len),
                                 method)
    ties = 0
    for k in (12, 40):
        want_i, want_d = plain.plain_topk(S, k)
        ties += tied_pairs(want_d)
        for query_chunk, db_chunk in CHUNKS:
            d, i = chunked_topk(Windows(torch.from_numpy(db), torch.as_tensor(db_s)),
                                Windows(torch.from_numpy(q), torch.as_tensor(q_s)), seq_len, k, method,
                                query_chunk=query_chunk, db_chunk=db_chunk)
            np.testing.assert_array_equal(i.numpy(), want_i, err_msg=f"k {k}, chunks {query_chunk} x {db_chunk}")
            np.testing.assert_allclose(d.numpy(), want_d, atol=2e-5)
            assert_ranking(i.numpy(), d.numpy())
    assert ties > 0 or (data == "random" and seq_len == 1)


@pytest.mark.parametrize("seq_len", [1, 2, 3, 5])
@pytest.mark.parametrize("query_chunk", [1024, 5])
@pytest.mark.parametrize("data", ["random", "onehot"])
def test_rank_ties_do_not_depend_on_chunks(seq_len, query_chunk, data):
    """``search.rank`` (what --mode test runs) on a contiguous traversal: the plain oracle's predictions
    for every --queryChunk / --dbChunk."""
    from seqmatchnet.search.diagonal import rank

    rng = np.random.default_rng(60 + seq_len)
    db, q = tied_features(rng, 45, 30, 12, data)
    db_s, _ = sequence_windows(segment_bounds(45), seq_len)
    q_s, _ = sequence_windows(segment_bounds(30), seq_len)
    S = plain.plain_score_matrix(db, q, plain.plain_windows(segment_bounds(45), seq_len),
                                 plain.plain_windows(segment_bounds(30), seq_len))
    want_i, _ = plain.plain_topk(S, 100)
    for db_chunk in (0, 1, 8, 45):
        idx, dists = rank(Windows(torch.from_numpy(db), db_s), Windows(torch.from_numpy(q), q_s), seq_len,
                          query_chunk=query_chunk, db_chunk=db_chunk, quiet=True)
        np.testing.assert_array_equal(idx, want_i, err_msg=f"dbChunk {db_chunk}")
        assert_ranking(idx, dists)


class ReversedTiesIndex:
    """A stand-in for ``faiss.IndexFlatL2`` that returns exact distances with equal ones by
    descending index (so the wrong ones at the k boundary), as a GPU index may."""

    def __init__(self, dim):
        self.db = np.zeros((0, dim), dtype=np.float32)

    def add(self, x):
        self.db = np.concatenate([self.db, x])

    def search(self, q, k):
        sq = ((q[:, None, :].astype(np.float64) - self.db[None]) ** 2).sum(-1).astype(np.float32)
        rev = np.arange(len(self.db))[::-1]
        order = rev[np.argsort(sq[:, rev], axis=1, kind="stable")][:, :k]
        return np.take_along_axis(sq, order, 1), order


@pytest.mark.parametrize("index", ["faiss", "reversed"])
@pytest.mark.parametrize("extra", [32, 0, 1])
def test_faiss_search_orders_ties_by_index(index, extra, monkeypatch):
    """Single-frame search on a database with repeated descriptors: ties by ascending index, also at
    the k boundary, whatever order the index returns them in."""
    import faiss

    if index == "reversed":
        monkeypatch.setattr(faiss, "IndexFlatL2", ReversedTiesIndex)
    rng = np.random.default_rng(70)
    db = onehot_rows(rng, 60, 16)              # each descriptor repeated: exact ties, in faiss too
    q = np.concatenate([unit_rows(rng, 20, 16), onehot_rows(rng, 5, 16)])
    S = np.stack([[plain.frame_distance(a, b) for b in q] for a in db])
    for k in (1, 5, 7, 20, 60):
        want_i, want_d = plain.plain_topk(S, k)
        got_i, got_d = faiss_search(torch.from_numpy(db), torch.from_numpy(q), k, extra=extra)
        np.testing.assert_array_equal(got_i, want_i, err_msg=f"k {k}")
        np.testing.assert_allclose(got_d, want_d, atol=1e-5)
        assert_ranking(got_i, got_d)
    assert tied_pairs(want_d) > 0


# ---------------------------------------------------------------- the plain oracle's own checks

def _normed(rng: np.random.Generator, n: int, d: int) -> np.ndarray:
    x = rng.standard_normal((n, d))
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_plain_windows() -> None:
    # Hand-worked examples, segment [0, 10).
    assert plain.plain_window(0, 0, 10, 5) == [0, 1, 2, 3, 4]
    assert plain.plain_window(1, 0, 10, 5) == [0, 1, 2, 3, 4]
    assert plain.plain_window(2, 0, 10, 5) == [0, 1, 2, 3, 4]
    assert plain.plain_window(3, 0, 10, 5) == [1, 2, 3, 4, 5]
    assert plain.plain_window(7, 0, 10, 5) == [5, 6, 7, 8, 9]
    assert plain.plain_window(8, 0, 10, 5) == [5, 6, 7, 8, 9]
    assert plain.plain_window(9, 0, 10, 5) == [5, 6, 7, 8, 9]
    assert plain.plain_window(0, 0, 10, 4) == [0, 1, 2, 3]
    assert plain.plain_window(2, 0, 10, 4) == [0, 1, 2, 3]
    assert plain.plain_window(8, 0, 10, 4) == [6, 7, 8, 9]
    assert plain.plain_window(9, 0, 10, 4) == [6, 7, 8, 9]
    # L = 1 and L = 2.
    for i in range(10):
        assert plain.plain_window(i, 0, 10, 1) == [i]
    assert plain.plain_window(0, 0, 10, 2) == [0, 1]
    assert plain.plain_window(5, 0, 10, 2) == [4, 5]
    assert plain.plain_window(9, 0, 10, 2) == [8, 9]
    # Non-zero lo (MSLS-like).
    assert plain.plain_window(3, 3, 8, 3) == [3, 4, 5]
    assert plain.plain_window(7, 3, 8, 3) == [5, 6, 7]
    # Segment exactly L long: every frame gets the whole segment.
    for i in range(3, 8):
        assert plain.plain_window(i, 3, 8, 5) == [3, 4, 5, 6, 7]

    # Multi-segment bounds: windows have L frames, contiguous, inside bounds.
    bounds = np.array([[0, 6]] * 6 + [[6, 13]] * 7 + [[13, 18]] * 5)
    for seq_len in range(1, 6):
        W = plain.plain_windows(bounds, seq_len)
        V = plain.plain_valid(bounds, seq_len)
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
    assert plain.plain_valid(bounds, 1).all()

    db_b, q_b = plain.default_bounds(4, 3)
    assert db_b.tolist() == [[0, 4]] * 4 and q_b.tolist() == [[0, 3]] * 3


def test_plain_distances() -> None:
    rng = np.random.default_rng(0)
    a, b = _normed(rng, 2, 8)
    assert abs(plain.frame_distance(a, b) - np.linalg.norm(a - b)) < 1e-12
    # a.a rounds to 1 +- eps: the clamp keeps it finite (never NaN).
    assert 0.0 <= plain.frame_distance(a, a) < 1e-7
    # An un-normalised vector making a.b > 1 gives exactly 0, not NaN.
    assert plain.frame_distance(a * (1 + 1e-9), a) == 0.0

    for seq_len in (1, 2, 3, 5):
        A = _normed(rng, seq_len, 8)
        B = _normed(rng, seq_len, 8)
        mop = plain.plain_seq_distance(A, B, "meanOfPairs")
        co = plain.plain_seq_distance(A, B, "centerOnly")
        assert abs(mop - np.linalg.norm(A - B, axis=1).mean()) < 1e-12
        assert abs(co - np.linalg.norm(A[seq_len // 2] - B[seq_len // 2])) < 1e-12
        assert abs(mop - plain.plain_seq_distance(B, A, "meanOfPairs")) < 1e-15
        assert 0.0 <= plain.plain_seq_distance(A, A, "meanOfPairs") < 1e-7


def test_plain_score_matrix() -> None:
    rng = np.random.default_rng(1)
    num_db, num_q, dim = 9, 7, 6
    db = _normed(rng, num_db, dim)
    q = _normed(rng, num_q, dim)
    D = np.linalg.norm(db[:, None, :] - q[None, :, :], axis=2)
    for seq_len in (1, 2, 3, 4, 5):
        db_b, q_b = plain.default_bounds(num_db, num_q)
        Wd = plain.plain_windows(db_b, seq_len)
        Wq = plain.plain_windows(q_b, seq_len)
        S = plain.plain_score_matrix(db, q, Wd, Wq)
        assert S.shape == (num_db, num_q)
        # Diagonal sums over the frame-distance matrix (the 2-D convolution view).
        for i in range(num_db):
            for j in range(num_q):
                diag = sum(D[Wd[i][0] + k, Wq[j][0] + k]
                           for k in range(seq_len)) / seq_len
                assert abs(S[i, j] - diag) < 1e-12
        # Symmetry: same features on both sides -> symmetric, zero diagonal.
        Wd2 = plain.plain_windows(plain.default_bounds(num_db, num_db)[0], seq_len)
        S_self = plain.plain_score_matrix(db, db, Wd2, Wd2)
        assert np.allclose(S_self, S_self.T, atol=1e-15)
        assert np.allclose(np.diag(S_self), 0.0, atol=1e-7)
        # Cache matrix.
        C_mop = plain.plain_cache_matrix(db, q, Wd, Wq, "meanOfPairs")
        assert np.array_equal(C_mop, S)
        C_co = plain.plain_cache_matrix(db, q, Wd, Wq, "centerOnly")
        S_co = plain.plain_score_matrix(db, q, Wd, Wq, "centerOnly")
        assert np.allclose(C_co, S_co, atol=1e-15)
        if seq_len == 1:
            assert np.allclose(S, D, atol=1e-12)

        # Top-k and re-ranking agree on full candidate lists.
        idx, sc = plain.plain_topk(S, 4)
        assert idx.shape == (num_q, 4) and sc.shape == (num_q, 4)
        for j in range(num_q):
            assert all(sc[j][r] <= sc[j][r + 1] for r in range(3))
            assert all(S[idx[j][r], j] == sc[j][r] for r in range(4))
        cands = np.array([rng.permutation(num_db) for _ in range(num_q)])
        rr_idx, rr_sc = plain.plain_rerank(db, q, Wd, Wq, cands)
        full_idx, full_sc = plain.plain_topk(S, num_db)
        assert np.allclose(rr_sc, full_sc, atol=1e-15)
        assert np.array_equal(rr_idx, full_idx)   # ties by db index in both
        for j in range(num_q):
            assert sorted(rr_idx[j].tolist()) == list(range(num_db))
            assert all(S[rr_idx[j][r], j] == rr_sc[j][r] for r in range(num_db))

    # Tie-breaking: equal scores in ascending db order, for topk and rerank
    # alike (whatever the candidate order).
    S_tie = np.array([[1.0], [0.5], [0.5], [0.2], [0.5]])
    idx, _ = plain.plain_topk(S_tie, 5)
    assert idx[0].tolist() == [3, 1, 2, 4, 0]
    feats = _normed(rng, 3, dim)
    feats_db = np.stack([feats[0], feats[0], feats[1]])  # db 0 and 1 tie
    wins = np.arange(3).reshape(-1, 1)
    rr_idx, rr_sc = plain.plain_rerank(feats_db, feats[:1], wins, wins[:1],
                                 np.array([[2, 1, 0]]))
    assert rr_idx[0].tolist() == [0, 1, 2] and rr_sc[0][0] == rr_sc[0][1]


def test_plain_recall_positives() -> None:
    db_pos = np.arange(10, dtype=np.float64).reshape(-1, 1)
    q_pos = np.array([[0.0], [4.5], [100.0]])
    pos = plain.plain_positives(db_pos, q_pos, 1.0)
    assert pos[0].tolist() == [0, 1]
    assert pos[1].tolist() == [4, 5]
    assert pos[2].tolist() == []
    pos2 = plain.plain_positives(np.array([[0.0, 0.0], [3.0, 4.0]]),
                           np.array([[0.0, 0.0]]), 5.0)
    assert pos2[0].tolist() == [0, 1]  # 5.0 <= 5.0 inclusive

    preds = np.array([[5, 0, 1], [9, 8, 4], [0, 1, 2]])
    rec = plain.plain_recall_at_n(preds, pos, [1, 2, 3])
    # Query 2 has no positive -> denominator 2.
    assert rec == {1: 0.0, 2: 0.5, 3: 1.0}, rec


def test_plain_mining() -> None:
    dist = np.array([0.9, 0.1, 0.3, 0.2, 0.15, 0.5, 0.25, 0.8, 0.2, 0.05])
    res = plain.plain_mine_query(dist, [2, 3], sampled_negs=[7, 5, 5, 9, 8, 0],
                           neg_cache=[6], margin=0.01, n_neg=2,
                           n_neg_candidates=4)
    assert res is not None
    pos_index, negs, cache = res
    assert pos_index == 3  # d=0.2 < 0.3
    # unique {0,5,6,7,8,9}; by distance 9(.05), 8(.2), 6(.25), 5(.5) ...
    # threshold 0.2 + 0.1 = 0.3 -> 9, 8, 6 -> first 2.
    assert negs.tolist() == [9, 8] and cache.tolist() == [9, 8]
    # Ties on the positive: first in the given order.
    res = plain.plain_mine_query(dist, [8, 3], [9], [], 0.01)
    assert res is not None and res[0] == 8
    # No violating negative -> skipped.
    assert plain.plain_mine_query(dist, [9], [0, 7], [], 0.01) is None
    # No non-trivial positive -> skipped.
    assert plain.plain_mine_query(dist, [], [0, 7], [], 0.01) is None
    # n_neg_candidates cuts before the margin test.
    res = plain.plain_mine_query(dist, [2], [9, 8, 4], [], 0.01, n_neg=10,
                           n_neg_candidates=1)
    assert res is not None and res[1].tolist() == [9]


def test_plain_loss() -> None:
    rng = np.random.default_rng(2)
    for seq_len in (1, 2, 5):
        for method in plain.METHODS:
            def t(n: int) -> torch.Tensor:
                return torch.tensor(_normed(rng, n, 6), dtype=torch.float64)
            q = [t(seq_len).requires_grad_(True) for _ in range(3)]
            p = [t(seq_len) for _ in range(3)]
            n = [[t(seq_len) for _ in range(k)] for k in (1, 3, 2)]
            margin = 0.1
            loss = plain.plain_triplet_loss(q, p, n, method, margin)
            # Compare with numpy sequence distances.
            terms = []
            for qi, pi, ni in zip(q, p, n):
                d_qp = plain.plain_seq_distance(qi.detach().numpy(), pi.numpy(), method)
                for nn in ni:
                    d_qn = plain.plain_seq_distance(qi.detach().numpy(), nn.numpy(),
                                              method)
                    terms.append(max(0.0, d_qp - d_qn + math.sqrt(margin)))
            assert len(terms) == 6
            assert abs(loss.item() - sum(terms) / len(terms)) < 1e-10
            loss.backward()
            assert all(x.grad is not None for x in q)
