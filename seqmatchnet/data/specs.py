"""The datasets as a table of specs, and loading one split of one of them."""
from __future__ import annotations

import argparse
import dataclasses
import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from seqmatchnet.common.errors import UserError
from seqmatchnet.data.descriptors import GET_DATA_HINT, load_descriptors, open_descriptors
from seqmatchnet.data.structs import load_split_indices, load_struct
from seqmatchnet.data.synthetic import SYNTHETIC_FILES, SyntheticParams, ensure_synthetic
from seqmatchnet.data.windows import Split, cut_at_gaps, segment_bounds, subset_bounds

log = logging.getLogger(__name__)


OXFORD_DB = "2015-03-17-11-08-44"
OXFORD_Q = "2014-12-16-18-44-24"
NORDLAND_ROWS = {"train": (0, 15000), "test": (15100, 18100), "val": (18200, 21200)}
NORDLAND_STRUCTS = {"train": "nordland_train_d-40_d2-10.db", "val": "nordland_val_d-1_d2-1.db",
                    "test": "nordland_test_d-1_d2-1.db"}


@dataclass(frozen=True)
class DatasetSpec:
    """Where a dataset's files are and which rows each split uses.

    Rows come either from ``rows`` (the same ``[start, stop)`` range of both traversals, Nordland)
    or from ``split_inds`` (an ``*_splitInds.npz``). ``bounds`` names per-frame sequence-bounds
    files (MSLS); otherwise each traversal of a split is one segment.
    """

    name: str
    db_file: dict                 # split -> descriptor file name under descData/<descType>/
    q_file: dict
    struct_files: dict            # split -> struct file name under structPath
    rows: dict = field(default_factory=dict)
    split_inds: str | None = None
    # split -> (db bounds file, query bounds file) under structPath
    bounds: dict = field(default_factory=dict)
    note: str = ""
    position_unit: str = "m"      # Nordland's positions are frame numbers
    # --spacing (custom datasets): side -> frames table under structPath, and rows in the files
    frames_files: dict = field(default_factory=dict)
    rows_in_files: dict = field(default_factory=dict)


def _same(value: str) -> dict:
    return {s: value for s in ("train", "val", "test")}


def _nordland(name: str, db_season: str, q_season: str) -> DatasetSpec:
    return DatasetSpec(name, db_file=_same(f"nordland-clean-{db_season}.npy"),
                       q_file=_same(f"nordland-clean-{q_season}.npy"),
                       struct_files=NORDLAND_STRUCTS, rows=NORDLAND_ROWS, position_unit="frames")


def _oxford(version: str, test_thr: str) -> DatasetSpec:
    prefix = f"{version}_{OXFORD_DB}_{OXFORD_Q}"
    test = f"{prefix}_test_{test_thr}.db"
    return DatasetSpec(f"{version}", db_file=_same(f"oxford_{OXFORD_DB}_stereo_left.npy"),
                       q_file=_same(f"oxford_{OXFORD_Q}_stereo_left.npy"),
                       struct_files={"train": f"{prefix}_train_d-20_d2-5.db", "val": test,
                                     "test": test},
                       split_inds=f"{version}_splitInds.npz",
                       note="validation uses the test split, as in the reference (see "
                            "--oxfordHonestVal)")


def _msls(train_city: str, val_city: str) -> DatasetSpec:
    cities = {"train": train_city, "val": val_city, "test": val_city}
    return DatasetSpec(
        "msls",
        db_file={s: f"msls_{c}_database.npy" for s, c in cities.items()},
        q_file={s: f"msls_{c}_query.npy" for s, c in cities.items()},
        struct_files={s: f"msls_{c}_d-20_d2-5.db" for s, c in cities.items()},
        bounds={s: (f"seqBoundsFiles/msls_{c}_database_seqBounds.txt",
                    f"seqBoundsFiles/msls_{c}_query_seqBounds.txt")
                for s, c in cities.items()})


def _synthetic() -> DatasetSpec:
    F = SYNTHETIC_FILES
    return DatasetSpec("synthetic", db_file=_same(F["db"]), q_file=_same(F["query"]),
                       struct_files={s: F[s] for s in ("train", "val", "test")},
                       split_inds=F["split_inds"])


