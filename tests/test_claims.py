"""Claims of the README and docs/ checked on small data: memory bounded by the chunks, OMP_WAIT_POLICY, the demo's
table, oxford-pnv, "S1 + SeqMatch", early stopping, --evalEvery, --optim ADAM, --figures end,
--cacheRefreshRate 0, the best checkpoint and --ckpt best, and the option refusals."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import plain
from conftest import ROOT, needs_reference, unit_rows
from test_train import TRAIN, only_run, run_main

N_VALUES = (1, 5, 10, 20, 100)


# ---------------------------------------------------------------- memory bounded by --queryChunk / --dbChunk

class BlockSpy:
    """Records the shape of every frame-distance block and window-distance block scoring allocates."""

    def __init__(self, monkeypatch):
        from seqmatchnet.matching import seqmatch

        self.frames, self.windows = [], []
        real_frames, real_windows = seqmatch.frame_distances, seqmatch.window_distances

        def frames(a, b):
            out = real_frames(a, b)
            self.frames.append(tuple(out.shape))
            return out

        def windows(*args, **kwargs):
            out = real_windows(*args, **kwargs)
            self.windows.append(tuple(out.shape))
            return out

        monkeypatch.setattr(seqmatch, "frame_distances", frames)
        monkeypatch.setattr(seqmatch, "window_distances", windows)

    def largest(self) -> int:
        return max(a * b for a, b in self.frames + self.windows)

    def clear(self) -> None:
        self.frames.clear()
        self.windows.clear()


def score(n_db: int, n_q: int, seq_len: int, query_chunk: int, db_chunk: int = 0):
    from seqmatchnet.data.windows import segment_bounds, sequence_windows
    from seqmatchnet.search import diagonal
    from seqmatchnet.search.sides import Windows

    rng = np.random.default_rng(n_q)
    db, q = torch.from_numpy(unit_rows(rng, n_db, 8)), torch.from_numpy(unit_rows(rng, n_q, 8))
    db_starts, _ = sequence_windows(segment_bounds(n_db), seq_len)
    q_starts, _ = sequence_windows(segment_bounds(n_q), seq_len)
    return diagonal.rank(Windows(db, db_starts), Windows(q, q_starts), seq_len, k=10,
                         query_chunk=query_chunk, db_chunk=db_chunk, quiet=True)


def test_scoring_blocks_grow_with_the_chunks_not_with_the_queries(monkeypatch):
    spy = BlockSpy(monkeypatch)
    n_db, seq_len = 300, 5
    peaks = {}
    for n_q in (100, 800):                                   # 8x the queries, same chunk
        spy.clear()
        score(n_db, n_q, seq_len, query_chunk=50)
        peaks[n_q] = spy.largest()
        assert all(b <= 50 + seq_len - 1 for _, b in spy.frames)          # frames of one query chunk
        assert all(b <= 50 for _, b in spy.windows)
    assert max(peaks.values()) <= n_db * (50 + seq_len - 1)
    assert peaks[800] <= 1.1 * peaks[100]                    # not 8x
    spy.clear()
    score(n_db, 800, seq_len, query_chunk=400)               # 8x the chunk, same queries
    assert spy.largest() >= 6 * peaks[800]
    spy.clear()
    score(n_db, 800, seq_len, query_chunk=400, db_chunk=60)  # database chunks bound the other side
    assert spy.frames and all(a <= 60 + seq_len - 1 for a, _ in spy.frames)
    assert all(a <= 60 for a, _ in spy.windows)


@pytest.mark.slow
def test_chunk_options_reach_scoring_and_do_not_change_predictions(tiny_oxford, monkeypatch, tmp_path):
    args = ["--mode", "test", "--dataset", "oxford-v1.0", "--split", "test", "--seqL", "5", "--figures", "none"]
    assert run_main(args + ["--resultsPath", str(tmp_path / "whole")], tiny_oxford, monkeypatch) == 0
    spy = BlockSpy(monkeypatch)
    assert run_main(args + ["--queryChunk", "16", "--dbChunk", "40", "--resultsPath", str(tmp_path / "chunked")],
                    tiny_oxford, monkeypatch) == 0
    assert spy.frames and all(a <= 40 + 4 and b <= 16 + 4 for a, b in spy.frames)
    whole = np.load(tmp_path / "whole" / "results.npz")
    chunked = np.load(tmp_path / "chunked" / "results.npz")
    np.testing.assert_array_equal(chunked["preds"], whole["preds"])
    np.testing.assert_allclose(chunked["dists"], whole["dists"], atol=1e-6)


# ---------------------------------------------------------------- OMP_WAIT_POLICY

@pytest.mark.parametrize("given,want", [(None, "PASSIVE"), ("ACTIVE", "ACTIVE")])
def test_main_sets_omp_wait_policy_unless_given(given, want):
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    if given is not None:
        env["OMP_WAIT_POLICY"] = given
    code = ("import os, sys; import main; "
            "print(os.environ.get('OMP_WAIT_POLICY'), 'torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, out.stderr
    policy, torch_loaded = out.stdout.split()
    assert policy == want
    assert torch_loaded == "False"           # set before torch (and its OpenMP runtime) loads


# ---------------------------------------------------------------- the demo's table

@pytest.mark.slow
def test_demo_table_orders_trained_over_raw_sequences_over_single_frames(tmp_path, monkeypatch, capsys):
    import main

    monkeypatch.chdir(tmp_path)
    rc = main.main(["--mode", "demo", "--nEpochs", "2", "--nocuda"])
    out = capsys.readouterr().out
    rows = {}
    for label in ("single frame (raw)", "sequence matching (raw)", "SeqMatchNet (trained)"):
        line = next(x for x in out.splitlines() if x.startswith(label + " "))
        rows[label] = [float(v) for v in line[len(label):].split()]
    assert rc == 0, out
    r1 = [rows[k][0] for k in ("single frame (raw)", "sequence matching (raw)", "SeqMatchNet (trained)")]
    assert r1[2] > r1[1] > r1[0], r1
    for values in rows.values():
        assert 0 <= values[0] <= values[1] <= values[2] <= 1           # R@1 <= R@5 <= R@10
    assert len(list((tmp_path / "data" / "runs").iterdir())) == 1


# ---------------------------------------------------------------- --dataset oxford-pnv

@pytest.mark.slow
@needs_reference
def test_oxford_pnv_loads_its_own_files_and_threshold(reference_copy, monkeypatch, tmp_path):
    from seqmatchnet.data.structs import load_split_indices, load_struct

    out = tmp_path / "pnv"
    args = ["--mode", "test", "--dataset", "oxford-pnv", "--split", "test", "--seqL", "1", "--matcher", "None",
            "--resultsPath", str(out), "--figures", "none"]
    assert run_main(args, reference_copy, monkeypatch) == 0
    structs = reference_copy / "structFiles"
    s = load_struct(next(structs.glob("oxford-pnv_*_test_d-25_d2-5.db")))
    db_rows, q_rows = load_split_indices(structs / "oxford-pnv_splitInds.npz", "test")
    assert (s.num_db, s.num_q, s.pos_dist_thr) == (len(db_rows), len(q_rows), 25.0)
    z = np.load(out / "results.npz")
    assert len(z["dbFrames"]) == len(db_rows) and len(z["qFrames"]) == len(q_rows)
    # single frames: a plain nearest-neighbour search over the split's rows of the two descriptor files
    desc = reference_copy / "data" / "descData" / "netvlad-pytorch"
    db = np.load(desc / "oxford_2015-03-17-11-08-44_stereo_left.npy")[db_rows].astype(np.float64)
    q = np.load(desc / "oxford_2014-12-16-18-44-24_stereo_left.npy")[q_rows].astype(np.float64)
    db /= np.linalg.norm(db, axis=1, keepdims=True)
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    for j in range(0, len(q), 53):
        d = [np.linalg.norm(db[i] - q[j]) for i in range(len(db))]
        best = int(np.argmin(d))
        assert abs(d[int(z["preds"][j, 0])] - d[best]) < 1e-5
    # Recall@N at the pnv threshold (25 m), from the predictions, by a plain loop
    first = plain.plain_first_hits(z["preds"], s.db_positions, s.q_positions, 25.0)
    want = plain.plain_recall_from_first_hits(first)
    got = dict(zip(z["n_values"].tolist(), z["recalls"].tolist()))
    for n in N_VALUES:
        assert got[n] == pytest.approx(want[n], abs=1e-9)
    # the 10 m threshold of oxford-v1.0 would give a different table: the threshold was really 25 m
    assert plain.plain_recall_from_first_hits(
        plain.plain_first_hits(z["preds"], s.db_positions, s.q_positions, 10.0))[1] != got[1]


# ---------------------------------------------------------------- "S1 + SeqMatch"

@pytest.mark.slow
def test_single_frame_projection_is_used_for_sequence_matching(tiny_oxford, monkeypatch, tmp_path):
    assert run_main(TRAIN + ["--seqL", "1", "--nEpochs", "1", "--expName", "s1"], tiny_oxford, monkeypatch) == 0
    run = only_run(tiny_oxford)
    out = tmp_path / "s1seq"
    assert run_main(["--mode", "test", "--dataset", "oxford-v1.0", "--split", "test", "--seqL", "5", "--pooling",
                     "--resume", str(run), "--resultsPath", str(out), "--figures", "none"], tiny_oxford,
                    monkeypatch) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["checkpoint"]["run"] == run.name and summary["options"]["seqL"] == 5
    z = np.load(out / "results.npz")
    # plain: project every frame with the single-frame checkpoint, then mean frame distance over windows of 5
    sd = torch.load(run / "checkpoints" / "checkpoint.pth.tar", weights_only=True)["state_dict"]
    w, b = sd["pool.1.conv.weight"][:, :, 0].double().numpy(), sd["pool.1.conv.bias"].double().numpy()
    test_rows = np.arange(int(400 * 0.65), 400)
    desc = tiny_oxford / "data" / "descData" / "netvlad-pytorch"

    def project(name):
        x = np.load(desc / name)[test_rows].astype(np.float64) @ w.T + b
        return x / np.linalg.norm(x, axis=1, keepdims=True)

    db, q = project("oxford_2015-03-17-11-08-44_stereo_left.npy"), project("oxford_2014-12-16-18-44-24_stereo_left.npy")
    bounds = plain.default_bounds(len(db), len(q))
    db_w, q_w = plain.plain_windows(bounds[0], 5), plain.plain_windows(bounds[1], 5)
    for j in range(0, len(q), 7):
        d = plain.plain_score_matrix(db, q, db_w, q_w[j:j + 1])[:, 0]
        assert z["dists"][j, 0] == pytest.approx(d.min(), abs=1e-4)
        assert d[int(z["preds"][j, 0])] == pytest.approx(d.min(), abs=1e-4)


# ---------------------------------------------------------------- validation schedule, best checkpoint

class ControlledValidation:
    """Runs the real validation, keeps its recalls in ``real``, and reports ``r5[k]`` as Recall@5 of the
    k-th validation (Recall@1 set to ``r1[k]`` where given), so that the test chooses the best one."""

    def __init__(self, monkeypatch, r5: dict, r1: dict | None = None):
        from seqmatchnet.training import epochs as project_train

        self.calls, self.real = [], {}
        real = project_train.evaluate

        def evaluate(opt, split, model, device, *args, **kwargs):
            result = real(opt, split, model, device, *args, **kwargs)
            self.calls.append(result)
            epoch = len(self.calls)
            self.real[epoch] = dict(result.recalls)
            recalls = {n: 0.1 for n in N_VALUES}
            recalls[5] = r5[epoch] if isinstance(r5, dict) else r5(epoch)
            if r1 and epoch in r1:
                recalls[1] = r1[epoch]
            result.recalls = recalls
            return result

        monkeypatch.setattr(project_train, "evaluate", evaluate)


@pytest.mark.slow
def test_model_best_is_the_best_validation_recall_at_5_and_ckpt_best_loads_it(tiny_oxford, monkeypatch, tmp_path):
    val = ControlledValidation(monkeypatch, r5={1: 0.3, 2: 0.5, 3: 0.4, 4: 0.45}, r1={3: 0.9})
    assert run_main(TRAIN + ["--seqL", "3", "--nEpochs", "4"], tiny_oxford, monkeypatch) == 0
    real = val.real
    monkeypatch.undo()
    run = only_run(tiny_oxford)
    ckpts = run / "checkpoints"
    best = torch.load(ckpts / "model_best.pth.tar", weights_only=True)
    latest = torch.load(ckpts / "checkpoint.pth.tar", weights_only=True)
    assert best["epoch"] == 2 and latest["epoch"] == 4
    assert best["best_score"] == pytest.approx(0.5) and latest["best_score"] == pytest.approx(0.5)
    assert not torch.equal(best["state_dict"]["pool.1.conv.weight"], latest["state_dict"]["pool.1.conv.weight"])
    for which, epoch in (("best", 2), ("latest", 4)):
        out = tmp_path / which
        assert run_main(["--mode", "test", "--dataset", "oxford-v1.0", "--split", "test", "--seqL", "3",
                         "--resume", str(run), "--ckpt", which, "--resultsPath", str(out), "--figures", "none"],
                        tiny_oxford, monkeypatch) == 0
        summary = json.loads((out / "summary.json").read_text())
        assert summary["checkpoint"]["epoch"] == epoch and summary["checkpoint"]["which"] == which
        z = np.load(out / "results.npz")
        recalls = dict(zip(z["n_values"].tolist(), z["recalls"].tolist()))
        # validation is the test split on Oxford: the loaded weights give that epoch's real validation recalls
        assert recalls == pytest.approx(real[epoch], abs=1e-12)


@pytest.mark.slow
@pytest.mark.parametrize("patience", [1, 2])
def test_patience_stops_when_validation_does_not_improve(tiny_oxford, monkeypatch, patience):
    """The reference's rule: stop once the validations without improvement exceed patience / evalEvery."""
    ControlledValidation(monkeypatch, r5=lambda epoch: 0.5 if epoch == 1 else 0.4)
    assert run_main(TRAIN + ["--seqL", "3", "--nEpochs", "10", "--patience", str(patience)], tiny_oxford,
                    monkeypatch) == 0
    ckpt = torch.load(only_run(tiny_oxford) / "checkpoints" / "checkpoint.pth.tar", weights_only=True)
    assert ckpt["epoch"] == 1 + patience + 1 < 10
    assert ckpt["history"]["epochs"] == list(range(1, patience + 3))
    assert "stopping early" in (only_run(tiny_oxford) / "train.log").read_text()


