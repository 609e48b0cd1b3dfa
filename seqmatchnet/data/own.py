"""``python main.py --mode prepare``: turn your own descriptors and positions into a dataset.

Input, per traversal (database/reference and query): a descriptor file (``.npy``, or HDF5 with one
2-D dataset), one row per frame in capture order, and a positions CSV with a header and one line per
frame in the same order:

- ``x,y`` or ``easting,northing`` (metres), or ``lat,lon`` (degrees; converted
  to local metres, equirectangular around the mean of all frames of both
  traversals);
- optional ``timestamp`` (numbers or ISO 8601), checked to increase;
- optional ``sequence_id``: a sequence is a run of consecutive rows with the
  same id, and no sequence window (docs/how-it-works.md) crosses two sequences.

Output, in ``--structPath``: ``custom_<name>_{train,val,test}.db`` (struct files like the real
ones), ``custom_<name>_splitInds.npz``,
``seqBoundsFiles/custom_<name>_<split>_{database,query}_seqBounds.txt`` (always written: one ``lo
hi`` line per frame of the split, its run of consecutive rows with one sequence id, relative to the
split's own row list) and, last, ``custom_<name>.json``, which ``--dataset custom:<name>`` reads
(see ``get_datasets._custom``). The descriptor files are referenced by absolute path, not copied.

Instead of a descriptor file, a traversal can be given as images (``--db_images`` /
``--q_images``: a folder or a list file, see extract.py) with ``--model M --weights FILE`` (or
``--netvladCkpt FILE``) and optionally ``--imageSize``: their descriptors are extracted first
(resumably, at the model's defaults unless ``--imageSize`` is given) into
``custom_<name>_descriptors/{database,query}.npy`` in ``--structPath``. Descriptor files made by
``--mode extract`` carry their model in ``OUT.model.json``: two traversals extracted with
different models, checkpoints or image sizes are refused.
"""
from __future__ import annotations

import argparse
import math
import re
from pathlib import Path

import numpy as np

from seqmatchnet.common.errors import UserError
from seqmatchnet.common.files import atomic_write, write_json_atomic
from seqmatchnet.common.logs import progress_enabled
from seqmatchnet.common.runtime import get_device
from seqmatchnet.data.descriptors import open_descriptors
from seqmatchnet.data.positions import Positions, latlon_origin, latlon_to_local, read_positions

SPLITS = ("train", "val", "test")
SIDES = ("database", "query")
OUTLIER_FACTOR = 100.0              # a frame this many median steps from its neighbours is a glitch
IMAGE_MODELS = ("netvlad", "cosplace", "eigenplaces", "mixvpr")      # image_models.MODELS
NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")
# more frame names than this are written as a char matrix, not cells
CELL_NAMES_MAX = 100_000


def check_image_options(opt: argparse.Namespace) -> None:
    """``--model/--weights/--netvladCkpt/--imageSize`` go with ``--db_images``/``--q_images``; sets
    ``opt.model``/``opt.weights`` (``--netvladCkpt`` is ``--model netvlad --weights``)."""
    uses_images = bool(opt.db_images or opt.q_images)
    given = [f"--{k}" for k in ("model", "weights", "netvladCkpt", "imageSize")
             if getattr(opt, k) is not None]
    if not uses_images:
        if given:
            raise UserError(f"{given[0]} is only used with --db_images/--q_images (to extract "
                            "their descriptors)")
        return
    if opt.netvladCkpt and (opt.weights or opt.model not in (None, "netvlad")):
        raise UserError("--netvladCkpt is NetVLAD's checkpoint: give either it or --model M "
                        "--weights FILE")
    if opt.netvladCkpt:
        opt.model, opt.weights = "netvlad", opt.netvladCkpt
    if not opt.weights or not opt.model:
        raise UserError("--db_images/--q_images need --model and --weights (or --netvladCkpt): "
                        f"the checkpoint to extract with ({'|'.join(IMAGE_MODELS)})")
    if opt.imageSize is not None:
        from seqmatchnet.images.extraction import (
            parse_image_size,  # extract loads torchvision: only when images are given
        )

        parse_image_size(opt.imageSize)


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


