"""Shared fixtures: the reference fixture and small synthetic splits.

Tests of the reference fixture are skipped when ``../shared/reference`` is absent, unless the
environment variable ``CI`` or ``REQUIRE_REFERENCE`` is set (non-empty): then they fail."""
from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")   # as main.py does, before torch loads

import numpy as np
import pytest
import scipy.io

ROOT = Path(__file__).resolve().parents[1]
TESTS = Path(__file__).resolve().parent
for p in (str(ROOT), str(TESTS)):
    if p not in sys.path:
        sys.path.insert(0, p)

REFERENCE = ROOT.parent / "shared" / "reference"
REQUIRE_REFERENCE = bool(os.environ.get("CI") or os.environ.get("REQUIRE_REFERENCE"))


def check_reference() -> None:
    """Skip the calling test when the reference fixture is absent; fail instead when it is required."""
    if REFERENCE.is_dir():
        return
    reason = f"{REFERENCE} is absent"
    if REQUIRE_REFERENCE:
        pytest.fail(f"{reason}, and CI or REQUIRE_REFERENCE is set: the fidelity tests need it", pytrace=False)
    pytest.skip(reason)


@pytest.fixture
def reference_dir() -> Path:
    """The read-only reference fixture (see ``check_reference``)."""
    check_reference()
    return REFERENCE


needs_reference = pytest.mark.usefixtures("reference_dir")


def unit_rows(rng: np.random.Generator, n: int, d: int) -> np.ndarray:
    x = rng.standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def write_struct(path: Path, which: str, db_pos: np.ndarray, q_pos: np.ndarray, pos_thr: float,
                 non_triv_sq: float, **overrides) -> None:
    """A dbStruct in the reference layout (positions as [k, N])."""
    s = {"whichSet": which, "dataset": "tiny",
         "dbImageFns": np.array([[f"db/{i:05d}.png"] for i in range(len(db_pos))], dtype=object),
         "qImageFns": np.array([[f"q/{i:05d}.png"] for i in range(len(q_pos))], dtype=object),
         "numImages": len(db_pos), "numQueries": len(q_pos), "posDistThr": pos_thr,
         "posDistSqThr": pos_thr ** 2, "nonTrivPosDistSqThr": non_triv_sq,
         "utmDb": np.asarray(db_pos, dtype=float).T, "utmQ": np.asarray(q_pos, dtype=float).T}
    s.update(overrides)
    s = {k: v for k, v in s.items() if v is not None}
    scipy.io.savemat(str(path), {"dbStruct": s}, appendmat=False, format="5")


OX_PREFIX = "oxford-v1.0_2015-03-17-11-08-44_2014-12-16-18-44-24"


def make_tiny_oxford(root: Path, n: int = 400, dim: int = 16, seed: int = 0) -> Path:
    """A small route in the Oxford layout under ``root`` (data/ and structFiles/), learnable:
    the query traversal has a strong nuisance in a few fixed dimensions."""
    rng = np.random.default_rng(seed)
    place = np.cumsum(rng.standard_normal((n, dim)), axis=0) * 0.3 + rng.standard_normal((n, dim))
    nuisance = np.zeros(dim)
    nuisance[: max(dim // 4, 1)] = 3.0
    db = place + 0.3 * rng.standard_normal((n, dim))
    q = place + nuisance + rng.standard_normal((n, dim)) * np.r_[np.full(dim // 4, 3.0), np.full(dim - dim // 4, 0.3)]
    db = (db / np.linalg.norm(db, axis=1, keepdims=True)).astype(np.float32)
    q = (q / np.linalg.norm(q, axis=1, keepdims=True)).astype(np.float32)
    desc = root / "data" / "descData" / "netvlad-pytorch"
    desc.mkdir(parents=True)
    np.save(desc / "oxford_2015-03-17-11-08-44_stereo_left.npy", db)
    np.save(desc / "oxford_2014-12-16-18-44-24_stereo_left.npy", q)
    pos = np.stack([np.arange(n) * 2.0, np.zeros(n)], axis=1)
    structs = root / "structFiles"
    structs.mkdir()
    train = np.arange(0, int(n * 0.6))
    test = np.arange(int(n * 0.65), n)
    write_struct(structs / f"{OX_PREFIX}_train_d-20_d2-5.db", "train", pos[train], pos[train], 20.0, 25.0)
    write_struct(structs / f"{OX_PREFIX}_test_d-10_d2-5.db", "test", pos[test], pos[test], 10.0, 25.0)
    inds = {}
    for key, rows in (("trainInds", train), ("valInds", test), ("testInds", test)):
        pair = np.empty(2, dtype=object)
        pair[0], pair[1] = rows, rows
        inds[key] = pair
    np.savez(structs / "oxford-v1.0_splitInds.npz", **inds)
    return root


@pytest.fixture
def tiny_oxford(tmp_path: Path) -> Path:
    return make_tiny_oxford(tmp_path / "tiny")


@pytest.fixture
def reference_copy(tmp_path: Path) -> Path:
    """A writable copy of the reference fixture (see ``check_reference``)."""
    check_reference()
    dst = tmp_path / "reference"
    shutil.copytree(REFERENCE, dst)
    for p in dst.rglob("*"):
        p.chmod(0o755 if p.is_dir() else 0o644)
    return dst


@pytest.fixture
def refreshes(monkeypatch) -> list:
    """Records every mining-matrix refresh of training: ``(the chunk's queries, all training queries)``."""
    from seqmatchnet.training import steps

    seen = []
    real = steps.model_cache_distances

    def spy(model, tset, queries, opt, device):
        seen.append((np.asarray(queries).copy(), tset.queries.copy()))
        return real(model, tset, queries, opt, device)

    monkeypatch.setattr(steps, "model_cache_distances", spy)
    return seen
