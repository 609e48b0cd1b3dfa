"""Online relocalisation (localize.py): causal matches against a plain loop, ties, bounds, the CLI and streams."""
from __future__ import annotations

import csv
import io
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import plain
import test_velocity as twins
from conftest import ROOT, unit_rows
from seqmatchnet.cli.localize import run_localize
from seqmatchnet.common.errors import UserError
from seqmatchnet.online.localizer import CSV_COLUMNS, Localizer, Match, SearchSettings

N_TEST = 400 - int(400 * 0.65)          # query and database frames of the tiny Oxford test split
TEST_ROWS = np.arange(int(400 * 0.65), 400)


# ---------------------------------------------------------------- the plain-loop oracle

def plain_causal_scores(db: np.ndarray, q: np.ndarray, db_bounds: np.ndarray, q_bounds: np.ndarray,
                        seq_len: int) -> list[dict | None]:
    """Straight from the definition: for query frame t, None when fewer than L frames of its segment have
    arrived; else {j: mean over k < L of ||q_{t-k} - db_{j-k}||} over database windows ending at j that stay
    inside j's segment (frames L2-normalised, float64)."""
    dbn = [np.asarray(r, dtype=np.float64) / np.linalg.norm(r) for r in db]
    qn = [np.asarray(r, dtype=np.float64) / np.linalg.norm(r) for r in q]
    out: list[dict | None] = []
    for t in range(len(q)):
        if t - seq_len + 1 < q_bounds[t][0]:
            out.append(None)
            continue
        scores = {}
        for j in range(len(db)):
            if j - seq_len + 1 < db_bounds[j][0]:
                continue
            total = 0.0
            for k in range(seq_len):
                total += float(np.linalg.norm(qn[t - k] - dbn[j - k]))
            scores[j] = total / seq_len
        out.append(scores)
    return out


def plain_confidence(scores: dict, chosen: int, radius: float, positions: np.ndarray | None) -> float:
    """Score of ``chosen`` over the best score of windows ending farther than ``radius`` from it."""
    def far(j: int) -> bool:
        if positions is None:
            return abs(j - chosen) > radius
        return float(np.linalg.norm(positions[j] - positions[chosen])) > radius

    others = [s for j, s in scores.items() if far(j)]
    if not others:
        return math.nan
    return scores[chosen] / min(others) if min(others) > 0 else 1.0


bounds_of = plain.segments_of


def replay_with_resets(loc: Localizer, q: np.ndarray, q_bounds: np.ndarray) -> list[Match | None]:
    out = []
    for t in range(len(q)):
        if t == q_bounds[t, 0]:
            loc.reset()
        out.append(loc.step(q[t]))
    return out


def check_against_plain(matches: list, plain: list, radius: float, positions: np.ndarray | None,
                        tol: float = 1e-5) -> int:
    """Every match is a best window of the plain loop (up to exactly tied scores, within float32 rounding),
    with its distance and confidence. Returns the number of matched frames."""
    assert len(matches) == len(plain)
    n = 0
    for t, (m, scores) in enumerate(zip(matches, plain)):
        if scores is None:
            assert m is None, f"frame {t}: a match before the window is full"
            continue
        assert m is not None, f"frame {t}: no match with a full window"
        best = min(scores.values())
        assert m.db_frame in scores, f"frame {t}: window ending at {m.db_frame} crosses a database bound"
        assert scores[m.db_frame] <= best + tol, (t, m.db_frame, scores[m.db_frame], best)
        near_ties = [j for j, s in scores.items() if s <= best + tol]
        assert m.db_frame == min(near_ties) or len(near_ties) > 1
        assert m.distance == pytest.approx(best, abs=tol)
        expected = plain_confidence(scores, m.db_frame, radius, positions)
        if math.isnan(expected):
            assert math.isnan(m.confidence)
        else:
            assert m.confidence == pytest.approx(expected, abs=1e-4)
        if positions is not None:
            assert m.position == tuple(positions[m.db_frame])
        n += 1
    return n


