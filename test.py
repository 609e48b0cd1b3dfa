"""Evaluation: pool frames, score sequences, rank, and measure recall (SPEC section 6).

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
from get_models import SeqMatchModel
from seqMatchNet import candidate_distances, chunked_topk
from utils import UserError, progress_enabled

log = logging.getLogger(__name__)

N_VALUES = (1, 5, 10, 20, 100)
RADII = (1, 5, 10, 20, 40, 100, 200)
TOP_K = 100
RERANK_CANDIDATES = 20
DENSE_LIMIT_BYTES = 2 * 1024**3   # above this a query chunk's distance block is also split over the database


@dataclass
class EvalResult:
    recalls: dict                 # N -> Recall@N at posDistThr
    radius_recalls: np.ndarray    # [len(RADII), len(N_VALUES)]
    preds: np.ndarray             # [numQ, k] database indices of the split, best first
    dists: np.ndarray             # [numQ, k] their sequence distances
    db_frames: np.ndarray         # database frames that were searched
    q_frames: np.ndarray          # query frames that were evaluated
    timings: dict = field(default_factory=dict)
    queries_with_positives: int = 0
    db_feats: torch.Tensor | None = None   # pooled frame features (sequence matching), for figures
    q_feats: torch.Tensor | None = None


@torch.no_grad()
def extract_features(model: SeqMatchModel, desc: np.ndarray, device: torch.device, batch_size: int,
                     desc_name: str = "frames", quiet: bool = False) -> torch.Tensor:
    """Pool every frame with the model in eval mode: ``[N, C]`` -> ``[N, outDims]`` on ``device``."""
    model.eval()
    out = []
    bar = tqdm(range(0, len(desc), batch_size), desc=f"features ({desc_name})", unit="batch",
               disable=not progress_enabled(quiet), leave=False)
    for lo in bar:
        batch = torch.from_numpy(np.ascontiguousarray(desc[lo:lo + batch_size])).to(device)
        out.append(model.encode(batch))
    return torch.cat(out)


@torch.no_grad()
def describe_windows(model: SeqMatchModel, desc: np.ndarray, starts: np.ndarray, seq_len: int,
                     device: torch.device, batch_size: int) -> torch.Tensor:
    """One descriptor per window (smooth, delta, seqnet): ``starts [N]`` -> ``[N, outDims]`` on ``device``."""
    model.eval()
    offsets = np.arange(seq_len)
    out = []
    for lo in range(0, len(starts), batch_size):
        windows = desc[starts[lo:lo + batch_size, None] + offsets]              # [b, L, C]
        out.append(model.describe(torch.from_numpy(np.ascontiguousarray(windows)).to(device)))
    return torch.cat(out) if out else torch.empty((0, model.out_dims), device=device)


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
    """
    device = db_feats.device
    if db_chunk <= 0:
        block = len(db_starts) * min(query_chunk, len(q_starts)) * 4 * 3  # distances + diagonal sums + frames
        db_chunk = None if block <= DENSE_LIMIT_BYTES else max(DENSE_LIMIT_BYTES // (12 * query_chunk), 1024)
    with tqdm(total=len(q_starts), desc="sequence matching", unit="query", disable=not progress_enabled(quiet),
              leave=False) as bar:
        dists, idx = chunked_topk(db_feats, q_feats, torch.as_tensor(db_starts, device=device),
                                  torch.as_tensor(q_starts, device=device), seq_len, k,
                                  query_chunk=query_chunk, db_chunk=db_chunk, progress=bar.update)
    return idx.cpu().numpy(), dists.cpu().numpy()


def faiss_search(db_feats: torch.Tensor, q_feats: torch.Tensor, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Single-frame search with a flat L2 index (GPU faiss when the features are on CUDA and it is available)."""
    import faiss

    db = np.ascontiguousarray(db_feats.cpu().numpy(), dtype=np.float32)
    q = np.ascontiguousarray(q_feats.cpu().numpy(), dtype=np.float32)
    index = faiss.IndexFlatL2(db.shape[1])
    if db_feats.is_cuda and hasattr(faiss, "StandardGpuResources"):
        index = faiss.index_cpu_to_gpu(faiss.StandardGpuResources(), 0, index)
    index.add(db)
    sq, idx = index.search(q, min(k, len(db)))
    return idx.astype(np.int64), np.sqrt(np.maximum(sq, 0))


def rerank(db_feats: torch.Tensor, q_feats: torch.Tensor, db_starts: np.ndarray, q_starts: np.ndarray,
           candidates: np.ndarray, seq_len: int) -> tuple[np.ndarray, np.ndarray]:
    """Re-rank each query's candidates (indices into db_starts) by sequence distance."""
    device = db_feats.device
    cand = torch.as_tensor(candidates, device=device)
    d = candidate_distances(db_feats, q_feats, torch.as_tensor(db_starts, device=device),
                            torch.as_tensor(q_starts, device=device), cand, seq_len)
    order = torch.argsort(d, dim=1, stable=True)
    return torch.gather(cand, 1, order).cpu().numpy(), torch.gather(d, 1, order).cpu().numpy()


def load_predictions(path: Path, num_q: int, num_db: int) -> np.ndarray:
    """``preds`` of an earlier run, checked: ``[numQ, >=20]`` database indices in range."""
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
    if preds.ndim != 2 or preds.shape[0] != num_q or preds.shape[1] < RERANK_CANDIDATES:
        raise UserError(f"--predictionsFile {path}: preds has shape {preds.shape}, expected ({num_q}, >= "
                        f"{RERANK_CANDIDATES}) for this split")
    if not np.issubdtype(preds.dtype, np.integer) or preds.min() < 0 or preds.max() >= num_db:
        raise UserError(f"--predictionsFile {path}: preds must be database indices in [0, {num_db})")
    return preds[:, :RERANK_CANDIDATES].astype(np.int64)


def recall_table(preds: np.ndarray, db_positions: np.ndarray, q_positions: np.ndarray, radius: float,
                 n_values=N_VALUES) -> tuple[dict, int]:
    """Recall@N with positives within ``radius`` (<=); queries without any positive are left out.

    ``preds`` ``[Nq, k]`` indexes ``db_positions``. Returns ``({N: recall}, queries with a positive)``.
    """
    from sklearn.neighbors import NearestNeighbors

    nearest, _ = NearestNeighbors(n_neighbors=1).fit(db_positions).kneighbors(q_positions)
    has_pos = nearest[:, 0] <= radius
    hit = np.linalg.norm(q_positions[:, None, :] - db_positions[preds], axis=-1) <= radius
    first_hit = np.where(hit.any(axis=1), hit.argmax(axis=1), preds.shape[1])[has_pos]
    n = int(has_pos.sum())
    return {int(k): (float(np.mean(first_hit < k)) if n else float("nan")) for k in n_values}, n


def evaluate(opt: argparse.Namespace, split: Split, model: SeqMatchModel, device: torch.device,
             predictions: np.ndarray | None = None, quiet: bool | None = None) -> EvalResult:
    """Evaluate ``model`` on ``split``: features, ranking, Recall@N and recall at radii."""
    quiet = opt.quiet if quiet is None else quiet
    seq_len = opt.seqL
    db_starts, _ = sequence_windows(split.db_bounds, seq_len)
    q_starts, _ = sequence_windows(split.q_bounds, seq_len)
    db_sel = select_frames(split.db_bounds, opt.seqL_filterData)
    q_sel = select_frames(split.q_bounds, opt.seqL_filterData)
    if len(db_sel) == 0 or len(q_sel) == 0:
        raise UserError(f"no frames of split {split.name} are valid for --seqL_filterData {opt.seqL_filterData}")

    t0 = time.perf_counter()
    if model.describes_sequences:
        if predictions is not None:
            raise UserError("--predictionsFile re-ranks by sequence matching: use it with --method seqmatch")
        db_feats = describe_windows(model, split.db_desc, db_starts[db_sel], seq_len, device, opt.cacheBatchSize)
        q_feats = describe_windows(model, split.q_desc, q_starts[q_sel], seq_len, device, opt.cacheBatchSize)
    else:
        db_feats = extract_features(model, split.db_desc, device, opt.cacheBatchSize, "database", quiet)
        q_feats = extract_features(model, split.q_desc, device, opt.cacheBatchSize, "queries", quiet)
    t1 = time.perf_counter()

    if model.describes_sequences:   # one descriptor per window: nearest neighbours in descriptor space
        idx, dists = faiss_search(db_feats, q_feats, TOP_K)
    elif predictions is not None:
        pos_in_sel = np.full(split.num_db, -1)
        pos_in_sel[db_sel] = np.arange(len(db_sel))
        cand = pos_in_sel[predictions[q_sel]]
        if (cand < 0).any():
            raise UserError("--predictionsFile names database frames that --seqL_filterData leaves out")
        idx, dists = rerank(db_feats, q_feats, db_starts[db_sel], q_starts[q_sel], cand, seq_len)
    elif opt.matcher == "None" or model.sequence_method == "single":
        idx, dists = faiss_search(db_feats[torch.as_tensor(db_sel, device=device)],
                                  q_feats[torch.as_tensor(q_sel, device=device)], TOP_K)
    else:
        idx, dists = rank(db_feats, q_feats, db_starts[db_sel], q_starts[q_sel], seq_len,
                          query_chunk=opt.queryChunk, db_chunk=opt.dbChunk, quiet=quiet)
    preds = db_sel[idx]
    t2 = time.perf_counter()

    db_pos, q_pos = split.db_positions[db_sel], split.q_positions[q_sel]
    recalls, n_pos = recall_table(idx, db_pos, q_pos, split.pos_dist_thr)
    radius_recalls = np.array([list(recall_table(idx, db_pos, q_pos, r)[0].values()) for r in RADII])
    t3 = time.perf_counter()
    return EvalResult(recalls=recalls, radius_recalls=radius_recalls, preds=preds, dists=dists,
                      db_frames=db_sel, q_frames=q_sel, queries_with_positives=n_pos,
                      timings={"features_s": t1 - t0, "matching_s": t2 - t1, "metrics_s": t3 - t2},
                      db_feats=None if model.describes_sequences else db_feats,
                      q_feats=None if model.describes_sequences else q_feats)


def write_figures(result: EvalResult, split: Split, seq_len: int, out_dir: Path, label: str, prefix: str = "",
                  writer=None, step: int = 0) -> dict:
    """PNG figures of an evaluation into ``out_dir`` (and TensorBoard through ``writer``);
    returns the precision-recall summary of the top-1 matches."""
    import plots

    figs, pr = plots.evaluation_figures(result, split, label, db_feats=result.db_feats, q_feats=result.q_feats,
                                        seq_len=seq_len)
    for name, fig in figs.items():
        if writer is not None:
            writer.figure(f"{prefix or 'Test'}/{name}", fig, step)
        plots.save_figure(fig, Path(out_dir) / f"{prefix.lower() + '_' if prefix else ''}{name}.png")
    return pr


def top1_precision_recall(result: EvalResult, split: Split) -> dict:
    """Precision-recall of the top-1 matches over their distance threshold (AUC, recall at 100 % precision)."""
    import plots

    correct, has_pos = plots.top1_outcomes(result.preds[:, 0], split.db_positions, split.q_positions[result.q_frames],
                                           split.pos_dist_thr)
    return plots.precision_recall(result.dists[:, 0], correct, has_pos)


def format_recalls(result: EvalResult, title: str = "") -> str:
    """The recall table as text: Recall@N, then recall at each localisation radius."""
    head = "".join(f"{'R@' + str(n):>8}" for n in N_VALUES)
    lines = [title] if title else []
    lines.append(f"{'':>12}{head}")
    lines.append(f"{'posDistThr':>12}" + "".join(f"{result.recalls[n]:>8.4f}" for n in N_VALUES))
    for r, row in zip(RADII, result.radius_recalls):
        lines.append(f"{'radius ' + str(r):>12}" + "".join(f"{v:>8.4f}" for v in row))
    lines.append(f"({len(result.q_frames)} queries, {result.queries_with_positives} with a positive; "
                 f"{len(result.db_frames)} database frames)")
    return "\n".join(lines)


def save_results(results_dir: Path, result: EvalResult, extra: dict | None = None,
                 embeddings: dict | None = None) -> Path:
    """Write ``results.npz`` (reference keys: recalls, rAtL, preds, n_values; dbEmb/qEmb when computed)."""
    from utils import atomic_write

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
    emb = TSNE(n_components=2, init="pca", random_state=seed, perplexity=min(30, max(len(both) - 1, 1) / 3)).fit_transform(both)
    return {"dbEmb": emb[:len(db)], "qEmb": emb[len(db):]}