@pytest.mark.slow
def test_patience_does_not_stop_while_validation_improves(tiny_oxford, monkeypatch):
    ControlledValidation(monkeypatch, r5=lambda epoch: 0.1 * epoch)
    assert run_main(TRAIN + ["--seqL", "3", "--nEpochs", "4", "--patience", "1"], tiny_oxford, monkeypatch) == 0
    ckpt = torch.load(only_run(tiny_oxford) / "checkpoints" / "checkpoint.pth.tar", weights_only=True)
    assert ckpt["epoch"] == 4


@pytest.mark.slow
def test_eval_every_validates_only_on_its_epochs(tiny_oxford, monkeypatch):
    val = ControlledValidation(monkeypatch, r5=lambda epoch: 0.1 * epoch)
    assert run_main(TRAIN + ["--seqL", "3", "--nEpochs", "5", "--evalEvery", "2"], tiny_oxford, monkeypatch) == 0
    assert len(val.calls) == 2
    ckpt = torch.load(only_run(tiny_oxford) / "checkpoints" / "checkpoint.pth.tar", weights_only=True)
    assert ckpt["history"]["epochs"] == [1, 2, 3, 4, 5]
    assert ckpt["history"]["val_epochs"] == [2, 4]
    assert len(ckpt["history"]["val_recalls"][5]) == 2
    assert ckpt["recalls"] == {}                                 # epoch 5 was not validated
    best = torch.load(only_run(tiny_oxford) / "checkpoints" / "model_best.pth.tar", weights_only=True)
    assert best["epoch"] == 4


