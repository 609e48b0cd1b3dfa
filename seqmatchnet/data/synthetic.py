"""A small, deterministic route benchmark in the real SeqMatchNet file layout.

`--dataset synthetic` uses it so that the whole pipeline (loaders, windows, training, evaluation)
runs without a download, in minutes on a laptop CPU.

The model of the problem. A vehicle drives one route twice: a database (reference) traversal and a
query traversal under another condition. Every frame's descriptor is

    normalise(place(s) + nuisance_condition(frame) + noise(frame))

- ``place(s)`` is a function of the arc length s along the route (metres):
  smooth (adjacent frames look alike, a sequence of frames is more distinctive
  than one frame), with a share of generic "scene type" structure that many
  stretches have in common, and some stretches copied (imperfectly) from
  elsewhere in the same split: perceptual aliasing.
- ``nuisance``: the condition change. Strong, slowly varying along the route,
  and living in a low-dimensional subspace: a part shared by both conditions
  and a part of each condition's own. The subspaces belong to the condition,
  not to the stretch, so a linear projection learned on the train split that
  suppresses them also helps on val and test. A weak full-rank part of each
  condition stays that no projection can undo.
- ``noise``: independent per-frame noise, which sequence matching averages out.

Splits are disjoint stretches of the route in driving order (train, val, test), separated by gaps
longer than any positive threshold. Positions are metres in a local planar (UTM-like) frame;
thresholds are Oxford's: train posDistThr 20 m, val/test 10 m, nonTrivPosDistSqThr 25 (5 m), for a
frame spacing of about 2 m like Oxford RobotCar.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import scipy.io
from scipy.ndimage import gaussian_filter1d

from seqmatchnet.common.files import atomic_write

logger = logging.getLogger(__name__)


SYNTHETIC_FILES = {
    'db': 'synthetic_db.npy',
    'query': 'synthetic_query.npy',
    'train': 'synthetic_train.db',
    'val': 'synthetic_val.db',
    'test': 'synthetic_test.db',
    'split_inds': 'synthetic_splitInds.npz',
}
PARAMS_FILE = 'synthetic_params.json'
SPLITS = ('train', 'val', 'test')
# Bump when the generator changes so that existing benchmarks are regenerated.
FORMAT_VERSION = 1

# (posDistThr m, nonTrivPosDistSqThr m^2) per split, as on Oxford RobotCar v1.0.
_THRESHOLDS = {'train': (20.0, 25.0), 'val': (10.0, 25.0), 'test': (10.0, 25.0)}
_ORIGIN_UTM = (620000.0, 5735000.0)  # easting, northing of the route start
_GRID_M = 1.0  # resolution of the arc-length grid on which signals are built


@dataclass(frozen=True)
class SyntheticParams:
    """Knobs of the synthetic benchmark (lengths in metres, stds relative to the place signal, whose
    per-dimension std is 1)."""

    seed: int = 0
    frames: int = 5000  # database frames for the whole route
    # query frames = round(frames * query_ratio) (without a speed profile)
    query_ratio: float = 0.99
    dim: int = 128  # descriptor dimension
    spacing_m: float = 2.0  # mean database frame spacing
    speed_var: float = 0.15  # relative std of the (smooth) per-frame step
    lane_offset_m: float = 1.0  # lateral offset of the query traversal
    gps_noise_m: float = 0.3  # per-frame position noise (both traversals)
    # place signal
    place_scale_m: float = 4.0  # Gaussian smoothing scale of the place signal
    scene_types: int = 6  # generic look-alike scene prototypes
    scene_len_m: float = 150.0  # mean length of a stretch of one scene type
    scene_share: float = 0.5  # share of place variance that is scene type
    alias_share: float = 0.25  # share of each split's route copied from elsewhere
    alias_min_m: float = 20.0
    alias_max_m: float = 80.0
    alias_strength: float = 0.9  # weight of the copied signal (1 = identical)
    # condition change (nuisance)
    nuisance_rank_shared: int = 4  # nuisance directions common to both conditions
    nuisance_rank_own: int = 4  # nuisance directions of each condition alone
    nuisance_std: float = 4.2  # std of each nuisance coefficient
    nuisance_scale_m: float = 30.0  # smoothing scale of the nuisance along the route
    nuisance_frame_share: float = 0.5  # share of nuisance variance that is per frame
    condition_full_std: float = 0.3  # weak full-rank smooth condition change
    noise_std: float = 1.3  # per-frame isotropic noise
    # splits along the route, in driving order
    train_share: float = 0.6
    val_share: float = 0.15
    gap_m: float = 200.0  # gap between consecutive splits
    # query speed profile (defaults: the query drives like the database; see _query_positions)
    # query speed / database speed = database frame spacings per query frame
    query_speed: float = 1.0
    # stretches of the query drive at speed x [1/(1+c), 1+c] (log-uniform)
    query_speed_changes: float = 0.0
    query_stops_per_km: float = 0.0  # stops of the query traversal per km of route
    query_stop_frames: int = 10  # mean query frames standing still at one stop

    def validate(self) -> None:
        """Raise ValueError on values that cannot make a benchmark."""
        if self.frames < 300 or self.dim < 4:
            raise ValueError(f'frames must be >= 300 and dim >= 4, got {self.frames}, {self.dim}')
        if not 0.5 <= self.query_ratio <= 2.0:
            raise ValueError(f'query_ratio must be in [0.5, 2], got {self.query_ratio}')
        if self.nuisance_rank_shared + 2 * self.nuisance_rank_own >= self.dim:
            raise ValueError('nuisance ranks (shared + 2 * own) must be below dim')
        if not (0 < self.train_share and 0 < self.val_share and self.train_share
                + self.val_share < 1):
            raise ValueError('train_share and val_share must be > 0 with a sum below 1')
        if not 0 <= self.scene_share < 1 or not 0 <= self.nuisance_frame_share <= 1:
            raise ValueError('scene_share must be in [0, 1), nuisance_frame_share in [0, 1]')
        if not 0 <= self.alias_share < 0.5 or not 0 < self.alias_min_m <= self.alias_max_m:
            raise ValueError('alias_share must be in [0, 0.5) and 0 < alias_min_m <= alias_max_m')
        if not (0.25 <= self.query_speed <= 4 and 0 <= self.query_speed_changes <= 3):
            raise ValueError('query_speed must be in [0.25, 4] and query_speed_changes in [0, 3], '
                             f'got {self.query_speed}, {self.query_speed_changes}')
        if not (0 <= self.query_stops_per_km <= 20 and 1 <= self.query_stop_frames <= 1000):
            raise ValueError('query_stops_per_km must be in [0, 20] and query_stop_frames in [1, '
                             '1000]')

    @property
    def speed_profile(self) -> bool:
        """True when the query traversal follows its own speed profile (see
        ``_query_positions``)."""
        return (self.query_speed != 1.0 or self.query_speed_changes > 0
                or self.query_stops_per_km > 0)


_PROFILE_FIELDS = ('query_speed', 'query_speed_changes', 'query_stops_per_km', 'query_stop_frames')


def _split_ranges(params: SyntheticParams, length_m: float) -> dict[str, tuple[float, float]]:
    """Arc-length range [start, end) of each split; gaps between them."""
    usable = length_m - 2 * params.gap_m
    train_end = usable * params.train_share
    val_start = train_end + params.gap_m
    val_end = val_start + usable * params.val_share
    test_start = val_end + params.gap_m
    if min(train_end, val_end - val_start, length_m - test_start) < 20 * params.spacing_m:
        raise ValueError('route too short for the split shares and gaps: raise frames or lower '
                         'gap_m')
    return {'train': (0.0, train_end), 'val': (val_start, val_end), 'test': (test_start, np.inf)}


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, ...], sigma: float) -> np.ndarray:
    """Gaussian white noise smoothed along axis 0 with `sigma` samples, then rescaled to unit std
    per column."""
    x = gaussian_filter1d(rng.standard_normal(shape), sigma, axis=0, mode='reflect') if sigma > 0 \
        else rng.standard_normal(shape)
    return x / x.std(axis=0, keepdims=True)


def _interp_rows(x: np.ndarray, xp: np.ndarray, fp: np.ndarray) -> np.ndarray:
    """Linear interpolation of the rows of `fp` (n, k) given at increasing `xp` (n,) to the points
    `x` (m,): (m, k). Clamped at the ends."""
    x = np.clip(x, xp[0], xp[-1])
    i = np.clip(np.searchsorted(xp, x, side='right') - 1, 0, len(xp) - 2)
    w = ((x - xp[i]) / (xp[i + 1] - xp[i]))[:, None]
    return (1 - w) * fp[i] + w * fp[i + 1]


def _smooth_field(rng: np.random.Generator, s: np.ndarray, length_m: float, dims: int,
                  scale_m: float) -> np.ndarray:
    """A random field of `dims` unit-std columns, smooth along the route with Gaussian scale
    `scale_m`, sampled at the arc lengths `s`: (len(s), dims). Built on a coarse grid (scale / 4) to
    stay cheap."""
    step = scale_m / 4
    coarse = np.arange(-8 * step, length_m + 9 * step, step)
    return _interp_rows(s, coarse, _smooth_noise(rng, (len(coarse), dims), 4.0))


def _frame_positions(rng: np.random.Generator, num: int, length_m: float,
                     speed_var: float) -> np.ndarray:
    """Arc length of `num` frames covering [~0, length_m), with a smooth speed profile."""
    speed = 1.0 + speed_var * _smooth_noise(rng, (num,), 20.0)
    steps = np.clip(speed, 0.3, None)
    start = rng.uniform(0.0, 0.5)
    s = np.concatenate([[0.0], np.cumsum(steps[:-1])])
    return start + s * (length_m - 1.0 - start) / s[-1]


def _query_positions(rng: np.random.Generator, params: SyntheticParams,
                     length_m: float) -> np.ndarray:
    """Arc length of the query frames under a speed profile (``params.speed_profile``).

    The query advances ``spacing_m * query_speed`` metres per frame, times the smooth ``speed_var``
    factor, times a factor per stretch (exponential lengths, mean 50 frames; log-uniform in
    ``[1/(1+c), 1+c]`` for ``c = query_speed_changes``; smoothed over a few frames: accelerations).
    At ``query_stops_per_km`` stops per km (uniform along the route) it slows down over 4 frames,
    stands still for ``query_stop_frames`` frames on average (0.5x to 1.5x), and speeds up again.
    The number of frames follows from the profile (``query_ratio`` is not used).
    """
    c = params.query_speed_changes
    n_max = int(np.ceil(length_m / (params.spacing_m * params.query_speed * 0.3 / (1 + c)))) + 10
    factor = np.clip(1.0 + params.speed_var * _smooth_noise(rng, (n_max,), 20.0), 0.3, None)
    if c > 0:
        bounds = np.cumsum(rng.exponential(50.0, n_max // 10 + 2)).astype(np.int64)
        level = np.exp(rng.uniform(-np.log1p(c), np.log1p(c), len(bounds) + 1))
        factor *= gaussian_filter1d(level[np.searchsorted(bounds, np.arange(n_max), side='right')],
                                    3.0)
    steps = params.spacing_m * params.query_speed * factor
    num_stops = int(rng.poisson(params.query_stops_per_km * length_m / 1000.0))
    stop_at = np.sort(rng.uniform(0.0, length_m, num_stops))
    frames_at = np.searchsorted(np.cumsum(steps), stop_at)
    pieces, prev, ramp = [], 0, np.linspace(1.0, 0.0, 6)[1:-1]
    for i, n in zip(frames_at, rng.integers(params.query_stop_frames // 2,
                                            params.query_stop_frames * 3 // 2 + 1,
                                              num_stops)):
        i = min(max(i, prev), len(steps) - 1)
        pieces += [steps[prev:i], steps[i] * ramp, np.zeros(int(n)), steps[i] * ramp[::-1]]
        prev = i
    pieces.append(steps[prev:])
    s = rng.uniform(0.0, 0.5) + np.concatenate([[0.0], np.cumsum(np.concatenate(pieces))])
    return s[s < length_m - 1.0]


def _route_xy(rng: np.random.Generator, grid: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Planar route on the arc-length grid: (xy (n, 2), unit normals (n, 2)). The heading meanders
    within +-60 degrees of one direction, so the route never comes back near itself."""
    heading = rng.uniform(0, 2 * np.pi) + np.deg2rad(60) * np.tanh(
        _smooth_noise(rng, (len(grid),), 150.0 / _GRID_M))
    direction = np.stack([np.cos(heading), np.sin(heading)], axis=1)
    xy = np.concatenate([[[0.0, 0.0]], np.cumsum(direction[:-1] * _GRID_M, axis=0)])
    normal = np.stack([-direction[:, 1], direction[:, 0]], axis=1)
    return xy + np.array(_ORIGIN_UTM), normal


