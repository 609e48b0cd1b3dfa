"""Sequence matching as pure tensor functions.

Shapes use ``Nd`` database frames, ``Nq`` query frames, ``D`` descriptor
dimensions and ``L`` the sequence length. A *window* is given by the index of
its first frame (its *start*); windows are contiguous runs of ``L`` frames
(see ``datasets.sequence_windows``). Frame descriptors are L2-normalised, so
the Euclidean frame distance is ``sqrt(2 - 2 a.b)``, clamped at 0.

The sequence distance of two windows is the mean (``meanOfPairs``) or the
centre term (``centerOnly``) of the frame distances along their diagonal,
i.e. a 2-D convolution of the frame-distance matrix with an ``L x L`` identity
kernel. Everything here is vectorised: one matrix product per chunk plus ``L``
shifted additions.
"""
from __future__ import annotations

import bisect
import math
from collections.abc import Callable

import torch
from torch import nn

DISTANCES = ("centerOnly", "meanOfPairs")   # sequence distances of the loss and the mining


def frame_distances(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Euclidean distances of L2-normalised rows: ``[M, D] x [N, D] -> [M, N]``."""
    d = a @ b.T
    if d.requires_grad:
        return torch.sqrt(torch.clamp(2.0 - 2.0 * d, min=0.0))
    return d.mul_(-2.0).add_(2.0).clamp_(min=0.0).sqrt_()   # in place: one [M, N] block


def diagonal_sums(frame_dists: torch.Tensor, seq_len: int, method: str = "meanOfPairs") -> torch.Tensor:
    """Aggregate a frame-distance matrix along its diagonals.

    ``[M, N] -> [M - L + 1, N - L + 1]``: entry ``[a, b]`` is the sequence
    distance of the windows starting at database frame ``a`` and query frame
    ``b``.
    """
    _check_method(method)
    m, n = frame_dists.shape
    rows, cols = m - seq_len + 1, n - seq_len + 1
    if rows < 1 or cols < 1:
        raise ValueError(f"need at least {seq_len} frames on each side, got {m} x {n}")
    if method == "centerOnly":
        c = seq_len // 2
        return frame_dists[c:c + rows, c:c + cols].clone()
    out = frame_dists[:rows, :cols].clone()
    for k in range(1, seq_len):
        out += frame_dists[k:k + rows, k:k + cols]
    return out.div_(seq_len)


def window_distances(db_feats: torch.Tensor, q_feats: torch.Tensor, db_starts: torch.Tensor,
                     q_starts: torch.Tensor, seq_len: int, method: str = "meanOfPairs",
                     query_chunk: int = 2048) -> torch.Tensor:
    """Dense sequence distances ``[len(db_starts), len(q_starts)]``.

    ``db_feats`` ``[Nd, D]`` and ``q_feats`` ``[Nq, D]`` are frame descriptors;
    the starts index their rows. Queries are processed ``query_chunk`` at a
    time into one preallocated result, so the extra memory is a few
    ``Nd x query_chunk`` blocks. Each chunk takes the cheaper of two exact
    routes: the diagonal sums over the frame range the chunk covers, or, for
    scattered queries (a random mining chunk), one product per window offset
    over just the chosen windows.
    """
    _check_method(method)
    out = torch.empty((len(db_starts), len(q_starts)), dtype=db_feats.dtype, device=db_feats.device)
    for lo in range(0, len(q_starts), query_chunk):
        sl = slice(lo, min(lo + query_chunk, len(q_starts)))
        out[:, sl] = _window_distance_block(db_feats, q_feats, db_starts, q_starts[sl], seq_len, method)
    return out


def _window_distance_block(db_feats: torch.Tensor, q_feats: torch.Tensor, db_starts: torch.Tensor,
                           q_starts: torch.Tensor, seq_len: int, method: str) -> torch.Tensor:
    db_lo = int(db_starts.min())
    db_hi = int(db_starts.max()) + seq_len
    q_lo = int(q_starts.min())
    q_hi = int(q_starts.max()) + seq_len
    offsets = [seq_len // 2] if method == "centerOnly" else list(range(seq_len))
    if len(offsets) * len(q_starts) < q_hi - q_lo:
        # scattered queries: sum the frame distances of each offset over the chosen windows only
        rows = db_starts - db_lo
        out = None
        for k in offsets:
            frames = frame_distances(db_feats[db_lo:db_hi], q_feats[q_starts + k])[rows + k]
            out = frames if out is None else out.add_(frames)
        return out.div_(len(offsets))
    frames = frame_distances(db_feats[db_lo:db_hi], q_feats[q_lo:q_hi])
    agg = diagonal_sums(frames, seq_len, method)
    del frames
    return agg[(db_starts - db_lo)[:, None], (q_starts - q_lo)[None, :]]


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


def candidate_distances(db_feats: torch.Tensor, q_feats: torch.Tensor, db_starts: torch.Tensor,
                        q_starts: torch.Tensor, candidates: torch.Tensor, seq_len: int,
                        method: str = "meanOfPairs", query_group: int = 8) -> torch.Tensor:
    """Sequence distances of each query window to its own candidate database windows.

    ``candidates`` ``[Nq_w, C]`` indexes ``db_starts``; returns ``[Nq_w, C]``. A few queries at a
    time (``query_group``), the distinct frames of their windows and of their candidates' windows
    are compared in one matrix product (``frame_distances``), and each window pair's frame
    distances are picked from it and summed in window order, as ``diagonal_sums`` does. Candidates
    shared by neighbouring queries (and frames shared by overlapping windows) are compared once;
    gathering every pair's frames instead moves ``Nq_w x C x L x D`` values and is several times slower.
    """
    _check_method(method)
    offsets = torch.arange(seq_len, device=db_feats.device)
    if method == "centerOnly":
        offsets = offsets[seq_len // 2:seq_len // 2 + 1]
    out = torch.empty(candidates.shape, dtype=db_feats.dtype, device=db_feats.device)
    for lo in range(0, len(q_starts), query_group):
        hi = min(lo + query_group, len(q_starts))
        q_frames, q_pos = torch.unique(q_starts[lo:hi, None] + offsets, return_inverse=True)          # [g, L']
        db_frames, db_pos = torch.unique(db_starts[candidates[lo:hi]][..., None] + offsets,
                                         return_inverse=True)                                        # [g, C, L']
        frame_d = frame_distances(q_feats[q_frames], db_feats[db_frames])
        pairs = frame_d[q_pos[:, None, :].expand_as(db_pos), db_pos]                                 # [g, C, L']
        acc = pairs[..., 0].clone()
        for j in range(1, len(offsets)):      # summed in window order, as diagonal_sums does
            acc += pairs[..., j]
        out[lo:hi] = acc.div_(len(offsets))
    return out


def sequence_distance(a: torch.Tensor, b: torch.Tensor, method: str = "meanOfPairs") -> torch.Tensor:
    """Distance of aligned sequences ``[..., L, D] x [..., L, D] -> [...]`` (broadcasting).

    Uses ``sqrt(clamp(sum((a-b)^2)))`` with a safe gradient at 0 so it can be
    used in the loss.
    """
    _check_method(method)
    if method == "centerOnly":
        c = a.shape[-2] // 2
        a, b = a[..., c:c + 1, :], b[..., c:c + 1, :]
    return sequence_frame_distances(a, b).mean(dim=-1)


def sequence_frame_distances(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-frame Euclidean distances ``[..., D] x [..., D] -> [...]`` (broadcasting), with the loss's safe
    gradient at 0."""
    return _safe_sqrt(((a - b) ** 2).sum(dim=-1))


def _safe_sqrt(x: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    # sqrt with a finite gradient at exactly 0 (identical sequences)
    return torch.sqrt(torch.clamp(x, min=eps)) * (x > eps)


def triplet_loss(d_pos: torch.Tensor, d_neg: torch.Tensor, neg_mask: torch.Tensor, margin: float) -> torch.Tensor:
    """Mean over valid triplets of ``max(0, d_pos - d_neg + sqrt(margin))``.

    ``d_pos`` ``[B]``, ``d_neg`` and ``neg_mask`` ``[B, K]``; ``margin`` is the
    reference's ``--margin`` (its square root is the hinge margin).
    """
    hinge = torch.relu(d_pos[:, None] - d_neg + math.sqrt(margin))
    mask = neg_mask.to(hinge.dtype)
    return (hinge * mask).sum() / mask.sum().clamp(min=1.0)


class SeqMatchNet(nn.Module):
    """The (parameter-free) sequence matcher: distance of aligned sequences."""

    def __init__(self, method: str = "meanOfPairs") -> None:
        super().__init__()
        _check_method(method)
        self.method = method

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return sequence_distance(a, b, self.method)


def _check_method(method: str) -> None:
    if method not in DISTANCES:
        raise ValueError(f"unknown sequence-matching method {method!r}; expected one of {DISTANCES}")
