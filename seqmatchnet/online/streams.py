"""Reading live descriptors: raw little-endian float rows from a file, a pipe or stdin
(``--stream``), one frame at a time.
"""
from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

import numpy as np

from seqmatchnet.common.errors import UserError

# ---------------------------------------------------------------- stream input

def read_frames(source: BinaryIO, dim: int, dtype: np.dtype | str = "<f4", name: str = "stream",
                count: int | None = None) -> Iterator[np.ndarray]:
    """Rows of ``dim`` values of ``dtype`` read one at a time from ``source``, as float32 ``[dim]``.

    Stops at the end of the input (or after ``count`` rows). A partial row, fewer than ``count``
    rows, or NaN/Inf values raise ``UserError`` naming the frame number (0-based); the rows before
    it have already been yielded.
    """
    dtype = np.dtype(dtype)
    row_bytes = dim * dtype.itemsize
    i = 0
    while count is None or i < count:
        buf = _read_exact(source, row_bytes)
        if len(buf) < row_bytes:
            if len(buf) == 0 and count is None:
                return
            got = f"{len(buf)} of {row_bytes} bytes" if buf else "no data"
            raise UserError(f"{name}: frame {i} is truncated ({got}; {dim} values of {dtype.str} "
                            "expected): the writer stopped mid-row or wrote rows of another width")
        row = np.frombuffer(buf, dtype=dtype).astype(np.float32)
        if not np.isfinite(row).all():
            first = int(np.argmin(np.isfinite(row)))
            raise UserError(f"{name}: frame {i} has NaN/Inf values (first at value {first}): "
                            "fix the descriptors of that frame")
        if not row.any():
            raise UserError(f"{name}: frame {i} is all zeros and cannot be normalised: "
                            "fix the descriptors of that frame")
        yield row
        i += 1


def _read_exact(source: BinaryIO, n: int) -> bytes:
    """Up to ``n`` bytes; fewer only at the end of the input (pipes may return short reads)."""
    chunks, got = [], 0
    while got < n:
        chunk = source.read(n - got)
        if not chunk:
            break
        chunks.append(chunk)
        got += len(chunk)
    return b"".join(chunks)


@contextlib.contextmanager
def open_stream(stream: str,
                dim: int | None) -> Iterator[tuple[BinaryIO, int | None, int, np.dtype, str]]:
    """``--stream``: ``(source, rows or None, dims, dtype, name)`` with ``source`` positioned at the
    first row.

    ``-``: raw little-endian float32 rows of ``dim`` values on standard input; otherwise a ``.npy``
    file of ``[frames, dims]`` floats, read row by row.
    """
    if stream == "-":
        yield sys.stdin.buffer, None, int(dim), np.dtype("<f4"), "standard input"
        return
    path = Path(stream)
    if not path.is_file():
        raise UserError(f"--stream {path} not found: give a .npy of query descriptors [frames, "
                        "dims] or '-' for raw float32 rows on standard input")
    with open(path, "rb") as f:
        try:
            fmt = np.lib.format
            version = fmt.read_magic(f)
            read_header = fmt.read_array_header_1_0 if version == (1,
                                                                   0) else fmt.read_array_header_2_0
            shape, fortran, dtype = read_header(f)
        except (ValueError, OSError, EOFError) as exc:
            raise UserError(f"--stream {path} is not a readable .npy file ({exc}): write it with "
                            "numpy.save") from exc
        if len(shape) != 2 or dtype.kind != "f" or (fortran and shape[0] > 1 and shape[1] > 1):
            raise UserError(f"--stream {path} holds a "
                            f"{'Fortran-ordered ' if fortran else ''}{dtype} array of shape "
                            f"{shape}; expected C-ordered floats [frames, dims]")
        yield f, int(shape[0]), int(shape[1]), dtype, f"--stream {path}"
