"""Several processes under torchrun (docs/torchrun.md): one process's
results with 2 ranks (gloo on the CPU), one run folder, and a job that ends when one rank fails.

The end-to-end tests start ``python -m torch.distributed.run --standalone`` (127.0.0.1, a free port)
in a session of its own and kill that session's processes when they end or time out."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import ROOT

MAIN = ROOT / "main.py"
TEST_ARGS = "--mode test --dataset oxford-v1.0 --seqL 3 --figures none".split()
TRAIN_ARGS = ("--mode train --pooling --dataset oxford-v1.0 --outDims 8 --cacheRefreshRate 70 --figures none "
              "--seqL 3 --optim SGD --lrStep 1 --batchSize 6").split()


def torchrun(args: list[str], cwd: Path, nproc: int = 2, script: Path = MAIN, timeout: float = 300,
             env: dict | None = None) -> tuple[int, str, str, float]:
    """Run ``script args`` under torchrun with ``nproc`` ranks: ``(exit code, stdout, stderr, seconds)``."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
           str(script), *args, "--nocuda", "--threads", "0"]
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", "SEQMATCHNET_DIST_TIMEOUT": "60", **(env or {})}
    started = time.monotonic()
    proc = subprocess.Popen(cmd, cwd=cwd, env=full_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"torchrun did not end within {timeout} s:\n{err[-3000:]}")
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)     # any rank left behind
        except ProcessLookupError:
            pass
    return proc.returncode, out, err, time.monotonic() - started


def one_process(args: list[str], cwd: Path, monkeypatch) -> int:
    import main

    monkeypatch.chdir(cwd)
    return main.main(args + ["--nocuda", "--threads", "0", "--quiet"])


def runs_under(root: Path) -> list[Path]:
    return sorted((root / "data" / "runs").iterdir())


def checkpoint(run: Path) -> dict:
    return torch.load(run / "checkpoints" / "checkpoint.pth.tar", weights_only=True)


# ---------------------------------------------------------------- a world of one (no torchrun)

def test_world_of_one_helpers_are_identities():
    from seqmatchnet.common import distributed

    assert not distributed.active() and distributed.rank() == 0 and distributed.world_size() == 1
    assert distributed.is_main()
    assert distributed.shard(7) == slice(0, 7)
    a, b = np.arange(6).reshape(3, 2), np.array([True, False, True])
    got = distributed.all_gather_arrays(a, b)
    assert got[0] is a and got[1] is b
    assert distributed.broadcast_object({"x": 1}) == {"x": 1}
    v, i = torch.rand(4, 3), torch.arange(12).view(4, 3)
    assert distributed.all_gather_topk(v, i, 3, 12) == (v, i)
    distributed.barrier()
    distributed.shutdown()


def test_shard_bounds_cover_everything_and_keep_window_starts_together():
    from seqmatchnet.common.distributed import shard_bounds

    assert shard_bounds(10, 3) == [0, 3, 6, 10]
    assert shard_bounds(1, 2) == [0, 0, 1]
    starts = np.array([0, 0, 0, 1, 2, 3, 4, 5, 5, 5])      # shifted windows at both ends share a start
    for world in (2, 3, 4, 5):
        b = shard_bounds(len(starts), world, keep_together=starts)
        assert b[0] == 0 and b[-1] == len(starts) and all(x <= y for x, y in zip(b, b[1:]))
        assert all(c in (0, len(starts)) or starts[c] != starts[c - 1] for c in b)
    assert shard_bounds(10, 2, keep_together=np.r_[np.zeros(6), np.arange(4) + 1]) == [0, 6, 10]


def test_timeout_comes_from_the_environment(monkeypatch):
    from seqmatchnet.common.distributed import DEFAULT_TIMEOUT_S, TIMEOUT_ENV, timeout_s
    from seqmatchnet.common.errors import UserError

    monkeypatch.delenv(TIMEOUT_ENV, raising=False)
    assert timeout_s() == DEFAULT_TIMEOUT_S
    monkeypatch.setenv(TIMEOUT_ENV, "12.5")
    assert timeout_s() == 12.5
    for bad in ("0", "-3", "soon"):
        monkeypatch.setenv(TIMEOUT_ENV, bad)
        with pytest.raises(UserError, match=TIMEOUT_ENV):
            timeout_s()


def test_single_process_modes_refuse_torchrun(monkeypatch, capsys):
    import main

    monkeypatch.setenv("WORLD_SIZE", "2")
    assert main.main(["--mode", "localize"]) == 2
    assert "runs in one process" in capsys.readouterr().err


