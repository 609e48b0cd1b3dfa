"""The comparison methods (single, smooth, delta, seqnet) against plain implementations of their definitions."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from conftest import unit_rows
from seqmatchnet.models.sequence import SeqMatchModel


def plain_smooth(window: np.ndarray) -> np.ndarray:
    v = window.sum(axis=0) / len(window)
    return v / np.linalg.norm(v)


def plain_delta(window: np.ndarray) -> np.ndarray:
    seq_len = len(window)
    v = np.zeros(window.shape[1])
    for k in range(seq_len):
        v += (-2.0 / seq_len if k < seq_len // 2 else 2.0 / seq_len) * window[k]
    return v / np.linalg.norm(v)


def plain_seqnet(window: np.ndarray, weight: np.ndarray, bias: np.ndarray) -> np.ndarray:
    """Conv1d(D, out, kernel w) over time, mean over the L - w + 1 outputs, L2-normalised."""
    out_dims, _, w = weight.shape
    steps = []
    for t in range(len(window) - w + 1):
        y = bias.copy()
        for j in range(w):
            y += weight[:, :, j] @ window[t + j]
        steps.append(y)
    v = np.mean(steps, axis=0)
    return v / np.linalg.norm(v)


@pytest.mark.parametrize("seq_len", [2, 3, 5, 10])
@pytest.mark.parametrize("method", ["smooth", "delta"])
def test_fixed_weight_descriptors(seq_len, method):
    rng = np.random.default_rng(seq_len)
    windows = np.stack([unit_rows(rng, seq_len, 12) for _ in range(7)])
    model = SeqMatchModel(12, False, 12, method=method)
    got = model.describe(torch.from_numpy(windows)).numpy()
    plain = plain_smooth if method == "smooth" else plain_delta
    want = np.stack([plain(w.astype(np.float64)) for w in windows])
    assert got.shape == (7, 12)
    np.testing.assert_allclose(got, want, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)


@pytest.mark.parametrize("seq_len,w", [(5, 3), (5, 5), (10, 5), (4, 1)])
def test_seqnet_descriptor(seq_len, w):
    rng = np.random.default_rng(w)
    torch.manual_seed(0)
    model = SeqMatchModel(8, False, 6, method="seqnet", w=w)
    windows = np.stack([unit_rows(rng, seq_len, 8) for _ in range(5)])
    got = model.describe(torch.from_numpy(windows)).detach().numpy()
    conv = model.pool[0].conv
    want = np.stack([plain_seqnet(x.astype(np.float64), conv.weight.detach().double().numpy(),
                                  conv.bias.detach().double().numpy()) for x in windows])
    assert got.shape == (5, 6)
    np.testing.assert_allclose(got, want, atol=1e-5)
    assert set(model.state_dict()) == {"pool.0.conv.weight", "pool.0.conv.bias"}   # SeqNet's key layout


def test_smooth_with_projection_uses_projected_frames():
    torch.manual_seed(1)
    model = SeqMatchModel(8, True, 4, method="smooth")
    windows = torch.from_numpy(np.stack([unit_rows(np.random.default_rng(2), 3, 8)]))
    frames = model.encode(windows[0]).detach().numpy()
    np.testing.assert_allclose(model.describe(windows).detach().numpy()[0], plain_smooth(frames), atol=1e-5)


def run(args, cwd, monkeypatch, tmp_path=None):
    import main
    monkeypatch.chdir(cwd)
    return main.main(args + ["--nocuda", "--threads", "0", "--quiet"])


@pytest.mark.slow
@pytest.mark.parametrize("method", ["single", "smooth", "delta"])
def test_untrained_methods_evaluate(tiny_oxford, monkeypatch, tmp_path, method):
    seq_len = "1" if method == "single" else "4"
    args = ["--mode", "test", "--dataset", "oxford-v1.0", "--split", "test", "--seqL", seq_len, "--method", method,
            "--resultsPath", str(tmp_path / method)]
    assert run(args, tiny_oxford, monkeypatch) == 0
    res = np.load(tmp_path / method / "results.npz")
    assert res["preds"].shape[1] == 100 and 0 <= res["recalls"][0] <= 1
    if method == "single":
        check_single_against_plain_search(tiny_oxford, res)


def check_single_against_plain_search(root, res):
    """--method single: nearest neighbours of each query frame among the database frames by the Euclidean
    distance of the L2-normalised raw descriptors, one query at a time."""
    rows = np.arange(int(400 * 0.65), 400)                         # tiny_oxford's test split
    desc = root / "data" / "descData" / "netvlad-pytorch"
    db = np.load(desc / "oxford_2015-03-17-11-08-44_stereo_left.npy")[rows].astype(np.float64)
    q = np.load(desc / "oxford_2014-12-16-18-44-24_stereo_left.npy")[rows].astype(np.float64)
    db = [[v / math.sqrt(sum(u * u for u in x)) for v in x] for x in db.tolist()]
    q = [[v / math.sqrt(sum(u * u for u in x)) for v in x] for x in q.tolist()]
    preds, dists = res["preds"], res["dists"]
    for j in range(0, len(q), 5):
        d = []
        for i in range(len(db)):
            d.append(math.sqrt(sum((a - b) ** 2 for a, b in zip(db[i], q[j]))))
        order = sorted(range(len(db)), key=lambda i: (d[i], i))[:100]
        got = [d[int(i)] for i in preds[j]]
        # the same distances in the same order; the same frames where no two distances are within
        # float32 rounding of each other
        np.testing.assert_allclose(got, [d[i] for i in order], atol=1e-5)
        np.testing.assert_allclose(dists[j], got, atol=1e-4)
        gaps = np.diff([d[i] for i in order])
        for r in range(100):
            if (r == 0 or gaps[r - 1] > 1e-5) and (r == 99 or gaps[r] > 1e-5):
                assert preds[j, r] == order[r], (j, r)


@pytest.mark.slow
def test_seqnet_checkpoint_reloads_and_reproduces_recalls(tiny_oxford, monkeypatch, tmp_path):
    train = "--mode train --dataset oxford-v1.0 --seqL 4 --w 3 --method seqnet --outDims 8 --nEpochs 1".split()
    assert run(train, tiny_oxford, monkeypatch) == 0
    run_dir = next((tiny_oxford / "data" / "runs").iterdir())
    ckpt = torch.load(run_dir / "checkpoints" / "checkpoint.pth.tar", weights_only=True)
    assert ckpt["state_dict"]["pool.0.conv.weight"].shape == (8, 16, 3)
    test = ["--mode", "test", "--dataset", "oxford-v1.0", "--split", "val", "--seqL", "4", "--method", "seqnet",
            "--resume", str(run_dir), "--resultsPath", str(tmp_path / "r")]
    assert run(test, tiny_oxford, monkeypatch) == 0
    z = np.load(tmp_path / "r" / "results.npz")
    recalls = dict(zip(z["n_values"].tolist(), z["recalls"].tolist()))
    assert recalls == ckpt["recalls"]        # exactly the validation recalls saved at training time


@pytest.mark.slow
def test_hierarchical_rerank_of_seqnet_shortlist(tiny_oxford, monkeypatch, tmp_path):
    """HVPR: a sequence descriptor shortlists, sequence matching re-ranks the first 20."""
    short = ["--mode", "test", "--dataset", "oxford-v1.0", "--split", "test", "--seqL", "4", "--method", "delta",
             "--resultsPath", str(tmp_path / "short")]
    assert run(short, tiny_oxford, monkeypatch) == 0
    rerank = ["--mode", "test", "--dataset", "oxford-v1.0", "--split", "test", "--seqL", "4",
              "--predictionsFile", str(tmp_path / "short" / "results.npz"), "--resultsPath", str(tmp_path / "hvpr")]
    assert run(rerank, tiny_oxford, monkeypatch) == 0
    a = np.load(tmp_path / "short" / "results.npz")["preds"][:, :20]
    b = np.load(tmp_path / "hvpr" / "results.npz")["preds"]
    assert b.shape == a.shape and all(set(x) == set(y) for x, y in zip(a, b))
