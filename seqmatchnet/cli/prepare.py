"""``--mode prepare``: its options, entry and printed summary; the work is ``data/own.py``."""
from __future__ import annotations

import argparse
import math
import shlex
import sys
from pathlib import Path

from seqmatchnet.cli.bag_options import add_bag_options, check_bag_options, read_bags
from seqmatchnet.cli.entry import OneLineParser, run_own_mode
from seqmatchnet.cli.image_options import add_model_options
from seqmatchnet.common.errors import UserError
from seqmatchnet.data.own import NAME_PATTERN, SPLITS, check_image_options, prepare
from seqmatchnet.data.spacing import check_spacing


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(
        mode="prepare",
        description="Prepare your own descriptors + positions as a dataset for --dataset "
                    "custom:<name> (README, 'Using your own data').")
    p.add_argument("--name", required=True, help="dataset name: letters, digits, '_', '-', '.'")
    g = p.add_argument_group("input (one descriptor file, or images, and one positions CSV per "
                             "traversal, rows in capture order)")
    g.add_argument("--db_descriptors", help="database traversal descriptors (.npy, or .h5/.hdf5)")
    g.add_argument("--db_images", metavar="SRC",
                   help="instead of --db_descriptors: folder or list file of the database images "
                        "(needs --model and --weights, or --netvladCkpt)")
    g.add_argument("--db_bag", metavar="BAG",
                   help="instead of --db_descriptors/--db_images and --db_positions: a recording "
                        "(ROS 1 .bag, ROS 2 bag folder, .mcap) read with --imageTopic and "
                        "--gpsTopic/--odomTopic")
    g.add_argument("--q_bag", metavar="BAG", help="the query traversal's recording (as --db_bag)")
    add_bag_options(g, flag="prepare")
    g.add_argument("--db_positions",
                   help="database positions CSV: x,y | easting,northing | lat,lon [,timestamp] "
                        "[,sequence_id] [,odometry]")
    g.add_argument("--q_descriptors", help="query traversal descriptors (.npy, or .h5/.hdf5)")
    g.add_argument("--q_images", metavar="SRC",
                   help="instead of --q_descriptors: folder or list file of the query images")
    add_model_options(g)
    g.add_argument("--q_positions",
                   help="query positions CSV (same columns as --db_positions)")
    g = p.add_argument_group("frames by distance travelled (video, GPS or odometry; "
                             "docs/own-data.md)")
    g.add_argument("--spacing", type=float, default=None, metavar="METRES",
                   help="keep a frame whenever the traversal has travelled at least this far "
                        "since the last kept frame (along the positions, or the odometry column); "
                        "both traversals")
    g.add_argument("--db_spacing", type=float, default=None, metavar="METRES",
                   help="the database traversal's spacing (overrides --spacing)")
    g.add_argument("--q_spacing", type=float, default=None, metavar="METRES",
                   help="the query traversal's spacing (overrides --spacing)")
    g = p.add_argument_group("splits (fractions of the database route, or explicit row ranges)")
    g.add_argument("--splits", default=None,
                   help="train,val,test fractions of the database traversal in capture order "
                        "(default 0.6,0.15,0.25); each query goes to the split of its nearest "
                        "database frame, queries within the threshold of another split's database "
                        "frames are dropped")
    for split in SPLITS:
        g.add_argument(f"--{split}_rows", default=None, metavar="DB_A:DB_B,Q_A:Q_B",
                       help=f"{split} rows [A, B) of the database and of the query traversal")
    g = p.add_argument_group("thresholds (metres) and checks")
    g.add_argument("--posDistThr", type=float, default=20.0,
                   help="train split: a database frame within this distance of a query is not a "
                        "negative (20)")
    g.add_argument("--evalPosDistThr", type=float, default=10.0,
                   help="val and test splits: a database frame within this distance is a correct "
                        "match (10)")
    g.add_argument("--nonTrivPosDistThr", type=float, default=5.0,
                   help="train split: training positives lie within this distance (5; stored "
                        "squared)")
    g.add_argument("--seqL", type=int, default=5,
                   help="longest sequence length you will use: every sequence must have at least "
                        "this many frames (5)")
    g.add_argument("--structPath", default="./structFiles",
                   help="folder to write the dataset files to")
    g.add_argument("--force", action="store_true",
                   help="overwrite the files of an existing dataset of this name")
    return p


