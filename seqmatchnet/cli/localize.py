"""``--mode localize``: replay a split's query traversal frame by frame, or localise descriptors
streamed from another process, through a ``Localizer``; one CSV row per query frame, latency
figures and, with positions, precision-recall.
"""
from __future__ import annotations

import argparse
import contextlib
import logging
import math
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TextIO

import numpy as np

from seqmatchnet.cli import localize_bag
from seqmatchnet.cli.shared import run_with_options
from seqmatchnet.common.errors import UserError
from seqmatchnet.common.files import atomic_write, ensure_output_dir, write_json_atomic
from seqmatchnet.data.spacing import csv_cell, path_distance
from seqmatchnet.evaluation import figures
from seqmatchnet.evaluation import recall as recall_mod
from seqmatchnet.evaluation import summary as summary_mod
from seqmatchnet.online.localizer import CSV_COLUMNS, Localizer, Match, SearchSettings
from seqmatchnet.online.streams import open_stream, read_frames
from seqmatchnet.runs import loading
from seqmatchnet.speeds import trajectories

log = logging.getLogger(__name__)


# ---------------------------------------------------------------- options

def load_model_for(opt: argparse.Namespace):
    """``(opt, split, model or None, device)`` for ``opt`` (``runs.load_run``): options restored
    from ``--resume RUN``, the split, and the learned projection on its device in eval mode (None
    for raw descriptors). Window models were refused with the options
    (``options.check_localize_options``)."""
    loaded = loading.load_run(opt)
    model = loaded.model
    return loaded.opt, loaded.split, (model.eval() if model.learned else None), loaded.device


def csv_row(query_frame: int, match: Match | None, latency_ms: float, held: bool = False,
            user: str = "") -> str:
    """One CSV line (no newline); db_frame, distance, confidence and velocity are empty without a
    match. With ``held`` (``--spacing``) a column says whether the match is the last one again
    (1) or a step of the matcher (0); ``user`` (``user_cells``) ends the line."""
    end = f",{int(match is not None and match.held)}" if held else ""
    if match is None:
        return f"{query_frame},,,,{latency_ms:.3f},{end}{user}"
    return (f"{query_frame},{match.db_frame},{match.distance:.7g},{match.confidence:.7g},"
            f"{latency_ms:.3f},{match.velocity:g}{end}{user}")


def csv_header(spacing: float | None, user: tuple[str, ...] = ()) -> str:
    """The CSV's header line: ``CSV_COLUMNS``, ``held`` with ``--spacing``, then the ``user``
    columns (``user_columns``)."""
    return ",".join(CSV_COLUMNS + (("held",) if spacing is not None else ()) + tuple(user))


def user_columns(split) -> tuple[str, ...]:
    """The replay CSV's columns of the user's rows for a dataset prepared with ``--spacing``:
    ``q_row``, ``db_row`` and, where images were given, ``q_image``, ``db_image``; none for the
    other datasets (their CSV stays as it was)."""
    if split.q_source is None or split.db_source is None:
        return ()
    images = split.q_source.images is not None or split.db_source.images is not None
    return ("q_row", "db_row") + (("q_image", "db_image") if images else ())


def user_cells(split, query_frame: int, match: Match | None, columns: tuple[str, ...]) -> str:
    """The ``columns`` (``user_columns``) of one replay CSV line, each after a comma; the
    database cells are empty without a match."""
    if not columns:
        return ""
    q, db = split.q_source, split.db_source
    d = None if match is None else match.db_frame

    def image(source, frame: int | None) -> str:
        return "" if frame is None or source.images is None else csv_cell(str(source.images[frame]))

    cells = [str(q.rows[query_frame]), "" if d is None else str(db.rows[d])]
    if len(columns) == 4:
        cells += [image(q, query_frame), image(db, d)]
    return "," + ",".join(cells)


def timed_step(localizer: Localizer, frame: np.ndarray,
               odometry: float | None = None) -> tuple[Match | None, float]:
    """``(match, latency in ms)`` of one ``step``."""
    t0 = time.perf_counter()
    match = localizer.step(frame, odometry)
    return match, (time.perf_counter() - t0) * 1e3


