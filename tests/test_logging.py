"""Metrics logging: TensorBoard always, wandb only when asked (disabled by default, offline without an account)."""
from __future__ import annotations

import os

import pytest

from test_train import TRAIN, only_run, run_main


def test_wandb_disabled_by_default_writes_tensorboard_only(tiny_oxford, monkeypatch):
    assert run_main(TRAIN + ["--seqL", "2", "--nEpochs", "1"], tiny_oxford, monkeypatch) == 0
    run = only_run(tiny_oxford)
    assert list(run.glob("events.out.tfevents.*"))
    assert not (run / "wandb").exists()


def test_wandb_offline_needs_no_account(tiny_oxford, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("WANDB_SILENT", "true")
    assert run_main(TRAIN + ["--seqL", "2", "--nEpochs", "1", "--wandb", "offline"], tiny_oxford, monkeypatch) == 0
    run = only_run(tiny_oxford)
    offline = list((run / "wandb").glob("offline-run-*"))
    assert offline, "an offline wandb run folder is written inside the run folder"
    assert list(offline[0].glob("*.wandb"))                  # the run was finished and flushed


def test_wandb_online_without_account_fails_at_once(tiny_oxford, monkeypatch, tmp_path, capsys):
    pytest.importorskip("wandb")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))                 # no ~/.netrc with a key
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "wandbcfg"))
    assert run_main(TRAIN + ["--seqL", "2", "--nEpochs", "1", "--wandb", "online"], tiny_oxford, monkeypatch) == 1
    err = capsys.readouterr().err
    assert "wandb" in err and "--wandb offline" in err and "Traceback" not in err
    assert not (tiny_oxford / "data" / "runs").exists() or not any((tiny_oxford / "data" / "runs").iterdir())
