"""Figures render at their fixed size, and the precision-recall numbers match hand computations."""
from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from matplotlib.image import imread

import plots

N_VALUES = [1, 5, 10, 20, 100]
RADII = [1, 5, 10, 20, 40, 100, 200]


def pixel_size(figsize: tuple[float, float]) -> tuple[int, int]:
    """(height, width) of a saved PNG."""
    return round(figsize[1] * plots.FIG_DPI), round(figsize[0] * plots.FIG_DPI)


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
    path = plots.save_figure(plots.recall_at_n_figure(N_VALUES, recalls), tmp_path / "recall.png")
    check_png(path, plots.SMALL)
    with pytest.raises(ValueError, match="recalls for 5 values"):
        plots.recall_at_n_figure(N_VALUES, {"short": [0.1, 0.2]})


def test_radius_recall_figure(tmp_path, rng):
    rr = np.sort(rng.uniform(size=(len(RADII), len(N_VALUES))), axis=0)
    check_png(plots.save_figure(plots.radius_recall_figure(RADII, N_VALUES, rr), tmp_path / "r.png"), plots.SMALL)
    with pytest.raises(ValueError, match="shape"):
        plots.radius_recall_figure(RADII, N_VALUES, rr.T)


def test_precision_recall_hand_example():
    # sorted by distance: correct, correct, wrong, correct, wrong (query 5 has no positive)
    pr = plots.precision_recall(np.array([0.4, 0.1, 0.3, 0.2, 0.5]), np.array([1, 1, 0, 1, 0], bool),
                                np.array([1, 1, 1, 1, 0], bool))
    assert pr["thresholds"] == pytest.approx([0.1, 0.2, 0.3, 0.4, 0.5])
    assert pr["precision"] == pytest.approx([1, 1, 2 / 3, 3 / 4, 3 / 5])
    assert pr["recall"] == pytest.approx([0.25, 0.5, 0.5, 0.75, 0.75])
    # trapezoids from (0, 1): 0.25 + 0.25 + 0 + 0.25 * (2/3 + 3/4) / 2 + 0
    assert pr["auc"] == pytest.approx(0.5 + 0.25 * (2 / 3 + 3 / 4) / 2)
    assert pr["recall_at_100_precision"] == pytest.approx(0.5)


def test_precision_recall_ties_and_first_wrong():
    # the two queries at 0.2 are accepted together; the curve starts at the first precision (0), not 1
    pr = plots.precision_recall([0.1, 0.2, 0.2, np.inf], [False, True, True, True], [True, True, True, True])
    assert pr["thresholds"] == pytest.approx([0.1, 0.2])
    assert pr["precision"] == pytest.approx([0, 2 / 3])
    assert pr["recall"] == pytest.approx([0, 0.5])
    assert pr["auc"] == pytest.approx(0.5 * (0 + 2 / 3) / 2)
    assert pr["recall_at_100_precision"] == 0.0


def test_precision_recall_no_correct_match(tmp_path):
    pr = plots.precision_recall([0.3, 0.1, 0.2], [False, False, False], [True, True, False])
    assert pr["precision"] == [0.0, 0.0, 0.0] and pr["recall"] == [0.0, 0.0, 0.0]
    assert pr["auc"] == 0.0 and pr["recall_at_100_precision"] == 0.0
    check_png(plots.save_figure(plots.pr_figure(pr), tmp_path / "pr_none.png"), plots.SMALL)


def test_precision_recall_correct_without_positive_is_not_counted():
    pr = plots.precision_recall([0.1, 0.2], [True, True], [False, True])
    assert pr["precision"] == pytest.approx([0.0, 0.5]) and pr["recall"] == pytest.approx([0.0, 1.0])


def test_precision_recall_no_positive_is_nan():
    pr = plots.precision_recall([0.1], [False], [False])
    assert np.isnan(pr["auc"]) and np.isnan(pr["recall_at_100_precision"]) and pr["recall"] == []


def test_pr_figure(tmp_path, rng):
    d = rng.uniform(size=200)
    has = rng.uniform(size=200) < 0.9
    pr = plots.precision_recall(d, (rng.uniform(size=200) > d) & has, has)
    check_png(plots.save_figure(plots.pr_figure(pr), tmp_path / "pr.png"), plots.SMALL)


