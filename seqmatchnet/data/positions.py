"""Positions CSVs of ``--mode prepare``: one line per frame, in capture order.

Columns: ``x,y`` or ``easting,northing`` (metres), or ``lat,lon`` (degrees; converted to local
metres, equirectangular around the mean of all frames of both traversals); optional
``timestamp`` (numbers or ISO 8601), ``sequence_id`` and ``odometry`` (cumulative metres
travelled, for ``--spacing``). ``read_positions`` checks the columns,
numbers and lat/lon ranges and names the line of anything wrong.
"""
from __future__ import annotations

import csv
import math
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import numpy as np

from seqmatchnet.common.errors import UserError

EARTH_RADIUS_M = 6378137.0          # WGS84 equatorial radius
METRIC_COLUMNS = (("x", "y"), ("easting", "northing"))
LATLON_ALIASES = {"lat": "lat", "latitude": "lat", "lon": "lon", "lng": "lon", "long": "lon",
                  "longitude": "lon"}
OPTIONAL_COLUMNS = ("timestamp", "sequence_id", "odometry")


@dataclass
class Positions:
    """One positions CSV: ``values`` [N, 2] as read (metres, or lat/lon degrees when ``latlon``)."""

    path: Path
    values: np.ndarray
    latlon: bool
    timestamps: np.ndarray | None       # [N] float seconds (or the numbers as given)
    sequence_ids: np.ndarray | None     # [N] str
    lines: np.ndarray                   # [N] line number of each row in the file (header = 1)
    odometry: np.ndarray | None = None  # [N] cumulative metres travelled (``--spacing``)

    def where(self, row: int) -> str:
        return f"row {row} (line {int(self.lines[row])} of {self.path})"


def _columns(header: list[str], path: Path) -> tuple[tuple[int, int], bool, dict[str, int]]:
    """Indices of the two position columns, whether they are lat/lon, and of the optional
    columns."""
    names = [h.strip().lower() for h in header]
    expected = ("x,y or easting,northing (metres) or lat,lon (degrees), optionally timestamp, "
                "sequence_id and odometry")
    if len(set(names)) != len(names):
        raise UserError(f"positions file {path}: repeated column names in the header {header}")
    known = {c for pair in METRIC_COLUMNS
             for c in pair} | set(LATLON_ALIASES) | set(OPTIONAL_COLUMNS)
    unknown = [h for h, n in zip(header, names) if n not in known]
    if unknown:
        raise UserError(f"positions file {path}: unknown column(s) {unknown}; expected {expected}")
    optional = {n: i for i, n in enumerate(names) if n in OPTIONAL_COLUMNS}
    pairs = [(names.index(a), names.index(b)) for a, b in METRIC_COLUMNS if a in names
             and b in names]
    lat = [i for i, n in enumerate(names) if LATLON_ALIASES.get(n) == "lat"]
    lon = [i for i, n in enumerate(names) if LATLON_ALIASES.get(n) == "lon"]
    if lat and lon:
        pairs.append((lat[0], lon[0]))
    position_names = [n for n in names if n not in OPTIONAL_COLUMNS]
    if not position_names and "odometry" in optional:
        raise UserError(f"positions file {path} has odometry but no positions (x,y or lat,lon): "
                        "the splits and Recall@N need positions of both traversals; odometry "
                        "only drives --spacing")
    if len(pairs) != 1 or len(position_names) != 2:
        raise UserError(f"positions file {path}: header {header} does not name one pair of "
                        f"position columns; expected {expected}")
    return pairs[0], bool(lat and lon), optional


