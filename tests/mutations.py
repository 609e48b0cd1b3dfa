"""Planted bugs that the tests must catch.

    python tests/mutations.py [--only NAME ...] [--list] [--keep]

Copies the repository (tracked files and untracked, not ignored ones) to a temporary folder
``TMP/main`` next to a link ``TMP/shared`` to the reference fixture (the tests look for it at
``ROOT.parent / "shared" / "reference"``), runs the selected tests there once unchanged, then once per
mutation with that mutation planted by text substitution, with ``REQUIRE_REFERENCE=1`` so that no
fidelity test can pass by skipping. A test that already fails on the unchanged copy is deselected, so
only a failure caused by the mutation counts. Prints a table ``mutation | caught by`` and exits 1 when
a mutation survives (no test fails), 2 when a mutation no longer applies (its text is gone).
"""
from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = (ROOT.parent / "shared").resolve()
TESTS = ["tests/test_seqmatch.py", "tests/test_reference.py"]
TIMEOUT_S = 600


@dataclass
class Mutation:
    name: str
    what: str
    path: str | None          # None: the file holding ``function`` (found in the copy)
    old: str
    new: str
    function: str | None = None   # substitute only inside this function's body

    def apply(self, root: Path) -> str:
        """Plant the bug in the copy at ``root``; returns the file(s) changed."""
        paths = [self.path] if self.path else find_definitions(root, self.function)
        for path in paths:
            text = (root / path).read_text()
            lo, hi = function_span(text, self.function) if self.function else (0, len(text))
            at = text.find(self.old, lo, hi)
            if at < 0:
                where = f"{path} {self.function}()" if self.function else path
                raise LookupError(f"{self.old!r} not found in {where}")
            (root / path).write_text(text[:at] + self.new + text[at + len(self.old):])
        return ", ".join(paths)


def find_definitions(root: Path, function: str) -> list[str]:
    """The project files (top level: not tests/ or bench/) that define ``function``."""
    pattern = re.compile(rf"^def {re.escape(function)}\(", re.M)
    found = [p.relative_to(root).as_posix() for p in sorted(root.glob("*.py")) if pattern.search(p.read_text())]
    if not found:
        raise LookupError(f"no project file defines {function}()")
    return found


def function_span(text: str, function: str) -> tuple[int, int]:
    """Character range of a top-level function: from its ``def`` to the next top-level statement."""
    m = re.search(rf"^def {re.escape(function)}\(", text, re.M)
    if m is None:
        raise LookupError(f"{function}() not found")
    end = re.compile(r"^\S", re.M)
    body = text.index("\n", m.start()) + 1
    nxt = end.search(text, body)
    while nxt is not None and text.startswith(")", nxt.start()):   # a multi-line signature
        nxt = end.search(text, text.index("\n", nxt.start()) + 1)
    return m.start(), nxt.start() if nxt else len(text)


MUTATIONS = [
    Mutation("ties by descending index", "equal scores ordered by descending database index",
             "seqMatchNet.py", "composite = run * span + key", "composite = run * span + (span - 1 - key)"),
    Mutation("ties shuffled", "equal scores in random order",
             "seqMatchNet.py", "composite = run * span + key",
             "composite = run * span + torch.randint_like(key, span)"),
    Mutation("index repeated in a tie", "within a run of equal scores an index is repeated over its neighbour",
             "seqMatchNet.py", "    return top_v, pos\n",
             "    pos = pos.clone()\n"
             "    pos[:, 1:] = torch.where(top_v[:, 1:] == top_v[:, :-1], pos[:, :-1], pos[:, 1:])\n"
             "    return top_v, pos\n"),
    Mutation("top-k boundary not fixed", "at the k boundary whichever tied entry torch.topk returned is kept",
             "seqMatchNet.py", "if bool(ambiguous.any()):", "if False:"),
    Mutation("re-rank ties by candidate order", "re-ranking keeps the candidates' order among equal scores",
             None, "d, order = topk_by_value_then_index(d, d.shape[1], ids=cand)",
             "d, order = torch.sort(d, dim=1, stable=True)", function="rerank"),
    Mutation("faiss ties by descending index", "single-frame search orders equal distances by descending index",
             None, "order = np.lexsort((idx, d))", "order = np.lexsort((-idx, d))", function="faiss_search"),
    Mutation("recall: < at the radius", "a database frame exactly at the radius is not a positive",
             None, "<= radius", "< radius", function="recall_table"),
    Mutation("window shifted at the end", "the shifted window at the end of a segment starts one frame early",
             "datasets.py", "start = np.where(shift_back, start - missing, start)",
             "start = np.where(shift_back, start - missing - 1, start)"),
]


