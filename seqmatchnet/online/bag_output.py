"""``--mode localize --out_bag FILE.mcap``: the matches as a recording, beside the camera topic.

One message per matched query frame on ``MATCH_TOPIC`` (``/seqmatchnet/match``), of the message
type ``seqmatchnet_msgs/msg/Match`` (``MATCH_MSGDEF``), logged at the query frame's stamp. The
MCAP file carries the definition, so viewers that read ROS 2 MCAP recordings show its fields
(and plot them) without the package installed. It is written with ``rosbags`` (ROS 2 writer,
MCAP storage) into a temporary folder next to ``FILE`` and renamed to ``FILE`` only when every
message is written: an error leaves nothing behind.
"""
from __future__ import annotations

import math
import os
import shutil
from pathlib import Path

from seqmatchnet.common.errors import UserError

MATCH_TOPIC = "/seqmatchnet/match"
MATCH_MSGTYPE = "seqmatchnet_msgs/msg/Match"
MATCH_MSGDEF = """\
# One causal match of a query frame against the database (SeqMatchNet, --mode localize).
std_msgs/Header header  # stamp: the query frame's stamp; frame_id: the camera topic
uint32 query_frame      # the query frame: its row among the bag's frames (the CSV's query_frame)
uint32 db_frame         # the matched database frame (a row of the split's database)
float64[] db_position   # its position in the dataset's metres (empty without positions)
float64 distance        # sequence distance of the match (0..2)
float64 confidence      # best distance / best distance farther than the radius (lower: surer)
float64 velocity        # database frames per query frame of the matched trajectory
float64 latency_ms      # time of this frame's matching step
bool held               # with --spacing: the last match again (moved less than the spacing)
"""


def match_typestore():
    """A ROS 2 typestore with ``MATCH_MSGTYPE`` registered."""
    from rosbags.typesys import Stores, get_types_from_msg, get_typestore

    store = get_typestore(Stores.ROS2_HUMBLE)
    store.register(get_types_from_msg(MATCH_MSGDEF, MATCH_MSGTYPE))
    return store


class MatchBagWriter:
    """``with MatchBagWriter(path, frame_id) as out: out.write(...)``: an MCAP file at ``path``
    once the block ends without an error; nothing at ``path`` otherwise."""

    def __init__(self, path: Path | str, frame_id: str = "") -> None:
        self.path, self.frame_id = Path(path), frame_id
        self.tmp = self.path.with_name(f".{self.path.name}.partial")
        self.count = 0
        self._writer = self._conn = self._store = None

    def __enter__(self) -> MatchBagWriter:
        from rosbags.rosbag2 import StoragePlugin, Writer

        if not self.path.parent.is_dir():
            raise UserError(f"--out_bag {self.path}: folder {self.path.parent} not found")
        shutil.rmtree(self.tmp, ignore_errors=True)     # a leftover of an interrupted run
        self._store = match_typestore()
        self._writer = Writer(self.tmp, version=9, storage_plugin=StoragePlugin.MCAP)
        self._writer.open()
        self._conn = self._writer.add_connection(MATCH_TOPIC, MATCH_MSGTYPE,
                                                 typestore=self._store)
        return self

    def write(self, query_frame: int, stamp_ns: int, match, latency_ms: float) -> None:
        """One message for ``match`` (a ``Match``) of query frame ``query_frame`` at
        ``stamp_ns``."""
        import numpy as np

        types = self._store.types
        stamp = types["builtin_interfaces/msg/Time"](sec=int(stamp_ns) // 1_000_000_000,
                                                     nanosec=int(stamp_ns) % 1_000_000_000)
        position = () if match.position is None else match.position
        msg = types[MATCH_MSGTYPE](
            header=types["std_msgs/msg/Header"](stamp=stamp, frame_id=self.frame_id),
            query_frame=int(query_frame), db_frame=int(match.db_frame),
            db_position=np.asarray(position, dtype=np.float64),
            distance=float(match.distance), confidence=_number(match.confidence),
            velocity=float(match.velocity), latency_ms=float(latency_ms), held=bool(match.held))
        self._writer.write(self._conn, int(stamp_ns),
                           self._store.serialize_cdr(msg, MATCH_MSGTYPE))
        self.count += 1

    def __exit__(self, kind, exc, tb) -> None:
        try:
            self._writer.close()
            if kind is None:
                os.replace(self.tmp / f"{self.tmp.name}.mcap", self.path)
        finally:
            shutil.rmtree(self.tmp, ignore_errors=True)


def _number(value: float) -> float:
    return float(value) if value is not None else math.nan
