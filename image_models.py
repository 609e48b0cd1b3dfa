"""The image models of ``--mode extract`` and the readers of their released checkpoints.

Every network is built from ``torchvision.models`` (``weights=None``: nothing is downloaded) and
maps ``[N, 3, H, W]`` ImageNet-normalised images to ``[N, D]`` L2-normalised descriptors:

- ``netvlad``: Patch-NetVLAD's NetVLAD (Hausler et al., CVPR 2021): VGG16 ``features`` up to
  conv5_3 (no last ReLU and max-pool), NetVLAD, optional whitening PCA. Checkpoint keys
  ``encoder.*``, ``pool.centroids``, ``pool.conv.weight`` (``pool.conv.bias``), ``WPCA.0.*``.
- ``cosplace`` / ``eigenplaces``: the ``GeoLocalizationNet`` of CosPlace (Berton et al., CVPR
  2022) and EigenPlaces (ICCV 2023), the state dict their ``torch.hub`` entries load:
  ``backbone.*`` = a torchvision ResNet-18/50/101/152 without average pooling and classifier
  (``nn.Sequential(*list(resnet.children())[:-2])``) or VGG16 ``features`` without its last ReLU
  and max-pool; ``aggregation.*`` = L2 normalisation, GeM (learned ``p``, eps 1e-6), flatten,
  ``Linear(channels, D)``, L2 normalisation.
- ``mixvpr``: MixVPR (Ali-bey et al., WACV 2023), ``VPRModel(backbone_arch='resnet50',
  layers_to_crop=[4], agg_arch='MixVPR', ...)``: ``backbone.model.*`` = a torchvision ResNet
  without ``layer4`` (and without ``fc``/``avgpool``), ``aggregator.*`` = feature mixer layers
  over the H*W cells, channel and row projections, L2 normalisation.

The architecture is read from the checkpoint: the backbone depth from its keys, the output size
from the last layer's shape, MixVPR's aggregator settings from its weights' shapes.
"""
from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from utils import UserError, numpy_safe_globals

MODELS = ("netvlad", "cosplace", "eigenplaces", "mixvpr")
TITLES = {"netvlad": "NetVLAD (Patch-NetVLAD)", "cosplace": "CosPlace", "eigenplaces": "EigenPlaces",
          "mixvpr": "MixVPR"}
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
NETVLAD_SIZE = (640, 480)                   # (width, height), as Patch-NetVLAD's configs
ENCODER_DIM = 512
GEM_EPS = 1e-6
RELEASES = {
    "netvlad": "https://huggingface.co/TobiasRobotics/Patch-NetVLAD/resolve/main/pitts_WPCA4096.pth.tar",
    "cosplace": "https://github.com/gmberton/CosPlace/releases (e.g. ResNet50_2048_cosplace.pth)",
    "eigenplaces": "https://github.com/gmberton/EigenPlaces/releases (e.g. ResNet50_2048_eigenplaces.pth)",
    "mixvpr": "the MixVPR README (github.com/amaralibey/MixVPR): resnet50_MixVPR_4096_channels(1024)_rows(4).ckpt",
}
CHECKPOINT_URL = RELEASES["netvlad"]
# (blocks per layer, bottleneck blocks) -> torchvision constructor; a prefix of the blocks when layers are cut
RESNETS = {((2, 2, 2, 2), False): "resnet18", ((3, 4, 6, 3), False): "resnet34", ((3, 4, 6, 3), True): "resnet50",
           ((3, 4, 23, 3), True): "resnet101", ((3, 8, 36, 3), True): "resnet152"}
RESNET_TITLES = {"resnet18": "ResNet-18", "resnet34": "ResNet-34", "resnet50": "ResNet-50",
                 "resnet101": "ResNet-101", "resnet152": "ResNet-152", "vgg16": "VGG16"}