def repo_files(root: Path) -> list[str]:
    out = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=root,
                         check=True, capture_output=True).stdout.decode()
    return sorted({f for f in out.split("\0") if f and (root / f).is_file()})


def copy_repo(dst: Path) -> None:
    for f in repo_files(ROOT):
        (dst / f).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / f, dst / f)


def run_tests(root: Path, stop_first: bool, deselect: list[str]) -> tuple[int, list[str], str, float]:
    """Run the selected tests in ``root``: (exit code, failing test ids, output tail, seconds)."""
    env = dict(os.environ, REQUIRE_REFERENCE="1", PYTHONDONTWRITEBYTECODE="1")
    cmd = [sys.executable, "-m", "pytest", "-q", "-rf", "-p", "no:cacheprovider", *TESTS]
    cmd += ["-x"] if stop_first else []
    for d in deselect:
        cmd += ["--deselect", d]
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=TIMEOUT_S)
        code, output = proc.returncode, proc.stdout + proc.stderr
    except subprocess.TimeoutExpired as exc:
        code, output = -1, f"timed out after {TIMEOUT_S} s\n{exc.stdout or ''}"
    failed = re.findall(r"^(?:FAILED|ERROR) (\S+?)(?: - |$)", output, re.M)
    return code, failed, "\n".join(output.strip().splitlines()[-15:]), time.perf_counter() - t0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--only", nargs="+", metavar="NAME", help="run only mutations whose name contains one of these")
    p.add_argument("--list", action="store_true", help="list the mutations and exit")
    p.add_argument("--keep", action="store_true", help="keep the temporary folder")
    args = p.parse_args(argv)
    mutations = [m for m in MUTATIONS if not args.only or any(s in m.name for s in args.only)]
    if args.list:
        for m in mutations:
            print(f"{m.name}: {m.what}")
        return 0
    if not (SHARED / "reference").is_dir():
        print(f"the reference fixture {SHARED / 'reference'} is absent", file=sys.stderr)
        return 2

    tmp = Path(tempfile.mkdtemp(prefix="mutations-"))
    try:
        pristine = tmp / "pristine"
        pristine.mkdir()
        copy_repo(pristine)
        (tmp / "shared").symlink_to(SHARED)
        code, known, tail, secs = run_tests(_fresh(pristine, tmp), False, [])
        print(f"unchanged copy: {'all selected tests pass' if code == 0 else f'{len(known)} failing'} ({secs:.0f} s)")
        if code not in (0, 1) or (code == 1 and not known):
            print(tail, file=sys.stderr)
            return 2
        for t in known:
            print(f"  already failing, deselected: {t}")

        rows, status = [], 0
        for m in mutations:
            work = _fresh(pristine, tmp)
            try:
                path = m.apply(work)
            except LookupError as exc:
                rows.append((m.name, f"NOT APPLIED: {exc}", ""))
                status = max(status, 2)
                continue
            code, failed, tail, secs = run_tests(work, True, known)
            if failed:
                caught = failed[0] + (f" (+{len(failed) - 1})" if len(failed) > 1 else "")
            elif code != 0:
                caught = f"pytest exit {code}: {tail.splitlines()[-1] if tail else ''}"
            else:
                caught = "SURVIVED"
                status = max(status, 1)
            rows.append((m.name, caught, f"{path}, {secs:.0f} s"))

        w0 = max(len("mutation"), *(len(r[0]) for r in rows))
        w1 = max(len("caught by"), *(len(r[1]) for r in rows))
        print(f"\n{'mutation':<{w0}} | {'caught by':<{w1}} | where, time")
        print(f"{'-' * w0}-|-{'-' * w1}-|-{'-' * 11}")
        for name, caught, where in rows:
            print(f"{name:<{w0}} | {caught:<{w1}} | {where}")
        survived = [r[0] for r in rows if r[1] == "SURVIVED"]
        print(f"\n{len(rows) - len(survived)} of {len(rows)} mutations caught"
              + (f"; SURVIVED: {', '.join(survived)}" if survived else ""))
        return status
    finally:
        if args.keep:
            print(f"kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)


def _fresh(pristine: Path, tmp: Path) -> Path:
    """A clean copy at ``tmp/main`` (where the tests find ``tmp/shared``)."""
    work = tmp / "main"
    if work.exists():
        shutil.rmtree(work)
    shutil.copytree(pristine, work, symlinks=True)
    return work


if __name__ == "__main__":
    sys.exit(main())