def _merge_worker(rank: int, store: str, values: torch.Tensor, ks: list[int], out: str) -> None:
    import torch.distributed as dist

    from seqmatchnet.common import distributed
    from seqmatchnet.matching.topk import topk_by_value_then_index

    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    try:
        n_db, merged = values.shape[1], []
        share = distributed.shard(n_db)
        part = values[:, share]
        for k in ks:
            v, i = topk_by_value_then_index(part, min(k, part.shape[1]))
            merged.append(distributed.all_gather_topk(v, i + share.start, min(k, n_db), n_db))
        if rank == 0:
            torch.save(merged, out)
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_merged_top_k_equals_one_process_with_ties_across_ranks(tmp_path):
    """Two gloo processes, each with half of the columns: the merged lists equal one process's,
    tie order included (many exactly equal values, some rows tied across the k-th place; k larger
    than one rank's share)."""
    import torch.multiprocessing as mp

    from seqmatchnet.matching.topk import topk_by_value_then_index

    gen = torch.Generator().manual_seed(0)
    values = torch.randint(0, 4, (6, 11), generator=gen).float()
    values[0] = 1.0                                   # one row entirely tied
    ks = [1, 3, 8, 11]
    out = tmp_path / "merged.pt"
    mp.spawn(_merge_worker, args=(str(tmp_path / "store"), values, ks, str(out)), nprocs=2, join=True)
    for k, (best, ids) in zip(ks, torch.load(out, weights_only=True)):
        want_v, want_i = topk_by_value_then_index(values, k)
        assert torch.equal(best, want_v) and torch.equal(ids, want_i), k


# ---------------------------------------------------------------- torchrun, end to end

@pytest.mark.slow
@pytest.mark.parametrize("streamed", [False, True], ids=["dense", "streamed"])
def test_test_mode_with_two_ranks_equals_one_process(reference_copy, tmp_path, monkeypatch, streamed):
    """The reference fixture's Nordland test split with the reference-trained checkpoint (every
    rank reads it): predictions, distances and recalls identical, written once by rank 0; also when the
    map is streamed from its file in chunks (--mapChunk), each rank streaming its share."""
    args = ("--mode test --dataset nordland-sw --seqL 5 --pooling --split test --resume "
            "data/runs/ref_oxford_l5_1epoch --figures none").split() + (["--mapChunk", "700"] if streamed else [])
    assert one_process(args + ["--resultsPath", str(tmp_path / "one")], reference_copy, monkeypatch) == 0
    rc, out, err, _ = torchrun(args + ["--resultsPath", str(tmp_path / "two")], reference_copy)
    assert rc == 0, err[-3000:]
    assert out.count("R@100") == 1                      # only rank 0 prints the recalls
    one = np.load(tmp_path / "one" / "results.npz")
    two = np.load(tmp_path / "two" / "results.npz")
    assert set(one.files) == set(two.files)
    for name in one.files:
        np.testing.assert_array_equal(two[name], one[name], err_msg=name)
    s1 = json.loads((tmp_path / "one" / "summary.json").read_text())
    s2 = json.loads((tmp_path / "two" / "summary.json").read_text())
    assert s1["recalls"] == s2["recalls"]


@pytest.mark.slow
@pytest.mark.parametrize("search", ["streamed", "shortlist"])
def test_velocities_under_torchrun_equal_one_process(reference_copy, tmp_path, monkeypatch, search):
    """--velocities under torchrun: each rank scores its share's trajectories (reaching frames beyond the
    share), the statistics are summed and the lists merged; with --shortlist each rank re-ranks a share of
    the queries with the statistics of all: predictions, scores, velocities and recalls are one
    process's, streamed (3 ranks, as the dense map: one path) and shortlisted (2 ranks)."""
    args = ("--mode test --dataset nordland-sw --seqL 5 --pooling --split test --resume "
            "data/runs/ref_oxford_l5_1epoch --figures none --velocities 0.5:2:0.5").split()
    args += {"streamed": ["--mapChunk", "700"],
             "shortlist": ["--mapChunk", "700", "--shortlist", "40", "--nprobe", "1"]}[search]
    assert one_process(args + ["--resultsPath", str(tmp_path / "one")], reference_copy, monkeypatch) == 0
    rc, out, err, _ = torchrun(args + ["--resultsPath", str(tmp_path / "two")], reference_copy,
                               nproc=3 if search == "streamed" else 2)
    assert rc == 0, err[-3000:]
    one = np.load(tmp_path / "one" / "results.npz")
    two = np.load(tmp_path / "two" / "results.npz")
    assert "velocities" in one.files and set(one.files) == set(two.files)
    np.testing.assert_allclose(two["dists"], one["dists"], rtol=1e-6)
    for name in one.files:
        if name != "dists":
            np.testing.assert_array_equal(two[name], one[name], err_msg=name)