def route(seed: int, n_db: int, n_q: int, dim: int) -> tuple[np.ndarray, np.ndarray]:
    """Database frames and noisy query frames of the same places (so that real matches exist)."""
    rng = np.random.default_rng(seed)
    db = unit_rows(rng, n_db, dim)
    q = db[(np.arange(n_q) * 7 + 3) % n_db] + 0.4 * rng.standard_normal((n_q, dim)).astype(np.float32)
    return db, q.astype(np.float32)


# ---------------------------------------------------------------- the matcher

@pytest.mark.parametrize("seq_len", [1, 2, 5])
def test_matches_equal_plain_loop_with_bounds_on_both_sides(seq_len):
    db, q = route(seq_len, 60, 36, 8)
    db_bounds = bounds_of([25, 4, 31])        # the 4-frame segment holds no window of 5
    q_bounds = bounds_of([3, 14, 19])         # the first segment never fills a window of 5
    loc = Localizer(db, seq_len=seq_len, db_bounds=db_bounds, conf_radius=3.5)
    matches = replay_with_resets(loc, q, q_bounds)
    plain = plain_causal_scores(db, q, db_bounds, q_bounds, seq_len)
    n = check_against_plain(matches, plain, 3.5, None)
    assert n == sum(max(n_seg - seq_len + 1, 0) for n_seg in (3, 14, 19))


@pytest.mark.parametrize("seq_len", [1, 2, 5])
def test_confidence_in_position_units_matches_plain_loop(seq_len):
    db, q = route(10 + seq_len, 40, 20, 6)
    positions = np.stack([np.arange(40) * 2.0, np.zeros(40)], axis=1)
    db_bounds = bounds_of([18, 22])
    loc = Localizer(db, seq_len=seq_len, positions=positions, db_bounds=db_bounds, conf_radius=5.0)
    matches = replay_with_resets(loc, q, bounds_of([20]))
    plain = plain_causal_scores(db, q, db_bounds, bounds_of([20]), seq_len)
    assert check_against_plain(matches, plain, 5.0, positions) == 20 - seq_len + 1


def test_projection_model_matches_plain_loop_on_projected_frames():
    from seqmatchnet.models.sequence import SeqMatchModel

    torch.manual_seed(0)
    model = SeqMatchModel(16, pooling=True, out_dims=8).eval()
    db, q = route(3, 30, 12, 16)
    encoded_rows = []
    encode = model.encode
    model.encode = lambda x: (encoded_rows.append(len(x)), encode(x))[1]
    loc = Localizer(db, model=model, seq_len=3, conf_radius=4, search=SearchSettings(batch_size=7))
    assert sum(encoded_rows) == 30                    # the database is projected once, in batches
    encoded_rows.clear()
    matches = [loc.step(f) for f in q]
    assert encoded_rows == [1] * 12                   # then one frame per step
    with torch.no_grad():
        db_p, q_p = encode(torch.from_numpy(db)).numpy(), encode(torch.from_numpy(q)).numpy()
    plain = plain_causal_scores(db_p, q_p, bounds_of([30]), bounds_of([12]), 3)
    assert check_against_plain(matches, plain, 4, None) == 10


def test_exact_ties_pick_the_smallest_database_frame():
    eye = np.eye(8, dtype=np.float32)
    db = np.concatenate([eye[[5, 1, 2, 3]], eye[[1, 2, 3]], eye[[6, 1, 2, 3]]])   # frames 1-3, 4-6, 8-10 alike
    loc = Localizer(db, seq_len=3, conf_radius=1)
    assert loc.step(eye[1]) is None and loc.step(eye[2]) is None
    m = loc.step(eye[3])
    assert m.db_frame == 3 and m.distance == 0.0
    assert m.confidence == 1.0            # equally good windows end 3 and 7 frames away


def test_no_match_until_the_window_is_full_and_after_reset():
    db, q = route(4, 20, 10, 4)
    loc = Localizer(db, seq_len=4)
    assert [loc.step(f) is None for f in q[:5]] == [True, True, True, False, False]
    loc.reset()
    assert loc.frames_in_window == 0
    assert [loc.step(f) is None for f in q[5:]] == [True, True, True, False, False]


