"""Tests of the synthetic benchmark: determinism, file layout, caching, and
the difficulty ordering that makes it a useful stand-in for the real data."""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import scipy.io

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from seqmatchnet.data import synthetic  # noqa: E402
from seqmatchnet.data.synthetic import SYNTHETIC_FILES, SyntheticParams, ensure_synthetic, generate  # noqa: E402

# A small route for the file-handling tests (about 0.1 s to generate).
SMALL = SyntheticParams(frames=600, dim=16)
STRUCT_FIELDS = {'whichSet', 'dbImageFns', 'qImageFns', 'numImages', 'numQueries', 'posDistThr',
                 'posDistSqThr', 'nonTrivPosDistSqThr', 'dataset', 'utmDb', 'utmQ'}


@pytest.fixture(scope='module')
def default_data() -> dict:
    return generate(SyntheticParams())


def _paths(root: Path) -> tuple[Path, Path]:
    return root / 'descData' / 'netvlad-pytorch', root / 'structFiles'


def _all_files(desc_dir: Path, struct_dir: Path) -> list[Path]:
    return [(desc_dir if key in ('db', 'query') else struct_dir) / name for key, name in SYNTHETIC_FILES.items()] \
        + [struct_dir / synthetic.PARAMS_FILE]


def _mtimes(files: list[Path]) -> dict[Path, int]:
    return {f: f.stat().st_mtime_ns for f in files}


def _load_struct(path: Path) -> np.void:
    return scipy.io.loadmat(path)['dbStruct'][0, 0]


# ---------------------------------------------------------------- generate

def test_generate_is_deterministic(default_data: dict) -> None:
    again = generate(SyntheticParams())
    assert default_data.keys() == again.keys()
    for key, value in default_data.items():
        if isinstance(value, tuple):
            for a, b in zip(value, again[key]):
                np.testing.assert_array_equal(a, b)
        else:
            assert value.tobytes() == again[key].tobytes(), key


def test_different_seed_differs() -> None:
    a, b = generate(SMALL), generate(dataclasses.replace(SMALL, seed=1))
    assert not np.array_equal(a['db'], b['db'])
    assert not np.array_equal(a['db_pos'], b['db_pos'])


def test_descriptors_finite_unit_norm(default_data: dict) -> None:
    p = SyntheticParams()
    for key in ('db', 'query'):
        x = default_data[key]
        assert x.dtype == np.float32 and x.ndim == 2 and x.shape[1] == p.dim
        assert np.isfinite(x).all()
        np.testing.assert_allclose(np.linalg.norm(x, axis=1), 1.0, atol=1e-5)
    assert len(default_data['db']) == p.frames
    assert len(default_data['query']) == round(p.frames * p.query_ratio)


def test_splits_disjoint_ordered_and_separated(default_data: dict) -> None:
    for k, key in enumerate(('db', 'query')):
        rows = [default_data[f'{split}_inds'][k] for split in synthetic.SPLITS]
        for r in rows:
            assert r.dtype == np.int64 and len(r) > 100
            assert np.all(np.diff(r) == 1), 'each split is one contiguous stretch in driving order'
        assert rows[0][-1] < rows[1][0] and rows[1][-1] < rows[2][0]
        assert rows[2][-1] < len(default_data[key])
        # gaps: no frame of one split lies within the train threshold of another split's frames
        pos = default_data[f'{key}_pos']
        for a, b in ((0, 1), (1, 2)):
            assert np.linalg.norm(pos[rows[a][-1]] - pos[rows[b][0]]) > 100.0


def test_frame_spacing_and_positives(default_data: dict) -> None:
    """About 2 m between frames, and almost every query has a db frame within 5 m."""
    step = np.linalg.norm(np.diff(default_data['db_pos'], axis=0), axis=1)
    assert 1.7 < step.mean() < 2.3
    db_rows, q_rows = default_data['test_inds']
    dist = np.linalg.norm(default_data['query_pos'][q_rows][:, None] - default_data['db_pos'][db_rows][None], axis=2)
    assert (dist.min(axis=1) <= 5.0).mean() > 0.95


