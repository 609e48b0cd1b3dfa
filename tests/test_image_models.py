"""CosPlace, EigenPlaces and MixVPR in ``--mode extract``: checkpoints in the authors' own format,
made here from definitions written after their released code (``GeoLocalizationNet``; MixVPR's
``VPRModel`` with its ResNet wrapper and aggregator), with GeM ``p``, batch-norm statistics and
layer norms moved off their defaults, give the same descriptors as those definitions on real
photographs, through the command line. Also: the architecture read from the keys and shapes,
one-line errors for checkpoints that fit no model, the metadata file and prepare's refusal of
traversals extracted with different models."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision
from PIL import Image
from torch import nn

from seqmatchnet.common.errors import UserError
from seqmatchnet.images import cosplace, extraction, mixvpr, registry
from test_extract import min_cosine, one_error_line, photo_list, photographs, run_cli

# ---------------------------------------------------------------- the authors' definitions


class RefGeM(nn.Module):
    """CosPlace ``layers.GeM``: avg_pool2d(clamp(x, eps)^p)^(1/p) with a learned p."""

    def __init__(self, p: float = 3, eps: float = 1e-6) -> None:
        super().__init__()
        self.p = nn.Parameter(torch.ones(1) * p)
        self.eps = eps

    def forward(self, x):
        return F.avg_pool2d(x.clamp(min=self.eps).pow(self.p), (x.size(-2), x.size(-1))).pow(1.0 / self.p)


class RefL2Norm(nn.Module):
    def forward(self, x):
        return F.normalize(x, p=2.0, dim=1)


class RefFlatten(nn.Module):
    def forward(self, x):
        assert x.shape[2] == x.shape[3] == 1
        return x[:, :, 0, 0]


class RefGeoLocalizationNet(nn.Module):
    """CosPlace's / EigenPlaces' ``GeoLocalizationNet(backbone, fc_output_dim)``."""

    CHANNELS = {"ResNet18": 512, "ResNet50": 2048, "ResNet101": 2048, "ResNet152": 2048, "VGG16": 512}

    def __init__(self, backbone: str, fc_output_dim: int) -> None:
        super().__init__()
        net = getattr(torchvision.models, backbone.lower())(weights=None)
        layers = list(net.children())[:-2] if backbone.startswith("ResNet") else list(net.features.children())[:-2]
        self.backbone = nn.Sequential(*layers)
        self.aggregation = nn.Sequential(RefL2Norm(), RefGeM(), RefFlatten(),
                                         nn.Linear(self.CHANNELS[backbone], fc_output_dim), RefL2Norm())

    def forward(self, x):
        return self.aggregation(self.backbone(x))


class RefResNet(nn.Module):
    """MixVPR ``models/backbones/resnet.ResNet`` (not pretrained), ``layers_to_crop`` removed."""

    def __init__(self, model_name: str = "resnet50", layers_to_crop: tuple = ()) -> None:
        super().__init__()
        self.model = getattr(torchvision.models, model_name)(weights=None)
        self.model.avgpool = None
        self.model.fc = None
        if 4 in layers_to_crop:
            self.model.layer4 = None
        if 3 in layers_to_crop:
            self.model.layer3 = None

    def forward(self, x):
        m = self.model
        x = m.layer2(m.layer1(m.maxpool(m.relu(m.bn1(m.conv1(x))))))
        if m.layer3 is not None:
            x = m.layer3(x)
        if m.layer4 is not None:
            x = m.layer4(x)
        return x


class RefFeatureMixerLayer(nn.Module):
    def __init__(self, in_dim: int, mlp_ratio: float = 1) -> None:
        super().__init__()
        self.mix = nn.Sequential(nn.LayerNorm(in_dim), nn.Linear(in_dim, int(in_dim * mlp_ratio)), nn.ReLU(),
                                 nn.Linear(int(in_dim * mlp_ratio), in_dim))

    def forward(self, x):
        return x + self.mix(x)


class RefMixVPR(nn.Module):
    """MixVPR ``models/aggregators/mixvpr.MixVPR``."""

    def __init__(self, in_channels=1024, in_h=20, in_w=20, out_channels=512, mix_depth=1, mlp_ratio=1, out_rows=4):
        super().__init__()
        hw = in_h * in_w
        self.mix = nn.Sequential(*[RefFeatureMixerLayer(hw, mlp_ratio) for _ in range(mix_depth)])
        self.channel_proj = nn.Linear(in_channels, out_channels)
        self.row_proj = nn.Linear(hw, out_rows, bias=False)

    def forward(self, x):
        x = self.mix(x.flatten(2))
        x = self.channel_proj(x.permute(0, 2, 1)).permute(0, 2, 1)
        return F.normalize(self.row_proj(x).flatten(1), p=2, dim=-1)


class RefVPRModel(nn.Module):
    """MixVPR ``main.VPRModel``'s modules and forward (the Lightning training parts left out)."""

    def __init__(self, backbone_arch="resnet50", layers_to_crop=(4,), agg_config=None) -> None:
        super().__init__()
        self.backbone = RefResNet(backbone_arch, layers_to_crop)
        self.aggregator = RefMixVPR(**agg_config)

    def forward(self, x):
        return self.aggregator(self.backbone(x))


