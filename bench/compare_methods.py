"""The paper's comparison table on the synthetic benchmark, from the project's own CLI pieces.

    python bench/compare_methods.py [--nEpochs 8] [--seqL 5] [--w 3] [--workdir DIR]

Rows: single frame, smooth, delta, raw sequence matching, SeqNet (trained),
S1 + SeqMatch, HVPR (SeqNet shortlist re-ranked by sequence matching),
SeqMatchNet (trained); Recall@1/5/10 on the test split and the scoring time
per query (ranking only, in the same run; HVPR adds both stages). Every row is
a `python main.py` command, printed as it runs.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--nEpochs", type=int, default=8)
    p.add_argument("--seqL", type=int, default=5)
    p.add_argument("--w", type=int, default=3, help="SeqNet kernel width")
    p.add_argument("--workdir", default=".", help="folder with (or for) data/ and structFiles/")
    a = p.parse_args()
    sys.path.insert(0, str(ROOT))
    os.chdir(a.workdir)

    from seqmatchnet.cli.options import parse_options
    from seqmatchnet.cli.test import evaluate_options, load_for_test
    from seqmatchnet.cli.train import train
    from seqmatchnet.common.logs import setup_logging

    setup_logging(quiet=True)
    L = str(a.seqL)
    common = ["--dataset", "synthetic", "--nocuda", "--quiet", "--threads", "0"]
    test = ["--mode", "test", "--split", "test"] + common

    def run_test(args: list[str], results: str | None = None):
        args = test + args + (["--resultsPath", results] if results else [])
        print("  python main.py " + " ".join(args), flush=True)
        _, result = evaluate_options(parse_options(args))
        if results:
            from seqmatchnet.evaluation.outputs import save_results
            save_results(Path(results), result)
        return result

    def run_train(args: list[str]) -> str:
        args = ["--mode", "train", "--nEpochs", str(a.nEpochs)] + common + args
        print("  python main.py " + " ".join(args), flush=True)
        return str(train(parse_options(args)))

    dim = str(load_for_test(parse_options(test + ["--seqL", "1"])).split.dim)
    rows = []

    def add(label: str, *results) -> None:
        r = results[-1]
        per_query = sum(x.timings["matching_s"] for x in results) / len(r.q_frames)
        rows.append((label, r.recalls, per_query))

    add("single frame (NetVLAD)", run_test(["--seqL", "1", "--matcher", "None"]))
    add(f"smooth (L={L})", run_test(["--seqL", L, "--method", "smooth"]))
    add(f"delta (L={L})", run_test(["--seqL", L, "--method", "delta"]))
    add(f"sequence matching, raw (L={L})", run_test(["--seqL", L]))
    seqnet = run_train(["--method", "seqnet", "--seqL", L, "--w", str(a.w), "--outDims", dim,
                        "--expName", "cmp_seqnet"])
    shortlist = run_test(["--method", "seqnet", "--seqL", L, "--resume", seqnet, "--ckpt", "best"],
                         "results/cmp_seqnet")
    add(f"SeqNet (trained, w={a.w})", shortlist)
    s1 = run_train(["--seqL", "1", "--pooling", "--outDims", dim, "--init", "identity", "--expName", "cmp_s1"])
    add("S1 + SeqMatch", run_test(["--seqL", L, "--pooling", "--resume", s1, "--ckpt", "best"]))
    add("HVPR (SeqNet -> SeqMatch)", shortlist,
        run_test(["--seqL", L, "--predictionsFile", "results/cmp_seqnet/results.npz"]))
    smn = run_train(["--seqL", L, "--pooling", "--outDims", dim, "--init", "identity", "--expName", "cmp_smn"])
    add("SeqMatchNet (trained)", run_test(["--seqL", L, "--pooling", "--resume", smn, "--ckpt", "best"]))

    print(f"\n{'method':<34}{'R@1':>7}{'R@5':>7}{'R@10':>7}{'ms/query':>10}")
    for label, recalls, per_query in rows:
        print(f"{label:<34}{recalls[1]:>7.3f}{recalls[5]:>7.3f}{recalls[10]:>7.3f}{per_query * 1e3:>10.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
