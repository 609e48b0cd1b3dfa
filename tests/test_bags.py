"""Robot recordings as input: ROS 1, ROS 2 sqlite3 and MCAP bags written with rosbags' own writers
from small synthetic frames (and from crops of real photographs) give the same descriptors as the
same frames as a folder of images, positions equal to a plain-loop interpolation, only kept frames
decoded with --spacing, and one line with nothing written for each bad input."""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch
from rosbags.rosbag1 import Writer as Writer1
from rosbags.rosbag2 import StoragePlugin
from rosbags.rosbag2 import Writer as Writer2
from rosbags.typesys import Stores, get_typestore
from torch import nn

T0 = 1_700_000_000 * 10**9          # ns
N, W, H = 30, 16, 12
PHOTOS = -1                         # frames(PHOTOS): crops of real photographs


# ---------------------------------------------------------------- writing bags

def typestore(fmt: str):
    return get_typestore(Stores.ROS1_NOETIC if fmt == "ros1" else Stores.ROS2_HUMBLE)


def header(ts, ns: int):
    Time, Header = ts.types["builtin_interfaces/msg/Time"], ts.types["std_msgs/msg/Header"]
    stamp = Time(sec=ns // 10**9, nanosec=ns % 10**9)
    if "seq" in Header.__dataclass_fields__:
        return Header(seq=0, stamp=stamp, frame_id="f")
    return Header(stamp=stamp, frame_id="f")


def image_msg(ts, ns: int, rgb: np.ndarray, encoding: str):
    if encoding in ("jpeg", "png"):
        buf = io.BytesIO()
        from PIL import Image

        Image.fromarray(rgb).save(buf, format=encoding.upper(), **({"quality": 90} if encoding == "jpeg" else {}))
        return "sensor_msgs/msg/CompressedImage", ts.types["sensor_msgs/msg/CompressedImage"](
            header=header(ts, ns), format=encoding, data=np.frombuffer(buf.getvalue(), np.uint8))
    pixels = {"rgb8": rgb, "bgr8": rgb[..., ::-1], "mono8": rgb[..., :1],
              "rgba8": np.dstack([rgb, np.full(rgb.shape[:2], 7, np.uint8)])}.get(encoding, rgb)
    pixels = np.ascontiguousarray(pixels)
    return "sensor_msgs/msg/Image", ts.types["sensor_msgs/msg/Image"](
        header=header(ts, ns), height=H, width=W, encoding=encoding, is_bigendian=0,
        step=W * pixels.shape[2], data=pixels.reshape(-1))


def fix_msg(ts, ns: int, lat: float, lon: float, status: int = 0):
    t = ts.types
    return "sensor_msgs/msg/NavSatFix", t["sensor_msgs/msg/NavSatFix"](
        header=header(ts, ns), status=t["sensor_msgs/msg/NavSatStatus"](status=status, service=1),
        latitude=lat, longitude=lon, altitude=10.0, position_covariance=np.zeros(9),
        position_covariance_type=0)


def odom_msg(ts, ns: int, x: float, y: float):
    t = ts.types
    pose = t["geometry_msgs/msg/Pose"](position=t["geometry_msgs/msg/Point"](x=x, y=y, z=0.0),
                                       orientation=t["geometry_msgs/msg/Quaternion"](x=0.0, y=0.0, z=0.0, w=1.0))
    v = t["geometry_msgs/msg/Vector3"](x=0.0, y=0.0, z=0.0)
    return "nav_msgs/msg/Odometry", t["nav_msgs/msg/Odometry"](
        header=header(ts, ns), child_frame_id="base",
        pose=t["geometry_msgs/msg/PoseWithCovariance"](pose=pose, covariance=np.zeros(36)),
        twist=t["geometry_msgs/msg/TwistWithCovariance"](twist=t["geometry_msgs/msg/Twist"](linear=v, angular=v),
                                                         covariance=np.zeros(36)))


def write_bag(path: Path, fmt: str, messages: list) -> Path:
    """``messages``: (topic, receive ns, (msgtype, msg)), written in receive order."""
    ts = typestore(fmt)
    if fmt == "ros1":
        writer = Writer1(path)
    else:
        storage = StoragePlugin.MCAP if fmt == "mcap" else StoragePlugin.SQLITE3
        writer = Writer2(path, version=9, storage_plugin=storage)
    conns = {}
    with writer:
        for topic, ns, (msgtype, msg) in sorted(messages, key=lambda m: m[1]):
            if topic not in conns:
                conns[topic] = writer.add_connection(topic, msgtype, typestore=ts)
            data = ts.serialize_ros1(msg, msgtype) if fmt == "ros1" else ts.serialize_cdr(msg, msgtype)
            writer.write(conns[topic], ns, data)
    return path


def frames(seed: int = 0) -> list[np.ndarray]:
    """``N`` frames: random pixels, or (``seed`` -1) a camera panning across the sample photographs
    scikit-learn ships (``china.jpg``, then ``flower.jpg``)."""
    if seed == PHOTOS:
        from sklearn.datasets import load_sample_images

        photos = load_sample_images().images
        return [photos[i * 2 // N][100 + 7 * i: 100 + 7 * i + H, 150 + 11 * i: 150 + 11 * i + W].copy()
                for i in range(N)]
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 255, (H, W, 3), dtype=np.uint8) for _ in range(N)]


