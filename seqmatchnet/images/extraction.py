"""``python main.py --mode extract``: images -> global descriptors (one row per image).

The models (``image_models.py``): ``netvlad`` (Patch-NetVLAD's NetVLAD + WPCA, VGG16), ``cosplace``
and ``eigenplaces`` (ResNet or VGG16 + GeM + linear layer) and ``mixvpr`` (ResNet-50 to layer3 +
feature mixer), all built with torchvision from their authors' released checkpoints (``--weights
FILE``; ``--netvladCkpt`` is NetVLAD's spelling). Images are read with Pillow and go through
torchvision's transforms: RGB, resize (Pillow bilinear) to the model's default size or
``--imageSize``, ``ToTensor``, ImageNet ``Normalize``.

The output is ``.npy`` or HDF5, float32 ``[N, D]``, with the sidecars ``OUT.images.txt`` (each
row's image) and ``OUT.model.json`` (the model, its checkpoint's SHA-256 and the preprocessing,
which ``--mode prepare`` compares between the two traversals). A run stores its finished rows in
``OUT.partial.f32`` with a progress record ``OUT.partial.json``; the same command run again
continues from there, and the final file appears atomically.
"""
from __future__ import annotations

import dataclasses
import functools
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
from torch import nn

from seqmatchnet.common.errors import UserError
from seqmatchnet.common.files import atomic_write, write_json_atomic
from seqmatchnet.images import netvlad, registry

# IMAGENET_MEAN and IMAGENET_STD are re-exported
from seqmatchnet.images.base import IMAGENET_MEAN, IMAGENET_STD, ImageModel  # noqa: F401

if TYPE_CHECKING:
    from PIL import Image as PILImage

log = logging.getLogger(__name__)


IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp")
OUT_SUFFIXES = (".npy", ".h5", ".hdf5")
DEFAULT_IMAGE_SIZE = netvlad.NETVLAD_SIZE  # NetVLAD's (width, height), as Patch-NetVLAD's configs
MODEL_DEFAULT = "model default"                 # image_size: the model's own default
CPU_CHUNK_PIXELS = 400_000          # pixels per forward pass on the CPU (see _forward_batch)
PROGRESS_FORMAT = 2
METADATA_FORMAT = 1


# ---------------------------------------------------------------- checkpoints

def file_digest(path: Path) -> str:
    """SHA-256 of a file's bytes (the checkpoint's identity for resuming)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()



# ---------------------------------------------------------------- images

def natural_key(name: str) -> tuple:
    """Sort key: digit runs compare as numbers (``frame_2`` before ``frame_10``), text
    case-insensitively."""
    parts = re.split(r"(\d+)", name)
    return tuple(int(p) if i % 2 else p.casefold() for i, p in enumerate(parts)), name


def list_images(src: Path) -> list[Path]:
    """The images of ``src``, in order: a folder's ``.jpg/.jpeg/.png/.bmp`` files (any case, not
    hidden, not recursive) in natural order of their names, or the paths listed in a text file,
    one per line (relative ones relative to the list file), in the file's order. Absolute paths."""
    src = Path(src)
    if src.is_dir():
        paths = sorted((p for p in src.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES
                        and not p.name.startswith(".")
                        and p.is_file()), key=lambda p: natural_key(p.name))
        if not paths:
            raise UserError(f"--images {src}: no {'/'.join(IMAGE_SUFFIXES)} files in this folder")
        return [Path(os.path.abspath(p)) for p in paths]
    if not src.is_file():
        raise UserError(f"--images {src} not found: give a folder of images or a text file with "
                        "one image path per line")
    if src.suffix.lower() in IMAGE_SUFFIXES:
        raise UserError(f"--images {src} is an image: give the folder that holds the images, or a "
                        "text file listing them")
    try:
        lines = src.read_text(encoding="utf-8-sig").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"--images {src}: cannot read it as a text list of image paths "
                        f"({exc})") from exc
    paths = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        path = Path(line.strip())
        path = path if path.is_absolute() else src.parent / path
        if not path.is_file():
            raise UserError(f"--images {src}, line {number}: image {path} not found (relative "
                            "paths are relative to the list file's folder)")
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
        raise UserError(f"--imageSize {text!r}: expected W,H in pixels, each at least 16 (e.g. "
                        "640,480), or 0 for the original size")
    return int(m.group(1)), int(m.group(2))


def to_rgb(image: PILImage.Image) -> PILImage.Image:
    """Any Pillow image as RGB: grey replicated, alpha dropped, palettes through RGBA."""
    if image.mode == "P":
        image = image.convert("RGBA")        # palette images with transparency convert through RGBA
    return image if image.mode == "RGB" else image.convert("RGB")


