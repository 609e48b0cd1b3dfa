"""Sequence windows and ``Split``: one split's descriptors, positions, thresholds and segments."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from seqmatchnet.common.errors import UserError
from seqmatchnet.data.descriptors import DescriptorSource, rows_of

# ---------------------------------------------------------------- windows

def sequence_windows(bounds: np.ndarray, seq_len: int) -> tuple[np.ndarray, np.ndarray]:
    """Windows of ``seq_len`` frames centred on each frame (docs/how-it-works.md).

    ``bounds`` ``[N, 2]`` holds each frame's segment ``[lo, hi)``. Returns ``(starts [N], valid
    [N])``: window ``i`` is ``starts[i] + arange(seq_len)``; ``valid[i]`` is True when the window
    did not have to be shifted.
    """
    bounds = np.asarray(bounds, dtype=np.int64)
    idx = np.arange(len(bounds), dtype=np.int64)
    lo, hi = bounds[:, 0], bounds[:, 1]
    if np.any(hi - lo < seq_len):
        bad = int(np.argmax(hi - lo < seq_len))
        raise UserError(f"sequence length {seq_len} is longer than the segment of frame {bad} "
                        f"({hi[bad] - lo[bad]} frames): use a smaller --seqL")
    if np.any((idx < lo) | (idx >= hi)):
        raise UserError("sequence bounds do not contain their own frame: check the bounds file")
    start = np.maximum(lo, idx - seq_len // 2)
    end = np.minimum(idx + seq_len - seq_len // 2, hi)
    missing = seq_len - (end - start)
    # shifted at the start of the segment: extend forwards; at its end: extend backwards
    shift_back = (start != lo) & (missing > 0) & (end == hi)
    start = np.where(shift_back, start - missing, start)
    return start, missing == 0


def segment_bounds(n: int) -> np.ndarray:
    """Every frame of a contiguous traversal in one segment ``[0, n)``: ``[n, 2]``."""
    return np.tile(np.array([[0, n]], dtype=np.int64), (n, 1))


def run_bounds(breaks: np.ndarray) -> np.ndarray:
    """The segments of frames cut after each frame ``k`` where ``breaks[k]`` (``[N - 1]`` bools):
    each frame's ``[lo, hi)``, ``[N, 2]``."""
    breaks = np.asarray(breaks, dtype=bool)
    n = len(breaks) + 1
    starts = np.concatenate([[0], np.flatnonzero(breaks) + 1]).astype(np.int64)
    ends = np.concatenate([starts[1:], [n]]).astype(np.int64)
    seg = np.concatenate([[0], np.cumsum(breaks)])          # each frame's segment
    return np.stack([starts[seg], ends[seg]], axis=1)


