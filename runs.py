"""Run folders: creating one, its ``flags.json``, restoring options from it on ``--resume``,
checkpoint paths, saving and loading checkpoints, the resume command and stale temporary files.

A run folder is ``<runsPath>/<Mon><DD>_<HH-MM-SS>_l<seqL>[_<expName>]/`` with
``<savePath>/checkpoint.pth.tar``, ``model_best.pth.tar`` and ``flags.json``
(the reference's layout, so released runs load unchanged).
"""
from __future__ import annotations

import argparse
import copy
import json
import logging
import math
import re
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import numpy as np
import torch

import distributed
import report
from datasets import Split
from get_datasets import generate_if_synthetic, get_split
from get_models import METHODS, SeqMatchModel, get_model, load_state
from options import OPTIMISERS, check_options
from utils import UserError, atomic_write, get_device, numpy_safe_globals, write_json_atomic

log = logging.getLogger(__name__)

MAX_OUT_DIMS = 65536     # a sanity bound for outDims read from a flags.json (NetVLAD without PCA is 32768)

# Restored from a run's flags.json on --resume (docs/training-and-testing.md), with their types.
RESTORED_FLAGS = {
    "lr": float, "lrStep": float, "lrGamma": float, "weightDecay": float, "momentum": float,
    "runsPath": str, "savePath": str, "optim": str, "margin": float, "seed": int, "patience": int,
    "outDims": int, "method": str, "w": int, "pooling": bool,
}
# What a run was trained on: --resume in --mode train refuses other values (refuse_other_data).
MODEL_FLAGS = ("outDims", "method", "w", "pooling", "matcher")     # what --init RUN takes from RUN
RUN_DATA = ("dataset", "seqL", "descType", "msls_trainCity", "msls_valCity", "oxfordHonestVal")



# ---------------------------------------------------------------- folders and flags

def make_run_dir(opt: argparse.Namespace) -> Path:
    """``<runsPath>/<Mon><DD>_<HH-MM-SS>_l<seqL>_<expName>`` (``..._l<seqL>`` without --expName), created exclusively
    (a suffix is added when another run took the name in the same second). Under torchrun rank 0
    creates it and every rank gets its path (or rank 0's error)."""
    made, error = None, None
    if distributed.is_main():
        try:
            made = _make_run_dir(opt)
        except UserError as exc:
            if not distributed.active():
                raise
            error = str(exc)
    made, error = distributed.broadcast_object((made, error), what="sharing the run folder")
    if error is not None:
        raise UserError(error)
    return made


def _make_run_dir(opt: argparse.Namespace) -> Path:
    runs = Path(opt.runsPath)
    try:
        runs.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"cannot create --runsPath {runs} ({exc.strerror}): choose a writable folder") from exc
    base = f"{datetime.now().strftime('%b%d_%H-%M-%S')}_l{opt.seqL}" + (f"_{opt.expName}" if opt.expName else "")
    for i in range(1000):
        run_dir = runs / (base if i == 0 else f"{base}_{i}")
        try:
            run_dir.mkdir()
            return run_dir
        except FileExistsError:
            continue
        except OSError as exc:
            raise UserError(f"cannot write to --runsPath {runs} ({exc.strerror}): choose a writable folder") from exc
    raise UserError(f"could not find a free run folder name under {runs}")


def _main() -> bool:
    """True except in the ranks other than 0 of a torchrun job: only rank 0 writes run files."""
    return distributed.is_main()


def write_flags(opt: argparse.Namespace, ckpt_dir: Path) -> None:
    """``flags.json``: every option of the run (what ``--resume`` restores from); rank 0 only."""
    if not _main():
        return
    write_json_atomic(options_dict(opt), Path(ckpt_dir) / "flags.json")


def remove_stale_temporaries(ckpt_dir: Path) -> None:
    """Temporary files left by a run killed while writing (``atomic_write`` names them ``.*.tmp``)."""
    if not _main():
        return
    for stale in Path(ckpt_dir).glob(".*.tmp"):
        stale.unlink(missing_ok=True)


