"""Small shared pieces: errors, seeding, devices, safe checkpoint I/O, logging."""
from __future__ import annotations

import json
import logging
import os
import random
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

log = logging.getLogger(__name__)


class UserError(Exception):
    """A problem the user can fix; main() prints it as one line, without a traceback."""


# ---------------------------------------------------------------- seeding and devices

def make_deterministic(seed: int) -> None:
    """Seed Python, NumPy and torch (CPU and CUDA)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def get_device(nocuda: bool) -> torch.device:
    """``cuda`` unless ``--nocuda``; asking for CUDA without one is an error."""
    if nocuda:
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise UserError("CUDA is not available on this machine: add --nocuda to run on the CPU")
    return torch.device("cuda")


# ---------------------------------------------------------------- checkpoints

def _numpy_safe_globals() -> list:
    """NumPy types found in reference checkpoints (their recalls are NumPy scalars)."""
    names = []
    core = getattr(np, "_core", None) or np.core
    names.append(core.multiarray.scalar)
    names.append(np.dtype)
    names.extend(type(np.dtype(t)) for t in ("float64", "float32", "int64", "int32", "bool"))
    names.extend([np.float64, np.float32, np.int64, np.int32, np.ndarray, core.multiarray._reconstruct])
    return names


def load_checkpoint(path: Path) -> dict:
    """Load a checkpoint with weights-only unpickling (NumPy scalar types allow-listed) onto the CPU."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint {path} not found: check --resume (a run folder with checkpoints/) and --ckpt")
    try:
        with torch.serialization.safe_globals(_numpy_safe_globals()):
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many error types for bad files
        msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        if "Unsupported global" in str(exc) or "weights_only" in str(exc).lower():
            raise UserError(f"checkpoint {path} holds objects that would need arbitrary code to load; refusing "
                            f"it for safety ({msg})") from exc
        raise UserError(f"checkpoint {path} is corrupt or truncated ({msg}): use another checkpoint "
                        "(--ckpt latest|best) or retrain") from exc
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt:
        raise UserError(f"checkpoint {path} has no 'state_dict': it is not a SeqMatchNet checkpoint")
    return ckpt


def atomic_write(path: Path, write) -> None:
    """Write ``path`` through ``write(file_object)`` into a temporary file in
    the same folder, fsync, then rename over the target: readers see the old
    or the new file, never half of one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)   # mkstemp makes 0600; results should be readable like any other file
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_checkpoint_atomic(obj: dict, path: Path) -> None:
    atomic_write(path, lambda f: torch.save(obj, f))


def write_json_atomic(obj: Any, path: Path) -> None:
    atomic_write(path, lambda f: f.write((json.dumps(obj, indent=2, default=_json_default) + "\n").encode()))


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


# ---------------------------------------------------------------- logging

def setup_logging(log_file: Path | None = None, quiet: bool = False, debug: bool = False) -> None:
    """Console: INFO (WARNING with --quiet, DEBUG with --debug), short lines.
    File (optional): DEBUG with timestamps, including tracebacks."""
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
        h.close()
    root.setLevel(logging.DEBUG)
    console = logging.StreamHandler(sys.stdout)
    console.setLevel(logging.DEBUG if debug else logging.WARNING if quiet else logging.INFO)
    console.setFormatter(logging.Formatter("%(message)s"))
    root.addHandler(console)
    if log_file is not None:
        add_log_file(log_file)
    for noisy in ("matplotlib", "PIL", "h5py", "urllib3", "tensorboard", "faiss", "faiss.loader"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def add_log_file(log_file: Path) -> None:
    log_file = Path(log_file)
    log_file.parent.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(log_file)
    handler.setLevel(logging.DEBUG)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.getLogger().addHandler(handler)


def progress_enabled(quiet: bool = False) -> bool:
    """tqdm bars only on a terminal and without --quiet."""
    return not quiet and sys.stderr.isatty()


# ---------------------------------------------------------------- metrics

class MetricsWriter:
    """Scalars (and figures) to TensorBoard in the run folder, and to wandb with --wandb offline|online."""

    def __init__(self, run_dir: Path, opt) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.tb = SummaryWriter(log_dir=str(run_dir))
        self.wandb_run = None
        mode = getattr(opt, "wandb", "disabled")
        if mode != "disabled":
            self.wandb_run = start_wandb(mode, run_dir, opt)

    def scalar(self, tag: str, value: float, step: int) -> None:
        self.tb.add_scalar(tag, value, step)
        if self.wandb_run is not None:
            self.wandb_run.log({tag: value}, step=step)

    def figure(self, tag: str, fig, step: int) -> None:
        self.tb.add_figure(tag, fig, step, close=False)
        if self.wandb_run is not None:
            import wandb
            self.wandb_run.log({tag: wandb.Image(fig)}, step=step)

    def close(self) -> None:
        self.tb.close()
        if self.wandb_run is not None:
            self.wandb_run.finish()
            self.wandb_run = None


def start_wandb(mode: str, run_dir: Path, opt):
    try:
        import wandb
    except ImportError as exc:
        raise UserError(f"--wandb {mode} needs the wandb package: pip install wandb (or leave --wandb disabled)") from exc
    if mode == "online" and not (os.environ.get("WANDB_API_KEY") or _wandb_logged_in(wandb)):
        raise UserError("--wandb online needs a logged-in account (wandb login or WANDB_API_KEY); "
                        "use --wandb offline to log locally")
    return wandb.init(project="seqmatchnet", name=Path(run_dir).name, dir=str(run_dir), mode=mode,
                      config={k: (str(v) if isinstance(v, Path) else v) for k, v in vars(opt).items()})


def _wandb_logged_in(wandb) -> bool:
    try:
        return bool(wandb.api.api_key)
    except Exception:  # wandb internals vary between versions
        return False
