"""``--mode prepare``: your own data (descriptors or images, and positions) to a dataset the other
modes read as ``--dataset custom:NAME``; run as ``python main.py --mode prepare ...``.

The mode's entry is ``seqmatchnet/cli/prepare.py``; the checks, splits and files it writes are
``seqmatchnet/data/own.py``, the positions reader ``seqmatchnet/data/positions.py``.
"""
from seqmatchnet.cli.prepare import main  # noqa: F401