MIXVPR_RELEASED = {"in_channels": 1024, "in_h": 20, "in_w": 20, "out_channels": 1024, "mix_depth": 4,
                   "mlp_ratio": 1, "out_rows": 4}
MIXVPR_TINY = {"in_channels": 1024, "in_h": 3, "in_w": 4, "out_channels": 16, "mix_depth": 2, "mlp_ratio": 2,
               "out_rows": 2}     # 64x48 images


def moved_off_defaults(model: nn.Module, seed: int) -> nn.Module:
    """Batch-norm statistics and affine terms, layer norms and GeM's p away from their initial
    values (a trained network's are), then eval mode."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.copy_(torch.randn(m.num_features, generator=gen) * 0.2)
                m.running_var.copy_(torch.rand(m.num_features, generator=gen) * 1.5 + 0.5)
                m.weight.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
                m.bias.copy_(torch.randn(m.num_features, generator=gen) * 0.1)
                m.num_batches_tracked.fill_(1000)
            elif isinstance(m, nn.LayerNorm):
                m.weight.copy_(torch.rand(m.weight.shape, generator=gen) + 0.5)
                m.bias.copy_(torch.randn(m.bias.shape, generator=gen) * 0.1)
            elif isinstance(m, RefGeM):
                m.p.fill_(2.37)
    return model.eval()


def reference(name: str, variant: str, seed: int = 0) -> tuple[nn.Module, str]:
    """A randomly initialised network of the authors' definition and its released file name."""
    torch.manual_seed(seed)
    if name == "mixvpr":
        config = MIXVPR_RELEASED if variant == "released" else MIXVPR_TINY
        net = RefVPRModel("resnet50", (4,), config)
        dim = config["out_channels"] * config["out_rows"]
        return moved_off_defaults(net, seed), f"resnet50_MixVPR_{dim}_channels({config['out_channels']})_rows(" \
                                              f"{config['out_rows']}).ckpt"
    backbone, dim = variant.split("_")
    return moved_off_defaults(RefGeoLocalizationNet(backbone, int(dim)), seed), f"{backbone}_{dim}_{name}.pth"


ROUTE_VARIANTS = {"cosplace": "ResNet18_32", "eigenplaces": "VGG16_64", "mixvpr": "tiny"}


def write_checkpoint(name: str, folder, variant: str | None = None):
    """A random checkpoint of ``name`` saved as the authors release it (a bare state dict):
    ``(path, descriptor size)``."""
    if name in ("boq", "salad", "megaloc"):      # DINOv2 models: tests/test_dinov2_models.py
        from test_dinov2_models import CASES, save_authors_format

        _, build, _, file_name = CASES[{"boq": "boq-dinov2"}.get(name, name)]
        folder.mkdir(parents=True, exist_ok=True)
        torch.manual_seed(0)
        net = ref_perturb(build())
        save_authors_format(net, folder / file_name)
        return folder / file_name, registry.load_model(name, folder / file_name).dim
    net, file_name = reference(name, variant or ROUTE_VARIANTS[name])
    folder.mkdir(parents=True, exist_ok=True)
    torch.save(net.state_dict(), folder / file_name)
    if name == "mixvpr":
        return folder / file_name, net.aggregator.channel_proj.out_features * net.aggregator.row_proj.out_features
    return folder / file_name, net.aggregation[3].out_features


