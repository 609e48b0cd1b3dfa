"""``--dataset msls`` on the real MSLS struct and sequence-bounds files (docs/how-it-works.md), with synthetic
descriptors: bounds read per traversal, no window crosses a capture sequence, the valid-window count of a
plain loop over the bounds text, and train/test runs end to end."""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pytest

import plain
from conftest import REFERENCE, ROOT

MSLS = REFERENCE / "msls"
CITIES = ("amman", "austin", "melbourne")
TRAIN_CITY, VAL_CITY = "melbourne", "amman"    # amman is the smallest city: fast
DIM = 16

pytestmark = pytest.mark.skipif(not (MSLS / "structFiles").is_dir(), reason="../shared/reference/msls is absent")


def bounds_file(root: Path, city: str, side: str) -> Path:
    return root / "structFiles" / "seqBoundsFiles" / f"msls_{city}_{side}_seqBounds.txt"


@pytest.fixture(scope="module")
def msls_root(tmp_path_factory) -> Path:
    """The real struct and bounds files in the project layout, and descriptors that follow the positions:
    random Fourier features of the place (about 15 m scale), a per-traversal offset and noise."""
    from seqmatchnet.data.structs import load_struct

    root = tmp_path_factory.mktemp("msls")
    structs = root / "structFiles"
    (structs / "seqBoundsFiles").mkdir(parents=True)
    for f in (MSLS / "structFiles").glob("*.db"):
        shutil.copyfile(f, structs / f.name)
    for f in (MSLS / "seqBoundsFiles").glob("*.txt"):
        shutil.copyfile(f, structs / "seqBoundsFiles" / f.name)
    desc = root / "data" / "descData" / "netvlad-pytorch"
    desc.mkdir(parents=True)
    rng = np.random.default_rng(0)
    freq = rng.standard_normal((DIM, 2)) / 15.0
    phase = rng.uniform(0, 2 * np.pi, DIM)
    for city in CITIES:
        s = load_struct(structs / f"msls_{city}_d-20_d2-5.db")
        centre = s.db_positions.mean(axis=0)
        for side, pos, shift in (("database", s.db_positions, -1.0), ("query", s.q_positions, 1.0)):
            x = np.cos((pos - centre) @ freq.T + phase) + 0.5 * rng.standard_normal((len(pos), DIM))
            x[:, :4] += shift
            np.save(desc / f"msls_{city}_{side}.npy", (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32))
    return root


def msls_opt(root: Path, seq_len: int, mode: str = "train"):
    from seqmatchnet.cli.options import parse_options

    return parse_options(["--mode", mode, "--dataset", "msls", "--msls_trainCity", TRAIN_CITY, "--msls_valCity",
                          VAL_CITY, "--seqL", str(seq_len), "--nocuda", "--dataPath", str(root / "data"),
                          "--structPath", str(root / "structFiles")])


def read_bounds_text(path: Path) -> list[tuple[int, int]]:
    return [tuple(int(v) for v in line.split()) for line in path.read_text().splitlines() if line.strip()]


def plain_valid_count(path: Path, seq_len: int) -> int:
    """Frames whose centred window of ``seq_len`` fits in their own [lo, hi) without shifting."""
    count = 0
    for i, (lo, hi) in enumerate(read_bounds_text(path)):
        if i - seq_len // 2 >= lo and i + seq_len - seq_len // 2 <= hi:
            count += 1
    return count


@pytest.mark.parametrize("split,city", [("train", TRAIN_CITY), ("test", VAL_CITY)])
def test_bounds_are_read_per_traversal(msls_root, split, city):
    """Each traversal keeps its own bounds (relative to its own file); stacking db + query with the query bounds
    offset by numDb gives the same windows."""
    from seqmatchnet.data.specs import get_split
    from seqmatchnet.data.windows import sequence_windows

    sp = get_split(msls_opt(msls_root, 3), split)
    db_text = np.array(read_bounds_text(bounds_file(msls_root, city, "database")))
    q_text = np.array(read_bounds_text(bounds_file(msls_root, city, "query")))
    np.testing.assert_array_equal(sp.db_bounds, db_text)
    np.testing.assert_array_equal(sp.q_bounds, q_text)
    assert sp.q_bounds.min() == 0 and sp.q_bounds.max() == sp.num_q        # not offset by the database part
    db_starts, db_valid = sequence_windows(sp.db_bounds, 3)
    q_starts, q_valid = sequence_windows(sp.q_bounds, 3)
    stacked_starts, stacked_valid = sequence_windows(np.vstack([sp.db_bounds, sp.q_bounds + sp.num_db]), 3)
    np.testing.assert_array_equal(stacked_starts, np.concatenate([db_starts, q_starts + sp.num_db]))
    np.testing.assert_array_equal(stacked_valid, np.concatenate([db_valid, q_valid]))


@pytest.mark.parametrize("seq_len", [1, 2, 3])
@pytest.mark.parametrize("split,city", [("train", TRAIN_CITY), ("test", VAL_CITY)])
def test_windows_stay_inside_their_sequence(msls_root, split, city, seq_len):
    from seqmatchnet.data.specs import get_split
    from seqmatchnet.data.windows import sequence_windows
    from seqmatchnet.training.mining import TrainingSet

    sp = get_split(msls_opt(msls_root, seq_len), split)
    for side, bounds in (("database", sp.db_bounds), ("query", sp.q_bounds)):
        starts, valid = sequence_windows(bounds, seq_len)
        windows = starts[:, None] + np.arange(seq_len)
        assert (windows >= bounds[:, :1]).all() and (windows < bounds[:, 1:]).all()   # inside the frame's own bounds
        np.testing.assert_array_equal(windows, plain.plain_windows(bounds, seq_len))
        np.testing.assert_array_equal(valid, plain.plain_valid(bounds, seq_len))
        assert valid.sum() == plain_valid_count(bounds_file(msls_root, city, side), seq_len)
    if split == "train":
        tset = TrainingSet.build(sp, seq_len)
        assert len(tset.db_frames) == plain_valid_count(bounds_file(msls_root, city, "database"), seq_len)
        assert len(tset.q_frames) == plain_valid_count(bounds_file(msls_root, city, "query"), seq_len)


