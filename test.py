"""Evaluation: pool frames, score sequences, rank, and measure recall (docs/how-it-works.md).

``evaluate(opt, split, model, device)`` is what ``--mode test`` and the
validation run after each training epoch call.
"""
from __future__ import annotations

import argparse
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from datasets import Split, sequence_windows
from get_models import SeqMatchModel, WindowEmbedding, extract_features, window_frames, window_means
from metrics import N_VALUES, RADII, nearest_db_distance, precision_recall, radius_table, recall_table, top1_outcomes
from seqMatchNet import candidate_distances, chunked_topk, window_distances
from utils import UserError, atomic_write, ensure_output_dir, get_device, progress_enabled, write_json_atomic

log = logging.getLogger(__name__)

TOP_K = 100
RERANK_CANDIDATES = 20
DENSE_LIMIT_BYTES = 2 * 1024**3   # above this a query chunk's distance block is also split over the database
KEEP_FEATS_BYTES = 256 * 1024**2  # a streamed database's features are kept (for figures) up to this size
SHORTLIST_CHECK_QUERIES = 50      # queries matched exactly to measure the recall of --shortlist


@dataclass
class EvalResult:
    recalls: dict                 # N -> Recall@N at posDistThr
    radius_recalls: np.ndarray    # [len(RADII), len(N_VALUES)]
    preds: np.ndarray             # [len(q_frames), k] positions in db_frames, best first (as the reference's)
    dists: np.ndarray             # [numQ, k] their sequence distances
    db_frames: np.ndarray         # database frames that were searched
    q_frames: np.ndarray          # query frames that were evaluated
    timings: dict = field(default_factory=dict)
    queries_with_positives: int = 0
    radius_counts: np.ndarray = field(default_factory=lambda: np.zeros(len(RADII), dtype=np.int64))  # per radius row
    db_feats: torch.Tensor | None = None   # pooled frame features (sequence matching), for figures
    q_feats: torch.Tensor | None = None
    shortlist: dict | None = None          # --shortlist: candidates, index, nprobe, recall on a sample


def select_frames(bounds: np.ndarray, filter_len: int | None) -> np.ndarray:
    """Frames to evaluate: all, or those whose window of ``filter_len`` needs no shift."""
    if filter_len is None:
        return np.arange(len(bounds))
    _, valid = sequence_windows(bounds, filter_len)
    return np.flatnonzero(valid)


