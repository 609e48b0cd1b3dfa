"""Descriptors as wide as today's best frame descriptors (BoQ-DINOv2: 12288-D) flow through
prepare, train (the projection reduces them), test (in memory, streamed, float16) and localize."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from conftest import unit_rows
from test_custom_data import args_for, run_main, run_prepare, write_csv

DIM = 12288          # BoQ with the DINOv2 backbone
N_DB, N_Q = 200, 190


def wide_route(root: Path) -> dict:
    """A straight road, 2 m a frame; each query is its database place plus noise."""
    rng = np.random.default_rng(7)
    root.mkdir(parents=True, exist_ok=True)
    db = unit_rows(rng, N_DB, DIM)
    q = db[:N_Q] + 0.6 * unit_rows(rng, N_Q, DIM)
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    files = {"db_desc": root / "db.npy", "q_desc": root / "q.npy"}
    np.save(files["db_desc"], db.astype(np.float32))
    np.save(files["q_desc"], q.astype(np.float32))
    files["db_pos"] = write_csv(root / "db.csv", "x,y", [(2.0 * i, 0.0) for i in range(N_DB)])
    files["q_pos"] = write_csv(root / "q.csv", "x,y", [(2.0 * i + 0.3, 1.0) for i in range(N_Q)])
    return files


def results(cwd: Path, name: str) -> dict:
    with np.load(cwd / name / "results.npz") as z:
        return {k: z[k] for k in z.files}


@pytest.mark.slow
def test_wide_descriptors_through_every_mode(tmp_path, monkeypatch, capsys):
    files = wide_route(tmp_path / "in")
    rc, _, err = run_prepare(capsys, *args_for(files, name="wide", struct=tmp_path / "structFiles"))
    assert rc == 0, err
    data = ["--dataset", "custom:wide", "--structPath", str(tmp_path / "structFiles"), "--seqL", "3"]
    test = ["--mode", "test", "--split", "test", *data]
    assert run_main([*test, "--resultsPath", "dense"], tmp_path, monkeypatch) == 0
    assert run_main([*test, "--resultsPath", "streamed", "--mapChunk", "16"], tmp_path, monkeypatch) == 0
    assert run_main([*test, "--resultsPath", "half", "--mapChunk", "16", "--featDtype", "float16"],
                    tmp_path, monkeypatch) == 0
    dense, streamed, half = (results(tmp_path, n) for n in ("dense", "streamed", "half"))
    np.testing.assert_array_equal(streamed["preds"][:, :1], dense["preds"][:, :1])
    assert dense["recalls"][0] > 0.9                          # the queries are their places plus noise
    assert abs(half["recalls"][0] - dense["recalls"][0]) <= 0.05

    assert run_main(["--mode", "train", "--nEpochs", "1", "--pooling", "--outDims", "64", *data],
                    tmp_path, monkeypatch) == 0
    (run,) = (tmp_path / "data" / "runs").iterdir()
    assert run_main([*test, "--resultsPath", "trained", "--resume", str(run)], tmp_path, monkeypatch) == 0
    assert results(tmp_path, "trained")["preds"].shape[0] == dense["preds"].shape[0]

    out = tmp_path / "matches.csv"
    assert run_main(["--mode", "localize", "--split", "test", *data, "--output", str(out)],
                    tmp_path, monkeypatch) == 0
    rows = out.read_text().splitlines()
    assert rows[0].startswith("query_frame,db_frame") and len(rows) - 1 == len(dense["preds"])
