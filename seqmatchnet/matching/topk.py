"""Top-k with ties broken by database index, exactly (``topk_by_value_then_index``), and the
chunked search of every query window against every database window (``chunked_topk``).
"""
from __future__ import annotations

import bisect
from collections.abc import Callable

import torch

from seqmatchnet.matching.seqmatch import window_distances


def topk_smallest(dists: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per column, the ``k`` smallest entries in ascending order: ``[M, N] -> ([N, k], [N, k])``.

    Exact ties are ordered by ascending row index (see ``topk_by_value_then_index``).
    """
    return topk_by_value_then_index(dists.T, k)


def topk_by_value_then_index(values: torch.Tensor, k: int,
                             ids: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row, the ``k`` smallest entries ordered by ``(value, id)``: ``[N, M] -> ([N, k], [N, k])``.

    Returns the values and their positions (column indices) in ``values``. ``ids`` ``[N, M]`` are
    distinct integer tie-break keys per row (default: the column index), so among exactly equal
    values the smaller id comes first, also at the ``k`` boundary: an entry left outside the first
    ``k`` never has the same value as the ``k``-th and a smaller id. The result is therefore
    independent of how the columns were chunked and of the device: ``torch.topk`` is only trusted
    for the multiset of the ``k + 1`` smallest values, not for the order of equal ones.

    Cost: one ``topk`` of ``k + 1`` per row, then work only on the rows with equal values: one
    sort of ``[k]`` per row that has a tie among its first ``k``, and an exact pass over the rows
    whose ``k``-th and ``(k + 1)``-th values are equal.
    """
    n, m = values.shape
    k = min(int(k), m)
    if k <= 0:
        return values[:, :0], torch.empty((n, 0), dtype=torch.long, device=values.device)
    if k < m:
        top_v, pos = torch.topk(values, k + 1, dim=1, largest=False, sorted=True)
        kth = top_v[:, k - 1]
        ambiguous = top_v[:, k] == kth           # the tie group of the k-th value crosses the boundary
        top_v, pos = top_v[:, :k], pos[:, :k]
        if bool(ambiguous.any()):
            rows = torch.nonzero(ambiguous).squeeze(1)
            sub = values[rows]
            sub_kth = kth[rows, None]
            n_less = (sub < sub_kth).sum(dim=1, keepdim=True)    # these come first in top_v
            key = (torch.arange(m, device=values.device).expand(len(rows), m) if ids is None
                   else ids[rows].to(torch.long))
            key = torch.where(sub == sub_kth, key, torch.iinfo(torch.long).max)
            _, eq_pos = torch.topk(key, k, dim=1, largest=False, sorted=True)   # tied entries, smallest id first
            slot = torch.arange(k, device=values.device).expand(len(rows), k)
            from_eq = torch.gather(eq_pos, 1, (slot - n_less).clamp(min=0))
            pos[rows] = torch.where(slot >= n_less, from_eq, pos[rows])
    else:
        top_v, pos = torch.sort(values, dim=1, stable=True)
    # order the runs of equal values by id, in the rows that have any: one sort of (run, id)
    tie = top_v[:, 1:] == top_v[:, :-1]
    rows = torch.nonzero(tie.any(dim=1)).squeeze(1)
    if len(rows):
        sub_pos = pos[rows]
        key = sub_pos if ids is None else torch.gather(ids[rows], 1, sub_pos).to(torch.long)
        run = torch.cat([torch.zeros_like(key[:, :1]), torch.cumsum(~tie[rows], dim=1)], dim=1)
        key = key - key.min()
        span = int(key.max()) + 1
        composite = run * span + key
        pos[rows] = torch.gather(sub_pos, 1, torch.argsort(composite, dim=1))
    return top_v, pos


def chunked_topk(db_feats: torch.Tensor, q_feats: torch.Tensor, db_starts: torch.Tensor, q_starts: torch.Tensor,
                 seq_len: int, k: int, method: str = "meanOfPairs", query_chunk: int = 1024,
                 db_chunk: int | None = None,
                 progress: Callable[[int], None] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-``k`` database windows per query window, never holding more than
    ``db_chunk x query_chunk`` distances.

    Returns ``(distances [Nq_w, k], indices into db_starts [Nq_w, k])``, ascending; exact ties
    are ordered by ascending index. ``db_chunk=None`` scores all database windows of a query chunk
    at once; otherwise database chunks of at most ``db_chunk`` windows (more only when one window
    start is shared by more) are merged into a running top-k. A chunk never splits the frames that
    share one window start (the shifted windows at the ends of a traversal): each start is scored
    once per query chunk, so their scores are equal exactly, as in the dense path, and the
    predictions do not depend on the chunk sizes.
    """
    n_db = len(db_starts)
    k = min(k, n_db)
    device = db_feats.device
    out_d = torch.empty((len(q_starts), k), dtype=db_feats.dtype, device=device)
    out_i = torch.empty((len(q_starts), k), dtype=torch.long, device=device)
    groups = None if db_chunk is None or db_chunk >= n_db else _start_groups(db_starts, max(db_chunk, 1))
    for lo in range(0, len(q_starts), query_chunk):
        hi = min(lo + query_chunk, len(q_starts))
        if groups is None:
            dists = window_distances(db_feats, q_feats, db_starts, q_starts[lo:hi], seq_len, method)
            out_d[lo:hi], out_i[lo:hi] = topk_smallest(dists, k)
        else:
            uniq, inverse, frames, chunks = groups
            best_d = best_i = None
            for u_lo, u_hi, f_lo, f_hi in chunks:
                per_start = window_distances(db_feats, q_feats, uniq[u_lo:u_hi], q_starts[lo:hi], seq_len, method)
                ids = frames[f_lo:f_hi]                                    # their frames, by start
                dists = per_start[inverse[ids] - u_lo].T                    # [queries, frames]
                vals, order = topk_by_value_then_index(dists, k, ids=ids.expand(hi - lo, -1))
                idx = ids[order]
                if best_d is None:
                    best_d, best_i = vals, idx
                else:
                    merged_i = torch.cat([best_i, idx], dim=1)
                    best_d, order = topk_by_value_then_index(torch.cat([best_d, vals], dim=1), k, ids=merged_i)
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
