"""The streaming search across speeds: per-trajectory top-k lists and statistics kept over
blocks of the database, merged once the rule's coefficients are known.
"""
from __future__ import annotations

import numpy as np
import torch

from seqmatchnet.matching import blocks
from seqmatchnet.matching.topk import topk_by_value_then_index
from seqmatchnet.speeds.rules import DEFAULT_RULE, ScoringRule, rule_coefficients
from seqmatchnet.speeds.trajectories import Trajectories

# ---------------------------------------------------------------- the streaming search

class TrajectoryTopK:
    """Per query and trajectory, the ``k`` best database windows of a search streamed in blocks.

    ``num_queries`` query windows (in driving order); ``traj`` the trajectories; ``k`` the list
    length. ``add(q_lo, dists, db_ids)`` takes one block: ``dists`` ``[T, A, B]`` from
    ``trajectory_distances`` for the queries ``q_lo .. q_lo + B - 1`` and the database windows with
    global ids ``db_ids`` ``[A]`` (each window at most once per query over all blocks). It keeps,
    per (query, trajectory), the ``k`` smallest ``(distance, id)`` (ties by ascending id,
    ``seqMatchNet.topk_by_value_then_index``) and the statistics the scoring rules need (``best``,
    ``sum``, ``sumsq``, ``count`` of the finite distances, float64). ``finish(q_segments, rule)``
    applies the rule and merges the lists.
    """

    def __init__(self, num_queries: int, traj: Trajectories, k: int,
                 device: torch.device | str = "cpu") -> None:
        self.traj, self.k, self.num_queries = traj, int(k), int(num_queries)
        self.device = torch.device(device)
        shape = (traj.count, self.num_queries)
        # [T, Nq, k] float32
        self.values = torch.full((*shape, self.k), torch.inf, device=self.device)
        # -1: empty slot
        self.ids = torch.full((*shape, self.k), -1, dtype=torch.long, device=self.device)
        # windows per query
        self.seen = np.zeros(self.num_queries, dtype=np.int64)
        self.stats = {"best": np.full(shape, np.inf), "sum": np.zeros(shape),
                      "sumsq": np.zeros(shape),
                      "count": np.zeros(shape)}

    def add(self, q_lo: int, dists: torch.Tensor, db_ids) -> None:
        """Merge one block ``[T, A, B]`` (queries ``q_lo..q_lo+B-1``, database windows ``db_ids``
        ``[A]``)."""
        n_t, n_a, n_b = dists.shape
        if n_t != self.traj.count or q_lo < 0 or q_lo + n_b > self.num_queries:
            raise ValueError(f"block {tuple(dists.shape)} at query {q_lo} does not fit "
                             f"{self.traj.count} trajectories x {self.num_queries} queries")
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
        """Per (trajectory, query): best, sum, sum of squares (float64) and count of the finite
        distances.

        A trajectory is unscored (``+inf``) for an anchor in every column alike, so column 0 tells
        which rows count; sums run over those rows only."""
        sl = (slice(None), slice(q_lo, q_lo + dists.shape[2]))
        self.stats["best"][sl] = np.minimum(self.stats["best"][sl],
                                            dists.amin(dim=1).double().cpu().numpy())
        finite = torch.isfinite(dists[:, :, 0])                                  # [T, A]
        for t in range(dists.shape[0]):
            rows = blocks.index_runs(torch.nonzero(finite[t]).flatten())
            d = (dists[t, rows[0][1]:rows[0][1] + rows[0][2]] if len(rows) == 1
                 else dists[t][finite[t]])
            total, squares = blocks.float64_column_sums(d)
            self.stats["sum"][t, sl[1]] += total.cpu().numpy()
            self.stats["sumsq"][t, sl[1]] += squares.cpu().numpy()
            self.stats["count"][t, sl[1]] += len(d)

    def coefficients(self, q_segments, rule: ScoringRule = DEFAULT_RULE, lo: int = 0,
                     hi: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """``(a, b)`` ``[hi - lo, T]`` of ``rule`` for the queries ``lo .. hi - 1`` (default: all)
        from the statistics gathered so far (``rule_coefficients``), which must include the
        neighbours it reads."""
        hi = self.num_queries if hi is None else hi
        reach = self.num_queries if rule.neighbours is None else rule.neighbours
        s_lo, s_hi = max(0, lo - reach), min(self.num_queries, hi + reach)
        a, b = rule_coefficients(rule, {key: v[:, s_lo:s_hi].T for key, v in self.stats.items()},
                                 np.asarray(q_segments)[s_lo:s_hi])
        return a[lo - s_lo:hi - s_lo], b[lo - s_lo:hi - s_lo]

    def add_list(self, t: int, q_lo: int, vals: torch.Tensor, idx: torch.Tensor) -> None:
        """Merge ``[B, k']`` new entries of trajectory ``t`` (ids -1: empty) into the lists of
        queries ``q_lo..``."""
        rows = slice(q_lo, q_lo + len(vals))
        cat_v = torch.cat([self.values[t, rows], vals], dim=1)
        cat_i = torch.cat([self.ids[t, rows], idx], dim=1)
        # after every id
        empty_key = int(cat_i.max()) + 1 + torch.arange(cat_i.shape[1], device=cat_i.device)
        top_v, pos = topk_by_value_then_index(cat_v, self.k,
                                              ids=torch.where(cat_i < 0, empty_key, cat_i))
        self.values[t, rows], self.ids[t, rows] = top_v, torch.gather(cat_i, 1, pos)

    def finish(self, q_segments, rule: ScoringRule = DEFAULT_RULE
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(ids [Nq, k], scores [Nq, k] float32, velocity [Nq, k])`` ordered by score, then
        database id, then the velocity nearest 1. ``scores`` are the rule's adjusted scores (the
        plain ``"min"``: the mean frame distance); ``velocity`` is the trajectory's that gave each
        score. Each database window appears once; windows no trajectory could score come last with
        ``+inf``. ``q_segments``: ``[Nq]`` ids or ``[Nq, 2]`` bounds of each query's sequence
        (``segment_ids``).
        """
        if not self.seen.all():
            raise ValueError(f"{int((self.seen == 0).sum())} queries were never scored")
        # [Nq, T]
        a, b = self.coefficients(q_segments, rule)
        n_t, nq, kk = self.values.shape
        a_t = torch.as_tensor(a.T, dtype=torch.float32, device=self.device)[:, :, None]
        b_t = torch.as_tensor(b.T, dtype=torch.float32, device=self.device)[:, :, None]
        # [T, Nq, k'] float32
        adj = (a_t * self.values + b_t).where(torch.isfinite(self.values), torch.inf)
        adj = adj.permute(1, 0, 2).reshape(nq, n_t * kk)
        ids = self.ids.permute(1, 0, 2).reshape(nq, n_t * kk)
        tid = torch.arange(n_t).repeat_interleave(kk).expand(nq, -1)
        # one entry per database window: its smallest adjusted score, the trajectory nearest 1 among
        # equal ones
        order = torch.argsort(tid, dim=1, stable=True)
        for key in (adj, ids):
            order = torch.gather(order, 1,
                                 torch.argsort(torch.gather(key, 1, order), dim=1, stable=True))
        s_ids = torch.gather(ids, 1, order)
        dup = torch.cat([torch.zeros((nq, 1), dtype=torch.bool), s_ids[:, 1:] == s_ids[:, :-1]],
                        dim=1)
        dup |= s_ids < 0
        # keys stay small: topk_by_value_then_index multiplies them
        big = (int(s_ids.max()) + 1) * n_t
        key = torch.where(dup, big + torch.arange(n_t * kk).expand(nq, -1),
                          s_ids * n_t + torch.gather(tid, 1, order))
        s_adj = torch.gather(adj, 1, order).masked_fill(dup, torch.inf)
        width = int(min(self.k, self.seen.min()))
        top, pos = topk_by_value_then_index(s_adj, width, ids=key)
        pos = torch.gather(order, 1, pos)
        vel = torch.as_tensor(self.traj.velocities)[torch.gather(tid, 1, pos)]
        return torch.gather(ids, 1, pos), top, vel