@pytest.mark.parametrize("grid", [1, 2])
@pytest.mark.parametrize("velocities", [(1.0,), (0.5, 1.0, 2.0)], ids=["diagonal", "speeds"])
def test_step_uses_one_matrix_vector_product(monkeypatch, velocities, grid):
    """Each step costs one matrix-vector product over the database, with or without trajectories."""
    db, q = route(5, 50, 8, 4)
    loc = Localizer(db, seq_len=5, search=SearchSettings(velocities, grid=grid))
    calls = []
    real_addmv, real_mm = torch.addmv, torch.Tensor.__matmul__
    monkeypatch.setattr(torch, "addmv", lambda *a, **k: (calls.append("mv"), real_addmv(*a, **k))[1])
    monkeypatch.setattr(torch.Tensor, "__matmul__", lambda *a: (calls.append("mm"), real_mm(*a))[1])
    for f in q:
        loc.step(f)
    assert calls == ["mv"] * 8


def test_bad_frames_and_databases_are_refused():
    db, _ = route(6, 10, 1, 4)
    loc = Localizer(db, seq_len=2)
    for bad, msg in ((np.zeros(5, np.float32), "4 values"), (np.array([1, np.nan, 0, 0], np.float32), "NaN"),
                     (np.zeros(4, np.float32), "all zeros")):
        with pytest.raises(ValueError, match=msg):
            loc.step(bad)
    with pytest.raises(ValueError, match="no database segment"):
        Localizer(db, seq_len=3, db_bounds=bounds_of([2, 2, 2, 2, 2]))
    with pytest.raises(ValueError, match="frame 3"):
        Localizer(np.where(np.arange(10)[:, None] == 3, np.nan, db), seq_len=2)


# ---------------------------------------------------------------- the mode (CLI options)

def localize_options(root: Path, *extra: str):
    """Options as the main parser gives them (localisation flags added when it lacks them)."""
    from seqmatchnet.cli import options

    parser = options.build_parser()
    argv = ["--mode", "localize", "--dataset", "oxford-v1.0",
            "--split", "test", "--nocuda", "--quiet", "--dataPath", str(root / "data"),
            "--structPath", str(root / "structFiles"), *extra]
    return options.check_options(parser.parse_args(argv))


def read_csv(path_or_text) -> list[dict]:
    text = path_or_text.read_text() if isinstance(path_or_text, Path) else path_or_text
    reader = csv.DictReader(io.StringIO(text))
    assert tuple(reader.fieldnames) == CSV_COLUMNS
    return list(reader)


def tiny_test_split(root: Path) -> tuple[np.ndarray, np.ndarray]:
    desc = root / "data" / "descData" / "netvlad-pytorch"
    db = np.load(desc / "oxford_2015-03-17-11-08-44_stereo_left.npy")[TEST_ROWS]
    q = np.load(desc / "oxford_2014-12-16-18-44-24_stereo_left.npy")[TEST_ROWS]
    return db, q


def test_replay_writes_csv_recall_and_summary(tiny_oxford, tmp_path, capsys):
    out, res = tmp_path / "matches.csv", tmp_path / "res"
    opt = localize_options(tiny_oxford, "--seqL", "3", "--output", str(out), "--resultsPath", str(res))
    result = run_localize(opt)
    rows = read_csv(out)
    assert [int(r["query_frame"]) for r in rows] == list(range(N_TEST))
    assert all(r["db_frame"] == r["distance"] == r["confidence"] == "" for r in rows[:2])
    assert all(float(r["latency_ms"]) >= 0 for r in rows)

    db, q = tiny_test_split(tiny_oxford)
    plain = plain_causal_scores(db, q, bounds_of([N_TEST]), bounds_of([N_TEST]), 3)
    matches = [None if not r["db_frame"] else Match(int(r["db_frame"]), float(r["distance"]), float(r["confidence"]),
                                                    (2.0 * TEST_ROWS[int(r["db_frame"])], 0.0)) for r in rows]
    positions = np.stack([TEST_ROWS * 2.0, np.zeros(N_TEST)], axis=1)
    assert check_against_plain(matches, plain, 10.0, positions, tol=2e-5) == N_TEST - 2   # confRadius: posDistThr

    correct = [abs(int(r["db_frame"]) - int(r["query_frame"])) * 2.0 <= 10.0 for r in rows[2:]]
    assert result["recall@1"] == pytest.approx(np.mean(correct))
    printed = capsys.readouterr().out
    assert f"Recall@1 {np.mean(correct):.4f}" in printed and "p99" in printed and "frames/s" in printed
    summary = json.loads((res / "summary.json").read_text())
    assert summary["mode"] == "localize" and summary["recalls"]["1"] == pytest.approx(np.mean(correct))
    assert summary["localize"]["queries_localised"] == N_TEST - 2
    assert 0 <= summary["precision_recall"]["auc"] <= 1
    assert (res / "localize_precision_recall.png").stat().st_size > 0


