"""Evaluation (docs/how-it-works.md): project the windows, search, and measure Recall@N, recall at
radii and the precision-recall of the top-1 matches; figures and result files of an evaluation.

``evaluate(config, split, model, device)`` is what ``--mode test`` and the validation after each
training epoch call. ``EvalConfig.from_options`` is the only place here that reads the command line.
"""
from __future__ import annotations

import argparse
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from seqmatchnet.common.errors import UserError
from seqmatchnet.data.windows import Split, sequence_windows
from seqmatchnet.evaluation.recall import (
    N_VALUES,
    RADII,
    nearest_db_distance,
    precision_recall,
    radius_table,
    recall_table,
    top1_outcomes,
)
from seqmatchnet.models.sequence import Projection, SeqMatchModel
from seqmatchnet.search.diagonal import SearchConfig
from seqmatchnet.search.entry import find
from seqmatchnet.search.sides import Windows
from seqmatchnet.search.speeds import find_across_speeds
from seqmatchnet.speeds.trajectories import GRIDS, parse_velocities

RERANK_CANDIDATES = 20


@dataclass(frozen=True)
class EvalConfig:
    """What an evaluation needs from the options, read once."""

    seq_len: int
    filter_len: int | None = None            # --seqL_filterData: frames with an unshifted window
    search: SearchConfig = field(default_factory=SearchConfig)
    batch_size: int = 64                     # frames per projection batch
    quiet: bool = False

    @classmethod
    def from_options(cls, opt: argparse.Namespace) -> EvalConfig:
        dtype = torch.float16 if opt.featDtype == "float16" else torch.float32
        index = Path(opt.shortlistIndex) if opt.shortlistIndex else None
        search = SearchConfig(query_chunk=opt.queryChunk, db_chunk=opt.dbChunk,
                              map_chunk=opt.mapChunk, feat_dtype=dtype,
                              shortlist=opt.shortlist or 0, nprobe=opt.nprobe,
                              shortlist_index=index, shortlist_check=opt.shortlistCheck,
                              batch_size=opt.cacheBatchSize, seed=opt.seed, quiet=opt.quiet,
                              velocities=parse_velocities(opt.velocities),
                              grid=GRIDS[opt.trajectoryGrid])
        return cls(opt.seqL, opt.seqL_filterData, search, opt.cacheBatchSize, opt.quiet)

    def filter_for(self, split_name: str) -> int | None:
        """Length whose unshifted windows are evaluated: ``--seqL_filterData``; on the training
        split ``--seqL`` by default, as the reference (its training split only holds full
        windows)."""
        if self.filter_len is not None:
            return self.filter_len
        return self.seq_len if split_name == "train" else None


@dataclass
class EvalResult:
    recalls: dict                 # N -> Recall@N at posDistThr
    radius_recalls: np.ndarray    # [len(RADII), len(N_VALUES)]
    preds: np.ndarray             # [len(q_frames), k] positions in db_frames, best first
    dists: np.ndarray             # [numQ, k] their sequence distances
    db_frames: np.ndarray         # database frames that were searched
    q_frames: np.ndarray          # query frames that were evaluated
    timings: dict = field(default_factory=dict)
    queries_with_positives: int = 0
    radius_counts: np.ndarray = field(                                   # per radius row
        default_factory=lambda: np.zeros(len(RADII), dtype=np.int64))
    db_feats: torch.Tensor | None = None   # pooled frame features (sequence matching), for figures
    q_feats: torch.Tensor | None = None
    shortlist: dict | None = None          # --shortlist: candidates, index, nprobe, sampled recall
    velocities: np.ndarray | None = None   # --velocities: [numQ, k] the velocity of each prediction


def select_frames(bounds: np.ndarray, filter_len: int | None) -> np.ndarray:
    """Frames to evaluate: all, or those whose window of ``filter_len`` needs no shift."""
    if filter_len is None:
        return np.arange(len(bounds))
    _, valid = sequence_windows(bounds, filter_len)
    return np.flatnonzero(valid)