@dataclass
class ImageModel:
    """A loaded network with what extraction needs to feed it.

    ``default_size`` (W, H) is the resize applied when ``--imageSize`` is not given (None: each
    image at its own size); ``cells`` is, for MixVPR, the number of feature-map cells its
    aggregator was trained on (the image size must give exactly that many)."""

    name: str
    network: nn.Module
    dim: int
    architecture: str
    default_size: tuple[int, int] | None
    cells: int | None = None
    stride_steps: int = 0                    # halvings of the image before the aggregator (MixVPR)
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD
    extras: dict = field(default_factory=dict)

    @property
    def out_dim(self) -> int:
        return self.dim

    def check_size(self, size: tuple[int, int] | None) -> None:
        """A ``UserError`` when images of ``size`` (W, H) cannot go through the network."""
        if self.cells is None:
            return
        side = math.isqrt(self.cells)
        example = f"{side * 2 ** self.stride_steps},{side * 2 ** self.stride_steps}" if side * side == self.cells \
            else "W,H"
        if size is None:
            raise UserError(f"MixVPR needs a fixed --imageSize: its aggregator mixes exactly {self.cells} feature "
                            f"cells (H/16 x W/16), e.g. --imageSize {example}")
        got = feature_cells(size[1], self.stride_steps) * feature_cells(size[0], self.stride_steps)
        if got != self.cells:
            raise UserError(f"--imageSize {size[0]},{size[1]} gives {got} feature cells but this MixVPR checkpoint "
                            f"mixes {self.cells} (H/16 x W/16): use e.g. --imageSize {example}")

    def preprocessing(self, size: tuple[int, int] | None) -> dict:
        """What is done to an image before the network, as stored in the extraction metadata."""
        return {"image_size": list(size) if size else None,
                "resize": "Pillow bilinear to image_size (W, H)" if size else "none (each image at its own size)",
                "colour": "RGB", "scale": "[0, 1]", "mean": list(self.mean), "std": list(self.std)}


def feature_cells(pixels: int, steps: int) -> int:
    """Feature-map length after ``steps`` stride-2 stages of a torchvision ResNet (3x3/7x7 kernels,
    padding k//2): each maps n to floor((n - 1) / 2) + 1."""
    for _ in range(steps):
        pixels = (pixels - 1) // 2 + 1
    return pixels


def _meta_build(build: Callable[[], nn.Module]) -> nn.Module:
    """``build()`` on the meta device, then moved to the CPU uninitialised (the checkpoint fills it):
    no random initialisation of weights that are overwritten."""
    with torch.device("meta"):
        module = build()
    return module.to_empty(device="cpu")


def vgg16_features() -> nn.Sequential:
    """torchvision's VGG16 ``features`` up to conv5_3 (indices 0..28: without the last ReLU and
    max-pool): ``[N, 3, H, W]`` -> ``[N, 512, H/16, W/16]``."""
    return nn.Sequential(*list(torchvision.models.vgg16(weights=None).features.children())[:-2])


def resnet_trunk(name: str) -> nn.Sequential:
    """A torchvision ResNet without average pooling and classifier, as CosPlace builds it."""
    return nn.Sequential(*list(getattr(torchvision.models, name)(weights=None).children())[:-2])


# ---------------------------------------------------------------- NetVLAD