@functools.lru_cache(maxsize=16)
def image_transform(size: tuple[int, int] | None, mean: tuple[float, ...] = IMAGENET_MEAN,
                    std: tuple[float, ...] = IMAGENET_STD, resize: str = "bilinear") -> Callable:
    """torchvision's evaluation transform: ``Resize`` to ``size`` (W, H) unless None, ``ToTensor``
    (to [0, 1]), ``Normalize(mean, std)``. ``resize`` ``"bilinear"``: Pillow bilinear on the image
    before ``ToTensor``; ``"bicubic"``: bicubic with antialias on the tensor after it (BoQ)."""
    from torchvision import transforms as T

    to_unit, normalise = T.ToTensor(), T.Normalize(mean, std)      # to [0, 1], then ImageNet's
    if size and resize == "bicubic":
        return T.Compose([to_unit, T.Resize((size[1], size[0]), antialias=True,
                                            interpolation=T.InterpolationMode.BICUBIC), normalise])
    scale = [T.Resize((size[1], size[0]),
                      interpolation=T.InterpolationMode.BILINEAR)] if size else []
    return T.Compose([*scale, to_unit, normalise])


def preprocess(image: PILImage.Image, size: tuple[int, int] | None,
               mean: tuple[float, ...] = IMAGENET_MEAN,
               std: tuple[float, ...] = IMAGENET_STD, resize: str = "bilinear") -> torch.Tensor:
    """A PIL image -> ``[3, H, W]`` float32 through ``to_rgb`` and ``image_transform``."""
    return image_transform(size, tuple(mean), tuple(std), resize)(to_rgb(image))


class ImageDataset(torch.utils.data.Dataset):
    """Decodes ``paths[i]`` with PIL: ``(i, [3, H, W] tensor, None)``, or ``(i, None, message)`` for
    an image that cannot be read (the caller stops with that message)."""

    def __init__(self, paths: Sequence[Path], size: tuple[int, int] | None,
                 mean: tuple[float, ...] = IMAGENET_MEAN,
                 std: tuple[float, ...] = IMAGENET_STD, resize: str = "bilinear") -> None:
        self.paths = list(paths)
        self.size, self.mean, self.std, self.resize = size, tuple(mean), tuple(std), resize

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        from PIL import Image

        try:
            with Image.open(self.paths[i]) as image:
                return i, preprocess(image, self.size, self.mean, self.std, self.resize), None
        # PIL raises OSError, SyntaxError, ValueError, DecompressionBombError...
        except Exception as exc:
            return i, None, f"{type(exc).__name__}: {' '.join(str(exc).split())}"


def _collate(items: list) -> dict:
    """A batch of ``ImageDataset`` items: ``index`` [B], ``errors`` [(i, message)] and ``groups``:
    (positions in the batch, ``[b, 3, H, W]`` stacked images) per image size."""
    groups: dict[tuple[int, ...], list[int]] = {}
    for j, (_, tensor, _) in enumerate(items):
        if tensor is not None:
            groups.setdefault(tuple(tensor.shape), []).append(j)
    return {"index": [i for i, _, _ in items],
            "errors": [(i, e) for i, _, e in items if e is not None],
            "groups": [(members, torch.stack([items[j][1] for j in members]))
                       for members in groups.values()]}


def _worker_init(_: int) -> None:
    torch.set_num_threads(1)    # decoding workers: leave the cores to the network


# ---------------------------------------------------------------- extraction

@dataclass
class ExtractResult:
    """What a run wrote: ``rows`` x ``dim`` float32 in ``path``, ``resumed_from`` rows already
    done."""

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
    """``OUT.images.txt``, ``OUT.partial.f32`` (finished rows) and ``OUT.partial.json``
    (progress)."""
    out = Path(out)
    return (out.with_name(out.name + ".images.txt"), out.with_name(out.name + ".partial.f32"),
            out.with_name(out.name + ".partial.json"))


def metadata_file(out: Path) -> Path:
    """``OUT.model.json``: the model, its checkpoint and the preprocessing that made ``OUT``."""
    out = Path(out)
    return out.with_name(out.name + ".model.json")


def read_metadata(descriptors: Path) -> dict | None:
    """The extraction metadata next to a descriptor file, or None when there is none (descriptors
    made elsewhere) or it cannot be read."""
    path = metadata_file(descriptors)
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) and "model" in record else None