def load_predictions(path: Path) -> np.ndarray:
    """``preds`` of an earlier run (``--resultsPath``): ``[numQ, >=20]`` integer array, first 20
    kept. Rows and values are checked against the split by ``check_predictions``."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"--predictionsFile {path} not found: write one with --resultsPath in an "
                        "earlier run")
    try:
        with np.load(path, allow_pickle=False) as z:
            if "preds" not in z.files:
                raise UserError(f"--predictionsFile {path} has no 'preds' array (found {z.files})")
            preds = np.asarray(z["preds"])
    except (ValueError, OSError, EOFError) as exc:
        raise UserError(f"--predictionsFile {path} is not a readable .npz ({exc})") from exc
    if preds.ndim != 2 or not np.issubdtype(preds.dtype, np.integer):
        raise UserError(f"--predictionsFile {path}: preds has shape {preds.shape} ({preds.dtype}), "
                        f"expected integers of shape (queries, >= {RERANK_CANDIDATES})")
    return preds.astype(np.int64)


def check_predictions(preds: np.ndarray, num_q: int, num_db: int, source: str) -> None:
    """``preds`` must have one row per evaluated query and index the evaluated database frames
    (the same split, ``--seqL`` and ``--seqL_filterData`` as the run that wrote them)."""
    if preds.shape[0] != num_q or preds.shape[1] < RERANK_CANDIDATES:
        raise UserError(f"{source}: preds has shape {preds.shape}, expected ({num_q}, >= "
                        f"{RERANK_CANDIDATES}) for this evaluation: use a file written for the "
                        "same --dataset, --split and --seqL_filterData")
    if preds.min() < 0 or preds.max() >= num_db:
        raise UserError(f"{source}: preds must be indices of the evaluated database frames, in "
                        f"[0, {num_db}), found {preds.min()}..{preds.max()}: use a file written "
                        "for the same --dataset, --split and --seqL_filterData")


def candidates_to_rerank(predictions: np.ndarray, model: SeqMatchModel, num_q: int, num_db: int,
                         source: str) -> np.ndarray:
    """The first ``RERANK_CANDIDATES`` of each query's ``predictions`` (checked against the
    evaluated frames by ``check_predictions``), for a model that matches sequences."""
    check_predictions(predictions, num_q, num_db, source)
    predictions = predictions[:, :RERANK_CANDIDATES]
    if model.compares_descriptors:
        raise UserError("--predictionsFile re-ranks by sequence matching: use it with --method "
                        "seqmatch")
    return predictions


def evaluate(config: EvalConfig, split: Split, model: SeqMatchModel, device: torch.device,
             predictions: np.ndarray | None = None,
             predictions_source: str = "--predictionsFile") -> EvalResult:
    """Evaluate ``model`` on ``split``: features, search, Recall@N and recall at radii.
    ``predictions`` (``[queries, >= RERANK_CANDIDATES]`` database positions, from
    ``predictions_source``) are re-ranked instead of searching every database window."""
    seq_len, filter_len = config.seq_len, config.filter_for(split.name)
    db_sel = select_frames(split.db_bounds, filter_len)
    q_sel = select_frames(split.q_bounds, filter_len)
    if len(db_sel) == 0 or len(q_sel) == 0:
        raise UserError(f"no frames of split {split.name} have a full window of {filter_len} "
                        "frames: use a smaller --seqL_filterData")
    if predictions is not None:
        predictions = candidates_to_rerank(predictions, model, len(q_sel), len(db_sel),
                                           predictions_source)
    t0 = time.perf_counter()
    db_starts = sequence_windows(split.db_bounds, seq_len)[0][db_sel]
    q_starts = sequence_windows(split.q_bounds, seq_len)[0][q_sel]
    q = model.embed_windows(split.q_desc, q_starts, seq_len,
                            Projection(device, config.batch_size, "queries", config.quiet,
                                       config.search.feat_dtype), all_frames=True)
    q_time = time.perf_counter() - t0
    traj = config.search.trajectories(seq_len)
    database = Windows(split.db_desc, db_starts, split.db_bounds[db_sel])
    queries = Windows.of(q, split.q_bounds[q_sel])
    if traj.is_diagonal:
        found = find(config.search, model, database, queries, seq_len, device, predictions)
    else:
        found = find_across_speeds(config.search, model, database, queries, seq_len, device, traj,
                                   predictions)
    t2 = time.perf_counter()
    timings = dict(found.timings)
    if "features_s" in timings:
        timings["features_s"] += q_time

    db_pos, q_pos = split.db_positions[db_sel], split.q_positions[q_sel]
    nearest = nearest_db_distance(db_pos, q_pos)
    recalls, n_pos = recall_table(found.preds, db_pos, q_pos, split.pos_dist_thr, nearest=nearest)
    radius_recalls, radius_counts = radius_table(found.preds, db_pos, q_pos, nearest=nearest)
    frame_feats = q.starts is not None
    return EvalResult(recalls=recalls, radius_recalls=radius_recalls, preds=found.preds,
                      dists=found.dists, db_frames=db_sel, q_frames=q_sel,
                      queries_with_positives=n_pos, radius_counts=radius_counts,
                      timings={**timings, "metrics_s": time.perf_counter() - t2},
                      db_feats=found.db_feats if frame_feats else None,
                      q_feats=q.feats if frame_feats else None, shortlist=found.shortlist,
                      velocities=found.velocities)


def top1_precision_recall(result: EvalResult, split: Split) -> dict:
    """Precision-recall of the top-1 matches over their distance threshold (AUC, recall at 100 %
    precision)."""
    correct, has_pos = top1_outcomes(result.db_frames[result.preds[:, 0]], split.db_positions,
                                     split.q_positions[result.q_frames], split.pos_dist_thr)
    return precision_recall(result.dists[:, 0], correct, has_pos)


def format_recalls(result: EvalResult, title: str = "", unit: str = "m") -> str:
    """The recall table as text: Recall@N, then recall at each localisation radius with the number
    of queries that have a positive within it (each row's denominator)."""
    head = "".join(f"{'R@' + str(n):>8}" for n in N_VALUES)
    lines = [title] if title else []
    lines.append(f"{'':>14}{head}{'queries':>9}")
    lines.append(f"{'posDistThr':>14}" + "".join(f"{result.recalls[n]:>8.4f}" for n in N_VALUES)
                 + f"{result.queries_with_positives:>9}")
    for r, row, n in zip(RADII, result.radius_recalls, result.radius_counts):
        lines.append(f"{f'radius {r} {unit}':>14}" + "".join(f"{v:>8.4f}" for v in row) + f"{n:>9}")
    lines.append(f"({len(result.q_frames)} queries, {len(result.db_frames)} database frames; each "
                 "row counts the queries with a positive within its radius; R@N counts only the "
                 f"{result.preds.shape[1]} retrieved)")
    if result.velocities is not None and len(result.velocities):
        v, n = np.unique(result.velocities[:, 0], return_counts=True)
        lines.append("top-1 matches by velocity (database frames per query frame): "
                     + ", ".join(f"{x:g} {c / n.sum():.0%}" for x, c in zip(v, n)))
    if result.shortlist:
        s = result.shortlist
        recall = (f"the exact top-1 is among them for {s['recall']:.4f} of "
                  f"{s['sampled_queries']} sampled queries" if s["sampled_queries"]
                  else "its recall was not measured (--shortlistCheck 0)")
        notes = ([f"nprobe {s['nprobe']}"] if str(s["index"]).startswith("ivf") else []) + \
                ([f"read from {s['index_file']}"] if s.get("index_loaded") else [])
        notes = f" ({', '.join(notes)})" if notes else ""
        lines.append(f"shortlist: {s['candidates']} candidates per query from a {s['index']} "
                     f"index{notes}; {recall}")
    return "\n".join(lines)
