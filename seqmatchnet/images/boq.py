"""BoQ, Bag-of-Queries (Ali-bey et al., CVPR 2024), built from its released state dicts.

``get_trained_boq`` of github.com/amaralibey/Bag-of-Queries: ``VPRModel(backbone, aggregator)``
with ``backbone.net.*`` = a torchvision ResNet-50 cut after layer3 (``resnet50_16384.pth``) or
``backbone.dino.*`` = the hub DINOv2 ViT-B/14 whose last block's tokens, class token removed and
*without* the final LayerNorm, form the feature map (``dinov2_12288.pth``); ``aggregator.*`` = a
3x3 conv projection, LayerNorm, BoQ blocks (a transformer encoder layer, learned queries with
self-attention, cross-attention to the features), a linear layer over the queries, L2
normalisation. Every setting is read from the weights' shapes.
"""
from __future__ import annotations

import re

import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from seqmatchnet.common.errors import UserError
from seqmatchnet.images.base import RELEASES, ImageModel, _meta_build, found_keys, load_checked
from seqmatchnet.images.cosplace import RESNET_TITLES, channels_out, resnet_from_keys
from seqmatchnet.images.dinov2 import DinoV2, dinov2_layout, dinov2_state, vit_title

BOQ_RESNET_SIZE = (384, 384)        # the BoQ README's test-time sizes (W, H)
BOQ_DINO_SIZE = (322, 322)


class BoQBlock(nn.Module):
    """One BoQ block: ``x`` -> (encoded ``x``, ``[B, Q, C]`` query outputs)."""

    def __init__(self, dim: int, queries: int) -> None:
        super().__init__()
        heads = dim // 64
        self.encoder = nn.TransformerEncoderLayer(d_model=dim, nhead=heads,
                                                  dim_feedforward=4 * dim, batch_first=True,
                                                  dropout=0.0)
        self.queries = nn.Parameter(torch.zeros(1, queries, dim))
        self.self_attn = nn.MultiheadAttention(dim, num_heads=heads, batch_first=True)
        self.norm_q = nn.LayerNorm(dim)
        self.cross_attn = nn.MultiheadAttention(dim, num_heads=heads, batch_first=True)
        self.norm_out = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.encoder(x)
        q = self.queries.expand(x.shape[0], -1, -1)
        q = self.norm_q(q + self.self_attn(q, q, q, need_weights=False)[0])
        return x, self.norm_out(self.cross_attn(q, x, x, need_weights=False)[0])


class BoQAggregator(nn.Module):
    """``[B, C, H, W]`` -> 3x3 conv to ``proj`` channels -> LayerNorm -> BoQ blocks -> linear over
    the ``layers * queries`` outputs to ``rows`` -> ``[B, proj * rows]``, L2-normalised."""

    def __init__(self, in_channels: int, proj: int, queries: int, layers: int, rows: int) -> None:
        super().__init__()
        self.proj_c = nn.Conv2d(in_channels, proj, kernel_size=3, padding=1)
        self.norm_input = nn.LayerNorm(proj)
        self.boqs = nn.ModuleList([BoQBlock(proj, queries) for _ in range(layers)])
        self.fc = nn.Linear(layers * queries, rows)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.norm_input(self.proj_c(x).flatten(2).permute(0, 2, 1))
        outs = []
        for block in self.boqs:
            x, out = block(x)
            outs.append(out)
        out = self.fc(torch.cat(outs, dim=1).permute(0, 2, 1)).flatten(1)
        return F.normalize(out, p=2, dim=-1)