def _place_signal(rng: np.random.Generator, params: SyntheticParams, grid: np.ndarray,
                  ranges: dict[str, tuple[float, float]]) -> np.ndarray:
    """Place descriptor on the arc-length grid, (n, dim), per-dim std about 1."""
    n, dim = len(grid), params.dim
    unique = _smooth_noise(rng, (n, dim), params.place_scale_m / _GRID_M)
    # generic look-alikes: stretches of a few scene types share a prototype
    prototypes = rng.standard_normal((params.scene_types, dim))
    num_stretches = int(grid[-1] / params.scene_len_m) + 2
    bounds = np.cumsum(rng.exponential(params.scene_len_m, num_stretches))
    while bounds[-1] < grid[-1]:
        bounds = np.append(bounds, bounds[-1] + rng.exponential(params.scene_len_m))
    labels = rng.integers(0, params.scene_types, len(bounds) + 1)
    one_hot = np.eye(params.scene_types)[labels[np.searchsorted(bounds, grid)]]
    scene = gaussian_filter1d(one_hot, 10.0 / _GRID_M, axis=0) @ prototypes
    scene /= scene.std(axis=0, keepdims=True)
    place = np.sqrt(1 - params.scene_share) * unique + np.sqrt(params.scene_share) * scene
    # perceptual aliasing: copy stretches from elsewhere in the same split
    original = place.copy()
    for lo, hi in ranges.values():
        hi = min(hi, grid[-1])
        copied, attempts = 0.0, 0
        while copied < params.alias_share * (hi - lo) and attempts < 10000:
            attempts += 1
            length = rng.uniform(params.alias_min_m, params.alias_max_m)
            if hi - lo < 3 * length + 50.0:  # too short to hold a copy and its source
                continue
            target = rng.uniform(lo, hi - length)
            source = rng.uniform(lo, hi - length)
            if abs(source - target) < length + 50.0:  # the copy must be elsewhere
                continue
            t0, s0, m = int(target / _GRID_M), int(source / _GRID_M), int(length / _GRID_M)
            taper = np.minimum(1.0,
                               np.minimum(np.arange(m) + 1, m - np.arange(m)) / (5.0 / _GRID_M))
            w = (params.alias_strength * taper)[:, None]
            place[t0:t0 + m] = w * original[s0:s0 + m] + np.sqrt(1 - w ** 2) * place[t0:t0 + m]
            copied += length
    return place


