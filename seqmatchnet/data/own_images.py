"""The descriptors of ``--mode prepare``: which model made a descriptor file, refusing traversals of
different models, and extracting a traversal's images (only the frames a ``--spacing`` keeps)
unless complete descriptors of the same images and model are there already.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from seqmatchnet.common.errors import UserError


def extraction_identity(meta: dict | None) -> tuple | None:
    """(model, checkpoint SHA-256, image size) of a descriptor file's extraction metadata."""
    if meta is None:
        return None
    size = (meta.get("preprocessing") or {}).get("image_size")
    return meta.get("model"), meta.get("weights_sha256"), list(size) if size else None


def refuse_mixed(db: tuple | None, query: tuple | None, where: str) -> None:
    """A one-line ``UserError`` when both traversals' extraction identities are known and differ."""
    if db is None or query is None or db == query:
        return
    differs = ("models" if db[0] != query[0] else "checkpoints" if db[1] != query[1]
               else "image sizes")
    raise UserError(f"the database descriptors are {db[0]} (checkpoint {str(db[1])[:12]}, image "
                    f"size {db[2]}) but the query descriptors {query[0]} (checkpoint "
                    f"{str(query[1])[:12]}, image size {query[2]}) ({where}): different {differs} "
                    "do not match; extract both traversals with the same --model, --weights and "
                    "--imageSize")


def check_same_model(desc_paths: list[Path]) -> None:
    """Refuse database and query descriptors that ``--mode extract`` made with different models,
    checkpoints or image sizes (read from their ``OUT.model.json``; files without one pass)."""
    from seqmatchnet.images.extraction import read_metadata

    db, query = (extraction_identity(read_metadata(p)) for p in desc_paths)
    refuse_mixed(db, query, f"from the .model.json files next to {desc_paths[0]} and "
                            f"{desc_paths[1]}")


@dataclass(frozen=True)
class Extraction:
    """A loaded image model ready to extract: the model, its image size, the checkpoint's file and
    SHA-256, and the ``ExtractSettings``."""

    model: object
    size: tuple | None
    weights: Path
    checkpoint_id: str
    settings: object

    @property
    def identity(self) -> tuple:
        return self.model.name, self.checkpoint_id, list(self.size) if self.size else None


def complete_descriptors(out: Path, paths: Sequence[Path], identity: tuple) -> bool:
    """``out`` holds finished descriptors of exactly ``paths`` made with ``identity`` (model,
    checkpoint, image size): no interrupted run beside it, the same image list, the same rows."""
    from seqmatchnet.images.extraction import read_metadata, side_files

    images_file, partial, progress = side_files(out)
    if not out.is_file() or partial.exists() or progress.exists() or not images_file.is_file():
        return False
    meta = read_metadata(out)
    if extraction_identity(meta) != identity or meta.get("rows") != len(paths):
        return False
    try:
        listed = images_file.read_text().splitlines()
        rows = np.load(out, mmap_mode="r").shape[0] if out.suffix.lower() == ".npy" else None
    except (OSError, ValueError):
        return False
    return listed == [str(p) for p in paths] and rows in (None, len(paths))


def extract_or_reuse(job: Extraction, paths: Sequence[Path], out: Path, side: str) -> Path:
    """Descriptors of ``paths`` in ``out``: reused when complete for the same images and model
    (saying so in one line), else extracted (resuming an interrupted run)."""
    from seqmatchnet.images import extraction

    if complete_descriptors(out, paths, job.identity):
        print(f"{side}: reusing the complete descriptors of the same {len(paths)} images and "
              f"model in {out} (delete it to extract again)")
        return out
    from seqmatchnet.data.bag_frames import is_frame_list

    settings = job.settings
    if is_frame_list(paths):            # a bag's frames: read in order, in the main process
        settings = dataclasses.replace(settings, threads=0)
    return extraction.extract_descriptors(
        job.model, paths, out, checkpoint_id=job.checkpoint_id, settings=settings,
        weights=job.weights).path
