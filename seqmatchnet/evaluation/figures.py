"""Figures of evaluation and training results.

Each ``*_figure`` function takes plain arrays and returns a ``matplotlib.figure.Figure`` (built
without pyplot, on the Agg canvas); the caller saves it with ``save_figure`` and/or logs it with
``MetricsWriter.figure``. Sizes are fixed (``figsize`` x ``FIG_DPI``) so the PNGs have a known pixel
size. Nothing here computes a metric: the numbers come from ``metrics`` and ``test``
(``evaluation_figures`` draws all test-mode figures from them).
"""
from __future__ import annotations

import sys
import textwrap
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from seqmatchnet.common.files import atomic_write
from seqmatchnet.evaluation.recall import N_VALUES, RADII

FIG_DPI = 100
SMALL = (6.4, 4.8)        # 640 x 480 pixels at FIG_DPI
WIDE = (11.0, 4.5)        # 1100 x 450
SQUARE = (8.0, 7.0)       # 800 x 700


def _new_figure(figsize: tuple[float, float]):
    """A pyplot-free figure on an Agg canvas (no global state, nothing to leak)."""
    import matplotlib

    # never switch the backend of a session that uses pyplot
    if "matplotlib.pyplot" not in sys.modules:
        matplotlib.use("Agg")
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize, dpi=FIG_DPI, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def save_figure(fig, path: Path) -> Path:
    """Write ``fig`` as a PNG at its own size and dpi (temporary file + rename), then close it."""
    path = Path(path)
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=fig.dpi))
    if "matplotlib.pyplot" in sys.modules:      # a figure made by pyplot is registered there
        import matplotlib.pyplot as plt
        plt.close(fig)
    return path


def _finite(x: Sequence[float]) -> np.ndarray:
    return np.asarray([np.nan if v is None else v for v in x], dtype=float)


TITLE_SIZE = 10          # points
TITLE_SHARE = 0.9        # of the figure's width that a title line may take


def _wrap(text: str, fig, size: float = TITLE_SIZE, share: float = TITLE_SHARE) -> str:
    """``text`` with each line wrapped to fit ``share`` of ``fig``'s width at ``size`` points (a
    DejaVu Sans character is about 0.6 em wide on average, less in lower case)."""
    chars = max(int(fig.get_figwidth() * share * 72 / (0.6 * size)), 20)
    return "\n".join(textwrap.fill(line, chars) for line in text.split("\n"))


def _set_title(ax, title: str, detail: str = "") -> None:
    """``title``, then ``detail`` (what was evaluated: dataset, split, method, run), each wrapped
    to the figure's width so that no line is cut at the image's edges."""
    text = title + (f"\n{detail}" if detail else "")
    ax.set_title(_wrap(text, ax.figure), fontsize=TITLE_SIZE)


# ---------------------------------------------------------------- recall curves

def recall_at_n_figure(n_values: Sequence[int], recalls_by_label: Mapping[str, Sequence[float]],
                       title: str = "Recall@N", detail: str = ""):
    """Recall@N curves, one labelled line per run or method.

    ``n_values`` ``[K]`` (e.g. 1, 5, 10, 20, 100); each value of ``recalls_by_label`` is ``[K]``
    recalls in [0, 1] (NaN/None = not measured). ``detail`` goes under the title; a single line
    labelled with it needs no legend.
    """
    fig = _new_figure(SMALL)
    ax = fig.add_subplot()
    n = np.asarray(n_values, dtype=float)
    for label, rec in recalls_by_label.items():
        r = _finite(rec)
        if len(r) != len(n):
            raise ValueError(f"{label}: {len(r)} recalls for {len(n)} values of N")
        ax.plot(n, r, marker="o", label=_wrap(label, fig, 8, 0.45))
        if len(recalls_by_label) == 1:
            for x, y in zip(n, r):
                if np.isfinite(y):
                    ax.annotate(f"{y:.3f}", (x, y), textcoords="offset points", xytext=(0, -14),
                                ha="center", fontsize=8)
    legend = len(recalls_by_label) > 1 or next(iter(recalls_by_label), detail) != detail
    _log_recall_axes(ax, n, [str(int(v)) for v in n], "N (number of top candidates)", "Recall@N",
                     title, detail, legend)
    return fig