def _nuisance_bases(rng: np.random.Generator,
                    params: SyntheticParams) -> tuple[np.ndarray, np.ndarray]:
    """Orthonormal nuisance bases (dim, shared + own) of the db and query conditions."""
    r_s, r_o = params.nuisance_rank_shared, params.nuisance_rank_own
    q, _ = np.linalg.qr(rng.standard_normal((params.dim, r_s + 2 * r_o)))
    shared, own_db, own_q = q[:, :r_s], q[:, r_s:r_s + r_o], q[:, r_s + r_o:]
    return np.hstack([shared, own_db]), np.hstack([shared, own_q])


def _traversal(rng: np.random.Generator, params: SyntheticParams, grid: np.ndarray,
               place: np.ndarray,
               s: np.ndarray, basis: np.ndarray) -> np.ndarray:
    """Descriptors (num, dim) of one traversal at arc lengths `s`, rows L2-normalised."""
    dim = params.dim
    place_at = _interp_rows(s, grid, place)
    # the condition varies slowly along the route (in metres, not frames)
    coeff = _smooth_field(rng, s, grid[-1], basis.shape[1], params.nuisance_scale_m)
    coeff = np.sqrt(1 - params.nuisance_frame_share) * coeff + \
        np.sqrt(params.nuisance_frame_share) * rng.standard_normal(coeff.shape)
    nuisance = params.nuisance_std * coeff @ basis.T
    full = _smooth_field(rng, s, grid[-1], dim, params.nuisance_scale_m)
    x = (place_at + nuisance + params.condition_full_std * full
         + params.noise_std * rng.standard_normal((len(s), dim)))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def generate(params: SyntheticParams) -> dict:
    """Build the benchmark in memory (no I/O).

    Returns a dict with
    - 'db' (numDb, dim), 'query' (numQ, dim): float32 descriptors, rows
      L2-normalised, in driving order;
    - 'db_pos' (numDb, 2), 'query_pos' (numQ, 2): float64 positions in metres;
    - 'train_inds', 'val_inds', 'test_inds': (db_rows, q_rows) int64 arrays;
    - 'nuisance_basis' (dim, R): orthonormal basis of the union of both
      conditions' nuisance subspaces (for oracle checks).
    """
    params.validate()
    rng = np.random.default_rng(params.seed)
    num_q = int(round(params.frames * params.query_ratio))
    length_m = params.frames * params.spacing_m
    grid = np.arange(0.0, length_m + _GRID_M, _GRID_M)
    ranges = _split_ranges(params, length_m)

    xy, normal = _route_xy(rng, grid)
    place = _place_signal(rng, params, grid, ranges)
    basis_db, basis_q = _nuisance_bases(rng, params)

    out: dict = {}
    for name, num, offset, basis in (('db', params.frames, 0.0, basis_db),
                                     ('query', num_q, params.lane_offset_m, basis_q)):
        if name == 'query' and params.speed_profile:
            s = _query_positions(rng, params, length_m)
            num = len(s)
        else:
            s = _frame_positions(rng, num, length_m, params.speed_var)
        lateral = offset * (1.0 + 0.5 * np.tanh(_smooth_noise(rng, (num,), 50.0)))
        pos = _interp_rows(s, grid, xy) + lateral[:, None] * _interp_rows(s, grid, normal)
        out[name + '_pos'] = pos + params.gps_noise_m * rng.standard_normal(pos.shape)
        out[name] = _traversal(rng, params, grid, place, s, basis)
        out[name + '_s'] = s
    for split, (lo, hi) in ranges.items():
        out[split + '_inds'] = tuple(
            np.flatnonzero((out[k + '_s'] >= lo) & (out[k + '_s'] < hi)).astype(np.int64)
            for k in ('db', 'query'))
    del out['db_s'], out['query_s']
    out['nuisance_basis'] = np.linalg.qr(np.hstack([basis_db,
                                                    basis_q[:, params.nuisance_rank_shared:]]))[0]
    return out


