"""``--mode prepare`` and ``--dataset custom:<name>``: the same data as the built-in synthetic benchmark
gives the same results, lat/lon conversion, sequence bounds, one test per bad-input message, and the
worked example of docs/own-data.md run as written."""
from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import plain
from conftest import ROOT, unit_rows
from seqmatchnet.cli import prepare
from seqmatchnet.data import positions
from seqmatchnet.data.positions import latlon_to_local
from seqmatchnet.data.structs import load_split_indices, load_struct
from seqmatchnet.data.windows import sequence_windows

SYNTH = {"frames": 400, "dim": 16}
EARTH_R = positions.EARTH_RADIUS_M


# ---------------------------------------------------------------- helpers

def write_csv(path: Path, header: str, rows) -> Path:
    """One line per row; floats written with repr so they read back bit for bit."""
    lines = [header] + [",".join(v if isinstance(v, str) else repr(v) for v in row) for row in rows]
    path.write_text("\n".join(lines) + "\n")
    return path


def run_prepare(capsys, *args: str) -> tuple[int, str, str]:
    rc = prepare.main(list(args))
    out, err = capsys.readouterr()
    return rc, out, err


def straight_route(root: Path, n_db: int = 200, n_q: int = 190, dim: int = 8, seed: int = 0) -> dict:
    """Two traversals of a straight road (2 m per frame) as .npy + x,y CSV; returns the file paths."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    files = {"db_desc": root / "db.npy", "q_desc": root / "q.npy"}
    np.save(files["db_desc"], unit_rows(rng, n_db, dim))
    np.save(files["q_desc"], unit_rows(rng, n_q, dim))
    files["db_pos"] = write_csv(root / "db.csv", "x,y", [(2.0 * i, 0.0) for i in range(n_db)])
    files["q_pos"] = write_csv(root / "q.csv", "x,y", [(2.0 * i + 0.5, 1.0) for i in range(n_q)])
    return files


def args_for(files: dict, name: str = "road", struct: Path | None = None, **over) -> list[str]:
    """``--mode prepare`` arguments; ``over`` replaces or adds options (value None drops one)."""
    opts = {"name": name, "db_descriptors": files["db_desc"], "db_positions": files["db_pos"],
            "q_descriptors": files["q_desc"], "q_positions": files["q_pos"],
            "structPath": struct or files["db_desc"].parent / "structFiles"}
    opts.update(over)
    out = []
    for key, value in opts.items():
        if value is None:
            continue
        out += [f"--{key}"] if value is True else [f"--{key}", str(value)]
    return out


def refused(capsys, args: list[str], *needles: str) -> str:
    """Non-zero exit, exactly one ``error:`` line holding every needle, no traceback; returns the line."""
    rc, out, err = run_prepare(capsys, *args)
    assert rc != 0, out
    assert "Traceback" not in out + err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    for needle in needles:
        assert needle in lines[0], f"{needle!r} missing from: {lines[0]}"
    return lines[0]


def run_main(args: list[str], cwd: Path, monkeypatch) -> int:
    import main
    monkeypatch.chdir(cwd)
    return main.main(args + ["--nocuda", "--threads", "0", "--quiet"])


def train_then_test(cwd: Path, data_args: list[str], monkeypatch) -> tuple[dict, dict]:
    """One epoch of training, then the test split of that run: (checkpoint, results.npz)."""
    model = ["--seqL", "3", "--pooling", "--outDims", "8"]
    assert run_main(["--mode", "train", "--nEpochs", "1", *model, *data_args], cwd, monkeypatch) == 0
    (run,) = (cwd / "data" / "runs").iterdir()
    assert run_main(["--mode", "test", "--split", "test", "--resume", str(run), "--resultsPath", "results",
                     *model, *data_args], cwd, monkeypatch) == 0
    ckpt = torch.load(run / "checkpoints" / "checkpoint.pth.tar", weights_only=True)
    with np.load(cwd / "results" / "results.npz") as z:
        results = {k: z[k] for k in z.files}
    return ckpt, results


# ---------------------------------------------------------------- must-show: same as the built-in dataset

@pytest.mark.slow
def test_prepared_synthetic_data_gives_the_builtin_results(tmp_path, monkeypatch, capsys):
    from seqmatchnet.data.synthetic import SyntheticParams, generate

    builtin = tmp_path / "builtin"
    builtin.mkdir()
    synth_args = ["--dataset", "synthetic", "--synth_frames", str(SYNTH["frames"]), "--synth_dim", str(SYNTH["dim"])]
    want_ckpt, want = train_then_test(builtin, synth_args, monkeypatch)

    custom = tmp_path / "custom"
    custom.mkdir()
    data = generate(SyntheticParams(**SYNTH))
    np.save(custom / "db.npy", data["db"])
    np.save(custom / "query.npy", data["query"])
    write_csv(custom / "db.csv", "x,y", data["db_pos"].tolist())
    write_csv(custom / "query.csv", "x,y", data["query_pos"].tolist())
    rows = {s: ",".join(f"{r[0]}:{r[-1] + 1}" for r in data[f"{s}_inds"]) for s in ("train", "val", "test")}
    for s in rows:                                         # the synthetic splits are contiguous row ranges
        assert all(np.array_equal(r, np.arange(r[0], r[-1] + 1)) for r in data[f"{s}_inds"])
    monkeypatch.chdir(custom)
    rc, out, err = run_prepare(capsys, "--name", "synth", "--db_descriptors", "db.npy", "--db_positions", "db.csv",
                               "--q_descriptors", "query.npy", "--q_positions", "query.csv",
                               "--train_rows", rows["train"], "--val_rows", rows["val"], "--test_rows", rows["test"],
                               "--posDistThr", "20", "--evalPosDistThr", "10", "--nonTrivPosDistThr", "5",
                               "--seqL", "3")
    assert rc == 0, err
    assert "--dataset custom:synth" in out and err == ""
    for split in ("train", "val", "test"):                  # the same struct contents as the built-in ones
        a = load_struct(builtin / "structFiles" / f"synthetic_{split}.db")
        b = load_struct(custom / "structFiles" / f"custom_synth_{split}.db")
        np.testing.assert_array_equal(a.db_positions, b.db_positions)
        np.testing.assert_array_equal(a.q_positions, b.q_positions)
        assert (a.pos_dist_thr, a.pos_dist_sq_thr, a.non_triv_pos_dist_sq_thr) == \
               (b.pos_dist_thr, b.pos_dist_sq_thr, b.non_triv_pos_dist_sq_thr)
        for x, y in zip(load_split_indices(builtin / "structFiles" / "synthetic_splitInds.npz", split),
                        load_split_indices(custom / "structFiles" / "custom_synth_splitInds.npz", split)):
            np.testing.assert_array_equal(x, y)

    got_ckpt, got = train_then_test(custom, ["--dataset", "custom:synth"], monkeypatch)
    assert got_ckpt["recalls"] == want_ckpt["recalls"]                     # validation recalls after epoch 1
    np.testing.assert_array_equal(got["recalls"], want["recalls"])          # test recalls
    np.testing.assert_array_equal(got["preds"], want["preds"])
    np.testing.assert_array_equal(got["rAtL"], want["rAtL"])
    for key in want_ckpt["state_dict"]:
        torch.testing.assert_close(got_ckpt["state_dict"][key], want_ckpt["state_dict"][key], rtol=0, atol=0)


# ---------------------------------------------------------------- lat/lon and sequences

def test_latlon_becomes_local_metres(tmp_path, capsys):
    """Frames built in metres around a known origin, written as lat/lon: the struct files hold the same metres
    (about the mean of all frames), so the query's 4 m east / 3 m north offset comes back exactly."""
    lat0, lon0 = -27.4698, 153.0251
    n = 80
    db_m = np.stack([2.0 * np.arange(n), 0.5 * np.arange(n)], axis=1)
    q_m = db_m + [4.0, 3.0]
    centre = np.concatenate([db_m, q_m]).mean(axis=0)
    db_m, q_m = db_m - centre, q_m - centre                  # the mean of all frames is the origin

    def to_latlon(m):
        lat = lat0 + np.degrees(m[:, 1] / EARTH_R)
        lon = lon0 + np.degrees(m[:, 0] / (EARTH_R * np.cos(np.radians(lat0))))
        return np.stack([lat, lon], axis=1).tolist()

    files = straight_route(tmp_path, n, n)
    write_csv(files["db_pos"], "lat,lon", to_latlon(db_m))
    write_csv(files["q_pos"], "latitude,longitude", to_latlon(q_m))
    rc, out, err = run_prepare(capsys, *args_for(files, train_rows="0:50,0:50", val_rows="55:65,55:65",
                                                 test_rows="70:80,70:80"))
    assert rc == 0, err
    rows = np.arange(50)
    s = load_struct(tmp_path / "structFiles" / "custom_road_train.db")
    np.testing.assert_allclose(s.db_positions, db_m[rows], atol=2e-3)
    np.testing.assert_allclose(s.q_positions - s.db_positions, np.tile([4.0, 3.0], (50, 1)), atol=1e-4)
    np.testing.assert_allclose(latlon_to_local(np.array([[lat0, lon0 + 1e-3]]), (lat0, lon0)),
                               [[EARTH_R * np.cos(np.radians(lat0)) * np.radians(1e-3), 0.0]], rtol=1e-9)


