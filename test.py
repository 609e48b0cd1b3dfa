"""Evaluation: pool frames, score sequences, rank, and measure recall (README, "How it works").

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
from get_models import SeqMatchModel, WindowEmbedding, extract_features
from metrics import N_VALUES, RADII, precision_recall, radius_table, recall_table, top1_outcomes
from seqMatchNet import candidate_distances, chunked_topk, window_distances
from utils import UserError, atomic_write, ensure_output_dir, get_device, progress_enabled, write_json_atomic

log = logging.getLogger(__name__)

TOP_K = 100
RERANK_CANDIDATES = 20
DENSE_LIMIT_BYTES = 2 * 1024**3   # above this a query chunk's distance block is also split over the database


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


def select_frames(bounds: np.ndarray, filter_len: int | None) -> np.ndarray:
    """Frames to evaluate: all, or those whose window of ``filter_len`` needs no shift."""
    if filter_len is None:
        return np.arange(len(bounds))
    _, valid = sequence_windows(bounds, filter_len)
    return np.flatnonzero(valid)


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
    if db_chunk <= 0:
        block = len(db_starts) * min(query_chunk, len(q_starts)) * 4 * 3  # distances + diagonal sums + frames
        db_chunk = None if block <= DENSE_LIMIT_BYTES else max(DENSE_LIMIT_BYTES // (12 * query_chunk), 1024)
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
    if preds.ndim != 2 or preds.shape[1] < RERANK_CANDIDATES or not np.issubdtype(preds.dtype, np.integer):
        raise UserError(f"--predictionsFile {path}: preds has shape {preds.shape} ({preds.dtype}), expected "
                        f"integers of shape (queries, >= {RERANK_CANDIDATES})")
    return preds[:, :RERANK_CANDIDATES].astype(np.int64)


def check_predictions(preds: np.ndarray, num_q: int, num_db: int, source: str) -> None:
    """``preds`` must have one row per evaluated query and index the evaluated database frames
    (the same split, ``--seqL`` and ``--seqL_filterData`` as the run that wrote them)."""
    if preds.shape[0] != num_q or (preds.size and (preds.min() < 0 or preds.max() >= num_db)):
        raise UserError(f"{source}: preds has {preds.shape[0]} rows of indices up to {preds.max(initial=-1)}, but "
                        f"this evaluation has {num_q} queries and {num_db} database frames: use a file written for "
                        "the same --dataset, --split and --seqL_filterData")


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
        check_predictions(predictions, len(q_sel), len(db_sel), "--predictionsFile")
        if model.compares_descriptors:
            raise UserError("--predictionsFile re-ranks by sequence matching: use it with --method seqmatch")

    t0 = time.perf_counter()
    db_starts = sequence_windows(split.db_bounds, seq_len)[0][db_sel]
    q_starts = sequence_windows(split.q_bounds, seq_len)[0][q_sel]
    db = model.embed_windows(split.db_desc, db_starts, seq_len, device, opt.cacheBatchSize, "database", quiet,
                             all_frames=True)
    q = model.embed_windows(split.q_desc, q_starts, seq_len, device, opt.cacheBatchSize, "queries", quiet,
                            all_frames=True)
    t1 = time.perf_counter()
    idx, dists = search(model, db, q, seq_len, opt, predictions, quiet)
    t2 = time.perf_counter()

    db_pos, q_pos = split.db_positions[db_sel], split.q_positions[q_sel]
    recalls, n_pos = recall_table(idx, db_pos, q_pos, split.pos_dist_thr)
    radius_recalls, radius_counts = radius_table(idx, db_pos, q_pos)
    t3 = time.perf_counter()
    frame_feats = db.starts is not None
    return EvalResult(recalls=recalls, radius_recalls=radius_recalls, preds=idx, dists=dists,
                      db_frames=db_sel, q_frames=q_sel, queries_with_positives=n_pos, radius_counts=radius_counts,
                      timings={"features_s": t1 - t0, "matching_s": t2 - t1, "metrics_s": t3 - t2},
                      db_feats=db.feats if frame_feats else None, q_feats=q.feats if frame_feats else None)


def search(model: SeqMatchModel, db: WindowEmbedding, q: WindowEmbedding, seq_len: int, opt: argparse.Namespace,
           predictions: np.ndarray | None = None, quiet: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Top-``TOP_K`` database windows per query window, ``(indices [Nq, k], distances [Nq, k])``:
    nearest descriptors (window models, single frames), re-ranking of ``predictions``, or
    sequence matching of every database window."""
    if model.compares_descriptors:
        return faiss_search(db.rows(), q.rows(), TOP_K)
    if predictions is not None:
        return rerank(db.feats, q.feats, db.starts, q.starts, predictions, seq_len)
    return rank(db.feats, q.feats, db.starts, q.starts, seq_len, query_chunk=opt.queryChunk,
                db_chunk=opt.dbChunk, quiet=quiet)


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
        block = window_distances(result.db_feats, result.q_feats,
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

    db = db_feats[:num].cpu().numpy()
    q = q_feats[:num].cpu().numpy()
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
    split = get_split(opt, opt.split)
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
                                          "method_label": loaded.label, "checkpoint": loaded.checkpoint})
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