def route(fmt: str, path: Path, encoding: str = "rgb8", *, gps=True, odom=True, bad_fix: int = 3,
          image_ns=None, empty_stamp: bool = False, seed: int = 0) -> tuple[Path, dict]:
    """A drive: N images at 10 Hz, GPS at 4 Hz starting after the first image and ending before the last
    (images outside its span are dropped), one fix without a fix; odometry at 20 Hz along x at varying speed."""
    ts = typestore(fmt)
    rgb = frames(seed)
    image_ns = [T0 + i * 100_000_000 for i in range(N)] if image_ns is None else image_ns
    # received 5 ms after the (regular) capture time, whatever the header says
    msgs = [("/cam/image", T0 + i * 100_000_000 + 5_000_000, image_msg(ts, 0 if empty_stamp else ns, im, encoding))
            for i, (ns, im) in enumerate(zip(image_ns, rgb))]
    gps_ns = [T0 + 150_000_000 + k * 250_000_000 for k in range(11)]    # 0.15 s .. 2.65 s
    fixes = [(-27.47 + 1e-5 * k + 2e-6 * k * k, 153.02 + 3e-6 * k) for k in range(11)]
    if gps:
        msgs += [("/gps/fix", ns, fix_msg(ts, ns, lat, lon, -1 if k == bad_fix else 0))
                 for k, (ns, (lat, lon)) in enumerate(zip(gps_ns, fixes))]
    odom_ns = [T0 + k * 50_000_000 for k in range(62)]
    xs = np.cumsum(np.r_[0.0, 0.05 + 0.1 * np.abs(np.sin(np.arange(61) / 5))])
    if odom:
        msgs += [("/odom", ns, odom_msg(ts, ns, float(x), 0.5)) for ns, x in zip(odom_ns, xs)]
    truth = {"rgb": rgb, "image_ns": image_ns,
             "gps": [(ns, f) for k, (ns, f) in enumerate(zip(gps_ns, fixes)) if k != bad_fix],
             "odom": list(zip(odom_ns, xs))}
    return write_bag(path, fmt, msgs), truth


def bag_path(tmp_path: Path, fmt: str) -> Path:
    return tmp_path / {"ros1": "drive.bag", "sqlite3": "drive", "mcap": "drive_mcap"}[fmt]


# ---------------------------------------------------------------- plain-loop twins

def plain_interp(t: float, samples: list) -> float:
    """Linear interpolation between the two samples around ``t`` (a plain loop)."""
    for (t0, v0), (t1, v1) in zip(samples, samples[1:]):
        if t0 <= t <= t1:
            return v0 + (v1 - v0) * (t - t0) / (t1 - t0)
    raise AssertionError("outside the span")