def test_replay_resets_at_query_sequence_bounds(tiny_oxford, monkeypatch, tmp_path):
    from seqmatchnet.runs import loading

    real = loading.get_split

    def two_segments(opt, name, **kwargs):
        split = real(opt, name, **kwargs)
        split.q_bounds = bounds_of([50, N_TEST - 50])
        return split

    monkeypatch.setattr(loading, "get_split", two_segments)
    out = tmp_path / "m.csv"
    run_localize(localize_options(tiny_oxford, "--seqL", "4", "--output", str(out)))
    empty = [int(r["query_frame"]) for r in read_csv(out) if r["db_frame"] == ""]
    assert empty == [0, 1, 2, 50, 51, 52]


def test_stream_npy_equals_replay(tiny_oxford, tmp_path):
    _, q = tiny_test_split(tiny_oxford)
    np.save(tmp_path / "q.npy", q.astype(np.float64))       # any float type is read
    run_localize(localize_options(tiny_oxford, "--seqL", "3", "--output", str(tmp_path / "replay.csv")))
    run_localize(localize_options(tiny_oxford, "--seqL", "3", "--stream", str(tmp_path / "q.npy"),
                                  "--output", str(tmp_path / "stream.csv")))
    replayed, streamed = read_csv(tmp_path / "replay.csv"), read_csv(tmp_path / "stream.csv")
    assert [r["db_frame"] for r in streamed] == [r["db_frame"] for r in replayed]
    assert [r["confidence"] for r in streamed] == [r["confidence"] for r in replayed]


class FakeStdin:
    def __init__(self, data: bytes) -> None:
        self.buffer = io.BytesIO(data)


def stream_stdin(root: Path, data: bytes, monkeypatch, *extra: str) -> None:
    monkeypatch.setattr(sys, "stdin", FakeStdin(data))
    run_localize(localize_options(root, "--seqL", "2", "--stream", "-", *extra))


def test_stream_stdin_prints_one_line_per_frame(tiny_oxford, monkeypatch, capsys):
    _, q = tiny_test_split(tiny_oxford)
    stream_stdin(tiny_oxford, q[:6].astype("<f4").tobytes(), monkeypatch, "--dim", "16")
    captured = capsys.readouterr()
    rows = read_csv(captured.out)
    assert [r["query_frame"] for r in rows] == [str(i) for i in range(6)]
    assert rows[0]["db_frame"] == "" and all(r["db_frame"] for r in rows[1:])
    assert "p50" in captured.err                           # the summary stays out of the CSV on stdout


