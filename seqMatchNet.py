"""Sequence matching, as the reference names it (``seqMatchNet.py``): the distance of two aligned
sequences (``centerOnly`` / ``meanOfPairs``), every query window against every database window,
and the triplet loss.

The code is in ``seqmatchnet/matching/seqmatch.py`` (``SeqMatchNet`` is the reference's module
interface, kept for its readers), the top-k in ``seqmatchnet/matching/topk.py``.
"""
from seqmatchnet.matching.seqmatch import (  # noqa: F401
    DISTANCES,
    SeqMatchNet,
    frame_distances,
    sequence_distance,
    triplet_loss,
    window_distances,
)
