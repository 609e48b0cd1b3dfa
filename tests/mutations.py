"""Planted bugs that the tests must catch.

    python tests/mutations.py [--only NAME ...] [--list] [--keep] [--slow]

Copies the repository (tracked files and untracked, not ignored ones) to a temporary folder
``TMP/main`` next to a link ``TMP/shared`` to the reference fixture (the tests look for it at
``ROOT.parent / "shared" / "reference"``), runs the selected tests there once unchanged, then once per
mutation with that mutation planted by text substitution, with ``REQUIRE_REFERENCE=1`` so that no
fidelity test can pass by skipping. A test that already fails on the unchanged copy is deselected, so
only a failure caused by the mutation counts.

Each mutation names the behaviour it breaks, the function it is planted in (``name`` or
``Class.method``, found in whichever project file defines it, so that it survives code moving between
modules) and the tests that should catch it (test files or test functions); only those run, and only
the fast ones (not marked slow) unless ``--slow`` is given, so every catch is one that ``make
test-fast`` makes too. Prints a table ``mutation | module | caught by`` and exits 1 when a mutation
survives (no test fails), 2 when a mutation no longer applies (its text is gone) or its tests do
not exist any more.
"""
from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = (ROOT.parent / "shared").resolve()
TIMEOUT_S = 600
FAST = "not slow"


@dataclass
class Mutation:
    name: str
    what: str                     # the behaviour it breaks
    old: str
    new: str
    function: str | None = None   # substitute only inside this function's body: ``name`` or ``Class.method``
    tests: tuple[str, ...] = ()   # pytest paths or node ids that must catch it
    path: str | None = None       # None: the file(s) defining ``function`` (found in the copy)
    also: tuple[tuple[str, str, str], ...] = ()   # the same bug in other code: (function, old, new), tried in turn

    def apply(self, root: Path) -> str:
        """Plant the bug in the copy at ``root`` (the first spelling whose text is there); returns the
        file(s) changed."""
        spellings = [(self.function, self.old, self.new, self.path)] + [(f, o, n, None) for f, o, n in self.also]
        errors = []
        for function, old, new, path in spellings:
            try:
                return plant(root, function, old, new, path)
            except LookupError as exc:
                errors.append(str(exc))
        raise LookupError("; ".join(errors))


def plant(root: Path, function: str | None, old: str, new: str, path: str | None) -> str:
    """Replace ``old`` by ``new`` inside ``function`` (in each file defining it) or in ``path``."""
    paths = [path] if path else find_definitions(root, function)
    changed = {}
    for path in paths:
        text = (root / path).read_text()
        lo, hi = function_span(text, function) if function else (0, len(text))
        at = text.find(old, lo, hi)
        if at < 0:
            where = f"{path} {function}()" if function else path
            raise LookupError(f"{old!r} not found in {where}")
        changed[path] = text[:at] + new + text[at + len(old):]
    for path, text in changed.items():         # all or nothing
        (root / path).write_text(text)
    return ", ".join(paths)


def _definition(function: str) -> re.Pattern:
    """The line that defines ``function``: ``def name(`` at the top level, or ``class Class`` for ``Class.method``."""
    cls, _, name = function.rpartition(".")
    return re.compile(rf"^class {re.escape(cls)}\b" if cls else rf"^def {re.escape(name)}\(", re.M)


def find_definitions(root: Path, function: str) -> list[str]:
    """The project files (the top level and the package: not tests/ or bench/) that define ``function``
    (or its class)."""
    pattern = _definition(function)
    files = sorted([*root.glob("*.py"), *root.glob("seqmatchnet/**/*.py")])
    found = [p.relative_to(root).as_posix() for p in files if pattern.search(p.read_text())]
    if not found:
        raise LookupError(f"no project file defines {function}()")
    return found


