"""``python main.py --mode extract``: images -> NetVLAD descriptors (one row per image).

The network is the NetVLAD of Patch-NetVLAD (Hausler et al., CVPR 2021): VGG16 up to
conv5_3 (no ReLU, no last max-pool), a NetVLAD layer and, optionally, whitening PCA
(WPCA). Its weights come from a checkpoint in Patch-NetVLAD's format, e.g. the released
``pitts_WPCA4096.pth.tar`` (``{'state_dict': {...}}``):

- ``encoder.{0,2,5,7,10,12,14,17,19,21,24,26,28}.weight/bias``: the VGG16 conv layers;
- ``pool.centroids`` ``[K, 512]``, ``pool.conv.weight`` ``[K, 512, 1, 1]`` (optional
  ``pool.conv.bias`` ``[K]``);
- optional ``WPCA.0.weight`` ``[P, K*512, 1, 1]`` and ``WPCA.0.bias`` ``[P]``.

The output is ``.npy`` or HDF5, float32 ``[N, P]`` (``P = K*512`` without WPCA), with a
sidecar ``OUT.images.txt`` naming each row's image. A run stores its finished rows in
``OUT.partial.f32`` with a progress record ``OUT.partial.json``; the same command run
again continues from there, and the final file appears atomically.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from entry import OneLineParser, run_own_mode
from utils import UserError, numpy_safe_globals

if TYPE_CHECKING:
    from PIL import Image as PILImage

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp")
OUT_SUFFIXES = (".npy", ".h5", ".hdf5")
DEFAULT_IMAGE_SIZE = (640, 480)                 # (width, height), as Patch-NetVLAD's configs
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
ENCODER_DIM = 512
VGG16_CONVS = ((0, 3, 64), (2, 64, 64), (5, 64, 128), (7, 128, 128), (10, 128, 256), (12, 256, 256),
               (14, 256, 256), (17, 256, 512), (19, 512, 512), (21, 512, 512), (24, 512, 512),
               (26, 512, 512), (28, 512, 512))     # (index in torchvision's vgg16().features, in, out)
VGG16_POOLS = (4, 9, 16, 23)
CHECKPOINT_URL = "https://huggingface.co/TobiasRobotics/Patch-NetVLAD/resolve/main/pitts_WPCA4096.pth.tar"
PROGRESS_FORMAT = 1


# ---------------------------------------------------------------- the network

def vgg16_encoder() -> nn.Sequential:
    """VGG16 ``features`` truncated after conv5_3 (indices 0..28, torchvision's numbering):
    ``[N, 3, H, W]`` -> ``[N, 512, H/16, W/16]`` (floor at each max-pool)."""
    layers: list[nn.Module] = []
    convs = {i: (c_in, c_out) for i, c_in, c_out in VGG16_CONVS}
    for i in range(VGG16_CONVS[-1][0] + 1):
        if i in convs:
            layers.append(nn.Conv2d(*convs[i], kernel_size=3, padding=1))
        elif i in VGG16_POOLS:
            layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
        else:
            layers.append(nn.ReLU(inplace=True))
    return nn.Sequential(*layers)


class NetVLADPool(nn.Module):
    """NetVLAD aggregation: ``[N, C, H, W]`` features -> ``[N, K*C]`` (intra- and L2-normalised)."""

    def __init__(self, num_clusters: int, dim: int = ENCODER_DIM, assignment_bias: bool = False) -> None:
        super().__init__()
        self.num_clusters = num_clusters
        self.conv = nn.Conv2d(dim, num_clusters, kernel_size=1, bias=assignment_bias)
        self.centroids = nn.Parameter(torch.zeros(num_clusters, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c = x.shape[:2]
        x = F.normalize(x, p=2, dim=1)                                  # per location, across channels
        assign = F.softmax(self.conv(x).reshape(n, self.num_clusters, -1), dim=1)   # [N, K, L]
        feats = x.reshape(n, c, -1)                                     # [N, C, L]
        # sum_l a[k,l] (x[:,l] - c_k) = (A X^T)[k] - (sum_l a[k,l]) c_k
        vlad = torch.bmm(assign, feats.transpose(1, 2)) - assign.sum(2, keepdim=True) * self.centroids
        vlad = F.normalize(vlad, p=2, dim=2)                            # intra-normalisation
        return F.normalize(vlad.reshape(n, -1), p=2, dim=1)


class NetVLADModel(nn.Module):
    """Patch-NetVLAD's global descriptor network: ``[N, 3, H, W]`` normalised images ->
    ``[N, P]`` L2-normalised descriptors (``P = K*512`` without WPCA). Module names match the
    checkpoints' keys (``encoder``, ``pool``, ``WPCA``)."""

    def __init__(self, num_clusters: int, num_pcs: int | None = None, assignment_bias: bool = False) -> None:
        super().__init__()
        self.encoder = vgg16_encoder()
        self.pool = NetVLADPool(num_clusters, ENCODER_DIM, assignment_bias)
        self.WPCA = nn.Sequential(nn.Conv2d(num_clusters * ENCODER_DIM, num_pcs, kernel_size=1)) if num_pcs else None

    @property
    def out_dim(self) -> int:
        return self.WPCA[0].out_channels if self.WPCA is not None else self.pool.num_clusters * ENCODER_DIM

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        vlad = self.pool(self.encoder(images))
        if self.WPCA is None:
            return vlad
        conv = self.WPCA[0]                     # a 1x1 conv on [N, K*C, 1, 1] is a linear map
        return F.normalize(F.linear(vlad, conv.weight.flatten(1), conv.bias), p=2, dim=1)


def expected_shapes(num_clusters: int, num_pcs: int | None, assignment_bias: bool) -> dict[str, tuple[int, ...]]:
    """Every state-dict key of a checkpoint with ``K`` clusters and ``P`` WPCA outputs, with its shape."""
    shapes: dict[str, tuple[int, ...]] = {}
    for i, c_in, c_out in VGG16_CONVS:
        shapes[f"encoder.{i}.weight"] = (c_out, c_in, 3, 3)
        shapes[f"encoder.{i}.bias"] = (c_out,)
    shapes["pool.centroids"] = (num_clusters, ENCODER_DIM)
    shapes["pool.conv.weight"] = (num_clusters, ENCODER_DIM, 1, 1)
    if assignment_bias:
        shapes["pool.conv.bias"] = (num_clusters,)
    if num_pcs:
        shapes["WPCA.0.weight"] = (num_pcs, num_clusters * ENCODER_DIM, 1, 1)
        shapes["WPCA.0.bias"] = (num_pcs,)
    return shapes


def model_from_state_dict(state: dict[str, torch.Tensor], source: str = "checkpoint") -> NetVLADModel:
    """Check a Patch-NetVLAD state dict (``module.`` prefixes allowed) and load it into a
    ``NetVLADModel`` on the CPU, in eval mode. K and P are read from the shapes; a missing,
    unexpected or wrongly shaped key is a ``UserError`` naming the key and its shape."""
    state = {".".join(p for p in k.split(".") if p != "module"): v for k, v in state.items()}
    for key in ("pool.centroids", "pool.conv.weight"):
        if key not in state:
            raise UserError(f"{source}: key {key!r} is missing: not a NetVLAD checkpoint in Patch-NetVLAD's format "
                            f"(get one from {CHECKPOINT_URL})")
    centroids = state["pool.centroids"]
    if centroids.ndim != 2 or centroids.shape[1] != ENCODER_DIM or centroids.shape[0] < 1:
        raise UserError(f"{source}: 'pool.centroids' has shape {list(centroids.shape)}, expected [K, {ENCODER_DIM}]")
    num_clusters = int(centroids.shape[0])
    wpca = state.get("WPCA.0.weight")
    num_pcs = int(wpca.shape[0]) if wpca is not None and wpca.ndim >= 1 else None
    if wpca is not None and (wpca.ndim != 4 or wpca.shape[0] < 1):
        raise UserError(f"{source}: 'WPCA.0.weight' has shape {list(wpca.shape)}, expected "
                        f"[P, {num_clusters * ENCODER_DIM}, 1, 1] for K={num_clusters} clusters")
    expected = expected_shapes(num_clusters, num_pcs, "pool.conv.bias" in state)
    for key, shape in expected.items():
        if key not in state:
            raise UserError(f"{source}: key {key!r} (shape {list(shape)}) is missing: not a complete NetVLAD "
                            "checkpoint in Patch-NetVLAD's format")
        got = tuple(state[key].shape)
        if got != shape:
            raise UserError(f"{source}: {key!r} has shape {list(got)}, expected {list(shape)} (K={num_clusters}"
                            f"{f', P={num_pcs}' if num_pcs else ''})")
    unexpected = [k for k in state if k not in expected]
    if unexpected:
        raise UserError(f"{source}: unexpected key {unexpected[0]!r} (shape {list(state[unexpected[0]].shape)})"
                        f"{f' and {len(unexpected) - 1} more' if len(unexpected) > 1 else ''}: expected only "
                        "encoder.*, pool.* and WPCA.0.* of a NetVLAD checkpoint (a Patch-NetVLAD one works: its "
                        "global descriptor is the same)")
    model = NetVLADModel(num_clusters, num_pcs, "pool.conv.bias" in state)
    model.load_state_dict({k: v.float() for k, v in state.items()})
    return model.eval()


def load_netvlad_checkpoint(path: Path) -> NetVLADModel:
    """Load a Patch-NetVLAD checkpoint (``{'state_dict': ...}`` or a bare state dict) weights-only
    onto the CPU: the model in eval mode."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"NetVLAD checkpoint {path} not found: download one, e.g. {CHECKPOINT_URL} (also "
                        "mapillary_WPCA4096, and 512-/128-D variants), and pass it with --netvladCkpt")
    try:
        with torch.serialization.safe_globals(numpy_safe_globals()):
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:   # torch raises many error types for bad files
        text = " ".join(str(exc).split())
        raise UserError(f"NetVLAD checkpoint {path} could not be loaded weights-only ({text:.160}): is it a "
                        f"complete Patch-NetVLAD .pth.tar? (e.g. {CHECKPOINT_URL})") from exc
    state = ckpt.get("state_dict", ckpt) if isinstance(ckpt, dict) else None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UserError(f"NetVLAD checkpoint {path} holds no state dict of tensors ('state_dict'): not a "
                        "Patch-NetVLAD checkpoint")
    return model_from_state_dict(state, f"NetVLAD checkpoint {path}")


def file_digest(path: Path) -> str:
    """SHA-256 of a file's bytes (the checkpoint's identity for resuming)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def random_netvlad_state(num_clusters: int = 64, num_pcs: int | None = 4096, seed: int = 0,
                         assignment_bias: bool = False) -> dict[str, torch.Tensor]:
    """A random state dict with the real shapes (for tests and benchmarks; not a trained network):
    He-initialised convs, unit centroids, a vladv1 assignment ``alpha * centroid``."""
    gen = torch.Generator().manual_seed(seed)
    model = NetVLADModel(num_clusters, num_pcs, assignment_bias)
    state = {}
    for key, value in model.state_dict().items():
        if key.startswith("encoder.") and key.endswith(".weight"):
            fan_in = value[0].numel()
            state[key] = torch.randn(value.shape, generator=gen) * (2.0 / fan_in) ** 0.5
        elif key.startswith("encoder."):
            state[key] = torch.randn(value.shape, generator=gen) * 0.01
        else:
            state[key] = torch.randn(value.shape, generator=gen)
    centroids = F.normalize(state["pool.centroids"], dim=1)
    state["pool.centroids"] = centroids
    state["pool.conv.weight"] = (20.0 * centroids)[:, :, None, None].contiguous()
    if num_pcs:
        state["WPCA.0.weight"] /= state["WPCA.0.weight"][0].numel() ** 0.5
    return state