@pytest.mark.parametrize("case", ["nan", "truncated", "width", "npy_width", "npy_truncated", "npy_short"])
def test_bad_stream_input_names_the_frame(tiny_oxford, monkeypatch, capsys, tmp_path, case):
    _, q = tiny_test_split(tiny_oxford)
    frames = q[:6].astype("<f4").copy()
    if case == "nan":
        frames[4, 7] = np.nan
        raw, extra, frame, msg, done = frames.tobytes(), ["--dim", "16"], 4, "NaN", 4
    elif case == "truncated":
        raw, extra, frame, msg, done = frames.tobytes()[:-3], ["--dim", "16"], 5, "truncated", 5
    elif case == "width":
        raw, extra, frame, msg, done = frames.tobytes(), ["--dim", "15"], 0, "15 values", 0
    else:
        path = tmp_path / "q.npy"
        np.save(path, frames[:, :12] if case == "npy_width" else frames)
        if case != "npy_width":        # the last row and a half, or exactly the last row, are gone
            path.write_bytes(path.read_bytes()[:-70 if case == "npy_truncated" else -64])
        raw, extra = b"", ["--stream", str(path)]
        frame, msg, done = {"npy_width": (0, "12 values", 0), "npy_truncated": (4, "truncated", 4),
                            "npy_short": (5, "no data", 5)}[case]
    with pytest.raises(UserError, match=f"frame {frame} .*{msg}|{msg}.*frame {frame}") as err:
        if case.startswith("npy"):
            run_localize(localize_options(tiny_oxford, "--seqL", "2", *extra))
        else:
            stream_stdin(tiny_oxford, raw, monkeypatch, *extra)
    assert f"frame {frame}" in str(err.value)
    out = capsys.readouterr().out
    lines = out.splitlines()[1:] if out else []
    assert [line.split(",")[0] for line in lines] == [str(i) for i in range(done)]


def test_localize_options_are_checked(tiny_oxford):
    with pytest.raises(UserError, match="--dim"):
        run_localize(localize_options(tiny_oxford, "--seqL", "2", "--stream", "-"))
    with pytest.raises(UserError, match="--confRadius"):
        run_localize(localize_options(tiny_oxford, "--seqL", "2", "--confRadius", "-1"))


CHILD = """
import sys
sys.path.insert(0, {root!r})
from seqmatchnet.cli import localize, options
p = options.build_parser()
opt = options.check_options(p.parse_args(["--mode", "localize", "--nocuda", "--quiet", "--dataset", "oxford-v1.0",
    "--split", "test", "--seqL", "2", "--stream", "-", "--dim", "16", "--dataPath", {data!r},
    "--structPath", {struct!r}]))
localize.run_localize(opt)
"""


@pytest.mark.slow
def test_stream_pipe_answers_each_frame_before_the_next_arrives(tiny_oxford):
    _, q = tiny_test_split(tiny_oxford)
    code = CHILD.format(root=str(ROOT), data=str(tiny_oxford / "data"), struct=str(tiny_oxford / "structFiles"))
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}    # stdout block-buffered, as in a pipe
    proc = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, cwd=str(ROOT), env=env)
    try:
        assert proc.stdout.readline().decode().strip() == ",".join(CSV_COLUMNS)
        for i in range(3):        # the pipe stays open: each line must come back on its own
            proc.stdin.write(q[i].astype("<f4").tobytes())
            proc.stdin.flush()
            assert proc.stdout.readline().decode().split(",")[0] == str(i)
        proc.stdin.close()
        assert proc.wait(timeout=60) == 0
        assert "p50" in proc.stderr.read().decode()
    finally:
        if proc.poll() is None:
            proc.kill()


def test_main_dispatches_localize_when_wired(tiny_oxford, tmp_path, monkeypatch):
    from seqmatchnet.cli import options

    parser = options.build_parser()
    mode = next(a for a in parser._actions if "--mode" in a.option_strings)
    if "localize" not in mode.choices or not any("--output" in a.option_strings for a in parser._actions):
        pytest.skip("main.py's parser has no --mode localize or no localisation options yet")
    import main

    out = tmp_path / "m.csv"
    monkeypatch.chdir(tiny_oxford)
    assert main.main(["--mode", "localize", "--dataset", "oxford-v1.0", "--split", "test", "--seqL", "2",
                      "--nocuda", "--quiet", "--output", str(out)]) == 0
    assert len(read_csv(out)) == N_TEST


# ---------------------------------------------------------------- across speeds (velocities)

