"""Sequence matching across speeds: trajectories and their scores.

Sequence matching along the diagonal assumes that both traversals advance one frame per frame. Here a
database *trajectory* may advance ``v`` database frames per query frame (the SeqSLAM idea):

- a query window has offsets ``k`` (``Trajectories.q_offsets``): centred windows (``--mode test``,
  ``anchor="centre"``) ``k = -(L // 2) .. L - 1 - L // 2`` around the window's centre ``start + L // 2``;
  trailing windows (``--mode localize``, ``anchor="end"``) ``k = -(L - 1) .. 0`` back from the newest frame;
- a database trajectory anchored (centred, or ending) at database frame ``j`` with velocity ``v`` uses the
  database frames ``j + round(v * k)``, ``round`` half away from zero (``round_half_away``);
- velocities that give the same offsets are one trajectory (``Trajectories.steps`` ``[T, L]``), represented
  by the velocity nearest 1 among them; trajectories are ordered by closeness to 1, so index 0 wins ties;
- a trajectory with a frame outside its anchor's database sequence is not scored (``+inf``);
- the distance of a trajectory is the mean of its ``L`` frame distances, summed in ascending ``k`` as
  ``seqMatchNet.diagonal_sums`` does: with ``velocities=(1,)`` and anchors at the window centres every
  distance equals ``seqMatchNet.window_distances`` exactly.

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
- ``round_half_away(x)``; ``trajectories(velocities, seq_len, anchor) -> Trajectories`` (``UserError`` when
  more than ``MAX_TRAJECTORIES`` distinct trajectories); ``anchor_margin(traj) -> (before, after)``.
- ``trajectory_distances(frame_dists [M, N], anchors [A], bounds [A, 2], q_cols [B], traj) -> [T, A, B]``.
- ``TrajectoryTopK(num_queries, traj, k)``: ``add(q_lo, dists [T, A, B], db_ids [A])``, then
  ``finish(q_segments, rule) -> (ids [Nq, k], scores [Nq, k] float32, velocity [Nq, k])``.
- ``rule_coefficients(rule, stats, q_segments) -> (a, b)`` ``[Nq, T]`` (non-causal: neighbours both sides);
  ``causal_coefficients(rule, best, mean, std [W, T]) -> (a, b) [T]`` is the causal form for localisation.
- Training: ``trajectory_frames(anchors [...], bounds [..., 2], traj) -> (frames [..., T, L], valid [..., T])``
  and ``trajectory_sequence_distance(fq [..., L, D], fdb [..., T, L, D], valid [..., T]) -> [...]``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from seqMatchNet import frame_distances, sequence_distance, topk_by_value_then_index
from utils import UserError

FLAG = "--velocities"
MAX_VELOCITY = 8.0          # database frames per query frame; a faster trajectory spans > 8 L frames
MAX_LISTED = 1000           # velocities a range or list may name before they are snapped to trajectories
MAX_TRAJECTORIES = 16       # distinct trajectories searched: the cost of a search grows with each one
RECOMMENDED = "0.5:2:0.1"   # the range docs/speeds.md recommends
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

    ``q_offsets`` ``[L]`` the query window's frames relative to its anchor; ``steps`` ``[T, L]`` the
    database frames relative to the database anchor, one row per distinct trajectory; ``velocities``
    ``[T]`` the velocity nearest 1 giving each row, ordered by ``|v - 1|`` then ``v`` (row 0 wins ties);
    ``anchor`` ``"centre"`` or ``"end"``; ``listed`` how many velocities were asked for.
    """

    q_offsets: np.ndarray
    steps: np.ndarray
    velocities: np.ndarray
    anchor: str
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
        return self.count == 1 and bool(np.array_equal(self.steps[0], self.q_offsets))


def query_offsets(seq_len: int, anchor: str = "centre") -> np.ndarray:
    """``[L]`` offsets of a query window's frames from its anchor (centre: ``start + L // 2``; end: last)."""
    if anchor == "centre":
        return np.arange(seq_len, dtype=np.int64) - seq_len // 2
    if anchor == "end":
        return np.arange(seq_len, dtype=np.int64) - (seq_len - 1)
    raise ValueError(f"anchor must be 'centre' or 'end', got {anchor!r}")


