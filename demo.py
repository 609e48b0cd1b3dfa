"""``--mode demo`` (``make demo``): train and test on the embedded synthetic benchmark and print the
table of methods; run as ``python main.py --mode demo``.

The mode is ``seqmatchnet/cli/demo.py``; the benchmark it generates is
``seqmatchnet/data/synthetic.py``.
"""
from seqmatchnet.cli.demo import main  # noqa: F401
