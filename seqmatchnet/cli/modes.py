"""The one table of ``--mode``s: name, entry, one-line help, whether the mode reads the shared
options (``cli/options.py``) or its own command line, and whether it runs under torchrun.

``main.py`` reads ``--mode`` once (``split_mode``) and calls ``MODES[name].run(rest)``; the options
parser takes its choices and help from here. Every entry has one signature, ``run(argv) -> exit
code``, where ``argv`` is the command line without ``--mode``. Each entry imports its mode when
called, so that a quick mode (``compare``) does not load torch.
"""
from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class Mode:
    name: str
    run: Callable[[list[str]], int]
    help: str
    shared_options: bool = False     # parsed by cli/options.py (else the mode has its own parser)
    distributed: bool = False        # may run under torchrun (docs/torchrun.md)


def _train(argv: list[str]) -> int:
    from seqmatchnet.cli import train
    return train.main(argv)


def _test(argv: list[str]) -> int:
    from seqmatchnet.cli import test
    return test.main(argv)


def _localize(argv: list[str]) -> int:
    from seqmatchnet.cli import localize
    return localize.main(argv)


def _extract(argv: list[str]) -> int:
    from seqmatchnet.cli import extract
    return extract.main(argv)


def _prepare(argv: list[str]) -> int:
    from seqmatchnet.cli import prepare
    return prepare.main(argv)


def _demo(argv: list[str]) -> int:
    from seqmatchnet.cli import demo
    return demo.main(argv)


def _compare(argv: list[str]) -> int:
    from seqmatchnet.cli import compare
    return compare.main(argv)


MODES = {m.name: m for m in (
    Mode("train", _train,
         "learn the projection (--pooling) or SeqNet (--method seqnet) on a dataset's train "
         "split, validating after each epoch; writes a run folder "
         "(docs/training-and-testing.md)", shared_options=True, distributed=True),
    Mode("test", _test,
         "evaluate the raw descriptors or a trained run (--resume) on a split: the recall table, "
         "and results, figures and summary.json with --resultsPath "
         "(docs/training-and-testing.md)", shared_options=True, distributed=True),
    Mode("localize", _localize,
         "online relocalisation, one query frame at a time, from replayed or streamed descriptors "
         "(docs/localize.md)", shared_options=True),
    Mode("extract", _extract, "images to descriptors with NetVLAD, CosPlace, EigenPlaces or MixVPR "
                              "(docs/extract.md)"),
    Mode("prepare", _prepare, "your own data: descriptors or images and positions to a dataset "
                              "(docs/own-data.md)"),
    Mode("demo", _demo, "the synthetic walk-through: train and test on the embedded benchmark"),
    Mode("compare", _compare, "runs side by side from their summary.json files"),
)}
SHARED = tuple(name for name, m in MODES.items() if m.shared_options)
DEFAULT = "train"


def split_mode(argv: list[str]) -> tuple[str, list[str]]:
    """``(mode, the rest of argv)``: the one place ``--mode`` is read (default ``train``)."""
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--mode", default=DEFAULT)
    known, rest = parser.parse_known_args(argv)
    return known.mode, rest
