"""The loop over epochs: the state a checkpoint holds, validation, figures, patience and the
run's end.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from seqmatchnet.common import distributed
from seqmatchnet.common.errors import UserError
from seqmatchnet.common.files import plain_floats
from seqmatchnet.data.windows import Split
from seqmatchnet.evaluation import figures
from seqmatchnet.evaluation.evaluate import evaluate, format_recalls, top1_precision_recall
from seqmatchnet.evaluation.outputs import write_figures
from seqmatchnet.models.sequence import SeqMatchModel, load_state
from seqmatchnet.runs import checkpoints, folders
from seqmatchnet.runs.tracking import MetricsWriter
from seqmatchnet.training.mining import (
    N_NEG,
    TrainingSet,
)
from seqmatchnet.training.steps import EpochStats, Learner, TrainConfig, train_epoch

log = logging.getLogger(__name__)


@dataclass
class TrainState:
    """What training carries from epoch to epoch; a checkpoint holds all of it except
    ``last_val`` and ``timings``."""

    epoch: int
    neg_cache: np.ndarray                  # [len(q_frames), N_NEG] database positions, -1 = empty
    best_score: float = 0.0                # best validation Recall@5
    not_improved: int = 0                  # validations since the best one
    # the last epoch's validation recalls ({} when not run)
    recalls: dict = field(default_factory=dict)
    history: dict = field(default_factory=lambda: {"epochs": [], "loss": [], "val_epochs": [],
                                                   "val_recalls": {}})
    last_val: tuple | None = None          # (epoch, EvalResult) of the last validation
    timings: dict = field(default_factory=lambda: {"epochs_s": 0.0})

    @classmethod
    def fresh(cls, num_queries: int, start_epoch: int = 0) -> TrainState:
        return cls(start_epoch, np.full((num_queries, N_NEG), -1, dtype=np.int64))

    @classmethod
    def from_checkpoint(cls, ckpt: dict, source: str, model: SeqMatchModel, optimizer, scheduler,
                        num_queries: int) -> TrainState:
        """Restore the model, optimiser and scheduler from ``ckpt`` and return the loop state.
        Reference checkpoints carry no scheduler, cache or history: those start afresh."""
        load_state(model, ckpt["state_dict"], source)
        try:
            optimizer.load_state_dict(ckpt["optimizer"])
        except (KeyError, ValueError, TypeError) as exc:
            raise UserError(f"checkpoint {source}: its optimiser state is missing or does not fit "
                            f"this model ({type(exc).__name__}: {exc}); resume another checkpoint "
                            "(--ckpt latest|best) or start a new run") from exc
        state = cls.fresh(num_queries, int(ckpt["epoch"]))
        state.best_score = float(ckpt.get("best_score", 0.0))
        state.not_improved = int(ckpt.get("not_improved", 0))
        state.history = ckpt.get("history") or state.history
        if scheduler is not None:
            if ckpt.get("scheduler"):
                scheduler.load_state_dict(ckpt["scheduler"])
            else:   # one step per finished epoch
                scheduler.last_epoch = state.epoch
        cache = ckpt.get("neg_cache")
        if cache is not None and tuple(cache.shape) == state.neg_cache.shape:
            state.neg_cache = cache.numpy().copy()
        return state

    def to_checkpoint(self, model: SeqMatchModel, optimizer, scheduler) -> dict:
        """The reference's checkpoint keys plus what exact resumption needs; plain types only."""
        weights = {k.replace("pool.module.", "pool."): v.detach().cpu()
                   for k, v in model.state_dict().items()}
        return {"epoch": self.epoch, "state_dict": weights, "recalls": plain_floats(self.recalls),
                "best_score": float(self.best_score), "optimizer": optimizer.state_dict(),
                "parallel": False,
                "scheduler": scheduler.state_dict() if scheduler is not None else None,
                "not_improved": int(self.not_improved),
                "neg_cache": torch.from_numpy(self.neg_cache.copy()),
                "history": self.history}

    def last_validation(self) -> tuple[int | None, dict]:
        """``(epoch, {N: Recall@N})`` of the last validation in the history, this session's or a
        resumed run's (``(None, {})`` when there was none)."""
        epochs = self.history.get("val_epochs") or []
        if not epochs:
            return None, {}
        return int(epochs[-1]), {int(n): float(r[-1])
                                 for n, r in self.history["val_recalls"].items() if r}

    def record_epoch(self, epoch: int, stats: EpochStats, seconds: float) -> None:
        self.epoch = epoch
        self.history["epochs"].append(epoch)
        self.history["loss"].append(stats.avg_loss)
        self.timings["epochs_s"] += seconds
        for k, v in stats.timings.items():
            self.timings[k] = self.timings.get(k, 0.0) + v