def test_distance_matrix_figure(tmp_path, rng):
    nd, nq = 120, 100
    i, j = np.arange(nd)[:, None], np.arange(nq)[None, :]
    block = np.abs(i - j - 10) / 50 + rng.uniform(0, 0.5, (nd, nq))
    mask = np.abs(i - j - 10) <= 3
    top1 = block.argmin(axis=0)
    top1[::10] = -1
    path = plots.save_figure(plots.distance_matrix_figure(block, 500, 200, mask, top1), tmp_path / "d.png")
    check_png(path, plots.SQUARE)
    pairs = np.argwhere(mask)        # the same ground truth as (row, column) pairs
    check_png(plots.save_figure(plots.distance_matrix_figure(block, 0, 0, pairs, top1), tmp_path / "d2.png"),
              plots.SQUARE)
    with pytest.raises(ValueError, match="mask has shape"):
        plots.distance_matrix_figure(block, 0, 0, mask.T, top1)


def test_training_curves_figure(tmp_path):
    epochs = np.arange(1, 7)
    fig = plots.training_curves_figure(epochs, 0.2 * np.exp(-epochs / 3), {1: [0.5, 0.6, 0.7], 5: [0.7, 0.8, 0.9]},
                                       val_epochs=[2, 4, 6])
    check_png(plots.save_figure(fig, tmp_path / "t.png"), plots.WIDE)
    with pytest.raises(ValueError, match="validation epochs"):
        plots.training_curves_figure(epochs, epochs, {1: [0.5]})


def test_save_figure_replaces_and_creates_folder(tmp_path):
    target = tmp_path / "new" / "f.png"
    plots.save_figure(plots.recall_at_n_figure(N_VALUES, {"a": [0.1] * 5}), target)
    plots.save_figure(plots.recall_at_n_figure(N_VALUES, {"b": [0.9] * 5}), target)
    check_png(target, plots.SMALL)
    assert [p.name for p in target.parent.iterdir()] == ["f.png"]


def test_top1_outcomes():
    db = np.array([[0.0, 0], [10, 0], [20, 0]])
    q = np.array([[0.0, 0], [19, 0], [100, 0]])
    correct, has_pos = plots.top1_outcomes(np.array([0, 1, 2]), db, q, radius=2.0)
    assert correct.tolist() == [True, False, False]
    assert has_pos.tolist() == [True, True, False]


def test_distance_matrix_section_matches_window_distances(rng):
    torch = pytest.importorskip("torch")
    from seqMatchNet import window_distances

    db = torch.nn.functional.normalize(torch.randn(40, 8, generator=torch.Generator().manual_seed(0)), dim=1)
    q = torch.nn.functional.normalize(torch.randn(30, 8, generator=torch.Generator().manual_seed(1)), dim=1)
    db_starts, q_starts = np.clip(np.arange(40) - 1, 0, 37), np.clip(np.arange(30) - 1, 0, 27)
    block = plots.distance_matrix_section(db, q, db_starts, q_starts, 3, (5, 25), (10, 40))
    full = window_distances(db, q, torch.as_tensor(db_starts), torch.as_tensor(q_starts), 3).numpy()
    assert block.shape == (30, 20)
    np.testing.assert_allclose(block, full[10:40, 5:25], rtol=1e-6, atol=1e-6)


def test_evaluation_figures_from_a_result(tmp_path, rng):
    torch = pytest.importorskip("torch")
    n, dim, seq_len = 60, 8, 3
    pos = np.stack([np.arange(n) * 2.0, np.zeros(n)], axis=1)
    bounds = np.tile([0, n], (n, 1))
    split = SimpleNamespace(name="val", db_positions=pos, q_positions=pos + 0.5, pos_dist_thr=3.0, num_db=n,
                            num_q=n, db_bounds=bounds, q_bounds=bounds)
    preds = np.clip(np.arange(n)[:, None] + rng.integers(-3, 4, size=(n, 20)), 0, n - 1)
    q_frames = np.arange(1, n - 1)
    result = SimpleNamespace(recalls={k: 0.5 for k in N_VALUES}, radius_recalls=np.full((len(RADII), 5), 0.5),
                             preds=preds[q_frames], dists=np.sort(rng.uniform(size=(len(q_frames), 20)), axis=1),
                             q_frames=q_frames)
    feats = torch.nn.functional.normalize(torch.as_tensor(rng.standard_normal((n, dim)), dtype=torch.float32), dim=1)
    figs, pr = plots.evaluation_figures(result, split, "tiny", N_VALUES, RADII, feats, feats, seq_len, section=40)
    assert set(figs) == {"recall_at_n", "radius_recall", "precision_recall", "distance_matrix"}
    assert 0.0 <= pr["auc"] <= 1.0
    sizes = {"distance_matrix": plots.SQUARE}
    for name, fig in figs.items():
        check_png(plots.save_figure(fig, tmp_path / f"{name}.png"), sizes.get(name, plots.SMALL))