def plain_positions(truth: dict) -> list[tuple]:
    """Per image inside the GPS span: (ns, lat, lon, x, y, odometry) by plain loops."""
    gps = [((ns - T0) * 1e-9, f) for ns, f in truth["gps"]]
    odom = [((ns - T0) * 1e-9, x) for ns, x in truth["odom"]]
    along, total = [], 0.0
    for k, (_, x) in enumerate(odom):
        total += abs(x - odom[k - 1][1]) if k else 0.0
        along.append(total)
    rows = []
    for ns in truth["image_ns"]:
        t = (ns - T0) * 1e-9
        if not gps[0][0] <= t <= gps[-1][0] or not odom[0][0] <= t <= odom[-1][0]:
            continue
        lat = plain_interp(t, [(a, f[0]) for a, f in gps])
        lon = plain_interp(t, [(a, f[1]) for a, f in gps])
        x = plain_interp(t, odom)
        dist = plain_interp(t, [(a, d) for (a, _), d in zip(odom, along)])
        rows.append((ns, lat, lon, x, 0.5, dist))
    return rows


# ---------------------------------------------------------------- a small model that sees every pixel

class TinyNet(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 4, 3)
        self.images = 0

    def forward(self, x):
        self.images += x.shape[0]
        return nn.functional.normalize(self.conv(x).flatten(1)[:, :24], dim=1)


@pytest.fixture
def tiny(monkeypatch, tmp_path):
    from seqmatchnet.images import extraction
    from seqmatchnet.images.base import ImageModel

    net = TinyNet()
    monkeypatch.setattr(extraction, "load_for_extraction",
                        lambda *a, **k: (ImageModel("netvlad", net, 24, "tiny", (W, H)), (W, H)))
    weights = tmp_path / "w.pth"
    weights.write_bytes(b"weights")
    return net, weights


def extract_args(weights: Path, out: Path, *more) -> list[str]:
    return ["--model", "netvlad", "--weights", str(weights), "--out", str(out), "--nocuda", "--quiet",
            "--threads", "0", *more]


def folder_of(frames_rgb: list, encoding: str, folder: Path) -> Path:
    """The same frames as image files (what a user would dump from the bag)."""
    from PIL import Image

    folder.mkdir()
    for i, rgb in enumerate(frames_rgb):
        if encoding in ("jpeg", "png"):
            buf = io.BytesIO()
            Image.fromarray(rgb).save(buf, format=encoding.upper(), **({"quality": 90} if encoding == "jpeg" else {}))
            (folder / f"{i:04d}.{'jpg' if encoding == 'jpeg' else 'png'}").write_bytes(buf.getvalue())
        else:
            Image.fromarray(rgb[..., 0] if encoding == "mono8" else rgb).save(folder / f"{i:04d}.png")
    return folder


@pytest.mark.parametrize("fmt,encoding,seed", [
    ("ros1", "rgb8", 0), ("sqlite3", "bgr8", 0), ("mcap", "jpeg", 0), ("ros1", "png", 0), ("mcap", "mono8", 0),
    ("sqlite3", "rgba8", 0), ("mcap", "jpeg", PHOTOS), ("ros1", "rgb8", PHOTOS), ("sqlite3", "png", PHOTOS)])
def test_bag_gives_the_descriptors_of_the_same_frames_as_a_folder(tmp_path, capsys, tiny, fmt, encoding, seed):
    from seqmatchnet.cli import extract

    _, weights = tiny
    bag, truth = route(fmt, bag_path(tmp_path, fmt), encoding, seed=seed)
    out = tmp_path / "bag.npy"
    rc = extract.main(extract_args(weights, out, "--bag", str(bag), "--imageTopic", "/cam/image",
                                   "--gpsTopic", "/gps/fix", "--odomTopic", "/odom"))
    text = capsys.readouterr()
    assert rc == 0, text.err
    want = plain_positions(truth)
    assert "left out 1 GPS message(s) without a fix" in text.out
    assert f"dropped {N - len(want)} of {N} images outside" in text.out
    # the folder of the frames kept in the span
    kept = [i for i, ns in enumerate(truth["image_ns"]) if ns in {r[0] for r in want}]
    folder = folder_of([truth["rgb"][i] for i in kept], encoding, tmp_path / "frames")
    assert extract.main(extract_args(weights, tmp_path / "folder.npy", "--images", str(folder))) == 0
    assert np.load(out).tobytes() == np.load(tmp_path / "folder.npy").tobytes()
    lines = (tmp_path / "bag.npy.positions.csv").read_text().splitlines()
    assert lines[0] == "timestamp,lat,lon,odometry" and len(lines) == len(want) + 1
    for line, (ns, lat, lon, _, _, dist) in zip(lines[1:], want):
        t, a, b, d = line.split(",")
        assert t == f"{ns // 10**9}.{ns % 10**9:09d}"
        assert float(a) == pytest.approx(lat, abs=1e-12) and float(b) == pytest.approx(lon, abs=1e-12)
        assert float(d) == pytest.approx(dist, abs=1e-9)
    listed = (tmp_path / "bag.npy.images.txt").read_text().splitlines()
    assert listed[0].endswith(f"#/cam/image@{want[0][0] // 10**9}.{want[0][0] % 10**9:09d}")