def _struct(split: str, data: dict) -> dict:
    """The `dbStruct` of one split, with the fields of the Oxford struct files."""
    db_rows, q_rows = data[split + '_inds']
    pos_thr, non_triv_sq = _THRESHOLDS[split]

    def names(kind: str, rows: np.ndarray) -> np.ndarray:
        cell = np.empty((len(rows), 1), dtype=object)
        cell[:, 0] = [f'synthetic/{kind}/{r:06d}.png' for r in rows]
        return cell

    return {
        'whichSet': split,
        'dbImageFns': names('db', db_rows),
        'qImageFns': names('query', q_rows),
        'numImages': len(db_rows),
        'numQueries': len(q_rows),
        'posDistThr': pos_thr,
        'posDistSqThr': pos_thr ** 2,
        'dataset': 'synthetic',
        'nonTrivPosDistSqThr': non_triv_sq,
        'utmDb': data['db_pos'][db_rows].T.copy(),
        'utmQ': data['query_pos'][q_rows].T.copy(),
    }


def _params_json(params: SyntheticParams) -> str:
    """The parameters as written beside the benchmark; the speed-profile fields only when they are
    set, so that benchmarks generated before they existed stay complete."""
    fields = {k: v for k, v in dataclasses.asdict(params).items()
              if k not in _PROFILE_FIELDS or v != getattr(SyntheticParams, k)}
    return json.dumps({'format_version': FORMAT_VERSION, **fields}, indent=1, sort_keys=True)


