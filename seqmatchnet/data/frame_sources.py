"""Reading a ``--spacing`` dataset's frames tables back: each split frame's row in the user's
files (``custom_<name>_{database,query}_frames.csv``, written by ``data/spacing.frames_lines``), so
that ``--mode test`` and ``--mode localize`` can report the user's rows and images."""
from __future__ import annotations

import csv
from pathlib import Path

import numpy as np

from seqmatchnet.common.errors import UserError
from seqmatchnet.data.spacing import FRAMES_HEADER
from seqmatchnet.data.windows import FrameSource


def read_frames_table(path: Path) -> FrameSource:
    """All kept frames of a traversal, in frame order: rows, images (None when every cell is
    empty) and odometry (None without the column)."""
    if not path.is_file():
        raise UserError(f"frames table {path} not found: prepare the dataset again (--mode "
                        "prepare --spacing ... --force)")
    try:
        with open(path, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            header = tuple(reader.fieldnames or ())
            table = list(reader)
        if header[:4] != tuple(FRAMES_HEADER.split(",")):
            raise ValueError(f"header {','.join(header)!r}")
        frames = np.array([int(r["frame"]) for r in table], dtype=np.int64)
        rows = np.array([int(r["row"]) for r in table], dtype=np.int64)
        odometry = (np.array([float(r["odometry"]) for r in table], dtype=np.float64)
                    if "odometry" in header else None)
    except (ValueError, TypeError, KeyError) as exc:
        raise UserError(f"frames table {path} is malformed ({exc}): prepare the dataset "
                        "again") from exc
    if not np.array_equal(frames, np.arange(len(frames))) or np.any(np.diff(rows) <= 0):
        raise UserError(f"frames table {path} is malformed (frames not 0, 1, ... or rows not "
                        "ascending): prepare the dataset again")
    images = np.array([r["image"] for r in table], dtype=object)
    return FrameSource(rows, images if any(images) else None, odometry)


def split_source(table: FrameSource, desc_rows: np.ndarray, file_rows: int, rows_in_files: int,
                 label: str) -> FrameSource:
    """The source of a split's frames, whose descriptors are ``desc_rows`` of a descriptor file of
    ``file_rows`` rows: the user's rows themselves in a file of all ``rows_in_files`` frames,
    frame numbers in a file of the kept frames only."""
    desc_rows = np.asarray(desc_rows, dtype=np.int64)
    if len(desc_rows) and (desc_rows.min() < 0 or desc_rows.max() >= file_rows):
        raise UserError(f"{label}: split rows outside the descriptor file: prepare the dataset "
                        "again")
    if file_rows == len(table):
        frames = desc_rows
    elif file_rows == rows_in_files:
        frames = np.searchsorted(table.rows, desc_rows)
        frames = np.minimum(frames, max(len(table) - 1, 0))
        if len(table) == 0 or not np.array_equal(table.rows[frames], desc_rows):
            raise UserError(f"{label}: the split selects descriptor rows that its frames table "
                            "does not list as kept: prepare the dataset again")
    else:
        raise UserError(f"{label}: the descriptor file has {file_rows} rows, neither the "
                        f"{rows_in_files} rows of the user's files nor the {len(table)} kept "
                        "frames: prepare the dataset again")
    return table.take(frames)