# ---------------------------------------------------------------- images

def natural_key(name: str) -> tuple:
    """Sort key: digit runs compare as numbers (``frame_2`` before ``frame_10``), text case-insensitively."""
    parts = re.split(r"(\d+)", name)
    return tuple(int(p) if i % 2 else p.casefold() for i, p in enumerate(parts)), name


def list_images(src: Path) -> list[Path]:
    """The images of ``src``, in order: a folder's ``.jpg/.jpeg/.png/.bmp`` files (any case, not
    hidden, not recursive) in natural order of their names, or the paths listed in a text file,
    one per line (relative ones relative to the list file), in the file's order. Absolute paths."""
    src = Path(src)
    if src.is_dir():
        paths = sorted((p for p in src.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith(".")
                        and p.is_file()), key=lambda p: natural_key(p.name))
        if not paths:
            raise UserError(f"--images {src}: no {'/'.join(IMAGE_SUFFIXES)} files in this folder")
        return [Path(os.path.abspath(p)) for p in paths]
    if not src.is_file():
        raise UserError(f"--images {src} not found: give a folder of images or a text file with one image path "
                        "per line")
    if src.suffix.lower() in IMAGE_SUFFIXES:
        raise UserError(f"--images {src} is an image: give the folder that holds the images, or a text file "
                        "listing them")
    try:
        lines = src.read_text(encoding="utf-8-sig").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"--images {src}: cannot read it as a text list of image paths ({exc})") from exc
    paths = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        path = Path(line.strip())
        path = path if path.is_absolute() else src.parent / path
        if not path.is_file():
            raise UserError(f"--images {src}, line {number}: image {path} not found (relative paths are relative "
                            "to the list file's folder)")
        paths.append(Path(os.path.abspath(path)))
    if not paths:
        raise UserError(f"--images {src}: the list holds no image paths")
    return paths


