"""Shared helpers of the bench scripts: synthetic data, interleaved timing, peak memory in
fresh subprocesses, goal lines and tables. Imported by the scripts; nothing runs at import."""
from __future__ import annotations

import gc
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")   # as main.py does, before torch loads

import numpy as np  # noqa: E402
import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
CHILD_TAG = "CHILD_RESULT "
CPU_NOTE = ("note: timings are medians of interleaved repeats measured in this run; another process may "
            "share the CPU, so only the ratios are meaningful, not the absolute seconds")


# ---------------------------------------------------------------- data

def route_features(n_db: int, n_q: int, dim: int, seed: int = 0, noise: float = 0.5,
                   nuisance: float = 0.5) -> tuple[torch.Tensor, torch.Tensor]:
    """Two contiguous traversals of one route as L2-normalised float32 rows ``[n_db, dim]``, ``[n_q, dim]``.

    Query frame ``j`` sees the place of database frame ``j * n_db // n_q``: a smooth place signal
    (adjacent frames alike), a constant per-traversal nuisance and independent per-frame noise.
    Built in slabs so that the transient memory stays about one output array.
    """
    gen = torch.Generator().manual_seed(seed)
    n_place = max(n_db, n_q)
    place = torch.empty(n_place, dim)
    state = torch.randn(dim, generator=gen)
    slab = 4096
    for lo in range(0, n_place, slab):      # a slow random walk: place(s) is smooth along the route
        hi = min(lo + slab, n_place)
        incr = torch.randn(hi - lo, dim, generator=gen) * 0.15
        walk = torch.cumsum(incr, dim=0) + state
        place[lo:hi] = walk
        state = walk[-1]
    place -= place.mean(dim=0)
    place /= place.norm(dim=1, keepdim=True)
    nuis = torch.randn(dim, generator=gen)
    nuis *= nuisance / nuis.norm()

    def traversal(n: int, extra: torch.Tensor | None) -> torch.Tensor:
        rows = torch.arange(n) * n_place // n
        out = torch.empty(n, dim)
        for lo in range(0, n, slab):
            hi = min(lo + slab, n)
            x = place[rows[lo:hi]] + torch.randn(hi - lo, dim, generator=gen) * (noise / dim ** 0.5)
            if extra is not None:
                x += extra
            out[lo:hi] = x / x.norm(dim=1, keepdim=True)
        return out

    return traversal(n_db, None), traversal(n_q, nuis)


def unit_rows(n: int, dim: int, seed: int = 0) -> torch.Tensor:
    """Independent random unit vectors ``[n, dim]`` float32."""
    x = torch.randn(n, dim, generator=torch.Generator().manual_seed(seed))
    return x / x.norm(dim=1, keepdim=True)


# ---------------------------------------------------------------- timing

def timed(fn: Callable[[], object]) -> tuple[float, object]:
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def interleaved(fns: dict[str, Callable[[], object]], repeats: int, warmup: bool = True) -> dict[str, list[float]]:
    """Run each function once per round, round after round, and collect the times per name.

    Interleaving spreads any load from other processes over all variants alike.
    """
    if warmup:
        for fn in fns.values():
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            gc.collect()
            times[name].append(timed(fn)[0])
    return times


def median(xs: Sequence[float]) -> float:
    return float(statistics.median(xs))


# ---------------------------------------------------------------- memory

