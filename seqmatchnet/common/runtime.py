"""Devices and seeding."""
from __future__ import annotations

import logging
import random

import numpy as np
import torch

from seqmatchnet.common.errors import UserError

log = logging.getLogger(__name__)


# ---------------------------------------------------------------- seeding and devices

def make_deterministic(seed: int, rank: int = 0) -> None:
    """Seed Python, NumPy and torch (CPU and CUDA) with ``seed``; a process of rank > 0 under
    torchrun with a seed derived from ``(seed, rank)``, so each rank has its own streams."""
    if rank:
        seed = int(np.random.SeedSequence([seed % 2**32, rank]).generate_state(1)[0])
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def get_device(nocuda: bool, device: str = "auto") -> torch.device:
    """The CPU with ``--nocuda`` or ``--device cpu``; CUDA with ``--device cuda`` (an error when
    there is none); by default (``auto``) CUDA when available, else the CPU."""
    if nocuda or device == "cpu":
        return torch.device("cpu")
    if torch.cuda.is_available():
        return torch.device("cuda")
    if device == "cuda":
        raise UserError("--device cuda was asked for but CUDA is not available on this machine: "
                        "use --nocuda (or --device cpu) to run on the CPU")
    log.debug("CUDA is not available: running on the CPU")
    return torch.device("cpu")
