"""``--velocities`` in the search (``speeds.rank_across_speeds``, docs/speeds.md) against plain loops written
from the definition: a window's trajectories are anchored at its centre ``start + L // 2``, sit at the
database positions ``anchor + s + v * k`` for query offsets ``k`` rounded to the grid (whole frames: ``s = 0``,
``anchor + round_half_away(v * k)``; half frames: ``s`` in ``{0, 1/2}``, a midpoint's distance the mean of
its two frames'), are not scored when they touch a frame outside the database sequence, and a window's score
is the best adjusted score over its trajectories (equal ones: the velocity nearest 1, then phase 0)."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import plain
import test_velocity as twins
from seqmatchnet.data.windows import sequence_windows
from seqmatchnet.matching.seqmatch import frame_distances
from seqmatchnet.search import diagonal, speeds
from seqmatchnet.search.sides import Windows
from seqmatchnet.speeds import rules, trajectories


def unit(rng: np.random.Generator, n: int, d: int) -> torch.Tensor:
    x = rng.standard_normal((n, d)).astype(np.float32)
    return torch.from_numpy(x / np.linalg.norm(x, axis=1, keepdims=True))


bounds_of = plain.segments_of


def plain_scores(db, q, db_starts, q_starts, db_bounds, q_bounds, seq_len, velocities, rule, grid=1, traj=None):
    """Adjusted score ``[Nq, T, Ndb]`` of every (query window, trajectory, database window) by loops (float64),
    and the velocity of each trajectory; the trajectories enumerated from the definition
    (``test_velocity.plain_trajectories``) and checked against ``traj`` when given."""
    plain = twins.plain_trajectories(velocities, seq_len, "centre", grid)
    if traj is not None:
        twins.assert_same_trajectories(traj, plain, grid)
    d = frame_distances(db.double(), q.double()).numpy()
    half = seq_len // 2
    n_t, n_q, n_db = plain.count, len(q_starts), len(db_starts)
    raw = np.full((n_q, n_t, n_db), np.inf)
    qa = np.asarray(q_starts) + half                     # every query window at once (a vector per loop step)
    for t, pos in enumerate(plain.positions):
        for j in range(n_db):
            a = int(db_starts[j]) + half
            lo, hi = db_bounds[j]
            if all(lo <= f < hi for f in twins.touched(a, pos)):
                total = np.zeros(n_q)
                for k, p in zip(plain.offsets, pos):
                    f = math.floor(a + p)
                    total += d[f, qa + k] if a + p == f else (d[f, qa + k] + d[f + 1, qa + k]) / 2
                raw[:, t, j] = total / seq_len
    finite = np.isfinite(raw)
    stats = {"best": raw.min(axis=2), "sum": np.where(finite, raw, 0).sum(axis=2),
             "sumsq": np.where(finite, raw ** 2, 0).sum(axis=2), "count": finite.sum(axis=2).astype(float)}
    a, b = rules.rule_coefficients(rule, stats, q_bounds)
    return a[:, :, None] * raw + b[:, :, None], plain.velocities


def plain_top(adj, velocities, k):
    """Per query: database windows by (best adjusted score, index), each with the velocity of its best
    trajectory, the first in the trajectory order (velocity nearest 1, then phase 0) among equal scores."""
    out = []
    for i in range(adj.shape[0]):
        best = []
        for j in range(adj.shape[2]):
            t = min(range(adj.shape[1]), key=lambda t: (adj[i, t, j], t))
            best.append((adj[i, t, j], j, velocities[t]))
        out.append(sorted(best, key=lambda x: (x[0], x[1]))[:k])
    return out


@pytest.mark.parametrize("grid", [1, 2])
@pytest.mark.parametrize("seq_len", [1, 2, 3, 4, 5, 6])
@pytest.mark.parametrize("rule", [rules.PLAIN_MIN, rules.DEFAULT_RULE], ids=["min", "consensus"])
def test_rank_across_speeds_equals_plain_loops(seq_len, rule, grid):
    rng = np.random.default_rng(seq_len)
    db_bounds, q_bounds = bounds_of([23, 17]), bounds_of([11, 14])
    db, q = unit(rng, len(db_bounds), 6), unit(rng, len(q_bounds), 6)
    db[30:34] = db[5:9]                                     # repeated places: exact ties across windows
    db_starts, q_starts = sequence_windows(db_bounds, seq_len)[0], sequence_windows(q_bounds, seq_len)[0]
    velocities = (0.5, 0.75, 1.0, 1.25, 1.5, 2.0)
    k = 12
    traj = trajectories.trajectories(velocities, seq_len, grid=grid)
    idx, scores, vel = speeds.rank_across_speeds(Windows([(0, db, np.arange(len(db_starts)))], db_starts, db_bounds),
                                                 Windows(q, q_starts, q_bounds), traj, rule, k, query_chunk=4)
    adj, vels = plain_scores(db, q, db_starts, q_starts, db_bounds, q_bounds, seq_len, velocities, rule, grid, traj)
    want = plain_top(adj, vels, k)
    for i, row in enumerate(want):
        finite = [r for r in row if np.isfinite(r[0])]
        np.testing.assert_allclose(scores[i, :len(finite)], [r[0] for r in finite], rtol=1e-5, atol=1e-5)
        # equal up to scores that differ in the last float32 bits
        close = np.isclose(scores[i, :len(finite)], [r[0] for r in finite], rtol=0, atol=1e-9)
        assert [r[1] for r in finite][:close.argmin() if not close.all() else None] == \
            idx[i, :len(finite)].tolist()[:close.argmin() if not close.all() else None]
        np.testing.assert_array_equal(vel[i, :len(finite)][close], np.array([r[2] for r in finite])[close])


@pytest.mark.parametrize("grid", [1, 2])
@pytest.mark.parametrize("seq_len", [1, 3, 4, 5])
def test_one_velocity_equals_the_diagonal_search(seq_len, grid):
    """With the single trajectory v = 1 the search across speeds is today's ``search.rank``."""
    rng = np.random.default_rng(7)
    db_bounds, q_bounds = bounds_of([30, 25]), bounds_of([40])
    db, q = unit(rng, len(db_bounds), 8), unit(rng, len(q_bounds), 8)
    db_starts, q_starts = sequence_windows(db_bounds, seq_len)[0], sequence_windows(q_bounds, seq_len)[0]
    want_i, want_d = diagonal.rank(Windows(db, db_starts), Windows(q, q_starts), seq_len, k=20, quiet=True)
    got_i, got_d, vel = speeds.rank_across_speeds(Windows([(0, db, np.arange(len(db_starts)))], db_starts, db_bounds),
                                                  Windows(q, q_starts, q_bounds),
                                                  trajectories.trajectories((1.0,), seq_len, grid=grid),
                                                  rules.PLAIN_MIN, 20,
                                                  query_chunk=7)
    np.testing.assert_array_equal(got_i, want_i)
    np.testing.assert_allclose(got_d, want_d, rtol=0, atol=1e-6)
    assert (vel == 1).all()


