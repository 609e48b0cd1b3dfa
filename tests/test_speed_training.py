"""``--velocities`` in training: the mining matrix and the triplet loss across speeds against plain loops
written from the definition (a window's distance is the smallest over its trajectories that stay in the
database sequence, each the mean of its position distances: on the half grid a midpoint's is the mean of
its two frames' distances), on both grids, and a training run."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import test_velocity as twins
from seqmatchnet.data.windows import Split, segment_bounds
from seqmatchnet.models.sequence import SeqMatchModel
from seqmatchnet.speeds import trajectories
from seqmatchnet.training import mining, steps


def small_tset(seq_len: int) -> mining.TrainingSet:
    rng = np.random.default_rng(seq_len)
    n_db, n_q = 60, 40
    db = rng.standard_normal((n_db, 6)).astype(np.float32)
    q = db[np.arange(n_q) * 3 // 2] + 0.2 * rng.standard_normal((n_q, 6)).astype(np.float32)  # 1.5x faster
    db_bounds = np.concatenate([segment_bounds(35), segment_bounds(25) + 35])
    split = Split(name="train", db_desc=db, q_desc=q,
                  db_positions=np.stack([np.arange(n_db) * 2.0, np.zeros(n_db)], axis=1),
                  q_positions=np.stack([np.arange(n_q) * 3.0, np.zeros(n_q)], axis=1), pos_dist_thr=5.0,
                  non_triv_pos_dist_sq_thr=16.0, db_bounds=db_bounds, q_bounds=segment_bounds(n_q))
    return mining.TrainingSet.build(split, seq_len)


def pair_distances(fq: np.ndarray, fdb: np.ndarray) -> np.ndarray:
    """``[Nq, Ndb]`` float64: ||fq_i - fdb_f|| of every query and database frame."""
    fq, fdb = fq.astype(np.float64), fdb.astype(np.float64)
    return np.linalg.norm(fq[:, None, :] - fdb[None, :, :], axis=2)


def plain_window_distance(dist: np.ndarray, q_start: int, db_start: int, bounds,
                          plain: twins.PlainTrajectories) -> float:
    """min over trajectories inside ``bounds`` (every frame they touch) of the mean position distance along
    them (plain loops over ``dist`` = ``pair_distances``); ``plain`` from ``test_velocity.plain_trajectories``."""
    anchor, best = db_start + plain.seq_len // 2, math.inf
    for pos in plain.positions:
        if not all(bounds[0] <= f < bounds[1] for f in twins.touched(anchor, pos)):
            continue
        total = 0.0
        for i, p in enumerate(pos):
            x, f = anchor + p, math.floor(anchor + p)
            taps = [dist[q_start + i, g] for g in ((f,) if x == f else (f, f + 1))]
            total += sum(taps) / len(taps)
        best = min(best, total / plain.seq_len)
    return best


@pytest.mark.parametrize("grid", [1, 2])
def test_mining_matrix_across_speeds_equals_plain_loops(grid):
    for seq_len in (1, 3, 4, 5):
        tset = small_tset(seq_len)
        traj = trajectories.trajectories((0.5, 1.0, 1.5, 2.0), seq_len, grid=grid)
        plain = twins.plain_trajectories((0.5, 1.0, 1.5, 2.0), seq_len, "centre", grid)
        twins.assert_same_trajectories(traj, plain, grid)
        model = SeqMatchModel(6, True, 5)
        config = steps.TrainConfig(seq_len=seq_len, quiet=True, velocities=(0.5, 1.0, 1.5, 2.0), grid=grid)
        assert (config.trajectories is None) == traj.is_diagonal        # the diagonal alone: today's matrix
        if config.trajectories is not None:
            assert config.trajectories.steps.tolist() == traj.steps.tolist()
            assert config.trajectories.weights.tolist() == traj.weights.tolist()
        queries = tset.queries[::3]
        got = steps.model_cache_distances(model, tset, queries, config, torch.device("cpu")).numpy()
        with torch.no_grad():
            fdb = model.encode(torch.from_numpy(tset.split.db_desc)).numpy()
            fq = model.encode(torch.from_numpy(tset.split.q_desc)).numpy()
        dist = pair_distances(fq, fdb)
        for j, qi in enumerate(queries):
            for i in range(len(tset.db_frames)):
                want = plain_window_distance(dist, tset.q_starts[qi], tset.db_starts[i],
                                             tset.split.db_bounds[tset.db_frames[i]], plain)
                assert (got[i, j] == want == math.inf) or abs(got[i, j] - want) < 1e-5, (seq_len, i, j)


@pytest.mark.parametrize("grid", [1, 2])
@pytest.mark.parametrize("seq_len", [3, 4])
def test_triplet_loss_across_speeds_equals_plain_loops(seq_len, grid):
    margin = 0.1
    tset = small_tset(seq_len)
    traj = trajectories.trajectories((0.5, 1.0, 1.5, 2.0), seq_len, grid=grid)
    plain = twins.plain_trajectories((0.5, 1.0, 1.5, 2.0), seq_len, "centre", grid)
    twins.assert_same_trajectories(traj, plain, grid)
    torch.manual_seed(1)
    model = SeqMatchModel(6, True, 5)
    rng = np.random.default_rng(0)
    q_idx = tset.queries[:6]
    pos = np.array([tset.nontriv_pos[i][0] for i in q_idx])
    negs = rng.integers(0, len(tset.db_frames), (6, 4))
    negs[1, 2:] = -1
    loss = steps.batch_loss(model, tset, steps.Triplets(q_idx, pos, negs),
                            steps.LossSettings("meanOfPairs", margin, traj), torch.device("cpu"))
    with torch.no_grad():
        fdb = model.encode(torch.from_numpy(tset.split.db_desc)).numpy()
        fq = model.encode(torch.from_numpy(tset.split.q_desc)).numpy()
    dist_qdb = pair_distances(fq, fdb)
    hinges = []
    for b, qi in enumerate(q_idx):
        def dist(w, qi=qi):
            return plain_window_distance(dist_qdb, tset.q_starts[qi], tset.db_starts[w],
                                         tset.split.db_bounds[tset.db_frames[w]], plain)
        d_pos = dist(pos[b])
        hinges += [max(0.0, d_pos - dist(n) + math.sqrt(margin)) for n in negs[b] if n >= 0 and
                   math.isfinite(dist(n)) and math.isfinite(d_pos)]
    assert len(hinges) > 10 and abs(loss.item() - np.mean(hinges)) < 1e-5
    loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())


@pytest.mark.parametrize("grid", [1, 2])
def test_one_velocity_is_the_diagonal_loss(grid):
    tset = small_tset(5)
    model = SeqMatchModel(6, True, 5)
    q_idx = tset.queries[:5]
    pos = np.array([tset.nontriv_pos[i][0] for i in q_idx])
    negs = np.tile(np.arange(3), (5, 1)) + 20
    triplets = steps.Triplets(q_idx, pos, negs)
    want = steps.batch_loss(model, tset, triplets, steps.LossSettings("meanOfPairs", 0.1),
                            torch.device("cpu"))
    diagonal = trajectories.trajectories((1.0,), 5, grid=grid)
    got = steps.batch_loss(model, tset, triplets, steps.LossSettings("meanOfPairs", 0.1, diagonal),
                           torch.device("cpu"))
    assert abs(got.item() - want.item()) < 1e-6


def test_training_across_speeds_runs(tiny_oxford, monkeypatch):
    from test_train import TRAIN, run_main

    assert run_main(TRAIN + ["--seqL", "3", "--nEpochs", "1", "--velocities", "0.5:2:0.5"], tiny_oxford,
                    monkeypatch) == 0
