"""``--mode train``: learn the projection (``--pooling``) or SeqNet with a triplet loss whose
distance is sequence matching, mining hard negatives with it; run as ``python main.py --mode
train ...``.

The mode's entry is ``seqmatchnet/cli/train.py`` (``train(opt, argv)``: options to a run folder);
the engine is ``seqmatchnet/training/``: ``mining.py`` (queries, positives, negatives, the mining
matrix), ``steps.py`` (the loss of a batch, cache refresh and mining, one epoch) and
``epochs.py`` (the loop over epochs, validation, checkpoints).
"""
from seqmatchnet.cli.train import main, train  # noqa: F401
