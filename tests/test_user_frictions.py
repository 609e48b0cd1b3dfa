"""What a new user met (issue 37): resuming to the run's own plan, the interrupt hint, progress in
logs, a closed pipe, the velocity errors."""
from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from test_train import TRAIN, only_run, run_main

ROOT = Path(__file__).resolve().parents[1]


def _ckpt_epoch(run: Path) -> int:
    return int(torch.load(run / "checkpoints" / "checkpoint.pth.tar", weights_only=True)["epoch"])


def test_interrupt_hint_is_printed_quietly_and_the_resume_finishes_the_runs_own_plan(
        tiny_oxford, monkeypatch, capsys):
    from seqmatchnet.training import epochs

    real, calls = epochs.train_epoch, []

    def interrupted_in_epoch_2(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(epochs, "train_epoch", interrupted_in_epoch_2)
    assert run_main(TRAIN + ["--seqL", "2", "--nEpochs", "3"], tiny_oxford, monkeypatch) == 130
    out = capsys.readouterr().out               # --quiet (run_main): the hint is printed anyway
    run = only_run(tiny_oxford)
    assert "interrupted during epoch 2: the last checkpoint is " in out and "(epoch 1)" in out
    command = shlex.split(out.split("continue with: ")[1].splitlines()[0])
    assert command[0] == "python" and command[1] == str(ROOT / "main.py")     # works from any folder
    assert command[-2] == "--resume" and (tiny_oxford / command[-1]).resolve() == run.resolve()

    monkeypatch.setattr(epochs, "train_epoch", real)
    resume = [a for a in command[2:] if a not in ("--nocuda", "--quiet")]
    resume = [a for i, a in enumerate(resume) if a != "--nEpochs" and resume[i - 1] != "--nEpochs"]
    assert run_main(resume, tiny_oxford, monkeypatch) == 0              # no --nEpochs: the run's 3
    out = capsys.readouterr().out
    assert f"resuming from {command[-1]}/checkpoints/checkpoint.pth.tar (epoch 1): training epochs 2 to 3" in out
    assert _ckpt_epoch(run) == 3
    assert json.loads((run / "checkpoints" / "flags.json").read_text())["nEpochs"] == 3


def test_resume_alone_leaves_a_finished_run_and_a_given_nepochs_still_wins(tiny_oxford, monkeypatch, capsys):
    assert run_main(TRAIN + ["--seqL", "2", "--nEpochs", "1"], tiny_oxford, monkeypatch) == 0
    run = only_run(tiny_oxford)
    capsys.readouterr()
    assert run_main(TRAIN + ["--seqL", "2", "--resume", str(run)], tiny_oxford, monkeypatch) == 0
    assert "has finished its 1 epochs: nothing to do" in capsys.readouterr().out
    assert _ckpt_epoch(run) == 1
    assert run_main(TRAIN + ["--seqL", "2", "--resume", str(run), "--nEp=2"], tiny_oxford, monkeypatch) == 0
    assert _ckpt_epoch(run) == 2


def test_given_options_sees_every_spelling():
    from seqmatchnet.cli.train import given_options

    assert "nEpochs" in given_options(["--mode", "train", "--nEpochs", "8"])
    assert "nEpochs" in given_options(["--nEpochs=8", "--resume", "r"])
    assert "nEpochs" not in given_options(["--mode", "train", "--resume", "r", "--seqL", "5"])


def test_progress_prints_lines_at_an_interval_off_a_terminal(monkeypatch, capsys):
    from seqmatchnet.common import logs

    monkeypatch.setenv("SEQMATCHNET_PROGRESS_SECONDS", "0")
    assert list(logs.progress(range(3), desc="extract", unit="img")) == [0, 1, 2]
    lines = capsys.readouterr().err.splitlines()
    assert lines[0].startswith("extract: 1/3 img (33%), ") and "left" in lines[0]
    assert lines[-1].startswith("extract: 3/3 img (100%)") and lines[-1].endswith("done")
    with logs.progress(desc="matching", unit="block") as bar:             # no total, update()
        bar.update()
        bar.set_postfix(loss="0.1")
        bar.update(2)
    assert capsys.readouterr().err.splitlines()[-1].startswith("matching: 3 block, ")
    monkeypatch.setenv("SEQMATCHNET_PROGRESS_SECONDS", "3600")           # not yet: silent
    assert list(logs.progress(range(3), desc="x")) == [0, 1, 2]
    assert list(logs.progress(range(3), desc="x", disable=True)) == [0, 1, 2]
    assert capsys.readouterr().err == ""


def test_progress_interval_runs_across_short_loops(monkeypatch, capsys):
    """An epoch of many chunks, each shorter than the interval, still prints a line per interval."""
    import time

    from seqmatchnet.common import logs

    monkeypatch.setattr(logs.ProgressLines, "last", None)
    monkeypatch.setenv("SEQMATCHNET_PROGRESS_SECONDS", "0.2")
    for chunk in range(6):                                   # 6 x 0.06 s
        for _ in logs.progress(range(3), desc=f"chunk {chunk}", unit="batch"):
            time.sleep(0.02)
    lines = capsys.readouterr().err.splitlines()
    assert 1 <= sum(" batch (" in ln and not ln.endswith("done") for ln in lines) < 18, lines


def test_training_under_nohup_prints_progress_lines(tiny_oxford, monkeypatch, capsys):
    monkeypatch.setenv("SEQMATCHNET_PROGRESS_SECONDS", "0")
    import main
    monkeypatch.chdir(tiny_oxford)
    args = TRAIN + ["--seqL", "2", "--nEpochs", "1", "--nocuda", "--threads", "0"]
    assert main.main(args) == 0
    err = capsys.readouterr().err
    assert " batch (" in err and "done" in err, err[-2000:]


def _into_a_closed_pipe(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    """``main.py ARGS | head -0``: the reading end is closed before the program writes."""
    proc = subprocess.Popen([sys.executable, str(ROOT / "main.py"), *args], cwd=cwd, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    proc.stdout.close()
    err = proc.stderr.read()
    return subprocess.CompletedProcess(args, proc.wait(timeout=120), "", err)


def test_help_into_a_closed_pipe_is_not_an_error(tmp_path):
    done = _into_a_closed_pipe(["--mode", "train", "--help"], tmp_path)      # argparse ignores it itself
    assert done.returncode == 0 and done.stderr == "", done.stderr


def test_logged_output_into_a_closed_pipe_ends_quietly(tiny_oxford):
    done = _into_a_closed_pipe(["--mode", "test", "--dataset", "oxford-v1.0", "--seqL", "2", "--nocuda",
                                "--threads", "0", "--figures", "none"], tiny_oxford)
    assert done.returncode == 141 and done.stderr == "", done.stderr


def test_a_closed_pipe_in_guarded_work_returns_141_without_a_message(monkeypatch, capsys):
    from seqmatchnet.cli import entry

    monkeypatch.setattr(entry, "closed_pipe", lambda: entry.CLOSED_PIPE)    # keep pytest's own streams

    def work():
        raise BrokenPipeError(32, "Broken pipe")

    assert entry.run_guarded(work) == 141
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize("args, words", [
    (["--velocities", "0.5:2"], "a range needs three, VMIN:VMAX:VSTEP"),
    (["--velocities", "-1:1:0.5"], "velocity -1 is outside"),
    (["--velocities=-1:1:0.5"], "velocity -1 is outside")])
def test_velocity_mistakes_get_a_clear_line(args, words):
    from seqmatchnet.cli.options import parse_options
    from seqmatchnet.common.errors import UserError

    with pytest.raises(UserError) as err:
        parse_options(["--mode", "test", "--seqL", "5", *args])
    assert words in str(err.value) and "expected one argument" not in str(err.value)


def test_only_a_value_that_looks_like_a_number_is_joined():
    from seqmatchnet.cli.options import join_dash_values

    assert join_dash_values(["--velocities", "-1:1:0.5", "--seqL", "5"]) == ["--velocities=-1:1:0.5", "--seqL", "5"]
    assert join_dash_values(["--velocities", "--seqL", "5"]) == ["--velocities", "--seqL", "5"]


# ---------------------------------------------------------------- numbers in the docs that a fast command regenerates

def test_help_line_counts_in_the_options_page_are_current(monkeypatch):
    """docs/options.md: `python main.py --mode MODE --help | wc -l` (a pipe: 80 columns)."""

    from seqmatchnet.cli.options import build_parser

    monkeypatch.setenv("COLUMNS", "80")
    page = (ROOT / "docs" / "options.md").read_text()
    found = re.search(r"`train` (\d+) lines, `test` (\d+), `localize` (\d+)", page)
    documented = dict(zip(("train", "test", "localize"), map(int, found.groups())))
    assert {mode: build_parser(mode).format_help().count("\n") for mode in documented} == documented


def test_trajectory_count_snippet_of_the_speeds_page_runs_and_agrees_with_the_page(capsys):

    text = (ROOT / "docs" / "speeds.md").read_text()
    snippet = next(b for b in re.findall(r"^```bash\n(.*?)^```", text, flags=re.M | re.S) if "parse_velocities" in b)
    code = re.search(r"<<'EOF'\n(.*?)^EOF", snippet, flags=re.M | re.S).group(1)
    exec(compile(code, "docs/speeds.md", "exec"), {})                        # no traceback over 16 trajectories
    printed = capsys.readouterr().out
    count = re.search(r"`0\.5:2:0\.1` gives (\d+)", text).group(1)
    assert f"gives {count} distinct trajectories" in printed, printed


def test_worked_example_stops_at_once_without_main_py_and_finds_the_installed_repository(tmp_path):
    """docs/own-data.md, followed in an empty folder: no SEQMATCHNET -> the repository of the installed
    package; a wrong one -> one error line and nothing else runs (set -e)."""

    text = (ROOT / "docs" / "own-data.md").read_text()
    block = re.findall(r"^```bash\n(.*?)^```", text[text.find("## Worked example"):], flags=re.M | re.S)[0]
    preamble = block[:block.index("\nfi\n") + 4]
    shim = tmp_path / "bin"
    shim.mkdir()
    (shim / "python").write_text(f'#!/bin/sh\nexec {shlex.quote(sys.executable)} "$@"\n')
    (shim / "python").chmod(0o755)
    env = {k: v for k, v in os.environ.items() if k != "SEQMATCHNET"}
    env["PATH"] = f"{shim}:{env.get('PATH', '')}"
    found = subprocess.run(["bash", "-c", preamble + 'echo "$SEQMATCHNET"'], cwd=tmp_path, env=env,
                           capture_output=True, text=True, timeout=60)
    assert found.returncode == 0 and Path(found.stdout.strip()) == ROOT, found.stderr
    wrong = subprocess.run(["bash", "-c", block], cwd=tmp_path, env={**env, "SEQMATCHNET": str(tmp_path / "no")},
                           capture_output=True, text=True, timeout=60)
    assert wrong.returncode == 1 and wrong.stderr.count("\n") == 1 and "main.py not found" in wrong.stderr
    assert not (tmp_path / "myroute").exists()                                   # nothing ran after it
