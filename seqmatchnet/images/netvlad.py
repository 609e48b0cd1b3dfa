"""Patch-NetVLAD's NetVLAD: VGG16 up to conv5_3, NetVLAD pooling, optional whitening PCA, built
from its released checkpoint.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from seqmatchnet.common.errors import UserError
from seqmatchnet.images.base import CHECKPOINT_URL, _meta_build, found_keys, load_checked

NETVLAD_SIZE = (640, 480)                   # (width, height), as Patch-NetVLAD's configs
ENCODER_DIM = 512


def vgg16_features() -> nn.Sequential:
    """torchvision's VGG16 ``features`` up to conv5_3 (indices 0..28: without the last ReLU and
    max-pool): ``[N, 3, H, W]`` -> ``[N, 512, H/16, W/16]``."""
    return nn.Sequential(*list(torchvision.models.vgg16(weights=None).features.children())[:-2])


# ---------------------------------------------------------------- NetVLAD

class NetVLADPool(nn.Module):
    """NetVLAD aggregation: ``[N, C, H, W]`` features -> ``[N, K*C]`` (intra- and L2-normalised)."""

    def __init__(self, num_clusters: int, dim: int = ENCODER_DIM,
                 assignment_bias: bool = False) -> None:
        super().__init__()
        self.num_clusters = num_clusters
        self.conv = nn.Conv2d(dim, num_clusters, kernel_size=1, bias=assignment_bias)
        self.centroids = nn.Parameter(torch.zeros(num_clusters, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c = x.shape[:2]
        # per location, across channels
        x = F.normalize(x, p=2, dim=1)
        assign = F.softmax(self.conv(x).reshape(n, self.num_clusters, -1), dim=1)   # [N, K, L]
        feats = x.reshape(n, c, -1)                                     # [N, C, L]
        # sum_l a[k,l] (x[:,l] - c_k) = (A X^T)[k] - (sum_l a[k,l]) c_k
        vlad = torch.bmm(assign, feats.transpose(1, 2)) - assign.sum(2,
                                                                     keepdim=True) * self.centroids
        vlad = F.normalize(vlad, p=2, dim=2)                            # intra-normalisation
        return F.normalize(vlad.reshape(n, -1), p=2, dim=1)


class NetVLADModel(nn.Module):
    """Patch-NetVLAD's global descriptor network: ``[N, 3, H, W]`` normalised images -> ``[N, P]``
    L2-normalised descriptors (``P = K*512`` without WPCA). Module names match the checkpoints' keys
    (``encoder``, ``pool``, ``WPCA``)."""

    def __init__(self, num_clusters: int, num_pcs: int | None = None,
                 assignment_bias: bool = False) -> None:
        super().__init__()
        self.encoder = vgg16_features()
        self.pool = NetVLADPool(num_clusters, ENCODER_DIM, assignment_bias)
        self.WPCA = nn.Sequential(nn.Conv2d(num_clusters * ENCODER_DIM, num_pcs,
                                            kernel_size=1)) if num_pcs else None

    @property
    def out_dim(self) -> int:
        if self.WPCA is not None:
            return self.WPCA[0].out_channels
        return self.pool.num_clusters * ENCODER_DIM

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        vlad = self.pool(self.encoder(images))
        if self.WPCA is None:
            return vlad
        conv = self.WPCA[0]                     # a 1x1 conv on [N, K*C, 1, 1] is a linear map
        return F.normalize(F.linear(vlad, conv.weight.flatten(1), conv.bias), p=2, dim=1)


def netvlad_from_state(state: dict[str, torch.Tensor], source: str = "checkpoint") -> NetVLADModel:
    """Check a Patch-NetVLAD state dict and load it into a ``NetVLADModel`` (CPU, eval mode). K and
    P are read from the shapes; a missing, unexpected or wrongly shaped key is a ``UserError``
    naming the key and its shape."""
    for key in ("pool.centroids", "pool.conv.weight"):
        if key not in state:
            raise UserError(f"{source}: key {key!r} is missing: not a NetVLAD checkpoint in "
                            f"Patch-NetVLAD's format ({found_keys(state)}; get one from "
                            f"{CHECKPOINT_URL})")
    centroids = state["pool.centroids"]
    if centroids.ndim != 2 or centroids.shape[1] != ENCODER_DIM or centroids.shape[0] < 1:
        raise UserError(f"{source}: 'pool.centroids' has shape {list(centroids.shape)}, expected "
                        f"[K, {ENCODER_DIM}]")
    num_clusters = int(centroids.shape[0])
    wpca = state.get("WPCA.0.weight")
    if wpca is not None and (wpca.ndim != 4 or wpca.shape[0] < 1):
        raise UserError(f"{source}: 'WPCA.0.weight' has shape {list(wpca.shape)}, expected "
                        f"[P, {num_clusters * ENCODER_DIM}, 1, 1] for K={num_clusters} clusters")
    num_pcs = int(wpca.shape[0]) if wpca is not None else None
    model = _meta_build(lambda: NetVLADModel(num_clusters, num_pcs, "pool.conv.bias" in state))
    what = f"NetVLAD (K={num_clusters}{f', P={num_pcs}' if num_pcs else ''})"
    load_checked(model, state, source, what, "expected only encoder.*, pool.* and WPCA.0.* of a "
                                             "NetVLAD checkpoint (a Patch-NetVLAD one works: its "
                                             "global descriptor is the same)")
    return model


def expected_shapes(num_clusters: int, num_pcs: int | None,
                    assignment_bias: bool) -> dict[str, tuple[int, ...]]:
    """Every state-dict key of a NetVLAD checkpoint with ``K`` clusters and ``P`` WPCA outputs, with
    its shape."""
    with torch.device("meta"):
        model = NetVLADModel(num_clusters, num_pcs, assignment_bias)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


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
