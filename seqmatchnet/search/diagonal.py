"""Search: every way of finding each query window's best database windows (docs/how-it-works.md).

``find`` is the one entry: it takes the projected query windows and the database (an array or a
``datasets.DescriptorSource``) and returns each query's top ``TOP_K`` database windows, by

- nearest descriptors (window models and single frames: ``faiss_search``),
- exact sequence matching of every database window held in memory (``rank``, query and
  database chunks bounded by ``DENSE_LIMIT_BYTES``),
- the same over a database streamed from its file chunk by chunk (``rank_streamed``),
- re-ranking of given candidates (``rerank``; ``rerank_from_source`` reads only their frames),
- a shortlist from a faiss index of window descriptors (``shortlist.py``) re-ranked exactly.

Every path orders exact ties by ascending database index, so they agree with each other. The
settings are a ``SearchConfig``; nothing here reads the command line.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from seqmatchnet.common import distributed
from seqmatchnet.common.errors import UserError
from seqmatchnet.common.logs import progress_enabled
from seqmatchnet.matching.seqmatch import candidate_distances
from seqmatchnet.matching.topk import chunked_topk, topk_by_value_then_index
from seqmatchnet.models.sequence import SeqMatchModel, WindowEmbedding, project_frames, window_frames, window_means
from seqmatchnet.search import shortlist as shortlist_mod
from seqmatchnet.speeds import rules
from seqmatchnet.speeds import trajectories as trajectories_mod

log = logging.getLogger(__name__)


TOP_K = 100
DENSE_LIMIT_BYTES = 2 * 1024**3   # above this a query chunk's distance block is also split over the database
KEEP_FEATS_BYTES = 256 * 1024**2  # a streamed database's features are kept (for figures) up to this size
SHORTLIST_CHECK_QUERIES = 50      # queries matched exactly to measure the recall of --shortlist


@dataclass(frozen=True)
class SearchConfig:
    """How to search (built once from the options by ``evaluate.EvalConfig.from_options``)."""

    query_chunk: int = 1024                  # query windows scored at once
    db_chunk: int = 0                        # database windows scored at once (0: automatic)
    map_chunk: int = 32768                   # a larger database is streamed this many frames at a time
    feat_dtype: torch.dtype = torch.float32  # storage of projected frame features
    shortlist: int = 0                       # candidates from the window index (0: exact search)
    nprobe: int = 16                         # inverted lists searched (IVF indices)
    shortlist_index: Path | None = None      # where the index is kept between runs
    shortlist_check: int = SHORTLIST_CHECK_QUERIES   # queries matched exactly to measure the shortlist
    batch_size: int = 64                     # frames per projection batch
    seed: int = 123                          # the shortlist's training and check samples
    quiet: bool = False                      # no progress bars
    velocities: tuple[float, ...] = (1.0,)   # database frames per query frame searched (1: the diagonal)
    rule: rules.ScoringRule = rules.DEFAULT_RULE   # how the trajectories of a query combine
    grid: int = 2                            # trajectory positions per database frame (--trajectoryGrid)

    def trajectories(self, seq_len: int) -> trajectories_mod.Trajectories:
        return trajectories_mod.trajectories(self.velocities, seq_len, "centre", self.grid)

    def streams(self, model: SeqMatchModel, num_db: int) -> bool:
        """Whether the database is streamed from its file (frame models over a map larger than
        ``map_chunk``, or a shortlist) rather than projected whole."""
        return not model.compares_descriptors and (num_db > self.map_chunk or bool(self.shortlist))


@dataclass
class Found:
    """What a search returns: ``preds`` ``[Nq, k]`` indices into the database windows, best first,
    their distances, timings, the projected database frames when kept (figures) and, with a
    shortlist, its summary (candidates, index, nprobe, recall on a sample)."""

    preds: np.ndarray
    dists: np.ndarray
    timings: dict = field(default_factory=dict)
    db_feats: torch.Tensor | None = None
    shortlist: dict | None = None
    velocities: np.ndarray | None = None     # [Nq, k] the velocity of each prediction's best trajectory


def find(config: SearchConfig, model: SeqMatchModel, db_desc, db_starts: np.ndarray, q: WindowEmbedding,
         seq_len: int, device: torch.device, predictions: np.ndarray | None = None) -> Found:
    """Each query window's best ``TOP_K`` database windows (the windows starting at ``db_starts``
    of the traversal ``db_desc``): projected whole and searched in memory, or streamed (see
    ``SearchConfig.streams``); ``predictions`` (candidate indices into ``db_starts``) are re-ranked.
    The diagonal only: ``speeds.find_across_speeds`` searches across ``velocities``."""
    if config.shortlist and model.compares_descriptors:
        raise UserError("--shortlist re-ranks by sequence matching: use it with --method seqmatch (this model's "
                        "window or frame descriptors are searched with a faiss index already)")
    check_distributed(config, model, predictions)
    if config.streams(model, len(db_desc)):
        return search_streamed(config, db_desc, model, device, db_starts, q, seq_len, predictions)
    if distributed.active():        # check_distributed refused what is not divided
        return find_share(config, model, db_desc, db_starts, q, seq_len, device)
    t0 = time.perf_counter()
    db = model.embed_windows(db_desc, db_starts, seq_len, device, config.batch_size, "database", config.quiet,
                             all_frames=True, dtype=config.feat_dtype)
    t1 = time.perf_counter()
    idx, dists = search(model, db, q, seq_len, config, predictions)
    timings = {"features_s": t1 - t0, "matching_s": time.perf_counter() - t1}
    return Found(idx, dists, timings, db.feats if db.starts is not None else None)


def check_distributed(config: SearchConfig, model: SeqMatchModel, predictions: np.ndarray | None) -> None:
    """Under torchrun the database windows of sequence matching (dense, streamed or shortlisted; along the
    diagonal or across speeds) are divided between the ranks; the searches that are not divided are
    refused with one line rather than repeated."""
    if not distributed.active():
        return
    what = ("--predictionsFile" if predictions is not None else "--shortlistIndex" if config.shortlist_index
            else f"--method {model.method}" if model.compares_descriptors else None)
    if what:
        raise UserError(f"{what} is searched in one process: start this evaluation with python, not torchrun "
                        "(torchrun divides sequence matching with --method seqmatch)")


def find_share(config: SearchConfig, model: SeqMatchModel, db_desc, db_starts: np.ndarray, q: WindowEmbedding,
               seq_len: int, device: torch.device) -> Found:
    """``find`` under torchrun: each rank projects and scores only the frames of its share of the
    database windows (``DatabaseShare``); the top-k lists are merged into those of one process."""
    t0 = time.perf_counter()
    share = DatabaseShare.of(db_starts, seq_len)
    starts = db_starts[share.windows] - share.frames.start
    db = model.embed_windows(db_desc[share.frames], starts, seq_len, device, config.batch_size, "database",
                             config.quiet, all_frames=True, dtype=config.feat_dtype)
    t1 = time.perf_counter()
    idx, dists = rank(db.feats.float(), q.feats.float(), starts, q.starts, seq_len, query_chunk=config.query_chunk,
                      db_chunk=config.db_chunk, quiet=config.quiet, share=share)
    return Found(idx, dists, {"features_s": t1 - t0, "matching_s": time.perf_counter() - t1})


def database_chunk(n_db: int, n_q: int, query_chunk: int, db_chunk: int = 0) -> int | None:
    """Database windows scored at once for ``chunked_topk``: ``db_chunk`` when given (> 0), else all
    (None) unless one query chunk's block of distances (+ diagonal sums + frame distances, float32)
    would exceed ``DENSE_LIMIT_BYTES``."""
    if db_chunk > 0:
        return db_chunk
    if n_db * min(query_chunk, n_q) * 4 * 3 <= DENSE_LIMIT_BYTES:
        return None
    return max(DENSE_LIMIT_BYTES // (12 * query_chunk), 1024)


def rank(db_feats: torch.Tensor, q_feats: torch.Tensor, db_starts: np.ndarray, q_starts: np.ndarray,
         seq_len: int, k: int = TOP_K, query_chunk: int = 1024, db_chunk: int = 0,
         quiet: bool = False, share: DatabaseShare | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Top-k database windows per query window by meanOfPairs sequence distance.

    Returns ``(indices into db_starts [Nq, k], distances [Nq, k])``. The
    database is split into chunks too when one query chunk's block of
    distances would exceed ``DENSE_LIMIT_BYTES`` (or with ``db_chunk``).

    Under torchrun each rank scores a consecutive share of the database windows (a share never
    splits the frames of one window start, so tied windows are scored together) and the ranks'
    top-k lists are merged by (distance, database index): the result is that of one process. With
    ``share`` the features and starts are this rank's share already (``DatabaseShare.of``).
    """
    device = db_feats.device
    if share is None:
        share = DatabaseShare.of(db_starts, seq_len)
        db_starts = db_starts[share.windows]
    n_db, n_q = share.num_windows, len(q_starts)
    db_chunk = database_chunk(len(db_starts), len(q_starts), query_chunk, db_chunk)
    dists = torch.empty((n_q, 0), dtype=db_feats.dtype, device=device)
    idx = torch.empty((n_q, 0), dtype=torch.long, device=device)
    with tqdm(total=len(q_starts), desc="sequence matching", unit="query",
              disable=not progress_enabled(quiet) or not distributed.is_main(), leave=False) as bar:
        if len(db_starts):
            dists, idx = chunked_topk(db_feats, q_feats, torch.as_tensor(db_starts, device=device),
                                      torch.as_tensor(q_starts, device=device), seq_len, k,
                                      query_chunk=query_chunk, db_chunk=db_chunk, progress=bar.update)
    if distributed.active():
        dists, idx = distributed.all_gather_topk(dists, idx + share.windows.start, min(k, n_db), n_db)
    return idx.cpu().numpy(), dists.cpu().numpy()


