"""``--mode extract``: NetVLAD checkpoint checks, image listing, preprocessing, the NetVLAD forward
against plain loops and against Patch-NetVLAD, resuming after a kill, bad images, and images ->
prepare -> train -> test for every model (the other models' fidelity: test_image_models.py)."""
from __future__ import annotations

import configparser
import importlib.metadata
import importlib.util
import os
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import ROOT
from seqmatchnet.cli import extract
from seqmatchnet.images import extraction, registry
from seqmatchnet.images import netvlad as netvlad_mod

K, P = 4, 32                  # small NetVLAD: 4 clusters, 32-D WPCA
SIZE = (64, 48)               # tiny images keep VGG16 fast
SIZE_ARG = "64,48"


def netvlad(state: dict, source: str = "checkpoint") -> netvlad_mod.NetVLADModel:
    return registry.model_from_state("netvlad", state, source).network


@pytest.fixture(scope="module")
def state() -> dict:
    return netvlad_mod.random_netvlad_state(K, P, seed=1)


@pytest.fixture(scope="module")
def model(state) -> netvlad_mod.NetVLADModel:
    return netvlad(state)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory, state) -> Path:
    path = tmp_path_factory.mktemp("ckpt") / "netvlad_WPCA32.pth.tar"
    torch.save({"state_dict": state, "epoch": 3, "best_score": np.float64(0.5)}, path)
    return path