@pytest.mark.parametrize("grid", [1, 2])
def test_faster_query_is_found_at_its_speed(grid):
    """A query traversal driven at twice the database's speed: its windows match their places along
    the v = 2 trajectory, which the diagonal cannot follow."""
    rng = np.random.default_rng(3)
    db = unit(rng, 200, 16)
    q = db[0:200:2] + 0.05 * unit(rng, 100, 16)
    q = q / q.norm(dim=1, keepdim=True)
    seq_len = 5
    db_bounds, q_bounds = bounds_of([200]), bounds_of([100])
    db_starts, q_starts = sequence_windows(db_bounds, seq_len)[0], sequence_windows(q_bounds, seq_len)[0]
    idx, _, vel = speeds.rank_across_speeds(Windows([(0, db, np.arange(len(db_starts)))], db_starts, db_bounds),
                                            Windows(q, q_starts, q_bounds),
                                            trajectories.trajectories((0.5, 1.0, 1.5, 2.0), seq_len, grid=grid),
                                            rules.DEFAULT_RULE, 5)
    inner = np.arange(5, 95)
    assert (idx[inner, 0] == 2 * inner).mean() > 0.95
    assert (vel[inner, 0] == 2).mean() > 0.95


def route(seed: int, seq_len: int):
    rng = np.random.default_rng(seed)
    db_bounds, q_bounds = bounds_of([33, 29]), bounds_of([18, 16])
    db, q = unit(rng, len(db_bounds), 6), unit(rng, len(q_bounds), 6)
    db_starts, q_starts = sequence_windows(db_bounds, seq_len)[0], sequence_windows(q_bounds, seq_len)[0]
    return db, q, db_starts, q_starts, db_bounds, q_bounds


