"""The frames of a bag as the extraction's image list: one ``FrameRef`` per kept frame.

``images/extraction.py`` opens each entry of its image list with Pillow (``Image.open``), in order.
A ``FrameRef`` is a small file-like object: the first read decodes its message, through one
sequential cursor over the bag (``BagFrames``), into bytes Pillow opens (a compressed image's own
JPEG/PNG bytes; a raw image as an uncompressed PNM, RGB or grey, the channel order turned to RGB).
So only the kept frames are decoded, at most one frame's bytes are held at a time, and Pillow and
the model's transform see exactly the pixels of the same frames saved as image files: the
descriptors are the same bytes. Its text (``str``) is ``BAG#TOPIC@STAMP`` (``OUT.images.txt``).
Frames are read in order: the extraction runs without decoding workers for a bag.
"""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np

from seqmatchnet.common.errors import UserError
from seqmatchnet.data.bags import RAW_ENCODINGS, BagTrack, open_reader, stamp_text


def frame_bytes(msg, msgtype: str) -> bytes:
    """An image file's bytes for one image message: a compressed image's bytes as they are, a raw
    one as a binary PPM (RGB) or PGM (grey)."""
    if msgtype.endswith("CompressedImage"):
        return bytes(msg.data)
    magic, channels, reverse = RAW_ENCODINGS[msg.encoding]
    h, w, step = int(msg.height), int(msg.width), int(msg.step)
    data = np.frombuffer(memoryview(msg.data), dtype=np.uint8)
    if step < w * channels or data.size < h * step:
        raise UserError(f"a {msg.encoding} image of {w}x{h} pixels holds {data.size} bytes (row "
                        f"step {step}): fewer than its size needs")
    pixels = data[:h * step].reshape(h, step)[:, :w * channels].reshape(h, w, channels)
    if reverse:
        pixels = pixels[..., [2, 1, 0]] if channels >= 3 else pixels
    elif channels == 4:
        pixels = pixels[..., :3]
    return f"{magic}\n{w} {h}\n255\n".encode() + np.ascontiguousarray(pixels).tobytes()


class BagFrames:
    """A sequential cursor over the kept frames of ``track`` (``rows``: positions into the track),
    opened at the first read and closed after the last (or by ``close``)."""

    def __init__(self, track: BagTrack, rows: np.ndarray | None = None) -> None:
        rows = np.arange(len(track.messages)) if rows is None else np.asarray(rows)
        self.track = track
        self.targets = track.messages[rows].astype(np.int64)
        stamps = track.stamps_ns[rows].tolist()
        name = f"{Path(track.source.path).resolve()}#{track.source.image_topic}@"
        self.refs = [FrameRef(self, k, name + stamp_text(ns)) for k, ns in enumerate(stamps)]
        self._reader = self._messages = self._current = None
        self._next = 0

    def close(self) -> None:
        if self._reader is not None:
            self._reader.close()
        self._reader = self._messages = None

    def fetch(self, ref: FrameRef) -> bytes:
        """The image bytes of ``ref``'s frame (frames are fetched in order, or from the start)."""
        target = int(self.targets[ref.k])
        if self._reader is None or target < self._next:
            self.close()
            self._reader = open_reader(self.track.source.path)
            conns = [c for c in self._reader.connections
                     if c.topic == self.track.source.image_topic]
            self._messages, self._next = self._reader.messages(connections=conns), 0
        for conn, _, raw in self._messages:
            index, self._next = self._next, self._next + 1
            if index == target:
                data = frame_bytes(self._reader.deserialize(raw, conn.msgtype), conn.msgtype)
                if self._current is not None and self._current is not ref:
                    self._current.release()
                self._current = ref
                if ref.k == len(self.refs) - 1:
                    self.close()
                return data
        raise UserError(f"{self.track.source.label}: the bag ended before image message {target}")


class FrameRef:
    """One kept frame: file-like (``read``/``seek``/``tell``) over its image bytes, decoded from the
    bag at the first read; ``str`` is its name."""

    __slots__ = ("frames", "k", "name", "_io")

    def __init__(self, frames: BagFrames, k: int, name: str) -> None:
        self.frames, self.k, self.name, self._io = frames, k, name, None

    def __str__(self) -> str:
        return self.name

    def __repr__(self) -> str:
        return f"FrameRef({self.name!r})"

    def _file(self) -> io.BytesIO:
        if self._io is None:
            self._io = io.BytesIO(self.frames.fetch(self))
        return self._io

    def release(self) -> None:
        self._io = None

    def read(self, size: int = -1) -> bytes:
        return self._file().read(size)

    def seek(self, offset: int, whence: int = 0) -> int:
        return self._file().seek(offset, whence)

    def tell(self) -> int:
        return self._file().tell()

    def readline(self, size: int = -1) -> bytes:
        return self._file().readline(size)


def is_frame_list(paths) -> bool:
    """``paths`` are a bag's frames (the extraction then decodes in the main process)."""
    return bool(paths) and isinstance(paths[0], FrameRef)
