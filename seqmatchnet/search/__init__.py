"""The searches for each query window's best database windows: along the diagonal
(``diagonal.py``: dense, chunked, streamed, re-ranked, shortlisted, divided between torchrun
ranks), across speeds (``speeds.py``) and the faiss window index (``shortlist.py``).
"""
