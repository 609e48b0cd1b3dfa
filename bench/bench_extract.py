"""Extraction speed: ``extract.extract_descriptors`` (batches, channels-last, inference mode,
decoding in worker processes) against a plain per-image loop of the same model.

    python bench/bench_extract.py [--quick] [--images 8 --repeats 2 --batchSize 4 --workers 1]
                                  [--imageSize 640,480 --clusters 64 --pcs 4096] [--device cpu|cuda] [--threads N]

Both variants use one random checkpoint with the real shapes (VGG16 to conv5_3, K=64, 4096-D WPCA)
on the same JPEGs (1024x768, resized to ``--imageSize``), after a one-image warm-up each, timed in
``--repeats`` interleaved rounds (baseline, project, baseline, ...); the best round of each counts:
(a) baseline: for each image, decode + preprocess in the main process, ``model(x[None])`` under
    ``torch.no_grad`` in the default (contiguous) memory format;
(b) project: ``extract.extract_descriptors`` writing a ``.npy`` (its progress file included).
Prints images/s of both and the ratio; checks that both give the same descriptors (cosine >= 0.9999).
Goal: the project is not slower than the per-image loop (ratio >= 0.95, allowing for timing noise).
Exits 1 when a goal is missed.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402,F401,I001  (first: sets OMP_WAIT_POLICY before torch loads)

import numpy as np
import torch
from PIL import Image

import extract
from common import add_threads_option, apply_threads, goal, interleaved, machine_line, table


def write_jpegs(folder: Path, n: int, size: tuple[int, int], seed: int) -> list[Path]:
    """``n`` smooth random-texture JPEGs of ``size`` (W, H)."""
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(n):
        small = rng.integers(0, 256, (size[1] // 16, size[0] // 16, 3), dtype=np.uint8)
        paths.append(folder / f"img_{i}.jpg")
        Image.fromarray(small).resize(size, Image.BICUBIC).save(paths[-1], quality=90)
    return paths


def per_image_loop(model: extract.NetVLADModel, paths: list[Path], size: tuple[int, int] | None,
                   device: torch.device) -> np.ndarray:
    """The baseline: one image at a time, decoded in this process, default memory format."""
    model = model.to(device=device, memory_format=torch.contiguous_format)
    rows = []
    with torch.no_grad():
        for path in paths:
            with Image.open(path) as image:
                x = extract.preprocess(image, size)[None].to(device)
            rows.append(model(x).cpu().numpy()[0])
    return np.stack(rows)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--quick", action="store_true", help="4 images at 320x240, K=16, 512-D (a smoke run)")
    p.add_argument("--images", type=int, default=8, help="images per variant and round")
    p.add_argument("--repeats", type=int, default=2, help="interleaved timed rounds; the best round counts")
    p.add_argument("--batchSize", type=int, default=4, help="project: images per forward pass")
    p.add_argument("--workers", type=int, default=1, help="project: decoding worker processes")
    p.add_argument("--imageSize", default="640,480", help="W,H the images are resized to")
    p.add_argument("--clusters", type=int, default=64, help="NetVLAD clusters K")
    p.add_argument("--pcs", type=int, default=4096, help="WPCA output dimensions P")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--seed", type=int, default=0)
    add_threads_option(p)
    args = p.parse_args(argv)
    if args.quick:
        args.images, args.repeats, args.imageSize, args.clusters, args.pcs = 4, 1, "320,240", 16, 512
    apply_threads(args.threads)
    size = extract.parse_image_size(args.imageSize)
    device = torch.device(args.device)
    print(machine_line())
    print(f"{args.images} JPEGs 1024x768 -> {args.imageSize}, VGG16 + NetVLAD K={args.clusters} + WPCA "
          f"{args.pcs}-D, device {device}, project batch {args.batchSize}, {args.workers} decoding workers")

    model = extract.model_from_state_dict(extract.random_netvlad_state(args.clusters, args.pcs, args.seed))
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        (tmp / "img").mkdir()
        paths = write_jpegs(tmp / "img", args.images, (1024, 768), args.seed)
        per_image_loop(model, paths[:1], size, device)                       # warm-up
        extract.extract_descriptors(model, paths[:1], tmp / "warm.npy", checkpoint_id="bench", image_size=size,
                                    batch_size=1, threads=0, device=device)
        rows = {}

        def run_loop() -> None:
            rows["loop"] = per_image_loop(model, paths, size, device)

        def run_project() -> None:
            result = extract.extract_descriptors(model, paths, tmp / "out.npy", checkpoint_id="bench",
                                                 image_size=size, batch_size=args.batchSize, threads=args.workers,
                                                 device=device)
            rows["project"] = np.load(result.path)

        times = interleaved({"loop": run_loop, "project": run_project}, args.repeats, warmup=False)
    t_loop, t_proj = min(times["loop"]), min(times["project"])
    loop_rows, proj_rows = rows["loop"], rows["project"]
    cosine = float(np.min(np.sum(loop_rows * proj_rows, axis=1)
                          / np.linalg.norm(loop_rows, axis=1) / np.linalg.norm(proj_rows, axis=1)))
    ratio = t_loop / t_proj
    print(table([["per-image loop (baseline)", f"{t_loop:.2f}", f"{args.images / t_loop:.3f}", "1.00"],
                 [f"extract_descriptors (batch {args.batchSize})", f"{t_proj:.2f}", f"{args.images / t_proj:.3f}",
                  f"{ratio:.2f}"]],
                ["variant", "seconds", "images/s", "speed-up"]))
    print(f"minimum cosine between the two variants' descriptors: {cosine:.7f}")
    print(f"rounds (s): loop {', '.join(f'{t:.1f}' for t in times['loop'])}; project "
          f"{', '.join(f'{t:.1f}' for t in times['project'])}")
    print("note: best of interleaved rounds measured in this run; another process may share the CPU, so the "
          "ratio means more than the absolute images/s")
    ok = goal(cosine >= 0.9999, f"same descriptors as the per-image loop (min cosine {cosine:.6f} >= 0.9999)")
    ok &= goal(ratio >= 0.95, f"project not slower than the per-image loop ({ratio:.2f}x, "
                             f"{args.images / t_proj:.3f} images/s at {args.imageSize} on {device})")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
