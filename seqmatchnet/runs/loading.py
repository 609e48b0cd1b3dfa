"""Loading a run for ``--mode test``, ``--mode localize`` or resuming: its options restored from
``flags.json``, the split, the model and its checkpoint (``load_run``).
"""
from __future__ import annotations

import argparse
import copy
import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from seqmatchnet.common.runtime import get_device
from seqmatchnet.data.specs import generate_if_synthetic, get_split
from seqmatchnet.data.windows import Split
from seqmatchnet.evaluation import summary
from seqmatchnet.models.sequence import SeqMatchModel, get_model, load_state
from seqmatchnet.runs.checkpoints import checkpoint_path, load_checkpoint
from seqmatchnet.runs.folders import (
    MODEL_FLAGS,
    note_other_seq_len,
    read_flags,
    refuse_other_data,
    restore_flags,
)

log = logging.getLogger(__name__)


def open_run(opt: argparse.Namespace) -> tuple[argparse.Namespace, Path, Path, dict]:
    """For ``--resume RUNDIR``: the options with those of the run's flags.json restored, the run
    folder, the checkpoint's path and the checkpoint (loaded to the CPU)."""
    run_dir = Path(opt.resume)
    flags_file = run_dir / opt.savePath / "flags.json"
    saved = read_flags(flags_file)
    if opt.mode == "train":
        refuse_other_data(opt, saved, run_dir)
    else:
        note_other_seq_len(opt, saved, run_dir)
    opt = restore_flags(opt, flags_file, saved)
    ckpt_file = checkpoint_path(run_dir, opt)
    return opt, run_dir, ckpt_file, load_checkpoint(ckpt_file)


def weights_from_run(opt: argparse.Namespace) -> tuple[argparse.Namespace, dict, str]:
    """``--init RUN``: the options with RUN's model options (``MODEL_FLAGS``) restored, RUN's
    checkpoint (``--ckpt``) and its path, to start a new run from its weights."""
    run_dir = Path(opt.init)
    saved = read_flags(run_dir / opt.savePath / "flags.json", "--init")
    out = copy.copy(opt)
    for key in MODEL_FLAGS:
        if saved.get(key) is not None:
            setattr(out, key, saved[key])
    ckpt_file = checkpoint_path(run_dir, out)
    return out, load_checkpoint(ckpt_file), str(ckpt_file)


# ---------------------------------------------------------------- loading a run (test, localize,
# resume)

@dataclass
class Loaded:
    """A model ready to use: the options (restored from its run with ``--resume``), the split,
    the model with its weights on ``device``, a label naming the method, checkpoint and
    initialisation, and the checkpoint (``info``: path, run, epoch, which; ``ckpt``: its
    contents)."""

    opt: argparse.Namespace
    split: Split
    model: SeqMatchModel
    device: torch.device
    label: str
    info: dict | None = None
    ckpt: dict | None = None


def build_model(opt: argparse.Namespace, dim: int, ckpt: dict | None,
                source: str = "") -> SeqMatchModel:
    """The model ``opt`` describes for ``dim``-D descriptors, with the weights of ``ckpt`` when
    given; a learned model without a checkpoint is randomly initialised, which is said once,
    here."""
    model = get_model(opt, dim)
    if ckpt is not None:
        load_state(model, ckpt["state_dict"], source)
        log.info("loaded %s (epoch %s)", source, ckpt.get("epoch"))
    elif model.learned and opt.mode != "train":
        log.warning("--%s without --resume uses a randomly initialised (untrained) model",
                    "pooling" if opt.pooling else f"method {opt.method}")
    return model


def load_run(opt: argparse.Namespace, lazy: bool = False) -> Loaded:
    """What ``opt`` names for evaluation or localisation: with ``--resume RUN`` the run's options
    and checkpoint (``--ckpt``), the split ``--split`` (its descriptors left in their files with
    ``lazy``) and the model on its device."""
    device = get_device(opt.nocuda, opt.device)
    ckpt = info = None
    if opt.resume:
        opt, run_dir, ckpt_path, ckpt = open_run(opt)
        info = {"path": str(ckpt_path), "run": run_dir.name, "epoch": int(ckpt["epoch"]),
                "which": opt.ckpt}
    generate_if_synthetic(opt)
    split = get_split(opt, opt.split, lazy=lazy)
    model = build_model(opt, split.dim, ckpt, info["path"] if info else "").to(device)
    label = summary.method_label(vars(opt), info)
    if info is None and model.learned:
        label += " (untrained: random initialisation)"
    return Loaded(opt, split, model, device, label, info, ckpt)
