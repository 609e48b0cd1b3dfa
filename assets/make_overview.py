"""Draw assets/overview.png: the same stretch of the synthetic test split seen three ways.

    python assets/make_overview.py RUN_DIR [--out RUN_DIR/overview.png]

RUN_DIR is a SeqMatchNet run trained on ``--dataset synthetic`` (``make demo``
leaves one under data/runs/). Run from the folder that holds data/ and structFiles/.
Only the __main__ block runs anything.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def overview(run_dir: str, out: Path, frames: int = 250, seq_len: int = 5) -> Path:
    sys.path.insert(0, str(ROOT))
    import matplotlib
    matplotlib.use("Agg")
    import numpy as np
    import torch
    from matplotlib.figure import Figure

    from seqmatchnet.cli.options import parse_options
    from seqmatchnet.cli.test import load_for_test
    from seqmatchnet.data.windows import sequence_windows
    from seqmatchnet.evaluation.figures import save_figure
    from seqmatchnet.matching.seqmatch import window_distances
    from seqmatchnet.models.sequence import project_frames

    base = "--mode test --dataset synthetic --split test --nocuda --quiet".split()
    panels = []
    for title, args, L in (("single frame, raw descriptors", ["--seqL", "1"], 1),
                           (f"sequence matching (L={seq_len}), raw", ["--seqL", str(seq_len)], seq_len),
                           (f"sequence matching (L={seq_len}), SeqMatchNet",
                            ["--seqL", str(seq_len), "--pooling", "--resume", run_dir, "--ckpt", "best"], seq_len)):
        loaded = load_for_test(parse_options(base + args))
        split = loaded.split
        db = project_frames(loaded.model, split.db_desc[:frames], loaded.device, 256)
        q = project_frames(loaded.model, split.q_desc[:frames], loaded.device, 256)
        db_s, _ = sequence_windows(np.tile([[0, frames]], (frames, 1)), L)
        q_s, _ = sequence_windows(np.tile([[0, frames]], (frames, 1)), L)
        d = window_distances(db, q, torch.as_tensor(db_s), torch.as_tensor(q_s), L).numpy()
        panels.append((title, d, d.argmin(axis=0)))
        gt = np.linalg.norm(split.db_positions[:frames, None] - split.q_positions[None, :frames], axis=-1) \
            <= split.pos_dist_thr
    fig = Figure(figsize=(13.5, 4.6), dpi=100)
    for i, (title, d, top1) in enumerate(panels):
        ax = fig.add_subplot(1, 3, i + 1)
        z = (d - d.mean(axis=0)) / d.std(axis=0)           # per query column, for comparable contrast
        ax.imshow(z, cmap="gray", aspect="auto", vmin=-3, vmax=2)
        q = np.arange(frames)
        ok = gt[top1, q]
        ax.scatter(q[ok], top1[ok], s=6, c="#2ca02c", label=f"top-1 correct ({ok.mean():.0%})")
        ax.scatter(q[~ok], top1[~ok], s=6, c="#d62728", label="top-1 wrong")
        ax.set_title(title, fontsize=11)
        ax.set_xlabel("query frame")
        if i == 0:
            ax.set_ylabel("database frame")
        ax.legend(loc="upper right", fontsize=8, framealpha=0.85)
    fig.suptitle("Distance matrices over one stretch of the synthetic test route (dark = similar)", fontsize=12)
    fig.tight_layout()
    return save_figure(fig, out)


def main_cli(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("run_dir")
    p.add_argument("--out", default=None, help="PNG to write (default: RUN_DIR/overview.png)")
    a = p.parse_args(argv)
    print(overview(a.run_dir, Path(a.out) if a.out else Path(a.run_dir) / "overview.png"))


if __name__ == "__main__":
    main_cli()