def trajectories(velocities, seq_len: int, anchor: str = "centre") -> Trajectories:
    """The distinct trajectories that ``velocities`` give for windows of ``seq_len`` frames.

    Raises ``UserError`` naming ``--velocities`` when they give more than ``MAX_TRAJECTORIES``.
    """
    if seq_len < 1:
        raise ValueError(f"seq_len must be at least 1, got {seq_len}")
    v = np.asarray(list(velocities), dtype=np.float64)
    if v.ndim != 1 or len(v) == 0 or not np.isfinite(v).all() or (v < 0).any():
        raise UserError(f"{FLAG} needs at least one finite velocity >= 0, got {list(velocities)}")
    k = query_offsets(seq_len, anchor)
    order = np.lexsort((v, np.abs(v - 1.0)))               # nearest 1 first; equal distance: the smaller
    steps = round_half_away(np.round(v[order, None] * k[None, :] / SNAP) * SNAP)
    _, first = np.unique(steps, axis=0, return_index=True)
    keep = np.sort(first)                                   # first occurrence = the velocity nearest 1
    if len(keep) > MAX_TRAJECTORIES:
        raise UserError(f"{FLAG} gives {len(keep)} distinct trajectories for seqL {seq_len} (at most "
                        f"{MAX_TRAJECTORIES}: each one adds to the search time and to the false matches): "
                        f"narrow the range or use a larger step, e.g. {RECOMMENDED}")
    return Trajectories(q_offsets=k, steps=steps[keep], velocities=v[order][keep], anchor=anchor, listed=len(v))


def anchor_margin(traj: Trajectories) -> tuple[int, int]:
    """``(before, after)``: database frames a trajectory may reach before and after its anchor."""
    return int(max(0, -traj.steps.min())), int(max(0, traj.steps.max()))


def describe(traj: Trajectories) -> str:
    """One line for logs: how many velocities and trajectories, and their velocities."""
    vs = ", ".join(f"{v:g}" for v in sorted(traj.velocities))
    return f"{traj.listed} velocities -> {traj.count} distinct trajectories of seqL {traj.seq_len} (v = {vs})"


# ---------------------------------------------------------------- the kernel

