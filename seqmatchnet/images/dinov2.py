"""The DINOv2 ViT/14 trunk of BoQ, SALAD and MegaLoc, built with timm from the ``torch.hub``
checkpoint naming (``facebookresearch/dinov2``), with the hub's own position-embedding
interpolation.

timm's ``VisionTransformer`` (``vit_base_patch14_dinov2`` settings: patch 14, LayerScale, LayerNorm
eps 1e-6, head width 64) holds the weights; ``timm.models.vision_transformer.checkpoint_filter_fn``
maps the hub names (``mask_token`` dropped). Two things are done as the hub ViT does them, not as
timm does: the position embeddings are resampled at every forward with bicubic interpolation and
``scale_factor = (grid + 0.1) / sqrt(N)``, no antialias, and not at all when the image is square and
gives the trained grid (timm would use ``size=grid`` with antialias); and the final LayerNorm is
applied or not as each model's authors do (BoQ feeds the last block's tokens, SALAD and MegaLoc the
normalised ones).
"""
from __future__ import annotations

import math
import re

import torch
import torch.nn.functional as F
from torch import nn

from seqmatchnet.common.errors import UserError

PATCH = 14
INTERPOLATE_OFFSET = 0.1                    # dinov2/layers: the hub ViT's interpolate_offset
HEAD_WIDTH = 64                             # every DINOv2 ViT: embed_dim / num_heads
VIT_TITLES = {384: "ViT-S/14", 768: "ViT-B/14", 1024: "ViT-L/14", 1536: "ViT-g/14"}
HUB_KEYS = ("cls_token", "pos_embed", "patch_embed.proj.weight", "norm.weight")


def hub_pos_embed(pos_embed: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """The hub ViT's ``interpolate_pos_encoding`` for an image of ``height`` x ``width`` pixels:
    ``pos_embed`` [1, 1 + N, C] resampled to the image's patch grid (bicubic, scale factor
    ``(grid + 0.1) / sqrt(N)``, no antialias), unchanged for a square image of the trained grid."""
    n = pos_embed.shape[1] - 1
    rows, cols = height // PATCH, width // PATCH
    if rows * cols == n and height == width:
        return pos_embed
    side = math.isqrt(n)
    dim = pos_embed.shape[-1]
    grid = pos_embed[:, 1:].float().reshape(1, side, side, dim).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, mode="bicubic", antialias=False,
                         scale_factor=((rows + INTERPOLATE_OFFSET) / side,
                                       (cols + INTERPOLATE_OFFSET) / side))
    grid = grid.permute(0, 2, 3, 1).reshape(1, rows * cols, dim)
    return torch.cat((pos_embed[:, :1].float(), grid), dim=1).to(pos_embed.dtype)


class DinoV2(nn.Module):
    """A DINOv2 ViT/14 (timm) that maps ``[B, 3, H, W]`` (H, W multiples of 14) to the token
    sequence ``[B, 1 + H/14 * W/14, C]`` (class token first) after the last block, through the
    final LayerNorm when ``final_norm``."""

    def __init__(self, embed_dim: int, depth: int, grid: int, final_norm: bool) -> None:
        super().__init__()
        try:
            from timm.models.vision_transformer import VisionTransformer
        except ImportError as exc:
            raise UserError("the DINOv2 models (boq, salad, megaloc) need timm: pip install "
                            "'timm>=1.0,<2' (make install does)") from exc

        self.vit = VisionTransformer(
            img_size=grid * PATCH, patch_size=PATCH, embed_dim=embed_dim, depth=depth,
            num_heads=embed_dim // HEAD_WIDTH, mlp_ratio=4.0, init_values=1e-5, num_classes=0,
            dynamic_img_size=True)
        self.final_norm = final_norm
        self.embed_dim = embed_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        height, width = x.shape[-2:]
        vit = self.vit
        patches = vit.patch_embed(x)                                     # [B, h, w, C]
        b, rows, cols, dim = patches.shape
        tokens = torch.cat((vit.cls_token.expand(b, -1, -1), patches.reshape(b, rows * cols, dim)),
                           dim=1)
        tokens = vit.blocks(tokens + hub_pos_embed(vit.pos_embed, height, width))
        return vit.norm(tokens) if self.final_norm else tokens

    def feature_map(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``([B, C, H/14, W/14] patch tokens, [B, C] class token)``."""
        tokens = self(x)
        b, _, height, width = x.shape
        patches = tokens[:, 1:].reshape(b, height // PATCH, width // PATCH, self.embed_dim)
        return patches.permute(0, 3, 1, 2), tokens[:, 0]


def dinov2_layout(state: dict[str, torch.Tensor], prefix: str, source: str) -> tuple[int, int, int]:
    """``(embed_dim, depth, grid)`` of the hub DINOv2 ViT under ``prefix`` in ``state``."""
    missing = [k for k in HUB_KEYS if prefix + k not in state]
    if missing:
        raise UserError(f"{source}: {prefix + missing[0]!r} is missing: expected a DINOv2 ViT/14 "
                        f"under {prefix}* (cls_token, pos_embed, patch_embed, blocks.N, norm)")
    pattern = re.compile(rf"{re.escape(prefix)}blocks\.(\d+)\.")
    depth = 1 + max((int(m.group(1)) for k in state if (m := pattern.match(k))), default=-1)
    dim = int(state[prefix + "cls_token"].shape[-1])
    n = int(state[prefix + "pos_embed"].shape[1]) - 1
    grid = math.isqrt(n)
    if depth < 1 or grid * grid != n or dim % HEAD_WIDTH:
        raise UserError(f"{source}: {prefix}* is not a DINOv2 ViT/14 ({depth} blocks, width {dim}, "
                        f"{n} position embeddings): expected blocks.0.., a width that is a "
                        "multiple of 64 and a square grid of position embeddings")
    return dim, depth, grid


def dinov2_state(state: dict[str, torch.Tensor], prefix: str, model: DinoV2,
                 into: str) -> dict[str, torch.Tensor]:
    """The hub-named ViT weights under ``prefix`` renamed to ``model``'s timm names under ``into``
    (``timm.models.vision_transformer.checkpoint_filter_fn``; ``mask_token`` dropped)."""
    from timm.models.vision_transformer import checkpoint_filter_fn

    hub = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    hub.setdefault("mask_token", torch.zeros(1, hub["cls_token"].shape[-1]))   # timm's DINOv2 tag
    return {into + k: v for k, v in checkpoint_filter_fn(hub, model.vit).items()}


def vit_title(dim: int, depth: int) -> str:
    """``ViT-B/14`` for the released widths at their depth, else the width and depth."""
    name = VIT_TITLES.get(dim)
    standard = {384: 12, 768: 12, 1024: 24, 1536: 40}.get(dim)
    return f"DINOv2 {name}" if name and depth == standard else f"DINOv2 ViT/14 ({dim} wide, " \
                                                               f"{depth} blocks)"