def _block_end(text: str, start: int, indent: int, hi: int) -> int:
    """Where the block whose header line starts at ``start`` (indented by ``indent``) ends: the next line,
    before ``hi``, that is indented no deeper and is not the ``)`` closing a multi-line signature."""
    line = re.compile(r"^([ \t]*)(\S)", re.M)
    pos = text.index("\n", start) + 1
    while True:
        m = line.search(text, pos, hi)
        if m is None:
            return hi
        if len(m.group(1)) <= indent and m.group(2) != ")":
            return m.start()
        pos = text.index("\n", m.start()) + 1 if "\n" in text[m.start():hi] else hi


def function_span(text: str, function: str) -> tuple[int, int]:
    """Character range of a top-level function, or of a method (``Class.method``): from its ``def``
    to the next statement indented no deeper."""
    cls, _, name = function.rpartition(".")
    lo, hi = 0, len(text)
    if cls:
        m = _definition(function).search(text)
        if m is None:
            raise LookupError(f"class {cls} not found")
        lo, hi = m.start(), _block_end(text, m.start(), 0, len(text))
    m = re.compile(rf"^([ \t]*)def {re.escape(name)}\(", re.M).search(text, lo, hi)
    while m is not None and (len(m.group(1)) == 0) != (not cls):      # a method when asked for one
        m = re.compile(rf"^([ \t]*)def {re.escape(name)}\(", re.M).search(text, m.end(), hi)
    if m is None:
        raise LookupError(f"{function}() not found")
    return m.start(), _block_end(text, m.start(), len(m.group(1)), hi)


SEQ = "tests/test_seqmatch.py"
LOC = "tests/test_localize.py"
TRAIN = "tests/test_train.py"
FAST_CHECKS = "tests/test_fast_checks.py"
SHORTLIST = "tests/test_shortlist_checks.py"
EXTRACT = "tests/test_extract.py"
SPEEDS = "tests/test_velocity.py"
SPEED_SEARCH = "tests/test_speed_search.py"