def plain_causal_trajectories(db, q, db_bounds, q_bounds, seq_len, velocities, rule, grid=1,
                               traj=None) -> list[tuple | None]:
    """From the definition: per query frame, None before its window is full; else (db frame, velocity,
    distance) of the best adjusted score over every trailing trajectory reported at j (positions
    j + s + v k rounded to the grid, k = -(L-1)..0, phases s = 0 and, on the half grid, 1/2; a midpoint's
    distance the mean of its two frames'; every frame it touches inside j's segment), with a, b from the
    current and previous ``rule.window`` full windows of the query's segment (consensus of each trajectory's
    best score, z-normalised per step); ties by the smallest j, then the trajectory order (velocity nearest 1,
    then phase 0). The enumeration (``test_velocity.plain_trajectories``) is checked against ``traj``."""
    plain = twins.plain_trajectories(velocities, seq_len, "end", grid)
    if traj is not None:
        twins.assert_same_trajectories(traj, plain, grid)
    dbn = [np.asarray(r, np.float64) / np.linalg.norm(r) for r in db]
    qn = [np.asarray(r, np.float64) / np.linalg.norm(r) for r in q]
    out, history = [], []
    for t in range(len(q)):
        if t == q_bounds[t][0]:
            history = []
        if t - seq_len + 1 < q_bounds[t][0]:
            out.append(None)
            continue
        dist = [float(np.linalg.norm(qn[t + k] - f)) for k in plain.offsets for f in dbn]   # [L * Nd]
        d = {}
        for tr, pos in enumerate(plain.positions):
            for j in range(len(db)):
                lo, hi = db_bounds[j]
                if not all(lo <= f < hi for f in twins.touched(j, pos)):
                    continue
                total = 0.0
                for i, p in enumerate(pos):
                    f = math.floor(j + p)
                    row = i * len(db)
                    total += dist[row + f] if j + p == f else (dist[row + f] + dist[row + f + 1]) / 2
                d[tr, j] = total / seq_len
        stats = []
        for tr in range(plain.count):
            vals = [v for (u, _), v in d.items() if u == tr]
            mean = sum(vals) / len(vals)
            std = math.sqrt(max(sum(v * v for v in vals) / len(vals) - mean * mean, 0.0)) or 1.0
            stats.append((min(vals), mean, std))
        history = (history + [stats])[-(rule.window + 1):]
        cons = [sum((h[tr][0] - h[tr][1]) / h[tr][2] for h in history) / len(history) for tr in range(plain.count)]
        best = min((((v - stats[tr][1]) / stats[tr][2] + rule.weight * (cons[tr] - min(cons)), j, tr, v)
                    for (tr, j), v in d.items()))
        out.append((best[1], float(plain.velocities[best[2]]), best[3]))
    return out


@pytest.mark.parametrize("grid", [1, 2])
@pytest.mark.parametrize("seq_len", [1, 2, 4, 5])
def test_velocities_match_plain_causal_loop_with_bounds(seq_len, grid):
    from seqmatchnet.speeds import rules

    rng = np.random.default_rng(seq_len)
    db = unit_rows(rng, 50, 8)
    q_rows = np.round(np.arange(30) * 1.5).astype(int) % 50           # the query drives 1.5x as fast
    q = db[q_rows] + 0.3 * rng.standard_normal((30, 8)).astype(np.float32)
    db_bounds, q_bounds = bounds_of([21, 3, 26]), bounds_of([4, 12, 14])
    rule = rules.ScoringRule("consensus", window=3, weight=2.0, normalise=True)
    velocities = (0.5, 1.0, 1.5, 2.0)
    loc = Localizer(db, seq_len=seq_len, db_bounds=db_bounds, conf_radius=2,
                    search=SearchSettings(velocities, rule, grid))
    plain = plain_causal_trajectories(db, q, db_bounds, q_bounds, seq_len, velocities, rule, grid, loc._traj)
    frames = []
    for t in range(len(q)):
        if t == q_bounds[t, 0]:
            loc.reset()
        m = loc.step(q[t])
        if plain[t] is None:
            assert m is None
            continue
        assert (m.db_frame, loc.last_velocity) == plain[t][:2], t
        assert m.velocity == loc.last_velocity
        assert m.distance == pytest.approx(plain[t][2], abs=1e-5)
        assert m.confidence > 0
        frames.append(m.db_frame)
    assert len(set(frames)) > 5             # matches spread over the map, not one frame


