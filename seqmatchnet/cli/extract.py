"""``--mode extract``: its options and entry; the work is ``images/extraction.py``."""
from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

from seqmatchnet.cli.bag_options import add_bag_options, check_bag_options
from seqmatchnet.cli.entry import OneLineParser, run_own_mode
from seqmatchnet.cli.image_options import add_model_options
from seqmatchnet.common.errors import UserError
from seqmatchnet.common.logs import progress_enabled, setup_logging
from seqmatchnet.common.runtime import get_device
from seqmatchnet.data.spacing import check_spacing
from seqmatchnet.images import registry
from seqmatchnet.images.base import (  # noqa: F401 (re-exported)
    CHECKPOINT_URL,
    IMAGENET_MEAN,
    IMAGENET_STD,
    MODELS,
    ImageModel,
)
from seqmatchnet.images.extraction import (
    MODEL_DEFAULT,
    OUT_SUFFIXES,
    ExtractSettings,
    extract_images,
    parse_image_size,
)

# ---------------------------------------------------------------- the command

def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(
        mode="extract",
        description="Compute global descriptors (NetVLAD, CosPlace, EigenPlaces, MixVPR, BoQ, "
                    "SALAD or MegaLoc, from the authors' checkpoints) of a folder or list of "
                    "images: one row per image, for --mode prepare --db_descriptors/"
                    "--q_descriptors.")
    p.add_argument("--images", default=None, metavar="SRC",
                   help="folder of .jpg/.jpeg/.png/.bmp images (natural order of names) or a text "
                        "file with one image path per line (relative to the file)")
    add_bag_options(p)
    add_model_options(p)
    p.add_argument("--out", required=True, help="output .npy or .h5 file: float32 [images, dims]; "
                                                "OUT.images.txt lists each row's image, "
                                                "OUT.model.json the model")
    p.add_argument("--positions", metavar="CSV", default=None,
                   help="with --spacing: the traversal's positions CSV (one row per image, as "
                        "for --mode prepare; an odometry column drives the spacing)")
    p.add_argument("--spacing", type=float, default=None, metavar="METRES",
                   help="extract only the images --mode prepare --spacing METRES keeps (one "
                        "whenever the traversal has travelled this far)")
    p.add_argument("--seqL", type=int, default=1,
                   help="with --spacing: every sequence must keep at least this many frames (1)")
    p.add_argument("--batchSize", type=int, default=8, help="images per forward pass")
    p.add_argument("--threads", type=int, default=2,
                   help="image-decoding worker processes (0: main process)")
    p.add_argument("--nocuda", action="store_true",
                   help="run on the CPU even when CUDA is available")
    p.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto",
                   help="auto: CUDA when available, else the CPU")
    p.add_argument("--quiet", action="store_true",
                   help="no progress bar or log lines, only the summary")
    return p


def check_model_options(opt: argparse.Namespace) -> None:
    """Resolve ``opt.model`` and ``opt.weights`` from ``--model/--weights/--netvladCkpt``;
    ``UserError`` for a combination that does not name one checkpoint of one model."""
    if opt.netvladCkpt and opt.weights:
        raise UserError("give the checkpoint once: --weights FILE (with --model) or --netvladCkpt "
                        "FILE, not both")
    if opt.netvladCkpt:
        if opt.model not in (None, "netvlad"):
            raise UserError(f"--netvladCkpt is NetVLAD's checkpoint: for --model {opt.model} pass "
                            "--weights FILE")
        opt.model, opt.weights = "netvlad", opt.netvladCkpt
    elif opt.weights and opt.model is None:
        raise UserError(f"--weights needs --model ({'|'.join(MODELS)}): the model the checkpoint "
                        "belongs to")
    if opt.imageSize is not None:
        parse_image_size(opt.imageSize)


def image_size_option(opt: argparse.Namespace) -> tuple[int, int] | None | str:
    """``--imageSize`` as ``(W, H)``, None (original size) or ``MODEL_DEFAULT`` when not given."""
    return MODEL_DEFAULT if opt.imageSize is None else parse_image_size(opt.imageSize)


def parse_args(argv: list[str]) -> argparse.Namespace:
    """Parse and check ``--mode extract`` options (``opt.model``/``opt.weights`` resolved)."""
    opt = build_parser().parse_args(argv)
    check_model_options(opt)
    if not opt.weights:
        raise UserError(f"give the checkpoint: --model {'|'.join(MODELS)} --weights FILE, or "
                        "--netvladCkpt FILE")
    if opt.batchSize < 1:
        raise UserError(f"--batchSize must be at least 1, got {opt.batchSize}")
    if opt.threads < 0:
        raise UserError("--threads must be 0 (decode in the main process) or more, got "
                        f"{opt.threads}")
    check_spacing(opt.spacing, "--spacing")
    if (opt.images is None) == (opt.bag is None):
        raise UserError("give the images: --images SRC or --bag BAG --imageTopic TOPIC (one)")
    if opt.bag is not None:
        check_bag_options(opt, opt.positions, opt.spacing)
    elif (opt.spacing is None) != (opt.positions is None):
        raise UserError("--spacing and --positions go together: the positions (or odometry) "
                        "say which images are kept")
    if Path(opt.out).suffix.lower() not in OUT_SUFFIXES:
        raise UserError(f"--out {opt.out}: the file name must end in {', '.join(OUT_SUFFIXES)}")
    return opt


