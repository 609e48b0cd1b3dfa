"""Maps larger than memory (docs/large-maps.md): descriptors read lazily in chunks, the database
streamed through the projection and the top-k, float16 features, the --shortlist index."""
from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

import plain
from conftest import make_tiny_oxford, unit_rows
from seqmatchnet.common.errors import UserError
from seqmatchnet.data.descriptors import DescriptorSource, load_descriptors, open_descriptors
from seqmatchnet.data.windows import Split, segment_bounds, sequence_windows

LENGTHS = [1, 2, 3, 5]


def oxford_args(root: Path, seq_len: int, *extra: str) -> list[str]:
    return ["--mode", "test", "--dataset", "oxford-v1.0", "--dataPath", str(root / "data"), "--structPath",
            str(root / "structFiles"), "--seqL", str(seq_len), "--split", "test", "--nocuda", "--quiet", *extra]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return make_tiny_oxford(tmp_path_factory.mktemp("large") / "tiny")


def evaluate_with(args: list[str], lazy: bool, model=None):
    from seqmatchnet.cli.options import parse_options
    from seqmatchnet.data.specs import get_split
    from seqmatchnet.evaluation.evaluate import EvalConfig, evaluate
    from seqmatchnet.models.sequence import get_model

    opt = parse_options(args)
    split = get_split(opt, "test", lazy=lazy)
    if model is None:
        torch.manual_seed(0)
        model = get_model(opt, split.dim)
    return evaluate(EvalConfig.from_options(opt), split, model, torch.device("cpu")), model, split


# ---------------------------------------------------------------- the descriptor source

def write(path: Path, x: np.ndarray) -> Path:
    if path.suffix == ".h5":
        with h5py.File(path, "w") as f:
            f.create_dataset("group/desc", data=x)
    else:
        np.save(path, x)
    return path


@pytest.mark.parametrize("kind", ["npy", "fortran", "float16", "h5"])
def test_source_reads_like_the_array(tmp_path, kind):
    """read, take, slices and integer indexing equal indexing the array, with and without a row selection."""
    x = np.random.default_rng(0).standard_normal((300, 6)).astype(np.float32)
    if kind == "float16":
        x = x.astype(np.float16)
    stored = np.asfortranarray(x) if kind == "fortran" else x
    path = write(tmp_path / ("d.h5" if kind == "h5" else "d.npy"), stored)
    want = x.astype(np.float32)
    rows = np.r_[np.arange(50, 120), [7, 3, 290]]
    for selection, ref in ((None, want), (rows, want[rows])):
        src = open_descriptors(path, selection)
        assert src.shape == ref.shape and len(src) == len(ref)
        for lo, hi in ((0, len(ref)), (5, 9), (60, 73), (len(ref) - 2, len(ref) + 10)):
            np.testing.assert_array_equal(src.read(lo, hi), ref[lo:hi])
        pick = np.array([[4, 1], [4, len(ref) - 1]])
        np.testing.assert_array_equal(src[pick], ref[pick])
        np.testing.assert_array_equal(src.take([9, 2, 9]), ref[[9, 2, 9]])
        windows = np.unique(np.random.default_rng(1).integers(0, len(ref) - 5, 40)[:, None] + np.arange(5))
        np.testing.assert_array_equal(src.take(windows), ref[windows])      # runs of consecutive rows
        np.testing.assert_array_equal(src.take(windows[::-1]), ref[windows[::-1]])
        np.testing.assert_array_equal(src[3:40:3], ref[3:40:3])
        np.testing.assert_array_equal(src.subset(np.arange(10, 20))[:], ref[10:20])
        np.testing.assert_array_equal(np.asarray(src), ref)
    np.testing.assert_array_equal(load_descriptors(path, rows), want[rows])


def test_scattered_rows_of_a_c_order_file_are_read_without_a_map(tmp_path, monkeypatch):
    """A map of the file would count the cached pages around every row read as resident memory (the
    kernel's fault-around: 16 pages a row), so C-order rows are read with plain reads."""
    from seqmatchnet.data.descriptors import DescriptorSource

    x = np.random.default_rng(2).standard_normal((500, 8)).astype(np.float32)
    src = open_descriptors(write(tmp_path / "d.npy", x), None)

    def no_map(self):
        raise AssertionError("mapped the file")

    monkeypatch.setattr(DescriptorSource, "_mapped", no_map)
    rows = np.r_[3, 10:15, 200, 499]
    np.testing.assert_array_equal(src.take(rows), x[rows])
    np.testing.assert_array_equal(src[17:40], x[17:40])


