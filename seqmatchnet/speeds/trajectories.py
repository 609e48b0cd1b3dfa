"""Sequence matching across speeds: trajectories and their scores.

Sequence matching along the diagonal assumes that both traversals advance one frame per frame. Here
a database *trajectory* may advance ``v`` database frames per query frame (the SeqSLAM idea): a
query window with offsets ``k`` (``query_offsets``: centred for ``--mode test``, trailing for
``--mode localize``) is compared with the database positions ``j + s + v * k`` of each anchor frame
``j``, rounded to whole frames (``grid`` 1, SeqSLAM's ``j + round(v * k)``, ``s = 0``) or to half
frames (``grid`` 2: anchors ``s = 0`` and ``1/2``, a midpoint's distance the mean of its two
neighbours'); see ``trajectories``. A trajectory's distance is the mean of its ``L`` position
distances, summed in ascending ``k`` as ``seqMatchNet.diagonal_sums`` does, so the diagonal equals
``seqMatchNet.window_distances`` exactly; one that leaves its anchor's database sequence is not
scored (``+inf``).

Scoring across trajectories (``ScoringRule``). Every rule is of the form ``score(q, j) = min_t [a(q,
t) * d_t(q, j) + b(q, t)]`` with ``a > 0``, where ``a`` and ``b`` depend only on per-(query,
trajectory) statistics over the whole database (best score, mean, std) and on the query's neighbours
in its own query sequence. Within one trajectory the order of the database windows is therefore that
of ``d_t``, and the top-k of the final scores is exactly the merge of the per-trajectory top-k
lists: ``TrajectoryTopK`` streams blocks, keeps those lists and the statistics, and ``finish``
merges them. The default rule (``DEFAULT_RULE``) is the *normalised speed consensus*: each (query,
trajectory)'s distances are z-normalised by their mean and std over the database (``a = 1 / std``,
``b0 = -mean / std``); the best normalised score of each trajectory, averaged over the query windows
within ``+-20`` of the query (same query sequence), says which speed the query traversal drives
there, and ``b = b0 + 3 * (consensus(q, t) - min_t' consensus(q, t'))``. ``docs/speeds.md`` has the
measurements behind it and the alternatives (``ScoringRule``).

API (shapes: ``T`` trajectories, ``L`` sequence length, ``A`` database anchors, ``B`` query
anchors):

- ``parse_velocities(text) -> tuple[float, ...]``: ``"VMIN:VMAX:VSTEP"`` (VMAX included) or
``"a,b,c"``;
  ``UserError`` naming ``--velocities`` on malformed input.
- ``round_half_away(x)``; ``trajectories(velocities, seq_len, anchor, grid) -> Trajectories``
  (``UserError`` when more than ``MAX_TRAJECTORIES`` distinct trajectories); ``anchor_margin(traj)
  -> (before, after)``.
- ``trajectory_distances(frame_dists [M, N], anchors [A], bounds [A, 2], q_cols [B], traj) -> [T, A,
B]``.
- ``TrajectoryTopK(num_queries, traj, k)``: ``add(q_lo, dists [T, A, B], db_ids [A])``, then
  ``finish(q_segments, rule) -> (ids [Nq, k], scores [Nq, k] float32, velocity [Nq, k])``.
- ``rule_coefficients(rule, stats, q_segments) -> (a, b)`` ``[Nq, T]`` (non-causal: neighbours both
sides);
  ``causal_coefficients(rule, best, mean, std [W, T]) -> (a, b) [T]`` is the causal form for
  localisation.
- Training: ``trajectory_frames(anchors [...], bounds [..., 2], traj) -> (frames [..., T, L(, 2)],
valid)``,
  ``tap_weights(traj)`` and ``trajectory_sequence_distance(fq [..., L, D], fdb, valid, ..., weights)
  -> [...]``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from seqmatchnet.common.errors import UserError

FLAG = "--velocities"
# database frames per query frame; a faster trajectory spans > 8 L frames
MAX_VELOCITY = 8.0
# velocities a range or list may name before they are snapped to trajectories
MAX_LISTED = 1000
# distinct trajectories searched: the cost of a search grows with each one
MAX_TRAJECTORIES = 16
RECOMMENDED = "0.5:2:0.5"   # the range docs/speeds.md recommends (on the half grid)
SNAP = 1e-9                 # v * k within this of a half counts as the half (decimal velocities)


# ---------------------------------------------------------------- velocities and trajectories

def parse_velocities(text: str) -> tuple[float, ...]:
    """``"VMIN:VMAX:VSTEP"`` (inclusive of VMAX within float tolerance) or ``"a,b,c"`` ->
    velocities.

    Velocities are database frames per query frame; ``"1"`` is the diagonal. Raises ``UserError``
    (one line, naming ``--velocities``) on anything malformed: not numbers, ``VMIN > VMAX``, ``VSTEP
    <= 0``, a negative or non-finite velocity, one above ``MAX_VELOCITY``, or more than
    ``MAX_LISTED`` values.
    """
    text = str(text).strip()
    hint = (f"give VMIN:VMAX:VSTEP (e.g. {RECOMMENDED}) or a comma list (e.g. 0.5,1,2); "
            "1 is the diagonal")
    if not text:
        raise UserError(f"{FLAG} is empty: {hint}")
    if ":" in text and text.count(":") != 2:
        raise UserError(f"{FLAG} {text!r} is a range of {text.count(':') + 1} parts: a range needs "
                        f"three, VMIN:VMAX:VSTEP (e.g. {RECOMMENDED}); a comma list names values")
    try:
        if ":" in text:
            parts = [float(p) for p in text.split(":")]
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
            raise UserError(f"{FLAG} {text!r} lists {count} velocities (at most {MAX_LISTED}): "
                            "use a larger step")
        parts = [round(vmin + i * step, 10) for i in range(count)]
    elif len(parts) > MAX_LISTED:
        raise UserError(f"{FLAG} lists {len(parts)} velocities (at most {MAX_LISTED}): list fewer")
    bad = [p for p in parts if p < 0 or p > MAX_VELOCITY]
    if bad:
        raise UserError(f"{FLAG} {text!r}: velocity {bad[0]:g} is outside [0, {MAX_VELOCITY:g}] "
                        f"(database frames per query frame): {hint}")
    return tuple(dict.fromkeys(float(p) for p in parts))


def round_half_away(x) -> np.ndarray:
    """Round to the nearest integer, halves away from zero (SeqSLAM's MATLAB ``round``), as
    int64."""
    x = np.asarray(x, dtype=np.float64)
    return (np.sign(x) * np.floor(np.abs(x) + 0.5)).astype(np.int64)


@dataclass(frozen=True, eq=False)
class Trajectories:
    """Distinct database trajectories of one sequence length.

    ``q_offsets`` ``[L]`` the query window's frames relative to its anchor. Each row ``t`` is one
    trajectory whose ``k``-th frame sits at the database position ``anchor + steps[t, k] +
    weights[t, k]``: ``steps`` ``[T, L]`` whole frames (the floor), ``weights`` ``[T, L]`` the
    fraction in ``[0, 1)`` (0 on whole frames, ``1/2`` at the midpoint of two frames on the half
    grid). ``velocities`` ``[T]`` the velocity nearest 1 giving each row and ``phases`` ``[T]`` its
    anchor's sub-frame phase (``0`` or ``1/2``), ordered by ``|v - 1|``, then ``v``, then the phase
    (row 0 wins ties); ``anchor`` ``"centre"`` or ``"end"``; ``grid`` positions per frame (1 whole
    frames, 2 half frames); ``listed`` how many velocities were asked for.
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
        return self.count == 1 and bool(np.array_equal(self.steps[0],
                                                       self.q_offsets)) and not self.weights.any()

    @property
    def reach(self) -> tuple[np.ndarray, np.ndarray]:
        """``(first, last)`` ``[T]``: the lowest and highest database frame of each trajectory
        relative to its anchor (a sub-frame position needs both of its neighbours)."""
        return self.steps.min(axis=1), (self.steps + (self.weights > 0)).max(axis=1)


GRIDS = {"half": 2, "whole": 1}     # --trajectoryGrid: positions per database frame


def query_offsets(seq_len: int, anchor: str = "centre") -> np.ndarray:
    """``[L]`` offsets of a query window's frames from its anchor (centre: ``start + L // 2``; end:
    last)."""
    if anchor == "centre":
        return np.arange(seq_len, dtype=np.int64) - seq_len // 2
    if anchor == "end":
        return np.arange(seq_len, dtype=np.int64) - (seq_len - 1)
    raise ValueError(f"anchor must be 'centre' or 'end', got {anchor!r}")


def trajectories(velocities, seq_len: int, anchor: str = "centre", grid: int = 1) -> Trajectories:
    """The distinct trajectories that ``velocities`` give for windows of ``seq_len`` frames on
    ``grid``.

    ``grid`` 1 (whole frames, SeqSLAM): the trajectory of velocity ``v`` anchored at frame ``j``
    uses the frames ``j + round(v * k)``. ``grid`` 2 (half frames): trajectories are anchored at
    ``j`` and at ``j + 1/2`` (phase ``s``), their positions ``j + s + v * k`` are rounded to the
    nearest half frame, and a midpoint's frame distance is the mean of its two neighbours'; either
    anchor reports frame ``j``. Rounding is half away from zero in grid units. Velocities ``{1}``
    alone are the diagonal on any grid. Raises ``UserError`` naming ``--velocities`` when they give
    more than ``MAX_TRAJECTORIES``.
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
    # nearest 1 first; then the smaller; then phase 0
    order = np.lexsort((phase, vel, np.abs(vel - 1.0)))
    phase, vel = phase[order], vel[order]
    units = round_half_away(np.round((phase[:, None]
                                      + vel[:, None] * k[None, :]) * grid / SNAP) * SNAP)
    _, first = np.unique(units, axis=0, return_index=True)
    # first occurrence = the velocity nearest 1
    keep = np.sort(first)
    if len(keep) > MAX_TRAJECTORIES:
        raise UserError(f"{FLAG} gives {len(keep)} distinct trajectories for seqL {seq_len} (at "
                        f"most {MAX_TRAJECTORIES}: each one adds to the search time and to the "
                        "false matches): narrow the range or use a larger step, e.g. "
                        f"{RECOMMENDED}{' or --trajectoryGrid whole' * (grid > 1)}")
    units = units[keep]
    return Trajectories(q_offsets=k, steps=np.floor_divide(units, grid),
                        weights=np.remainder(units, grid) / grid,
                        velocities=vel[keep], phases=phase[keep], anchor=anchor, grid=grid,
                        listed=len(v))


def anchor_margin(traj: Trajectories) -> tuple[int, int]:
    """``(before, after)``: database frames a trajectory may reach before and after its anchor."""
    first, last = traj.reach
    return int(max(0, -first.min())), int(max(0, last.max()))


def describe(traj: Trajectories) -> str:
    """One line for logs: how many velocities and trajectories, and their velocities."""
    vs = ", ".join(f"{v:g}" for v in sorted(set(traj.velocities.tolist())))
    grid = "half-frame" if traj.grid == 2 else "whole-frame"
    return (f"{traj.listed} velocities -> {traj.count} distinct {grid} trajectories of seqL "
            f"{traj.seq_len} (v = {vs})")