def write_images(folder: Path, n: int, seed: int = 0, size: tuple[int, int] = (80, 60)) -> list[Path]:
    """``n`` random-texture RGB JPEGs named frame_0 .. frame_{n-1}."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(n):
        pixels = rng.integers(0, 256, (size[1] // 4, size[0] // 4, 3), dtype=np.uint8)
        image = Image.fromarray(pixels).resize(size, Image.BILINEAR)
        paths.append(folder / f"frame_{i}.jpg")
        image.save(paths[-1], quality=90)
    return paths


def run_cli(capsys, *args: str) -> tuple[int, str, str]:
    rc = extract.main([str(a) for a in args])
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


def one_error_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err
    return lines[0]


# ---------------------------------------------------------------- checkpoints

def test_encoder_layout_is_torchvision_vgg16_to_conv5_3(model):
    keys = [k for k in model.state_dict() if k.startswith("encoder.")]
    convs = sorted({int(k.split(".")[1]) for k in keys})
    assert convs == [0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28]
    assert len(model.encoder) == 29 and isinstance(model.encoder[28], torch.nn.Conv2d)
    assert [i for i, m in enumerate(model.encoder) if isinstance(m, torch.nn.MaxPool2d)] == [4, 9, 16, 23]
    with torch.inference_mode():
        assert model.encoder(torch.zeros(1, 3, 48, 64)).shape == (1, 512, 3, 4)
    assert model.out_dim == P and model.pool.conv.bias is None


def test_checkpoint_shapes_give_k_and_p(state):
    m = netvlad({k: v for k, v in state.items() if not k.startswith("WPCA")})
    assert m.WPCA is None and m.out_dim == K * 512
    prefixed = {f"module.{k}" if k.startswith("pool") else k.replace("encoder.", "encoder.module."): v
                for k, v in state.items()}
    m = netvlad({**prefixed, "pool.conv.bias": torch.zeros(K)})
    assert m.out_dim == P and m.pool.conv.bias is not None
    assert torch.equal(m.pool.centroids, state["pool.centroids"])


@pytest.mark.parametrize("change, needles", [
    (lambda s: s.pop("encoder.14.weight"), ("'encoder.14.weight'", "[256, 256, 3, 3]", "missing")),
    (lambda s: s.pop("pool.centroids"), ("'pool.centroids'", "missing")),
    (lambda s: s.update({"encoder.28.bias": torch.zeros(256)}), ("'encoder.28.bias'", "[256]", "[512]")),
    (lambda s: s.update({"pool.conv.weight": torch.zeros(K + 1, 512, 1, 1)}),
     ("'pool.conv.weight'", f"[{K + 1}, 512, 1, 1]", f"[{K}, 512, 1, 1]")),
    (lambda s: s.update({"pool.centroids": torch.zeros(K, 256)}), ("'pool.centroids'", f"[{K}, 256]")),
    (lambda s: s.update({"WPCA.0.weight": torch.zeros(P, K * 512)}), ("'WPCA.0.weight'", f"[{P}, {K * 512}]")),
    (lambda s: s.update({"WPCA.0.bias": torch.zeros(P + 1)}), ("'WPCA.0.bias'", f"[{P + 1}]", f"[{P}]")),
    (lambda s: s.update({"pool.extra": torch.zeros(3, 2)}), ("'pool.extra'", "[3, 2]", "unexpected")),
])
def test_checkpoint_errors_name_key_and_shape(state, change, needles):
    broken = dict(state)
    change(broken)
    with pytest.raises(extract.UserError) as info:
        netvlad(broken, "ckpt.pth.tar")
    for needle in needles:
        assert needle in str(info.value), str(info.value)


def test_checkpoint_file_errors(tmp_path, capsys):
    images = write_images(tmp_path / "img", 1)[0].parent
    rc, _, err = run_cli(capsys, "--images", images, "--netvladCkpt", tmp_path / "none.pth.tar", "--out",
                         tmp_path / "o.npy")
    line = one_error_line(err)
    assert rc == 1 and "none.pth.tar not found" in line and extract.CHECKPOINT_URL in line
    (tmp_path / "bad.pth.tar").write_bytes(b"not a checkpoint")
    rc, _, err = run_cli(capsys, "--images", images, "--netvladCkpt", tmp_path / "bad.pth.tar", "--out",
                         tmp_path / "o.npy")
    assert rc == 1 and "bad.pth.tar could not be loaded" in one_error_line(err)


@pytest.mark.parametrize("args, needle", [
    (["--imageSize", "64"], "--imageSize '64'"),
    (["--imageSize", "64,-3"], "--imageSize"),
    (["--batchSize", "0"], "--batchSize must be at least 1"),
    (["--threads", "-1"], "--threads"),
    (["--device", "gpu"], "--device"),
    (["--out", "x.txt"], "must end in .npy"),
    (["--bogus"], "unrecognized arguments: --bogus"),
])
def test_bad_options_are_one_line(tmp_path, capsys, args, needle):
    base = {"--images": str(tmp_path), "--netvladCkpt": "c.pth", "--out": str(tmp_path / "o.npy")}
    argv = [x for k, v in base.items() if k not in args for x in (k, v)] + args
    rc, _, err = run_cli(capsys, *argv)
    assert rc == 2 and needle in one_error_line(err)


# ---------------------------------------------------------------- listing and preprocessing

def test_folder_in_natural_order_and_filtered(tmp_path):
    names = ["frame_10.jpg", "frame_2.PNG", "Frame_1.jpeg", "frame_2b.bmp", "notes.txt", ".hidden.jpg", "frame_100.JPG"]
    for name in names:
        (tmp_path / name).write_bytes(b"")
    (tmp_path / "sub.jpg").mkdir()
    got = [p.name for p in extraction.list_images(tmp_path)]
    assert got == ["Frame_1.jpeg", "frame_2.PNG", "frame_2b.bmp", "frame_10.jpg", "frame_100.JPG"]
    assert all(p.is_absolute() for p in extraction.list_images(tmp_path))


def test_list_file_order_and_relative_paths(tmp_path, monkeypatch):
    (tmp_path / "imgs").mkdir()
    for name in ("b.jpg", "a.jpg", "c.png"):
        (tmp_path / "imgs" / name).write_bytes(b"")
    listing = tmp_path / "lists" / "route.txt"
    listing.parent.mkdir()
    listing.write_text(f"../imgs/b.jpg\n\n{tmp_path / 'imgs' / 'c.png'}\n../imgs/a.jpg\n")
    monkeypatch.chdir(tmp_path / "imgs")           # relative to the list file, not the working folder
    assert [p.name for p in extraction.list_images(listing)] == ["b.jpg", "c.png", "a.jpg"]
    listing.write_text("../imgs/b.jpg\n../imgs/missing.jpg\n")
    with pytest.raises(extract.UserError, match="line 2: image .*missing.jpg not found"):
        extraction.list_images(listing)
    with pytest.raises(extract.UserError, match="no .jpg"):
        extraction.list_images(tmp_path / "lists")


def test_normalisation_by_hand():
    pixels = np.array([[[0, 128, 255], [10, 20, 30], [200, 100, 50]],
                       [[255, 255, 255], [1, 2, 3], [90, 180, 45]]], dtype=np.uint8)     # [H=2, W=3, 3]
    got = extraction.preprocess(Image.fromarray(pixels), None).numpy()
    assert got.shape == (3, 2, 3) and got.dtype == np.float32
    mean, std = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])
    for c in range(3):
        for y in range(2):
            for x in range(3):
                want = (pixels[y, x, c] / 255.0 - mean[c]) / std[c]
                assert abs(got[c, y, x] - want) < 1e-6


def test_resize_is_bilinear_to_width_height_by_hand():
    """8x4 -> 4x2 (halving): Pillow's bilinear filter spans 3 input pixels per output pixel with
    weights 3:3:1 (triangle of radius 2 input pixels), nearest to the edge clipped."""
    x = np.arange(8) * 30 + 5                        # a horizontal ramp, the same on every row
    pixels = np.repeat(np.repeat(x[None, :, None], 4, axis=0), 3, axis=2).astype(np.uint8)   # [H=4, W=8, 3]
    got = extraction.preprocess(Image.fromarray(pixels), (4, 2)).numpy()
    assert got.shape == (3, 2, 4)
    taps = {0: [(0, 3), (1, 3), (2, 1)], 1: [(1, 1), (2, 3), (3, 3), (4, 1)],
            2: [(3, 1), (4, 3), (5, 3), (6, 1)], 3: [(5, 1), (6, 3), (7, 3)]}
    for ox, tap in taps.items():
        value = sum(x[i] * w for i, w in tap) / sum(w for _, w in tap)
        want = (value / 255 - 0.485) / 0.229
        assert np.all(np.abs(got[0, :, ox] - want) <= 1.0 / 255 / 0.229 + 1e-6), (ox, got[0, :, ox], want)


def test_grey_and_rgba_become_rgb():
    rng = np.random.default_rng(0)
    grey = rng.integers(0, 256, (6, 8), dtype=np.uint8)
    from_grey = extraction.preprocess(Image.fromarray(grey, "L"), (8, 6))
    from_rgb = extraction.preprocess(Image.fromarray(np.repeat(grey[:, :, None], 3, axis=2)), (8, 6))
    assert from_grey.shape == (3, 6, 8) and torch.equal(from_grey, from_rgb)
    rgb = rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)
    rgba = np.concatenate([rgb, rng.integers(0, 256, (6, 8, 1), dtype=np.uint8)], axis=2)
    assert torch.equal(extraction.preprocess(Image.fromarray(rgba, "RGBA"), None),
                       extraction.preprocess(Image.fromarray(rgb), None))
    palette = Image.fromarray(rgb).quantize(8)
    assert torch.equal(extraction.preprocess(palette, None), extraction.preprocess(palette.convert("RGB"), None))


# ---------------------------------------------------------------- the forward pass against plain loops

def netvlad_loop(feats: np.ndarray, weight: np.ndarray, bias: np.ndarray | None, centroids: np.ndarray) -> np.ndarray:
    """NetVLAD (Arandjelovic et al., eq. 4) for one image, one cluster and one location at a time:
    ``feats`` [C, H, W] -> [K*C], float64."""
    c_dim = feats.shape[0]
    locs = feats.reshape(c_dim, -1).T.astype(np.float64)
    locs = locs / np.linalg.norm(locs, axis=1, keepdims=True)
    k_num = len(centroids)
    vlad = np.zeros((k_num, c_dim))
    for loc in locs:
        logits = np.array([weight[k] @ loc + (bias[k] if bias is not None else 0.0) for k in range(k_num)])
        assign = np.exp(logits - logits.max())
        assign /= assign.sum()
        for k in range(k_num):
            vlad[k] += assign[k] * (loc - centroids[k])
    vlad /= np.linalg.norm(vlad, axis=1, keepdims=True)
    vlad = vlad.reshape(-1)
    return vlad / np.linalg.norm(vlad)


@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("hw", [(1, 1), (3, 4), (2, 5)])
def test_netvlad_pool_against_loop(with_bias, hw):
    gen = torch.Generator().manual_seed(hw[0] * 10 + hw[1])
    pool = netvlad_mod.NetVLADPool(3, dim=16, assignment_bias=with_bias)
    with torch.no_grad():
        pool.centroids.copy_(torch.randn(3, 16, generator=gen))
        pool.conv.weight.copy_(torch.randn(3, 16, 1, 1, generator=gen) * 3)
        if with_bias:
            pool.conv.bias.copy_(torch.randn(3, generator=gen))
    x = torch.randn(2, 16, *hw, generator=gen)
    got = pool(x).detach().numpy()
    bias = pool.conv.bias.detach().numpy() if with_bias else None
    for n in range(2):
        want = netvlad_loop(x[n].numpy(), pool.conv.weight[:, :, 0, 0].detach().numpy(), bias,
                            pool.centroids.detach().numpy())
        np.testing.assert_allclose(got[n], want, atol=2e-6)


def test_model_forward_with_wpca_against_loop(model):
    x = torch.randn(2, 3, 48, 64, generator=torch.Generator().manual_seed(5))
    with torch.inference_mode():
        got = model(x.contiguous(memory_format=torch.channels_last)).numpy()
        feats = model.encoder(x).numpy()
    w = model.WPCA[0].weight.detach().numpy()[:, :, 0, 0].astype(np.float64)
    b = model.WPCA[0].bias.detach().numpy()
    for n in range(2):
        vlad = netvlad_loop(feats[n], model.pool.conv.weight[:, :, 0, 0].detach().numpy(), None,
                            model.pool.centroids.detach().numpy())
        want = w @ vlad + b
        want /= np.linalg.norm(want)
        np.testing.assert_allclose(got[n], want, atol=2e-5)


# ---------------------------------------------------------------- runs: output, resume, bad images

@pytest.mark.slow
def test_npy_and_h5_outputs_one_row_per_image_in_order(tmp_path, capsys, ckpt, model):
    paths = write_images(tmp_path / "img", 3)
    rc, out, _ = run_cli(capsys, "--images", tmp_path / "img", "--netvladCkpt", ckpt, "--out", tmp_path / "d.npy",
                         "--imageSize", SIZE_ARG, "--batchSize", "2", "--threads", "0", "--nocuda", "--quiet")
    assert rc == 0 and "wrote 3 x 32 NetVLAD (Patch-NetVLAD) descriptors" in out and "images/s" in out
    rows = np.load(tmp_path / "d.npy")
    assert rows.dtype == np.float32 and rows.shape == (3, P)
    listed = (tmp_path / "d.npy.images.txt").read_text().splitlines()
    assert listed == [str(p.resolve()) for p in paths]
    x = torch.stack([extraction.preprocess(Image.open(p), SIZE) for p in reversed(paths)])
    with torch.inference_mode():
        np.testing.assert_allclose(rows[::-1], model(x).numpy(), atol=1e-5)   # the order is the images' order
    assert sorted(f.name for f in tmp_path.iterdir()) == ["d.npy", "d.npy.images.txt", "d.npy.model.json", "img"]

    from seqmatchnet.data.descriptors import load_descriptors
    listing = tmp_path / "list.txt"
    listing.write_text("img/frame_2.jpg\nimg/frame_0.jpg\n")
    rc, _, _ = run_cli(capsys, "--images", listing, "--netvladCkpt", ckpt, "--out", tmp_path / "d.h5",
                       "--imageSize", SIZE_ARG, "--threads", "1", "--nocuda", "--quiet")
    assert rc == 0
    np.testing.assert_allclose(load_descriptors(tmp_path / "d.h5"), rows[[2, 0]], atol=1e-6)


def test_original_sizes_batch_by_size(tmp_path, capsys, ckpt, model):
    paths = write_images(tmp_path / "img", 1, seed=4, size=(64, 48)) + write_images(tmp_path / "b", 1, size=(48, 32))
    paths[1] = paths[1].rename(tmp_path / "img" / "frame_1.jpg")
    rc, _, err = run_cli(capsys, "--images", tmp_path / "img", "--netvladCkpt", ckpt, "--out", tmp_path / "o.npy",
                         "--imageSize", "0", "--batchSize", "2", "--threads", "0", "--nocuda", "--quiet")
    assert rc == 0, err
    rows = np.load(tmp_path / "o.npy")
    with torch.inference_mode():
        for row, path in zip(rows, paths):
            x = extraction.preprocess(Image.open(path), None)
            assert x.shape[1:] == Image.open(path).size[::-1]
            np.testing.assert_allclose(row, model(x[None])[0].numpy(), atol=1e-5)


KILLER = """
import os, signal, sys
sys.path.insert(0, {root!r})
from seqmatchnet.cli import extract
from seqmatchnet.images import extraction
calls = []
write = extraction._write_progress
def killed_on_third(*args, **kwargs):
    calls.append(1)
    if len(calls) == 3:     # rows of batch 3 are on disk, its progress record is not
        os.kill(os.getpid(), signal.SIGKILL)
    return write(*args, **kwargs)
