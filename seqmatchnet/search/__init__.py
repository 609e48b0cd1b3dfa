"""The searches for each query window's best database windows. ``entry.py`` picks the path
(``find``); each side of a search travels as one ``sides.Windows`` bundle.

- along the diagonal: ``chunked.py`` (every window, in chunks), ``diagonal.py`` (in memory,
  streamed, re-ranked, divided between torchrun ranks), ``shortlisted.py`` (a faiss shortlist
  re-ranked by sequence matching; the index itself is ``shortlist.py``);
- across speeds (``--velocities``): ``speeds.py``.
"""