def run_key(paths: Sequence[Path], checkpoint_id: str, size: tuple[int, int] | None, dim: int,
            model: str = "netvlad") -> str:
    """Identity of a run's result: the image list, the model and checkpoint, the image size and the
    output size."""
    record = {"format": PROGRESS_FORMAT, "images": [str(p) for p in paths],
              "checkpoint": checkpoint_id,
              "model": model, "image_size": list(size) if size else None, "dim": dim}
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
        log.warning("starting over: %s belongs to another image list, checkpoint or image size "
                    "(or is damaged)",
                    progress)
        partial.unlink(missing_ok=True)
        progress.unlink(missing_ok=True)
        return 0
    return done


def _write_progress(progress: Path, key: str, done: int, n: int, dim: int) -> None:

    write_json_atomic({"key": key, "rows_done": done, "rows": n, "dim": dim}, progress)


def _write_final(out: Path, rows: np.ndarray) -> None:
    """``rows`` [N, P] float32 to ``out`` (.npy, or HDF5 dataset ``descriptors``), atomically."""

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
        raise UserError(f"cannot write {out} ({exc.strerror or exc}): free disk space or choose a "
                        "writable folder") from exc
    finally:
        tmp.unlink(missing_ok=True)


def as_image_model(model: ImageModel | nn.Module) -> ImageModel:
    """An ``ImageModel``; a bare network with ``out_dim`` (e.g. a ``NetVLADModel``) is taken as
    NetVLAD."""
    if isinstance(model, ImageModel):
        return model
    return ImageModel("netvlad", model, model.out_dim, "NetVLAD", DEFAULT_IMAGE_SIZE)


@dataclass(frozen=True)
class ExtractSettings:
    """How images become descriptors: ``image_size`` (W, H), None (each image's own size) or
    ``MODEL_DEFAULT``; ``batch_size`` images per forward pass; ``threads`` decoding workers (0: in
    the main process); the ``device``; a progress bar when ``progress``."""

    image_size: tuple[int, int] | None | str = MODEL_DEFAULT
    batch_size: int = 8
    threads: int = 2
    device: torch.device | str = "cpu"
    progress: bool = False


def extract_descriptors(model: ImageModel | nn.Module, paths: Sequence[Path], out: Path, *,
                        checkpoint_id: str, settings: ExtractSettings = ExtractSettings(),
                        on_batch: Callable[[int], None] | None = None,
                        weights: Path | None = None) -> ExtractResult:
    """Descriptors of ``paths`` (in order) into ``out``: float32 ``[len(paths), model.dim]``, plus
    ``OUT.images.txt`` and ``OUT.model.json``, as ``settings`` say. Resumes the finished rows of
    an earlier run with the same images, model, checkpoint (``checkpoint_id``) and image size.
    ``on_batch(rows_done)`` is called after each saved batch. An unreadable image raises
    ``UserError`` naming it."""
    image_size, batch_size, threads = settings.image_size, settings.batch_size, settings.threads
    device, progress = settings.device, settings.progress
    model = as_image_model(model)
    size = model.default_size if isinstance(image_size, str) else image_size
    model.check_size(size)
    out, device = Path(out), torch.device(device)
    if out.suffix.lower() not in OUT_SUFFIXES:
        raise UserError(f"--out {out}: the file name must end in {', '.join(OUT_SUFFIXES)}")
    images_file, partial, progress_file = side_files(out)
    n, dim = len(paths), model.dim
    key = run_key(paths, checkpoint_id, size, dim, model.name)
    out.parent.mkdir(parents=True, exist_ok=True)
    start = _resume_point(partial, progress_file, key, dim * 4, n)
    if start:
        log.info("resuming %s: %d of %d images already done", out, start, n)
    network = model.network.to(device=device, memory_format=torch.channels_last).eval()
    # workers only pay off when they decode one batch while the network runs another
    workers = threads if n - start > batch_size else 0
    loader = torch.utils.data.DataLoader(
        torch.utils.data.Subset(ImageDataset(paths, size, model.mean, model.std, model.resize),
                                range(start, n)),
        batch_size=batch_size, shuffle=False, num_workers=workers, collate_fn=_collate,
        pin_memory=device.type == "cuda", worker_init_fn=_worker_init if workers else None)
    started = time.perf_counter()
    _run_batches(network, loader, paths, partial, (start, n, dim), device, progress,
                 lambda done: (_write_progress(progress_file, key, done, n, dim),
                               on_batch and on_batch(done)))
    seconds = time.perf_counter() - started
    rows = np.memmap(partial, dtype=np.float32, mode="r",
                     shape=(n, dim)) if n else np.zeros((0, dim), np.float32)
    _write_sidecars(out, paths, model, size, checkpoint_id, weights)
    _write_final(out, rows)
    del rows
    partial.unlink(missing_ok=True)
    progress_file.unlink(missing_ok=True)
    return ExtractResult(out, images_file, n, dim, start, seconds)