def _log_recall_axes(ax, ticks, labels: list[str], xlabel: str, ylabel: str, title: str,
                     detail: str = "", legend: bool = True) -> None:
    """Log-scaled x axis with the given ticks, recall from 0 to 1 on y, grid and (with ``legend``)
    legend."""
    from matplotlib.ticker import NullFormatter

    ax.set_xscale("log")
    ax.set_xticks(ticks, labels)
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_ylim(0, 1.02)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    _set_title(ax, title, detail)
    ax.grid(True, alpha=0.3)
    if legend:
        ax.legend(loc="lower right", fontsize=8)


def radius_recall_figure(radii: Sequence[float], n_values: Sequence[int],
                         radius_recalls: np.ndarray,
                         title: str = "Recall against localisation radius",
                         unit: str = "position units",
                         counts: Sequence[int] | None = None, detail: str = ""):
    """Recall against the localisation radius, one line per N.

    ``radius_recalls`` ``[len(radii), len(n_values)]`` (``EvalResult.radius_recalls``); radii in the
    units of the dataset positions (metres or frames). ``counts`` ``[len(radii)]``: each radius's
    queries (those with a database frame within it, the row's denominator), shown under its tick:
    a small radius leaves out the queries without a close enough frame, so its recall can exceed a
    larger radius's.
    """
    rr = np.asarray(radius_recalls, dtype=float)
    if rr.shape != (len(radii), len(n_values)):
        raise ValueError(f"radius_recalls has shape {rr.shape}, expected ({len(radii)}, "
                         f"{len(n_values)})")
    fig = _new_figure(SMALL)
    ax = fig.add_subplot()
    x = np.asarray(radii, dtype=float)
    for j, n in enumerate(n_values):
        ax.plot(x, rr[:, j], marker="o", label=f"R@{n}")
    ticks, xlabel = [f"{v:g}" for v in x], f"localisation radius ({unit})"
    if counts is not None:
        ticks = [f"{t}\n{int(c)}" for t, c in zip(ticks, counts)]
        xlabel += "\nunder each radius: its queries (those with a database frame within it)"
    _log_recall_axes(ax, x, ticks, xlabel, "recall", title, detail)
    return fig


# ---------------------------------------------------------------- precision-recall

def pr_figure(pr: Mapping, title: str = "Precision-recall of the top-1 match", detail: str = ""):
    """Plot the output of ``precision_recall``: precision against recall, AUC and R@100%P in the
    title, ``detail`` under it."""
    fig = _new_figure(SMALL)
    ax = fig.add_subplot()
    rec, prec = np.asarray(pr["recall"], dtype=float), np.asarray(pr["precision"], dtype=float)
    if len(rec):
        ax.plot(np.r_[0.0, rec], np.r_[prec[0], prec], color="tab:blue", label="top-1 match")
        r100 = pr["recall_at_100_precision"]
        if r100 and np.isfinite(r100):
            ax.plot([r100], [1.0], "o", color="tab:red",
                    label=f"recall at 100% precision ({r100:.3f})")
        if rec.max() == 0:
            ax.text(0.5, 0.5, "no correct top-1 match is accepted at any threshold", ha="center",
                    va="center", transform=ax.transAxes)
        ax.legend(loc="lower left")
    else:
        ax.text(0.5, 0.5, "no accepted queries or no query with a positive", ha="center",
                va="center", transform=ax.transAxes)
    ax.set_xlim(0, 1.0)
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("recall")
    ax.set_ylabel("precision")
    _set_title(ax, f"{title}\nAUC {pr['auc']:.3f}, R@100%P {pr['recall_at_100_precision']:.3f}",
               detail)
    ax.grid(True, alpha=0.3)
    return fig


