"""Training pieces against plain loops from docs/how-it-works.md, and end-to-end runs."""
from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch

import plain
from conftest import REFERENCE, needs_reference, unit_rows
from seqmatchnet.data.windows import Split, segment_bounds
from seqmatchnet.models.sequence import SeqMatchModel
from seqmatchnet.training.mining import TrainingSet, cache_distances, mine, sample_negatives
from seqmatchnet.training.steps import LossSettings, Triplets, batch_loss


def tiny_split(n_db=60, n_q=55, dim=8, seed=0, pos_thr=3.0, non_triv_sq=4.0) -> Split:
    rng = np.random.default_rng(seed)
    db_pos = np.stack([np.arange(n_db, dtype=float), np.zeros(n_db)], 1)
    q_pos = np.stack([np.arange(n_q) * 1.05 + 0.3, np.zeros(n_q)], 1)
    return Split("train", unit_rows(rng, n_db, dim), unit_rows(rng, n_q, dim), db_pos, q_pos, pos_thr, non_triv_sq,
                 segment_bounds(n_db), segment_bounds(n_q))


@pytest.mark.parametrize("seq_len", [1, 2, 3, 5])
def test_training_set_matches_spec(seq_len):
    split = tiny_split()
    tset = TrainingSet.build(split, seq_len)
    db_valid = plain.plain_valid(split.db_bounds, seq_len)
    q_valid = plain.plain_valid(split.q_bounds, seq_len)
    np.testing.assert_array_equal(tset.db_frames, np.flatnonzero(db_valid))
    np.testing.assert_array_equal(tset.q_frames, np.flatnonzero(q_valid))
    positives = plain.plain_positives(split.db_positions[tset.db_frames], split.q_positions[tset.q_frames],
                                      np.sqrt(split.non_triv_pos_dist_sq_thr))
    for got, want in zip(tset.nontriv_pos, positives):
        np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(tset.queries, [i for i, p in enumerate(positives) if len(p)])


@needs_reference
def test_training_set_sizes_on_reference_fixture(monkeypatch):
    from seqmatchnet.cli.options import parse_options
    from seqmatchnet.data.specs import get_split

    monkeypatch.chdir(REFERENCE)
    opt = parse_options("--mode train --seqL 5 --pooling --dataset oxford-v1.0 --nocuda".split())
    tset = TrainingSet.build(get_split(opt, "train"), 5)
    assert tset.split.num_db + tset.split.num_q == 5912
    assert len(tset.q_frames) == 2927
    assert len(tset.queries) == 2885


@pytest.mark.parametrize("method", ["meanOfPairs", "centerOnly"])
@pytest.mark.parametrize("seq_len", [1, 2, 3, 5])
def test_cache_matrix_equals_plain(method, seq_len):
    split = tiny_split(seed=seq_len)
    tset = TrainingSet.build(split, seq_len)
    queries = tset.queries[::2]
    got = cache_distances(torch.from_numpy(split.db_desc), torch.from_numpy(split.q_desc), tset, queries,
                          method).numpy()
    db_w = plain.plain_windows(split.db_bounds, seq_len)[tset.db_frames]
    q_w = plain.plain_windows(split.q_bounds, seq_len)[tset.q_frames[queries]]
    want = plain.plain_cache_matrix(split.db_desc, split.q_desc, db_w, q_w, method)
    np.testing.assert_allclose(got, want, atol=2e-5)


def test_sample_negatives_are_potential_negatives_and_uniform():
    split = tiny_split(n_db=50, n_q=50)
    tset = TrainingSet.build(split, 1)
    queries = tset.queries[:5]
    sampled = sample_negatives(tset, queries, np.random.default_rng(0), n=4000)
    db_pos = split.db_positions[tset.db_frames]
    for row, qi in zip(sampled, queries):
        dist = np.linalg.norm(db_pos[row] - split.q_positions[tset.q_frames[qi]], axis=1)
        assert (dist > split.pos_dist_thr).all()
        allowed = np.flatnonzero(np.linalg.norm(db_pos - split.q_positions[tset.q_frames[qi]], axis=1)
                                 > split.pos_dist_thr)
        assert set(row) == set(allowed)                         # every potential negative can be drawn
        counts = np.bincount(row, minlength=len(db_pos))[allowed]
        assert counts.min() > 0.5 * counts.mean() and counts.max() < 1.6 * counts.mean()


