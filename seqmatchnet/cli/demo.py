"""``make demo`` (``python main.py --mode demo``): why SeqMatchNet exists, in a few minutes on a
CPU, with no download.

On the embedded synthetic benchmark (``--dataset synthetic``) it evaluates the test split three ways
and prints one table:

1. single-frame retrieval on the raw descriptors (``--seqL 1 --matcher None``),
2. sequence matching on the raw descriptors (``--seqL 5``),
3. sequence matching after SeqMatchNet training (``--seqL 5 --pooling``).

Every step is the real pipeline (the same code as ``python main.py``); the commands it runs are
printed so they can be repeated one by one.
"""
from __future__ import annotations

import argparse
import sys
import time

import torch

from seqmatchnet.cli.entry import OneLineParser, run_own_mode
from seqmatchnet.cli.options import parse_options
from seqmatchnet.cli.test import evaluate_options
from seqmatchnet.cli.train import train
from seqmatchnet.common.logs import setup_logging
from seqmatchnet.data.specs import get_split


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = OneLineParser(mode="demo",
                      description="make demo: why SeqMatchNet exists, in a few minutes on a CPU, "
                                  "with no download: single frames, sequence matching and a "
                                  "trained SeqMatchNet on the embedded synthetic benchmark, side "
                                  "by side.")
    p.add_argument("--seqL", type=int, default=5, help="sequence length")
    p.add_argument("--nEpochs", type=int, default=8, help="training epochs")
    p.add_argument("--init", default="identity", choices=["identity", "random"],
                   help="initial projection (the reference uses random; see README)")
    p.add_argument("--dataPath", default="./data",
                   help="folder the synthetic descriptors are written to")
    p.add_argument("--structPath", default="./structFiles",
                   help="folder the synthetic struct files are written to")
    p.add_argument("--runsPath", default="./data/runs",
                   help="folder of run folders (the demo's training run)")
    p.add_argument("--nocuda", action="store_true",
                   help="stay on the CPU even when CUDA is available")
    return p.parse_args(argv)


def evaluate_row(label: str, args: list[str]) -> tuple[str, dict, float]:
    print(f"  python main.py {' '.join(args)}")
    _, result = evaluate_options(parse_options(args))
    per_query = result.timings["matching_s"] / max(len(result.q_frames), 1)
    return label, result.recalls, per_query


def main(argv: list[str] | None = None) -> int:
    """``--mode demo`` entry: 0 when the table shows the expected ordering, 1 otherwise or on an
    error."""
    return run_own_mode(parse_args, list(argv or []), demo)


def demo(a: argparse.Namespace) -> int:
    setup_logging(quiet=True)
    nocuda = a.nocuda or not torch.cuda.is_available()
    common = ["--dataset", "synthetic", "--dataPath", a.dataPath, "--structPath", a.structPath,
              "--runsPath", a.runsPath, "--quiet", "--threads",
              "0"] + (["--nocuda"] if nocuda else [])
    test = ["--mode", "test", "--split", "test"] + common
    started = time.time()
    print("SeqMatchNet demo on the synthetic benchmark (test split)\n")
    print("1/4 single-frame retrieval, raw descriptors:")
    rows = [evaluate_row("single frame (raw)", test + ["--seqL", "1", "--matcher", "None"])]
    print(f"2/4 sequence matching, raw descriptors (L={a.seqL}):")
    rows.append(evaluate_row("sequence matching (raw)", test + ["--seqL", str(a.seqL)]))

    dim = get_split(parse_options(test + ["--seqL", "1"]), "test").dim
    train_args = (["--mode", "train", "--seqL", str(a.seqL), "--pooling", "--outDims", str(dim),
                   "--nEpochs", str(a.nEpochs), "--init", a.init, "--expName", "demo"] + common)
    print(f"3/4 training SeqMatchNet ({a.nEpochs} epochs):\n  python main.py "
          f"{' '.join(train_args)}")
    t0 = time.time()
    run_dir = train(parse_options(train_args))
    print(f"  trained in {time.time() - t0:.0f} s")
    print("4/4 sequence matching with the learned projection (best validation checkpoint):")
    rows.append(evaluate_row("SeqMatchNet (trained)",
                             test + ["--seqL", str(a.seqL), "--pooling", "--resume", str(run_dir),
                                     "--ckpt", "best"]))

    print(f"\n{'method':<26}{'R@1':>8}{'R@5':>8}{'R@10':>8}{'ms/query':>10}")
    for label, recalls, per_query in rows:
        print(f"{label:<26}{recalls[1]:>8.3f}{recalls[5]:>8.3f}{recalls[10]:>8.3f}"
              f"{per_query * 1e3:>10.3f}")
    print(f"\n(total {time.time() - started:.0f} s on {'CUDA' if not nocuda else 'the CPU'})")
    print(f"the training run is in {run_dir}: checkpoints/, train.log, and its figures "
          "training_curves.png and val_*.png (the last validation); python main.py --mode compare "
          f"{run_dir} shows its summary")
    r1 = [r[1][1] for r in rows]
    if not r1[2] > r1[1] > r1[0]:
        print("unexpected: the ordering trained > raw sequence matching > single frame did not "
              "hold", file=sys.stderr)
        return 1
    return 0