def copy_as_best(ckpt_dir: Path) -> None:
    """``model_best.pth.tar`` := the checkpoint just written (atomically); rank 0 only."""
    if not _main():
        return
    ckpt_dir = Path(ckpt_dir)
    atomic_write(ckpt_dir / "model_best.pth.tar", lambda f: f.write((ckpt_dir / "checkpoint.pth.tar").read_bytes()))


def read_flags(flags_file: Path, flag: str = "--resume") -> dict:
    """A run's flags.json as a dict (``flag`` names the option that pointed to the run)."""
    flags_file = Path(flags_file)
    if not flags_file.is_file():
        raise UserError(f"{flags_file} not found: {flag} must name a run folder written by training")
    try:
        saved = json.loads(flags_file.read_text())
    except (ValueError, RecursionError, OSError) as exc:   # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise UserError(f"{flags_file} is not valid JSON ({type(exc).__name__}: {exc!s:.80}): fix it by hand "
                        "(training writes it as a JSON object of options)") from exc
    if not isinstance(saved, dict):
        raise UserError(f"{flags_file} must hold a JSON object of options, not {type(saved).__name__}: fix it by hand")
    return saved


def _spelled(key: str, value) -> str:
    """An option as a command line gives it: ``--seqL 5``, ``--oxfordHonestVal`` or ``no --oxfordHonestVal``."""
    if isinstance(value, bool):
        return f"--{key}" if value else f"no --{key}"
    return f"--{key} {value}"


def refuse_other_data(opt: argparse.Namespace, saved: dict, run_dir: Path) -> None:
    """Training on must use the data and sequence length the run was trained with (``RUN_DATA``):
    otherwise one run folder, its flags.json and its best checkpoint would mix results."""
    differ = [(k, saved[k], getattr(opt, k)) for k in RUN_DATA
              if saved.get(k) is not None and hasattr(opt, k) and saved[k] != getattr(opt, k)]
    if differ:
        given = ", ".join(f"{_spelled(k, was)} (this command: {_spelled(k, now)})" for k, was, now in differ)
        raise UserError(f"{run_dir} was trained with {given}: give the run's values to continue it, or start a new "
                        f"run from its weights with --init {run_dir} (e.g. to fine-tune on another dataset)")


def note_other_seq_len(opt: argparse.Namespace, saved: dict, run_dir: Path) -> None:
    """Evaluating a run at another sequence length is legitimate; say so, since its numbers differ."""
    trained = saved.get("seqL")
    if isinstance(trained, int) and trained != opt.seqL:
        log.warning("note: %s was trained with --seqL %d; it is evaluated here with --seqL %d", run_dir.name,
                    trained, opt.seqL)


