"""Small shared pieces: errors, seeding, devices, safe checkpoint I/O, logging."""
from __future__ import annotations

import json
import logging
import os
import random
import re
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


def get_device(nocuda: bool, device: str = "auto") -> torch.device:
    """The CPU with ``--nocuda`` or ``--device cpu``; CUDA with ``--device cuda`` (an error
    when there is none); by default (``auto``) CUDA when available, else the CPU."""
    if nocuda or device == "cpu":
        return torch.device("cpu")
    if torch.cuda.is_available():
        return torch.device("cuda")
    if device == "cuda":
        raise UserError("--device cuda was asked for but CUDA is not available on this machine: "
                        "use --nocuda (or --device cpu) to run on the CPU")
    log.info("CUDA is not available: running on the CPU (--nocuda says so explicitly)")
    return torch.device("cpu")


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
    """Load a checkpoint with weights-only unpickling (NumPy scalar types allow-listed) onto the CPU,
    and check its structure: ``state_dict`` (name -> tensor), ``epoch`` (int) and, when present,
    ``optimizer`` (an optimiser state dict)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint {path} not found: check --resume (a run folder with checkpoints/) and --ckpt")
    try:
        with torch.serialization.safe_globals(_numpy_safe_globals()):
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many error types for bad files
        text = str(exc)
        unsafe = re.search(r"(?:Unsupported global: GLOBAL|unsupported GLOBAL) (\S+)", text)
        if unsafe or "weights_only" in text.lower() or "Weights only load failed" in text:
            what = unsafe.group(1) if unsafe else "objects"
            raise UserError(f"checkpoint {path} holds {what}, which would need arbitrary code to load; refusing it "
                            "for safety: use a checkpoint written by SeqMatchNet training") from exc
        msg = text.splitlines()[0] if text else type(exc).__name__
        raise UserError(f"checkpoint {path} is corrupt or truncated ({msg:.120}): use another checkpoint "
                        "(--ckpt latest|best) or retrain") from exc
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get("state_dict"), dict):
        raise UserError(f"checkpoint {path} has no 'state_dict': it is not a SeqMatchNet checkpoint; check --resume")
    if not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in ckpt["state_dict"].items()):
        raise UserError(f"checkpoint {path}: 'state_dict' must map parameter names to tensors: it is not a "
                        "SeqMatchNet checkpoint; check --resume")
    epoch = ckpt.get("epoch")
    if isinstance(epoch, bool) or not isinstance(epoch, (int, np.integer)) or epoch < 0:
        raise UserError(f"checkpoint {path} has no valid 'epoch' (got {epoch!r:.40}): it is damaged or not a "
                        "SeqMatchNet checkpoint; use another checkpoint (--ckpt latest|best)")
    optimizer = ckpt.get("optimizer")
    if optimizer is not None and not (isinstance(optimizer, dict) and isinstance(optimizer.get("state"), dict)
                                      and isinstance(optimizer.get("param_groups"), list)
                                      and all(isinstance(g, dict) and isinstance(g.get("params"), list)
                                              for g in optimizer["param_groups"])):
        raise UserError(f"checkpoint {path} has a malformed 'optimizer' state: it is damaged; use another "
                        "checkpoint (--ckpt latest|best)")
    return ckpt


def atomic_write(path: Path, write) -> None:
    """Write ``path`` through ``write(file_object)`` into a temporary file in
    the same folder, fsync, then rename over the target: readers see the old
    or the new file, never half of one. A failed write (disk full, folder not
    writable) raises ``UserError`` and leaves the old file as it was."""
    path = Path(path)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)   # mkstemp makes 0600; results should be readable like any other file
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        if isinstance(exc, OSError):
            raise UserError(f"cannot write {path} ({exc.strerror or exc}): free disk space or choose a writable "
                            "folder (an existing file there is left unchanged)") from exc
        raise


def ensure_output_dir(path: Path, option: str) -> Path:
    """Create the output folder named by ``option`` (e.g. ``--resultsPath``), or say why it cannot be."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"cannot create {option} {path} ({exc.strerror or exc}): choose a writable folder") from exc
    if not os.access(path, os.W_OK | os.X_OK):
        raise UserError(f"{option} {path} is not writable: choose a writable folder")
    return path


def save_checkpoint_atomic(obj: dict, path: Path) -> None:
    def write(f) -> None:
        try:
            torch.save(obj, f)
        except RuntimeError as exc:     # torch reports a failed write (e.g. disk full) as RuntimeError
            cause = exc.__context__
            if isinstance(cause, OSError):
                raise OSError(cause.errno, cause.strerror or str(cause)) from exc
            raise

    atomic_write(path, write)


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
    for noisy in ("matplotlib", "PIL", "h5py", "urllib3", "tensorboard", "tensorboardX", "faiss", "faiss.loader"):
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
    """Scalars (and figures) to TensorBoard event files in the run folder (written with tensorboardX;
    view them with ``tensorboard --logdir``), and to wandb with --wandb offline|online."""

    def __init__(self, run_dir: Path, opt) -> None:
        from tensorboardX import SummaryWriter

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


def check_wandb(mode: str):
    """The wandb module when ``mode`` can work (checked before a run starts), else a UserError."""
    if mode == "disabled":
        return None
    try:
        import wandb
    except ImportError as exc:
        raise UserError(f"--wandb {mode} needs the wandb package: pip install wandb (or leave --wandb disabled)") from exc
    if mode == "online" and not (os.environ.get("WANDB_API_KEY") or _wandb_logged_in(wandb)):
        raise UserError("--wandb online needs a logged-in account (wandb login or WANDB_API_KEY); "
                        "use --wandb offline to log locally")
    return wandb


def start_wandb(mode: str, run_dir: Path, opt):
    wandb = check_wandb(mode)
    return wandb.init(project="seqmatchnet", name=Path(run_dir).name, dir=str(run_dir), mode=mode,
                      config={k: (str(v) if isinstance(v, Path) else v) for k, v in vars(opt).items()})


def _wandb_logged_in(wandb) -> bool:
    try:
        return bool(wandb.api.api_key)
    except Exception:  # wandb internals vary between versions
        return False