def _status_kib(key: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def rss_bytes() -> int:
    """Current resident set size."""
    kib = _status_kib("VmRSS")
    if kib is not None:
        return kib * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # pragma: no cover - non-Linux fallback


def maxrss_bytes() -> int:
    """``getrusage(RUSAGE_SELF).ru_maxrss`` (KiB on Linux) in bytes."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class PeakMemory:
    """Peak RSS above the RSS at entry, for the code inside ``with``.

    On Linux the high-water mark is reset at entry (``/proc/self/clear_refs`` = 5), so input
    allocation before the block does not count; the peak is then ``VmHWM`` (which is what
    ``ru_maxrss`` reports in a fresh process). Without the reset, ``ru_maxrss`` is used and
    ``reset`` is False (the peak may then include transients from before the block).
    """

    def __enter__(self) -> PeakMemory:
        gc.collect()
        self.reset = False
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            self.reset = True
        except OSError:
            pass
        self.base = rss_bytes()
        self.maxrss_before = maxrss_bytes()
        return self

    def __exit__(self, *exc) -> None:
        hwm = _status_kib("VmHWM")
        self.maxrss_after = maxrss_bytes()
        self.peak = hwm * 1024 if (self.reset and hwm is not None) else self.maxrss_after
        self.delta = max(self.peak - self.base, 0)


def child_report(**values) -> None:
    """What a ``--child`` run prints for its parent (one line, JSON)."""
    print(CHILD_TAG + json.dumps(values), flush=True)


def run_child(script: Path, args: list[str], timeout: float | None = None) -> dict:
    """Run ``python script --child ...`` in a fresh process and return its ``child_report``."""
    cmd = [sys.executable, str(script), "--child", *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=str(ROOT))
    for line in proc.stdout.splitlines()[::-1]:
        if line.startswith(CHILD_TAG):
            return json.loads(line[len(CHILD_TAG):])
    raise RuntimeError(f"child {' '.join(args)} failed (exit {proc.returncode}):\n{proc.stdout[-2000:]}\n"
                       f"{proc.stderr[-4000:]}")


# ---------------------------------------------------------------- output

def gib(n_bytes: float) -> str:
    return f"{n_bytes / 1024**3:.2f} GiB"


def mib(n_bytes: float) -> str:
    return f"{n_bytes / 1024**2:.0f} MiB"


def table(rows: list[Sequence[object]], header: Sequence[str]) -> str:
    cells = [[str(c) for c in header]] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    lines = ["  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths))) for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def goal(ok: bool, text: str) -> bool:
    print(f"{'GOAL MET' if ok else 'GOAL MISSED'}: {text}")
    return ok


def add_size_options(parser, quick_help: str, db: int, queries: int | None, dim: int) -> None:
    """The options every scoring benchmark shares: --quick, --db, --queries (unless None), --dim,
    --seqL, --seed and --threads."""
    parser.add_argument("--quick", action="store_true", help=quick_help)
    parser.add_argument("--db", type=int, default=db, help="database frames")
    if queries is not None:
        parser.add_argument("--queries", type=int, default=queries, help="query frames")
    parser.add_argument("--dim", type=int, default=dim, help="descriptor dimensions")
    parser.add_argument("--seqL", type=int, default=5, help="sequence length")
    parser.add_argument("--seed", type=int, default=0)
    add_threads_option(parser)


def ran_as_child(args, child: Callable) -> bool:
    """Apply --threads; in a ``--child`` run, do the measured part and report: True when it did."""
    apply_threads(args.threads)
    if getattr(args, "child", False):
        child(args)
        return True
    return False


def add_threads_option(parser) -> None:
    parser.add_argument("--threads", type=int, default=0,
                        help="torch intra-op threads (0: torch's default); passed on to the subprocesses")


def apply_threads(n: int) -> None:
    if n > 0:
        torch.set_num_threads(n)


def machine_line() -> str:
    return (f"python {sys.version.split()[0]}, torch {torch.__version__}, numpy {np.__version__}, "
            f"{torch.get_num_threads()} torch threads, {os.cpu_count()} CPUs")


def route_split(db: torch.Tensor, q: torch.Tensor, name: str = "bench"):
    """An in-memory ``datasets.Split`` of two contiguous traversals of ``route_features``: frames 2 m
    apart, positives within 10 m, non-trivial positives within 5 m."""
    import numpy as np

    from seqmatchnet.data.windows import Split, segment_bounds

    n_db, n_q = len(db), len(q)
    n_place = max(n_db, n_q)                     # as in route_features
    db_pos = np.stack([(np.arange(n_db) * n_place // n_db) * 2.0, np.zeros(n_db)], axis=1)
    q_pos = np.stack([(np.arange(n_q) * n_place // n_q) * 2.0, np.zeros(n_q)], axis=1)
    return Split(name=name, db_desc=db.numpy(), q_desc=q.numpy(), db_positions=db_pos, q_positions=q_pos,
                 pos_dist_thr=10.0, non_triv_pos_dist_sq_thr=25.0, db_bounds=segment_bounds(n_db),
                 q_bounds=segment_bounds(n_q))