@pytest.mark.parametrize("grid", [1, 2])
@pytest.mark.parametrize("seq_len", [1, 3, 4, 6])
@pytest.mark.parametrize("chunk", [5, 16, 1000])
def test_streamed_blocks_equal_the_database_in_memory(seq_len, chunk, grid):
    """``trajectory_blocks`` (the map read ``chunk`` frames at a time, each block reaching the trajectories'
    margin) gives the predictions, scores and velocities of one block holding every frame."""
    from seqmatchnet.models.sequence import SeqMatchModel

    db, q, db_starts, q_starts, db_bounds, q_bounds = route(seq_len, seq_len)
    traj = trajectories.trajectories((0.5, 1.0, 1.5, 2.0, 3.0), seq_len, grid=grid)
    model = SeqMatchModel(6, False, 6)
    queries = Windows(q, q_starts, q_bounds)
    want = speeds.rank_across_speeds(Windows([(0, db, np.arange(len(db_starts)))], db_starts, db_bounds), queries,
                                     traj, rules.DEFAULT_RULE, 15, query_chunk=5)
    config = diagonal.SearchConfig(map_chunk=chunk, batch_size=64, feat_dtype=torch.float32, quiet=True)
    blocks = speeds.trajectory_blocks(config, model, Windows(db.numpy(), db_starts), traj, torch.device("cpu"), {})
    got = speeds.rank_across_speeds(Windows(blocks, db_starts, db_bounds), queries, traj,
                                    rules.DEFAULT_RULE, 15, query_chunk=5)
    # the products of differently sized blocks may differ in the last bits: equal up to such near-ties
    np.testing.assert_allclose(got[1], want[1], rtol=0, atol=1e-5)
    apart = np.c_[np.diff(want[1], axis=1) > 1e-5, np.ones(len(want[1]), bool)]
    apart &= np.c_[np.ones(len(want[1]), bool), apart[:, :-1]]
    np.testing.assert_array_equal(got[0][apart], want[0][apart])
    np.testing.assert_array_equal(got[2][apart], want[2][apart])
    assert apart.mean() > 0.7          # (exact ties of the shifted end windows count as near-ties here)


@pytest.mark.parametrize("grid", [1, 2])
@pytest.mark.parametrize("seq_len", [1, 2, 3, 5])
def test_rerank_across_speeds_equals_plain_loops(seq_len, grid):
    """Each query's own candidates re-ranked across speeds (plain minimum over trajectories) against the
    plain loop over the same candidates; ties by candidate index."""
    from seqmatchnet.models.sequence import SeqMatchModel

    db, q, db_starts, q_starts, db_bounds, q_bounds = route(10 + seq_len, seq_len)
    velocities = (0.5, 1.0, 1.5, 2.0)
    rng = np.random.default_rng(seq_len)
    cand = np.stack([rng.choice(len(db_starts), 9, replace=False) for _ in q_starts])
    traj = trajectories.trajectories(velocities, seq_len, grid=grid)
    config = diagonal.SearchConfig(rule=rules.PLAIN_MIN, batch_size=64)
    idx, scores, vel = speeds.rerank_across_speeds(config, SeqMatchModel(6, False, 6),
                                                   Windows(db.numpy(), db_starts, db_bounds),
                                                   Windows(q, q_starts, q_bounds), cand, traj,
                                                   torch.device("cpu"), group_bytes=2000)
    adj, vels = plain_scores(db, q, db_starts, q_starts, db_bounds, q_bounds, seq_len, velocities, rules.PLAIN_MIN,
                             grid, traj)
    for i in range(len(q_starts)):
        rows = []
        for j in cand[i]:
            t = min(range(len(vels)), key=lambda t: (adj[i, t, j], t))
            rows.append((adj[i, t, j], j, vels[t]))
        rows.sort(key=lambda r: (r[0], r[1]))
        finite = [r for r in rows if np.isfinite(r[0])]
        np.testing.assert_allclose(scores[i, :len(finite)], [r[0] for r in finite], atol=1e-5)
        close = np.r_[np.diff([r[0] for r in finite]) > 1e-6, True]     # positions not tied with the next one
        np.testing.assert_array_equal(idx[i, :len(finite)][close], np.array([r[1] for r in finite])[close])
        np.testing.assert_array_equal(vel[i, :len(finite)][close], np.array([r[2] for r in finite])[close])
        assert np.isinf(scores[i, len(finite):]).all()


