"""Sequence matching across speeds (velocity.py) against plain loops written from the definition.

The definition (velocity.py's docstring, docs/speeds.md): a query window with offsets ``k`` around its
anchor; a database trajectory at anchor ``j`` with velocity ``v`` and phase ``s`` sits at the positions
``j + s + v k`` rounded to the grid (``grid`` 1: whole frames, ``s = 0``, SeqSLAM's ``j + round(v k)``;
``grid`` 2: half frames, ``s`` in ``{0, 1/2}``), ``round`` half away from zero in grid units; the distance
at a midpoint ``f + 1/2`` is the mean of the distances at ``f`` and ``f + 1``; a trajectory that touches a
frame outside its anchor's sequence is not scored; its distance is the mean of its position distances in
ascending ``k``; the window's score is the best adjusted score ``a(q, t) d_t + b(q, t)`` over its
trajectories; equal position patterns are one trajectory, named by the (velocity, phase) first by
``(|v - 1|, v, phase)``; ties by ascending database frame, then that order.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pytest
import torch

import plain
from conftest import unit_rows
from seqmatchnet.common.errors import UserError
from seqmatchnet.data.windows import sequence_windows
from seqmatchnet.matching.seqmatch import frame_distances, sequence_distance, window_distances
from seqmatchnet.speeds import kernel, loss, rules, streaming, trajectories

LENGTHS = [1, 2, 3, 4, 5, 6]
SPEEDS = (0.0, 0.4, 0.5, 0.7, 1.0, 1.3, 2.0, 2.5)     # below and above 1, v = 0 and exact halves
GRIDS = [1, 2]                                        # whole frames, half frames


# ---------------------------------------------------------------- plain twins

def plain_round(x: float) -> int:
    """Half away from zero, from the definition (Python's round is half to even)."""
    x = round(x, 9)
    return int(math.floor(abs(x) + 0.5)) * (1 if x >= 0 else -1)


def plain_offsets(seq_len: int, anchor: str) -> list[int]:
    """Query offsets: centred windows ``-(L // 2) .. L - 1 - L // 2``, trailing windows ``-(L - 1) .. 0``."""
    first = -(seq_len // 2) if anchor == "centre" else -(seq_len - 1)
    return [first + i for i in range(seq_len)]


def plain_position(v: float, s: float, k: int, grid: int) -> float:
    """``s + v k`` rounded to the nearest ``1 / grid`` frame, halves away from zero (exact in binary)."""
    return plain_round(grid * (s + v * k)) / grid


@dataclass
class PlainTrajectories:
    """The distinct trajectories from the definition: ``rows`` ``[(velocity, phase, positions)]``, positions
    relative to the anchor (whole or half frames), in the order ``(|v - 1|, v, phase)``."""

    offsets: list[int]
    rows: list[tuple[float, float, tuple[float, ...]]]

    @property
    def count(self) -> int:
        return len(self.rows)

    @property
    def seq_len(self) -> int:
        return len(self.offsets)

    @property
    def velocities(self) -> list[float]:
        return [v for v, _, _ in self.rows]

    @property
    def phases(self) -> list[float]:
        return [s for _, s, _ in self.rows]

    @property
    def positions(self) -> list[tuple[float, ...]]:
        return [p for _, _, p in self.rows]


def plain_trajectories(velocities, seq_len: int, anchor: str = "centre", grid: int = 1) -> PlainTrajectories:
    """Every (velocity, phase) pair, its rounded positions; equal position patterns kept once, named by the
    pair first by ``(|v - 1|, v, phase)``. Velocities ``{1}`` alone: the diagonal (phase 0 only)."""
    offsets = plain_offsets(seq_len, anchor)
    phases = [0.0] if all(v == 1.0 for v in velocities) else [i / grid for i in range(grid)]
    best: dict[tuple[float, ...], tuple[float, float]] = {}
    for v in velocities:
        for s in phases:
            pos = tuple(plain_position(v, s, k, grid) for k in offsets)
            if pos not in best or (abs(v - 1), v, s) < (abs(best[pos][0] - 1), *best[pos]):
                best[pos] = (v, s)
    rows = sorted(((v, s, pos) for pos, (v, s) in best.items()), key=lambda r: (abs(r[0] - 1), r[0], r[1]))
    return PlainTrajectories(offsets, rows)


def touched(j: int, pos: tuple[float, ...]) -> list[int]:
    """Database frames a trajectory at anchor ``j`` reads: each whole position, both neighbours of a midpoint."""
    return sorted({f for p in pos for f in (math.floor(j + p), math.ceil(j + p))})


def assert_same_trajectories(traj: trajectories.Trajectories, plain: PlainTrajectories, grid: int) -> None:
    """``traj`` is the plain enumeration: offsets, velocities, phases, positions as floor + weight."""
    assert traj.q_offsets.tolist() == plain.offsets
    assert traj.velocities.tolist() == plain.velocities
    assert traj.phases.tolist() == plain.phases
    assert traj.steps.tolist() == [[math.floor(p) for p in pos] for pos in plain.positions]
    assert traj.weights.tolist() == [[p - math.floor(p) for p in pos] for pos in plain.positions]
    assert traj.grid == grid or (plain.count == 1 and not traj.weights.any())


def plain_distances(fd: np.ndarray, anchors, bounds, q_cols, plain: PlainTrajectories) -> np.ndarray:
    """``[T, A, B]`` float32 from loops: the distances at each trajectory's positions (a midpoint: the mean
    of its two frames', ``(d(f) + d(f + 1)) * 0.5``), summed in ascending k in float32, then / L."""
    fd = np.asarray(fd, dtype=np.float32)
    cols = np.asarray(q_cols)
    out = np.empty((plain.count, len(anchors), len(q_cols)), dtype=np.float32)
    for t, pos in enumerate(plain.positions):
        for a, j in enumerate(anchors):
            j = int(j)
            if not all(bounds[a][0] <= f < bounds[a][1] for f in touched(j, pos)):
                out[t, a] = np.inf
                continue
            acc = None
            for k, p in zip(plain.offsets, pos):
                f = math.floor(j + p)
                term = fd[f, cols + k] if j + p == f else (fd[f, cols + k] + fd[f + 1, cols + k]) * np.float32(0.5)
                acc = term if acc is None else acc + term
            out[t, a] = acc / np.float32(plain.seq_len)
    return out


def plain_coefficients(rule: rules.ScoringRule, d: np.ndarray, seg: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(a, b)`` ``[Nq, T]`` by loops over queries and trajectories, ``d`` ``[Nq, T, A]``."""
    nq, nt, _ = d.shape
    a, b, best = np.ones((nq, nt)), np.zeros((nq, nt)), np.full((nq, nt), np.inf)
    for q in range(nq):
        for t in range(nt):
            vals = [float(x) for x in d[q, t] if np.isfinite(x)]
            if not vals:
                continue
            best[q, t] = min(vals)
            if rule.normalise or rule.kind == "zscore":
                mean = sum(vals) / len(vals)
                std = math.sqrt(max(sum(x * x for x in vals) / len(vals) - mean * mean, 0.0)) or 1.0
                a[q, t], b[q, t], best[q, t] = 1 / std, -mean / std, (best[q, t] - mean) / std
    if rule.kind == "consensus":
        for q in range(nq):
            near = [p for p in range(q - rule.window, q + rule.window + 1) if 0 <= p < nq and seg[p] == seg[q]]
            cons = []
            for t in range(nt):
                vals = [best[p, t] for p in near if np.isfinite(best[p, t])]
                cons.append(sum(vals) / len(vals) if vals else np.inf)
            low = min(cons)
            for t in range(nt):
                b[q, t] += rule.weight * (cons[t] - low) if np.isfinite(cons[t]) else np.inf
    if rule.kind == "prior":
        winner = [min(range(nt), key=lambda t, q=q: (best[q, t], t)) for q in range(nq)]
        for q in range(nq):
            mates = [p for p in range(nq) if seg[p] == seg[q]]
            for t in range(nt):
                b[q, t] += rule.weight * (1 - sum(winner[p] == t for p in mates) / len(mates))
    return a, b


def plain_search(d: np.ndarray, rule: rules.ScoringRule, seg: np.ndarray, plain: PlainTrajectories, k: int):
    """Per query the ``k`` best database windows by (score, id, trajectory order: |v - 1|, v, phase):
    ``(ids, scores, velocities)``; scores in float32 like the search's."""
    a, b = plain_coefficients(rule, d, seg)
    ids, scores, vels = [], [], []
    for q in range(d.shape[0]):
        ranked = []
        for j in range(d.shape[2]):
            # the adjusted score in float32, as the search computes it: a * d, then + b, each rounded
            options = [(float(np.float32(np.float32(a[q, t]) * np.float32(d[q, t, j])) + np.float32(b[q, t])), t)
                       for t in range(d.shape[1]) if np.isfinite(d[q, t, j]) and np.isfinite(b[q, t])]
            s, t = min(options) if options else (np.inf, 0)
            ranked.append((s, j, t))
        ranked.sort()
        ids.append([j for _, j, _ in ranked[:k]])
        scores.append([s for s, _, _ in ranked[:k]])
        vels.append([plain.velocities[t] for _, _, t in ranked[:k]])
    return np.array(ids), np.array(scores), np.array(vels)


segments = plain.segments_of


def windows(bounds: np.ndarray, seq_len: int) -> np.ndarray:
    """Anchors (window centres, ``start + L // 2``) of every frame's window."""
    starts, _ = sequence_windows(bounds, seq_len)
    return starts + seq_len // 2


# ---------------------------------------------------------------- velocities and trajectories

@pytest.mark.parametrize("text, expected", [
    ("1", (1.0,)), ("0.5,1,2", (0.5, 1.0, 2.0)), ("0.5:1:0.25", (0.5, 0.75, 1.0)),
    ("0.5:2:0.1", tuple(round(0.5 + 0.1 * i, 10) for i in range(16))), (" 1:1:0.5 ", (1.0,)), ("0,0", (0.0,))])
def test_parse_velocities(text, expected):
    assert trajectories.parse_velocities(text) == expected


@pytest.mark.parametrize("text, words", [
    ("2:1:0.1", "VMIN is above VMAX"), ("1:2:0", "step must be > 0"), ("1:2:-0.1", "step must be > 0"),
    ("-0.5,1", "outside"), ("-1:1:0.5", "outside"), ("0.5:x:0.1", "not numbers"), ("1:2", "needs three"),
    ("", "empty"), ("nan", "non-finite"), ("0:100:0.01", "at most"), ("9", "outside")])
def test_malformed_velocities_are_one_line_errors_naming_the_flag(text, words):
    with pytest.raises(UserError) as err:
        trajectories.parse_velocities(text)
    msg = str(err.value)
    assert msg.startswith("--velocities") and words in msg and "\n" not in msg


def test_round_half_away_is_not_numpys_half_to_even():
    x = np.array([-2.5, -1.5, -0.5, -0.4, 0.0, 0.4, 0.5, 1.5, 2.5, 2.6])
    assert trajectories.round_half_away(x).tolist() == [plain_round(v) for v in x] == [-3, -2, -1, 0, 0, 0, 1, 2, 3, 3]
    assert np.round(2.5) == 2.0          # what the definition avoids


@pytest.mark.parametrize("grid", GRIDS)
@pytest.mark.parametrize("seq_len", LENGTHS)
@pytest.mark.parametrize("anchor", ["centre", "end"])
@pytest.mark.parametrize("text", ["0.5:2:0.1", "0:2:0.25", "0.3,1,1.7,0.9,2.5", "1", "0,0.25,0.5,0.75", "0.5:2:0.5"])
def test_trajectories_match_plain_twin(seq_len, anchor, text, grid):
    vs = trajectories.parse_velocities(text)
    plain = plain_trajectories(vs, seq_len, anchor, grid)
    if plain.count > trajectories.MAX_TRAJECTORIES:
        with pytest.raises(UserError, match="--velocities gives .* distinct trajectories"):
            trajectories.trajectories(vs, seq_len, anchor, grid=grid)
        return
    traj = trajectories.trajectories(vs, seq_len, anchor, grid=grid)
    assert_same_trajectories(traj, plain, grid)
    assert traj.seq_len == seq_len and traj.count == plain.count and traj.anchor == anchor
    assert traj.is_diagonal == (plain.count == 1 and list(plain.positions[0]) == plain.offsets)


@pytest.mark.parametrize("text, seq_len, anchor, grid", [("4.1", 16, "end", 1), ("2.05", 16, "end", 2),
                                                         ("0.3,4.1", 16, "centre", 1), ("2.05,0.7", 16, "end", 1)])
def test_decimal_velocities_snap_their_positions_before_rounding(text, seq_len, anchor, grid):
    """``v * k`` of a decimal velocity lands a hair off a half in binary (4.1 * 5 = 20.499999999999996): the
    position is the decimal one's (20.5, rounded away from zero), as the plain twin computes it."""
    vs = trajectories.parse_velocities(text)
    plain = plain_trajectories(vs, seq_len, anchor, grid)
    traj = trajectories.trajectories(vs, seq_len, anchor, grid=grid)
    assert_same_trajectories(traj, plain, grid)
    if text == "4.1":                                      # by hand: k = -5 sits at -20.5 -> -21
        assert traj.steps[0][traj.q_offsets.tolist().index(-5)] == -21


@pytest.mark.parametrize("text, expected", [
    ("0.6:1.4:0.2", (0.6, 0.8, 1.0, 1.2, 1.4)), ("0.1:0.3:0.1", (0.1, 0.2, 0.3)), ("0.7:2.1:0.7", (0.7, 1.4, 2.1)),
    ("0.5:2:0.5", (0.5, 1.0, 1.5, 2.0)), ("0.3:0.9:0.3", (0.3, 0.6, 0.9))])
def test_a_range_keeps_its_upper_end(text, expected):
    """VMAX is included although ``(VMAX - VMIN) / VSTEP`` falls a hair below a whole number in binary
    ((1.4 - 0.6) / 0.2 = 3.9999999999999996)."""
    vmin, vmax, step = (float(x) for x in text.split(":"))
    assert (vmax - vmin) / step != round((vmax - vmin) / step) or text == "0.5:2:0.5"   # the binary trap
    assert trajectories.parse_velocities(text) == expected


def test_half_grid_trajectories_by_hand():
    """Worked by hand: v = 2 and v = 0.5 on the half grid, both phases, centred and trailing windows."""
    traj = trajectories.trajectories((2.0,), 3, grid=2)                 # k = -1, 0, 1
    assert traj.velocities.tolist() == [2.0, 2.0] and traj.phases.tolist() == [0.0, 0.5]
    assert (traj.steps + traj.weights).tolist() == [[-2, 0, 2], [-1.5, 0.5, 2.5]]
    traj = trajectories.trajectories((0.5,), 4, grid=2)                 # k = -2, -1, 0, 1
    assert (traj.steps + traj.weights).tolist() == [[-1, -0.5, 0, 0.5], [-0.5, 0, 0.5, 1]]
    assert traj.steps.tolist() == [[-1, -1, 0, 0], [-1, 0, 0, 1]]
    assert traj.weights.tolist() == [[0, 0.5, 0, 0.5], [0.5, 0, 0.5, 0]]
    # k = -2, -1, 0: 2 * (s + v k) = -1, -0.5, 0 | 0, 0.5, 1
    traj = trajectories.trajectories((0.25,), 3, anchor="end", grid=2)
    assert (traj.steps + traj.weights).tolist() == [[-0.5, -0.5, 0], [0, 0.5, 0.5]]
    # whole grid: round(-0.5) = -1
    assert trajectories.trajectories((0.25,), 3, anchor="end").steps.tolist() == [[-1, 0, 0]]
    # equal patterns are one trajectory, named by the velocity nearest 1 (then the smaller, then phase 0)
    traj = trajectories.trajectories((1.1, 0.9, 1.0), 2, grid=2)        # k = -1, 0: 1.0 and 0.9 give (-1, 0); 1.1 too
    assert traj.velocities.tolist() == [1.0, 1.0] and traj.phases.tolist() == [0.0, 0.5]


def test_recommended_range_and_the_diagonal():
    traj = trajectories.trajectories(trajectories.parse_velocities(trajectories.RECOMMENDED), 5, grid=2)
    assert traj.count == 8 and traj.velocities[0] == 1.0            # the count docs/speeds.md states
    assert trajectories.trajectories(trajectories.parse_velocities(trajectories.RECOMMENDED), 5).count == 4
    assert trajectories.trajectories((1.0,), 5, grid=2).is_diagonal             # 1 alone is the diagonal on any grid
    assert trajectories.trajectories((0.8, 1.2), 5).is_diagonal      # all velocities that round to the diagonal
    assert not trajectories.trajectories((1.3,), 5).is_diagonal
    with pytest.raises(UserError, match="--velocities gives .* distinct trajectories"):
        trajectories.trajectories(trajectories.parse_velocities("0:8:0.05"), 6)


# ---------------------------------------------------------------- the kernel

def random_block(seed: int, m: int, n: int) -> torch.Tensor:
    rng = np.random.default_rng(seed)
    return frame_distances(torch.from_numpy(unit_rows(rng, m, 8)), torch.from_numpy(unit_rows(rng, n, 8)))


@pytest.mark.parametrize("grid", GRIDS)
@pytest.mark.parametrize("seq_len", LENGTHS)
def test_kernel_equals_plain_twin_with_sequence_bounds(seq_len, grid):
    db_bounds = segments([9, seq_len + 1, 14, 7])
    q_bounds = segments([8, 11])
    fd = random_block(seq_len, len(db_bounds), len(q_bounds))
    traj = trajectories.trajectories(SPEEDS, seq_len, grid=grid)
    plain = plain_trajectories(SPEEDS, seq_len, "centre", grid)
    assert_same_trajectories(traj, plain, grid)
    anchors, q_cols = windows(db_bounds, seq_len), windows(q_bounds, seq_len)
    got = kernel.trajectory_distances(fd, anchors, db_bounds, q_cols, traj)
    want = plain_distances(fd.numpy(), anchors, db_bounds, q_cols, plain)
    assert got.dtype == torch.float32 and np.array_equal(got.numpy(), want)
    assert np.isfinite(want).any() and (seq_len == 1 and grid == 1 or np.isinf(want).any())   # some leave
    if grid == 2:     # a midpoint whose lower frame is the sequence's last: not scored, though its floors are in
        edge = [(t, a) for t, pos in enumerate(plain.positions) for a, j in enumerate(anchors)
                if all(db_bounds[a][0] <= math.floor(j + p) < db_bounds[a][1] for p in pos)
                and not all(db_bounds[a][0] <= f < db_bounds[a][1] for f in touched(int(j), pos))]
        assert edge and all(np.isinf(want[t, a]).all() for t, a in edge)
        assert (traj.weights == 0.5).any(axis=1).sum() >= min(2, seq_len)    # midpoints in the trajectories
    # scattered anchors take the gather route: the same numbers
    pick = np.array([0, len(anchors) - 1, len(anchors) // 2])
    scattered = kernel.trajectory_distances(fd, anchors[pick], db_bounds[pick], q_cols, traj)
    assert torch.equal(scattered, got[:, pick])


@pytest.mark.parametrize("grid", GRIDS)
@pytest.mark.parametrize("layout", ["one sequence", "two sequences", "sorted repeats", "scattered"])
def test_kernel_equals_plain_twin_for_every_anchor_layout(layout, grid):
    """Anchors and query columns laid out as the searches make them: one sequence with the windows shifted
    at both ends (summed in place, repeats copied), two sequences (placed by runs), sorted with repeats
    anywhere, scattered (gathered)."""
    seq_len = 5
    rng = np.random.default_rng(len(layout) + grid)
    if layout == "one sequence":
        db_bounds, q_bounds = segments([30]), segments([17])
    else:
        db_bounds, q_bounds = segments([14, 16]), segments([8, 9])
    fd = random_block(seq_len, len(db_bounds), len(q_bounds))
    anchors, q_cols = windows(db_bounds, seq_len), windows(q_bounds, seq_len)
    if layout == "sorted repeats":
        anchors = np.sort(rng.choice(anchors, size=len(anchors)))
    elif layout == "scattered":
        anchors = rng.permutation(anchors)[:len(anchors) - 4]
    bounds = np.array([db_bounds[a] for a in anchors])
    traj = trajectories.trajectories(SPEEDS, seq_len, grid=grid)
    plain = plain_trajectories(SPEEDS, seq_len, "centre", grid)
    got = kernel.trajectory_distances(fd, anchors, bounds, q_cols, traj)
    want = plain_distances(fd.numpy(), anchors, bounds, q_cols, plain)
    assert np.array_equal(got.numpy(), want)
    if layout == "one sequence":      # the shifted windows repeat their anchors and columns
        assert len(np.unique(anchors)) < len(anchors) and len(np.unique(q_cols)) < len(q_cols)


@pytest.mark.parametrize("grid", GRIDS)
@pytest.mark.parametrize("seq_len", LENGTHS)
def test_diagonal_kernel_is_todays_window_distances_exactly(seq_len, grid):
    rng = np.random.default_rng(seq_len)
    db, q = torch.from_numpy(unit_rows(rng, 37, 16)), torch.from_numpy(unit_rows(rng, 23, 16))
    db_bounds, q_bounds = segments([37]), segments([23])
    db_starts, _ = sequence_windows(db_bounds, seq_len)
    q_starts, _ = sequence_windows(q_bounds, seq_len)
    today = window_distances(db, q, torch.as_tensor(db_starts), torch.as_tensor(q_starts), seq_len)
    got = kernel.trajectory_distances(frame_distances(db, q), db_starts + seq_len // 2, db_bounds,
                                 q_starts + seq_len // 2, trajectories.trajectories((1.0,), seq_len, grid=grid))
    assert torch.equal(got[0], today)


def test_kernel_refuses_a_block_too_small_for_its_trajectories():
    fd = random_block(0, 10, 10)
    with pytest.raises(ValueError, match="anchor_margin"):
        kernel.trajectory_distances(fd, [2], [[-5, 20]], [5], trajectories.trajectories((2.0,), 5))
    assert trajectories.anchor_margin(trajectories.trajectories((0.5, 2.0), 5)) == (4, 4)
    assert trajectories.anchor_margin(trajectories.trajectories((0.5, 2.0), 5, anchor="end")) == (8, 0)
    # the half grid: v = 2 at phase 1/2 reaches j + 2.5 (L = 3), so it needs frame j + 3
    kernel.trajectory_distances(fd, [7], [[0, 20]], [5], trajectories.trajectories((2.0,), 3))    # frames 5, 7, 9: fits
    with pytest.raises(ValueError, match="anchor_margin"):
        kernel.trajectory_distances(fd, [7], [[0, 20]], [5], trajectories.trajectories((2.0,), 3, grid=2))
    assert trajectories.anchor_margin(trajectories.trajectories((0.5, 2.0), 5, grid=2)) == (4, 5)
    assert trajectories.anchor_margin(trajectories.trajectories((0.5, 2.0), 5, anchor="end", grid=2)) == (8, 1)


@pytest.mark.parametrize("grid", GRIDS)
@pytest.mark.parametrize("anchor", ["centre", "end"])
@pytest.mark.parametrize("seq_len", LENGTHS)
def test_anchor_margin_is_the_plain_reach(seq_len, anchor, grid):
    """Frames before and after the anchor that some trajectory reads (a midpoint reads both neighbours)."""
    plain = plain_trajectories(SPEEDS, seq_len, anchor, grid)
    frames = [f for pos in plain.positions for f in touched(0, pos)]
    margin = trajectories.anchor_margin(trajectories.trajectories(SPEEDS, seq_len, anchor, grid=grid))
    assert margin == (max(0, -min(frames)), max(0, max(frames)))


# ---------------------------------------------------------------- the search and its rules

RULES = [rules.PLAIN_MIN, rules.DEFAULT_RULE, rules.ScoringRule("consensus", window=2, weight=0.5, normalise=False),
         rules.ScoringRule("zscore", normalise=True), rules.ScoringRule("prior", window=0, weight=0.1, normalise=False)]


def search_case(seed: int, seq_len: int, data: str = "random"):
    rng = np.random.default_rng(seed)
    db_bounds, q_bounds = segments([13, 6, 17]), segments([9, 12])
    if data == "onehot":       # frame distances exactly 0 or sqrt(2): many exactly tied scores
        eye = np.eye(3, dtype=np.float32)
        db, q = eye[rng.integers(0, 3, len(db_bounds))], eye[rng.integers(0, 3, len(q_bounds))]
    else:
        db, q = unit_rows(rng, len(db_bounds), 8), unit_rows(rng, len(q_bounds), 8)
    fd = frame_distances(torch.from_numpy(db), torch.from_numpy(q))
    return fd, db_bounds, q_bounds, windows(db_bounds, seq_len), windows(q_bounds, seq_len)


def run_blocks(fd, db_bounds, anchors, q_cols, traj, k, db_chunk, q_chunk) -> streaming.TrajectoryTopK:
    """The search in blocks of ``db_chunk`` database windows x ``q_chunk`` queries (global ids)."""
    acc = streaming.TrajectoryTopK(len(q_cols), traj, k)
    for q_lo in range(0, len(q_cols), q_chunk):
        cols = q_cols[q_lo:q_lo + q_chunk]
        for d_lo in range(0, len(anchors), db_chunk):
            ids = np.arange(d_lo, min(d_lo + db_chunk, len(anchors)))
            acc.add(q_lo, kernel.trajectory_distances(fd, anchors[ids], db_bounds[ids], cols, traj), ids)
    return acc


@pytest.mark.parametrize("grid", GRIDS)
@pytest.mark.parametrize("seq_len", [1, 2, 3, 5, 6])
@pytest.mark.parametrize("rule", RULES, ids=lambda r: f"{r.kind}-{r.window}-{r.weight}-{r.normalise}")
def test_search_equals_dense_plain_loop(seq_len, rule, grid):
    fd, db_bounds, q_bounds, anchors, q_cols = search_case(seq_len, seq_len)
    traj = trajectories.trajectories(SPEEDS, seq_len, grid=grid)
    plain = plain_trajectories(SPEEDS, seq_len, "centre", grid)
    assert_same_trajectories(traj, plain, grid)
    k = 7
    acc = run_blocks(fd, db_bounds, anchors, q_cols, traj, k, db_chunk=5, q_chunk=8)
    ids, scores, vel = acc.finish(q_bounds, rule)
    dense = plain_distances(fd.numpy(), anchors, db_bounds, q_cols, plain).transpose(2, 0, 1)   # [Nq, T, A]
    p_ids, p_scores, p_vel = plain_search(dense, rule, q_bounds[:, 0], plain, k)
    np.testing.assert_allclose(scores.numpy(), p_scores, rtol=1e-9, atol=1e-9)
    assert np.array_equal(ids.numpy(), p_ids) and np.array_equal(vel.numpy(), p_vel)


@pytest.mark.parametrize("grid", GRIDS)
@pytest.mark.parametrize("seq_len", [2, 5])
def test_ties_by_database_frame_then_velocity_nearest_one(seq_len, grid):
    fd, db_bounds, q_bounds, anchors, q_cols = search_case(7, seq_len, data="onehot")
    traj = trajectories.trajectories(SPEEDS, seq_len, grid=grid)
    plain = plain_trajectories(SPEEDS, seq_len, "centre", grid)
    assert_same_trajectories(traj, plain, grid)
    acc = run_blocks(fd, db_bounds, anchors, q_cols, traj, 12, db_chunk=4, q_chunk=5)
    ids, scores, vel = acc.finish(q_bounds, rules.PLAIN_MIN)
    dense = plain_distances(fd.numpy(), anchors, db_bounds, q_cols, plain).transpose(2, 0, 1)
    p_ids, p_scores, p_vel = plain_search(dense, rules.PLAIN_MIN, q_bounds[:, 0], plain, 12)
    assert (np.diff(p_scores, axis=1) == 0).sum() > 50                  # the case is full of exact ties
    assert np.array_equal(ids.numpy(), p_ids) and np.array_equal(vel.numpy(), p_vel)
    assert np.array_equal(scores.numpy(), p_scores)


@pytest.mark.parametrize("grid, text", [(1, "0.5:2:0.1"), (2, "0.5:2:0.25")])
def test_blocks_give_the_same_result_as_one_block(grid, text):
    fd, db_bounds, q_bounds, anchors, q_cols = search_case(3, 5)
    traj = trajectories.trajectories(trajectories.parse_velocities(text), 5, grid=grid)
    whole = run_blocks(fd, db_bounds, anchors, q_cols, traj, 9, db_chunk=1000, q_chunk=1000).finish(q_bounds)
    parts = run_blocks(fd, db_bounds, anchors, q_cols, traj, 9, db_chunk=3, q_chunk=4).finish(q_bounds)
    for a, b in zip(whole, parts):
        assert torch.equal(a, b)


def test_neighbour_mean_stays_in_its_segment():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((15, 3))
    x[4, 1] = np.inf
    seg = np.repeat([0, 5, 9], [5, 4, 6])
    got = rules.neighbour_mean(x, seg, 2)
    for q in range(15):
        near = [p for p in range(q - 2, q + 3) if 0 <= p < 15 and seg[p] == seg[q]]
        for t in range(3):
            vals = [x[p, t] for p in near if np.isfinite(x[p, t])]
            assert got[q, t] == pytest.approx(sum(vals) / len(vals))


@pytest.mark.parametrize("rule", RULES[1:3], ids=["default", "consensus-raw"])
def test_a_trajectory_that_fits_no_database_sequence_leaves_the_others_scores_alone(rule):
    """Database sequences shorter than the fast trajectories' reach: those are never scored (no finite
    distance, a consensus over no value) and the other trajectories' coefficients are the plain twin's,
    the same as if the fast ones had not been asked for."""
    rng = np.random.default_rng(4)
    db_bounds, q_bounds = segments([5, 6, 8, 7, 6]), segments([9, 12])
    fd = frame_distances(torch.from_numpy(unit_rows(rng, len(db_bounds), 8)),
                         torch.from_numpy(unit_rows(rng, len(q_bounds), 8)))
    anchors, q_cols = windows(db_bounds, 5), windows(q_bounds, 5)
    slow, fast = (0.5, 1.0), (0.5, 1.0, 2.0, 2.5)           # 2 and 2.5 span 9 and 11 frames: no sequence has them
    got = {}
    for vs in (slow, fast):
        traj = trajectories.trajectories(vs, 5)
        plain = plain_trajectories(vs, 5)
        acc = run_blocks(fd, db_bounds, anchors, q_cols, traj, 6, db_chunk=7, q_chunk=8)
        assert np.isinf(acc.stats["best"][len(slow):]).all() and np.isfinite(acc.stats["best"][:len(slow)]).all()
        a, b = acc.coefficients(q_bounds, rule)
        dense = plain_distances(fd.numpy(), anchors, db_bounds, q_cols, plain).transpose(2, 0, 1)
        p_a, p_b = plain_coefficients(rule, dense, q_bounds[:, 0])
        np.testing.assert_allclose(a, p_a, rtol=1e-9)
        np.testing.assert_allclose(b, p_b, rtol=1e-9, atol=1e-12)
        got[vs] = [x.numpy() for x in acc.finish(q_bounds, rule)]
    for x, y in zip(got[slow], got[fast]):
        np.testing.assert_array_equal(x, y)


@pytest.mark.parametrize("rows", [255, 256, 257, 600, 1030])
def test_float64_column_sums_read_every_row_of_every_tile(rows):
    """The statistics' sums and sums of squares a tile of rows at a time equal the plain float64 sums."""
    from seqmatchnet.matching import blocks

    d = torch.from_numpy(np.random.default_rng(rows).random((rows, 7)).astype(np.float32))
    total, squares = blocks.float64_column_sums(d)
    x = d.numpy().astype(np.float64)
    np.testing.assert_allclose(total.numpy(), [sum(x[:, j]) for j in range(7)], rtol=1e-12)
    np.testing.assert_allclose(squares.numpy(), [sum(v * v for v in x[:, j]) for j in range(7)], rtol=1e-12)


def test_statistics_of_a_block_of_more_than_one_tile_equal_the_plain_ones():
    """``TrajectoryTopK`` over one block of 400 database windows (more than a 256-row tile): best, sum, sum
    of squares and count per (trajectory, query) equal the plain loop's."""
    rng = np.random.default_rng(8)
    db_bounds, q_bounds = segments([400]), segments([12])
    fd = frame_distances(torch.from_numpy(unit_rows(rng, 400, 8)), torch.from_numpy(unit_rows(rng, 12, 8)))
    anchors, q_cols = windows(db_bounds, 3), windows(q_bounds, 3)
    traj, plain = trajectories.trajectories((0.5, 1.0, 2.0), 3, grid=2), plain_trajectories((0.5, 1.0, 2.0), 3, grid=2)
    acc = run_blocks(fd, db_bounds, anchors, q_cols, traj, 4, db_chunk=1000, q_chunk=1000)
    dense = plain_distances(fd.numpy(), anchors, db_bounds, q_cols, plain).astype(np.float64)   # [T, A, B]
    finite = np.isfinite(dense)
    np.testing.assert_array_equal(acc.stats["count"], finite.sum(axis=1))
    np.testing.assert_allclose(acc.stats["sum"], np.where(finite, dense, 0).sum(axis=1), rtol=1e-12)
    np.testing.assert_allclose(acc.stats["sumsq"], np.where(finite, dense ** 2, 0).sum(axis=1), rtol=1e-12)
    np.testing.assert_array_equal(acc.stats["best"], dense.min(axis=1))


def test_causal_coefficients_use_only_the_given_history():
    best = np.array([[0.5, 0.7], [0.6, 0.4], [0.8, 0.3]])
    a, b = rules.causal_coefficients(rules.ScoringRule("consensus", window=5, weight=2.0, normalise=False), best,
                                 np.zeros_like(best), np.ones_like(best))
    assert a.tolist() == [1.0, 1.0]
    assert b == pytest.approx([2.0 * (0.6333333333 - 0.4666666667), 0.0])
    with pytest.raises(ValueError):
        rules.causal_coefficients(rules.ScoringRule("prior"), best, best, best)


# ---------------------------------------------------------------- training

@pytest.mark.parametrize("grid", GRIDS)
@pytest.mark.parametrize("seq_len", [1, 3, 5])
def test_trajectory_frames_and_distance_match_plain_loop(seq_len, grid):
    rng = np.random.default_rng(seq_len)
    feats = torch.from_numpy(unit_rows(rng, 30, 6)).requires_grad_()
    bounds = segments([12, 18])
    traj = trajectories.trajectories(SPEEDS, seq_len, grid=grid)
    plain = plain_trajectories(SPEEDS, seq_len, "centre", grid)
    assert_same_trajectories(traj, plain, grid)
    anchors = torch.tensor([2, 6, 11, 15, 27])
    frames, valid = loss.trajectory_frames(anchors, torch.as_tensor(bounds[anchors.numpy()]), traj)
    weights = loss.tap_weights(traj)
    halves = grid == 2
    assert frames.shape == (len(anchors), plain.count, seq_len, *((2,) if halves else ()))
    assert valid.shape == (len(anchors), plain.count)
    if halves:
        assert weights.shape == (plain.count, seq_len, 2) and weights.dtype == torch.float32
        assert weights.tolist() == [[[1 - (p - math.floor(p)), p - math.floor(p)] for p in pos]
                                    for pos in plain.positions]
    else:
        assert weights is None
    fq = torch.from_numpy(unit_rows(rng, seq_len, 6))
    d = loss.trajectory_sequence_distance(fq.expand(len(anchors), -1, -1), feats[frames], valid, weights=weights)
    fdb = feats.detach().double()
    fq64 = fq.double()
    n_valid = 0
    for a, j in enumerate(anchors.tolist()):
        lo, hi = bounds[j]
        best = math.inf
        for t, pos in enumerate(plain.positions):
            ok = all(lo <= f < hi for f in touched(j, pos))
            assert bool(valid[a, t]) == ok, (a, t)
            lower = [math.floor(j + p) for p in pos]
            upper = [math.ceil(j + p) for p in pos]
            want = [[min(max(f, lo), hi - 1) for f in lower], [min(max(f, lo), hi - 1) for f in upper]]
            got = frames[a, t].tolist()
            assert (list(map(list, zip(*want))) if halves else want[0]) == got    # clamped into bounds
            if ok:
                n_valid += 1
                total = 0.0
                for i in range(seq_len):     # a midpoint: the mean of its two frames' distances
                    total += (float(torch.linalg.norm(fq64[i] - fdb[lower[i]]))
                              + float(torch.linalg.norm(fq64[i] - fdb[upper[i]]))) / 2
                best = min(best, total / seq_len)
        assert float(d[a].detach()) == pytest.approx(best, abs=1e-5)
    assert n_valid > 0 and (seq_len == 1 and grid == 1 or n_valid < len(anchors) * plain.count)   # some leave
    d[torch.isfinite(d)].sum().backward()
    assert feats.grad is not None and torch.isfinite(feats.grad).all() and feats.grad.abs().sum() > 0
    soft = loss.trajectory_sequence_distance(fq.expand(len(anchors), -1, -1), feats[frames], valid, temperature=0.01,
                                          weights=weights)
    assert (soft <= d + 1e-6).all()


def test_diagonal_training_distance_is_sequence_distance():
    rng = np.random.default_rng(1)
    fq, fdb = torch.from_numpy(unit_rows(rng, 5, 4)), torch.from_numpy(unit_rows(rng, 5, 4))
    got = loss.trajectory_sequence_distance(fq, fdb[None], torch.tensor([True]))
    assert torch.equal(got, sequence_distance(fq, fdb))