extraction._write_progress = killed_on_third
sys.exit(extract.main(sys.argv[1:]))
"""


@pytest.mark.slow
def test_resume_after_kill_gives_the_same_file(tmp_path, capsys, ckpt):
    write_images(tmp_path / "img", 8, seed=3)
    common = ["--images", tmp_path / "img", "--netvladCkpt", ckpt, "--imageSize", SIZE_ARG, "--batchSize", "2",
              "--threads", "1", "--nocuda", "--quiet"]
    out = tmp_path / "run" / "route.npy"
    proc = subprocess.run([sys.executable, "-c", KILLER.format(root=str(ROOT)), *map(str, common), "--out", str(out)],
                          capture_output=True, text=True, timeout=300, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == -9, proc.stderr
    assert not out.exists()
    _, partial, progress = extraction.side_files(out)
    assert partial.stat().st_size == 6 * P * 4                       # 3 batches written, 2 recorded
    assert '"rows_done": 4' in progress.read_text()
    rc, printed, _ = run_cli(capsys, *common, "--out", out)
    assert rc == 0 and "continuing after 4 done before" in printed
    assert not partial.exists() and not progress.exists()
    reference = tmp_path / "ref" / "route.npy"
    assert run_cli(capsys, *common, "--out", reference)[0] == 0
    assert out.read_bytes() == reference.read_bytes()
    assert np.load(out).shape == (8, P)


def test_progress_of_another_run_is_not_reused(tmp_path, ckpt, model):
    paths = write_images(tmp_path / "img", 4)
    out = tmp_path / "o.npy"
    kwargs = {"checkpoint_id": "a",
              "settings": extraction.ExtractSettings(SIZE, batch_size=2, threads=0)}

    def stop_after_first(done: int) -> None:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        extraction.extract_descriptors(model, paths, out, on_batch=stop_after_first, **kwargs)
    _, partial, progress = extraction.side_files(out)
    partial.write_bytes(b"\0" * partial.stat().st_size)           # rows that a resume would keep
    kwargs["checkpoint_id"] = "b"                                  # ... but the checkpoint differs
    result = extraction.extract_descriptors(model, paths, out, **kwargs)
    assert result.resumed_from == 0 and np.all(np.linalg.norm(np.load(out), axis=1) > 0.99)


@pytest.mark.slow
def test_truncated_image_stops_naming_it(tmp_path, capsys, ckpt):
    paths = write_images(tmp_path / "img", 5)
    data = paths[3].read_bytes()
    paths[3].write_bytes(data[: len(data) // 2])
    args = ["--images", tmp_path / "img", "--netvladCkpt", ckpt, "--out", tmp_path / "o.npy", "--imageSize",
            SIZE_ARG, "--batchSize", "2", "--threads", "1", "--nocuda", "--quiet"]
    rc, _, err = run_cli(capsys, *args)
    line = one_error_line(err)
    assert rc == 1 and "frame_3.jpg" in line and "row 3" in line and "truncated" in line
    assert not (tmp_path / "o.npy").exists()
    paths[3].write_bytes(data)                                      # fixed: the run continues after row 2
    rc, out, _ = run_cli(capsys, *args)
    assert rc == 0 and "continuing after 2 done before" in out
    (tmp_path / "img" / "frame_9.png").write_bytes(b"\x89PNG not really")
    rc, _, err = run_cli(capsys, *args)
    assert rc == 1 and "frame_9.png" in one_error_line(err)


# ---------------------------------------------------------------- the authors' extraction as an oracle

PHOTO_SIZE = (160, 120)


def photographs() -> list[Path]:
    """Real photographs that required packages ship: scikit-learn's china.jpg and flower.jpg
    (640x427) and matplotlib's grace_hopper.jpg (512x600)."""
    import matplotlib
    import sklearn.datasets

    images = Path(sklearn.datasets.__file__).parent / "images"
    paths = [images / "china.jpg", images / "flower.jpg",
             Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg"]
    missing = [str(p) for p in paths if not p.is_file()]
    assert not missing, f"sample photographs missing from the installed packages: {missing}"
    return paths


def photo_list(folder: Path) -> Path:
    """A list file naming ``photographs()`` in order."""
    folder.mkdir(parents=True, exist_ok=True)
    listing = folder / "photos.txt"
    listing.write_text("".join(f"{p}\n" for p in photographs()))
    return listing


def min_cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.min(np.sum(a * b, axis=1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)))


