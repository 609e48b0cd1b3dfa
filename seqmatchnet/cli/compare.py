"""``--mode compare RUN [RUN ...]``: the table of ``evaluation/compare.py`` for run folders."""
from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

from seqmatchnet.cli.entry import OneLineParser, run_own_mode
from seqmatchnet.evaluation.compare import compare_runs


def main(argv: Sequence[str]) -> int:
    """``python main.py --mode compare RUN [RUN ...]``: print the comparison table; 1 on a bad
    path."""
    return run_own_mode(_parse_compare, list(argv), lambda opts: print(compare_runs(opts.runs)))


def _parse_compare(args: list[str]) -> argparse.Namespace:
    parser = OneLineParser(mode="compare",
                           description="Compare runs side by side from their summary.json files.")
    parser.add_argument("runs", nargs="+", type=Path,
                        help="run folders, results folders (searched for the newest summary.json) "
                             "or summary files")
    return parser.parse_args(args)