def parse_args(argv: list[str]) -> argparse.Namespace:
    opt = build_parser().parse_args(argv)
    if not NAME_PATTERN.fullmatch(opt.name):
        raise UserError(f"--name {opt.name!r}: use letters, digits, '_', '-' and '.' only (it "
                        "becomes a file name)")
    for side in ("db", "q"):
        given = [f"--{side}_{kind}" for kind in ("descriptors", "images", "bag")
                 if getattr(opt, f"{side}_{kind}")]
        if len(given) != 1:
            need = "" if given else " (the traversal needs descriptors or images)"
            raise UserError(f"give exactly one of --{side}_descriptors, --{side}_images and "
                            f"--{side}_bag{need}")
        if getattr(opt, f"{side}_bag"):
            check_bag_options(opt, getattr(opt, f"{side}_positions"))
            if not (opt.gpsTopic or opt.odomTopic):
                raise UserError(f"--{side}_bag needs --gpsTopic or --odomTopic: the positions of "
                                "its frames")
            setattr(opt, f"{side}_images", getattr(opt, f"{side}_bag"))
        elif not getattr(opt, f"{side}_positions"):
            raise UserError(f"--{side}_positions is required (or --{side}_bag)")
    if (opt.imageTopic or opt.gpsTopic or opt.odomTopic) and not (opt.db_bag or opt.q_bag):
        raise UserError("--imageTopic/--gpsTopic/--odomTopic go with --db_bag/--q_bag")
    check_image_options(opt)
    explicit = [getattr(opt, f"{s}_rows") for s in SPLITS]
    if any(explicit):
        if opt.splits is not None:
            raise UserError("give either --splits or --train_rows/--val_rows/--test_rows, not both")
        missing = [f"--{s}_rows" for s, r in zip(SPLITS, explicit) if not r]
        if missing:
            raise UserError(f"explicit row ranges need all three splits: add {', '.join(missing)}")
    for flag in ("posDistThr", "evalPosDistThr", "nonTrivPosDistThr"):
        value = getattr(opt, flag)
        if not (math.isfinite(value) and value > 0):
            raise UserError(f"--{flag} must be a positive number of metres, got {value}")
    if opt.nonTrivPosDistThr > opt.posDistThr:
        raise UserError(f"--nonTrivPosDistThr {opt.nonTrivPosDistThr} must not exceed --posDistThr "
                        f"{opt.posDistThr}: a training positive would also count as a negative")
    for flag in ("spacing", "db_spacing", "q_spacing"):
        check_spacing(getattr(opt, flag), f"--{flag}")
    if opt.seqL < 1:
        raise UserError(f"--seqL must be at least 1, got {opt.seqL}")
    return opt


def summary_lines(result: dict, opt: argparse.Namespace) -> list[str]:
    struct_dir = Path(opt.structPath)
    lines = [f"prepared dataset custom:{opt.name} in {struct_dir} ({result['splits']})"]
    for s in SPLITS:
        f = result["frames"][s]
        thr = opt.posDistThr if s == "train" else opt.evalPosDistThr
        lines.append(f"  {s:5s}: {f['database']:6d} database / {f['query']:6d} query frames "
                     f"({f['sequences'][0]} / {f['sequences'][1]} sequences), posDistThr {thr:g} "
                     f"m, {result['queries_with_positive'][s]} queries with a database frame "
                     "within it")
    if result.get("spacing_m"):
        lines.append("  spacing: " + "; ".join(
            f"{side} {result['frames_kept'][side]} of {result['rows_in_files'][side]} rows kept "
            + (f"at {m:g} m ({result['spacing_distance'][side]})" if m else "(all)")
            for side, m in result["spacing_m"].items())
            + f"; each kept frame's row in {', '.join(result['frames_files'].values())}")
    lines.append(f"  nonTrivPosDistSqThr {result['nonTrivPosDistSqThr']:g} (training positives "
                 f"within {opt.nonTrivPosDistThr:g} m)")
    if result["dropped_queries_near_split_boundaries"]:
        lines.append(f"  dropped {result['dropped_queries_near_split_boundaries']} queries within "
                     f"{max(opt.posDistThr, opt.evalPosDistThr):g} m of another split's database "
                     "frames")
    if result["dropped_frames_in_short_pieces"]:
        lines.append(f"  dropped {result['dropped_frames_in_short_pieces']} frames in sequence "
                     f"pieces shorter than --seqL {opt.seqL} at split boundaries")
    extra = ("" if struct_dir == Path("structFiles")
             else f" --structPath {shlex.quote(str(struct_dir))}")
    main_py = shlex.quote(sys.argv[0]) if Path(sys.argv[0]).name == "main.py" else "main.py"
    lines += ["next (paste as they are; the second finds the run the first made):",
              f"  python {main_py} --mode train --dataset custom:{opt.name}{extra} --seqL "
              f"{opt.seqL} --pooling --expName {opt.name}",
              f"  python {main_py} --mode test --dataset custom:{opt.name}{extra} --seqL "
              f"{opt.seqL} --split test --resume \"$(ls -d data/runs/*_l{opt.seqL}_{opt.name} | "
              "tail -n 1)\""]
    return lines


def warnings_for(result: dict) -> list[str]:
    out = []
    for s in SPLITS:
        n_q = result["frames"][s]["query"]
        if result["queries_with_positive"][s] < 0.5 * n_q:
            out.append(f"warning: only {result['queries_with_positive'][s]} of {n_q} {s} queries "
                       "have a database frame within the threshold: are both traversals of the "
                       "same route, in the same coordinates?")
    return out


def main(argv: list[str]) -> int:
    """``--mode prepare`` entry: 0 on success, 2 for bad options, 1 for bad data (one ``error:``
    line)."""
    return run_own_mode(parse_args, argv, _prepare)


def _prepare(opt: argparse.Namespace) -> None:
    opened = read_bags(opt)
    try:
        result = prepare(opt)
    except OSError as exc:
        raise UserError(f"could not write the dataset to {opt.structPath} ({exc.strerror or exc}): "
                        "choose a writable --structPath") from exc
    finally:
        for frames in opened:
            frames.close()
    print("\n".join(summary_lines(result, opt)))
    for line in warnings_for(result):
        print(line, file=sys.stderr)
