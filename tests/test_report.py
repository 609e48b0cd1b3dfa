"""Run summaries: environment, checksums, JSON-safety, and the comparison table."""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import pytest

from seqmatchnet.cli import compare as compare_mode
from seqmatchnet.common.errors import UserError
from seqmatchnet.evaluation import compare
from seqmatchnet.evaluation import summary as summary_mod

OPTIONS = {"mode": "test", "dataset": "nordland-sw", "split": "test", "seqL": 5, "matcher": "seqMatchNet",
           "pooling": True, "resultsPath": Path("/tmp/x"), "seed": np.int64(123)}


def test_environment_info_keys(tmp_path):
    info = summary_mod.environment_info()
    for key in ("python", "torch", "numpy", "faiss", "platform", "cuda_available", "git_commit", "git_dirty"):
        assert key in info
    assert isinstance(info["cuda_available"], bool)
    outside = summary_mod.environment_info(tmp_path)       # not a git checkout
    assert outside["git_commit"] is None and outside["git_dirty"] is None


def test_file_info_checksum(tmp_path):
    f = tmp_path / "desc.npy"
    data = os.urandom(3 * 1024 * 1024 + 17)             # spans several 1 MiB blocks
    f.write_bytes(data)
    (info,) = summary_mod.file_info([f])
    assert info["name"] == "desc.npy" and info["size"] == len(data)
    assert info["sha256"] == hashlib.sha256(data).hexdigest() and info["partial"] is False


def test_file_info_partial_and_missing(tmp_path):
    f = tmp_path / "big.bin"
    data = os.urandom(5000)
    f.write_bytes(data)
    info, missing = summary_mod.file_info([f, tmp_path / "absent.npy"], full_limit=4096, part=1000)
    expected = hashlib.sha256(data[:1000] + data[-1000:] + b"5000").hexdigest()
    assert info["partial"] is True and info["sha256"] == expected
    assert missing["missing"] is True and missing["sha256"] is None


def test_build_summary_is_json_serialisable(tmp_path):
    f = tmp_path / "db.npy"
    f.write_bytes(b"abc")
    recalls = {np.int64(1): np.float64(0.5), 5: np.float32(0.75), 10: float("nan")}
    radius = dict(zip((1, 5), np.array([[0.1, 0.2], [0.3, 0.4]])))
    pr = {"precision": [1.0], "recall": [0.5], "thresholds": [0.1], "auc": np.float64(0.42),
          "recall_at_100_precision": np.float64(0.3)}
    summary = summary_mod.build_summary("test", OPTIONS, recalls, radius, pr, {"matching_s": np.float64(1.5)}, [f],
                                   extra={"queries": np.int64(7)})
    text = json.dumps(summary, allow_nan=False)
    back = json.loads(text)
    assert back["recalls"] == {"1": 0.5, "5": 0.75, "10": None}
    assert back["radius_recalls"]["5"] == pytest.approx([0.3, 0.4])
    assert back["precision_recall"] == {"auc": 0.42, "recall_at_100_precision": 0.3}
    assert back["options"]["resultsPath"] == "/tmp/x" and back["options"]["seed"] == 123
    assert back["data_files"][0]["sha256"] == hashlib.sha256(b"abc").hexdigest()
    assert back["queries"] == 7 and back["dataset"] == "nordland-sw"
    assert back["method"] == "sequence matching, learned projection"
    assert back["created_utc"].endswith("+00:00") and "torch" in back["environment"]
    assert summary_mod.build_summary("test", OPTIONS, {}, {}, None, {}, [])["precision_recall"] is None
    with pytest.raises(ValueError, match="replace"):
        summary_mod.build_summary("test", OPTIONS, {}, {}, None, {}, [], extra={"recalls": 1})


def write_summary(folder: Path, name: str = "summary.json", **fields) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_text(json.dumps(fields))
    return path