def trajectory_distances(frame_dists: torch.Tensor, anchors, bounds, q_cols, traj: Trajectories) -> torch.Tensor:
    """Mean frame distance of every trajectory: ``[M, N] -> [T, A, B]`` float32.

    ``frame_dists`` ``[M, N]``: database rows x query columns of one block (any float dtype).
    ``anchors`` ``[A]``: database anchor rows in the block; ``bounds`` ``[A, 2]``: each anchor's allowed rows
    ``[lo, hi)`` (its database sequence, in block rows); ``q_cols`` ``[B]``: query anchor columns, whose
    frames ``q_cols + q_offsets`` must lie in the block. Entry ``[t, a, b]`` is
    ``mean_k frame_dists[anchors[a] + steps[t, k], q_cols[b] + q_offsets[k]]``, summed in ascending ``k``, or
    ``+inf`` when a frame of the trajectory is outside ``bounds[a]``. Rows inside the bounds must lie in the
    block (``ValueError`` otherwise): size the block with ``anchor_margin``. No loop over anchors: ``L``
    column gathers, then ``T x L`` shifted slices (or row gathers for scattered anchors).
    """
    device = frame_dists.device
    anchors = torch.as_tensor(anchors, dtype=torch.long, device=device)
    bounds = torch.as_tensor(bounds, dtype=torch.long, device=device).reshape(-1, 2)
    q_cols = torch.as_tensor(q_cols, dtype=torch.long, device=device)
    m, _ = frame_dists.shape
    steps = torch.as_tensor(traj.steps, device=device)
    first = anchors[:, None] + steps.min(dim=1).values[None, :]           # [A, T]
    last = anchors[:, None] + steps.max(dim=1).values[None, :]
    valid = (first >= bounds[:, :1]) & (last < bounds[:, 1:])           # [A, T]
    if bool(((first < 0) | (last >= m))[valid].any()):
        raise ValueError("a trajectory inside its database bounds reaches outside the frame-distance block: "
                         "extend the block by velocity.anchor_margin rows")
    out = torch.empty((traj.count, len(anchors), len(q_cols)), dtype=torch.float32, device=device)
    if len(anchors) == 0 or len(q_cols) == 0:
        return out
    lo, hi = int(anchors.min()), int(anchors.max()) + 1
    c_lo, c_hi = int(q_cols.min()), int(q_cols.max()) + 1
    if len(anchors) * 2 >= hi - lo and len(q_cols) * 2 >= c_hi - c_lo:      # compact: 2-D shifted slices
        fd = frame_dists if frame_dists.dtype == torch.float32 else frame_dists.to(torch.float32)
        cols = [(c_lo + int(k), c_hi + int(k)) for k in traj.q_offsets]
        for t in range(traj.count):
            st = traj.steps[t]
            base = max(lo, -int(st.min()))                    # anchors base..top-1 keep all frames in the block
            top = max(min(hi, m - int(st.max())), base)
            acc = fd[base + int(st[0]):top + int(st[0]), cols[0][0]:cols[0][1]].clone()
            for i in range(1, len(st)):
                acc += fd[base + int(st[i]):top + int(st[i]), cols[i][0]:cols[i][1]]
            acc.div_(traj.seq_len)
            rows = (anchors - base).clamp(0, max(top - base - 1, 0))
            out[t] = acc[rows[:, None], (q_cols - c_lo)[None, :]] if top > base else torch.inf
    else:
        cols = [frame_dists[:, q_cols + int(k)].to(torch.float32) for k in traj.q_offsets]   # L x [M, B]
        for t in range(traj.count):
            idx = [(anchors + int(s)).clamp(0, m - 1) for s in traj.steps[t]]
            acc = cols[0][idx[0]].clone()
            for j in range(1, len(idx)):
                acc += cols[j][idx[j]]
            out[t] = acc.div_(traj.seq_len)
    for t in torch.nonzero(~valid.all(dim=0)).flatten().tolist():
        out[t].masked_fill_(~valid[:, t, None], torch.inf)
    return out


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
            self._merge(t, q_lo, v.to(self.device), db_ids[pos].to(self.device))

    def add_stats(self, q_lo: int, dists: torch.Tensor) -> None:
        """Per (trajectory, query): best, sum, sum of squares (float64) and count of the finite distances.

        A trajectory is unscored (``+inf``) for an anchor in every column alike, so column 0 tells which rows
        count; sums run over those rows only."""
        sl = (slice(None), slice(q_lo, q_lo + dists.shape[2]))
        self.stats["best"][sl] = np.minimum(self.stats["best"][sl], dists.amin(dim=1).double().cpu().numpy())
        finite = torch.isfinite(dists[:, :, 0])                                  # [T, A]
        for t in range(dists.shape[0]):
            d = dists[t] if bool(finite[t].all()) else dists[t][finite[t]]
            self.stats["sum"][t, sl[1]] += d.sum(dim=0, dtype=torch.float64).cpu().numpy()
            self.stats["sumsq"][t, sl[1]] += d.to(torch.float64).square_().sum(dim=0).cpu().numpy()
            self.stats["count"][t, sl[1]] += len(d)

    def coefficients(self, q_segments, rule: ScoringRule = DEFAULT_RULE) -> tuple[np.ndarray, np.ndarray]:
        """``(a, b)`` ``[Nq, T]`` of ``rule`` from the statistics gathered so far (``rule_coefficients``)."""
        return rule_coefficients(rule, {key: v.T for key, v in self.stats.items()}, q_segments)

    def _merge(self, t: int, q_lo: int, vals: torch.Tensor, idx: torch.Tensor) -> None:
        """Merge ``[B, k']`` new entries of trajectory ``t`` into the lists of queries ``q_lo..``."""
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
    ``[..., 2]`` their sequences ``[lo, hi)``. Returns ``(frames [..., T, L], valid [..., T])``: the frames
    ``anchor + steps[t]``, clamped into the bounds where the trajectory leaves them (``valid`` False there), so
    ``feats[frames]`` is always defined. The caller must hold the descriptors of all those frames (the anchor's
    frames ``-before .. +after`` of ``anchor_margin``, within its sequence), not only the window's ``L``.
    """
    anchors = torch.as_tensor(anchors, dtype=torch.long)
    bounds = torch.as_tensor(bounds, dtype=torch.long, device=anchors.device)
    steps = torch.as_tensor(traj.steps, device=anchors.device)                     # [T, L]
    frames = anchors[..., None, None] + steps                                      # [..., T, L]
    lo, hi = bounds[..., 0, None, None], bounds[..., 1, None, None]
    valid = ((frames >= lo) & (frames < hi)).all(dim=-1)
    return torch.minimum(torch.maximum(frames, lo), hi - 1), valid


def trajectory_sequence_distance(fq: torch.Tensor, fdb: torch.Tensor, valid: torch.Tensor | None = None,
                                 method: str = "meanOfPairs", temperature: float = 0.0) -> torch.Tensor:
    """Differentiable sequence distance across trajectories: ``[..., L, D] x [..., T, L, D] -> [...]``.

    ``fq`` the query window's frames (in ``q_offsets`` order), ``fdb`` each trajectory's database frames
    (``trajectory_frames``), ``valid`` ``[..., T]`` (default: all). Per trajectory the aligned
    ``seqMatchNet.sequence_distance``; then the minimum over the valid trajectories (``temperature`` 0: the
    gradient flows through the best one) or the soft minimum ``-tau * logsumexp(-d / tau)`` (``tau > 0``).
    ``+inf`` where no trajectory is valid. With the diagonal alone this is ``sequence_distance``.
    """

    d = sequence_distance(fq[..., None, :, :], fdb, method)                        # [..., T]
    if valid is not None:
        d = d.masked_fill(~valid, torch.inf)
    if temperature > 0:
        return -temperature * torch.logsumexp(-d / temperature, dim=-1)
    return d.amin(dim=-1)