class NetVLADPool(nn.Module):
    """NetVLAD aggregation: ``[N, C, H, W]`` features -> ``[N, K*C]`` (intra- and L2-normalised)."""

    def __init__(self, num_clusters: int, dim: int = ENCODER_DIM, assignment_bias: bool = False) -> None:
        super().__init__()
        self.num_clusters = num_clusters
        self.conv = nn.Conv2d(dim, num_clusters, kernel_size=1, bias=assignment_bias)
        self.centroids = nn.Parameter(torch.zeros(num_clusters, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c = x.shape[:2]
        x = F.normalize(x, p=2, dim=1)                                  # per location, across channels
        assign = F.softmax(self.conv(x).reshape(n, self.num_clusters, -1), dim=1)   # [N, K, L]
        feats = x.reshape(n, c, -1)                                     # [N, C, L]
        # sum_l a[k,l] (x[:,l] - c_k) = (A X^T)[k] - (sum_l a[k,l]) c_k
        vlad = torch.bmm(assign, feats.transpose(1, 2)) - assign.sum(2, keepdim=True) * self.centroids
        vlad = F.normalize(vlad, p=2, dim=2)                            # intra-normalisation
        return F.normalize(vlad.reshape(n, -1), p=2, dim=1)


class NetVLADModel(nn.Module):
    """Patch-NetVLAD's global descriptor network: ``[N, 3, H, W]`` normalised images ->
    ``[N, P]`` L2-normalised descriptors (``P = K*512`` without WPCA). Module names match the
    checkpoints' keys (``encoder``, ``pool``, ``WPCA``)."""

    def __init__(self, num_clusters: int, num_pcs: int | None = None, assignment_bias: bool = False) -> None:
        super().__init__()
        self.encoder = vgg16_features()
        self.pool = NetVLADPool(num_clusters, ENCODER_DIM, assignment_bias)
        self.WPCA = nn.Sequential(nn.Conv2d(num_clusters * ENCODER_DIM, num_pcs, kernel_size=1)) if num_pcs else None

    @property
    def out_dim(self) -> int:
        return self.WPCA[0].out_channels if self.WPCA is not None else self.pool.num_clusters * ENCODER_DIM

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        vlad = self.pool(self.encoder(images))
        if self.WPCA is None:
            return vlad
        conv = self.WPCA[0]                     # a 1x1 conv on [N, K*C, 1, 1] is a linear map
        return F.normalize(F.linear(vlad, conv.weight.flatten(1), conv.bias), p=2, dim=1)


def netvlad_from_state(state: dict[str, torch.Tensor], source: str = "checkpoint") -> NetVLADModel:
    """Check a Patch-NetVLAD state dict and load it into a ``NetVLADModel`` (CPU, eval mode).
    K and P are read from the shapes; a missing, unexpected or wrongly shaped key is a
    ``UserError`` naming the key and its shape."""
    for key in ("pool.centroids", "pool.conv.weight"):
        if key not in state:
            raise UserError(f"{source}: key {key!r} is missing: not a NetVLAD checkpoint in Patch-NetVLAD's format "
                            f"({found_keys(state)}; get one from {CHECKPOINT_URL})")
    centroids = state["pool.centroids"]
    if centroids.ndim != 2 or centroids.shape[1] != ENCODER_DIM or centroids.shape[0] < 1:
        raise UserError(f"{source}: 'pool.centroids' has shape {list(centroids.shape)}, expected [K, {ENCODER_DIM}]")
    num_clusters = int(centroids.shape[0])
    wpca = state.get("WPCA.0.weight")
    if wpca is not None and (wpca.ndim != 4 or wpca.shape[0] < 1):
        raise UserError(f"{source}: 'WPCA.0.weight' has shape {list(wpca.shape)}, expected "
                        f"[P, {num_clusters * ENCODER_DIM}, 1, 1] for K={num_clusters} clusters")
    num_pcs = int(wpca.shape[0]) if wpca is not None else None
    model = _meta_build(lambda: NetVLADModel(num_clusters, num_pcs, "pool.conv.bias" in state))
    what = f"NetVLAD (K={num_clusters}{f', P={num_pcs}' if num_pcs else ''})"
    load_checked(model, state, source, what, "expected only encoder.*, pool.* and WPCA.0.* of a NetVLAD checkpoint "
                 "(a Patch-NetVLAD one works: its global descriptor is the same)")
    return model


def expected_shapes(num_clusters: int, num_pcs: int | None, assignment_bias: bool) -> dict[str, tuple[int, ...]]:
    """Every state-dict key of a NetVLAD checkpoint with ``K`` clusters and ``P`` WPCA outputs, with its shape."""
    with torch.device("meta"):
        model = NetVLADModel(num_clusters, num_pcs, assignment_bias)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


# ---------------------------------------------------------------- CosPlace / EigenPlaces

class GeM(nn.Module):
    """Generalised mean pooling over all cells with a learned exponent ``p``: ``[N, C, H, W]`` -> ``[N, C, 1, 1]``."""

    def __init__(self, p: float = 3.0, eps: float = GEM_EPS) -> None:
        super().__init__()
        self.p = nn.Parameter(torch.ones(1) * p)
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.avg_pool2d(x.clamp(min=self.eps).pow(self.p), (x.size(-2), x.size(-1))).pow(1.0 / self.p)


class L2Norm(nn.Module):
    """L2 normalisation along dimension 1 (channels)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(x, p=2.0, dim=1)


class Flatten(nn.Module):
    """``[N, C, 1, 1]`` -> ``[N, C]``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x[:, :, 0, 0]


class GeoLocalizationNet(nn.Module):
    """CosPlace's and EigenPlaces' network: a backbone trunk, then L2Norm, GeM, flatten, Linear, L2Norm."""

    def __init__(self, backbone: str, features_dim: int, fc_output_dim: int) -> None:
        super().__init__()
        self.backbone = vgg16_features() if backbone == "vgg16" else resnet_trunk(backbone)
        self.aggregation = nn.Sequential(L2Norm(), GeM(), Flatten(), nn.Linear(features_dim, fc_output_dim), L2Norm())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.aggregation(self.backbone(x))


def resnet_from_keys(keys: list[str], prefix: str, first_layer: int | str) -> tuple[str, int] | None:
    """The torchvision ResNet whose residual layers appear under ``prefix`` (layer i named
    ``first_layer + i - 1`` when ``first_layer`` is an int, else ``layer{i}``): ``(name, layers
    present)``, or None when the block counts fit no ResNet."""
    blocks = []
    for i in range(4):
        layer = f"{first_layer + i}" if isinstance(first_layer, int) else f"layer{i + 1}"
        pattern = re.compile(rf"{re.escape(prefix)}{layer}\.(\d+)\.")
        found = {int(m.group(1)) for k in keys if (m := pattern.match(k))}
        if not found:
            break
        blocks.append(max(found) + 1)
    bottleneck = any(re.match(rf"{re.escape(prefix)}\S+\.0\.conv3\.weight$", k) for k in keys)
    for (counts, is_bottleneck), name in RESNETS.items():
        if blocks and is_bottleneck == bottleneck and tuple(blocks) == counts[:len(blocks)]:
            return name, len(blocks)
    return None


def channels_out(resnet: str, layers: int) -> int:
    """Output channels of a torchvision ResNet cut after ``layers`` residual layers."""
    base = 64 * 2 ** (layers - 1)
    return base * 4 if resnet in ("resnet50", "resnet101", "resnet152") else base


def geolocalization_layout(state: dict[str, torch.Tensor], name: str, source: str) -> tuple[str, int, int]:
    """``(backbone, backbone channels, output size)`` of a CosPlace / EigenPlaces state dict: the
    backbone from its keys, the output size from ``aggregation.3.weight``."""
    first = state.get("backbone.0.weight")
    fc = state.get("aggregation.3.weight")
    resnet = resnet_from_keys(list(state), "backbone.", 4)
    if first is not None and tuple(first.shape[1:]) == (3, 3, 3) and "backbone.28.weight" in state:
        backbone, channels = "vgg16", ENCODER_DIM
    elif first is not None and resnet is not None and resnet[1] == 4:
        backbone, channels = resnet[0], channels_out(resnet[0], 4)
    else:
        raise UserError(f"{source}: not a {TITLES[name]} checkpoint ({found_keys(state)}; expected backbone.* of a "
                        f"ResNet-18/50/101/152 or VGG16 and aggregation.1.p, aggregation.3.weight/bias, the state dict "
                        f"of GeoLocalizationNet, e.g. from {RELEASES[name]})")
    if fc is None or fc.ndim != 2 or "aggregation.1.p" not in state:
        raise UserError(f"{source}: 'aggregation.3.weight' or 'aggregation.1.p' is missing or misshapen "
                        f"({found_keys(state)}): expected GeoLocalizationNet's L2Norm, GeM, Flatten, Linear, L2Norm")
    return backbone, channels, int(fc.shape[0])


def geolocalization_from_state(state: dict[str, torch.Tensor], name: str, source: str) -> ImageModel:
    """A CosPlace / EigenPlaces ``GeoLocalizationNet`` loaded from its state dict."""
    backbone, channels, dim = geolocalization_layout(state, name, source)
    title = f"{RESNET_TITLES[backbone]} + GeM + Linear({channels}, {dim})"
    network = _meta_build(lambda: GeoLocalizationNet(backbone, channels, dim))
    load_checked(network, state, source, title, f"expected only backbone.* and aggregation.* of {TITLES[name]}'s "
                 "GeoLocalizationNet")
    return ImageModel(name, network, dim, title, None, extras={"backbone": backbone})


# ---------------------------------------------------------------- MixVPR

class FeatureMixerLayer(nn.Module):
    """One MLP over the H*W cells of every channel, with a residual connection."""

    def __init__(self, in_dim: int, hidden: int) -> None:
        super().__init__()
        self.mix = nn.Sequential(nn.LayerNorm(in_dim), nn.Linear(in_dim, hidden), nn.ReLU(), nn.Linear(hidden, in_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.mix(x)


class MixVPRAggregator(nn.Module):
    """``[N, C, H, W]`` -> mixer layers over H*W -> channel projection C -> C' -> row projection
    H*W -> R -> ``[N, C'*R]``, L2-normalised."""

    def __init__(self, in_channels: int, cells: int, out_channels: int, depth: int, hidden: int, rows: int) -> None:
        super().__init__()
        self.mix = nn.Sequential(*[FeatureMixerLayer(cells, hidden) for _ in range(depth)])
        self.channel_proj = nn.Linear(in_channels, out_channels)
        self.row_proj = nn.Linear(cells, rows, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.mix(x.flatten(2))                                      # [N, C, HW]
        x = self.channel_proj(x.permute(0, 2, 1)).permute(0, 2, 1)      # [N, C', HW]
        return F.normalize(self.row_proj(x).flatten(1), p=2, dim=-1)    # [N, C' * R]


class MixVPRBackbone(nn.Module):
    """MixVPR's ResNet wrapper: a torchvision ResNet in ``.model`` with ``avgpool``/``fc`` removed and
    the residual layers after ``layers`` removed (``layers_to_crop``)."""

    def __init__(self, resnet: str, layers: int) -> None:
        super().__init__()
        self.model = getattr(torchvision.models, resnet)(weights=None)
        self.model.avgpool, self.model.fc = None, None
        for i in range(layers + 1, 5):
            setattr(self.model, f"layer{i}", None)
        self.layers = layers

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        m = self.model
        x = m.maxpool(m.relu(m.bn1(m.conv1(x))))
        for i in range(1, self.layers + 1):
            x = getattr(m, f"layer{i}")(x)
        return x


class MixVPRNet(nn.Module):
    """``VPRModel``'s inference path: ``aggregator(backbone(x))``."""

    def __init__(self, resnet: str, layers: int, aggregator: dict) -> None:
        super().__init__()
        self.backbone = MixVPRBackbone(resnet, layers)
        self.aggregator = MixVPRAggregator(**aggregator)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.aggregator(self.backbone(x))


def mixvpr_settings(state: dict[str, torch.Tensor], source: str) -> dict:
    """MixVPR's aggregator settings from its weights' shapes."""
    needed = ("aggregator.mix.0.mix.0.weight", "aggregator.mix.0.mix.1.weight", "aggregator.channel_proj.weight",
              "aggregator.row_proj.weight")
    if any(k not in state or state[k].ndim < 1 for k in needed):
        missing = next(k for k in needed if k not in state or state[k].ndim < 1)
        raise UserError(f"{source}: not a MixVPR checkpoint: {missing!r} is missing ({found_keys(state)}; expected "
                        f"backbone.model.* and aggregator.mix.*, channel_proj, row_proj, e.g. {RELEASES['mixvpr']})")
    depth = 1 + max(int(m.group(1)) for k in state if (m := re.match(r"aggregator\.mix\.(\d+)\.mix\.0\.weight$", k)))
    cells = int(state["aggregator.mix.0.mix.0.weight"].shape[0])
    channel = state["aggregator.channel_proj.weight"]
    return {"in_channels": int(channel.shape[-1]), "cells": cells, "out_channels": int(channel.shape[0]),
            "depth": depth, "hidden": int(state["aggregator.mix.0.mix.1.weight"].shape[0]),
            "rows": int(state["aggregator.row_proj.weight"].shape[0])}


def mixvpr_layout(state: dict[str, torch.Tensor], source: str) -> tuple[str, int, dict]:
    """``(ResNet, residual layers kept, aggregator settings)`` of a MixVPR state dict."""
    agg = mixvpr_settings(state, source)
    resnet = resnet_from_keys(list(state), "backbone.model.", "layer")
    if resnet is None or "backbone.model.conv1.weight" not in state:
        raise UserError(f"{source}: MixVPR backbone not recognised ({found_keys(state)}; expected backbone.model.conv1 "
                        "and backbone.model.layer1.. of a torchvision ResNet-18/34/50/101/152)")
    name, layers = resnet
    if channels_out(name, layers) != agg["in_channels"]:
        raise UserError(f"{source}: the backbone ({RESNET_TITLES[name]} to layer{layers}) gives "
                        f"{channels_out(name, layers)} channels but aggregator.channel_proj takes {agg['in_channels']}")
    return name, layers, agg


def mixvpr_from_state(state: dict[str, torch.Tensor], source: str) -> ImageModel:
    """A MixVPR ``VPRModel`` (a ResNet cut after layer3 or another layer, the MixVPR aggregator)
    loaded from its state dict; the default image size is square, 16 pixels per feature cell."""
    state = {k: v for k, v in state.items() if not k.startswith(("loss_fn.", "miner."))}   # Lightning extras
    name, layers, agg = mixvpr_layout(state, source)
    dim = agg["out_channels"] * agg["rows"]
    title = (f"{RESNET_TITLES[name]} to layer{layers} + MixVPR (in_channels {agg['in_channels']}, "
             f"{agg['cells']} cells, mix_depth {agg['depth']}, mlp_ratio {agg['hidden'] / agg['cells']:g}, "
             f"out_channels {agg['out_channels']}, out_rows {agg['rows']})")
    network = _meta_build(lambda: MixVPRNet(name, layers, agg))
    load_checked(network, state, source, title, "expected only backbone.model.* and aggregator.* of MixVPR's VPRModel")
    side = math.isqrt(agg["cells"])
    steps = layers + 1                  # conv1 and max-pool halve, then layer2, layer3, layer4 each
    size = (side * 2 ** steps,) * 2 if side * side == agg["cells"] else None
    return ImageModel("mixvpr", network, dim, title, size, cells=agg["cells"], stride_steps=steps,
                      extras={"backbone": name, **agg})


# ---------------------------------------------------------------- checkpoints

def looks_like(state: dict[str, torch.Tensor]) -> str | None:
    """The model whose checkpoint layout ``state`` has (CosPlace and EigenPlaces share one), or None."""
    if "pool.centroids" in state:
        return "netvlad"
    if any(k.startswith("aggregator.mix.") for k in state):
        return "mixvpr"
    if "aggregation.1.p" in state:
        return "cosplace"
    return None


def found_keys(state: dict[str, torch.Tensor]) -> str:
    """A short account of a state dict's keys: its top-level prefixes with counts, and the model
    whose layout they have."""
    groups: dict[str, int] = {}
    for key in state:
        head = key.split(".")[0]
        groups[head] = groups.get(head, 0) + 1
    listed = ", ".join(f"{head}.* ({n})" for head, n in list(groups.items())[:6])
    if not state:
        return "found no keys"
    other = looks_like(state)
    hint = {"netvlad": "; a NetVLAD checkpoint: use --model netvlad", "mixvpr": "; a MixVPR checkpoint: use --model "
            "mixvpr", "cosplace": "; a CosPlace/EigenPlaces checkpoint: use --model cosplace or eigenplaces"}
    return f"found {len(state)} keys: {listed}{' ...' if len(groups) > 6 else ''}{hint.get(other, '')}"


def load_checked(module: nn.Module, state: dict[str, torch.Tensor], source: str, what: str,
                 unexpected_hint: str) -> None:
    """Load ``state`` into ``module`` (then eval mode) after checking every key and shape: a missing,
    unexpected or misshapen key is a ``UserError`` naming it. BatchNorm's ``num_batches_tracked``
    may be absent (it is not used in eval mode)."""
    expected = {k: tuple(v.shape) for k, v in module.state_dict().items()}
    for key, shape in expected.items():
        if key not in state and not key.endswith("num_batches_tracked"):
            raise UserError(f"{source}: key {key!r} (shape {list(shape)}) is missing: not a complete checkpoint of "
                            f"{what}")
        if key in state and tuple(state[key].shape) != shape:
            raise UserError(f"{source}: {key!r} has shape {list(state[key].shape)}, expected {list(shape)} ({what})")
    unexpected = [k for k in state if k not in expected]
    if unexpected:
        raise UserError(f"{source}: unexpected key {unexpected[0]!r} (shape {list(state[unexpected[0]].shape)})"
                        f"{f' and {len(unexpected) - 1} more' if len(unexpected) > 1 else ''}: {unexpected_hint}")
    for key, value in module.state_dict().items():
        if key.endswith("num_batches_tracked") and key not in state:
            value.zero_()
    module.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in state.items()}, strict=False)
    module.eval()


def strip_module_prefix(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Keys without the ``module.`` parts that multi-GPU training adds."""
    return {".".join(p for p in k.split(".") if p != "module"): v for k, v in state.items()}


def read_state(path: Path, name: str) -> dict[str, torch.Tensor]:
    """The state dict of a checkpoint file (bare, or under ``'state_dict'``), loaded weights-only
    onto the CPU, ``module.`` prefixes removed."""
    path = Path(path)
    flag = "--netvladCkpt (or --weights)" if name == "netvlad" else "--weights"
    if not path.is_file():
        raise UserError(f"{TITLES[name]} checkpoint {path} not found: download one, e.g. {RELEASES[name]}, and pass it "
                        f"with {flag}")
    try:
        with torch.serialization.safe_globals(numpy_safe_globals()):
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:   # torch raises many error types for bad files
        text = " ".join(str(exc).split())
        raise UserError(f"{TITLES[name]} checkpoint {path} could not be loaded weights-only ({text:.160}): is it a "
                        f"complete checkpoint file? (e.g. {RELEASES[name]})") from exc
    state = ckpt.get("state_dict", ckpt) if isinstance(ckpt, dict) else None
    if not isinstance(state, dict) or not state or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UserError(f"{TITLES[name]} checkpoint {path} holds no state dict of tensors (bare or under 'state_dict'):"
                        f" not a {TITLES[name]} checkpoint (e.g. {RELEASES[name]})")
    return strip_module_prefix(state)


def model_from_state(name: str, state: dict[str, torch.Tensor], source: str = "checkpoint") -> ImageModel:
    """The ``ImageModel`` of ``name`` (one of ``MODELS``) from a state dict; a state dict that fits
    none of its architectures is a one-line ``UserError`` saying what was found."""
    if name not in MODELS:
        raise UserError(f"--model {name!r}: choose one of {', '.join(MODELS)}")
    state = strip_module_prefix(state)
    if name == "netvlad":
        net = netvlad_from_state(state, source)
        what = f"VGG16 to conv5_3 + NetVLAD K={net.pool.num_clusters}" + (f" + WPCA {net.out_dim}" if net.WPCA else "")
        return ImageModel("netvlad", net, net.out_dim, what, NETVLAD_SIZE)
    if name == "mixvpr":
        return mixvpr_from_state(state, source)
    return geolocalization_from_state(state, name, source)


def load_model(name: str, path: Path) -> ImageModel:
    """Read checkpoint ``path`` as model ``name`` (CPU, eval mode)."""
    return model_from_state(name, read_state(Path(path), name), f"{TITLES[name]} checkpoint {path}")


def random_netvlad_state(num_clusters: int = 64, num_pcs: int | None = 4096, seed: int = 0,
                         assignment_bias: bool = False) -> dict[str, torch.Tensor]:
    """A random NetVLAD state dict with the real shapes (for tests and benchmarks; not a trained
    network): He-initialised convs, unit centroids, a vladv1 assignment ``alpha * centroid``."""
    gen = torch.Generator().manual_seed(seed)
    state = {}
    for key, shape in expected_shapes(num_clusters, num_pcs, assignment_bias).items():
        if key.startswith("encoder.") and key.endswith(".weight"):
            state[key] = torch.randn(shape, generator=gen) * (2.0 / math.prod(shape[1:])) ** 0.5
        elif key.startswith("encoder."):
            state[key] = torch.randn(shape, generator=gen) * 0.01
        else:
            state[key] = torch.randn(shape, generator=gen)
    centroids = F.normalize(state["pool.centroids"], dim=1)
    state["pool.centroids"] = centroids
    state["pool.conv.weight"] = (20.0 * centroids)[:, :, None, None].contiguous()
    if num_pcs:
        state["WPCA.0.weight"] /= state["WPCA.0.weight"][0].numel() ** 0.5
    return state