# ---------------------------------------------------------------- sequences and checks

def run_starts(rows: np.ndarray, seq_ids: np.ndarray | None) -> np.ndarray:
    """Start positions (into ``rows``) of the runs of consecutive row numbers with the same sequence
    id."""
    rows = np.asarray(rows, dtype=np.int64)
    if len(rows) == 0:
        return np.zeros(0, dtype=np.int64)
    breaks = np.diff(rows) != 1
    if seq_ids is not None:
        ids = seq_ids[rows]
        breaks |= ids[1:] != ids[:-1]
    return np.concatenate([[0], np.flatnonzero(breaks) + 1]).astype(np.int64)


def run_bounds(rows: np.ndarray, seq_ids: np.ndarray | None) -> np.ndarray:
    """Per frame of ``rows``, its run ``[lo, hi)`` as positions into ``rows``: [len(rows), 2]."""
    starts = run_starts(rows, seq_ids)
    if len(starts) == 0:
        return np.zeros((0, 2), dtype=np.int64)
    ends = np.append(starts[1:], len(rows))
    lengths = ends - starts
    return np.stack([np.repeat(starts, lengths), np.repeat(ends, lengths)], axis=1)


def check_traversal(pos: Positions, metres: np.ndarray, seq_len: int, label: str) -> None:
    """Timestamps increase, no position glitches, every sequence has at least ``seq_len`` frames."""
    n = len(metres)
    bounds = run_bounds(np.arange(n), pos.sequence_ids)
    short = np.flatnonzero(bounds[:, 1] - bounds[:, 0] < seq_len)
    if len(short):
        lo, hi = int(bounds[short[0], 0]), int(bounds[short[0], 1])
        which = (f"sequence {pos.sequence_ids[lo]!r}" if pos.sequence_ids is not None
                 else "the traversal")
        raise UserError(f"{label} positions {pos.path}: {which} has {hi - lo} frame(s) (rows "
                        f"{lo}..{hi - 1}), fewer than --seqL {seq_len}: remove it (from the CSV "
                        "and the descriptors) or lower --seqL")
    same_run = bounds[1:, 0] == bounds[:-1, 0]           # row i and i+1 belong to one sequence
    if pos.timestamps is not None:
        dt = np.diff(pos.timestamps)
        bad = np.flatnonzero(same_run & (dt <= 0))
        if len(bad):
            i = int(bad[0]) + 1
            what = "repeats" if dt[bad[0]] == 0 else "is earlier than"
            raise UserError(f"{label} positions: the timestamp of {pos.where(i)} "
                            f"({pos.timestamps[i]:.17g}) {what} the previous frame's "
                            f"({pos.timestamps[i - 1]:.17g}): rows must be in capture order, one "
                            "per frame")
    step = np.linalg.norm(np.diff(metres, axis=0), axis=1)
    step = np.where(same_run, step, np.nan)               # no step across two sequences
    # only one-frame sequences: nothing to compare
    if not np.isfinite(step).any():
        return
    moving = step[np.isfinite(step) & (step > 0)]
    if len(moving) == 0:
        raise UserError(f"{label} positions {pos.path}: all frames of each sequence have the same "
                        "position: check the position columns")
    median = float(np.median(moving))
    limit = OUTLIER_FACTOR * median
    # distance to the previous frame of the same sequence
    before = np.r_[np.nan, step]
    after = np.r_[step, np.nan]
    # NaN (no neighbour) counts as far
    far_before, far_after = ~(before <= limit), ~(after <= limit)
    has_neighbour = np.isfinite(before) | np.isfinite(after)
    outlier = far_before & far_after & has_neighbour
    if outlier.any():
        i = int(np.argmax(outlier))
        dist = np.nanmin([before[i], after[i]])
        raise UserError(f"{label} positions: {pos.where(i)} is {dist:.1f} m from its neighbouring "
                        f"frame(s), more than {OUTLIER_FACTOR:g}x the median step ({median:.2f} "
                        "m): a GPS glitch? fix or remove that frame (in the CSV and the "
                        "descriptors)")