def restore_flags(opt: argparse.Namespace, flags_file: Path, saved: dict | None = None) -> argparse.Namespace:
    """A copy of ``opt`` with the options of ``RESTORED_FLAGS`` taken from a run's flags.json
    (``saved``: its contents, when already read)."""
    flags_file = Path(flags_file)
    if saved is None:
        saved = read_flags(flags_file)
    out = copy.copy(opt)
    for key, kind in RESTORED_FLAGS.items():
        if saved.get(key) is None:
            continue
        value = saved[key]
        ok = isinstance(value, kind) or (kind is float and isinstance(value, int))
        if not ok or (isinstance(value, bool) and kind is not bool) or (kind is float and not math.isfinite(value)):
            expected = "a finite number" if kind is float else kind.__name__
            raise UserError(f"{flags_file}: option {key} should be {expected}"
                            f", got {value!r:.60}: fix it in the file")
        setattr(out, key, kind(value))
    save = Path(out.savePath)
    if out.savePath != opt.savePath and (save.is_absolute() or ".." in save.parts):
        raise UserError(f"{flags_file}: option savePath {out.savePath!r} points outside the run folder: fix it in "
                        "the file")
    if out.outDims is not None and not 1 <= out.outDims <= MAX_OUT_DIMS:
        raise UserError(f"{flags_file}: option outDims must be between 1 and {MAX_OUT_DIMS}, got {out.outDims}: "
                        "fix it in the file")
    if out.method not in METHODS:
        raise UserError(f"{flags_file}: unknown method {out.method!r}")
    if out.optim not in OPTIMISERS:
        raise UserError(f"{flags_file}: optim must be SGD or ADAM, got {out.optim!r}")
    try:
        check_options(out)
    except UserError as exc:
        raise UserError(f"{exc} (restored from {flags_file}: the run was trained with --method {out.method}"
                        f"{' --pooling' if out.pooling else ''}; change the command, not the run)") from exc
    if not (out.pooling or out.method == "seqnet"):
        raise UserError(f"{flags_file.parent.parent} holds no learned model (trained without --pooling): evaluate "
                        "the raw descriptors without --resume")
    changed = {k: (getattr(opt, k), getattr(out, k)) for k in RESTORED_FLAGS if getattr(opt, k) != getattr(out, k)}
    if changed:
        log.info("restored from %s: %s", flags_file, ", ".join(f"{k}={v[1]}" for k, v in changed.items()))
    return out


def options_dict(opt: argparse.Namespace) -> dict:
    return {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(opt).items()}



# ---------------------------------------------------------------- checkpoints

def checkpoint_path(run_dir: Path, opt: argparse.Namespace) -> Path:
    """``RUNDIR/<savePath>/checkpoint.pth.tar`` (``--ckpt latest``) or ``model_best.pth.tar`` (``--ckpt best``)."""
    name = "model_best.pth.tar" if opt.ckpt == "best" else "checkpoint.pth.tar"
    return Path(run_dir) / opt.savePath / name


def open_run(opt: argparse.Namespace) -> tuple[argparse.Namespace, Path, Path, dict]:
    """For ``--resume RUNDIR``: the options with those of the run's flags.json restored,
    the run folder, the checkpoint's path and the checkpoint (loaded to the CPU)."""
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
    """``--init RUN``: the options with RUN's model options (``MODEL_FLAGS``) restored, RUN's checkpoint
    (``--ckpt``) and its path, to start a new run from its weights."""
    run_dir = Path(opt.init)
    saved = read_flags(run_dir / opt.savePath / "flags.json", "--init")
    out = copy.copy(opt)
    for key in MODEL_FLAGS:
        if saved.get(key) is not None:
            setattr(out, key, saved[key])
    ckpt_file = checkpoint_path(run_dir, out)
    return out, load_checkpoint(ckpt_file), str(ckpt_file)


# ---------------------------------------------------------------- loading a run (test, localize, resume)

@dataclass
class Loaded:
    """A model ready to use: the options (restored from its run with ``--resume``), the split,
    the model with its weights on ``device``, a label naming the method, checkpoint and
    initialisation, and the checkpoint (``info``: path, run, epoch, which; ``ckpt``: its contents)."""

    opt: argparse.Namespace
    split: Split
    model: SeqMatchModel
    device: torch.device
    label: str
    info: dict | None = None
    ckpt: dict | None = None


def build_model(opt: argparse.Namespace, dim: int, ckpt: dict | None, source: str = "") -> SeqMatchModel:
    """The model ``opt`` describes for ``dim``-D descriptors, with the weights of ``ckpt`` when given;
    a learned model without a checkpoint is randomly initialised, which is said once, here."""
    model = get_model(opt, dim)
    if ckpt is not None:
        load_state(model, ckpt["state_dict"], source)
        log.info("loaded %s (epoch %s)", source, ckpt.get("epoch"))
    elif model.learned and opt.mode != "train":
        log.warning("--%s without --resume uses a randomly initialised (untrained) model",
                    "pooling" if opt.pooling else f"method {opt.method}")
    return model


