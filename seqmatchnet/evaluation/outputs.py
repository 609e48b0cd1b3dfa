"""The files of an evaluation: ``results.npz``, the distance-matrix section and the figures (PNG and
TensorBoard), and t-SNE embeddings.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from seqmatchnet.common.files import atomic_write
from seqmatchnet.data.windows import Split, sequence_windows
from seqmatchnet.evaluation import figures
from seqmatchnet.evaluation.evaluate import EvalResult, top1_precision_recall
from seqmatchnet.evaluation.recall import (
    N_VALUES,
    RADII,
    top1_outcomes,
)
from seqmatchnet.matching.seqmatch import window_distances


def write_figures(result: EvalResult, split: Split, seq_len: int, out_dir: Path, label: str,
                  prefix: str = "", writer=None, step: int = 0) -> dict:
    """PNG figures of an evaluation into ``out_dir`` (and TensorBoard through ``writer``);
    returns the precision-recall summary of the top-1 matches."""
    pr = top1_precision_recall(result, split)
    section = distance_section(result, split, seq_len)
    radius = figures.RadiusRecalls(result.radius_recalls, unit=split.position_unit,
                                   counts=result.radius_counts)
    figs = figures.evaluation_figures(result.recalls, radius, pr, label, section)
    for name, fig in figs.items():
        if writer is not None:
            writer.figure(f"{prefix or 'Test'}/{name}", fig, step)
        figures.save_figure(fig,
                            Path(out_dir) / f"{prefix.lower() + '_' if prefix else ''}{name}.png")
    return pr


def distance_section(result: EvalResult, split: Split, seq_len: int, size: int = 300):
    """The distance-matrix section the figure shows: the first ``size`` evaluated query frames
    against the database frames around their ground truth (at most ``2 * size``), with the
    ground-truth mask and the top-1 matches; None without frame features (window descriptors)."""
    from sklearn.neighbors import (
        NearestNeighbors,  # sklearn loads slowly: only when a figure is drawn
    )

    if result.db_feats is None or result.q_feats is None:
        return None
    q_frames, top1 = np.asarray(result.q_frames), result.db_frames[result.preds[:, 0]]
    q_lo, q_hi = int(q_frames[0]), int(min(q_frames[0] + size, split.num_q))
    _, near = NearestNeighbors(n_neighbors=1).fit(split.db_positions).kneighbors(
        split.q_positions[q_lo:q_hi])
    near = near[:, 0]
    span = min(max(int(near.max() - near.min()) + size // 5, size), 2 * size)
    db_lo = int(np.clip(np.median(near) - span // 2, 0, max(split.num_db - span, 0)))
    db_hi = min(db_lo + span, split.num_db)
    db_starts, _ = sequence_windows(split.db_bounds, seq_len)
    q_starts, _ = sequence_windows(split.q_bounds, seq_len)
    device = result.db_feats.device
    with torch.no_grad():
        block = window_distances(result.db_feats.float(), result.q_feats.float(),
                                 torch.as_tensor(db_starts[db_lo:db_hi], device=device),
                                 torch.as_tensor(q_starts[q_lo:q_hi], device=device),
                                 seq_len).float().cpu().numpy()
    offsets = split.db_positions[db_lo:db_hi, None, :] - split.q_positions[None, q_lo:q_hi, :]
    gt = np.linalg.norm(offsets, axis=-1) <= split.pos_dist_thr
    rows = np.full(q_hi - q_lo, -1, dtype=np.int64)
    inside = (q_frames >= q_lo) & (q_frames < q_hi)
    rows[q_frames[inside] - q_lo] = top1[inside] - db_lo
    rows[(rows < 0) | (rows >= db_hi - db_lo)] = -1
    return figures.DistanceSection(block, db_lo, q_lo, gt, rows, seq_len)


def save_results(results_dir: Path, result: EvalResult, extra: dict | None = None,
                 embeddings: dict | None = None) -> Path:
    """Write ``results.npz``: plain arrays only, so ``np.load`` reads it with its default
    ``allow_pickle=False`` (docs/training-and-testing.md lists each array). The reference's keys:
    ``recalls`` ``[len(n_values)]`` Recall@N at posDistThr for each N of ``n_values``, ``rAtL``
    ``[len(radii), len(n_values)]`` recall at each radius, ``preds`` ``[queries, k]`` positions in
    ``dbFrames`` (the evaluated database frames), as the reference's; dbEmb/qEmb when computed."""
    results_dir = Path(results_dir)
    recalls = np.array([result.recalls[n] for n in N_VALUES], dtype=np.float64)
    arrays = {"recalls": recalls, "rAtL": result.radius_recalls,
              "preds": result.preds, "dists": result.dists, "n_values": np.array(N_VALUES),
              **({"velocities": result.velocities} if result.velocities is not None else {}),
              "radii": np.array(RADII), "dbFrames": result.db_frames, "qFrames": result.q_frames}
    arrays.update(embeddings or {})
    arrays.update(extra or {})
    path = results_dir / "results.npz"
    atomic_write(path, lambda f: np.savez(f, **arrays))
    return path