# ---------------------------------------------------------------- distance matrix

def _gt_mask(gt, shape: tuple[int, int]) -> np.ndarray:
    gt_arr = np.asarray(gt)
    if gt_arr.dtype == bool:
        if gt_arr.shape != shape:
            raise ValueError(f"ground-truth mask has shape {gt_arr.shape}, expected {shape}")
        return gt_arr
    mask = np.zeros(shape, dtype=bool)
    if gt_arr.size:
        pairs = gt_arr.reshape(-1, 2).astype(np.int64)
        inside = ((pairs[:, 0] >= 0) & (pairs[:, 0] < shape[0])
                  & (pairs[:, 1] >= 0) & (pairs[:, 1] < shape[1]))
        mask[pairs[inside, 0], pairs[inside, 1]] = True
    return mask


def _top1_legend(ax, good: np.ndarray, n_out: int) -> None:
    """The legend of ``distance_matrix_figure``: ground truth, the correct and wrong top-1 matches
    drawn (``good`` per drawn match) and how many were not drawn (``n_out``)."""
    from matplotlib.lines import Line2D

    handles = [Line2D([], [], color=(0.2, 0.5, 1.0), alpha=0.6, lw=6, label="ground truth"),
               Line2D([], [], ls="", marker="o", mfc="lime", mec="black",
                      label=f"top-1 correct ({int(good.sum())})"),
               Line2D([], [], ls="", marker="o", mfc="red", mec="black",
                      label=f"top-1 wrong ({int((~good).sum())})")]
    if n_out:
        handles.append(Line2D([], [], ls="",
                              label=f"top-1 not drawn (outside the section): {n_out}"))
    ax.legend(handles=handles, loc="upper right", framealpha=0.85, fontsize=8)


def distance_matrix_figure(dists_block: np.ndarray, db_offset: int, q_offset: int, gt_pairs,
                           top1: np.ndarray, title: str = "Sequence-matching distances",
                           detail: str = ""):
    """A section of the distance matrix with ground truth and top-1 matches.

    ``dists_block`` ``[Nd_sub, Nq_sub]``: rows are database windows ``db_offset + i``, columns query
    windows ``q_offset + j`` (the axes show these frame numbers). ``gt_pairs`` is a boolean mask
    ``[Nd_sub, Nq_sub]`` or ``(row, column)`` pairs in block coordinates; ``top1`` ``[Nq_sub]`` the
    block row of each query's top-1 match (outside ``[0, Nd_sub)``, e.g. -1: the match is outside
    the section and is not drawn). A match is correct when it is a ground-truth pair.
    """
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
    ax.scatter(q_offset + cols[good], db_offset + top1[cols[good]], s=size, c="lime",
               edgecolors="black", linewidths=0.3, zorder=3)
    ax.scatter(q_offset + cols[~good], db_offset + top1[cols[~good]], s=size, c="red",
               edgecolors="black", linewidths=0.3, zorder=3)
    _top1_legend(ax, good, int((~inside).sum()))
    ax.set_xlabel("query frame")
    ax.set_ylabel("database frame")
    _set_title(ax, title, detail)
    return fig


# ---------------------------------------------------------------- training

