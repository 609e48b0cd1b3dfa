"""Test-mode outputs: --extractOnly, --numSamples2Project, --seqL_filterData, summary and compare."""
from __future__ import annotations

import json

import numpy as np
import pytest

from test_train import run_main

TEST = ["--mode", "test", "--dataset", "oxford-v1.0", "--split", "test"]


def test_extract_only_writes_sequence_descriptors_and_ground_truth(tiny_oxford, monkeypatch, tmp_path):
    out = tmp_path / "extract"
    assert run_main(TEST + ["--seqL", "3", "--extractOnly", "--resultsPath", str(out)], tiny_oxford, monkeypatch) == 0
    z = np.load(out / "descriptors.npz", allow_pickle=False)            # plain arrays only
    n_test = 400 - int(400 * 0.65)
    assert z["dbDesc"].shape == (n_test, 3, 16) and z["qDesc"].shape == (n_test, 3, 16)
    np.testing.assert_allclose(np.linalg.norm(z["dbDesc"], axis=-1), 1.0, atol=1e-5)
    offsets, indices = z["gtOffsets"], z["gtIndices"]
    gt = [indices[offsets[i]:offsets[i + 1]] for i in range(n_test)]
    pos = np.arange(int(400 * 0.65), 400) * 2.0                           # tiny_oxford: 2 m apart, 10 m threshold
    for i in range(n_test):                                               # the plain definition: within 10 m
        np.testing.assert_array_equal(gt[i], np.flatnonzero(np.abs(pos - pos[i]) <= 10.0))


@pytest.mark.slow
def test_tsne_embeddings_and_summary(tiny_oxford, monkeypatch, tmp_path):
    out = tmp_path / "res"
    args = TEST + ["--seqL", "3", "--numSamples2Project", "50", "--resultsPath", str(out), "--figures", "none"]
    assert run_main(args, tiny_oxford, monkeypatch) == 0
    z = np.load(out / "results.npz")
    assert z["dbEmb"].shape == (50, 2) and z["qEmb"].shape == (50, 2)
    assert (out / "tsne.png").stat().st_size > 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["recalls"]["1"] == dict(zip(z["n_values"].tolist(), z["recalls"].tolist()))[1]


def test_seql_filter_data_evaluates_only_unshifted_windows(tiny_oxford, monkeypatch, tmp_path):
    out = tmp_path / "filtered"
    args = TEST + ["--seqL", "5", "--seqL_filterData", "5", "--resultsPath", str(out), "--figures", "none"]
    assert run_main(args, tiny_oxford, monkeypatch) == 0
    z = np.load(out / "results.npz")
    n_test = 400 - int(400 * 0.65)
    assert len(z["qFrames"]) == n_test - 4 and z["qFrames"][0] == 2
    assert len(z["dbFrames"]) == n_test - 4
    # as the reference's: predictions index the filtered database (positions in dbFrames)
    assert z["preds"].min() >= 0 and z["preds"].max() < len(z["dbFrames"])
    # such a file is accepted back for the same split and filter; re-ranking its own top 20 keeps them
    again = tmp_path / "again"
    assert run_main(args[:-4] + ["--predictionsFile", str(out / "results.npz"), "--resultsPath", str(again),
                                 "--figures", "none"], tiny_oxford, monkeypatch) == 0
    z2 = np.load(again / "results.npz")
    np.testing.assert_array_equal(np.sort(z2["preds"], axis=1), np.sort(z["preds"][:, :20], axis=1))
    np.testing.assert_array_equal(z2["dbFrames"], z["dbFrames"])
    # ... and refused, with a one-line reason, without the filter
    assert run_main(TEST + ["--seqL", "5", "--predictionsFile", str(out / "results.npz"), "--figures", "none"],
                    tiny_oxford, monkeypatch) == 1


def test_train_split_evaluates_full_windows_by_default(tiny_oxford, monkeypatch, tmp_path):
    """--split train: only frames whose window needs no shift, as the reference (unless --seqL_filterData)."""
    base = ["--mode", "test", "--dataset", "oxford-v1.0", "--split", "train", "--seqL", "5", "--figures", "none"]
    assert run_main(base + ["--resultsPath", str(tmp_path / "a")], tiny_oxford, monkeypatch) == 0
    n_train = int(400 * 0.6)
    z = np.load(tmp_path / "a" / "results.npz")
    np.testing.assert_array_equal(z["qFrames"], np.arange(2, n_train - 2))
    np.testing.assert_array_equal(z["dbFrames"], np.arange(2, n_train - 2))
    assert run_main(base + ["--seqL_filterData", "1", "--resultsPath", str(tmp_path / "b")], tiny_oxford,
                    monkeypatch) == 0
    assert len(np.load(tmp_path / "b" / "results.npz")["qFrames"]) == n_train


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

    from seqmatchnet.common.errors import UserError
    from seqmatchnet.common.runtime import get_device

    assert get_device(True, "cuda") == torch.device("cpu")
    assert get_device(False, "cpu") == torch.device("cpu")
    if torch.cuda.is_available():
        assert get_device(False, "auto").type == "cuda"
    else:
        assert get_device(False, "auto") == torch.device("cpu")     # falls back without an error
        with pytest.raises(UserError, match="--nocuda"):
            get_device(False, "cuda")


