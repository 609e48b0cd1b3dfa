"""Training as the reference counts it: refresh chunks cut from all valid queries, empty batch slots for
queries without a positive, the reference's batch count in the average loss, TensorBoard steps that never
repeat, and ``--lrStep`` passed to StepLR as given."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from seqmatchnet.cli import train
from seqmatchnet.data.windows import Split, segment_bounds
from seqmatchnet.models.sequence import SeqMatchModel
from seqmatchnet.training import steps
from seqmatchnet.training.mining import N_NEG, TrainingSet


class Steps:
    """A metrics writer that records the TensorBoard steps of the batch losses."""

    def __init__(self) -> None:
        self.loss_steps, self.losses = [], []

    def scalar(self, tag: str, value: float, step: int) -> None:
        if tag == "Train/Loss":
            self.loss_steps.append(step)
            self.losses.append(value)


def far_queries_split(n_db: int = 80, n_q: int = 70, far: int = 12) -> Split:
    """Queries along the database route, but the last ``far`` of them 1 km away (no positive)."""
    rng = np.random.default_rng(0)
    db = rng.standard_normal((n_db, 8)).astype(np.float32)
    q = db[np.minimum(np.arange(n_q), n_db - 1)] + 0.3 * rng.standard_normal((n_q, 8)).astype(np.float32)
    db_pos = np.stack([np.arange(n_db) * 2.0, np.zeros(n_db)], axis=1)
    q_pos = np.stack([np.arange(n_q) * 2.0 + 0.5, np.zeros(n_q)], axis=1)
    q_pos[-far:, 1] = 1000.0
    return Split(name="train", db_desc=db, q_desc=q, db_positions=db_pos, q_positions=q_pos, pos_dist_thr=5.0,
                 non_triv_pos_dist_sq_thr=9.0, db_bounds=segment_bounds(n_db), q_bounds=segment_bounds(n_q))


@pytest.mark.parametrize("rate", [20, 0])
def test_chunks_cut_all_valid_queries_and_steps_never_repeat(monkeypatch, rate):
    tset = TrainingSet.build(far_queries_split(), 3)
    n_valid = len(tset.q_frames)
    assert len(tset.queries) < n_valid                    # some valid queries have no positive
    chunks = []
    real = steps.model_cache_distances

    def spy(model, tset_, queries, config, device):
        chunks.append(np.asarray(queries).copy())
        return real(model, tset_, queries, config, device)

    monkeypatch.setattr(steps, "model_cache_distances", spy)
    torch.manual_seed(0)
    model = SeqMatchModel(8, True, 8)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    config = steps.TrainConfig(seq_len=3, batch_size=4, refresh_rate=rate, quiet=True)
    writers = []
    for epoch in (1, 2):
        writers.append(Steps())
        learner = steps.Learner(model, optimizer, torch.device("cpu"), writers[-1])
        stats = steps.train_epoch(learner, tset, np.full((n_valid, N_NEG), -1), config, epoch)
        assert stats.avg_loss == pytest.approx(sum(writers[-1].losses) / math.ceil(n_valid / 4))
    pieces = np.array_split(np.arange(n_valid), math.ceil(n_valid / rate) if rate else 1)
    want = [p[np.isin(p, tset.queries)] for p in pieces]
    for got, expected in zip(chunks, want * 2):
        np.testing.assert_array_equal(got, expected)
    per_epoch = sum(math.ceil(len(p) / 4) for p in pieces)
    for epoch, w in enumerate(writers, 1):
        assert len(set(w.loss_steps)) == len(w.loss_steps)
        assert min(w.loss_steps) > (epoch - 1) * per_epoch and max(w.loss_steps) <= epoch * per_epoch


def test_lr_step_is_passed_as_given():
    """--lrStep 2.5: StepLR decays after epochs 5 and 10 (the reference), not after 2 and 4 (truncated)."""
    from seqmatchnet.cli.options import parse_options

    opt = parse_options(["--mode", "train", "--seqL", "3", "--pooling", "--lrStep", "2.5", "--lr", "1.0",
                         "--lrGamma", "0.5"])
    model = SeqMatchModel(4, True, 4)
    optimizer, scheduler = train.make_optimizer(opt, model)
    lrs = []
    for _ in range(10):
        optimizer.step()
        scheduler.step()
        lrs.append(optimizer.param_groups[0]["lr"])
    assert lrs == [1.0] * 4 + [0.5] * 5 + [0.25]


def test_lr_step_must_be_positive():
    from seqmatchnet.cli.options import parse_options
    from seqmatchnet.common.errors import UserError

    with pytest.raises(UserError, match="--lrStep must be a positive"):
        parse_options(["--mode", "train", "--seqL", "3", "--pooling", "--lrStep", "0"])