def database_chunk(n_db: int, n_q: int, query_chunk: int, db_chunk: int = 0) -> int | None:
    """Database windows scored at once for ``chunked_topk``: ``db_chunk`` when given (> 0), else all
    (None) unless one query chunk's block of distances (+ diagonal sums + frame distances, float32)
    would exceed ``DENSE_LIMIT_BYTES``."""
    if db_chunk > 0:
        return db_chunk
    if n_db * min(query_chunk, n_q) * 4 * 3 <= DENSE_LIMIT_BYTES:
        return None
    return max(DENSE_LIMIT_BYTES // (12 * query_chunk), 1024)


def rank(db_feats: torch.Tensor, q_feats: torch.Tensor, db_starts: np.ndarray, q_starts: np.ndarray,
         seq_len: int, k: int = TOP_K, query_chunk: int = 1024, db_chunk: int = 0,
         quiet: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Top-k database windows per query window by meanOfPairs sequence distance.

    Returns ``(indices into db_starts [Nq, k], distances [Nq, k])``. The
    database is split into chunks too when one query chunk's block of
    distances would exceed ``DENSE_LIMIT_BYTES`` (or with ``db_chunk``).

    Under torchrun each rank scores a consecutive share of the database windows (a share never
    splits the frames of one window start, so tied windows are scored together) and the ranks'
    top-k lists are merged by (distance, database index): the result is that of one process.
    """
    import distributed

    device = db_feats.device
    n_db, n_q = len(db_starts), len(q_starts)
    share = distributed.shard(n_db, keep_together=db_starts)
    db_starts = db_starts[share]
    db_chunk = database_chunk(len(db_starts), len(q_starts), query_chunk, db_chunk)
    dists = torch.empty((n_q, 0), dtype=db_feats.dtype, device=device)
    idx = torch.empty((n_q, 0), dtype=torch.long, device=device)
    with tqdm(total=len(q_starts), desc="sequence matching", unit="query",
              disable=not progress_enabled(quiet) or not distributed.is_main(), leave=False) as bar:
        if len(db_starts):
            dists, idx = chunked_topk(db_feats, q_feats, torch.as_tensor(db_starts, device=device),
                                      torch.as_tensor(q_starts, device=device), seq_len, k,
                                      query_chunk=query_chunk, db_chunk=db_chunk, progress=bar.update)
    if distributed.active():
        dists, idx = distributed.all_gather_topk(dists, idx + share.start, min(k, n_db), n_db)
    return idx.cpu().numpy(), dists.cpu().numpy()


def faiss_search(db_feats: torch.Tensor, q_feats: torch.Tensor, k: int,
                 extra: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """Single-frame search with a flat L2 index (GPU faiss when the features are on CUDA and it is available).

    Exact ties are ordered by ascending database index, also at the ``k`` boundary, whatever order
    the index returns them in: faiss is asked for ``extra`` more neighbours than ``k``, each
    row is sorted by (distance, index), and the rows whose ``k``-th distance is still tied with the
    last one returned are searched again with twice as many until the tie group is complete.
    """
    import faiss

    db = np.ascontiguousarray(db_feats.cpu().numpy(), dtype=np.float32)
    q = np.ascontiguousarray(q_feats.cpu().numpy(), dtype=np.float32)
    cpu_index = faiss.IndexFlatL2(db.shape[1])
    cpu_index.add(db)
    index = cpu_index
    if db_feats.is_cuda and hasattr(faiss, "StandardGpuResources"):
        index = faiss.index_cpu_to_gpu(faiss.StandardGpuResources(), 0, cpu_index)
    n_db = len(db)
    k = min(k, n_db)
    out_d = np.empty((len(q), k), dtype=np.float32)
    out_idx = np.empty((len(q), k), dtype=np.int64)
    rows, width = np.arange(len(q)), min(k + extra, n_db)
    while len(rows) and k:
        sq, idx = index.search(q[rows], width)
        d = np.sqrt(np.maximum(sq, 0))                         # ties are ties of the distances reported
        order = np.lexsort((idx, d))                           # by distance, then index, per row
        d, idx = np.take_along_axis(d, order, 1), np.take_along_axis(idx, order, 1)
        done = (width == n_db) | (d[:, -1] > d[:, k - 1])     # the k-th distance's tie group is complete
        out_d[rows[done]], out_idx[rows[done]] = d[done, :k], idx[done, :k]
        rows, width = rows[~done], min(2 * width, n_db)
        index = cpu_index                                      # re-searches: few rows, no limit on width
    return out_idx, out_d


def rerank(db_feats: torch.Tensor, q_feats: torch.Tensor, db_starts: np.ndarray, q_starts: np.ndarray,
           candidates: np.ndarray, seq_len: int) -> tuple[np.ndarray, np.ndarray]:
    """Re-rank each query's candidates (indices into db_starts) by sequence distance; exact ties
    by ascending index, as in ``rank``."""
    from seqMatchNet import topk_by_value_then_index

    device = db_feats.device
    cand = torch.as_tensor(candidates, device=device)
    d = candidate_distances(db_feats, q_feats, torch.as_tensor(db_starts, device=device),
                            torch.as_tensor(q_starts, device=device), cand, seq_len)
    d, order = topk_by_value_then_index(d, d.shape[1], ids=cand)
    return torch.gather(cand, 1, order).cpu().numpy(), d.cpu().numpy()


def load_predictions(path: Path) -> np.ndarray:
    """``preds`` of an earlier run (``--resultsPath``): ``[numQ, >=20]`` integer array, first 20 kept.
    Rows and values are checked against the split by ``check_predictions``."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"--predictionsFile {path} not found: write one with --resultsPath in an earlier run")
    try:
        with np.load(path, allow_pickle=False) as z:
            if "preds" not in z.files:
                raise UserError(f"--predictionsFile {path} has no 'preds' array (found {z.files})")
            preds = np.asarray(z["preds"])
    except (ValueError, OSError, EOFError) as exc:
        raise UserError(f"--predictionsFile {path} is not a readable .npz ({exc})") from exc
    if preds.ndim != 2 or not np.issubdtype(preds.dtype, np.integer):
        raise UserError(f"--predictionsFile {path}: preds has shape {preds.shape} ({preds.dtype}), expected "
                        f"integers of shape (queries, >= {RERANK_CANDIDATES})")
    return preds.astype(np.int64)


def check_predictions(preds: np.ndarray, num_q: int, num_db: int, source: str) -> None:
    """``preds`` must have one row per evaluated query and index the evaluated database frames
    (the same split, ``--seqL`` and ``--seqL_filterData`` as the run that wrote them)."""
    if preds.shape[0] != num_q or preds.shape[1] < RERANK_CANDIDATES:
        raise UserError(f"{source}: preds has shape {preds.shape}, expected ({num_q}, >= {RERANK_CANDIDATES}) "
                        "for this evaluation: use a file written for the same --dataset, --split and "
                        "--seqL_filterData")
    if preds.min() < 0 or preds.max() >= num_db:
        raise UserError(f"{source}: preds must be indices of the evaluated database frames, in [0, {num_db}), "
                        f"found {preds.min()}..{preds.max()}: use a file written for the same --dataset, --split "
                        "and --seqL_filterData")


def evaluation_filter(opt: argparse.Namespace, split_name: str) -> int | None:
    """Length whose unshifted windows are evaluated: ``--seqL_filterData``; on the training split
    ``--seqL`` by default, as the reference (its training split only holds full windows)."""
    if opt.seqL_filterData is not None:
        return opt.seqL_filterData
    return opt.seqL if split_name == "train" else None


def evaluate(opt: argparse.Namespace, split: Split, model: SeqMatchModel, device: torch.device,
             predictions: np.ndarray | None = None, quiet: bool | None = None) -> EvalResult:
    """Evaluate ``model`` on ``split``: features, ranking, Recall@N and recall at radii."""
    quiet = opt.quiet if quiet is None else quiet
    seq_len = opt.seqL
    filter_len = evaluation_filter(opt, split.name)
    db_sel = select_frames(split.db_bounds, filter_len)
    q_sel = select_frames(split.q_bounds, filter_len)
    if len(db_sel) == 0 or len(q_sel) == 0:
        raise UserError(f"no frames of split {split.name} have a full window of {filter_len} frames: "
                        "use a smaller --seqL_filterData")
    if predictions is not None:
        check_predictions(predictions, len(q_sel), len(db_sel), f"--predictionsFile {opt.predictionsFile}")
        predictions = predictions[:, :RERANK_CANDIDATES]
        if model.compares_descriptors:
            raise UserError("--predictionsFile re-ranks by sequence matching: use it with --method seqmatch")
    if getattr(opt, "shortlist", 0) and model.compares_descriptors:
        raise UserError("--shortlist re-ranks by sequence matching: use it with --method seqmatch (this model's "
                        "window or frame descriptors are searched with a faiss index already)")

    t0 = time.perf_counter()
    db_starts = sequence_windows(split.db_bounds, seq_len)[0][db_sel]
    q_starts = sequence_windows(split.q_bounds, seq_len)[0][q_sel]
    settings = LargeMapSettings.of(opt)
    q = model.embed_windows(split.q_desc, q_starts, seq_len, device, opt.cacheBatchSize, "queries", quiet,
                            all_frames=True, dtype=settings.feat_dtype)
    if not model.compares_descriptors and (split.num_db > settings.map_chunk or settings.shortlist):
        found = search_streamed(opt, split.db_desc, model, device, db_starts, q, predictions, quiet)
        idx, dists, db_feats, timings = found.preds, found.dists, found.db_feats, found.timings
        t2 = time.perf_counter()
    else:
        db = model.embed_windows(split.db_desc, db_starts, seq_len, device, opt.cacheBatchSize, "database", quiet,
                                 all_frames=True, dtype=settings.feat_dtype)
        t1 = time.perf_counter()
        idx, dists = search(model, db, q, seq_len, opt, predictions, quiet)
        t2 = time.perf_counter()
        found, db_feats = None, db.feats if db.starts is not None else None
        timings = {"features_s": t1 - t0, "matching_s": t2 - t1}

    db_pos, q_pos = split.db_positions[db_sel], split.q_positions[q_sel]
    nearest = nearest_db_distance(db_pos, q_pos)
    recalls, n_pos = recall_table(idx, db_pos, q_pos, split.pos_dist_thr, nearest=nearest)
    radius_recalls, radius_counts = radius_table(idx, db_pos, q_pos, nearest=nearest)
    t3 = time.perf_counter()
    frame_feats = q.starts is not None
    return EvalResult(recalls=recalls, radius_recalls=radius_recalls, preds=idx, dists=dists,
                      db_frames=db_sel, q_frames=q_sel, queries_with_positives=n_pos, radius_counts=radius_counts,
                      timings={**timings, "metrics_s": t3 - t2},
                      db_feats=db_feats if frame_feats else None, q_feats=q.feats if frame_feats else None,
                      shortlist=found.shortlist if found is not None else None)


def search(model: SeqMatchModel, db: WindowEmbedding, q: WindowEmbedding, seq_len: int, opt: argparse.Namespace,
           predictions: np.ndarray | None = None, quiet: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Top-``TOP_K`` database windows per query window, ``(indices [Nq, k], distances [Nq, k])``:
    nearest descriptors (window models, single frames), re-ranking of ``predictions``, or
    sequence matching of every database window (features kept in float16 are matched in float32)."""
    if model.compares_descriptors:
        return faiss_search(db.rows(), q.rows(), TOP_K)
    if predictions is not None:
        return rerank(db.feats.float(), q.feats.float(), db.starts, q.starts, predictions, seq_len)
    return rank(db.feats.float(), q.feats.float(), db.starts, q.starts, seq_len, query_chunk=opt.queryChunk,
                db_chunk=opt.dbChunk, quiet=quiet)


# ---------------------------------------------------------------- large maps (docs/large-maps.md)

@dataclass(frozen=True)
class LargeMapSettings:
    """The "large maps" options (defaults for options restored from runs that predate them)."""

    map_chunk: int = 32768
    feat_dtype: torch.dtype = torch.float32
    shortlist: int = 0
    nprobe: int = 16

    @classmethod
    def of(cls, opt: argparse.Namespace) -> LargeMapSettings:
        dtype = torch.float16 if getattr(opt, "featDtype", "float32") == "float16" else torch.float32
        return cls(getattr(opt, "mapChunk", cls.map_chunk), dtype, getattr(opt, "shortlist", 0) or 0,
                   getattr(opt, "nprobe", cls.nprobe))


@dataclass
class StreamedSearch:
    preds: np.ndarray                   # [Nq, k] indices into the database windows
    dists: np.ndarray                   # [Nq, k]
    timings: dict
    db_feats: torch.Tensor | None = None
    shortlist: dict | None = None


def database_chunks(model: SeqMatchModel, desc, seq_len: int, device: torch.device, batch_size: int,
                    chunk: int, dtype: torch.dtype, clock: dict, keep: torch.Tensor | None = None,
                    quiet: bool = False):
    """The database's projected frames, ``chunk`` frames at a time: yields ``(first frame, end of the
    chunk's own frames, float32 features [own + L - 1 frames, D])``. The ``L - 1`` frames after a chunk
    come with it, so every window starting in the chunk is complete. Features are stored in ``dtype``
    (and copied into ``keep`` when given); reading and projecting time is added to ``clock``."""
    n = len(desc)
    for lo in tqdm(range(0, n, chunk), desc="database chunks", unit="chunk", disable=not progress_enabled(quiet),
                   leave=False):
        t = time.perf_counter()
        own_hi, hi = min(lo + chunk, n), min(lo + chunk + seq_len - 1, n)
        feats = extract_features(model, desc[lo:hi], device, batch_size, "database", True, dtype)
        if keep is not None:
            keep[lo:own_hi] = feats[:own_hi - lo]
        feats = feats.float()
        clock["features_s"] = clock.get("features_s", 0.0) + time.perf_counter() - t
        yield lo, own_hi, feats


def rank_streamed(chunks, q_feats: torch.Tensor, db_starts: np.ndarray, q_starts: np.ndarray, seq_len: int,
                  k: int = TOP_K, query_chunk: int = 1024, db_chunk: int = 0,
                  on_chunk=None) -> tuple[np.ndarray, np.ndarray]:
    """``rank`` over a database that arrives in chunks of frames (``database_chunks``): each window is
    scored in the chunk that holds its first frame, and the chunks' top-k lists are merged by
    (distance, window index), so the result equals ``rank`` on the whole database, tie order included.
    ``on_chunk(windows, their starts in the chunk, chunk features)`` sees every chunk (index building).
    Returns ``(indices into db_starts [Nq, k], distances [Nq, k])``."""
    from seqMatchNet import topk_by_value_then_index

    order = np.argsort(db_starts, kind="stable")
    sorted_starts = db_starts[order]
    device = q_feats.device
    q_t = torch.as_tensor(q_starts, device=device)
    best_d = torch.empty((len(q_starts), 0), dtype=torch.float32, device=device)
    best_i = torch.empty((len(q_starts), 0), dtype=torch.long, device=device)
    for lo, own_hi, feats in chunks:
        a, b = np.searchsorted(sorted_starts, [lo, own_hi])
        windows = np.sort(order[a:b])                  # ascending index: ties stay in index order
        if len(windows) == 0:
            continue
        local = db_starts[windows] - lo
        if on_chunk is not None:
            on_chunk(windows, local, feats)
        if len(q_starts) == 0:
            continue
        d, li = chunked_topk(feats, q_feats, torch.as_tensor(local, device=device), q_t, seq_len, k,
                             query_chunk=query_chunk,
                             db_chunk=database_chunk(len(windows), len(q_starts), query_chunk, db_chunk))
        ids = torch.as_tensor(windows, device=device)[li]
        merged_i = torch.cat([best_i, ids], dim=1)
        best_d, pos = topk_by_value_then_index(torch.cat([best_d, d.float()], dim=1), k, ids=merged_i)
        best_i = torch.gather(merged_i, 1, pos)
    return best_i.cpu().numpy(), best_d.cpu().numpy()


def rerank_from_source(model: SeqMatchModel, desc, db_starts: np.ndarray, q_feats: torch.Tensor,
                       q_starts: np.ndarray, candidates: np.ndarray, seq_len: int, device: torch.device,
                       batch_size: int, dtype: torch.dtype, frames_per_step: int) -> tuple[np.ndarray, np.ndarray]:
    """``rerank`` that reads and projects only the candidates' frames, a few queries at a time (at most
    about ``frames_per_step`` frames), instead of holding the whole database's features. The next
    step's frames are read (a thread) while this step's are projected and compared."""
    from concurrent.futures import ThreadPoolExecutor

    n_q, width = candidates.shape
    step = max(1, frames_per_step // max(width * seq_len, 1))
    out_i = np.empty((n_q, width), dtype=np.int64)
    out_d = np.empty((n_q, width), dtype=np.float32)

    def read(lo: int):
        cand = np.asarray(candidates[lo:lo + step])
        windows, local_cand = np.unique(cand, return_inverse=True)     # ascending: ties keep index order
        frames, local_starts = window_frames(db_starts[windows], seq_len)
        return windows, local_cand.reshape(cand.shape), local_starts, desc[frames]

    with ThreadPoolExecutor(max_workers=1) as reader:
        pending = reader.submit(read, 0)
        for lo in range(0, n_q, step):
            windows, local_cand, local_starts, frames = pending.result()
            if lo + step < n_q:
                pending = reader.submit(read, lo + step)
            feats = extract_features(model, frames, device, batch_size, "candidates", True, dtype, overwrite=True)
            feats = feats.float()
            del frames
            order, d = rerank(feats, q_feats, local_starts, q_starts[lo:lo + step], local_cand, seq_len)
            out_i[lo:lo + len(order)], out_d[lo:lo + len(order)] = windows[order], d
    return out_i, out_d


def search_streamed(opt: argparse.Namespace, desc, model: SeqMatchModel, device: torch.device,
                    db_starts: np.ndarray, q: WindowEmbedding, predictions: np.ndarray | None = None,
                    quiet: bool = False) -> StreamedSearch:
    """``search`` for frame models over a database read from ``desc`` chunk by chunk (``--mapChunk``
    frames): exact sequence matching of every window, re-ranking of ``predictions``, or with
    ``--shortlist K`` re-ranking of the K windows a faiss index of window descriptors returns."""
    s = LargeMapSettings.of(opt)
    seq_len, clock = opt.seqL, {"features_s": 0.0}
    q_feats, q_starts = q.feats.float(), q.starts.cpu().numpy()
    t0 = time.perf_counter()
    if predictions is not None:
        idx, dists = rerank_from_source(model, desc, db_starts, q_feats, q_starts, predictions, seq_len, device,
                                        opt.cacheBatchSize, s.feat_dtype, s.map_chunk)
        return StreamedSearch(idx, dists, {"matching_s": time.perf_counter() - t0})
    item = torch.empty((), dtype=s.feat_dtype).element_size()
    keep = None
    if len(desc) * model.out_dims * item <= KEEP_FEATS_BYTES:
        keep = torch.empty((len(desc), model.out_dims), dtype=s.feat_dtype, device=device)
    else:
        log.info("database of %d frames: its features are not kept, so no distance-matrix figure", len(desc))
    chunks = database_chunks(model, desc, seq_len, device, opt.cacheBatchSize, s.map_chunk, s.feat_dtype, clock,
                             keep, quiet)
    if not s.shortlist:
        idx, dists = rank_streamed(chunks, q_feats, db_starts, q_starts, seq_len, TOP_K, opt.queryChunk,
                                   opt.dbChunk)
        clock["matching_s"] = time.perf_counter() - t0 - clock["features_s"]
        return StreamedSearch(idx, dists, clock, keep)
    return shortlist_search(opt, desc, model, device, db_starts, q, chunks, clock, keep)


def new_window_index(opt: argparse.Namespace, desc, model: SeqMatchModel, device: torch.device,
                     db_starts: np.ndarray, choice, rng: np.random.Generator):
    """An empty ``shortlist.WindowIndex`` of ``choice``'s kind, trained (IVF) on the window means of a
    random sample of the database's windows, read about ``--mapChunk`` frames at a time."""
    from shortlist import WindowIndex

    s = LargeMapSettings.of(opt)
    index = WindowIndex(choice, model.out_dims, device)
    if choice.needs_training:
        sample = np.sort(rng.choice(len(db_starts), choice.training_size(len(db_starts)), replace=False))
        step = max(1, s.map_chunk // opt.seqL)
        means = np.empty((len(sample), model.out_dims), dtype=np.float32)      # filled in place: no copies
        for lo in range(0, len(sample), step):
            frames, local = window_frames(db_starts[sample[lo:lo + step]], opt.seqL)
            feats = extract_features(model, desc[frames], device, opt.cacheBatchSize, "index sample", True,
                                     s.feat_dtype, overwrite=True)
            means[lo:lo + len(local)] = window_means(feats, torch.as_tensor(local, device=device), opt.seqL).cpu()
            del feats
        index.train(means)
    return index


def shortlist_search(opt: argparse.Namespace, desc, model: SeqMatchModel, device: torch.device,
                     db_starts: np.ndarray, q: WindowEmbedding, chunks, clock: dict,
                     keep: torch.Tensor | None) -> StreamedSearch:
    """``--shortlist K``: index one descriptor per database window (``window_means``) while the chunks
    stream by, matching a sample of ``--shortlistCheck`` queries exactly on the way (the shortlist's
    recall); then each query's K nearest windows in the index are re-ranked by exact sequence matching.
    With ``--shortlistIndex`` the index is read from that file when it holds one built for this map,
    model and settings (written there otherwise): the database then streams by only for the check."""
    from shortlist import choose_index, index_fingerprint, load_index, save_index, shortlist_recall

    s = LargeMapSettings.of(opt)
    seq_len, q_feats, q_starts = opt.seqL, q.feats.float(), q.starts.cpu().numpy()
    rng = np.random.default_rng(opt.seed)
    n_check = min(len(q_starts), getattr(opt, "shortlistCheck", SHORTLIST_CHECK_QUERIES))
    check = np.sort(rng.choice(len(q_starts), n_check, replace=False))      # the same whether built or read
    t0 = time.perf_counter()
    choice = choose_index(len(db_starts), model.out_dims)
    path = Path(opt.shortlistIndex) if getattr(opt, "shortlistIndex", None) else None
    fingerprint = index_fingerprint(desc, db_starts, model, seq_len, s.feat_dtype, choice) if path else None
    loaded = path is not None and path.exists()
    index = (load_index(path, fingerprint, choice, device) if loaded
             else new_window_index(opt, desc, model, device, db_starts, choice, rng))
    clock["index_load_s" if loaded else "index_build_s"] = time.perf_counter() - t0

    def add(windows: np.ndarray, local: np.ndarray, feats: torch.Tensor) -> None:
        t = time.perf_counter()
        index.add(window_means(feats, torch.as_tensor(local, device=feats.device), seq_len).cpu().numpy(), windows)
        clock["index_build_s"] += time.perf_counter() - t

    if loaded and n_check == 0:
        keep = None                        # nothing streams by: no database features for the figures
    else:
        t1, before = time.perf_counter(), clock.get("index_build_s", 0.0)
        exact, _ = rank_streamed(chunks, q_feats, db_starts, q_starts[check], seq_len, 1, opt.queryChunk,
                                 opt.dbChunk, on_chunk=None if loaded else add)
        spent = clock.get("index_build_s", 0.0) - before
        clock["shortlist_check_s"] = time.perf_counter() - t1 - clock["features_s"] - spent
    if path is not None and not loaded:
        save_index(index, path, fingerprint)
    t2 = time.perf_counter()
    candidates = index.search(window_means(q.feats, q.starts, seq_len).cpu().numpy(), s.shortlist, s.nprobe)
    clock["shortlist_search_s"] = time.perf_counter() - t2
    idx, dists = rerank_from_source(model, desc, db_starts, q_feats, q_starts, candidates, seq_len, device,
                                    opt.cacheBatchSize, s.feat_dtype, s.map_chunk)
    clock["matching_s"] = time.perf_counter() - t2
    recall = shortlist_recall(exact[:, 0], candidates[check]) if n_check else float("nan")
    info = {"candidates": int(candidates.shape[1]), "index": choice.describe(), "nprobe": s.nprobe,
            "recall": recall, "sampled_queries": int(n_check), "index_file": str(path) if path else None,
            "index_loaded": loaded}
    return StreamedSearch(idx[:, :TOP_K], dists[:, :TOP_K], clock, keep, info)


def write_figures(result: EvalResult, split: Split, seq_len: int, out_dir: Path, label: str, prefix: str = "",
                  writer=None, step: int = 0) -> dict:
    """PNG figures of an evaluation into ``out_dir`` (and TensorBoard through ``writer``);
    returns the precision-recall summary of the top-1 matches."""
    import plots

    pr = top1_precision_recall(result, split)
    section = distance_section(result, split, seq_len)
    figs = plots.evaluation_figures(result.recalls, result.radius_recalls, pr, label, section,
                                    radius_unit=split.position_unit)
    for name, fig in figs.items():
        if writer is not None:
            writer.figure(f"{prefix or 'Test'}/{name}", fig, step)
        plots.save_figure(fig, Path(out_dir) / f"{prefix.lower() + '_' if prefix else ''}{name}.png")
    return pr


def distance_section(result: EvalResult, split: Split, seq_len: int, size: int = 300):
    """The distance-matrix section the figure shows: the first ``size`` evaluated query frames
    against the database frames around their ground truth (at most ``2 * size``), with the
    ground-truth mask and the top-1 matches; None without frame features (window descriptors)."""
    from sklearn.neighbors import NearestNeighbors

    from plots import DistanceSection

    if result.db_feats is None or result.q_feats is None:
        return None
    q_frames, top1 = np.asarray(result.q_frames), result.db_frames[result.preds[:, 0]]
    q_lo, q_hi = int(q_frames[0]), int(min(q_frames[0] + size, split.num_q))
    _, near = NearestNeighbors(n_neighbors=1).fit(split.db_positions).kneighbors(split.q_positions[q_lo:q_hi])
    near = near[:, 0]
    span = min(max(int(near.max() - near.min()) + size // 5, size), 2 * size)
    db_lo = int(np.clip(np.median(near) - span // 2, 0, max(split.num_db - span, 0)))
    db_hi = min(db_lo + span, split.num_db)
    db_starts, _ = sequence_windows(split.db_bounds, seq_len)
    q_starts, _ = sequence_windows(split.q_bounds, seq_len)
    device = result.db_feats.device
    with torch.no_grad():
        block = window_distances(result.db_feats.float(), result.q_feats.float(),
                                 torch.as_tensor(db_starts[db_lo:db_hi], device=device),
                                 torch.as_tensor(q_starts[q_lo:q_hi], device=device), seq_len).float().cpu().numpy()
    gt = np.linalg.norm(split.db_positions[db_lo:db_hi, None, :] - split.q_positions[None, q_lo:q_hi, :],
                        axis=-1) <= split.pos_dist_thr
    rows = np.full(q_hi - q_lo, -1, dtype=np.int64)
    inside = (q_frames >= q_lo) & (q_frames < q_hi)
    rows[q_frames[inside] - q_lo] = top1[inside] - db_lo
    rows[(rows < 0) | (rows >= db_hi - db_lo)] = -1
    return DistanceSection(block, db_lo, q_lo, gt, rows, seq_len)


def top1_precision_recall(result: EvalResult, split: Split) -> dict:
    """Precision-recall of the top-1 matches over their distance threshold (AUC, recall at 100 % precision)."""
    correct, has_pos = top1_outcomes(result.db_frames[result.preds[:, 0]], split.db_positions,
                                     split.q_positions[result.q_frames], split.pos_dist_thr)
    return precision_recall(result.dists[:, 0], correct, has_pos)


def format_recalls(result: EvalResult, title: str = "", unit: str = "m") -> str:
    """The recall table as text: Recall@N, then recall at each localisation radius with the number of
    queries that have a positive within it (each row's denominator)."""
    head = "".join(f"{'R@' + str(n):>8}" for n in N_VALUES)
    lines = [title] if title else []
    lines.append(f"{'':>14}{head}{'queries':>9}")
    lines.append(f"{'posDistThr':>14}" + "".join(f"{result.recalls[n]:>8.4f}" for n in N_VALUES)
                 + f"{result.queries_with_positives:>9}")
    for r, row, n in zip(RADII, result.radius_recalls, result.radius_counts):
        lines.append(f"{f'radius {r} {unit}':>14}" + "".join(f"{v:>8.4f}" for v in row) + f"{n:>9}")
    lines.append(f"({len(result.q_frames)} queries, {len(result.db_frames)} database frames; each row counts the "
                 f"queries with a positive within its radius; R@N counts only the {result.preds.shape[1]} retrieved)")
    if result.shortlist:
        s = result.shortlist
        recall = (f"the exact top-1 is among them for {s['recall']:.4f} of {s['sampled_queries']} sampled queries"
                  if s["sampled_queries"] else "its recall was not measured (--shortlistCheck 0)")
        source = f", read from {s['index_file']}" if s.get("index_loaded") else ""
        lines.append(f"shortlist: {s['candidates']} candidates per query from a {s['index']} index (nprobe "
                     f"{s['nprobe']}{source}); {recall}")
    return "\n".join(lines)


def save_results(results_dir: Path, result: EvalResult, extra: dict | None = None,
                 embeddings: dict | None = None) -> Path:
    """Write ``results.npz`` (reference keys: recalls, rAtL, preds, n_values; dbEmb/qEmb when computed).
    ``preds`` are positions in ``dbFrames`` (the evaluated database frames), as the reference's."""
    results_dir = Path(results_dir)
    arrays = {"recalls": np.array(result.recalls, dtype=object), "rAtL": result.radius_recalls,
              "preds": result.preds, "dists": result.dists, "n_values": np.array(N_VALUES),
              "radii": np.array(RADII), "dbFrames": result.db_frames, "qFrames": result.q_frames}
    arrays.update(embeddings or {})
    arrays.update(extra or {})
    path = results_dir / "results.npz"
    atomic_write(path, lambda f: np.savez(f, **arrays))
    return path


def tsne_embeddings(db_feats: torch.Tensor, q_feats: torch.Tensor, num: int, seed: int) -> dict:
    """2-D t-SNE of the first ``num`` database and query frame descriptors."""
    from sklearn.manifold import TSNE

    db = db_feats[:num].float().cpu().numpy()
    q = q_feats[:num].float().cpu().numpy()
    both = np.concatenate([db, q])
    emb = TSNE(n_components=2, init="pca", random_state=seed,
               perplexity=min(30, max(len(both) - 1, 1) / 3)).fit_transform(both)
    return {"dbEmb": emb[:len(db)], "qEmb": emb[len(db):]}


# ---------------------------------------------------------------- --mode test

@dataclass
class Loaded:
    """What ``--mode test`` evaluates: the options (restored from a run), the split, the model on
    its device, and a label naming the method, checkpoint and re-ranking source."""

    opt: argparse.Namespace
    split: Split
    model: SeqMatchModel
    device: torch.device
    label: str
    checkpoint: dict | None = None      # {"path", "run", "epoch", "which"} with --resume


def load_for_test(opt: argparse.Namespace) -> Loaded:
    """Restore a run's options (``--resume``), load the split and the model with its checkpoint."""
    import report
    import runs
    from get_datasets import get_split, prepare_dataset
    from get_models import get_model, load_state, parallelize

    device = get_device(opt.nocuda, opt.device)
    ckpt = info = None
    if opt.resume:
        opt, run_dir, ckpt_path, ckpt = runs.open_run(opt)
        info = {"path": str(ckpt_path), "run": run_dir.name, "epoch": int(ckpt["epoch"]), "which": opt.ckpt}
    prepare_dataset(opt)
    split = get_split(opt, opt.split, lazy=True)      # descriptors are read from their files as needed
    model = get_model(opt, split.dim)
    if ckpt is not None:
        load_state(model, ckpt["state_dict"], info["path"])
        log.info("loaded %s (epoch %s)", info["path"], info["epoch"])
    model = parallelize(model.to(device), opt.nGPU, device)
    label = report.method_label(vars(opt), info)
    if info is None and (opt.pooling or opt.method == "seqnet"):
        label += " (untrained: random initialisation)"
    return Loaded(opt, split, model, device, label, info)


def evaluate_options(opt: argparse.Namespace) -> tuple[Loaded, EvalResult]:
    """Load what ``opt`` names (split, model, ``--predictionsFile``) and evaluate it."""
    loaded = load_for_test(opt)
    predictions = load_predictions(Path(opt.predictionsFile)) if opt.predictionsFile else None
    return loaded, evaluate(loaded.opt, loaded.split, loaded.model, loaded.device, predictions)


def run_test(opt: argparse.Namespace) -> dict | None:
    """``--mode test``: evaluate a split (optionally a trained run), print the recalls and, with
    ``--resultsPath``, write results, figures and ``summary.json``."""
    if opt.resultsPath:             # fail before the evaluation, not after it
        ensure_output_dir(Path(opt.resultsPath), "--resultsPath")
    if opt.extractOnly:
        return extract_only(load_for_test(opt))
    loaded, result = evaluate_options(opt)
    opt, split = loaded.opt, loaded.split
    print(format_recalls(result, f"{opt.dataset} {opt.split}, seqL {opt.seqL}: {loaded.label}", split.position_unit))
    import distributed
    if not opt.resultsPath or not distributed.is_main():     # under torchrun rank 0 writes the results
        return None
    return write_test_outputs(loaded, result, Path(opt.resultsPath))


def write_test_outputs(loaded: Loaded, result: EvalResult, results_dir: Path) -> dict:
    """``results.npz``, the figures (unless ``--figures none``) and ``summary.json``."""
    import report

    opt, split = loaded.opt, loaded.split
    embeddings = None
    if opt.numSamples2Project != -1:
        if result.db_feats is None:
            log.warning("--numSamples2Project embeds frame descriptors; --method %s has none", opt.method)
        else:
            embeddings = tsne_embeddings(result.db_feats, result.q_feats, opt.numSamples2Project, opt.seed)
            draw_embeddings(embeddings, results_dir, loaded.label)
    path = save_results(results_dir, result, embeddings=embeddings)
    title = f"{opt.dataset} {opt.split} seqL {opt.seqL}, {loaded.label}"
    if opt.figures == "none":
        pr = top1_precision_recall(result, split)
    else:
        pr = write_figures(result, split, opt.seqL, results_dir, title)
    radius = {r: dict(zip(N_VALUES, row)) for r, row in zip(RADII, result.radius_recalls.tolist())}
    summary = report.build_summary("test", vars(opt), result.recalls, radius, pr, result.timings, split.files,
                                   extra={"queries": int(len(result.q_frames)),
                                          "queries_with_positives": result.queries_with_positives,
                                          "radius_queries": dict(zip(RADII, result.radius_counts.tolist())),
                                          "position_unit": split.position_unit,
                                          "method_label": loaded.label, "checkpoint": loaded.checkpoint,
                                          "feat_dtype": getattr(opt, "featDtype", "float32"),
                                          "shortlist": result.shortlist})
    write_json_atomic(summary, results_dir / "summary.json")
    log.info("results, figures and summary.json written to %s", path.parent)
    return summary


def draw_embeddings(embeddings: dict, results_dir: Path, label: str) -> None:
    import plots

    fig = plots.embedding_figure(embeddings["dbEmb"], embeddings["qEmb"], title=f"t-SNE of frame descriptors ({label})")
    plots.save_figure(fig, results_dir / "tsne.png")


def extract_only(loaded: Loaded) -> dict:
    """``--extractOnly``: save sequence descriptors ``[N, L, D]`` and ground truth instead of evaluating.

    Ground truth is stored as plain arrays (readable with ``allow_pickle=False``): the positives of
    query ``i`` are ``gtIndices[gtOffsets[i]:gtOffsets[i + 1]]`` (database rows within posDistThr)."""
    from sklearn.neighbors import NearestNeighbors

    opt, split = loaded.opt, loaded.split
    if not opt.resultsPath:
        raise UserError("--extractOnly needs --resultsPath to write the descriptors to")
    out = {}
    for side, desc, bounds in (("db", split.db_desc, split.db_bounds), ("q", split.q_desc, split.q_bounds)):
        feats = extract_features(loaded.model, desc, loaded.device, opt.cacheBatchSize, side, opt.quiet).cpu()
        starts, _ = sequence_windows(bounds, opt.seqL)
        out[f"{side}Desc"] = feats[torch.as_tensor(starts)[:, None] + torch.arange(opt.seqL)].numpy()
    gt = NearestNeighbors().fit(split.db_positions).radius_neighbors(
        split.q_positions, radius=split.pos_dist_thr, return_distance=False)
    out["gtOffsets"] = np.r_[0, np.cumsum([len(g) for g in gt])].astype(np.int64)
    out["gtIndices"] = np.concatenate([np.sort(g) for g in gt]).astype(np.int64)
    path = Path(opt.resultsPath) / "descriptors.npz"
    atomic_write(path, lambda f: np.savez(f, **out))
    print(f"sequence descriptors written to {path} (db {out['dbDesc'].shape}, q {out['qDesc'].shape})")
    return {"mode": "extract", "path": str(path)}