def log_epoch(epoch: int, stats: EpochStats, writer) -> None:
    log.info("epoch %d: average loss %.4f over %d batches (%d triplet queries, %d skipped); train "
             "R@1 %.4f R@5 %.4f [%s]", epoch, stats.avg_loss, stats.batches, stats.triplet_queries,
             stats.skipped,
             stats.train_recalls[1], stats.train_recalls[5],
             ", ".join(f"{k} {v:.1f}" for k, v in stats.timings.items()))
    writer.scalar("Train/AvgLoss", stats.avg_loss, epoch)
    for n, r in stats.train_recalls.items():
        writer.scalar(f"Train/Recall@{n}", r, epoch)


def validate(config: TrainConfig, epoch: int, model: SeqMatchModel, val_split: Split,
             device: torch.device,
             state: TrainState, run_dir: Path, writer) -> bool:
    """Evaluate on the validation split, log and draw it, and update the best score (validation
    Recall@5, as the reference). Returns True when this epoch is the best so far."""
    result = evaluate(config.eval, val_split, model, device)
    state.recalls, state.last_val = result.recalls, (epoch, result)
    log.info(format_recalls(result, f"epoch {epoch} validation"))
    state.history["val_epochs"].append(epoch)
    for n, r in result.recalls.items():
        writer.scalar(f"Val/Recall@{n}", r, epoch)
        state.history["val_recalls"].setdefault(n, []).append(r)
    if config.figures == "epoch" and distributed.is_main():
        write_figures(result, val_split, config.seq_len, run_dir, f"epoch {epoch} validation",
                      "Val", writer, epoch)
    if result.recalls[5] > state.best_score:
        state.best_score, state.not_improved = result.recalls[5], 0
        return True
    state.not_improved += 1
    return False


def draw_training_curves(history: dict, run_dir: Path, writer, epoch: int) -> None:
    fig = figures.training_curves_figure(history["epochs"], history["loss"], history["val_recalls"],
                                       val_epochs=history["val_epochs"])
    writer.figure("Train/Curves", fig, epoch)
    figures.save_figure(fig, run_dir / "training_curves.png")


def final_precision_recall(config: TrainConfig, state: TrainState, val_split: Split, run_dir: Path,
                           writer) -> dict | None:
    """Precision-recall of the last validation (and, with ``--figures end``, its figures); under
    torchrun on rank 0 only (None elsewhere)."""
    if state.last_val is None or not distributed.is_main():
        return None
    epoch, result = state.last_val
    if config.figures == "end":
        draw_training_curves(state.history, run_dir, writer, state.epoch)
        return write_figures(result, val_split, config.seq_len, run_dir,
                             f"epoch {epoch} validation", "Val", writer,
                             epoch)
    return top1_precision_recall(result, val_split)


def say(quiet: bool, message: str) -> None:
    """A line the user needs even with ``--quiet`` (the run folder, the final result): logged (to
    the console and train.log), and printed when ``--quiet`` keeps the log off the console; rank 0
    only."""
    log.info(message)
    if quiet and distributed.is_main():
        print(message)


@dataclass
class Run:
    """The objects one training run works on."""

    model: SeqMatchModel
    tset: TrainingSet
    val_split: Split
    optimizer: torch.optim.Optimizer
    scheduler: object
    state: TrainState
    run_dir: Path
    ckpt_dir: Path
    device: torch.device
    writer: MetricsWriter
    ddp: object = None


def run_epochs(config: TrainConfig, run: Run) -> dict | None:
    """Train, validate, checkpoint and stop early, epoch after epoch; returns the precision-recall
    of the last validation (None when there was none, or on ranks other than 0)."""
    state, writer = run.state, run.writer
    for epoch in range(state.epoch + 1, config.n_epochs + 1):
        t0 = time.perf_counter()
        learner = Learner(run.model, run.optimizer, run.device, writer, run.ddp)
        stats = train_epoch(learner, run.tset, state.neg_cache, config, epoch)
        if run.scheduler is not None:
            run.scheduler.step()
        log_epoch(epoch, stats, writer)
        state.recalls, is_best = {}, False
        if epoch % config.eval_every == 0:
            is_best = validate(config, epoch, run.model, run.val_split, run.device, state,
                               run.run_dir, writer)
        state.record_epoch(epoch, stats, time.perf_counter() - t0)
        if config.figures == "epoch" and distributed.is_main():
            draw_training_curves(state.history, run.run_dir, writer, epoch)
        checkpoint = state.to_checkpoint(run.model, run.optimizer, run.scheduler)
        checkpoints.save_checkpoint_atomic(checkpoint, run.ckpt_dir / "checkpoint.pth.tar")
        if is_best:
            folders.copy_as_best(run.ckpt_dir)
        if config.patience > 0 and state.not_improved > config.patience / config.eval_every:
            log.info("no improvement for %d validations: stopping early", state.not_improved)
            break
    return final_precision_recall(config, state, run.val_split, run.run_dir, writer)