def test_invalid_params_raise() -> None:
    with pytest.raises(ValueError):
        generate(SyntheticParams(dim=8, nuisance_rank_shared=4, nuisance_rank_own=4))
    with pytest.raises(ValueError):
        generate(SyntheticParams(train_share=0.9, val_share=0.2))


# ---------------------------------------------------------------- files

def test_ensure_writes_real_layout(tmp_path: Path) -> None:
    desc_dir, struct_dir = _paths(tmp_path)
    assert ensure_synthetic(desc_dir, struct_dir, SMALL) is True
    for f in _all_files(desc_dir, struct_dir):
        assert f.is_file(), f
    assert not [f for f in tmp_path.rglob('*') if f.name.endswith('.tmp')]
    data = generate(SMALL)
    for key in ('db', 'query'):
        np.testing.assert_array_equal(np.load(desc_dir / SYNTHETIC_FILES[key]), data[key])

    inds = np.load(struct_dir / SYNTHETIC_FILES['split_inds'], allow_pickle=True)
    assert set(inds.files) == {'trainInds', 'valInds', 'testInds'}
    seen: list[set[int]] = [set(), set()]
    for split in synthetic.SPLITS:
        pair = inds[split + 'Inds']
        assert pair.dtype == object and pair.shape == (2,)
        db_rows, q_rows = pair
        assert db_rows.dtype == np.int64 and q_rows.dtype == np.int64
        assert 0 <= db_rows.min() and db_rows.max() < len(data['db'])
        assert 0 <= q_rows.min() and q_rows.max() < len(data['query'])
        for k, rows in enumerate((db_rows, q_rows)):
            assert not seen[k] & set(rows.tolist()), 'splits overlap'
            seen[k] |= set(rows.tolist())

        s = _load_struct(struct_dir / SYNTHETIC_FILES[split])
        assert set(s.dtype.names) == STRUCT_FIELDS
        assert str(s['whichSet'][0]) == split and str(s['dataset'][0]) == 'synthetic'
        num_db, num_q = int(s['numImages'][0, 0]), int(s['numQueries'][0, 0])
        assert num_db == len(s['dbImageFns']) == s['utmDb'].shape[1] == len(db_rows)
        assert num_q == len(s['qImageFns']) == s['utmQ'].shape[1] == len(q_rows)
        assert s['dbImageFns'].shape == (num_db, 1) and s['utmDb'].shape == (2, num_db)
        assert str(s['dbImageFns'][0, 0][0]) == f'synthetic/db/{db_rows[0]:06d}.png'
        assert str(s['qImageFns'][-1, 0][0]) == f'synthetic/query/{q_rows[-1]:06d}.png'
        np.testing.assert_array_equal(s['utmDb'].T, data['db_pos'][db_rows])
        np.testing.assert_array_equal(s['utmQ'].T, data['query_pos'][q_rows])
        thr = float(s['posDistThr'][0, 0])
        assert thr == (20.0 if split == 'train' else 10.0)
        assert float(s['posDistSqThr'][0, 0]) == thr ** 2
        assert float(s['nonTrivPosDistSqThr'][0, 0]) == 25.0

    params = json.loads((struct_dir / synthetic.PARAMS_FILE).read_text())
    assert params['seed'] == SMALL.seed and params['frames'] == SMALL.frames


def test_struct_matches_reference_dtypes(tmp_path: Path) -> None:
    """Field types and shapes as in the real Oxford struct files (when the fixture is around)."""
    ref = Path(__file__).resolve().parents[2] / 'shared' / 'reference' / 'structFiles' / \
        'oxford-v1.0_2015-03-17-11-08-44_2014-12-16-18-44-24_test_d-10_d2-5.db'
    if not ref.is_file():
        pytest.skip('reference fixture ../shared not present')
    desc_dir, struct_dir = _paths(tmp_path)
    ensure_synthetic(desc_dir, struct_dir, SMALL)
    mine, real = _load_struct(struct_dir / SYNTHETIC_FILES['test']), _load_struct(ref)
    assert set(mine.dtype.names) == set(real.dtype.names)
    for name in real.dtype.names:
        a, b = mine[name], real[name]
        assert a.dtype.kind == b.dtype.kind and a.ndim == b.ndim, name
        if b.shape == (1, 1) or name in ('utmDb', 'utmQ'):
            assert a.shape[0] == b.shape[0], name
        if b.dtype == object:
            assert a[0, 0].dtype.kind == b[0, 0].dtype.kind, name