@pytest.mark.slow
def test_train_and_test_run(msls_root, monkeypatch, capsys):
    import torch

    import main

    monkeypatch.chdir(msls_root)
    model = ["--seqL", "3", "--pooling", "--outDims", "16", "--nocuda", "--threads", "0", "--quiet"]
    data = ["--dataset", "msls", "--msls_trainCity", TRAIN_CITY, "--msls_valCity", VAL_CITY]
    assert main.main(["--mode", "train", "--nEpochs", "1", *data, *model]) == 0
    (run,) = (msls_root / "data" / "runs").iterdir()
    ckpt = torch.load(run / "checkpoints" / "checkpoint.pth.tar", weights_only=True)
    assert ckpt["epoch"] == 1 and ckpt["recalls"][20] > 0.2            # the descriptors follow the positions
    assert main.main(["--mode", "test", "--split", "test", "--resume", str(run), "--resultsPath", "results",
                      *data, *model]) == 0
    out = capsys.readouterr().out
    assert "msls test, seqL 3: sequence matching" in out
    with np.load(msls_root / "results" / "results.npz") as z:
        recalls = dict(zip(z["n_values"].tolist(), z["recalls"].tolist()))
    assert recalls[20] > 0.2


@pytest.mark.skipif(shutil.which("bash") is None or (shutil.which("curl") is None and shutil.which("wget") is None),
                    reason="download.sh needs bash and curl or wget")
@pytest.mark.slow
def test_download_script_fetches_the_msls_files_where_the_loader_finds_them(msls_root, tmp_path):
    """``download.sh --what msls`` against a local HTTP server holding the real MSLS files: every struct and
    bounds file arrives byte for byte, and --dataset msls then reads the downloaded files."""
    import subprocess

    from seqmatchnet.cli.options import parse_options
    from seqmatchnet.data.specs import get_split
    from test_download import Server

    server = Server(tmp_path / "served")
    try:
        files = {f.name: f.read_bytes() for f in (MSLS / "structFiles").glob("*.db")}
        files.update({f"seqBoundsFiles/{f.name}": f.read_bytes() for f in (MSLS / "seqBoundsFiles").glob("*.txt")})
        assert len(files) == 3 * len(CITIES)
        seqnet = server.source("seqnet", files)
        env = {k: v for k, v in os.environ.items() if k not in ("DESC_BASE_URL", "CHECKSUMS_FILE", "MSLS_CITIES")}
        env.update(SEQNET_BASE_URL=seqnet, SEQMATCHNET_BASE_URL=f"{server.url}/empty",
                   NO_PROXY="127.0.0.1,localhost", no_proxy="127.0.0.1,localhost")
        target = tmp_path / "target"
        r = subprocess.run(["bash", str(ROOT / "download.sh"), "--what", "msls", str(target)], env=env,
                           capture_output=True, text=True, timeout=120)
    finally:
        server.close()
    assert r.returncode == 0, r.stdout + r.stderr
    for rel, data in files.items():
        assert (target / "structFiles" / rel).read_bytes() == data, rel
    assert server.data_gets("/seqnet/") == {f"/seqnet/{rel}": 1 for rel in files}
    assert not [p for p in target.rglob("*") if ".part" in p.name]
    opt = parse_options(["--mode", "test", "--dataset", "msls", "--msls_valCity", VAL_CITY, "--seqL", "3", "--nocuda",
                         "--dataPath", str(msls_root / "data"), "--structPath", str(target / "structFiles")])
    sp = get_split(opt, "test")
    want = np.loadtxt(MSLS / "seqBoundsFiles" / f"msls_{VAL_CITY}_query_seqBounds.txt", dtype=int)
    assert sp.num_q == sum(1 for lo, hi in want if hi - lo >= 3)


@pytest.mark.parametrize("city,seq_len", [("austin", 3), ("melbourne", 5)])
def test_short_capture_sequences_do_not_block_a_split(msls_root, city, seq_len):
    from seqmatchnet.cli.options import parse_options
    from seqmatchnet.data.specs import get_split
    from seqmatchnet.data.windows import sequence_windows

    opt = parse_options(["--mode", "test", "--dataset", "msls", "--msls_valCity", city, "--seqL", str(seq_len),
                         "--nocuda", "--dataPath", str(msls_root / "data"), "--structPath",
                         str(msls_root / "structFiles")])
    sp = get_split(opt, "test")
    for bounds in (sp.db_bounds, sp.q_bounds):
        starts, _ = sequence_windows(bounds, seq_len)
        assert (starts >= bounds[:, 0]).all() and (starts + seq_len <= bounds[:, 1]).all()
    # exactly the frames of sequences shorter than seq_len are left out
    raw = np.loadtxt(msls_root / "structFiles" / "seqBoundsFiles" / f"msls_{city}_query_seqBounds.txt", dtype=int)
    assert sp.num_q == sum(1 for lo, hi in raw if hi - lo >= seq_len) < len(raw)
