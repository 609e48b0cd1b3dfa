"""A faiss index over one descriptor per database window, to shortlist the windows that exact
sequence matching then re-ranks (``--shortlist K``; docs/large-maps.md).

The index type follows the map's size: an exact flat index for up to ``FLAT_MAX`` windows, an
inverted-file (IVF) index above that (``--nprobe`` lists searched per query), with its vectors
compressed (8-bit scalar quantisation, or product quantisation) when full float32 vectors would
take more than ``INDEX_BYTES``. Product-quantised codes are 4-bit codes searched with faiss's
"fast scan" kernels (distance tables held in SIMD registers): on a million 1024-D windows they are
searched about 20 times faster than 8-bit codes of the same size, encoded 3 to 4 times faster, and
return the same exact top-1 within the shortlist. GPU faiss is used, when the features are on CUDA
and it is installed, for the flat, IVF-flat and scalar-quantised indexes (it has no fast-scan
index).
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from seqmatchnet.common.errors import UserError
from seqmatchnet.common.files import atomic_write

log = logging.getLogger(__name__)


FLAT_MAX = 200_000              # windows searched exactly (flat index) at most
INDEX_BYTES = 512 * 1024**2     # memory the index's vectors may take before they are compressed
PQ_MAX_BYTES = 64               # bytes per window of a product-quantised code (search cost grows)
TRAIN_PER_LIST = 39             # training vectors per inverted list (faiss warns below 39)
MIN_TRAIN = 10_000              # and at least this many (product quantisation trains 256 centroids)
ADD_BATCH = 2048                # vectors encoded at once (bounds faiss's encoding tables)


@dataclass(frozen=True)
class IndexChoice:
    """Which index a map gets: ``kind`` is flat, ivf-flat, ivf-sq8 or ivf-pq; ``nlist`` inverted
    lists (IVF), ``pq_m`` sub-quantisers of 4 bits each (ivf-pq)."""

    kind: str
    nlist: int = 0
    pq_m: int = 0

    @property
    def pq_bytes(self) -> int:
        """Bytes per window of an ivf-pq code (two 4-bit codes a byte)."""
        return (self.pq_m + 1) // 2

    @property
    def needs_training(self) -> bool:
        return self.kind != "flat"

    def training_size(self, n: int) -> int:
        return min(n, max(TRAIN_PER_LIST * self.nlist, MIN_TRAIN)) if self.needs_training else 0

    def describe(self) -> str:
        if self.kind == "flat":
            return "flat (exact)"
        extra = (f", {self.pq_m} x 4-bit codes = {self.pq_bytes} bytes per window, fast scan"
                 if self.kind == "ivf-pq" else "")
        return f"{self.kind} ({self.nlist} lists{extra})"


def choose_index(n: int, dim: int, memory_bytes: int = INDEX_BYTES,
                 flat_max: int = FLAT_MAX) -> IndexChoice:
    """The index for ``n`` window descriptors of ``dim`` float32 values (module docstring)."""
    if n < 1 or dim < 1:
        raise ValueError(f"need at least one window and one dimension, got {n} x {dim}")
    full = n * dim * 4
    if n <= flat_max and full <= memory_bytes:
        return IndexChoice("flat")
    nlist = max(1, min(int(math.sqrt(n)), n // 39))
    if full <= memory_bytes:
        return IndexChoice("ivf-flat", nlist)
    if n * dim <= memory_bytes:
        return IndexChoice("ivf-sq8", nlist)
    limit = min(2 * min(memory_bytes // n, PQ_MAX_BYTES), dim)       # sub-quantisers of 4 bits each
    m = max((d for d in range(1, limit + 1) if dim % d == 0), default=0)
    if m == 0:
        raise UserError(f"a shortlist index of {n} windows does not fit in "
                        f"{memory_bytes / 1024**2:.0f} MiB even with 1-byte codes: use "
                        "--shortlist 0 (exact matching streams the map)")
    return IndexChoice("ivf-pq", nlist, m)


class WindowIndex:
    """A faiss index of window descriptors with explicit ids (their window numbers)."""

    def __init__(self, choice: IndexChoice, dim: int, device: torch.device | None = None,
                 index=None) -> None:
        """A new, empty index of ``choice``'s kind, or ``index`` (a faiss index read by
        ``load_index``)."""
        import faiss

        self.choice, self.dim = choice, dim
        self.index = index if index is not None else self._new_index(choice, dim)
        self.use_gpu = (device is not None and device.type == "cuda"
                        and hasattr(faiss, "StandardGpuResources") and choice.kind != "ivf-pq")
        self.count = int(self.index.ntotal)

    def _new_index(self, choice: IndexChoice, dim: int):
        import faiss

        if choice.kind == "flat":
            return faiss.IndexIDMap(faiss.IndexFlatL2(dim))
        self._quantizer = faiss.IndexFlatL2(dim)       # kept alive with the index
        if choice.kind == "ivf-flat":
            return faiss.IndexIVFFlat(self._quantizer, dim, choice.nlist, faiss.METRIC_L2)
        if choice.kind == "ivf-sq8":
            return faiss.IndexIVFScalarQuantizer(self._quantizer, dim, choice.nlist,
                                                 faiss.ScalarQuantizer.QT_8bit, faiss.METRIC_L2)
        return faiss.IndexIVFPQFastScan(self._quantizer, dim, choice.nlist, choice.pq_m, 4)

    def train(self, vectors: np.ndarray) -> None:
        if self.choice.needs_training:
            self.index.train(np.ascontiguousarray(vectors, dtype=np.float32))

    def add(self, vectors: np.ndarray, ids: np.ndarray) -> None:
        """Add in batches of ``ADD_BATCH``: encoding holds tables of batch x sub-quantisers x
        centroids floats (bounded here whatever the chunk of windows)."""
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        ids = np.ascontiguousarray(ids, dtype=np.int64)
        for lo in range(0, len(ids), ADD_BATCH):
            self.index.add_with_ids(vectors[lo:lo + ADD_BATCH], ids[lo:lo + ADD_BATCH])
        self.count += len(ids)

    def search(self, queries: np.ndarray, k: int, nprobe: int) -> np.ndarray:
        """Ids of the ``k`` nearest windows per query ``[Nq, k]`` (``k`` at most the windows
        indexed); rows that an IVF search left short are searched again with more lists."""
        _, out = self.search_scored(queries, min(k, self.count), nprobe)
        if (out < 0).any():      # cannot happen with every list searched; refuse rather than guess
            raise RuntimeError("the shortlist index returned fewer candidates than windows indexed")
        return out

    def search_scored(self, queries: np.ndarray, k: int, nprobe: int,
                      global_counts=None) -> tuple[np.ndarray, np.ndarray]:
        """``(squared distances, ids)`` ``[Nq, k]`` of the ``k`` nearest windows per query (-1:
        none). A row with fewer than ``k`` valid ids is searched again with twice the lists until
        full or every list is searched. With ``global_counts`` (this index holds one shard of a map
        divided between processes: each rank's valid counts per row -> the counts over all shards)
        a row counts as full when the shards together fill it, so every shard probes the same
        lists as one index of the whole map."""
        import faiss

        queries = np.ascontiguousarray(queries, dtype=np.float32)
        index = self.index
        if self.use_gpu:
            index = faiss.index_cpu_to_gpu(faiss.StandardGpuResources(), 0, index)
        out_d = np.full((len(queries), k), np.inf, dtype=np.float32)
        out_i = np.full((len(queries), k), -1, dtype=np.int64)
        rows, probe = np.arange(len(queries)), min(nprobe, self.choice.nlist or 1)
        while len(rows):
            if self.choice.needs_training:
                space = faiss.GpuParameterSpace() if self.use_gpu else faiss.ParameterSpace()
                space.set_index_parameter(index, "nprobe", probe)
            if self.count:
                d, ids = index.search(queries[rows], k)
            else:
                d = np.full((len(rows), k), np.inf, np.float32)
                ids = np.full((len(rows), k), -1, np.int64)
            counts = (ids >= 0).sum(axis=1)
            counts = counts if global_counts is None else global_counts(counts)
            full = (counts >= k) | (probe >= (self.choice.nlist or 1))
            out_d[rows[full]] = np.where(ids[full] >= 0, d[full], np.inf)
            out_i[rows[full]] = ids[full]
            rows, probe = rows[~full], probe * 2
        return out_d, out_i


def shortlist_recall(exact_top1: np.ndarray, candidates: np.ndarray) -> float:
    """Fraction of queries whose exact top-1 window is among their candidates: ``[S]``,
    ``[S, K]``."""
    if len(exact_top1) == 0:
        return float("nan")
    return float((candidates == np.asarray(exact_top1)[:, None]).any(axis=1).mean())


# ---------------------------------------------------------------- keeping an index between runs

INDEX_MAGIC = b"SEQMATCHNET-SHORTLIST-INDEX 1\n"


def _sha1(*arrays) -> str:
    h = hashlib.sha1()
    for a in arrays:
        h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()


def index_fingerprint(desc, db_starts: np.ndarray, model, seq_len: int, feat_dtype: torch.dtype,
                      choice: IndexChoice) -> dict:
    """What an index's window descriptors depend on: the database descriptors (file, size and
    modification time, rows used; or the values of an in-memory array), the windows, the model's
    weights, ``--seqL``, ``--featDtype`` and the index type."""
    path = getattr(desc, "path", None)
    if path is not None:
        stat = Path(path).stat()
        rows = getattr(desc, "rows", None)
        source = {"file": str(Path(path).resolve()), "bytes": stat.st_size,
                  "modified_ns": stat.st_mtime_ns,
                  "rows": None if rows is None else _sha1(np.asarray(rows, dtype=np.int64))}
    else:
        source = {"values": _sha1(np.asarray(desc, dtype=np.float32))}
    state = model.state_dict()
    weights = _sha1(*(state[k].detach().cpu().numpy() for k in sorted(state)))
    return {"descriptors": source, "windows": _sha1(np.asarray(db_starts, dtype=np.int64)),
            "model": {"method": model.method, "out_dims": model.out_dims, "weights": weights},
            "seqL": seq_len, "featDtype": str(feat_dtype).replace("torch.", ""),
            "index": choice.describe()}


def save_index(index: WindowIndex, path: Path, fingerprint: dict) -> None:
    """Write the index and its fingerprint to one file, atomically (``load_index`` reads it)."""
    import faiss

    data = faiss.serialize_index(index.index)
    header = json.dumps(fingerprint, sort_keys=True).encode() + b"\n"
    atomic_write(path, lambda f: (f.write(INDEX_MAGIC), f.write(header), f.write(data.tobytes())))
    log.info("shortlist index written to %s", path)


def load_index(path: Path, fingerprint: dict, choice: IndexChoice,
               device: torch.device | None = None) -> WindowIndex:
    """The index ``save_index`` wrote, refused (``UserError``) unless it was built for this map,
    model and settings (``fingerprint``)."""
    import faiss

    hint = f"delete {path} to build it again (or give another --shortlistIndex)"
    try:
        with open(path, "rb") as f:
            magic, header = f.readline(), f.readline()
            if magic != INDEX_MAGIC:
                raise ValueError("not a shortlist index file")
            saved = json.loads(header)
            data = np.frombuffer(f.read(), dtype=np.uint8)
        index = faiss.deserialize_index(data)
    except (OSError, ValueError, RuntimeError) as exc:
        first = str(exc).splitlines()[0]
        raise UserError(f"--shortlistIndex {path} could not be read ({first}): {hint}") from exc
    if saved != fingerprint:
        differs = ", ".join(k for k in sorted(set(saved) | set(fingerprint))
                            if saved.get(k) != fingerprint.get(k))
        raise UserError(f"--shortlistIndex {path} was built for another map, model or settings "
                        f"(differs in: {differs}): {hint}")
    return WindowIndex(choice, index.d, device, index=index)