def test_ensure_is_cached_and_regenerates_on_change(tmp_path: Path) -> None:
    desc_dir, struct_dir = _paths(tmp_path)
    files = _all_files(desc_dir, struct_dir)
    assert ensure_synthetic(desc_dir, struct_dir, SMALL) is True
    before = _mtimes(files)
    assert ensure_synthetic(desc_dir, struct_dir, SMALL) is False
    assert _mtimes(files) == before

    changed = dataclasses.replace(SMALL, seed=3)
    assert ensure_synthetic(desc_dir, struct_dir, changed) is True
    assert json.loads((struct_dir / synthetic.PARAMS_FILE).read_text())['seed'] == 3
    np.testing.assert_array_equal(np.load(desc_dir / SYNTHETIC_FILES['db']), generate(changed)['db'])
    assert ensure_synthetic(desc_dir, struct_dir, changed) is False


@pytest.mark.parametrize('key', [*SYNTHETIC_FILES, 'params'])
def test_missing_file_regenerates(tmp_path: Path, key: str) -> None:
    desc_dir, struct_dir = _paths(tmp_path)
    ensure_synthetic(desc_dir, struct_dir, SMALL)
    missing = struct_dir / synthetic.PARAMS_FILE if key == 'params' else \
        (desc_dir if key in ('db', 'query') else struct_dir) / SYNTHETIC_FILES[key]
    missing.unlink()
    assert ensure_synthetic(desc_dir, struct_dir, SMALL) is True
    assert missing.is_file()
    assert ensure_synthetic(desc_dir, struct_dir, SMALL) is False


def test_edited_params_file_regenerates(tmp_path: Path) -> None:
    desc_dir, struct_dir = _paths(tmp_path)
    ensure_synthetic(desc_dir, struct_dir, SMALL)
    params_path = struct_dir / synthetic.PARAMS_FILE
    params_path.write_text(params_path.read_text().replace('"seed": 0', '"seed": 5'))
    assert ensure_synthetic(desc_dir, struct_dir, SMALL) is True


