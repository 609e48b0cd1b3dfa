"""Figures of evaluation and training results.

Each ``*_figure`` function takes plain arrays and returns a
``matplotlib.figure.Figure`` (built without pyplot, on the Agg canvas); the
caller saves it with ``save_figure`` and/or logs it with
``MetricsWriter.figure``. Sizes are fixed (``figsize`` x ``FIG_DPI``) so the
PNGs have a known pixel size. ``precision_recall`` is the one numeric piece:
the precision-recall curve of the top-1 match over its distance threshold.
``evaluation_figures`` builds all test-mode figures from an ``EvalResult``.
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

FIG_DPI = 100
SMALL = (6.4, 4.8)        # 640 x 480 pixels at FIG_DPI
WIDE = (11.0, 4.5)        # 1100 x 450
SQUARE = (8.0, 7.0)       # 800 x 700


def _new_figure(figsize: tuple[float, float]):
    """A pyplot-free figure on an Agg canvas (no global state, nothing to leak)."""
    import matplotlib

    if "matplotlib.pyplot" not in sys.modules:   # never switch the backend of a session that uses pyplot
        matplotlib.use("Agg")
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize, dpi=FIG_DPI, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def save_figure(fig, path: Path) -> Path:
    """Write ``fig`` as a PNG at its own size and dpi (temporary file + rename), then close it."""
    from utils import atomic_write

    path = Path(path)
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=fig.dpi))
    if "matplotlib.pyplot" in sys.modules:      # a figure made by pyplot is registered there
        import matplotlib.pyplot as plt
        plt.close(fig)
    return path


def _finite(x: Sequence[float]) -> np.ndarray:
    return np.asarray([np.nan if v is None else v for v in x], dtype=float)


# ---------------------------------------------------------------- recall curves

def recall_at_n_figure(n_values: Sequence[int], recalls_by_label: Mapping[str, Sequence[float]],
                       title: str = "Recall@N"):
    """Recall@N curves, one labelled line per run or method.

    ``n_values`` ``[K]`` (e.g. 1, 5, 10, 20, 100); each value of
    ``recalls_by_label`` is ``[K]`` recalls in [0, 1] (NaN/None = not measured).
    """
    fig = _new_figure(SMALL)
    ax = fig.add_subplot()
    n = np.asarray(n_values, dtype=float)
    for label, rec in recalls_by_label.items():
        r = _finite(rec)
        if len(r) != len(n):
            raise ValueError(f"{label}: {len(r)} recalls for {len(n)} values of N")
        ax.plot(n, r, marker="o", label=label)
        if len(recalls_by_label) == 1:
            for x, y in zip(n, r):
                if np.isfinite(y):
                    ax.annotate(f"{y:.3f}", (x, y), textcoords="offset points", xytext=(0, -14), ha="center",
                                fontsize=8)
    _log_recall_axes(ax, n, [str(int(v)) for v in n], "N (number of top candidates)", "Recall@N", title)
    return fig


def _log_recall_axes(ax, ticks, labels: list[str], xlabel: str, ylabel: str, title: str) -> None:
    """Log-scaled x axis with the given ticks, recall from 0 to 1 on y, grid and legend."""
    from matplotlib.ticker import NullFormatter

    ax.set_xscale("log")
    ax.set_xticks(ticks, labels)
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_ylim(0, 1.02)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.legend(loc="lower right")


def radius_recall_figure(radii: Sequence[float], n_values: Sequence[int], radius_recalls: np.ndarray,
                         title: str = "Recall against localisation radius"):
    """Recall against the localisation radius, one line per N.

    ``radius_recalls`` ``[len(radii), len(n_values)]`` (``EvalResult.radius_recalls``); radii in the
    units of the dataset positions (metres or frames).
    """
    rr = np.asarray(radius_recalls, dtype=float)
    if rr.shape != (len(radii), len(n_values)):
        raise ValueError(f"radius_recalls has shape {rr.shape}, expected ({len(radii)}, {len(n_values)})")
    fig = _new_figure(SMALL)
    ax = fig.add_subplot()
    x = np.asarray(radii, dtype=float)
    for j, n in enumerate(n_values):
        ax.plot(x, rr[:, j], marker="o", label=f"R@{n}")
    _log_recall_axes(ax, x, [f"{v:g}" for v in x], "localisation radius (position units)", "recall", title)
    return fig


# ---------------------------------------------------------------- precision-recall

def precision_recall(top1_dists: np.ndarray, top1_correct: np.ndarray, has_positive: np.ndarray) -> dict:
    """Precision-recall of the top-1 match over the distance threshold.

    All inputs ``[Nq]``. A query is accepted when its top-1 distance is <= the
    threshold (non-finite distances are never accepted); precision = correct
    accepted / accepted, recall = correct accepted / queries with a positive.
    A top-1 of a query without a positive is never correct. Thresholds are the
    distinct finite distances, ascending. ``auc`` is the trapezoid area over
    recall from recall 0, where the curve starts at the precision of the
    smallest threshold; ``recall_at_100_precision`` is the largest recall
    whose precision is exactly 1 (0 when none). Both are NaN when no query
    has a positive.
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
    return {"precision": precision.tolist(), "recall": recall.tolist(), "thresholds": d_sorted[last].tolist(),
            "auc": auc, "recall_at_100_precision": float(perfect.max()) if len(perfect) else 0.0}