def plain_run_bounds(rows: np.ndarray, seq_ids: np.ndarray) -> np.ndarray:
    """Per position j of a split's row list: [lo, hi) of the run of consecutive rows with one sequence id."""
    def same(a, b):
        return rows[b] == rows[a] + 1 and seq_ids[rows[b]] == seq_ids[rows[a]]

    out = np.zeros((len(rows), 2), dtype=np.int64)
    for j in range(len(rows)):
        lo = j
        while lo > 0 and same(lo - 1, lo):
            lo -= 1
        hi = j + 1
        while hi < len(rows) and same(hi - 1, hi):
            hi += 1
        out[j] = lo, hi
    return out


def test_sequence_ids_bound_the_windows(tmp_path, capsys):
    """Sequences split the traversals; windows stay inside one sequence and match the plain loop.
    The database cut at row 120 leaves a 2-frame piece of sequence 'c' in val: it is dropped (seqL 5)."""
    from seqmatchnet.cli.options import parse_options
    from seqmatchnet.data.specs import get_split

    db_lengths, q_lengths = [50, 30, 42, 28, 50], [60, 45, 55, 40]
    db_ids = np.repeat(list("abcde"), db_lengths)
    q_ids = np.repeat(list("pqrs"), q_lengths)
    files = straight_route(tmp_path, len(db_ids), len(q_ids))
    write_csv(files["db_pos"], "x,y,sequence_id", [(1.0 * i, 0.0, s) for i, s in enumerate(db_ids)])
    write_csv(files["q_pos"], "sequence_id,x,y", [(s, 1.0 * i + 0.3, 0.5) for i, s in enumerate(q_ids)])
    rc, out, err = run_prepare(capsys, *args_for(files, splits="0.6,0.15,0.25", posDistThr=5, evalPosDistThr=3,
                                                 nonTrivPosDistThr=2, seqL=5))
    assert rc == 0, err
    assert "dropped 2 frames in sequence pieces shorter than --seqL 5" in out
    struct_dir = tmp_path / "structFiles"
    for split in ("train", "val", "test"):
        opt = parse_options(["--mode", "test", "--dataset", "custom:road", "--structPath", str(struct_dir),
                             "--seqL", "5"])
        sp = get_split(opt, split)
        db_rows, q_rows = load_split_indices(struct_dir / "custom_road_splitInds.npz", split)
        for rows, ids, bounds in ((db_rows, db_ids, sp.db_bounds), (q_rows, q_ids, sp.q_bounds)):
            np.testing.assert_array_equal(bounds, plain_run_bounds(rows, ids))
            for seq_len in (1, 2, 3, 5):
                starts, valid = sequence_windows(bounds, seq_len)
                windows = starts[:, None] + np.arange(seq_len)
                np.testing.assert_array_equal(windows, plain.plain_windows(bounds, seq_len))
                np.testing.assert_array_equal(valid, plain.plain_valid(bounds, seq_len))
                frames = rows[windows]                     # rows of the traversal in each window
                assert (ids[frames] == ids[frames[:, :1]]).all()             # one sequence per window
                assert (np.diff(frames, axis=1) == 1).all()                  # consecutive captures
    train_db = load_split_indices(struct_dir / "custom_road_splitInds.npz", "train")[0]
    val_db = load_split_indices(struct_dir / "custom_road_splitInds.npz", "val")[0]
    np.testing.assert_array_equal(train_db, np.arange(120))
    np.testing.assert_array_equal(val_db, np.arange(122, 150))    # rows 120, 121 (end of 'c') dropped


