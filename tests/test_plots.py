"""Figures render at their fixed size; the precision-recall and top-1 metrics match hand computations."""
from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from matplotlib.image import imread

from seqmatchnet.evaluation import figures, recall

N_VALUES = [1, 5, 10, 20, 100]
RADII = [1, 5, 10, 20, 40, 100, 200]


def pixel_size(figsize: tuple[float, float]) -> tuple[int, int]:
    """(height, width) of a saved PNG."""
    return round(figsize[1] * figures.FIG_DPI), round(figsize[0] * figures.FIG_DPI)


def check_png(path: Path, figsize: tuple[float, float]) -> None:
    assert path.is_file() and path.stat().st_size > 1000
    img = imread(path)
    assert img.shape[:2] == pixel_size(figsize)
    assert img[..., :3].std() > 0.01          # not a blank canvas
    assert not list(path.parent.glob(".*.tmp"))


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(0)


def test_recall_at_n_figure(tmp_path, rng):
    recalls = {"seqL 5": np.sort(rng.uniform(size=5)), "seqL 1": [0.2, 0.4, np.nan, 0.7, None]}
    path = figures.save_figure(figures.recall_at_n_figure(N_VALUES, recalls), tmp_path / "recall.png")
    check_png(path, figures.SMALL)
    with pytest.raises(ValueError, match="recalls for 5 values"):
        figures.recall_at_n_figure(N_VALUES, {"short": [0.1, 0.2]})


def test_radius_recall_figure(tmp_path, rng):
    rr = np.sort(rng.uniform(size=(len(RADII), len(N_VALUES))), axis=0)
    check_png(figures.save_figure(figures.radius_recall_figure(RADII, N_VALUES, rr), tmp_path / "r.png"), figures.SMALL)
    with pytest.raises(ValueError, match="shape"):
        figures.radius_recall_figure(RADII, N_VALUES, rr.T)


def test_precision_recall_hand_example():
    # sorted by distance: correct, correct, wrong, correct, wrong (query 5 has no positive)
    pr = recall.precision_recall(np.array([0.4, 0.1, 0.3, 0.2, 0.5]), np.array([1, 1, 0, 1, 0], bool),
                                np.array([1, 1, 1, 1, 0], bool))
    assert pr["thresholds"] == pytest.approx([0.1, 0.2, 0.3, 0.4, 0.5])
    assert pr["precision"] == pytest.approx([1, 1, 2 / 3, 3 / 4, 3 / 5])
    assert pr["recall"] == pytest.approx([0.25, 0.5, 0.5, 0.75, 0.75])
    # trapezoids from (0, 1): 0.25 + 0.25 + 0 + 0.25 * (2/3 + 3/4) / 2 + 0
    assert pr["auc"] == pytest.approx(0.5 + 0.25 * (2 / 3 + 3 / 4) / 2)
    assert pr["recall_at_100_precision"] == pytest.approx(0.5)


def test_precision_recall_ties_and_first_wrong():
    # the two queries at 0.2 are accepted together; the curve starts at the first precision (0), not 1
    pr = recall.precision_recall([0.1, 0.2, 0.2, np.inf], [False, True, True, True], [True, True, True, True])
    assert pr["thresholds"] == pytest.approx([0.1, 0.2])
    assert pr["precision"] == pytest.approx([0, 2 / 3])
    assert pr["recall"] == pytest.approx([0, 0.5])
    assert pr["auc"] == pytest.approx(0.5 * (0 + 2 / 3) / 2)
    assert pr["recall_at_100_precision"] == 0.0


def test_precision_recall_no_correct_match(tmp_path):
    pr = recall.precision_recall([0.3, 0.1, 0.2], [False, False, False], [True, True, False])
    assert pr["precision"] == [0.0, 0.0, 0.0] and pr["recall"] == [0.0, 0.0, 0.0]
    assert pr["auc"] == 0.0 and pr["recall_at_100_precision"] == 0.0
    check_png(figures.save_figure(figures.pr_figure(pr), tmp_path / "pr_none.png"), figures.SMALL)


def test_precision_recall_correct_without_positive_is_not_counted():
    pr = recall.precision_recall([0.1, 0.2], [True, True], [False, True])
    assert pr["precision"] == pytest.approx([0.0, 0.5]) and pr["recall"] == pytest.approx([0.0, 1.0])


def test_precision_recall_no_positive_is_nan():
    pr = recall.precision_recall([0.1], [False], [False])
    assert np.isnan(pr["auc"]) and np.isnan(pr["recall_at_100_precision"]) and pr["recall"] == []


def test_pr_figure(tmp_path, rng):
    d = rng.uniform(size=200)
    has = rng.uniform(size=200) < 0.9
    pr = recall.precision_recall(d, (rng.uniform(size=200) > d) & has, has)
    check_png(figures.save_figure(figures.pr_figure(pr), tmp_path / "pr.png"), figures.SMALL)


