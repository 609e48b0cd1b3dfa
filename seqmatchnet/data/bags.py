"""Robot recordings as input: ROS 1 ``.bag`` files, ROS 2 bags (a folder with ``metadata.yaml``,
sqlite3 or MCAP storage) and bare ``.mcap`` files, read with ``rosbags`` (no ROS installation).

``scan_bag`` reads a bag once, streaming: the image topic's timestamps (the header stamp; the bag's
receive time for a message whose header stamp is empty, said once) and encodings, the GPS fixes
(``sensor_msgs/NavSatFix``; messages without a fix are left out and counted) and the odometry
(``nav_msgs/Odometry``: its positions and the distance along its path). GPS and odometry are
interpolated linearly in time to each image's stamp; images outside their time span are dropped
and counted, never extrapolated. The result (``BagTrack``) is one row per kept image, written as a
positions CSV in the own-data format by ``positions_lines``. Decoding the frames themselves is
``data/bag_frames.py``: only the frames a ``--spacing`` keeps are decoded.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from seqmatchnet.common.errors import UserError
from seqmatchnet.common.logs import progress

IMAGE_TYPES = ("sensor_msgs/msg/Image", "sensor_msgs/msg/CompressedImage")
GPS_TYPE = "sensor_msgs/msg/NavSatFix"
ODOM_TYPE = "nav_msgs/msg/Odometry"
# raw encodings: (PNM magic, channels in the message, channel order reversed)
RAW_ENCODINGS = {"rgb8": ("P6", 3, False), "bgr8": ("P6", 3, True), "rgba8": ("P6", 4, False),
                 "bgra8": ("P6", 4, True), "mono8": ("P5", 1, False), "8UC1": ("P5", 1, False),
                 "8UC3": ("P6", 3, True)}
COMPRESSED_FORMATS = ("jpeg", "jpg", "png")
SUPPORTED = (f"raw {', '.join(RAW_ENCODINGS)}; compressed {', '.join(COMPRESSED_FORMATS)}")
BAG_SUFFIXES = (".bag", ".mcap", ".db3")


@dataclass(frozen=True)
class BagSource:
    """One recording and the topics to read from it (GPS and odometry optional)."""

    path: Path
    image_topic: str
    gps_topic: str | None = None
    odom_topic: str | None = None

    @property
    def label(self) -> str:
        return f"--bag {self.path}"


def is_bag(path: Path | str) -> bool:
    """A ROS 1 / ROS 2 / MCAP recording: a ``.bag``, ``.mcap`` or ``.db3`` file, or a folder with a
    ``metadata.yaml``."""
    path = Path(path)
    return path.suffix.lower() in BAG_SUFFIXES or (path / "metadata.yaml").is_file()


@dataclass(frozen=True)
class BagTrack:
    """One row per image kept in the GPS/odometry time span: ``messages`` its index among the
    image topic's messages, ``stamps_ns`` its stamp, ``latlon`` [N, 2] degrees (GPS), ``xy``
    [N, 2] metres and ``odometry`` [N] metres along the path (odometry); ``counts`` says what
    was left out."""

    source: BagSource
    messages: np.ndarray
    stamps_ns: np.ndarray
    latlon: np.ndarray | None = None
    xy: np.ndarray | None = None
    odometry: np.ndarray | None = None
    counts: dict = field(default_factory=dict)

    @property
    def has_positions(self) -> bool:
        return self.latlon is not None or self.xy is not None


def open_reader(path: Path):
    """An open ``rosbags`` ``AnyReader`` for ``path``, or a one-line ``UserError``."""
    from rosbags.highlevel import AnyReader
    from rosbags.typesys import Stores, get_typestore

    path = Path(path)
    if not path.exists():
        raise UserError(f"--bag {path} not found: give a ROS 1 .bag file, a ROS 2 bag folder (with "
                        "metadata.yaml) or an .mcap file")
    try:
        reader = AnyReader([path], default_typestore=get_typestore(Stores.LATEST))
        reader.open()
    # rosbags raises its own errors, sqlite3's, struct's, zstd's...: all mean a bag it cannot read
    except Exception as exc:
        raise UserError(f"--bag {path} cannot be opened as a ROS 1, ROS 2 or MCAP bag "
                        f"({_reason(exc)}): is it damaged or truncated?") from exc
    return reader


def _reason(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {' '.join(str(exc).split())}"[:200]


def holdings(by_topic: dict[str, str]) -> str:
    """What a bag holds: its image, GPS and odometry topics."""
    parts = []
    for what, types in (("image", IMAGE_TYPES), ("GPS", (GPS_TYPE,)), ("odometry", (ODOM_TYPE,))):
        names = sorted(t for t, ty in by_topic.items() if ty in types)
        parts.append(f"{what} topics: {', '.join(names) or 'none'}")
    return "it holds " + "; ".join(parts)


def topic_connections(reader, source: BagSource) -> dict[str, list]:
    """The connections of each given topic (keys ``image``, ``gps``, ``odom``), each checked to be
    in the bag with the right message type."""
    by_topic = {c.topic: c.msgtype for c in reader.connections}
    out = {}
    for key, flag, topic, types in (("image", "--imageTopic", source.image_topic, IMAGE_TYPES),
                                    ("gps", "--gpsTopic", source.gps_topic, (GPS_TYPE,)),
                                    ("odom", "--odomTopic", source.odom_topic, (ODOM_TYPE,))):
        if topic is None:
            continue
        if topic not in by_topic:
            raise UserError(f"{flag} {topic} is not in {source.label}: {holdings(by_topic)}")
        if by_topic[topic] not in types:
            raise UserError(f"{flag} {topic} in {source.label} is {by_topic[topic]}, not "
                            f"{' or '.join(types)}: {holdings(by_topic)}")
        out[key] = [c for c in reader.connections if c.topic == topic]
    return out


def stamp_of(msg, received_ns: int) -> tuple[int, bool]:
    """``(stamp in ns, from the receive time)``: the header stamp, or the bag's receive time where
    the header stamp is empty (zero)."""
    stamp = msg.header.stamp
    ns = int(stamp.sec) * 1_000_000_000 + int(stamp.nanosec)
    return (ns, False) if ns else (int(received_ns), True)


def check_encoding(msg, msgtype: str, where: str) -> None:
    """A one-line ``UserError`` for an image this reader cannot decode, listing the supported
    encodings."""
    if msgtype.endswith("CompressedImage"):
        fmt = msg.format.lower()
        if fmt and not any(f in fmt for f in COMPRESSED_FORMATS):
            raise UserError(f"{where}: compressed image format {msg.format!r} is not supported; "
                            f"supported: {SUPPORTED}")
    elif msg.encoding not in RAW_ENCODINGS:
        raise UserError(f"{where}: image encoding {msg.encoding!r} is not supported; supported: "
                        f"{SUPPORTED}")


@dataclass
class _Scan:
    """What one pass collects (lists of plain numbers; images: stamps only)."""

    images: list = field(default_factory=list)
    gps: list = field(default_factory=list)          # (ns, lat, lon)
    odom: list = field(default_factory=list)         # (ns, x, y, z)
    no_fix: int = 0
    receive_time: dict = field(default_factory=dict)  # topic kind -> messages stamped so


def _collect(scan: _Scan, reader, kind: str, conn, received: int, raw: bytes,
             where: str) -> None:
    msg = reader.deserialize(raw, conn.msgtype)
    ns, by_receipt = stamp_of(msg, received)
    if by_receipt:
        scan.receive_time[kind] = scan.receive_time.get(kind, 0) + 1
    if kind == "image":
        check_encoding(msg, conn.msgtype, f"{where}, message {len(scan.images)}")
        scan.images.append(ns)
    elif kind == "gps":
        if int(msg.status.status) < 0 or not np.isfinite([msg.latitude, msg.longitude]).all():
            scan.no_fix += 1
        else:
            scan.gps.append((ns, float(msg.latitude), float(msg.longitude)))
    else:
        p = msg.pose.pose.position
        scan.odom.append((ns, float(p.x), float(p.y), float(p.z)))


def read_topics(source: BagSource, show_progress: bool = True) -> _Scan:
    """One streaming pass over the bag's image, GPS and odometry topics (stamps and numbers only;
    no image is decoded). A bag damaged part way is one ``UserError`` saying how far it was read."""
    reader = open_reader(source.path)
    scan = _Scan()
    try:
        conns = topic_connections(reader, source)
        kinds = {c.id: k for k, cs in conns.items() for c in cs}
        wanted = [c for cs in conns.values() for c in cs]
        total = sum(c.msgcount for c in wanted)
        count = 0
        with progress(total=total, desc="read bag", unit="msg", disable=not show_progress) as bar:
            messages = reader.messages(connections=wanted)
            while True:
                try:
                    item = next(messages, None)
                # a damaged bag raises whatever its storage layer raises
                except Exception as exc:
                    raise UserError(
                        f"{source.label} is damaged or truncated after {count} of {total} "
                        f"messages ({len(scan.images)} images read, up to t={_last(scan)}) "
                        f"({_reason(exc)}): nothing was written; repair or re-record it") from exc
                if item is None:
                    break
                conn, received, raw = item
                _collect(scan, reader, kinds[conn.id], conn, received, raw,
                         f"{source.label} {conn.topic}")
                count += 1
                bar.update(1)
    finally:
        reader.close()
    return scan


def _last(scan: _Scan) -> str:
    return f"{scan.images[-1] / 1e9:.3f} s" if scan.images else "the start"


def check_increasing(stamps: np.ndarray, what: str) -> None:
    """Stamps strictly increase, else one line naming the first message that does not."""
    bad = np.flatnonzero(np.diff(stamps) <= 0)
    if len(bad):
        i = int(bad[0]) + 1
        verb = "repeats" if stamps[i] == stamps[i - 1] else "is earlier than"
        raise UserError(f"{what}: the stamp of message {i} ({stamps[i] / 1e9:.9f} s) {verb} "
                        f"message {i - 1}'s ({stamps[i - 1] / 1e9:.9f} s): timestamps must "
                        "increase")


def scan_bag(source: BagSource, show_progress: bool = True) -> BagTrack:
    """Read ``source`` (streaming) and interpolate GPS and odometry to each image stamp: a
    ``BagTrack`` of the images in their time span. Says once when receive times stand in for
    empty header stamps, and how many fixes and frames were left out."""
    scan = read_topics(source, show_progress)
    images = np.asarray(scan.images, dtype=np.int64)
    if len(images) == 0:
        raise UserError(f"--imageTopic {source.image_topic} in {source.label} has no messages")
    check_increasing(images, f"--imageTopic {source.image_topic} in {source.label}")
    if source.gps_topic is not None and not scan.gps:
        raise UserError(f"--gpsTopic {source.gps_topic} in {source.label}: none of its "
                        f"{scan.no_fix} message(s) has a valid fix (status -1 or NaN): record "
                        "with a fix, or give --odomTopic instead")
    if source.odom_topic is not None and not scan.odom:
        raise UserError(f"--odomTopic {source.odom_topic} in {source.label} has no messages")
    gps = np.asarray(scan.gps, dtype=np.float64).reshape(-1, 3)
    odom = np.asarray(scan.odom, dtype=np.float64).reshape(-1, 4)
    gps_ns = np.asarray([g[0] for g in scan.gps], dtype=np.int64)
    odom_ns = np.asarray([o[0] for o in scan.odom], dtype=np.int64)
    keep = np.ones(len(images), dtype=bool)
    for stamps, topic in ((gps_ns, source.gps_topic), (odom_ns, source.odom_topic)):
        if topic is not None:
            check_increasing(stamps, f"{topic} in {source.label}")
            keep &= (images >= stamps[0]) & (images <= stamps[-1])
    rows = np.flatnonzero(keep)
    if len(rows) == 0:
        raise UserError(f"{source.label}: none of the {len(images)} images of "
                        f"{source.image_topic} lies in the time span of the GPS/odometry topics")
    base, stamps = int(images[0]), images[rows]
    t = (stamps - base) * 1e-9
    latlon = xy = odometry = None
    if source.gps_topic is not None:
        tg = (gps_ns - base) * 1e-9
        latlon = np.stack([np.interp(t, tg, gps[:, 1]), np.interp(t, tg, gps[:, 2])], axis=1)
    if source.odom_topic is not None:
        to = (odom_ns - base) * 1e-9
        steps = np.linalg.norm(np.diff(odom[:, 1:4], axis=0), axis=1)
        along = np.r_[0.0, np.cumsum(steps)]
        xy = np.stack([np.interp(t, to, odom[:, 1]), np.interp(t, to, odom[:, 2])], axis=1)
        odometry = np.interp(t, to, along)
    counts = {"images": len(images), "outside_span": len(images) - len(rows),
              "no_fix": scan.no_fix, "receive_time": dict(scan.receive_time)}
    say_counts(source, counts)
    return BagTrack(source, rows, stamps, latlon, xy, odometry, counts)


def say_counts(source: BagSource, counts: dict) -> None:
    """One line each: receive times used for empty header stamps, fixes and frames left out."""
    for kind, n in counts["receive_time"].items():
        print(f"{source.label}: {n} {kind} message(s) have an empty header stamp: using the bag's "
              "receive time for them")
    if counts["no_fix"]:
        print(f"{source.label}: left out {counts['no_fix']} GPS message(s) without a fix")
    if counts["outside_span"]:
        print(f"{source.label}: dropped {counts['outside_span']} of {counts['images']} images "
              "outside the GPS/odometry time span (not extrapolated)")


def stamp_text(ns: int) -> str:
    """Nanoseconds as exact decimal seconds."""
    return f"{ns // 1_000_000_000}.{ns % 1_000_000_000:09d}"


def positions_lines(track: BagTrack) -> list[str]:
    """The positions CSV of ``track`` in the own-data format: ``timestamp``, ``lat,lon`` (GPS) or
    ``x,y`` (odometry), and ``odometry`` when there is one; one line per kept image."""
    if not track.has_positions:
        raise UserError(f"{track.source.label}: positions need --gpsTopic or --odomTopic")
    pos = track.latlon if track.latlon is not None else track.xy
    header = ["timestamp", "lat,lon" if track.latlon is not None else "x,y"]
    if track.odometry is not None:
        header.append("odometry")
    lines = [",".join(header)]
    for i, ns in enumerate(track.stamps_ns.tolist()):
        row = [stamp_text(ns), repr(float(pos[i, 0])), repr(float(pos[i, 1]))]
        if track.odometry is not None:
            row.append(repr(float(track.odometry[i])))
        lines.append(",".join(row))
    return lines


def track_positions(track: BagTrack, path: Path):
    """``track`` as a ``Positions`` table (as ``read_positions`` would read the CSV at ``path``)."""
    from seqmatchnet.data.positions import Positions

    pos = track.latlon if track.latlon is not None else track.xy
    return Positions(Path(path), pos, track.latlon is not None, track.stamps_ns * 1e-9, None,
                     np.arange(len(pos)) + 2, track.odometry)
