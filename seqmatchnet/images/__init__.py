"""Images to per-frame descriptors: one module per family of image models (NetVLAD, CosPlace and
EigenPlaces, MixVPR, and on the DINOv2 ViT of ``dinov2.py``: BoQ, SALAD and MegaLoc), the
checkpoint reader that picks the architecture (``registry.py``) and the resumable extraction
(``extraction.py``).
"""
