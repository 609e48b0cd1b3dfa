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

With ``--spacing`` (``--db_spacing``/``--q_spacing``) only the frames ``data/spacing.py`` keeps by
distance travelled (positions, or an ``odometry`` column) make the dataset; images are extracted for
those frames only, and ``custom_<name>_{database,query}_frames.csv`` maps each back to the user's
rows. Everything that needs no descriptors is checked before any image is extracted, and complete
descriptors of the same images and model are reused (``data/own_images.py``).
"""
from __future__ import annotations

import argparse
import math
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from seqmatchnet.common.errors import UserError
from seqmatchnet.common.files import atomic_write, write_json_atomic
from seqmatchnet.common.logs import progress_enabled
from seqmatchnet.common.runtime import get_device
from seqmatchnet.data import spacing as spacing_mod
from seqmatchnet.data.descriptors import open_descriptors
from seqmatchnet.data.own_checks import (
    OUTLIER_FACTOR,  # noqa: F401 (re-exported)
    check_traversal,
    drop_short_runs,
    run_bounds,
    run_starts,  # noqa: F401 (re-exported)
)
from seqmatchnet.data.own_images import (
    Extraction,
    check_same_model,
    extract_or_reuse,
    extraction_identity,
    refuse_mixed,
)
from seqmatchnet.data.positions import Positions, latlon_origin, latlon_to_local, read_positions
from seqmatchnet.images.base import MODELS

SPLITS = ("train", "val", "test")
SIDES = ("database", "query")
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
                        f"the checkpoint to extract with ({'|'.join(MODELS)})")
    if opt.imageSize is not None:
        from seqmatchnet.images.extraction import (
            parse_image_size,  # extract loads torchvision: only when images are given
        )

        parse_image_size(opt.imageSize)


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


# ---------------------------------------------------------------- writing

def file_names(name: str) -> dict:
    """Paths relative to --structPath of everything ``prepare`` writes."""
    return {
        "struct_files": {s: f"custom_{name}_{s}.db" for s in SPLITS},
        "split_inds": f"custom_{name}_splitInds.npz",
        "bounds_files": {s: [f"seqBoundsFiles/custom_{name}_{s}_{side}_seqBounds.txt"
                             for side in SIDES]
                         for s in SPLITS},
        "frames_files": {side: f"custom_{name}_{side}_frames.csv" for side in SIDES},
        "config": f"custom_{name}.json",
    }


def make_struct(name: str, split: str, rows: tuple, utm: tuple, pos_thr: float,
                non_triv_sq: float) -> dict:
    """A ``dbStruct`` with the fields of the real struct files: ``rows`` (database, query) the
    split's rows in the user's files (they name the frames), ``utm`` their positions [N, 2]
    (stored as [2, N])."""
    (db_rows, q_rows), (db_utm, q_utm) = rows, utm

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
            "dataset": f"custom_{name}", "utmDb": db_utm.T.copy(),
            "utmQ": q_utm.T.copy()}


def write_dataset(struct_dir: Path, names: dict, structs: dict, splits: dict, bounds: dict,
                  config: dict, frames: dict) -> None:
    """Everything atomically, the JSON config (which makes the dataset usable) last; ``frames``:
    the lines of each ``frames_files`` table (with ``--spacing``)."""
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
    for side, text in frames.items():
        atomic_write(struct_dir / names["frames_files"][side],
                     lambda f, t=text: f.write(("\n".join(t) + "\n").encode()))
    write_json_atomic(config, struct_dir / names["config"])


# ---------------------------------------------------------------- the command

@dataclass(frozen=True)
class Traversal:
    """One traversal's frames as the dataset keeps them: the positions table, positions in metres
    and each frame's ``rows`` in the user's files (all rows without ``--spacing``), of ``n_rows``
    rows in all; ``spacing`` in metres or None; ``images`` when given as images."""

    table: Positions
    metres: np.ndarray
    rows: np.ndarray
    n_rows: int
    spacing: float | None
    images: list | None = None


def spacing_of(opt: argparse.Namespace, side: str) -> float | None:
    """``--db_spacing`` / ``--q_spacing``, else ``--spacing``, else None."""
    own = getattr(opt, f"{'db' if side == 'database' else 'q'}_spacing", None)
    return own if own is not None else getattr(opt, "spacing", None)


def read_traversals(opt: argparse.Namespace) -> tuple[list[Traversal], tuple | None]:
    """Both positions CSVs read, in metres, checked and spaced: ``(traversals, latlon origin)``."""
    tables = [read_positions(Path(opt.db_positions), "database"),
              read_positions(Path(opt.q_positions), "query")]
    images = image_lists(opt, tables) if opt.weights else [None, None]
    if tables[0].latlon != tables[1].latlon:
        raise UserError(f"{tables[0].path} and {tables[1].path} use different coordinates (one "
                        "lat,lon, the other metres): give both traversals in the same form")
    origin = None
    if tables[0].latlon:
        origin = latlon_origin(tables[0].values, tables[1].values)
        metres = [latlon_to_local(t.values, origin) for t in tables]
    else:
        metres = [t.values for t in tables]
    out = []
    for side, table, pos, paths in zip(SIDES, tables, metres, images):
        check_traversal(table, pos, opt.seqL, side)
        rows, spacing = np.arange(len(pos)), spacing_of(opt, side)
        if spacing is not None:
            rows = spacing_mod.kept_rows(table, spacing, opt.seqL, side)
            table = spacing_mod.subset(table, rows)
        out.append(Traversal(table, pos[rows], rows, len(pos), spacing, paths))
    return out, origin


def image_lists(opt: argparse.Namespace, tables: list[Positions]) -> list[list | None]:
    """The image lists of ``--db_images``/``--q_images`` (None for a traversal given as
    descriptors), one image per positions row."""
    from seqmatchnet.images import extraction

    out = []
    for side, flag, images, table in zip(SIDES, ("--db_images", "--q_images"),
                                         (opt.db_images, opt.q_images), tables):
        paths = None
        if images is not None:
            frames = getattr(opt, f"{side[0] if side == 'query' else 'db'}_frames", None)
            paths = frames if frames is not None else extraction.list_images(Path(images))
            if len(paths) != len(table.values):
                raise UserError(f"{side}: {flag} {images} has {len(paths)} images but "
                                f"{table.path} has {len(table.values)} positions: one image per "
                                "position row, in the same order")
        out.append(paths)
    return out


def plan_extraction(opt: argparse.Namespace) -> Extraction | None:
    """The loaded image model for ``--db_images``/``--q_images`` (None without images), refused when
    a given descriptor file of the other traversal was made with another model."""
    if not opt.weights:
        return None
    from seqmatchnet.cli import extract
    from seqmatchnet.images import extraction

    model, size = extraction.load_for_extraction(opt.model, Path(opt.weights),
                                                 extract.image_size_option(opt))
    settings = extraction.ExtractSettings(size, device=get_device(False),
                                          progress=progress_enabled())
    job = Extraction(model, size, Path(opt.weights), extraction.file_digest(Path(opt.weights)),
                     settings)
    for side, given in (("database", opt.db_descriptors), ("query", opt.q_descriptors)):
        known = extraction_identity(extraction.read_metadata(Path(given))) if given else None
        pair = (known, job.identity) if side == "database" else (job.identity, known)
        refuse_mixed(*pair, f"{given} was extracted with another model than "
                            f"--{'q' if side == 'database' else 'db'}_images would be")
    return job


def descriptor_files(opt: argparse.Namespace, struct_dir: Path, job: Extraction | None,
                     travs: list[Traversal]) -> list[Path]:
    """The database and query descriptor files: as given, or extracted from the kept frames of
    ``--db_images``/``--q_images`` into ``custom_<name>_descriptors/`` (or reused, when complete
    for the same images and model)."""
    out_dir = struct_dir / f"custom_{opt.name}_descriptors"
    out = []
    for side, given, trav in zip(SIDES, (opt.db_descriptors, opt.q_descriptors), travs):
        if trav.images is None:
            out.append(Path(given))
            continue
        paths = [trav.images[r] for r in trav.rows.tolist()]
        out.append(extract_or_reuse(job, paths, out_dir / f"{side}.npy", side))
    return out


def open_checked(desc_paths: list[Path]) -> list:
    """Both descriptor files opened and checked (present, finite, one model, the same size)."""
    for flag, path in zip(("--db_descriptors", "--q_descriptors"), desc_paths):
        if not path.is_file():
            raise UserError(f"descriptor file {path} not found: check {flag}")
    check_same_model(desc_paths)
    descs = [open_descriptors(p) for p in desc_paths]       # checked chunk by chunk, not loaded
    if descs[0].shape[1] != descs[1].shape[1]:
        raise UserError(f"the database descriptors have {descs[0].shape[1]} dimensions but the "
                        f"query descriptors {descs[1].shape[1]}: use descriptors of the same type "
                        "for both traversals")
    return descs


def descriptor_rows(desc_paths: list[Path], descs: list,
                    travs: list[Traversal]) -> list[np.ndarray]:
    """Per traversal, the descriptor row of each kept frame: the user's row in a file of all
    frames, the frame itself in a file of the kept frames only (``--spacing``)."""
    out = []
    for side, desc, trav, path in zip(SIDES, descs, travs, desc_paths):
        if len(desc) == trav.n_rows:
            out.append(trav.rows)
        elif trav.spacing is not None and len(desc) == len(trav.rows):
            out.append(np.arange(len(trav.rows)))
        else:
            kept = (f" (or the {len(trav.rows)} frames kept at spacing {trav.spacing:g} m)"
                    if trav.spacing is not None else "")
            raise UserError(f"{side}: {path} has {len(desc)} descriptor rows but "
                            f"{trav.table.path} has {trav.n_rows} positions{kept}: the files must "
                            "have one row per frame, in the same order")
    return out


def cut_splits(opt: argparse.Namespace, travs: list[Traversal]) -> tuple[dict, int, int]:
    """Frames of each split (``{split: (db frames, q frames)}``, numbers of kept frames), without
    sequence pieces shorter than ``--seqL``; also the queries dropped near split boundaries and
    the frames in short pieces."""
    dropped_boundary = 0
    if opt.train_rows:
        rows = explicit_splits(opt, travs[0].n_rows, travs[1].n_rows)
        splits = {s: tuple(np.flatnonzero(np.isin(t.rows, r)) for t, r in zip(travs, rows[s]))
                  for s in SPLITS}
    else:
        splits, dropped_boundary = fraction_splits(
            parse_fractions(opt.splits), travs[0].metres, travs[1].metres,
            max(opt.posDistThr, opt.evalPosDistThr))
    dropped_short = 0
    for s in SPLITS:
        kept = []
        for frames, trav in zip(splits[s], travs):
            frames, n = drop_short_runs(frames, trav.table.sequence_ids, opt.seqL)
            kept.append(frames)
            dropped_short += n
        splits[s] = tuple(kept)
        for side, frames, trav in zip(SIDES, kept, travs):
            if len(frames) == 0:
                spaced = (f" at spacing {trav.spacing:g} m (lower --spacing)"
                          if trav.spacing is not None else "")
                raise UserError(f"split {s} has no {side} frames{spaced} (every sequence piece "
                                f"in it is shorter than --seqL {opt.seqL}, or no queries are near "
                                "its database frames): change --splits or the row ranges")
    return splits, dropped_boundary, dropped_short


def split_files(opt: argparse.Namespace, splits: dict,
                travs: list[Traversal]) -> tuple[dict, dict, dict, dict]:
    """Per split: the struct, the sequence bounds, the frame counts and the queries with a
    positive."""
    from scipy.spatial import cKDTree

    thresholds = {"train": opt.posDistThr, "val": opt.evalPosDistThr, "test": opt.evalPosDistThr}
    structs, bounds, frames, with_positive = {}, {}, {}, {}
    for s in SPLITS:
        utm = tuple(t.metres[f] for t, f in zip(travs, splits[s]))
        structs[s] = make_struct(opt.name, s, tuple(t.rows[f] for t, f in zip(travs, splits[s])),
                                 utm, thresholds[s], opt.nonTrivPosDistThr ** 2)
        bounds[s] = [run_bounds(f, t.table.sequence_ids) for t, f in zip(travs, splits[s])]
        frames[s] = {"database": len(splits[s][0]), "query": len(splits[s][1]),
                     "sequences": [len(np.unique(b[:, 0])) for b in bounds[s]]}
        near = cKDTree(utm[0]).query(utm[1])[0]
        with_positive[s] = int((near <= thresholds[s]).sum())
    return structs, bounds, frames, with_positive


def spacing_record(names: dict, travs: list[Traversal]) -> tuple[dict, dict]:
    """With ``--spacing``: the JSON's record of it, and the frames tables mapping each kept frame
    back to the user's files; nothing without it (the default dataset stays as it was)."""
    if all(t.spacing is None for t in travs):
        return {}, {}
    record = {"spacing_m": {side: t.spacing for side, t in zip(SIDES, travs)},
              "spacing_distance": {side: "odometry" if t.table.odometry is not None
                                   else "positions" for side, t in zip(SIDES, travs)},
              "rows_in_files": {side: t.n_rows for side, t in zip(SIDES, travs)},
              "frames_kept": {side: len(t.rows) for side, t in zip(SIDES, travs)},
              "frames_files": names["frames_files"]}
    frames = {side: spacing_mod.frames_lines(t.rows, t.table.lines, t.images, t.table.odometry)
              for side, t in zip(SIDES, travs)}
    return record, frames


