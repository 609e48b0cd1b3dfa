"""Small shared pieces: errors, seeding, devices, safe checkpoint I/O, logging."""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from seqmatchnet.common.errors import UserError

# ---------------------------------------------------------------- checkpoints

def atomic_write(path: Path, write) -> None:
    """Write ``path`` through ``write(file_object)`` into a temporary file in the same folder,
    fsync, then rename over the target: readers see the old or the new file, never half of one. A
    failed write (disk full, folder not writable) raises ``UserError`` and leaves the old file as it
    was."""
    path = Path(path)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        umask = os.umask(0)
        os.umask(umask)
        # mkstemp makes 0600; results should be readable like any other file
        os.chmod(tmp, 0o666 & ~umask)
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        if isinstance(exc, OSError):
            raise UserError(f"cannot write {path} ({exc.strerror or exc}): free disk space or "
                            "choose a writable folder (an existing file there is left "
                            "unchanged)") from exc
        raise


def ensure_output_dir(path: Path, option: str) -> Path:
    """Create the output folder named by ``option`` (e.g. ``--resultsPath``), or say why it cannot
    be."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"cannot create {option} {path} ({exc.strerror or exc}): choose a writable "
                        "folder") from exc
    if not os.access(path, os.W_OK | os.X_OK):
        raise UserError(f"{option} {path} is not writable: choose a writable folder")
    return path


def write_json_atomic(obj: Any, path: Path) -> None:
    text = json.dumps(obj, indent=2, default=_json_default) + "\n"
    atomic_write(path, lambda f: f.write(text.encode()))


def _json_default(o: Any) -> Any:
    if isinstance(o, (np.integer, np.floating)):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def plain_floats(d: dict) -> dict:
    """``{N: np.float64}`` -> ``{N: float}`` so checkpoints load weights-only."""
    return {int(k): float(v) for k, v in d.items()}


def numpy_safe_globals() -> list:
    """NumPy types that checkpoints may hold (reference checkpoints store recalls as NumPy scalars):
    allow-listed for weights-only unpickling (``torch.serialization.safe_globals``)."""
    core = getattr(np, "_core", None) or np.core
    return [core.multiarray.scalar, core.multiarray._reconstruct, np.dtype, np.ndarray,
            *(type(np.dtype(t)) for t in ("float64", "float32", "int64", "int32", "bool")),
            np.float64, np.float32, np.int64, np.int32]