def test_interrupted_generation_is_not_complete(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A generation that dies half-way leaves no params file and no temp files,
    so the next call regenerates."""
    desc_dir, struct_dir = _paths(tmp_path)
    ensure_synthetic(desc_dir, struct_dir, SMALL)
    changed = dataclasses.replace(SMALL, seed=4)

    def boom(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(synthetic.scipy.io, 'savemat', boom)
    with pytest.raises(KeyboardInterrupt):
        ensure_synthetic(desc_dir, struct_dir, changed)
    monkeypatch.undo()
    assert not (struct_dir / synthetic.PARAMS_FILE).exists()
    assert not [f for f in tmp_path.rglob('*') if f.name.endswith('.tmp')]
    assert ensure_synthetic(desc_dir, struct_dir, SMALL) is True
    np.testing.assert_array_equal(np.load(desc_dir / SYNTHETIC_FILES['db']), generate(SMALL)['db'])


def test_nothing_written_outside_given_folders(tmp_path: Path) -> None:
    desc_dir, struct_dir = tmp_path / 'a' / 'desc', tmp_path / 'b' / 'struct'
    ensure_synthetic(desc_dir, struct_dir, SMALL)
    assert sorted(p.name for p in desc_dir.iterdir()) == ['synthetic_db.npy', 'synthetic_query.npy']
    assert len(list(struct_dir.iterdir())) == 5
    assert sorted(p.name for p in tmp_path.iterdir()) == ['a', 'b']
    assert os.access(desc_dir / SYNTHETIC_FILES['db'], os.R_OK)


# ---------------------------------------------------------------- difficulty

def _windows(n: int, seq_len: int) -> np.ndarray:
    """Sequence windows of docs/how-it-works.md over one segment of n frames: (n, seq_len)."""
    out = np.empty((n, seq_len), dtype=np.int64)
    for i in range(n):
        lo, hi = max(0, i - seq_len // 2), min(i + seq_len - seq_len // 2, n)
        w, missing = list(range(lo, hi)), seq_len - (hi - lo)
        if lo == 0:
            w += list(range(hi, hi + missing))
        elif missing > 0:
            w = list(range(lo - missing, lo)) + w
        out[i] = w
    return out


def _recall_at_1(db: np.ndarray, q: np.ndarray, db_pos: np.ndarray, q_pos: np.ndarray, pos_thr: float,
                 seq_len: int, remove: np.ndarray | None = None) -> float:
    """Recall@1 of meanOfPairs sequence matching over valid interior queries;
    `remove` (dim, r) orthonormal: project it out and re-normalise first."""
    db, q = db.astype(np.float64), q.astype(np.float64)
    if remove is not None:
        db, q = db - db @ remove @ remove.T, q - q @ remove @ remove.T
        db /= np.linalg.norm(db, axis=1, keepdims=True)
        q /= np.linalg.norm(q, axis=1, keepdims=True)
    frame_dist = np.sqrt(np.clip(2 - 2 * db @ q.T, 0, None))
    w_db, w_q = _windows(len(db), seq_len), _windows(len(q), seq_len)
    score = sum(frame_dist[np.ix_(w_db[:, k], w_q[:, k])] for k in range(seq_len)) / seq_len
    positive = np.linalg.norm(q_pos[:, None] - db_pos[None], axis=2) <= pos_thr
    used = positive.any(axis=1)
    used[:seq_len // 2], used[len(q) - seq_len // 2:] = False, False
    hit = positive[np.arange(len(q)), score.argmin(axis=0)]
    return float(hit[used].mean())


def test_difficulty_ordering(default_data: dict) -> None:
    """single frame < raw sequence matching < sequence matching after removing
    the nuisance subspace, each by a clear margin, and none trivial."""
    db_rows, q_rows = default_data['test_inds']
    args = (default_data['db'][db_rows], default_data['query'][q_rows],
            default_data['db_pos'][db_rows], default_data['query_pos'][q_rows], 10.0)
    single = _recall_at_1(*args, seq_len=1)
    seq = _recall_at_1(*args, seq_len=5)
    oracle = _recall_at_1(*args, seq_len=5, remove=default_data['nuisance_basis'])
    assert 0.15 < single < 0.45, single
    assert seq > single + 0.1 and seq < 0.8, (single, seq)
    assert oracle > seq + 0.1, (seq, oracle)


@pytest.fixture(scope='module')
def default_files(tmp_path_factory) -> Path:
    """The default benchmark written where --dataset synthetic reads it."""
    root = tmp_path_factory.mktemp('synthetic')
    ensure_synthetic(root / 'data' / 'descData' / 'netvlad-pytorch', root / 'structFiles', SyntheticParams())
    return root


@pytest.mark.slow
@pytest.mark.parametrize('seq_len', [1, 5])
def test_project_evaluation_agrees_with_the_recall_oracle(default_data: dict, default_files: Path,
                                                          seq_len: int) -> None:
    """--mode test on the synthetic test split finds the same top-1 matches as ``_recall_at_1`` (a float64
    oracle over the whole distance matrix), on the queries the oracle counts."""
    from seqmatchnet.cli.options import parse_options
    from seqmatchnet.cli.test import evaluate_options

    args = ['--mode', 'test', '--dataset', 'synthetic', '--split', 'test', '--seqL', str(seq_len), '--nocuda',
            '--quiet', '--dataPath', str(default_files / 'data'), '--structPath', str(default_files / 'structFiles')]
    if seq_len == 1:
        args += ['--matcher', 'None']
    _, result = evaluate_options(parse_options(args))
    db_rows, q_rows = default_data['test_inds']
    db_pos, q_pos = default_data['db_pos'][db_rows], default_data['query_pos'][q_rows]
    want = _recall_at_1(default_data['db'][db_rows], default_data['query'][q_rows], db_pos, q_pos, 10.0, seq_len)
    np.testing.assert_array_equal(result.q_frames, np.arange(len(q_rows)))
    np.testing.assert_array_equal(result.db_frames, np.arange(len(db_rows)))
    positive = np.linalg.norm(q_pos[:, None] - db_pos[None], axis=2) <= 10.0
    used = positive.any(axis=1)
    used[:seq_len // 2], used[len(q_rows) - seq_len // 2:] = False, False
    hit = positive[np.arange(len(q_rows)), result.preds[:, 0]]
    assert abs(float(hit[used].mean()) - want) <= 1.0 / used.sum() + 1e-12   # one float32 near-tie at most
    assert result.recalls[1] == pytest.approx(float(hit[positive.any(axis=1)].mean()))


def test_cli_synth_options_regenerate_and_bad_values_are_refused(tmp_path, monkeypatch, capsys):
    import main

    monkeypatch.chdir(tmp_path)
    base = ["--mode", "test", "--dataset", "synthetic", "--seqL", "3", "--split", "test", "--nocuda", "--quiet",
            "--synth_frames", "600", "--synth_dim", "16"]
    assert main.main(base) == 0
    params = json.loads((tmp_path / "structFiles" / "synthetic_params.json").read_text())
    assert params["frames"] == 600 and params["dim"] == 16
    assert main.main(base + ["--synth_noise_std", "0.5"]) == 0
    params = json.loads((tmp_path / "structFiles" / "synthetic_params.json").read_text())
    assert params["noise_std"] == 0.5
    assert main.main(base[:-4] + ["--synth_frames", "10"]) == 1
    assert "--synth_" in capsys.readouterr().err


# ---------------------------------------------------------------- query speed profiles

def test_default_speed_profile_leaves_the_benchmark_and_its_params_file_unchanged() -> None:
    params = SyntheticParams()
    assert not params.speed_profile
    text = synthetic._params_json(params)
    assert 'query_speed' not in text and 'query_stop' not in text       # files written before them stay complete
    assert 'query_speed' in synthetic._params_json(dataclasses.replace(params, query_speed=2.0))


@pytest.mark.parametrize('speed', [0.5, 1.5, 2.0])
def test_constant_query_speed_spaces_the_query_frames(speed: float) -> None:
    p = dataclasses.replace(SMALL, speed_var=0.0, gps_noise_m=0.0, lane_offset_m=0.0)
    base, fast = generate(p), generate(dataclasses.replace(p, query_speed=speed))
    np.testing.assert_array_equal(base['db'], fast['db'])                # the database does not change
    step = np.linalg.norm(np.diff(fast['query_pos'], axis=0), axis=1)
    assert np.median(step) == pytest.approx(p.spacing_m * speed, rel=0.05)
    assert len(fast['query']) == pytest.approx(len(base['db']) / speed, rel=0.05)


def test_stops_and_speed_changes() -> None:
    p = dataclasses.replace(SMALL, speed_var=0.0, gps_noise_m=0.0, lane_offset_m=0.0, query_speed_changes=1.0,
                            query_stops_per_km=3.0, query_stop_frames=12)
    data = generate(p)
    step = np.linalg.norm(np.diff(data['query_pos'], axis=0), axis=1)
    moving = step[step > 0.05]
    assert (step < 1e-9).sum() >= 6                                     # standing still at the stops
    assert moving.max() / moving.min() > 3                              # slow and fast stretches
    assert generate(p)['query'].tobytes() == data['query'].tobytes()   # deterministic


@pytest.mark.parametrize('field, value', [('query_speed', 0.1), ('query_speed_changes', -1.0),
                                          ('query_stops_per_km', -1.0), ('query_stop_frames', 0)])
def test_invalid_speed_profiles_raise(field: str, value) -> None:
    with pytest.raises(ValueError, match=field):
        dataclasses.replace(SMALL, **{field: value}).validate()
