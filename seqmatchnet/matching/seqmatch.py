"""Sequence matching as pure tensor functions.

Shapes use ``Nd`` database frames, ``Nq`` query frames, ``D`` descriptor dimensions and ``L`` the
sequence length. A *window* is given by the index of its first frame (its *start*); windows are
contiguous runs of ``L`` frames (see ``datasets.sequence_windows``). Frame descriptors are
L2-normalised, so the Euclidean frame distance is ``sqrt(2 - 2 a.b)``, clamped at 0.

The sequence distance of two windows is the mean (``meanOfPairs``) or the centre term
(``centerOnly``) of the frame distances along their diagonal, i.e. a 2-D convolution of the
frame-distance matrix with an ``L x L`` identity kernel. Everything here is vectorised: one matrix
product per chunk plus ``L`` shifted additions.
"""
from __future__ import annotations

import math

import torch
from torch import nn

DISTANCES = ("centerOnly", "meanOfPairs")   # sequence distances of the loss and the mining


def frame_distances(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Euclidean distances of L2-normalised rows: ``[M, D] x [N, D] -> [M, N]``."""
    d = a @ b.T
    if d.requires_grad:
        return torch.sqrt(torch.clamp(2.0 - 2.0 * d, min=0.0))
    return d.mul_(-2.0).add_(2.0).clamp_(min=0.0).sqrt_()   # in place: one [M, N] block


def diagonal_sums(frame_dists: torch.Tensor, seq_len: int,
                  method: str = "meanOfPairs") -> torch.Tensor:
    """Aggregate a frame-distance matrix along its diagonals.

    ``[M, N] -> [M - L + 1, N - L + 1]``: entry ``[a, b]`` is the sequence distance of the windows
    starting at database frame ``a`` and query frame ``b``.
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

    ``db_feats`` ``[Nd, D]`` and ``q_feats`` ``[Nq, D]`` are frame descriptors; the starts index
    their rows. Queries are processed ``query_chunk`` at a time into one preallocated result, so the
    extra memory is a few ``Nd x query_chunk`` blocks. Each chunk takes the cheaper of two exact
    routes: the diagonal sums over the frame range the chunk covers, or, for scattered queries (a
    random mining chunk), one product per window offset over just the chosen windows.
    """
    _check_method(method)
    out = torch.empty((len(db_starts), len(q_starts)), dtype=db_feats.dtype, device=db_feats.device)
    for lo in range(0, len(q_starts), query_chunk):
        sl = slice(lo, min(lo + query_chunk, len(q_starts)))
        out[:, sl] = _window_distance_block(db_feats, q_feats, db_starts, q_starts[sl], seq_len,
                                            method)
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


def candidate_distances(db_feats: torch.Tensor, q_feats: torch.Tensor, db_starts: torch.Tensor,
                        q_starts: torch.Tensor, candidates: torch.Tensor, seq_len: int,
                        method: str = "meanOfPairs", query_group: int = 8) -> torch.Tensor:
    """Sequence distances of each query window to its own candidate database windows.

    ``candidates`` ``[Nq_w, C]`` indexes ``db_starts``; returns ``[Nq_w, C]``. A few queries at a
    time (``query_group``), the distinct frames of their windows and of their candidates' windows
    are compared in one matrix product (``frame_distances``), and each window pair's frame
    distances are picked from it and summed in window order, as ``diagonal_sums`` does. Candidates
    shared by neighbouring queries (and frames shared by overlapping windows) are compared once;
    gathering every pair's frames instead moves ``Nq_w x C x L x D`` values and is several times
    slower.
    """
    _check_method(method)
    offsets = torch.arange(seq_len, device=db_feats.device)
    if method == "centerOnly":
        offsets = offsets[seq_len // 2:seq_len // 2 + 1]
    out = torch.empty(candidates.shape, dtype=db_feats.dtype, device=db_feats.device)
    for lo in range(0, len(q_starts), query_group):
        hi = min(lo + query_group, len(q_starts))
        # [g, L']
        q_frames, q_pos = torch.unique(q_starts[lo:hi, None] + offsets, return_inverse=True)
        db_frames, db_pos = torch.unique(db_starts[candidates[lo:hi]][..., None] + offsets,
                                         # [g, C, L']
                                         return_inverse=True)
        frame_d = frame_distances(q_feats[q_frames], db_feats[db_frames])
        # [g, C, L']
        pairs = frame_d[q_pos[:, None, :].expand_as(db_pos), db_pos]
        acc = pairs[..., 0].clone()
        for j in range(1, len(offsets)):      # summed in window order, as diagonal_sums does
            acc += pairs[..., j]
        out[lo:hi] = acc.div_(len(offsets))
    return out


def sequence_distance(a: torch.Tensor, b: torch.Tensor,
                      method: str = "meanOfPairs") -> torch.Tensor:
    """Distance of aligned sequences ``[..., L, D] x [..., L, D] -> [...]`` (broadcasting).

    Uses ``sqrt(clamp(sum((a-b)^2)))`` with a safe gradient at 0 so it can be used in the loss.
    """
    _check_method(method)
    if method == "centerOnly":
        c = a.shape[-2] // 2
        a, b = a[..., c:c + 1, :], b[..., c:c + 1, :]
    return sequence_frame_distances(a, b).mean(dim=-1)


def sequence_frame_distances(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-frame Euclidean distances ``[..., D] x [..., D] -> [...]`` (broadcasting), with the
    loss's safe gradient at 0."""
    return _safe_sqrt(((a - b) ** 2).sum(dim=-1))


def _safe_sqrt(x: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    # sqrt with a finite gradient at exactly 0 (identical sequences)
    return torch.sqrt(torch.clamp(x, min=eps)) * (x > eps)


def triplet_loss(d_pos: torch.Tensor, d_neg: torch.Tensor, neg_mask: torch.Tensor,
                 margin: float) -> torch.Tensor:
    """Mean over valid triplets of ``max(0, d_pos - d_neg + sqrt(margin))``.

    ``d_pos`` ``[B]``, ``d_neg`` and ``neg_mask`` ``[B, K]``; ``margin`` is the reference's
    ``--margin`` (its square root is the hinge margin).
    """
    hinge = torch.relu(d_pos[:, None] - d_neg + math.sqrt(margin))
    mask = neg_mask.to(hinge.dtype)
    return (hinge * mask).sum() / mask.sum().clamp(min=1.0)


class SeqMatchNet(nn.Module):
    """The (parameter-free) sequence matcher: distance of aligned sequences.

    The reference's module interface, kept for its readers (``seqMatchNet.SeqMatchNet``); the
    project calls the functions above directly."""

    def __init__(self, method: str = "meanOfPairs") -> None:
        super().__init__()
        _check_method(method)
        self.method = method

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return sequence_distance(a, b, self.method)


def _check_method(method: str) -> None:
    if method not in DISTANCES:
        raise ValueError(f"unknown sequence-matching method {method!r}; expected one of "
                         f"{DISTANCES}")
