"""The fault suite: bad inputs, crashes, interrupts, concurrent runs, failing writes and hostile
checkpoints (run alone with ``pytest -m faults``).

Every bad input must end in a non-zero exit and one ``error: ...`` line that names the file or
option and says what to do, never a traceback (``--debug`` shows it). Each such case runs the CLI
as a subprocess in its own copy of a tiny dataset in the Oxford layout (and of a one-epoch run).

The CLI runs in processes forked from a warm Python that imported torch once
(``tests/warm_python.py``): each case is still a process of its own, with its exit code and output.

Crashes are injected deterministically: a small driver script wraps one of the project's functions
so that its n-th call kills the process (SIGKILL), raises KeyboardInterrupt or hits a full disk,
then runs ``main.main(argv)``. Every training run goes through that driver (with no fault when none
is wanted) so that figures are not drawn: they cost seconds per epoch and are not under test here.
Cheap variants of a case (more hostile flags.json values, more damaged checkpoints) call the
loader in-process.

The subprocess scenarios are independent, so they all run first, a few at a time (one per CPU),
in the session fixture ``outcomes``; each test then checks its scenario's outcome. At the end of
the session a line ``faults: N tried, N handled`` is printed: every test is one fault case, handled
when all its checks pass.
"""
from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
import textwrap
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import OX_PREFIX, REFERENCE, make_tiny_oxford, write_struct
from warm_python import WarmPython

pytestmark = pytest.mark.faults

ROOT = Path(__file__).resolve().parents[1]
DESC = Path("data/descData/netvlad-pytorch")
DB_NPY = "oxford_2015-03-17-11-08-44_stereo_left.npy"
Q_NPY = "oxford_2014-12-16-18-44-24_stereo_left.npy"
TEST_STRUCT = f"{OX_PREFIX}_test_d-10_d2-5.db"
SPLIT_INDS = "oxford-v1.0_splitInds.npz"
N_FRAMES, DIM = 200, 16
TEST_ROWS = np.arange(int(N_FRAMES * 0.65), N_FRAMES)      # the tiny dataset's test split (70 frames)
POS = np.stack([np.arange(N_FRAMES) * 2.0, np.zeros(N_FRAMES)], axis=1)
MARKER = "PWNED"        # a hostile payload would create this file in the scenario folder

BASE = ["--dataset", "oxford-v1.0", "--seqL", "3", "--nocuda", "--threads", "0"]
TEST_ARGS = ["--mode", "test", "--split", "test", *BASE]
TRAIN_ARGS = ["--mode", "train", "--pooling", "--outDims", "16", *BASE]
WORKERS = max(2, os.cpu_count() or 2)


# ---------------------------------------------------------------- counting the cases

COUNTS = {"tried": 0, "handled": 0}


class _FaultCounter:
    """Counts this module's test outcomes: every test is one fault case."""

    def pytest_runtest_logreport(self, report) -> None:
        if not report.nodeid.split("::")[0].endswith("test_faults.py"):
            return
        if report.when == "call" or (report.when == "setup" and report.failed):
            if report.skipped and not hasattr(report, "wasxfail"):
                return      # not applicable here (e.g. the reference fixture is absent)
            COUNTS["tried"] += 1
            COUNTS["handled"] += int(report.passed)


@pytest.fixture(scope="session", autouse=True)
def fault_summary(request):
    counter = _FaultCounter()
    request.config.pluginmanager.register(counter, "seqmatchnet-fault-counter")
    yield
    request.config.pluginmanager.unregister(counter)
    line = f"\nfaults: {COUNTS['tried']} tried, {COUNTS['handled']} handled"
    capman = request.config.pluginmanager.getplugin("capturemanager")
    if capman is None:
        print(line, file=sys.__stdout__, flush=True)
    else:
        with capman.global_and_fixture_disabled():     # pytest captures fd 1 while fixtures finish
            print(line, file=sys.__stdout__, flush=True)


# ---------------------------------------------------------------- running the CLI

WARM = WarmPython()          # each CLI case is a process forked from a Python that imported torch once


@pytest.fixture(scope="module", autouse=True)
def warm_python():
    yield WARM
    WARM.close()


def run_cli(cwd: Path, *args: str) -> subprocess.CompletedProcess:
    return WARM.run(ROOT / "main.py", args, cwd)


