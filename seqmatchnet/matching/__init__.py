"""Sequence matching along the diagonal: frame and window distances, the triplet loss
(``seqmatch.py``), top-k with ties broken by index (``topk.py``) and block operations
(``blocks.py``).
"""