@pytest.mark.parametrize("margin", [0.1, 0.01, 1.0])
def test_mining_equals_plain_per_query(margin):
    rng = np.random.default_rng(1)
    n_db, b = 300, 40
    dists = rng.uniform(0.2, 1.4, (n_db, b)).astype(np.float32)
    dists[:, 7] = 5.0                                     # a query with no hard negative: skipped
    nontriv = [np.sort(rng.choice(n_db, rng.integers(1, 6), replace=False)) for _ in range(b)]
    sampled = rng.integers(0, n_db, (b, 1000))
    cache = np.full((b, 10), -1)
    cache[: b // 2, :4] = rng.integers(0, n_db, (b // 2, 4))   # some queries have a negative cache
    dists[nontriv[7], 7] = 0.0
    cache[7] = -1
    sampled[7] = np.setdiff1d(np.arange(n_db), nontriv[7])[rng.integers(0, n_db - 10, 1000)]
    pos, negs, kept = mine(dists, nontriv, sampled, cache, margin)
    for i in range(b):
        want = plain.plain_mine_query(dists[:, i], nontriv[i], sampled[i], cache[i][cache[i] >= 0], margin)
        if want is None:
            assert not kept[i]
            continue
        assert kept[i]
        assert pos[i] == want[0]
        np.testing.assert_array_equal(negs[i][negs[i] >= 0], want[1])
    assert not kept[7]


@pytest.mark.parametrize("method", ["meanOfPairs", "centerOnly"])
@pytest.mark.parametrize("seq_len", [1, 2, 5])
def test_batch_loss_and_gradient_equal_plain(method, seq_len):
    split = tiny_split(dim=6, seed=2)
    tset = TrainingSet.build(split, seq_len)
    torch.manual_seed(0)
    model = SeqMatchModel(6, True, 5)
    rng = np.random.default_rng(3)
    q_idx = tset.queries[:4]
    pos = np.array([tset.nontriv_pos[i][0] for i in q_idx])
    negs = np.full((4, 10), -1)
    for r, k in enumerate([3, 10, 1, 6]):                       # different negative counts per query
        negs[r, :k] = rng.choice(len(tset.db_frames), k, replace=False)
    loss = batch_loss(model, tset, Triplets(q_idx, pos, negs), LossSettings(method, 0.5),
                      torch.device("cpu"))
    loss.backward()
    grad = model.pool[1].conv.weight.grad.clone()
    model.zero_grad()

    def frames(rows, desc):
        return model.encode(torch.from_numpy(desc[rows]))

    seq = np.arange(seq_len)
    q_seqs = [frames(tset.q_starts[i] + seq, split.q_desc) for i in q_idx]
    p_seqs = [frames(tset.db_starts[p] + seq, split.db_desc) for p in pos]
    n_seqs = [[frames(tset.db_starts[n] + seq, split.db_desc) for n in row[row >= 0]] for row in negs]
    want = plain.plain_triplet_loss(q_seqs, p_seqs, n_seqs, method, 0.5)
    want.backward()
    assert loss.item() == pytest.approx(want.item(), rel=1e-5, abs=1e-6)
    torch.testing.assert_close(grad, model.pool[1].conv.weight.grad, rtol=1e-4, atol=1e-6)


# ---------------------------------------------------------------- end to end

def run_main(args: list[str], cwd: Path, monkeypatch) -> int:
    import main
    monkeypatch.chdir(cwd)
    return main.main(args + ["--nocuda", "--threads", "0", "--quiet"])


def only_run(root: Path) -> Path:
    runs = sorted((root / "data" / "runs").iterdir())
    assert len(runs) == 1
    return runs[0]


TRAIN = "--mode train --pooling --dataset oxford-v1.0 --outDims 8 --cacheRefreshRate 100 --figures none".split()


@pytest.mark.parametrize("loss_m,neg_m", [pytest.param("meanOfPairs", "meanOfPairs", marks=pytest.mark.slow),
                                          ("meanOfPairs", "centerOnly"),
                                          ("centerOnly", "meanOfPairs"), ("centerOnly", "centerOnly")])
def test_all_method_combinations_train(tiny_oxford, monkeypatch, loss_m, neg_m):
    figures = "epoch" if loss_m == neg_m == "meanOfPairs" else "none"
    args = TRAIN + ["--seqL", "3", "--nEpochs", "1", "--loss_trip_method", loss_m, "--neg_trip_method", neg_m,
                    "--figures", figures]
    assert run_main(args, tiny_oxford, monkeypatch) == 0
    run = only_run(tiny_oxford)
    if figures == "epoch":
        names = {p.name for p in run.glob("*.png")}
        assert {"training_curves.png", "val_recall_at_n.png", "val_precision_recall.png",
                "val_distance_matrix.png", "val_radius_recall.png"} <= names
    summary = json.loads((run / "summary.json").read_text())
    assert summary["recalls"] and "auc" in json.dumps(summary).lower()
    ckpt = torch.load(run / "checkpoints" / "checkpoint.pth.tar", weights_only=True)
    assert ckpt["epoch"] == 1 and set(ckpt["recalls"]) == {1, 5, 10, 20, 100}
    flags = json.loads((run / "checkpoints" / "flags.json").read_text())
    assert flags["loss_trip_method"] == loss_m and flags["neg_trip_method"] == neg_m
    assert (run / "checkpoints" / "model_best.pth.tar").exists()
    assert list(run.glob("events.out.tfevents.*")) and (run / "train.log").exists()
    assert re.fullmatch(r"[A-Z][a-z]{2}\d{2}_\d{2}-\d{2}-\d{2}_l3", run.name)        # no --expName: no suffix


@pytest.mark.parametrize("extra", [["--seqL", "1", "--matcher", "None"], ["--seqL", "1"], ["--seqL", "2"]])
def test_single_frame_and_short_sequences_train(tiny_oxford, monkeypatch, extra):
    """Every batch loss is finite, and the weights moved away from their initial values."""
    from seqmatchnet.cli import train as train_mod
    from seqmatchnet.training import steps

    initial, batch_losses = {}, []
    real_get_model, real_step = train_mod.get_model, steps.step_batches

    def get_model(*args, **kwargs):
        model = real_get_model(*args, **kwargs)
        initial.update({k: v.detach().clone() for k, v in model.state_dict().items()})
        return model

    def step_batches(*args, **kwargs):
        losses = real_step(*args, **kwargs)
        batch_losses.extend(losses)
        return losses

    monkeypatch.setattr(train_mod, "get_model", get_model)
    monkeypatch.setattr(steps, "step_batches", step_batches)
    assert run_main(TRAIN + ["--nEpochs", "1"] + extra, tiny_oxford, monkeypatch) == 0
    run = only_run(tiny_oxford)
    assert batch_losses and np.isfinite(batch_losses).all() and max(batch_losses) > 0
    ckpt = torch.load(run / "checkpoints" / "checkpoint.pth.tar", weights_only=True)
    assert np.isfinite(ckpt["history"]["loss"]).all()
    assert set(ckpt["state_dict"]) == set(initial)
    assert all(torch.isfinite(v).all() for v in ckpt["state_dict"].values())
    weight = "pool.1.conv.weight"
    assert not torch.equal(ckpt["state_dict"][weight], initial[weight])
    assert (ckpt["state_dict"][weight] - initial[weight]).abs().max() > 1e-6


@pytest.mark.slow
@pytest.mark.parametrize("optim", ["SGD", "ADAM"])
def test_resume_continues_exactly(tiny_oxford, tmp_path, monkeypatch, optim):
    """2 epochs + resume 1 == 3 straight: weights bit for bit, recalls, negative cache (and Adam's moments)."""
    import shutil
    other = tmp_path / "other"
    shutil.copytree(tiny_oxford, other)
    extra = ["--lrStep", "1"] if optim == "SGD" else ["--lr", "0.01"]
    base = TRAIN + ["--seqL", "3", "--optim", optim, *extra]
    assert run_main(base + ["--nEpochs", "3"], tiny_oxford, monkeypatch) == 0
    straight = torch.load(only_run(tiny_oxford) / "checkpoints" / "checkpoint.pth.tar", weights_only=True)

    assert run_main(base + ["--nEpochs", "2"], other, monkeypatch) == 0
    run = only_run(other)
    first = torch.load(run / "checkpoints" / "checkpoint.pth.tar", weights_only=True)
    assert run_main(base + ["--nEpochs", "3", "--resume", str(run)], other, monkeypatch) == 0
    resumed = torch.load(run / "checkpoints" / "checkpoint.pth.tar", weights_only=True)
    assert json.loads((run / "checkpoints" / "flags.json").read_text())["optim"] == optim
    if optim == "ADAM":
        assert all("exp_avg" in s for s in first["optimizer"]["state"].values())     # Adam's moments are saved
    assert not torch.equal(first["state_dict"]["pool.1.conv.weight"], resumed["state_dict"]["pool.1.conv.weight"])
    assert resumed["epoch"] == straight["epoch"] == 3
    for key in straight["state_dict"]:
        torch.testing.assert_close(resumed["state_dict"][key], straight["state_dict"][key], rtol=0, atol=0)
    assert resumed["recalls"] == straight["recalls"]
    assert torch.equal(resumed["neg_cache"], straight["neg_cache"])
    assert all(np.isfinite(straight["history"]["loss"]))


@pytest.mark.slow
@needs_reference
def test_reference_fixture_three_epochs_within_seed_band(reference_copy, monkeypatch):
    """The reference over three epochs (seed 123): average loss 0.2998 / 0.2665 / 0.2337, validation
    R@1 0.2297 / 0.2665 / 0.2957, R@5 0.3598 / 0.3972 / 0.4156; seed 7 moved R@1 by about 0.06."""
    args = ("--mode train --seqL 5 --pooling --dataset oxford-v1.0 --loss_trip_method meanOfPairs "
            "--neg_trip_method meanOfPairs --outDims 64 --nEpochs 3").split()
    assert run_main(args, reference_copy, monkeypatch) == 0
    runs = [p for p in (reference_copy / "data" / "runs").iterdir() if p.name != "ref_oxford_l5_1epoch"]
    log = (runs[0] / "train.log").read_text()
    assert "5912 frames" in log and "2927 query windows" in log and "2885 training queries" in log
    losses = [float(x) for x in re.findall(r"epoch \d: average loss ([0-9.]+)", log)]
    history = torch.load(runs[0] / "checkpoints" / "checkpoint.pth.tar", weights_only=True)["history"]
    for got, want in zip(losses, (0.2998, 0.2665, 0.2337), strict=True):
        assert abs(got - want) < 0.02
    for n, want in ((1, (0.2297, 0.2665, 0.2957)), (5, (0.3598, 0.3972, 0.4156))):
        for got, ref in zip(history["val_recalls"][n], want, strict=True):
            assert abs(got - ref) < 0.06
    assert losses[0] > losses[1] > losses[2]
    assert history["val_recalls"][1][2] > history["val_recalls"][1][0]


@needs_reference
def test_oxford_honest_validation_is_disjoint_from_training(monkeypatch):
    from sklearn.neighbors import NearestNeighbors

    from seqmatchnet.cli.options import parse_options
    from seqmatchnet.data.specs import get_split

    monkeypatch.chdir(REFERENCE)
    opt = parse_options("--mode train --seqL 5 --pooling --dataset oxford-v1.0 --oxfordHonestVal --nocuda".split())
    train, val = get_split(opt, "train"), get_split(opt, "val")
    test = get_split(opt, "test")
    assert val.num_db > 200 and val.num_q > 200 and train.num_db > 2000
    nearest = NearestNeighbors(n_neighbors=1).fit(train.db_positions)
    assert nearest.kneighbors(val.q_positions)[0].min() > train.pos_dist_thr
    assert nearest.kneighbors(val.db_positions)[0].min() > train.pos_dist_thr
    assert val.pos_dist_thr == test.pos_dist_thr


# ---------------------------------------------------------------- refresh chunks, negative cache, few negatives

def test_refresh_chunks_are_consecutive_array_split_pieces(tiny_oxford, monkeypatch, refreshes):
    """Each cache refresh scores the training queries of one consecutive piece of the route's valid
    queries (the reference's np.array_split of all of them), and every training query appears in
    exactly one chunk."""
    seen = refreshes
    assert run_main(TRAIN + ["--seqL", "3", "--nEpochs", "1", "--cacheRefreshRate", "70"], tiny_oxford,
                    monkeypatch) == 0
    queries = seen[0][1]
    from seqmatchnet.data.windows import segment_bounds, sequence_windows

    n_valid = int(sequence_windows(segment_bounds(int(400 * 0.6)), 3)[1].sum())   # tiny_oxford's training route
    pieces = np.array_split(np.arange(n_valid), int(np.ceil(n_valid / 70)))
    want = [p[np.isin(p, queries)] for p in pieces]
    assert len(seen) == len(want) > 1
    for (got, _), expected in zip(seen, want):
        np.testing.assert_array_equal(got, expected)
    assert all(np.all(np.diff(got) > 0) for got, _ in seen)        # route order inside each chunk too


def test_refresh_chunks_helper_sizes():
    from seqmatchnet.training.steps import refresh_chunks

    q = np.arange(2885) * 2 + 1
    chunks = refresh_chunks(q, 1000)
    assert [len(c) for c in chunks] == [962, 962, 961]                  # np.array_split, not 1000/1000/885
    np.testing.assert_array_equal(np.concatenate(chunks), q)
    assert len(refresh_chunks(q, 0)) == 1


@pytest.mark.parametrize("neg_cache", ["on", "off"])
def test_negative_cache_on_and_off_train_and_resume(tiny_oxford, monkeypatch, neg_cache):
    base = TRAIN + ["--seqL", "3", "--negCache", neg_cache]
    assert run_main(base + ["--nEpochs", "1"], tiny_oxford, monkeypatch) == 0
    run = only_run(tiny_oxford)
    assert run_main(base + ["--nEpochs", "2", "--resume", str(run)], tiny_oxford, monkeypatch) == 0
    ckpt = torch.load(run / "checkpoints" / "checkpoint.pth.tar", weights_only=True)
    assert ckpt["epoch"] == 2
    assert ((ckpt["neg_cache"] >= 0).any()).item() == (neg_cache == "on")
    losses = [float(x) for x in re.findall(r"average loss ([0-9.naN]+)", (run / "train.log").read_text())]
    assert len(losses) == 2 and all(np.isfinite(losses))


def test_mining_without_cache_ignores_previous_negatives(tiny_oxford, monkeypatch):
    """--negCache off: the previous negatives are not offered to mine()."""

    from seqmatchnet.training import steps

    offered = []
    real = steps.mine

    def spy(dists, nontriv, sampled, neg_cache, margin, *a, **k):
        offered.append(np.asarray(neg_cache).copy())
        return real(dists, nontriv, sampled, neg_cache, margin, *a, **k)

    monkeypatch.setattr(steps, "mine", spy)
    assert run_main(TRAIN + ["--seqL", "3", "--nEpochs", "2", "--negCache", "off"], tiny_oxford, monkeypatch) == 0
    assert len(offered) > 2 and all((c == -1).all() for c in offered)


def test_queries_with_few_potential_negatives_train_quickly(tiny_oxford, monkeypatch):
    """Every training query has only 4 potential negatives: sampling draws from each query's own
    candidates instead of rejecting, so an epoch takes seconds."""
    import time

    from conftest import OX_PREFIX, write_struct

    n_train = int(400 * 0.6)
    far = 6                                         # the last 6 database frames are far away: 4 full windows
    db_pos = np.stack([np.r_[np.arange(n_train - far) * 0.05, 1000.0 + np.arange(far)], np.zeros(n_train)], 1)
    q_pos = np.stack([np.arange(n_train) * 0.05, np.zeros(n_train)], 1)
    write_struct(tiny_oxford / "structFiles" / f"{OX_PREFIX}_train_d-20_d2-5.db", "train", db_pos, q_pos, 20.0, 25.0)

    from seqmatchnet.cli.options import parse_options
    from seqmatchnet.data.specs import get_split
    monkeypatch.chdir(tiny_oxford)
    tset = TrainingSet.build(get_split(parse_options(TRAIN + ["--seqL", "5", "--nocuda"]), "train"), 5)
    n_neg = len(tset.db_frames) - np.array([len(c) for c in tset.close])[tset.queries]
    assert n_neg.max() < 5 and n_neg.min() > 0
    sampled = sample_negatives(tset, tset.queries, np.random.default_rng(1), n=1000)
    far_rows = np.flatnonzero(tset.split.db_positions[tset.db_frames][:, 0] >= 1000)
    assert set(np.unique(sampled)) == set(far_rows)

    started = time.perf_counter()
    assert run_main(TRAIN + ["--seqL", "5", "--nEpochs", "1", "--evalEvery", "5"], tiny_oxford, monkeypatch) == 0
    assert time.perf_counter() - started < 30


@pytest.mark.slow
@needs_reference
def test_reference_fixture_chunks_are_the_references(reference_copy, monkeypatch, refreshes):
    """On the Oxford fixture the refresh chunks are the reference's np.array_split of all 2927 valid
    queries (976/976/975), each keeping its queries with a positive, and the epoch counts 183 batches."""
    args = ("--mode train --seqL 5 --pooling --dataset oxford-v1.0 --outDims 64 --nEpochs 1 "
            "--figures none").split()
    assert run_main(args, reference_copy, monkeypatch) == 0
    queries = refreshes[0][1]
    pieces = np.array_split(np.arange(2927), 3)
    assert [len(p) for p in pieces] == [976, 976, 975] and len(queries) == 2885
    assert len(refreshes) == 3
    for (got, _), piece in zip(refreshes, pieces):
        np.testing.assert_array_equal(got, piece[np.isin(piece, queries)])
    runs = [p for p in (reference_copy / "data" / "runs").iterdir() if p.name != "ref_oxford_l5_1epoch"]
    assert "average loss" in (log := (runs[0] / "train.log").read_text()) and "over 183 batches" in log