@dataclass(frozen=True)
class DatabaseShare:
    """This process's consecutive share of the database windows (all of them outside torchrun): a
    share never splits the windows of one start, so tied windows are scored together. ``frames``
    are the database frames its windows cover; ``num_windows`` counts the windows of all ranks."""

    windows: slice
    frames: slice
    num_windows: int

    @classmethod
    def of(cls, db_starts: np.ndarray, seq_len: int) -> DatabaseShare:
        share = distributed.shard(len(db_starts), keep_together=db_starts)
        if share.stop <= share.start:
            return cls(share, slice(0, 0), len(db_starts))
        frames = slice(int(db_starts[share.start]), int(db_starts[share.stop - 1]) + seq_len)
        return cls(share, frames, len(db_starts))

    def gather(self, idx: np.ndarray, dists: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Under torchrun, merge the ranks' top-k lists (``idx`` into this share's windows) into those of
        one process; else ``(idx, dists)``."""
        if not distributed.active():
            return idx, dists
        d, i = distributed.all_gather_topk(torch.as_tensor(dists), torch.as_tensor(idx) + self.windows.start,
                                           min(k, self.num_windows), self.num_windows)
        return i.numpy(), d.numpy()


def faiss_search(db_feats: torch.Tensor, q_feats: torch.Tensor, k: int,
                 extra: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """Single-frame search with a flat L2 index (GPU faiss when the features are on CUDA and it is available).

    Exact ties are ordered by ascending database index, also at the ``k`` boundary, whatever order
    the index returns them in: faiss is asked for ``extra`` more neighbours than ``k``, each
    row is sorted by (distance, index), and the rows whose ``k``-th distance is still tied with the
    last one returned are searched again with twice as many until the tie group is complete.
    """
    import faiss

    db = np.ascontiguousarray(db_feats.cpu().numpy(), dtype=np.float32)
    q = np.ascontiguousarray(q_feats.cpu().numpy(), dtype=np.float32)
    cpu_index = faiss.IndexFlatL2(db.shape[1])
    cpu_index.add(db)
    index = cpu_index
    if db_feats.is_cuda and hasattr(faiss, "StandardGpuResources"):
        index = faiss.index_cpu_to_gpu(faiss.StandardGpuResources(), 0, cpu_index)
    n_db = len(db)
    k = min(k, n_db)
    out_d = np.empty((len(q), k), dtype=np.float32)
    out_idx = np.empty((len(q), k), dtype=np.int64)
    rows, width = np.arange(len(q)), min(k + extra, n_db)
    while len(rows) and k:
        sq, idx = index.search(q[rows], width)
        d = np.sqrt(np.maximum(sq, 0))                         # ties are ties of the distances reported
        order = np.lexsort((idx, d))                           # by distance, then index, per row
        d, idx = np.take_along_axis(d, order, 1), np.take_along_axis(idx, order, 1)
        done = (width == n_db) | (d[:, -1] > d[:, k - 1])     # the k-th distance's tie group is complete
        out_d[rows[done]], out_idx[rows[done]] = d[done, :k], idx[done, :k]
        rows, width = rows[~done], min(2 * width, n_db)
        index = cpu_index                                      # re-searches: few rows, no limit on width
    return out_idx, out_d


def rerank(db_feats: torch.Tensor, q_feats: torch.Tensor, db_starts: np.ndarray, q_starts: np.ndarray,
           candidates: np.ndarray, seq_len: int) -> tuple[np.ndarray, np.ndarray]:
    """Re-rank each query's candidates (indices into db_starts) by sequence distance; exact ties
    by ascending index, as in ``rank``."""
    device = db_feats.device
    cand = torch.as_tensor(candidates, device=device)
    d = candidate_distances(db_feats, q_feats, torch.as_tensor(db_starts, device=device),
                            torch.as_tensor(q_starts, device=device), cand, seq_len)
    d, order = topk_by_value_then_index(d, d.shape[1], ids=cand)
    return torch.gather(cand, 1, order).cpu().numpy(), d.cpu().numpy()


def search(model: SeqMatchModel, db: WindowEmbedding, q: WindowEmbedding, seq_len: int, config: SearchConfig,
           predictions: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Top-``TOP_K`` database windows per query window, ``(indices [Nq, k], distances [Nq, k])``:
    nearest descriptors (window models, single frames), re-ranking of ``predictions``, or
    sequence matching of every database window (features kept in float16 are matched in float32)."""
    if model.compares_descriptors:
        return faiss_search(db.rows(), q.rows(), TOP_K)
    if predictions is not None:
        return rerank(db.feats.float(), q.feats.float(), db.starts, q.starts, predictions, seq_len)
    return rank(db.feats.float(), q.feats.float(), db.starts, q.starts, seq_len, query_chunk=config.query_chunk,
                db_chunk=config.db_chunk, quiet=config.quiet)