def _run_batches(network: nn.Module, loader, paths: Sequence[Path], partial: Path,
                 counts: tuple[int, int, int],
                 device: torch.device, progress: bool, saved: Callable[[int], object]) -> None:
    """Forward every batch of ``loader`` and append its rows to ``partial`` (fsynced), calling
    ``saved(rows_done)`` after each. ``counts``: (first row, rows, dimensions)."""
    from seqmatchnet.common.logs import progress as progress_bar

    start, n, dim = counts
    done = start
    with open(partial, "r+b" if partial.exists() else "wb") as store, \
            progress_bar(total=n, initial=start, unit="img", desc="extract", disable=not progress,
                 smoothing=0.1) as bar:
        store.truncate(start * dim * 4)
        store.seek(start * dim * 4)
        for batch in loader:
            if batch["errors"]:
                i, error = batch["errors"][0]
                raise UserError(f"image {paths[i]} (row {i}) cannot be read ({error}): fix or "
                                "remove it (and its position) and run the same command again; "
                                "finished rows are kept")
            feats = _forward_batch(network, dim, batch["groups"], len(batch["index"]), device)
            store.write(feats.tobytes())
            store.flush()
            os.fsync(store.fileno())
            done += len(batch["index"])
            saved(done)
            bar.update(len(batch["index"]))


def _forward_batch(network: nn.Module, dim: int, groups: list[tuple[list[int], torch.Tensor]],
                   size: int,
                   device: torch.device) -> np.ndarray:
    """Groups of equally sized images (positions in the batch, ``[b, 3, H, W]``) -> ``[size, dim]``
    float32 descriptors in batch order. On the CPU a group goes through in chunks of at most
    ``CPU_CHUNK_PIXELS`` (at least one image): larger batches are slower there (the activations
    leave the caches), e.g. ResNet-50 at 640x480 runs 4 images at 0.83x the rate of one."""
    out = np.empty((size, dim), dtype=np.float32)
    with torch.inference_mode():
        for members, images in groups:
            step = len(members) if device.type != "cpu" else max(
                1, CPU_CHUNK_PIXELS // (images.shape[-1] * images.shape[-2]))
            for lo in range(0, len(members), step):
                x = images[lo:lo + step].to(device, non_blocking=True)
                x = x.contiguous(memory_format=torch.channels_last)
                out[members[lo:lo + step]] = network(x).float().cpu().numpy()
    return out


def _write_sidecars(out: Path, paths: Sequence[Path], model: ImageModel,
                    size: tuple[int, int] | None,
                    checkpoint_id: str, weights: Path | None) -> None:
    """``OUT.images.txt`` and ``OUT.model.json`` (atomically, before ``OUT`` itself)."""

    images_file = side_files(out)[0]
    atomic_write(images_file, lambda f: f.write("".join(f"{p}\n" for p in paths).encode()))
    write_json_atomic({"format": METADATA_FORMAT, "model": model.name,
                       "title": registry.TITLES[model.name],
                       "architecture": model.architecture, "dim": model.dim, "rows": len(paths),
                       "weights": str(Path(weights).resolve()) if weights else None,
                       "weights_sha256": checkpoint_id,
                       "preprocessing": model.preprocessing(size), "images": images_file.name},
                      metadata_file(out))


def load_for_extraction(model: str, weights: Path,
                        image_size: tuple[int, int] | None
                        | str = MODEL_DEFAULT) -> tuple[ImageModel, tuple | None]:
    """Load checkpoint ``weights`` as ``model`` and resolve the image size (the model's default
    unless given), checked against the model: ``(image model, size)``."""
    loaded = registry.load_model(model, Path(weights))
    size = loaded.default_size if isinstance(image_size, str) else image_size
    loaded.check_size(size)
    return loaded, size


def extract_images(src: Path, checkpoint: Path, out: Path, *, model: str = "netvlad",
                   settings: ExtractSettings = ExtractSettings()) -> ExtractResult:
    """List the images of ``src``, load ``checkpoint`` as ``model`` and extract into ``out``
    (resumable), as ``settings`` say."""
    paths = list_images(Path(src))
    loaded, size = load_for_extraction(model, Path(checkpoint), settings.image_size)
    log.info("%d images from %s; %s: %s -> %d-D; %s", len(paths), src, registry.TITLES[model],
             loaded.architecture, loaded.dim,
             f"{size[0]}x{size[1]}" if size else "each image at its own size")
    return extract_descriptors(loaded, paths, Path(out),
                               checkpoint_id=file_digest(Path(checkpoint)),
                               settings=dataclasses.replace(settings, image_size=size),
                               weights=Path(checkpoint))
