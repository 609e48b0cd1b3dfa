"""``--mode localize --bag BAG --imageTopic TOPIC``: localise a recorded query traversal.

The bag is read once for its stamps (and GPS/odometry, ``data/bags.py``), then its frames are
decoded one at a time (``data/bag_frames.py``), turned into a descriptor by the image model
(``--model/--weights``, as ``--mode extract``) and stepped into the ``Localizer``: at most one frame
is held. The database is a dataset prepared with ``--mode prepare`` (``--dataset custom:NAME``)
whose descriptors the same model, checkpoint and image size made (refused otherwise). The query
frames are those in the GPS/odometry time span (every frame without those topics), numbered from
0 as in the positions CSV ``--mode extract --bag`` writes. With ``--spacing`` only the frames
that step the matcher are decoded. ``--out_bag`` writes the matches as an MCAP recording
(``online/bag_output.py``).
"""
from __future__ import annotations

import argparse
import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from seqmatchnet.common.errors import UserError
from seqmatchnet.common.logs import progress, progress_enabled
from seqmatchnet.data import bags
from seqmatchnet.data.specs import CUSTOM_PREFIX, custom_config_path


@dataclass(frozen=True)
class QueryBag:
    """A query bag ready to localise: its track (frames, stamps, positions), the image model
    (``ImageModel``, resolved image size) and where the matches go (``out_bag``, or None)."""

    track: bags.BagTrack
    model: object
    size: tuple | None
    config: dict
    out_bag: Path | None
    show_progress: bool


def dataset_config(opt: argparse.Namespace) -> dict:
    """The JSON config of ``--dataset custom:NAME`` (the database of a query bag)."""
    if not str(opt.dataset).startswith(CUSTOM_PREFIX):
        raise UserError(f"--bag localises against a dataset prepared from images: give --dataset "
                        f"custom:NAME (--mode prepare), not --dataset {opt.dataset}")
    name = str(opt.dataset)[len(CUSTOM_PREFIX):]
    path = custom_config_path(Path(opt.structPath), name)
    if not path.is_file():
        raise UserError(f"custom dataset {name!r}: {path} not found: run `python main.py --mode "
                        f"prepare --name {name} ...` first, or check --structPath")
    try:
        return json.loads(path.read_text())
    except ValueError as exc:
        raise UserError(f"custom dataset config {path} is malformed ({exc}): prepare the dataset "
                        "again") from exc


def check_same_image_model(config: dict, identity: tuple, dataset: str) -> None:
    """Refuse (one line) a database whose descriptors another model, checkpoint or image size
    made; say once when the dataset does not record its model."""
    from seqmatchnet.data.own_images import extraction_identity
    from seqmatchnet.images.extraction import read_metadata

    db = Path(config["db_descriptors"])
    known = extraction_identity(read_metadata(db)) if db.is_file() else None
    if known is None:
        print(f"--dataset {dataset}: its database descriptors ({db}) do not record the model that "
              "made them: make sure --model/--weights/--imageSize are the same")
    elif known != identity:
        raise UserError(
            f"--dataset {dataset} was prepared with {known[0]} descriptors (checkpoint "
            f"{str(known[1])[:12]}, image size {known[2]}) but the query frames would be "
            f"{identity[0]} (checkpoint {str(identity[1])[:12]}, image size {identity[2]}): give "
            "the --model, --weights and --imageSize the dataset was prepared with")


def open_query_bag(opt: argparse.Namespace) -> QueryBag:
    """Check the dataset's model against ``--model/--weights/--imageSize``, load the image model and
    read the bag's stamps and positions: a ``QueryBag`` (before the run and the database load)."""
    from seqmatchnet.cli.extract import check_model_options, image_size_option
    from seqmatchnet.images import extraction

    check_model_options(opt)
    if not opt.weights:
        raise UserError("--bag needs the image model of the dataset's descriptors: --model M "
                        "--weights FILE, or --netvladCkpt FILE")
    config = dataset_config(opt)
    if opt.out_bag and not Path(opt.out_bag).resolve().parent.is_dir():
        raise UserError(f"--out_bag {opt.out_bag}: its folder does not exist")
    weights = Path(opt.weights)
    if not weights.is_file():
        raise UserError(f"--weights {weights} not found")
    model, size = extraction.load_for_extraction(opt.model, weights, image_size_option(opt))
    identity = (model.name, extraction.file_digest(weights), list(size) if size else None)
    check_same_image_model(config, identity, opt.dataset)
    show = progress_enabled(opt.quiet)
    source = bags.BagSource(Path(opt.bag), opt.imageTopic, opt.gpsTopic, opt.odomTopic)
    track = bags.scan_bag(source, show)
    return QueryBag(track, model, size, config, Path(opt.out_bag) if opt.out_bag else None, show)