@pytest.mark.parametrize("suffix", [".npy", ".h5"])
@pytest.mark.parametrize("value", [np.nan, np.inf, 0.0])
def test_bad_row_far_into_the_file_is_found(tmp_path, suffix, value, monkeypatch):
    """A NaN/Inf or all-zero row many chunks in is reported with the file and its row (also through a
    row selection, which reports the file's row)."""
    from seqmatchnet.data import descriptors

    monkeypatch.setattr(descriptors, "CHECK_CHUNK_BYTES", 4 * 8 * 64)       # chunks of 64 rows
    x = unit_rows(np.random.default_rng(1), 5000, 8)
    bad = 4321
    x[bad] = 0.0 if value == 0 else x[bad]
    x[bad, 5] = value
    path = write(tmp_path / f"d{suffix}", x)
    for rows in (None, np.arange(1000, 5000)):
        with pytest.raises(UserError) as err:
            open_descriptors(path, rows)
        msg = str(err.value)
        assert str(path) in msg and f"row {bad}" in msg and "recompute" in msg and "\n" not in msg
    open_descriptors(path, np.arange(0, 4000))          # rows before it are fine


def test_truncated_and_mismatched_files_are_refused(tmp_path):
    x = unit_rows(np.random.default_rng(2), 100, 8)
    path = write(tmp_path / "d.npy", x)
    path.write_bytes(path.read_bytes()[:-40])
    with pytest.raises(UserError, match="truncated"):
        open_descriptors(path)
    good = write(tmp_path / "g.npy", x)
    with pytest.raises(UserError, match="has 100 rows but the split needs row 100"):
        DescriptorSource(good, np.arange(101))
    np.save(tmp_path / "s.npy", np.array(["a", "b"]))
    with pytest.raises(UserError, match="expected"):
        open_descriptors(tmp_path / "s.npy")


# ---------------------------------------------------------------- streamed evaluation

@pytest.mark.parametrize("seq_len", LENGTHS)
@pytest.mark.parametrize("pooling", [False, True])
def test_streamed_evaluation_equals_in_memory(tiny, seq_len, pooling):
    """The database read from its file in chunks (of 7, 16 and 61 frames, windows at the chunk edges
    included) gives the in-memory evaluation's predictions exactly, tie order included."""
    extra = ["--pooling", "--outDims", "8"] if pooling else []
    want, model, split = evaluate_with(oxford_args(tiny, seq_len, *extra), lazy=False)
    assert not isinstance(split.db_desc, DescriptorSource)
    for chunk in (7, 16, 61):
        got, _, lazy_split = evaluate_with(oxford_args(tiny, seq_len, *extra, "--mapChunk", str(chunk)), True, model)
        assert isinstance(lazy_split.db_desc, DescriptorSource)
        np.testing.assert_array_equal(got.preds, want.preds, err_msg=f"mapChunk {chunk}")
        np.testing.assert_allclose(got.dists, want.dists, atol=2e-6)
        assert got.recalls == want.recalls
        if chunk == 7:
            torch.testing.assert_close(got.db_feats, want.db_feats)


def onehot_split(n_db: int, n_q: int, dim: int, seed: int) -> Split:
    """Frames that are each one of 4 unit vectors: most sequence distances are exactly tied."""
    rng = np.random.default_rng(seed)
    eye = np.eye(dim, dtype=np.float32)
    db, q = eye[rng.integers(0, 4, n_db)], eye[rng.integers(0, 4, n_q)]
    pos_db = np.stack([np.arange(n_db) * 1.0, np.zeros(n_db)], 1)
    pos_q = np.stack([np.arange(n_q) * 1.0, np.zeros(n_q)], 1)
    return Split("test", db, q, pos_db, pos_q, 3.0, 9.0, segment_bounds(n_db), segment_bounds(n_q))


@pytest.mark.parametrize("seq_len", LENGTHS)
def test_rank_streamed_orders_ties_like_the_plain_oracle(seq_len):
    """``rank_streamed`` over chunks of every size gives the plain loop's top-k (equal distances by
    ascending database window), on data where most distances are tied."""
    from seqmatchnet.search.diagonal import rank_streamed
    from seqmatchnet.search.sides import Windows

    split = onehot_split(60, 25, 8, seq_len)
    db_s = sequence_windows(split.db_bounds, seq_len)[0]
    q_s = sequence_windows(split.q_bounds, seq_len)[0]
    S = plain.plain_score_matrix(split.db_desc, split.q_desc, plain.plain_windows(split.db_bounds, seq_len),
                                 plain.plain_windows(split.q_bounds, seq_len))
    want_i, want_d = plain.plain_topk(S, 30)
    db = torch.from_numpy(split.db_desc)
    for chunk in (1, 4, 13, 60):
        chunks = ((lo, min(lo + chunk, 60), db[lo:min(lo + chunk + seq_len - 1, 60)]) for lo in range(0, 60, chunk))
        idx, dists = rank_streamed(Windows(chunks, db_s), Windows(torch.from_numpy(split.q_desc), q_s), seq_len, 30,
                                   query_chunk=7)
        np.testing.assert_array_equal(idx, want_i, err_msg=f"chunk {chunk}")
        np.testing.assert_allclose(dists, want_d, atol=1e-6)