def test_fraction_splits_drop_queries_near_other_splits(tmp_path, capsys):
    files = straight_route(tmp_path, 200, 200)
    rc, out, err = run_prepare(capsys, *args_for(files, splits="0.6,0.15,0.25"))
    assert rc == 0, err
    inds = tmp_path / "structFiles" / "custom_road_splitInds.npz"
    db_pos = np.stack([2.0 * np.arange(200), np.zeros(200)], axis=1)
    q_pos = np.stack([2.0 * np.arange(200) + 0.5, np.ones(200)], axis=1)
    splits = {s: load_split_indices(inds, s) for s in ("train", "val", "test")}
    np.testing.assert_array_equal(splits["train"][0], np.arange(120))
    np.testing.assert_array_equal(splits["val"][0], np.arange(120, 150))
    for s, (_, q_rows) in splits.items():
        others = np.concatenate([splits[o][0] for o in splits if o != s])
        d = np.linalg.norm(q_pos[q_rows][:, None] - db_pos[others][None], axis=2).min(axis=1)
        assert (d > 20).all()                               # max(posDistThr 20, evalPosDistThr 10)
    kept = sum(len(q) for _, q in splits.values())
    assert f"dropped {200 - kept} queries within 20 m" in out
    s = load_struct(tmp_path / "structFiles" / "custom_road_val.db")
    assert (s.pos_dist_thr, s.pos_dist_sq_thr, s.non_triv_pos_dist_sq_thr) == (10.0, 100.0, 25.0)
    s = load_struct(tmp_path / "structFiles" / "custom_road_train.db")
    assert (s.which_set, s.pos_dist_thr, s.pos_dist_sq_thr, s.num_db) == ("train", 20.0, 400.0, 120)


