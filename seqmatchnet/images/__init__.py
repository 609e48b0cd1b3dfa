"""Images to per-frame descriptors: one module per family of image models (NetVLAD, CosPlace and
EigenPlaces, MixVPR), the checkpoint reader that picks the architecture (``registry.py``) and the
resumable extraction (``extraction.py``).
"""
