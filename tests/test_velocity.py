"""Sequence matching across speeds (velocity.py) against plain loops written from the definition.

The definition (velocity.py's docstring, docs/speeds.md): a query window with offsets ``k`` around its
anchor; a database trajectory at anchor ``j`` with velocity ``v`` uses frames ``j + round(v k)``, ``round``
half away from zero; a trajectory with a frame outside its anchor's sequence is not scored; its distance is
the mean of the frame distances in ascending ``k``; the window's score is the best adjusted score
``a(q, t) d_t + b(q, t)`` over its trajectories; ties by ascending database frame, then the velocity
nearest 1.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import plain
import velocity as V
from conftest import unit_rows
from datasets import sequence_windows
from seqMatchNet import frame_distances, sequence_distance, window_distances
from utils import UserError

LENGTHS = [1, 2, 3, 4, 5, 6]
SPEEDS = (0.0, 0.4, 0.5, 0.7, 1.0, 1.3, 2.0, 2.5)     # below and above 1, v = 0 and exact halves


# ---------------------------------------------------------------- plain twins

def plain_round(x: float) -> int:
    """Half away from zero, from the definition (Python's round is half to even)."""
    x = round(x, 9)
    return int(math.floor(abs(x) + 0.5)) * (1 if x >= 0 else -1)


def plain_trajectories(velocities, seq_len: int, anchor: str) -> list[tuple[float, tuple[int, ...]]]:
    """``[(representative velocity, steps)]``: distinct step tuples, each with the velocity nearest 1
    (the smaller on equal distance) giving it, ordered by that velocity's distance to 1, then the velocity."""
    offsets = [k - seq_len // 2 for k in range(seq_len)] if anchor == "centre" else \
        [k - (seq_len - 1) for k in range(seq_len)]
    best: dict[tuple[int, ...], float] = {}
    for v in velocities:
        steps = tuple(plain_round(v * k) for k in offsets)
        if steps not in best or (abs(v - 1), v) < (abs(best[steps] - 1), best[steps]):
            best[steps] = v
    return sorted(((v, s) for s, v in best.items()), key=lambda p: (abs(p[0] - 1), p[0]))


def plain_distances(fd: np.ndarray, anchors, bounds, q_cols, traj: V.Trajectories) -> np.ndarray:
    """``[T, A, B]`` float32 from loops: the frame distances along each trajectory, summed in ascending k."""
    out = np.empty((traj.count, len(anchors), len(q_cols)), dtype=np.float32)
    for t in range(traj.count):
        for a, j in enumerate(anchors):
            frames = [j + int(s) for s in traj.steps[t]]
            inside = all(bounds[a][0] <= f < bounds[a][1] for f in frames)
            for b, c in enumerate(q_cols):
                if not inside:
                    out[t, a, b] = np.inf
                    continue
                acc = np.float32(0.0)
                for i, f in enumerate(frames):
                    term = np.float32(fd[f, c + traj.q_offsets[i]])
                    acc = term if i == 0 else np.float32(acc + term)
                out[t, a, b] = np.float32(acc / np.float32(traj.seq_len))
    return out


def plain_coefficients(rule: V.ScoringRule, d: np.ndarray, seg: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
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


def plain_search(d: np.ndarray, rule: V.ScoringRule, seg: np.ndarray, traj: V.Trajectories, k: int):
    """Per query the ``k`` best database windows by (score, id, |v - 1|): ``(ids, scores, velocities)``; scores
    in float32 like the search's."""
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
        vels.append([traj.velocities[t] for _, _, t in ranked[:k]])
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
    assert V.parse_velocities(text) == expected


@pytest.mark.parametrize("text, words", [
    ("2:1:0.1", "VMIN is above VMAX"), ("1:2:0", "step must be > 0"), ("1:2:-0.1", "step must be > 0"),
    ("-0.5,1", "outside"), ("-1:1:0.5", "outside"), ("0.5:x:0.1", "not numbers"), ("1:2", "not numbers"),
    ("", "empty"), ("nan", "non-finite"), ("0:100:0.01", "at most"), ("9", "outside")])
def test_malformed_velocities_are_one_line_errors_naming_the_flag(text, words):
    with pytest.raises(UserError) as err:
        V.parse_velocities(text)
    msg = str(err.value)
    assert msg.startswith("--velocities") and words in msg and "\n" not in msg


def test_round_half_away_is_not_numpys_half_to_even():
    x = np.array([-2.5, -1.5, -0.5, -0.4, 0.0, 0.4, 0.5, 1.5, 2.5, 2.6])
    assert V.round_half_away(x).tolist() == [plain_round(v) for v in x] == [-3, -2, -1, 0, 0, 0, 1, 2, 3, 3]
    assert np.round(2.5) == 2.0          # what the definition avoids


@pytest.mark.parametrize("seq_len", LENGTHS)
@pytest.mark.parametrize("anchor", ["centre", "end"])
@pytest.mark.parametrize("text", ["0.5:2:0.1", "0:2:0.25", "0.3,1,1.7,0.9,2.5", "1"])
def test_trajectories_match_plain_twin(seq_len, anchor, text):
    vs = V.parse_velocities(text)
    traj = V.trajectories(vs, seq_len, anchor)
    plain = plain_trajectories(vs, seq_len, anchor)
    assert traj.velocities.tolist() == [v for v, _ in plain]
    assert traj.steps.tolist() == [list(s) for _, s in plain]
    assert traj.q_offsets.tolist() == ([k - seq_len // 2 for k in range(seq_len)] if anchor == "centre"
                                       else [k - seq_len + 1 for k in range(seq_len)])
    assert traj.is_diagonal == (len(plain) == 1 and list(plain[0][1]) == traj.q_offsets.tolist())


def test_recommended_range_and_the_diagonal():
    traj = V.trajectories(V.parse_velocities(V.RECOMMENDED), 5)
    assert traj.count == 5 and traj.velocities[0] == 1.0            # the count docs/speeds.md states
    assert V.trajectories((0.8, 1.2), 5).is_diagonal                 # all velocities that round to the diagonal
    assert not V.trajectories((1.3,), 5).is_diagonal
    with pytest.raises(UserError, match="--velocities gives .* distinct trajectories"):
        V.trajectories(V.parse_velocities("0:8:0.05"), 6)


# ---------------------------------------------------------------- the kernel

def random_block(seed: int, m: int, n: int) -> torch.Tensor:
    rng = np.random.default_rng(seed)
    return frame_distances(torch.from_numpy(unit_rows(rng, m, 8)), torch.from_numpy(unit_rows(rng, n, 8)))


@pytest.mark.parametrize("seq_len", LENGTHS)
def test_kernel_equals_plain_twin_with_sequence_bounds(seq_len):
    db_bounds = segments([9, seq_len + 1, 14, 7])
    q_bounds = segments([8, 11])
    fd = random_block(seq_len, len(db_bounds), len(q_bounds))
    traj = V.trajectories(SPEEDS, seq_len)
    anchors, q_cols = windows(db_bounds, seq_len), windows(q_bounds, seq_len)
    got = V.trajectory_distances(fd, anchors, db_bounds, q_cols, traj)
    want = plain_distances(fd.numpy(), anchors, db_bounds, q_cols, traj)
    assert got.dtype == torch.float32 and np.array_equal(got.numpy(), want)
    assert np.isfinite(want).any() and (seq_len == 1 or np.isinf(want).any())   # some leave their sequence
    # scattered anchors take the gather route: the same numbers
    pick = np.array([0, len(anchors) - 1, len(anchors) // 2])
    scattered = V.trajectory_distances(fd, anchors[pick], db_bounds[pick], q_cols, traj)
    assert torch.equal(scattered, got[:, pick])


@pytest.mark.parametrize("seq_len", LENGTHS)
def test_diagonal_kernel_is_todays_window_distances_exactly(seq_len):
    rng = np.random.default_rng(seq_len)
    db, q = torch.from_numpy(unit_rows(rng, 37, 16)), torch.from_numpy(unit_rows(rng, 23, 16))
    db_bounds, q_bounds = segments([37]), segments([23])
    db_starts, _ = sequence_windows(db_bounds, seq_len)
    q_starts, _ = sequence_windows(q_bounds, seq_len)
    today = window_distances(db, q, torch.as_tensor(db_starts), torch.as_tensor(q_starts), seq_len)
    got = V.trajectory_distances(frame_distances(db, q), db_starts + seq_len // 2, db_bounds,
                                 q_starts + seq_len // 2, V.trajectories((1.0,), seq_len))
    assert torch.equal(got[0], today)


def test_kernel_refuses_a_block_too_small_for_its_trajectories():
    fd = random_block(0, 10, 10)
    with pytest.raises(ValueError, match="anchor_margin"):
        V.trajectory_distances(fd, [2], [[-5, 20]], [5], V.trajectories((2.0,), 5))
    assert V.anchor_margin(V.trajectories((0.5, 2.0), 5)) == (4, 4)
    assert V.anchor_margin(V.trajectories((0.5, 2.0), 5, anchor="end")) == (8, 0)


# ---------------------------------------------------------------- the search and its rules

RULES = [V.PLAIN_MIN, V.DEFAULT_RULE, V.ScoringRule("consensus", window=2, weight=0.5, normalise=False),
         V.ScoringRule("zscore", normalise=True), V.ScoringRule("prior", window=0, weight=0.1, normalise=False)]


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


def run_blocks(fd, db_bounds, anchors, q_cols, traj, k, db_chunk, q_chunk) -> V.TrajectoryTopK:
    """The search in blocks of ``db_chunk`` database windows x ``q_chunk`` queries (global ids)."""
    acc = V.TrajectoryTopK(len(q_cols), traj, k)
    for q_lo in range(0, len(q_cols), q_chunk):
        cols = q_cols[q_lo:q_lo + q_chunk]
        for d_lo in range(0, len(anchors), db_chunk):
            ids = np.arange(d_lo, min(d_lo + db_chunk, len(anchors)))
            acc.add(q_lo, V.trajectory_distances(fd, anchors[ids], db_bounds[ids], cols, traj), ids)
    return acc


@pytest.mark.parametrize("seq_len", [1, 2, 3, 5, 6])
@pytest.mark.parametrize("rule", RULES, ids=lambda r: f"{r.kind}-{r.window}-{r.weight}-{r.normalise}")
def test_search_equals_dense_plain_loop(seq_len, rule):
    fd, db_bounds, q_bounds, anchors, q_cols = search_case(seq_len, seq_len)
    traj = V.trajectories(SPEEDS, seq_len)
    k = 7
    acc = run_blocks(fd, db_bounds, anchors, q_cols, traj, k, db_chunk=5, q_chunk=8)
    ids, scores, vel = acc.finish(q_bounds, rule)
    dense = plain_distances(fd.numpy(), anchors, db_bounds, q_cols, traj).transpose(2, 0, 1)   # [Nq, T, A]
    p_ids, p_scores, p_vel = plain_search(dense, rule, q_bounds[:, 0], traj, k)
    np.testing.assert_allclose(scores.numpy(), p_scores, rtol=1e-9, atol=1e-9)
    assert np.array_equal(ids.numpy(), p_ids) and np.array_equal(vel.numpy(), p_vel)


@pytest.mark.parametrize("seq_len", [2, 5])
def test_ties_by_database_frame_then_velocity_nearest_one(seq_len):
    fd, db_bounds, q_bounds, anchors, q_cols = search_case(7, seq_len, data="onehot")
    traj = V.trajectories(SPEEDS, seq_len)
    acc = run_blocks(fd, db_bounds, anchors, q_cols, traj, 12, db_chunk=4, q_chunk=5)
    ids, scores, vel = acc.finish(q_bounds, V.PLAIN_MIN)
    dense = plain_distances(fd.numpy(), anchors, db_bounds, q_cols, traj).transpose(2, 0, 1)
    p_ids, p_scores, p_vel = plain_search(dense, V.PLAIN_MIN, q_bounds[:, 0], traj, 12)
    assert (np.diff(p_scores, axis=1) == 0).sum() > 50                  # the case is full of exact ties
    assert np.array_equal(ids.numpy(), p_ids) and np.array_equal(vel.numpy(), p_vel)
    assert np.array_equal(scores.numpy(), p_scores)


def test_blocks_give_the_same_result_as_one_block():
    fd, db_bounds, q_bounds, anchors, q_cols = search_case(3, 5)
    traj = V.trajectories(V.parse_velocities("0.5:2:0.1"), 5)
    whole = run_blocks(fd, db_bounds, anchors, q_cols, traj, 9, db_chunk=1000, q_chunk=1000).finish(q_bounds)
    parts = run_blocks(fd, db_bounds, anchors, q_cols, traj, 9, db_chunk=3, q_chunk=4).finish(q_bounds)
    for a, b in zip(whole, parts):
        assert torch.equal(a, b)


def test_neighbour_mean_stays_in_its_segment():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((15, 3))
    x[4, 1] = np.inf
    seg = np.repeat([0, 5, 9], [5, 4, 6])
    got = V.neighbour_mean(x, seg, 2)
    for q in range(15):
        near = [p for p in range(q - 2, q + 3) if 0 <= p < 15 and seg[p] == seg[q]]
        for t in range(3):
            vals = [x[p, t] for p in near if np.isfinite(x[p, t])]
            assert got[q, t] == pytest.approx(sum(vals) / len(vals))


def test_causal_coefficients_use_only_the_given_history():
    best = np.array([[0.5, 0.7], [0.6, 0.4], [0.8, 0.3]])
    a, b = V.causal_coefficients(V.ScoringRule("consensus", window=5, weight=2.0, normalise=False), best,
                                 np.zeros_like(best), np.ones_like(best))
    assert a.tolist() == [1.0, 1.0]
    assert b == pytest.approx([2.0 * (0.6333333333 - 0.4666666667), 0.0])
    with pytest.raises(ValueError):
        V.causal_coefficients(V.ScoringRule("prior"), best, best, best)


# ---------------------------------------------------------------- training

@pytest.mark.parametrize("seq_len", [1, 3, 5])
def test_trajectory_frames_and_distance_match_plain_loop(seq_len):
    rng = np.random.default_rng(seq_len)
    feats = torch.from_numpy(unit_rows(rng, 30, 6)).requires_grad_()
    bounds = segments([12, 18])
    traj = V.trajectories(SPEEDS, seq_len)
    anchors = torch.tensor([2, 6, 11, 15, 27])
    frames, valid = V.trajectory_frames(anchors, torch.as_tensor(bounds[anchors.numpy()]), traj)
    fq = torch.from_numpy(unit_rows(rng, seq_len, 6))
    d = V.trajectory_sequence_distance(fq.expand(len(anchors), -1, -1), feats[frames], valid)
    for a, j in enumerate(anchors.tolist()):
        lo, hi = bounds[j]
        best = math.inf
        for t in range(traj.count):
            fr = [j + int(s) for s in traj.steps[t]]
            ok = all(lo <= f < hi for f in fr)
            assert bool(valid[a, t]) == ok
            if ok:
                assert frames[a, t].tolist() == fr
                total = sum(float(torch.linalg.norm(fq[i] - feats.detach()[f])) for i, f in enumerate(fr))
                best = min(best, total / seq_len)
        assert float(d[a].detach()) == pytest.approx(best, abs=1e-5)
    d[torch.isfinite(d)].sum().backward()
    assert feats.grad is not None and torch.isfinite(feats.grad).all() and feats.grad.abs().sum() > 0
    soft = V.trajectory_sequence_distance(fq.expand(len(anchors), -1, -1), feats[frames], valid, temperature=0.01)
    assert (soft <= d + 1e-6).all()


def test_diagonal_training_distance_is_sequence_distance():
    rng = np.random.default_rng(1)
    fq, fdb = torch.from_numpy(unit_rows(rng, 5, 4)), torch.from_numpy(unit_rows(rng, 5, 4))
    got = V.trajectory_sequence_distance(fq, fdb[None], torch.tensor([True]))
    assert torch.equal(got, sequence_distance(fq, fdb))
