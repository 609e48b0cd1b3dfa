"""SALAD (Izquierdo and Civera, CVPR 2024) and MegaLoc (Berton and Masone, CVPRW 2025), built from
their released checkpoints.

- ``salad``: ``dinov2_salad`` of github.com/serizba/salad, ``dino_salad.ckpt``: ``backbone.model.*``
  = the hub DINOv2 ViT-B/14, its final LayerNorm applied (``norm_layer=True``), class token and
  patch tokens; ``aggregator.*`` = SALAD: token MLP, cluster-feature and score MLPs (1x1 convs),
  three Sinkhorn iterations with a learned dust bin, L2 normalisations; 8448-D.
- ``megaloc``: github.com/gmberton/MegaLoc, ``model.safetensors`` (``backbone.*``, the same ViT
  with hub names) or the older ``megaloc.torch`` (``backbone.model.*``): the normalised tokens,
  ``aggregator.agg.*`` = SALAD with 256-D clusters, ``aggregator.linear`` to 8448-D, L2
  normalisation. Its forward resizes images whose sides are not multiples of 14 to the nearest
  ones (bilinear, antialias), as the authors' does.

Every setting is read from the weights' shapes.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
import torchvision.transforms.functional as TF
from torch import nn

from seqmatchnet.common.errors import UserError
from seqmatchnet.images.base import RELEASES, ImageModel, _meta_build, found_keys, load_checked
from seqmatchnet.images.dinov2 import PATCH, DinoV2, dinov2_layout, dinov2_state, vit_title

SALAD_SIZE = (322, 322)             # SALAD's evaluation size (README: eval.py --image_size 322 322)
SINKHORN_ITERATIONS = 3


def sinkhorn_log(scores: torch.Tensor, dust_bin: torch.Tensor,
                 iterations: int = SINKHORN_ITERATIONS) -> torch.Tensor:
    """SALAD's ``get_matching_probs``: log optimal-transport assignment of ``scores`` [B, m, n]
    with a dust-bin row, ``[B, m + 1, n]``."""
    b, m, n = scores.shape
    if n <= m:
        raise UserError(f"the images give {n} patches of 14x14 pixels but SALAD's assignment needs "
                        f"more than its {m} clusters: use larger images (--imageSize)")
    augmented = torch.cat((scores, dust_bin.to(scores.dtype).expand(b, 1, n)), dim=1)
    norm = -math.log(n + m)
    log_a = torch.full((m + 1,), norm, dtype=scores.dtype, device=scores.device)
    log_a[-1] = norm + math.log(n - m)
    log_a = log_a.expand(b, -1)
    log_b = torch.full((b, n), norm, dtype=scores.dtype, device=scores.device)
    u, v = torch.zeros_like(log_a), torch.zeros_like(log_b)
    for _ in range(iterations):
        u = log_a - torch.logsumexp(augmented + v.unsqueeze(1), dim=2)
        v = log_b - torch.logsumexp(augmented + u.unsqueeze(2), dim=1)
    return augmented + u.unsqueeze(2) + v.unsqueeze(1) - norm


class SaladAggregator(nn.Module):
    """``([B, C, h, w] features, [B, C] class token)`` -> ``[B, token + clusters * cluster_dim]``,
    L2-normalised."""

    def __init__(self, channels: int, clusters: int, cluster_dim: int, token: int,
                 hidden: int) -> None:
        super().__init__()
        self.clusters, self.cluster_dim = clusters, cluster_dim
        self.token_features = nn.Sequential(nn.Linear(channels, hidden), nn.ReLU(),
                                            nn.Linear(hidden, token))
        self.cluster_features = nn.Sequential(nn.Conv2d(channels, hidden, 1), nn.Identity(),
                                              nn.ReLU(), nn.Conv2d(hidden, cluster_dim, 1))
        self.score = nn.Sequential(nn.Conv2d(channels, hidden, 1), nn.Identity(), nn.ReLU(),
                                   nn.Conv2d(hidden, clusters, 1))
        self.dust_bin = nn.Parameter(torch.tensor(1.0))

    def forward(self, x: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        features, token = x
        f = self.cluster_features(features).flatten(2)                   # [B, l, n]
        p = sinkhorn_log(self.score(features).flatten(2), self.dust_bin).exp()[:, :-1]  # [B, m, n]
        clusters = torch.einsum("bln,bmn->blm", f, p)                     # sum over the n cells
        t = self.token_features(token)
        out = torch.cat((F.normalize(t, p=2, dim=-1),
                         F.normalize(clusters, p=2, dim=1).flatten(1)), dim=-1)
        return F.normalize(out, p=2, dim=-1)


class SaladNet(nn.Module):
    """SALAD's ``VPRModel``: DINOv2 (final norm) -> SALAD."""

    def __init__(self, vit: tuple[int, int, int], agg: dict) -> None:
        super().__init__()
        self.backbone = DinoV2(*vit, final_norm=True)
        self.aggregator = SaladAggregator(**agg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.aggregator(self.backbone.feature_map(x))


class MegaLocHead(nn.Module):
    """MegaLoc's ``Aggregator``: SALAD (``agg``) then ``linear``."""

    def __init__(self, agg: dict, dim: int) -> None:
        super().__init__()
        self.agg = SaladAggregator(**agg)
        self.linear = nn.Linear(agg["token"] + agg["clusters"] * agg["cluster_dim"], dim)

    def forward(self, x: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        return self.linear(self.agg(x))


class MegaLocNet(nn.Module):
    """MegaLoc: sides to the nearest multiples of 14 -> DINOv2 (final norm) -> SALAD -> linear ->
    L2."""

    def __init__(self, vit: tuple[int, int, int], agg: dict, dim: int) -> None:
        super().__init__()
        self.backbone = DinoV2(*vit, final_norm=True)
        self.aggregator = MegaLocHead(agg, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        if h % PATCH or w % PATCH:
            size = [round(h / PATCH) * PATCH, round(w / PATCH) * PATCH]
            x = TF.resize(x, size, antialias=True)
        return F.normalize(self.aggregator(self.backbone.feature_map(x)), p=2, dim=1)


def salad_settings(state: dict[str, torch.Tensor], prefix: str, source: str,
                   name: str) -> dict:
    """SALAD's settings from the shapes of the weights under ``prefix``."""
    needed = [prefix + k for k in ("token_features.0.weight", "token_features.2.weight",
                                   "cluster_features.3.weight", "score.3.weight", "dust_bin")]
    missing = [k for k in needed if k not in state]
    if missing:
        raise UserError(f"{source}: not a {'SALAD' if name == 'salad' else 'MegaLoc'} checkpoint: "
                        f"{missing[0]!r} is missing ({found_keys(state)}; expected backbone.* "
                        f"(DINOv2) and {prefix}token_features, cluster_features, score, dust_bin, "
                        f"e.g. {RELEASES[name]})")
    first = state[prefix + "token_features.0.weight"]
    return {"channels": int(first.shape[1]), "hidden": int(first.shape[0]),
            "token": int(state[prefix + "token_features.2.weight"].shape[0]),
            "cluster_dim": int(state[prefix + "cluster_features.3.weight"].shape[0]),
            "clusters": int(state[prefix + "score.3.weight"].shape[0])}


def vit_prefix(state: dict[str, torch.Tensor]) -> str:
    """Where the hub ViT's weights are: ``backbone.model.`` (torch.hub model) or ``backbone.``."""
    return "backbone.model." if "backbone.model.cls_token" in state else "backbone."


def _load(network: nn.Module, state: dict, prefix: str, source: str, title: str) -> None:
    """The checkpoint into ``network`` with the ViT renamed to timm's names."""
    mapped = dinov2_state(state, prefix, network.backbone, "backbone.vit.")
    rest = {k: v for k, v in state.items() if not k.startswith("backbone.")}
    load_checked(network, {**mapped, **rest}, source, title,
                 "expected only backbone.* (DINOv2) and aggregator.*")


def _check_width(vit: tuple[int, int, int], agg: dict, source: str) -> None:
    if vit[0] != agg["channels"]:
        raise UserError(f"{source}: the ViT is {vit[0]} wide but the aggregator takes "
                        f"{agg['channels']} channels")


def salad_from_state(state: dict[str, torch.Tensor], source: str) -> ImageModel:
    """DINOv2 + SALAD from ``dino_salad.ckpt``'s state dict (Lightning extras dropped)."""
    state = {k: v for k, v in state.items() if not k.startswith(("loss_fn.", "miner."))}
    agg = salad_settings(state, "aggregator.", source, "salad")
    prefix = vit_prefix(state)
    vit = dinov2_layout(state, prefix, source)
    _check_width(vit, agg, source)
    dim = agg["token"] + agg["clusters"] * agg["cluster_dim"]
    title = (f"{vit_title(vit[0], vit[1])} + SALAD ({agg['clusters']} clusters x "
             f"{agg['cluster_dim']} + token {agg['token']})")
    network = _meta_build(lambda: SaladNet(vit, agg))
    _load(network, state, prefix, source, title)
    return ImageModel("salad", network, dim, title, SALAD_SIZE, multiple=PATCH,
                      extras={"backbone": "dinov2", **agg})


def megaloc_from_state(state: dict[str, torch.Tensor], source: str) -> ImageModel:
    """MegaLoc from ``model.safetensors`` or ``megaloc.torch``; images at their own size by
    default (the network rounds the sides to multiples of 14)."""
    agg = salad_settings(state, "aggregator.agg.", source, "megaloc")
    linear = state.get("aggregator.linear.weight")
    if linear is None or linear.ndim != 2:
        raise UserError(f"{source}: 'aggregator.linear.weight' is missing ({found_keys(state)}): "
                        "expected MegaLoc's SALAD followed by a linear layer")
    prefix = vit_prefix(state)
    vit = dinov2_layout(state, prefix, source)
    _check_width(vit, agg, source)
    dim = int(linear.shape[0])
    title = (f"{vit_title(vit[0], vit[1])} + SALAD ({agg['clusters']} clusters x "
             f"{agg['cluster_dim']} + token {agg['token']}) + Linear({linear.shape[1]}, {dim})")
    network = _meta_build(lambda: MegaLocNet(vit, agg, dim))
    _load(network, state, prefix, source, title)
    return ImageModel("megaloc", network, dim, title, None, extras={"backbone": "dinov2", **agg})
