"""Run summaries: what was run, on what, with which code, and how well.

``build_summary`` produces the content of ``summary.json`` (options, library versions, git commit,
data-file checksums, recalls, precision-recall figures, timings, UTC timestamp); ``compare_runs``
puts several summaries side by side (``main_compare`` is its command-line entry).
"""
from __future__ import annotations

import hashlib
import math
import platform
import subprocess
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

PROJECT_DIR = Path(__file__).resolve().parents[2]   # the repository (git information)
MIB = 1024 ** 2
HASH_BLOCK = 1 * MIB
# larger files: hash the first and last PARTIAL_HASH_PART bytes plus the size
FULL_HASH_LIMIT = 256 * MIB
PARTIAL_HASH_PART = 64 * MIB
SUMMARY_NAME = "summary.json"
TABLE_N = (1, 5, 10, 20)


# ---------------------------------------------------------------- environment and files

def _git(args: list[str], cwd: Path) -> str | None:
    try:
        out = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, timeout=10,
                             check=True)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout


def environment_info(project_dir: Path = PROJECT_DIR) -> dict:
    """Python, library versions, platform, CUDA, and the git commit of ``project_dir``.

    ``git_commit`` is None outside a git checkout (or without git); ``git_dirty`` is True when ``git
    status --porcelain`` lists anything (None when unknown).
    """
    import torch

    info: dict[str, Any] = {"python": platform.python_version(), "torch": torch.__version__,
                            "numpy": np.__version__, "faiss": None, "platform": platform.platform(),
                            "cuda_available": bool(torch.cuda.is_available()), "cuda_device": None,
                            "cuda_version": torch.version.cuda, "git_commit": None,
                            "git_dirty": None}
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


def file_info(paths: Iterable[Path], full_limit: int = FULL_HASH_LIMIT,
              part: int = PARTIAL_HASH_PART) -> list[dict]:
    """``[{name, path, size, sha256, partial}]`` per file (1 MiB blocks).

    Files over ``full_limit`` bytes are hashed by their first and last ``part`` bytes plus their
    size (``partial: true``). A missing file gets ``missing: true`` and None for size and checksum.
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
    """JSON-native copy: NumPy scalars/arrays, Paths, tuples and sets converted; dict keys as
    strings; NaN and infinities as None (standard JSON has no NaN)."""
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
    # 0-d torch tensors
    if hasattr(obj, "item") and callable(obj.item) and getattr(obj, "ndim", None) == 0:
        return plain(obj.item())
    return str(obj)


def build_summary(mode: str, options: dict, recalls: dict, radius_recalls: dict, pr: dict | None,
                  timings: dict, files: Sequence[Path], extra: dict | None = None) -> dict:
    """The content of ``summary.json`` (JSON-native: ``json.dumps`` works on it).

    ``options`` is ``vars(opt)``; ``recalls`` ``{N: recall}``; ``radius_recalls`` ``{radius: {N:
    recall}}`` (or ``{radius: [recall per N]}``); ``pr`` the output of ``plots.precision_recall``
    (only its AUC and recall at 100 % precision are kept) or None; ``timings`` seconds per phase;
    ``files`` the data files read (checksummed). ``extra`` keys are added at the top level and may
    not replace the standard ones.
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
            "auc": plain(pr.get("auc")),
            "recall_at_100_precision": plain(pr.get("recall_at_100_precision"))},
        "timings": plain(timings),
        "options": options,
        "environment": plain(environment_info()),
        "data_files": file_info(files),
    }
    for key, value in (extra or {}).items():
        if str(key) in summary:
            raise ValueError(f"extra key {key!r} would replace the standard summary field of that "
                             "name")
        summary[str(key)] = plain(value)
    return summary


METHOD_NAMES = {"seqmatch": "sequence matching", "single": "single frame",
                "smooth": "window mean (smooth)", "delta": "Delta Descriptors", "seqnet": "SeqNet"}


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
            name += (f" (run {checkpoint['run']}, epoch {checkpoint['epoch']}, "
                     f"{checkpoint['which']})")
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
