"""Quick checks of behaviour that the end-to-end tests cover only slowly: each rank's part of a
distributed training batch, ``--ckpt best`` and ``latest``, and the confidence radius of the
online matcher at its boundary."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from conftest import unit_rows
from seqmatchnet.data.windows import Split, segment_bounds

# ---------------------------------------------------------------- one batch split over ranks

def small_training_set(seq_len: int = 3):
    from seqmatchnet.training.mining import TrainingSet

    rng = np.random.default_rng(2)
    n_db, n_q, dim = 60, 55, 6
    db_pos = np.stack([np.arange(n_db, dtype=float), np.zeros(n_db)], 1)
    q_pos = np.stack([np.arange(n_q) * 1.05 + 0.3, np.zeros(n_q)], 1)
    split = Split("train", unit_rows(rng, n_db, dim), unit_rows(rng, n_q, dim), db_pos, q_pos, 3.0, 4.0,
                  segment_bounds(n_db), segment_bounds(n_q))
    return TrainingSet.build(split, seq_len)


def mined_chunk(tset, counts: list[int]):
    """A mined chunk of ``len(counts)`` queries, query ``i`` with ``counts[i]`` negatives (-1 padded)."""
    from seqmatchnet.training.mining import N_NEG
    from seqmatchnet.training.steps import MinedChunk

    rng = np.random.default_rng(5)
    queries = tset.queries[:len(counts)]
    positive = np.array([tset.nontriv_pos[i][0] for i in queries])
    negatives = np.full((len(counts), N_NEG), -1, dtype=np.int64)
    for r, k in enumerate(counts):
        negatives[r, :k] = rng.choice(len(tset.db_frames), k, replace=False)
    return MinedChunk(queries, positive, negatives, np.ones(len(counts), dtype=bool),
                      np.zeros((len(counts), 1), dtype=np.int64))


def gradient(model) -> torch.Tensor:
    return torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])


@pytest.mark.parametrize("world, sel", [(2, [4, 0, 6, 2, 5, 1, 3]), (3, [4, 0, 6, 2, 5, 1, 3]), (3, [5, 2])])
def test_ranks_parts_of_a_batch_average_to_the_loss_of_one_process(monkeypatch, world, sel):
    """Under torchrun each rank computes ``train.part_loss`` on its share of the batch and
    DistributedDataParallel averages the ranks' gradients: the average of the parts (values and
    gradients) is the loss of the whole batch in one process, also when the ranks' shares hold
    different numbers of valid triplets, and when a rank has no share at all (3 ranks, 2 queries)."""
    from seqmatchnet.common import distributed
    from seqmatchnet.models.sequence import SeqMatchModel
    from seqmatchnet.training.steps import TrainConfig, batch_loss, part_loss

    tset = small_training_set()
    mined = mined_chunk(tset, [3, 10, 1, 6, 2, 8, 5])
    sel = np.array(sel)
    config = TrainConfig(seq_len=3, margin=0.5, loss_distance="meanOfPairs")
    torch.manual_seed(0)
    model = SeqMatchModel(6, True, 5)
    cpu = torch.device("cpu")

    whole = batch_loss(model, tset, mined.triplets(sel), config.loss, cpu)
    whole.backward()
    want_grad = gradient(model)

    monkeypatch.setattr(distributed, "world_size", lambda: world)
    total, grads = 0.0, []
    for r in range(world):
        monkeypatch.setattr(distributed, "rank", lambda r=r: r)
        model.zero_grad(set_to_none=True)
        part = part_loss(model, None, tset, mined, sel, config, cpu)
        part.backward()
        total += part.item()
        grads.append(gradient(model))
    shares = [(mined.negatives[sel[s]] >= 0).sum() for s in
              (slice(b, e) for b, e in zip(distributed.shard_bounds(len(sel), world),
                                           distributed.shard_bounds(len(sel), world)[1:]))]
    assert len(set(int(s) for s in shares)) > 1            # the ranks hold different numbers of triplets
    assert total / world == pytest.approx(whole.item(), rel=1e-5)
    torch.testing.assert_close(sum(grads) / world, want_grad, rtol=1e-4, atol=1e-7)


# ---------------------------------------------------------------- --ckpt best | latest

def test_ckpt_best_and_latest_open_the_best_and_the_last_checkpoint(tmp_path):
    """A run folder as training leaves it (epoch 1 the best, epoch 2 the last): ``--ckpt best``
    opens ``model_best.pth.tar`` (epoch 1), ``--ckpt latest`` ``checkpoint.pth.tar`` (epoch 2)."""
    from seqmatchnet.cli.options import parse_options
    from seqmatchnet.runs import checkpoints, folders, loading

    run = tmp_path / "Jan01_00-00-00_l3_x"
    train_opt = parse_options(["--mode", "train", "--pooling", "--seqL", "3", "--outDims", "8",
                               "--runsPath", str(tmp_path)])
    ckpt_dir = run / train_opt.savePath
    ckpt_dir.mkdir(parents=True)
    folders.write_flags(train_opt, ckpt_dir)
    for epoch in (1, 2):
        state = {"epoch": epoch, "state_dict": {"pool.1.conv.weight": torch.full((8, 4, 1), float(epoch))}}
        checkpoints.save_checkpoint_atomic(state, ckpt_dir / "checkpoint.pth.tar")
        if epoch == 1:
            folders.copy_as_best(ckpt_dir)
    assert {p.name for p in ckpt_dir.iterdir()} >= {"checkpoint.pth.tar", "model_best.pth.tar", "flags.json"}
    for which, epoch, name in (("best", 1, "model_best.pth.tar"), ("latest", 2, "checkpoint.pth.tar")):
        opt = parse_options(["--mode", "test", "--seqL", "3", "--resume", str(run), "--ckpt", which])
        _, run_dir, path, ckpt = loading.open_run(opt)
        assert (run_dir, path.name, ckpt["epoch"]) == (run, name, epoch), which
        assert float(ckpt["state_dict"]["pool.1.conv.weight"][0, 0, 0]) == epoch


# ---------------------------------------------------------------- the confidence radius

def near_and_far_database():
    """Eight orthogonal database frames and a query frame nearest frame 3, next nearest frame 5
    (two frames on), equally far from all the others."""
    eye = np.eye(8, dtype=np.float32)
    q = eye[3] + 0.6 * eye[5]
    d3, d5, d_other = (math.sqrt(2 - 2 * c) for c in (1 / math.sqrt(1.36), 0.6 / math.sqrt(1.36), 0.0))
    return eye, q, d3, d5, d_other


@pytest.mark.parametrize("units", ["positions", "frames"])
def test_confidence_radius_includes_a_window_exactly_at_the_radius(units):
    """The confidence is the best distance over the best one of the windows farther than the radius:
    a window ending exactly at the radius (frame 5, two frames from the best) is near and not
    compared; with a radius just below its distance it is compared."""
    from seqmatchnet.online.localizer import Localizer

    db, q, d3, d5, d_other = near_and_far_database()
    spacing = 2.0 if units == "positions" else 1.0
    positions = np.stack([np.arange(8) * spacing, np.zeros(8)], 1) if units == "positions" else None
    for radius, alternative in ((2 * spacing, d_other), (2 * spacing - 0.01, d5), (2 * spacing + 0.5, d_other)):
        loc = Localizer(db, seq_len=1, positions=positions, conf_radius=radius)
        m = loc.step(q)
        assert m.db_frame == 3 and m.distance == pytest.approx(d3, abs=1e-6)
        assert m.confidence == pytest.approx(d3 / alternative, abs=1e-5), (units, radius)