def parse_image_size(text: str) -> tuple[int, int] | None:
    """``"W,H"`` -> ``(W, H)``; ``"0"`` -> None (keep each image's own size)."""
    if text.strip() in ("0", "0,0"):
        return None
    m = re.fullmatch(r"\s*(\d+)\s*[,x]\s*(\d+)\s*", text)
    if not m or int(m.group(1)) < 16 or int(m.group(2)) < 16:
        raise UserError(f"--imageSize {text!r}: expected W,H in pixels, each at least 16 (e.g. 640,480), or 0 "
                        "for the original size")
    return int(m.group(1)), int(m.group(2))


def preprocess(image: PILImage.Image, size: tuple[int, int] | None) -> torch.Tensor:
    """A PIL image -> ``[3, H, W]`` float32: RGB, Pillow bilinear resize to ``size`` (W, H) unless
    None, scaled to [0, 1], ImageNet mean/std normalised (what torchvision's Resize, ToTensor,
    Normalize do on a PIL image)."""
    from PIL import Image

    if image.mode == "P":
        image = image.convert("RGBA")        # palette images with transparency convert through RGBA
    if image.mode != "RGB":
        image = image.convert("RGB")         # grey, RGBA, CMYK...: alpha dropped, grey replicated
    if size is not None:
        image = image.resize(size, Image.BILINEAR)
    pixels = torch.from_numpy(np.array(image, dtype=np.uint8, copy=True)).permute(2, 0, 1)
    x = pixels.to(torch.float32).div(255)
    mean = torch.tensor(IMAGENET_MEAN, dtype=torch.float32)[:, None, None]
    std = torch.tensor(IMAGENET_STD, dtype=torch.float32)[:, None, None]
    return x.sub_(mean).div_(std)