@pytest.mark.slow
def test_a_query_driven_twice_as_fast_end_to_end(tmp_path, monkeypatch, capsys):
    """The synthetic route driven at twice the database's speed: --mode test and --mode localize with
    --velocities find the places the diagonal misses, and name the velocity of each match
    (results.npz ``velocities``, the CSV's ``velocity`` column, summary.json's setting)."""
    import csv
    import json

    import main

    monkeypatch.chdir(tmp_path)
    # the whole-frame grid, which these numbers were measured on (0.5:2:0.1 gives 20 > 16 half-grid trajectories)
    common = ["--dataset", "synthetic", "--seqL", "5", "--split", "test", "--nocuda", "--quiet",
              "--synth_frames", "2000", "--synth_query_speed", "2", "--trajectoryGrid", "whole"]
    recalls = {}
    for name, v in (("diagonal", "1"), ("speeds", "0.5:2:0.1")):
        out = tmp_path / name
        assert main.main(["--mode", "test", *common, "--velocities", v, "--resultsPath", str(out),
                          "--figures", "none"]) == 0
        recalls[name] = json.loads((out / "summary.json").read_text())["recalls"]["1"]
    assert "top-1 matches by velocity (database frames per query frame): " in capsys.readouterr().out
    z = np.load(tmp_path / "speeds" / "results.npz")
    # 1.8 and 2 give one trajectory for L = 5 (offsets -4, -2, 0, 2, 4), named by the velocity nearest 1
    assert trajectories.trajectories((1.8,), 5).steps.tolist() == trajectories.trajectories((2.0,), 5).steps.tolist()
    assert (z["velocities"][:, 0] == np.float32(1.8)).mean() > 0.5
    assert json.loads((tmp_path / "speeds" / "summary.json").read_text())["velocities"] == "0.5:2:0.1"
    assert recalls["speeds"] > recalls["diagonal"] + 0.05          # 0.749 vs 0.661 when written
    csv_path = tmp_path / "m.csv"
    assert main.main(["--mode", "localize", *common, "--velocities", "0.5:2:0.1", "--output", str(csv_path)]) == 0
    rows = list(csv.DictReader(csv_path.open()))
    assert rows[0].keys() >= {"velocity", "db_frame"}
    chosen = [float(r["velocity"]) for r in rows if r["db_frame"]]
    assert np.median(chosen) >= 1.5           # trailing windows: 1.7, 1.8, 1.9 and 2 are distinct trajectories


@pytest.mark.parametrize("grid", [1, 2])
@pytest.mark.parametrize("seq_len", [1, 3, 4, 5])
@pytest.mark.parametrize("rule", [rules.PLAIN_MIN, rules.DEFAULT_RULE], ids=["min", "default"])
def test_in_memory_search_equals_the_block_search(seq_len, rule, grid):
    """The search that keeps every trajectory distance (one top-k per query chunk) gives exactly the
    per-trajectory top-k lists' result: ids, scores and velocities."""
    db, q, db_starts, q_starts, db_bounds, q_bounds = route(20 + seq_len, seq_len)
    traj = trajectories.trajectories((0.5, 0.8, 1.0, 1.5, 2.0), seq_len, grid=grid)
    queries = Windows(q, q_starts, q_bounds)
    want = speeds.rank_across_speeds(Windows([(0, db, np.arange(len(db_starts)))], db_starts, db_bounds), queries,
                                     traj, rule, 20, query_chunk=4)
    got = speeds.rank_across_speeds_in_memory(Windows(db, db_starts, db_bounds), queries, traj, rule, 20,
                                              query_chunk=4)        # the same products, to the last bit
    finite = np.isfinite(want[1])
    for w, g in zip(want, got):
        np.testing.assert_array_equal(g[finite], w[finite])
    assert diagonal.DENSE_LIMIT_BYTES and speeds.fits_in_memory(traj, len(db_starts), len(q_starts))