def replay_odometry(q_positions: np.ndarray, q_bounds: np.ndarray) -> np.ndarray:
    """The odometry of a replayed query traversal: metres along its positions, from 0 at the start
    of each segment (``q_bounds``)."""
    return path_distance(np.asarray(q_positions, dtype=np.float64), q_bounds[:, 0])


def split_odometry(split) -> np.ndarray:
    """The odometry a replay with ``--spacing`` steps by: the ``odometry`` column of the user's
    positions CSV when the dataset recorded one (prepared with ``--spacing`` from a CSV with that
    column), else the path length along the query positions (``replay_odometry``)."""
    if split.q_source is not None and split.q_source.odometry is not None:
        return np.asarray(split.q_source.odometry, dtype=np.float64)
    return replay_odometry(split.q_positions, split.q_bounds)


def latency_stats(latencies_ms: np.ndarray, wall_s: float) -> dict:
    """Latency p50/p99 (ms) and frames per second over a run."""
    lat = np.asarray(latencies_ms, dtype=float)
    if len(lat) == 0:
        return {"frames": 0, "latency_p50_ms": math.nan, "latency_p99_ms": math.nan,
                "frames_per_s": math.nan}
    return {"frames": len(lat), "latency_p50_ms": float(np.percentile(lat, 50)),
            "latency_p99_ms": float(np.percentile(lat, 99)),
            "frames_per_s": float(len(lat) / wall_s) if wall_s > 0 else math.inf}


def format_latency(stats: dict) -> str:
    return (f"latency p50 {stats['latency_p50_ms']:.3f} ms, p99 {stats['latency_p99_ms']:.3f} ms, "
            f"{stats['frames_per_s']:.1f} frames/s over {stats['frames']} frames")


def replay(localizer: Localizer, q_desc: np.ndarray, q_bounds: np.ndarray,
           odometry: np.ndarray | None = None) -> tuple[list, np.ndarray, float]:
    """Localise a query traversal frame by frame, resetting at each new segment.

    ``q_desc`` ``[Nq, C]``, ``q_bounds`` ``[Nq, 2]``, ``odometry`` ``[Nq]`` (with a spacing).
    Returns ``(matches [Nq] (None before a window is full), latencies_ms [Nq], wall seconds)``.
    """
    matches: list[Match | None] = []
    latencies = np.empty(len(q_desc))
    t0 = time.perf_counter()
    for t in range(len(q_desc)):
        if t == q_bounds[t, 0]:
            localizer.reset()
        step_odometry = None if odometry is None else float(odometry[t])
        match, latencies[t] = timed_step(localizer, q_desc[t], step_odometry)
        matches.append(match)
    return matches, latencies, time.perf_counter() - t0


def build_localizer(opt: argparse.Namespace, split, model, device, radius: float,
                    spacing: float | None = None) -> Localizer:
    """The ``Localizer`` of ``split``'s database for the options; a database it refuses is a
    ``UserError`` naming the split."""
    try:
        search = SearchSettings(opt.velocities, grid=trajectories.GRIDS[opt.trajectoryGrid],
                                batch_size=opt.cacheBatchSize, spacing=spacing)
        return Localizer(split.db_desc, model=model, seq_len=opt.seqL,
                         positions=split.db_positions, db_bounds=split.db_bounds,
                         conf_radius=radius, device=device, search=search)
    except ValueError as exc:
        raise UserError(f"split {split.name}: {exc}") from exc


def write_replay_csv(path: Path, matches: list, latencies: np.ndarray,
                     spacing: float | None, split=None) -> None:
    """The replay's CSV, one row per query frame, atomically; with a ``split`` of a dataset
    prepared with ``--spacing``, the user's rows (``user_columns``) end each line."""
    held = spacing is not None
    user = () if split is None else user_columns(split)
    lines = [csv_header(spacing, user)] + [
        csv_row(t, m, lat, held, user_cells(split, t, m, user))
        for t, (m, lat) in enumerate(zip(matches, latencies))]
    atomic_write(path, lambda f: f.write(("\n".join(lines) + "\n").encode()))