# ---------------------------------------------------------------- splits

def parse_rows(text: str, flag: str, n_db: int, n_q: int) -> tuple[np.ndarray, np.ndarray]:
    """``DB_A:DB_B,Q_A:Q_B`` -> (db rows, q rows), half-open ranges."""
    parts = text.split(",")
    if len(parts) != 2:
        raise UserError(f"--{flag} {text!r}: expected DB_A:DB_B,Q_A:Q_B (row ranges [A, B) of "
                        "both traversals)")
    out = []
    for part, side, n in zip(parts, SIDES, (n_db, n_q)):
        m = re.fullmatch(r"\s*(\d+)\s*:\s*(\d+)\s*", part)
        if not m:
            raise UserError(f"--{flag} {text!r}: {part!r} is not a row range A:B")
        a, b = int(m.group(1)), int(m.group(2))
        if not a < b <= n:
            raise UserError(f"--{flag}: {side} rows {a}:{b} must satisfy A < B <= {n} (the {side} "
                            f"traversal has {n} frames)")
        out.append(np.arange(a, b, dtype=np.int64))
    return out[0], out[1]


def explicit_splits(opt: argparse.Namespace, n_db: int, n_q: int) -> dict:
    splits = {s: parse_rows(getattr(opt, f"{s}_rows"), f"{s}_rows", n_db, n_q) for s in SPLITS}
    for k, side in enumerate(SIDES):
        for i, a in enumerate(SPLITS):
            for b in SPLITS[i + 1:]:
                ra, rb = splits[a][k], splits[b][k]
                if ra[0] < rb[-1] + 1 and rb[0] < ra[-1] + 1:
                    raise UserError(f"--{a}_rows and --{b}_rows overlap in the {side} traversal "
                                    f"(rows {ra[0]}:{ra[-1] + 1} and {rb[0]}:{rb[-1] + 1}): a "
                                    "frame can be in one split only")
    return splits


def parse_fractions(text: str | None) -> tuple[float, float, float]:
    text = text or "0.6,0.15,0.25"
    try:
        fr = tuple(float(v) for v in text.split(","))
    except ValueError:
        fr = ()
    if len(fr) != 3 or not all(math.isfinite(f) and f > 0 for f in fr) or abs(sum(fr) - 1) > 1e-6:
        raise UserError(f"--splits {text!r}: expected three positive fractions train,val,test "
                        "that sum to 1 (e.g. 0.6,0.15,0.25)")
    return fr


def fraction_splits(fractions, db_pos: np.ndarray, q_pos: np.ndarray,
                    margin: float) -> tuple[dict, int]:
    """Database rows cut in capture order; each query goes to its nearest database frame's split and
    is dropped when a database frame of another split is within ``margin`` metres. Returns (splits,
    dropped)."""
    from scipy.spatial import cKDTree

    n_db = len(db_pos)
    cuts = np.rint(np.cumsum(fractions)[:2] * n_db).astype(int)
    db_split = np.searchsorted(cuts, np.arange(n_db), side="right")     # 0, 1, 2 per database row
    nearest = cKDTree(db_pos).query(q_pos)[1]
    q_split = db_split[nearest]
    keep = np.ones(len(q_pos), dtype=bool)
    for k in range(3):
        others = db_split != k
        if not others.any():
            continue
        d = cKDTree(db_pos[others]).query(q_pos)[0]
        keep &= ~((q_split == k) & (d <= margin))
    splits = {s: (np.flatnonzero(db_split == k), np.flatnonzero((q_split == k) & keep))
              for k, s in enumerate(SPLITS)}
    return splits, int((~keep).sum())


def drop_short_runs(rows: np.ndarray, seq_ids: np.ndarray | None,
                    seq_len: int) -> tuple[np.ndarray, int]:
    """Remove the frames of runs shorter than ``seq_len`` (pieces cut off at split boundaries)."""
    bounds = run_bounds(rows, seq_ids)
    keep = bounds[:, 1] - bounds[:, 0] >= seq_len
    return rows[keep], int((~keep).sum())