TOP1_COLUMNS = ("q_frame", "q_row", "q_image", "db_frame", "db_row", "db_image", "distance",
                "correct")


def source_rows(result: EvalResult, split: Split) -> dict:
    """``results.npz``'s ``db_rows``/``q_rows`` for a dataset prepared with ``--spacing``: the
    user's row (in the descriptor and positions files) of each ``dbFrames``/``qFrames`` entry;
    nothing for the other datasets."""
    if split.db_source is None or split.q_source is None:
        return {}
    return {"db_rows": split.db_source.rows[result.db_frames],
            "q_rows": split.q_source.rows[result.q_frames]}


def write_top1_rows(results_dir: Path, result: EvalResult, split: Split) -> Path | None:
    """``top1_rows.csv`` for a dataset prepared with ``--spacing``: per evaluated query its split
    frame, its row and image in the user's files, the same of its top-1 database frame, the
    sequence distance and whether the match is within posDistThr (1/0; empty without a positive).
    None (nothing written) for the other datasets."""
    from seqmatchnet.data.spacing import csv_cell

    if split.db_source is None or split.q_source is None:
        return None
    top1 = result.db_frames[result.preds[:, 0]]
    correct, has_pos = top1_outcomes(top1, split.db_positions, split.q_positions[result.q_frames],
                                     split.pos_dist_thr)

    def image(source, frame: int) -> str:
        return "" if source.images is None else csv_cell(str(source.images[frame]))

    lines = [",".join(TOP1_COLUMNS)]
    for i, (q, d) in enumerate(zip(result.q_frames.tolist(), top1.tolist())):
        ok = str(int(correct[i])) if has_pos[i] else ""
        lines.append(f"{q},{split.q_source.rows[q]},{image(split.q_source, q)},{d},"
                     f"{split.db_source.rows[d]},{image(split.db_source, d)},"
                     f"{float(result.dists[i, 0]):.7g},{ok}")
    path = Path(results_dir) / "top1_rows.csv"
    atomic_write(path, lambda f: f.write(("\n".join(lines) + "\n").encode()))
    return path


def tsne_embeddings(db_feats: torch.Tensor, q_feats: torch.Tensor, num: int, seed: int) -> dict:
    """2-D t-SNE of the first ``num`` database and query frame descriptors."""
    from sklearn.manifold import TSNE

    db = db_feats[:num].float().cpu().numpy()
    q = q_feats[:num].float().cpu().numpy()
    both = np.concatenate([db, q])
    emb = TSNE(n_components=2, init="pca", random_state=seed,
               perplexity=min(30, max(len(both) - 1, 1) / 3)).fit_transform(both)
    return {"dbEmb": emb[:len(db)], "qEmb": emb[len(db):]}
