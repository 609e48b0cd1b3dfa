"""``--mode test``: load a split and a model (optionally a trained run), evaluate it, print the
recall table and write results, figures and ``summary.json``; or, with ``--extractOnly``, save the
sequence descriptors instead (docs/training-and-testing.md).

The evaluation itself lives in ``evaluate.py`` and the search in ``search.py``; this file turns
the options into their configs and writes what the user asked for.
"""
from __future__ import annotations

import argparse
import logging
from pathlib import Path

import numpy as np
import torch

from seqmatchnet.cli.shared import run_with_options
from seqmatchnet.common import distributed
from seqmatchnet.common.errors import UserError
from seqmatchnet.common.files import atomic_write, ensure_output_dir, write_json_atomic
from seqmatchnet.data.windows import sequence_windows
from seqmatchnet.evaluation import figures
from seqmatchnet.evaluation import summary as summary_mod
from seqmatchnet.evaluation.evaluate import (
    EvalConfig,
    EvalResult,
    evaluate,
    format_recalls,
    load_predictions,
    select_frames,
    top1_precision_recall,
)
from seqmatchnet.evaluation.outputs import (
    save_results,
    source_rows,
    tsne_embeddings,
    write_figures,
    write_top1_rows,
)
from seqmatchnet.evaluation.recall import N_VALUES, RADII
from seqmatchnet.models.sequence import parallelize, project_frames
from seqmatchnet.runs.loading import Loaded, load_run

log = logging.getLogger(__name__)


def load_for_test(opt: argparse.Namespace) -> Loaded:
    """Restore a run's options (``--resume``), load the split (descriptors read from their files as
    needed) and the model with its checkpoint, wrapped for ``--nGPU``."""
    loaded = load_run(opt, lazy=True)
    parallelize(loaded.model, loaded.opt.nGPU, loaded.device)
    return loaded


def evaluate_options(opt: argparse.Namespace) -> tuple[Loaded, EvalResult]:
    """Load what ``opt`` names (split, model, ``--predictionsFile``) and evaluate it."""
    loaded = load_for_test(opt)
    opt = loaded.opt
    predictions = load_predictions(Path(opt.predictionsFile)) if opt.predictionsFile else None
    return loaded, evaluate(EvalConfig.from_options(opt), loaded.split, loaded.model, loaded.device,
                            predictions, f"--predictionsFile {opt.predictionsFile}")


def run_test(opt: argparse.Namespace) -> dict | None:
    """``--mode test``: evaluate a split (optionally a trained run), print the recalls and, with
    ``--resultsPath``, write results, figures and ``summary.json``."""
    if opt.resultsPath:             # fail before the evaluation, not after it
        ensure_output_dir(Path(opt.resultsPath), "--resultsPath")
    if opt.extractOnly:
        return save_sequence_descriptors(load_for_test(opt))
    loaded, result = evaluate_options(opt)
    opt, split = loaded.opt, loaded.split
    print(format_recalls(result, f"{opt.dataset} {opt.split}, seqL {opt.seqL}: {loaded.label}",
                         split.position_unit))
    if not opt.resultsPath or not distributed.is_main():  # under torchrun rank 0 writes the results
        return None
    return write_test_outputs(loaded, result, Path(opt.resultsPath))