def ref_perturb(net: nn.Module) -> nn.Module:
    import dinov2_reference

    return dinov2_reference.perturb(net, seed=1)


def reference_descriptors(net: nn.Module, size: tuple[int, int] | None) -> np.ndarray:
    """``net`` on the photographs: RGB, Pillow bilinear resize to ``size`` (W, H) unless None,
    /255 and ImageNet mean/std by hand, one image at a time."""
    rows = []
    for path in photographs():
        image = Image.open(path).convert("RGB")
        image = image.resize(size, Image.BILINEAR) if size else image
        pixels = np.asarray(image, np.float32) / 255
        x = torch.from_numpy(((pixels - [0.485, 0.456, 0.406]) / [0.229, 0.224, 0.225]).astype(np.float32))
        with torch.no_grad():
            rows.append(net(x.permute(2, 0, 1)[None])[0].numpy())
    return np.stack(rows)


def compare_on_photographs(tmp_path, capsys, name: str, variant: str, size_arg: str | None, save=None) -> float:
    """Save the reference as a checkpoint, extract the photographs through the command line and
    return the minimum cosine to the reference's own descriptors."""
    net, file_name = reference(name, variant)
    path = tmp_path / file_name
    torch.save(save(net.state_dict()) if save else net.state_dict(), path)
    size_args = ["--imageSize", size_arg] if size_arg else []
    rc, printed, err = run_cli(capsys, "--images", photo_list(tmp_path), "--model", name, "--weights", path, "--out",
                               tmp_path / "o.npy", *size_args, "--threads", "0", "--nocuda", "--quiet")
    assert rc == 0, err
    ours = np.load(tmp_path / "o.npy")
    model_default = registry.load_model(name, path).default_size
    size = extraction.parse_image_size(size_arg) if size_arg else model_default
    cosine = min_cosine(ours, reference_descriptors(net, size))
    print(f"{name} {variant} at {size or 'full size'}: minimum cosine to the authors' definition {cosine:.8f}")
    return cosine


# ---------------------------------------------------------------- fidelity on photographs

def test_cosplace_resnet18_full_images(tmp_path, capsys):
    assert compare_on_photographs(tmp_path, capsys, "cosplace", "ResNet18_32", None) >= 0.9999


def test_eigenplaces_vgg16_resized(tmp_path, capsys):
    assert compare_on_photographs(tmp_path, capsys, "eigenplaces", "VGG16_64", "160,120") >= 0.9999


def test_mixvpr_small_aggregator(tmp_path, capsys):
    assert compare_on_photographs(tmp_path, capsys, "mixvpr", "tiny", "64,48") >= 0.9999


@pytest.mark.slow
@pytest.mark.parametrize("name", ["cosplace", "eigenplaces"])
def test_resnet50_2048_full_images(tmp_path, capsys, name):
    assert compare_on_photographs(tmp_path, capsys, name, "ResNet50_2048", None) >= 0.9999


@pytest.mark.slow
def test_mixvpr_released_layout_at_its_320x320_default(tmp_path, capsys):
    """The released layout (4096-D), saved as a Lightning checkpoint (``state_dict`` inside)."""
    cosine = compare_on_photographs(tmp_path, capsys, "mixvpr", "released", None,
                                    save=lambda sd: {"state_dict": sd, "epoch": 3, "global_step": 100})
    assert cosine >= 0.9999


# ---------------------------------------------------------------- architecture from the checkpoint

def meta_state(net_factory) -> dict:
    with torch.device("meta"):
        return net_factory().state_dict()


