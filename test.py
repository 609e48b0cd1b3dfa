"""``--mode test``: evaluate raw descriptors or a trained run on a split (Recall@N, radii,
precision-recall, figures, ``results.npz``, ``summary.json``); run as
``python main.py --mode test ...``.

The mode's entry is ``seqmatchnet/cli/test.py`` (``run_test(opt)``); the evaluation itself is
``seqmatchnet/evaluation/evaluate.py`` and the searches are in ``seqmatchnet/search/``.
"""
from seqmatchnet.cli.test import main, run_test  # noqa: F401