@pytest.mark.slow
@pytest.mark.parametrize("figures", ["end", "epoch"])
def test_figures_end_draws_once_after_the_last_epoch(tiny_oxford, monkeypatch, figures):
    from seqmatchnet.evaluation import figures as figures_mod
    from seqmatchnet.training import epochs as project_train

    drawn, saved = [], []
    real_write, real_save = project_train.write_figures, figures_mod.save_figure

    def write_figures(result, split, seq_len, out_dir, label, *args, **kwargs):
        drawn.append(label)
        return real_write(result, split, seq_len, out_dir, label, *args, **kwargs)

    def save_figure(fig, path, *args, **kwargs):
        saved.append(os.path.basename(str(path)))
        return real_save(fig, path, *args, **kwargs)

    monkeypatch.setattr(project_train, "write_figures", write_figures)
    monkeypatch.setattr(figures_mod, "save_figure", save_figure)
    assert run_main(TRAIN + ["--seqL", "3", "--nEpochs", "2", "--figures", figures], tiny_oxford, monkeypatch) == 0
    run = only_run(tiny_oxford)
    if figures == "end":
        assert drawn == ["epoch 2 validation"]
        assert saved.count("training_curves.png") == 1
    else:
        assert drawn == ["epoch 1 validation", "epoch 2 validation"]
        assert saved.count("training_curves.png") == 2
    assert {"training_curves.png", "val_recall_at_n.png", "val_precision_recall.png"} <= {p.name for p in
                                                                                         run.glob("*.png")}


