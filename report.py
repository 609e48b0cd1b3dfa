"""Run summaries: what was run, on what, with which code, and how well.

``build_summary`` produces the content of ``summary.json`` (options, library
versions, git commit, data-file checksums, recalls, precision-recall figures,
timings, UTC timestamp); ``compare_runs`` puts several summaries side by side
(``main_compare`` is its command-line entry).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import platform
import subprocess
import sys
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from entry import OneLineParser, run_own_mode
from utils import UserError

PROJECT_DIR = Path(__file__).resolve().parent
MIB = 1024 ** 2
HASH_BLOCK = 1 * MIB
FULL_HASH_LIMIT = 256 * MIB     # larger files: hash the first and last PARTIAL_HASH_PART bytes plus the size
PARTIAL_HASH_PART = 64 * MIB
SUMMARY_NAME = "summary.json"
TABLE_N = (1, 5, 10, 20)


# ---------------------------------------------------------------- environment and files

def _git(args: list[str], cwd: Path) -> str | None:
    try:
        out = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, timeout=10, check=True)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout


def environment_info(project_dir: Path = PROJECT_DIR) -> dict:
    """Python, library versions, platform, CUDA, and the git commit of ``project_dir``.

    ``git_commit`` is None outside a git checkout (or without git);
    ``git_dirty`` is True when ``git status --porcelain`` lists anything
    (None when unknown).
    """
    import torch

    info: dict[str, Any] = {"python": platform.python_version(), "torch": torch.__version__,
                            "numpy": np.__version__, "faiss": None, "platform": platform.platform(),
                            "cuda_available": bool(torch.cuda.is_available()), "cuda_device": None,
                            "cuda_version": torch.version.cuda, "git_commit": None, "git_dirty": None}
    try:
        import faiss
        info["faiss"] = getattr(faiss, "__version__", "unknown")
    except Exception:  # missing, or a broken native library: either way not usable
        pass
    if info["cuda_available"]:
        try:
            info["cuda_device"] = torch.cuda.get_device_name(0)
        except Exception:  # driver problems should not stop a summary
            pass
    head = _git(["rev-parse", "HEAD"], project_dir)
    if head:
        info["git_commit"] = head.strip()
        # --no-optional-locks: a read-only status that never rewrites the index
        status = _git(["--no-optional-locks", "status", "--porcelain"], project_dir)
        info["git_dirty"] = None if status is None else bool(status.strip())
    return info


def _sha256(path: Path, size: int, full_limit: int, part: int) -> tuple[str, bool]:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        if size <= full_limit:
            while block := f.read(HASH_BLOCK):
                h.update(block)
            return h.hexdigest(), False
        for start in (0, size - part):
            f.seek(start)
            left = part
            while left > 0 and (block := f.read(min(HASH_BLOCK, left))):
                h.update(block)
                left -= len(block)
        h.update(str(size).encode())
        return h.hexdigest(), True


def file_info(paths: Iterable[Path], full_limit: int = FULL_HASH_LIMIT, part: int = PARTIAL_HASH_PART) -> list[dict]:
    """``[{name, path, size, sha256, partial}]`` per file (1 MiB blocks).

    Files over ``full_limit`` bytes are hashed by their first and last
    ``part`` bytes plus their size (``partial: true``). A missing file gets
    ``missing: true`` and None for size and checksum.
    """
    out = []
    for p in paths:
        p = Path(p)
        entry: dict[str, Any] = {"name": p.name, "path": str(p)}
        if not p.is_file():
            entry.update(size=None, sha256=None, partial=False, missing=True)
        else:
            size = p.stat().st_size
            digest, partial = _sha256(p, size, full_limit, part)
            entry.update(size=size, sha256=digest, partial=partial)
        out.append(entry)
    return out


# ---------------------------------------------------------------- summary

def plain(obj: Any) -> Any:
    """JSON-native copy: NumPy scalars/arrays, Paths, tuples and sets converted; dict keys as strings;
    NaN and infinities as None (standard JSON has no NaN)."""
    if isinstance(obj, dict):
        return {str(plain(k)): plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple, set, frozenset)):
        return [plain(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return plain(obj.tolist())
    if isinstance(obj, np.generic):
        return plain(obj.item())
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if obj is None or isinstance(obj, (bool, int, str)):
        return obj
    if isinstance(obj, Path):
        return str(obj)
    if hasattr(obj, "item") and callable(obj.item) and getattr(obj, "ndim", None) == 0:  # 0-d torch tensors
        return plain(obj.item())
    return str(obj)


def build_summary(mode: str, options: dict, recalls: dict, radius_recalls: dict, pr: dict | None, timings: dict,
                  files: Sequence[Path], extra: dict | None = None) -> dict:
    """The content of ``summary.json`` (JSON-native: ``json.dumps`` works on it).

    ``options`` is ``vars(opt)``; ``recalls`` ``{N: recall}``;
    ``radius_recalls`` ``{radius: {N: recall}}`` (or ``{radius: [recall per
    N]}``); ``pr`` the output of
    ``plots.precision_recall`` (only its AUC and recall at 100 % precision are
    kept) or None; ``timings`` seconds per phase; ``files`` the data files
    read (checksummed). ``extra`` keys are added at the top level and may not
    replace the standard ones.
    """
    options = plain(dict(options))
    summary = {
        "mode": mode,
        "created_utc": datetime.now(UTC).isoformat(timespec="seconds"),
        "dataset": options.get("dataset"),
        "split": options.get("split"),
        "seqL": options.get("seqL"),
        "method": _method(options),
        "recalls": plain(recalls),
        "radius_recalls": plain(radius_recalls),
        "precision_recall": None if pr is None else {
            "auc": plain(pr.get("auc")), "recall_at_100_precision": plain(pr.get("recall_at_100_precision"))},
        "timings": plain(timings),
        "options": options,
        "environment": plain(environment_info()),
        "data_files": file_info(files),
    }
    for key, value in (extra or {}).items():
        if str(key) in summary:
            raise ValueError(f"extra key {key!r} would replace the standard summary field of that name")
        summary[str(key)] = plain(value)
    return summary


METHOD_NAMES = {"seqmatch": "sequence matching", "single": "single frame", "smooth": "window mean (smooth)",
                "delta": "Delta Descriptors", "seqnet": "SeqNet"}


def method_label(options: dict, checkpoint: dict | None = None) -> str:
    """What produced a result, in words: the method, its descriptors (raw or learned, with the
    run, epoch and which checkpoint) and the re-ranking source, e.g. ``sequence matching, learned
    projection (run Nov27_10-00-00_l5_0, epoch 3, latest)``."""
    method = options.get("method", "seqmatch")
    if options.get("matcher") == "None":
        method = "single"
    name = METHOD_NAMES.get(method, str(method))
    if method == "seqnet":
        name += f" w={options.get('w')}"
    if method == "seqnet" or options.get("pooling"):
        name += ", learned" if method == "seqnet" else ", learned projection"
        if checkpoint:
            name += f" (run {checkpoint['run']}, epoch {checkpoint['epoch']}, {checkpoint['which']})"
    else:
        name += ", raw descriptors"
    if str(options.get("velocities", "1")) not in ("1", "1.0"):
        name += f", across speeds {options['velocities']}"
        if options.get("trajectoryGrid", "half") != "half":
            name += f" ({options['trajectoryGrid']} frames)"
    if options.get("predictionsFile"):
        name += f"; re-ranks the top 20 of {options['predictionsFile']}"
    return name


def _method(options: dict) -> str | None:
    """The short method name of ``summary.json`` (``method_label`` without the checkpoint)."""
    if "matcher" not in options and "pooling" not in options and "method" not in options:
        return None
    return method_label(options)


# ---------------------------------------------------------------- comparing runs

def find_summary(path: Path) -> Path:
    """The summary of ``path``: the file itself, ``<path>/summary.json``, or the newest ``<path>/**/summary.json``."""
    path = Path(path)
    if path.is_file():
        return path
    if not path.exists():
        raise UserError(f"{path} does not exist: give a run folder, a results folder or a summary.json")
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
        return "-" if isinstance(value, float) and not math.isfinite(value) else f"{value:{spec}}{unit}"
    return str(value)


def summary_row(name: str, data: dict) -> list[str]:
    """One table row of a summary (top-level fields first, then its options)."""
    options = data.get("options") if isinstance(data.get("options"), dict) else {}

    def field(key: str) -> Any:
        return data.get(key) if data.get(key) is not None else options.get(key)

    method = data.get("method_label") or data.get("method") or _method(options)
    recalls = data.get("recalls") or {}
    row = [name, _fmt(field("dataset")), _fmt(field("split")), _fmt(field("seqL"), "d"), _fmt(method)]
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
    """A side-by-side table of the summaries of ``paths`` (run folders, results folders or summary files).

    Missing fields show as '-'; a path without a summary raises ValueError.
    """
    if not paths:
        raise UserError("no runs to compare: give one or more run folders, results folders or summary.json files")
    header = ["run", "dataset", "split", "seqL", "method", *(f"R@{n}" for n in TABLE_N), "AUC", "R@100%P",
              "matching"]
    rows = []
    for p in paths:
        file, data = load_summary(Path(p))
        rows.append(summary_row(_run_name(Path(p), file), data))
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]

    def fmt(r: list[str]) -> str:   # text columns left-aligned, numbers right-aligned
        return "  ".join(c.ljust(w) if i < 5 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))

    lines = [fmt(header), "  ".join("-" * w for w in widths), *(fmt(r) for r in rows)]
    return "\n".join(line.rstrip() for line in lines)


def main_compare(argv: Sequence[str] | None = None) -> int:
    """``python main.py --mode compare RUN [RUN ...]``: print the comparison table; 1 on a bad path."""
    args = list(sys.argv[1:] if argv is None else argv)
    if args[:2] == ["--mode", "compare"]:
        args = args[2:]
    elif args[:1] == ["--mode=compare"]:
        args = args[1:]
    return run_own_mode(_parse_compare, args, lambda opts: print(compare_runs(opts.runs)))


def _parse_compare(args: list[str]) -> argparse.Namespace:
    parser = OneLineParser(mode="compare", description="Compare runs side by side from their summary.json files.")
    parser.add_argument("runs", nargs="+", type=Path,
                        help="run folders, results folders (searched for the newest summary.json) or summary files")
    return parser.parse_args(args)