@pytest.mark.parametrize("backbone, channels", [("ResNet18", 512), ("ResNet50", 2048), ("ResNet101", 2048),
                                                ("ResNet152", 2048), ("VGG16", 512)])
def test_geolocalization_backbone_from_keys(backbone, channels):
    state = meta_state(lambda: RefGeoLocalizationNet(backbone, 96))
    got = cosplace.geolocalization_layout(state, "cosplace", "ckpt")
    assert got == (backbone.lower(), channels, 96)


@pytest.mark.parametrize("arch, crop, config", [
    ("resnet50", (4,), MIXVPR_RELEASED),
    ("resnet18", (4,), {**MIXVPR_TINY, "in_channels": 256, "mix_depth": 3}),
    ("resnet101", (4,), {**MIXVPR_TINY, "mlp_ratio": 0.5}),
    ("resnet50", (), {**MIXVPR_TINY, "in_channels": 2048}),
])
def test_mixvpr_settings_from_shapes(arch, crop, config):
    state = meta_state(lambda: RefVPRModel(arch, crop, config))
    name, layers, agg = mixvpr.mixvpr_layout(state, "ckpt")
    hw = config["in_h"] * config["in_w"]
    assert (name, layers) == (arch, 3 if 4 in crop else 4)
    assert agg == {"in_channels": config["in_channels"], "cells": hw, "out_channels": config["out_channels"],
                   "depth": config["mix_depth"], "hidden": int(hw * config["mlp_ratio"]), "rows": config["out_rows"]}


def test_released_mixvpr_defaults_to_320x320():
    net, _ = reference("mixvpr", "released")
    model = registry.model_from_state("mixvpr", net.state_dict())
    assert model.default_size == (320, 320) and model.dim == 4096
    assert "mix_depth 4" in model.architecture and "ResNet-50 to layer3" in model.architecture


# ---------------------------------------------------------------- errors

def test_checkpoint_of_another_model_is_one_line(tmp_path, capsys):
    path, _ = write_checkpoint("cosplace", tmp_path)
    common = ["--images", photo_list(tmp_path), "--out", tmp_path / "o.npy", "--threads", "0", "--nocuda"]
    rc, _, err = run_cli(capsys, *common, "--model", "mixvpr", "--weights", path)
    line = one_error_line(err)
    assert rc == 1 and "not a MixVPR checkpoint" in line and "backbone.* (" in line and "--model cosplace" in line
    rc, _, err = run_cli(capsys, *common, "--netvladCkpt", path)
    assert rc == 1 and "'pool.centroids' is missing" in one_error_line(err)
    torch.save({"foo.weight": torch.zeros(3, 2)}, tmp_path / "odd.pth")
    rc, _, err = run_cli(capsys, *common, "--model", "eigenplaces", "--weights", tmp_path / "odd.pth")
    assert rc == 1 and "found 1 keys: foo.* (1)" in one_error_line(err)


def test_wrong_shape_or_missing_key_named():
    net, _ = reference("cosplace", "ResNet18_32")
    state = net.state_dict()
    bad = {**state, "aggregation.3.weight": torch.zeros(32, 256)}
    with pytest.raises(UserError, match=r"'aggregation.3.weight' has shape \[32, 256\], expected "
                                                     r"\[32, 512\]"):
        registry.model_from_state("cosplace", bad)
    missing = {k: v for k, v in state.items() if k != "backbone.5.1.bn2.running_var"}
    with pytest.raises(UserError, match="'backbone.5.1.bn2.running_var' .* is missing"):
        registry.model_from_state("cosplace", missing)
    no_counts = {k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}
    assert registry.model_from_state("cosplace", no_counts).dim == 32        # not needed in eval mode


def test_mixvpr_image_size_must_fit_its_aggregator(tmp_path, capsys):
    path, _ = write_checkpoint("mixvpr", tmp_path)           # 3 x 4 cells: 64x48 images
    common = ["--images", photo_list(tmp_path), "--model", "mixvpr", "--weights", path, "--out", tmp_path / "o.npy"]
    rc, _, err = run_cli(capsys, *common)
    assert rc == 1 and "MixVPR needs a fixed --imageSize" in one_error_line(err)
    rc, _, err = run_cli(capsys, *common, "--imageSize", "320,320")
    assert rc == 1 and "gives 400 feature cells but this MixVPR checkpoint mixes 12" in one_error_line(err)