def load_run(opt: argparse.Namespace, lazy: bool = False) -> Loaded:
    """What ``opt`` names for evaluation or localisation: with ``--resume RUN`` the run's options and
    checkpoint (``--ckpt``), the split ``--split`` (its descriptors left in their files with ``lazy``)
    and the model on its device."""
    device = get_device(opt.nocuda, opt.device)
    ckpt = info = None
    if opt.resume:
        opt, run_dir, ckpt_path, ckpt = open_run(opt)
        info = {"path": str(ckpt_path), "run": run_dir.name, "epoch": int(ckpt["epoch"]), "which": opt.ckpt}
    generate_if_synthetic(opt)
    split = get_split(opt, opt.split, lazy=lazy)
    model = build_model(opt, split.dim, ckpt, info["path"] if info else "").to(device)
    label = report.method_label(vars(opt), info)
    if info is None and model.learned:
        label += " (untrained: random initialisation)"
    return Loaded(opt, split, model, device, label, info, ckpt)


def load_checkpoint(path: Path) -> dict:
    """Load a checkpoint with weights-only unpickling (NumPy scalar types allow-listed) onto the CPU,
    and check its structure: ``state_dict`` (name -> tensor), ``epoch`` (int) and, when present,
    ``optimizer`` (an optimiser state dict)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint {path} not found: check --resume (a run folder with checkpoints/) and --ckpt")
    try:
        with torch.serialization.safe_globals(numpy_safe_globals()):
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


def save_checkpoint_atomic(obj: dict, path: Path) -> None:
    """``torch.save`` through ``atomic_write``; under torchrun rank 0 only."""
    if not _main():
        return

    def write(f) -> None:
        try:
            torch.save(obj, f)
        except RuntimeError as exc:     # torch reports a failed write (e.g. disk full) as RuntimeError
            cause = exc.__context__
            if isinstance(cause, OSError):
                raise OSError(cause.errno, cause.strerror or str(cause)) from exc
            raise

    atomic_write(path, write)



def nothing_to_do(run_dir: Path, ckpt: dict, n_epochs: int, patience: int, eval_every: int) -> str | None:
    """Why resuming ``run_dir`` from ``ckpt`` would train nothing (it has its ``n_epochs``, or it stopped
    early by ``patience``), as the line to print; None when there is work left."""
    epoch, not_improved = int(ckpt["epoch"]), int(ckpt.get("not_improved", 0))
    if epoch >= n_epochs:
        return (f"{run_dir} has finished its {epoch} epochs: nothing to do (give --nEpochs above {epoch} to "
                "train it further)")
    if patience > 0 and not_improved > patience / eval_every:
        return (f"{run_dir} stopped early after epoch {epoch} ({not_improved} validations without improvement, "
                f"--patience {patience}, restored from the run): nothing to do (to train on, start a new run "
                f"from its weights: --init {run_dir})")
    return None


def log_interrupted(ckpt_dir: Path, epoch: int, command: str) -> None:
    """What Ctrl-C during training prints: where the last checkpoint is and how to continue."""
    last = Path(ckpt_dir) / "checkpoint.pth.tar"
    where = f"the last checkpoint is {last}" if last.exists() else "no checkpoint was written yet"
    log.warning("interrupted during epoch %d: %s; continue with: %s", epoch, where, command)


def resume_command(opt: argparse.Namespace, argv: list[str] | None, run_dir: Path) -> str:
    """The command that continues this run: the original arguments with ``--resume RUNDIR``."""
    import shlex

    if argv is None:
        argv = ["--mode", "train", "--seqL", str(opt.seqL), "--dataset", opt.dataset, "--dataPath", opt.dataPath,
                "--structPath", opt.structPath, "--nEpochs", str(opt.nEpochs)]
        argv += ["--pooling"] if opt.pooling else ["--method", opt.method]
    args, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a == "--resume":
            skip = True
        elif not a.startswith("--resume="):
            args.append(a)
    return "python main.py " + " ".join(shlex.quote(a) for a in args + ["--resume", str(run_dir)])
