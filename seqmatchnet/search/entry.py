"""The entry of the search along the diagonal: ``find`` takes the database windows (descriptors: an
array or a ``data.descriptors.DescriptorSource``) and the projected query windows, each as one
``sides.Windows``, and returns each query's top ``TOP_K`` database windows by the path that fits:
projected whole and searched in memory (``diagonal.search_in_memory``), divided between torchrun
ranks (``diagonal.find_share``), or streamed from the file (``search_streamed``: exact, re-ranked
or shortlisted, ``shortlisted.py``). ``speeds.find_across_speeds`` is the entry across speeds.
"""
from __future__ import annotations

import logging
import time

import numpy as np
import torch

from seqmatchnet.common import distributed
from seqmatchnet.common.errors import UserError
from seqmatchnet.models.sequence import Projection, SeqMatchModel
from seqmatchnet.search.diagonal import (
    KEEP_FEATS_BYTES,
    TOP_K,
    DatabaseShare,
    Found,
    SearchConfig,
    check_distributed,
    database_chunks,
    find_share,
    rank_streamed,
    rerank_from_source,
    search_in_memory,
)
from seqmatchnet.search.shortlisted import shortlist_search
from seqmatchnet.search.sides import DatabaseStream, Windows

log = logging.getLogger(__name__)


def find(config: SearchConfig, model: SeqMatchModel, database: Windows, queries: Windows,
         seq_len: int, device: torch.device, predictions: np.ndarray | None = None) -> Found:
    """Each query window's best ``TOP_K`` database windows (the windows starting at
    ``database.starts`` of the traversal ``database.frames``; ``queries``: the projected query
    windows, ``sides.Windows.of``): projected whole and searched in memory, or streamed (see
    ``SearchConfig.streams``); ``predictions`` (candidate indices into ``database.starts``) are
    re-ranked. The diagonal only: ``speeds.find_across_speeds`` searches across ``velocities``."""
    if config.shortlist and model.compares_descriptors:
        raise UserError("--shortlist re-ranks by sequence matching: use it with --method seqmatch "
                        "(this model's window or frame descriptors are searched with a faiss index "
                        "already)")
    check_distributed(config, model, predictions)
    if config.streams(model, len(database.frames)):
        return search_streamed(config, model, database, queries, seq_len, device, predictions)
    if distributed.active():        # check_distributed refused what is not divided
        return find_share(config, model, database, queries, seq_len, device)
    t0 = time.perf_counter()
    db = model.embed_windows(database.frames, database.starts, seq_len,
                             Projection(device, config.batch_size, "database", config.quiet,
                                        config.feat_dtype), all_frames=True)
    t1 = time.perf_counter()
    idx, dists = search_in_memory(config, model, Windows.of(db), queries, seq_len, predictions)
    timings = {"features_s": t1 - t0, "matching_s": time.perf_counter() - t1}
    return Found(idx, dists, timings, db.feats if db.starts is not None else None)


def search_streamed(config: SearchConfig, model: SeqMatchModel, database: Windows, queries: Windows,
                    seq_len: int, device: torch.device,
                    predictions: np.ndarray | None = None) -> Found:
    """``find`` for frame models over a database read from ``database.frames`` chunk by chunk
    (``map_chunk`` frames): exact sequence matching of every window, re-ranking of
    ``predictions``, or with ``shortlist`` K re-ranking of the K windows a faiss index of window
    descriptors returns."""
    c, clock = config, {"features_s": 0.0}
    queries = queries.as_float()
    t0 = time.perf_counter()
    if predictions is not None:
        idx, dists = rerank_from_source(config, model, database, queries, predictions, seq_len,
                                        device)
        return Found(idx, dists, {"matching_s": time.perf_counter() - t0})
    keep = kept_features(config, model, len(database.frames), device)
    share = DatabaseShare.of(database.starts, seq_len)   # under torchrun: this rank's share only
    chunks = database_chunks(config, model, database, seq_len, device, clock, keep, share.frames)
    if not c.shortlist:
        mine = Windows(chunks, database.starts[share.windows])
        idx, dists = rank_streamed(mine, queries, seq_len, TOP_K, c.query_chunk, c.db_chunk)
        idx, dists = share.gather(idx, dists, TOP_K)
        clock["matching_s"] = time.perf_counter() - t0 - clock["features_s"]
        return Found(idx, dists, clock, keep)
    stream = DatabaseStream(chunks, clock, keep)
    return shortlist_search(config, model, database, queries, seq_len, device, stream)


def kept_features(config: SearchConfig, model: SeqMatchModel, num_frames: int,
                  device: torch.device) -> torch.Tensor | None:
    """An empty tensor for a streamed database's features (for the figures), or None when they
    would take more than ``KEEP_FEATS_BYTES`` or under torchrun."""
    item = torch.empty((), dtype=config.feat_dtype).element_size()
    if num_frames * model.out_dims * item <= KEEP_FEATS_BYTES and not distributed.active():
        return torch.empty((num_frames, model.out_dims), dtype=config.feat_dtype, device=device)
    log.info("database of %d frames: its features are not kept, so no distance-matrix figure",
             num_frames)
    return None
