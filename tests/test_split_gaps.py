"""Issue 38: SeqNet's ``--w`` default, and windows across the gaps of the Oxford split index files.

The split index files of the reference fixture are the real ones (``oxford-v1.0_splitInds.npz``,
``oxford-pnv_splitInds.npz``); a gap is where a split's consecutive rows are not consecutive in the
descriptor file. The default (``--splitGaps join``, the reference) keeps one segment per traversal,
so some windows span a gap; ``--splitGaps cut`` cuts the segments there.
"""
from __future__ import annotations

import json

import numpy as np
import pytest

import plain
from conftest import REFERENCE, needs_reference
from seqmatchnet.cli.options import parse_options
from seqmatchnet.common.errors import UserError
from seqmatchnet.data.specs import get_split
from seqmatchnet.data.structs import load_split_indices
from seqmatchnet.data.windows import cut_at_gaps, run_bounds, segment_bounds, sequence_windows, subset_bounds
from seqmatchnet.runs.folders import refuse_other_data, restore_flags

STRUCTS = REFERENCE / "structFiles"
SPLIT_FILE = {"oxford-pnv": "oxford-pnv_splitInds.npz", "oxford-v1.0": "oxford-v1.0_splitInds.npz"}
# windows that span a gap with the reference's segments: (dataset, split, seqL) -> (database, query)
SPANNING = {("oxford-pnv", "test", 5): (40, 40), ("oxford-pnv", "train", 5): (36, 36),
            ("oxford-v1.0", "train", 5): (4, 4), ("oxford-pnv", "test", 10): (90, 90),
            ("oxford-v1.0", "train", 10): (9, 9), ("oxford-v1.0", "test", 5): (0, 0),
            ("oxford-pnv", "train", 10): (81, 81), ("oxford-pnv", "val", 5): (40, 40)}


# ---------------------------------------------------------------- --w


def test_w_defaults_to_seqnets_command_line():
    """SeqNet's main.py: ``parser.add_argument('--w', type=int, default=3, ...)``."""
    assert parse_options(["--mode", "test", "--seqL", "5"]).w == 3
    assert parse_options(["--mode", "test", "--seqL", "5", "--w", "5"]).w == 5


@pytest.mark.parametrize("saved_w", [5, 2])
def test_restored_run_keeps_its_w(tmp_path, saved_w):
    """A run trained before the default changed (``w`` 5 in its flags.json) keeps its kernel."""
    flags = tmp_path / "flags.json"
    saved = {"method": "seqnet", "w": saved_w, "outDims": 8}
    flags.write_text(json.dumps(saved))
    opt = parse_options(["--mode", "test", "--seqL", "5", "--method", "seqnet"])
    assert opt.w == 3
    assert restore_flags(opt, flags, saved).w == saved_w


def test_resume_refuses_other_split_gaps(tmp_path):
    opt = parse_options(["--mode", "train", "--seqL", "5", "--splitGaps", "cut"])
    with pytest.raises(UserError, match="--splitGaps join"):
        refuse_other_data(opt, {"splitGaps": "join"}, tmp_path)
    refuse_other_data(opt, {"seqL": 5}, tmp_path)       # a run from before the option: no refusal


# ---------------------------------------------------------------- segments (plain-loop twins)


def plain_run_bounds(rows, parent_lo=None) -> np.ndarray:
    """Per frame ``[lo, hi)`` of its run of consecutive ``rows`` (and of equal ``parent_lo``)."""
    n = len(rows)
    out = np.zeros((n, 2), dtype=np.int64)
    lo = 0
    for i in range(n):
        if i > 0 and (rows[i] != rows[i - 1] + 1
                      or (parent_lo is not None and parent_lo[i] != parent_lo[i - 1])):
            lo = i
        out[i, 0] = lo
    hi = n
    for i in range(n - 1, -1, -1):
        out[i, 1] = hi
        if out[i, 0] == i:
            hi = i
    return out