def test_odometry_only_gives_xy_positions(tmp_path, capsys, tiny):
    from seqmatchnet.cli import extract

    _, weights = tiny
    bag, truth = route("mcap", tmp_path / "drive.mcap", gps=False)
    assert extract.main(extract_args(weights, tmp_path / "d.npy", "--bag", str(bag), "--imageTopic",
                                     "/cam/image", "--odomTopic", "/odom")) == 0
    lines = (tmp_path / "d.npy.positions.csv").read_text().splitlines()
    assert lines[0] == "timestamp,x,y,odometry"
    odom = [((ns - T0) * 1e-9, x) for ns, x in truth["odom"]]
    inside = [ns for ns in truth["image_ns"] if (ns - T0) * 1e-9 <= odom[-1][0]]
    assert len(lines) == len(inside) + 1
    for line, ns in zip(lines[1:], inside):
        assert float(line.split(",")[1]) == pytest.approx(plain_interp((ns - T0) * 1e-9, odom), abs=1e-9)


def test_spacing_decodes_only_the_kept_frames(tmp_path, capsys, tiny, monkeypatch):
    from seqmatchnet.cli import extract
    from seqmatchnet.data import bag_frames
    from seqmatchnet.data.spacing import spaced_rows

    net, weights = tiny
    decoded = []
    real = bag_frames.frame_bytes
    monkeypatch.setattr(bag_frames, "frame_bytes", lambda msg, t: decoded.append(1) or real(msg, t))
    bag, truth = route("ros1", tmp_path / "drive.bag")
    rc = extract.main(extract_args(weights, tmp_path / "k.npy", "--bag", str(bag), "--imageTopic",
                                   "/cam/image", "--gpsTopic", "/gps/fix", "--odomTopic", "/odom",
                                   "--spacing", "0.5"))
    assert rc == 0, capsys.readouterr().err
    want = plain_positions(truth)
    kept = spaced_rows(np.array([r[5] for r in want]), None, 0.5)
    assert 3 < len(kept) < len(want)
    assert len(decoded) == net.images == len(kept) == len(np.load(tmp_path / "k.npy"))


def test_prepare_takes_bags_for_both_traversals(tmp_path, capsys, tiny):
    from seqmatchnet.cli import prepare

    net, weights = tiny
    db, _ = route("sqlite3", tmp_path / "db")
    q, _ = route("mcap", tmp_path / "q.mcap", encoding="jpeg")
    struct = tmp_path / "structFiles"
    rc = prepare.main(["--name", "drive", "--db_bag", str(db), "--q_bag", str(q), "--imageTopic", "/cam/image",
                       "--gpsTopic", "/gps/fix", "--odomTopic", "/odom", "--model", "netvlad", "--weights",
                       str(weights), "--structPath", str(struct), "--seqL", "2", "--splits", "0.5,0.25,0.25",
                       "--posDistThr", "1", "--evalPosDistThr", "1", "--nonTrivPosDistThr", "0.5"])
    text = capsys.readouterr()
    assert rc == 0, text.err
    assert (struct / "custom_drive.json").is_file()
    n_db = len(np.load(struct / "custom_drive_descriptors" / "database.npy"))
    assert n_db == len((struct / "custom_drive_bags" / "db.csv").read_text().splitlines()) - 1
    assert net.images == 2 * n_db


# ---------------------------------------------------------------- bad input: one line, nothing written

def refused(capsys, tmp_path: Path, weights: Path, *args) -> str:
    from seqmatchnet.cli import extract

    out = tmp_path / "out" / "d.npy"
    rc = extract.main(extract_args(weights, out, *args))
    err = capsys.readouterr().err.strip()
    assert rc == 1, err
    assert len(err.splitlines()) == 1 and err.startswith("error:"), err
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())
    return err