def pr_figure(pr: Mapping, title: str = "Precision-recall of the top-1 match"):
    """Plot the output of ``precision_recall``: precision against recall, AUC and R@100%P in the title."""
    fig = _new_figure(SMALL)
    ax = fig.add_subplot()
    rec, prec = np.asarray(pr["recall"], dtype=float), np.asarray(pr["precision"], dtype=float)
    if len(rec):
        ax.plot(np.r_[0.0, rec], np.r_[prec[0], prec], color="tab:blue", label="top-1 match")
        r100 = pr["recall_at_100_precision"]
        if r100 and np.isfinite(r100):
            ax.plot([r100], [1.0], "o", color="tab:red", label=f"recall at 100% precision ({r100:.3f})")
        if rec.max() == 0:
            ax.text(0.5, 0.5, "no correct top-1 match is accepted at any threshold", ha="center", va="center",
                    transform=ax.transAxes)
        ax.legend(loc="lower left")
    else:
        ax.text(0.5, 0.5, "no accepted queries or no query with a positive", ha="center", va="center",
                transform=ax.transAxes)
    ax.set_xlim(0, 1.0)
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("recall")
    ax.set_ylabel("precision")
    ax.set_title(f"{title}\nAUC {pr['auc']:.3f}, R@100%P {pr['recall_at_100_precision']:.3f}")
    ax.grid(True, alpha=0.3)
    return fig


def top1_outcomes(top1: np.ndarray, db_positions: np.ndarray, q_positions: np.ndarray,
                  radius: float) -> tuple[np.ndarray, np.ndarray]:
    """``(top1_correct [Nq], has_positive [Nq])`` for ``precision_recall``.

    ``top1`` ``[Nq]`` indexes ``db_positions`` ``[Nd, k]``; ``q_positions`` is
    ``[Nq, k]``; a match is correct within ``radius`` (<=, as ``test.recall_table``).
    """
    from sklearn.neighbors import NearestNeighbors

    q_positions = np.asarray(q_positions, dtype=float)
    db_positions = np.asarray(db_positions, dtype=float)
    nearest, _ = NearestNeighbors(n_neighbors=1).fit(db_positions).kneighbors(q_positions)
    has_pos = nearest[:, 0] <= radius
    correct = np.linalg.norm(q_positions - db_positions[np.asarray(top1)], axis=1) <= radius
    return correct & has_pos, has_pos


# ---------------------------------------------------------------- distance matrix

def distance_matrix_section(db_feats, q_feats, db_starts: np.ndarray, q_starts: np.ndarray, seq_len: int,
                            q_range: tuple[int, int], db_range: tuple[int, int],
                            method: str = "meanOfPairs") -> np.ndarray:
    """Sequence distances of windows ``db_range`` x ``q_range`` as ``[Nd_sub, Nq_sub]`` (NumPy, float32).

    ``db_feats`` ``[Nd, D]`` / ``q_feats`` ``[Nq, D]`` are pooled frame
    features (torch, any device); ``db_starts`` / ``q_starts`` the window
    starts (``datasets.sequence_windows``); ranges are ``[lo, hi)`` window indices.
    """
    import torch

    from seqMatchNet import window_distances

    device = db_feats.device
    db_s = torch.as_tensor(np.asarray(db_starts)[db_range[0]:db_range[1]], device=device)
    q_s = torch.as_tensor(np.asarray(q_starts)[q_range[0]:q_range[1]], device=device)
    if len(db_s) == 0 or len(q_s) == 0:
        raise ValueError(f"empty section: db_range {db_range}, q_range {q_range}")
    with torch.no_grad():
        return window_distances(db_feats, q_feats, db_s, q_s, seq_len, method).float().cpu().numpy()