def database_chunks(model: SeqMatchModel, desc, seq_len: int, device: torch.device, batch_size: int,
                    chunk: int, dtype: torch.dtype, clock: dict, keep: torch.Tensor | None = None,
                    quiet: bool = False, frames: slice | None = None):
    """The database's projected frames (those of ``frames``, default all), ``chunk`` frames at a time:
    yields ``(first frame, end of the chunk's own frames, float32 features [own + L - 1 frames, D])``.
    The ``L - 1`` frames after a chunk come with it, so every window starting in the chunk is complete.
    Features are stored in ``dtype`` (and copied into ``keep`` when given); reading and projecting time
    is added to ``clock``."""
    first, n = (0, len(desc)) if frames is None else (frames.start, frames.stop)
    for lo in tqdm(range(first, n, chunk), desc="database chunks", unit="chunk",
                   disable=not progress_enabled(quiet), leave=False):
        t = time.perf_counter()
        own_hi, hi = min(lo + chunk, n), min(lo + chunk + seq_len - 1, n)
        feats = project_frames(model, desc[lo:hi], device, batch_size, "database", True, dtype)
        if keep is not None:
            keep[lo:own_hi] = feats[:own_hi - lo]
        feats = feats.float()
        clock["features_s"] = clock.get("features_s", 0.0) + time.perf_counter() - t
        yield lo, own_hi, feats