# ---------------------------------------------------------------- bad inputs: one message each

def test_rows_mismatch(tmp_path, capsys):
    files = straight_route(tmp_path)
    write_csv(files["q_pos"], "x,y", [(2.0 * i, 1.0) for i in range(189)])
    refused(capsys, args_for(files), "190 descriptor rows", "189 positions", "q.csv")


@pytest.mark.parametrize("header,needle", [("x,heading", "unknown column(s) ['heading']"),
                                           ("x,timestamp", "does not name one pair of position columns"),
                                           ("lat,lon,x", "does not name one pair")])
def test_bad_columns(tmp_path, capsys, header, needle):
    files = straight_route(tmp_path)
    write_csv(files["db_pos"], header, [(1.0 * i, 2.0 * i, 3.0)[:len(header.split(","))] for i in range(200)])
    refused(capsys, args_for(files), needle, "db.csv")


@pytest.mark.parametrize("value,needle", [("abc", "'abc', not a number"), ("nan", "finite position"),
                                          ("inf", "finite position"), ("-inf", "finite position"),
                                          ("", "'', not a number")])
def test_bad_position_values(tmp_path, capsys, value, needle):
    files = straight_route(tmp_path)
    rows = [(2.0 * i, 0.0) for i in range(200)]
    rows[7] = (value, 0.0)
    write_csv(files["db_pos"], "x,y", rows)
    refused(capsys, args_for(files), needle, "line 9 (row 7)")


@pytest.mark.parametrize("column,value,needle", [(0, 90.5, "lat 90.5 is outside [-90, 90] degrees"),
                                                 (0, -91.0, "lat -91.0 is outside [-90, 90]"),
                                                 (1, 180.25, "lon 180.25 is outside [-180, 180] degrees")])
def test_latlon_out_of_range(tmp_path, capsys, column, value, needle):
    files = straight_route(tmp_path)
    rows = [[-27.0 + 1e-5 * i, 153.0] for i in range(200)]
    rows[11][column] = value
    write_csv(files["db_pos"], "lat,lon", rows)
    write_csv(files["q_pos"], "lat,lon", [(-27.0 + 1e-5 * i, 153.00001) for i in range(190)])
    refused(capsys, args_for(files), needle, "line 13 (row 11)", "db.csv")


