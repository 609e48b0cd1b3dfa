"""Run folders: creating one, its ``flags.json``, restoring options from it on ``--resume``,
checkpoint paths, saving and loading checkpoints, the resume command and stale temporary files.

A run folder is ``<runsPath>/<Mon><DD>_<HH-MM-SS>_l<seqL>[_<expName>]/`` with
``<savePath>/checkpoint.pth.tar``, ``model_best.pth.tar`` and ``flags.json`` (the reference's
layout, so released runs load unchanged).
"""
from __future__ import annotations

import argparse
import copy
import json
import logging
import math
import sys
from datetime import datetime
from pathlib import Path

from seqmatchnet.cli.options import OPTIMISERS, check_options
from seqmatchnet.common import distributed
from seqmatchnet.common.errors import UserError
from seqmatchnet.common.files import atomic_write, write_json_atomic
from seqmatchnet.models.sequence import METHODS

log = logging.getLogger(__name__)


# a sanity bound for outDims read from a flags.json (NetVLAD without PCA is 32768)
MAX_OUT_DIMS = 65536

# Restored from a run's flags.json on --resume (docs/training-and-testing.md), with their types.
RESTORED_FLAGS = {
    "lr": float, "lrStep": float, "lrGamma": float, "weightDecay": float, "momentum": float,
    "runsPath": str, "savePath": str, "optim": str, "margin": float, "seed": int, "patience": int,
    "outDims": int, "method": str, "w": int, "pooling": bool,
}
# What a run was trained on: --resume in --mode train refuses other values (refuse_other_data).
MODEL_FLAGS = ("outDims", "method", "w", "pooling", "matcher")     # what --init RUN takes from RUN
RUN_DATA = ("dataset", "seqL", "descType", "msls_trainCity", "msls_valCity", "oxfordHonestVal",
            "splitGaps")



# ---------------------------------------------------------------- folders and flags

def make_run_dir(opt: argparse.Namespace) -> Path:
    """``<runsPath>/<Mon><DD>_<HH-MM-SS>_l<seqL>_<expName>`` (``..._l<seqL>`` without --expName),
    created exclusively (a suffix is added when another run took the name in the same second). Under
    torchrun rank 0 creates it and every rank gets its path (or rank 0's error)."""
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
        raise UserError(f"cannot create --runsPath {runs} ({exc.strerror}): choose a writable "
                        "folder") from exc
    base = (f"{datetime.now().strftime('%b%d_%H-%M-%S')}_l{opt.seqL}"
            + (f"_{opt.expName}" if opt.expName else ""))
    for i in range(1000):
        run_dir = runs / (base if i == 0 else f"{base}_{i}")
        try:
            run_dir.mkdir()
            return run_dir
        except FileExistsError:
            continue
        except OSError as exc:
            raise UserError(f"cannot write to --runsPath {runs} ({exc.strerror}): choose a "
                            "writable folder") from exc
    raise UserError(f"could not find a free run folder name under {runs}")


def write_flags(opt: argparse.Namespace, ckpt_dir: Path) -> None:
    """``flags.json``: every option of the run (what ``--resume`` restores from); rank 0 only."""
    if not distributed.is_main():
        return
    write_json_atomic(options_dict(opt), Path(ckpt_dir) / "flags.json")


def remove_stale_temporaries(ckpt_dir: Path) -> None:
    """Temporary files left by a run killed while writing (``atomic_write`` names them
    ``.*.tmp``)."""
    if not distributed.is_main():
        return
    for stale in Path(ckpt_dir).glob(".*.tmp"):
        stale.unlink(missing_ok=True)


def copy_as_best(ckpt_dir: Path) -> None:
    """``model_best.pth.tar`` := the checkpoint just written (atomically); rank 0 only."""
    if not distributed.is_main():
        return
    ckpt_dir = Path(ckpt_dir)
    atomic_write(ckpt_dir / "model_best.pth.tar",
                 lambda f: f.write((ckpt_dir / "checkpoint.pth.tar").read_bytes()))