def training_curves_figure(epochs: Sequence[int], losses: Sequence[float],
                           val_recalls: Mapping[int, Sequence[float]],
                           val_epochs: Sequence[int] | None = None, title: str = "Training"):
    """Average training loss (left) and validation Recall@N (right) by epoch.

    ``losses`` ``[E]`` per epoch of ``epochs``; ``val_recalls`` maps N to recalls at ``val_epochs``
    (default ``epochs``; differs with ``--evalEvery``).
    """
    from matplotlib.ticker import MaxNLocator

    ep = np.asarray(epochs, dtype=float)
    v_ep = ep if val_epochs is None else np.asarray(val_epochs, dtype=float)
    fig = _new_figure(WIDE)
    ax_loss, ax_rec = fig.subplots(1, 2, sharex=True)
    loss = _finite(losses)
    ax_loss.plot(ep, loss, marker="o", color="tab:red")
    # from 0, so that a small change does not look large; the change written out
    if np.isfinite(loss).any():
        ax_loss.set_ylim(0, max(np.nanmax(loss), 1e-12) * 1.15)
        first, last = loss[np.isfinite(loss)][[0, -1]]
        change = f" ({(last - first) / first:+.1%})" if first > 0 else ""
        ax_loss.text(0.98, 0.04, f"epoch {int(ep[np.isfinite(loss)][0])}: {first:.4f}, epoch "
                                 f"{int(ep[np.isfinite(loss)][-1])}: {last:.4f}{change}",
                     transform=ax_loss.transAxes, ha="right", va="bottom", fontsize=8)
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


# ---------------------------------------------------------------- embeddings

def embedding_figure(db_emb: np.ndarray, q_emb: np.ndarray,
                     title: str = "t-SNE of frame descriptors",
                     detail: str = ""):
    """2-D embeddings ``[N, 2]`` of database and query frames (``--numSamples2Project``), coloured
    by frame order so that the route shows as a gradient."""
    fig = _new_figure(SMALL)
    ax = fig.add_subplot()
    for emb, marker, name in ((np.asarray(db_emb), "o", "database"),
                              (np.asarray(q_emb), "^", "query")):
        ax.scatter(emb[:, 0], emb[:, 1], c=np.arange(len(emb)), cmap="viridis", marker=marker, s=10,
                   label=name, alpha=0.7)
    ax.legend(loc="best")
    _set_title(ax, title, detail)
    ax.set_xticks([])
    ax.set_yticks([])
    return fig


# ---------------------------------------------------------------- all test-mode figures

@dataclass
class DistanceSection:
    """What ``distance_matrix_figure`` draws: a block of sequence distances ``[Nd_sub, Nq_sub]``
    starting at frames (``db_offset``, ``q_offset``), its ground-truth mask and each query
    column's top-1 row in the block (-1: outside)."""

    block: np.ndarray
    db_offset: int
    q_offset: int
    gt: np.ndarray
    top1_rows: np.ndarray
    seq_len: int


@dataclass
class RadiusRecalls:
    """What ``radius_recall_figure`` draws: Recall@N within each radius, ``values``
    ``[len(radii), len(n_values)]``, over ``radii`` in ``unit``; ``counts`` (optional) the queries
    with a positive within each radius."""

    values: np.ndarray
    radii: Sequence[float] = RADII
    unit: str = "position units"
    counts: Sequence[int] | None = None


def evaluation_figures(recalls: Mapping[int, float], radius: RadiusRecalls, pr: Mapping, label: str,
                       section: DistanceSection | None = None,
                       n_values: Sequence[int] = N_VALUES) -> dict:
    """Figures of one evaluation, from numbers computed elsewhere: ``{name: Figure}`` with names
    ``recall_at_n``, ``radius_recall``, ``precision_recall`` and, with ``section``,
    ``distance_matrix``; ``label`` (what was evaluated) is written under each title."""
    recall_at_n = recall_at_n_figure(list(n_values), {label: [recalls[n] for n in n_values]},
                                     detail=label)
    radius_recall = radius_recall_figure(list(radius.radii), list(n_values), radius.values,
                                         unit=radius.unit, counts=radius.counts, detail=label)
    figs = {"recall_at_n": recall_at_n, "radius_recall": radius_recall,
            "precision_recall": pr_figure(pr, detail=label)}
    if section is not None:
        figs["distance_matrix"] = distance_matrix_figure(
            section.block, section.db_offset, section.q_offset, section.gt, section.top1_rows,
            title=f"Sequence-matching distances, seqL {section.seq_len}", detail=label)
    return figs
