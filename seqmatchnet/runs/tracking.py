"""TensorBoard (``tensorboardX``, always, offline) and Weights & Biases (optional) logging of a
training run.
"""
from __future__ import annotations

import os
from pathlib import Path

from seqmatchnet.common import distributed
from seqmatchnet.common.errors import UserError

# ---------------------------------------------------------------- metrics

class MetricsWriter:
    """Scalars (and figures) to TensorBoard event files in the run folder (written with
    tensorboardX; view them with ``tensorboard --logdir``), and to wandb with --wandb
    offline|online. Under torchrun only rank 0 writes; the writers of the other ranks do nothing."""

    def __init__(self, run_dir: Path, opt) -> None:
        self.tb = self.wandb_run = None
        if not distributed.is_main():
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
        raise UserError(f"--wandb {mode} needs the wandb package: pip install wandb (or leave "
                        "--wandb disabled)") from exc
    if mode == "online" and not (os.environ.get("WANDB_API_KEY") or _wandb_logged_in(wandb)):
        raise UserError("--wandb online needs a logged-in account (wandb login or WANDB_API_KEY); "
                        "use --wandb offline to log locally")
    return wandb


def start_wandb(mode: str, run_dir: Path, opt):
    wandb = check_wandb(mode)
    return wandb.init(project="seqmatchnet", name=Path(run_dir).name, dir=str(run_dir), mode=mode,
                      config={k: (str(v) if isinstance(v, Path) else v)
                              for k, v in vars(opt).items()})


def _wandb_logged_in(wandb) -> bool:
    try:
        return bool(wandb.api.api_key)
    except Exception:  # wandb internals vary between versions
        return False