def test_few_queries_with_a_positive_are_warned_about(tmp_path, capsys):
    """The query traversal runs 15 m beside the database: within the training threshold (20 m) but not the
    evaluation threshold (10 m), so val and test have no query with a database frame within it."""
    files = straight_route(tmp_path)
    write_csv(files["q_pos"], "x,y", [(2.0 * i + 0.5, 15.0) for i in range(190)])
    rc, out, err = run_prepare(capsys, *args_for(files))
    assert rc == 0, err
    warnings = [line for line in err.splitlines() if line.startswith("warning:")]
    assert [w.split()[5] for w in warnings] == ["val", "test"], err
    for w in warnings:
        assert "only 0 of" in w and "same coordinates" in w
    # and none for a traversal within the thresholds
    files = straight_route(tmp_path / "near")
    rc, _, err = run_prepare(capsys, *args_for(files))
    assert rc == 0 and "warning:" not in err


@pytest.mark.parametrize("swap,needle", [(True, "is earlier than"), (False, "repeats")])
def test_timestamps_unsorted_or_duplicate(tmp_path, capsys, swap, needle):
    files = straight_route(tmp_path)
    stamps = [1000.0 + 0.1 * i for i in range(190)]
    stamps[30] = stamps[29] - (0.05 if swap else 0.0)
    write_csv(files["q_pos"], "x,y,timestamp", [(2.0 * i, 1.0, t) for i, t in enumerate(stamps)])
    refused(capsys, args_for(files), needle, "row 30", "capture order")


def test_iso_timestamps_accepted(tmp_path, capsys):
    files = straight_route(tmp_path)
    write_csv(files["q_pos"], "timestamp,x,y", [(f"2024-05-01T10:{i // 60:02d}:{i % 60:02d}Z", 2.0 * i, 1.0)
                                                for i in range(190)])
    rc, _, err = run_prepare(capsys, *args_for(files))
    assert rc == 0, err


def test_position_glitch(tmp_path, capsys):
    files = straight_route(tmp_path)
    rows = [(2.0 * i, 0.0) for i in range(200)]
    rows[50] = (2.0 * 50, 5000.0)
    write_csv(files["db_pos"], "x,y", rows)
    refused(capsys, args_for(files), "row 50", "100x the median step", "glitch")


def test_sequence_shorter_than_seqL(tmp_path, capsys):
    files = straight_route(tmp_path)
    ids = ["a"] * 40 + ["b"] * 3 + ["c"] * 147
    write_csv(files["q_pos"], "x,y,sequence_id", [(2.0 * i, 1.0, s) for i, s in enumerate(ids)])
    refused(capsys, args_for(files, seqL=5), "sequence 'b' has 3 frame(s)", "rows 40..42", "--seqL 5")


def test_empty_split(tmp_path, capsys):
    files = straight_route(tmp_path)
    refused(capsys, args_for(files, splits="0.98,0.01,0.01"), "split val has no database frames")


def test_overlapping_ranges(tmp_path, capsys):
    files = straight_route(tmp_path)
    refused(capsys, args_for(files, train_rows="0:60,0:60", val_rows="55:70,60:70", test_rows="75:100,75:95"),
            "--train_rows and --val_rows overlap in the database traversal", "55:70")


def test_range_beyond_the_file(tmp_path, capsys):
    files = straight_route(tmp_path)
    refused(capsys, args_for(files, train_rows="0:60,0:60", val_rows="60:70,60:70", test_rows="75:100,75:191"),
            "query rows 75:191", "190 frames")


def test_existing_dataset_needs_force(tmp_path, capsys):
    files = straight_route(tmp_path)
    assert run_prepare(capsys, *args_for(files))[0] == 0
    refused(capsys, args_for(files), "already exists", "--force")
    rc, _, err = run_prepare(capsys, *args_for(files, force=True, splits="0.5,0.2,0.3"))
    assert rc == 0, err
    s = load_struct(tmp_path / "structFiles" / "custom_road_train.db")
    assert s.num_db == 100


