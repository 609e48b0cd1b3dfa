"""BoQ, SALAD and MegaLoc (``seqmatchnet/images/{dinov2,boq,salad}.py``) against independent
definitions transcribed from their authors' code (``tests/dinov2_reference.py``), on real
photographs, with random weights moved off their defaults, written in each authors' checkpoint
format; and mutants (the position-embedding interpolation, the final-norm choice, the input size)
that the comparison catches.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from timm.layers import resample_abs_pos_embed

import dinov2_reference as ref
from seqmatchnet.common.errors import UserError
from seqmatchnet.images import dinov2, extraction, registry
from test_extract import one_error_line, photo_list, photographs, run_cli

TOLERANCE = 1e-4           # largest absolute difference per element of unit-length descriptors
SMALL_VIT = {"embed_dim": 128, "depth": 2}


def build_boq_dino() -> torch.nn.Module:
    return ref.BoQVPRModel(ref.BoQDinoBackbone(**SMALL_VIT),
                           ref.BoQ(in_channels=128, proj_channels=128, num_queries=16, num_layers=2, row_dim=4))


def build_boq_resnet() -> torch.nn.Module:
    return ref.BoQVPRModel(ref.BoQResNetBackbone(),
                           ref.BoQ(in_channels=1024, proj_channels=128, num_queries=16, num_layers=2, row_dim=4))


def build_salad() -> torch.nn.Module:
    return ref.SaladVPRModel(ref.SaladDino(**SMALL_VIT),
                             ref.SALAD(num_channels=128, num_clusters=16, cluster_dim=32, token_dim=64, mlp_dim=128))


def build_megaloc(old: bool = False) -> torch.nn.Module:
    return ref.MegaLoc(feat_dim=256, num_clusters=16, cluster_dim=32, token_dim=64, mlp_dim=128, old=old,
                       **SMALL_VIT)


# name: (model, reference builder, reference transform, file name)
CASES = {
    "boq-dinov2": ("boq", build_boq_dino, lambda: ref.boq_transform((322, 322)), "dinov2_12288.pth"),
    "boq-resnet50": ("boq", build_boq_resnet, lambda: ref.boq_transform((384, 384)), "resnet50_16384.pth"),
    "salad": ("salad", build_salad, lambda: ref.salad_transform((322, 322)), "dino_salad.ckpt"),
    "megaloc": ("megaloc", build_megaloc, ref.megaloc_transform, "model.safetensors"),
    "megaloc-old": ("megaloc", lambda: build_megaloc(old=True), ref.megaloc_transform, "megaloc.torch"),
}


def save_authors_format(model: torch.nn.Module, path) -> None:
    """The state dict as the authors release it: safetensors for MegaLoc's ``model.safetensors``,
    else ``torch.save`` of the bare state dict."""
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    if str(path).endswith(".safetensors"):
        from safetensors.torch import save_file

        save_file(state, str(path))
    else:
        torch.save(state, path)


@torch.no_grad()
def reference_descriptors(model: torch.nn.Module, transform) -> np.ndarray:
    rows = []
    for path in photographs():
        with Image.open(path) as image:
            out = model(transform(image.convert("RGB"))[None])
        rows.append((out[0] if isinstance(out, tuple) else out)[0].numpy())
    return np.stack(rows)


@torch.no_grad()
def our_descriptors(loaded, size="default", resize=None) -> np.ndarray:
    size = loaded.default_size if size == "default" else size
    rows = []
    for path in photographs():
        with Image.open(path) as image:
            x = extraction.preprocess(image, size, loaded.mean, loaded.std, resize or loaded.resize)
        rows.append(loaded.network(x[None])[0].numpy())
    return np.stack(rows)


@pytest.fixture(scope="module", params=list(CASES))
def case(request, tmp_path_factory):
    """(name, our loaded model, the reference's descriptors)."""
    name, build, transform, filename = CASES[request.param]
    torch.manual_seed(0)
    model = ref.perturb(build(), seed=1)
    path = tmp_path_factory.mktemp(request.param) / filename
    save_authors_format(model, path)
    expected = reference_descriptors(model, transform())
    return request.param, registry.load_model(name, path), expected, path


def largest_difference(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).max())