def query_frames(query, split, localizer: Localizer, device) -> tuple[list, np.ndarray, float,
                                                                      np.ndarray | None]:
    """``replay``'s ``(matches, latencies_ms, wall seconds)`` and the query positions (None:
    unknown) of the split's queries, or of a query bag's frames (``localize_bag``)."""
    if query is not None:
        return (*localize_bag.localize_query_bag(query, localizer, device),
                localize_bag.query_positions(query))
    odometry = None if localizer.spacing is None else split_odometry(split)
    return (*replay(localizer, split.q_desc, split.q_bounds, odometry), split.q_positions)


def run_localize(opt: argparse.Namespace) -> dict:
    """``--mode localize``: replay the split's queries (or ``--stream``) causally; CSV, Recall@1,
    latency. With ``--spacing`` the matcher steps only after that many metres of odometry: along
    the query positions in a replay, the last value of each row in a stream."""
    spacing = opt.spacing
    if opt.resultsPath:
        ensure_output_dir(Path(opt.resultsPath), "--resultsPath")
    stream = opt.stream
    t0 = time.perf_counter()
    query = localize_bag.open_query_bag(opt) if opt.bag is not None else None
    opt, split, model, device = load_model_for(opt)
    radius = split.pos_dist_thr if opt.confRadius is None else opt.confRadius
    localizer = build_localizer(opt, split, model, device, radius, spacing)
    setup_s = time.perf_counter() - t0
    if stream is not None:
        return _run_stream(opt, localizer, stream, setup_s)

    matches, latencies, wall, q_positions = query_frames(query, split, localizer, device)
    if opt.output:
        write_replay_csv(Path(opt.output), matches, latencies, spacing,
                         split if query is None else None)
    done = np.array([m is not None for m in matches])
    stats = latency_stats(latencies, wall)
    result = {"mode": "localize", "queries": len(matches), "queries_localised": int(done.sum()),
              "conf_radius": float(radius), "velocities": opt.velocities,
              "trajectoryGrid": opt.trajectoryGrid, **stats}
    if spacing is not None:
        result.update(spacing_m=spacing,
                      matcher_steps=int(sum(m is not None and not m.held for m in matches)))
    recall, pr = math.nan, None
    if done.any() and q_positions is not None:
        q_rows = np.flatnonzero(done)
        db_frames = np.array([matches[t].db_frame for t in q_rows])
        confidence = np.array([matches[t].confidence for t in q_rows])
        recall, n_pos, pr = evaluate_matches(
            db_frames, confidence, split.db_positions, q_positions[q_rows],
            split.pos_dist_thr, Path(opt.resultsPath) if opt.resultsPath else None,
            f"{opt.dataset} {opt.split} seqL {opt.seqL}")
        result.update(queries_with_positives=n_pos)
    result["recall@1"] = recall
    print(f"{opt.dataset} {opt.split} (seqL {opt.seqL}, causal): Recall@1 {recall:.4f} within "
          f"posDistThr {split.pos_dist_thr:g} {split.position_unit} over "
          f"{result.get('queries_with_positives', 0)} localised queries with a positive "
          f"({result['queries_localised']} of {len(matches)} localised)")
    print(format_latency(stats))
    if opt.output:
        print(f"matches written to {opt.output}")
    if opt.resultsPath:
        _write_summary(opt, split, result, pr, {"setup_s": setup_s, "localize_s": wall})
    return result


def evaluate_matches(db_frames: np.ndarray, confidence: np.ndarray, db_positions: np.ndarray,
                     q_positions: np.ndarray, radius: float, results_dir: Path | None,
                     label: str) -> tuple[float, int, dict | None]:
    """Recall@1 of causal matches and their precision-recall over the confidence threshold.

    ``db_frames``, ``confidence`` ``[n]`` for the localised queries at ``q_positions`` ``[n, k]``;
    a match is correct within ``radius`` (<=); queries without a database frame within ``radius``
    are left out. With ``results_dir``, ``localize_precision_recall.png`` is written there and
    the precision-recall numbers are returned. Returns ``(recall@1, queries with a positive, pr or
    None)``. The only place this module imports the project's metrics and figure code. """
    correct, has_pos = recall_mod.top1_outcomes(db_frames, db_positions, q_positions, radius)
    n_pos = int(has_pos.sum())
    recall = float(correct[has_pos].mean()) if n_pos else math.nan
    if results_dir is None:
        return recall, n_pos, None
    pr = recall_mod.precision_recall(confidence, correct, has_pos)
    fig = figures.pr_figure(pr,
                            title=f"{label}: causal matches,\naccepted when confidence <= "
                                  "threshold")
    figures.save_figure(fig, results_dir / "localize_precision_recall.png")
    return recall, n_pos, pr


