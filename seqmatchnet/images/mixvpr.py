"""MixVPR (ResNet trunk cut after layer3, feature mixer aggregator) built from its released
checkpoint; the aggregator's settings are read from its weights' shapes.
"""
from __future__ import annotations

import math
import re

import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from seqmatchnet.common.errors import UserError
from seqmatchnet.images.base import RELEASES, ImageModel, _meta_build, found_keys, load_checked
from seqmatchnet.images.cosplace import RESNET_TITLES, channels_out, resnet_from_keys

# ---------------------------------------------------------------- MixVPR

class FeatureMixerLayer(nn.Module):
    """One MLP over the H*W cells of every channel, with a residual connection."""

    def __init__(self, in_dim: int, hidden: int) -> None:
        super().__init__()
        self.mix = nn.Sequential(nn.LayerNorm(in_dim), nn.Linear(in_dim, hidden), nn.ReLU(),
                                 nn.Linear(hidden, in_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.mix(x)


class MixVPRAggregator(nn.Module):
    """``[N, C, H, W]`` -> mixer layers over H*W -> channel projection C -> C' -> row projection
    H*W -> R -> ``[N, C'*R]``, L2-normalised."""

    def __init__(self, in_channels: int, cells: int, out_channels: int, depth: int, hidden: int,
                 rows: int) -> None:
        super().__init__()
        self.mix = nn.Sequential(*[FeatureMixerLayer(cells, hidden) for _ in range(depth)])
        self.channel_proj = nn.Linear(in_channels, out_channels)
        self.row_proj = nn.Linear(cells, rows, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.mix(x.flatten(2))                                      # [N, C, HW]
        x = self.channel_proj(x.permute(0, 2, 1)).permute(0, 2, 1)      # [N, C', HW]
        return F.normalize(self.row_proj(x).flatten(1), p=2, dim=-1)    # [N, C' * R]


class MixVPRBackbone(nn.Module):
    """MixVPR's ResNet wrapper: a torchvision ResNet in ``.model`` with ``avgpool``/``fc`` removed
    and the residual layers after ``layers`` removed (``layers_to_crop``)."""

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
    needed = ("aggregator.mix.0.mix.0.weight", "aggregator.mix.0.mix.1.weight",
              "aggregator.channel_proj.weight",
              "aggregator.row_proj.weight")
    if any(k not in state or state[k].ndim < 1 for k in needed):
        missing = next(k for k in needed if k not in state or state[k].ndim < 1)
        raise UserError(f"{source}: not a MixVPR checkpoint: {missing!r} is missing "
                        f"({found_keys(state)}; expected backbone.model.* and aggregator.mix.*, "
                        f"channel_proj, row_proj, e.g. {RELEASES['mixvpr']})")
    depth = 1 + max(int(m.group(1)) for k in state
                    if (m := re.match(r"aggregator\.mix\.(\d+)\.mix\.0\.weight$", k)))
    cells = int(state["aggregator.mix.0.mix.0.weight"].shape[0])
    channel = state["aggregator.channel_proj.weight"]
    return {"in_channels": int(channel.shape[-1]), "cells": cells,
            "out_channels": int(channel.shape[0]),
            "depth": depth, "hidden": int(state["aggregator.mix.0.mix.1.weight"].shape[0]),
            "rows": int(state["aggregator.row_proj.weight"].shape[0])}


def mixvpr_layout(state: dict[str, torch.Tensor], source: str) -> tuple[str, int, dict]:
    """``(ResNet, residual layers kept, aggregator settings)`` of a MixVPR state dict."""
    agg = mixvpr_settings(state, source)
    resnet = resnet_from_keys(list(state), "backbone.model.", "layer")
    if resnet is None or "backbone.model.conv1.weight" not in state:
        raise UserError(f"{source}: MixVPR backbone not recognised ({found_keys(state)}; expected "
                        "backbone.model.conv1 and backbone.model.layer1.. of a torchvision "
                        "ResNet-18/34/50/101/152)")
    name, layers = resnet
    if channels_out(name, layers) != agg["in_channels"]:
        raise UserError(f"{source}: the backbone ({RESNET_TITLES[name]} to layer{layers}) gives "
                        f"{channels_out(name, layers)} channels but aggregator.channel_proj takes "
                        f"{agg['in_channels']}")
    return name, layers, agg


def mixvpr_from_state(state: dict[str, torch.Tensor], source: str) -> ImageModel:
    """A MixVPR ``VPRModel`` (a ResNet cut after layer3 or another layer, the MixVPR aggregator)
    loaded from its state dict; the default image size is square, 16 pixels per feature cell."""
    # Lightning extras
    state = {k: v for k, v in state.items() if not k.startswith(("loss_fn.", "miner."))}
    name, layers, agg = mixvpr_layout(state, source)
    dim = agg["out_channels"] * agg["rows"]
    title = (f"{RESNET_TITLES[name]} to layer{layers} + MixVPR (in_channels {agg['in_channels']}, "
             f"{agg['cells']} cells, mix_depth {agg['depth']}, mlp_ratio "
             f"{agg['hidden'] / agg['cells']:g}, out_channels {agg['out_channels']}, out_rows "
             f"{agg['rows']})")
    network = _meta_build(lambda: MixVPRNet(name, layers, agg))
    load_checked(network, state, source, title, "expected only backbone.model.* and aggregator.* "
                                                "of MixVPR's VPRModel")
    side = math.isqrt(agg["cells"])
    steps = layers + 1                  # conv1 and max-pool halve, then layer2, layer3, layer4 each
    size = (side * 2 ** steps,) * 2 if side * side == agg["cells"] else None
    return ImageModel("mixvpr", network, dim, title, size, cells=agg["cells"], stride_steps=steps,
                      extras={"backbone": name, **agg})