def test_missing_topic_lists_the_topics_the_bag_holds(tmp_path, capsys, tiny):
    bag, _ = route("ros1", tmp_path / "d.bag")
    err = refused(capsys, tmp_path, tiny[1], "--bag", str(bag), "--imageTopic", "/camera/rgb",
                  "--gpsTopic", "/gps/fix")
    assert "/camera/rgb is not in" in err
    assert "image topics: /cam/image" in err and "GPS topics: /gps/fix" in err and "odometry topics: /odom" in err
    err = refused(capsys, tmp_path, tiny[1], "--bag", str(bag), "--imageTopic", "/odom")
    assert "is nav_msgs/msg/Odometry, not sensor_msgs/msg/Image" in err


def test_unsupported_encoding_lists_the_supported_ones(tmp_path, capsys, tiny):
    ts = typestore("mcap")
    msgs = [("/cam/image", T0 + i, ("sensor_msgs/msg/Image", ts.types["sensor_msgs/msg/Image"](
        header=header(ts, T0 + i), height=2, width=2, encoding="16UC1", is_bigendian=0, step=4,
        data=np.zeros(8, np.uint8)))) for i in range(3)]
    bag = write_bag(tmp_path / "depth.mcap", "mcap", msgs)
    err = refused(capsys, tmp_path, tiny[1], "--bag", str(bag), "--imageTopic", "/cam/image")
    assert "'16UC1' is not supported" in err and "rgb8" in err and "jpeg" in err


def test_no_valid_fix(tmp_path, capsys, tiny):
    ts = typestore("ros1")
    rgb = frames()
    msgs = [("/cam/image", T0 + i * 10**8, image_msg(ts, T0 + i * 10**8, rgb[i], "rgb8")) for i in range(5)]
    msgs += [("/gps/fix", T0 + i * 10**8, fix_msg(ts, T0 + i * 10**8, float("nan") if i % 2 else 1.0, 2.0,
                                                   -1 if i % 2 == 0 else 0)) for i in range(5)]
    bag = write_bag(tmp_path / "nofix.bag", "ros1", msgs)
    err = refused(capsys, tmp_path, tiny[1], "--bag", str(bag), "--imageTopic", "/cam/image", "--gpsTopic",
                  "/gps/fix")
    assert "none of its 5 message(s) has a valid fix" in err


def test_image_timestamps_going_backwards(tmp_path, capsys, tiny):
    stamps = [T0 + i * 10**8 for i in range(N)]
    stamps[7] = stamps[5] - 1
    bag, _ = route("sqlite3", tmp_path / "back", image_ns=stamps)
    err = refused(capsys, tmp_path, tiny[1], "--bag", str(bag), "--imageTopic", "/cam/image")
    assert "message 7" in err and "is earlier than message 6's" in err


