"""The --shortlist index's re-search with more lists and its recall check on sampled queries
(docs/large-maps.md), against plain definitions."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import make_tiny_oxford, unit_rows

# ---------------------------------------------------------------- rows an IVF search leaves short

def ivf_flat_index(n: int = 3000, dim: int = 32):
    """An IVF-flat index of ``n`` random unit vectors (forced: the map is above ``flat_max``), about
    ``n / nlist`` vectors per list, and the vectors."""
    from seqmatchnet.search.shortlist import WindowIndex, choose_index

    x = unit_rows(np.random.default_rng(3), n, dim)
    choice = choose_index(n, dim, memory_bytes=10**9, flat_max=n // 2)
    assert choice.kind == "ivf-flat" and n / choice.nlist < 200
    index = WindowIndex(choice, dim)
    index.train(x)
    index.add(x, np.arange(n))
    return index, x


def plain_research(index, queries: np.ndarray, k: int, nprobe: int) -> np.ndarray:
    """The documented rule, one query at a time: search with ``nprobe`` lists, and while the row holds
    fewer than ``k`` ids, again with twice as many (at most every list)."""
    import faiss

    out = []
    for q in queries:
        probe = nprobe
        while True:
            faiss.ParameterSpace().set_index_parameter(index.index, "nprobe", probe)
            _, ids = index.index.search(q[None], k)
            if (ids >= 0).all() or probe >= index.choice.nlist:
                out.append(ids[0])
                break
            probe *= 2
    return np.array(out)


def test_ivf_rows_left_short_are_searched_again_with_more_lists():
    """K = 200 is more than one list holds (about 55 vectors): with nprobe 1 every first search comes
    back short, so every row goes through the re-search; rows are full, valid, distinct, and equal to
    the rule applied query by query. With every list searched, IVF-flat is exact (plain nearest)."""
    index, x = ivf_flat_index()
    q = x[::97] + 0.01
    k = 200
    got = index.search(q, k, nprobe=1)
    assert got.shape == (len(q), k)
    assert ((got >= 0) & (got < len(x))).all()
    assert all(len(set(row)) == k for row in got.tolist())
    np.testing.assert_array_equal(got, plain_research(index, q, k, 1))

    every = index.search(q, k, nprobe=index.choice.nlist)
    plain = [set(np.argsort(((x - row) ** 2).sum(axis=1), kind="stable")[:k].tolist()) for row in q]
    assert [set(row) for row in every.tolist()] == plain
    assert all(len(set(a) & set(b)) > k // 10 for a, b in zip(got.tolist(), every.tolist()))


def test_ivf_search_with_k_above_the_windows_indexed_returns_every_window():
    """k larger than the index: every row holds every id once (k is cut to the windows indexed)."""
    index, x = ivf_flat_index(n=400, dim=8)
    got = index.search(x[:5], 1000, nprobe=1)
    assert got.shape == (5, 400)
    assert all(sorted(row) == list(range(400)) for row in got.tolist())


# ---------------------------------------------------------------- the recall check on sampled queries

@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return make_tiny_oxford(tmp_path_factory.mktemp("shortlist") / "tiny")


def evaluate_tiny(root: Path, *extra: str, model=None):
    """An evaluation of the tiny route's test split with ``extra`` options: ``(result, split)``."""
    from seqmatchnet.cli.options import parse_options
    from seqmatchnet.data.specs import get_split
    from seqmatchnet.evaluation.evaluate import EvalConfig, evaluate
    from seqmatchnet.models.sequence import get_model

    opt = parse_options(["--mode", "test", "--dataset", "oxford-v1.0", "--dataPath", str(root / "data"),
                         "--structPath", str(root / "structFiles"), "--seqL", "3", "--split", "test", "--nocuda",
                         "--quiet", *extra])
    split = get_split(opt, "test", lazy=True)
    if model is None:
        torch.manual_seed(0)
        model = get_model(opt, split.dim)
    return evaluate(EvalConfig.from_options(opt), split, model, torch.device("cpu")), split


@pytest.mark.parametrize("sample", [20, 57])
def test_shortlist_recall_is_measured_on_exactly_the_sampled_queries(tiny, monkeypatch, sample):
    """The reported recall is the fraction of the sampled queries (fewer than the queries, drawn at
    random) whose exact top-1 window is among their own K candidates: recomputed here from exact
    matching of every query (no shortlist) and each query's shortlist (its K re-ranked candidates)."""
    from seqmatchnet.data.windows import sequence_windows
    from seqmatchnet.search import shortlisted

    sampled = []                      # the query windows the recall check matches exactly
    real = shortlisted.rank_streamed

    def spy(database, queries, *a, **kw):
        sampled.append(np.asarray(queries.starts).copy())
        return real(database, queries, *a, **kw)

    monkeypatch.setattr(shortlisted, "rank_streamed", spy)
    got, split = evaluate_tiny(tiny, "--shortlist", "10", "--shortlistCheck", str(sample))
    exact, _ = evaluate_tiny(tiny)                                     # the same model (seeded), every window
    assert len(sampled) == 1 and len(sampled[0]) == sample < len(got.preds)
    assert got.shortlist["sampled_queries"] == sample
    q_starts = sequence_windows(split.q_bounds, 3)[0][got.q_frames]      # each query row's window
    # each sampled window's query row (windows shifted at the end share a start, and so their matches)
    rows = np.array([int(np.flatnonzero(q_starts == s)[0]) for s in sampled[0]])
    assert not np.array_equal(rows, np.arange(sample))                 # a random sample, not the first rows
    candidates = got.preds                                             # the K candidates, re-ranked
    assert candidates.shape[1] == 10
    top1 = exact.preds[:, 0]
    want = np.mean([top1[r] in candidates[r] for r in rows])
    assert got.shortlist["recall"] == pytest.approx(want)
    first = np.mean([top1[r] in candidates[i] for i, r in enumerate(rows)])
    assert first != pytest.approx(want)                                # the test tells the two apart