def _write_summary(opt: argparse.Namespace, split, result: dict, pr: dict | None,
                   timings: dict) -> None:
    extra = {k: v for k, v in result.items() if k not in ("mode", "recall@1")}
    summary = summary_mod.build_summary("localize", vars(opt), {1: result["recall@1"]}, {}, pr,
                                        timings, split.files,
                                   extra={"localize": extra})
    write_json_atomic(summary, Path(opt.resultsPath) / "summary.json")
    log.info("localisation summary and precision-recall figure written to %s", opt.resultsPath)


@contextlib.contextmanager
def _console_log_to_stderr():
    """While the CSV goes to stdout, route log records printed there to stderr instead."""
    moved = [h for h in logging.getLogger().handlers
             if type(h) is logging.StreamHandler and h.stream is sys.stdout]
    for h in moved:
        h.setStream(sys.stderr)
    try:
        yield
    finally:
        for h in moved:
            h.setStream(sys.stdout)


def _run_stream(opt: argparse.Namespace, localizer: Localizer, stream: str, setup_s: float) -> dict:
    """Localise frames from ``--stream`` as they arrive: one flushed CSV line per frame (to
    ``--output``, else to stdout with log messages moved to stderr)."""
    with contextlib.ExitStack() as stack:
        extra = int(localizer.spacing is not None)      # the odometry after the descriptor
        width = None if opt.dim is None else opt.dim + extra
        source, count, dim, dtype, name = stack.enter_context(open_stream(stream, width))
        if dim != localizer.input_dim + extra:
            raise UserError(f"{name}: frame 0 has {dim} values but the database descriptors have "
                            f"{localizer.input_dim}{' (plus the odometry)' if extra else ''}: "
                            "stream descriptors of the same type (--descType)")
        if opt.output:
            try:
                out = stack.enter_context(open(opt.output, "w", encoding="utf-8"))
            except OSError as exc:
                raise UserError(f"cannot write --output {opt.output} ({exc.strerror or exc}): "
                                "choose a writable path") from exc
        else:
            out = sys.stdout
            stack.enter_context(_console_log_to_stderr())
        latencies, wall = stream_localize(localizer, read_frames(source, dim, dtype, name, count),
                                          out)
    stats = latency_stats(np.asarray(latencies), wall)
    print(f"{name}: {format_latency(stats)}", file=sys.stdout if opt.output else sys.stderr)
    return {"mode": "localize", "stream": stream, "setup_s": setup_s, **stats}


def stream_localize(localizer: Localizer, frames: Iterator[np.ndarray],
                    out: TextIO) -> tuple[list[float], float]:
    """Write the CSV header, then one flushed line per frame of ``frames`` as it arrives.

    Returns ``(latencies_ms, wall seconds)``. An error raised by ``frames`` ends the run after the
    lines of the frames before it.
    """
    spacing = localizer.spacing
    out.write(csv_header(spacing) + "\n")
    out.flush()
    latencies: list[float] = []
    t0 = time.perf_counter()
    for i, frame in enumerate(frames):
        try:
            if spacing is None:
                match, lat = timed_step(localizer, frame)
            else:
                match, lat = timed_step(localizer, frame[:-1], float(frame[-1]))
        except ValueError as exc:
            raise UserError(f"stream frame {i}: {exc}") from exc
        out.write(csv_row(i, match, lat, spacing is not None) + "\n")
        out.flush()
        latencies.append(lat)
    return latencies, time.perf_counter() - t0


def main(argv: list[str]) -> int:
    """``--mode localize`` entry (``argv`` without ``--mode``): the exit code."""
    return run_with_options("localize", argv, run_localize)