@pytest.mark.parametrize("over,needles", [
    ({"splits": "0.6,0.2,0.3"}, ("--splits", "sum to 1")),
    ({"splits": "0.6,0.4", "train_rows": "0:10,0:10"}, ("either --splits or",)),
    ({"train_rows": "0:10,0:10"}, ("--val_rows", "--test_rows")),
    ({"train_rows": "0-10,0:10", "val_rows": "20:30,20:30", "test_rows": "40:50,40:50"}, ("'0-10'",)),
    ({"name": "my route"}, ("--name",)),
    ({"name": None}, ("--name",)),
    ({"nonTrivPosDistThr": 30}, ("--nonTrivPosDistThr 30", "--posDistThr 20")),
    ({"posDistThr": -1}, ("--posDistThr must be a positive number",)),
    ({"seqL": 0}, ("--seqL",)),
])
def test_bad_options(tmp_path, capsys, over, needles):
    files = straight_route(tmp_path)
    refused(capsys, args_for(files, **over), *needles)


def test_missing_and_mismatched_files(tmp_path, capsys):
    files = straight_route(tmp_path)
    refused(capsys, args_for(files, q_descriptors=tmp_path / "nope.npy"), "nope.npy", "--q_descriptors")
    refused(capsys, args_for(files, db_positions=tmp_path / "nope.csv"), "nope.csv", "--db_positions")
    np.save(tmp_path / "wide.npy", unit_rows(np.random.default_rng(1), 190, 12))
    refused(capsys, args_for(files, q_descriptors=tmp_path / "wide.npy"), "8 dimensions", "12")
    write_csv(files["q_pos"], "lat,lon", [(-27.0, 153.0 + 1e-5 * i) for i in range(190)])
    refused(capsys, args_for(files), "different coordinates")
    bad = np.ones((190, 8), dtype=np.float32)
    bad[3] = np.nan
    np.save(files["q_desc"], bad)
    refused(capsys, args_for(files), "q.npy", "non-finite", "row 3")


def test_help_and_main_dispatch(tmp_path, capsys, monkeypatch):
    import main
    assert prepare.main(["--help"]) == 0
    assert "--db_descriptors" in capsys.readouterr().out
    files = straight_route(tmp_path)
    monkeypatch.chdir(tmp_path)
    assert main.main(["--mode", "prepare", *args_for(files)]) == 0
    assert (tmp_path / "structFiles" / "custom_road.json").is_file()


def test_hdf5_descriptors_and_moved_files(tmp_path, monkeypatch, capsys):
    """HDF5 input is referenced like .npy; a descriptor file moved after preparing gets its own message."""
    import h5py

    import main
    from seqmatchnet.cli.options import parse_options
    from seqmatchnet.data.specs import get_split

    files = straight_route(tmp_path)
    with h5py.File(tmp_path / "db.h5", "w") as f:
        f.create_dataset("features", data=np.load(files["db_desc"]))
    assert run_prepare(capsys, *args_for(files, db_descriptors=tmp_path / "db.h5"))[0] == 0
    opt = parse_options(["--mode", "test", "--dataset", "custom:road", "--seqL", "3",
                         "--structPath", str(tmp_path / "structFiles")])
    sp = get_split(opt, "train")
    np.testing.assert_array_equal(sp.db_desc, np.load(files["db_desc"])[:120])
    files["q_desc"].rename(tmp_path / "moved.npy")
    monkeypatch.chdir(tmp_path)
    assert main.main(["--mode", "test", "--dataset", "custom:road", "--seqL", "3", "--nocuda", "--quiet"]) == 1
    err = capsys.readouterr().err
    assert "q.npy (named in" in err and "--mode prepare --name road --force" in err


def test_custom_dataset_missing_config_is_a_clear_error(tmp_path, monkeypatch, capsys):
    import main
    monkeypatch.chdir(tmp_path)
    assert main.main(["--mode", "test", "--dataset", "custom:nothing", "--seqL", "3", "--nocuda", "--quiet"]) == 1
    err = capsys.readouterr().err
    assert "custom_nothing.json not found" in err and "--mode prepare" in err


# ---------------------------------------------------------------- must-show: the documented worked example