MUTATIONS = [
    # ---------------------------------------------------------------- ties (seqMatchNet, search)
    Mutation("ties by descending index", "equal scores ordered by descending database index",
             "composite = run * span + key", "composite = run * span + (span - 1 - key)",
             function="topk_by_value_then_index", tests=(SEQ,)),
    Mutation("ties shuffled", "equal scores in random order",
             "composite = run * span + key", "composite = run * span + torch.randint_like(key, span)",
             function="topk_by_value_then_index", tests=(SEQ,)),
    Mutation("index repeated in a tie", "within a run of equal scores an index is repeated over its neighbour",
             "    return top_v, pos\n",
             "    pos = pos.clone()\n"
             "    pos[:, 1:] = torch.where(top_v[:, 1:] == top_v[:, :-1], pos[:, :-1], pos[:, 1:])\n"
             "    return top_v, pos\n", function="topk_by_value_then_index", tests=(SEQ,)),
    Mutation("top-k boundary not fixed", "at the k boundary whichever tied entry torch.topk returned is kept",
             "if bool(ambiguous.any()):", "if False:", function="topk_by_value_then_index", tests=(SEQ,)),
    Mutation("re-rank ties by candidate order", "re-ranking keeps the candidates' order among equal scores",
             "d, order = topk_by_value_then_index(d, d.shape[1], ids=cand)",
             "d, order = torch.sort(d, dim=1, stable=True)", function="rerank", tests=(SEQ,)),
    Mutation("faiss ties by descending index", "single-frame search orders equal distances by descending index",
             "order = np.lexsort((idx, d))", "order = np.lexsort((-idx, d))", function="faiss_search",
             tests=(f"{SEQ}::test_faiss_search_orders_ties_by_index",)),
    # ---------------------------------------------------------------- metrics
    Mutation("recall: < at the radius", "a database frame exactly at the radius is not a positive",
             "<= radius", "< radius", function="recall_table", tests=(f"{SEQ}::test_recall_table_matches_plain",)),
    Mutation("precision-recall: ties accepted one by one",
             "queries with equal top-1 distances are accepted one at a time (a threshold between equal distances)",
             "last = np.r_[d_sorted[1:] != d_sorted[:-1], True]", "last = np.ones(len(d_sorted), dtype=bool)",
             function="precision_recall", tests=("tests/test_plots.py::test_precision_recall_ties_and_first_wrong",)),
    # ---------------------------------------------------------------- windows at sequence ends (datasets)
    Mutation("window shifted at the end", "the shifted window at the end of a segment starts one frame early",
             "start = np.where(shift_back, start - missing, start)",
             "start = np.where(shift_back, start - missing - 1, start)", function="sequence_windows",
             tests=(f"{SEQ}::test_windows_match_spec", f"{SEQ}::test_windows_shift_at_both_ends")),
    Mutation("window one frame short counted valid",
             "a window shifted by one frame at a sequence end counts as valid (trained on, evaluated with "
             "--seqL_filterData)",
             "return start, missing == 0", "return start, missing <= 1", function="sequence_windows",
             tests=(f"{SEQ}::test_windows_match_spec", f"{TRAIN}::test_training_set_matches_spec")),
    # ---------------------------------------------------------------- online relocalisation (localize)
    Mutation("localize: trailing window one frame short",
             "the online match sums the distances of L - 1 trailing frames, not L",
             "for k in range(1, L):", "for k in range(1, L - 1):", function="Localizer._step",
             tests=(f"{LOC}::test_matches_equal_plain_loop_with_bounds_on_both_sides",)),
    Mutation("localize: window from a segment's first frame refused",
             "a database window that starts exactly on its segment's first frame is treated as crossing the bound",
             "valid = ends - self.seq_len + 1 >= db_bounds[ends, 0]",
             "valid = ends - self.seq_len + 1 > db_bounds[ends, 0]", function="Localizer._window_penalty",
             tests=(f"{LOC}::test_matches_equal_plain_loop_with_bounds_on_both_sides",
                    f"{LOC}::test_confidence_in_position_units_matches_plain_loop")),
    Mutation("localize: confidence radius (positions) without its boundary",
             "a window exactly at the confidence radius (position units) is compared as if it were elsewhere",
             "torch.le(self._pos_d2", "torch.lt(self._pos_d2", function="Localizer._best_elsewhere",
             tests=(f"{FAST_CHECKS}::test_confidence_radius_includes_a_window_exactly_at_the_radius",)),
    Mutation("localize: confidence radius (frames) without its boundary",
             "a window exactly conf_radius frames away is compared as if it were elsewhere",
             "lo, hi = best - r, best + r + 1", "lo, hi = best - r + 1, best + r", function="Localizer._best_elsewhere",
             tests=(f"{FAST_CHECKS}::test_confidence_radius_includes_a_window_exactly_at_the_radius",)),
    Mutation("localize: no reset at sequence starts",
             "replaying a query traversal resets the matcher only at its first frame, not at each sequence's",
             "if t == q_bounds[t, 0]:", "if t == 0:", function="replay",
             tests=(f"{LOC}::test_replay_resets_at_query_sequence_bounds",)),
    # ---------------------------------------------------------------- across speeds (velocity, speeds)
    Mutation("speeds: numpy's half-to-even rounding",
             "a trajectory's frame offsets are rounded half to even, not half away from zero as in SeqSLAM",
             "np.floor(np.abs(x) + 0.5)", "np.round(np.abs(x))", function="round_half_away",
             tests=(f"{SPEEDS}::test_round_half_away_is_not_numpys_half_to_even",
                    f"{SPEEDS}::test_trajectories_match_plain_twin")),
    Mutation("speeds: ties prefer the velocity farthest from 1",
             "among equal scores of one window the trajectory farthest from v = 1 is reported",
             "np.lexsort((phase, vel, np.abs(vel - 1.0)))", "np.lexsort((phase, vel, -np.abs(vel - 1.0)))",
             function="trajectories",
             tests=(f"{SPEEDS}::test_ties_by_database_frame_then_velocity_nearest_one",
                    f"{SPEED_SEARCH}::test_equal_trajectories_report_the_velocity_nearest_one")),
    Mutation("speeds: a midpoint takes its lower neighbour's distance",
             "on the half grid the distance between two database frames is the lower frame's, not their mean",
             "(fd[:-1] + fd[1:]).mul_(0.5)", "fd[:-1].clone()", function="midpoints",
             tests=(f"{SPEEDS}::test_kernel_equals_plain_twin_with_sequence_bounds",
                    f"{LOC}::test_velocities_match_plain_causal_loop_with_bounds")),
    Mutation("speeds: repeated query windows left unfilled",
             "the shifted query windows at a sequence's ends keep stale distances in the search kept in memory",
             "dst[rows, j:j + n] = dst[rows, j0 + w - w0:j0 + w - w0 + n]", "pass", function="fill_repeats",
             tests=(f"{SPEEDS}::test_kernel_equals_plain_twin_for_every_anchor_layout",)),
    Mutation("speeds: the rule applied to the wrong queries",
             "in the search kept in memory, each query chunk is adjusted with the first chunk's coefficients",
             "a, b = acc.coefficients(queries.bounds, rule, lo, hi)",
             "a, b = acc.coefficients(queries.bounds, rule, 0, hi - lo)",
             function="rank_across_speeds_in_memory",
             tests=(f"{SPEED_SEARCH}::test_in_memory_search_equals_the_block_search",)),
    Mutation("speeds: a query tile ranked before its neighbours are scored",
             "in the search kept in memory, a tile is ranked before the statistics its rule reads are known",
             "pending[0][0] + pending[0][1].shape[2] + ahead <= known",
             "pending[0][0] + pending[0][1].shape[2] <= known",
             function="rank_across_speeds_in_memory",
             tests=(f"{SPEED_SEARCH}::test_in_memory_search_equals_the_block_search",)),
    Mutation("speeds: positions without their decimal snap",
             "a trajectory's positions v * k are rounded as computed in binary (4.1 * 5 = 20.499999999999996 -> 20), "
             "not as the decimal velocity's (20.5 -> 21)",
             "round_half_away(np.round((phase[:, None]\n"
             "                                      + vel[:, None] * k[None, :]) * grid / SNAP) * SNAP)",
             "round_half_away((phase[:, None]\n"
             "                                      + vel[:, None] * k[None, :]) * grid)",
             function="trajectories",
             tests=(f"{SPEEDS}::test_decimal_velocities_snap_their_positions_before_rounding",)),
    Mutation("speeds: a range loses its upper end",
             "VMIN:VMAX:VSTEP drops VMAX when (VMAX - VMIN) / VSTEP falls a hair below a whole number (0.6:1.4:0.2)",
             "/ step + 1e-9))", "/ step))", function="parse_velocities",
             tests=(f"{SPEEDS}::test_a_range_keeps_its_upper_end",)),
    Mutation("speeds: a consensus over no value kept as NaN",
             "a trajectory that fits no database sequence leaves a NaN consensus, which shifts every other "
             "trajectory's offset of the query (scores and precision-recall change, not the ranking)",
             "cons = np.where(np.isnan(cons), np.inf, cons)", "cons = cons", function="rule_coefficients",
             tests=(f"{SPEEDS}::test_a_trajectory_that_fits_no_database_sequence_leaves_the_others_scores_alone",)),
    Mutation("speeds: a query tile ranked one neighbour early",
             "in the search kept in memory, a tile is ranked when the statistics of all but its last neighbour "
             "are known",
             "pending[0][0] + pending[0][1].shape[2] + ahead <= known",
             "pending[0][0] + pending[0][1].shape[2] + ahead - 1 <= known",
             function="rank_across_speeds_in_memory",
             tests=(f"{SPEED_SEARCH}::test_in_memory_tiles_wait_for_every_neighbour_the_rule_reads",)),
    Mutation("speeds: float64 statistics skip a row per tile",
             "the sums and sums of squares of the rule's statistics leave out the last row of every 256-row tile",
             "x = d[r:r + tile].to(torch.float64)", "x = d[r:r + tile - 1].to(torch.float64)",
             function="float64_column_sums",
             tests=(f"{SPEEDS}::test_float64_column_sums_read_every_row_of_every_tile",
                    f"{SPEEDS}::test_statistics_of_a_block_of_more_than_one_tile_equal_the_plain_ones")),
    Mutation("torchrun: a re-ranked query takes another query's coefficients",
             "under torchrun each rank re-ranks its queries with the coefficients of the first queries (rank 0's)",
             "a[rows], b[rows])", "a[:len(cand)], b[:len(cand)])", function="rerank_across_speeds",
             tests=(f"{SPEED_SEARCH}::test_two_ranks_rerank_each_query_with_its_own_coefficients",)),
    Mutation("torchrun: the best distances of rank 0 only",
             "under torchrun the best distance of each (query, trajectory) is rank 0's, not the minimum over ranks",
             "best.amin(dim=0).numpy()", "best[0].numpy()", function="gather_shares",
             tests=(f"{SPEED_SEARCH}::test_two_ranks_shares_of_the_database_give_the_search_of_one_process",)),
    # ---------------------------------------------------------------- shortlist and re-ranking (shortlist, search)
    Mutation("shortlist: a part-filled row counts as full",
             "an IVF row with fewer than K valid ids is not searched again with more lists",
             "(counts >= k)", "(counts >= 1)", function="WindowIndex.search_scored",
             tests=(f"{SHORTLIST}::test_ivf_rows_left_short_are_searched_again_with_more_lists",)),
    Mutation("shortlist: a candidate dropped", "the index is asked for K - 1 candidates, so one is never re-ranked",
             "k = min(config.shortlist, n_windows)", "k = min(config.shortlist, n_windows) - 1",
             function="shortlist_candidates",
             tests=("tests/test_large_maps.py::test_shortlist_covering_the_map_equals_exact",
                    "tests/test_large_maps.py::test_shortlist_with_few_candidates_re_ranks_them")),
    Mutation("shortlist: recall on the first queries",
             "the shortlist's recall compares the sampled queries' exact top-1 with the first queries' candidates",
             "candidates[check]", "candidates[:n_check]", function="shortlist_search",
             tests=(f"{SHORTLIST}::test_shortlist_recall_is_measured_on_exactly_the_sampled_queries",)),
    # ---------------------------------------------------------------- torchrun (distributed, train)
    Mutation("shards: remainder lost", "when the ranks do not divide the items, the last items belong to no rank",
             "bounds = [i * n // world for i in range(world + 1)]",
             "bounds = [i * (n // world) for i in range(world + 1)]", function="shard_bounds",
             tests=("tests/test_distributed.py::test_shard_bounds_cover_everything_and_keep_window_starts_together",)),
    Mutation("distributed loss: local triplet count",
             "each rank divides its part of the loss by its own valid triplets, not the whole batch's",
             "total = int((mined.negatives[sel] >= 0).sum())", "total = int((mined.negatives[part] >= 0).sum())",
             function="part_loss",
             tests=(f"{FAST_CHECKS}::test_ranks_parts_of_a_batch_average_to_the_loss_of_one_process",)),
    # ---------------------------------------------------------------- training (mining, train, runs)
    Mutation("mining margin not its square root", "negatives are mined within --margin instead of its square root",
             "d_pos + math.sqrt(margin)", "d_pos + margin", function="mine",
             tests=(f"{TRAIN}::test_mining_equals_plain_per_query",)),
    Mutation("mining: farthest positive", "the positive is the farthest non-trivial positive, not the nearest",
             "best = np.argmin(d_pos_all, axis=1)",
             "best = np.argmax(np.where(np.isfinite(d_pos_all), d_pos_all, -np.inf), axis=1)", function="mine",
             tests=(f"{TRAIN}::test_mining_equals_plain_per_query",)),
    Mutation("negative sampling draws close windows",
             "a potential negative can be a window within posDistThr (the close windows are stepped over wrongly)",
             'side="right"', 'side="left"', function="sample_negatives",
             tests=(f"{TRAIN}::test_sample_negatives_are_potential_negatives_and_uniform",)),
    Mutation("negative cache not updated", "the kept queries' new hard negatives are not stored in the cache",
             "neg_cache[chunk[kept]] = negs[kept]", "neg_cache[chunk[kept]] = neg_cache[chunk[kept]]",
             function="refresh_and_mine", tests=(f"{TRAIN}::test_negative_cache_on_and_off_train_and_resume",)),
    Mutation("resume repeats an epoch", "--resume trains the checkpoint's last epoch again",
             'cls.fresh(num_queries, int(ckpt["epoch"]))', 'cls.fresh(num_queries, int(ckpt["epoch"]) - 1)',
             function="TrainState.from_checkpoint",
             tests=(f"{TRAIN}::test_negative_cache_on_and_off_train_and_resume",)),
    Mutation("--ckpt best and latest swapped", "--ckpt best opens the last checkpoint and latest the best",
             'opt.ckpt == "best"', 'opt.ckpt == "latest"', function="checkpoint_path",
             tests=(f"{FAST_CHECKS}::test_ckpt_best_and_latest_open_the_best_and_the_last_checkpoint",)),
    # ---------------------------------------------------------------- images to descriptors (extract, image models)
    Mutation("images in plain name order", "a folder's images are read in plain name order (frame_10 before frame_2)",
             "key=lambda p: natural_key(p.name))", "key=lambda p: p.name)", function="list_images",
             tests=(f"{EXTRACT}::test_folder_in_natural_order_and_filtered",)),
    Mutation("pixels not scaled to [0, 1]", "images are normalised from 0..255 pixel values instead of 0..1",
             "T.ToTensor()", "T.PILToTensor(), T.Lambda(lambda x: x.float())", function="image_transform",
             also=(("preprocess", "pixels.to(torch.float32).div(255)", "pixels.to(torch.float32)"),),
             tests=(f"{EXTRACT}::test_normalisation_by_hand",)),
    Mutation("WPCA output not normalised", "NetVLAD descriptors are L2-normalised before the WPCA projection, "
             "not after it", "return F.normalize(F.linear(vlad, conv.weight.flatten(1), conv.bias), p=2, dim=1)",
             "return F.linear(F.normalize(vlad, p=2, dim=1), conv.weight.flatten(1), conv.bias)",
             function="NetVLADModel.forward", tests=(f"{EXTRACT}::test_model_forward_with_wpca_against_loop",)),
]


