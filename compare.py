"""``--mode compare RUN [RUN ...]``: runs side by side from their ``summary.json`` files; run as
``python main.py --mode compare ...``.

The mode is ``seqmatchnet/cli/compare.py``; the table ``seqmatchnet/evaluation/compare.py``.
"""
from seqmatchnet.cli.compare import main  # noqa: F401
