"""Top-k with ties broken by database index, exactly (``topk_by_value_then_index``); the chunked
search that uses it is ``search/chunked.py``.
"""
from __future__ import annotations

import torch


def topk_smallest(dists: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per column, the ``k`` smallest entries in ascending order: ``[M, N] -> ([N, k], [N, k])``.

    Exact ties are ordered by ascending row index (see ``topk_by_value_then_index``).
    """
    return topk_by_value_then_index(dists.T, k)


def topk_by_value_then_index(values: torch.Tensor, k: int,
                             ids: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row, the ``k`` smallest entries by ``(value, id)``: ``[N, M] -> ([N, k], [N, k])``.

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
        ambiguous = top_v[:, k] == kth     # the tie group of the k-th value crosses the boundary
        top_v, pos = top_v[:, :k], pos[:, :k]
        if bool(ambiguous.any()):
            rows = torch.nonzero(ambiguous).squeeze(1)
            sub = values[rows]
            sub_kth = kth[rows, None]
            n_less = (sub < sub_kth).sum(dim=1, keepdim=True)    # these come first in top_v
            key = (torch.arange(m, device=values.device).expand(len(rows), m) if ids is None
                   else ids[rows].to(torch.long))
            key = torch.where(sub == sub_kth, key, torch.iinfo(torch.long).max)
            _, eq_pos = torch.topk(key, k, dim=1, largest=False, sorted=True)   # ties: small id 1st
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
