"""Search along the diagonal: the ways of finding each query window's best database windows
(docs/how-it-works.md), which ``entry.find`` picks from:

- nearest descriptors (window models and single frames: ``faiss_search``),
- exact sequence matching of every database window held in memory (``rank``, query and
  database chunks bounded by ``DENSE_LIMIT_BYTES``; ``search_in_memory`` picks the path),
- the same over a database streamed from its file chunk by chunk (``database_chunks``,
  ``rank_streamed``),
- re-ranking of given candidates (``rerank``; ``rerank_from_source`` reads only their frames),
- a shortlist from a faiss index of window descriptors re-ranked exactly (``shortlisted.py``).

The database and the query windows travel as ``sides.Windows``. Every path orders exact ties by
ascending database index, so they agree with each other. The settings are a ``SearchConfig``;
nothing here reads the command line.
"""
from __future__ import annotations

import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from seqmatchnet.common import distributed
from seqmatchnet.common.errors import UserError
from seqmatchnet.common.logs import progress, progress_enabled
from seqmatchnet.matching.seqmatch import candidate_distances
from seqmatchnet.matching.topk import topk_by_value_then_index
from seqmatchnet.models.sequence import Projection, SeqMatchModel, project_frames, window_frames
from seqmatchnet.search.chunked import chunked_topk
from seqmatchnet.search.sides import Windows
from seqmatchnet.speeds import rules
from seqmatchnet.speeds import trajectories as trajectories_mod

log = logging.getLogger(__name__)


TOP_K = 100
DENSE_LIMIT_BYTES = 2 * 1024**3   # above this a query chunk's distances are split over the database
KEEP_FEATS_BYTES = 256 * 1024**2  # a streamed database's features are kept (figures) up to this
SHORTLIST_CHECK_QUERIES = 50      # queries matched exactly to measure the recall of --shortlist


@dataclass(frozen=True)
class SearchConfig:
    """How to search (built once from the options by ``evaluate.EvalConfig.from_options``)."""

    query_chunk: int = 1024                  # query windows scored at once
    db_chunk: int = 0                        # database windows scored at once (0: automatic)
    map_chunk: int = 32768                   # a larger database is streamed so many frames at once
    feat_dtype: torch.dtype = torch.float32  # storage of projected frame features
    shortlist: int = 0                       # candidates from the window index (0: exact search)
    nprobe: int = 16                         # inverted lists searched (IVF indices)
    shortlist_index: Path | None = None      # where the index is kept between runs
    shortlist_check: int = SHORTLIST_CHECK_QUERIES   # queries matched exactly: shortlist recall
    batch_size: int = 64                     # frames per projection batch
    seed: int = 123                          # the shortlist's training and check samples
    quiet: bool = False                      # no progress bars
    velocities: tuple[float, ...] = (1.0,)   # database frames per query frame (1: the diagonal)
    rule: rules.ScoringRule = rules.DEFAULT_RULE   # how the trajectories of a query combine
    grid: int = 2                            # trajectory positions per database frame

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
    velocities: np.ndarray | None = None     # [Nq, k] the velocity of each best trajectory


def check_distributed(config: SearchConfig, model: SeqMatchModel,
                      predictions: np.ndarray | None) -> None:
    """Under torchrun the database windows of sequence matching (dense, streamed or shortlisted;
    along the diagonal or across speeds) are divided between the ranks; the searches that are not
    divided are refused with one line rather than repeated."""
    if not distributed.active():
        return
    what = ("--predictionsFile" if predictions is not None
            else "--shortlistIndex" if config.shortlist_index
            else f"--method {model.method}" if model.compares_descriptors else None)
    if what:
        raise UserError(f"{what} is searched in one process: start this evaluation with python, "
                        "not torchrun (torchrun divides sequence matching with --method seqmatch)")


def find_share(config: SearchConfig, model: SeqMatchModel, database: Windows, queries: Windows,
               seq_len: int, device: torch.device) -> Found:
    """``find`` under torchrun: each rank projects and scores only the frames of its share of the
    database windows (``DatabaseShare``); the top-k lists are merged into those of one process."""
    t0 = time.perf_counter()
    share = DatabaseShare.of(database.starts, seq_len)
    starts = database.starts[share.windows] - share.frames.start
    db = model.embed_windows(database.frames[share.frames], starts, seq_len,
                             Projection(device, config.batch_size, "database", config.quiet,
                                        config.feat_dtype), all_frames=True)
    t1 = time.perf_counter()
    idx, dists = rank(Windows(db.feats.float(), starts), queries.as_float(), seq_len,
                      query_chunk=config.query_chunk, db_chunk=config.db_chunk, quiet=config.quiet,
                      share=share)
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