@pytest.mark.slow
def test_training_with_two_ranks_equals_one_process_and_resumes_exactly(tiny_oxford, tmp_path, monkeypatch):
    """One epoch with 2 ranks ends with one process's weights (same triplets, same steps); a run
    resumed under torchrun ends exactly where a straight torchrun run does; one run folder each."""
    two, straight = tmp_path / "two", tmp_path / "straight"
    shutil.copytree(tiny_oxford, two)
    shutil.copytree(tiny_oxford, straight)
    assert one_process(TRAIN_ARGS + ["--nEpochs", "1"], tiny_oxford, monkeypatch) == 0
    want = checkpoint(runs_under(tiny_oxford)[0])

    rc, out, err, _ = torchrun(TRAIN_ARGS + ["--nEpochs", "1"], two)
    assert rc == 0, err[-3000:]
    [run] = runs_under(two)
    got = checkpoint(run)
    for key, w in want["state_dict"].items():
        rel = ((got["state_dict"][key] - w).abs().max() / w.abs().max()).item()
        assert rel < 1e-4, (key, rel)
    assert torch.equal(got["neg_cache"], want["neg_cache"])          # the same triplets were mined
    assert got["recalls"] == want["recalls"]
    np.testing.assert_allclose(got["history"]["loss"], want["history"]["loss"], rtol=1e-5)
    assert len(list(run.glob("events.out.tfevents.*"))) == 1
    assert (run / "train.log").read_text().count("epoch 1: average loss") == 1

    rc, _, err, _ = torchrun(TRAIN_ARGS + ["--nEpochs", "2", "--resume", str(run)], two)
    assert rc == 0, err[-3000:]
    rc, _, err, _ = torchrun(TRAIN_ARGS + ["--nEpochs", "2"], straight)
    assert rc == 0, err[-3000:]
    assert len(runs_under(two)) == len(runs_under(straight)) == 1
    resumed, direct = checkpoint(run), checkpoint(runs_under(straight)[0])
    assert resumed["epoch"] == direct["epoch"] == 2
    for key in direct["state_dict"]:
        torch.testing.assert_close(resumed["state_dict"][key], direct["state_dict"][key], rtol=0, atol=0)
    assert torch.equal(resumed["neg_cache"], direct["neg_cache"])
    assert resumed["recalls"] == direct["recalls"]


@pytest.mark.slow
def test_training_across_speeds_with_two_ranks_equals_one_process(tiny_oxford, tmp_path, monkeypatch):
    """One epoch with --velocities (the loss, the mining matrix and the validation across speeds) with 2
    ranks ends with one process's weights, triplets and validation recalls."""
    two = tmp_path / "two"
    shutil.copytree(tiny_oxford, two)
    args = TRAIN_ARGS + ["--nEpochs", "1", "--velocities", "0.5:2:0.5"]
    assert one_process(args, tiny_oxford, monkeypatch) == 0
    want = checkpoint(runs_under(tiny_oxford)[0])
    rc, out, err, _ = torchrun(args, two)
    assert rc == 0, err[-3000:]
    got = checkpoint(runs_under(two)[0])
    for key, w in want["state_dict"].items():
        rel = ((got["state_dict"][key] - w).abs().max() / w.abs().max()).item()
        assert rel < 1e-4, (key, rel)
    assert torch.equal(got["neg_cache"], want["neg_cache"])          # the same triplets were mined
    assert got["recalls"] == want["recalls"] and want["recalls"]


FAULTY = """
import os, signal, sys, time
sys.path.insert(0, {root!r})
from seqmatchnet.common.errors import UserError
from seqmatchnet.search import diagonal

def bad_input(*args, **kwargs):
    raise UserError("descriptor file damaged on this machine")

def hang(*args, **kwargs):
    time.sleep(600)

def killed(*args, **kwargs):
    os.kill(os.getpid(), signal.SIGKILL)

if os.environ["RANK"] == "1":
    diagonal.chunked_topk = {{"bad_input": bad_input, "hang": hang, "killed": killed}}[{fault!r}]
import main
sys.exit(main.main())
"""