@pytest.mark.parametrize("args, needle", [
    (["--weights", "w.pth"], "--weights needs --model"),
    (["--model", "cosplace", "--netvladCkpt", "c.pth"], "--netvladCkpt is NetVLAD's checkpoint"),
    (["--netvladCkpt", "c.pth", "--weights", "w.pth"], "give the checkpoint once"),
    (["--model", "cosplace"], "give the checkpoint"),
    (["--model", "dino", "--weights", "w.pth"], "--model"),
])
def test_model_options_are_one_line(tmp_path, capsys, args, needle):
    rc, _, err = run_cli(capsys, "--images", tmp_path, "--out", tmp_path / "o.npy", *args)
    assert rc == 2 and needle in one_error_line(err)


# ---------------------------------------------------------------- metadata and prepare

def test_metadata_names_model_checkpoint_and_preprocessing(tmp_path, capsys):
    path, dim = write_checkpoint("cosplace", tmp_path)
    rc, printed, err = run_cli(capsys, "--images", photo_list(tmp_path), "--model", "cosplace", "--weights", path,
                               "--out", tmp_path / "o.h5", "--imageSize", "96,64", "--threads", "0", "--quiet")
    assert rc == 0 and "CosPlace descriptors" in printed, err
    meta = json.loads((tmp_path / "o.h5.model.json").read_text())
    assert meta["model"] == "cosplace" and meta["dim"] == dim == 32 and meta["rows"] == 3
    assert meta["architecture"] == "ResNet-18 + GeM + Linear(512, 32)"
    assert meta["weights_sha256"] == extraction.file_digest(path) and meta["weights"] == str(path.resolve())
    pre = meta["preprocessing"]
    assert pre["image_size"] == [96, 64] and pre["mean"] == [0.485, 0.456, 0.406] and pre["std"] == [0.229, 0.224,
                                                                                                      0.225]
    assert extraction.read_metadata(tmp_path / "o.h5") == meta and meta["images"] == "o.h5.images.txt"


def fake_extraction(folder, side: str, model: str, sha: str, size) -> None:
    np.save(folder / f"{side}.npy", np.random.default_rng(0).standard_normal((8, 16)).astype(np.float32))
    (folder / f"{side}.csv").write_text("x,y\n" + "".join(f"{2 * i},0\n" for i in range(8)))
    (folder / f"{side}.npy.model.json").write_text(json.dumps(
        {"model": model, "weights_sha256": sha, "preprocessing": {"image_size": size}}))


@pytest.mark.parametrize("query, needle", [
    (("mixvpr", "a" * 64, [320, 320]), "different models"),
    (("cosplace", "b" * 64, None), "different checkpoints"),
    (("cosplace", "a" * 64, [640, 480]), "different image sizes"),
    (("cosplace", "a" * 64, None), None),
])
def test_prepare_refuses_traversals_of_different_models(tmp_path, capsys, query, needle):
    from seqmatchnet.cli import prepare

    fake_extraction(tmp_path, "db", "cosplace", "a" * 64, None)
    fake_extraction(tmp_path, "q", *query)
    rc = prepare.main(["--name", "r", "--db_descriptors", str(tmp_path / "db.npy"), "--db_positions",
                              str(tmp_path / "db.csv"), "--q_descriptors", str(tmp_path / "q.npy"), "--q_positions",
                              str(tmp_path / "q.csv"), "--structPath", str(tmp_path / "s"), "--seqL", "2",
                              "--splits", "0.5,0.25,0.25", "--posDistThr", "1", "--evalPosDistThr", "1",
                              "--nonTrivPosDistThr", "1"])
    out, err = capsys.readouterr()
    if needle is None:
        assert rc == 0, err
    else:
        line = one_error_line(err)
        assert rc == 1 and needle in line and "cosplace" in line and "--model" in line
        assert not (tmp_path / "s").exists()