def rank(database: Windows, queries: Windows, seq_len: int, k: int = TOP_K, query_chunk: int = 1024,
         db_chunk: int = 0, quiet: bool = False,
         share: DatabaseShare | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Top-k database windows per query window by meanOfPairs sequence distance (``database`` and
    ``queries``: features ``[F, D]`` and window starts ``[N]``).

    Returns ``(indices into database.starts [Nq, k], distances [Nq, k])``. The database is split
    into chunks too when one query chunk's block of distances would exceed ``DENSE_LIMIT_BYTES`` (or
    with ``db_chunk``).

    Under torchrun each rank scores a consecutive share of the database windows (a share never
    splits the frames of one window start, so tied windows are scored together) and the ranks'
    top-k lists are merged by (distance, database index): the result is that of one process. With
    ``share`` the features and starts are this rank's share already (``DatabaseShare.of``).
    """
    db_feats, db_starts, q_starts = database.frames, database.starts, queries.starts
    device = db_feats.device
    if share is None:
        share = DatabaseShare.of(db_starts, seq_len)
        db_starts = db_starts[share.windows]
    n_db, n_q = share.num_windows, len(q_starts)
    db_chunk = database_chunk(len(db_starts), len(q_starts), query_chunk, db_chunk)
    dists = torch.empty((n_q, 0), dtype=db_feats.dtype, device=device)
    idx = torch.empty((n_q, 0), dtype=torch.long, device=device)
    with progress(total=len(q_starts), desc="sequence matching", unit="query",
              disable=not progress_enabled(quiet) or not distributed.is_main(), leave=False) as bar:
        if len(db_starts):
            dists, idx = chunked_topk(Windows(db_feats, torch.as_tensor(db_starts, device=device)),
                                      Windows(queries.frames,
                                              torch.as_tensor(q_starts, device=device)),
                                      seq_len, k, query_chunk=query_chunk, db_chunk=db_chunk,
                                      progress=bar.update)
    if distributed.active():
        dists, idx = distributed.all_gather_topk(dists, idx + share.windows.start, min(k, n_db),
                                                 n_db)
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
        """Under torchrun, merge the ranks' top-k lists (``idx`` into this share's windows) into
        those of one process; else ``(idx, dists)``."""
        if not distributed.active():
            return idx, dists
        d, i = distributed.all_gather_topk(torch.as_tensor(dists),
                                           torch.as_tensor(idx) + self.windows.start,
                                           min(k, self.num_windows), self.num_windows)
        return i.numpy(), d.numpy()


def faiss_search(db_feats: torch.Tensor, q_feats: torch.Tensor, k: int,
                 extra: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """Single-frame search with a flat L2 index (GPU faiss when the features are on CUDA and it is
    available).

    Exact ties are ordered by ascending database index, also at the ``k`` boundary, whatever order
    the index returns them in: faiss is asked for ``extra`` more neighbours than ``k``, each row is
    sorted by (distance, index), and the rows whose ``k``-th distance is still tied with the last
    one returned are searched again with twice as many until the tie group is complete.
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
        d = np.sqrt(np.maximum(sq, 0))                     # ties are ties of the distances reported
        order = np.lexsort((idx, d))                       # by distance, then index, per row
        d, idx = np.take_along_axis(d, order, 1), np.take_along_axis(idx, order, 1)
        done = (width == n_db) | (d[:, -1] > d[:, k - 1])  # the k-th distance's ties are complete
        out_d[rows[done]], out_idx[rows[done]] = d[done, :k], idx[done, :k]
        rows, width = rows[~done], min(2 * width, n_db)
        index = cpu_index                                  # re-searches: few rows, any width
    return out_idx, out_d


def rerank(database: Windows, queries: Windows, candidates: np.ndarray,
           seq_len: int) -> tuple[np.ndarray, np.ndarray]:
    """Re-rank each query's candidates (indices into ``database.starts``) by sequence distance;
    exact ties by ascending index, as in ``rank``."""
    device = database.frames.device
    cand = torch.as_tensor(candidates, device=device)
    d = candidate_distances(database.frames, queries.frames,
                            torch.as_tensor(database.starts, device=device),
                            torch.as_tensor(queries.starts, device=device), cand, seq_len)
    d, order = topk_by_value_then_index(d, d.shape[1], ids=cand)
    return torch.gather(cand, 1, order).cpu().numpy(), d.cpu().numpy()