def vgg16_to_conv5_3_by_hand() -> torch.nn.Sequential:
    """VGG16 (configuration D of Simonyan and Zisserman) up to conv5_3, without its ReLU."""
    from torch import nn

    layers, c_in = [], 3
    for v in (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512):
        if v == "M":
            layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
        else:
            layers += [nn.Conv2d(c_in, v, kernel_size=3, padding=1), nn.ReLU(inplace=True)]
            c_in = v
    return nn.Sequential(*layers[:-1])


def test_netvlad_on_photographs_equals_an_independent_definition(tmp_path, capsys, ckpt, state):
    """Through the command line, on real photographs: VGG16 written by hand + NetVLAD one location
    at a time + WPCA, on images resized with Pillow and normalised by hand."""
    encoder = vgg16_to_conv5_3_by_hand().eval()
    encoder.load_state_dict({k.removeprefix("encoder."): v for k, v in state.items() if k.startswith("encoder.")})
    w = state["WPCA.0.weight"][:, :, 0, 0].double().numpy()
    want = []
    for path in photographs():
        pixels = np.asarray(Image.open(path).convert("RGB").resize(PHOTO_SIZE, Image.BILINEAR), np.float32) / 255
        x = torch.from_numpy(((pixels - [0.485, 0.456, 0.406]) / [0.229, 0.224, 0.225]).astype(np.float32))
        with torch.no_grad():
            feats = encoder(x.permute(2, 0, 1)[None])[0].numpy()
        vlad = netvlad_loop(feats, state["pool.conv.weight"][:, :, 0, 0].numpy(), None, state["pool.centroids"].numpy())
        row = w @ vlad + state["WPCA.0.bias"].double().numpy()
        want.append(row / np.linalg.norm(row))
    rc, _, err = run_cli(capsys, "--images", photo_list(tmp_path), "--netvladCkpt", ckpt, "--out", tmp_path / "o.npy",
                         "--imageSize", "160,120", "--threads", "0", "--nocuda", "--quiet")
    assert rc == 0, err
    cosine = min_cosine(np.load(tmp_path / "o.npy"), np.stack(want))
    print(f"netvlad: minimum cosine to the independent definition on photographs: {cosine:.8f}")
    assert cosine >= 0.9999