def rank_streamed(chunks, q_feats: torch.Tensor, db_starts: np.ndarray, q_starts: np.ndarray, seq_len: int,
                  k: int = TOP_K, query_chunk: int = 1024, db_chunk: int = 0,
                  on_chunk=None) -> tuple[np.ndarray, np.ndarray]:
    """``rank`` over a database that arrives in chunks of frames (``database_chunks``): each window is
    scored in the chunk that holds its first frame, and the chunks' top-k lists are merged by
    (distance, window index), so the result equals ``rank`` on the whole database, tie order included.
    ``on_chunk(windows, their starts in the chunk, chunk features)`` sees every chunk (index building).
    Returns ``(indices into db_starts [Nq, k], distances [Nq, k])``."""
    order = np.argsort(db_starts, kind="stable")
    sorted_starts = db_starts[order]
    device = q_feats.device
    q_t = torch.as_tensor(q_starts, device=device)
    best_d = torch.empty((len(q_starts), 0), dtype=torch.float32, device=device)
    best_i = torch.empty((len(q_starts), 0), dtype=torch.long, device=device)
    for lo, own_hi, feats in chunks:
        a, b = np.searchsorted(sorted_starts, [lo, own_hi])
        windows = np.sort(order[a:b])                  # ascending index: ties stay in index order
        if len(windows) == 0:
            continue
        local = db_starts[windows] - lo
        if on_chunk is not None:
            on_chunk(windows, local, feats)
        if len(q_starts) == 0:
            continue
        d, li = chunked_topk(feats, q_feats, torch.as_tensor(local, device=device), q_t, seq_len, k,
                             query_chunk=query_chunk,
                             db_chunk=database_chunk(len(windows), len(q_starts), query_chunk, db_chunk))
        ids = torch.as_tensor(windows, device=device)[li]
        merged_i = torch.cat([best_i, ids], dim=1)
        best_d, pos = topk_by_value_then_index(torch.cat([best_d, d.float()], dim=1), k, ids=merged_i)
        best_i = torch.gather(merged_i, 1, pos)
    return best_i.cpu().numpy(), best_d.cpu().numpy()


