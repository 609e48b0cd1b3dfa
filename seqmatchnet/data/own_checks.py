"""The checks of ``--mode prepare`` on one traversal, and its runs of consecutive frames of one
sequence (what sequence windows never cross)."""
from __future__ import annotations

import numpy as np

from seqmatchnet.common.errors import UserError
from seqmatchnet.data.positions import Positions

OUTLIER_FACTOR = 100.0              # a frame this many median steps from its neighbours is a glitch


def run_starts(rows: np.ndarray, seq_ids: np.ndarray | None) -> np.ndarray:
    """Start positions (into ``rows``) of the runs of consecutive row numbers with the same sequence
    id."""
    rows = np.asarray(rows, dtype=np.int64)
    if len(rows) == 0:
        return np.zeros(0, dtype=np.int64)
    breaks = np.diff(rows) != 1
    if seq_ids is not None:
        ids = seq_ids[rows]
        breaks |= ids[1:] != ids[:-1]
    return np.concatenate([[0], np.flatnonzero(breaks) + 1]).astype(np.int64)


def run_bounds(rows: np.ndarray, seq_ids: np.ndarray | None) -> np.ndarray:
    """Per frame of ``rows``, its run ``[lo, hi)`` as positions into ``rows``: [len(rows), 2]."""
    starts = run_starts(rows, seq_ids)
    if len(starts) == 0:
        return np.zeros((0, 2), dtype=np.int64)
    ends = np.append(starts[1:], len(rows))
    lengths = ends - starts
    return np.stack([np.repeat(starts, lengths), np.repeat(ends, lengths)], axis=1)


def check_traversal(pos: Positions, metres: np.ndarray, seq_len: int, label: str) -> None:
    """Timestamps increase, no position glitches, every sequence has at least ``seq_len`` frames."""
    n = len(metres)
    bounds = run_bounds(np.arange(n), pos.sequence_ids)
    short = np.flatnonzero(bounds[:, 1] - bounds[:, 0] < seq_len)
    if len(short):
        lo, hi = int(bounds[short[0], 0]), int(bounds[short[0], 1])
        which = (f"sequence {pos.sequence_ids[lo]!r}" if pos.sequence_ids is not None
                 else "the traversal")
        raise UserError(f"{label} positions {pos.path}: {which} has {hi - lo} frame(s) (rows "
                        f"{lo}..{hi - 1}), fewer than --seqL {seq_len}: remove it (from the CSV "
                        "and the descriptors) or lower --seqL")
    same_run = bounds[1:, 0] == bounds[:-1, 0]           # row i and i+1 belong to one sequence
    if pos.timestamps is not None:
        dt = np.diff(pos.timestamps)
        bad = np.flatnonzero(same_run & (dt <= 0))
        if len(bad):
            i = int(bad[0]) + 1
            what = "repeats" if dt[bad[0]] == 0 else "is earlier than"
            raise UserError(f"{label} positions: the timestamp of {pos.where(i)} "
                            f"({pos.timestamps[i]:.17g}) {what} the previous frame's "
                            f"({pos.timestamps[i - 1]:.17g}): rows must be in capture order, one "
                            "per frame")
    step = np.linalg.norm(np.diff(metres, axis=0), axis=1)
    step = np.where(same_run, step, np.nan)               # no step across two sequences
    # only one-frame sequences: nothing to compare
    if not np.isfinite(step).any():
        return
    moving = step[np.isfinite(step) & (step > 0)]
    if len(moving) == 0:
        raise UserError(f"{label} positions {pos.path}: all frames of each sequence have the same "
                        "position: check the position columns")
    median = float(np.median(moving))
    limit = OUTLIER_FACTOR * median
    # distance to the previous frame of the same sequence
    before = np.r_[np.nan, step]
    after = np.r_[step, np.nan]
    # NaN (no neighbour) counts as far
    far_before, far_after = ~(before <= limit), ~(after <= limit)
    has_neighbour = np.isfinite(before) | np.isfinite(after)
    outlier = far_before & far_after & has_neighbour
    if outlier.any():
        i = int(np.argmax(outlier))
        dist = np.nanmin([before[i], after[i]])
        raise UserError(f"{label} positions: {pos.where(i)} is {dist:.1f} m from its neighbouring "
                        f"frame(s), more than {OUTLIER_FACTOR:g}x the median step ({median:.2f} "
                        "m): a GPS glitch? fix or remove that frame (in the CSV and the "
                        "descriptors)")


def drop_short_runs(rows: np.ndarray, seq_ids: np.ndarray | None,
                    seq_len: int) -> tuple[np.ndarray, int]:
    """Remove the frames of runs shorter than ``seq_len`` (pieces cut off at split boundaries)."""
    bounds = run_bounds(rows, seq_ids)
    keep = bounds[:, 1] - bounds[:, 0] >= seq_len
    return rows[keep], int((~keep).sum())
