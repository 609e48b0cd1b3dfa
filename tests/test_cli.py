"""Test-mode outputs: --extractOnly, --numSamples2Project, --seqL_filterData, summary and compare."""
from __future__ import annotations

import json

import numpy as np

from test_train import run_main

TEST = ["--mode", "test", "--dataset", "oxford-v1.0", "--split", "test"]


def test_extract_only_writes_sequence_descriptors_and_ground_truth(tiny_oxford, monkeypatch, tmp_path):
    out = tmp_path / "extract"
    assert run_main(TEST + ["--seqL", "3", "--extractOnly", "--resultsPath", str(out)], tiny_oxford, monkeypatch) == 0
    z = np.load(out / "descriptors.npz", allow_pickle=True)
    n_test = 400 - int(400 * 0.65)
    assert z["dbDesc"].shape == (n_test, 3, 16) and z["qDesc"].shape == (n_test, 3, 16)
    np.testing.assert_allclose(np.linalg.norm(z["dbDesc"], axis=-1), 1.0, atol=1e-5)
    gt = z["gt"]
    assert len(gt) == n_test and all(i in gt[i] for i in range(n_test))   # positions coincide: self is a positive


def test_tsne_embeddings_and_summary(tiny_oxford, monkeypatch, tmp_path):
    out = tmp_path / "res"
    args = TEST + ["--seqL", "3", "--numSamples2Project", "50", "--resultsPath", str(out), "--figures", "none"]
    assert run_main(args, tiny_oxford, monkeypatch) == 0
    z = np.load(out / "results.npz", allow_pickle=True)
    assert z["dbEmb"].shape == (50, 2) and z["qEmb"].shape == (50, 2)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["recalls"]["1"] == z["recalls"].item()[1]


def test_seql_filter_data_evaluates_only_unshifted_windows(tiny_oxford, monkeypatch, tmp_path):
    out = tmp_path / "filtered"
    args = TEST + ["--seqL", "5", "--seqL_filterData", "5", "--resultsPath", str(out), "--figures", "none"]
    assert run_main(args, tiny_oxford, monkeypatch) == 0
    z = np.load(out / "results.npz", allow_pickle=True)
    n_test = 400 - int(400 * 0.65)
    assert len(z["qFrames"]) == n_test - 4 and z["qFrames"][0] == 2
    assert set(z["preds"].ravel()) <= set(z["dbFrames"])        # predictions are database frames of the split


def test_compare_prints_runs_side_by_side(tiny_oxford, monkeypatch, tmp_path, capsys):
    import main
    for seq_len in ("1", "3"):
        args = TEST + ["--seqL", seq_len, "--resultsPath", str(tmp_path / f"l{seq_len}"), "--figures", "none"]
        assert run_main(args, tiny_oxford, monkeypatch) == 0
    capsys.readouterr()
    assert main.main(["--mode", "compare", str(tmp_path / "l1"), str(tmp_path / "l3")]) == 0
    table = capsys.readouterr().out
    assert "l1" in table and "l3" in table


def test_device_selection():
    import pytest
    import torch

    from utils import UserError, get_device

    assert get_device(True, "cuda") == torch.device("cpu")
    assert get_device(False, "cpu") == torch.device("cpu")
    if torch.cuda.is_available():
        assert get_device(False, "auto").type == "cuda"
    else:
        assert get_device(False, "auto") == torch.device("cpu")     # falls back without an error
        with pytest.raises(UserError, match="--nocuda"):
            get_device(False, "cuda")
