"""The projection as one matrix product: same values as the reference's convolutions, same checkpoints;
the cache refresh on the frames its windows cover; ``mining.stacked_rows`` against a plain loop."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from seqmatchnet.data.windows import Split, segment_bounds
from seqmatchnet.models import sequence
from seqmatchnet.models.sequence import SeqMatchModel, SeqNetConv, WXpB, load_state
from seqmatchnet.training import mining, steps


@pytest.mark.parametrize("n, c, out", [(1, 3, 2), (7, 16, 16), (64, 33, 5), (5, 8, 40)])
def test_wxpb_equals_conv1d_definition(n, c, out):
    torch.manual_seed(n + c + out)
    layer = WXpB(c, out)
    x = torch.randn(n, c, 1, 1)
    ref = nn.functional.conv1d(x.flatten(2), layer.conv.weight, layer.conv.bias).permute(0, 2, 1)
    got = layer(x)
    assert got.shape == (n, 1, out)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)


def test_wxpb_gradients_equal_conv1d():
    torch.manual_seed(0)
    layer = WXpB(12, 7)
    x = torch.randn(9, 12, 1, 1)
    g = torch.randn(9, 1, 7)
    (layer(x) * g).sum().backward()
    got = [p.grad.clone() for p in layer.parameters()]
    layer.zero_grad()
    (nn.functional.conv1d(x.flatten(2), layer.conv.weight, layer.conv.bias).permute(0, 2, 1) * g).sum().backward()
    for a, b in zip(got, [p.grad for p in layer.parameters()]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("seq_len, w", [(5, 5), (5, 3), (7, 1), (3, 2)])
def test_seqnet_equals_conv1d_definition(seq_len, w):
    torch.manual_seed(seq_len * 10 + w)
    layer = SeqNetConv(16, 6, w)
    x = torch.randn(4, seq_len, 16)
    ref = nn.functional.conv1d(x.permute(0, 2, 1), layer.conv.weight, layer.conv.bias).mean(dim=-1)
    torch.testing.assert_close(layer(x), ref, rtol=1e-5, atol=1e-5)


def test_encode_equals_conv1d_model():
    torch.manual_seed(1)
    model = SeqMatchModel(32, True, 24)
    frames = torch.randn(10, 32)
    conv = model.pool[1].conv
    ref = nn.functional.normalize(conv(frames[:, :, None])[:, :, 0], dim=-1)
    torch.testing.assert_close(model.encode(frames), ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("pooling", [False, True])
def test_encode_in_place_equals_normalize_and_spares_the_input(pooling):
    """Without gradients the normalisation divides in place: the values of ``nn.functional.normalize``
    bit for bit; raw frames are overwritten only with ``overwrite``; with gradients nothing is in place."""
    torch.manual_seed(3)
    model = SeqMatchModel(32, pooling, 24).eval()
    frames = torch.randn(50, 32) * 3
    keep = frames.clone()
    x = model.pool[1](frames[:, :, None, None]).reshape(50, -1) if pooling else frames
    want = nn.functional.normalize(x.detach(), dim=-1)
    with torch.no_grad():
        assert torch.equal(model.encode(frames), want) and torch.equal(frames, keep)
        assert torch.equal(model.encode(frames.clone(), overwrite=True), want)
        y = frames.clone()
        out = model.encode(y, overwrite=True)
        assert torch.equal(y, want if not pooling else keep) and torch.equal(out, want)
    if pooling:
        out = model.encode(frames)                        # gradients: out of place, differentiable
        out.sum().backward()
        assert model.pool[1].conv.weight.grad is not None and torch.equal(out.detach(), want)


@pytest.mark.parametrize("pooling", [False, True])
def test_extract_features_one_block_equals_blocks_and_spares_arrays(pooling, monkeypatch):
    from seqmatchnet.models.sequence import project_frames

    torch.manual_seed(4)
    model = SeqMatchModel(16, pooling, 8)
    desc = np.random.default_rng(4).standard_normal((300, 16)).astype(np.float32)
    keep = desc.copy()
    cpu = torch.device("cpu")
    with monkeypatch.context() as m:
        m.setattr(sequence, "FEATURE_BLOCK_BYTES", 1)              # blocks of batch_size = 7 rows
        blocks = project_frames(model, desc, cpu, 7, quiet=True)
    np.testing.assert_array_equal(desc, keep)
    model.eval()
    with torch.no_grad():
        want = model.encode(torch.from_numpy(keep.copy()))
    one = project_frames(model, desc, cpu, 10_000, quiet=True)
    np.testing.assert_array_equal(desc, keep)                    # an array is never overwritten unless asked
    torch.testing.assert_close(one, want, rtol=0, atol=0)
    torch.testing.assert_close(blocks, want, rtol=1e-6, atol=1e-7)
    half = project_frames(model, desc, cpu, 10_000, quiet=True, dtype=torch.float16)
    assert half.dtype == torch.float16 and torch.equal(half, want.half())


@pytest.mark.parametrize("method", ["seqmatch", "seqnet"])
def test_checkpoint_round_trip_keeps_keys_and_shapes(method, tmp_path):
    torch.manual_seed(2)
    model = SeqMatchModel(16, True, 8, method=method, w=3)
    state = model.state_dict()
    kernel = 3 if method == "seqnet" else 1
    key = "pool.0.conv" if method == "seqnet" else "pool.1.conv"
    assert {k: tuple(v.shape) for k, v in state.items()} == {f"{key}.weight": (8, 16, kernel), f"{key}.bias": (8,)}
    torch.save({"state_dict": state}, tmp_path / "ckpt.pth.tar")
    other = SeqMatchModel(16, True, 8, method=method, w=3)
    load_state(other, torch.load(tmp_path / "ckpt.pth.tar", weights_only=True)["state_dict"], "test")
    x = torch.randn(4, 5, 16)
    if method == "seqnet":
        torch.testing.assert_close(other.describe(x), model.describe(x), rtol=0, atol=0)
    else:
        torch.testing.assert_close(other.encode(x[:, 0]), model.encode(x[:, 0]), rtol=0, atol=0)


def _tset(n_db: int = 40, n_q: int = 30, dim: int = 6, seq_len: int = 3) -> mining.TrainingSet:
    rng = np.random.default_rng(0)
    db = rng.standard_normal((n_db, dim)).astype(np.float32)
    q = rng.standard_normal((n_q, dim)).astype(np.float32)
    db_pos = np.stack([np.arange(n_db) * 2.0, np.zeros(n_db)], axis=1)
    q_pos = np.stack([np.arange(n_q) * 2.0 + 0.5, np.zeros(n_q)], axis=1)
    bounds_db = np.concatenate([segment_bounds(n_db // 2), segment_bounds(n_db - n_db // 2) + n_db // 2])
    split = Split(name="t", db_desc=db, q_desc=q, db_positions=db_pos, q_positions=q_pos, pos_dist_thr=5.0,
                  non_triv_pos_dist_sq_thr=9.0, db_bounds=bounds_db, q_bounds=segment_bounds(n_q))
    return mining.TrainingSet.build(split, seq_len)


@pytest.mark.parametrize("order", ["sorted", "queries_first", "random"])
def test_stacked_rows_equals_plain_loop(order):
    tset = _tset()
    split = tset.split
    rng = np.random.default_rng(3)
    rows = rng.integers(0, split.num_db + split.num_q, size=50)
    if order == "sorted":
        rows = np.unique(rows)
    elif order == "queries_first":
        rows = np.concatenate([rows[rows >= split.num_db], rows[rows < split.num_db]])
    plain = np.stack([split.q_desc[r - split.num_db] if r >= split.num_db else split.db_desc[r] for r in rows])
    np.testing.assert_array_equal(mining.stacked_rows(tset, rows), plain)
    assert mining.stacked_rows(tset, rows[:0]).shape == (0, split.dim)
    with pytest.raises(IndexError):
        mining.stacked_rows(tset, np.array([split.num_db + split.num_q]))


def test_window_frames_keep_windows_contiguous():
    starts = np.array([7, 0, 2, 20, 21])
    frames, local = sequence.window_frames(starts, 3)
    np.testing.assert_array_equal(frames, [0, 1, 2, 3, 4, 7, 8, 9, 20, 21, 22, 23])
    np.testing.assert_array_equal(frames[local[:, None] + np.arange(3)], starts[:, None] + np.arange(3))


@pytest.mark.parametrize("method", ["meanOfPairs", "centerOnly"])
def test_model_cache_distances_equal_all_frame_features(method):
    """Pooling only the frames the windows cover gives the matrix of features of every frame."""

    from seqmatchnet.models.sequence import project_frames

    tset = _tset(seq_len=3)
    torch.manual_seed(4)
    model = SeqMatchModel(tset.split.dim, True, 5)
    config = steps.TrainConfig(seq_len=3, cache_batch_size=4, quiet=True, mining_distance=method)
    queries = tset.queries[[1, 4, 5, 9, 20]]
    cpu = torch.device("cpu")
    got = steps.model_cache_distances(model, tset, queries, config, cpu)
    db_feats = project_frames(model, tset.split.db_desc, cpu, 64, quiet=True)
    q_feats = project_frames(model, tset.split.q_desc, cpu, 64, quiet=True)
    ref = mining.cache_distances(db_feats, q_feats, tset, queries, method)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)
