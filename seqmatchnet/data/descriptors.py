"""Reading descriptors and struct files, and building sequence windows.

Everything that touches a file checks it and raises ``UserError`` with a message that names the file
and says what to do.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from seqmatchnet.common.errors import UserError

HDF5_SUFFIXES = (".h5", ".hdf5")
GET_DATA_HINT = ("run `bash download.sh` (see README, 'Getting the data') or try "
                 "`--dataset synthetic`")


# ---------------------------------------------------------------- descriptors

# descriptors read at once by the loading checks and by ``DescriptorSource.read``
CHECK_CHUNK_BYTES = 64 * 1024**2


def load_descriptors(path: Path, rows: np.ndarray | None = None) -> np.ndarray:
    """Rows of a ``.npy`` or HDF5 descriptor file as float32 ``[N, D]`` in memory, checked
    (finite values, no all-zero row); read in chunks, so the file is never mapped whole."""
    source = open_descriptors(path, rows)
    return source.read(0, len(source))


def open_descriptors(path: Path, rows: np.ndarray | None = None,
                     check: bool = True) -> DescriptorSource:
    """A ``DescriptorSource`` over ``rows`` (default: all) of a ``.npy`` or HDF5 descriptor file;
    with ``check``, every row it selects is checked first, one chunk at a time."""
    source = DescriptorSource(path, rows)
    if check:
        source.check()
    return source


class DescriptorSource:
    """The descriptors of one traversal, read lazily: ``shape``, ``read(lo, hi)`` and ``take(rows)``
    give float32 rows, and indexing (``src[a:b]``, ``src[int array]``) works as on an array, so
    code written for an in-memory ``[N, D]`` array reads chunks of the file instead.

    ``.npy`` rows are read with plain file reads into a fresh buffer (C order: one read per run of
    consecutive rows) or through a map that is released after each call (Fortran order); resident
    memory is what a call returns, never the file. (Scattered rows are not read through a map: the
    kernel maps the cached pages around each one it faults in, up to 16 times the rows asked for.)
    ``rows`` selects (and orders) rows of the file.
    """

    def __init__(self, path: Path, rows: np.ndarray | None = None) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise UserError(f"descriptor file {self.path} not found: {GET_DATA_HINT}")
        self._hdf5 = self.path.suffix in HDF5_SUFFIXES
        if self._hdf5:
            data = _open_hdf5(self.path)
            self._data, file_shape, self.file_dtype = data, tuple(data.shape), np.dtype(data.dtype)
        else:
            file_shape, self.file_dtype, self._offset, self._fortran = _npy_layout(self.path)
        if len(file_shape) != 2 or file_shape[0] == 0 or file_shape[1] == 0:
            raise UserError(f"descriptor file {self.path} holds an array of shape {file_shape}; "
                            "expected (frames, dims)")
        if self.file_dtype.kind not in "fiu":
            raise UserError(f"descriptor file {self.path} holds {self.file_dtype} values; "
                            "expected numbers (float32): recompute the descriptors")
        self.file_rows, self.dim = int(file_shape[0]), int(file_shape[1])
        self.rows = None
        if rows is not None:
            rows = np.asarray(rows, dtype=np.int64).ravel()
            if len(rows) and (rows.min() < 0 or rows.max() >= self.file_rows):
                raise UserError(f"descriptor file {self.path} has {self.file_rows} rows but the "
                                f"split needs row {int(rows.max())}: the file is incomplete or "
                                "belongs to another dataset; download it again (`bash "
                                "download.sh`) or check --dataset and --descType")
            if not (len(rows) == self.file_rows
                    and np.array_equal(rows, np.arange(self.file_rows))):
                self.rows = rows

    # ------------------------------------------------------------ the array interface

    @property
    def shape(self) -> tuple[int, int]:
        return (len(self), self.dim)

    @property
    def ndim(self) -> int:
        return 2

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(np.float32)

    def __len__(self) -> int:
        return self.file_rows if self.rows is None else len(self.rows)

    def __getitem__(self, key) -> np.ndarray:
        if isinstance(key, slice):
            lo, hi, step = key.indices(len(self))
            out = self.read(lo, max(hi, lo))
            return out if step == 1 else out[::step]
        key = np.asarray(key)
        if key.dtype == bool:
            key = np.flatnonzero(key)
        if key.ndim == 0:
            return self.take(key.reshape(1))[0]
        return self.take(key.ravel()).reshape(*key.shape, self.dim)

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        out = self.read(0, len(self))
        return out if dtype is None else out.astype(dtype)

    def subset(self, rows: np.ndarray) -> DescriptorSource:
        """The rows ``rows`` of this selection as a source of their own (nothing is read)."""
        import copy

        rows = np.asarray(rows, dtype=np.int64).ravel()
        out = copy.copy(self)
        out.rows = rows if self.rows is None else self.rows[rows]
        return out

    # ------------------------------------------------------------ reading

    @property
    def row_bytes(self) -> int:
        return self.dim * self.file_dtype.itemsize

    def chunk_rows(self, budget_bytes: int = CHECK_CHUNK_BYTES) -> int:
        """Rows per chunk so that one chunk of float32 rows takes about ``budget_bytes``."""
        return max(budget_bytes // (4 * self.dim), 1)

    def read(self, lo: int, hi: int) -> np.ndarray:
        """Rows ``[lo, hi)`` (of the selection) as float32 ``[hi - lo, D]``."""
        lo, hi = max(int(lo), 0), min(int(hi), len(self))
        if hi <= lo:
            return np.empty((0, self.dim), dtype=np.float32)
        if self.rows is None:
            return self._file_range(lo, hi)
        sub = self.rows[lo:hi]
        if sub[-1] - sub[0] + 1 == len(sub) and (len(sub) == 1 or bool(np.all(np.diff(sub) == 1))):
            return self._file_range(int(sub[0]), int(sub[-1]) + 1)
        return self._file_rows(sub)

    def take(self, rows: np.ndarray) -> np.ndarray:
        """Rows ``rows`` (any order, repeats allowed) of the selection as float32 ``[len(rows),
        D]``."""
        rows = np.asarray(rows, dtype=np.int64).ravel()
        if len(rows) and (rows.min() < -len(self) or rows.max() >= len(self)):
            raise IndexError(f"row {int(rows.max())} of {len(self)} in {self.path}")
        rows = np.where(rows < 0, rows + len(self), rows)
        return self._file_rows(rows if self.rows is None else self.rows[rows])

    def check(self) -> None:
        """Every selected row finite and not all zero, checked one chunk at a time; the error names
        the file and the row."""
        step = self.chunk_rows()
        for lo in range(0, len(self), step):
            block = self.read(lo, lo + step)
            finite = np.isfinite(block).all(axis=1)
            if not finite.all():
                raise UserError(f"descriptor file {self.path} has non-finite values (NaN/Inf) in "
                                f"row {self._file_row(lo + int(np.argmin(finite)))}: recompute "
                                "the descriptors")
            zero = ~np.any(block != 0, axis=1)
            if zero.any():
                raise UserError(f"descriptor file {self.path} has an all-zero row "
                                f"{self._file_row(lo + int(np.argmax(zero)))}, which cannot be "
                                "normalised: recompute the descriptors")

    def _file_row(self, i: int) -> int:
        return i if self.rows is None else int(self.rows[i])

    def _file_range(self, lo: int, hi: int) -> np.ndarray:
        try:
            if self._hdf5:
                out = self._data[lo:hi]
            elif self._fortran:
                out = self._mapped()[lo:hi].copy()
            else:
                out = np.empty((hi - lo, self.dim), dtype=self.file_dtype)
                with open(self.path, "rb") as f:
                    f.seek(self._offset + lo * self.row_bytes)
                    got = f.readinto(memoryview(out).cast("B"))
                if got != out.nbytes:
                    raise ValueError(f"{got} of {out.nbytes} bytes at row {lo}")
        except (ValueError, OSError) as exc:
            raise UserError(f"descriptor file {self.path} could not be read ({exc}): download it "
                            "again") from exc
        return np.asarray(out, dtype=np.float32)

    def _file_rows(self, file_rows: np.ndarray) -> np.ndarray:
        """File rows in any order: the distinct ones are read ascending, then put in order."""
        if len(file_rows) == 0:
            return np.empty((0, self.dim), dtype=np.float32)
        ascending = len(file_rows) == 1 or bool(np.all(np.diff(file_rows) > 0))
        uniq, inverse = (file_rows, None) if ascending else np.unique(file_rows,
                                                                      return_inverse=True)
        try:
            if self._hdf5:
                got = self._data[uniq]
            elif self._fortran:
                mapped = self._mapped()          # released when this call returns
                got = mapped[uniq]
                del mapped
            else:
                got = self._read_runs(uniq)
        except (ValueError, OSError) as exc:
            raise UserError(f"descriptor file {self.path} could not be read ({exc}): download it "
                            "again") from exc
        got = np.asarray(got, dtype=np.float32)
        return got if inverse is None else got[inverse]

    def _read_runs(self, rows: np.ndarray) -> np.ndarray:
        """Ascending distinct file rows of a C-order ``.npy``: one plain read per run of consecutive
        rows."""
        out = np.empty((len(rows), self.dim), dtype=self.file_dtype)
        view, size = memoryview(out).cast("B"), self.row_bytes
        breaks = np.flatnonzero(np.diff(rows) != 1) + 1
        firsts, ends = np.r_[0, breaks], np.r_[breaks, len(rows)]
        with open(self.path, "rb", buffering=0) as f:
            for a, b, row in zip(firsts.tolist(), ends.tolist(), rows[firsts].tolist()):
                f.seek(self._offset + row * size)
                got = f.readinto(view[a * size:b * size])
                if got != (b - a) * size:
                    raise ValueError(f"{got} of {(b - a) * size} bytes at row {row}")
        return out

    def _mapped(self) -> np.ndarray:
        return np.memmap(self.path, dtype=self.file_dtype, mode="r", offset=self._offset,
                         shape=(self.file_rows, self.dim), order="F" if self._fortran else "C")


def _npy_layout(path: Path) -> tuple[tuple, np.dtype, int, bool]:
    """``(shape, dtype, data offset, fortran order)`` of a ``.npy`` file, checked against its
    size."""
    fmt = np.lib.format
    try:
        with open(path, "rb") as f:
            version = fmt.read_magic(f)
            shape, fortran, dtype = (fmt.read_array_header_1_0 if version == (1, 0)
                                     else fmt.read_array_header_2_0)(f)
            offset = f.tell()
    except (ValueError, OSError, EOFError, SyntaxError) as exc:
        if _looks_like_text(path):
            raise UserError(f"descriptor file {path} holds text (a positions CSV?), not a .npy "
                            "array: check that the descriptor and positions files are not swapped "
                            "(descriptors: .npy [frames, dims] or HDF5; positions: CSV)") from exc
        raise UserError(f"descriptor file {path} is corrupt or truncated ({exc}): "
                        "download it again") from exc
    if dtype.hasobject:
        raise UserError(f"descriptor file {path} holds Python objects, not numbers: write a "
                        "float32 array (frames, dims)")
    need = offset + int(np.prod(shape)) * dtype.itemsize
    size = path.stat().st_size
    if size < need:
        raise UserError(f"descriptor file {path} is corrupt or truncated ({size} bytes, its "
                        f"header needs {need}): download it again")
    return tuple(int(v) for v in shape), dtype, offset, bool(fortran) and len(shape) > 1


def _looks_like_text(path: Path, size: int = 512) -> bool:
    """The first ``size`` bytes of ``path`` are printable UTF-8 text (a CSV, not a binary array)."""
    try:
        with open(path, "rb") as f:
            head = f.read(size).decode("utf-8")
    except (OSError, UnicodeDecodeError):
        return False
    return bool(head) and all(c.isprintable() or c in "\r\n\t" for c in head)


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
    f.visititems(lambda name, obj: datasets.append(obj) if isinstance(obj, h5py.Dataset)
                 and obj.ndim == 2 else None)
    if len(datasets) != 1:
        names = [d.name for d in datasets]
        f.close()
        raise UserError(f"HDF5 file {path} must hold exactly one 2-D dataset (frames x dims), "
                        f"found {names or 'none'}: write the descriptors as a single (frames, "
                        "dims) dataset")
    return datasets[0]


def rows_of(desc: np.ndarray | DescriptorSource, rows: np.ndarray) -> np.ndarray | DescriptorSource:
    """``desc[rows]`` for ascending distinct ``rows``: a lazy source stays lazy (a source over those
    rows), an array gives a view (no copy) when the rows are one contiguous range."""
    if isinstance(desc, DescriptorSource):
        return desc.subset(rows)
    if len(rows) and rows[-1] - rows[0] + 1 == len(rows):
        return desc[rows[0]:rows[-1] + 1]
    return desc[rows]