@pytest.mark.parametrize("query_chunk, window", [(1, 3), (1, 1), (2, 3), (3, 2)])
def test_in_memory_tiles_wait_for_every_neighbour_the_rule_reads(query_chunk, window):
    """Query tiles of 1 to 3 windows and a consensus over +-1 to 3 neighbours: every tile is ranked only when
    the statistics of its last neighbour are known, also when they become known exactly at a tile's end (the
    tiles of 4 and the window of 20 above never meet that case). Exactly the block search's result."""
    db, q, db_starts, q_starts, db_bounds, q_bounds = route(41, 3)
    traj = trajectories.trajectories((0.5, 1.0, 1.5, 2.0), 3, grid=2)
    rule = rules.ScoringRule("consensus", window=window, weight=3.0, normalise=True)
    queries = Windows(q, q_starts, q_bounds)
    want = speeds.rank_across_speeds(Windows([(0, db, np.arange(len(db_starts)))], db_starts, db_bounds), queries,
                                     traj, rule, 10, query_chunk=query_chunk)
    got = speeds.rank_across_speeds_in_memory(Windows(db, db_starts, db_bounds), queries, traj, rule, 10,
                                              query_chunk=query_chunk)
    finite = np.isfinite(want[1])
    assert finite[:, 0].all()
    for w, g in zip(want, got):
        np.testing.assert_array_equal(g[finite], w[finite])


@pytest.mark.parametrize("speed, rule", [(2, rules.DEFAULT_RULE), (0.5, rules.DEFAULT_RULE), (2, rules.PLAIN_MIN)],
                         ids=["2x", "0.5x", "2x-min"])