def _gt_mask(gt, shape: tuple[int, int]) -> np.ndarray:
    gt_arr = np.asarray(gt)
    if gt_arr.dtype == bool:
        if gt_arr.shape != shape:
            raise ValueError(f"ground-truth mask has shape {gt_arr.shape}, expected {shape}")
        return gt_arr
    mask = np.zeros(shape, dtype=bool)
    if gt_arr.size:
        pairs = gt_arr.reshape(-1, 2).astype(np.int64)
        inside = (pairs[:, 0] >= 0) & (pairs[:, 0] < shape[0]) & (pairs[:, 1] >= 0) & (pairs[:, 1] < shape[1])
        mask[pairs[inside, 0], pairs[inside, 1]] = True
    return mask


def distance_matrix_figure(dists_block: np.ndarray, db_offset: int, q_offset: int, gt_pairs, top1: np.ndarray,
                           title: str = "Sequence-matching distances"):
    """A section of the distance matrix with ground truth and top-1 matches.

    ``dists_block`` ``[Nd_sub, Nq_sub]``: rows are database windows
    ``db_offset + i``, columns query windows ``q_offset + j`` (the axes show
    these frame numbers). ``gt_pairs`` is a boolean mask ``[Nd_sub, Nq_sub]``
    or ``(row, column)`` pairs in block coordinates; ``top1`` ``[Nq_sub]`` the
    block row of each query's top-1 match (outside ``[0, Nd_sub)``, e.g. -1:
    the match is outside the section and is not drawn). A match is correct
    when it is a ground-truth pair.
    """
    from matplotlib.lines import Line2D

    block = np.asarray(dists_block, dtype=float)
    nd, nq = block.shape
    top1 = np.asarray(top1, dtype=np.int64).ravel()
    if len(top1) != nq:
        raise ValueError(f"top1 has {len(top1)} entries for {nq} query columns")
    mask = _gt_mask(gt_pairs, (nd, nq))
    extent = (q_offset - 0.5, q_offset + nq - 0.5, db_offset + nd - 0.5, db_offset - 0.5)

    fig = _new_figure(SQUARE)
    ax = fig.add_subplot()
    im = ax.imshow(block, cmap="gray", aspect="auto", interpolation="nearest", extent=extent)
    fig.colorbar(im, ax=ax, label="sequence distance", shrink=0.85)
    overlay = np.zeros((nd, nq, 4))
    overlay[mask] = (0.2, 0.5, 1.0, 0.45)                  # translucent blue ground truth
    ax.imshow(overlay, aspect="auto", interpolation="nearest", extent=extent)

    inside = (top1 >= 0) & (top1 < nd)
    cols = np.flatnonzero(inside)
    good = mask[top1[cols], cols]
    size = 18 if nq <= 100 else 8
    ax.scatter(q_offset + cols[good], db_offset + top1[cols[good]], s=size, c="lime", edgecolors="black",
               linewidths=0.3, zorder=3)
    ax.scatter(q_offset + cols[~good], db_offset + top1[cols[~good]], s=size, c="red", edgecolors="black",
               linewidths=0.3, zorder=3)
    n_out = int((~inside).sum())
    handles = [Line2D([], [], color=(0.2, 0.5, 1.0), alpha=0.6, lw=6, label="ground truth"),
               Line2D([], [], ls="", marker="o", mfc="lime", mec="black", label=f"top-1 correct ({int(good.sum())})"),
               Line2D([], [], ls="", marker="o", mfc="red", mec="black", label=f"top-1 wrong ({int((~good).sum())})")]
    if n_out:
        handles.append(Line2D([], [], ls="", label=f"top-1 not drawn (outside the section): {n_out}"))
    ax.legend(handles=handles, loc="upper right", framealpha=0.85, fontsize=8)
    ax.set_xlabel("query frame")
    ax.set_ylabel("database frame")
    ax.set_title(title)
    return fig


# ---------------------------------------------------------------- training

