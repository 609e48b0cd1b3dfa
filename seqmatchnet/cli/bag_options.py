"""The options of a recording as input (``--bag``/``--db_bag``/``--q_bag`` with ``--imageTopic``,
``--gpsTopic``, ``--odomTopic``), shared by ``--mode extract`` and ``--mode prepare``, and
prepare's reading of its bags into positions CSVs and frame lists (``data/bags.py``)."""
from __future__ import annotations

import argparse
from pathlib import Path

from seqmatchnet.common.errors import UserError


def add_bag_options(p: argparse.ArgumentParser, flag: str = "--bag") -> None:
    """``--bag`` (for prepare ``--db_bag``/``--q_bag``), ``--imageTopic``, ``--gpsTopic`` and
    ``--odomTopic`` (docs/own-data.md, "From a recorded bag")."""
    if flag == "--bag":
        p.add_argument("--bag", default=None, metavar="BAG",
                       help="instead of --images: a ROS 1 .bag, a ROS 2 bag folder (sqlite3 or "
                            "MCAP) or an .mcap file; with --gpsTopic/--odomTopic also writes "
                            "OUT.positions.csv (one row per frame, for --mode prepare)")
    add_topic_options(p)


def add_topic_options(p) -> None:
    """``--imageTopic``, ``--gpsTopic`` and ``--odomTopic`` (also ``--mode localize --bag``)."""
    p.add_argument("--imageTopic", default=None, metavar="TOPIC",
                   help="the bag's camera topic (sensor_msgs/Image or CompressedImage)")
    p.add_argument("--gpsTopic", default=None, metavar="TOPIC",
                   help="the bag's GPS topic (sensor_msgs/NavSatFix), interpolated to each image")
    p.add_argument("--odomTopic", default=None, metavar="TOPIC",
                   help="the bag's odometry topic (nav_msgs/Odometry): x,y and the distance "
                        "along its path, interpolated to each image")


def check_bag_options(opt: argparse.Namespace, positions: str | None,
                      spacing: float | None = None) -> None:
    """``--imageTopic`` with a bag; positions from the bag's GPS or odometry, not a CSV."""
    if opt.imageTopic is None:
        raise UserError("--bag needs --imageTopic TOPIC (the camera topic)")
    if positions is not None:
        raise UserError("with --bag the positions come from --gpsTopic/--odomTopic: leave out "
                        "--positions")
    if spacing is not None and not (opt.gpsTopic or opt.odomTopic):
        raise UserError("--spacing with --bag needs --gpsTopic or --odomTopic (the distance "
                        "travelled)")


def read_bags(opt: argparse.Namespace) -> list:
    """For ``--db_bag``/``--q_bag``: read each bag, write its positions CSV to
    ``STRUCTPATH/custom_<name>_bags/<side>.csv`` and set ``opt.<side>_positions`` and
    ``opt.<side>_frames`` (the frames to extract); the ``BagFrames`` opened, to close."""
    from seqmatchnet.common.files import atomic_write
    from seqmatchnet.common.logs import progress_enabled
    from seqmatchnet.data import bags
    from seqmatchnet.data.bag_frames import BagFrames

    opened = []
    for side in ("db", "q"):
        path = getattr(opt, f"{side}_bag")
        if not path:
            continue
        source = bags.BagSource(Path(path), opt.imageTopic, opt.gpsTopic, opt.odomTopic)
        track = bags.scan_bag(source, progress_enabled())
        lines = bags.positions_lines(track)
        csv = Path(opt.structPath) / f"custom_{opt.name}_bags" / f"{side}.csv"
        atomic_write(csv, lambda f, lines=lines: f.write("".join(f"{x}\n" for x in lines).encode()))
        print(f"{source.label}: the positions of its {len(lines) - 1} frames in {csv}")
        frames = BagFrames(track)
        opened.append(frames)
        setattr(opt, f"{side}_positions", str(csv))
        setattr(opt, f"{side}_frames", frames.refs)
    return opened
