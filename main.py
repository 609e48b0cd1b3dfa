"""SeqMatchNet command line: ``python main.py --mode train|test ...`` (see README)."""
from __future__ import annotations

import argparse
import logging
import os
import sys
import time
import traceback
from pathlib import Path

# Idle OpenMP threads sleep instead of spinning: on a busy machine spinning threads made small
# training steps up to 50x slower. Must be set before torch loads; an explicit setting wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np

log = logging.getLogger("seqmatchnet")


def load_for_test(opt: argparse.Namespace):
    """Options (restored from a run with --resume), the split to evaluate, and the model on its device."""
    from get_datasets import get_split, prepare_dataset
    from get_models import get_model, load_state, open_run, parallelize
    from utils import get_device

    device = get_device(opt.nocuda, opt.device)
    ckpt = None
    if opt.resume:
        opt, _, ckpt_path, ckpt = open_run(opt)
    prepare_dataset(opt)
    split = get_split(opt, opt.split)
    model = get_model(opt, split.dim)
    if ckpt is not None:
        load_state(model, ckpt["state_dict"], str(ckpt_path))
        log.info("loaded %s (epoch %s)", ckpt_path, ckpt.get("epoch"))
    return opt, split, parallelize(model.to(device), opt.nGPU, device), device


def evaluate_options(opt: argparse.Namespace):
    """Load what ``opt`` names (split, model, ``--predictionsFile``) and evaluate:
    ``(opt, split, model, device, EvalResult)``."""
    from test import evaluate, load_predictions

    opt, split, model, device = load_for_test(opt)
    predictions = None
    if opt.predictionsFile:
        predictions = load_predictions(Path(opt.predictionsFile), split.num_q, split.num_db)
    return opt, split, model, device, evaluate(opt, split, model, device, predictions)


def run_test(opt: argparse.Namespace) -> dict:
    """``--mode test``: evaluate a split (optionally a trained run) and report recalls."""
    from test import format_recalls, save_results, tsne_embeddings
    from utils import ensure_output_dir, write_json_atomic

    if opt.resultsPath:             # fail before the evaluation, not after it
        ensure_output_dir(Path(opt.resultsPath), "--resultsPath")
    if opt.extractOnly:
        return extract_only(*load_for_test(opt))
    opt, split, model, device, result = evaluate_options(opt)
    print(format_recalls(result, f"{opt.dataset} {opt.split} (seqL {opt.seqL}"
                                 f"{', learned projection' if opt.pooling else ', raw descriptors'})"))
    summary = None
    if opt.resultsPath:
        import report
        from test import N_VALUES, RADII, top1_precision_recall, write_figures

        results_dir = Path(opt.resultsPath)
        embeddings = None
        if opt.numSamples2Project != -1:
            if result.db_feats is None:
                log.warning("--numSamples2Project embeds frame descriptors; --method %s has none", opt.method)
            else:
                embeddings = tsne_embeddings(result.db_feats, result.q_feats, opt.numSamples2Project, opt.seed)
        path = save_results(results_dir, result, embeddings=embeddings)
        if opt.figures == "none":
            pr = top1_precision_recall(result, split)
        else:
            pr = write_figures(result, split, opt.seqL, results_dir, f"{opt.dataset} {opt.split} seqL {opt.seqL}")
        radius = {r: dict(zip(N_VALUES, row)) for r, row in zip(RADII, result.radius_recalls.tolist())}
        summary = report.build_summary("test", vars(opt), result.recalls, radius, pr, result.timings, split.files,
                                       extra={"queries": int(len(result.q_frames)),
                                              "queries_with_positives": result.queries_with_positives})
        write_json_atomic(summary, results_dir / "summary.json")
        log.info("results, figures and summary.json written to %s", path.parent)
    return summary


def extract_only(opt, split, model, device) -> dict:
    """``--extractOnly``: save sequence descriptors ``[N, L, D]`` and ground truth instead of evaluating."""
    import torch
    from sklearn.neighbors import NearestNeighbors

    from datasets import sequence_windows
    from test import extract_features
    from utils import UserError, atomic_write

    if not opt.resultsPath:
        raise UserError("--extractOnly needs --resultsPath to write the descriptors to")
    out = {}
    for side, desc, bounds in (("db", split.db_desc, split.db_bounds), ("q", split.q_desc, split.q_bounds)):
        feats = extract_features(model, desc, device, opt.cacheBatchSize, side).cpu()
        starts, _ = sequence_windows(bounds, opt.seqL)
        out[f"{side}Desc"] = feats[torch.as_tensor(starts)[:, None] + torch.arange(opt.seqL)].numpy()
    gt = NearestNeighbors().fit(split.db_positions).radius_neighbors(
        split.q_positions, radius=split.pos_dist_thr, return_distance=False)
    out["gt"] = np.array([np.sort(g) for g in gt] + [None], dtype=object)[:-1]
    path = Path(opt.resultsPath) / "descriptors.npz"
    atomic_write(path, lambda f: np.savez(f, **out))
    print(f"sequence descriptors written to {path} (db {out['dbDesc'].shape}, q {out['qDesc'].shape})")
    return {"mode": "extract", "path": str(path)}


def one_line(exc: BaseException) -> str:
    """An error message on one line (messages quoted from libraries may hold line breaks)."""
    return " ".join(str(exc).split()) or type(exc).__name__


def main(argv: list[str] | None = None) -> int:
    from options import parse_options
    from utils import UserError, setup_logging

    argv = sys.argv[1:] if argv is None else list(argv)
    mode = argparse.ArgumentParser(add_help=False)
    mode.add_argument("--mode", default="train")
    known, rest = mode.parse_known_args(argv)
    if known.mode == "demo":            # the synthetic walk-through: its own few options
        from demo import run_demo
        return run_demo(rest)
    if known.mode == "prepare":         # turn descriptors + positions CSVs into a dataset
        from prepare import run_prepare
        return run_prepare(rest)
    if known.mode == "compare":         # summaries of several runs side by side
        from report import main_compare
        return main_compare(rest)
    started = time.time()
    try:
        opt = parse_options(argv)
    except UserError as exc:
        print(f"error: {one_line(exc)}", file=sys.stderr)
        return 2
    setup_logging(quiet=opt.quiet, debug=opt.debug)
    log.debug("argv: %s", sys.argv)
    try:
        if opt.mode == "train":
            from train import train
            train(opt, argv)
        else:
            run_test(opt)
    except UserError as exc:
        log.debug("traceback:\n%s", traceback.format_exc())
        print(f"error: {one_line(exc)}", file=sys.stderr)
        return 1
    except OSError as exc:          # the file system refused something the checks above did not foresee
        log.debug("traceback:\n%s", traceback.format_exc())
        print(f"error: {one_line(exc)}: check that the paths given exist and are writable and that the disk has "
              "space (--debug shows where it happened)", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    log.debug("finished in %.1f s", time.time() - started)
    return 0


if __name__ == "__main__":
    sys.exit(main())