DRIVER = textwrap.dedent('''
    """Run main.main(argv) with a fault injected at the n-th call of one function ("none": no fault).
    Figures are not drawn: they cost seconds per epoch and are not what these cases test."""
    import errno, io, os, signal, sys
    sys.path.insert(0, os.environ["SEQMATCHNET_ROOT"])
    import main, torch
    from seqmatchnet.cli import test
    from seqmatchnet.evaluation import figures
    from seqmatchnet.runs import tracking
    from seqmatchnet.training import epochs, steps

    test.write_figures = epochs.write_figures = lambda *args, **kwargs: {}
    figures.training_curves_figure = figures.save_figure = lambda *args, **kwargs: None
    tracking.MetricsWriter.figure = lambda self, *args, **kwargs: None

    action, target, nth = sys.argv[1], sys.argv[2], int(sys.argv[3])
    calls = [0]

    def fire():
        if action == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        if action == "interrupt":
            raise KeyboardInterrupt
        raise SystemExit("unknown action " + action)

    class FullDisk:
        """A file whose writes fail with ENOSPC after 512 bytes, as on a full disk."""
        def __init__(self, f):
            self.f, self.left = f, 512
        def write(self, b):
            if len(b) > self.left:
                self.f.write(bytes(b[: self.left]))
                self.left = 0
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            self.left -= len(b)
            return self.f.write(b)
        def flush(self):
            self.f.flush()

    if target == "save":            # fail half-way through writing the checkpoint file
        real_save = torch.save
        def save(obj, f, *args, **kwargs):
            calls[0] += 1
            if calls[0] != nth:
                return real_save(obj, f, *args, **kwargs)
            if action == "enospc":      # torch reports this as a RuntimeError whose context is the OSError
                return real_save(obj, FullDisk(f), *args, **kwargs)
            buf = io.BytesIO()
            real_save(obj, buf)
            f.write(buf.getvalue()[: len(buf.getvalue()) // 2])
            f.flush()
            os.fsync(f.fileno())
            fire()
        torch.save = save
    elif action != "none":          # steps.model_cache_distances, steps.mine, steps.batch_loss
        real = getattr(steps, target)
        def wrapped(*args, **kwargs):
            calls[0] += 1
            if calls[0] == nth:
                fire()
            return real(*args, **kwargs)
        setattr(steps, target, wrapped)
    sys.exit(main.main(sys.argv[4:]))
''')


def run_driver(cwd: Path, action: str, target: str, nth: int, *args: str) -> subprocess.CompletedProcess:
    driver = cwd / "fault_driver.py"
    driver.write_text(DRIVER)
    env = {**os.environ, "SEQMATCHNET_ROOT": str(ROOT)}
    return WARM.run(driver, [action, target, str(nth), *args], cwd, env)