class ImageDataset(torch.utils.data.Dataset):
    """Decodes ``paths[i]`` with PIL: ``(i, [3, H, W] tensor, None)``, or ``(i, None, message)`` for an
    image that cannot be read (the caller stops with that message)."""

    def __init__(self, paths: Sequence[Path], size: tuple[int, int] | None) -> None:
        self.paths = list(paths)
        self.size = size

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        from PIL import Image

        try:
            with Image.open(self.paths[i]) as image:
                return i, preprocess(image, self.size), None
        except Exception as exc:   # PIL raises OSError, SyntaxError, ValueError, DecompressionBombError...
            return i, None, f"{type(exc).__name__}: {' '.join(str(exc).split())}"


def _collate(items: list) -> dict:
    """A batch of ``ImageDataset`` items: ``index`` [B], ``errors`` [(i, message)] and ``groups``:
    (positions in the batch, ``[b, 3, H, W]`` stacked images) per image size."""
    groups: dict[tuple[int, ...], list[int]] = {}
    for j, (_, tensor, _) in enumerate(items):
        if tensor is not None:
            groups.setdefault(tuple(tensor.shape), []).append(j)
    return {"index": [i for i, _, _ in items], "errors": [(i, e) for i, _, e in items if e is not None],
            "groups": [(members, torch.stack([items[j][1] for j in members])) for members in groups.values()]}


