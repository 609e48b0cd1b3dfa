"""Comparing runs side by side from their ``summary.json`` files (``--mode compare``)."""
from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from seqmatchnet.common.errors import UserError
from seqmatchnet.evaluation.summary import SUMMARY_NAME, TABLE_N, _method

# ---------------------------------------------------------------- comparing runs

def find_summary(path: Path) -> Path:
    """The summary of ``path``: the file itself, ``<path>/summary.json``, or the newest
    ``<path>/**/summary.json``."""
    path = Path(path)
    if path.is_file():
        return path
    if not path.exists():
        raise UserError(f"{path} does not exist: give a run folder, a results folder or a "
                        "summary.json")
    direct = path / SUMMARY_NAME
    if direct.is_file():
        return direct
    found = [p for p in path.rglob(SUMMARY_NAME) if p.is_file()]
    if not found:
        raise UserError(f"no {SUMMARY_NAME} in {path} or below: write one with "
                         f"`python main.py --mode test ... --resultsPath {path}`")
    return max(found, key=lambda p: p.stat().st_mtime)


def load_summary(path: Path) -> tuple[Path, dict]:
    file = find_summary(path)
    try:
        data = json.loads(file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UserError(f"{file} is not a readable JSON summary ({exc})") from exc
    if not isinstance(data, dict):
        raise UserError(f"{file} does not hold a JSON object: is it a summary.json?")
    return file, data


def _get(data: dict, *keys: str) -> Any:
    """``data[k0][k1]...``, or None where a level is missing."""
    for k in keys:
        if not isinstance(data, dict) or k not in data:
            return None
        data = data[k]
    return data


def _fmt(value: Any, spec: str = ".4f", unit: str = "") -> str:
    if value is None or isinstance(value, bool):
        return "-" if value is None else str(value)
    if isinstance(value, (int, float)):
        return "-" if isinstance(value,
                                 float) and not math.isfinite(value) else f"{value:{spec}}{unit}"
    return str(value)


def summary_row(name: str, data: dict) -> list[str]:
    """One table row of a summary (top-level fields first, then its options)."""
    options = data.get("options") if isinstance(data.get("options"), dict) else {}

    def field(key: str) -> Any:
        return data.get(key) if data.get(key) is not None else options.get(key)

    method = data.get("method_label") or data.get("method") or _method(options)
    recalls = data.get("recalls") or {}
    row = [name, _fmt(field("dataset")), _fmt(field("split")), _fmt(field("seqL"), "d"),
           _fmt(method)]
    row += [_fmt(recalls.get(str(n)) if isinstance(recalls, dict) else None) for n in TABLE_N]
    row += [_fmt(_get(data, "precision_recall", "auc")),
            _fmt(_get(data, "precision_recall", "recall_at_100_precision")),
            _fmt(_get(data, "timings", "matching_s"), ".2f", " s")]
    return row


def _run_name(given: Path, file: Path) -> str:
    given = Path(given)
    if given.is_file():
        parent = file.parent
        return parent.name if parent.name else str(parent)
    return given.resolve().name or str(given)


def compare_runs(paths: Sequence[Path]) -> str:
    """A side-by-side table of the summaries of ``paths`` (run folders, results folders or summary
    files).

    Missing fields show as '-'; a path without a summary raises ValueError.
    """
    if not paths:
        raise UserError("no runs to compare: give one or more run folders, results folders or "
                        "summary.json files")
    header = ["run", "dataset", "split", "seqL", "method", *(f"R@{n}" for n in TABLE_N), "AUC",
              "R@100%P", "matching"]
    rows = []
    for p in paths:
        file, data = load_summary(Path(p))
        rows.append(summary_row(_run_name(Path(p), file), data))
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]

    def fmt(r: list[str]) -> str:   # text columns left-aligned, numbers right-aligned
        return "  ".join(c.ljust(w) if i < 5 else c.rjust(w)
                         for i, (c, w) in enumerate(zip(r, widths)))

    lines = [fmt(header), "  ".join("-" * w for w in widths), *(fmt(r) for r in rows)]
    return "\n".join(line.rstrip() for line in lines)