DATASETS = {
    "nordland-sw": lambda opt: _nordland("nordland-sw", "summer", "winter"),
    "nordland-sf": lambda opt: _nordland("nordland-sf", "spring", "fall"),
    "oxford-v1.0": lambda opt: _oxford("oxford-v1.0", "d-10_d2-5"),
    "oxford-pnv": lambda opt: _oxford("oxford-pnv", "d-25_d2-5"),
    "msls": lambda opt: _msls(opt.msls_trainCity, opt.msls_valCity),
    "synthetic": lambda opt: _synthetic(),
}


CUSTOM_PREFIX = "custom:"


def custom_config_path(struct_dir: Path, name: str) -> Path:
    return Path(struct_dir) / f"custom_{name}.json"


def _custom(opt: argparse.Namespace, name: str) -> DatasetSpec:
    """A dataset prepared with ``--mode prepare`` (see prepare.py): its JSON config names the
    descriptor files (absolute, or relative to descData/<descType>/), the struct and split-index
    files, and per-split sequence-bounds files when the data has several sequences."""
    import json

    path = custom_config_path(Path(opt.structPath), name)
    if not path.is_file():
        raise UserError(f"custom dataset {name!r}: {path} not found: run `python main.py --mode "
                        f"prepare --name {name} ...` first (README, 'Using your own data'), or "
                        "check --structPath")
    try:
        cfg = json.loads(path.read_text())
        splits = ("train", "val", "test")
        spec = DatasetSpec(
            f"custom:{name}", db_file=_same(str(cfg["db_descriptors"])),
            q_file=_same(str(cfg["q_descriptors"])),
            struct_files={s: str(cfg["struct_files"][s]) for s in splits},
            split_inds=str(cfg["split_inds"]),
            bounds={s: tuple(map(str, cfg["bounds_files"][s])) for s in splits}
            if cfg.get("bounds_files") else {},
            frames_files={side: str(f) for side, f in (cfg.get("frames_files") or {}).items()},
            rows_in_files={side: int(n) for side, n in (cfg.get("rows_in_files") or {}).items()})
    except (ValueError, KeyError, TypeError) as exc:
        raise UserError(f"custom dataset config {path} is malformed ({type(exc).__name__}: {exc}): "
                        "prepare the dataset again") from exc
    # the user's own files, referenced, not copied
    for desc in (spec.db_file["train"], spec.q_file["train"]):
        if Path(desc).is_absolute() and not Path(desc).is_file():
            raise UserError(f"custom dataset {name!r}: descriptor file {desc} (named in {path}) "
                            "not found: put it back, or prepare the dataset again with --mode "
                            f"prepare --name {name} --force")
    return spec


def get_spec(opt: argparse.Namespace) -> DatasetSpec:
    if opt.dataset.startswith(CUSTOM_PREFIX):
        return _custom(opt, opt.dataset[len(CUSTOM_PREFIX):])
    if opt.dataset not in DATASETS:
        raise UserError(f"unknown --dataset {opt.dataset!r}; choose one of {', '.join(DATASETS)} "
                        f"or {CUSTOM_PREFIX}<name> (see --mode prepare)")
    return DATASETS[opt.dataset](opt)


def desc_dir(opt: argparse.Namespace) -> Path:
    return Path(opt.dataPath) / "descData" / opt.descType


def generate_if_synthetic(opt: argparse.Namespace) -> None:
    """Generate the synthetic benchmark when it is asked for and missing or stale."""
    if opt.dataset != "synthetic":
        return
    params = dataclass_overrides(SyntheticParams(), opt, "synth_")
    try:
        ensure_synthetic(desc_dir(opt), Path(opt.structPath), params)
    except ValueError as exc:   # parameters that cannot make a benchmark
        raise UserError(f"synthetic benchmark: {exc}: change the --synth_* options") from exc


HONEST_VAL_FRACTION = 0.15