@pytest.mark.slow
def test_resume_needs_no_repeated_model_flags(tiny_oxford, monkeypatch, tmp_path, capsys):
    """flags.json knows the method: --mode test --resume RUN works for SeqMatchNet and SeqNet runs
    without --pooling or --method, and a conflicting flag is named (never 'edit flags.json')."""
    from test_train import only_run

    train = ["--mode", "train", "--dataset", "oxford-v1.0", "--seqL", "3", "--nEpochs", "1", "--figures", "none"]
    assert run_main(train + ["--method", "seqnet", "--w", "2", "--expName", "sn"], tiny_oxford, monkeypatch) == 0
    seqnet = only_run(tiny_oxford)
    assert run_main(train + ["--pooling", "--expName", "sm"], tiny_oxford, monkeypatch) == 0
    seqmatch = next(p for p in (tiny_oxford / "data" / "runs").iterdir() if p.name.endswith("_sm"))
    capsys.readouterr()
    for run, label in ((seqnet, "SeqNet w=2, learned"), (seqmatch, "sequence matching, learned projection")):
        out = tmp_path / run.name
        assert run_main(TEST + ["--seqL", "3", "--resume", str(run), "--resultsPath", str(out), "--figures", "none"],
                        tiny_oxford, monkeypatch) == 0
        summary = json.loads((out / "summary.json").read_text())
        assert summary["method_label"].startswith(f"{label} (run {run.name}, epoch 1, latest)")
        assert summary["checkpoint"]["epoch"] == 1
    # the run's own flags win over repeated or stale model flags (the log names what was restored)
    out = tmp_path / "again"
    assert run_main(TEST + ["--seqL", "3", "--resume", str(seqnet), "--pooling", "--resultsPath", str(out),
                            "--figures", "none"], tiny_oxford, monkeypatch) == 0
    assert json.loads((out / "summary.json").read_text())["method_label"].startswith("SeqNet w=2")
    # what cannot work is named as a flag of the command
    assert run_main(train[:-6] + ["--seqL", "1", "--method", "single", "--pooling", "--nEpochs", "1",
                                  "--expName", "s1", "--figures", "none"], tiny_oxford, monkeypatch) == 0
    single = next(p for p in (tiny_oxford / "data" / "runs").iterdir() if p.name.endswith("_s1"))
    capsys.readouterr()
    assert run_main(TEST + ["--seqL", "3", "--resume", str(single)], tiny_oxford, monkeypatch) == 1
    err = capsys.readouterr().err
    assert "use it with --seqL 1" in err and "edit" not in err


def test_out_dims_defaults_to_the_descriptor_dimensions(tiny_oxford, monkeypatch):
    from test_train import only_run

    args = ["--mode", "train", "--dataset", "oxford-v1.0", "--seqL", "3", "--nEpochs", "1", "--pooling",
            "--figures", "none"]
    assert run_main(args, tiny_oxford, monkeypatch) == 0
    run = only_run(tiny_oxford)
    assert json.loads((run / "checkpoints" / "flags.json").read_text())["outDims"] == 16   # tiny_oxford is 16-D
    import torch
    state = torch.load(run / "checkpoints" / "checkpoint.pth.tar", weights_only=True)["state_dict"]
    weight = state["pool.1.conv.weight"]
    assert tuple(weight.shape) == (16, 16, 1)


def test_extract_only_honours_seqL_filterData(tiny_oxford, monkeypatch, tmp_path):
    """--seqL_filterData 5: only the frames whose centred window of 5 needs no shift are written (two at
    each end of the traversal are left out), with their rows and the ground truth among them."""
    out = tmp_path / "extract"
    assert run_main(TEST + ["--seqL", "3", "--seqL_filterData", "5", "--extractOnly", "--resultsPath", str(out)],
                    tiny_oxford, monkeypatch) == 0
    z = np.load(out / "descriptors.npz", allow_pickle=False)
    n_test = 400 - int(400 * 0.65)
    assert z["dbDesc"].shape == (n_test - 4, 3, 16) and z["qDesc"].shape == (n_test - 4, 3, 16)
    np.testing.assert_array_equal(z["dbFrames"], np.arange(2, n_test - 2))
    pos = np.arange(int(400 * 0.65), 400)[2:-2] * 2.0
    offsets, indices = z["gtOffsets"], z["gtIndices"]
    for i in range(len(pos)):
        np.testing.assert_array_equal(indices[offsets[i]:offsets[i + 1]], np.flatnonzero(np.abs(pos - pos[i]) <= 10))
