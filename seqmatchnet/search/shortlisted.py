"""The shortlisted search (``--shortlist K``, docs/large-maps.md): a faiss index of one descriptor
per database window (``shortlist.WindowIndex``, built while the database streams by or read from
``--shortlistIndex``) gives each query K candidate windows, which exact sequence matching re-ranks
(along the diagonal here, across speeds with ``speeds.find_across_speeds``). A sample of queries is
matched exactly on the way to measure the shortlist's recall.
"""
from __future__ import annotations

import time
from collections.abc import Callable

import numpy as np
import torch

from seqmatchnet.common import distributed
from seqmatchnet.models.sequence import SeqMatchModel, project_frames, window_frames, window_means
from seqmatchnet.search import shortlist as shortlist_mod
from seqmatchnet.search.diagonal import (
    TOP_K,
    DatabaseShare,
    Found,
    SearchConfig,
    rank_streamed,
    rerank_from_source,
)
from seqmatchnet.search.sides import DatabaseStream, Windows

Reranked = tuple[np.ndarray, np.ndarray, np.ndarray | None]     # indices, distances, velocities


def shortlist_search(config: SearchConfig, model: SeqMatchModel, database: Windows,
                     queries: Windows, seq_len: int, device: torch.device, stream: DatabaseStream,
                     rerank_shortlist: Callable[[np.ndarray], Reranked] | None = None) -> Found:
    """``shortlist`` K: index one descriptor per database window (``window_means``) while
    ``stream``'s chunks go by, matching a sample of ``shortlist_check`` queries exactly on the way
    (the shortlist's recall); then each query's K nearest windows in the index are re-ranked by
    exact sequence matching. With ``shortlist_index`` the index is read from that file when it
    holds one built for this map, model and settings (written there otherwise): the database then
    streams by only for the check. ``rerank_shortlist(candidates) -> (indices, distances,
    velocities)`` replaces the re-ranking along the diagonal (``speeds``: across speeds); the
    recall check is the diagonal's either way. ``queries`` hold float32 features."""
    clock, keep = stream.clock, stream.keep
    rng = np.random.default_rng(config.seed)
    n_check = min(len(queries.starts), config.shortlist_check)
    check = np.sort(rng.choice(len(queries.starts), n_check, replace=False))  # built or read: same
    index, fingerprint, loaded = open_window_index(config, model, database, seq_len, device, rng,
                                                   clock)
    exact = None
    if loaded and n_check == 0:
        keep = None                   # nothing streams by: no database features for the figures
    else:
        exact = match_sample_while_indexing(config, database, queries.select(check), seq_len,
                                            stream, None if loaded else index)
    if config.shortlist_index is not None and not loaded:
        shortlist_mod.save_index(index, config.shortlist_index, fingerprint)
    t2 = time.perf_counter()
    means = window_means(queries.frames, queries.starts, seq_len).cpu().numpy()
    candidates = shortlist_candidates(index, means, config, len(database.starts))
    clock["shortlist_search_s"] = time.perf_counter() - t2
    if rerank_shortlist is None:
        idx, dists, vel = rerank_along_diagonal(config, model, database, queries, candidates,
                                                seq_len, device)
    else:
        idx, dists, vel = rerank_shortlist(candidates)
    clock["matching_s"] = time.perf_counter() - t2
    recall = (shortlist_mod.shortlist_recall(exact[:, 0], candidates[check]) if n_check
              else float("nan"))
    info = {"candidates": int(candidates.shape[1]), "index": index.choice.describe(),
            "nprobe": config.nprobe, "recall": recall, "sampled_queries": int(n_check),
            "index_file": str(config.shortlist_index) if config.shortlist_index else None,
            "index_loaded": loaded}
    return Found(idx[:, :TOP_K], dists[:, :TOP_K], clock, keep, info,
                 None if vel is None else vel[:, :TOP_K])


def open_window_index(config: SearchConfig, model: SeqMatchModel, database: Windows, seq_len: int,
                      device: torch.device, rng: np.random.Generator, clock: dict):
    """The window index of ``database``: read from ``config.shortlist_index`` when that file exists
    (refused unless built for this map, model and settings), else a new, empty one (trained on a
    sample drawn from ``rng``); the time it took goes to ``clock``. Returns ``(index, its
    fingerprint or None without a file, whether it was read)``."""
    t0 = time.perf_counter()
    choice = shortlist_mod.choose_index(len(database.starts), model.out_dims)
    path = config.shortlist_index
    fingerprint = (shortlist_mod.index_fingerprint(database.frames, database.starts, model, seq_len,
                                                   config.feat_dtype, choice) if path else None)
    loaded = path is not None and path.exists()
    index = (shortlist_mod.load_index(path, fingerprint, choice, device) if loaded
             else new_window_index(config, model, database, seq_len, device, choice, rng))
    clock["index_load_s" if loaded else "index_build_s"] = time.perf_counter() - t0
    return index, fingerprint, loaded