def main(argv: list[str]) -> int:
    """``--mode extract`` entry: 0 on success, 2 for bad options, 1 for bad data (one ``error:``
    line)."""
    return run_own_mode(parse_args, argv, _extract,
                        interrupted="interrupted: run the same command again to continue",
                        os_error=lambda exc: f"{exc.strerror or exc} "
                                             f"({getattr(exc, 'filename', None) or 'the output'}): "
                                             "check the paths and free disk space")


def _extract(opt: argparse.Namespace) -> None:

    setup_logging(quiet=opt.quiet)
    device = get_device(opt.nocuda, opt.device)
    settings = ExtractSettings(image_size_option(opt), opt.batchSize, opt.threads, device,
                               progress_enabled(opt.quiet))
    if opt.bag is not None:
        result = _extract_bag(opt, settings)
    elif opt.spacing is None:
        result = extract_images(Path(opt.images), Path(opt.weights), Path(opt.out),
                                model=opt.model, settings=settings)
    else:
        result = _extract_spaced(opt, settings)
    resumed = f", continuing after {result.resumed_from} done before" if result.resumed_from else ""
    print(f"wrote {result.rows} x {result.dim} {registry.TITLES[opt.model]} descriptors to "
          f"{result.path} (images listed in {result.images_file}){resumed}; "
          f"{result.images_per_second:.2f} images/s on {device}")


def _extract_spaced(opt: argparse.Namespace, settings: ExtractSettings):
    """Extract only the images that ``--spacing`` keeps (the rows ``--mode prepare --spacing``
    keeps from the same positions CSV)."""
    from seqmatchnet.data.positions import read_positions
    from seqmatchnet.data.spacing import kept_rows
    from seqmatchnet.images import extraction

    paths = extraction.list_images(Path(opt.images))
    table = read_positions(Path(opt.positions), "traversal")
    if len(paths) != len(table.values):
        raise UserError(f"--images {opt.images} has {len(paths)} images but {table.path} has "
                        f"{len(table.values)} positions: one image per position row, in the same "
                        "order")
    rows = kept_rows(table, opt.spacing, opt.seqL, f"--positions {table.path}")
    print(f"--spacing {opt.spacing:g}: extracting {len(rows)} of {len(paths)} images")
    loaded, size = extraction.load_for_extraction(opt.model, Path(opt.weights),
                                                  settings.image_size)
    return extraction.extract_descriptors(
        loaded, [paths[r] for r in rows.tolist()], Path(opt.out),
        checkpoint_id=extraction.file_digest(Path(opt.weights)),
        settings=dataclasses.replace(settings, image_size=size), weights=Path(opt.weights))


def _extract_bag(opt: argparse.Namespace, settings: ExtractSettings):
    """Extract the frames of ``--bag`` (only those ``--spacing`` keeps) and, with a GPS or odometry
    topic, write ``OUT.positions.csv`` (every frame in their time span, as ``--mode prepare``
    reads it)."""
    from seqmatchnet.common.files import atomic_write
    from seqmatchnet.data import bags
    from seqmatchnet.data.bag_frames import BagFrames
    from seqmatchnet.data.spacing import kept_rows
    from seqmatchnet.images import extraction

    source = bags.BagSource(Path(opt.bag), opt.imageTopic, opt.gpsTopic, opt.odomTopic)
    track = bags.scan_bag(source, settings.progress)
    csv = Path(opt.out).with_name(Path(opt.out).name + ".positions.csv")
    rows = None
    if opt.spacing is not None:
        rows = kept_rows(bags.track_positions(track, csv), opt.spacing, opt.seqL, source.label)
        print(f"--spacing {opt.spacing:g}: extracting {len(rows)} of {len(track.messages)} "
              "images")
    loaded, size = extraction.load_for_extraction(opt.model, Path(opt.weights),
                                                  settings.image_size)
    if track.has_positions:
        lines = bags.positions_lines(track)
        atomic_write(csv, lambda f: f.write("".join(f"{x}\n" for x in lines).encode()))
        print(f"wrote the positions of {len(lines) - 1} frames to {csv}")
    frames = BagFrames(track, rows)
    try:
        return extraction.extract_descriptors(
            loaded, frames.refs, Path(opt.out),
            checkpoint_id=extraction.file_digest(Path(opt.weights)),
            settings=dataclasses.replace(settings, image_size=size, threads=0),
            weights=Path(opt.weights))
    finally:
        frames.close()
