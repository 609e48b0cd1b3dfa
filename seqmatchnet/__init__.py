"""SeqMatchNet: contrastive learning with sequence matching for visual place recognition and
relocalisation (CoRL 2021), as a package.

The command line is ``main.py`` at the repository root; this package is the engine, importable
on its own (``pip install -e .``)::

    from seqmatchnet import Localizer
    localizer = Localizer(db_descriptors, seq_len=5)
    match = localizer.step(frame_descriptor)

Sub-packages by concern: ``matching`` (sequence distances, top-k), ``speeds`` (trajectories
across speeds), ``search`` (the searches: diagonal, across speeds, shortlisted), ``data``,
``models``, ``images`` (image models and extraction), ``training``, ``evaluation``, ``online``
(``Localizer``), ``runs`` (run folders, checkpoints, logging), ``common`` and ``cli`` (the modes).
"""
from __future__ import annotations

__version__ = "1.0.0"
__all__ = ["Localizer", "Match", "SearchSettings", "UserError"]


def __getattr__(name: str):
    """``Localizer``, ``Match`` and ``SearchSettings`` load torch only when asked for."""
    if name in ("Localizer", "Match", "SearchSettings"):
        from seqmatchnet.online import localizer
        return getattr(localizer, name)
    if name == "UserError":
        from seqmatchnet.common.errors import UserError
        return UserError
    raise AttributeError(f"module 'seqmatchnet' has no attribute {name!r}")
