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

def make_deterministic(seed: int, rank: int = 0) -> None:
    """Seed Python, NumPy and torch (CPU and CUDA) with ``seed``; a process of rank > 0 under
    torchrun with a seed derived from ``(seed, rank)``, so each rank has its own streams."""
    if rank:
        seed = int(np.random.SeedSequence([seed % 2**32, rank]).generate_state(1)[0])
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
    log.debug("CUDA is not available: running on the CPU")
    return torch.device("cpu")


# ---------------------------------------------------------------- checkpoints

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


def numpy_safe_globals() -> list:
    """NumPy types that checkpoints may hold (reference checkpoints store recalls as NumPy scalars):
    allow-listed for weights-only unpickling (``torch.serialization.safe_globals``)."""
    core = getattr(np, "_core", None) or np.core
    return [core.multiarray.scalar, core.multiarray._reconstruct, np.dtype, np.ndarray,
            *(type(np.dtype(t)) for t in ("float64", "float32", "int64", "int32", "bool")),
            np.float64, np.float32, np.int64, np.int32]


# ---------------------------------------------------------------- logging

def setup_logging(log_file: Path | None = None, quiet: bool = False, debug: bool = False) -> None:
    """Console: INFO (WARNING with --quiet, DEBUG with --debug), short lines.
    File (optional): DEBUG with timestamps, including tracebacks."""
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
        h.close()
    root.setLevel(logging.DEBUG)
    rank = _rank()
    if rank:    # under torchrun, ranks other than 0 show only warnings and errors, on stderr, marked
        console = logging.StreamHandler(sys.stderr)
        console.setLevel(logging.DEBUG if debug else logging.WARNING)
        console.setFormatter(logging.Formatter(f"[rank {rank}] %(message)s"))
    else:
        console = logging.StreamHandler(sys.stdout)
        console.setLevel(logging.DEBUG if debug else logging.WARNING if quiet else logging.INFO)
        console.setFormatter(logging.Formatter("%(message)s"))
    root.addHandler(console)
    if log_file is not None:
        add_log_file(log_file)
    for noisy in ("matplotlib", "PIL", "h5py", "urllib3", "tensorboard", "tensorboardX", "faiss", "faiss.loader"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def _rank() -> int:
    """This process's rank in an initialised process group (``distributed.py``), 0 otherwise."""
    dist = torch.distributed
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def add_log_file(log_file: Path) -> None:
    """Log to ``log_file`` too (rank 0 only under torchrun: one log per run)."""
    if _rank():
        return
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
    view them with ``tensorboard --logdir``), and to wandb with --wandb offline|online. Under torchrun
    only rank 0 writes; the writers of the other ranks do nothing."""

    def __init__(self, run_dir: Path, opt) -> None:
        self.tb = self.wandb_run = None
        if _rank():
            return
        from tensorboardX import SummaryWriter

        self.tb = SummaryWriter(log_dir=str(run_dir))
        mode = opt.wandb
        if mode != "disabled":
            self.wandb_run = start_wandb(mode, run_dir, opt)

    def scalar(self, tag: str, value: float, step: int) -> None:
        if self.tb is None:
            return
        self.tb.add_scalar(tag, value, step)
        if self.wandb_run is not None:
            self.wandb_run.log({tag: value}, step=step)

    def figure(self, tag: str, fig, step: int) -> None:
        if self.tb is None:
            return
        self.tb.add_figure(tag, fig, step, close=False)
        if self.wandb_run is not None:
            import wandb
            self.wandb_run.log({tag: wandb.Image(fig)}, step=step)

    def close(self) -> None:
        if self.tb is None:
            return
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
        raise UserError(f"--wandb {mode} needs the wandb package: pip install wandb (or leave --wandb "
                        "disabled)") from exc
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