@pytest.mark.parametrize("seed", range(6))
def test_segments_equal_their_plain_loops(seed):
    rng = np.random.default_rng(seed)
    rows = np.sort(rng.choice(60, size=int(rng.integers(1, 40)), replace=False))
    np.testing.assert_array_equal(cut_at_gaps(segment_bounds(len(rows)), rows),
                                  plain_run_bounds(rows))
    np.testing.assert_array_equal(run_bounds(np.diff(rows) != 1), plain_run_bounds(rows))
    parent = plain.segments_of([7, 1, 12, 20, 20])        # 60 frames in five segments
    np.testing.assert_array_equal(subset_bounds(parent, rows),
                                  plain_run_bounds(rows, parent[rows, 0]))
    # existing segments stay cut: a custom dataset's bounds files and the gaps together
    sub = parent[: len(rows)]
    cut = cut_at_gaps(sub, rows)
    runs = plain_run_bounds(rows)
    for i in range(len(rows)):
        assert cut[i, 0] == max(sub[i, 0], runs[i, 0]) and cut[i, 1] == min(sub[i, 1], runs[i, 1])


# ---------------------------------------------------------------- the Oxford split files


def split_of(dataset: str, split: str, seq_len: int, *extra: str):
    opt = parse_options(["--mode", "test", "--dataset", dataset, "--split", split, "--seqL",
                         str(seq_len), "--dataPath", str(REFERENCE / "data"), "--structPath",
                         str(STRUCTS), "--nocuda", *extra])
    return get_split(opt, split)


def spanning_windows(starts: np.ndarray, seq_len: int, rows: np.ndarray) -> int:
    """Windows (by a plain loop over the split's rows) that join two rows not neighbours in the
    descriptor file."""
    count = 0
    for s in starts:
        for k in range(seq_len - 1):
            if rows[s + k + 1] != rows[s + k] + 1:
                count += 1
                break
    return count


@needs_reference
@pytest.mark.parametrize("dataset, split, seq_len", sorted(SPANNING))
def test_no_window_spans_a_gap_with_cut_and_the_default_is_unchanged(dataset, split, seq_len):
    rows = load_split_indices(STRUCTS / SPLIT_FILE[dataset], split)
    joined, cut = split_of(dataset, split, seq_len), split_of(dataset, split, seq_len,
                                                              "--splitGaps", "cut")
    for side, bounds_join, bounds_cut, side_rows, want in (
            ("db", joined.db_bounds, cut.db_bounds, rows[0], SPANNING[dataset, split, seq_len][0]),
            ("q", joined.q_bounds, cut.q_bounds, rows[1], SPANNING[dataset, split, seq_len][1])):
        # the default: one segment per traversal, as the reference, so windows span the gaps
        np.testing.assert_array_equal(bounds_join, segment_bounds(len(side_rows)))
        assert spanning_windows(sequence_windows(bounds_join, seq_len)[0], seq_len,
                                side_rows) == want, side
        # cut: no frame is dropped at these lengths, and no window spans a gap
        assert len(bounds_cut) == len(side_rows)
        assert spanning_windows(sequence_windows(bounds_cut, seq_len)[0], seq_len, side_rows) == 0
        assert spanning_windows([w[0] for w in plain.plain_windows(bounds_cut, seq_len)], seq_len,
                                side_rows) == 0
    np.testing.assert_array_equal(cut.db_desc, joined.db_desc)


@needs_reference
def test_cut_leaves_out_segments_shorter_than_the_window():
    """oxford-pnv test's shortest database segment has 12 frames: at --seqL 13 it is left out."""
    rows = load_split_indices(STRUCTS / SPLIT_FILE["oxford-pnv"], "test")[0]
    lengths = np.diff(np.concatenate([[0], np.flatnonzero(np.diff(rows) != 1) + 1, [len(rows)]]))
    assert lengths.min() == 12
    cut = split_of("oxford-pnv", "test", 13, "--splitGaps", "cut")
    assert cut.num_db == len(rows) - lengths[lengths < 13].sum()
    assert (cut.db_bounds[:, 1] - cut.db_bounds[:, 0]).min() >= 13
