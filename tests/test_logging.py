"""Metrics logging: TensorBoard always, wandb only when asked (disabled by default, offline without an account)."""
from __future__ import annotations

import re

import pytest

from test_train import TRAIN, only_run, run_main


def test_wandb_disabled_by_default_writes_tensorboard_only(tiny_oxford, monkeypatch):
    assert run_main(TRAIN + ["--seqL", "2", "--nEpochs", "1"], tiny_oxford, monkeypatch) == 0
    run = only_run(tiny_oxford)
    assert list(run.glob("events.out.tfevents.*"))
    assert not (run / "wandb").exists()


@pytest.mark.slow
def test_wandb_offline_needs_no_account(tiny_oxford, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("WANDB_SILENT", "true")
    assert run_main(TRAIN + ["--seqL", "2", "--nEpochs", "1", "--wandb", "offline"], tiny_oxford, monkeypatch) == 0
    run = only_run(tiny_oxford)
    offline = list((run / "wandb").glob("offline-run-*"))
    assert offline, "an offline wandb run folder is written inside the run folder"
    assert list(offline[0].glob("*.wandb"))                  # the run was finished and flushed


@pytest.mark.slow
def test_wandb_online_without_account_fails_at_once(tiny_oxford, monkeypatch, tmp_path, capsys):
    pytest.importorskip("wandb")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))                 # no ~/.netrc with a key
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "wandbcfg"))
    assert run_main(TRAIN + ["--seqL", "2", "--nEpochs", "1", "--wandb", "online"], tiny_oxford, monkeypatch) == 1
    err = capsys.readouterr().err
    assert "wandb" in err and "--wandb offline" in err and "Traceback" not in err
    assert not (tiny_oxford / "data" / "runs").exists() or not any((tiny_oxford / "data" / "runs").iterdir())


def read_event_scalars(path) -> dict:
    """Scalar values by tag from a TensorBoard event file (TFRecord framing, read without tensorboard)."""
    import struct

    from tensorboardX.proto.event_pb2 import Event

    data, out, at = path.read_bytes(), {}, 0
    while at < len(data):
        (length,) = struct.unpack("<Q", data[at:at + 8])
        event = Event.FromString(data[at + 12:at + 12 + length])
        at += 12 + length + 4
        for value in event.summary.value:
            if value.HasField("simple_value"):
                out.setdefault(value.tag, []).append((event.step, value.simple_value))
    return out


def test_tensorboard_events_hold_the_epoch_scalars(tiny_oxford, monkeypatch):
    assert run_main(TRAIN + ["--seqL", "2", "--nEpochs", "2"], tiny_oxford, monkeypatch) == 0
    run = only_run(tiny_oxford)
    (events,) = run.glob("events.out.tfevents.*")
    scalars = read_event_scalars(events)
    # tensorboardX writes the tag Val/Recall@5 as Val/Recall_5
    assert [step for step, _ in scalars["Train/AvgLoss"]] == [1, 2]
    assert [step for step, _ in scalars["Val/Recall_5"]] == [1, 2]
    assert all(0 <= v <= 1 for _, v in scalars["Val/Recall_1"])
    log = (run / "train.log").read_text()
    logged = [float(x) for x in re.findall(r"average loss ([0-9.]+)", log)]
    assert [round(v, 4) for _, v in scalars["Train/AvgLoss"]] == logged