def prepare(opt: argparse.Namespace) -> dict:
    """Check the inputs and write the dataset; returns the config written (plus a few counts).
    Everything that needs no descriptors is checked before any image is extracted."""
    struct_dir = Path(opt.structPath)
    names = file_names(opt.name)
    targets = [names["config"], names["split_inds"], *names["struct_files"].values(),
               *(f for pair in names["bounds_files"].values() for f in pair)]
    existing = [t for t in targets if (struct_dir / t).exists()]
    if existing and not opt.force:
        raise UserError(f"dataset {opt.name!r} already exists in {struct_dir} ({existing[0]}): "
                        "add --force to overwrite it, or choose another --name")
    given = None if opt.weights else [Path(opt.db_descriptors), Path(opt.q_descriptors)]
    descs = open_checked(given) if given else None
    travs, origin = read_traversals(opt)
    desc_rows = descriptor_rows(given, descs, travs) if given else None
    job = plan_extraction(opt)
    splits, dropped_boundary, dropped_short = cut_splits(opt, travs)
    structs, bounds, frames, with_positive = split_files(opt, splits, travs)
    record, frames_tables = spacing_record(names, travs)
    desc_paths = descriptor_files(opt, struct_dir, job, travs)
    if desc_rows is None:
        desc_rows = descriptor_rows(desc_paths, open_checked(desc_paths), travs)
    split_inds = {s: tuple(r[f] for r, f in zip(desc_rows, splits[s])) for s in SPLITS}
    config = {
        "name": opt.name,
        "db_descriptors": str(desc_paths[0].resolve()),
        "q_descriptors": str(desc_paths[1].resolve()),
        "struct_files": names["struct_files"],
        "split_inds": names["split_inds"],
        "bounds_files": names["bounds_files"],
        "db_positions": str(travs[0].table.path.resolve()),
        "q_positions": str(travs[1].table.path.resolve()),
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
        **record,
    }
    write_dataset(struct_dir, names, structs, split_inds, bounds, config, frames_tables)
    return {**config, "queries_with_positive": with_positive, "struct_dir": str(struct_dir)}