@pytest.mark.slow
def test_float16_features_change_recall_little(tmp_path):
    """--featDtype float16 on the synthetic benchmark: Recall@N within 0.005 of float32."""
    from seqmatchnet.cli.options import parse_options
    from seqmatchnet.cli.test import evaluate_options

    base = ["--mode", "test", "--dataset", "synthetic", "--split", "test", "--seqL", "5", "--nocuda", "--quiet",
            "--dataPath", str(tmp_path / "data"), "--structPath", str(tmp_path / "structFiles")]
    _, full = evaluate_options(parse_options(base))
    _, half = evaluate_options(parse_options(base + ["--featDtype", "float16", "--mapChunk", "1000"]))
    assert half.db_feats.dtype == torch.float16
    for n, r in full.recalls.items():
        assert abs(half.recalls[n] - r) <= 0.005, (n, r, half.recalls[n])


# ---------------------------------------------------------------- the shortlist

@pytest.mark.parametrize("seq_len", LENGTHS)
def test_shortlist_covering_the_map_equals_exact(seq_len):
    """--shortlist K with K >= every database window re-ranks all of them: exact matching's predictions,
    tie order included (one-hot frames: most distances exactly tied)."""
    from seqmatchnet.cli.options import parse_options
    from seqmatchnet.evaluation.evaluate import EvalConfig, evaluate
    from seqmatchnet.models.sequence import get_model

    split = onehot_split(90, 40, 8, 10 + seq_len)
    base = ["--mode", "test", "--seqL", str(seq_len), "--nocuda", "--quiet"]
    model = get_model(parse_options(base), 8)
    want = evaluate(EvalConfig.from_options(parse_options(base)), split, model, torch.device("cpu"))
    shortlisted = EvalConfig.from_options(parse_options(base + ["--shortlist", "90", "--mapChunk", "20"]))
    got = evaluate(shortlisted, split, model, torch.device("cpu"))
    np.testing.assert_array_equal(got.preds, want.preds)
    np.testing.assert_allclose(got.dists, want.dists, atol=1e-6)
    assert got.shortlist["recall"] == 1.0 and got.shortlist["index"].startswith("flat")
    assert {"index_build_s", "shortlist_check_s", "matching_s"} <= set(got.timings)


@pytest.mark.parametrize("seq_len", [1, 3, 5])
def test_shortlist_covering_the_map_on_a_route(tiny, seq_len):
    """The same on a route with continuous descriptors: the re-ranking computes each distance apart
    (a product per candidate, not one matrix product), so two windows whose distances differ in the
    last bit may swap; every other position is exact."""
    want, model, _ = evaluate_with(oxford_args(tiny, seq_len), lazy=False)
    got, _, _ = evaluate_with(oxford_args(tiny, seq_len, "--shortlist", "1000"), True, model)
    np.testing.assert_allclose(got.dists, want.dists, atol=2e-6)
    differ = got.preds != want.preds
    assert differ.mean() < 1e-3
    rows, cols = np.nonzero(differ)
    for r, c in zip(rows, cols):      # a swap of near-equal distances
        near = np.abs(want.dists[r] - want.dists[r, c]) <= 2e-6
        assert got.preds[r, c] in want.preds[r, near]


def test_shortlist_with_few_candidates_re_ranks_them(tiny):
    """With K small the predictions are the K candidates in exact sequence-distance order."""
    got, _, _ = evaluate_with(oxford_args(tiny, 3, "--shortlist", "10"), True)
    assert got.preds.shape[1] == 10
    assert (np.diff(got.dists, axis=1) >= 0).all()
    assert 0.0 <= got.shortlist["recall"] <= 1.0 and got.shortlist["sampled_queries"] == 50


@pytest.mark.parametrize("method, seq_len", [("smooth", 3), ("single", 1)])
def test_shortlist_with_a_descriptor_model_is_refused(tiny, method, seq_len):
    """Window and single-frame models are searched by their descriptors: --shortlist would be ignored."""
    with pytest.raises(UserError, match="--shortlist re-ranks by sequence matching"):
        evaluate_with(oxford_args(tiny, seq_len, "--shortlist", "10", "--method", method), True)