def assert_refused(proc: subprocess.CompletedProcess, *needles: str) -> str:
    """Non-zero exit, no traceback, and one ``error:`` line holding every needle; returns that line."""
    out = proc.stdout + proc.stderr
    assert proc.returncode not in (0, None), f"exit 0 for a bad input:\n{out}"
    assert proc.returncode > 0, f"killed by signal {-proc.returncode}:\n{out}"
    assert "Traceback" not in out, out
    errors = [line for line in proc.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1, f"expected one error line:\n{proc.stderr}"
    line = errors[0]
    assert line.startswith(("error: ", "main.py: error: ")), line
    assert proc.stderr.rstrip().splitlines()[-1] == line, f"the message spans several lines:\n{proc.stderr}"
    for needle in needles:
        assert needle in line, f"{needle!r} missing from: {line}"
    return line


def run_folders(runs: Path) -> list[Path]:
    return sorted(p for p in runs.iterdir() if p.is_dir()) if runs.is_dir() else []


def temp_files(ckpt_dir: Path) -> list[Path]:
    return sorted(ckpt_dir.glob(".*.tmp"))


def checkpoint_epoch(path: Path):
    from seqmatchnet.runs.checkpoints import load_checkpoint
    return load_checkpoint(path)["epoch"]


# ---------------------------------------------------------------- the scenarios (each in its own folder)

# name -> function(work folder, trained run folder inside it) -> outcome
SCENARIOS: dict[str, Callable[[Path, Path], object]] = {}
BAD_INPUTS: list[str] = []


def bad_input(name: str):
    """A case that damages the copy, then returns (CLI args, needles the error line must hold)."""
    def register(damage):
        def scenario(work: Path, run: Path):
            args, needles = damage(work, run)
            return run_cli(work, *args), needles
        SCENARIOS[name] = scenario
        BAD_INPUTS.append(name)
        return damage
    return register


def scenario(name: str):
    def register(fn):
        SCENARIOS[name] = fn
        return fn
    return register


def resume_args(run: Path) -> list[str]:
    return [*TEST_ARGS, "--pooling", "--resume", str(run)]


def edit_npy(path: Path, edit) -> None:
    np.save(path, edit(np.load(path)))


def edit_split_inds(work: Path, rows: np.ndarray) -> None:
    inds = dict(np.load(work / "structFiles" / SPLIT_INDS, allow_pickle=True))
    pair = np.empty(2, dtype=object)
    pair[0], pair[1] = rows, rows
    inds["testInds"] = pair
    np.savez(work / "structFiles" / SPLIT_INDS, **inds)


def write_test_struct(work: Path, **overrides) -> None:
    pos = POS[TEST_ROWS]
    write_struct(work / "structFiles" / TEST_STRUCT, "test", pos, pos, 10.0, 25.0, **overrides)


def edit_flags(run: Path, **changes) -> None:
    path = run / "checkpoints/flags.json"
    flags = json.loads(path.read_text())
    flags.update(changes)
    path.write_text(json.dumps(flags))       # NaN/Infinity are what Python's json writes and reads


def edit_checkpoint(run: Path, **changes) -> None:
    path = run / "checkpoints/checkpoint.pth.tar"
    ckpt = torch.load(path, weights_only=True)
    ckpt.update(changes)
    torch.save(ckpt, path)


GET_DATA = ("bash download.sh", "--dataset synthetic")
BAD_ROW = int(TEST_ROWS[7])


# --- data files

@bad_input("missing descriptor file")
def _(work, run):
    (work / DESC / DB_NPY).unlink()
    return TEST_ARGS, [DB_NPY, *GET_DATA]


@bad_input("missing struct file")
def _(work, run):
    (work / "structFiles" / TEST_STRUCT).unlink()
    return TEST_ARGS, [TEST_STRUCT, *GET_DATA]


@bad_input("truncated npy")
def _(work, run):
    path = work / DESC / Q_NPY
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    return TEST_ARGS, [Q_NPY, "download it again"]


@bad_input("random-bytes npy")
def _(work, run):
    (work / DESC / Q_NPY).write_bytes(np.random.default_rng(1).bytes(4000))
    return TEST_ARGS, [Q_NPY, "download it again"]


def _bad_value(value):
    def damage(work, run):
        def edit(d):
            d[BAD_ROW] = 0.0 if value == 0 else d[BAD_ROW]
            d[BAD_ROW, 3] = value
            return d
        edit_npy(work / DESC / DB_NPY, edit)
        return TEST_ARGS, [DB_NPY, f"row {BAD_ROW}", "recompute"]
    return damage


bad_input("descriptor NaN")(_bad_value(np.nan))
bad_input("descriptor Inf")(_bad_value(-np.inf))
bad_input("descriptor all-zero row")(_bad_value(0))


@bad_input("descriptor dimensions differ")
def _(work, run):
    edit_npy(work / DESC / Q_NPY, lambda d: d[:, :8].copy())
    return TEST_ARGS, [DB_NPY, Q_NPY, "--descType"]


@bad_input("fewer rows than the split needs")
def _(work, run):
    edit_npy(work / DESC / DB_NPY, lambda d: d[:100].copy())
    return TEST_ARGS, [DB_NPY, "100 rows", "download"]


@bad_input("sequence longer than the traversal")
def _(work, run):
    return [a if a != "3" else "100" for a in TEST_ARGS], ["--seqL", "70 frames"]


@bad_input("empty split")
def _(work, run):
    edit_split_inds(work, np.zeros(0, dtype=np.int64))
    write_test_struct(work, numImages=0, numQueries=0, utmDb=np.zeros((2, 0)), utmQ=np.zeros((2, 0)),
                      dbImageFns=None, qImageFns=None)
    return TEST_ARGS, [SPLIT_INDS, "empty", "--split"]


@bad_input("split indices do not match the struct")
def _(work, run):
    edit_split_inds(work, TEST_ROWS[:10])
    return TEST_ARGS, [TEST_STRUCT, SPLIT_INDS, "download"]


@bad_input("corrupt split indices")
def _(work, run):
    (work / "structFiles" / SPLIT_INDS).write_bytes(b"PK\x03\x04 not really a zip")
    return TEST_ARGS, [SPLIT_INDS, "download it again"]


@bad_input("split index file that would run code")
def _(work, run):
    pair = np.empty(2, dtype=object)
    pair[0], pair[1] = Payload(work / MARKER), TEST_ROWS
    inds = dict(np.load(work / "structFiles" / SPLIT_INDS, allow_pickle=True))
    inds["testInds"] = pair
    np.savez(work / "structFiles" / SPLIT_INDS, **inds)
    return TEST_ARGS, [SPLIT_INDS, "posix.system", "safety", "download"]


# --- struct files

@bad_input("struct missing fields")
def _(work, run):
    write_test_struct(work, utmDb=None, posDistThr=None)
    return TEST_ARGS, [TEST_STRUCT, "utmDb", "download"]


@bad_input("struct utmDb with 3 rows")
def _(work, run):
    write_test_struct(work, utmDb=np.vstack([POS[TEST_ROWS].T, POS[TEST_ROWS].T[:1]]))
    return TEST_ARGS, [TEST_STRUCT, "utmDb", "download"]


@bad_input("struct utmDb with the wrong number of columns")
def _(work, run):
    write_test_struct(work, utmDb=POS[TEST_ROWS].T[:, :-5])
    return TEST_ARGS, [TEST_STRUCT, "utmDb", "(2, 65)", "download"]


@bad_input("struct threshold not a number")
def _(work, run):
    write_test_struct(work, posDistThr="ten metres")
    return TEST_ARGS, [TEST_STRUCT, "posDistThr", "download"]


@bad_input("struct random bytes")
def _(work, run):
    (work / "structFiles" / TEST_STRUCT).write_bytes(np.random.default_rng(2).bytes(3000))
    return TEST_ARGS, [TEST_STRUCT, "download it again"]


@bad_input("struct positions with NaN")
def _(work, run):
    pos = POS[TEST_ROWS].T.copy()
    pos[0, 11] = np.nan
    write_test_struct(work, utmQ=pos)
    return TEST_ARGS, [TEST_STRUCT, "utmQ", "frame 11", "fix"]


# --- checkpoints

@bad_input("checkpoint of another --outDims")
def _(work, run):
    edit_checkpoint(run, state_dict={"pool.1.conv.weight": torch.randn(8, DIM, 1), "pool.1.conv.bias": torch.randn(8)})
    return resume_args(run), ["checkpoint.pth.tar", "(8, 16, 1)", "--outDims"]


@bad_input("truncated checkpoint")
def _(work, run):
    path = run / "checkpoints/checkpoint.pth.tar"
    path.write_bytes(path.read_bytes()[:300])
    return resume_args(run), ["checkpoint.pth.tar", "truncated", "--ckpt"]


@bad_input("checkpoint of another model")
def _(work, run):
    edit_checkpoint(run, state_dict={"features.0.weight": torch.randn(64, 3, 3, 3),
                                     "pool.centroids": torch.randn(64, 512)})
    return resume_args(run), ["checkpoint.pth.tar", "another model", "--pooling"]


@bad_input("not a checkpoint")
def _(work, run):
    torch.save({"weights": torch.zeros(3)}, run / "checkpoints/checkpoint.pth.tar")
    return resume_args(run), ["checkpoint.pth.tar", "state_dict"]


@bad_input("checkpoint that would run code")
def _(work, run):
    edit_checkpoint(run, recalls=Payload(work / MARKER))
    return resume_args(run), ["checkpoint.pth.tar", "arbitrary code"]


@bad_input("--resume to a missing folder")
def _(work, run):
    shutil.rmtree(run)
    return resume_args(run), ["--resume", "flags.json"]


@bad_input("--resume to a folder without checkpoints/")
def _(work, run):
    shutil.rmtree(run / "checkpoints")
    return resume_args(run), ["--resume", "flags.json"]


@bad_input("missing latest checkpoint")
def _(work, run):
    (run / "checkpoints/checkpoint.pth.tar").unlink()
    return resume_args(run), ["checkpoint.pth.tar", "--resume", "--ckpt"]


@bad_input("missing best checkpoint")
def _(work, run):
    (run / "checkpoints/model_best.pth.tar").unlink()
    return [*resume_args(run), "--ckpt", "best"], ["model_best.pth.tar", "--ckpt"]


# --- flags.json

@bad_input("malformed flags.json")
def _(work, run):
    (run / "checkpoints/flags.json").write_text('{"lr": 0.001, "outDims": 16,')
    return resume_args(run), ["flags.json", "JSON", "fix"]


@bad_input("flags.json lr with a shell command")
def _(work, run):
    edit_flags(run, lr="0.1; rm -rf")
    return resume_args(run), ["flags.json", "lr", "0.1; rm -rf", "fix"]


@bad_input("flags.json outDims as a list")
def _(work, run):
    edit_flags(run, outDims=[1])
    return resume_args(run), ["flags.json", "outDims", "fix"]


# --- options and output paths

@bad_input("malformed --seqL")
def _(work, run):
    return [*TEST_ARGS, "--seqL", "five"], ["--seqL", "five"]


@bad_input("--predictionsFile of the wrong shape")
def _(work, run):
    np.savez(work / "preds.npz", preds=np.tile(np.arange(10), (len(TEST_ROWS), 1)))
    return [*TEST_ARGS, "--predictionsFile", "preds.npz"], ["--predictionsFile", "preds.npz", "(70, >= 20)"]


@bad_input("--shortlistIndex that is not an index")
def _(work, run):
    (work / "map.index").write_bytes(np.random.default_rng(2).bytes(3000))
    return [*TEST_ARGS, "--shortlist", "10", "--shortlistIndex", "map.index"], ["--shortlistIndex", "map.index",
                                                                                "delete"]


@bad_input("--shortlistIndex of another model")
def _(work, run):
    keep = ["--shortlist", "10", "--shortlistIndex", "map.index"]
    built = run_cli(work, *TEST_ARGS, *keep)                      # built for the raw descriptors
    assert built.returncode == 0 and (work / "map.index").exists(), built.stderr[-2000:]
    return [*resume_args(run), *keep], ["--shortlistIndex", "map.index", "differs in: model", "delete"]


@bad_input("--predictionsFile with out-of-range indices")
def _(work, run):
    preds = np.tile(np.arange(20), (len(TEST_ROWS), 1))
    preds[3, 4] = len(TEST_ROWS) + 7
    np.savez(work / "preds.npz", preds=preds)
    return [*TEST_ARGS, "--predictionsFile", "preds.npz"], ["--predictionsFile", "preds.npz", "[0, 70)"]


@bad_input("unwritable --runsPath")
def _(work, run):
    (work / "somefile").write_text("a file, not a folder\n")     # root writes into read-only folders: ENOTDIR
    return [*TRAIN_ARGS, "--nEpochs", "1", "--runsPath", "somefile/runs"], ["--runsPath", "somefile/runs"]


@bad_input("unwritable --resultsPath")
def _(work, run):
    (work / "somefile").write_text("a file, not a folder\n")
    return [*TEST_ARGS, "--resultsPath", "somefile/results"], ["--resultsPath", "somefile/results"]


# --- resuming training from a damaged checkpoint (train.py restores the optimiser)

@bad_input("resume with the optimiser state of another model")
def _(work, run):
    ckpt = torch.load(run / "checkpoints/checkpoint.pth.tar", weights_only=True)
    ckpt["optimizer"]["param_groups"][0]["params"] = [0, 1, 2]
    torch.save(ckpt, run / "checkpoints/checkpoint.pth.tar")
    return [*TRAIN_ARGS, "--nEpochs", "2", "--resume", str(run)], ["checkpoint.pth.tar", "optim"]


@bad_input("resume from a checkpoint without optimiser state")
def _(work, run):
    ckpt = torch.load(run / "checkpoints/checkpoint.pth.tar", weights_only=True)
    del ckpt["optimizer"]
    torch.save(ckpt, run / "checkpoints/checkpoint.pth.tar")
    return [*TRAIN_ARGS, "--nEpochs", "2", "--resume", str(run)], ["checkpoint.pth.tar", "optim"]


NEEDS_TRAIN_FIX: dict = {}


# --- scenarios with their own checks

@scenario("--debug shows the traceback")
def _(work, run):
    (work / DESC / DB_NPY).unlink()
    return run_cli(work, *TEST_ARGS, "--debug")


@scenario("flags.json unknown keys")
def _(work, run):
    edit_flags(run, __class__="os.system", evil=f"$(touch {work / MARKER})", unknownOption=[1, 2, {"a": None}])
    return run_cli(work, *resume_args(run), "--quiet")


CRASH_POINTS = {"caching": ("model_cache_distances", 2), "mining": ("mine", 2), "batch": ("batch_loss", 11),
                "checkpoint write": ("save", 2)}    # epoch 1 calls each once (batch_loss 8 times, 118 queries)


def _killed_and_resumed(target: str, nth: int):
    def run_scenario(work, run):
        runs = work / "killed"
        killed = run_driver(work, "kill", target, nth, *TRAIN_ARGS, "--nEpochs", "2", "--runsPath", str(runs),
                            "--quiet")
        (run_dir,) = run_folders(runs)
        ckpt_dir = run_dir / "checkpoints"
        after_kill = {"epoch": checkpoint_epoch(ckpt_dir / "checkpoint.pth.tar"), "temp": temp_files(ckpt_dir)}
        resumed = run_driver(work, "none", "-", 0, *TRAIN_ARGS, "--nEpochs", "2", "--resume", str(run_dir))
        return {"killed": killed, "after_kill": after_kill, "resumed": resumed,
                "epoch": checkpoint_epoch(ckpt_dir / "checkpoint.pth.tar"), "temp": temp_files(ckpt_dir),
                "runs": run_folders(runs), "run": run_dir}
    return run_scenario


for _point, (_target, _nth) in CRASH_POINTS.items():
    scenario(f"SIGKILL during {_point}")(_killed_and_resumed(_target, _nth))


@scenario("SIGKILL before the first checkpoint")
def _(work, run):
    runs = work / "killed"
    killed = run_driver(work, "kill", "batch_loss", 2, *TRAIN_ARGS, "--nEpochs", "1", "--runsPath", str(runs),
                        "--quiet")
    (run_dir,) = run_folders(runs)
    return killed, run_cli(work, *TRAIN_ARGS, "--nEpochs", "1", "--resume", str(run_dir))


def _interrupted(target: str, nth: int):
    def run_scenario(work, run):
        runs = work / "interrupted"
        proc = run_driver(work, "interrupt", target, nth, *TRAIN_ARGS, "--nEpochs", "2", "--runsPath", str(runs))
        (run_dir,) = run_folders(runs)
        ckpt_dir = run_dir / "checkpoints"
        return {"proc": proc, "run": run_dir, "ckpt": ckpt_dir / "checkpoint.pth.tar",
                "epoch": checkpoint_epoch(ckpt_dir / "checkpoint.pth.tar"), "temp": temp_files(ckpt_dir)}
    return run_scenario


scenario("Ctrl-C during a batch")(_interrupted("batch_loss", 11))
scenario("Ctrl-C during a checkpoint write")(_interrupted("save", 2))


@scenario("disk full during a checkpoint write")
def _(work, run):
    runs = work / "full"
    proc = run_driver(work, "enospc", "save", 2, *TRAIN_ARGS, "--nEpochs", "2", "--runsPath", str(runs), "--quiet")
    (run_dir,) = run_folders(runs)
    ckpt_dir = run_dir / "checkpoints"
    return {"proc": proc, "epoch": checkpoint_epoch(ckpt_dir / "checkpoint.pth.tar"), "temp": temp_files(ckpt_dir)}


@scenario("two runs started together")
def _(work, run):
    runs, cache = work / "twins", work / "cache"
    (work / "fault_driver.py").write_text(DRIVER)
    args = [sys.executable, str(work / "fault_driver.py"), "none", "-", "0", *TRAIN_ARGS, "--nEpochs", "1",
            "--expName", "twin", "--runsPath", str(runs), "--cachePath", str(cache), "--quiet"]
    env = {**os.environ, "SEQMATCHNET_ROOT": str(ROOT)}
    procs = [subprocess.Popen(args, cwd=work, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
             for _ in range(2)]
    outs = [p.communicate(timeout=300)[0] for p in procs]
    return {"codes": [p.returncode for p in procs], "outs": outs, "runs": run_folders(runs), "cache": cache}


# ---------------------------------------------------------------- fixtures

@pytest.fixture(scope="session")
def tiny_source(tmp_path_factory) -> Path:
    return make_tiny_oxford(tmp_path_factory.mktemp("tiny_src"), n=N_FRAMES, dim=DIM)


@pytest.fixture(scope="session")
def trained_source(tiny_source, tmp_path_factory) -> Path:
    """A run folder written by a one-epoch training of the tiny dataset."""
    work = tmp_path_factory.mktemp("trained")
    shutil.copytree(tiny_source, work, dirs_exist_ok=True)
    proc = run_driver(work, "none", "-", 0, *TRAIN_ARGS, "--nEpochs", "1", "--runsPath", str(work / "runs"), "--quiet")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    (run,) = run_folders(work / "runs")
    return run


@pytest.fixture(scope="session")
def outcomes(request, tiny_source, trained_source, tmp_path_factory) -> dict:
    """Every selected scenario run in its own copy of the data and the trained run, WORKERS at a time."""
    wanted = sorted({item.callspec.params["name"] for item in request.session.items
                     if getattr(item, "module", None) is sys.modules[__name__] and hasattr(item, "callspec")
                     and "name" in item.callspec.params})
    base = tmp_path_factory.mktemp("scenarios")

    def run_one(i_name):
        i, name = i_name
        work = base / f"case{i:02d}"
        shutil.copytree(tiny_source, work)
        run = work / "runs" / trained_source.name
        shutil.copytree(trained_source, run)
        try:
            return SCENARIOS[name](work, run), work
        except BaseException as exc:    # reported by the test of this scenario
            return exc, work

    with ThreadPoolExecutor(max_workers=WORKERS) as pool:
        return dict(zip(wanted, pool.map(run_one, enumerate(wanted))))


def outcome(outcomes: dict, name: str):
    result, work = outcomes[name]
    if isinstance(result, BaseException):
        raise result
    return result, work


# ---------------------------------------------------------------- 1. bad input through the CLI

@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.xfail(reason=NEEDS_TRAIN_FIX[n], strict=False))
                                  if n in NEEDS_TRAIN_FIX else n for n in BAD_INPUTS])
