"""Training: queries, positives and negatives and the mining (``mining.py``), the loss of a batch
and one epoch (``steps.py``), and the loop over epochs with validation and checkpoints
(``epochs.py``).
"""