def _worker_init(_: int) -> None:
    torch.set_num_threads(1)    # decoding workers: leave the cores to the network


# ---------------------------------------------------------------- extraction

@dataclass
class ExtractResult:
    """What a run wrote: ``rows`` x ``dim`` float32 in ``path``, ``resumed_from`` rows already done."""

    path: Path
    images_file: Path
    rows: int
    dim: int
    resumed_from: int
    seconds: float

    @property
    def images_per_second(self) -> float:
        return (self.rows - self.resumed_from) / self.seconds if self.seconds > 0 else float("nan")


def side_files(out: Path) -> tuple[Path, Path, Path]:
    """``OUT.images.txt``, ``OUT.partial.f32`` (finished rows) and ``OUT.partial.json`` (progress)."""
    out = Path(out)
    return (out.with_name(out.name + ".images.txt"), out.with_name(out.name + ".partial.f32"),
            out.with_name(out.name + ".partial.json"))


def run_key(paths: Sequence[Path], checkpoint_id: str, size: tuple[int, int] | None, dim: int) -> str:
    """Identity of a run's result: the image list, the checkpoint, the image size and the output size."""
    record = {"format": PROGRESS_FORMAT, "images": [str(p) for p in paths], "checkpoint": checkpoint_id,
              "image_size": list(size) if size else None, "dim": dim}
    return hashlib.sha256(json.dumps(record, sort_keys=True).encode()).hexdigest()


def _resume_point(partial: Path, progress: Path, key: str, row_bytes: int, n: int) -> int:
    """Rows already finished by an earlier run of the same command (0 when there is none)."""
    if not progress.is_file():
        partial.unlink(missing_ok=True)
        return 0
    try:
        record = json.loads(progress.read_text())
        done = int(record["rows_done"])
        same = record["key"] == key
    except (OSError, ValueError, KeyError, TypeError):
        same, done = False, 0
    size = partial.stat().st_size if partial.is_file() else -1
    if not same or not 0 <= done <= n or size < done * row_bytes:
        log.warning("starting over: %s belongs to another image list, checkpoint or image size (or is damaged)",
                    progress)
        partial.unlink(missing_ok=True)
        progress.unlink(missing_ok=True)
        return 0
    return done


def _write_progress(progress: Path, key: str, done: int, n: int, dim: int) -> None:
    from utils import write_json_atomic

    write_json_atomic({"key": key, "rows_done": done, "rows": n, "dim": dim}, progress)


def _write_final(out: Path, rows: np.ndarray) -> None:
    """``rows`` [N, P] float32 to ``out`` (.npy, or HDF5 dataset ``descriptors``), atomically."""
    from utils import atomic_write

    if out.suffix.lower() == ".npy":
        atomic_write(out, lambda f: np.save(f, rows))
        return
    import h5py

    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    try:
        with h5py.File(tmp, "w") as f:
            f.create_dataset("descriptors", data=rows, chunks=(min(len(rows), 1024), rows.shape[1]))
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, out)
    except OSError as exc:
        raise UserError(f"cannot write {out} ({exc.strerror or exc}): free disk space or choose a writable "
                        "folder") from exc
    finally:
        tmp.unlink(missing_ok=True)


