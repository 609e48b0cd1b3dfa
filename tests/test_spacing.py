"""``--spacing``: frames by distance travelled (positions or an odometry column), the row mapping
back to the user's files, extraction of the kept frames only, and each bad input."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from conftest import unit_rows
from seqmatchnet.data import spacing
from seqmatchnet.data.structs import load_split_indices, load_struct
from test_custom_data import args_for, refused, run_prepare, write_csv

# ---------------------------------------------------------------- plain-loop twins

def plain_kept(distance: np.ndarray, seq_ids, step: float) -> list[int]:
    """One pass over the frames: keep a sequence's first frame and every frame at least ``step``
    beyond the last kept frame's cumulative distance."""
    kept, last = [], None
    for i in range(len(distance)):
        first = i == 0 or (seq_ids is not None and seq_ids[i] != seq_ids[i - 1])
        if first or distance[i] >= distance[last] + step:
            kept.append(i)
            last = i
    return kept


def plain_path_distance(metres: np.ndarray, seq_ids) -> list[float]:
    out, total = [], 0.0
    for i in range(len(metres)):
        if i == 0 or (seq_ids is not None and seq_ids[i] != seq_ids[i - 1]):
            total = 0.0
        else:
            total += float(np.hypot(*(metres[i] - metres[i - 1])))
        out.append(total)
    return out


def dense_drive(rng, n: int, stop_every: int = 150, stop_len: int = 120) -> np.ndarray:
    """Metres along a route at video rate: 0.1-0.2 m a frame, standing still for ``stop_len``
    frames every ``stop_every`` frames."""
    step = rng.uniform(0.1, 0.2, n)
    step[(np.arange(n) % (stop_every + stop_len)) >= stop_every] = 0.0
    step[0] = 0.0
    return np.cumsum(step)


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("step", [0.15, 1.0, 2.0, 7.3])
def test_kept_frames_equal_the_plain_loop(seed, step):
    rng = np.random.default_rng(seed)
    metres = np.stack([dense_drive(rng, 900), rng.normal(0, 0.01, 900)], axis=1)
    seq_ids = np.repeat(np.array(["a", "b", "c"], dtype=object), [300, 250, 350])
    for ids in (None, seq_ids):
        distance = spacing.path_distance(metres, ids)
        np.testing.assert_allclose(distance, plain_path_distance(metres, ids), atol=1e-9)
        kept = spacing.spaced_rows(distance, ids, step)
        assert kept.tolist() == plain_kept(distance, ids, step)
    odometry = dense_drive(rng, 900) * 1.02           # an odometry column of the same drive
    assert spacing.spaced_rows(odometry, seq_ids, step).tolist() == plain_kept(odometry, seq_ids, step)


def test_a_stationary_traversal_keeps_one_frame_and_every_sequence_keeps_its_first():
    assert spacing.spaced_rows(np.zeros(500), None, 2.0).tolist() == [0]
    ids = np.array(["a"] * 3 + ["b"] * 3, dtype=object)
    assert spacing.spaced_rows(np.array([0, 0, 0, 5, 5, 9.0]), ids, 2.0).tolist() == [0, 3, 5]


# ---------------------------------------------------------------- prepare --spacing

NEAR = {"posDistThr": 4, "evalPosDistThr": 2, "nonTrivPosDistThr": 1}     # thresholds for short routes