@pytest.mark.parametrize("fmt", ["ros1", "sqlite3", "mcap"])
def test_truncated_bag(tmp_path, capsys, tiny, fmt):
    bag, _ = route(fmt, bag_path(tmp_path, fmt))
    storage = bag if fmt == "ros1" else next(p for p in bag.iterdir() if p.suffix in (".db3", ".mcap"))
    data = storage.read_bytes()
    storage.write_bytes(data[: len(data) // 2])
    err = refused(capsys, tmp_path, tiny[1], "--bag", str(bag), "--imageTopic", "/cam/image")
    assert "damaged or truncated" in err


def test_empty_header_stamps_use_the_receive_time_said_once(tmp_path, capsys, tiny):
    from seqmatchnet.cli import extract

    bag, truth = route("mcap", tmp_path / "d.mcap", gps=False, odom=False, empty_stamp=True)
    assert extract.main(extract_args(tiny[1], tmp_path / "d.npy", "--bag", str(bag), "--imageTopic",
                                     "/cam/image")) == 0
    out = capsys.readouterr().out
    assert out.count("empty header stamp") == 1 and f"{N} image message(s)" in out
    listed = (tmp_path / "d.npy.images.txt").read_text().splitlines()
    ns = truth["image_ns"][0] + 5_000_000
    assert listed[0].endswith(f"@{ns // 10**9}.{ns % 10**9:09d}") and len(listed) == N


# ---------------------------------------------------------------- --mode localize --bag, --out_bag

TOPICS = ["--imageTopic", "/cam/image", "--gpsTopic", "/gps/fix", "--odomTopic", "/odom"]


def prepared(tmp_path: Path, capsys, weights: Path) -> Path:
    """A dataset prepared from a database and a query bag (the tiny model): its --structPath."""
    from seqmatchnet.cli import prepare

    db, _ = route("sqlite3", tmp_path / "db")
    q, _ = route("mcap", tmp_path / "q.mcap", encoding="jpeg", seed=2)
    struct = tmp_path / "structFiles"
    rc = prepare.main(["--name", "drive", "--db_bag", str(db), "--q_bag", str(q), *TOPICS, "--model", "netvlad",
                       "--weights", str(weights), "--structPath", str(struct), "--seqL", "2", "--splits",
                       "0.5,0.25,0.25", "--posDistThr", "1", "--evalPosDistThr", "1", "--nonTrivPosDistThr", "0.5"])
    assert rc == 0, capsys.readouterr().err
    capsys.readouterr()
    return struct


def localize_args(struct: Path, *more) -> list[str]:
    return ["--dataset", "custom:drive", "--structPath", str(struct), "--split", "train", "--seqL", "2",
            "--nocuda", "--quiet", *more]


def without_latency(path: Path) -> list[list[str]]:
    rows = [line.split(",") for line in path.read_text().splitlines()]
    k = rows[0].index("latency_ms")
    return [r[:k] + r[k + 1:] for r in rows]


@pytest.mark.parametrize("spacing", [None, "0.4"])
def test_localize_from_a_bag_equals_localizing_its_descriptors(tmp_path, capsys, tiny, spacing):
    """Frames decoded from the bag, described and stepped one at a time give the CSV that --stream gives
    for the descriptors --mode extract makes of the same frames; with --spacing only the frames that step
    the matcher are decoded; --out_bag holds one message per matched frame with the CSV's fields."""
    from rosbags.highlevel import AnyReader

    from seqmatchnet.cli import extract, localize
    from seqmatchnet.data import bag_frames
    from seqmatchnet.data.spacing import spaced_rows
    from seqmatchnet.online.bag_output import MATCH_MSGTYPE, MATCH_TOPIC

    net, weights = tiny
    struct = prepared(tmp_path, capsys, weights)
    query, _ = route("ros1", tmp_path / "query.bag", seed=1)
    assert extract.main(extract_args(weights, tmp_path / "q.npy", "--bag", str(query), *TOPICS)) == 0
    positions = [line.split(",") for line in (tmp_path / "q.npy.positions.csv").read_text().splitlines()[1:]]
    desc = np.load(tmp_path / "q.npy")
    extra = []
    if spacing is not None:      # a stream carries the odometry after each descriptor
        desc = np.hstack([desc, np.array([[float(p[3])] for p in positions], np.float32)])
        extra = ["--spacing", spacing]
    np.save(tmp_path / "stream.npy", desc)
    assert localize.main(localize_args(struct, "--stream", str(tmp_path / "stream.npy"), "--output",
                                       str(tmp_path / "stream.csv"), *extra)) == 0
    decoded = []
    real = bag_frames.frame_bytes
    bag_frames.frame_bytes = lambda msg, t: decoded.append(1) or real(msg, t)
    try:
        rc = localize.main(localize_args(struct, "--bag", str(query), *TOPICS, "--model", "netvlad", "--weights",
                                         str(weights), "--output", str(tmp_path / "bag.csv"), "--out_bag",
                                         str(tmp_path / "matches.mcap"), *extra))
    finally:
        bag_frames.frame_bytes = real
    text = capsys.readouterr()
    assert rc == 0, text.err
    rows, want = without_latency(tmp_path / "bag.csv"), without_latency(tmp_path / "stream.csv")
    assert len(rows) == len(want) == len(positions) + 1 and rows[0] == want[0]
    # one frame per forward pass against extract's batches: the same matches, numbers to float32 rounding
    for got, row in zip(rows[1:], want[1:]):
        assert [got[k] for k in (0, 1, 4, *range(5, len(got)))] == [row[k] for k in (0, 1, 4, *range(5, len(row)))]
        assert [float(x or "nan") for x in got[2:4]] == pytest.approx([float(x or "nan") for x in row[2:4]],
                                                                       rel=1e-5, nan_ok=True)
    matched = [r for r in rows[1:] if r[1]]
    steps = len(positions) if spacing is None else len(
        spaced_rows(np.array([float(p[3]) for p in positions]), None, float(spacing)))
    assert len(decoded) == steps and (spacing is None or sum(r[-1] == "1" for r in rows[1:]) > 0)
    header = rows[0]
    with AnyReader([tmp_path / "matches.mcap"]) as reader:
        (conn,) = reader.connections
        assert (conn.topic, conn.msgtype) == (MATCH_TOPIC, MATCH_MSGTYPE)
        msgs = [(t, reader.deserialize(raw, conn.msgtype)) for _, t, raw in reader.messages()]
    assert len(msgs) == len(matched) > 0
    for (t, msg), row in zip(msgs, matched):
        q = int(row[0])
        stamp = positions[q][0]
        assert t == int(stamp.replace(".", "")) and f"{msg.header.stamp.sec}.{msg.header.stamp.nanosec:09d}" == stamp
        assert msg.query_frame == q and msg.db_frame == int(row[header.index("db_frame")])
        for name in ("distance", "confidence", "velocity"):
            assert f"{getattr(msg, name):.7g}" == f"{float(row[header.index(name)]):.7g}", name
        assert msg.held == (spacing is not None and row[-1] == "1") and len(msg.db_position) == 2
    assert not list(tmp_path.glob(".matches.mcap*"))


def localize_refused(capsys, tmp_path: Path, *args) -> str:
    from seqmatchnet.cli import localize

    out = tmp_path / "out"
    out.mkdir(exist_ok=True)
    rc = localize.main([*args, "--output", str(out / "m.csv"), "--out_bag", str(out / "m.mcap")])
    err = capsys.readouterr().err.strip()
    assert rc != 0, err
    assert len(err.splitlines()) == 1 and err.startswith("error:"), err
    assert not any(out.iterdir())
    return err


def test_localize_bag_refuses_bad_input_in_one_line(tmp_path, capsys, tiny):
    _, weights = tiny
    struct = prepared(tmp_path, capsys, weights)
    query, _ = route("mcap", tmp_path / "query.mcap")
    model = ["--model", "netvlad", "--weights", str(weights)]
    err = localize_refused(capsys, tmp_path, *localize_args(struct, "--bag", str(query), "--imageTopic",
                                                            "/camera/rgb", *model))
    assert "/camera/rgb is not in" in err and "image topics: /cam/image" in err
    other = tmp_path / "other.pth"
    other.write_bytes(b"other weights")
    err = localize_refused(capsys, tmp_path, *localize_args(struct, "--bag", str(query), *TOPICS, "--model",
                                                            "netvlad", "--weights", str(other)))
    assert "prepared with netvlad descriptors" in err and "--weights" in err
    err = localize_refused(capsys, tmp_path, *localize_args(struct, "--bag", str(query), *TOPICS))
    assert "--model" in err
    err = localize_refused(capsys, tmp_path, *localize_args(struct, "--out_bag", str(tmp_path / "x.mcap")))
    assert "only used with --bag" in err


# ---------------------------------------------------------------- end to end (slow)

def drive(fmt: str, path: Path, rgb: list, frames_kept=None, east: float = 0.0) -> Path:
    """A straight drive at 10 Hz (one image per 1 m), GPS at 5 Hz and odometry at 20 Hz spanning every image;
    ``frames_kept``: write only those images (the GPS and odometry in full)."""
    ts = typestore(fmt)
    n = len(rgb)
    keep = range(n) if frames_kept is None else frames_kept
    msgs = [("/cam/image", T0 + i * 10**8, image_msg(ts, T0 + i * 10**8, rgb[i], "rgb8")) for i in keep]
    msgs += [("/gps/fix", T0 - 10**8 + k * 2 * 10**8,
              fix_msg(ts, T0 - 10**8 + k * 2 * 10**8, -27.47 + 9e-6 * (2 * k - 1), 153.02 + east * 1e-5))
             for k in range(n // 2 + 2)]
    msgs += [("/odom", T0 - 10**8 + k * 5 * 10**7, odom_msg(ts, T0 - 10**8 + k * 5 * 10**7, 0.5 * k - 1.0, east))
             for k in range(2 * n + 4)]
    return write_bag(path, fmt, msgs)


@pytest.mark.slow
def test_bags_end_to_end_give_the_recalls_of_a_folder_and_csv(tmp_path, capsys, tiny, monkeypatch):
    """Bags -> prepare -> train (1 epoch) -> test -> localize from a query bag gives the recalls of the same
    frames given as folders of images and the positions CSVs."""
    import json
    import shutil

    import main
    from seqmatchnet.cli import prepare

    _, weights = tiny
    n = 120
    rng = np.random.default_rng(5)
    db_rgb = [rng.integers(0, 255, (H, W, 3), dtype=np.uint8) for _ in range(n)]
    q_rgb = [np.clip(im.astype(int) + rng.integers(-12, 13, im.shape), 0, 255).astype(np.uint8) for im in db_rgb]
    rows = ["--train_rows", "0:60,0:60", "--val_rows", "60:85,60:85", "--test_rows", "85:120,85:120"]
    thresholds = ["--posDistThr", "3", "--evalPosDistThr", "3", "--nonTrivPosDistThr", "2", "--seqL", "3"]
    model = ["--seqL", "3", "--pooling", "--outDims", "8", "--nocuda", "--quiet"]
    results = {}
    for kind in ("bags", "folder"):
        cwd = tmp_path / kind
        cwd.mkdir()
        monkeypatch.chdir(cwd)
        if kind == "bags":
            data = ["--db_bag", str(drive("sqlite3", cwd / "db", db_rgb)),
                    "--q_bag", str(drive("mcap", cwd / "q.mcap", q_rgb, east=1.0)), *TOPICS]
        else:                        # the same frames as PNG folders, with the positions CSVs prepare wrote
            for side in ("db", "q"):
                shutil.copy(tmp_path / "bags" / "structFiles" / "custom_bags_bags" / f"{side}.csv", cwd / f"{side}.csv")
            data = ["--db_images", str(folder_of(db_rgb, "rgb8", cwd / "db_frames")), "--db_positions", "db.csv",
                    "--q_images", str(folder_of(q_rgb, "rgb8", cwd / "q_frames")), "--q_positions", "q.csv"]
        assert prepare.main(["--name", kind, *data, "--model", "netvlad", "--weights", str(weights), *rows,
                             *thresholds]) == 0, capsys.readouterr().err
        dataset = ["--dataset", f"custom:{kind}"]
        assert main.main(["--mode", "train", "--nEpochs", "1", "--threads", "0", *dataset, *model]) == 0
        (run,) = (cwd / "data" / "runs").iterdir()
        assert main.main(["--mode", "test", "--split", "test", "--resume", str(run), "--resultsPath", "test",
                          *dataset, *model]) == 0
        query = []
        if kind == "bags":           # the test split's query frames, recorded as a bag of their own
            query = ["--bag", str(drive("ros1", cwd / "q_test.bag", q_rgb, range(85, 120), east=1.0)), *TOPICS,
                     "--model", "netvlad", "--weights", str(weights)]
        assert main.main(["--mode", "localize", "--split", "test", "--resume", str(run), "--resultsPath", "loc",
                          "--output", "matches.csv", *query, *dataset, *model]) == 0, capsys.readouterr().err
        with np.load(cwd / "test" / "results.npz") as z:
            test = {k: z[k] for k in z.files if "recall" in k.lower()}
        loc = json.loads((cwd / "loc" / "summary.json").read_text())
        matches = [line.split(",")[:2] for line in (cwd / "matches.csv").read_text().splitlines()]
        results[kind] = (test, loc["recalls"]["1"], matches)
    (test_a, loc_a, m_a), (test_b, loc_b, m_b) = results["bags"], results["folder"]
    assert test_a.keys() == test_b.keys() and test_a
    for k in test_a:
        np.testing.assert_array_equal(test_a[k], test_b[k])
    assert m_a == m_b and len(m_a) == 36
    assert loc_a == loc_b > 0.5
