"""Fidelity: every case of ../shared/reference/expected/cases.json reproduced by ``main.main``.

Each case's run (``--resultsPath``) is checked three ways:

(a) its saved Recall@N and radius table are the metric of its saved predictions, recomputed by the
    project's ``recall_table`` and by the plain loop of ``tests/plain.py``;
(b) its predictions equal the reference's row by row, except inside groups of tied scores (near
    the ends of a traversal several frames share one shifted window (docs/how-it-works.md); scores within
    1e-6 relative count as tied, as the two implementations round differently): the ranked scores
    agree, a tied group inside the top 100 holds the same frames in both, a tied group cut by the
    top-100 boundary holds only tied frames in both and, in ours, the smallest frame indices of
    each shared window, and ours lists equal scores by ascending index;
(c) its recalls equal the reference's to 1e-4, except by exactly the queries whose hit at N
    changes because frames tied with the N-th score were ordered differently.

Predictions index the evaluated database frames (``dbFrames`` in results.npz: all frames, except on
the training split and with ``--seqL_filterData``, where only frames with an unshifted window are
evaluated), as the reference's do.

When ../shared/reference is absent these tests are skipped, or fail when CI or REQUIRE_REFERENCE is set.
"""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import plain
from conftest import REFERENCE, needs_reference

CASES = json.loads((REFERENCE / "expected" / "cases.json").read_text()) if REFERENCE.is_dir() else {}
N_VALUES = (1, 5, 10, 20, 100)
REL = 1e-6          # scores this close (relative) count as one tied score


def recall_table(*args, **kwargs):
    """The project's Recall@N, as ``evaluate.evaluate`` computes it."""
    from seqmatchnet.evaluation import recall

    return recall.recall_table(*args, **kwargs)


def load_case(args: list[str]):
    """``(options, split, model, device)`` that ``--mode test`` evaluates for ``args``."""
    from seqmatchnet.cli import test
    from seqmatchnet.cli.options import parse_options

    loaded = test.load_for_test(parse_options(args))
    return loaded.opt, loaded.split, loaded.model, loaded.device


def tied(a, b) -> np.ndarray:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return np.abs(a - b) <= REL * np.maximum(np.abs(a), np.abs(b))


def tie_groups(dists: np.ndarray) -> list[tuple[int, int]]:
    """``[(first rank, end rank)]`` of the runs of tied scores in one ranked row."""
    cuts = np.flatnonzero(~tied(dists[1:], dists[:-1])) + 1
    edges = [0, *cuts.tolist(), len(dists)]
    return list(zip(edges[:-1], edges[1:]))


