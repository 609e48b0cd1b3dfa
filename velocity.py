"""Sequence matching across speeds: trajectories and their scores.

Sequence matching along the diagonal assumes that both traversals advance one frame per frame. Here a
database *trajectory* may advance ``v`` database frames per query frame (the SeqSLAM idea): a query window
with offsets ``k`` (``query_offsets``: centred for ``--mode test``, trailing for ``--mode localize``) is
compared with the database positions ``j + s + v * k`` of each anchor frame ``j``, rounded to whole frames
(``grid`` 1, SeqSLAM's ``j + round(v * k)``, ``s = 0``) or to half frames (``grid`` 2: anchors ``s = 0`` and
``1/2``, a midpoint's distance the mean of its two neighbours'); see ``trajectories``. A trajectory's
distance is the mean of its ``L`` position distances, summed in ascending ``k`` as
``seqMatchNet.diagonal_sums`` does, so the diagonal equals ``seqMatchNet.window_distances`` exactly; one
that leaves its anchor's database sequence is not scored (``+inf``).

Scoring across trajectories (``ScoringRule``). Every rule is of the form
``score(q, j) = min_t [a(q, t) * d_t(q, j) + b(q, t)]`` with ``a > 0``, where ``a`` and ``b`` depend only on
per-(query, trajectory) statistics over the whole database (best score, mean, std) and on the query's
neighbours in its own query sequence. Within one trajectory the order of the database windows is therefore
that of ``d_t``, and the top-k of the final scores is exactly the merge of the per-trajectory top-k lists:
``TrajectoryTopK`` streams blocks, keeps those lists and the statistics, and ``finish`` merges them.
The default rule (``DEFAULT_RULE``) is the *normalised speed consensus*: each (query, trajectory)'s distances
are z-normalised by their mean and std over the database (``a = 1 / std``, ``b0 = -mean / std``); the
best normalised score of each trajectory, averaged over the query windows within ``+-20`` of the query (same
query sequence), says which speed the query traversal drives there, and
``b = b0 + 3 * (consensus(q, t) - min_t' consensus(q, t'))``. ``docs/speeds.md`` has the measurements behind
it and the alternatives (``ScoringRule``).

API (shapes: ``T`` trajectories, ``L`` sequence length, ``A`` database anchors, ``B`` query anchors):

- ``parse_velocities(text) -> tuple[float, ...]``: ``"VMIN:VMAX:VSTEP"`` (VMAX included) or ``"a,b,c"``;
  ``UserError`` naming ``--velocities`` on malformed input.
- ``round_half_away(x)``; ``trajectories(velocities, seq_len, anchor, grid) -> Trajectories`` (``UserError``
  when more than ``MAX_TRAJECTORIES`` distinct trajectories); ``anchor_margin(traj) -> (before, after)``.
- ``trajectory_distances(frame_dists [M, N], anchors [A], bounds [A, 2], q_cols [B], traj) -> [T, A, B]``.
- ``TrajectoryTopK(num_queries, traj, k)``: ``add(q_lo, dists [T, A, B], db_ids [A])``, then
  ``finish(q_segments, rule) -> (ids [Nq, k], scores [Nq, k] float32, velocity [Nq, k])``.
- ``rule_coefficients(rule, stats, q_segments) -> (a, b)`` ``[Nq, T]`` (non-causal: neighbours both sides);
  ``causal_coefficients(rule, best, mean, std [W, T]) -> (a, b) [T]`` is the causal form for localisation.
- Training: ``trajectory_frames(anchors [...], bounds [..., 2], traj) -> (frames [..., T, L(, 2)], valid)``,
  ``tap_weights(traj)`` and ``trajectory_sequence_distance(fq [..., L, D], fdb, valid, ..., weights) -> [...]``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

import blocks
from seqMatchNet import frame_distances, sequence_distance, sequence_frame_distances, topk_by_value_then_index
from utils import UserError

FLAG = "--velocities"
MAX_VELOCITY = 8.0          # database frames per query frame; a faster trajectory spans > 8 L frames
MAX_LISTED = 1000           # velocities a range or list may name before they are snapped to trajectories
MAX_TRAJECTORIES = 16       # distinct trajectories searched: the cost of a search grows with each one
RECOMMENDED = "0.5:2:0.5"   # the range docs/speeds.md recommends (on the half grid)
SNAP = 1e-9                 # v * k within this of a half counts as the half (decimal velocities)


# ---------------------------------------------------------------- velocities and trajectories

def parse_velocities(text: str) -> tuple[float, ...]:
    """``"VMIN:VMAX:VSTEP"`` (inclusive of VMAX within float tolerance) or ``"a,b,c"`` -> velocities.

    Velocities are database frames per query frame; ``"1"`` is the diagonal. Raises ``UserError`` (one
    line, naming ``--velocities``) on anything malformed: not numbers, ``VMIN > VMAX``, ``VSTEP <= 0``, a
    negative or non-finite velocity, one above ``MAX_VELOCITY``, or more than ``MAX_LISTED`` values.
    """
    text = str(text).strip()
    hint = f"give VMIN:VMAX:VSTEP (e.g. {RECOMMENDED}) or a comma list (e.g. 0.5,1,2); 1 is the diagonal"
    if not text:
        raise UserError(f"{FLAG} is empty: {hint}")
    try:
        if ":" in text:
            parts = [float(p) for p in text.split(":")]
            if len(parts) != 3:
                raise ValueError
        else:
            parts = [float(p) for p in text.split(",")]
    except ValueError:
        raise UserError(f"{FLAG} {text!r} is not numbers: {hint}") from None
    if not all(math.isfinite(p) for p in parts):
        raise UserError(f"{FLAG} {text!r} holds a non-finite value: {hint}")
    if ":" in text:
        vmin, vmax, step = parts
        if step <= 0:
            raise UserError(f"{FLAG} {text!r}: the step must be > 0: {hint}")
        if vmin > vmax:
            raise UserError(f"{FLAG} {text!r}: VMIN is above VMAX: {hint}")
        count = int(math.floor((vmax - vmin) / step + 1e-9)) + 1
        if count > MAX_LISTED:
            raise UserError(f"{FLAG} {text!r} lists {count} velocities (at most {MAX_LISTED}): use a larger step")
        parts = [round(vmin + i * step, 10) for i in range(count)]
    elif len(parts) > MAX_LISTED:
        raise UserError(f"{FLAG} lists {len(parts)} velocities (at most {MAX_LISTED}): list fewer")
    bad = [p for p in parts if p < 0 or p > MAX_VELOCITY]
    if bad:
        raise UserError(f"{FLAG} {text!r}: velocity {bad[0]:g} is outside [0, {MAX_VELOCITY:g}] (database frames "
                        f"per query frame): {hint}")
    return tuple(dict.fromkeys(float(p) for p in parts))


def round_half_away(x) -> np.ndarray:
    """Round to the nearest integer, halves away from zero (SeqSLAM's MATLAB ``round``), as int64."""
    x = np.asarray(x, dtype=np.float64)
    return (np.sign(x) * np.floor(np.abs(x) + 0.5)).astype(np.int64)


@dataclass(frozen=True, eq=False)
class Trajectories:
    """Distinct database trajectories of one sequence length.

    ``q_offsets`` ``[L]`` the query window's frames relative to its anchor. Each row ``t`` is one trajectory
    whose ``k``-th frame sits at the database position ``anchor + steps[t, k] + weights[t, k]``: ``steps``
    ``[T, L]`` whole frames (the floor), ``weights`` ``[T, L]`` the fraction in ``[0, 1)`` (0 on whole frames,
    ``1/2`` at the midpoint of two frames on the half grid). ``velocities`` ``[T]`` the velocity nearest 1
    giving each row and ``phases`` ``[T]`` its anchor's sub-frame phase (``0`` or ``1/2``), ordered by
    ``|v - 1|``, then ``v``, then the phase (row 0 wins ties); ``anchor`` ``"centre"`` or ``"end"``; ``grid``
    positions per frame (1 whole frames, 2 half frames); ``listed`` how many velocities were asked for.
    """

    q_offsets: np.ndarray
    steps: np.ndarray
    weights: np.ndarray
    velocities: np.ndarray
    phases: np.ndarray
    anchor: str
    grid: int
    listed: int

    @property
    def seq_len(self) -> int:
        return len(self.q_offsets)

    @property
    def count(self) -> int:
        return len(self.steps)

    @property
    def is_diagonal(self) -> bool:
        """One trajectory, the diagonal: scores are today's sequence distances."""
        return self.count == 1 and bool(np.array_equal(self.steps[0], self.q_offsets)) and not self.weights.any()

    @property
    def reach(self) -> tuple[np.ndarray, np.ndarray]:
        """``(first, last)`` ``[T]``: the lowest and highest database frame of each trajectory relative to its
        anchor (a sub-frame position needs both of its neighbours)."""
        return self.steps.min(axis=1), (self.steps + (self.weights > 0)).max(axis=1)


GRIDS = {"half": 2, "whole": 1}     # --trajectoryGrid: positions per database frame


def query_offsets(seq_len: int, anchor: str = "centre") -> np.ndarray:
    """``[L]`` offsets of a query window's frames from its anchor (centre: ``start + L // 2``; end: last)."""
    if anchor == "centre":
        return np.arange(seq_len, dtype=np.int64) - seq_len // 2
    if anchor == "end":
        return np.arange(seq_len, dtype=np.int64) - (seq_len - 1)
    raise ValueError(f"anchor must be 'centre' or 'end', got {anchor!r}")


def trajectories(velocities, seq_len: int, anchor: str = "centre", grid: int = 1) -> Trajectories:
    """The distinct trajectories that ``velocities`` give for windows of ``seq_len`` frames on ``grid``.

    ``grid`` 1 (whole frames, SeqSLAM): the trajectory of velocity ``v`` anchored at frame ``j`` uses the
    frames ``j + round(v * k)``. ``grid`` 2 (half frames): trajectories are anchored at ``j`` and at
    ``j + 1/2`` (phase ``s``), their positions ``j + s + v * k`` are rounded to the nearest half frame, and a
    midpoint's frame distance is the mean of its two neighbours'; either anchor reports frame ``j``. Rounding
    is half away from zero in grid units. Velocities ``{1}`` alone are the diagonal on any grid. Raises
    ``UserError`` naming ``--velocities`` when they give more than ``MAX_TRAJECTORIES``.
    """
    if seq_len < 1:
        raise ValueError(f"seq_len must be at least 1, got {seq_len}")
    if grid not in GRIDS.values():
        raise ValueError(f"grid must be one of {sorted(GRIDS.values())}, got {grid}")
    v = np.asarray(list(velocities), dtype=np.float64)
    if v.ndim != 1 or len(v) == 0 or not np.isfinite(v).all() or (v < 0).any():
        raise UserError(f"{FLAG} needs at least one finite velocity >= 0, got {list(velocities)}")
    grid = 1 if bool((v == 1.0).all()) else grid
    k = query_offsets(seq_len, anchor)
    phase = np.repeat(np.arange(grid) / grid, len(v))                      # [P * V]
    vel = np.tile(v, grid)
    order = np.lexsort((phase, vel, np.abs(vel - 1.0)))   # nearest 1 first; then the smaller; then phase 0
    phase, vel = phase[order], vel[order]
    units = round_half_away(np.round((phase[:, None] + vel[:, None] * k[None, :]) * grid / SNAP) * SNAP)
    _, first = np.unique(units, axis=0, return_index=True)
    keep = np.sort(first)                                   # first occurrence = the velocity nearest 1
    if len(keep) > MAX_TRAJECTORIES:
        raise UserError(f"{FLAG} gives {len(keep)} distinct trajectories for seqL {seq_len} (at most "
                        f"{MAX_TRAJECTORIES}: each one adds to the search time and to the false matches): narrow the "
                        f"range or use a larger step, e.g. {RECOMMENDED}{' or --trajectoryGrid whole' * (grid > 1)}")
    units = units[keep]
    return Trajectories(q_offsets=k, steps=np.floor_divide(units, grid), weights=np.remainder(units, grid) / grid,
                        velocities=vel[keep], phases=phase[keep], anchor=anchor, grid=grid, listed=len(v))


def anchor_margin(traj: Trajectories) -> tuple[int, int]:
    """``(before, after)``: database frames a trajectory may reach before and after its anchor."""
    first, last = traj.reach
    return int(max(0, -first.min())), int(max(0, last.max()))


def describe(traj: Trajectories) -> str:
    """One line for logs: how many velocities and trajectories, and their velocities."""
    vs = ", ".join(f"{v:g}" for v in sorted(set(traj.velocities.tolist())))
    grid = "half-frame" if traj.grid == 2 else "whole-frame"
    return (f"{traj.listed} velocities -> {traj.count} distinct {grid} trajectories of seqL {traj.seq_len} "
            f"(v = {vs})")


# ---------------------------------------------------------------- the kernel

def trajectory_distances(frame_dists: torch.Tensor, anchors, bounds, q_cols, traj: Trajectories) -> torch.Tensor:
    """Mean frame distance of every trajectory: ``[M, N] -> [T, A, B]`` float32.

    ``frame_dists`` ``[M, N]``: database rows x query columns of one block (any float dtype).
    ``anchors`` ``[A]``: database anchor rows in the block; ``bounds`` ``[A, 2]``: each anchor's allowed rows
    ``[lo, hi)`` (its database sequence, in block rows); ``q_cols`` ``[B]``: query anchor columns, whose
    frames ``q_cols + q_offsets`` must lie in the block. Entry ``[t, a, b]`` is the mean over ``k`` (summed in
    ascending ``k``) of the distance at the position ``anchors[a] + steps[t, k] + weights[t, k]`` to the query
    frame ``q_cols[b] + q_offsets[k]``: the frame distance on a whole frame, the mean of the two neighbours'
    at a midpoint; ``+inf`` when a frame of the trajectory is outside ``bounds[a]``. Rows inside the bounds
    must lie in the block (``ValueError`` otherwise): size the block with ``anchor_margin``. No loop over
    anchors: ``L`` column gathers, then ``T x L`` shifted slices (or row gathers for scattered anchors).
    """
    device = frame_dists.device
    anchors = torch.as_tensor(anchors, dtype=torch.long, device=device)
    bounds = torch.as_tensor(bounds, dtype=torch.long, device=device).reshape(-1, 2)
    q_cols = torch.as_tensor(q_cols, dtype=torch.long, device=device)
    m, _ = frame_dists.shape
    reach_lo, reach_hi = (torch.as_tensor(r, device=device) for r in traj.reach)
    first, last = anchors[:, None] + reach_lo[None, :], anchors[:, None] + reach_hi[None, :]        # [A, T]
    valid = (first >= bounds[:, :1]) & (last < bounds[:, 1:])           # [A, T]
    if bool(((first < 0) | (last >= m))[valid].any()):
        raise ValueError("a trajectory inside its database bounds reaches outside the frame-distance block: "
                         "extend the block by velocity.anchor_margin rows")
    if not set(np.unique(traj.weights).tolist()) <= {0.0, 0.5}:
        raise ValueError(f"sub-frame weights other than 1/2 are not supported: {np.unique(traj.weights)}")
    out = torch.empty((traj.count, len(anchors), len(q_cols)), dtype=torch.float32, device=device)
    if len(anchors) == 0 or len(q_cols) == 0:
        return out
    lo, hi = int(anchors.min()), int(anchors.max()) + 1
    c_lo, c_hi = int(q_cols.min()), int(q_cols.max()) + 1
    if len(anchors) * 2 >= hi - lo and len(q_cols) * 2 >= c_hi - c_lo:      # compact: 2-D shifted slices
        _shifted_sums(frame_dists, anchors, q_cols, traj, out)
    else:
        halves = bool(traj.weights.any())
        cols = [frame_dists[:, q_cols + int(k)].to(torch.float32) for k in traj.q_offsets]   # L x [M, B]
        mids = [blocks.midpoints(c) if halves else None for c in cols]
        for t in range(traj.count):
            acc = None
            for j, (st, w) in enumerate(zip(traj.steps[t], traj.weights[t])):
                src = cols[j] if w == 0 else mids[j]
                part = src[(anchors + int(st)).clamp(0, len(src) - 1)]
                acc = part if acc is None else acc.add_(part)
            out[t] = acc.div_(traj.seq_len)
    for t in torch.nonzero(~valid.all(dim=0)).flatten().tolist():
        out[t].index_fill_(0, torch.nonzero(~valid[:, t]).flatten(), torch.inf)
    return out


def _shifted_sums(frame_dists: torch.Tensor, anchors: torch.Tensor, q_cols: torch.Tensor, traj: Trajectories,
                  out: torch.Tensor) -> None:
    """``trajectory_distances`` for anchors and columns that fill most of their ranges: per trajectory ``L``
    added slices of the block (or of its midpoints), written straight into ``out[t]`` when anchors and
    columns are exactly ranges, else into one buffer and placed by runs (``blocks.place_by_runs``)."""
    device, m = frame_dists.device, frame_dists.shape[0]
    lo, hi = int(anchors.min()), int(anchors.max()) + 1
    c_lo, c_hi = int(q_cols.min()), int(q_cols.max()) + 1
    k_lo = int(traj.q_offsets.min())
    fd = frame_dists if frame_dists.dtype == torch.float32 else frame_dists.to(torch.float32)
    fd = fd[:, c_lo + k_lo:c_hi + int(traj.q_offsets.max())]
    mid = blocks.midpoints(fd) if traj.weights.any() else None                  # [M - 1, ...] neighbour means
    row_runs, col_runs = blocks.index_runs(anchors), blocks.index_runs(q_cols)
    buf, (reach_lo, reach_hi) = None, traj.reach
    for t in range(traj.count):
        r_lo, r_hi = int(reach_lo[t]), int(reach_hi[t])
        base = max(lo, -r_lo)                                # anchors base..top-1 keep all frames in the block
        top = max(min(hi, m - r_hi), base)
        if top <= base:
            out[t] = torch.inf
            continue
        main = blocks.main_block(row_runs, col_runs, base, top)
        if main is not None:            # most anchors and columns in one run: sum straight into out[t]
            (i0, v0, n0), (j0, w0, m0) = main
            acc, a_lo, c_lo_t = out[t, i0:i0 + n0, j0:j0 + m0], v0, w0
        else:                           # scattered: sum into a buffer, then place by runs
            buf = torch.empty((hi - lo, c_hi - c_lo), dtype=torch.float32, device=device) if buf is None else buf
            acc, a_lo, c_lo_t, n0, m0 = buf[:top - base], base, c_lo, top - base, c_hi - c_lo
        parts = [(fd if w == 0 else mid)[a_lo + int(st):a_lo + n0 + int(st),
                                          c_lo_t - c_lo + int(k) - k_lo:c_lo_t - c_lo + int(k) - k_lo + m0]
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


def chunk_distances(feats: torch.Tensor, q_feats: torch.Tensor, anchors: np.ndarray, bounds: np.ndarray,
                    q_starts: np.ndarray, traj: Trajectories, query_chunk: int):
    """Yields ``(first query, trajectory distances [T, A, B])`` per chunk of ``query_chunk`` query windows
    (centred, starting at ``q_starts``): the frame distances of the chunk's frames to the database rows
    ``feats`` once (one product), then every trajectory of the ``anchors`` (rows of ``feats``, sequences
    ``bounds``) as shifted sums of them (``trajectory_distances``)."""
    half = traj.seq_len // 2
    for lo in range(0, len(q_starts), query_chunk):
        starts = np.asarray(q_starts[lo:lo + query_chunk])
        f_lo, f_hi = int(starts.min()), int(starts.max()) + traj.seq_len
        frames = frame_distances(feats, q_feats[f_lo:f_hi])
        dists = trajectory_distances(frames, anchors, bounds, starts + half - f_lo, traj)
        del frames
        yield lo, dists


# ---------------------------------------------------------------- scoring rules

@dataclass(frozen=True)
class ScoringRule:
    """How the trajectories of one query window combine into one score per database window.

    ``kind``: ``"min"`` (the plain minimum over trajectories), ``"consensus"`` (the speed consensus of the
    neighbouring query windows, see the module docstring), ``"prior"`` (a fixed offset towards the trajectory
    that most windows of the query's sequence prefer), ``"zscore"`` (each (query, trajectory) normalised by the
    mean and std of its scores over the database; combine with ``consensus`` through ``normalise``).
    ``window``: neighbours ``+-window`` query windows (consensus); ``weight``: the offset's weight (``b`` is
    ``weight`` times a distance difference for ``consensus``, ``weight`` times the vote share missing for
    ``prior``); ``normalise``: z-normalise each (query, trajectory) first (``a = 1 / std``).
    """

    kind: str = "consensus"
    window: int = 20
    weight: float = 3.0
    normalise: bool = True

    @property
    def neighbours(self) -> int | None:
        """Query windows each side whose statistics a query's coefficients read (None: its whole sequence)."""
        return None if self.kind == "prior" else self.window if self.kind == "consensus" else 0

    def __post_init__(self) -> None:
        if self.kind not in ("min", "consensus", "prior", "zscore"):
            raise ValueError(f"unknown scoring rule {self.kind!r}")
        if self.window < 0 or not self.weight >= 0:
            raise ValueError(f"window and weight must be >= 0, got {self.window}, {self.weight}")


DEFAULT_RULE = ScoringRule(kind="consensus", window=20, weight=3.0, normalise=True)
PLAIN_MIN = ScoringRule(kind="min", window=0, weight=0.0, normalise=False)


def segment_ids(q_segments) -> np.ndarray:
    """Per query a segment id ``[Nq]`` from ids ``[Nq]`` or bounds ``[Nq, 2]`` (the id is the lower bound)."""
    seg = np.asarray(q_segments)
    return (seg[:, 0] if seg.ndim == 2 else seg).astype(np.int64)


def neighbour_mean(x: np.ndarray, seg: np.ndarray, window: int) -> np.ndarray:
    """Mean of the finite values of ``x`` ``[Nq, T]`` over the queries ``q - window .. q + window`` of the same
    segment (queries in driving order, a segment's queries consecutive); NaN where none is finite."""
    n = len(x)
    finite = np.isfinite(x)
    cs = np.concatenate([np.zeros((1, x.shape[1])), np.cumsum(np.where(finite, x, 0.0), axis=0)])
    cn = np.concatenate([np.zeros((1, x.shape[1])), np.cumsum(finite, axis=0)])
    idx = np.arange(n)
    starts = np.flatnonzero(np.r_[True, seg[1:] != seg[:-1]])
    seg_lo = starts[np.searchsorted(starts, idx, side="right") - 1]
    seg_hi = np.r_[starts[1:], n][np.searchsorted(starts, idx, side="right") - 1]
    lo, hi = np.maximum(idx - window, seg_lo), np.minimum(idx + window + 1, seg_hi)
    count = cn[hi] - cn[lo]
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(count > 0, (cs[hi] - cs[lo]) / np.maximum(count, 1), np.nan)


def rule_coefficients(rule: ScoringRule, stats: dict[str, np.ndarray], q_segments) -> tuple[np.ndarray, np.ndarray]:
    """``(a, b)`` ``[Nq, T]`` float64 of ``rule`` from per-(query, trajectory) statistics over the database.

    ``stats``: ``best`` (smallest distance), ``sum``, ``sumsq`` and ``count`` of the finite distances, each
    ``[Nq, T]``; ``q_segments``: the queries' sequences (``segment_ids``). ``b`` is ``+inf`` for a trajectory
    that the rule excludes (never scored for that query).
    """
    best = stats["best"].astype(np.float64)
    nq, nt = best.shape
    a, b = np.ones((nq, nt)), np.zeros((nq, nt))
    if rule.normalise or rule.kind == "zscore":
        count = np.maximum(stats["count"], 1)
        mean = stats["sum"] / count
        std = np.sqrt(np.maximum(stats["sumsq"] / count - mean ** 2, 0.0))
        std = np.where(std > 0, std, 1.0)
        a, b = 1.0 / std, -mean / std
        best = np.where(np.isfinite(best), (best - mean) / std, np.inf)
    if rule.kind == "consensus":
        seg = segment_ids(q_segments)
        cons = neighbour_mean(best, seg, rule.window)
        cons = np.where(np.isnan(cons), np.inf, cons)
        b = b + rule.weight * _excess(cons)
    elif rule.kind == "prior":
        b = b + rule.weight * _vote_penalty(best, segment_ids(q_segments))
    return a, np.where(np.isfinite(best).any(axis=1, keepdims=True) & ~np.isfinite(best), np.inf, b)


def _excess(cons: np.ndarray) -> np.ndarray:
    """``cons - min over trajectories`` per row (``inf`` stays ``inf``; a row without finite values: 0)."""
    low = np.min(cons, axis=1, keepdims=True)
    low = np.where(np.isfinite(low), low, 0.0)
    return np.where(np.isfinite(cons), cons - low, np.where(np.isfinite(low), np.inf, 0.0))


def _vote_penalty(best: np.ndarray, seg: np.ndarray) -> np.ndarray:
    """Per query and trajectory, the share of its segment's queries that prefer another trajectory."""
    winner = np.argmin(np.where(np.isfinite(best), best, np.inf), axis=1)
    out = np.empty_like(best)
    for s in np.unique(seg):
        rows = seg == s
        share = np.bincount(winner[rows], minlength=best.shape[1]) / rows.sum()
        out[rows] = 1.0 - share
    return out


def causal_coefficients(rule: ScoringRule, best: np.ndarray, mean: np.ndarray, std: np.ndarray
                        ) -> tuple[np.ndarray, np.ndarray]:
    """Causal ``(a, b)`` ``[T]`` for the newest query of a sequence (localisation).

    ``best``, ``mean``, ``std`` ``[W, T]``: per trajectory, the best distance over the database and the mean
    and std of its distances, for the newest ``W <= window + 1`` queries of the current sequence (oldest
    first, the newest last). ``consensus`` averages over those queries instead of a centred neighbourhood;
    ``min``: ``a = 1, b = 0``. (``prior`` and ``zscore`` alone have no causal form here: ``ValueError``.)
    """
    best = np.asarray(best, dtype=np.float64)
    nt = best.shape[1]
    if rule.kind == "min" and not rule.normalise:
        return np.ones(nt), np.zeros(nt)
    if rule.kind != "consensus":
        raise ValueError(f"no causal form of the scoring rule {rule}")
    a, b = np.ones(nt), np.zeros(nt)
    if rule.normalise:
        std = np.where(np.asarray(std) > 0, std, 1.0)
        best = np.where(np.isfinite(best), (best - mean) / std, np.inf)
        a, b = 1.0 / std[-1], -np.asarray(mean)[-1] / std[-1]
    finite = np.isfinite(best)
    count = finite.sum(axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        cons = np.where(count > 0, np.where(finite, best, 0.0).sum(axis=0) / np.maximum(count, 1), np.inf)
    return a, b + rule.weight * _excess(cons[None])[0]


# ---------------------------------------------------------------- the streaming search

class TrajectoryTopK:
    """Per query and trajectory, the ``k`` best database windows of a search streamed in blocks.

    ``num_queries`` query windows (in driving order); ``traj`` the trajectories; ``k`` the list length.
    ``add(q_lo, dists, db_ids)`` takes one block: ``dists`` ``[T, A, B]`` from ``trajectory_distances`` for
    the queries ``q_lo .. q_lo + B - 1`` and the database windows with global ids ``db_ids`` ``[A]`` (each
    window at most once per query over all blocks). It keeps, per (query, trajectory), the ``k`` smallest
    ``(distance, id)`` (ties by ascending id, ``seqMatchNet.topk_by_value_then_index``) and the statistics the
    scoring rules need (``best``, ``sum``, ``sumsq``, ``count`` of the finite distances, float64).
    ``finish(q_segments, rule)`` applies the rule and merges the lists.
    """

    def __init__(self, num_queries: int, traj: Trajectories, k: int, device: torch.device | str = "cpu") -> None:
        self.traj, self.k, self.num_queries = traj, int(k), int(num_queries)
        self.device = torch.device(device)
        shape = (traj.count, self.num_queries)
        self.values = torch.full((*shape, self.k), torch.inf, device=self.device)          # [T, Nq, k] float32
        self.ids = torch.full((*shape, self.k), -1, dtype=torch.long, device=self.device)  # -1: empty slot
        self.seen = np.zeros(self.num_queries, dtype=np.int64)                             # windows per query
        self.stats = {"best": np.full(shape, np.inf), "sum": np.zeros(shape), "sumsq": np.zeros(shape),
                      "count": np.zeros(shape)}

    def add(self, q_lo: int, dists: torch.Tensor, db_ids) -> None:
        """Merge one block ``[T, A, B]`` (queries ``q_lo..q_lo+B-1``, database windows ``db_ids`` ``[A]``)."""
        n_t, n_a, n_b = dists.shape
        if n_t != self.traj.count or q_lo < 0 or q_lo + n_b > self.num_queries:
            raise ValueError(f"block {tuple(dists.shape)} at query {q_lo} does not fit {self.traj.count} "
                             f"trajectories x {self.num_queries} queries")
        if n_a == 0 or n_b == 0:
            return
        db_ids = torch.as_tensor(db_ids, dtype=torch.long, device=dists.device)
        self.add_stats(q_lo, dists)
        self.seen[q_lo:q_lo + n_b] += n_a
        kk = min(self.k, n_a)
        keys = db_ids.expand(n_b, n_a)
        for t in range(n_t):
            v, pos = topk_by_value_then_index(dists[t].T, kk, ids=keys)
            self.add_list(t, q_lo, v.to(self.device), db_ids[pos].to(self.device))

    def add_stats(self, q_lo: int, dists: torch.Tensor) -> None:
        """Per (trajectory, query): best, sum, sum of squares (float64) and count of the finite distances.

        A trajectory is unscored (``+inf``) for an anchor in every column alike, so column 0 tells which rows
        count; sums run over those rows only."""
        sl = (slice(None), slice(q_lo, q_lo + dists.shape[2]))
        self.stats["best"][sl] = np.minimum(self.stats["best"][sl], dists.amin(dim=1).double().cpu().numpy())
        finite = torch.isfinite(dists[:, :, 0])                                  # [T, A]
        for t in range(dists.shape[0]):
            rows = blocks.index_runs(torch.nonzero(finite[t]).flatten())
            d = dists[t, rows[0][1]:rows[0][1] + rows[0][2]] if len(rows) == 1 else dists[t][finite[t]]
            total, squares = blocks.float64_column_sums(d)
            self.stats["sum"][t, sl[1]] += total.cpu().numpy()
            self.stats["sumsq"][t, sl[1]] += squares.cpu().numpy()
            self.stats["count"][t, sl[1]] += len(d)

    def coefficients(self, q_segments, rule: ScoringRule = DEFAULT_RULE, lo: int = 0,
                     hi: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """``(a, b)`` ``[hi - lo, T]`` of ``rule`` for the queries ``lo .. hi - 1`` (default: all) from the
        statistics gathered so far (``rule_coefficients``), which must include the neighbours it reads."""
        hi = self.num_queries if hi is None else hi
        reach = self.num_queries if rule.neighbours is None else rule.neighbours
        s_lo, s_hi = max(0, lo - reach), min(self.num_queries, hi + reach)
        a, b = rule_coefficients(rule, {key: v[:, s_lo:s_hi].T for key, v in self.stats.items()},
                                 np.asarray(q_segments)[s_lo:s_hi])
        return a[lo - s_lo:hi - s_lo], b[lo - s_lo:hi - s_lo]

    def add_list(self, t: int, q_lo: int, vals: torch.Tensor, idx: torch.Tensor) -> None:
        """Merge ``[B, k']`` new entries of trajectory ``t`` (ids -1: empty) into the lists of queries ``q_lo..``."""
        rows = slice(q_lo, q_lo + len(vals))
        cat_v = torch.cat([self.values[t, rows], vals], dim=1)
        cat_i = torch.cat([self.ids[t, rows], idx], dim=1)
        empty_key = int(cat_i.max()) + 1 + torch.arange(cat_i.shape[1], device=cat_i.device)   # after every id
        top_v, pos = topk_by_value_then_index(cat_v, self.k, ids=torch.where(cat_i < 0, empty_key, cat_i))
        self.values[t, rows], self.ids[t, rows] = top_v, torch.gather(cat_i, 1, pos)

    def finish(self, q_segments, rule: ScoringRule = DEFAULT_RULE
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(ids [Nq, k], scores [Nq, k] float32, velocity [Nq, k])`` ordered by score, then database id,
        then the velocity nearest 1. ``scores`` are the rule's adjusted scores (the plain ``"min"``: the mean
        frame distance); ``velocity`` is the trajectory's that gave each score. Each database window appears
        once; windows no trajectory could score come last with ``+inf``. ``q_segments``: ``[Nq]`` ids or
        ``[Nq, 2]`` bounds of each query's sequence (``segment_ids``).
        """
        if not self.seen.all():
            raise ValueError(f"{int((self.seen == 0).sum())} queries were never scored")
        a, b = self.coefficients(q_segments, rule)                                                  # [Nq, T]
        n_t, nq, kk = self.values.shape
        a_t = torch.as_tensor(a.T, dtype=torch.float32, device=self.device)[:, :, None]
        b_t = torch.as_tensor(b.T, dtype=torch.float32, device=self.device)[:, :, None]
        adj = (a_t * self.values + b_t).where(torch.isfinite(self.values), torch.inf)       # [T, Nq, k'] float32
        adj = adj.permute(1, 0, 2).reshape(nq, n_t * kk)
        ids = self.ids.permute(1, 0, 2).reshape(nq, n_t * kk)
        tid = torch.arange(n_t).repeat_interleave(kk).expand(nq, -1)
        # one entry per database window: its smallest adjusted score, the trajectory nearest 1 among equal ones
        order = torch.argsort(tid, dim=1, stable=True)
        for key in (adj, ids):
            order = torch.gather(order, 1, torch.argsort(torch.gather(key, 1, order), dim=1, stable=True))
        s_ids = torch.gather(ids, 1, order)
        dup = torch.cat([torch.zeros((nq, 1), dtype=torch.bool), s_ids[:, 1:] == s_ids[:, :-1]], dim=1)
        dup |= s_ids < 0
        big = (int(s_ids.max()) + 1) * n_t            # keys stay small: topk_by_value_then_index multiplies them
        key = torch.where(dup, big + torch.arange(n_t * kk).expand(nq, -1), s_ids * n_t + torch.gather(tid, 1, order))
        s_adj = torch.gather(adj, 1, order).masked_fill(dup, torch.inf)
        width = int(min(self.k, self.seen.min()))
        top, pos = topk_by_value_then_index(s_adj, width, ids=key)
        pos = torch.gather(order, 1, pos)
        vel = torch.as_tensor(self.traj.velocities)[torch.gather(tid, 1, pos)]
        return torch.gather(ids, 1, pos), top, vel


# ---------------------------------------------------------------- training

def trajectory_frames(anchors, bounds, traj: Trajectories) -> tuple[torch.Tensor, torch.Tensor]:
    """Database frames of every trajectory of every anchor, for gathering descriptors in the loss.

    ``anchors`` ``[...]`` database anchor frames (for centred windows: window start + ``L // 2``), ``bounds``
    ``[..., 2]`` their sequences ``[lo, hi)``. Returns ``(frames, valid [..., T])``: ``frames`` ``[..., T, L]``
    the frames ``anchor + steps[t]`` on the whole grid, and ``[..., T, L, 2]`` (the lower and the upper frame
    of each position, weighted by ``tap_weights``; the upper is the lower on a whole frame) when ``traj``
    has midpoints. Frames are clamped into the bounds where the trajectory leaves them (``valid`` False
    there), so ``feats[frames]`` is always defined. The caller must hold the descriptors of all those frames
    (the anchor's frames ``-before .. +after`` of ``anchor_margin``, within its sequence).
    """
    anchors = torch.as_tensor(anchors, dtype=torch.long)
    bounds = torch.as_tensor(bounds, dtype=torch.long, device=anchors.device)
    steps = torch.as_tensor(traj.steps, device=anchors.device)                     # [T, L]
    lo, hi = bounds[..., 0, None, None], bounds[..., 1, None, None]
    if traj.weights.any():
        upper = steps + torch.as_tensor(traj.weights > 0, device=anchors.device)
        steps, lo, hi = torch.stack([steps, upper], dim=-1), lo[..., None], hi[..., None]      # [T, L, 2]
    frames = anchors.reshape(*anchors.shape, *([1] * steps.ndim)) + steps          # [..., T, L(, 2)]
    valid = ((frames >= lo) & (frames < hi)).flatten(start_dim=anchors.ndim + 1).all(dim=-1)
    return torch.minimum(torch.maximum(frames, lo), hi - 1), valid


def tap_weights(traj: Trajectories) -> torch.Tensor | None:
    """``[T, L, 2]`` float32 weights ``(1 - w, w)`` of the lower and upper frames of ``trajectory_frames``;
    None on the whole grid (one frame per position)."""
    if not traj.weights.any():
        return None
    w = torch.as_tensor(traj.weights, dtype=torch.float32)
    return torch.stack([1.0 - w, w], dim=-1)


def trajectory_sequence_distance(fq: torch.Tensor, fdb: torch.Tensor, valid: torch.Tensor | None = None,
                                 method: str = "meanOfPairs", temperature: float = 0.0,
                                 weights: torch.Tensor | None = None) -> torch.Tensor:
    """Differentiable sequence distance across trajectories: ``[..., L, D] x [..., T, L, D] -> [...]``.

    ``fq`` the query window's frames (in ``q_offsets`` order), ``fdb`` each trajectory's database frames
    (``trajectory_frames``), ``valid`` ``[..., T]`` (default: all). Per trajectory the aligned
    ``seqMatchNet.sequence_distance``; then the minimum over the valid trajectories (``temperature`` 0: the
    gradient flows through the best one) or the soft minimum ``-tau * logsumexp(-d / tau)`` (``tau > 0``).
    With midpoints, ``fdb`` is ``[..., T, L, 2, D]`` and ``weights`` ``[T, L, 2]`` (``tap_weights``): a
    position's distance is the weighted sum of its two frames' distances. ``+inf`` where no trajectory is
    valid. With the diagonal alone this is ``sequence_distance``.
    """
    if weights is None:
        d = sequence_distance(fq[..., None, :, :], fdb, method)                    # [..., T]
    else:
        if method not in ("meanOfPairs", "centerOnly"):
            raise ValueError(f"unknown sequence distance {method!r}")
        weights = weights.to(fdb.device, fdb.dtype)
        per_tap = sequence_frame_distances(fq[..., None, :, None, :], fdb)           # [..., T, L, 2]
        per_pos = (per_tap * weights).sum(dim=-1)                                  # [..., T, L]
        if method == "centerOnly":
            c = per_pos.shape[-1] // 2
            per_pos = per_pos[..., c:c + 1]
        d = per_pos.mean(dim=-1)
    if valid is not None:
        d = d.masked_fill(~valid, torch.inf)
    if temperature > 0:
        return -temperature * torch.logsumexp(-d / temperature, dim=-1)
    return d.amin(dim=-1)
