"""CosPlace's and EigenPlaces' ``GeoLocalizationNet`` (ResNet or VGG16 trunk, GeM, linear, L2)
built from its released state dict.
"""
from __future__ import annotations

import re

import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from seqmatchnet.common.errors import UserError
from seqmatchnet.images.base import (
    RELEASES,
    TITLES,
    ImageModel,
    _meta_build,
    found_keys,
    load_checked,
)
from seqmatchnet.images.netvlad import ENCODER_DIM, vgg16_features
from seqmatchnet.models.layers import Flatten, L2Norm

GEM_EPS = 1e-6
# (blocks per layer, bottleneck blocks) -> torchvision constructor; a prefix of the blocks when
# layers are cut
RESNETS = {((2, 2, 2, 2), False): "resnet18", ((3, 4, 6, 3), False): "resnet34",
           ((3, 4, 6, 3), True): "resnet50",
           ((3, 4, 23, 3), True): "resnet101", ((3, 8, 36, 3), True): "resnet152"}
RESNET_TITLES = {"resnet18": "ResNet-18", "resnet34": "ResNet-34", "resnet50": "ResNet-50",
                 "resnet101": "ResNet-101", "resnet152": "ResNet-152", "vgg16": "VGG16"}


def resnet_trunk(name: str) -> nn.Sequential:
    """A torchvision ResNet without average pooling and classifier, as CosPlace builds it."""
    return nn.Sequential(*list(getattr(torchvision.models, name)(weights=None).children())[:-2])


# ---------------------------------------------------------------- CosPlace / EigenPlaces

class GeM(nn.Module):
    """Generalised mean pooling over all cells with a learned exponent ``p``: ``[N, C, H, W]`` ->
    ``[N, C, 1, 1]``."""

    def __init__(self, p: float = 3.0, eps: float = GEM_EPS) -> None:
        super().__init__()
        self.p = nn.Parameter(torch.ones(1) * p)
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.avg_pool2d(x.clamp(min=self.eps).pow(self.p),
                            (x.size(-2), x.size(-1))).pow(1.0 / self.p)


class GeoLocalizationNet(nn.Module):
    """CosPlace's and EigenPlaces' network: a backbone trunk, then L2Norm, GeM, flatten, Linear,
    L2Norm."""

    def __init__(self, backbone: str, features_dim: int, fc_output_dim: int) -> None:
        super().__init__()
        self.backbone = vgg16_features() if backbone == "vgg16" else resnet_trunk(backbone)
        self.aggregation = nn.Sequential(L2Norm(dim=1), GeM(), Flatten(),
                                         nn.Linear(features_dim, fc_output_dim),
                                         L2Norm(dim=1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.aggregation(self.backbone(x))


def resnet_from_keys(keys: list[str], prefix: str,
                     first_layer: int | str) -> tuple[str, int] | None:
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


def geolocalization_layout(state: dict[str, torch.Tensor], name: str,
                           source: str) -> tuple[str, int, int]:
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
        raise UserError(f"{source}: not a {TITLES[name]} checkpoint ({found_keys(state)}; "
                        "expected backbone.* of a ResNet-18/50/101/152 or VGG16 and "
                        "aggregation.1.p, aggregation.3.weight/bias, the state dict of "
                        f"GeoLocalizationNet, e.g. from {RELEASES[name]})")
    if fc is None or fc.ndim != 2 or "aggregation.1.p" not in state:
        raise UserError(f"{source}: 'aggregation.3.weight' or 'aggregation.1.p' is missing or "
                        f"misshapen ({found_keys(state)}): expected GeoLocalizationNet's L2Norm, "
                        "GeM, Flatten, Linear, L2Norm")
    return backbone, channels, int(fc.shape[0])


def geolocalization_from_state(state: dict[str, torch.Tensor], name: str,
                               source: str) -> ImageModel:
    """A CosPlace / EigenPlaces ``GeoLocalizationNet`` loaded from its state dict."""
    backbone, channels, dim = geolocalization_layout(state, name, source)
    title = f"{RESNET_TITLES[backbone]} + GeM + Linear({channels}, {dim})"
    network = _meta_build(lambda: GeoLocalizationNet(backbone, channels, dim))
    load_checked(network, state, source, title, "expected only backbone.* and aggregation.* of "
                                                f"{TITLES[name]}'s GeoLocalizationNet")
    return ImageModel(name, network, dim, title, None, extras={"backbone": backbone})