@pytest.mark.parametrize("kind", ["flat", "ivf-flat"])
def test_shortlist_index_is_kept_reused_and_refused_for_another_model(tiny, tmp_path, monkeypatch, kind):
    """--shortlistIndex: the first run writes the index, the next reads it and gives the same
    predictions and the same recall check (the same sampled queries); with --shortlistCheck 0 the
    database is then not streamed at all; an index built for another model, or a damaged file, is
    refused with one line that says what to do."""
    import copy

    from seqmatchnet.evaluation import evaluate
    from seqmatchnet.search import shortlist, shortlisted

    if kind != "flat":                   # an IVF index (trained on a sample) on this small map too
        monkeypatch.setattr(shortlist, "choose_index", lambda n, dim: shortlist.IndexChoice(kind, 4))
    checked = []                         # the query windows each run matches exactly (the recall check)
    real_rank_streamed = shortlisted.rank_streamed

    def spy(database, queries, *a, **k):
        checked.append(np.asarray(queries.starts).copy())
        return real_rank_streamed(database, queries, *a, **k)

    monkeypatch.setattr(shortlisted, "rank_streamed", spy)
    path = tmp_path / "map.index"
    args = ("--shortlist", "10", "--shortlistIndex", str(path), "--pooling", "--outDims", "8")
    built, model, _ = evaluate_with(oxford_args(tiny, 3, *args), True)
    assert path.is_file() and built.shortlist["index_loaded"] is False and "index_build_s" in built.timings
    again, _, _ = evaluate_with(oxford_args(tiny, 3, *args), True, model)
    assert again.shortlist["index_loaded"] is True and "index_load_s" in again.timings
    np.testing.assert_array_equal(again.preds, built.preds)
    assert again.shortlist["recall"] == built.shortlist["recall"]
    assert len(checked) == 2 and len(checked[0]) == 50 and np.array_equal(checked[0], checked[1])
    assert kind in built.shortlist["index"] and kind in again.shortlist["index"]

    def no_stream(*a, **k):
        raise AssertionError("the database was streamed")

    with monkeypatch.context() as m:
        m.setattr(shortlisted, "rank_streamed", no_stream)
        quick, _, _ = evaluate_with(oxford_args(tiny, 3, *args, "--shortlistCheck", "0"), True, model)
    np.testing.assert_array_equal(quick.preds, built.preds)
    assert quick.shortlist["sampled_queries"] == 0 and np.isnan(quick.shortlist["recall"])
    assert "not measured" in evaluate.format_recalls(quick)

    with pytest.raises(UserError, match=r"another map, model or settings \(differs in: model\).*delete"):
        other = copy.deepcopy(model)
        with torch.no_grad():
            next(other.parameters()).add_(0.01)                      # another projection
        evaluate_with(oxford_args(tiny, 3, *args), True, other)
    with pytest.raises(UserError, match=r"differs in: seqL, windows"):
        evaluate_with(oxford_args(tiny, 4, *args), True, model)
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(UserError, match="could not be read.*delete"):
        evaluate_with(oxford_args(tiny, 3, *args), True, model)


def test_index_choice_by_size():
    from seqmatchnet.search.shortlist import FLAT_MAX, INDEX_BYTES, choose_index

    assert choose_index(1000, 128).kind == "flat"
    assert choose_index(FLAT_MAX + 1, 64).kind == "ivf-flat"
    assert choose_index(1_000_000, 100).kind == "ivf-flat"             # 400 MB of vectors fit
    assert choose_index(1_000_000, 256).kind == "ivf-sq8"              # 1 GB would not; 256 MB of codes do
    pq = choose_index(1_000_000, 1024)
    assert pq.kind == "ivf-pq" and pq.pq_m == 128 and pq.pq_bytes == 64 and pq.nlist == 1000   # 4-bit codes
    assert choose_index(10_000_000, 4096).pq_bytes == 32                # at most INDEX_BYTES of codes
    assert choose_index(10_000_000, 4096).pq_bytes * 10_000_000 <= INDEX_BYTES
    odd = choose_index(10_000_000, 63)                                  # sub-quantisers divide the dimensions
    assert odd.pq_m == 63 and odd.pq_bytes == 32 and odd.pq_bytes * 10_000_000 <= INDEX_BYTES
    with pytest.raises(UserError, match="--shortlist 0"):
        choose_index(10**10, 64)