# ---------------------------------------------------------------- writing

def file_names(name: str) -> dict:
    """Paths relative to --structPath of everything ``prepare`` writes."""
    return {
        "struct_files": {s: f"custom_{name}_{s}.db" for s in SPLITS},
        "split_inds": f"custom_{name}_splitInds.npz",
        "bounds_files": {s: [f"seqBoundsFiles/custom_{name}_{s}_{side}_seqBounds.txt"
                             for side in SIDES]
                         for s in SPLITS},
        "config": f"custom_{name}.json",
    }


def make_struct(name: str, split: str, db_rows: np.ndarray, q_rows: np.ndarray, db_pos: np.ndarray,
                q_pos: np.ndarray, pos_thr: float, non_triv_sq: float) -> dict:
    """A ``dbStruct`` with the fields of the real struct files (positions as [2, N])."""
    def names(side: str, rows: np.ndarray) -> np.ndarray:
        text = np.char.add(f"custom_{name}/{side}/", np.char.zfill(np.asarray(rows).astype(str), 6))
        if len(rows) > CELL_NAMES_MAX:      # a char matrix: writing a million cells takes minutes
            return text
        cell = np.empty((len(rows), 1), dtype=object)
        cell[:, 0] = text
        return cell

    return {"whichSet": split, "dbImageFns": names("database", db_rows),
            "qImageFns": names("query", q_rows),
            "numImages": len(db_rows), "numQueries": len(q_rows), "posDistThr": float(pos_thr),
            "posDistSqThr": float(pos_thr) ** 2, "nonTrivPosDistSqThr": float(non_triv_sq),
            "dataset": f"custom_{name}", "utmDb": db_pos[db_rows].T.copy(),
            "utmQ": q_pos[q_rows].T.copy()}


def write_dataset(struct_dir: Path, names: dict, structs: dict, splits: dict, bounds: dict,
                  config: dict) -> None:
    """Everything atomically, the JSON config (which makes the dataset usable) last."""
    import scipy.io


    # a half-rewritten dataset must not look complete
    (struct_dir / names["config"]).unlink(missing_ok=True)
    for s in SPLITS:
        atomic_write(struct_dir / names["struct_files"][s],
                     lambda f, st=structs[s]: scipy.io.savemat(f, {"dbStruct": st}, appendmat=False,
                                                               format="5"))
    inds = {}
    for s in SPLITS:
        pair = np.empty(2, dtype=object)
        pair[0], pair[1] = splits[s]
        inds[f"{s}Inds"] = pair
    atomic_write(struct_dir / names["split_inds"], lambda f: np.savez(f, **inds))
    for s in SPLITS:
        for rel, b in zip(names["bounds_files"][s], bounds[s]):
            atomic_write(struct_dir / rel, lambda f, b=b: np.savetxt(f, b, fmt="%d"))
    write_json_atomic(config, struct_dir / names["config"])


# ---------------------------------------------------------------- the command