def _patchnetvlad_script() -> Path | None:
    """Patch-NetVLAD's installed ``feature_extract.py`` (a script of the package: in the
    environment's ``bin``, or in ``bin`` beside the package for a ``pip install --target``), or None."""
    try:
        dist = importlib.metadata.distribution("patchnetvlad")
    except importlib.metadata.PackageNotFoundError:
        return None
    candidates = [Path(dist.locate_file(f)) for f in dist.files or [] if f.name == "feature_extract.py"]
    candidates += [Path(dist.locate_file("")) / "bin" / "feature_extract.py",
                   Path(sys.prefix) / "bin" / "feature_extract.py"]
    return next((p.resolve() for p in candidates if p.is_file()), None)


def test_agrees_with_patchnetvlad_feature_extract(tmp_path, monkeypatch, capsys, ckpt):
    """Patch-NetVLAD's own ``feature_extract.py`` (torchvision's VGG16 and transforms) on the same
    photographs and checkpoint gives the same descriptors."""
    import torchvision

    script = _patchnetvlad_script()
    if importlib.util.find_spec("patchnetvlad") is None or script is None:
        pytest.skip("patchnetvlad is not installed (pip install --no-deps patchnetvlad)")
    vgg16 = torchvision.models.vgg16            # Patch-NetVLAD asks for ImageNet weights: none are downloaded,
    monkeypatch.setattr(torchvision.models, "vgg16", lambda *a, **k: vgg16(weights=None))   # the checkpoint fills it
    listing = photo_list(tmp_path)
    before = set(sys.modules)
    try:
        spec = importlib.util.spec_from_file_location("pnv_feature_extract", script)
        fe = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(fe)
        config = configparser.ConfigParser()
        config.read_dict({"feature_extract": {"cacheBatchSize": "3", "imageresizeW": str(PHOTO_SIZE[0]),
                                              "imageresizeH": str(PHOTO_SIZE[1])},
                          "global_params": {"pooling": "netvlad", "num_pcs": str(P), "num_clusters": str(K),
                                            "vladv2": "false", "threads": "0", "nGPU": "1"}})
        dataset = fe.PlaceDataset(None, str(listing), "", None, config["feature_extract"])
        enc_dim, encoder = fe.get_backend()
        net = fe.get_model(encoder, enc_dim, config["global_params"], append_pca_layer=True)
        net.load_state_dict(torch.load(ckpt, weights_only=False)["state_dict"])    # strict: same keys
        opt = types.SimpleNamespace(output_features_dir=str(tmp_path / "pnv"), nocuda=True)
        fe.feature_extract(dataset, net, torch.device("cpu"), opt, config)
        theirs = np.load(tmp_path / "pnv" / "globalfeats.npy")
    finally:
        for name in set(sys.modules) - before:
            sys.modules.pop(name, None)
    capsys.readouterr()
    rc, _, err = run_cli(capsys, "--images", listing, "--netvladCkpt", ckpt, "--out", tmp_path / "ours.npy",
                         "--imageSize", ",".join(map(str, PHOTO_SIZE)), "--threads", "0", "--nocuda", "--quiet")
    assert rc == 0, err
    cosine = min_cosine(np.load(tmp_path / "ours.npy"), theirs)
    print(f"minimum cosine to patchnetvlad: {cosine:.8f}")
    assert cosine >= 0.9999


