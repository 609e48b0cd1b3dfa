"""Training along trajectories: the frames each trajectory aligns, its tap weights and the
sequence distance the loss and the mining use.
"""
from __future__ import annotations

import torch

from seqmatchnet.matching.seqmatch import sequence_distance, sequence_frame_distances
from seqmatchnet.speeds.trajectories import Trajectories

# ---------------------------------------------------------------- training

def trajectory_frames(anchors, bounds, traj: Trajectories) -> tuple[torch.Tensor, torch.Tensor]:
    """Database frames of every trajectory of every anchor, for gathering descriptors in the loss.

    ``anchors`` ``[...]`` database anchor frames (for centred windows: window start + ``L // 2``),
    ``bounds`` ``[..., 2]`` their sequences ``[lo, hi)``. Returns ``(frames, valid [..., T])``:
    ``frames`` ``[..., T, L]`` the frames ``anchor + steps[t]`` on the whole grid, and ``[..., T, L,
    2]`` (the lower and the upper frame of each position, weighted by ``tap_weights``; the upper is
    the lower on a whole frame) when ``traj`` has midpoints. Frames are clamped into the bounds
    where the trajectory leaves them (``valid`` False there), so ``feats[frames]`` is always
    defined. The caller must hold the descriptors of all those frames (the anchor's frames ``-before
    .. +after`` of ``anchor_margin``, within its sequence).
    """
    anchors = torch.as_tensor(anchors, dtype=torch.long)
    bounds = torch.as_tensor(bounds, dtype=torch.long, device=anchors.device)
    steps = torch.as_tensor(traj.steps, device=anchors.device)                     # [T, L]
    lo, hi = bounds[..., 0, None, None], bounds[..., 1, None, None]
    if traj.weights.any():
        upper = steps + torch.as_tensor(traj.weights > 0, device=anchors.device)
        # [T, L, 2]
        steps, lo, hi = torch.stack([steps, upper], dim=-1), lo[..., None], hi[..., None]
    # [..., T, L(, 2)]
    frames = anchors.reshape(*anchors.shape, *([1] * steps.ndim)) + steps
    valid = ((frames >= lo) & (frames < hi)).flatten(start_dim=anchors.ndim + 1).all(dim=-1)
    return torch.minimum(torch.maximum(frames, lo), hi - 1), valid


def tap_weights(traj: Trajectories) -> torch.Tensor | None:
    """``[T, L, 2]`` float32 weights ``(1 - w, w)`` of the lower and upper frames of
    ``trajectory_frames``; None on the whole grid (one frame per position)."""
    if not traj.weights.any():
        return None
    w = torch.as_tensor(traj.weights, dtype=torch.float32)
    return torch.stack([1.0 - w, w], dim=-1)


def trajectory_sequence_distance(fq: torch.Tensor, fdb: torch.Tensor,
                                 valid: torch.Tensor | None = None,
                                 method: str = "meanOfPairs", temperature: float = 0.0,
                                 weights: torch.Tensor | None = None) -> torch.Tensor:
    """Differentiable sequence distance across trajectories: ``[..., L, D] x [..., T, L, D] ->
    [...]``.

    ``fq`` the query window's frames (in ``q_offsets`` order), ``fdb`` each trajectory's database
    frames (``trajectory_frames``), ``valid`` ``[..., T]`` (default: all). Per trajectory the
    aligned ``seqMatchNet.sequence_distance``; then the minimum over the valid trajectories
    (``temperature`` 0: the gradient flows through the best one) or the soft minimum ``-tau *
    logsumexp(-d / tau)`` (``tau > 0``). With midpoints, ``fdb`` is ``[..., T, L, 2, D]`` and
    ``weights`` ``[T, L, 2]`` (``tap_weights``): a position's distance is the weighted sum of its
    two frames' distances. ``+inf`` where no trajectory is valid. With the diagonal alone this is
    ``sequence_distance``.
    """
    if weights is None:
        d = sequence_distance(fq[..., None, :, :], fdb, method)                    # [..., T]
    else:
        if method not in ("meanOfPairs", "centerOnly"):
            raise ValueError(f"unknown sequence distance {method!r}")
        weights = weights.to(fdb.device, fdb.dtype)
        # [..., T, L, 2]
        per_tap = sequence_frame_distances(fq[..., None, :, None, :], fdb)
        per_pos = (per_tap * weights).sum(dim=-1)                                  # [..., T, L]
        if method == "centerOnly":
            c = per_pos.shape[-1] // 2
            per_pos = per_pos[..., c:c + 1]
        d = per_pos.mean(dim=-1)
    if valid is not None:
        d = d.masked_fill(~valid, torch.inf)
    if temperature > 0:
        return -temperature * torch.logsumexp(-d / temperature, dim=-1)
    return d.amin(dim=-1)
