"""``--mode extract``: images to per-frame descriptors (NetVLAD, CosPlace, EigenPlaces, MixVPR);
run as ``python main.py --mode extract ...``.

The mode's entry is ``seqmatchnet/cli/extract.py``; the image models are in
``seqmatchnet/images/`` (one module per family, ``registry.py`` reads a checkpoint and builds the
network it fits), the resumable extraction in ``seqmatchnet/images/extraction.py``.
"""
from seqmatchnet.cli.extract import main  # noqa: F401
from seqmatchnet.images.extraction import extract_descriptors  # noqa: F401
