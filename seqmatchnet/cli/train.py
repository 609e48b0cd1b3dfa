"""``--mode train``: options to a run folder (new, resumed or started from another run's weights),
then ``training/epochs.py``'s loop.
"""
from __future__ import annotations

import argparse
import logging
from pathlib import Path

import torch

from seqmatchnet.cli.options import build_parser
from seqmatchnet.cli.shared import run_with_options
from seqmatchnet.common import distributed
from seqmatchnet.common.errors import UserError
from seqmatchnet.common.files import write_json_atomic
from seqmatchnet.common.logs import add_log_file
from seqmatchnet.common.runtime import get_device, make_deterministic
from seqmatchnet.data.specs import generate_if_synthetic, get_split
from seqmatchnet.data.windows import Split
from seqmatchnet.evaluation import summary as summary_mod
from seqmatchnet.models.sequence import SeqMatchModel, get_model, load_state, parallelize
from seqmatchnet.runs import folders, loading
from seqmatchnet.runs.checkpoints import load_checkpoint
from seqmatchnet.runs.tracking import MetricsWriter, check_wandb
from seqmatchnet.training.epochs import Run, TrainState, run_epochs, say
from seqmatchnet.training.mining import (
    TrainingSet,
)
from seqmatchnet.training.steps import INITS, TrainConfig, data_parallel

log = logging.getLogger(__name__)


# ---------------------------------------------------------------- the run

def make_optimizer(opt: argparse.Namespace, model: SeqMatchModel):
    params = [p for p in model.parameters() if p.requires_grad]
    if opt.optim == "SGD":
        optimizer = torch.optim.SGD(params, lr=opt.lr, momentum=opt.momentum,
                                    weight_decay=opt.weightDecay)
        # --lrStep as given, as the reference: a step of 2.5 decays after epochs 5, 10, ...
        scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=opt.lrStep,
                                                    gamma=opt.lrGamma)
    else:
        optimizer = torch.optim.Adam(params, lr=opt.lr)
        scheduler = None
    return optimizer, scheduler


def open_run_folder(opt: argparse.Namespace, tset: TrainingSet, model: SeqMatchModel, optimizer,
                    scheduler,
                    resumed: tuple | None, device: torch.device) -> tuple[TrainState, Path]:
    """A new run folder, or the resumed one with the model, optimiser and loop state restored from
    ``resumed`` = ``(run_dir, ckpt_file, ckpt)``; then the log file and ``flags.json``."""
    if resumed is None:
        state, run_dir = TrainState.fresh(len(tset.q_frames),
                                          opt.start_epoch), folders.make_run_dir(opt)
    else:
        run_dir, ckpt_file, ckpt = resumed
        state = TrainState.from_checkpoint(ckpt, str(ckpt_file), model, optimizer, scheduler,
                                           len(tset.q_frames))
        model.to(device)
        say(opt.quiet, f"resuming from {ckpt_file} (epoch {state.epoch}): training epochs "
                       f"{state.epoch + 1} to {opt.nEpochs}")
    ckpt_dir = run_dir / opt.savePath
    if distributed.is_main():
        ckpt_dir.mkdir(parents=True, exist_ok=True)
    add_log_file(run_dir / "train.log")
    folders.write_flags(argparse.Namespace(**{**vars(opt), "outDims": model.out_dims}), ckpt_dir)
    say(opt.quiet, f"run folder: {run_dir}")
    log.info("training set: %s", tset.summary())
    return state, run_dir


def saved_epoch(ckpt_dir: Path) -> int | None:
    """The epoch the last checkpoint holds (None without a readable one)."""
    try:
        return int(load_checkpoint(Path(ckpt_dir) / "checkpoint.pth.tar")["epoch"])
    except UserError:
        return None


def load_training_splits(opt: argparse.Namespace) -> tuple[Split, Split]:
    """The train and val splits; the synthetic benchmark is written by rank 0 alone, before the
    other ranks read it."""
    if distributed.is_main():
        generate_if_synthetic(opt)
    distributed.barrier("waiting for rank 0 to prepare the dataset")
    if not distributed.is_main():
        generate_if_synthetic(opt)
    return get_split(opt, "train"), get_split(opt, "val")


def given_options(argv: list[str]) -> set[str]:
    """The options ``argv`` gives (whatever their spelling: ``--nEpochs=8``, an abbreviation), by
    parsing it once more with every default suppressed."""
    parser = build_parser("train")
    for action in parser._actions:
        action.default = argparse.SUPPRESS
    return set(vars(parser.parse_known_args(list(argv))[0]))