PAGE = ROOT / "docs" / "own-data.md"
SECTION = "## Worked example"
RECALL_TOLERANCE = 0.03     # the page's Recall@1 against this run's (another CPU may move the last digits)


def worked_example() -> tuple[list[str], str]:
    """The ```bash blocks of the page's worked example, and the section's text."""
    text = PAGE.read_text()
    start = text.find(SECTION + "\n")
    assert start >= 0, f"no '{SECTION}' section in {PAGE}"
    body = text[start + len(SECTION):]
    end = re.search(r"^## ", body, flags=re.M)
    body = body[:end.start()] if end else body
    blocks = re.findall(r"^```bash\n(.*?)^```", body, flags=re.M | re.S)
    assert blocks, f"no ```bash block in the '{SECTION}' section of {PAGE}"
    return blocks, body


def recall_at_1(text: str) -> dict[str, float]:
    """Recall@1 of each test table in ``text``, by the table's header line (the run name left out)."""
    found = re.findall(r"^(custom:myroute test, seqL 5: [^(\n]*).*\n.*R@1.*\n\s*posDistThr\s+([\d.]+)", text,
                       flags=re.M)
    return {head.strip(): float(r1) for head, r1 in found}


@pytest.mark.slow
def test_documented_worked_example_runs_and_prints_its_expected_recalls(tmp_path):
    blocks, section = worked_example()
    shim = tmp_path / "bin"                  # `python` in the example is this interpreter
    shim.mkdir()
    # a script, not a symlink: a symlinked venv interpreter called from another folder misses its pyvenv.cfg
    (shim / "python").write_text(f'#!/bin/sh\nexec {shlex.quote(sys.executable)} "$@"\n')
    (shim / "python").chmod(0o755)
    work = tmp_path / "work"
    work.mkdir()
    env = {**os.environ, "SEQMATCHNET": str(ROOT), "PATH": f"{shim}{os.pathsep}{os.environ.get('PATH', '')}"}
    script = "\n".join(blocks)
    proc = subprocess.run(["bash", "-euo", "pipefail", "-c", script], cwd=work, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, f"{PAGE} example failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    assert "Traceback" not in proc.stderr
    assert "prepared dataset custom:myroute" in proc.stdout
    assert re.search(r"custom:myroute test, seqL 5: sequence matching, learned projection \(run \S+_l5_myroute, "
                     r"epoch 1, latest\)", proc.stdout), proc.stdout[-3000:]
    want, got = recall_at_1(section), recall_at_1(proc.stdout)
    assert len(want) == 2 and got.keys() == want.keys(), (want, got)
    batches = re.search(r"epoch of (\d+) batches", section).group(1)       # the page's count, as printed
    assert f"over {batches} batches" in proc.stdout, proc.stdout[-3000:]
    for head, r1 in want.items():
        assert abs(got[head] - r1) <= RECALL_TOLERANCE, f"{PAGE}: '{head}' shows R@1 {r1}, the run gave {got[head]}"


@pytest.mark.slow
def test_prepare_next_commands_run_as_printed(tmp_path):
    """The 'next' lines hold real values (no placeholder), the path of main.py as invoked, and run as
    pasted (with a short epoch count added)."""
    import shlex
    import subprocess

    files = straight_route(tmp_path / "in", dim=6)
    work = tmp_path / "work"
    work.mkdir()
    main_py = str(Path(__file__).resolve().parents[1] / "main.py")
    args = [sys.executable, main_py, "--mode", "prepare", *map(str, args_for(files, struct=work / "structFiles"))]
    out = subprocess.run(args, cwd=work, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    nxt = [ln.strip() for ln in lines[lines.index(next(ln for ln in lines if ln.startswith("next"))) + 1:]]
    assert len(nxt) == 2 and all("<" not in ln for ln in nxt)
    assert all(shlex.split(ln)[1] == main_py for ln in nxt)
    quick = " --nEpochs 1 --nocuda --threads 0 --quiet --figures none"
    script = "\n".join([nxt[0] + quick, nxt[1] + " --nocuda --threads 0"]).replace("python ", f"{sys.executable} ", 2)
    run = subprocess.run(["bash", "-euo", "pipefail", "-c", script], cwd=work, capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    assert "custom:road test, seqL 5: sequence matching, learned projection (run" in run.stdout