def dense_route(root: Path, seed: int = 0, odometry: bool = False, n_db: int = 3000,
                n_q: int = 2600, odometry_scale: float = 1.02) -> dict:
    """Two video-rate traversals of one straight road with stops (x,y metres, or x,y with a 2 %
    scaled odometry column), random descriptors."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    files = {"db_desc": root / "db.npy", "q_desc": root / "q.npy"}
    for side, n in (("db", n_db), ("q", n_q)):
        s = dense_drive(rng, n)
        np.save(files[f"{side}_desc"], unit_rows(rng, n, 8))
        if odometry:
            rows = [(float(x), 0.0, float(odometry_scale * x)) for x in s]
            files[f"{side}_pos"] = write_csv(root / f"{side}.csv", "x,y,odometry", rows)
        else:
            files[f"{side}_pos"] = write_csv(root / f"{side}.csv", "x,y", [(float(x), 0.0) for x in s])
        files[f"{side}_s"] = s
    return files


def read_dataset(struct: Path, name: str = "road") -> tuple[dict, dict, dict]:
    config = json.loads((struct / f"custom_{name}.json").read_text())
    inds = {s: load_split_indices(struct / config["split_inds"], s) for s in ("train", "val", "test")}
    frames = {side: np.genfromtxt(struct / f, delimiter=",", names=True, dtype=None, encoding=None)
              for side, f in config["frames_files"].items()}
    return config, inds, frames


def test_prepare_spacing_keeps_frames_by_distance_and_maps_them_back(tmp_path, capsys):
    files = dense_route(tmp_path, n_db=9000, n_q=8000)
    struct = tmp_path / "structFiles"
    rc, out, err = run_prepare(capsys, *args_for(files, spacing=2, splits="0.6,0.15,0.25"))
    assert rc == 0, err
    assert "spacing: database" in out and "rows kept at 2 m (positions)" in out
    config, inds, frames = read_dataset(struct)
    for side, key in (("database", "db"), ("query", "q")):
        s = files[f"{key}_s"]
        want = plain_kept(plain_path_distance(np.stack([s, 0 * s], 1), None), None, 2.0)
        assert frames[side]["row"].tolist() == want
        assert frames[side]["frame"].tolist() == list(range(len(want)))
        assert frames[side]["line"].tolist() == [r + 2 for r in want]       # header is line 1
        assert config["frames_kept"][side] == len(want) and config["spacing_m"][side] == 2
    assert config["rows_in_files"] == {"database": 9000, "query": 8000}
    kept_db = frames["database"]["row"]
    for split, (db_rows, q_rows) in inds.items():
        # the split indices are rows of the user's descriptor files, all of them kept frames
        assert np.isin(db_rows, kept_db).all() and np.isin(q_rows, frames["query"]["row"]).all()
        struct_file = load_struct(struct / config["struct_files"][split])
        np.testing.assert_allclose(struct_file.db_positions[:, 0], files["db_s"][db_rows])
        assert struct_file.db_image_fns[0].endswith(f"/{db_rows[0]:06d}")
    # far fewer frames: stops and video rate are gone
    assert config["frames_kept"]["database"] < 0.2 * 9000


def test_spacing_per_traversal_and_kept_only_descriptors(tmp_path, capsys):
    files = dense_route(tmp_path, seed=1)
    rc, _, err = run_prepare(capsys, *args_for(files, q_spacing=3, **NEAR))
    assert rc == 0, err
    config, inds, frames = read_dataset(tmp_path / "structFiles")
    assert config["spacing_m"] == {"database": None, "query": 3}
    assert frames["database"]["row"].tolist() == list(range(3000))
    # a query descriptor file of the kept frames only (as prepare extracts them) is accepted
    kept = frames["query"]["row"]
    np.save(tmp_path / "q_kept.npy", np.load(files["q_desc"])[kept])
    rc, _, err = run_prepare(capsys, *args_for(files, name="kept", q_spacing=3, q_descriptors=tmp_path / "q_kept.npy",
                                             **NEAR))
    assert rc == 0, err
    _, inds_kept, _ = read_dataset(tmp_path / "structFiles", "kept")
    for split in inds:
        assert (kept[inds_kept[split][1]] == inds[split][1]).all()


def test_odometry_column_drives_the_spacing(tmp_path, capsys):
    files = dense_route(tmp_path, odometry=True)
    rc, out, err = run_prepare(capsys, *args_for(files, spacing=2, **NEAR))
    assert rc == 0, err
    config, _, frames = read_dataset(tmp_path / "structFiles")
    assert config["spacing_distance"] == {"database": "odometry", "query": "odometry"}
    want = plain_kept(1.02 * files["db_s"], None, 2.0)
    assert frames["database"]["row"].tolist() == want


def test_default_prepare_writes_no_spacing_record(tmp_path, capsys):
    files = dense_route(tmp_path, n_db=1200, n_q=1200)
    rc, _, err = run_prepare(capsys, *args_for(files, **NEAR))
    assert rc == 0, err
    config = json.loads((tmp_path / "structFiles" / "custom_road.json").read_text())
    assert not {"spacing_m", "frames_files"} & set(config)
    assert not list((tmp_path / "structFiles").glob("*_frames.csv"))


# ---------------------------------------------------------------- bad input: one line, nothing written

@pytest.mark.parametrize("over, needles", [
    ({"spacing": 0}, ("--spacing must be a positive number of metres", "got 0")),
    ({"spacing": -2}, ("--spacing must be a positive", "-2")),
    ({"q_spacing": "nan"}, ("--q_spacing must be a positive",)),
    ({"spacing": 300}, ("spacing 300 m", "fewer than --seqL 5", "lower the spacing")),
    ({"spacing": 10, "splits": "0.9,0.05,0.05"}, ("split val has no", "at spacing 10 m (lower --spacing)")),
])
def test_bad_spacing_is_one_line_and_writes_nothing(tmp_path, capsys, over, needles):
    files = dense_route(tmp_path, n_db=1500, n_q=1400)
    refused(capsys, args_for(files, **over), *needles)
    assert not (tmp_path / "structFiles").exists() or not list((tmp_path / "structFiles").iterdir())


def test_bad_odometry_is_one_line_and_writes_nothing(tmp_path, capsys):
    files = dense_route(tmp_path, odometry=True, n_db=1500, n_q=1400)
    lines = files["q_pos"].read_text().splitlines()
    cells = lines[50].split(",")
    lines[50] = ",".join(cells[:2] + [str(float(cells[2]) - 1.0)])
    files["q_pos"].write_text("\n".join(lines) + "\n")
    refused(capsys, args_for(files, spacing=2), "odometry of row 49", "must not decrease")
    lines[50] = ",".join(cells[:2] + [""])                     # a row without odometry
    files["q_pos"].write_text("\n".join(lines) + "\n")
    refused(capsys, args_for(files, spacing=2), "line 51", "no odometry value", "one value per frame")
    write_csv(files["q_pos"], "odometry", [(float(i),) for i in range(1400)])
    refused(capsys, args_for(files, spacing=2), "odometry but no positions", "need positions")
    assert not (tmp_path / "structFiles").exists()


def test_descriptor_rows_that_match_neither_all_nor_kept_frames(tmp_path, capsys):
    files = dense_route(tmp_path, n_db=1500, n_q=1400)
    np.save(tmp_path / "short.npy", unit_rows(np.random.default_rng(0), 77, 8))
    refused(capsys, args_for(files, spacing=2, q_descriptors=tmp_path / "short.npy"),
            "77 descriptor rows", "1400 positions", "kept at spacing 2 m")


# ---------------------------------------------------------------- extraction of the kept frames only

class CountingNet(nn.Module):
    """A tiny image model that counts the images it sees."""

    def __init__(self):
        super().__init__()
        self.images = 0
        self.proj = nn.Linear(3, 8)

    def forward(self, x):
        self.images += x.shape[0]
        return nn.functional.normalize(self.proj(x.mean(dim=(2, 3))), dim=1)


def test_prepare_extracts_only_the_kept_frames_and_reuses_complete_descriptors(tmp_path, capsys, monkeypatch):
    from PIL import Image

    from seqmatchnet.images import extraction
    from seqmatchnet.images.base import ImageModel

    net = CountingNet()
    fake = ImageModel("netvlad", net, 8, "counting", (16, 12))
    monkeypatch.setattr(extraction, "load_for_extraction", lambda *a, **k: (fake, (16, 12)))
    files = dense_route(tmp_path, n_db=900, n_q=900)
    rng = np.random.default_rng(0)
    for side, n in (("db", 900), ("q", 900)):
        (tmp_path / side).mkdir()
        for i in range(n):
            Image.fromarray(rng.integers(0, 255, (12, 16, 3), dtype=np.uint8)).save(tmp_path / side / f"{i:05d}.png")
    weights = tmp_path / "w.pth"
    weights.write_bytes(b"weights")
    args = args_for(files, spacing=2, db_descriptors=None, q_descriptors=None, db_images=tmp_path / "db",
                    q_images=tmp_path / "q", model="netvlad", weights=weights, seqL=3,
                    posDistThr=4, evalPosDistThr=2, nonTrivPosDistThr=1)
    with torch.no_grad():
        rc, out, err = run_prepare(capsys, *args)
    assert rc == 0, err
    config, _, frames = read_dataset(tmp_path / "structFiles")
    kept = config["frames_kept"]["database"] + config["frames_kept"]["query"]
    assert net.images == kept < 0.3 * (900 + 900)
    assert frames["query"]["image"][0].endswith("00000.png")
    assert Path(frames["query"]["image"][5]).name == f"{frames['query']['row'][5]:05d}.png"
    listed = (tmp_path / "structFiles" / "custom_road_descriptors" / "query.npy.images.txt").read_text().split()
    assert [Path(p).name for p in listed] == [f"{r:05d}.png" for r in frames["query"]["row"]]
    # --mode test and --mode localize name each row's image
    from seqmatchnet.cli.localize import run_localize

    res = run_test_mode(tmp_path / "structFiles", tmp_path / "res", monkeypatch)
    top1 = read_rows_csv(tmp_path / "res" / "top1_rows.csv")
    assert len(top1) == len(res["qFrames"]) and top1[0]["db_row"]
    run_localize(spaced_options(tmp_path / "structFiles", "--output", str(tmp_path / "m.csv")))
    assert (tmp_path / "m.csv").read_text().splitlines()[0].endswith(",q_row,db_row,q_image,db_image")
    localized = [r for r in read_rows_csv(tmp_path / "m.csv") if r["db_row"]]
    assert localized and not any(r["db_image"] for r in read_rows_csv(tmp_path / "m.csv") if not r["db_row"])
    for line in top1 + localized:
        for side, key in (("q", "q"), ("db", "db")):
            image = Path(line[f"{key}_image"])
            assert (image.parent, image.name) == (tmp_path / side, f"{int(line[f'{key}_row']):05d}.png")
    # a retry (here with --force after a changed threshold) reuses the complete descriptors
    rc, out, err = run_prepare(capsys, *args, "--force", "--nonTrivPosDistThr", "2")
    assert rc == 0, err
    assert net.images == kept
    assert out.count("reusing the complete descriptors of the same") == 2
    # a split error comes before any extraction
    net.images = 0
    rc, _, err = run_prepare(capsys, *args_for(files, name="other", spacing=2, db_descriptors=None,
                                               q_descriptors=None, db_images=tmp_path / "db",
                                               q_images=tmp_path / "q", model="netvlad", weights=weights,
                                               seqL=3, splits="0.98,0.01,0.01", posDistThr=4,
                                               evalPosDistThr=2, nonTrivPosDistThr=1))
    assert rc == 1 and "split" in err and net.images == 0


def test_mode_extract_spacing_extracts_the_frames_prepare_keeps(tmp_path, capsys, monkeypatch):
    from PIL import Image

    from seqmatchnet.cli import extract
    from seqmatchnet.images import extraction
    from seqmatchnet.images.base import ImageModel

    net = CountingNet()
    monkeypatch.setattr(extraction, "load_for_extraction",
                        lambda *a, **k: (ImageModel("netvlad", net, 8, "counting", (16, 12)), (16, 12)))
    files = dense_route(tmp_path, n_db=1500, n_q=1500, odometry=True)
    (tmp_path / "q").mkdir()
    for i in range(1500):
        Image.fromarray(np.full((12, 16, 3), i % 255, np.uint8)).save(tmp_path / "q" / f"{i:05d}.png")
    weights = tmp_path / "w.pth"
    weights.write_bytes(b"weights")
    base = ["--images", str(tmp_path / "q"), "--model", "netvlad", "--weights", str(weights), "--out",
            str(tmp_path / "q_kept.npy"), "--threads", "0", "--nocuda", "--quiet"]
    assert extract.main([*base, "--spacing", "0"]) == 2
    assert extract.main([*base, "--spacing", "2"]) == 2            # without --positions
    capsys.readouterr()
    assert extract.main([*base, "--positions", str(files["q_pos"]), "--spacing", "2"]) == 0
    want = plain_kept(1.02 * files["q_s"], None, 2.0)
    assert net.images == len(want) and np.load(tmp_path / "q_kept.npy").shape == (len(want), 8)
    assert f"extracting {len(want)} of 1500 images" in capsys.readouterr().out
    rc, _, err = run_prepare(capsys, *args_for(files, spacing=2, q_descriptors=tmp_path / "q_kept.npy", seqL=3,
                                                 **NEAR))
    assert rc == 0, err
    config, _, frames = read_dataset(tmp_path / "structFiles")
    assert frames["query"]["row"].tolist() == want


def test_explicit_row_ranges_are_rows_of_the_users_files(tmp_path, capsys):
    files = dense_route(tmp_path, n_db=6000, n_q=6000)
    ranges = {"train_rows": "0:3600,0:3600", "val_rows": "3600:4800,3600:4800", "test_rows": "4800:6000,4800:6000"}
    rc, _, err = run_prepare(capsys, *args_for(files, spacing=2, seqL=3, **ranges, **NEAR))
    assert rc == 0, err
    config, inds, frames = read_dataset(tmp_path / "structFiles")
    for split, text in ranges.items():
        (a, b), (c, d) = (map(int, part.split(":")) for part in text.split(","))
        db_rows, q_rows = inds[split.split("_")[0]]
        kept_db = frames["database"]["row"]
        assert db_rows.tolist() == kept_db[(kept_db >= a) & (kept_db < b)].tolist()
        assert ((q_rows >= c) & (q_rows < d)).all()


# ---------------------------------------------------------------- --mode test / localize report the user's rows

def spaced_options(struct: Path, *extra: str):
    from seqmatchnet.cli import options

    argv = ["--dataset", "custom:road", "--structPath", str(struct), "--seqL", "3", "--split", "test",
            "--nocuda", "--quiet", "--threads", "0", *extra]
    return options.check_options(options.build_parser().parse_args(argv))


def run_test_mode(struct: Path, results: Path, monkeypatch, name: str = "road") -> dict:
    import main

    monkeypatch.chdir(struct.parent)
    assert main.main(["--mode", "test", "--dataset", f"custom:{name}", "--structPath", str(struct), "--seqL", "3",
                      "--split", "test", "--resultsPath", str(results), "--figures", "none", "--nocuda",
                      "--threads", "0", "--quiet"]) == 0
    with np.load(results / "results.npz") as z:
        return {k: z[k] for k in z.files}


def read_rows_csv(path: Path) -> list[dict]:
    import csv
    import io

    return list(csv.DictReader(io.StringIO(path.read_text())))


def test_mode_test_reports_the_users_rows(tmp_path, capsys, monkeypatch):
    files = dense_route(tmp_path, seed=2)
    struct = tmp_path / "structFiles"
    assert run_prepare(capsys, *args_for(files, spacing=2, seqL=3, **NEAR))[0] == 0
    config, inds, frames = read_dataset(struct)
    res = run_test_mode(struct, tmp_path / "res", monkeypatch)
    db_inds, q_inds = inds["test"]                      # the split's rows of the user's descriptor files
    assert res["db_rows"].tolist() == [int(db_inds[f]) for f in res["dbFrames"]]
    assert res["q_rows"].tolist() == [int(q_inds[f]) for f in res["qFrames"]]
    assert set(res["db_rows"].tolist()) <= set(frames["database"]["row"].tolist())
    top1 = read_rows_csv(tmp_path / "res" / "top1_rows.csv")
    assert len(top1) == len(res["qFrames"])
    struct_file = load_struct(struct / config["struct_files"]["test"])
    for i, line in enumerate(top1):
        q, d = int(res["qFrames"][i]), int(res["dbFrames"][res["preds"][i, 0]])
        assert (int(line["q_frame"]), int(line["q_row"])) == (q, int(q_inds[q]))
        assert (int(line["db_frame"]), int(line["db_row"])) == (d, int(db_inds[d]))
        assert line["q_image"] == line["db_image"] == ""
        assert float(line["distance"]) == pytest.approx(float(res["dists"][i, 0]), rel=1e-6)
        # the user's positions of the two rows decide "correct" (posDistThr of the test split, 2 m)
        gap = abs(files["q_s"][int(line["q_row"])] - files["db_s"][int(line["db_row"])])
        has_pos = np.abs(files["db_s"][db_inds] - files["q_s"][int(line["q_row"])]).min() <= 2
        assert line["correct"] == ("" if not has_pos else str(int(gap <= 2)))
        assert struct_file.q_image_fns[q].endswith(f"/{int(line['q_row']):06d}")
    summary = json.loads((tmp_path / "res" / "summary.json").read_text())
    assert summary["top1_rows"] == "top1_rows.csv"
    # a query descriptor file of the kept frames only: the same user rows, through the frames table
    np.save(tmp_path / "q_kept.npy", np.load(files["q_desc"])[frames["query"]["row"]])
    assert run_prepare(capsys, *args_for(files, name="kept", spacing=2, seqL=3,
                                         q_descriptors=tmp_path / "q_kept.npy", **NEAR))[0] == 0
    kept = run_test_mode(struct, tmp_path / "res_kept", monkeypatch, "kept")
    assert kept["q_rows"].tolist() == res["q_rows"].tolist()
    assert kept["db_rows"].tolist() == res["db_rows"].tolist()


def test_localize_csv_reports_the_users_rows(tmp_path, capsys):
    from seqmatchnet.cli import localize
    from seqmatchnet.cli.localize import run_localize
    from seqmatchnet.online.localizer import CSV_COLUMNS

    files = dense_route(tmp_path, seed=3)
    struct = tmp_path / "structFiles"
    assert run_prepare(capsys, *args_for(files, spacing=2, seqL=3, **NEAR))[0] == 0
    _, inds, _ = read_dataset(struct)
    db_inds, q_inds = inds["test"]
    run_localize(spaced_options(struct, "--output", str(tmp_path / "m.csv")))
    text = (tmp_path / "m.csv").read_text()
    assert text.splitlines()[0] == ",".join(CSV_COLUMNS + ("q_row", "db_row"))
    rows = read_rows_csv(tmp_path / "m.csv")
    assert len(rows) == len(q_inds)
    for r in rows:
        assert int(r["q_row"]) == q_inds[int(r["query_frame"])]
        assert r["db_row"] == ("" if not r["db_frame"] else str(db_inds[int(r["db_frame"])]))
    assert sum(bool(r["db_row"]) for r in rows) == len(rows) - 2           # seqL 3: two frames to fill
    # with --spacing the columns come after held
    run_localize(spaced_options(struct, "--output", str(tmp_path / "s.csv"), "--spacing", "3"))
    assert (tmp_path / "s.csv").read_text().splitlines()[0].endswith(",held,q_row,db_row")
    assert localize.user_columns(localize.load_model_for(spaced_options(struct))[1]) == ("q_row", "db_row")


def test_replay_steps_by_the_datasets_odometry_column(tmp_path, capsys):
    from seqmatchnet.cli.localize import load_model_for, run_localize, split_odometry

    files = dense_route(tmp_path, seed=4, odometry=True, odometry_scale=1.5)   # odometry 50 % long
    struct = tmp_path / "structFiles"
    assert run_prepare(capsys, *args_for(files, spacing=2, seqL=3, **NEAR))[0] == 0
    _, inds, frames = read_dataset(struct)
    q_inds = inds["test"][1]
    np.testing.assert_array_equal(frames["query"]["odometry"], 1.5 * files["q_s"][frames["query"]["row"]])
    split = load_model_for(spaced_options(struct))[1]
    odometry = [1.5 * files["q_s"][r] for r in q_inds]                   # the CSV's column at the split's rows
    np.testing.assert_array_equal(split_odometry(split), odometry)
    run_localize(spaced_options(struct, "--output", str(tmp_path / "o.csv"), "--spacing", "4"))
    rows = read_rows_csv(tmp_path / "o.csv")
    steps, kept_at = set(), None                                          # a loop over the odometry
    for t, (value, lo) in enumerate(zip(odometry, split.q_bounds[:, 0])):
        if t == lo:
            kept_at = None
        if kept_at is None or value >= kept_at + 4:
            kept_at = value
            steps.add(t)
    along_positions = set(spacing.spaced_rows(
        spacing.path_distance(split.q_positions, split.q_bounds[:, 0]), split.q_bounds[:, 0], 4).tolist())
    assert steps != along_positions                                       # the two disagree on this route
    assert {int(r["query_frame"]) for r in rows if r["db_frame"] and r["held"] == "0"} == \
        {t for t in steps if rows[t]["db_frame"]}
    assert all(r["held"] == "1" for r in rows if r["db_frame"] and int(r["query_frame"]) not in steps)


def test_datasets_without_frames_tables_report_as_before(tmp_path, capsys, monkeypatch):
    from seqmatchnet.cli import localize
    from seqmatchnet.online.localizer import CSV_COLUMNS, Match

    files = dense_route(tmp_path, n_db=1200, n_q=1200)
    struct = tmp_path / "structFiles"
    assert run_prepare(capsys, *args_for(files, seqL=3, **NEAR))[0] == 0
    res = run_test_mode(struct, tmp_path / "res", monkeypatch)
    assert set(res) == {"recalls", "rAtL", "preds", "dists", "n_values", "radii", "dbFrames", "qFrames"}
    assert not (tmp_path / "res" / "top1_rows.csv").exists()
    assert "top1_rows" not in json.loads((tmp_path / "res" / "summary.json").read_text())
    split = localize.load_model_for(spaced_options(struct))[1]
    assert split.db_source is None and split.q_source is None and localize.user_columns(split) == ()
    matches = [None, Match(3, 0.25, 1.5, (0.0, 0.0)), Match(4, 0.5, 2.0, None, held=True)]
    lat = np.array([0.1, 0.2, 0.3])
    for spacing_m in (None, 2.0):
        localize.write_replay_csv(tmp_path / "a.csv", matches, lat, spacing_m)
        localize.write_replay_csv(tmp_path / "b.csv", matches, lat, spacing_m, split)
        assert (tmp_path / "a.csv").read_bytes() == (tmp_path / "b.csv").read_bytes()
        assert (tmp_path / "a.csv").read_text().splitlines()[0] == ",".join(
            CSV_COLUMNS + (("held",) if spacing_m else ()))


def test_malformed_frames_table_is_one_line(tmp_path, capsys, monkeypatch):
    import main

    files = dense_route(tmp_path, seed=5)
    struct = tmp_path / "structFiles"
    assert run_prepare(capsys, *args_for(files, spacing=2, seqL=3, **NEAR))[0] == 0
    table = struct / "custom_road_query_frames.csv"
    lines = table.read_text().splitlines()
    table.write_text("\n".join(lines[:1] + lines[2:]) + "\n")          # a frame missing
    monkeypatch.chdir(tmp_path)
    assert main.main(["--mode", "test", "--dataset", "custom:road", "--structPath", str(struct), "--seqL", "3",
                      "--nocuda", "--quiet"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "custom_road_query_frames.csv is malformed" in err[0] and "prepare" in err[0]
