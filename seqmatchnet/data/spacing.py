"""``--spacing METRES``: frames by distance travelled, not by time.

A traversal recorded as video has many frames per metre and hundreds of identical frames while it
stands still. ``spaced_rows`` keeps the first frame of each sequence and then every frame at which
the traversal has travelled at least ``spacing`` metres along its path since the last kept frame.
The distance travelled is the ``odometry`` column of the positions CSV when it has one (cumulative
metres, non-decreasing within a sequence), else the sum of the steps between consecutive positions
of the same sequence (``travelled``). ``frames_lines`` is the table that maps each kept frame back
to its row in the user's files (and its image).
"""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from seqmatchnet.common.errors import UserError
from seqmatchnet.data.positions import Positions, latlon_origin, latlon_to_local

FRAMES_HEADER = "frame,row,line,image"


def check_spacing(value: float | None, flag: str) -> None:
    """A spacing is a positive, finite number of metres (or not given)."""
    if value is not None and not (math.isfinite(value) and value > 0):
        raise UserError(f"{flag} must be a positive number of metres (the distance between kept "
                        f"frames), got {value:g}")


def sequence_starts(n: int, seq_ids: np.ndarray | None) -> np.ndarray:
    """``[n]`` bool: row ``i`` starts a sequence (row 0, or a new ``sequence_id``)."""
    first = np.zeros(n, dtype=bool)
    if n:
        first[0] = True
    if seq_ids is not None and n > 1:
        first[1:] = seq_ids[1:] != seq_ids[:-1]
    return first


def path_distance(metres: np.ndarray, seq_ids: np.ndarray | None) -> np.ndarray:
    """``[n]`` metres travelled along the path since the start of each row's sequence."""
    first = sequence_starts(len(metres), seq_ids)
    step = np.r_[0.0, np.linalg.norm(np.diff(metres, axis=0), axis=1)]
    step[first] = 0.0
    total = np.cumsum(step)
    start = np.maximum.accumulate(np.where(first, np.arange(len(metres)), 0))
    return total - total[start]


def odometry_distance(pos: Positions, label: str) -> np.ndarray:
    """The ``odometry`` column, checked to be non-decreasing within each sequence."""
    odo = pos.odometry
    first = sequence_starts(len(odo), pos.sequence_ids)
    back = np.flatnonzero((np.diff(odo) < 0) & ~first[1:])
    if len(back):
        i = int(back[0]) + 1
        raise UserError(f"{label} positions: the odometry of {pos.where(i)} ({odo[i]:.17g}) is "
                        f"less than the previous frame's ({odo[i - 1]:.17g}): odometry is the "
                        "cumulative distance travelled (metres) and must not decrease within a "
                        "sequence")
    return odo


def travelled(pos: Positions, label: str) -> np.ndarray:
    """Distance travelled per row: the odometry column when there is one, else along the
    positions (lat/lon around the traversal's own mean, so that ``--mode extract`` and ``--mode
    prepare`` keep the same frames)."""
    if pos.odometry is not None:
        return odometry_distance(pos, label)
    metres = latlon_to_local(pos.values, latlon_origin(pos.values)) if pos.latlon else pos.values
    return path_distance(metres, pos.sequence_ids)


def kept_rows(pos: Positions, spacing: float, seq_len: int, label: str) -> np.ndarray:
    """The rows of ``pos`` kept at ``spacing`` metres, every sequence keeping ``seq_len`` or
    more."""
    rows = spaced_rows(travelled(pos, label), pos.sequence_ids, spacing)
    check_spaced_sequences(pos, rows, seq_len, spacing, label)
    return rows


def spaced_rows(distance: np.ndarray, seq_ids: np.ndarray | None, spacing: float) -> np.ndarray:
    """Rows kept at ``spacing``: each sequence's first row, then each row whose ``distance`` is at
    least the last kept row's plus ``spacing`` (``distance`` non-decreasing within a sequence).
    One ``searchsorted`` per kept frame instead of a step per row."""
    n = len(distance)
    starts = np.flatnonzero(sequence_starts(n, seq_ids))
    ends = np.append(starts[1:], n)
    kept = []
    for lo, hi in zip(starts.tolist(), ends.tolist()):
        seq = distance[lo:hi]
        i = 0
        while i < len(seq):
            kept.append(lo + i)
            i = int(np.searchsorted(seq, seq[i] + spacing, side="left"))
    return np.asarray(kept, dtype=np.int64)


def subset(pos: Positions, rows: np.ndarray) -> Positions:
    """The rows ``rows`` of a positions table (lines of the file kept, for messages)."""
    def pick(a):
        return None if a is None else a[rows]

    return dataclasses.replace(pos, values=pos.values[rows], timestamps=pick(pos.timestamps),
                               sequence_ids=pick(pos.sequence_ids), lines=pos.lines[rows],
                               odometry=pick(pos.odometry))


def check_spaced_sequences(pos: Positions, kept: np.ndarray, seq_len: int, spacing: float,
                           label: str) -> None:
    """Every sequence keeps at least ``seq_len`` frames at ``spacing``, else one line naming it."""
    ids = pos.sequence_ids[kept] if pos.sequence_ids is not None else None
    starts = np.flatnonzero(sequence_starts(len(kept), ids))
    counts = np.diff(np.append(starts, len(kept)))
    short = np.flatnonzero(counts < seq_len)
    if len(short):
        k = int(starts[short[0]])
        which = f"sequence {ids[k]!r}" if ids is not None else "the traversal"
        raise UserError(f"{label}: at spacing {spacing:g} m {which} keeps {int(counts[short[0]])} "
                        f"frame(s), fewer than --seqL {seq_len}: lower the spacing or --seqL")


def csv_cell(text: str) -> str:
    """``text`` as one CSV cell: quoted when it holds a comma or a quote."""
    if "," in text or '"' in text or "\n" in text:
        return '"' + text.replace('"', '""') + '"'
    return text


def frames_lines(rows: np.ndarray, lines: np.ndarray, images: Sequence[Path] | None,
                 odometry: np.ndarray | None = None) -> list[str]:
    """The frames table: per kept frame its number, its row in the user's files (0-based, the
    descriptor and CSV row), its line in the positions CSV and its image (empty without images);
    with ``odometry`` (the kept frames' ``odometry`` column) a last column of it."""
    out = [FRAMES_HEADER + (",odometry" if odometry is not None else "")]
    for k, (row, line) in enumerate(zip(rows.tolist(), lines.tolist())):
        image = csv_cell(str(images[row])) if images is not None else ""
        odo = f",{float(odometry[k])!r}" if odometry is not None else ""
        out.append(f"{k},{row},{line},{image}{odo}")
    return out