@pytest.mark.parametrize("grid, seq_len, velocities", [
    (1, 4, (2.0, 0.5, 1.5, 0.8)),     # 0.5 and 0.8 both reach 2 frames back: (-2, -1, -1, 0), (-2, -2, -1, 0)
    (1, 3, (2.0, 0.5, 1.5, 0.8)),
    (2, 3, (2.0, 0.0, 1.0, 0.25)),    # at the first frame: 0.25 at phase 1/2 (0, 1/2, 1/2), 0 at both phases
    (2, 4, (2.0, 0.5, 1.5, 0.8))])
def test_equal_trajectories_localize_to_the_smallest_frame_then_the_velocity_nearest_one(grid, seq_len, velocities):
    """A route of identical frames: every trajectory scores exactly 0, so the match is the smallest end frame
    that some trajectory may use, with the first of those trajectories in the order nearest 1 (then phase 0)."""
    from seqmatchnet.speeds import rules

    db, q = np.ones((30, 4), np.float32), np.ones((9, 4), np.float32)
    db_bounds, q_bounds = bounds_of([11, 19]), bounds_of([9])
    rule = rules.ScoringRule("consensus", window=3, weight=2.0, normalise=True)
    loc = Localizer(db, seq_len=seq_len, db_bounds=db_bounds, search=SearchSettings(velocities, rule, grid))
    plain = plain_causal_trajectories(db, q, db_bounds, q_bounds, seq_len, velocities, rule, grid, loc._traj)
    got = [loc.step(f) for f in q]
    assert [m is None for m in got] == [p is None for p in plain]
    want = [p for p in plain if p is not None]
    assert [(m.db_frame, m.velocity, m.distance) for m in got if m is not None] == want
    j = want[0][0]
    tied = [v for v, _, pos in twins.plain_trajectories(velocities, seq_len, "end", grid).rows
            if all(db_bounds[j][0] <= f < db_bounds[j][1] for f in twins.touched(j, pos))]
    assert want[0][1] == tied[0] and all(m[:2] == want[0][:2] for m in want)
    assert len(tied) >= 2 or (grid, seq_len) in ((1, 3), (2, 4))     # exact ties between trajectories at frame j


def test_default_and_diagonal_velocities_are_todays_localizer():
    db, q = route(8, 40, 12, 6)
    runs = [Localizer(db, seq_len=4, conf_radius=3, **kw) for kw in (
        {}, {"search": SearchSettings((1.0,))}, {"search": SearchSettings((1.0,), grid=2)},
        {"search": SearchSettings((1.0,), grid=1)},
        {"search": SearchSettings((0.9, 1.1), grid=1)})]   # 0.9, 1.1 round to the diagonal on whole frames
    for f in q:
        matches = [loc.step(f) for loc in runs]
        assert all(m == matches[0] for m in matches[1:])
    assert all(loc._traj is None for loc in runs)




# ---------------------------------------------------------------- --spacing: steps by distance travelled

def spaced_twin(db, q, odometry, resets, seq_len, spacing):
    """From the definition: a plain ``Localizer`` fed only the frames a loop over the odometry keeps
    (each sequence's first frame, then every frame ``spacing`` beyond the last kept one); every other
    frame repeats the last match, held."""
    loc, out, last, kept_at, steps = Localizer(db, seq_len=seq_len), [], None, None, []
    for t in range(len(q)):
        if t in resets:
            loc.reset()
            last, kept_at = None, None
        if kept_at is None or odometry[t] >= kept_at + spacing:
            kept_at = odometry[t]
            last = loc.step(q[t])
            out.append(last)
            steps.append(t)
        else:
            out.append(None if last is None else (last.db_frame, last.distance, "held"))
    return out, steps