# ---------------------------------------------------------------- images -> prepare -> train -> test

def render_route(folder: Path, xs: np.ndarray, skyline: np.ndarray, shift: float, gain: float, seed: int) -> None:
    """One 64x48 picture per position: the stretch of a coloured 'skyline' in front of the
    camera (nearby positions see overlapping stretches), under a lighting ``gain`` and noise."""
    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    rows = np.arange(48)[:, None]
    for i, x in enumerate(xs):
        cols = np.clip(((x + shift) * 4 + np.arange(64) * 0.5).astype(int), 0, len(skyline) - 1)
        height, colour = skyline[cols, 0], skyline[cols, 1:]
        building = rows >= 48 - height[None, :]
        image = np.where(building[:, :, None], colour[None, :, :], np.array([150.0, 180, 220]))
        image = np.clip(image * gain + rng.normal(0, 6, image.shape), 0, 255).astype(np.uint8)
        Image.fromarray(image).save(folder / f"img_{i}.png")


def route_checkpoint(name: str, folder: Path, netvlad_ckpt: Path) -> tuple[list[str], int]:
    """The model options of ``name`` for the 64x48 route images (a random checkpoint in the authors'
    format) and its descriptor size."""
    if name == "netvlad":
        return ["--netvladCkpt", str(netvlad_ckpt)], P
    from test_image_models import write_checkpoint

    path, dim = write_checkpoint(name, folder)
    return ["--model", name, "--weights", str(path)], dim