def get_split(opt: argparse.Namespace, split: str, lazy: bool = False) -> Split:
    """Load one split (train/val/test) of ``--dataset``: descriptors, positions, thresholds, bounds.

    With ``lazy`` the descriptors stay in their files (``datasets.DescriptorSource``, checked one
    chunk at a time) and are read as they are needed; otherwise they are loaded into memory. With
    ``--oxfordHonestVal`` on Oxford, train and val come from the training route (see
    ``honest_validation``) instead of validating on the test split.
    """
    if opt.oxfordHonestVal and split in ("train", "val"):
        if not opt.dataset.startswith("oxford"):
            raise UserError("--oxfordHonestVal is for the Oxford datasets; the others have their "
                            "own val split")
        train_part, val_part = honest_validation(load_split(opt, "train"),
                                                 load_split(opt, "test").pos_dist_thr,
                                                 cut=cuts_gaps(opt))
        part = train_part if split == "train" else val_part
        return drop_short_sequences(part, opt.seqL) if cuts_gaps(opt) else part
    return load_split(opt, split, lazy)


def honest_validation(train: Split, val_pos_thr: float, fraction: float = HONEST_VAL_FRACTION,
                      cut: bool = False) -> tuple[Split, Split]:
    """Hold out a spatial block of the training route for validation.

    The block is the ``fraction`` of database frames with the largest coordinate along one axis (the
    axis that loses fewest frames). Frames of either side within ``train.pos_dist_thr`` of the other
    side are dropped, so no validation place is a training positive; queries go with the side of
    their nearest database frame. Each side of each part is one segment, or, with ``cut``, cut
    where its frames skip a frame or pass into another segment of ``train``.
    """
    from sklearn.neighbors import NearestNeighbors

    def parts(axis: int):
        coord = train.db_positions[:, axis]
        in_val = coord >= np.quantile(coord, 1 - fraction)
        d_val = NearestNeighbors(n_neighbors=1).fit(train.db_positions[in_val]).kneighbors(
            train.db_positions)[0][:, 0]
        d_tr = NearestNeighbors(n_neighbors=1).fit(train.db_positions[~in_val]).kneighbors(
            train.db_positions)[0][:, 0]
        return (np.flatnonzero(~in_val & (d_val > train.pos_dist_thr)),
                np.flatnonzero(in_val & (d_tr > train.pos_dist_thr)))

    db_train, db_val = max((parts(a) for a in range(train.db_positions.shape[1])),
                           key=lambda p: len(p[0]) + len(p[1]))
    nearest = NearestNeighbors(n_neighbors=1).fit(train.db_positions).kneighbors(
        train.q_positions)[1][:, 0]
    q_train = np.flatnonzero(np.isin(nearest, db_train))
    q_val = np.flatnonzero(np.isin(nearest, db_val))
    if min(len(db_train), len(db_val), len(q_train), len(q_val)) == 0:
        raise UserError("--oxfordHonestVal could not separate a validation block from the "
                        "training route")
    return (subset_split(train, db_train, q_train, "train", train.pos_dist_thr, cut),
            subset_split(train, db_val, q_val, "val", val_pos_thr, cut))


def subset_split(split: Split, db_rows: np.ndarray, q_rows: np.ndarray, name: str,
                 pos_dist_thr: float, cut: bool = False) -> Split:
    """Some frames of a split as a split of their own: each side one contiguous segment, or, with
    ``cut``, segments cut where the frames skip a frame or leave a segment of ``split``."""
    if cut:
        db_bounds = subset_bounds(split.db_bounds, db_rows)
        q_bounds = subset_bounds(split.q_bounds, q_rows)
    else:
        db_bounds, q_bounds = segment_bounds(len(db_rows)), segment_bounds(len(q_rows))
    return split.select(db_rows, q_rows, db_bounds, q_bounds, name=name, pos_dist_thr=pos_dist_thr)


