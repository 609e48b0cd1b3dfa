"""MATLAB ``dbStruct`` files (``.db`` / ``.mat``) and the split index files, read without
running code.
"""
from __future__ import annotations

import pickle
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from seqmatchnet.common.errors import UserError
from seqmatchnet.data.descriptors import GET_DATA_HINT

STRUCT_FIELDS = ("numImages", "numQueries", "posDistThr", "posDistSqThr", "nonTrivPosDistSqThr",
                 "utmDb", "utmQ")


# ---------------------------------------------------------------- struct files

@dataclass
class DbStruct:
    """The contents of a ``dbStruct`` (.db, MATLAB v5) file that the code uses."""

    which_set: str
    dataset: str
    db_positions: np.ndarray    # [numDb, 1 or 2]
    q_positions: np.ndarray     # [numQ, 1 or 2]
    pos_dist_thr: float
    pos_dist_sq_thr: float
    non_triv_pos_dist_sq_thr: float
    db_image_fns: list[str] = field(default_factory=list)
    q_image_fns: list[str] = field(default_factory=list)

    @property
    def num_db(self) -> int:
        return len(self.db_positions)

    @property
    def num_q(self) -> int:
        return len(self.q_positions)


def load_struct(path: Path) -> DbStruct:
    """Parse a struct file; field order does not matter, positions may be 1-D or 2-D."""
    path = Path(path)
    s = _struct_fields(path)
    num_db, num_q = int(_scalar(s, "numImages", path)), int(_scalar(s, "numQueries", path))
    return DbStruct(
        which_set=_string(s.get("whichSet", "")),
        dataset=_string(s.get("dataset", "")),
        db_positions=_positions(s, "utmDb", num_db, path),
        q_positions=_positions(s, "utmQ", num_q, path),
        pos_dist_thr=_scalar(s, "posDistThr", path),
        pos_dist_sq_thr=_scalar(s, "posDistSqThr", path),
        non_triv_pos_dist_sq_thr=_scalar(s, "nonTrivPosDistSqThr", path),
        db_image_fns=_strings(s.get("dbImageFns")),
        q_image_fns=_strings(s.get("qImageFns")),
    )


def _struct_fields(path: Path) -> dict:
    """The fields of the file's 1x1 ``dbStruct``, checked to hold ``STRUCT_FIELDS``."""
    import scipy.io  # loads slowly: only when a struct file is read

    if not path.is_file():
        raise UserError(f"struct file {path} not found: {GET_DATA_HINT}")
    try:
        mat = scipy.io.loadmat(str(path), appendmat=False)
    except Exception as exc:  # scipy raises many types for bad files
        raise UserError(f"struct file {path} is not a readable MATLAB file ({type(exc).__name__}: "
                        f"{exc}): download it again") from exc
    if "dbStruct" not in mat:
        raise UserError(f"struct file {path} has no 'dbStruct' variable (found "
                        f"{sorted(k for k in mat if not k.startswith('__'))}): download it again "
                        "(`bash download.sh`)")
    raw = mat["dbStruct"]
    if raw.dtype.names is None or raw.size != 1:
        raise UserError(f"struct file {path}: 'dbStruct' is not a 1x1 struct: download it again "
                        "(`bash download.sh`)")
    s = {name: raw[name].item() if raw.shape else raw[name] for name in raw.dtype.names}
    missing = [f for f in STRUCT_FIELDS if f not in s]
    if missing:
        raise UserError(f"struct file {path} lacks the fields {missing}: it is not a "
                        "SeqNet/SeqMatchNet struct file; download it again (`bash download.sh`)")
    return s


def _scalar(s: dict, name: str, path: Path) -> float:
    try:
        v = np.asarray(s[name], dtype=np.float64).ravel()
    except (TypeError, ValueError):
        v = np.array([])
    if v.size != 1 or not np.isfinite(v[0]):
        raise UserError(f"struct file {path}: field {name} must be one finite number, got "
                        f"{s[name]!r:.40}: download the struct file again (`bash download.sh`)")
    return float(v[0])