@pytest.mark.slow                   # shares the session fixture that runs every CLI scenario
def test_bad_input_is_refused(outcomes, name):
    (proc, needles), work = outcome(outcomes, name)
    assert_refused(proc, *needles)
    assert not (work / MARKER).exists()


@pytest.mark.parametrize("name", ["--debug shows the traceback"])
@pytest.mark.slow                   # shares the session fixture that runs every CLI scenario
def test_debug_shows_the_traceback(outcomes, name):
    proc, _ = outcome(outcomes, name)
    assert proc.returncode == 1, name
    assert "Traceback" in proc.stdout + proc.stderr
    assert proc.stderr.rstrip().splitlines()[-1].startswith("error: ")


@pytest.mark.parametrize("name", ["flags.json unknown keys"])
@pytest.mark.slow                   # shares the session fixture that runs every CLI scenario
def test_unknown_keys_in_flags_json_are_ignored(outcomes, name):
    proc, work = outcome(outcomes, name)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stdout + proc.stderr and "R@1" in proc.stdout, name
    assert not (work / MARKER).exists()


# ---------------------------------------------------------------- 1. bad input in-process (cheap variants)

@pytest.mark.parametrize("key,value", [("outDims", True), ("outDims", 10**12), ("outDims", -3), ("seed", 1.5),
                                       ("seed", -5), ("optim", "LBFGS"), ("lr", float("nan")),
                                       ("margin", float("inf")), ("savePath", "../../outside"), ("savePath", "/tmp/x")])