class BoQResNet(nn.Module):
    """BoQ's ResNet backbone: ``net`` = conv1, bn1, relu, maxpool, layer1.. of a torchvision
    ResNet (layer4 cropped)."""

    def __init__(self, resnet: str, layers: int) -> None:
        super().__init__()
        r = getattr(torchvision.models, resnet)(weights=None)
        self.net = nn.Sequential(r.conv1, r.bn1, r.relu, r.maxpool,
                                 *[getattr(r, f"layer{i}") for i in range(1, layers + 1)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class BoQDino(nn.Module):
    """BoQ's DINOv2 backbone: the last block's patch tokens (no final norm) as ``[B, C, h, w]``."""

    def __init__(self, dim: int, depth: int, grid: int) -> None:
        super().__init__()
        self.dino = DinoV2(dim, depth, grid, final_norm=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dino.feature_map(x)[0]


class BoQNet(nn.Module):
    """``VPRModel``'s descriptor: ``aggregator(backbone(x))``."""

    def __init__(self, backbone: nn.Module, aggregator: dict) -> None:
        super().__init__()
        self.backbone = backbone
        self.aggregator = BoQAggregator(**aggregator)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.aggregator(self.backbone(x))


def boq_settings(state: dict[str, torch.Tensor], source: str) -> dict:
    """The aggregator's settings from its weights' shapes."""
    needed = ("aggregator.proj_c.weight", "aggregator.boqs.0.queries", "aggregator.fc.weight")
    missing = [k for k in needed if k not in state]
    if missing:
        raise UserError(f"{source}: not a BoQ checkpoint: {missing[0]!r} is missing "
                        f"({found_keys(state)}; expected backbone.net.* or backbone.dino.* and "
                        f"aggregator.proj_c, boqs.N, fc, e.g. {RELEASES['boq']})")
    proj = state["aggregator.proj_c.weight"]
    layers = 1 + max(int(m.group(1)) for k in state
                     if (m := re.match(r"aggregator\.boqs\.(\d+)\.", k)))
    return {"in_channels": int(proj.shape[1]), "proj": int(proj.shape[0]),
            "queries": int(state["aggregator.boqs.0.queries"].shape[1]), "layers": layers,
            "rows": int(state["aggregator.fc.weight"].shape[0])}


def boq_backbone(state: dict[str, torch.Tensor],
                 source: str) -> tuple[nn.Module, str, int, dict[str, torch.Tensor]]:
    """``(backbone, title, channels, state in the backbone's names)`` of a BoQ checkpoint (the
    backbone uninitialised: the checkpoint fills it)."""
    if "backbone.dino.cls_token" in state:
        dim, depth, grid = dinov2_layout(state, "backbone.dino.", source)
        backbone = _meta_build(lambda: BoQDino(dim, depth, grid))
        mapped = dinov2_state(state, "backbone.dino.", backbone.dino, "backbone.dino.vit.")
        rest = {k: v for k, v in state.items() if not k.startswith("backbone.")}
        return backbone, f"{vit_title(dim, depth)} (no final norm)", dim, {**mapped, **rest}
    resnet = resnet_from_keys(list(state), "backbone.net.", 4)
    if resnet is None or "backbone.net.0.weight" not in state:
        raise UserError(f"{source}: BoQ backbone not recognised ({found_keys(state)}; expected "
                        "backbone.dino.* (DINOv2) or backbone.net.0.. of a torchvision ResNet)")
    name, layers = resnet
    backbone = _meta_build(lambda: BoQResNet(name, layers))
    return backbone, f"{RESNET_TITLES[name]} to layer{layers}", channels_out(name, layers), state


def boq_from_state(state: dict[str, torch.Tensor], source: str) -> ImageModel:
    """BoQ (ResNet or DINOv2 backbone) loaded from its state dict; the default image size is the
    authors' (384 x 384 for ResNet, 322 x 322 for DINOv2), resized bicubically with antialias."""
    agg = boq_settings(state, source)
    backbone, trunk, channels, state = boq_backbone(state, source)
    if channels != agg["in_channels"]:
        raise UserError(f"{source}: the backbone ({trunk}) gives {channels} channels but "
                        f"aggregator.proj_c takes {agg['in_channels']}")
    if agg["proj"] % 64:
        raise UserError(f"{source}: aggregator.proj_c has {agg['proj']} channels: BoQ uses "
                        "proj_channels / 64 heads, so a multiple of 64 is expected")
    dim = agg["proj"] * agg["rows"]
    title = (f"{trunk} + BoQ (proj {agg['proj']}, {agg['queries']} queries x {agg['layers']} "
             f"blocks, rows {agg['rows']})")
    network = _meta_build(lambda: BoQNet(backbone, agg))
    load_checked(network, state, source, title, "expected only backbone.* and aggregator.* of "
                                                "BoQ's VPRModel")
    dino = isinstance(backbone, BoQDino)
    return ImageModel("boq", network, dim, title, BOQ_DINO_SIZE if dino else BOQ_RESNET_SIZE,
                      resize="bicubic", multiple=14 if dino else None,
                      extras={"backbone": "dinov2" if dino else "resnet", **agg})