def repo_files(root: Path) -> list[str]:
    out = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=root,
                         check=True, capture_output=True).stdout.decode()
    return sorted({f for f in out.split("\0") if f and (root / f).is_file()})


def copy_repo(dst: Path) -> None:
    for f in repo_files(ROOT):
        (dst / f).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / f, dst / f)


def selected_tests(mutations: list[Mutation]) -> list[str]:
    """Every test the mutations name, once, in order."""
    return list(dict.fromkeys(t for m in mutations for t in m.tests))


def run_tests(root: Path, tests: list[str], stop_first: bool, deselect: list[str],
              marker: str | None) -> tuple[int, list[str], str, float]:
    """Run ``tests`` in ``root``: (exit code, failing test ids, output tail, seconds)."""
    env = dict(os.environ, REQUIRE_REFERENCE="1", PYTHONDONTWRITEBYTECODE="1")
    cmd = [sys.executable, "-m", "pytest", "-q", "-rf", "-p", "no:cacheprovider", *tests]
    cmd += ["-m", marker] if marker else []
    cmd += ["-x"] if stop_first else []
    for d in deselect:
        cmd += ["--deselect", d]
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=TIMEOUT_S)
        code, output = proc.returncode, proc.stdout + proc.stderr
    except subprocess.TimeoutExpired as exc:
        code, output = -1, f"timed out after {TIMEOUT_S} s\n{exc.stdout or ''}"
    failed = re.findall(r"^(?:FAILED|ERROR) (\S+?)(?: - |$)", output, re.M)
    return code, failed, "\n".join(output.strip().splitlines()[-15:]), time.perf_counter() - t0