def _parse_time(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


def read_positions(path: Path, label: str) -> Positions:
    """Parse and check a positions CSV (columns, numbers, lat/lon ranges)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{label} positions file {path} not found: check "
                        f"--{'db' if label == 'database' else 'q'}_positions")
    fast = _read_positions_fast(path)
    if fast is not None:
        return fast
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            rows = [(n, r) for n, r in enumerate(csv.reader(f), start=1)
                    if any(c.strip() for c in r)]
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise UserError(f"positions file {path} could not be read as CSV ({exc})") from exc
    if not rows:
        raise UserError(f"positions file {path} is empty: it needs a header line (e.g. x,y) and "
                        "one line per frame")
    (_, header), body = rows[0], rows[1:]
    (ia, ib), latlon, optional = _columns(header, path)
    if not body:
        raise UserError(f"positions file {path} has a header but no frames")
    values = np.empty((len(body), 2))
    stamps = np.empty(len(body)) if "timestamp" in optional else None
    seq_ids = np.empty(len(body), dtype=object) if "sequence_id" in optional else None
    odometry = np.empty(len(body)) if "odometry" in optional else None
    for k, (line, r) in enumerate(body):
        if len(r) != len(header):
            raise UserError(f"positions file {path}, line {line}: {len(r)} values but the header "
                            f"has {len(header)} columns")
        values[k] = [_position_value(path, line, k, header[col], r[col]) for col in (ia, ib)]
        if stamps is not None:
            text = r[optional["timestamp"]].strip()
            try:
                stamps[k] = _parse_time(text)
            except ValueError:
                raise UserError(f"positions file {path}, line {line} (row {k}): timestamp "
                                f"{text!r} is neither a number nor an ISO 8601 time") from None
        if odometry is not None:
            odometry[k] = _odometry_value(path, line, k, r[optional["odometry"]])
        if seq_ids is not None:
            seq_ids[k] = r[optional["sequence_id"]].strip()
            if not seq_ids[k]:
                raise UserError(f"positions file {path}, line {line} (row {k}): empty sequence_id")
    lines = np.array([line for line, _ in body])
    return _checked(Positions(path, values, latlon, stamps, seq_ids, lines, odometry))


def _odometry_value(path: Path, line: int, k: int, text: str) -> float:
    """One odometry value: a finite number; an empty cell means the odometry has fewer values than
    the positions."""
    text = text.strip()
    if not text:
        raise UserError(f"positions file {path}, line {line} (row {k}): no odometry value: "
                        "positions and odometry must have one value per frame each")
    try:
        value = float(text)
    except ValueError:
        raise UserError(f"positions file {path}, line {line} (row {k}): odometry is {text!r}, "
                        "not a number") from None
    if not math.isfinite(value):
        raise UserError(f"positions file {path}, line {line} (row {k}): odometry is {text}: "
                        "every frame needs a finite distance travelled")
    return value


def _position_value(path: Path, line: int, k: int, column: str, text: str) -> float:
    """One position coordinate of a CSV row: a finite number, else a ``UserError`` naming it."""
    try:
        value = float(text)
    except ValueError:
        raise UserError(f"positions file {path}, line {line} (row {k}): "
                        f"{column.strip()} is {text!r}, not a number") from None
    if not math.isfinite(value):
        raise UserError(f"positions file {path}, line {line} (row {k}): "
                        f"{column.strip()} is {text.strip()}: every frame needs a "
                        "finite position (remove or fix that frame in both the CSV and "
                        "the descriptor file)")
    return value


def _checked(pos: Positions) -> Positions:
    """``pos`` after the lat/lon range check."""
    if pos.latlon:
        for j, (name, limit) in enumerate((("lat", 90.0), ("lon", 180.0))):
            bad = np.flatnonzero(np.abs(pos.values[:, j]) > limit)
            if len(bad):
                raise UserError(f"positions file {pos.path}, line {pos.lines[bad[0]]} (row "
                                f"{bad[0]}): {name} {pos.values[bad[0], j]} is outside "
                                f"[-{limit:g}, {limit:g}] degrees")
    return pos


def _read_positions_fast(path: Path) -> Positions | None:
    """``read_positions`` without a Python loop over the rows, for plain files (no quotes, numeric
    timestamps); None for anything else, so that the row-by-row reader handles it and names the
    line."""
    try:
        text = path.read_text(encoding="utf-8-sig").replace("\r\n", "\n")
    except (OSError, UnicodeDecodeError):
        return None
    if '"' in text or "\r" in text:
        return None
    lines = np.array(text.split("\n"))
    keep = np.flatnonzero(np.char.str_len(np.char.strip(np.char.replace(lines, ",", ""))) > 0)
    if len(keep) < 2:
        return None
    header = next(csv.reader([str(lines[keep[0]])]))
    try:
        (ia, ib), latlon, optional = _columns(header, path)
        table = np.loadtxt(lines[keep[1:]].tolist(), delimiter=",", dtype=str, comments=None,
                           ndmin=2)
        if table.shape != (len(keep) - 1, len(header)):
            return None
        values = np.char.strip(table[:, [ia, ib]]).astype(np.float64)
        stamps = odometry = None
        if "timestamp" in optional:
            stamps = np.char.strip(table[:, optional["timestamp"]]).astype(np.float64)
        if "odometry" in optional:
            odometry = np.char.strip(table[:, optional["odometry"]]).astype(np.float64)
    except (UserError, ValueError):
        return None
    if not np.isfinite(values).all() or (odometry is not None and not np.isfinite(odometry).all()):
        return None
    seq_ids = None
    if "sequence_id" in optional:
        seq_ids = np.char.strip(table[:, optional["sequence_id"]])
        if (np.char.str_len(seq_ids) == 0).any():
            return None
        seq_ids = seq_ids.astype(object)
    return _checked(Positions(path, values, latlon, stamps, seq_ids, keep[1:] + 1, odometry))


def latlon_to_local(latlon: np.ndarray, origin: tuple[float, float]) -> np.ndarray:
    """[N, 2] (lat, lon) degrees -> [N, 2] (east, north) metres, equirectangular around ``origin``
    (lat0, lon0)."""
    lat0, lon0 = origin
    dlon = (latlon[:, 1] - lon0 + 180.0) % 360.0 - 180.0        # across the antimeridian
    east = EARTH_RADIUS_M * np.cos(np.radians(lat0)) * np.radians(dlon)
    north = EARTH_RADIUS_M * np.radians(latlon[:, 0] - lat0)
    return np.stack([east, north], axis=1)


def latlon_origin(*tables: np.ndarray) -> tuple[float, float]:
    """Mean (lat, lon) of all frames; the longitude mean is circular (safe across the
    antimeridian)."""
    both = np.concatenate(tables)
    lon = np.degrees(np.arctan2(np.sin(np.radians(both[:, 1])).mean(),
                                np.cos(np.radians(both[:, 1])).mean()))
    return float(both[:, 0].mean()), float(lon)