def descriptor_files(opt: argparse.Namespace, struct_dir: Path) -> list[Path]:
    """The database and query descriptor files: as given, or extracted from ``--db_images`` /
    ``--q_images`` into ``custom_<name>_descriptors/`` (checked against the positions CSVs
    first)."""
    if not opt.weights:
        return [Path(opt.db_descriptors), Path(opt.q_descriptors)]
    from seqmatchnet.cli import extract
    from seqmatchnet.images import extraction

    out_dir = struct_dir / f"custom_{opt.name}_descriptors"
    jobs = []
    for side, flag, images, csv_file in (("database", "--db_images", opt.db_images,
                                          opt.db_positions),
                                         ("query", "--q_images", opt.q_images, opt.q_positions)):
        if images is None:
            continue
        paths = extraction.list_images(Path(images))
        table = read_positions(Path(csv_file), side)
        if len(paths) != len(table.values):
            raise UserError(f"{side}: {flag} {images} has {len(paths)} images but {table.path} "
                            f"has {len(table.values)} positions: one image per position row, in "
                            "the same order")
        jobs.append((side, paths))
    model, size = extraction.load_for_extraction(opt.model, Path(opt.weights),
                                                 extract.image_size_option(opt))
    checkpoint_id = extraction.file_digest(Path(opt.weights))
    planned = (model.name, checkpoint_id, list(size) if size else None)
    for side, given in (("database", opt.db_descriptors), ("query", opt.q_descriptors)):
        known = extraction_identity(extraction.read_metadata(Path(given))) if given else None
        pair = (known, planned) if side == "database" else (planned, known)
        refuse_mixed(*pair, f"{given} was extracted with another model than "
                            f"--{'q' if side == 'database' else 'db'}_images would be")
    device = get_device(False)
    out = {}
    for side, paths in jobs:
        settings = extraction.ExtractSettings(size, device=device, progress=progress_enabled())
        out[side] = extraction.extract_descriptors(
            model, paths, out_dir / f"{side}.npy", checkpoint_id=checkpoint_id, settings=settings,
            weights=Path(opt.weights)).path
    return [out.get("database") or Path(opt.db_descriptors),
            out.get("query") or Path(opt.q_descriptors)]


def read_inputs(opt: argparse.Namespace,
                struct_dir: Path) -> tuple[list[Path], list, np.ndarray, np.ndarray, tuple]:
    """Descriptor files, position tables and positions in metres, all checked against each other:
    ``(desc_paths, tables, db_pos, q_pos, latlon origin or None)``."""

    desc_paths = descriptor_files(opt, struct_dir)
    for flag, path in zip(("--db_descriptors", "--q_descriptors"), desc_paths):
        if not path.is_file():
            raise UserError(f"descriptor file {path} not found: check {flag}")
    check_same_model(desc_paths)
    descs = [open_descriptors(p) for p in desc_paths]       # checked chunk by chunk, not loaded
    if descs[0].shape[1] != descs[1].shape[1]:
        raise UserError(f"the database descriptors have {descs[0].shape[1]} dimensions but the "
                        f"query descriptors {descs[1].shape[1]}: use descriptors of the same type "
                        "for both traversals")
    tables = [read_positions(Path(opt.db_positions), "database"),
              read_positions(Path(opt.q_positions), "query")]
    for side, desc, table, path in zip(SIDES, descs, tables, desc_paths):
        if len(desc) != len(table.values):
            raise UserError(f"{side}: {path} has {len(desc)} descriptor rows but {table.path} has "
                            f"{len(table.values)} positions: the files must have one row per "
                            "frame, in the same order")
    if tables[0].latlon != tables[1].latlon:
        raise UserError(f"{tables[0].path} and {tables[1].path} use different coordinates (one "
                        "lat,lon, the other metres): give both traversals in the same form")
    origin = None
    if tables[0].latlon:
        origin = latlon_origin(tables[0].values, tables[1].values)
        db_pos, q_pos = (latlon_to_local(t.values, origin) for t in tables)
    else:
        db_pos, q_pos = tables[0].values, tables[1].values
    for side, table, pos in zip(SIDES, tables, (db_pos, q_pos)):
        check_traversal(table, pos, opt.seqL, side)
    return desc_paths, tables, db_pos, q_pos, origin


def cut_splits(opt: argparse.Namespace, tables: list, db_pos: np.ndarray,
               q_pos: np.ndarray) -> tuple[dict, int, int]:
    """Rows of each split (``{split: (db rows, q rows)}``), without sequence pieces shorter than
    ``--seqL``; also the queries dropped near split boundaries and the frames in short pieces."""
    dropped_boundary = 0
    if opt.train_rows:
        splits = explicit_splits(opt, len(db_pos), len(q_pos))
    else:
        splits, dropped_boundary = fraction_splits(parse_fractions(opt.splits), db_pos, q_pos,
                                                   max(opt.posDistThr, opt.evalPosDistThr))
    dropped_short = 0
    for s in SPLITS:
        kept = []
        for rows, table in zip(splits[s], tables):
            rows, n = drop_short_runs(rows, table.sequence_ids, opt.seqL)
            kept.append(rows)
            dropped_short += n
        splits[s] = tuple(kept)
        for side, rows in zip(SIDES, kept):
            if len(rows) == 0:
                raise UserError(f"split {s} has no {side} frames (every sequence piece in it is "
                                f"shorter than --seqL {opt.seqL}, or no queries are near its "
                                "database frames): change --splits or the row ranges")
    return splits, dropped_boundary, dropped_short


