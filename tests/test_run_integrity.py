"""Runs keep their results: resuming a finished run changes nothing, a run is continued only on its own
data and sequence length, a test at another length says so, --quiet still prints what a run produced,
results.npz holds plain arrays, and each mode's --help lists what that mode reads, each default once."""
from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import make_tiny_oxford
from test_train import TRAIN, only_run, run_main

TEST = ["--mode", "test", "--dataset", "oxford-v1.0", "--split", "test", "--figures", "none"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """A tiny Oxford route with one finished run: 2 epochs at --seqL 3 (copied by each test that changes it)."""
    root = make_tiny_oxford(tmp_path_factory.mktemp("integrity") / "tiny")
    with pytest.MonkeyPatch.context() as mp:
        assert run_main(TRAIN + ["--seqL", "3", "--nEpochs", "2"], root, mp) == 0
    return root


@pytest.fixture
def work(trained, tmp_path) -> tuple[Path, Path]:
    """A writable copy of ``trained``: (its root, its run folder)."""
    root = tmp_path / "tiny"
    shutil.copytree(trained, root)
    return root, only_run(root)


def snapshot(run: Path) -> dict:
    """Every file of a run folder with its bytes and modification time."""
    return {p.relative_to(run): (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(run.rglob("*")) if p.is_file()}


# ---------------------------------------------------------------- 1. a finished run resumed

def test_resuming_a_finished_run_does_nothing_and_keeps_every_file(work, monkeypatch, capsys):
    root, run = work
    before = snapshot(run)
    summary = json.loads((run / "summary.json").read_text())
    assert summary["recalls"] and summary["precision_recall"]
    capsys.readouterr()
    assert run_main(TRAIN + ["--seqL", "3", "--nEpochs", "2", "--resume", str(run)], root, monkeypatch) == 0
    out = capsys.readouterr().out
    assert f"{run} has finished its 2 epochs: nothing to do" in out
    assert snapshot(run) == before                                       # summary.json, log, flags: untouched


def test_summary_keeps_the_last_validation_when_the_last_epoch_is_not_validated(work, monkeypatch):
    """Resumed for a third epoch with --evalEvery 2: that epoch is not validated, so the summary reports
    the recalls of epoch 2 (and says which epoch they come from) instead of none."""
    root, run = work
    before = json.loads((run / "summary.json").read_text())
    assert before["recalls"] and before["recalls_epoch"] == 2
    args = TRAIN + ["--seqL", "3", "--nEpochs", "3", "--evalEvery", "2", "--resume", str(run)]
    assert run_main(args, root, monkeypatch) == 0
    after = json.loads((run / "summary.json").read_text())
    assert after["epochs"] == 3 and after["recalls_epoch"] == 2
    assert after["recalls"] == before["recalls"]


# ---------------------------------------------------------------- 2. resuming with other data or length

@pytest.mark.parametrize("change, named", [(["--seqL", "2"], "--seqL 3 (this command: --seqL 2)"),
                                           (["--seqL", "3", "--dataset", "oxford-pnv"],
                                            "--dataset oxford-v1.0 (this command: --dataset oxford-pnv)")])
def test_resuming_with_another_sequence_length_or_dataset_is_refused(work, monkeypatch, capsys, change, named):
    root, run = work
    before = snapshot(run)
    capsys.readouterr()
    assert run_main(TRAIN + change + ["--nEpochs", "3", "--resume", str(run)], root, monkeypatch) == 1  # last wins
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and named in err and f"--init {run}" in err
    assert snapshot(run) == before


def test_init_from_a_run_starts_a_new_run_from_its_weights(work, monkeypatch):
    """--init RUN: explicitly asked for, another sequence length trains a new run from RUN's weights
    (with a vanishing learning rate the weights stay RUN's); RUN itself is untouched."""
    root, run = work
    before = snapshot(run)
    args = [a for a in TRAIN if a not in ("--pooling", "--outDims", "8")]       # both come from RUN's flags.json
    assert run_main(args + ["--seqL", "2", "--nEpochs", "1", "--lr", "1e-12", "--init", str(run), "--expName", "ft"],
                    root, monkeypatch) == 0
    new = next(p for p in (root / "data" / "runs").iterdir() if p.name.endswith("_l2_ft"))
    assert json.loads((new / "checkpoints" / "flags.json").read_text())["init"] == str(run)
    got = torch.load(new / "checkpoints" / "checkpoint.pth.tar", weights_only=True)["state_dict"]
    want = torch.load(run / "checkpoints" / "checkpoint.pth.tar", weights_only=True)["state_dict"]
    for key in want:
        torch.testing.assert_close(got[key], want[key], rtol=0, atol=1e-6)
    assert snapshot(run) == before


def test_init_from_a_run_is_refused_outside_training(trained, monkeypatch, capsys):
    run = only_run(trained)
    assert run_main(TEST + ["--seqL", "3", "--init", str(run)], trained, monkeypatch) == 2
    assert "give it to --resume" in capsys.readouterr().err


# ---------------------------------------------------------------- 3. testing at another length

def test_testing_at_another_sequence_length_notes_the_trained_one(trained, monkeypatch, capsys):
    run = only_run(trained)
    capsys.readouterr()
    assert run_main(TEST + ["--seqL", "2", "--resume", str(run)], trained, monkeypatch) == 0
    out = capsys.readouterr().out
    assert f"{run.name} was trained with --seqL 3; it is evaluated here with --seqL 2" in out
    assert run_main(TEST + ["--seqL", "3", "--resume", str(run)], trained, monkeypatch) == 0
    assert "was trained with" not in capsys.readouterr().out


# ---------------------------------------------------------------- 4. resume restores --pooling in training

def test_resume_training_needs_no_pooling_flag(work, monkeypatch):
    root, run = work
    args = [a for a in TRAIN if a != "--pooling"]
    assert run_main(args + ["--seqL", "3", "--nEpochs", "3", "--resume", str(run)], root, monkeypatch) == 0
    assert torch.load(run / "checkpoints" / "checkpoint.pth.tar", weights_only=True)["epoch"] == 3


# ---------------------------------------------------------------- 6. --quiet training

def test_quiet_training_prints_the_run_folder_and_the_result(tiny_oxford, monkeypatch, capsys):
    assert run_main(TRAIN + ["--seqL", "1", "--nEpochs", "1"], tiny_oxford, monkeypatch) == 0   # adds --quiet
    run = only_run(tiny_oxford)
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0] == f"run folder: {Path('data/runs') / run.name}"
    assert re.fullmatch(r"best validation Recall@5 [01]\.\d{4} after 1 epochs; checkpoints in \S+", lines[-1])
    assert len(lines) == 2


# ---------------------------------------------------------------- 7. results.npz

def test_results_file_holds_plain_arrays(trained, monkeypatch, tmp_path):
    out = tmp_path / "res"
    assert run_main(TEST + ["--seqL", "3", "--resume", str(only_run(trained)), "--resultsPath", str(out)],
                    trained, monkeypatch) == 0
    with np.load(out / "results.npz") as z:                              # allow_pickle=False, the default
        arrays = {k: z[k] for k in z.files}
    assert all(a.dtype != object for a in arrays.values())
    assert {"recalls", "rAtL", "preds", "n_values"} <= set(arrays)
    assert arrays["recalls"].shape == arrays["n_values"].shape and arrays["recalls"].dtype == np.float64
    summary = json.loads((out / "summary.json").read_text())
    for n, r in zip(arrays["n_values"].tolist(), arrays["recalls"].tolist()):
        assert summary["recalls"][str(n)] == pytest.approx(r, abs=1e-12)
    assert arrays["rAtL"].shape == (len(arrays["radii"]), len(arrays["n_values"]))


# ---------------------------------------------------------------- 8. each mode's --help

def mode_help(mode: str, capsys) -> str:
    import main

    capsys.readouterr()
    try:
        code = main.main(["--mode", mode, "--help"])
    except SystemExit as exc:               # the shared-option modes: argparse exits after --help
        code = exc.code
    assert code in (0, None)
    return capsys.readouterr().out


def help_entries(text: str) -> dict[str, str]:
    """``{first flag: its help entry on one line}`` of an argparse help text."""
    entries, current = {}, None
    for line in text.splitlines():
        if re.match(r"  -", line):
            current = line.split()[0].rstrip(",")
            entries[current] = " ".join(line.split())
        elif current and line.startswith("      "):
            entries[current] += " " + " ".join(line.split())
        else:
            current = None
    return entries


MODE_READS = {  # a few options each mode reads, and a few it does not
    "train": ({"--nEpochs", "--lr", "--expName", "--init", "--patience", "--shortlist", "--pooling", "--velocities"},
              {"--resultsPath", "--output", "--predictionsFile", "--split", "--extractOnly"}),
    "test": ({"--resultsPath", "--predictionsFile", "--split", "--extractOnly", "--shortlist", "--resume",
              "--velocities"},
             {"--nEpochs", "--lr", "--expName", "--output", "--confRadius", "--wandb"}),
    "localize": ({"--output", "--stream", "--dim", "--confRadius", "--resume", "--split", "--velocities"},
                 {"--nEpochs", "--lr", "--shortlist", "--predictionsFile", "--figures"}),
}


@pytest.mark.parametrize("mode", sorted(MODE_READS))
def test_each_mode_help_lists_the_options_it_reads(mode, capsys):
    entries = help_entries(mode_help(mode, capsys))
    reads, not_read = MODE_READS[mode]
    assert reads <= set(entries), reads - set(entries)
    assert not not_read & set(entries), not_read & set(entries)


def test_modes_have_different_help(capsys):
    texts = {mode: mode_help(mode, capsys) for mode in MODE_READS}
    assert len(set(texts.values())) == 3
    assert all(f"--mode {mode}:" in text for mode, text in texts.items())


@pytest.mark.parametrize("mode", ["train", "test", "localize", "extract", "prepare", "demo", "compare"])
def test_help_shows_each_default_once(mode, capsys):
    """No "(default: None)", "(default: False)" or a default written twice; what None means is said."""
    entries = help_entries(mode_help(mode, capsys))
    assert entries
    for entry in entries.values():
        assert len(re.findall(r"\(default[: ]", entry)) <= 1, entry
        assert not re.search(r"\(default: (None|False|)\)", entry), entry


def test_help_says_what_the_options_without_default_do(capsys):
    train, test, localize = (help_entries(mode_help(m, capsys)) for m in ("train", "test", "localize"))
    assert "custom:<name>" in train["--dataset"]
    assert "not given: the descriptors' dimensions" in train["--outDims"]
    assert "not given: the split's posDistThr" in localize["--confRadius"]
    assert "not given: the results are only printed" in test["--resultsPath"]
    assert re.search(r"--synth_frames INT database frames for the whole route \(default: \d+\)$",
                     train["--synth_frames"])
    assert "(default:" not in train["--expName"] and "<date>_l<seqL> without it" in train["--expName"]
    demo = help_entries(mode_help("demo", capsys))
    assert "(default: 5)" in demo["--seqL"] and "(default: 8)" in demo["--nEpochs"]


def test_run_folder_without_exp_name_has_no_suffix(tmp_path):
    from argparse import Namespace

    from seqmatchnet.runs.folders import make_run_dir

    plain = make_run_dir(Namespace(runsPath=str(tmp_path), seqL=5, expName=""))
    named = make_run_dir(Namespace(runsPath=str(tmp_path), seqL=5, expName="x"))
    assert re.fullmatch(r"[A-Z][a-z]{2}\d{2}_\d{2}-\d{2}-\d{2}_l5", plain.name)
    assert named.name == plain.name + "_x"


# ---------------------------------------------------------------- 10. the demo says where its run is

@pytest.mark.slow
def test_demo_names_its_run_folder_and_figures(tmp_path, monkeypatch, capsys):
    import main

    monkeypatch.chdir(tmp_path)
    main.main(["--mode", "demo", "--nEpochs", "1", "--nocuda"])        # the table's ordering may not hold after 1
    out = capsys.readouterr().out
    (run,) = (tmp_path / "data" / "runs").iterdir()
    assert f"run folder: {Path('data/runs') / run.name}" in out
    line = out.strip().splitlines()[-1]
    assert line.startswith(f"the training run is in {Path('data/runs') / run.name}: ") and "training_curves.png" in line
    assert (run / "training_curves.png").is_file() and (run / "val_recall_at_n.png").is_file()


# ---------------------------------------------------------------- 5, 11. figures a user reads

LONG_LABEL = ("synthetic test seqL 5, sequence matching, learned projection (run Dec03_07-55-14_l5_finetune, "
              "epoch 12, best)")


def drawn(fig):
    fig.canvas.draw()
    return fig.canvas.get_renderer()


def test_test_mode_figures_keep_titles_inside_and_plots_wide():
    """Every title line, however long the run label, lies inside the image; no legend squeezes the plot."""
    from seqmatchnet.evaluation import figures, recall

    rng = np.random.default_rng(0)
    pr = recall.precision_recall(rng.uniform(size=50), rng.uniform(size=50) > 0.5, np.ones(50, bool))
    section = figures.DistanceSection(rng.uniform(size=(30, 30)), 0, 0, np.eye(30, dtype=bool), np.arange(30), 5)
    radius = figures.RadiusRecalls(np.full((len(recall.RADII), 5), 0.5), unit="m",
                                   counts=[3, 9, 40, 80, 90, 95, 99])
    figs = figures.evaluation_figures({n: 0.5 for n in recall.N_VALUES}, radius, pr, LONG_LABEL, section)
    figs["tsne"] = figures.embedding_figure(rng.normal(size=(20, 2)), rng.normal(size=(20, 2)), detail=LONG_LABEL)
    for name, fig in figs.items():
        renderer = drawn(fig)
        ax = fig.axes[0]
        box = ax.title.get_window_extent(renderer)
        assert box.x0 >= 0 and box.x1 <= fig.bbox.width, (name, ax.get_title())
        assert "run Dec03_07-55-14_l5_finetune" in " ".join(ax.get_title().split()), name
        assert ax.get_position().width > 0.6, name
    assert figs["recall_at_n"].axes[0].get_legend() is None        # the label is under the title instead


def test_radius_figure_shows_each_radius_query_count():
    from seqmatchnet.evaluation import figures

    fig = figures.radius_recall_figure([1, 5, 10], [1, 5], np.full((3, 2), 0.5), unit="m", counts=[12, 140, 300])
    drawn(fig)
    ticks = [t.get_text() for t in fig.axes[0].get_xticklabels()]
    assert ticks == ["1\n12", "5\n140", "10\n300"]
    assert "queries" in fig.axes[0].get_xlabel()


def test_training_loss_axis_starts_at_zero_and_states_the_change():
    from seqmatchnet.evaluation import figures

    fig = figures.training_curves_figure([1, 2, 3, 4, 5, 6], [0.283, 0.279, 0.275, 0.272, 0.270, 0.268],
                                       {1: [0.5, 0.55, 0.6, 0.62, 0.63, 0.64]})
    ax = fig.axes[0]
    assert ax.get_ylim()[0] == 0
    assert any("0.2830" in t.get_text() and "0.2680" in t.get_text() and "-5.3%" in t.get_text() for t in ax.texts)


# ---------------------------------------------------------------- 9. units and names in what is printed

def test_localize_prints_the_threshold_with_its_unit(trained, monkeypatch, capsys):
    capsys.readouterr()
    assert run_main(["--mode", "localize", "--dataset", "oxford-v1.0", "--split", "test", "--seqL", "2"], trained,
                    monkeypatch) == 0
    assert "within posDistThr 10 m over" in capsys.readouterr().out


def test_no_training_query_error_gives_the_distances_with_their_unit():
    import dataclasses

    from seqmatchnet.common.errors import UserError
    from seqmatchnet.training.mining import TrainingSet
    from test_train import tiny_split

    split = tiny_split()                                  # positives within 2 m, negatives farther than 3 m
    split = dataclasses.replace(split, q_positions=split.q_positions + [0.0, 5.0])   # the query drives 5 m aside
    with pytest.raises(UserError, match=r"within 2 m\) and a negative \(farther than 3 m\)"):
        TrainingSet.build(split, 1)


def test_shortlist_line_names_nprobe_only_for_an_ivf_index():
    from seqmatchnet.evaluation.evaluate import EvalResult, format_recalls

    base = {"candidates": 50, "nprobe": 16, "recall": 1.0, "sampled_queries": 5}
    result = EvalResult({n: 0.5 for n in (1, 5, 10, 20, 100)}, np.full((7, 5), 0.5), np.zeros((3, 50), int),
                        np.zeros((3, 50)), np.arange(3), np.arange(3), shortlist={**base, "index": "flat (exact)"})
    assert "from a flat (exact) index;" in format_recalls(result)
    result.shortlist = {**base, "index": "ivf (64 lists)"}
    assert "from a ivf (64 lists) index (nprobe 16);" in format_recalls(result)


def test_missing_msls_files_name_what_fetches_them(tmp_path):
    from argparse import Namespace

    from seqmatchnet.common.errors import UserError
    from seqmatchnet.data.specs import load_split

    opt = Namespace(dataset="msls", msls_trainCity="melbourne", msls_valCity="austin", structPath=str(tmp_path),
                    dataPath=str(tmp_path), descType="netvlad-pytorch", seqL=3, oxfordHonestVal=False)
    with pytest.raises(UserError, match=r"bash download.sh --what msls"):
        load_split(opt, "val")
    (tmp_path / "msls_austin_d-20_d2-5.db").write_bytes(b"")
    with pytest.raises(UserError, match=r"not published: extract them .* --mode extract"):
        load_split(opt, "val")


def test_positions_csv_given_as_descriptors_says_so(tmp_path):
    from seqmatchnet.common.errors import UserError
    from seqmatchnet.data.descriptors import load_descriptors

    csv = tmp_path / "db.csv"
    csv.write_text("x,y\n" + "".join(f"{i * 2.0},0\n" for i in range(50)))
    with pytest.raises(UserError, match="holds text .* not swapped") as info:
        load_descriptors(csv)
    assert "download it again" not in str(info.value)