def test_hostile_flags_json_values(tmp_path, key, value):
    from seqmatchnet.cli.options import parse_options
    from seqmatchnet.common.errors import UserError
    from seqmatchnet.runs.folders import restore_flags

    flags = tmp_path / "flags.json"
    flags.write_text(json.dumps({"lr": 0.001, "outDims": 16, key: value}))
    opt = parse_options([*resume_args(tmp_path)])
    with pytest.raises(UserError) as err:
        restore_flags(opt, flags)
    assert "flags.json" in str(err.value) and key in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize("content", ["[" * 200000 + "]" * 200000, '["lr", 0.1]', "\xff\xfe binary", ""])
def test_unreadable_flags_json(tmp_path, content):
    from seqmatchnet.cli.options import parse_options
    from seqmatchnet.common.errors import UserError
    from seqmatchnet.runs.folders import restore_flags

    flags = tmp_path / "flags.json"
    flags.write_bytes(content.encode("latin-1"))
    with pytest.raises(UserError) as err:
        restore_flags(parse_options(resume_args(tmp_path)), flags)
    assert str(flags) in str(err.value) and "fix" in str(err.value)


@pytest.mark.parametrize("args,needles", [(["--seed", "-1"], ["--seed"]),
                                          (["--cacheBatchSize", "0"], ["--cacheBatchSize"]),
                                          (["--matcher", "None"], ["--seqL 1"]),
                                          (["--dataset", "oxford-v2"], ["--dataset", "oxford-v1.0"])])