@pytest.mark.parametrize("memory", [10**9, 3000 * 32 * 4, 3000 * 32, 3000 * 8])
def test_every_index_kind_returns_valid_candidates(memory):
    """Each index kind (forced by a small memory budget) returns k distinct window ids per query; the
    flat index returns the exact nearest descriptors (plain loop)."""
    from seqmatchnet.search.shortlist import WindowIndex, choose_index, shortlist_recall

    x = unit_rows(np.random.default_rng(3), 3000, 32)
    q = x[::97] + 0.01
    choice = choose_index(len(x), 32, memory_bytes=memory, flat_max=2000 if memory < 10**9 else 10**6)
    index = WindowIndex(choice, 32)
    index.train(x)
    index.add(x, np.arange(len(x)))
    ids = index.search(q, 20, nprobe=4)
    assert ids.shape == (len(q), 20) and all(len(set(r)) == 20 for r in ids.tolist())
    assert shortlist_recall(np.arange(0, 3000, 97), ids) >= 0.9
    if choice.kind == "flat":
        plain_ids = np.array([np.argsort([np.sum((row - v) ** 2) for v in x], kind="stable")[:20] for row in q])
        np.testing.assert_array_equal(np.sort(ids, 1), np.sort(plain_ids, 1))


def test_window_means_and_shortlist_recall_match_plain_loops():
    from seqmatchnet.models.sequence import window_means
    from seqmatchnet.search.shortlist import shortlist_recall

    feats = torch.from_numpy(unit_rows(np.random.default_rng(4), 40, 6))
    dense = np.r_[2, 2, np.arange(2, 34), 34, 34]              # windows at most frames (a streamed chunk)
    for starts in (np.array([0, 3, 3, 35]), dense, np.arange(3, 30)):     # gathered; shifted slices (picked)
        for x in (feats, feats.half()):
            got = window_means(x, torch.as_tensor(starts), 5).numpy()
            assert got.shape == (len(starts), 6) and got.dtype == np.float32
            rows = x.float().numpy()
            for row, s in zip(got, starts):
                mean = sum(rows[s + k] for k in range(5)) / 5
                np.testing.assert_allclose(row, mean / np.linalg.norm(mean), atol=1e-6)
    assert window_means(feats, torch.empty(0, dtype=torch.long), 5).shape == (0, 6)
    cand = np.array([[1, 2, 3], [4, 5, 6], [7, 8, 9]])
    top1 = np.array([3, 1, 7])
    assert shortlist_recall(top1, cand) == pytest.approx(sum(t in c for t, c in zip(top1, cand.tolist())) / 3)


@pytest.mark.parametrize("args, message", [
    (["--shortlist", "-1"], "--shortlist"), (["--mapChunk", "0"], "--mapChunk"), (["--nprobe", "0"], "--nprobe"),
    (["--shortlist", "5", "--predictionsFile", "p.npz"], "--predictionsFile"),
    (["--shortlistIndex", "x.index"], "--shortlist K"),
    (["--shortlist", "5", "--shortlistCheck", "-1"], "--shortlistCheck")])
def test_bad_large_map_options_are_refused(args, message):
    from seqmatchnet.cli.options import parse_options

    with pytest.raises(UserError, match=message):
        parse_options(["--mode", "test", "--seqL", "3", *args])


# ---------------------------------------------------------------- prepare at scale

def test_fast_positions_reader_equals_the_row_by_row_reader(tmp_path, monkeypatch):
    """The vectorised CSV path gives what the csv-module path gives (values, ids, timestamps, line
    numbers with blank lines), and hands irregular files to it."""
    from seqmatchnet.data import positions

    text = ("x,y,timestamp,sequence_id\n1.5, 2,10,a\n\n3,4,11,a\n , ,\n5,6e1,12.5,b\n")
    path = tmp_path / "p.csv"
    path.write_text(text)
    fast = positions._read_positions_fast(path)
    monkeypatch.setattr(positions, "_read_positions_fast", lambda p: None)
    slow = positions.read_positions(path, "database")
    assert fast is not None
    np.testing.assert_array_equal(fast.values, slow.values)
    np.testing.assert_array_equal(fast.timestamps, slow.timestamps)
    np.testing.assert_array_equal(fast.lines, slow.lines)
    assert fast.sequence_ids.tolist() == slow.sequence_ids.tolist()
    for irregular in ('x,y\n"1",2\n', "x,y\n1,2,3\n", "x,y\n1,abc\n", "x,y,timestamp\n1,2,2024-01-01T00:00:00\n",
                      "x,y\n1,nan\n"):
        path.write_text(irregular)
        assert positions._read_positions_fast(path) is None, irregular