NOT_RUN = {4: "a named test does not exist", 5: "no test ran"}   # pytest's usage error, nothing collected


def verdict(code: int, failed: list[str], tail: str) -> tuple[str, int]:
    """What one mutation's test run says: (caught by ..., SURVIVED or NOT RUN ...; exit status)."""
    if failed:
        return failed[0] + (f" (+{len(failed) - 1})" if len(failed) > 1 else ""), 0
    if code == 0:
        return "SURVIVED", 1
    if code in NOT_RUN:
        return f"NOT RUN: {NOT_RUN[code]} ({tail.splitlines()[-1] if tail else ''})", 2
    return f"pytest exit {code}: {tail.splitlines()[-1] if tail else ''}", 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--only", nargs="+", metavar="NAME", help="run only mutations whose name contains one of these")
    p.add_argument("--list", action="store_true", help="list the mutations and exit")
    p.add_argument("--keep", action="store_true", help="keep the temporary folder")
    p.add_argument("--slow", action="store_true", help="run the selected tests marked slow too")
    args = p.parse_args(argv)
    mutations = [m for m in MUTATIONS if not args.only or any(s in m.name for s in args.only)]
    if args.list:
        for m in mutations:
            print(f"{m.name} [{m.function or m.path}]: {m.what}\n    tests: {' '.join(m.tests)}")
        return 0
    if not mutations:
        print("no mutation matches --only", file=sys.stderr)
        return 2
    if not (SHARED / "reference").is_dir():
        print(f"the reference fixture {SHARED / 'reference'} is absent", file=sys.stderr)
        return 2
    marker = None if args.slow else FAST

    started = time.perf_counter()
    tmp = Path(tempfile.mkdtemp(prefix="mutations-"))
    try:
        pristine = tmp / "pristine"
        pristine.mkdir()
        copy_repo(pristine)
        (tmp / "shared").symlink_to(SHARED)
        tests = selected_tests(mutations)
        code, known, tail, secs = run_tests(_fresh(pristine, tmp), tests, False, [], marker)
        print(f"unchanged copy, {len(tests)} test files or functions"
              f"{'' if args.slow else ' (not slow)'}: "
              f"{'all pass' if code == 0 else f'{len(known)} failing'} ({secs:.0f} s)")
        if code not in (0, 1) or (code == 1 and not known):
            print(tail, file=sys.stderr)
            return 2
        for t in known:
            print(f"  already failing, deselected: {t}")

        rows, status = [], 0
        for m in mutations:
            work = _fresh(pristine, tmp)
            try:
                path = m.apply(work)
            except LookupError as exc:
                rows.append((m.name, m.function or m.path or "", f"NOT APPLIED: {exc}", ""))
                status = max(status, 2)
                continue
            code, failed, tail, secs = run_tests(work, list(m.tests), True, known, marker)
            caught, worst = verdict(code, failed, tail)
            status = max(status, worst)
            rows.append((m.name, path, caught, f"{secs:.0f} s"))
            print(f"  {m.name}: {caught} ({secs:.0f} s)", flush=True)

        widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(("mutation", "file", "caught by"))]
        print(f"\n{'mutation':<{widths[0]}} | {'file':<{widths[1]}} | {'caught by':<{widths[2]}} | time")
        print("-|-".join("-" * w for w in widths) + "-|-----")
        for name, where, caught, secs in rows:
            print(f"{name:<{widths[0]}} | {where:<{widths[1]}} | {caught:<{widths[2]}} | {secs}")
        survived = [r[0] for r in rows if r[2] == "SURVIVED" or r[2].startswith(("NOT APPLIED", "NOT RUN"))]
        files = {f.strip() for r in rows if r[3] for f in r[1].split(",")}
        print(f"\n{len(rows) - len(survived)} of {len(rows)} mutations caught, in {len(files)} modules"
              + (f"; SURVIVED: {', '.join(survived)}" if survived else "")
              + f" ({time.perf_counter() - started:.0f} s in all)")
        return status
    finally:
        if args.keep:
            print(f"kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)


def _fresh(pristine: Path, tmp: Path) -> Path:
    """A clean copy at ``tmp/main`` (where the tests find ``tmp/shared``)."""
    work = tmp / "main"
    if work.exists():
        shutil.rmtree(work)
    shutil.copytree(pristine, work, symlinks=True)
    return work


if __name__ == "__main__":
    sys.exit(main())