def _split_rows(spec, struct_dir: Path, split: str, struct, files: list) -> tuple:
    """The descriptor rows of ``split``: ``(db_rows, q_rows)``; an index file it reads joins
    ``files``."""
    if spec.rows:
        rows = np.arange(*spec.rows[split])
        return rows, rows
    if spec.split_inds:
        inds_path = struct_dir / spec.split_inds
        files.append(inds_path)
        return load_split_indices(inds_path, split)
    return np.arange(struct.num_db), np.arange(struct.num_q)


def load_split(opt: argparse.Namespace, split: str, lazy: bool = False) -> Split:
    spec = get_spec(opt)
    struct_dir = Path(opt.structPath)
    struct_path = struct_dir / spec.struct_files[split]
    db_path = desc_dir(opt) / spec.db_file[split]
    q_path = desc_dir(opt) / spec.q_file[split]
    for path in (struct_path, db_path, q_path):
        if not path.is_file():
            kind = "struct" if path == struct_path else "descriptor"
            raise UserError(f"{kind} file {path} not found (dataset {spec.name}, split {split}): "
                            f"{missing_hint(spec.name, kind)}")
    struct = load_struct(struct_path)
    files = [struct_path, db_path, q_path]
    db_rows, q_rows = _split_rows(spec, struct_dir, split, struct, files)
    rows_from = (f"split index file {struct_dir / spec.split_inds}" if spec.split_inds
                 else f"dataset {spec.name}")
    if len(db_rows) != struct.num_db or len(q_rows) != struct.num_q:
        raise UserError(f"struct file {struct_path} lists {struct.num_db} database and "
                        f"{struct.num_q} query frames but the {rows_from} selects {len(db_rows)} "
                        f"and {len(q_rows)} rows for split {split}: the files do not belong "
                        "together; download them again (`bash download.sh`)")
    if len(db_rows) == 0 or len(q_rows) == 0:
        raise UserError(f"split {split} of {spec.name} is empty ({len(db_rows)} database, "
                        f"{len(q_rows)} query frames in {struct_path} and the {rows_from}): "
                        "download the files again (`bash download.sh`) or choose another --split")
    read = open_descriptors if lazy else load_descriptors
    db_desc, q_desc = read(db_path, db_rows), read(q_path, q_rows)
    if db_desc.shape[1] != q_desc.shape[1]:
        raise UserError(f"descriptor files {db_path} ({db_desc.shape[1]} dims) and {q_path} "
                        f"({q_desc.shape[1]} dims) differ in dimensions: both must come from the "
                        "same descriptor (--descType)")
    db_bounds, q_bounds = _segments(spec, struct_dir, split, struct, files)
    cut = cuts_gaps(opt) and bool(spec.split_inds)
    if cut:
        db_bounds, q_bounds = cut_at_gaps(db_bounds, db_rows), cut_at_gaps(q_bounds, q_rows)
    if split == "val" and spec.note and not opt.oxfordHonestVal:
        log.info("%s: %s", spec.name, spec.note)
    out = Split(name=split, db_desc=db_desc, q_desc=q_desc, db_positions=struct.db_positions,
                q_positions=struct.q_positions, pos_dist_thr=struct.pos_dist_thr,
                non_triv_pos_dist_sq_thr=struct.non_triv_pos_dist_sq_thr,
                db_bounds=db_bounds, q_bounds=q_bounds, files=files,
                position_unit=spec.position_unit,
                **_frame_sources(spec, struct_dir, (db_path, q_path), (db_rows, q_rows), files))
    return drop_short_sequences(out, opt.seqL) if spec.bounds or cut else out


def _frame_sources(spec, struct_dir: Path, desc_paths: tuple, desc_rows: tuple,
                   files: list) -> dict:
    """``db_source``/``q_source`` of a dataset prepared with ``--spacing`` (its frames tables join
    ``files``): each split frame's row in the user's files; nothing for the other datasets."""
    if not spec.frames_files:
        return {}
    from seqmatchnet.data.frame_sources import read_frames_table, split_source

    out = {}
    for key, side, path, rows in zip(("db_source", "q_source"), ("database", "query"),
                                     desc_paths, desc_rows):
        table_path = struct_dir / spec.frames_files[side]
        files.append(table_path)
        out[key] = split_source(read_frames_table(table_path), rows,
                                len(open_descriptors(path, check=False)),
                                spec.rows_in_files.get(side, -1), f"{spec.name} {side}")
    return out