def extract_descriptors(model: NetVLADModel, paths: Sequence[Path], out: Path, *, checkpoint_id: str,
                        image_size: tuple[int, int] | None = DEFAULT_IMAGE_SIZE, batch_size: int = 8,
                        threads: int = 2, device: torch.device | str = "cpu", progress: bool = False,
                        on_batch: Callable[[int], None] | None = None) -> ExtractResult:
    """Descriptors of ``paths`` (in order) into ``out``: float32 ``[len(paths), model.out_dim]``,
    plus ``OUT.images.txt``. Resumes the finished rows of an earlier run with the same images,
    checkpoint (``checkpoint_id``) and image size. ``on_batch(rows_done)`` is called after each
    saved batch. An unreadable image raises ``UserError`` naming it."""
    from tqdm import tqdm

    from utils import atomic_write

    out, device = Path(out), torch.device(device)
    if out.suffix.lower() not in OUT_SUFFIXES:
        raise UserError(f"--out {out}: the file name must end in {', '.join(OUT_SUFFIXES)}")
    images_file, partial, progress_file = side_files(out)
    n, dim = len(paths), model.out_dim
    row_bytes = dim * 4
    key = run_key(paths, checkpoint_id, image_size, dim)
    out.parent.mkdir(parents=True, exist_ok=True)
    start = _resume_point(partial, progress_file, key, row_bytes, n)
    if start:
        log.info("resuming %s: %d of %d images already done", out, start, n)
    model = model.to(device=device, memory_format=torch.channels_last).eval()
    loader = torch.utils.data.DataLoader(
        torch.utils.data.Subset(ImageDataset(paths, image_size), range(start, n)), batch_size=batch_size,
        shuffle=False, num_workers=threads, collate_fn=_collate, pin_memory=device.type == "cuda",
        worker_init_fn=_worker_init if threads else None)
    started = time.perf_counter()
    done = start
    with open(partial, "r+b" if partial.exists() else "wb") as store, \
            tqdm(total=n, initial=start, unit="img", desc="extract", disable=not progress, smoothing=0.1) as bar:
        store.truncate(start * row_bytes)
        store.seek(start * row_bytes)
        for batch in loader:
            if batch["errors"]:
                i, error = batch["errors"][0]
                raise UserError(f"image {paths[i]} (row {i}) cannot be read ({error}): fix or remove it (and "
                                "its position) and run the same command again; finished rows are kept")
            feats = _forward_batch(model, batch["groups"], len(batch["index"]), device)
            store.write(feats.tobytes())
            store.flush()
            os.fsync(store.fileno())
            done += len(batch["index"])
            _write_progress(progress_file, key, done, n, dim)
            bar.update(len(batch["index"]))
            if on_batch is not None:
                on_batch(done)
    seconds = time.perf_counter() - started
    rows = np.memmap(partial, dtype=np.float32, mode="r", shape=(n, dim)) if n else np.zeros((0, dim), np.float32)
    atomic_write(images_file, lambda f: f.write("".join(f"{p}\n" for p in paths).encode()))
    _write_final(out, rows)
    del rows
    partial.unlink(missing_ok=True)
    progress_file.unlink(missing_ok=True)
    return ExtractResult(out, images_file, n, dim, start, seconds)


def _forward_batch(model: NetVLADModel, groups: list[tuple[list[int], torch.Tensor]], size: int,
                   device: torch.device) -> np.ndarray:
    """Groups of equally sized images (positions in the batch, ``[b, 3, H, W]``) -> ``[size, P]``
    float32 descriptors in batch order."""
    out = np.empty((size, model.out_dim), dtype=np.float32)
    with torch.inference_mode():
        for members, images in groups:
            x = images.to(device, non_blocking=True).contiguous(memory_format=torch.channels_last)
            out[members] = model(x).float().cpu().numpy()
    return out