def write_test_outputs(loaded: Loaded, result: EvalResult, results_dir: Path) -> dict:
    """``results.npz``, the figures (unless ``--figures none``) and ``summary.json``."""
    opt, split = loaded.opt, loaded.split
    embeddings = None
    if opt.numSamples2Project != -1:
        if result.db_feats is None:
            log.warning("--numSamples2Project embeds frame descriptors; --method %s has none",
                        opt.method)
        else:
            embeddings = tsne_embeddings(result.db_feats, result.q_feats, opt.numSamples2Project,
                                         opt.seed)
            draw_embeddings(embeddings, results_dir, loaded.label)
    path = save_results(results_dir, result, extra=source_rows(result, split),
                        embeddings=embeddings)
    top1_rows = write_top1_rows(results_dir, result, split)
    title = f"{opt.dataset} {opt.split} seqL {opt.seqL}, {loaded.label}"
    if opt.figures == "none":
        pr = top1_precision_recall(result, split)
    else:
        pr = write_figures(result, split, opt.seqL, results_dir, title)
    radius = {r: dict(zip(N_VALUES, row)) for r, row in zip(RADII, result.radius_recalls.tolist())}
    summary = summary_mod.build_summary("test", vars(opt), result.recalls, radius, pr,
                                        result.timings, split.files,
                                   extra={"queries": int(len(result.q_frames)),
                                          "queries_with_positives": result.queries_with_positives,
                                          "radius_queries": dict(
                                              zip(RADII, result.radius_counts.tolist())),
                                          "position_unit": split.position_unit,
                                          "method_label": loaded.label, "checkpoint": loaded.info,
                                          "feat_dtype": opt.featDtype, "velocities": opt.velocities,
                                          "trajectoryGrid": opt.trajectoryGrid,
                                          "shortlist": result.shortlist,
                                          **({"top1_rows": top1_rows.name} if top1_rows else {})})
    write_json_atomic(summary, results_dir / "summary.json")
    log.info("results, figures and summary.json written to %s", path.parent)
    return summary


def draw_embeddings(embeddings: dict, results_dir: Path, label: str) -> None:
    fig = figures.embedding_figure(embeddings["dbEmb"], embeddings["qEmb"], detail=label)
    figures.save_figure(fig, results_dir / "tsne.png")


def save_sequence_descriptors(loaded: Loaded) -> dict:
    """``--extractOnly``: save sequence descriptors ``[N, L, D]`` and ground truth instead of
    evaluating, for the frames an evaluation would use (``--seqL_filterData``: only unshifted
    windows; ``dbFrames``, ``qFrames`` their split rows).

    Ground truth is stored as plain arrays (readable with ``allow_pickle=False``): the positives of
    query ``i`` are ``gtIndices[gtOffsets[i]:gtOffsets[i + 1]]`` (rows of ``dbDesc`` within
    posDistThr)."""
    from sklearn.neighbors import NearestNeighbors

    opt, split = loaded.opt, loaded.split
    if not opt.resultsPath:
        raise UserError("--extractOnly needs --resultsPath to write the descriptors to")
    filter_len = EvalConfig.from_options(opt).filter_for(split.name)
    out = {}
    for side, desc, bounds in (("db", split.db_desc, split.db_bounds),
                               ("q", split.q_desc, split.q_bounds)):
        frames = select_frames(bounds, filter_len)
        feats = project_frames(loaded.model, desc, loaded.device, opt.cacheBatchSize, side,
                               opt.quiet).cpu()
        starts = sequence_windows(bounds, opt.seqL)[0][frames]
        windows = torch.as_tensor(starts)[:, None] + torch.arange(opt.seqL)
        out[f"{side}Desc"] = feats[windows].numpy()
        out[f"{side}Frames"] = frames
    gt = NearestNeighbors().fit(split.db_positions[out["dbFrames"]]).radius_neighbors(
        split.q_positions[out["qFrames"]], radius=split.pos_dist_thr, return_distance=False)
    out["gtOffsets"] = np.r_[0, np.cumsum([len(g) for g in gt])].astype(np.int64)
    out["gtIndices"] = np.concatenate([np.sort(g) for g in gt]).astype(np.int64)
    path = Path(opt.resultsPath) / "descriptors.npz"
    atomic_write(path, lambda f: np.savez(f, **out))
    print(f"sequence descriptors written to {path} (db {out['dbDesc'].shape}, q "
          f"{out['qDesc'].shape})")
    return {"mode": "extract", "path": str(path)}


def main(argv: list[str]) -> int:
    """``--mode test`` entry (``argv`` without ``--mode``): the exit code."""
    return run_with_options("test", argv, run_test)