def test_compare_runs_two_summaries(tmp_path):
    write_summary(tmp_path / "runA", dataset="nordland-sw", split="test", seqL=5, method="seqMatchNet/learned",
                  recalls={"1": 0.81234, "5": 0.9, "10": 0.95, "20": 0.97, "100": 0.99},
                  precision_recall={"auc": 0.7777, "recall_at_100_precision": 0.1234}, timings={"matching_s": 3.21})
    # an older summary: fields only under options, no PR, a partial recall table; found below the folder
    write_summary(tmp_path / "runB" / "results", split="val", recalls={"1": 0.5, "5": 0.6},
                  options={"dataset": "oxford-v1.0", "seqL": 10, "matcher": "None", "pooling": False},
                  timings={})
    table = compare.compare_runs([tmp_path / "runA", tmp_path / "runB"])
    lines = table.splitlines()
    assert len(lines) == 4 and lines[0].split()[:5] == ["run", "dataset", "split", "seqL", "method"]
    a = lines[2].split()
    assert a == ["runA", "nordland-sw", "test", "5", "seqMatchNet/learned", "0.8123", "0.9000", "0.9500", "0.9700",
                 "0.7777", "0.1234", "3.21", "s"]
    b = lines[3].split()
    assert b[:4] == ["runB", "oxford-v1.0", "val", "10"] and "single frame, raw descriptors" in lines[3]
    assert b[-7:] == ["0.5000", "0.6000", "-", "-", "-", "-", "-"]


def test_compare_runs_accepts_summary_file_and_newest(tmp_path):
    old = write_summary(tmp_path / "run" / "a", recalls={"1": 0.1})
    new = write_summary(tmp_path / "run" / "b", recalls={"1": 0.2})
    os.utime(old, (1, 1))
    assert compare.find_summary(tmp_path / "run") == new
    table = compare.compare_runs([old])
    assert table.splitlines()[2].split()[:6] == ["a", "-", "-", "-", "-", "0.1000"]


def test_compare_runs_missing_summary(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no summary.json"):
        compare.compare_runs([tmp_path / "empty"])
    with pytest.raises(UserError, match="does not exist"):
        compare.compare_runs([tmp_path / "nowhere"])
    bad = tmp_path / "bad" / "summary.json"
    bad.parent.mkdir()
    bad.write_text("{not json")
    with pytest.raises(UserError, match="not a readable JSON"):
        compare.compare_runs([bad.parent])


def test_main_compare(tmp_path, capsys):
    write_summary(tmp_path / "r1", recalls={"1": 0.25})
    assert compare_mode.main([str(tmp_path / "r1")]) == 0
    assert "0.2500" in capsys.readouterr().out
    assert compare_mode.main([str(tmp_path / "missing")]) == 1
    assert "error:" in capsys.readouterr().err


def test_method_label_names_method_checkpoint_and_reranking():
    base = {"matcher": "seqMatchNet", "pooling": False, "method": "seqmatch", "w": 5, "predictionsFile": None}
    ckpt = {"run": "Nov27_10-00-00_l5_x", "epoch": 3, "which": "best"}
    labels = {
        "raw": summary_mod.method_label(base),
        "learned": summary_mod.method_label({**base, "pooling": True}, ckpt),
        "single": summary_mod.method_label({**base, "matcher": "None"}),
        "seqnet": summary_mod.method_label({**base, "method": "seqnet", "w": 3}, ckpt),
        "smooth": summary_mod.method_label({**base, "method": "smooth"}),
        "delta": summary_mod.method_label({**base, "method": "delta", "pooling": True}, ckpt),
        "hvpr": summary_mod.method_label({**base, "predictionsFile": "results/shortlist/results.npz"}),
        "speeds": summary_mod.method_label({**base, "velocities": "0.5:2:0.1"}),
    }
    assert len(set(labels.values())) == len(labels)                     # every result reads differently
    assert labels["learned"] == "sequence matching, learned projection (run Nov27_10-00-00_l5_x, epoch 3, best)"
    assert labels["seqnet"].startswith("SeqNet w=3, learned (run Nov27_10-00-00_l5_x, epoch 3")
    assert "raw descriptors" in labels["raw"] and "single frame" in labels["single"]
    assert labels["hvpr"].endswith("re-ranks the top 20 of results/shortlist/results.npz")
    assert labels["speeds"] == "sequence matching, raw descriptors, across speeds 0.5:2:0.1"
    assert summary_mod.method_label({**base, "velocities": "1"}) == labels["raw"]
