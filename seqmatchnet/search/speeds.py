"""Search across speeds (``--velocities``, docs/speeds.md): every path of the diagonal search for
database trajectories that advance ``v`` frames per query frame, scored by ``velocity``'s rules.

``find_across_speeds`` is the entry (``evaluate`` calls it instead of ``entry.find`` when the
velocities give more than the diagonal): the database projected whole
(``rank_across_speeds_in_memory`` when every trajectory distance fits in memory, else
``rank_across_speeds`` over one block), streamed from its file (``trajectory_blocks``), or the
candidates of ``--predictionsFile`` or ``--shortlist`` re-ranked (``rerank_across_speeds``). The
database and the query windows travel as ``sides.Windows`` (with their sequence bounds). All order
exact ties by ascending database index, then the velocity nearest 1.
"""
from __future__ import annotations

import time

import numpy as np
import torch

from seqmatchnet.common import distributed
from seqmatchnet.common.errors import UserError
from seqmatchnet.common.logs import progress, progress_enabled
from seqmatchnet.matching.topk import topk_by_value_then_index
from seqmatchnet.models.sequence import Projection, SeqMatchModel, project_frames
from seqmatchnet.search.diagonal import (
    DENSE_LIMIT_BYTES,
    TOP_K,
    DatabaseShare,
    Found,
    SearchConfig,
    check_distributed,
    database_chunks,
)
from seqmatchnet.search.shortlisted import shortlist_search
from seqmatchnet.search.sides import DatabaseStream, Windows
from seqmatchnet.speeds import kernel, loss, rules, streaming, trajectories

TILE_BYTES = 32 * 1024**2   # trajectory distances of one query tile (in memory): about the cache