def test_bad_options_in_process(tmp_path, monkeypatch, capsys, args, needles):
    import main

    monkeypatch.chdir(tmp_path)
    assert main.main([*TEST_ARGS, *args]) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    assert all(n in err[0] for n in needles), err[0]


@pytest.mark.parametrize("damage", ["no epoch", "epoch is text", "optimizer is empty", "state_dict of strings",
                                    "state_dict is a list"])
def test_malformed_checkpoint_structure(tmp_path, damage):
    from seqmatchnet.common.errors import UserError
    from seqmatchnet.runs.checkpoints import load_checkpoint

    ckpt = {"epoch": 1, "state_dict": {"pool.1.conv.weight": torch.zeros(2, 2, 1)},
            "optimizer": {"state": {}, "param_groups": [{"params": [0, 1]}]}}
    if damage == "no epoch":
        del ckpt["epoch"]
    elif damage == "epoch is text":
        ckpt["epoch"] = "1"
    elif damage == "optimizer is empty":
        ckpt["optimizer"] = {}
    elif damage == "state_dict of strings":
        ckpt["state_dict"] = {"pool.1.conv.weight": "zeros"}
    else:
        ckpt["state_dict"] = [torch.zeros(2)]
    path = tmp_path / "checkpoint.pth.tar"
    torch.save(ckpt, path)
    with pytest.raises(UserError) as err:
        load_checkpoint(path)
    assert str(path) in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize("bad", ["float", "missing key", "not npz", "object array", "one row", "rows", "range"])
