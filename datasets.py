"""Reading descriptors and struct files, and building sequence windows.

Everything that touches a file checks it and raises ``UserError`` with a
message that names the file and says what to do.
"""
from __future__ import annotations

import logging
import pickle
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from utils import UserError

log = logging.getLogger(__name__)

HDF5_SUFFIXES = (".h5", ".hdf5")
STRUCT_FIELDS = ("numImages", "numQueries", "posDistThr", "posDistSqThr", "nonTrivPosDistSqThr", "utmDb", "utmQ")
GET_DATA_HINT = "run `bash download.sh` (see README, 'Getting the data') or try `--dataset synthetic`"


# ---------------------------------------------------------------- windows

def sequence_windows(bounds: np.ndarray, seq_len: int) -> tuple[np.ndarray, np.ndarray]:
    """Windows of ``seq_len`` frames centred on each frame (README, "How it works").

    ``bounds`` ``[N, 2]`` holds each frame's segment ``[lo, hi)``. Returns
    ``(starts [N], valid [N])``: window ``i`` is ``starts[i] + arange(seq_len)``;
    ``valid[i]`` is True when the window did not have to be shifted.
    """
    bounds = np.asarray(bounds, dtype=np.int64)
    idx = np.arange(len(bounds), dtype=np.int64)
    lo, hi = bounds[:, 0], bounds[:, 1]
    if np.any(hi - lo < seq_len):
        bad = int(np.argmax(hi - lo < seq_len))
        raise UserError(f"sequence length {seq_len} is longer than the segment of frame {bad} "
                        f"({hi[bad] - lo[bad]} frames): use a smaller --seqL")
    if np.any((idx < lo) | (idx >= hi)):
        raise UserError("sequence bounds do not contain their own frame: check the bounds file")
    start = np.maximum(lo, idx - seq_len // 2)
    end = np.minimum(idx + seq_len - seq_len // 2, hi)
    missing = seq_len - (end - start)
    # shifted at the start of the segment: extend forwards; at its end: extend backwards
    shift_back = (start != lo) & (missing > 0) & (end == hi)
    start = np.where(shift_back, start - missing, start)
    return start, missing == 0


def segment_bounds(n: int) -> np.ndarray:
    """Every frame of a contiguous traversal in one segment ``[0, n)``: ``[n, 2]``."""
    return np.tile(np.array([[0, n]], dtype=np.int64), (n, 1))


# ---------------------------------------------------------------- descriptors

def load_descriptors(path: Path, rows: np.ndarray | None = None) -> np.ndarray:
    """Rows of a ``.npy`` (memory-mapped) or HDF5 descriptor file as float32 ``[N, D]``."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"descriptor file {path} not found: {GET_DATA_HINT}")
    if path.suffix in HDF5_SUFFIXES:
        data = _open_hdf5(path)
    else:
        try:
            data = np.load(path, mmap_mode="r", allow_pickle=False)
        except (ValueError, OSError, EOFError) as exc:
            raise UserError(f"descriptor file {path} is corrupt or truncated ({exc}): download it again") from exc
    if data.ndim != 2 or data.shape[0] == 0 or data.shape[1] == 0:
        raise UserError(f"descriptor file {path} holds an array of shape {data.shape}; expected (frames, dims)")
    if rows is not None:
        rows = np.asarray(rows, dtype=np.int64)
        if len(rows) and (rows.min() < 0 or rows.max() >= data.shape[0]):
            raise UserError(f"descriptor file {path} has {data.shape[0]} rows but the split needs row "
                            f"{int(rows.max())}: the file is incomplete or belongs to another dataset; download "
                            "it again (`bash download.sh`) or check --dataset and --descType")
    try:
        out = np.asarray(data[rows] if rows is not None else data[:], dtype=np.float32)
    except (ValueError, OSError) as exc:
        raise UserError(f"descriptor file {path} could not be read ({exc}): download it again") from exc
    finite = np.isfinite(out).all(axis=1)
    if not finite.all():
        bad = int(np.argmin(finite))
        row = int(rows[bad]) if rows is not None else bad
        raise UserError(f"descriptor file {path} has non-finite values (NaN/Inf) in row {row}: "
                        "recompute the descriptors")
    zero = ~np.any(out != 0, axis=1)
    if zero.any():
        bad = int(np.argmax(zero))
        row = int(rows[bad]) if rows is not None else bad
        raise UserError(f"descriptor file {path} has an all-zero row {row}, which cannot be normalised: "
                        "recompute the descriptors")
    return out


def _open_hdf5(path: Path):
    try:
        import h5py
    except ImportError as exc:  # pragma: no cover - h5py is a requirement
        raise UserError("reading HDF5 descriptors needs h5py: pip install h5py") from exc
    try:
        f = h5py.File(path, "r")
    except OSError as exc:
        raise UserError(f"descriptor file {path} is not a readable HDF5 file ({exc})") from exc
    datasets = []
    f.visititems(lambda name, obj: datasets.append(obj) if isinstance(obj, h5py.Dataset) and obj.ndim == 2 else None)
    if len(datasets) != 1:
        names = [d.name for d in datasets]
        f.close()
        raise UserError(f"HDF5 file {path} must hold exactly one 2-D dataset (frames x dims), found {names or 'none'}: "
                        "write the descriptors as a single (frames, dims) dataset")
    return datasets[0]


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
    import scipy.io

    path = Path(path)
    if not path.is_file():
        raise UserError(f"struct file {path} not found: {GET_DATA_HINT}")
    try:
        mat = scipy.io.loadmat(str(path), appendmat=False)
    except Exception as exc:  # scipy raises many types for bad files
        raise UserError(f"struct file {path} is not a readable MATLAB file ({type(exc).__name__}: {exc}): "
                        "download it again") from exc
    if "dbStruct" not in mat:
        raise UserError(f"struct file {path} has no 'dbStruct' variable (found "
                        f"{sorted(k for k in mat if not k.startswith('__'))}): download it again (`bash download.sh`)")
    raw = mat["dbStruct"]
    if raw.dtype.names is None or raw.size != 1:
        raise UserError(f"struct file {path}: 'dbStruct' is not a 1x1 struct: download it again (`bash download.sh`)")
    s = {name: raw[name].item() if raw.shape else raw[name] for name in raw.dtype.names}
    missing = [f for f in STRUCT_FIELDS if f not in s]
    if missing:
        raise UserError(f"struct file {path} lacks the fields {missing}: it is not a SeqNet/SeqMatchNet struct file; "
                        "download it again (`bash download.sh`)")

    def scalar(name: str) -> float:
        try:
            v = np.asarray(s[name], dtype=np.float64).ravel()
        except (TypeError, ValueError):
            v = np.array([])
        if v.size != 1 or not np.isfinite(v[0]):
            raise UserError(f"struct file {path}: field {name} must be one finite number, got {s[name]!r:.40}: "
                            "download the struct file again (`bash download.sh`)")
        return float(v[0])

    def positions(name: str, count: int) -> np.ndarray:
        try:
            p = np.asarray(s[name], dtype=np.float64)
        except (TypeError, ValueError) as exc:
            raise UserError(f"struct file {path}: field {name} is not numeric: download it again "
                            "(`bash download.sh`)") from exc
        if p.ndim == 1:
            p = p[None, :]
        if p.ndim != 2 or p.shape[0] not in (1, 2) or p.shape[1] != count:
            raise UserError(f"struct file {path}: field {name} has shape {p.shape}, expected (1 or 2, {count}): "
                            "the file is damaged or edited; download it again (`bash download.sh`)")
        if not np.isfinite(p).all():
            bad = int(np.argmin(np.isfinite(p).all(axis=0)))
            raise UserError(f"struct file {path}: field {name} has NaN/Inf at frame {bad}: fix the positions")
        return np.ascontiguousarray(p.T)

    num_db, num_q = int(scalar("numImages")), int(scalar("numQueries"))
    return DbStruct(
        which_set=_string(s.get("whichSet", "")),
        dataset=_string(s.get("dataset", "")),
        db_positions=positions("utmDb", num_db),
        q_positions=positions("utmQ", num_q),
        pos_dist_thr=scalar("posDistThr"),
        pos_dist_sq_thr=scalar("posDistSqThr"),
        non_triv_pos_dist_sq_thr=scalar("nonTrivPosDistSqThr"),
        db_image_fns=_strings(s.get("dbImageFns")),
        q_image_fns=_strings(s.get("qImageFns")),
    )


def _string(v) -> str:
    arr = np.asarray(v).ravel()
    return str(arr[0]) if arr.size else ""


def _strings(v) -> list[str]:
    if v is None:
        return []
    return [_string(x) for x in np.asarray(v, dtype=object).ravel()]


class _ArraysOnlyUnpickler(pickle.Unpickler):
    """Unpickles NumPy arrays (and object arrays of them) and nothing else: a pickle
    that names any other callable could run arbitrary code."""

    ALLOWED = {("numpy", "ndarray"), ("numpy", "dtype"), ("numpy.core.multiarray", "_reconstruct"),
               ("numpy._core.multiarray", "_reconstruct"), ("numpy.core.multiarray", "scalar"),
               ("numpy._core.multiarray", "scalar")}

    def find_class(self, module: str, name: str):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"{module}.{name}")
        return super().find_class(module, name)


def _read_npy_arrays_only(f) -> np.ndarray:
    """One ``.npy`` member of an ``.npz``; object arrays are unpickled with ``_ArraysOnlyUnpickler``."""
    fmt = np.lib.format
    version = fmt.read_magic(f)
    shape, fortran, dtype = (fmt.read_array_header_1_0 if version == (1, 0) else fmt.read_array_header_2_0)(f)
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
                raise UserError(f"split index file {path} has no '{key}' (found {files}): download it again "
                                "(`bash download.sh`)")
            with z.open(f"{key}.npy") as f:
                pair = _read_npy_arrays_only(f)
    except pickle.UnpicklingError as exc:
        raise UserError(f"split index file {path} holds {exc}, not just arrays; refusing to load it for safety: "
                        "download it again (`bash download.sh`)") from exc
    except (zipfile.BadZipFile, ValueError, OSError, EOFError) as exc:
        raise UserError(f"split index file {path} is corrupt ({exc}): download it again") from exc
    try:
        if len(pair) != 2:
            raise ValueError("not a pair")
        db_rows, q_rows = (np.asarray(p, dtype=np.int64).ravel() for p in pair)
    except (TypeError, ValueError) as exc:
        raise UserError(f"split index file {path}: '{key}' must be a pair [db rows, query rows] of integer arrays: "
                        "download it again (`bash download.sh`)") from exc
    return db_rows, q_rows


# ---------------------------------------------------------------- one split

@dataclass
class Split:
    """One split of a dataset: descriptors, positions, thresholds and segments.

    Database and query frames are kept apart; ``bounds`` are per traversal.
    """

    name: str
    db_desc: np.ndarray          # [numDb, D] float32
    q_desc: np.ndarray           # [numQ, D] float32
    db_positions: np.ndarray     # [numDb, k]
    q_positions: np.ndarray      # [numQ, k]
    pos_dist_thr: float
    non_triv_pos_dist_sq_thr: float
    db_bounds: np.ndarray        # [numDb, 2] segment [lo, hi) per frame
    q_bounds: np.ndarray         # [numQ, 2]
    files: list[Path] = field(default_factory=list)
    position_unit: str = "m"     # of positions and radii: metres, or frames (Nordland)

    def __post_init__(self) -> None:
        if self.db_desc.shape[1] != self.q_desc.shape[1]:
            raise UserError(f"split {self.name}: database descriptors have {self.db_desc.shape[1]} dimensions "
                            f"but query descriptors {self.q_desc.shape[1]}: use files of the same descriptor type")
        for side, desc, pos, bounds in (("database", self.db_desc, self.db_positions, self.db_bounds),
                                        ("query", self.q_desc, self.q_positions, self.q_bounds)):
            if len(desc) == 0:
                raise UserError(f"split {self.name} has no {side} frames: check the struct and split files")
            if len(desc) != len(pos) or len(desc) != len(bounds):
                raise UserError(f"split {self.name}: {len(desc)} {side} descriptors but {len(pos)} positions and "
                                f"{len(bounds)} bounds: the struct file does not match the descriptors")

    @property
    def num_db(self) -> int:
        return len(self.db_desc)

    @property
    def num_q(self) -> int:
        return len(self.q_desc)

    @property
    def dim(self) -> int:
        return self.db_desc.shape[1]
