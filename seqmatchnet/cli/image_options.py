"""The image-model options, one definition for every mode that turns images into descriptors."""
from __future__ import annotations

import argparse

from seqmatchnet.images.base import CHECKPOINT_URL, MODELS


def add_model_options(p: argparse.ArgumentParser) -> None:
    """``--model``, ``--weights``, ``--netvladCkpt`` and ``--imageSize``: the image model of
    ``--mode extract``, of ``--mode prepare --db_images/--q_images`` and of ``--mode localize
    --bag``."""
    p.add_argument("--model", choices=MODELS, default=None,
                   help="the checkpoint's model (netvlad with --netvladCkpt); the architecture is "
                        "read from the file")
    p.add_argument("--weights", metavar="FILE",
                   help="the model's checkpoint as its authors release it (docs/image-models.md "
                        "says where to get each)")
    p.add_argument("--netvladCkpt", metavar="CKPT",
                   help="a Patch-NetVLAD checkpoint (same as --model netvlad --weights CKPT), "
                        f"e.g. {CHECKPOINT_URL}")
    p.add_argument("--imageSize", default=None, metavar="W,H",
                   help="resize every image to W,H pixels; 0 keeps each image's size; default: "
                        "the model's (netvlad 640,480; cosplace/eigenplaces 0; mixvpr 320,320 "
                        "from its checkpoint; boq 322,322 with DINOv2, 384,384 with ResNet-50, "
                        "bicubic; salad 322,322; megaloc 0); DINOv2 models need multiples of 14")