def read_flags(flags_file: Path, flag: str = "--resume") -> dict:
    """A run's flags.json as a dict (``flag`` names the option that pointed to the run)."""
    flags_file = Path(flags_file)
    if not flags_file.is_file():
        raise UserError(f"{flags_file} not found: {flag} must name a run folder written by "
                        "training")
    try:
        saved = json.loads(flags_file.read_text())
    # JSONDecodeError and UnicodeDecodeError are ValueErrors
    except (ValueError, RecursionError, OSError) as exc:
        raise UserError(f"{flags_file} is not valid JSON ({type(exc).__name__}: {exc!s:.80}): fix "
                        "it by hand (training writes it as a JSON object of options)") from exc
    if not isinstance(saved, dict):
        raise UserError(f"{flags_file} must hold a JSON object of options, not "
                        f"{type(saved).__name__}: fix it by hand")
    return saved


def _spelled(key: str, value) -> str:
    """An option as a command line gives it: ``--seqL 5``, ``--oxfordHonestVal`` or ``no
    --oxfordHonestVal``."""
    if isinstance(value, bool):
        return f"--{key}" if value else f"no --{key}"
    return f"--{key} {value}"


def refuse_other_data(opt: argparse.Namespace, saved: dict, run_dir: Path) -> None:
    """Training on must use the data and sequence length the run was trained with (``RUN_DATA``):
    otherwise one run folder, its flags.json and its best checkpoint would mix results."""
    differ = [(k, saved[k], getattr(opt, k)) for k in RUN_DATA
              if saved.get(k) is not None and hasattr(opt, k) and saved[k] != getattr(opt, k)]
    if differ:
        given = ", ".join(f"{_spelled(k, was)} (this command: "
                          f"{_spelled(k, now)})" for k, was, now in differ)
        raise UserError(f"{run_dir} was trained with {given}: give the run's values to continue "
                        f"it, or start a new run from its weights with --init {run_dir} (e.g. to "
                        "fine-tune on another dataset)")


def note_other_seq_len(opt: argparse.Namespace, saved: dict, run_dir: Path) -> None:
    """Evaluating a run at another sequence length is legitimate; say so, since its numbers
    differ."""
    trained = saved.get("seqL")
    if isinstance(trained, int) and trained != opt.seqL:
        log.warning("note: %s was trained with --seqL %d; it is evaluated here with --seqL %d",
                    run_dir.name, trained, opt.seqL)


def restore_flags(opt: argparse.Namespace, flags_file: Path,
                  saved: dict | None = None) -> argparse.Namespace:
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
        if (not ok or (isinstance(value, bool) and kind is not bool)
                or (kind is float and not math.isfinite(value))):
            expected = "a finite number" if kind is float else kind.__name__
            raise UserError(f"{flags_file}: option {key} should be {expected}"
                            f", got {value!r:.60}: fix it in the file")
        setattr(out, key, kind(value))
    save = Path(out.savePath)
    if out.savePath != opt.savePath and (save.is_absolute() or ".." in save.parts):
        raise UserError(f"{flags_file}: option savePath {out.savePath!r} points outside the run "
                        "folder: fix it in the file")
    if out.outDims is not None and not 1 <= out.outDims <= MAX_OUT_DIMS:
        raise UserError(f"{flags_file}: option outDims must be between 1 and {MAX_OUT_DIMS}, got "
                        f"{out.outDims}: fix it in the file")
    if out.method not in METHODS:
        raise UserError(f"{flags_file}: unknown method {out.method!r}")
    if out.optim not in OPTIMISERS:
        raise UserError(f"{flags_file}: optim must be SGD or ADAM, got {out.optim!r}")
    try:
        check_options(out)
    except UserError as exc:
        raise UserError(f"{exc} (restored from {flags_file}: the run was trained with --method "
                        f"{out.method}{' --pooling' if out.pooling else ''}; change the command, "
                        "not the run)") from exc
    if not (out.pooling or out.method == "seqnet"):
        raise UserError(f"{flags_file.parent.parent} holds no learned model (trained without "
                        "--pooling): evaluate the raw descriptors without --resume")
    changed = {k: (getattr(opt, k), getattr(out, k)) for k in RESTORED_FLAGS
               if getattr(opt, k) != getattr(out, k)}
    if changed:
        log.info("restored from %s: %s", flags_file,
                 ", ".join(f"{k}={v[1]}" for k, v in changed.items()))
    return out