def test_spacing_steps_by_odometry_like_the_plain_twin():
    rng = np.random.default_rng(3)
    db, q = unit_rows(rng, 120, 16), unit_rows(rng, 300, 16)
    step = rng.uniform(0.1, 0.3, 300)
    step[100:180] = 0.0                                 # standing still at a light
    odometry = np.cumsum(step)
    odometry[200:] -= odometry[200]                      # a new sequence restarts its odometry
    loc = Localizer(db, seq_len=4, search=SearchSettings(spacing=1.5))
    calls = []
    real = loc._step
    loc._step = lambda frame: calls.append(1) or real(frame)
    got = []
    for t in range(300):
        if t == 200:
            loc.reset()
        got.append(loc.step(q[t], float(odometry[t])))
    want, steps = spaced_twin(db, q, odometry, {200}, 4, 1.5)
    for g, w in zip(got, want):
        if w is None:
            assert g is None
        elif isinstance(w, tuple):
            assert g.held and (g.db_frame, g.distance) == w[:2]
        else:
            assert not g.held and g == w
    assert len(calls) == len(steps) < 300 // 2           # the matcher ran on the kept frames only
    assert not set(steps) & set(range(101, 180))         # standing still never advances the window
    assert 200 in steps                                  # a new sequence steps at once


def test_spacing_reset_and_bad_odometry():
    rng = np.random.default_rng(4)
    db, q = unit_rows(rng, 50, 8), unit_rows(rng, 10, 8)
    loc = Localizer(db, seq_len=2, search=SearchSettings(spacing=1.0))
    assert loc.step(q[0], 0.0) is None and loc.step(q[1], 0.5) is None      # held, window not full
    match = loc.step(q[2], 1.0)
    assert match is not None and not match.held
    assert loc.step(q[3], 1.2).held
    loc.reset()
    assert loc.step(q[4], 0.0) is None                   # after a reset: no held match, a new window
    with pytest.raises(ValueError, match="odometry went back"):
        loc.step(q[5], -0.5)
    with pytest.raises(ValueError, match="needs its odometry"):
        loc.step(q[5])
    for bad in (0.0, -1.0, math.nan):
        with pytest.raises(ValueError, match="spacing must be a positive"):
            SearchSettings(spacing=bad)
    plain_loc = Localizer(db, seq_len=2)
    assert plain_loc.step(q[0], 5.0) is None and not plain_loc.step(q[1], 5.0).held   # no spacing: every frame


def read_spaced_csv(path: Path) -> list[dict]:
    reader = csv.DictReader(io.StringIO(path.read_text()))
    assert tuple(reader.fieldnames) == CSV_COLUMNS + ("held",)
    return list(reader)


def test_replay_and_stream_with_spacing(tiny_oxford, tmp_path, capsys):
    from seqmatchnet.cli import localize

    out = tmp_path / "spaced.csv"
    result = run_localize(localize_options(tiny_oxford, "--seqL", "3", "--output", str(out), "--spacing", "5"))
    rows = read_spaced_csv(out)
    assert len(rows) == N_TEST and result["spacing_m"] == 5.0
    stepped = [int(r["query_frame"]) for r in rows if r["held"] == "0" and r["db_frame"]]
    assert result["matcher_steps"] == len(stepped) < N_TEST / 2
    held = [r for r in rows if r["held"] == "1"]
    assert held and all(r["db_frame"] for r in held)
    # the stream format: each row's last value is the odometry
    db, q = tiny_test_split(tiny_oxford)
    split_odometry = np.array([float(v) for v in localize.replay_odometry(
        np.stack([TEST_ROWS * 2.0, np.zeros(N_TEST)], 1), bounds_of([N_TEST]))])
    np.save(tmp_path / "q.npy", np.column_stack([q, split_odometry]))
    run_localize(localize_options(tiny_oxford, "--seqL", "3", "--stream", str(tmp_path / "q.npy"), "--output",
                                  str(tmp_path / "stream.csv"), "--spacing", "5"))
    streamed = read_spaced_csv(tmp_path / "stream.csv")
    assert [(r["db_frame"], r["held"]) for r in streamed] == [(r["db_frame"], r["held"]) for r in rows]
    capsys.readouterr()
    for bad in (["--spacing", "0"], ["--spacing=-3"], ["--spacing", "x"]):
        assert localize.main(["--dataset", "oxford-v1.0", "--seqL", "2", *bad]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith(("error: --spacing", "error: argument --spacing"))