def extract_images(src: Path, checkpoint: Path, out: Path, *, image_size: tuple[int, int] | None = DEFAULT_IMAGE_SIZE,
                   batch_size: int = 8, threads: int = 2, device: torch.device | str = "cpu",
                   progress: bool = False) -> ExtractResult:
    """List the images of ``src``, load ``checkpoint`` and extract into ``out`` (resumable)."""
    paths = list_images(Path(src))
    model = load_netvlad_checkpoint(Path(checkpoint))
    log.info("%d images from %s; NetVLAD K=%d -> %d-D; %s", len(paths), src, model.pool.num_clusters,
             model.out_dim, f"{image_size[0]}x{image_size[1]}" if image_size else "original size")
    return extract_descriptors(model, paths, Path(out), checkpoint_id=file_digest(Path(checkpoint)),
                               image_size=image_size, batch_size=batch_size, threads=threads, device=device,
                               progress=progress)


# ---------------------------------------------------------------- the command

def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(
        mode="extract",
        description="Compute NetVLAD descriptors (Patch-NetVLAD checkpoints) of a folder or list of images: "
                    "one row per image, for --mode prepare --db_descriptors/--q_descriptors.")
    p.add_argument("--images", required=True, metavar="SRC",
                   help="folder of .jpg/.jpeg/.png/.bmp images (natural order of names) or a text file with one "
                        "image path per line (relative to the file)")
    p.add_argument("--netvladCkpt", required=True, metavar="CKPT",
                   help=f"Patch-NetVLAD checkpoint, e.g. {CHECKPOINT_URL}")
    p.add_argument("--out", required=True, help="output .npy or .h5 file: float32 [images, dims]; "
                                                "OUT.images.txt lists each row's image")
    p.add_argument("--imageSize", default="640,480", metavar="W,H",
                   help="resize every image to W,H pixels (bilinear); 0 keeps each image's size")
    p.add_argument("--batchSize", type=int, default=8, help="images per forward pass")
    p.add_argument("--threads", type=int, default=2, help="image-decoding worker processes (0: main process)")
    p.add_argument("--nocuda", action="store_true", help="run on the CPU even when CUDA is available")
    p.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto",
                   help="auto: CUDA when available, else the CPU")
    p.add_argument("--quiet", action="store_true", help="no progress bar or log lines, only the summary")
    return p


def parse_args(argv: list[str]) -> argparse.Namespace:
    """Parse and check ``--mode extract`` options; ``image_size`` is returned separately by
    ``parse_image_size(opt.imageSize)``."""
    opt = build_parser().parse_args(argv)
    parse_image_size(opt.imageSize)
    if opt.batchSize < 1:
        raise UserError(f"--batchSize must be at least 1, got {opt.batchSize}")
    if opt.threads < 0:
        raise UserError(f"--threads must be 0 (decode in the main process) or more, got {opt.threads}")
    if Path(opt.out).suffix.lower() not in OUT_SUFFIXES:
        raise UserError(f"--out {opt.out}: the file name must end in {', '.join(OUT_SUFFIXES)}")
    return opt


def run_extract(argv: list[str]) -> int:
    """``--mode extract`` entry: 0 on success, 2 for bad options, 1 for bad data (one ``error:`` line)."""
    return run_own_mode(parse_args, argv, _extract, interrupted="interrupted: run the same command again to continue",
                        os_error=lambda exc: f"{exc.strerror or exc} ({getattr(exc, 'filename', None) or 'the output'})"
                                             ": check the paths and free disk space")


def _extract(opt: argparse.Namespace) -> None:
    from utils import get_device, progress_enabled, setup_logging

    setup_logging(quiet=opt.quiet)
    device = get_device(opt.nocuda, opt.device)
    result = extract_images(Path(opt.images), Path(opt.netvladCkpt), Path(opt.out),
                            image_size=parse_image_size(opt.imageSize), batch_size=opt.batchSize,
                            threads=opt.threads, device=device, progress=progress_enabled(opt.quiet))
    resumed = f", continuing after {result.resumed_from} done before" if result.resumed_from else ""
    print(f"wrote {result.rows} x {result.dim} descriptors to {result.path} (images listed in "
          f"{result.images_file}){resumed}; {result.images_per_second:.2f} images/s on {device}")
