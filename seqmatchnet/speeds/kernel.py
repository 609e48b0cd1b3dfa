"""The kernel of the search across speeds: every trajectory's distances for a block of database
anchors and query windows, from one block of frame distances.
"""
from __future__ import annotations

import numpy as np
import torch

from seqmatchnet.matching import blocks
from seqmatchnet.matching.seqmatch import frame_distances
from seqmatchnet.speeds.trajectories import Trajectories

# ---------------------------------------------------------------- the kernel

def trajectory_distances(frame_dists: torch.Tensor, anchors, bounds, q_cols,
                         traj: Trajectories) -> torch.Tensor:
    """Mean frame distance of every trajectory: ``[M, N] -> [T, A, B]`` float32.

    ``frame_dists`` ``[M, N]``: database rows x query columns of one block (any float dtype).
    ``anchors`` ``[A]``: database anchor rows in the block; ``bounds`` ``[A, 2]``: each anchor's
    allowed rows ``[lo, hi)`` (its database sequence, in block rows); ``q_cols`` ``[B]``: query
    anchor columns, whose frames ``q_cols + q_offsets`` must lie in the block. Entry ``[t, a, b]``
    is the mean over ``k`` (summed in ascending ``k``) of the distance at the position
    ``anchors[a] + steps[t, k] + weights[t, k]`` to the query frame ``q_cols[b] + q_offsets[k]``:
    the frame distance on a whole frame, the mean of the two neighbours' at a midpoint; ``+inf``
    when a frame of the trajectory is outside ``bounds[a]``. Rows inside the bounds must lie in the
    block (``ValueError`` otherwise): size the block with ``anchor_margin``. No loop over anchors:
    ``L`` column gathers, then ``T x L`` shifted slices (or row gathers for scattered anchors).
    """
    device = frame_dists.device
    anchors = torch.as_tensor(anchors, dtype=torch.long, device=device)
    bounds = torch.as_tensor(bounds, dtype=torch.long, device=device).reshape(-1, 2)
    q_cols = torch.as_tensor(q_cols, dtype=torch.long, device=device)
    m, _ = frame_dists.shape
    reach_lo, reach_hi = (torch.as_tensor(r, device=device) for r in traj.reach)
    # [A, T]
    first, last = anchors[:, None] + reach_lo[None, :], anchors[:, None] + reach_hi[None, :]
    valid = (first >= bounds[:, :1]) & (last < bounds[:, 1:])           # [A, T]
    if bool(((first < 0) | (last >= m))[valid].any()):
        raise ValueError("a trajectory inside its database bounds reaches outside the "
                         "frame-distance block: extend the block by velocity.anchor_margin rows")
    if not set(np.unique(traj.weights).tolist()) <= {0.0, 0.5}:
        raise ValueError("sub-frame weights other than 1/2 are not supported: "
                         f"{np.unique(traj.weights)}")
    out = torch.empty((traj.count, len(anchors), len(q_cols)), dtype=torch.float32, device=device)
    if len(anchors) == 0 or len(q_cols) == 0:
        return out
    lo, hi = int(anchors.min()), int(anchors.max()) + 1
    c_lo, c_hi = int(q_cols.min()), int(q_cols.max()) + 1
    # compact: 2-D shifted slices
    if len(anchors) * 2 >= hi - lo and len(q_cols) * 2 >= c_hi - c_lo:
        _shifted_sums(frame_dists, anchors, q_cols, traj, out)
    else:
        _gathered_sums(frame_dists, anchors, q_cols, traj, out)
    for t in torch.nonzero(~valid.all(dim=0)).flatten().tolist():
        out[t].index_fill_(0, torch.nonzero(~valid[:, t]).flatten(), torch.inf)
    return out


def _gathered_sums(frame_dists: torch.Tensor, anchors: torch.Tensor, q_cols: torch.Tensor,
                   traj: Trajectories, out: torch.Tensor) -> None:
    """``trajectory_distances`` for scattered anchors: row gathers of the ``L`` query columns."""
    halves = bool(traj.weights.any())
    # L x [M, B]
    cols = [frame_dists[:, q_cols + int(k)].to(torch.float32) for k in traj.q_offsets]
    mids = [blocks.midpoints(c) if halves else None for c in cols]
    for t in range(traj.count):
        acc = None
        for j, (st, w) in enumerate(zip(traj.steps[t], traj.weights[t])):
            src = cols[j] if w == 0 else mids[j]
            part = src[(anchors + int(st)).clamp(0, len(src) - 1)]
            acc = part if acc is None else acc.add_(part)
        out[t] = acc.div_(traj.seq_len)


