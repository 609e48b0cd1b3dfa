"""Online relocalisation: causal sequence matching, one query frame at a time.

``Localizer`` holds the database frame descriptors, projected once (``[Nd, D]``, L2-normalised,
contiguous float32). Each ``step(frame)`` costs one matrix-vector product for the new frame: its
``Nd`` frame distances go into a ring buffer ``[L, Nd]`` holding the last ``L`` query frames, and
the scores of all database windows are ``L`` shifted additions of those rows. Frame distances of
older frames are never recomputed.

Windows are *trailing*: the query window at time ``t`` is the last ``L`` frames since the last
``reset()``; the database window ending at ``j`` is frames ``j-L+1..j`` and never crosses a database
sequence bound. The sequence distance is the mean of the ``L`` Euclidean frame distances along the
aligned frames (``seqMatchNet``'s meanOfPairs).

``run_localize(opt)`` is ``--mode localize``: it replays a split's query traversal frame by frame,
or localises descriptors streamed from another process (``--stream FILE.npy|-``), and writes one CSV
row per query frame.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from numbers import Real

import numpy as np
import torch

from seqmatchnet.matching import blocks
from seqmatchnet.speeds import rules, trajectories

CSV_COLUMNS = ("query_frame", "db_frame", "distance", "confidence", "latency_ms", "velocity")
DEFAULT_CONF_RADIUS_FRAMES = 10
PROJECT_BATCH = 4096


# ---------------------------------------------------------------- the matcher

@dataclass(frozen=True)
class Match:
    """The best database window for the current query window.

    ``db_frame``: the last frame of that window (a row of the database); ``distance``: its sequence
    distance (mean Euclidean frame distance, in ``[0, 2]``); ``confidence``: ``distance`` divided by
    the best distance among the database windows whose last frame lies farther than the confidence
    radius from ``db_frame`` (lower = more confident: 1 means an equally good match elsewhere; NaN
    when no such window exists); ``position``: the database position of ``db_frame`` when positions
    are known; ``velocity``: the velocity of the matched trajectory (database frames per query
    frame).
    """

    db_frame: int
    distance: float
    confidence: float
    position: tuple[float, ...] | None = None
    velocity: float = 1.0
    held: bool = False          # with a spacing: the last match again (moved less than it)


@dataclass(frozen=True)
class SearchSettings:
    """How a ``Localizer`` searches the database: across which speeds, and how it projects it.

    ``velocities``: the speeds searched, in database frames per query frame: a tuple, one number, or
    the command line's text form ``"VMIN:VMAX:VSTEP"`` or ``"a,b,c"`` (``--velocities``, read by
    ``speeds.trajectories.parse_velocities``, which raises ``UserError`` on malformed text); the
    default ``(1.0,)`` is the diagonal (one speed, the plain sequence match). ``rule``: a
    ``speeds.rules.ScoringRule`` that combines the trajectories causally (None:
    ``speeds.rules.DEFAULT_RULE``); unused on the diagonal. ``grid``: 1 for trajectories on whole
    frames, 2 (the default) for the half grid (``speeds.trajectories.GRIDS`` maps
    ``--trajectoryGrid`` to it). ``batch_size`` (keyword-only): database frames projected at once
    (``PROJECT_BATCH``). ``spacing`` (keyword-only, metres): step the matcher only when the
    odometry passed to ``step`` has grown by at least this much since the last step (None: every
    frame).

    ``SearchSettings("0.5:2:0.5")`` searches speeds 0.5 to 2 on the half grid.
    """

    velocities: tuple[float, ...] = (1.0,)
    rule: rules.ScoringRule | None = None
    grid: int = 2
    batch_size: int = field(default=PROJECT_BATCH, kw_only=True)
    spacing: float | None = field(default=None, kw_only=True)

    def __post_init__(self) -> None:
        if self.spacing is not None and not (math.isfinite(self.spacing) and self.spacing > 0):
            raise ValueError(f"spacing must be a positive number of metres, got {self.spacing}")
        velocities = self.velocities
        if isinstance(velocities, str):
            velocities = trajectories.parse_velocities(velocities)
        elif isinstance(velocities, Real):
            velocities = (float(velocities),)
        object.__setattr__(self, "velocities", tuple(velocities))
        if self.rule is None:
            object.__setattr__(self, "rule", rules.DEFAULT_RULE)


def project_database(descriptors: np.ndarray | torch.Tensor, model=None,
                     device: torch.device | str = "cpu",
                     batch_size: int = PROJECT_BATCH) -> torch.Tensor:
    """Database frames ``[Nd, C]`` -> contiguous float32 ``[Nd, D]`` on ``device``, L2-normalised.

    With ``model``: ``model.encode`` on batches (eval mode, no gradients); without: the raw
    descriptors, normalised. Raises ValueError on NaN/Inf or all-zero rows (naming the first one).
    """
    device = torch.device(device)
    x = torch.as_tensor(descriptors)
    if x.ndim != 2 or x.shape[0] == 0 or x.shape[1] == 0:
        raise ValueError(f"database descriptors must be [frames, dims], got shape {tuple(x.shape)}")
    out = None
    with torch.no_grad():
        if model is not None:
            model.eval()
        for lo in range(0, len(x), batch_size):
            batch = x[lo:lo + batch_size].to(device=device, dtype=torch.float32)
            _check_rows(batch, lo)
            if model is not None:
                feats = model.encode(batch)
            else:
                feats = torch.nn.functional.normalize(batch, dim=1)
            if out is None:
                out = torch.empty((len(x), feats.shape[1]), dtype=torch.float32, device=device)
            out[lo:lo + len(batch)] = feats
    return out


def _check_rows(batch: torch.Tensor, offset: int) -> None:
    finite = torch.isfinite(batch).all(dim=1)
    if not bool(finite.all()):
        raise ValueError(f"database frame {offset + int(torch.argmin(finite.int()))} has NaN/Inf "
                         "values")
    nonzero = (batch != 0).any(dim=1)
    if not bool(nonzero.all()):
        raise ValueError(f"database frame {offset + int(torch.argmin(nonzero.int()))} is all zeros "
                         "and cannot be normalised")


class Localizer:
    """Causal sequence matching of query frames against a fixed database.

    Arguments (all after ``seq_len`` keyword-only):

    - ``db_descriptors``: the database frame descriptors ``[Nd, C]`` (NumPy or torch), raw.
    - ``model``: None to match the raw descriptors (L2-normalised), or a ``SeqMatchModel`` whose
      ``encode`` projects every frame (the database once, each query frame per step; put it in
      eval mode). A trained run's model: ``seqmatchnet.runs.loading.load_run(opt)`` returns it as
      ``.model`` (with ``.split`` and ``.device``) for the options of ``--resume RUN``, as
      ``cli/localize.py``'s ``load_model_for`` does; pass it when ``model.learned``, else None.
    - ``seq_len``: ``L``, the query frames per window (at least 1).
    - ``positions``: ``[Nd, k]`` database positions (optional): ``Match.position`` and a
      confidence radius in position units.
    - ``db_bounds``: ``[Nd, 2]`` each frame's segment ``[lo, hi)`` (default: one segment); no
      window or trajectory crosses a segment bound.
    - ``conf_radius``: the radius of the confidence ratio, in position units when positions are
      given, else in frames (None: ``DEFAULT_CONF_RADIUS_FRAMES`` frames, or that many median
      database frame spacings with positions).
    - ``device``: where the database and the ring buffer live (``"cpu"``, ``"cuda"``, ...).
    - ``search``: a ``SearchSettings`` (None: its defaults): the velocities, the scoring rule and
      the grid of the speed search, and the projection batch size.

    ``step(frame [C]) -> Match | None``: None until ``seq_len`` frames have arrived since
    construction or the last ``reset()``. Among exactly tied scores the smallest database frame
    wins. With ``search.spacing`` S, ``step(frame, odometry)`` takes each frame's odometry (metres
    travelled, non-decreasing until a ``reset``): the first frame after a reset and each frame S or
    more beyond the last stepped one step the matcher; the others return the last match with
    ``held=True`` (None before the first), so a vehicle standing still never advances the window.

    ``search.velocities`` (database frames per query frame, ``speeds.trajectories``): with the
    default ``(1.0,)`` the diagonal above. Otherwise the trailing query window (offsets ``k =
    -(L-1)..0``) is compared with every database trajectory ending at ``j`` (on ``grid`` 1 the
    frames ``j + round(v k)``; on the half grid, 2, also the trajectories ending at ``j + 1/2``,
    positions rounded to half frames, a midpoint the mean of its two neighbours' distances; all
    inside ``j``'s segment, see ``speeds.trajectories``): still one matrix-vector product per step,
    then shifted sums of the ring buffer's rows per trajectory. ``search.rule``
    (``speeds.rules.ScoringRule``, default ``speeds.rules.DEFAULT_RULE``) combines the trajectories
    causally: its statistics come from the current and the previous ``rule.window`` query frames of
    the current sequence only. ``Match.distance`` is then the mean frame distance along the chosen
    trajectory, ``confidence`` that distance over the best one (along each window's chosen
    trajectory) of the windows beyond the radius, and ``last_velocity`` the chosen velocity. Ties:
    the smallest database frame, then the velocity nearest 1.
    """

    def __init__(self, db_descriptors: np.ndarray | torch.Tensor, model=None, seq_len: int = 5, *,
                 positions: np.ndarray | None = None, db_bounds: np.ndarray | None = None,
                 conf_radius: float | None = None, device: torch.device | str = "cpu",
                 search: SearchSettings | None = None) -> None:
        search = SearchSettings() if search is None else search
        if seq_len < 1:
            raise ValueError(f"seq_len must be at least 1, got {seq_len}")
        self.seq_len = int(seq_len)
        self.model = model
        self.device = torch.device(device)
        self.input_dim = int(torch.as_tensor(db_descriptors).shape[-1])
        # [Nd, D]
        self.db_feats = project_database(db_descriptors, model, self.device, search.batch_size)
        nd = len(self.db_feats)
        if nd - self.seq_len + 1 < 1:
            raise ValueError(f"the database has {nd} frames, fewer than seq_len {self.seq_len}")
        self.num_db = nd
        self._penalty = self._window_penalty(db_bounds)
        self._setup_positions(positions)
        self.conf_radius = (self._default_radius(db_bounds) if conf_radius is None
                            else float(conf_radius))
        if not self.conf_radius >= 0:
            raise ValueError(f"conf_radius must be a non-negative number, got {conf_radius}")
        self._allocate_buffers()
        self._setup_trajectories(search, db_bounds)
        self.spacing = search.spacing
        self._last_match = self._stepped_at = self._odometry = None

    def _window_penalty(self, db_bounds: np.ndarray | None) -> torch.Tensor | None:
        """0 for the valid database windows, inf for those crossing a segment bound (None: all
        valid). Windows end at frames L-1 .. Nd-1; one ending at j is valid when it stays in j's
        segment."""
        nd = self.num_db
        if db_bounds is None:
            valid = np.ones(nd - self.seq_len + 1, dtype=bool)
        else:
            db_bounds = np.asarray(db_bounds, dtype=np.int64)
            if db_bounds.shape != (nd, 2):
                raise ValueError(f"db_bounds must be [{nd}, 2], got {db_bounds.shape}")
            ends = np.arange(self.seq_len - 1, nd)
            valid = ends - self.seq_len + 1 >= db_bounds[ends, 0]
        if not valid.any():
            raise ValueError(f"no database segment holds {self.seq_len} frames: use a shorter "
                             "seq_len")
        return None if valid.all() else torch.as_tensor(
            np.where(valid, 0.0, np.inf), dtype=torch.float32, device=self.device)

    def _setup_positions(self, positions: np.ndarray | None) -> None:
        """The database positions ``[Nd, k]`` (or None) and the buffers of the confidence radius."""
        self.positions = None
        self._end_positions = None
        if positions is None:
            return
        n_ends = self.num_db - self.seq_len + 1
        self.positions = np.asarray(positions, dtype=np.float64).reshape(self.num_db, -1)
        self._end_positions = torch.as_tensor(self.positions[self.seq_len - 1:], device=self.device)
        self._pos_diff = torch.empty_like(self._end_positions)          # [n_ends, k]
        self._pos_d2 = torch.empty(n_ends, dtype=torch.float64, device=self.device)
        self._near = torch.empty(n_ends, dtype=torch.bool, device=self.device)

    def _allocate_buffers(self) -> None:
        """The per-step buffers, allocated once."""
        nd, n_ends, dev = self.num_db, self.num_db - self.seq_len + 1, self.device
        self._twos = torch.full((nd,), 2.0, dtype=torch.float32, device=dev)
        self._ring = torch.empty((self.seq_len, nd), dtype=torch.float32, device=dev)   # [L, Nd]
        self._scores = torch.empty(n_ends, dtype=torch.float32, device=dev)   # window sums
        self._alt = (torch.empty(n_ends, dtype=torch.float32, device=dev)
                     if self.positions is not None else None)
        self._query = torch.empty(self.db_feats.shape[1], dtype=torch.float32, device=dev)
        self._count = 0

    def _setup_trajectories(self, search: SearchSettings, db_bounds: np.ndarray | None) -> None:
        """Trailing trajectories of ``search.velocities`` (None: the diagonal path) and their
        validity per end frame."""
        self.last_velocity = 1.0
        traj = trajectories.trajectories(search.velocities, self.seq_len, anchor="end",
                                         grid=search.grid)
        self._traj = None if traj.is_diagonal else traj
        if self._traj is None:
            return
        self.rule = search.rule
        # refuses a rule without a causal form
        rules.causal_coefficients(self.rule, np.zeros((1, traj.count)), np.zeros((1, traj.count)),
                                  np.ones((1, traj.count)))
        nd = self.num_db
        seg = np.tile([[0, nd]], (nd, 1)) if db_bounds is None else np.asarray(db_bounds)
        first, last = traj.reach                                   # [T] frames around the end
        ends = np.arange(nd)[None, :]
        valid = ((ends + first[:, None] >= seg[None, :, 0])
                 & (ends + last[:, None] < seg[None, :, 1]))           # [T, Nd]
        if not valid.any():
            raise ValueError(f"no database segment holds a trajectory of {self.seq_len} frames")
        self._traj_valid = torch.as_tensor(valid, device=self.device)
        self._traj_scores = torch.empty((traj.count, nd), dtype=torch.float32, device=self.device)
        self._history: list[np.ndarray] = []                       # rows [3, T]: best, mean, std

    def _default_radius(self, db_bounds: np.ndarray | None) -> float:
        if self.positions is None:
            return float(DEFAULT_CONF_RADIUS_FRAMES)
        steps = np.linalg.norm(np.diff(self.positions, axis=0), axis=1)
        if db_bounds is not None:                # spacings inside segments only
            steps = steps[db_bounds[1:, 0] == db_bounds[:-1, 0]]
        steps = steps[steps > 0]
        return float(DEFAULT_CONF_RADIUS_FRAMES * np.median(steps)) if len(steps) else 0.0

    @property
    def frames_in_window(self) -> int:
        """Query frames received since the last reset, capped at ``seq_len``."""
        return min(self._count, self.seq_len)

    def reset(self) -> None:
        """Start a new query sequence: the next ``seq_len - 1`` steps return None."""
        self._count = 0
        self._last_match = self._stepped_at = self._odometry = None
        if getattr(self, "_traj", None) is not None:
            self._history.clear()

    def step(self, frame: np.ndarray | torch.Tensor, odometry: float | None = None) -> Match | None:
        """Add query frame ``[C]`` and match the trailing window; None while it has fewer than L
        frames. With ``search.spacing``, ``odometry`` (metres travelled) decides whether the frame
        steps the matcher or gets the last match again (``held``); without it, it is not used.

        Raises ValueError for a frame of the wrong width, with NaN/Inf values or all zeros, and with
        a spacing for a missing or decreasing odometry.
        """
        if self.spacing is not None and not self._moved(odometry):
            last = self._last_match
            return None if last is None else replace(last, held=True)
        self._last_match = self._step(frame)
        return self._last_match

    def _moved(self, odometry: float | None) -> bool:
        """Whether the vehicle has moved ``spacing`` since the last stepped frame (then this frame
        steps); checks the odometry."""
        if odometry is None or not math.isfinite(odometry):
            raise ValueError(f"with a spacing every frame needs its odometry (metres travelled), "
                             f"got {odometry}")
        if self._odometry is not None and odometry < self._odometry:
            raise ValueError(f"the odometry went back from {self._odometry:g} to {odometry:g}: it "
                             "is the distance travelled (reset() starts a new sequence)")
        self._odometry = odometry
        if self._stepped_at is not None and odometry < self._stepped_at + self.spacing:
            return False
        self._stepped_at = odometry
        return True

    @torch.no_grad()
    def _step(self, frame: np.ndarray | torch.Tensor) -> Match | None:
        """``step`` of every frame: encode, add to the ring buffer, match the trailing window."""
        q = self._encode(frame)
        L = self.seq_len
        slot = self._count % L
        row = self._ring[slot]
        torch.addmv(self._twos, self.db_feats, q, alpha=-2.0, out=row)    # 2 - 2 db.q
        row.clamp_(min=0.0).sqrt_()
        self._count += 1
        if self._count < L:
            return None
        if self._traj is not None:
            return self._step_trajectories(slot)

        # window ending at database frame j: sum over k of d(q_{t-k}, db_{j-k}); scores[i] is for j
        # = L-1+i
        n = len(self._scores)
        scores = self._scores
        scores.copy_(row[L - 1:])
        for k in range(1, L):
            scores.add_(self._ring[(slot - k) % L, L - 1 - k:L - 1 - k + n])
        if self._penalty is not None:
            scores.add_(self._penalty)
        best = int(torch.argmin(scores))          # the first of exactly tied minima
        best_sum = float(scores[best])
        alt_sum = self._best_elsewhere(best)
        if not math.isfinite(alt_sum):
            confidence = math.nan
        else:
            confidence = best_sum / alt_sum if alt_sum > 0 else 1.0
        db_frame = best + L - 1
        position = (None if self.positions is None
                    else tuple(float(v) for v in self.positions[db_frame]))
        return Match(db_frame=db_frame, distance=best_sum / L, confidence=confidence,
                     position=position)

    def _encode(self, frame: np.ndarray | torch.Tensor) -> torch.Tensor:
        """Query frame ``[C]`` -> its projection ``[D]`` (the buffer ``self._query``), checked."""
        x = torch.as_tensor(frame)
        if x.ndim != 1 or x.shape[0] != self.input_dim:
            raise ValueError(f"expected a frame descriptor of {self.input_dim} values, got shape "
                             f"{tuple(x.shape)}")
        x = x.to(device=self.device, dtype=torch.float32)
        if not bool(torch.isfinite(x).all()):
            raise ValueError("the frame descriptor has NaN/Inf values")
        q = self._query
        if self.model is not None:
            q.copy_(self.model.encode(x[None])[0])
        else:
            norm = torch.linalg.vector_norm(x)
            if not bool(norm > 0):
                raise ValueError("the frame descriptor is all zeros and cannot be normalised")
            torch.div(x, norm, out=q)
        return q

    def _step_trajectories(self, slot: int) -> Match:
        """The best database trajectory for the full ring buffer whose newest row is ``slot``."""
        L, traj, sums = self.seq_len, self._traj, self._traj_scores
        nd = self.num_db
        rows = [self._ring[(slot + 1 + i) % L] for i in range(L)]  # query offsets -(L-1)..0
        # midpoint distances
        mids = [blocks.midpoints(r) for r in rows] if traj.weights.any() else rows
        first, last = traj.reach
        for t in range(traj.count):
            lo, hi = int(-first[t]), nd - max(int(last[t]), 0)  # end frames inside the database
            acc = sums[t, lo:hi]
            for i, (st, w) in enumerate(zip(traj.steps[t], traj.weights[t])):
                src = rows[i] if w == 0 else mids[i]
                part = src[lo + int(st):hi + int(st)]
                if i == 0:
                    acc.copy_(part)
                else:
                    acc.add_(part)
        dist = sums.div(L).masked_fill_(~self._traj_valid, torch.inf)  # [T, Nd] mean distances
        finite = torch.where(self._traj_valid, dist, 0.0).double()
        count = self._traj_valid.sum(dim=1).clamp(min=1).double()
        mean = finite.sum(dim=1) / count
        std = torch.sqrt(torch.clamp(finite.square().sum(dim=1) / count - mean.square(), min=0.0))
        self._history.append(np.stack([dist.amin(dim=1).double().cpu().numpy(), mean.cpu().numpy(),
                                       std.cpu().numpy()]))
        del self._history[:max(0, len(self._history) - (self.rule.window + 1))]
        h = np.stack(self._history)                                              # [W, 3, T]
        a, b = rules.causal_coefficients(self.rule, h[:, 0], h[:, 1], h[:, 2])
        adj = dist.double() * torch.as_tensor(a, device=self.device)[:, None] + torch.as_tensor(
            b, device=self.device)[:, None]
        adj = adj.masked_fill_(~self._traj_valid, torch.inf)
        score, t_best = adj[0].clone(), torch.zeros(self.num_db, dtype=torch.long,
                                                    device=self.device)
        for t in range(1, traj.count):                   # strictly better only: nearest 1 wins ties
            better = adj[t] < score
            score = torch.where(better, adj[t], score)
            t_best.masked_fill_(better, t)
        chosen = torch.gather(dist, 0, t_best[None])[0]  # [Nd] distance of the choice
        best = int(torch.argmin(score))  # the smallest frame among ties
        self.last_velocity = float(traj.velocities[int(t_best[best])])
        distance = float(chosen[best])
        alt = self._elsewhere_min(chosen, best)
        confidence = math.nan if not math.isfinite(alt) else (distance / alt if alt > 0 else 1.0)
        position = None if self.positions is None else tuple(float(v) for v in self.positions[best])
        return Match(db_frame=best, distance=distance, confidence=confidence, position=position,
                     velocity=self.last_velocity)

    def _elsewhere_min(self, values: torch.Tensor, best: int) -> float:
        """Smallest of ``values`` ``[Nd]`` (one per end frame) farther than ``conf_radius`` from
        frame ``best``."""
        if self.positions is None:
            r = math.floor(self.conf_radius)
            far = torch.abs(torch.arange(self.num_db, device=self.device) - best) > r
        else:
            pos = torch.as_tensor(self.positions, device=self.device)
            far = ((pos - pos[best]) ** 2).sum(dim=1) > self.conf_radius ** 2
        return float(values.masked_fill(~far, math.inf).min()) if bool(far.any()) else math.inf

    def _best_elsewhere(self, best: int) -> float:
        """Smallest window sum among windows ending farther than ``conf_radius`` from window
        ``best``."""
        scores = self._scores
        if self._end_positions is None:
            r = math.floor(self.conf_radius)
            lo, hi = best - r, best + r + 1
            parts = [float(scores[:lo].min())] if lo > 0 else []
            if hi < len(scores):
                parts.append(float(scores[hi:].min()))
            return min(parts, default=math.inf)
        torch.sub(self._end_positions, self._end_positions[best], out=self._pos_diff)
        torch.sum(self._pos_diff.square_(), dim=1, out=self._pos_d2)
        torch.le(self._pos_d2, self.conf_radius ** 2, out=self._near)
        return float(self._alt.copy_(scores).masked_fill_(self._near, math.inf).min())