def rerank_from_source(model: SeqMatchModel, desc, db_starts: np.ndarray, q_feats: torch.Tensor,
                       q_starts: np.ndarray, candidates: np.ndarray, seq_len: int, device: torch.device,
                       batch_size: int, dtype: torch.dtype, frames_per_step: int) -> tuple[np.ndarray, np.ndarray]:
    """``rerank`` that reads and projects only the candidates' frames, a few queries at a time (at most
    about ``frames_per_step`` frames), instead of holding the whole database's features. The next
    step's frames are read (a thread) while this step's are projected and compared."""
    from concurrent.futures import ThreadPoolExecutor

    n_q, width = candidates.shape
    step = max(1, frames_per_step // max(width * seq_len, 1))
    out_i = np.empty((n_q, width), dtype=np.int64)
    out_d = np.empty((n_q, width), dtype=np.float32)

    def read(lo: int):
        cand = np.asarray(candidates[lo:lo + step])
        windows, local_cand = np.unique(cand, return_inverse=True)     # ascending: ties keep index order
        frames, local_starts = window_frames(db_starts[windows], seq_len)
        return windows, local_cand.reshape(cand.shape), local_starts, desc[frames]

    with ThreadPoolExecutor(max_workers=1) as reader:
        pending = reader.submit(read, 0)
        for lo in range(0, n_q, step):
            windows, local_cand, local_starts, frames = pending.result()
            if lo + step < n_q:
                pending = reader.submit(read, lo + step)
            feats = project_frames(model, frames, device, batch_size, "candidates", True, dtype, overwrite=True)
            feats = feats.float()
            del frames
            order, d = rerank(feats, q_feats, local_starts, q_starts[lo:lo + step], local_cand, seq_len)
            out_i[lo:lo + len(order)], out_d[lo:lo + len(order)] = windows[order], d
    return out_i, out_d


def search_streamed(config: SearchConfig, desc, model: SeqMatchModel, device: torch.device,
                    db_starts: np.ndarray, q: WindowEmbedding, seq_len: int,
                    predictions: np.ndarray | None = None) -> Found:
    """``search`` for frame models over a database read from ``desc`` chunk by chunk (``map_chunk``
    frames): exact sequence matching of every window, re-ranking of ``predictions``, or with
    ``shortlist`` K re-ranking of the K windows a faiss index of window descriptors returns."""
    c, clock = config, {"features_s": 0.0}
    q_feats, q_starts = q.feats.float(), q.starts.cpu().numpy()
    t0 = time.perf_counter()
    if predictions is not None:
        idx, dists = rerank_from_source(model, desc, db_starts, q_feats, q_starts, predictions, seq_len, device,
                                        c.batch_size, c.feat_dtype, c.map_chunk)
        return Found(idx, dists, {"matching_s": time.perf_counter() - t0})
    item = torch.empty((), dtype=c.feat_dtype).element_size()
    keep = None
    if len(desc) * model.out_dims * item <= KEEP_FEATS_BYTES and not distributed.active():
        keep = torch.empty((len(desc), model.out_dims), dtype=c.feat_dtype, device=device)
    else:
        log.info("database of %d frames: its features are not kept, so no distance-matrix figure", len(desc))
    share = DatabaseShare.of(db_starts, seq_len)      # under torchrun each rank streams its share only
    chunks = database_chunks(model, desc, seq_len, device, c.batch_size, c.map_chunk, c.feat_dtype, clock, keep,
                             c.quiet, share.frames)
    if not c.shortlist:
        idx, dists = rank_streamed(chunks, q_feats, db_starts[share.windows], q_starts, seq_len, TOP_K,
                                   c.query_chunk, c.db_chunk)
        idx, dists = share.gather(idx, dists, TOP_K)
        clock["matching_s"] = time.perf_counter() - t0 - clock["features_s"]
        return Found(idx, dists, clock, keep)
    return shortlist_search(config, desc, model, device, db_starts, q, seq_len, chunks, clock, keep)


def shortlist_candidates(index: shortlist_mod.WindowIndex, queries: np.ndarray, config: SearchConfig,
                         n_windows: int) -> np.ndarray:
    """Each query's ``shortlist`` nearest windows in ``index`` ``[Nq, K]``. Under torchrun ``index`` holds this
    rank's share of the windows (the same trained quantiser on every rank): the shards probe the same
    lists, decided by their valid counts together, and their lists are merged by (distance, id), which
    gives the candidates of one index over the whole map (up to exact ties at the K-th distance)."""
    k = min(config.shortlist, n_windows)
    if not distributed.active():
        return index.search(queries, k, config.nprobe)

    def together(counts: np.ndarray) -> np.ndarray:
        return distributed.all_reduce_sum(torch.as_tensor(counts), "counting the shortlist candidates").numpy()

    d, ids = index.search_scored(queries, k, config.nprobe, together)
    pad = n_windows + distributed.rank() * k + np.arange(k)            # empty slots: distinct ids past the map
    ids = np.where(ids >= 0, ids, pad)
    _, merged = distributed.all_gather_topk(torch.as_tensor(d), torch.as_tensor(ids), k, n_windows)
    merged = merged.numpy()
    if (merged >= n_windows).any():
        raise RuntimeError("the shortlist shards returned fewer candidates than windows indexed")
    return merged


def new_window_index(config: SearchConfig, desc, model: SeqMatchModel, device: torch.device,
                     db_starts: np.ndarray, seq_len: int, choice, rng: np.random.Generator):
    """An empty ``shortlist.WindowIndex`` of ``choice``'s kind, trained (IVF) on the window means of a
    random sample of the database's windows, read about ``map_chunk`` frames at a time."""
    index = shortlist_mod.WindowIndex(choice, model.out_dims, device)
    if choice.needs_training:
        sample = np.sort(rng.choice(len(db_starts), choice.training_size(len(db_starts)), replace=False))
        step = max(1, config.map_chunk // seq_len)
        means = np.empty((len(sample), model.out_dims), dtype=np.float32)      # filled in place: no copies
        for lo in range(0, len(sample), step):
            frames, local = window_frames(db_starts[sample[lo:lo + step]], seq_len)
            feats = project_frames(model, desc[frames], device, config.batch_size, "index sample", True,
                                   config.feat_dtype, overwrite=True)
            means[lo:lo + len(local)] = window_means(feats, torch.as_tensor(local, device=device), seq_len).cpu()
            del feats
        index.train(means)
    return index


def shortlist_search(config: SearchConfig, desc, model: SeqMatchModel, device: torch.device,
                     db_starts: np.ndarray, q: WindowEmbedding, seq_len: int, chunks, clock: dict,
                     keep: torch.Tensor | None, rerank=None) -> Found:
    """``shortlist`` K: index one descriptor per database window (``window_means``) while the chunks
    stream by, matching a sample of ``shortlist_check`` queries exactly on the way (the shortlist's
    recall); then each query's K nearest windows in the index are re-ranked by exact sequence matching.
    With ``shortlist_index`` the index is read from that file when it holds one built for this map,
    model and settings (written there otherwise): the database then streams by only for the check.
    ``rerank(candidates) -> (indices, distances, velocities)`` replaces the re-ranking along the diagonal
    (``speeds``: across speeds); the recall check is the diagonal's either way."""
    c = config
    q_feats, q_starts = q.feats.float(), q.starts.cpu().numpy()
    rng = np.random.default_rng(c.seed)
    n_check = min(len(q_starts), c.shortlist_check)
    check = np.sort(rng.choice(len(q_starts), n_check, replace=False))      # the same whether built or read
    t0 = time.perf_counter()
    choice = shortlist_mod.choose_index(len(db_starts), model.out_dims)
    path = c.shortlist_index
    fingerprint = shortlist_mod.index_fingerprint(desc, db_starts, model, seq_len, c.feat_dtype, choice) if path else None
    loaded = path is not None and path.exists()
    index = (shortlist_mod.load_index(path, fingerprint, choice, device) if loaded
             else new_window_index(config, desc, model, device, db_starts, seq_len, choice, rng))
    clock["index_load_s" if loaded else "index_build_s"] = time.perf_counter() - t0

    share = DatabaseShare.of(db_starts, seq_len)      # the windows the chunks bring (all outside torchrun)

    def add(windows: np.ndarray, local: np.ndarray, feats: torch.Tensor) -> None:
        t = time.perf_counter()
        index.add(window_means(feats, torch.as_tensor(local, device=feats.device), seq_len).cpu().numpy(),
                  windows + share.windows.start)
        clock["index_build_s"] += time.perf_counter() - t

    if loaded and n_check == 0:
        keep = None                        # nothing streams by: no database features for the figures
    else:
        t1, before = time.perf_counter(), clock.get("index_build_s", 0.0)
        exact, exact_d = rank_streamed(chunks, q_feats, db_starts[share.windows], q_starts[check], seq_len, 1,
                                       c.query_chunk, c.db_chunk, on_chunk=None if loaded else add)
        exact, _ = share.gather(exact, exact_d, 1)       # under torchrun: the best of all shares
        spent = clock.get("index_build_s", 0.0) - before
        clock["shortlist_check_s"] = time.perf_counter() - t1 - clock["features_s"] - spent
    if path is not None and not loaded:
        shortlist_mod.save_index(index, path, fingerprint)
    t2 = time.perf_counter()
    candidates = shortlist_candidates(index, window_means(q.feats, q.starts, seq_len).cpu().numpy(), c, len(db_starts))
    clock["shortlist_search_s"] = time.perf_counter() - t2
    if rerank is None:
        rows = distributed.shard(len(candidates))          # under torchrun each rank re-ranks a share of queries
        idx, dists = rerank_from_source(model, desc, db_starts, q_feats, q_starts[rows], candidates[rows], seq_len,
                                        device, c.batch_size, c.feat_dtype, c.map_chunk)
        idx, dists = distributed.all_gather_arrays(idx, dists, what="gathering the re-ranked shortlists")
        vel = None
    else:
        idx, dists, vel = rerank(candidates)
    clock["matching_s"] = time.perf_counter() - t2
    recall = shortlist_mod.shortlist_recall(exact[:, 0], candidates[check]) if n_check else float("nan")
    info = {"candidates": int(candidates.shape[1]), "index": choice.describe(), "nprobe": c.nprobe,
            "recall": recall, "sampled_queries": int(n_check), "index_file": str(path) if path else None,
            "index_loaded": loaded}
    return Found(idx[:, :TOP_K], dists[:, :TOP_K], clock, keep, info, None if vel is None else vel[:, :TOP_K])