def options_dict(opt: argparse.Namespace) -> dict:
    return {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(opt).items()}



def nothing_to_do(run_dir: Path, ckpt: dict, n_epochs: int, patience: int,
                  eval_every: int) -> str | None:
    """Why resuming ``run_dir`` from ``ckpt`` would train nothing (it has its ``n_epochs``, or it
    stopped early by ``patience``), as the line to print; None when there is work left."""
    epoch, not_improved = int(ckpt["epoch"]), int(ckpt.get("not_improved", 0))
    if epoch >= n_epochs:
        return (f"{run_dir} has finished its {epoch} epochs: nothing to do (give --nEpochs above "
                f"{epoch} to train it further)")
    if patience > 0 and not_improved > patience / eval_every:
        return (f"{run_dir} stopped early after epoch {epoch} ({not_improved} validations without "
                f"improvement, --patience {patience}, restored from the run): nothing to do (to "
                f"train on, start a new run from its weights: --init {run_dir})")
    return None


def restore_epochs(opt: argparse.Namespace, run_dir: Path) -> argparse.Namespace:
    """``opt`` with the run's own ``--nEpochs`` (from its flags.json), for ``--resume RUN`` without
    ``--nEpochs`` on the command line: a resumed run finishes its own plan."""
    flags_file = Path(run_dir) / opt.savePath / "flags.json"
    planned = read_flags(flags_file).get("nEpochs")
    if isinstance(planned, bool) or not isinstance(planned, int) or planned < 1:
        raise UserError(f"{flags_file}: option nEpochs should be a positive integer, got "
                        f"{planned!r:.60}: fix it in the file, or give --nEpochs")
    out = copy.copy(opt)
    out.nEpochs = planned
    log.info("training to the run's own --nEpochs %d (give --nEpochs to change it)", planned)
    return out


def log_interrupted(ckpt_dir: Path, epoch: int, command: str, saved: int | None = None) -> None:
    """What Ctrl-C during training prints (a warning: shown with --quiet too, and in train.log):
    the epoch in progress, the last checkpoint and the epoch it holds (``saved``), how to go on."""
    last = Path(ckpt_dir) / "checkpoint.pth.tar"
    if not last.exists():
        where = "no checkpoint was written yet"
    else:
        where = f"the last checkpoint is {last}"
        where += f" (epoch {saved})" if saved is not None else ""
    log.warning("interrupted during epoch %d: %s; continue with: %s", epoch, where, command)


def main_script() -> str:
    """The path of ``main.py`` that works from the user's folder: the script that runs, or the
    repository's next to the package, as an absolute path (``main.py`` when neither is found)."""
    given = Path(sys.argv[0]) if sys.argv and sys.argv[0] else None
    if given is not None and given.name == "main.py" and given.is_file():
        return str(given.resolve())
    beside = Path(__file__).resolve().parents[2] / "main.py"
    return str(beside) if beside.is_file() else "main.py"


def resume_command(opt: argparse.Namespace, argv: list[str] | None, run_dir: Path) -> str:
    """The command that continues this run: the original arguments with ``--resume RUNDIR``."""
    import shlex

    if argv is None:
        argv = ["--mode", "train", "--seqL", str(opt.seqL), "--dataset", opt.dataset, "--dataPath",
                opt.dataPath, "--structPath", opt.structPath, "--nEpochs", str(opt.nEpochs)]
        argv += ["--pooling"] if opt.pooling else ["--method", opt.method]
    args, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a == "--resume":
            skip = True
        elif not a.startswith("--resume="):
            args.append(a)
    return (f"python {shlex.quote(main_script())} "
            + " ".join(shlex.quote(a) for a in args + ["--resume", str(run_dir)]))
