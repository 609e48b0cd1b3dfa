"""The two sides of a search, each travelling as one object: the database windows and the query
windows (``Windows``), and a database streamed from its file (``DatabaseStream``).

Every search function takes them in one order: the config, the model, the database side, the query
side, then the rest (``seq_len``, ``device``, ...).
"""
from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch


@dataclass(frozen=True)
class Windows:
    """One side of a search (the database or the queries): a traversal's frames and the windows of
    ``seq_len`` frames searched in them.

    - ``frames``: the frames, one row each. Raw descriptors ``[F, C]`` (an array or a
      ``data.descriptors.DescriptorSource``, read lazily), projected features ``[F, D]`` (a tensor),
      one descriptor per window ``[N, D]`` (window models, ``starts`` None), or, for a database that
      arrives in pieces, the iterable of its chunks or blocks (``diagonal.database_chunks``,
      ``speeds.trajectory_blocks``).
    - ``starts``: ``[N]`` integers (an array or a tensor), the row of ``frames`` where each window
      begins (``[g, C]`` for the candidates of ``g`` queries); None for one row per window.
    - ``bounds``: ``[N, 2]`` the ``[first, end)`` frames of the sequence each window lies in (the
      search across speeds keeps trajectories inside them), or None where no search reads them.
    """

    frames: Any
    starts: Any
    bounds: np.ndarray | None = None

    @classmethod
    def of(cls, embedding, bounds: np.ndarray | None = None) -> Windows:
        """The windows of a ``models.sequence.WindowEmbedding`` (its starts as a NumPy array)."""
        starts = None if embedding.starts is None else embedding.starts.cpu().numpy()
        return cls(embedding.feats, starts, bounds)

    def as_float(self) -> Windows:
        """The same windows with float32 features (float16 features are matched in float32)."""
        return replace(self, frames=self.frames.float())

    def rows(self) -> torch.Tensor:
        """One row per window (for L = 1 or window models): ``[N, D]``."""
        return self.frames if self.starts is None else self.frames[self.starts]

    def select(self, rows) -> Windows:
        """The windows ``rows`` (an index or a slice) of the same frames."""
        bounds = None if self.bounds is None else np.asarray(self.bounds)[rows]
        return replace(self, starts=self.starts[rows], bounds=bounds)


@dataclass(frozen=True)
class DatabaseStream:
    """A database read from its file chunk by chunk: ``chunks`` as ``diagonal.database_chunks``
    yields them (read and projected when iterated), ``clock`` the timings that reading adds to
    (``features_s``), and ``keep`` the tensor ``[F, D]`` the chunks' features are copied into (for
    the figures) or None."""

    chunks: Iterable
    clock: dict
    keep: torch.Tensor | None = None
