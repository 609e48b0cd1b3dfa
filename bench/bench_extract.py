"""Extraction speed per model: ``extract.extract_descriptors`` (batches, channels-last, inference
mode, decoding in worker processes) in images/s, against the model's compute floor on this machine.

    python bench/bench_extract.py [--quick] [--models netvlad,cosplace,...,megaloc] [--images 4]
                                  [--repeats 2] [--batchSize 4] [--workers 1] [--loop] [--device cpu|cuda]
                                  [--threads N]

Each model is a random network with its released layout (no weights are downloaded):
- netvlad: VGG16 to conv5_3 + NetVLAD K=64 + WPCA 4096, images resized to 640x480;
- cosplace, eigenplaces: ResNet-50 + GeM + Linear(2048, 2048), each image at its own size (the
  JPEGs are 640x480);
- mixvpr: ResNet-50 to layer3 + MixVPR (1024 channels, 20x20 cells, depth 4, 4096-D), 320x320;
- boq: DINOv2 ViT-B/14 (no final norm) + BoQ (384 channels, 64 queries x 2 blocks, 12288-D),
  322x322 (bicubic); ``--models boq-resnet50``: ResNet-50 to layer3 + BoQ 16384-D, 384x384;
- salad: DINOv2 ViT-B/14 + SALAD (64 x 128 + 256, 8448-D), 322x322;
- megaloc: DINOv2 ViT-B/14 + SALAD (64 x 256 + 256) + Linear to 8448-D, each image at its own size
  (the network resizes 640x480 to 644x476).

The compute floor: the network's multiply-adds per image (every convolution and linear layer,
and, for the transformers, the attention products, counted on one forward pass at that size)
divided by the multiply-add rate of a 2048x2048 float32
matrix product measured here (timed in every round beside the models, the best time counts).
``floor ratio`` = measured images/s / floor images/s: 1.0 would mean the network runs at the
speed of one large matrix product. ``Nordland h``: hours for one Nordland traversal (27,592
frames) at the measured rate.
With ``--loop`` a plain per-image loop of the same model (decoding in this process, default
memory format) is timed too, in interleaved rounds, and its descriptors compared.
Goals: descriptors finite and unit-length; with ``--loop``, the same descriptors as the loop
(cosine >= 0.9999) and not slower (ratio >= 0.95). Exits 1 when a goal is missed.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402,F401,I001  (first: sets OMP_WAIT_POLICY before torch loads)

import numpy as np
import torch
from PIL import Image
from torch import nn

from seqmatchnet.images import extraction
from seqmatchnet.images import base
from seqmatchnet.images import boq
from seqmatchnet.images import salad
from seqmatchnet.images import cosplace
from seqmatchnet.images import mixvpr
from seqmatchnet.images import netvlad
from seqmatchnet.images import registry
from common import add_threads_option, apply_threads, goal, interleaved, machine_line, table

MIXVPR_RELEASED = {"in_channels": 1024, "cells": 400, "out_channels": 1024, "depth": 4, "hidden": 400, "rows": 4}
VIT_B = (768, 12, 37)                    # DINOv2 ViT-B/14: width, depth, grid of the 518-pixel training size
SALAD_RELEASED = {"channels": 768, "clusters": 64, "cluster_dim": 128, "token": 256, "hidden": 512}
MEGALOC_RELEASED = dict(SALAD_RELEASED, cluster_dim=256)
EXTRA_MODELS = ("boq-resnet50",)


def build_dinov2(name: str) -> base.ImageModel:
    """A random DINOv2 model of ``name`` with its released layout."""
    if name == "boq":
        agg = {"in_channels": 768, "proj": 384, "queries": 64, "layers": 2, "rows": 32}
        net = boq.BoQNet(boq.BoQDino(*VIT_B), agg)
        return base.ImageModel("boq", net.eval(), 12288, "DINOv2 ViT-B/14 + BoQ 12288", boq.BOQ_DINO_SIZE,
                               resize="bicubic", multiple=14)
    if name == "boq-resnet50":
        agg = {"in_channels": 1024, "proj": 512, "queries": 64, "layers": 2, "rows": 32}
        net = boq.BoQNet(boq.BoQResNet("resnet50", 3), agg)
        return base.ImageModel("boq", net.eval(), 16384, "ResNet-50 to layer3 + BoQ 16384", boq.BOQ_RESNET_SIZE,
                               resize="bicubic")
    if name == "salad":
        net = salad.SaladNet(VIT_B, SALAD_RELEASED)
        return base.ImageModel("salad", net.eval(), 8448, "DINOv2 ViT-B/14 + SALAD 8448", salad.SALAD_SIZE,
                               multiple=14)
    net = salad.MegaLocNet(VIT_B, MEGALOC_RELEASED, 8448)
    return base.ImageModel("megaloc", net.eval(), 8448, "DINOv2 ViT-B/14 + SALAD + Linear 8448", None)


def write_jpegs(folder: Path, n: int, size: tuple[int, int], seed: int) -> list[Path]:
    """``n`` smooth random-texture JPEGs of ``size`` (W, H)."""
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(n):
        small = rng.integers(0, 256, (size[1] // 16, size[0] // 16, 3), dtype=np.uint8)
        paths.append(folder / f"img_{i}.jpg")
        Image.fromarray(small).resize(size, Image.BICUBIC).save(paths[-1], quality=90)
    return paths


def build(name: str, quick: bool, seed: int) -> base.ImageModel:
    """A random network of ``name`` with its released layout (smaller NetVLAD with ``quick``)."""
    torch.manual_seed(seed)
    if name in ("boq", "boq-resnet50", "salad", "megaloc"):
        return build_dinov2(name)
    if name == "netvlad":
        k, p = (16, 512) if quick else (64, 4096)
        return registry.model_from_state("netvlad", netvlad.random_netvlad_state(k, p, seed))
    if name == "mixvpr":
        net = mixvpr.MixVPRNet("resnet50", 3, MIXVPR_RELEASED).eval()
        return base.ImageModel("mixvpr", net, 4096, "ResNet-50 to layer3 + MixVPR 4096", (320, 320),
                                       cells=400, stride_steps=4)
    net = cosplace.GeoLocalizationNet("resnet50", 2048, 2048).eval()
    return base.ImageModel(name, net, 2048, "ResNet-50 + GeM + Linear(2048, 2048)", None)


def multiply_adds(network: nn.Module, size: tuple[int, int]) -> int:
    """Multiply-adds of one forward pass of a ``size`` (W, H) image: every Conv2d and Linear."""
    total = [0]

    def count(module: nn.Module, inputs, output) -> None:
        if isinstance(module, nn.Conv2d):
            per_out = module.in_channels // module.groups * module.kernel_size[0] * module.kernel_size[1]
            total[0] += output.numel() * per_out
        elif isinstance(module, nn.Linear):
            total[0] += output.numel() * module.in_features
        elif isinstance(module, nn.MultiheadAttention):     # projections (F.linear) and the two products
            q, kv = inputs[0].shape[1], inputs[1].shape[1]
            total[0] += (2 * q + 2 * kv) * module.embed_dim ** 2 + 2 * q * kv * module.embed_dim
        elif isinstance(module, Attention):                  # timm: qkv and proj are Linear modules
            n, c = inputs[0].shape[1:]
            total[0] += 2 * n * n * c

    from timm.models.vision_transformer import Attention

    kinds = (nn.Conv2d, nn.Linear, nn.MultiheadAttention, Attention)
    hooks = [m.register_forward_hook(count) for m in network.modules() if isinstance(m, kinds)]
    try:   # with autograd on: the fused transformer-encoder path would skip the modules' hooks
        with torch.enable_grad():
            out = network(torch.zeros(1, 3, size[1], size[0]))
    finally:
        for h in hooks:
            h.remove()
    if isinstance(network, netvlad.NetVLADModel) and network.WPCA is not None:
        total[0] += network.WPCA[0].weight.numel()       # WPCA runs as F.linear, not through the conv module
    del out
    return total[0]


MATMUL_N = 2048
NORDLAND_FRAMES = 27592             # one Nordland traversal: hours = frames / images/s / 3600


def matmul_product() -> Callable[[], object]:
    """One ``MATMUL_N x MATMUL_N`` float32 matrix product, ready to time (``MATMUL_N**3`` multiply-adds)."""
    a, b = torch.randn(MATMUL_N, MATMUL_N), torch.randn(MATMUL_N, MATMUL_N)
    torch.mm(a, b)
    return lambda: torch.mm(a, b)


def per_image_loop(model: base.ImageModel, paths: list[Path], size, device: torch.device) -> np.ndarray:
    """The baseline: one image at a time, decoded in this process, default memory format."""
    network = model.network.to(device=device, memory_format=torch.contiguous_format)
    rows = []
    with torch.no_grad():
        for path in paths:
            with Image.open(path) as image:
                x = extraction.preprocess(image, size, model.mean, model.std, model.resize)[None].to(device)
            rows.append(network(x).cpu().numpy()[0])
    return np.stack(rows)


def bench_model(name: str, args: argparse.Namespace, paths: list[Path], tmp: Path, device: torch.device) -> dict:
    """Time one model: the project (and with ``--loop`` the per-image loop) in interleaved rounds."""
    model = build(name, args.quick, args.seed)
    size = model.default_size if name != "netvlad" else extraction.parse_image_size(args.netvladSize)
    image_size = size or Image.open(paths[0]).size
    if name == "megaloc":          # what the network feeds its ViT: the sides rounded to multiples of 14
        image_size = tuple(round(s / 14) * 14 for s in image_size)
    macs = multiply_adds(model.network, image_size)
    run = {}

    def project() -> None:
        settings = extraction.ExtractSettings(size, args.batchSize, args.workers, device)
        result = extraction.extract_descriptors(model, paths, tmp / f"{name}.npy", checkpoint_id="bench",
                                                settings=settings)
        run["project"] = np.load(result.path)

    def loop() -> None:
        run["loop"] = per_image_loop(model, paths, size, device)

    extraction.extract_descriptors(model, paths[:1], tmp / "warm.npy", checkpoint_id="bench",
                                   settings=extraction.ExtractSettings(size, 1, 0, device))
    fns = {"matmul": matmul_product(), "project": project, **({"loop": loop} if args.loop else {})}
    times = interleaved(fns, args.repeats, warmup=False)
    return {"name": name, "model": model, "size": image_size, "macs": macs, "times": times, "rows": run}


def report(results: list[dict], args: argparse.Namespace) -> bool:
    """Print the table and check the goals."""
    rows, ok = [], True
    rate = MATMUL_N ** 3 / min(t for r in results for t in r["times"]["matmul"])
    for r in results:
        per_s = args.images / min(r["times"]["project"])
        floor = rate / r["macs"]
        row = [r["name"], r["model"].architecture, f"{r['size'][0]}x{r['size'][1]}", f"{r['macs'] / 1e9:.1f}",
               f"{per_s:.3f}", f"{floor:.3f}", f"{per_s / floor:.2f}", f"{NORDLAND_FRAMES / per_s / 3600:.1f}"]
        norms = np.linalg.norm(r["rows"]["project"], axis=1)
        ok &= goal(bool(np.all(np.isfinite(norms)) and np.allclose(norms, 1, atol=1e-4)),
                   f"{r['name']}: finite unit-length descriptors")
        if args.loop:
            t_loop = min(r["times"]["loop"])
            a, b = r["rows"]["loop"], r["rows"]["project"]
            cosine = float(np.min(np.sum(a * b, axis=1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)))
            speedup = t_loop / min(r["times"]["project"])
            row += [f"{args.images / t_loop:.3f}", f"{speedup:.2f}"]
            ok &= goal(cosine >= 0.9999, f"{r['name']}: same descriptors as the per-image loop (min cosine "
                                         f"{cosine:.6f})")
            ok &= goal(speedup >= 0.95, f"{r['name']}: not slower than the per-image loop ({speedup:.2f}x)")
        rows.append(row)
    header = ["model", "network", "size", "GMAC/image", "images/s", "floor images/s", "floor ratio", "Nordland h"]
    print(table(rows, header + (["loop images/s", "speed-up"] if args.loop else [])))
    print(f"matrix-product rate: {rate / 1e9:.1f} GMAC/s ({MATMUL_N}x{MATMUL_N} float32, best of every round); best "
          f"of {args.repeats} rounds per model; another process may share the CPU")
    return ok


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--quick", action="store_true", help="2 images of 320x240, one round, NetVLAD K=16 512-D")
    p.add_argument("--models", default=",".join(registry.MODELS), help="comma-separated models to time")
    p.add_argument("--images", type=int, default=4, help="images per model and round")
    p.add_argument("--repeats", type=int, default=2, help="timed rounds; the best round counts")
    p.add_argument("--batchSize", type=int, default=4, help="images per forward pass")
    p.add_argument("--workers", type=int, default=1, help="decoding worker processes")
    p.add_argument("--netvladSize", default="640,480", help="W,H NetVLAD's images are resized to")
    p.add_argument("--loop", action="store_true", help="also time a plain per-image loop of each model")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--seed", type=int, default=0)
    add_threads_option(p)
    args = p.parse_args(argv)
    jpeg_size = (640, 480)
    if args.quick:
        args.images, args.repeats, args.netvladSize, jpeg_size = 2, 1, "320,240", (320, 240)
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    unknown = [m for m in models if m not in registry.MODELS + EXTRA_MODELS]
    if unknown:
        p.error(f"--models: unknown {unknown}; choose from {', '.join(registry.MODELS + EXTRA_MODELS)}")
    apply_threads(args.threads)
    device = torch.device(args.device)
    print(machine_line())
    print(f"{args.images} JPEGs {jpeg_size[0]}x{jpeg_size[1]}, device {device}, batch {args.batchSize}, "
          f"{args.workers} decoding workers")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        (tmp / "img").mkdir()
        paths = write_jpegs(tmp / "img", args.images, jpeg_size, args.seed)
        results = [bench_model(name, args, paths, tmp, device) for name in models]
    return 0 if report(results, args) else 1


if __name__ == "__main__":
    sys.exit(main())
