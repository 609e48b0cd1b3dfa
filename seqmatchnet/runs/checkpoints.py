"""Checkpoints: their paths, loading one weights-only, and writing one atomically."""
from __future__ import annotations

import argparse
import re
from pathlib import Path

import numpy as np
import torch

from seqmatchnet.common import distributed
from seqmatchnet.common.errors import UserError
from seqmatchnet.common.files import atomic_write, numpy_safe_globals

# ---------------------------------------------------------------- checkpoints

def checkpoint_path(run_dir: Path, opt: argparse.Namespace) -> Path:
    """``RUNDIR/<savePath>/checkpoint.pth.tar`` (``--ckpt latest``) or ``model_best.pth.tar``
    (``--ckpt best``)."""
    name = "model_best.pth.tar" if opt.ckpt == "best" else "checkpoint.pth.tar"
    return Path(run_dir) / opt.savePath / name


def load_checkpoint(path: Path) -> dict:
    """Load a checkpoint with weights-only unpickling (NumPy scalar types allow-listed) onto the
    CPU, and check its structure: ``state_dict`` (name -> tensor), ``epoch`` (int) and, when
    present, ``optimizer`` (an optimiser state dict)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint {path} not found: check --resume (a run folder with "
                        "checkpoints/) and --ckpt")
    try:
        with torch.serialization.safe_globals(numpy_safe_globals()):
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many error types for bad files
        text = str(exc)
        unsafe = re.search(r"(?:Unsupported global: GLOBAL|unsupported GLOBAL) (\S+)", text)
        if unsafe or "weights_only" in text.lower() or "Weights only load failed" in text:
            what = unsafe.group(1) if unsafe else "objects"
            raise UserError(f"checkpoint {path} holds {what}, which would need arbitrary code to "
                            "load; refusing it for safety: use a checkpoint written by "
                            "SeqMatchNet training") from exc
        msg = text.splitlines()[0] if text else type(exc).__name__
        raise UserError(f"checkpoint {path} is corrupt or truncated ({msg:.120}): use another "
                        "checkpoint (--ckpt latest|best) or retrain") from exc
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get("state_dict"), dict):
        raise UserError(f"checkpoint {path} has no 'state_dict': it is not a SeqMatchNet "
                        "checkpoint; check --resume")
    if not all(isinstance(k, str) and isinstance(v, torch.Tensor)
               for k, v in ckpt["state_dict"].items()):
        raise UserError(f"checkpoint {path}: 'state_dict' must map parameter names to tensors: it "
                        "is not a SeqMatchNet checkpoint; check --resume")
    epoch = ckpt.get("epoch")
    if isinstance(epoch, bool) or not isinstance(epoch, (int, np.integer)) or epoch < 0:
        raise UserError(f"checkpoint {path} has no valid 'epoch' (got {epoch!r:.40}): it is "
                        "damaged or not a SeqMatchNet checkpoint; use another checkpoint (--ckpt "
                        "latest|best)")
    optimizer = ckpt.get("optimizer")
    if optimizer is not None and not (
            isinstance(optimizer, dict) and isinstance(optimizer.get("state"), dict)
            and isinstance(optimizer.get("param_groups"), list)
            and all(isinstance(g, dict) and isinstance(g.get("params"), list)
                    for g in optimizer["param_groups"])):
        raise UserError(f"checkpoint {path} has a malformed 'optimizer' state: it is damaged; use "
                        "another checkpoint (--ckpt latest|best)")
    return ckpt


def save_checkpoint_atomic(obj: dict, path: Path) -> None:
    """``torch.save`` through ``atomic_write``; under torchrun rank 0 only."""
    if not distributed.is_main():
        return

    def write(f) -> None:
        try:
            torch.save(obj, f)
        except RuntimeError as exc:  # torch reports a failed write (e.g. disk full) as RuntimeError
            cause = exc.__context__
            if isinstance(cause, OSError):
                raise OSError(cause.errno, cause.strerror or str(cause)) from exc
            raise

    atomic_write(path, write)