def _positions(s: dict, name: str, count: int, path: Path) -> np.ndarray:
    try:
        p = np.asarray(s[name], dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise UserError(f"struct file {path}: field {name} is not numeric: download it again "
                        "(`bash download.sh`)") from exc
    if p.ndim == 1:
        p = p[None, :]
    if p.ndim != 2 or p.shape[0] not in (1, 2) or p.shape[1] != count:
        raise UserError(f"struct file {path}: field {name} has shape {p.shape}, expected (1 or 2, "
                        f"{count}): the file is damaged or edited; download it again (`bash "
                        "download.sh`)")
    if not np.isfinite(p).all():
        bad = int(np.argmin(np.isfinite(p).all(axis=0)))
        raise UserError(f"struct file {path}: field {name} has NaN/Inf at frame {bad}: fix the "
                        "positions")
    return np.ascontiguousarray(p.T)


def _string(v) -> str:
    arr = np.asarray(v).ravel()
    return str(arr[0]) if arr.size else ""


def _strings(v) -> list[str]:
    if v is None:
        return []
    arr = np.asarray(v)
    if arr.dtype.kind == "U":      # a char matrix (large prepared datasets): one name per row
        return np.char.rstrip(arr.ravel()).tolist()
    return [_string(x) for x in np.asarray(v, dtype=object).ravel()]


class _ArraysOnlyUnpickler(pickle.Unpickler):
    """Unpickles NumPy arrays (and object arrays of them) and nothing else: a pickle that names any
    other callable could run arbitrary code."""

    ALLOWED = {("numpy", "ndarray"), ("numpy", "dtype"), ("numpy.core.multiarray", "_reconstruct"),
               ("numpy._core.multiarray", "_reconstruct"), ("numpy.core.multiarray", "scalar"),
               ("numpy._core.multiarray", "scalar")}

    def find_class(self, module: str, name: str):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"{module}.{name}")
        return super().find_class(module, name)


def _read_npy_arrays_only(f) -> np.ndarray:
    """One ``.npy`` member of an ``.npz``; object arrays are unpickled with
    ``_ArraysOnlyUnpickler``."""
    fmt = np.lib.format
    version = fmt.read_magic(f)
    shape, fortran, dtype = (fmt.read_array_header_1_0 if version == (1, 0)
                             else fmt.read_array_header_2_0)(f)
    if dtype.hasobject:
        return np.asarray(_ArraysOnlyUnpickler(f).load(), dtype=object)
    count = int(np.prod(shape))
    data = np.frombuffer(f.read(count * dtype.itemsize), dtype=dtype, count=count)
    return data.reshape(shape, order="F" if fortran else "C")


def load_split_indices(path: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    """``(db_rows, q_rows)`` of a split from a ``*_splitInds.npz`` file."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"split index file {path} not found: {GET_DATA_HINT}")
    key = f"{split}Inds"
    try:
        with zipfile.ZipFile(path) as z:
            files = [n[:-4] for n in z.namelist() if n.endswith(".npy")]
            if key not in files:
                raise UserError(f"split index file {path} has no '{key}' (found {files}): "
                                "download it again (`bash download.sh`)")
            with z.open(f"{key}.npy") as f:
                pair = _read_npy_arrays_only(f)
    except pickle.UnpicklingError as exc:
        raise UserError(f"split index file {path} holds {exc}, not just arrays; refusing to load "
                        "it for safety: download it again (`bash download.sh`)") from exc
    except (zipfile.BadZipFile, ValueError, OSError, EOFError) as exc:
        raise UserError(f"split index file {path} is corrupt ({exc}): download it again") from exc
    try:
        if len(pair) != 2:
            raise ValueError("not a pair")
        db_rows, q_rows = (np.asarray(p, dtype=np.int64).ravel() for p in pair)
    except (TypeError, ValueError) as exc:
        raise UserError(f"split index file {path}: '{key}' must be a pair [db rows, query rows] "
                        "of integer arrays: download it again (`bash download.sh`)") from exc
    return db_rows, q_rows