@pytest.mark.slow
@pytest.mark.parametrize("fault", ["bad_input", "hang", "killed"])
def test_a_failing_rank_ends_the_job_with_a_message(tiny_oxford, tmp_path, fault):
    """Rank 1 fails while rank 0 waits for it in a collective: the job ends, non-zero, with one
    clear line, within the collective timeout (5 s here) and the start-up time."""
    script = tmp_path / "faulty_main.py"
    script.write_text(textwrap.dedent(FAULTY.format(root=str(ROOT), fault=fault)))
    rc, out, err, seconds = torchrun(TEST_ARGS + ["--resultsPath", str(tmp_path / "res")], tiny_oxford,
                                     script=script, timeout=180, env={"SEQMATCHNET_DIST_TIMEOUT": "5"})
    assert rc != 0
    if fault == "bad_input":
        assert "error: descriptor file damaged on this machine" in err
    if fault == "hang":
        assert "error: rank 0 of 2: gathering the ranked lists failed" in err
        assert "did not answer within 5 s (SEQMATCHNET_DIST_TIMEOUT)" in err
    assert not (tmp_path / "res" / "results.npz").exists()
    assert seconds < 150


@pytest.mark.parametrize("world", [2, 3, 5])
def test_database_shares_cover_the_windows_once_and_keep_tied_starts_together(monkeypatch, world):
    """``search.DatabaseShare``: the ranks' shares are consecutive, disjoint and cover every window;
    no share splits the windows of one start (the shifted ones at a traversal's ends); each share's
    frames are those its windows cover."""
    from seqmatchnet.common import distributed
    from seqmatchnet.data.windows import sequence_windows
    from seqmatchnet.search import diagonal

    bounds = np.array([(0, 40)] * 40 + [(40, 75)] * 35)
    starts = sequence_windows(bounds, 5)[0]
    shares = []
    for r in range(world):
        monkeypatch.setattr(distributed, "world_size", lambda w=world: w)
        monkeypatch.setattr(distributed, "rank", lambda r=r: r)
        shares.append(diagonal.DatabaseShare.of(starts, 5))
    assert shares[0].windows.start == 0 and shares[-1].windows.stop == len(starts)
    for a, b in zip(shares, shares[1:]):
        assert a.windows.stop == b.windows.start
        if 0 < b.windows.start < len(starts):
            assert starts[b.windows.start] != starts[b.windows.start - 1]
    for sh in shares:
        mine = starts[sh.windows]
        if len(mine):
            assert sh.frames == slice(int(mine.min()), int(mine.max()) + 5)


IVF_MAIN = """
import sys
sys.path.insert(0, {root!r})
from seqmatchnet.search import shortlist
shortlist.choose_index = lambda n, dim: shortlist.IndexChoice("ivf-flat", {nlist})
import main
sys.exit(main.main())
"""


@pytest.mark.slow
@pytest.mark.parametrize("nlist", [0, 16, 150], ids=["flat", "ivf-flat", "ivf-re-searched"])
def test_shortlist_with_two_ranks_equals_one_process(reference_copy, tmp_path, monkeypatch, nlist):
    """--shortlist on a streamed map under torchrun: each rank indexes and streams its share of the
    windows (the same trained quantiser on both), the shards' candidates are merged, the queries'
    re-ranking is divided: predictions, distances and the shortlist's recall equal one process's (with 150
    lists of about 20 windows, 40 candidates need more than one list: the shards re-search together)."""
    if nlist:
        script = tmp_path / "ivf_main.py"
        script.write_text(textwrap.dedent(IVF_MAIN.format(root=str(ROOT), nlist=nlist)))
    else:
        script = MAIN
    args = ("--mode test --dataset nordland-sw --seqL 5 --pooling --split test --resume "
            "data/runs/ref_oxford_l5_1epoch --figures none --mapChunk 700 --shortlist 40 --nprobe 1").split()
    one = subprocess.run([sys.executable, str(script), *args, "--resultsPath", str(tmp_path / "one"), "--nocuda",
                          "--threads", "0", "--quiet"], cwd=reference_copy, capture_output=True, text=True,
                         timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert one.returncode == 0, one.stderr[-3000:]
    rc, out, err, _ = torchrun(args + ["--resultsPath", str(tmp_path / "two")], reference_copy, script=script)
    assert rc == 0, err[-3000:]
    a, b = np.load(tmp_path / "one" / "results.npz"), np.load(tmp_path / "two" / "results.npz")
    for name in ("preds", "dists", "recalls"):
        np.testing.assert_array_equal(b[name], a[name], err_msg=name)
    s1 = json.loads((tmp_path / "one" / "summary.json").read_text())["shortlist"]
    s2 = json.loads((tmp_path / "two" / "summary.json").read_text())["shortlist"]
    assert s1["recall"] == s2["recall"] and s1["index"] == s2["index"]
    assert ("ivf-flat" in s1["index"]) == bool(nlist)