def test_cache_refresh_rate_0_refreshes_once_per_epoch(tiny_oxford, monkeypatch, refreshes):
    seen = refreshes
    assert run_main(TRAIN + ["--seqL", "3", "--nEpochs", "2", "--cacheRefreshRate", "0"], tiny_oxford,
                    monkeypatch) == 0
    assert len(seen) == 2
    for chunk, queries in seen:
        np.testing.assert_array_equal(chunk, queries)             # every training query in the one chunk


# ---------------------------------------------------------------- refusals

@pytest.mark.parametrize("args,flags", [
    (["--mode", "test", "--method", "seqnet", "--pooling", "--seqL", "3"], ["--method seqnet", "--pooling"]),
    (["--mode", "test", "--method", "single", "--seqL", "3"], ["--method single", "--seqL 1"]),
    (["--mode", "train", "--pooling", "--extractOnly", "--seqL", "3"], ["--extractOnly"]),
    (["--mode", "test", "--seqL", "3", "--threads", "-1"], ["--threads"]),
])
def test_option_combinations_that_cannot_work_are_refused(tmp_path, monkeypatch, capsys, args, flags):
    import main

    monkeypatch.chdir(tmp_path)
    assert main.main(args + ["--dataset", "oxford-v1.0", "--nocuda"]) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), captured.err
    for flag in flags:
        assert flag in lines[0], lines[0]
    assert not any(tmp_path.iterdir())                            # refused before anything was written
    assert re.search(r"Traceback", captured.out + captured.err) is None


