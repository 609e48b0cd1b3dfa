"""The one table of ``--mode``s: name, one-line help, whether the mode reads the shared options
(``cli/options.py``) or its own command line, and whether it runs under torchrun.

The options parser takes its choices and help from here; ``main.py`` reads ``--mode`` once
(``split_mode``) and calls the mode's entry, ``seqmatchnet.cli.<mode>.main(argv) -> exit code``
with the command line without ``--mode``. This module imports no mode, so every module of the
package may import it.
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass


@dataclass(frozen=True)
class Mode:
    name: str
    help: str
    shared_options: bool = False     # parsed by cli/options.py (else the mode has its own parser)
    distributed: bool = False        # may run under torchrun (docs/torchrun.md)


MODES = {m.name: m for m in (
    Mode("train",
         "learn the projection (--pooling) or SeqNet (--method seqnet) on a dataset's train "
         "split, validating after each epoch; writes a run folder "
         "(docs/training-and-testing.md)", shared_options=True, distributed=True),
    Mode("test",
         "evaluate the raw descriptors or a trained run (--resume) on a split: the recall table, "
         "and results, figures and summary.json with --resultsPath "
         "(docs/training-and-testing.md)", shared_options=True, distributed=True),
    Mode("localize",
         "online relocalisation, one query frame at a time, from replayed or streamed descriptors "
         "or a recorded bag (docs/localize.md)", shared_options=True),
    Mode("extract", "images or a recorded bag to descriptors with NetVLAD, CosPlace, "
                    "EigenPlaces, MixVPR, BoQ, SALAD or MegaLoc (docs/extract.md)"),
    Mode("prepare", "your own data: descriptors, images or bags and positions to a dataset "
                    "(docs/own-data.md)"),
    Mode("demo", "the synthetic walk-through: train and test on the embedded benchmark"),
    Mode("compare", "runs side by side from their summary.json files"),
)}
SHARED = tuple(name for name, m in MODES.items() if m.shared_options)
DEFAULT = "train"


def split_mode(argv: list[str]) -> tuple[str, list[str]]:
    """``(mode, the rest of argv)``: the one place ``--mode`` is read (default ``train``)."""
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--mode", default=DEFAULT)
    known, rest = parser.parse_known_args(argv)
    return known.mode, rest