def cuts_gaps(opt: argparse.Namespace) -> bool:
    """``--splitGaps cut``: segments end at the gaps of the split index files (the reference,
    ``join``, makes each traversal of a split one segment)."""
    return opt.splitGaps == "cut"


def _segments(spec, struct_dir: Path, split: str, struct, files: list) -> tuple:
    """Each frame's segment ``(db_bounds, q_bounds)``: from the dataset's sequence-bounds files
    (they join ``files``), otherwise one segment per traversal."""
    if not spec.bounds:
        return segment_bounds(struct.num_db), segment_bounds(struct.num_q)
    db_bounds = _read_bounds(struct_dir / spec.bounds[split][0], struct.num_db,
                             missing_hint(spec.name, "bounds"))
    q_bounds = _read_bounds(struct_dir / spec.bounds[split][1], struct.num_q,
                            missing_hint(spec.name, "bounds"))
    files += [struct_dir / b for b in spec.bounds[split]]
    return db_bounds, q_bounds


def drop_short_sequences(split: Split, seq_len: int) -> Split:
    """Leave out the frames of capture sequences shorter than ``seq_len`` (MSLS has sequences of a
    few frames), so no window has to cross a sequence bound."""
    def keep_and_remap(bounds: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        keep = (bounds[:, 1] - bounds[:, 0]) >= seq_len
        # new index of an old row = kept rows before it
        kept_before = np.concatenate([[0], np.cumsum(keep)])
        return np.flatnonzero(keep), kept_before[bounds[keep]]

    db_keep, db_bounds = keep_and_remap(split.db_bounds)
    q_keep, q_bounds = keep_and_remap(split.q_bounds)
    dropped_db, dropped_q = split.num_db - len(db_keep), split.num_q - len(q_keep)
    if not dropped_db and not dropped_q:
        return split
    log.warning("split %s: leaving out %d database and %d query frames of sequences shorter than "
                "--seqL %d",
                split.name, dropped_db, dropped_q, seq_len)
    if len(db_keep) == 0 or len(q_keep) == 0:
        raise UserError(f"split {split.name}: every sequence is shorter than --seqL {seq_len}: "
                        "use a smaller --seqL")
    return split.select(db_keep, q_keep, db_bounds, q_bounds)


def missing_hint(dataset: str, kind: str) -> str:
    """What fetches a missing ``kind`` (struct, descriptor, bounds) file of ``dataset``: MSLS's
    struct and bounds files come with ``download.sh --what msls`` only, and its descriptors are not
    published."""
    if dataset != "msls":
        return GET_DATA_HINT
    if kind == "descriptor":
        return ("MSLS descriptors are not published: extract them from the MSLS images with "
                "--mode extract (docs/extract.md), or try `--dataset synthetic`")
    return ("run `bash download.sh --what msls` (see README, 'Getting the data') or try "
            "`--dataset synthetic`")


def _read_bounds(path: Path, count: int, hint: str = GET_DATA_HINT) -> np.ndarray:
    """Per-frame ``lo hi`` lines -> ``[count, 2]``."""
    if not path.is_file():
        raise UserError(f"sequence bounds file {path} not found: {hint}")
    try:
        bounds = np.loadtxt(path, dtype=np.int64, ndmin=2)
    except ValueError as exc:
        raise UserError(f"sequence bounds file {path} is malformed ({exc}): expected one 'lo hi' "
                        "line per frame") from exc
    if bounds.shape != (count, 2):
        raise UserError(f"sequence bounds file {path} has shape {bounds.shape}, expected "
                        f"({count}, 2)")
    return bounds


def dataclass_overrides(params, opt: argparse.Namespace, prefix: str):
    """``params`` with each field ``f`` replaced by ``opt.<prefix>f`` when that option was given."""
    given = {f.name: vars(opt).get(prefix + f.name) for f in dataclasses.fields(params)}
    return dataclasses.replace(params, **{k: v for k, v in given.items() if v is not None})