def test_bad_predictions_file(tmp_path, bad):
    from seqmatchnet.common.errors import UserError
    from seqmatchnet.evaluation.evaluate import check_predictions, load_predictions

    path = tmp_path / "preds.npz"
    preds = np.tile(np.arange(20), (70, 1))
    if bad == "float":
        np.savez(path, preds=preds.astype(float))
    elif bad == "missing key":
        np.savez(path, predictions=preds)
    elif bad == "not npz":
        path.write_bytes(b"not an npz at all")
    elif bad == "object array":
        np.savez(path, preds=np.array([[1, "x"]] * 70, dtype=object))
    elif bad == "rows":
        np.savez(path, preds=preds[:69])
    elif bad == "range":
        np.savez(path, preds=preds + 51)
    else:
        np.savez(path, preds=np.arange(20))
    with pytest.raises(UserError) as err:
        check_predictions(load_predictions(path), 70, 70, f"--predictionsFile {path}")
    assert "--predictionsFile" in str(err.value) and str(path) in str(err.value)


def test_hdf5_descriptors(tmp_path):
    """HDF5 is chosen by suffix, which no built-in dataset uses, so the loader is tested directly."""
    import h5py

    from seqmatchnet.common.errors import UserError
    from seqmatchnet.data.descriptors import load_descriptors

    good = tmp_path / "good.h5"
    x = np.random.default_rng(0).standard_normal((20, 8)).astype(np.float32)
    with h5py.File(good, "w") as f:
        f.create_dataset("group/descriptors", data=x)
        f.create_dataset("meta", data=np.arange(5))
    np.testing.assert_array_equal(load_descriptors(good, np.arange(3, 9)), x[3:9])

    no_2d = tmp_path / "no2d.h5"
    with h5py.File(no_2d, "w") as f:
        f.create_dataset("flat", data=np.arange(5.0))
    two = tmp_path / "two.hdf5"
    with h5py.File(two, "w") as f:
        f.create_dataset("a", data=x)
        f.create_dataset("b", data=x)
    nan = tmp_path / "nan.h5"
    with h5py.File(nan, "w") as f:
        f.create_dataset("d", data=np.where(np.arange(20)[:, None] == 4, np.nan, x))
    junk = tmp_path / "junk.h5"
    junk.write_bytes(b"\x89HDF\r\n\x1a\n" + np.random.default_rng(3).bytes(500))
    for path in (no_2d, two, nan, junk):
        with pytest.raises(UserError) as err:
            load_descriptors(path)
        assert path.name in str(err.value) and "\n" not in str(err.value)


# ---------------------------------------------------------------- 2. crashes (SIGKILL) and resuming

@pytest.mark.parametrize("name", [f"SIGKILL during {p}" for p in CRASH_POINTS])
@pytest.mark.slow                   # shares the session fixture that runs every CLI scenario
def test_killed_training_resumes(outcomes, name):
    o, _ = outcome(outcomes, name)
    assert o["killed"].returncode == -9, o["killed"].stdout + o["killed"].stderr
    assert o["after_kill"]["epoch"] == 1          # the last completed checkpoint is intact and loads
    if name.endswith("checkpoint write"):
        assert o["after_kill"]["temp"], "the kill should have left a half-written temporary file"
    out = o["resumed"].stdout + o["resumed"].stderr
    assert o["resumed"].returncode == 0, out
    assert "epoch 2:" in out and "epoch 1:" not in out, out      # the epochs continue
    assert o["epoch"] == 2
    assert not o["temp"]                            # the resumed run removed the half-written file
    assert o["runs"] == [o["run"]]                  # resuming writes into the same run folder


@pytest.mark.parametrize("name", ["SIGKILL before the first checkpoint"])
@pytest.mark.slow                   # shares the session fixture that runs every CLI scenario
def test_killed_before_the_first_checkpoint(outcomes, name):
    (killed, resumed), _ = outcome(outcomes, name)
    assert killed.returncode == -9
    assert_refused(resumed, "checkpoint.pth.tar", "--resume")


# ---------------------------------------------------------------- 3. Ctrl-C