@pytest.mark.slow
@pytest.mark.parametrize("name", registry.MODELS)
def test_images_to_prepare_train_test(tmp_path, capsys, ckpt, name, monkeypatch):
    """For each model: extract (database) -> prepare extracting the queries itself -> train -> test."""
    import main

    n = 48
    rng = np.random.default_rng(0)
    blocks = np.repeat(rng.uniform(0, 1, (n * 2 + 40, 4)), 6, axis=0)
    skyline = np.column_stack([8 + blocks[:, 0] * 36, blocks[:, 1:] * 255])
    xs = np.arange(n) * 2.0
    render_route(tmp_path / "db", xs, skyline, 0.0, 1.0, seed=1)
    render_route(tmp_path / "q", xs, skyline, 0.6, 0.8, seed=2)
    for side in ("db", "q"):
        (tmp_path / f"{side}.csv").write_text("x,y\n" + "".join(f"{x + (0.6 if side == 'q' else 0)},0\n" for x in xs))
    model_args, dim = route_checkpoint(name, tmp_path / "ckpt", ckpt)
    size = [] if name == "cosplace" else ["--imageSize", SIZE_ARG]        # CosPlace: each image at its own size
    size = ["--imageSize", "70,56"] if name in ("boq", "salad", "megaloc") else size  # DINOv2: 14-pixel patches
    rc = main.main(["--mode", "extract", "--images", str(tmp_path / "db"), *model_args, "--out",
                    str(tmp_path / "db.npy"), *size, "--threads", "0", "--nocuda", "--quiet"])
    assert rc == 0, capsys.readouterr().err
    monkeypatch.chdir(tmp_path)
    queries = ["--q_images", "q", *model_args, *size]
    rc = main.main(["--mode", "prepare", "--name", "route", "--db_descriptors", "db.npy", "--db_positions", "db.csv",
                    *queries, "--q_positions", "q.csv", "--seqL", "3",
                    "--train_rows", "0:28,0:28", "--val_rows", "30:36,30:36", "--test_rows", "38:48,38:48",
                    "--posDistThr", "6", "--evalPosDistThr", "4", "--nonTrivPosDistThr", "3"])
    out, err = capsys.readouterr()
    assert rc == 0, err
    db = np.load(tmp_path / "db.npy")
    extracted = tmp_path / "structFiles" / "custom_route_descriptors" / "query.npy"
    query = np.load(extracted)
    assert query.shape == (n, dim) and db.shape == (n, dim)
    nearest = np.argmax(query @ db.T, axis=1)       # rows in image order: nearby places come out alike
    print(f"{name}: {np.mean(np.abs(xs[nearest] - xs - 0.6) <= 4):.2f} of the queries nearest a close database image")
    common = ["--dataset", "custom:route", "--seqL", "3", "--pooling", "--outDims", "8", "--nocuda",
              "--threads", "0", "--quiet"]
    assert main.main(["--mode", "train", "--nEpochs", "1", *common]) == 0
    (run,) = (tmp_path / "data" / "runs").iterdir()
    capsys.readouterr()
    assert main.main(["--mode", "test", "--split", "test", "--resume", str(run), "--resultsPath", "results",
                      *common]) == 0
    assert "R@1" in capsys.readouterr().out and (tmp_path / "results" / "results.npz").is_file()
    if name == "netvlad":
        assert np.mean(np.abs(xs[nearest] - xs - 0.6) <= 4) >= 0.3       # chance: about 0.1
        rc = main.main(["--mode", "prepare", "--name", "raw", "--db_images", "db", "--q_images", "q", "--db_positions",
                        "db.csv", "--q_positions", "q.csv", "--seqL", "3", "--posDistThr", "6"])
        assert rc == 2 and "--netvladCkpt" in one_error_line(capsys.readouterr().err)
        rc = main.main(["--mode", "prepare", "--name", "mixed", "--db_descriptors", "db.npy", "--db_positions",
                        "db.csv", "--q_images", "q", "--netvladCkpt", str(ckpt), "--q_positions", "q.csv"])
        assert rc == 1 and "different image sizes" in one_error_line(capsys.readouterr().err)