def test_share_of_top1_velocities_is_what_the_search_chose(speed, rule):
    """``--mode test``'s line "top-1 matches by velocity" counts, per velocity, the queries whose top-1 match
    came from a trajectory of that velocity: each query's reported velocity is the one whose adjusted score
    (plain loop) is the top-1's score, the first in the trajectory order among equal ones; and a query
    traversal driven at ``speed`` x the database's shows that speed for most of its matches."""
    from seqmatchnet.data.windows import Split
    from seqmatchnet.evaluation.evaluate import EvalConfig, evaluate, format_recalls
    from seqmatchnet.models.sequence import SeqMatchModel

    rng = np.random.default_rng(7)
    n_db = 90
    db = unit(rng, n_db, 6)
    q_rows = np.arange(0, n_db - 1, speed).astype(int) if speed >= 1 else np.repeat(np.arange(n_db // 2), 2)
    q = torch.nn.functional.normalize(db[q_rows] + 0.15 * unit(rng, len(q_rows), 6), dim=1)
    db_bounds, q_bounds = bounds_of([n_db]), bounds_of([len(q_rows)])
    split = Split(name="test", db_desc=db.numpy(), q_desc=q.numpy(),
                  db_positions=np.stack([np.arange(n_db) * 2.0, np.zeros(n_db)], axis=1),
                  q_positions=np.stack([q_rows * 2.0, np.zeros(len(q_rows))], axis=1), pos_dist_thr=5.0,
                  non_triv_pos_dist_sq_thr=9.0, db_bounds=db_bounds, q_bounds=q_bounds)
    velocities = (0.5, 1.0, 1.5, 2.0)
    config = EvalConfig(5, search=diagonal.SearchConfig(velocities=velocities, grid=2, rule=rule))
    result = evaluate(config, split, SeqMatchModel(6, False, 6), torch.device("cpu"))
    db_starts, q_starts = sequence_windows(db_bounds, 5)[0], sequence_windows(q_bounds, 5)[0]
    adj, vels = plain_scores(db, q, db_starts, q_starts, db_bounds, q_bounds, 5, velocities, rule, 2)
    for i, j in enumerate(result.preds[:, 0]):
        t = min(range(len(vels)), key=lambda t: (adj[i, t, j], t))
        assert result.velocities[i, 0] == np.float32(vels[t])
        assert result.dists[i, 0] == pytest.approx(adj[i, t, j], abs=1e-5)
    share = dict(zip(*np.unique(result.velocities[:, 0], return_counts=True)))
    line = format_recalls(result).splitlines()[-1]
    assert line == ("top-1 matches by velocity (database frames per query frame): "
                    + ", ".join(f"{v:g} {c / len(result.velocities):.0%}" for v, c in sorted(share.items())))
    assert share.get(np.float32(speed), 0) / len(result.velocities) > 0.8


# ---------------------------------------------------------------- two ranks, faked (threads)

class TwoRanks:
    """``distributed``'s rank, world size and collectives faked for ``world`` threads (one per rank): each
    collective deposits its piece, waits for every rank, combines the pieces in rank order, waits again."""

    def __init__(self, monkeypatch, world: int = 2):
        import threading

        from seqmatchnet.common import distributed

        self.world, self.local, self.pieces = world, threading.local(), [None] * world
        self.barrier = threading.Barrier(world, timeout=60)
        for name, fn in (("active", lambda: True), ("world_size", lambda: world), ("rank", lambda: self.local.rank),
                         ("all_reduce_sum", self.all_reduce_sum), ("all_gather_rows", self.all_gather_rows),
                         ("all_gather_arrays", self.all_gather_arrays)):
            monkeypatch.setattr(distributed, name, fn)

    def exchange(self, piece):
        self.pieces[self.local.rank] = piece
        self.barrier.wait()
        out = list(self.pieces)
        self.barrier.wait()
        return out

    def all_reduce_sum(self, t, what=""):
        return sum(p.clone() for p in self.exchange(t))

    def all_gather_rows(self, t, what=""):
        return torch.cat(self.exchange(t))

    def all_gather_arrays(self, *arrays, what=""):
        return tuple(np.concatenate(p) for p in zip(*self.exchange(arrays)))

    def run(self, fn):
        """``fn(rank)`` on every rank at once: the results in rank order (an error of any rank raised)."""
        import threading

        results, errors = [None] * self.world, []

        def one(r):
            self.local.rank = r
            try:
                results[r] = fn(r)
            except BaseException as exc:            # noqa: BLE001 - re-raised below
                errors.append(exc)
                self.barrier.abort()

        threads = [threading.Thread(target=one, args=(r,)) for r in range(self.world)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if errors:
            raise errors[0]
        return results


@pytest.mark.parametrize("rule", [rules.PLAIN_MIN, rules.DEFAULT_RULE], ids=["min", "default"])
def test_two_ranks_shares_of_the_database_give_the_search_of_one_process(monkeypatch, rule):
    """Under torchrun (two ranks faked with threads) each rank searches its share of the database windows
    and ``gather_shares`` combines them: the statistics summed, the best distances' minimum over the ranks
    (the better one is on rank 1 for some queries and trajectories), the lists merged. Every rank ends
    with exactly the one-process result."""
    db, q, db_starts, q_starts, db_bounds, q_bounds = route(52, 3)
    traj = trajectories.trajectories((0.5, 1.0, 1.5, 2.0), 3, grid=2)
    queries = Windows(q, q_starts, q_bounds)
    all_windows = np.arange(len(db_starts))
    want = speeds.rank_across_speeds(Windows([(0, db, all_windows)], db_starts, db_bounds), queries, traj,
                                     rule, 12, query_chunk=5)
    shares = np.array_split(all_windows, 2)
    one = speeds.rank_across_speeds       # the statistics of each share: rank 1 holds the best of some
    fake = TwoRanks(monkeypatch)
    got = fake.run(lambda r: one(Windows([(0, db, shares[r])], db_starts, db_bounds), queries, traj, rule, 12,
                                 query_chunk=5))
    for result in got:
        for w, g in zip(want, result):
            np.testing.assert_array_equal(g, w)


def test_two_ranks_rerank_each_query_with_its_own_coefficients(monkeypatch):
    """``rerank_across_speeds`` under torchrun (two ranks faked with threads): each rank re-ranks its share of
    the queries with the rule's coefficients of those queries (the statistics travel between the ranks),
    and both ranks end with exactly the one-process result."""
    from seqmatchnet.models.sequence import SeqMatchModel

    db, q, db_starts, q_starts, db_bounds, q_bounds = route(63, 3)
    rng = np.random.default_rng(3)
    cand = np.stack([rng.choice(len(db_starts), 12, replace=False) for _ in q_starts])
    traj = trajectories.trajectories((0.5, 1.0, 1.5, 2.0), 3, grid=2)
    config = diagonal.SearchConfig(rule=rules.DEFAULT_RULE, batch_size=64)
    model = SeqMatchModel(6, False, 6)

    def rerank(_rank=0):
        return speeds.rerank_across_speeds(config, model, Windows(db.numpy(), db_starts, db_bounds),
                                           Windows(q, q_starts, q_bounds), cand, traj, torch.device("cpu"))

    want = rerank()
    fake = TwoRanks(monkeypatch)
    for result in fake.run(rerank):
        for w, g in zip(want, result):
            np.testing.assert_array_equal(g, w)


@pytest.mark.parametrize("grid", [1, 2])
@pytest.mark.parametrize("seq_len", [3, 5])
def test_shortlist_covering_the_map_across_speeds_equals_the_full_search(seq_len, grid):
    """--shortlist K with K >= every database window, re-ranked across speeds (the rule's statistics then
    cover every window), gives the full search's predictions, velocities and scores up to the last bits
    of the distances (per-candidate products instead of one matrix product)."""
    from seqmatchnet.data.windows import Split
    from seqmatchnet.evaluation.evaluate import EvalConfig, evaluate
    from seqmatchnet.models.sequence import SeqMatchModel

    db, q, _, _, db_bounds, q_bounds = route(30 + seq_len, seq_len)
    split = Split(name="test", db_desc=db.numpy(), q_desc=q.numpy(),
                  db_positions=np.stack([np.arange(len(db)) * 2.0, np.zeros(len(db))], axis=1),
                  q_positions=np.stack([np.arange(len(q)) * 3.0, np.zeros(len(q))], axis=1), pos_dist_thr=5.0,
                  non_triv_pos_dist_sq_thr=9.0, db_bounds=db_bounds, q_bounds=q_bounds)
    model = SeqMatchModel(6, False, 6)
    speeds_ = (0.5, 1.0, 1.5, 2.0)
    full = evaluate(EvalConfig(seq_len, search=diagonal.SearchConfig(velocities=speeds_, grid=grid)), split, model,
                    torch.device("cpu"))
    short = evaluate(EvalConfig(seq_len, search=diagonal.SearchConfig(velocities=speeds_, shortlist=1000,
                                                                     map_chunk=20, grid=grid)), split, model,
                     torch.device("cpu"))
    assert short.shortlist["candidates"] == len(full.db_frames) and short.velocities is not None
    np.testing.assert_allclose(short.dists, full.dists, atol=1e-5)
    apart = np.c_[np.diff(full.dists, axis=1) > 1e-5, np.ones(len(full.dists), bool)]
    apart &= np.c_[np.ones(len(full.dists), bool), apart[:, :-1]]
    assert apart.mean() > 0.7
    np.testing.assert_array_equal(short.preds[apart], full.preds[apart])
    np.testing.assert_array_equal(short.velocities[apart], full.velocities[apart])


def test_torchrun_refuses_the_searches_it_does_not_divide(monkeypatch):
    """Under torchrun sequence matching is divided between the ranks, along the diagonal and across speeds,
    dense or shortlisted; the undivided searches are refused with one line instead of being repeated."""
    from seqmatchnet.common import distributed
    from seqmatchnet.common.errors import UserError
    from seqmatchnet.models.sequence import SeqMatchModel

    monkeypatch.setattr(distributed, "active", lambda: True)
    model = SeqMatchModel(4, False, 4)
    diagonal.check_distributed(diagonal.SearchConfig(), model, None)               # divided: accepted
    diagonal.check_distributed(diagonal.SearchConfig(shortlist=5), model, None)   # divided too
    diagonal.check_distributed(diagonal.SearchConfig(velocities=(0.5, 1.0), shortlist=5), model, None)
    cases = [({"shortlist": 5, "shortlist_index": "x.index"}, None, "--shortlistIndex"),
             ({"velocities": (0.5, 1.0)}, np.zeros((2, 20), dtype=np.int64), "--predictionsFile")]
    for kwargs, preds, flag in cases:
        with pytest.raises(UserError, match=f"{flag} is searched in one process"):
            diagonal.check_distributed(diagonal.SearchConfig(**kwargs), model, preds)
    with pytest.raises(UserError, match="--method smooth"):
        diagonal.check_distributed(diagonal.SearchConfig(), SeqMatchModel(4, False, 4, method="smooth"), None)


@pytest.mark.parametrize("grid", [1, 2])
@pytest.mark.parametrize("rule", [rules.PLAIN_MIN, rules.DEFAULT_RULE], ids=["min", "default"])
def test_equal_trajectories_report_the_velocity_nearest_one(rule, grid):
    """A route of identical frames: every trajectory of every window scores the same, so each match
    must name the velocity nearest 1 of those asked for (0.8 here, written from the definition, not
    from the order the trajectories are kept in)."""
    db_bounds, q_bounds = bounds_of([40]), bounds_of([20])
    db = torch.nn.functional.normalize(torch.ones(40, 4), dim=1)
    q = torch.nn.functional.normalize(torch.ones(20, 4), dim=1)
    db_starts, q_starts = sequence_windows(db_bounds, 3)[0], sequence_windows(q_bounds, 3)[0]
    asked = (2.0, 0.5, 1.5, 0.8)
    nearest = min(asked, key=lambda v: (abs(v - 1), v))
    traj = trajectories.trajectories(asked, 3, grid=grid)
    twins.assert_same_trajectories(traj, twins.plain_trajectories(asked, 3, "centre", grid), grid)
    queries = Windows(q, q_starts, q_bounds)
    for result in (speeds.rank_across_speeds(Windows([(0, db, np.arange(40))], db_starts, db_bounds), queries,
                                             traj, rule, 10),
                   speeds.rank_across_speeds_in_memory(Windows(db, db_starts, db_bounds), queries, traj, rule,
                                                       10)):
        assert (result[2] == np.float32(nearest)).all()
        np.testing.assert_array_equal(result[0], np.tile(np.arange(10), (20, 1)))     # ties: ascending frame


def test_localizer_takes_the_command_lines_velocity_text():
    """``Localizer(..., search=SearchSettings(velocities="0.5:2:0.5"))`` searches exactly what the tuple
    ``(0.5, 1, 1.5, 2)`` does (matches, distances and each ``Match.velocity``, one of those asked for); one
    number is one speed; malformed text is the command line's one-line error naming ``--velocities``."""
    from seqmatchnet.common.errors import UserError
    from seqmatchnet.online.localizer import Localizer, SearchSettings

    db, q, _, _, db_bounds, _ = route(71, 3)
    q = torch.nn.functional.normalize(db[np.arange(0, 32, 2)] + 0.1 * q[:16], dim=1)    # driven at 2x
    assert SearchSettings("0.5:2:0.5").velocities == (0.5, 1.0, 1.5, 2.0) == SearchSettings("0.5,1,1.5,2").velocities
    assert SearchSettings(2).velocities == (2.0,)
    runs = {}
    for velocities in ("0.5:2:0.5", (0.5, 1.0, 1.5, 2.0)):
        loc = Localizer(db, seq_len=3, db_bounds=db_bounds, search=SearchSettings(velocities=velocities))
        runs[str(velocities)] = [loc.step(f) for f in q]
    text, tup = runs.values()
    assert text == tup and text[1] is None and text[2] is not None
    assert {m.velocity for m in text[2:]} <= {0.5, 1.0, 1.5, 2.0}
    assert sum(m.velocity == 2.0 for m in text[2:]) > len(text[2:]) / 2
    for bad in ("0.5:2", "2:1:0.5", "fast"):
        with pytest.raises(UserError, match=f"^--velocities '{bad}'") as err:
            SearchSettings(velocities=bad)
        assert "\n" not in str(err.value)


def test_range_comparison_of_the_speed_benchmark_runs():
    """``bench/bench_speeds.py --ranges`` (docs/speeds.md, choosing a range) on a short route: one row per
    range with its trajectory count and Recall@1 per profile; a range around 0.7 finds a 0.7x traversal
    at least as well as the diagonal."""
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    out = subprocess.run([sys.executable, str(root / "bench" / "bench_speeds.py"), "--ranges", "0.5:2:0.5", "0.6:1:0.1",
                          "--profiles", "0.7x", "1x", "--seeds", "0", "--frames", "1500", "--skip-cost"],
                         capture_output=True, text=True, timeout=300, check=True).stdout
    rows = {line.split()[0]: line.split()[1:] for line in out.splitlines()
            if line.startswith(("diagonal (1)", "0.5:2:0.5 ", "0.6:1:0.1 "))}
    assert rows["0.5:2:0.5"][0] == "8" and rows["0.6:1:0.1"][0] == "8" and rows["diagonal"][1] == "1"
    assert float(rows["0.6:1:0.1"][1]) >= float(rows["diagonal"][2])         # 0.7x: range around it vs diagonal