def _file_paths(desc_dir: Path, struct_dir: Path) -> dict[str, Path]:
    return {key: (desc_dir if key in ('db', 'query') else struct_dir) / name
            for key, name in SYNTHETIC_FILES.items()}


def ensure_synthetic(desc_dir: Path, struct_dir: Path,
                     params: SyntheticParams = SyntheticParams()) -> bool:
    """Write the benchmark unless an identical one is already there.

    Descriptors go to `desc_dir` (SYNTHETIC_FILES 'db', 'query'), struct files and split indices to
    `struct_dir`, and `struct_dir/synthetic_params.json` last, as the mark of a complete benchmark.
    Returns True when it (re)generated.
    """
    desc_dir, struct_dir = Path(desc_dir), Path(struct_dir)
    paths = _file_paths(desc_dir, struct_dir)
    params_path = struct_dir / PARAMS_FILE
    wanted = _params_json(params)
    try:
        complete = params_path.read_text() == wanted and all(p.is_file() for p in paths.values())
    except OSError:
        complete = False
    if complete:
        return False

    t0 = time.perf_counter()
    data = generate(params)
    desc_dir.mkdir(parents=True, exist_ok=True)
    struct_dir.mkdir(parents=True, exist_ok=True)
    params_path.unlink(missing_ok=True)  # a half-replaced benchmark must not look complete
    for key in ('db', 'query'):
        atomic_write(paths[key], lambda f, a=data[key]: np.save(f, a))
    for split in SPLITS:
        struct = _struct(split, data)
        atomic_write(paths[split], lambda f, s=struct: scipy.io.savemat(
            f, {'dbStruct': s}, appendmat=False, format='5'))
    inds = {}
    for split in SPLITS:
        pair = np.empty(2, dtype=object)
        pair[0], pair[1] = data[split + '_inds']
        inds[split + 'Inds'] = pair
    atomic_write(paths['split_inds'], lambda f: np.savez(f, **inds))
    atomic_write(params_path, lambda f: f.write(wanted.encode()))
    logger.info('generated the synthetic benchmark (%d db / %d query frames, dim %d, seed %d) in '
                '%s and %s in %.1f s', len(data['db']), len(data['query']), params.dim, params.seed,
                desc_dir, struct_dir, time.perf_counter() - t0)
    return True
