"""Evaluation: Recall@N, radii and precision-recall (``recall.py``), one evaluation of a split
(``evaluate.py``), figures, result files, run summaries and the comparison of runs.
"""
