"""Operations on blocks of distances, for the kernels of ``velocity``: index runs, copies by runs,
float64 column sums a tile at a time, and midpoints between neighbouring rows. Pure tensor
functions.

- ``index_runs(idx [N]) -> [(position, first value, length)]``: runs of consecutive values.
- ``place_by_runs(src, row_runs, col_runs, dst)``: ``dst[i, j] = src[rows[i], cols[j]]`` by runs.
- ``main_block(row_runs, col_runs, base, top)`` / ``fill_repeats(dst, row_runs, col_runs, main)``:
  write most of a block in place and copy its repeated rows and columns (windows shifted at sequence
  ends).
- ``float64_column_sums(d [A, B]) -> (sums [B], sums of squares [B])`` accumulated in float64.
- ``midpoints(fd [M, N]) -> [M - 1, N]``: the mean of rows ``r`` and ``r + 1``.
"""
from __future__ import annotations

import numpy as np
import torch


def main_block(row_runs, col_runs, base: int, top: int):
    """The longest run of anchors (clipped to ``[base, top)``) and of columns when every other run
    repeats values inside them (the shifted windows at sequence ends), else None."""
    (i0, v0, n0), (j0, w0, m0) = max(row_runs, key=lambda r: r[2]), max(col_runs,
                                                                        key=lambda r: r[2])
    cut_lo, cut_hi = max(v0, base), min(v0 + n0, top)
    if cut_hi <= cut_lo or any(v < cut_lo or v + n > cut_hi for i, v, n in row_runs if i != i0 and v
                               + n > base
                               and v < top) or any(w < w0 or w + n > w0 + m0 for j, w, n in col_runs
                                                   if j != j0):
        return None
    return (i0 + cut_lo - v0, cut_lo, cut_hi - cut_lo), (j0, w0, m0)


def fill_repeats(dst: torch.Tensor, row_runs, col_runs, main) -> None:
    """Copy the repeated columns, then the repeated rows, of ``dst`` from its main block
    (``main_block``); rows outside the main block that are not repeats belong to unscored anchors
    (masked afterwards)."""
    (i0, v0, n0), (j0, w0, m0) = main
    rows = slice(i0, i0 + n0)
    for j, w, n in col_runs:
        if j != j0:
            dst[rows, j:j + n] = dst[rows, j0 + w - w0:j0 + w - w0 + n]
    for i, v, n in row_runs:
        # the part of this run the main block holds
        lo_v, hi_v = max(v, v0), min(v + n, v0 + n0)
        # (the main block's own cells: nothing to copy)
        if hi_v > lo_v and i - v != i0 - v0:
            dst[i + lo_v - v:i + hi_v - v] = dst[i0 + lo_v - v0:i0 + hi_v - v0]


def float64_column_sums(d: torch.Tensor, tile: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """Column sums and sums of squares of ``d`` ``[A, B]`` accumulated in float64, ``tile`` rows at
    a time (a float64 copy of the whole block would leave the cache)."""
    total = torch.zeros(d.shape[1], dtype=torch.float64, device=d.device)
    squares = torch.zeros(d.shape[1], dtype=torch.float64, device=d.device)
    for r in range(0, len(d), tile):
        x = d[r:r + tile].to(torch.float64)
        total += x.sum(dim=0)
        squares += x.square_().sum(dim=0)
    return total, squares


def index_runs(idx: torch.Tensor) -> list[tuple[int, int, int]]:
    """``idx`` ``[N]`` as runs of consecutive values: ``(position, first value, length)``."""
    idx = idx.cpu().numpy()
    if len(idx) == 0:
        return []
    cuts = np.flatnonzero(np.diff(idx) != 1) + 1
    starts = np.r_[0, cuts]
    return [(int(a), int(idx[a]), int(b - a)) for a, b in zip(starts, np.r_[cuts, len(idx)])]


def place_by_runs(src: torch.Tensor, row_runs, col_runs, dst: torch.Tensor) -> None:
    """``dst[i, j] = src[rows[i], cols[j]]`` for indices given as runs (``index_runs``): one slice
    copy per pair of runs, or one gather per axis when the runs are many (scattered indices)."""
    if len(row_runs) * len(col_runs) > 64:
        rows = torch.as_tensor(np.concatenate([np.arange(v, v + n) for _, v, n in row_runs]),
                               device=src.device)
        cols = torch.as_tensor(np.concatenate([np.arange(v, v + n) for _, v, n in col_runs]),
                               device=src.device)
        torch.index_select(src.index_select(0, rows), 1, cols, out=dst)
        return
    for i, r, nr in row_runs:
        for j, c, nc in col_runs:
            dst[i:i + nr, j:j + nc].copy_(src[r:r + nr, c:c + nc])


def midpoints(fd: torch.Tensor) -> torch.Tensor:
    return (fd[:-1] + fd[1:]).mul_(0.5)        # [M, N] -> [M - 1, N]: the mean of rows r and r + 1