@pytest.mark.slow
def test_resuming_a_run_stopped_by_patience_does_nothing(tiny_oxford, monkeypatch, capsys):
    """A run that stopped early (--patience, restored from its flags.json on --resume, as the reference)
    resumed with the same command trains no further epoch, changes no file and says why."""
    ControlledValidation(monkeypatch, r5=lambda epoch: 0.5 if epoch == 1 else 0.4)
    args = TRAIN + ["--seqL", "3", "--nEpochs", "10", "--patience", "1"]
    assert run_main(args, tiny_oxford, monkeypatch) == 0
    run = only_run(tiny_oxford)
    ckpt_file = run / "checkpoints" / "checkpoint.pth.tar"
    stamp = ckpt_file.stat().st_mtime_ns
    capsys.readouterr()
    assert run_main(args + ["--resume", str(run)], tiny_oxford, monkeypatch) == 0
    out = capsys.readouterr().out
    assert "stopped early after epoch 3" in out and f"--init {run}" in out
    assert ckpt_file.stat().st_mtime_ns == stamp


def test_nothing_to_do_names_why():
    from seqmatchnet.runs import folders

    ckpt = {"epoch": 3, "not_improved": 2}
    assert "finished its 3 epochs" in folders.nothing_to_do(Path("r"), ckpt, 3, 0, 1)
    assert "stopped early after epoch 3" in folders.nothing_to_do(Path("r"), ckpt, 10, 1, 1)
    assert folders.nothing_to_do(Path("r"), ckpt, 10, 2, 1) is None          # 2 validations do not exceed 2
    assert folders.nothing_to_do(Path("r"), ckpt, 10, 0, 1) is None          # no patience: continue


@pytest.mark.slow
def test_gpu_check_self_test_passes():
    """``bench/gpu_check.py --self-test`` runs every device check with the CPU standing in (the GPU run
    needs a CUDA machine), so the script stays runnable as the code moves."""
    root = Path(__file__).resolve().parents[1]
    proc = subprocess.run([sys.executable, str(root / "bench" / "gpu_check.py"), "--self-test", "--rank-size", "400",
                           "--rank-dim", "32", "--epoch-frames", "500"], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "all checks passed" in proc.stdout and "--velocities top-100 scores" in proc.stdout