def query_positions(query: QueryBag) -> np.ndarray | None:
    """The query frames' positions in the dataset's metres, or None (no positions, or of another
    kind than the dataset's: then no recall, said once)."""
    from seqmatchnet.data.positions import latlon_to_local

    coords, track = query.config.get("coordinates", {}), query.track
    if coords.get("kind") == "latlon" and track.latlon is not None:
        return latlon_to_local(track.latlon, (coords["origin_lat"], coords["origin_lon"]))
    if coords.get("kind") == "metric" and track.latlon is None and track.xy is not None:
        return track.xy
    if track.has_positions:
        print(f"{track.source.label}: its positions ({'GPS' if track.latlon is not None else 'x,y'}"
              f") are not in the dataset's coordinates ({coords.get('kind')}): no recall")
    return None


def stepping_rows(query: QueryBag, spacing: float | None) -> tuple[np.ndarray | None, np.ndarray]:
    """``(odometry per frame or None, the frames that step the matcher)``: every frame without a
    spacing; with one, the frames ``spacing.spaced_rows`` keeps, the rule ``Localizer`` steps by."""
    from seqmatchnet.data.spacing import spaced_rows, travelled

    n = len(query.track.messages)
    if spacing is None:
        return None, np.arange(n)
    if not query.track.has_positions:
        raise UserError("--spacing with --bag needs --gpsTopic or --odomTopic (the distance "
                        "travelled)")
    label = query.track.source.label
    odometry = travelled(bags.track_positions(query.track, Path(label)), label)
    return odometry, spaced_rows(odometry, None, spacing)


class FrameDescriber:
    """The image model on ``device``: ``describe(ref)`` is one frame's descriptor, preprocessed as
    ``--mode extract`` does."""

    def __init__(self, query: QueryBag, device) -> None:
        import torch

        self.torch, self.query, self.device = torch, query, torch.device(device)
        self.network = query.model.network.to(device=self.device,
                                              memory_format=torch.channels_last).eval()

    def describe(self, ref) -> np.ndarray:
        from seqmatchnet.images.extraction import ImageDataset

        model = self.query.model
        _, image, error = ImageDataset([ref], self.query.size, model.mean, model.std,
                                       model.resize)[0]
        if error is not None:
            raise UserError(f"{self.query.track.source.label}: frame {ref} cannot be decoded "
                            f"({error})")
        torch = self.torch
        with torch.inference_mode():
            x = image[None].to(self.device).contiguous(memory_format=torch.channels_last)
            return self.network(x).float().cpu().numpy()[0]


def localize_query_bag(query: QueryBag, localizer, device) -> tuple[list, np.ndarray, float]:
    """Localise the bag's frames one at a time (decoded, described, stepped): ``(matches,
    latencies_ms, wall seconds)``, as ``localize.replay`` returns them; writes ``--out_bag``."""
    import contextlib

    from seqmatchnet.data.bag_frames import BagFrames
    from seqmatchnet.online.bag_output import MatchBagWriter

    odometry, rows = stepping_rows(query, localizer.spacing)
    frames, describer = BagFrames(query.track, rows), FrameDescriber(query, device)
    n, stamps = len(query.track.messages), query.track.stamps_ns.tolist()
    steps = dict(zip(rows.tolist(), frames.refs))
    matches, latencies, desc = [], np.empty(n), None
    with contextlib.ExitStack() as stack:
        stack.callback(frames.close)
        out = (stack.enter_context(MatchBagWriter(query.out_bag, query.track.source.image_topic))
               if query.out_bag else None)
        bar = stack.enter_context(progress(total=n, desc="localize", unit="frame",
                                           disable=not query.show_progress))
        t0 = time.perf_counter()
        for t in range(n):
            if t in steps:
                desc = describer.describe(steps[t])
            t1 = time.perf_counter()
            match = localizer.step(desc, None if odometry is None else float(odometry[t]))
            latencies[t] = (time.perf_counter() - t1) * 1e3
            if match is not None and not match.held and t not in steps:
                raise RuntimeError(f"frame {t} stepped the matcher but was not decoded")
            matches.append(match)
            if out is not None and match is not None:
                out.write(t, stamps[t], match, latencies[t])
            bar.update(1)
        wall = time.perf_counter() - t0
    return matches, latencies, wall