def split_files(opt: argparse.Namespace, splits: dict, tables: list, db_pos: np.ndarray,
                q_pos: np.ndarray) -> tuple[dict, dict, dict, dict]:
    """Per split: the struct, the sequence bounds, the frame counts and the queries with a
    positive."""
    from scipy.spatial import cKDTree

    thresholds = {"train": opt.posDistThr, "val": opt.evalPosDistThr, "test": opt.evalPosDistThr}
    structs, bounds, frames, with_positive = {}, {}, {}, {}
    for s in SPLITS:
        db_rows, q_rows = splits[s]
        structs[s] = make_struct(opt.name, s, db_rows, q_rows, db_pos, q_pos, thresholds[s],
                                 opt.nonTrivPosDistThr ** 2)
        bounds[s] = [run_bounds(db_rows, tables[0].sequence_ids),
                     run_bounds(q_rows, tables[1].sequence_ids)]
        frames[s] = {"database": len(db_rows), "query": len(q_rows),
                     "sequences": [len(np.unique(b[:, 0])) for b in bounds[s]]}
        near = cKDTree(db_pos[db_rows]).query(q_pos[q_rows])[0]
        with_positive[s] = int((near <= thresholds[s]).sum())
    return structs, bounds, frames, with_positive


def prepare(opt: argparse.Namespace) -> dict:
    """Check the inputs and write the dataset; returns the config written (plus a few counts)."""
    struct_dir = Path(opt.structPath)
    names = file_names(opt.name)
    targets = [names["config"], names["split_inds"], *names["struct_files"].values(),
               *(f for pair in names["bounds_files"].values() for f in pair)]
    existing = [t for t in targets if (struct_dir / t).exists()]
    if existing and not opt.force:
        raise UserError(f"dataset {opt.name!r} already exists in {struct_dir} ({existing[0]}): "
                        "add --force to overwrite it, or choose another --name")
    desc_paths, tables, db_pos, q_pos, origin = read_inputs(opt, struct_dir)
    splits, dropped_boundary, dropped_short = cut_splits(opt, tables, db_pos, q_pos)
    structs, bounds, frames, with_positive = split_files(opt, splits, tables, db_pos, q_pos)
    config = {
        "name": opt.name,
        "db_descriptors": str(desc_paths[0].resolve()),
        "q_descriptors": str(desc_paths[1].resolve()),
        "struct_files": names["struct_files"],
        "split_inds": names["split_inds"],
        "bounds_files": names["bounds_files"],
        "db_positions": str(tables[0].path.resolve()),
        "q_positions": str(tables[1].path.resolve()),
        "coordinates": ({"kind": "latlon", "origin_lat": origin[0], "origin_lon": origin[1],
                         "projection": "equirectangular, metres east/north of the origin"} if origin
                        else {"kind": "metric"}),
        "posDistThr": opt.posDistThr, "evalPosDistThr": opt.evalPosDistThr,
        "nonTrivPosDistSqThr": opt.nonTrivPosDistThr ** 2, "seqL": opt.seqL,
        "splits": (f"rows: train {opt.train_rows}, val {opt.val_rows}, test {opt.test_rows}"
                   if opt.train_rows
                   else f"fractions {parse_fractions(opt.splits)} of the database route"),
        "frames": frames,
        "dropped_queries_near_split_boundaries": dropped_boundary,
        "dropped_frames_in_short_pieces": dropped_short,
    }
    write_dataset(struct_dir, names, structs, splits, bounds, config)
    return {**config, "queries_with_positive": with_positive, "struct_dir": str(struct_dir)}