def start_from(opt: argparse.Namespace, argv: list[str] | None = None) -> tuple:
    """``(opt, resumed, initial, finished)``: with ``--resume`` the options restored from the run's
    flags.json (they restore --pooling / --method before these are checked, and --nEpochs unless
    ``argv``, the command line, gives it) and ``resumed`` = ``[run_dir, ckpt_file, ckpt]``,
    ``finished`` its folder when it has nothing left to do; with ``--init RUN`` ``initial`` =
    ``[ckpt, source]``, that run's weights."""
    resumed, initial = None, None
    if opt.resume:
        opt, *resumed = loading.open_run(opt)
        if argv is not None and "nEpochs" not in given_options(argv):
            opt = folders.restore_epochs(opt, resumed[0])
        done = folders.nothing_to_do(resumed[0], resumed[2], opt.nEpochs, opt.patience,
                                     opt.evalEvery)
        if done:
            say(opt.quiet, done)
            return opt, resumed, initial, resumed[0]
        folders.remove_stale_temporaries(resumed[0] / opt.savePath)
    elif opt.init not in INITS:
        opt, *initial = loading.weights_from_run(opt)
    return opt, resumed, initial, None


def train(opt: argparse.Namespace, argv: list[str] | None = None) -> Path:
    """``--mode train``: build, resume, then per epoch train, validate, checkpoint and stop
    early; returns the run folder. ``argv`` only serves the resume hint printed on Ctrl-C."""
    if distributed.active() and opt.nGPU > 1:
        raise UserError("--nGPU (DataParallel) does not combine with torchrun: start one process "
                        "per GPU (torchrun --nproc_per_node N) and leave --nGPU at 1")
    device = get_device(opt.nocuda, opt.device)
    check_wandb(opt.wandb)
    opt, resumed, initial, finished = start_from(opt, argv)
    if finished is not None:
        return finished
    if not (opt.pooling or opt.method == "seqnet"):
        raise UserError("training learns the projection: add --pooling (or use --method seqnet)")
    make_deterministic(opt.seed, distributed.rank())
    train_split, val_split = load_training_splits(opt)
    tset = TrainingSet.build(train_split, opt.seqL)
    model = get_model(opt, train_split.dim).to(device)
    if initial:
        load_state(model, initial[0]["state_dict"], initial[1])
        log.info("starting from the weights of %s (epoch %s)", initial[1], initial[0]["epoch"])
    optimizer, scheduler = make_optimizer(opt, model)
    state, run_dir = open_run_folder(opt, tset, model, optimizer, scheduler, resumed, device)
    parallelize(model, opt.nGPU, device)
    run = Run(model, tset, val_split, optimizer, scheduler, state, run_dir, run_dir / opt.savePath,
              device, MetricsWriter(run_dir, opt), data_parallel(model, device))
    try:
        pr = run_epochs(TrainConfig.from_options(opt), run)
    except KeyboardInterrupt:
        if distributed.is_main():      # the epoch in progress: the one after the last saved
            saved = saved_epoch(run.ckpt_dir)
            folders.log_interrupted(run.ckpt_dir, (opt.start_epoch if saved is None else saved) + 1,
                                    folders.resume_command(opt, argv, run_dir), saved)
        raise
    finally:
        run.writer.close()
    say(opt.quiet,
        f"best validation Recall@5 {state.best_score:.4f} after {state.epoch} epochs; checkpoints "
        f"in {run.ckpt_dir}")
    # the last epoch may not be validated (--evalEvery)
    val_epoch, recalls = state.last_validation()
    summary = summary_mod.build_summary("train", folders.options_dict(opt), recalls, {}, pr,
                                        state.timings,
                                   train_split.files + val_split.files,
                                   extra={"best_recall@5": state.best_score, "epochs": state.epoch,
                                          "recalls_epoch": val_epoch,
                                          "run_dir": str(run_dir), "training_set": tset.summary()})
    if distributed.is_main():
        write_json_atomic(summary, run_dir / "summary.json")
    return run_dir


def main(argv: list[str]) -> int:
    """``--mode train`` entry (``argv`` without ``--mode``): the exit code."""
    return run_with_options("train", argv, lambda opt: train(opt, ["--mode", "train", *argv]))