@pytest.mark.slow
def test_distance_matrix_figure(tmp_path, rng):
    nd, nq = 120, 100
    i, j = np.arange(nd)[:, None], np.arange(nq)[None, :]
    block = np.abs(i - j - 10) / 50 + rng.uniform(0, 0.5, (nd, nq))
    mask = np.abs(i - j - 10) <= 3
    top1 = block.argmin(axis=0)
    top1[::10] = -1
    path = figures.save_figure(figures.distance_matrix_figure(block, 500, 200, mask, top1), tmp_path / "d.png")
    check_png(path, figures.SQUARE)
    pairs = np.argwhere(mask)        # the same ground truth as (row, column) pairs
    check_png(figures.save_figure(figures.distance_matrix_figure(block, 0, 0, pairs, top1), tmp_path / "d2.png"),
              figures.SQUARE)
    with pytest.raises(ValueError, match="mask has shape"):
        figures.distance_matrix_figure(block, 0, 0, mask.T, top1)


def test_training_curves_figure(tmp_path):
    epochs = np.arange(1, 7)
    fig = figures.training_curves_figure(epochs, 0.2 * np.exp(-epochs / 3), {1: [0.5, 0.6, 0.7], 5: [0.7, 0.8, 0.9]},
                                       val_epochs=[2, 4, 6])
    check_png(figures.save_figure(fig, tmp_path / "t.png"), figures.WIDE)
    with pytest.raises(ValueError, match="validation epochs"):
        figures.training_curves_figure(epochs, epochs, {1: [0.5]})


def test_save_figure_replaces_and_creates_folder(tmp_path):
    target = tmp_path / "new" / "f.png"
    figures.save_figure(figures.recall_at_n_figure(N_VALUES, {"a": [0.1] * 5}), target)
    figures.save_figure(figures.recall_at_n_figure(N_VALUES, {"b": [0.9] * 5}), target)
    check_png(target, figures.SMALL)
    assert [p.name for p in target.parent.iterdir()] == ["f.png"]


def test_top1_outcomes():
    db = np.array([[0.0, 0], [10, 0], [20, 0]])
    q = np.array([[0.0, 0], [19, 0], [100, 0]])
    correct, has_pos = recall.top1_outcomes(np.array([0, 1, 2]), db, q, radius=2.0)
    assert correct.tolist() == [True, False, False]
    assert has_pos.tolist() == [True, True, False]


def test_distance_section_equals_plain_sequence_distances(rng):
    """The section the distance-matrix figure shows: plain sequence distances of the same windows,
    ground truth within posDistThr and the top-1 rows of the evaluated queries."""
    torch = pytest.importorskip("torch")
    import plain
    from seqmatchnet.evaluation.outputs import distance_section

    n, dim, seq_len = 60, 8, 3
    pos = np.stack([np.arange(n) * 2.0, np.zeros(n)], axis=1)
    bounds = np.tile([0, n], (n, 1))
    split = SimpleNamespace(name="val", db_positions=pos, q_positions=pos + 0.5, pos_dist_thr=3.0, num_db=n,
                            num_q=n, db_bounds=bounds, q_bounds=bounds)
    feats = torch.nn.functional.normalize(torch.as_tensor(rng.standard_normal((n, dim)), dtype=torch.float32), dim=1)
    q_frames = np.arange(1, n - 1)
    preds = rng.integers(0, n, size=(len(q_frames), 5))
    result = SimpleNamespace(db_feats=feats, q_feats=feats, q_frames=q_frames, db_frames=np.arange(n), preds=preds)
    sec = distance_section(result, split, seq_len, size=40)
    windows = plain.plain_windows(bounds, seq_len)
    nd, nq = sec.block.shape
    want = plain.plain_score_matrix(feats.numpy(), feats.numpy(), windows[sec.db_offset:sec.db_offset + nd],
                                    windows[sec.q_offset:sec.q_offset + nq])
    np.testing.assert_allclose(sec.block, want, rtol=1e-5, atol=1e-3)      # float32 sqrt near 0
    for j in range(nq):
        q = sec.q_offset + j
        for i in range(nd):
            assert sec.gt[i, j] == (np.linalg.norm(pos[sec.db_offset + i] - pos[q] - 0.5) <= 3.0)
        top = preds[q - 1, 0] - sec.db_offset if 1 <= q < n - 1 else -1
        assert sec.top1_rows[j] == (top if 0 <= top < nd else -1)


@pytest.mark.slow
def test_evaluation_figures_draw_what_they_are_given(tmp_path, rng):
    n = 40
    section = figures.DistanceSection(rng.uniform(size=(n, n)), 10, 5, np.eye(n, dtype=bool),
                                    np.arange(n) % 7 - 1, 3)
    pr = recall.precision_recall(rng.uniform(size=50), rng.uniform(size=50) > 0.5, np.ones(50, bool))
    radius = figures.RadiusRecalls(np.full((len(RADII), 5), 0.5), RADII, unit="frames")
    figs = figures.evaluation_figures({k: 0.5 for k in N_VALUES}, radius, pr, "tiny", section, N_VALUES)
    assert set(figs) == {"recall_at_n", "radius_recall", "precision_recall", "distance_matrix"}
    assert "frames" in figs["radius_recall"].axes[0].get_xlabel()
    sizes = {"distance_matrix": figures.SQUARE}
    for name, fig in figs.items():
        check_png(figures.save_figure(fig, tmp_path / f"{name}.png"), sizes.get(name, figures.SMALL))
    radius = figures.RadiusRecalls(np.full((len(RADII), 5), 0.5))
    assert set(figures.evaluation_figures({k: 0.5 for k in N_VALUES}, radius, pr,
                                          "tiny")) == {"recall_at_n", "radius_recall", "precision_recall"}
