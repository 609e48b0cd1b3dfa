"""Decoding throughput of bags (issue 36): messages/s from a ROS 2 MCAP bag of 640x480 frames, raw rgb8
and JPEG, read and decoded to the model's input tensor the way `--mode extract --bag` does (`data/bag_frames`,
Pillow, the NetVLAD transform), next to the rate of NetVLAD (VGG16 + NetVLAD 64 + WPCA 4096, random weights
of the released layout) on the same CPU. Goal: decoding at least 5x the network's rate (it is not the cost).

    python bench/bench_bags.py [--frames 200] [--threads 0] [--quick]
"""
from __future__ import annotations

import argparse
import io
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def write_mcap(path: Path, n: int, encoding: str) -> None:
    from PIL import Image
    from rosbags.rosbag2 import StoragePlugin, Writer
    from rosbags.typesys import Stores, get_typestore

    ts = get_typestore(Stores.ROS2_HUMBLE)
    rng = np.random.default_rng(0)
    base = rng.integers(0, 255, (480, 640, 3), dtype=np.uint8)
    with Writer(path, version=9, storage_plugin=StoragePlugin.MCAP) as w:
        kind = "sensor_msgs/msg/CompressedImage" if encoding == "jpeg" else "sensor_msgs/msg/Image"
        conn = w.add_connection("/cam", kind, typestore=ts)
        for i in range(n):
            ns = 1_700_000_000 * 10**9 + i * 10**8
            head = ts.types["std_msgs/msg/Header"](
                stamp=ts.types["builtin_interfaces/msg/Time"](sec=ns // 10**9, nanosec=ns % 10**9), frame_id="c")
            rgb = np.roll(base, i, axis=1)
            if encoding == "jpeg":
                buf = io.BytesIO()
                Image.fromarray(rgb).save(buf, format="JPEG", quality=90)
                msg = ts.types[kind](header=head, format="jpeg", data=np.frombuffer(buf.getvalue(), np.uint8))
            else:
                msg = ts.types[kind](header=head, height=480, width=640, encoding="rgb8", is_bigendian=0,
                                     step=640 * 3, data=rgb.reshape(-1))
            w.write(conn, ns, ts.serialize_cdr(msg, kind))


def decode_rate(path: Path) -> tuple[float, int]:
    """Messages/s read, decoded and preprocessed (640x480 NetVLAD transform), and the peak frames held."""
    from PIL import Image

    from seqmatchnet.data.bag_frames import BagFrames
    from seqmatchnet.data.bags import BagSource, scan_bag
    from seqmatchnet.images.extraction import preprocess

    track = scan_bag(BagSource(path, "/cam"), show_progress=False)
    t0 = time.perf_counter()
    frames = BagFrames(track)
    held = 0
    for ref in frames.refs:
        with Image.open(ref) as image:
            preprocess(image, (640, 480))
        held = max(held, sum(r._io is not None for r in frames.refs))
    frames.close()
    return len(frames.refs) / (time.perf_counter() - t0), held


def network_rate(n: int) -> float:
    from seqmatchnet.images import netvlad, registry

    model = registry.model_from_state("netvlad", netvlad.random_netvlad_state(64, 4096, 0)).network.eval()
    x = torch.randn(1, 3, 480, 640)
    with torch.inference_mode():
        model(x)
        t0 = time.perf_counter()
        for _ in range(n):
            model(x)
    return n / (time.perf_counter() - t0)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--frames", type=int, default=200)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    n = 30 if args.quick else args.frames
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for encoding in ("rgb8", "jpeg"):
            path = Path(tmp) / encoding
            write_mcap(path, n, encoding)
            rate, held = decode_rate(path)
            rows.append((encoding, rate, held))
    net = network_rate(3 if args.quick else 5)
    print("| images | decoded msg/s | frames held at once | x NetVLAD's rate |")
    print("| --- | --- | --- | --- |")
    for encoding, rate, held in rows:
        print(f"| 640x480 {encoding} | {rate:.1f} | {held} | {rate / net:.1f} |")
    print(f"NetVLAD (VGG16 + NetVLAD 64 + WPCA 4096) at 640x480: {net:.2f} images/s")
    ok = all(rate >= 5 * net and held <= 1 for _, rate, held in rows)
    print("GOAL MET" if ok else "GOAL MISSED", ": decoding >= 5x the network's rate, one frame held")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