@pytest.mark.parametrize("name", ["Ctrl-C during a batch", "Ctrl-C during a checkpoint write"])
@pytest.mark.slow                   # shares the session fixture that runs every CLI scenario
def test_ctrl_c(outcomes, name):
    o, _ = outcome(outcomes, name)
    out = o["proc"].stdout + o["proc"].stderr
    assert o["proc"].returncode == 130, out
    assert "Traceback" not in out
    assert str(o["ckpt"]) in out and f"--resume {o['run']}" in out, out
    assert o["epoch"] == 1
    assert not o["temp"]


# ---------------------------------------------------------------- 4. two runs at the same second

def test_same_second_gets_two_run_folders(tmp_path, monkeypatch):
    import datetime as dt
    from argparse import Namespace

    from seqmatchnet.runs import folders

    class Frozen(dt.datetime):
        @classmethod
        def now(cls, tz=None):
            return dt.datetime(2024, 3, 1, 12, 0, 0)

    monkeypatch.setattr(folders, "datetime", Frozen)
    opt = Namespace(runsPath=str(tmp_path / "runs"), seqL=5, expName="same")
    a, b = folders.make_run_dir(opt), folders.make_run_dir(opt)
    assert a != b and a.is_dir() and b.is_dir()
    assert a.name.startswith("Mar01_12-00-00_l5_same") and b.name.startswith("Mar01_12-00-00_l5_same")


@pytest.mark.parametrize("name", ["two runs started together"])
@pytest.mark.slow                   # shares the session fixture that runs every CLI scenario
def test_concurrent_training_runs(outcomes, name):
    o, _ = outcome(outcomes, name)
    assert o["codes"] == [0, 0], o["outs"]
    assert len(o["runs"]) == 2, o["runs"]
    for run in o["runs"]:
        assert (run / "checkpoints/checkpoint.pth.tar").is_file()
        assert len(list(run.glob("events.out.tfevents.*"))) == 1
        assert (run / "train.log").read_text().count("run folder:") == 1
    leftovers = [p for p in o["cache"].rglob("*") if p.is_file()] if o["cache"].exists() else []
    assert not leftovers, leftovers      # no cache file is left, let alone shared


# ---------------------------------------------------------------- 5. a checkpoint write that fails

@pytest.mark.parametrize("how", ["OSError", "torch RuntimeError"])
def test_enospc_keeps_the_previous_checkpoint(tmp_path, monkeypatch, how):
    from seqmatchnet.common.errors import UserError
    from seqmatchnet.runs.checkpoints import save_checkpoint_atomic

    path = tmp_path / "checkpoints" / "checkpoint.pth.tar"
    save_checkpoint_atomic({"epoch": 1, "state_dict": {"w": torch.ones(4)}}, path)
    before = path.read_bytes()
    real_save = torch.save

    class FullDisk:
        def __init__(self, f):
            self.f = f

        def write(self, b):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    def full_disk(obj, f, *args, **kwargs):
        f.write(b"\0" * 1000)
        if how == "OSError":
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real_save(obj, FullDisk(f))         # what a real full disk gives: RuntimeError from torch's writer

    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(UserError) as err:
        save_checkpoint_atomic({"epoch": 2, "state_dict": {"w": torch.zeros(4, 1000)}}, path)
    assert str(path) in str(err.value) and "No space left on device" in str(err.value)
    assert path.read_bytes() == before
    assert not temp_files(path.parent)


@pytest.mark.parametrize("name", ["disk full during a checkpoint write"])
@pytest.mark.slow                   # shares the session fixture that runs every CLI scenario
def test_enospc_during_training(outcomes, name):
    o, _ = outcome(outcomes, name)
    assert_refused(o["proc"], "checkpoint.pth.tar", "No space left on device", "free disk space")
    assert o["epoch"] == 1
    assert not o["temp"]


# ---------------------------------------------------------------- 6. loading checkpoints is safe

REFERENCE_CKPT = REFERENCE / "data/runs/ref_oxford_l5_1epoch/checkpoints/checkpoint.pth.tar"


@pytest.mark.skipif(not REFERENCE_CKPT.is_file(), reason="the reference checkpoint is absent")
def test_reference_checkpoint_loads_weights_only():
    from seqmatchnet.runs.checkpoints import load_checkpoint

    ckpt = load_checkpoint(REFERENCE_CKPT)
    assert any(k.endswith("1.conv.weight") for k in ckpt["state_dict"])


class Payload:
    """Unpickling this runs a shell command that creates a marker file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


class CustomObject:
    def __init__(self) -> None:
        self.value = 1


@pytest.mark.parametrize("kind", ["os.system reduce", "custom class"])
def test_code_execution_is_refused(tmp_path, kind):
    from seqmatchnet.common.errors import UserError
    from seqmatchnet.runs.checkpoints import load_checkpoint

    marker = tmp_path / MARKER
    path = tmp_path / "evil.pth.tar"
    extra = Payload(marker) if kind == "os.system reduce" else CustomObject()
    torch.save({"epoch": 1, "state_dict": {"pool.1.conv.weight": torch.zeros(1)}, "extra": extra}, path)
    assert not marker.exists()
    with pytest.raises(UserError) as err:
        load_checkpoint(path)
    assert str(path) in str(err.value) and "arbitrary code" in str(err.value)
    assert not marker.exists()