def test_equals_the_authors_network_on_photographs(case):
    label, loaded, expected, _ = case
    ours = our_descriptors(loaded)
    assert ours.shape == expected.shape == (3, loaded.dim)
    np.testing.assert_allclose(np.linalg.norm(ours, axis=1), 1.0, atol=1e-5)
    # the photographs give clearly different descriptors: the comparison is not of constants
    assert largest_difference(expected[0], expected[2]) > 50 * TOLERANCE
    print(f"{label}: largest difference per element {largest_difference(ours, expected):.1e}")
    assert largest_difference(ours, expected) <= TOLERANCE, label


def test_timm_position_interpolation_is_caught(case, monkeypatch):
    label, loaded, expected, _ = case
    if label == "boq-resnet50":
        pytest.skip("no ViT")

    def timm_resample(pos_embed, height, width):
        return resample_abs_pos_embed(pos_embed, new_size=(height // 14, width // 14), num_prefix_tokens=1)

    monkeypatch.setattr(dinov2, "hub_pos_embed", timm_resample)
    print(f"{label}, timm's interpolation: {largest_difference(our_descriptors(loaded), expected):.3f}")
    assert largest_difference(our_descriptors(loaded), expected) > 10 * TOLERANCE


def test_final_norm_choice_is_caught(case):
    label, loaded, expected, _ = case
    if label == "boq-resnet50":
        pytest.skip("no ViT")
    vit = loaded.network.backbone
    vit = vit.dino if hasattr(vit, "dino") else vit
    vit.final_norm = not vit.final_norm
    try:
        print(f"{label}, final norm flipped: {largest_difference(our_descriptors(loaded), expected):.3f}")
        assert largest_difference(our_descriptors(loaded), expected) > 10 * TOLERANCE
    finally:
        vit.final_norm = not vit.final_norm


def test_input_size_and_resize_are_caught(case):
    label, loaded, expected, _ = case
    if loaded.default_size:
        other = tuple(s + 14 for s in loaded.default_size)
        assert largest_difference(our_descriptors(loaded, size=other), expected) > 10 * TOLERANCE
        flip = "bilinear" if loaded.resize == "bicubic" else "bicubic"
        assert largest_difference(our_descriptors(loaded, resize=flip), expected) > 10 * TOLERANCE
    else:   # MegaLoc: each image at its own size; the network resizes to multiples of 14
        assert largest_difference(our_descriptors(loaded, size=(322, 322)), expected) > 10 * TOLERANCE
        with Image.open(photographs()[0]) as image:
            w, h = image.size
        size = (round(w / 14) * 14, round(h / 14) * 14)     # with Pillow instead of in the network
        assert largest_difference(our_descriptors(loaded, size=size)[:2], expected[:2]) > TOLERANCE


def test_extract_cli_gives_the_same_descriptors(case, tmp_path, capsys):
    label, loaded, expected, path = case
    if label not in ("boq-dinov2", "megaloc"):
        pytest.skip("one run per checkpoint format is enough")
    listing = photo_list(tmp_path)
    out = tmp_path / "d.npy"
    rc, printed, err = run_cli(capsys, "--images", listing, "--model", loaded.name, "--weights", path,
                               "--out", out, "--threads", "0", "--batchSize", "2", "--quiet")
    assert rc == 0, err
    assert largest_difference(np.load(out), expected) <= TOLERANCE
    meta = extraction.read_metadata(out)
    assert meta["model"] == loaded.name and meta["dim"] == loaded.dim
    assert meta["weights_sha256"] == extraction.file_digest(path)


# ---------------------------------------------------------------- released layouts


def zeros_like_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The state dict's names and shapes with zero-memory values (an expanded scalar)."""
    return {k: torch.zeros((), dtype=v.dtype).expand(v.shape) for k, v in model.state_dict().items()}


RELEASED = {
    "dinov2_12288.pth": ("boq", lambda: ref.BoQVPRModel(ref.BoQDinoBackbone(), ref.BoQ(768, 384, 64, 2, 32)),
                         12288, "DINOv2 ViT-B/14", (322, 322)),
    "resnet50_16384.pth": ("boq", lambda: ref.BoQVPRModel(ref.BoQResNetBackbone(), ref.BoQ(1024, 512, 64, 2, 32)),
                           16384, "ResNet-50 to layer3", (384, 384)),
    "dino_salad.ckpt": ("salad", lambda: ref.SaladVPRModel(ref.SaladDino(), ref.SALAD(768, 64, 128, 256)),
                        8448, "DINOv2 ViT-B/14", (322, 322)),
    "model.safetensors": ("megaloc", lambda: ref.MegaLoc(), 8448, "DINOv2 ViT-B/14", None),
    "megaloc.torch": ("megaloc", lambda: ref.MegaLoc(old=True), 8448, "DINOv2 ViT-B/14", None),
}


@pytest.mark.parametrize("release", list(RELEASED))
def test_released_layouts_load_at_full_size(release):
    name, build, dim, trunk, size = RELEASED[release]
    with torch.device("meta"):
        model = build()
    loaded = registry.model_from_state(name, zeros_like_state(model), release)
    assert loaded.dim == dim and loaded.architecture.startswith(trunk)
    assert loaded.default_size == size


def test_a_checkpoint_of_another_model_is_one_line(tmp_path, capsys):
    torch.manual_seed(0)
    path = tmp_path / "dino_salad.ckpt"
    save_authors_format(build_salad(), path)
    rc, _, err = run_cli(capsys, "--images", photo_list(tmp_path), "--model", "boq", "--weights", path,
                         "--out", tmp_path / "d.npy")
    line = one_error_line(err)
    assert rc != 0 and "not a BoQ checkpoint" in line and "--model salad" in line
    with pytest.raises(UserError, match="not a MegaLoc checkpoint"):
        registry.load_model("megaloc", path)


def test_a_pickled_object_is_refused_in_one_line(tmp_path, capsys):
    path = tmp_path / "model.pth"
    torch.save({"state_dict": build_salad().state_dict(), "config": argparse_namespace()}, path)
    rc, _, err = run_cli(capsys, "--images", photo_list(tmp_path), "--model", "salad", "--weights", path,
                         "--out", tmp_path / "d.npy")
    assert rc != 0 and "weights-only" in one_error_line(err)


def argparse_namespace():
    import argparse

    return argparse.Namespace(lr=0.1)


def test_images_with_fewer_patches_than_clusters_are_one_line(tmp_path, capsys):
    torch.manual_seed(0)
    path = tmp_path / "model.safetensors"
    save_authors_format(build_megaloc(), path)           # 16 clusters; 64x48 -> 70x42: 15 patches
    rc, _, err = run_cli(capsys, "--images", photo_list(tmp_path), "--model", "megaloc", "--weights", path,
                         "--imageSize", "64,48", "--out", tmp_path / "d.npy", "--threads", "0")
    assert rc == 1 and "15 patches" in one_error_line(err) and "16 clusters" in err


def test_image_size_must_be_a_multiple_of_14(tmp_path):
    torch.manual_seed(0)
    path = tmp_path / "dino_salad.ckpt"
    save_authors_format(build_salad(), path)
    loaded = registry.load_model("salad", path)
    with pytest.raises(UserError, match="multiples of 14.*--imageSize 322,322"):
        loaded.check_size((320, 320))
    loaded.check_size((644, 420))