def find_across_speeds(config: SearchConfig, model: SeqMatchModel, database: Windows,
                       queries: Windows, seq_len: int, device: torch.device,
                       traj: trajectories.Trajectories,
                       predictions: np.ndarray | None = None) -> Found:
    """``entry.find`` with ``velocities`` (``traj``: ``config.trajectories(seq_len)``): every
    database trajectory of every window (or of the candidates of ``predictions``), scored by
    ``config.rule``; the database projected whole, or streamed from its file in chunks of
    ``map_chunk`` frames when it is larger. Both sides carry their sequence bounds."""
    check_distributed(config, model, predictions)
    if model.compares_descriptors:
        raise UserError("--velocities matches frame sequences: use it with --method seqmatch (this "
                        "model compares one descriptor per window or frame)")
    t0, clock = time.perf_counter(), {"features_s": 0.0}
    queries = queries.as_float()

    def rerank_candidates(candidates: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        return rerank_across_speeds(config, model, database, queries, candidates, traj, device)

    if predictions is not None:
        idx, dists, vel = rerank_candidates(predictions)
        return Found(idx, dists, {"matching_s": time.perf_counter() - t0}, velocities=vel)
    if config.shortlist:            # the window index's candidates, re-ranked across speeds
        chunks = database_chunks(config, model, database, seq_len, device, clock)
        return shortlist_search(config, model, database, queries, seq_len, device,
                                DatabaseStream(chunks, clock), rerank_candidates)
    kept, (idx, dists, vel) = rank_every_window(config, model, database, queries, device, traj,
                                                clock)
    clock["matching_s"] = time.perf_counter() - t0 - clock["features_s"]
    return Found(idx, dists, clock, kept, velocities=vel)


def rank_every_window(config: SearchConfig, model: SeqMatchModel, database: Windows,
                      queries: Windows, device: torch.device, traj: trajectories.Trajectories,
                      clock: dict):
    """Every database window ranked across speeds for ``find_across_speeds``: streamed in blocks
    (under torchrun: this rank's share), or projected whole (the features kept for the figures)
    and searched in memory. Returns ``(kept features or None, (indices, scores, velocities))``."""
    rank_args = (config.rule, TOP_K, config.query_chunk)
    if distributed.active() or config.streams(model, len(database.frames)):
        blocks = share_blocks(config, model, database, traj, device, clock)
        return None, rank_across_speeds(Windows(blocks, database.starts, database.bounds), queries,
                                        traj, *rank_args, config.quiet)
    t0 = time.perf_counter()
    db = model.embed_windows(database.frames, database.starts, traj.seq_len,
                             Projection(device, config.batch_size, "database", config.quiet,
                                        config.feat_dtype), all_frames=True)
    clock["features_s"] = time.perf_counter() - t0
    feats, n_db = db.feats.float(), len(database.starts)
    if fits_in_memory(traj, n_db, len(queries.starts), config.rule):
        in_memory = Windows(feats, database.starts, database.bounds)
        return db.feats, rank_across_speeds_in_memory(in_memory, queries, traj, *rank_args)
    one_block = Windows([(0, feats, np.arange(n_db))], database.starts, database.bounds)
    return db.feats, rank_across_speeds(one_block, queries, traj, *rank_args, config.quiet)


def share_blocks(config: SearchConfig, model: SeqMatchModel, database: Windows,
                 traj: trajectories.Trajectories, device: torch.device, clock: dict):
    """This rank's share of the database windows (``diagonal.DatabaseShare``; all of them outside
    torchrun) as blocks of ``rank_across_speeds`` (``trajectory_blocks``: the frames of its windows
    and ``velocity.anchor_margin`` frames around them, in chunks of ``config.map_chunk`` frames;
    window ids of the whole database)."""
    share = DatabaseShare.of(database.starts, traj.seq_len)
    windows = np.arange(share.windows.start, share.windows.stop)
    mine = Windows(database.frames, np.asarray(database.starts)[windows])
    return ((row0, feats, windows[part])                  # streamed, one at a time
            for row0, feats, part in trajectory_blocks(config, model, mine, traj, device, clock))


def trajectory_blocks(config: SearchConfig, model: SeqMatchModel, database: Windows,
                      traj: trajectories.Trajectories, device: torch.device, clock: dict):
    """The database in chunks of ``config.map_chunk`` frames for the search across speeds: yields
    ``(first row, float32 features of the rows, the windows anchored in the chunk)``; a chunk's
    rows reach ``velocity.anchor_margin`` frames before and after its anchors, so every trajectory
    inside the map lies in its block."""
    desc, chunk = database.frames, config.map_chunk
    before, after = trajectories.anchor_margin(traj)
    anchors = np.asarray(database.starts) + traj.seq_len // 2
    order = np.argsort(anchors, kind="stable")
    for lo in progress(range(0, len(desc), chunk), desc="database chunks", unit="chunk",
                   disable=not progress_enabled(config.quiet), leave=False):
        a, b = np.searchsorted(anchors[order], [lo, lo + chunk])
        if a == b:
            continue
        t = time.perf_counter()
        r0, r1 = max(lo - before, 0), min(lo + chunk + after, len(desc))
        feats = project_frames(model, desc[r0:r1], device, config.batch_size, "database", True,
                               config.feat_dtype).float()
        clock["features_s"] = clock.get("features_s", 0.0) + time.perf_counter() - t
        yield r0, feats, np.sort(order[a:b])


def rank_across_speeds(database: Windows, queries: Windows, traj: trajectories.Trajectories,
                       rule: rules.ScoringRule, k: int = TOP_K, query_chunk: int = 1024,
                       quiet: bool = True) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Top-k database windows per query window over all trajectories of ``traj``.

    ``database.frames`` yields blocks ``(first row, features [rows, D], windows)``: database frames
    (row = frame) and the windows (indices into ``database.starts``) whose trajectories lie in them
    (one block with every frame and window for a database in memory; see ``trajectory_blocks``).
    ``queries.frames`` holds every query frame; windows lie in the sequences ``bounds`` ``[N, 2]``
    of their side; each window's trajectories are anchored at its centre ``start + L // 2``
    (``velocity``). Per block and query chunk the frame distances are computed once (one product)
    and every trajectory is a shifted sum of them (``velocity.trajectory_distances``);
    ``velocity.TrajectoryTopK`` keeps each trajectory's top-k and the statistics, and applies
    ``rule``. Returns ``(indices into database.starts [Nq, k], scores [Nq, k], velocity [Nq, k])``,
    ties by ascending index, then the velocity nearest 1. Under torchrun each rank's blocks hold
    its share of the database windows (``gather_shares`` combines them).
    """
    q_feats, q_starts = queries.frames, queries.starts
    n_db, n_q = len(database.starts), len(q_starts)
    anchors = np.asarray(database.starts) + traj.seq_len // 2
    db_bounds = np.asarray(database.bounds)
    top = streaming.TrajectoryTopK(n_q, traj, min(k, n_db), q_feats.device)
    with progress(desc="matching across speeds", unit="block", disable=not progress_enabled(quiet),
              leave=False) as bar:
        for row0, feats, windows in database.frames:
            # a query chunk's block: frame distances [rows, chunk frames] + T scores per window
            per_query = 4 * (len(feats) * (2 if traj.weights.any() else 1)
                             + (traj.count + 1) * len(windows))
            step = max(1, min(query_chunk, DENSE_LIMIT_BYTES // max(per_query, 1),
                              TILE_BYTES // max(4 * traj.count * len(windows), 1)))   # cache-sized
            block_bounds = np.clip(db_bounds[windows] - row0, 0, len(feats))
            chunks = kernel.chunk_distances(feats, q_feats, anchors[windows] - row0, block_bounds,
                                            q_starts, traj, step)
            for lo, dists in chunks:
                top.add(lo, dists, torch.as_tensor(windows, device=q_feats.device))
                bar.update()
    if distributed.active():
        top = gather_shares(top, top.k)
    ids, scores, vel = top.finish(queries.bounds, rule)
    return (ids.cpu().numpy(), scores.cpu().numpy().astype(np.float32),
            vel.cpu().numpy().astype(np.float32))


def gather_shares(top: streaming.TrajectoryTopK, k: int) -> streaming.TrajectoryTopK:
    """Under torchrun, every rank's search of its share of the database windows as one search of
    them all: the statistics summed (the best distances: their minimum) and the per-trajectory
    lists merged into ``k``-long ones, on every rank."""
    n_t, n_q = top.traj.count, top.num_queries
    out = streaming.TrajectoryTopK(n_q, top.traj, k, top.device)
    for key in ("sum", "sumsq", "count"):
        out.stats[key] = distributed.all_reduce_sum(torch.from_numpy(top.stats[key]),
                                                    "summing the statistics").numpy()
    best = distributed.all_gather_rows(torch.from_numpy(top.stats["best"])[None],
                                       "gathering the best distances")
    out.stats["best"] = best.amin(dim=0).numpy()
    out.seen = distributed.all_reduce_sum(torch.from_numpy(top.seen),
                                          "counting the windows").numpy()
    world = distributed.world_size()
    values = distributed.all_gather_rows(top.values.cpu(), "gathering the ranked lists")
    ids = distributed.all_gather_rows(top.ids.cpu(), "gathering the ranked lists")
    values, ids = values.view(world, n_t, n_q, -1), ids.view(world, n_t, n_q, -1)
    for r in range(world):
        for t in range(n_t):
            out.add_list(t, 0, values[r, t].to(top.device), ids[r, t].to(top.device))
    return out


def rank_across_speeds_in_memory(database: Windows, queries: Windows,
                                 traj: trajectories.Trajectories, rule: rules.ScoringRule,
                                 k: int = TOP_K, query_chunk: int = 1024
                                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``rank_across_speeds`` for a database in memory (``database.frames``: features ``[F, D]``): a
    few query windows at a time (at most ``query_chunk``, and about ``TILE_BYTES`` of trajectory
    distances), every trajectory distance of the whole database, the rule's statistics, then each
    query's windows ranked once by their best adjusted score (one top-k per chunk instead of one
    per trajectory) as soon as the statistics of the neighbours the rule reads are known; only
    those chunks are held. The same result as ``rank_across_speeds``."""
    q_feats, q_starts = queries.frames, queries.starts
    n_db, n_q = len(database.starts), len(q_starts)
    anchors = np.asarray(database.starts) + traj.seq_len // 2
    step = max(1, min(query_chunk, TILE_BYTES // max(4 * traj.count * n_db, 1)))
    ahead = n_q if rule.neighbours is None else rule.neighbours    # queries past a chunk it reads
    acc, pending = streaming.TrajectoryTopK(n_q, traj, 1, q_feats.device), []
    width = min(k, n_db)
    out_i, out_d = np.empty((n_q, width), dtype=np.int64), np.empty((n_q, width), dtype=np.float32)
    out_v = np.empty((n_q, width), dtype=np.float32)
    velocities = torch.as_tensor(traj.velocities, device=q_feats.device)

    def rank(lo: int, dists: torch.Tensor) -> None:
        hi = lo + dists.shape[2]
        a, b = acc.coefficients(queries.bounds, rule, lo, hi)                      # [B, T]
        a_t = torch.as_tensor(a.T, dtype=torch.float32, device=dists.device)[:, None, :]   # [T,1,B]
        b_t = torch.as_tensor(b.T, dtype=torch.float32, device=dists.device)[:, None, :]
        top, pos = topk_by_value_then_index(best_trajectory(dists, a_t, b_t).T, width)
        out_i[lo:hi], out_d[lo:hi] = pos.cpu().numpy(), top.float().cpu().numpy()
        out_v[lo:hi] = velocities[chosen_trajectory(dists, top, pos)].float().cpu().numpy()

    distances = kernel.chunk_distances(database.frames, q_feats, anchors, database.bounds, q_starts,
                                       traj, step)
    for lo, dists in distances:
        acc.add_stats(lo, dists)
        pending.append((lo, dists))
        known = lo + dists.shape[2]                     # statistics known for queries < known
        while pending and pending[0][0] + pending[0][1].shape[2] + ahead <= known:
            rank(*pending.pop(0))
    for lo, dists in pending:
        rank(lo, dists)
    return out_i, out_d, out_v


def best_trajectory(dists: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``[A, B]`` the smallest adjusted score ``a * dists + b`` over the trajectories of ``dists``
    ``[T, A, B]`` (``a``, ``b`` ``[T, 1, B]``; ``a > 0``, so an unscored (inf) trajectory stays
    inf). Leaves the adjusted scores in ``dists`` (``chosen_trajectory`` reads them). One
    trajectory at a time: a reduction over the leading axis of ``[T, A, B]`` is slow on the CPU."""
    best = None
    for t in range(len(dists)):
        adj = dists[t].mul_(a[t]).add_(b[t])
        best = adj.clone() if best is None else torch.minimum(best, adj, out=best)
    return best


def chosen_trajectory(adjusted: torch.Tensor, best: torch.Tensor,
                      pos: torch.Tensor) -> torch.Tensor:
    """``[B, k]`` the first trajectory (the one nearest 1) whose adjusted score ``adjusted``
    ``[T, A, B]`` equals ``best`` ``[B, k]`` at the database windows ``pos`` ``[B, k]`` of each
    query column."""
    cols = torch.arange(pos.shape[0], device=pos.device)[:, None].expand_as(pos)
    at = adjusted[:, pos, cols]                                                   # [T, B, k]
    return (at == best[None]).to(torch.uint8).argmax(dim=0)


def fits_in_memory(traj: trajectories.Trajectories, n_db: int, n_q: int,
                   rule: rules.ScoringRule = rules.DEFAULT_RULE) -> bool:
    """Whether the trajectory distances ``rank_across_speeds_in_memory`` holds at once (``T x Nd``
    float32 per query: two tiles and the neighbours the rule reads, every query for ``prior``) fit
    in ``DENSE_LIMIT_BYTES``."""
    per_query = traj.count * n_db * 4
    tile = max(1, TILE_BYTES // max(per_query, 1))
    held = n_q if rule.neighbours is None else min(n_q, 2 * tile + rule.neighbours)
    return per_query * held <= DENSE_LIMIT_BYTES


def rerank_across_speeds(config: SearchConfig, model: SeqMatchModel, database: Windows,
                         queries: Windows, candidates: np.ndarray, traj: trajectories.Trajectories,
                         device: torch.device, group_bytes: int = 256 * 1024**2
                         ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Re-rank each query's ``candidates`` (indices into ``database.starts``) across speeds: the
    distance of every trajectory of every candidate, combined by ``config.rule`` with statistics
    over the query's candidates (instead of the whole map); ordered by score, then index, then the
    velocity nearest 1. A few queries at a time (at most about ``group_bytes`` of gathered
    features), only the frames their candidates' trajectories use are read and projected
    (``config.batch_size`` at once). Under torchrun each rank re-ranks a share of the queries; the
    statistics the rule reads travel between the ranks, then the re-ranked lists."""
    rows = distributed.shard(len(candidates))          # every query outside torchrun
    cand, starts = np.asarray(candidates)[rows], np.asarray(queries.starts)[rows]
    db_starts, db_bounds = np.asarray(database.starts), np.asarray(database.bounds)
    d = torch.empty((*cand.shape, traj.count), dtype=torch.float32, device=device)   # [n, C, T]
    group = max(1, group_bytes // max(4 * cand.shape[1] * traj.count * queries.frames.shape[1], 1))
    for lo in range(0, len(cand), group):
        part = cand[lo:lo + group]
        d[lo:lo + group] = candidate_trajectory_distances(
            model, Windows(database.frames, db_starts[part], db_bounds[part]),
            Windows(queries.frames, starts[lo:lo + group]), traj, device, config.batch_size)
    stats = candidate_statistics(d)
    gathered = distributed.all_gather_arrays(*stats.values(),
                                             what="gathering the rule's statistics")
    a, b = rules.rule_coefficients(config.rule, dict(zip(stats, gathered)),
                                   queries.bounds)                                   # [Nq, T]
    out = combine_candidates(d, cand, traj, a[rows], b[rows])
    return distributed.all_gather_arrays(*out, what="gathering the re-ranked shortlists")


def candidate_trajectory_distances(model: SeqMatchModel, candidates: Windows, queries: Windows,
                                   traj: trajectories.Trajectories, device: torch.device,
                                   batch_size: int) -> torch.Tensor:
    """``[g, C, T]`` mean frame distances of each trajectory of the candidate windows
    ``candidates.starts`` ``[g, C]`` (sequences ``candidates.bounds`` ``[g, C, 2]``, frames read
    from ``candidates.frames``) to the query windows ``queries.starts`` ``[g]`` (``+inf`` where a
    trajectory leaves its sequence), summed in window order as the diagonal sums are."""
    starts, bounds, q_feats = candidates.starts, candidates.bounds, queries.frames
    # [g, C, T, L(, 2)]
    frames, valid = loss.trajectory_frames(starts + traj.seq_len // 2, bounds, traj)
    uniq, inverse = np.unique(frames.numpy(), return_inverse=True)
    feats = project_frames(model, candidates.frames[uniq], device, batch_size, "candidates",
                           True).float()
    inverse = torch.as_tensor(inverse.reshape(frames.shape), device=device)
    taps = loss.tap_weights(traj)                                           # [T, L, 2] or None
    q_rows = torch.as_tensor(queries.starts[:, None] + np.arange(traj.seq_len), device=device)
    d = torch.zeros(frames.shape[:3], dtype=torch.float32, device=device)

    def dist(idx: torch.Tensor, j: int) -> torch.Tensor:                    # [g, C, T]
        dot = torch.einsum("nctd,nd->nct", feats[idx], q_feats[q_rows[:, j]])
        return torch.sqrt(torch.clamp(2.0 - 2.0 * dot, min=0.0))

    for j in range(traj.seq_len):
        if taps is None:
            d += dist(inverse[..., j], j)
        else:                                   # a midpoint: the mean of its neighbours' distances
            w = taps[:, j].to(device)
            d += dist(inverse[..., j, 0], j) * w[:, 0] + dist(inverse[..., j, 1], j) * w[:, 1]
    return d.div_(traj.seq_len).masked_fill_(~valid.to(device), torch.inf)


def candidate_statistics(d: torch.Tensor) -> dict[str, np.ndarray]:
    """The rule's statistics of each query's candidates (``d`` ``[Nq, C, T]``): ``best``, ``sum``,
    ``sumsq`` and ``count`` of the finite distances, ``[Nq, T]`` float64."""
    finite = torch.isfinite(d)
    z = torch.where(finite, d, 0.0).double()
    return {"best": d.amin(dim=1).double().cpu().numpy(), "sum": z.sum(dim=1).cpu().numpy(),
            "sumsq": z.square().sum(dim=1).cpu().numpy(),
            "count": finite.sum(dim=1).double().cpu().numpy()}


def combine_candidates(d: torch.Tensor, cand: np.ndarray, traj: trajectories.Trajectories,
                       a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``d`` ``[Nq, C, T]`` trajectory distances of each query's candidates and the rule's
    coefficients ``a``, ``b`` ``[Nq, T]`` -> ``(candidates, scores, velocity)`` ``[Nq, C]`` by the
    adjusted score (float32, as the other paths), then index, then the velocity nearest 1."""
    finite = torch.isfinite(d)
    a_t = torch.as_tensor(a, dtype=torch.float32, device=d.device)[:, None]
    b_t = torch.as_tensor(b, dtype=torch.float32, device=d.device)[:, None]
    adj = (a_t * d + b_t).where(finite, torch.inf)
    best, t = adj.min(dim=2)                   # the first of equal minima: the trajectory nearest 1
    ids = torch.as_tensor(cand, device=d.device)
    top, pos = topk_by_value_then_index(best, best.shape[1], ids=ids)
    vel = torch.as_tensor(traj.velocities, device=d.device)[torch.gather(t, 1, pos)]
    return torch.gather(ids, 1, pos).cpu().numpy(), top.cpu().numpy(), vel.float().cpu().numpy()
