"""The dense search along the diagonal in chunks: every query window against every database
window, the k best of each query (ties broken by database index), without the whole distance
matrix in memory.
"""
from __future__ import annotations

import bisect
from collections.abc import Callable

import torch

from seqmatchnet.matching.seqmatch import window_distances
from seqmatchnet.matching.topk import topk_by_value_then_index, topk_smallest
from seqmatchnet.search.sides import Windows


def chunked_topk(database: Windows, queries: Windows, seq_len: int, k: int,
                 method: str = "meanOfPairs", query_chunk: int = 1024, db_chunk: int | None = None,
                 progress: Callable[[int], None] | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-``k`` database windows per query window (``database``, ``queries``: features ``[F, D]``
    and window starts ``[N]``, tensors), holding at most ``db_chunk x query_chunk`` distances.

    Returns ``(distances [Nq_w, k], indices into database.starts [Nq_w, k])``, ascending; exact ties
    are ordered by ascending index. ``db_chunk=None`` scores all database windows of a query chunk
    at once; otherwise database chunks of at most ``db_chunk`` windows (more only when one window
    start is shared by more) are merged into a running top-k. A chunk never splits the frames that
    share one window start (the shifted windows at the ends of a traversal): each start is scored
    once per query chunk, so their scores are equal exactly, as in the dense path, and the
    predictions do not depend on the chunk sizes.
    """
    db_feats, db_starts = database.frames, database.starts
    q_feats, q_starts = queries.frames, queries.starts
    n_db = len(db_starts)
    k = min(k, n_db)
    device = db_feats.device
    out_d = torch.empty((len(q_starts), k), dtype=db_feats.dtype, device=device)
    out_i = torch.empty((len(q_starts), k), dtype=torch.long, device=device)
    groups = (None if db_chunk is None or db_chunk >= n_db
              else _start_groups(db_starts, max(db_chunk, 1)))
    for lo in range(0, len(q_starts), query_chunk):
        hi = min(lo + query_chunk, len(q_starts))
        if groups is None:
            dists = window_distances(db_feats, q_feats, db_starts, q_starts[lo:hi], seq_len, method)
            out_d[lo:hi], out_i[lo:hi] = topk_smallest(dists, k)
        else:
            uniq, inverse, frames, chunks = groups
            best_d = best_i = None
            for u_lo, u_hi, f_lo, f_hi in chunks:
                per_start = window_distances(db_feats, q_feats, uniq[u_lo:u_hi], q_starts[lo:hi],
                                             seq_len, method)
                ids = frames[f_lo:f_hi]                                    # their frames, by start
                dists = per_start[inverse[ids] - u_lo].T                    # [queries, frames]
                vals, order = topk_by_value_then_index(dists, k, ids=ids.expand(hi - lo, -1))
                idx = ids[order]
                if best_d is None:
                    best_d, best_i = vals, idx
                else:
                    merged_i = torch.cat([best_i, idx], dim=1)
                    best_d, order = topk_by_value_then_index(torch.cat([best_d, vals], dim=1), k,
                                                             ids=merged_i)
                    best_i = torch.gather(merged_i, 1, order)
            out_d[lo:hi], out_i[lo:hi] = best_d, best_i
        if progress is not None:
            progress(hi - lo)
    return out_d, out_i


def _start_groups(db_starts: torch.Tensor, db_chunk: int):
    """Database chunks that keep the frames of one window start together.

    Returns ``(unique starts, each frame's position in them, frames ordered by start then index,
    [(first start, end start, first frame, end frame) per chunk])``.
    """
    uniq, inverse = torch.unique(db_starts, sorted=True, return_inverse=True)
    frames = torch.argsort(inverse, stable=True)
    ends = torch.cumsum(torch.bincount(inverse, minlength=len(uniq)), 0).tolist()
    chunks, u = [], 0
    while u < len(uniq):
        f_lo = ends[u - 1] if u else 0
        v = max(bisect.bisect_right(ends, f_lo + db_chunk), u + 1)
        chunks.append((u, v, f_lo, ends[v - 1]))
        u = v
    return uniq, inverse, frames, chunks