def cut_at_gaps(bounds: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """``bounds`` (``[N, 2]``) also cut where ``rows`` (the frames' ascending rows in their file,
    e.g. a split index file's) skip rows, so that no segment joins frames that are not neighbours
    in the file (``--splitGaps cut``)."""
    bounds = np.asarray(bounds, dtype=np.int64)
    rows = np.asarray(rows, dtype=np.int64)
    if len(rows) == 0:
        return bounds
    runs = run_bounds(np.diff(rows) != 1)
    return np.stack([np.maximum(bounds[:, 0], runs[:, 0]), np.minimum(bounds[:, 1], runs[:, 1])],
                    axis=1)


def subset_bounds(bounds: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """The segments of the frames ``rows`` (ascending) of a split whose segments are ``bounds``:
    cut where ``rows`` skip a frame or pass into another segment."""
    rows = np.asarray(rows, dtype=np.int64)
    if len(rows) == 0:
        return np.zeros((0, 2), dtype=np.int64)
    seg_lo = np.asarray(bounds, dtype=np.int64)[rows, 0]
    return run_bounds((np.diff(rows) != 1) | (np.diff(seg_lo) != 0))


# ---------------------------------------------------------------- one split

@dataclass(frozen=True)
class FrameSource:
    """Where one traversal's frames of a split come from in the user's files (a dataset prepared
    with ``--spacing``, ``data/spacing.py``): per frame its ``rows`` (0-based row of the user's
    descriptor and positions files), its ``images`` (None when not given as images) and its
    ``odometry`` (metres; None when the positions CSV had no ``odometry`` column)."""

    rows: np.ndarray
    images: np.ndarray | None = None
    odometry: np.ndarray | None = None

    def take(self, frames: np.ndarray) -> FrameSource:
        """The source of the frames ``frames`` (indices into this one)."""
        def pick(a):
            return None if a is None else a[frames]

        return FrameSource(self.rows[frames], pick(self.images), pick(self.odometry))

    def __len__(self) -> int:
        return len(self.rows)


@dataclass
class Split:
    """One split of a dataset: descriptors, positions, thresholds and segments.

    Database and query frames are kept apart; ``bounds`` are per traversal.
    """

    name: str
    # [numDb, D] float32, in memory or read lazily from the file
    db_desc: np.ndarray | DescriptorSource
    q_desc: np.ndarray | DescriptorSource    # [numQ, D]
    db_positions: np.ndarray     # [numDb, k]
    q_positions: np.ndarray      # [numQ, k]
    pos_dist_thr: float
    non_triv_pos_dist_sq_thr: float
    db_bounds: np.ndarray        # [numDb, 2] segment [lo, hi) per frame
    q_bounds: np.ndarray         # [numQ, 2]
    files: list[Path] = field(default_factory=list)
    position_unit: str = "m"     # of positions and radii: metres, or frames (Nordland)
    # each frame's row in the user's files (datasets prepared with --spacing), else None
    db_source: FrameSource | None = None
    q_source: FrameSource | None = None

    def __post_init__(self) -> None:
        if self.db_desc.shape[1] != self.q_desc.shape[1]:
            raise UserError(f"split {self.name}: database descriptors have "
                            f"{self.db_desc.shape[1]} dimensions but query descriptors "
                            f"{self.q_desc.shape[1]}: use files of the same descriptor type")
        for side, desc, pos, bounds in (("database", self.db_desc, self.db_positions,
                                         self.db_bounds),
                                        ("query", self.q_desc, self.q_positions, self.q_bounds)):
            if len(desc) == 0:
                raise UserError(f"split {self.name} has no {side} frames: check the struct and "
                                "split files")
            if len(desc) != len(pos) or len(desc) != len(bounds):
                raise UserError(f"split {self.name}: {len(desc)} {side} descriptors but "
                                f"{len(pos)} positions and {len(bounds)} bounds: the struct file "
                                "does not match the descriptors")
        for side, source, desc in (("database", self.db_source, self.db_desc),
                                   ("query", self.q_source, self.q_desc)):
            if source is not None and len(source) != len(desc):
                raise UserError(f"split {self.name}: {len(desc)} {side} descriptors but "
                                f"{len(source)} rows in the frames table: prepare the dataset "
                                "again")

    def select(self, db_rows: np.ndarray, q_rows: np.ndarray, db_bounds: np.ndarray,
               q_bounds: np.ndarray,
               **changes) -> Split:
        """The frames ``db_rows`` and ``q_rows`` (ascending) as a split with their new segment
        ``bounds``; ``changes`` replace other fields (``name``, ``pos_dist_thr``)."""
        return dataclasses.replace(
            self, db_desc=rows_of(self.db_desc, db_rows), q_desc=rows_of(self.q_desc, q_rows),
            db_positions=self.db_positions[db_rows], q_positions=self.q_positions[q_rows],
            db_bounds=db_bounds, q_bounds=q_bounds,
            db_source=None if self.db_source is None else self.db_source.take(db_rows),
            q_source=None if self.q_source is None else self.q_source.take(q_rows), **changes)

    @property
    def num_db(self) -> int:
        return len(self.db_desc)

    @property
    def num_q(self) -> int:
        return len(self.q_desc)

    @property
    def dim(self) -> int:
        return self.db_desc.shape[1]