def training_curves_figure(epochs: Sequence[int], losses: Sequence[float], val_recalls: Mapping[int, Sequence[float]],
                           val_epochs: Sequence[int] | None = None, title: str = "Training"):
    """Average training loss (left) and validation Recall@N (right) by epoch.

    ``losses`` ``[E]`` per epoch of ``epochs``; ``val_recalls`` maps N to
    recalls at ``val_epochs`` (default ``epochs``; differs with ``--evalEvery``).
    """
    from matplotlib.ticker import MaxNLocator

    ep = np.asarray(epochs, dtype=float)
    v_ep = ep if val_epochs is None else np.asarray(val_epochs, dtype=float)
    fig = _new_figure(WIDE)
    ax_loss, ax_rec = fig.subplots(1, 2, sharex=True)
    ax_loss.plot(ep, _finite(losses), marker="o", color="tab:red")
    ax_loss.set_xlabel("epoch")
    ax_loss.set_ylabel("average triplet loss")
    ax_loss.set_title("training loss")
    for n, rec in sorted(val_recalls.items()):
        r = _finite(rec)
        if len(r) != len(v_ep):
            raise ValueError(f"Recall@{n}: {len(r)} values for {len(v_ep)} validation epochs")
        ax_rec.plot(v_ep, r, marker="o", label=f"R@{n}")
    ax_rec.set_ylim(0, 1.02)
    ax_rec.set_xlabel("epoch")
    ax_rec.set_ylabel("recall")
    ax_rec.set_title("validation recall")
    if val_recalls:
        ax_rec.legend(loc="lower right")
    for ax in (ax_loss, ax_rec):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(True, alpha=0.3)
    fig.suptitle(title)
    return fig


# ---------------------------------------------------------------- all test-mode figures

def evaluation_figures(result, split, label: str = "", n_values: Sequence[int] | None = None,
                       radii: Sequence[float] | None = None, db_feats=None, q_feats=None, seq_len: int | None = None,
                       section: int = 300) -> tuple[dict, dict]:
    """Figures of one evaluation: ``({name: Figure}, pr)`` with names ``recall_at_n``,
    ``radius_recall``, ``precision_recall`` and, when ``db_feats``/``q_feats``
    (pooled features of all split frames) and ``seq_len`` are given,
    ``distance_matrix`` for the first ``section`` evaluated queries.

    ``result`` is a ``test.EvalResult`` and ``split`` a ``datasets.Split``;
    ``pr`` is ``precision_recall`` of the top-1 matches (for ``report.build_summary``).
    """
    from test import N_VALUES, RADII

    n_values = list(N_VALUES if n_values is None else n_values)
    radii = list(RADII if radii is None else radii)
    q_frames = np.asarray(result.q_frames)
    name = label or split.name
    figs = {"recall_at_n": recall_at_n_figure(n_values, {name: [result.recalls[n] for n in n_values]},
                                              title=f"Recall@N ({name})"),
            "radius_recall": radius_recall_figure(radii, n_values, result.radius_recalls,
                                                  title=f"Recall against localisation radius ({name})")}
    top1 = np.asarray(result.preds)[:, 0]
    correct, has_pos = top1_outcomes(top1, split.db_positions, split.q_positions[q_frames], split.pos_dist_thr)
    pr = precision_recall(np.asarray(result.dists)[:, 0], correct, has_pos)
    figs["precision_recall"] = pr_figure(pr, title=f"Precision-recall of the top-1 match ({name})")
    if db_feats is not None and q_feats is not None and seq_len is not None:
        from datasets import sequence_windows

        q_lo, q_hi = int(q_frames[0]), int(min(q_frames[0] + section, split.num_q))
        # database rows around the ground truth of these queries (nearest frame), at most 2 * section
        from sklearn.neighbors import NearestNeighbors
        _, near = NearestNeighbors(n_neighbors=1).fit(split.db_positions).kneighbors(split.q_positions[q_lo:q_hi])
        near = near[:, 0]
        span = min(max(int(near.max() - near.min()) + section // 5, section), 2 * section)
        db_lo = int(np.clip(np.median(near) - span // 2, 0, max(split.num_db - span, 0)))
        db_hi = min(db_lo + span, split.num_db)
        db_starts, _ = sequence_windows(split.db_bounds, seq_len)
        q_starts, _ = sequence_windows(split.q_bounds, seq_len)
        block = distance_matrix_section(db_feats, q_feats, db_starts, q_starts, seq_len, (q_lo, q_hi), (db_lo, db_hi))
        gt = np.linalg.norm(split.db_positions[db_lo:db_hi, None, :] - split.q_positions[None, q_lo:q_hi, :],
                            axis=-1) <= split.pos_dist_thr
        rows = np.full(q_hi - q_lo, -1, dtype=np.int64)
        evaluated = (q_frames >= q_lo) & (q_frames < q_hi)
        rows[q_frames[evaluated] - q_lo] = top1[evaluated] - db_lo
        rows[(rows < 0) | (rows >= db_hi - db_lo)] = -1
        figs["distance_matrix"] = distance_matrix_figure(
            block, db_lo, q_lo, gt, rows, title=f"Sequence-matching distances, seqL {seq_len} ({name})")
    return figs, pr