def _shifted_sums(frame_dists: torch.Tensor, anchors: torch.Tensor, q_cols: torch.Tensor,
                  traj: Trajectories,
                  out: torch.Tensor) -> None:
    """``trajectory_distances`` for anchors and columns that fill most of their ranges: per
    trajectory ``L`` added slices of the block (or of its midpoints), written straight into
    ``out[t]`` when anchors and columns are exactly ranges, else into one buffer and placed by runs
    (``blocks.place_by_runs``)."""
    device, m = frame_dists.device, frame_dists.shape[0]
    lo, hi = int(anchors.min()), int(anchors.max()) + 1
    c_lo, c_hi = int(q_cols.min()), int(q_cols.max()) + 1
    k_lo = int(traj.q_offsets.min())
    fd = frame_dists if frame_dists.dtype == torch.float32 else frame_dists.to(torch.float32)
    fd = fd[:, c_lo + k_lo:c_hi + int(traj.q_offsets.max())]
    # [M - 1, ...] neighbour means
    mid = blocks.midpoints(fd) if traj.weights.any() else None
    row_runs, col_runs = blocks.index_runs(anchors), blocks.index_runs(q_cols)
    buf, (reach_lo, reach_hi) = None, traj.reach
    for t in range(traj.count):
        r_lo, r_hi = int(reach_lo[t]), int(reach_hi[t])
        # anchors base..top-1 keep all frames in the block
        base = max(lo, -r_lo)
        top = max(min(hi, m - r_hi), base)
        if top <= base:
            out[t] = torch.inf
            continue
        main = blocks.main_block(row_runs, col_runs, base, top)
        # most anchors and columns in one run: sum straight into out[t]
        if main is not None:
            (i0, v0, n0), (j0, w0, m0) = main
            acc, a_lo, c_lo_t = out[t, i0:i0 + n0, j0:j0 + m0], v0, w0
        else:                           # scattered: sum into a buffer, then place by runs
            buf = torch.empty((hi - lo, c_hi - c_lo), dtype=torch.float32,
                              device=device) if buf is None else buf
            acc, a_lo, c_lo_t, n0, m0 = buf[:top - base], base, c_lo, top - base, c_hi - c_lo
        parts = [(fd if w == 0 else mid)[a_lo + int(st):a_lo + n0 + int(st),
                                          c_lo_t - c_lo + int(k) - k_lo:c_lo_t - c_lo
                                          + int(k) - k_lo + m0]
                 for k, st, w in zip(traj.q_offsets, traj.steps[t], traj.weights[t])]
        if len(parts) == 1:
            acc.copy_(parts[0])
        else:
            torch.add(parts[0], parts[1], out=acc)
            for part in parts[2:]:
                acc.add_(part)
        acc.div_(traj.seq_len)
        if main is None:
            rows = blocks.index_runs((anchors - base).clamp(0, top - base - 1))
            blocks.place_by_runs(acc, rows, blocks.index_runs(q_cols - c_lo), out[t])
        else:
            blocks.fill_repeats(out[t], row_runs, col_runs, main)


def chunk_distances(feats: torch.Tensor, q_feats: torch.Tensor, anchors: np.ndarray,
                    bounds: np.ndarray,
                    q_starts: np.ndarray, traj: Trajectories, query_chunk: int):
    """Yields ``(first query, trajectory distances [T, A, B])`` per chunk of ``query_chunk`` query
    windows (centred, starting at ``q_starts``): the frame distances of the chunk's frames to the
    database rows ``feats`` once (one product), then every trajectory of the ``anchors`` (rows of
    ``feats``, sequences ``bounds``) as shifted sums of them (``trajectory_distances``)."""
    half = traj.seq_len // 2
    for lo in range(0, len(q_starts), query_chunk):
        starts = np.asarray(q_starts[lo:lo + query_chunk])
        f_lo, f_hi = int(starts.min()), int(starts.max()) + traj.seq_len
        frames = frame_distances(feats, q_feats[f_lo:f_hi])
        dists = trajectory_distances(frames, anchors, bounds, starts + half - f_lo, traj)
        del frames
        yield lo, dists