def match_sample_while_indexing(config: SearchConfig, database: Windows, sample: Windows,
                                seq_len: int, stream: DatabaseStream,
                                index: shortlist_mod.WindowIndex | None) -> np.ndarray:
    """Stream the database once: match the ``sample`` query windows exactly (their top-1 windows
    ``[S, 1]``, for the shortlist's recall) and, given an ``index``, add each window's mean to it.
    Under torchrun each rank streams its share and the best of all shares is returned. The
    check's time goes to ``clock['shortlist_check_s']``, without the reading and the indexing."""
    clock = stream.clock
    share = DatabaseShare.of(database.starts, seq_len)    # the windows the chunks bring

    def add(windows: np.ndarray, local: np.ndarray, feats: torch.Tensor) -> None:
        t = time.perf_counter()
        means = window_means(feats, torch.as_tensor(local, device=feats.device), seq_len)
        index.add(means.cpu().numpy(), windows + share.windows.start)
        clock["index_build_s"] += time.perf_counter() - t

    t1, before = time.perf_counter(), clock.get("index_build_s", 0.0)
    exact, exact_d = rank_streamed(Windows(stream.chunks, database.starts[share.windows]), sample,
                                   seq_len, 1, config.query_chunk, config.db_chunk,
                                   on_chunk=None if index is None else add)
    exact, _ = share.gather(exact, exact_d, 1)       # under torchrun: the best of all shares
    spent = clock.get("index_build_s", 0.0) - before
    clock["shortlist_check_s"] = time.perf_counter() - t1 - clock["features_s"] - spent
    return exact


def rerank_along_diagonal(config: SearchConfig, model: SeqMatchModel, database: Windows,
                          queries: Windows, candidates: np.ndarray, seq_len: int,
                          device: torch.device) -> Reranked:
    """Each query's ``candidates`` re-ranked by exact sequence matching along the diagonal, only
    their frames read (``rerank_from_source``); under torchrun each rank re-ranks a share of the
    queries. ``(indices, distances, None)``: no velocities."""
    rows = distributed.shard(len(candidates))
    idx, dists = rerank_from_source(config, model, database, queries.select(rows), candidates[rows],
                                    seq_len, device)
    idx, dists = distributed.all_gather_arrays(idx, dists,
                                               what="gathering the re-ranked shortlists")
    return idx, dists, None


def shortlist_candidates(index: shortlist_mod.WindowIndex, queries: np.ndarray,
                         config: SearchConfig, n_windows: int) -> np.ndarray:
    """Each query's ``shortlist`` nearest windows in ``index`` ``[Nq, K]``. Under torchrun ``index``
    holds this rank's share of the windows (the same trained quantiser on every rank): the shards
    probe the same lists, decided by their valid counts together, and their lists are merged by
    (distance, id), which gives the candidates of one index over the whole map (up to exact ties
    at the K-th distance)."""
    k = min(config.shortlist, n_windows)
    if not distributed.active():
        return index.search(queries, k, config.nprobe)

    def together(counts: np.ndarray) -> np.ndarray:
        counts = distributed.all_reduce_sum(torch.as_tensor(counts),
                                            "counting the shortlist candidates")
        return counts.numpy()

    d, ids = index.search_scored(queries, k, config.nprobe, together)
    pad = n_windows + distributed.rank() * k + np.arange(k)   # empty slots: ids past the map
    ids = np.where(ids >= 0, ids, pad)
    _, merged = distributed.all_gather_topk(torch.as_tensor(d), torch.as_tensor(ids), k, n_windows)
    merged = merged.numpy()
    if (merged >= n_windows).any():
        raise RuntimeError("the shortlist shards returned fewer candidates than windows indexed")
    return merged


def new_window_index(config: SearchConfig, model: SeqMatchModel, database: Windows, seq_len: int,
                     device: torch.device, choice: shortlist_mod.IndexChoice,
                     rng: np.random.Generator) -> shortlist_mod.WindowIndex:
    """An empty ``shortlist.WindowIndex`` of ``choice``'s kind, trained (IVF) on the window means of
    a random sample of the database's windows, read about ``map_chunk`` frames at a time."""
    index = shortlist_mod.WindowIndex(choice, model.out_dims, device)
    if choice.needs_training:
        db_starts = database.starts
        sample = np.sort(rng.choice(len(db_starts), choice.training_size(len(db_starts)),
                                    replace=False))
        step = max(1, config.map_chunk // seq_len)
        means = np.empty((len(sample), model.out_dims), dtype=np.float32)   # filled in place
        for lo in range(0, len(sample), step):
            frames, local = window_frames(db_starts[sample[lo:lo + step]], seq_len)
            feats = project_frames(model, database.frames[frames], device, config.batch_size,
                                   "index sample", True, config.feat_dtype, overwrite=True)
            local = torch.as_tensor(local, device=device)
            means[lo:lo + len(local)] = window_means(feats, local, seq_len).cpu()
            del feats
        index.train(means)
    return index
