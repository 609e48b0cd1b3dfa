"""Scoring rules across trajectories: ``score = min_t a(q, t) d_t(q, j) + b(q, t)`` with the
coefficients from per-(query, trajectory) statistics; non-causal (test) and causal (localize).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# ---------------------------------------------------------------- scoring rules

@dataclass(frozen=True)
class ScoringRule:
    """How the trajectories of one query window combine into one score per database window.

    ``kind``: ``"min"`` (the plain minimum over trajectories), ``"consensus"`` (the speed consensus
    of the neighbouring query windows, see the module docstring), ``"prior"`` (a fixed offset
    towards the trajectory that most windows of the query's sequence prefer), ``"zscore"`` (each
    (query, trajectory) normalised by the mean and std of its scores over the database; combine with
    ``consensus`` through ``normalise``). ``window``: neighbours ``+-window`` query windows
    (consensus); ``weight``: the offset's weight (``b`` is ``weight`` times a distance difference
    for ``consensus``, ``weight`` times the vote share missing for ``prior``); ``normalise``:
    z-normalise each (query, trajectory) first (``a = 1 / std``).
    """

    kind: str = "consensus"
    window: int = 20
    weight: float = 3.0
    normalise: bool = True

    @property
    def neighbours(self) -> int | None:
        """Query windows each side whose statistics a query's coefficients read (None: its whole
        sequence)."""
        return None if self.kind == "prior" else self.window if self.kind == "consensus" else 0

    def __post_init__(self) -> None:
        if self.kind not in ("min", "consensus", "prior", "zscore"):
            raise ValueError(f"unknown scoring rule {self.kind!r}")
        if self.window < 0 or not self.weight >= 0:
            raise ValueError(f"window and weight must be >= 0, got {self.window}, {self.weight}")


DEFAULT_RULE = ScoringRule(kind="consensus", window=20, weight=3.0, normalise=True)
PLAIN_MIN = ScoringRule(kind="min", window=0, weight=0.0, normalise=False)


def segment_ids(q_segments) -> np.ndarray:
    """Per query a segment id ``[Nq]`` from ids ``[Nq]`` or bounds ``[Nq, 2]`` (the id is the lower
    bound)."""
    seg = np.asarray(q_segments)
    return (seg[:, 0] if seg.ndim == 2 else seg).astype(np.int64)


def neighbour_mean(x: np.ndarray, seg: np.ndarray, window: int) -> np.ndarray:
    """Mean of the finite values of ``x`` ``[Nq, T]`` over the queries ``q - window .. q + window``
    of the same segment (queries in driving order, a segment's queries consecutive); NaN where none
    is finite."""
    n = len(x)
    finite = np.isfinite(x)
    cs = np.concatenate([np.zeros((1, x.shape[1])), np.cumsum(np.where(finite, x, 0.0), axis=0)])
    cn = np.concatenate([np.zeros((1, x.shape[1])), np.cumsum(finite, axis=0)])
    idx = np.arange(n)
    starts = np.flatnonzero(np.r_[True, seg[1:] != seg[:-1]])
    seg_lo = starts[np.searchsorted(starts, idx, side="right") - 1]
    seg_hi = np.r_[starts[1:], n][np.searchsorted(starts, idx, side="right") - 1]
    lo, hi = np.maximum(idx - window, seg_lo), np.minimum(idx + window + 1, seg_hi)
    count = cn[hi] - cn[lo]
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(count > 0, (cs[hi] - cs[lo]) / np.maximum(count, 1), np.nan)


def rule_coefficients(rule: ScoringRule, stats: dict[str, np.ndarray],
                      q_segments) -> tuple[np.ndarray, np.ndarray]:
    """``(a, b)`` ``[Nq, T]`` float64 of ``rule`` from per-(query, trajectory) statistics over the
    database.

    ``stats``: ``best`` (smallest distance), ``sum``, ``sumsq`` and ``count`` of the finite
    distances, each ``[Nq, T]``; ``q_segments``: the queries' sequences (``segment_ids``). ``b`` is
    ``+inf`` for a trajectory that the rule excludes (never scored for that query).
    """
    best = stats["best"].astype(np.float64)
    nq, nt = best.shape
    a, b = np.ones((nq, nt)), np.zeros((nq, nt))
    if rule.normalise or rule.kind == "zscore":
        count = np.maximum(stats["count"], 1)
        mean = stats["sum"] / count
        std = np.sqrt(np.maximum(stats["sumsq"] / count - mean ** 2, 0.0))
        std = np.where(std > 0, std, 1.0)
        a, b = 1.0 / std, -mean / std
        best = np.where(np.isfinite(best), (best - mean) / std, np.inf)
    if rule.kind == "consensus":
        seg = segment_ids(q_segments)
        cons = neighbour_mean(best, seg, rule.window)
        cons = np.where(np.isnan(cons), np.inf, cons)
        b = b + rule.weight * _excess(cons)
    elif rule.kind == "prior":
        b = b + rule.weight * _vote_penalty(best, segment_ids(q_segments))
    return a, np.where(np.isfinite(best).any(axis=1, keepdims=True) & ~np.isfinite(best), np.inf, b)


def _excess(cons: np.ndarray) -> np.ndarray:
    """``cons - min over trajectories`` per row (``inf`` stays ``inf``; a row without finite values:
    0)."""
    low = np.min(cons, axis=1, keepdims=True)
    low = np.where(np.isfinite(low), low, 0.0)
    return np.where(np.isfinite(cons), cons - low, np.where(np.isfinite(low), np.inf, 0.0))


def _vote_penalty(best: np.ndarray, seg: np.ndarray) -> np.ndarray:
    """Per query and trajectory, the share of its segment's queries that prefer another
    trajectory."""
    winner = np.argmin(np.where(np.isfinite(best), best, np.inf), axis=1)
    out = np.empty_like(best)
    for s in np.unique(seg):
        rows = seg == s
        share = np.bincount(winner[rows], minlength=best.shape[1]) / rows.sum()
        out[rows] = 1.0 - share
    return out


def causal_coefficients(rule: ScoringRule, best: np.ndarray, mean: np.ndarray, std: np.ndarray
                        ) -> tuple[np.ndarray, np.ndarray]:
    """Causal ``(a, b)`` ``[T]`` for the newest query of a sequence (localisation).

    ``best``, ``mean``, ``std`` ``[W, T]``: per trajectory, the best distance over the database and
    the mean and std of its distances, for the newest ``W <= window + 1`` queries of the current
    sequence (oldest first, the newest last). ``consensus`` averages over those queries instead of a
    centred neighbourhood; ``min``: ``a = 1, b = 0``. (``prior`` and ``zscore`` alone have no causal
    form here: ``ValueError``.)
    """
    best = np.asarray(best, dtype=np.float64)
    nt = best.shape[1]
    if rule.kind == "min" and not rule.normalise:
        return np.ones(nt), np.zeros(nt)
    if rule.kind != "consensus":
        raise ValueError(f"no causal form of the scoring rule {rule}")
    a, b = np.ones(nt), np.zeros(nt)
    if rule.normalise:
        std = np.where(np.asarray(std) > 0, std, 1.0)
        best = np.where(np.isfinite(best), (best - mean) / std, np.inf)
        a, b = 1.0 / std[-1], -np.asarray(mean)[-1] / std[-1]
    finite = np.isfinite(best)
    count = finite.sum(axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        cons = np.where(count > 0, np.where(finite, best, 0.0).sum(axis=0) / np.maximum(count, 1),
                        np.inf)
    return a, b + rule.weight * _excess(cons[None])[0]