@pytest.mark.slow
@needs_reference
@pytest.mark.parametrize("case", sorted(CASES) or ["none"])
def test_reference_case(case, tmp_path, monkeypatch):
    import main
    from seqmatchnet.data.windows import sequence_windows
    from seqmatchnet.matching.seqmatch import candidate_distances
    from seqmatchnet.models.sequence import project_frames

    spec = CASES[case]
    monkeypatch.chdir(REFERENCE)          # read-only: every output goes to tmp_path
    args = spec["args"].split() + ["--nocuda", "--threads", "0", "--resultsPath", str(tmp_path)]
    assert main.main(args) == 0
    got = np.load(tmp_path / "results.npz")
    expected = np.load(REFERENCE / "expected" / f"{case}.npz")
    preds, want = got["preds"], expected["preds"]
    db_frames, q_frames = got["dbFrames"], got["qFrames"]
    assert preds.shape == want.shape == (len(q_frames), 100)
    assert want.max() < len(db_frames)

    opt, split, model, device = load_case(args)
    db_pos, q_pos = split.db_positions[db_frames], split.q_positions[q_frames]
    radii = [split.pos_dist_thr, *got["radii"].tolist()]

    # (a) the saved recalls are the metric of the saved predictions
    recalls = dict(zip(got["n_values"].tolist(), got["recalls"].tolist()))
    ours_rows = [[recalls[n] for n in N_VALUES], *got["rAtL"].tolist()]
    first_hits = {}
    for radius, row in zip(radii, ours_rows):
        table, _ = recall_table(preds, db_pos, q_pos, radius)
        np.testing.assert_allclose(row, [table[n] for n in N_VALUES], rtol=0, atol=1e-12, err_msg=f"radius {radius}")
        first_hits[radius] = (plain.plain_first_hits(preds, db_pos, q_pos, radius),
                              plain.plain_first_hits(want, db_pos, q_pos, radius))
        again = plain.plain_recall_from_first_hits(first_hits[radius][0], N_VALUES)
        np.testing.assert_allclose(row, [again[n] for n in N_VALUES], rtol=0, atol=1e-12,
                                   err_msg=f"plain recall, radius {radius}")

    # (b) differences from the reference's predictions only inside groups of tied scores
    db_f = project_frames(model, split.db_desc, device, 256)
    q_f = project_frames(model, split.q_desc, device, 256)
    db_s = torch.as_tensor(sequence_windows(split.db_bounds, opt.seqL)[0][db_frames])
    q_s = torch.as_tensor(sequence_windows(split.q_bounds, opt.seqL)[0][q_frames])

    def scores(cand: np.ndarray, rows=slice(None)) -> np.ndarray:
        return candidate_distances(db_f, q_f, db_s, q_s[rows], torch.as_tensor(cand), opt.seqL).numpy()

    d_ours, d_ref = scores(preds), scores(want)
    dists = got["dists"]
    np.testing.assert_allclose(dists, d_ours, atol=1e-5)      # the saved scores are those of the saved preds
    assert (np.diff(dists, axis=1) >= 0).all()
    assert all(len(set(row)) == len(row) for row in preds.tolist())
    assert (np.diff(preds, axis=1)[np.diff(dists, axis=1) == 0] > 0).all(), "equal scores not by ascending index"
    assert tied(d_ours, d_ref).all(), "the ranked scores differ from the reference's beyond ties"
    k = preds.shape[1]
    for j in np.flatnonzero((preds != want).any(axis=1)):
        for a, b in tie_groups(d_ours[j]):
            ours, theirs = preds[j, a:b].tolist(), want[j, a:b].tolist()
            if set(ours) == set(theirs):
                continue
            assert b == k, f"query {j}: ranks {a}-{b - 1} hold other frames than the reference's: {ours} {theirs}"
            # cut by the boundary: the reference kept other tied frames; ours kept, of each shared
            # window, its smallest frame indices
            every = scores(np.arange(len(db_frames))[None], slice(j, j + 1))[0]
            tied_frames = set(np.flatnonzero(tied(every, d_ours[j, a])).tolist())
            assert set(theirs) <= tied_frames, f"query {j}: the reference's last ranks are not tied"
            left_out = np.setdiff1d(np.arange(len(db_frames)), preds[j])
            for f in ours:
                same_window = left_out[db_s[left_out].numpy() == int(db_s[f])]
                assert (same_window > f).all(), f"query {j}: frame {f} kept, {same_window} of its window left out"

    # (c) recalls: the reference's, but for the queries whose hit at N moves with tied frames
    ref_rows = [[spec["recall_at_n"][str(n)] for n in N_VALUES], *expected["rAtL"].tolist()]
    explained = 0
    for radius, reference, ours in zip(radii, ref_rows, ours_rows):
        theirs, n_pos = recall_table(want, db_pos, q_pos, radius)
        np.testing.assert_allclose([theirs[n] for n in N_VALUES], reference, rtol=0, atol=1e-4,
                                   err_msg=f"the project's metric on the reference's predictions, radius {radius}")
        hits_ours, hits_ref = first_hits[radius]
        for col, n in enumerate(N_VALUES):
            moved = (hits_ours >= 0) & ((hits_ours < n) != (hits_ref < n))
            for j in np.flatnonzero(moved):
                only_ours = [r for r in range(n) if preds[j, r] not in want[j, :n]]
                only_ref = [r for r in range(n) if want[j, r] not in preds[j, :n]]
                assert only_ours and only_ref
                assert tied(d_ours[j, only_ours], d_ours[j, n - 1]).all(), (radius, n, j)
                assert tied(d_ref[j, only_ref], d_ours[j, n - 1]).all(), (radius, n, j)
            gained = int((moved & (hits_ours < n)).sum())
            lost = int((moved & (hits_ref < n)).sum())
            explained += gained + lost
            assert ours[col] == pytest.approx(reference[col] + (gained - lost) / n_pos, abs=1e-4), (radius, n)
    print(f"{case}: {int((preds != want).any(axis=1).sum())} rows differ from the reference's inside tied groups; "
          f"{explained} (radius, N, query) hits move with them")