@pytest.mark.parametrize("args, needle", [
    (["--db_descriptors", "d.npy", "--db_images", "db", "--q_descriptors", "q.npy"],
     "exactly one of --db_descriptors, --db_images and --db_bag"),
    (["--db_descriptors", "d.npy"], "exactly one of --q_descriptors, --q_images and --q_bag (the traversal needs"),
    (["--db_descriptors", "d.npy", "--q_images", "q"], "--db_images/--q_images need --model and --weights (or "
                                                       "--netvladCkpt)"),
    (["--db_descriptors", "d.npy", "--q_images", "q", "--weights", "w.pth"], "need --model and --weights"),
    (["--db_descriptors", "d.npy", "--q_images", "q", "--model", "mixvpr", "--netvladCkpt", "c.pth"],
     "--netvladCkpt is NetVLAD's checkpoint"),
    (["--db_descriptors", "d.npy", "--q_images", "q", "--netvladCkpt", "c.pth", "--imageSize", "12"], "--imageSize"),
    (["--db_descriptors", "d.npy", "--q_descriptors", "q.npy", "--netvladCkpt", "c.pth"],
     "--netvladCkpt is only used with"),
    (["--db_descriptors", "d.npy", "--q_descriptors", "q.npy", "--imageSize", "64,48"], "--imageSize is only used"),
    (["--db_descriptors", "d.npy", "--q_images", "q", "--model", "vlad", "--weights", "w.pth"], "--model"),
])
def test_prepare_images_options(capsys, args, needle):
    from seqmatchnet.cli import prepare

    rc = prepare.main(["--name", "r", "--db_positions", "db.csv", "--q_positions", "q.csv", *args])
    assert rc == 2 and needle in one_error_line(capsys.readouterr().err)


def test_prepare_checks_image_count_before_extracting(tmp_path, capsys, ckpt):
    from seqmatchnet.cli import prepare

    write_images(tmp_path / "q", 3)
    (tmp_path / "q.csv").write_text("x,y\n0,0\n2,0\n")
    np.save(tmp_path / "db.npy", np.ones((2, P), np.float32))
    (tmp_path / "db.csv").write_text("x,y\n0,0\n2,0\n")
    rc = prepare.main(["--name", "r", "--db_descriptors", str(tmp_path / "db.npy"), "--db_positions",
                              str(tmp_path / "db.csv"), "--q_images", str(tmp_path / "q"), "--q_positions",
                              str(tmp_path / "q.csv"), "--netvladCkpt", str(ckpt), "--structPath", str(tmp_path / "s")])
    line = one_error_line(capsys.readouterr().err)
    assert rc == 1 and "has 3 images but" in line and "2 positions" in line
    assert not (tmp_path / "s").exists()