def search_in_memory(config: SearchConfig, model: SeqMatchModel, database: Windows,
                     queries: Windows, seq_len: int,
                     predictions: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Top-``TOP_K`` database windows per query window of a database projected whole, ``(indices
    [Nq, k], distances [Nq, k])``: nearest descriptors (window models, single frames), re-ranking
    of ``predictions``, or sequence matching of every database window (features kept in float16
    are matched in float32)."""
    if model.compares_descriptors:
        return faiss_search(database.rows(), queries.rows(), TOP_K)
    if predictions is not None:
        return rerank(database.as_float(), queries.as_float(), predictions, seq_len)
    return rank(database.as_float(), queries.as_float(), seq_len, query_chunk=config.query_chunk,
                db_chunk=config.db_chunk, quiet=config.quiet)


def database_chunks(config: SearchConfig, model: SeqMatchModel, database: Windows, seq_len: int,
                    device: torch.device, clock: dict, keep: torch.Tensor | None = None,
                    frames: slice | None = None):
    """The projected frames of ``database.frames`` (those of ``frames``, default all),
    ``config.map_chunk`` frames at a time: yields ``(first frame, end of the chunk's own frames,
    float32 features [own + L - 1 frames, D])``. The ``L - 1`` frames after a chunk come with it,
    so every window starting in the chunk is complete. Features are stored in
    ``config.feat_dtype`` (and copied into ``keep`` when given); reading and projecting time is
    added to ``clock``."""
    desc, chunk = database.frames, config.map_chunk
    first, n = (0, len(desc)) if frames is None else (frames.start, frames.stop)
    for lo in progress(range(first, n, chunk), desc="database chunks", unit="chunk",
                   disable=not progress_enabled(config.quiet), leave=False):
        t = time.perf_counter()
        own_hi, hi = min(lo + chunk, n), min(lo + chunk + seq_len - 1, n)
        feats = project_frames(model, desc[lo:hi], device, config.batch_size, "database", True,
                               config.feat_dtype)
        if keep is not None:
            keep[lo:own_hi] = feats[:own_hi - lo]
        feats = feats.float()
        clock["features_s"] = clock.get("features_s", 0.0) + time.perf_counter() - t
        yield lo, own_hi, feats


def rank_streamed(database: Windows, queries: Windows, seq_len: int, k: int = TOP_K,
                  query_chunk: int = 1024, db_chunk: int = 0,
                  on_chunk=None) -> tuple[np.ndarray, np.ndarray]:
    """``rank`` over a database that arrives in chunks of frames: ``database.frames`` yields them as
    ``database_chunks`` does. Each window is scored in the chunk that holds its first frame, and the
    chunks' top-k lists are merged by (distance, window index), so the result equals ``rank`` on the
    whole database, tie order included. ``on_chunk(windows, their starts in the chunk, chunk
    features)`` sees every chunk (index building). Returns ``(indices into database.starts [Nq, k],
    distances [Nq, k])``."""
    db_starts, q_feats, q_starts = database.starts, queries.frames, queries.starts
    order = np.argsort(db_starts, kind="stable")
    sorted_starts = db_starts[order]
    device = q_feats.device
    q_t = torch.as_tensor(q_starts, device=device)
    best_d = torch.empty((len(q_starts), 0), dtype=torch.float32, device=device)
    best_i = torch.empty((len(q_starts), 0), dtype=torch.long, device=device)
    for lo, own_hi, feats in database.frames:
        a, b = np.searchsorted(sorted_starts, [lo, own_hi])
        windows = np.sort(order[a:b])                  # ascending index: ties stay in index order
        if len(windows) == 0:
            continue
        local = db_starts[windows] - lo
        if on_chunk is not None:
            on_chunk(windows, local, feats)
        if len(q_starts) == 0:
            continue
        chunk = database_chunk(len(windows), len(q_starts), query_chunk, db_chunk)
        d, li = chunked_topk(Windows(feats, torch.as_tensor(local, device=device)),
                             Windows(q_feats, q_t), seq_len, k, query_chunk=query_chunk,
                             db_chunk=chunk)
        ids = torch.as_tensor(windows, device=device)[li]
        merged_i = torch.cat([best_i, ids], dim=1)
        best_d, pos = topk_by_value_then_index(torch.cat([best_d, d.float()], dim=1), k,
                                               ids=merged_i)
        best_i = torch.gather(merged_i, 1, pos)
    return best_i.cpu().numpy(), best_d.cpu().numpy()


def rerank_from_source(config: SearchConfig, model: SeqMatchModel, database: Windows,
                       queries: Windows, candidates: np.ndarray, seq_len: int,
                       device: torch.device) -> tuple[np.ndarray, np.ndarray]:
    """``rerank`` that reads and projects only the candidates' frames of ``database.frames``, a few
    queries at a time (at most about ``config.map_chunk`` frames), instead of holding the whole
    database's features (kept in ``config.feat_dtype``). The next step's frames are read (a
    thread) while this step's are projected and compared."""
    n_q, width = candidates.shape
    step = max(1, config.map_chunk // max(width * seq_len, 1))
    out_i = np.empty((n_q, width), dtype=np.int64)
    out_d = np.empty((n_q, width), dtype=np.float32)

    def read(lo: int):
        cand = np.asarray(candidates[lo:lo + step])
        windows, local_cand = np.unique(cand, return_inverse=True)   # ascending: ties keep order
        frames, local_starts = window_frames(database.starts[windows], seq_len)
        return windows, local_cand.reshape(cand.shape), local_starts, database.frames[frames]

    with ThreadPoolExecutor(max_workers=1) as reader:
        pending = reader.submit(read, 0)
        for lo in range(0, n_q, step):
            windows, local_cand, local_starts, frames = pending.result()
            if lo + step < n_q:
                pending = reader.submit(read, lo + step)
            feats = project_frames(model, frames, device, config.batch_size, "candidates", True,
                                   config.feat_dtype, overwrite=True)
            feats = feats.float()
            del frames
            order, d = rerank(Windows(feats, local_starts), queries.select(slice(lo, lo + step)),
                              local_cand, seq_len)
            out_i[lo:lo + len(order)], out_d[lo:lo + len(order)] = windows[order], d
    return out_i, out_d
