"""Independent definitions of BoQ, SALAD and MegaLoc, transcribed from their authors' code, for the
fidelity tests of ``seqmatchnet/images/{dinov2,boq,salad}.py``.

Nothing here comes from ``seqmatchnet`` or timm:

- ``HubViT``: the ``facebookresearch/dinov2`` hub ViT/14 (``dinov2/models/vision_transformer.py``,
  ``prepare_tokens_with_masks`` and ``interpolate_pos_encoding`` with ``interpolate_offset=0.1``,
  ``interpolate_antialias=False``; blocks with LayerScale; LayerNorm eps 1e-6), written after the
  stand-alone copy in gmberton/MegaLoc ``megaloc_model.py`` (explicit softmax attention), with the
  hub's parameter names (``mask_token`` included).
- ``BoQ``/``BoQBlock``/``BoQDinoBackbone``/``BoQResNetBackbone``: amaralibey/Bag-of-Queries
  ``src/boq.py``, ``src/backbones.py`` and ``hubconf.py`` (``VPRModel`` returns ``(x, attns)``).
- ``SALAD``, ``get_matching_probs``: serizba/salad ``models/aggregators/salad.py`` (with MegaLoc's
  ``mlp_dim``), its ``DINOv2`` backbone (``norm_layer=True, return_token=True``).
- ``MegaLoc``: gmberton/MegaLoc ``megaloc_model.py`` (``Aggregator``, ``L2Norm``, the resize to
  multiples of 14).
- The test-time transforms of each README / evaluation script.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
import torchvision
import torchvision.transforms as T
from torch import nn

# ---------------------------------------------------------------- the hub DINOv2 ViT


class LayerScale(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.gamma = nn.Parameter(1e-5 * torch.ones(dim))

    def forward(self, x):
        return x * self.gamma


class Attention(nn.Module):
    def __init__(self, dim, num_heads):
        super().__init__()
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, C // self.num_heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        attn = ((q @ k.transpose(-2, -1)) * self.scale).softmax(dim=-1)
        return self.proj((attn @ v).transpose(1, 2).reshape(B, N, C))


class Mlp(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.fc1 = nn.Linear(dim, 4 * dim)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(4 * dim, dim)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    def __init__(self, dim, num_heads):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, num_heads)
        self.ls1 = LayerScale(dim)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim)
        self.ls2 = LayerScale(dim)

    def forward(self, x):
        x = x + self.ls1(self.attn(self.norm1(x)))
        return x + self.ls2(self.mlp(self.norm2(x)))


class PatchEmbed(nn.Module):
    def __init__(self, dim, patch_size=14):
        super().__init__()
        self.proj = nn.Conv2d(3, dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x):
        return self.proj(x).flatten(2).transpose(1, 2)


class HubViT(nn.Module):
    """``dinov2_vit*14`` of torch.hub: img_size 518, patch 14, block_chunks 0 (flat ``blocks.N``)."""

    def __init__(self, embed_dim=768, depth=12, img_size=518, mask_token=True):
        super().__init__()
        self.patch_size = 14
        self.embed_dim = embed_dim
        self.interpolate_offset = 0.1
        self.interpolate_antialias = False
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, (img_size // 14) ** 2 + 1, embed_dim))
        if mask_token:
            self.mask_token = nn.Parameter(torch.zeros(1, embed_dim))
        self.patch_embed = PatchEmbed(embed_dim)
        self.blocks = nn.ModuleList([Block(embed_dim, embed_dim // 64) for _ in range(depth)])
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)

    def interpolate_pos_encoding(self, x, w, h):
        previous_dtype = x.dtype
        npatch = x.shape[1] - 1
        N = self.pos_embed.shape[1] - 1
        if npatch == N and w == h:
            return self.pos_embed
        pos_embed = self.pos_embed.float()
        class_pos_embed = pos_embed[:, 0]
        patch_pos_embed = pos_embed[:, 1:]
        dim = x.shape[-1]
        w0 = w // self.patch_size
        h0 = h // self.patch_size
        M = int(math.sqrt(N))
        sx = float(w0 + self.interpolate_offset) / M
        sy = float(h0 + self.interpolate_offset) / M
        patch_pos_embed = nn.functional.interpolate(
            patch_pos_embed.reshape(1, M, M, dim).permute(0, 3, 1, 2),
            mode="bicubic", antialias=self.interpolate_antialias, scale_factor=(sx, sy))
        assert (w0, h0) == patch_pos_embed.shape[-2:]
        patch_pos_embed = patch_pos_embed.permute(0, 2, 3, 1).view(1, -1, dim)
        return torch.cat((class_pos_embed.unsqueeze(0), patch_pos_embed), dim=1).to(previous_dtype)

    def prepare_tokens_with_masks(self, x):
        B, nc, w, h = x.shape
        x = self.patch_embed(x)
        x = torch.cat((self.cls_token.expand(x.shape[0], -1, -1), x), dim=1)
        return x + self.interpolate_pos_encoding(x, w, h)


# ---------------------------------------------------------------- BoQ


class BoQBlock(torch.nn.Module):
    def __init__(self, in_dim, num_queries, nheads=8):
        super().__init__()
        self.encoder = torch.nn.TransformerEncoderLayer(d_model=in_dim, nhead=nheads, dim_feedforward=4 * in_dim,
                                                        batch_first=True, dropout=0.)
        self.queries = torch.nn.Parameter(torch.randn(1, num_queries, in_dim))
        self.self_attn = torch.nn.MultiheadAttention(in_dim, num_heads=nheads, batch_first=True)
        self.norm_q = torch.nn.LayerNorm(in_dim)
        self.cross_attn = torch.nn.MultiheadAttention(in_dim, num_heads=nheads, batch_first=True)
        self.norm_out = torch.nn.LayerNorm(in_dim)

    def forward(self, x):
        B = x.size(0)
        x = self.encoder(x)
        q = self.queries.repeat(B, 1, 1)
        q = q + self.self_attn(q, q, q)[0]
        q = self.norm_q(q)
        out, attn = self.cross_attn(q, x, x)
        out = self.norm_out(out)
        return x, out, attn.detach()


class BoQ(torch.nn.Module):
    def __init__(self, in_channels=1024, proj_channels=512, num_queries=32, num_layers=2, row_dim=32):
        super().__init__()
        self.proj_c = torch.nn.Conv2d(in_channels, proj_channels, kernel_size=3, padding=1)
        self.norm_input = torch.nn.LayerNorm(proj_channels)
        in_dim = proj_channels
        self.boqs = torch.nn.ModuleList([
            BoQBlock(in_dim, num_queries, nheads=in_dim // 64) for _ in range(num_layers)])
        self.fc = torch.nn.Linear(num_layers * num_queries, row_dim)

    def forward(self, x):
        x = self.proj_c(x)
        x = x.flatten(2).permute(0, 2, 1)
        x = self.norm_input(x)
        outs = []
        attns = []
        for i in range(len(self.boqs)):
            x, out, attn = self.boqs[i](x)
            outs.append(out)
            attns.append(attn)
        out = torch.cat(outs, dim=1)
        out = self.fc(out.permute(0, 2, 1))
        out = out.flatten(1)
        out = torch.nn.functional.normalize(out, p=2, dim=-1)
        return out, attns


class BoQDinoBackbone(nn.Module):
    """Bag-of-Queries ``DinoV2`` (``unfreeze_n_blocks=2``, ``reshape_output=True``)."""

    def __init__(self, embed_dim=768, depth=12):
        super().__init__()
        self.dino = HubViT(embed_dim, depth)
        self.unfreeze_n_blocks = 2

    def forward(self, x):
        B, _, H, W = x.shape
        x = self.dino.prepare_tokens_with_masks(x)
        for blk in self.dino.blocks[: -self.unfreeze_n_blocks]:
            x = blk(x)
        for blk in self.dino.blocks[-self.unfreeze_n_blocks:]:
            x = blk(x)
        x = x[:, 1:]
        _, _, C = x.shape
        return x.permute(0, 2, 1).view(B, C, H // 14, W // 14)


class BoQResNetBackbone(nn.Module):
    """Bag-of-Queries ``ResNet(backbone_name='resnet50', crop_last_block=True)``."""

    def __init__(self):
        super().__init__()
        resnet = torchvision.models.resnet50(weights=None)
        self.net = nn.Sequential(resnet.conv1, resnet.bn1, resnet.relu, resnet.maxpool,
                                 resnet.layer1, resnet.layer2, resnet.layer3)

    def forward(self, x):
        return self.net(x)


class BoQVPRModel(torch.nn.Module):
    def __init__(self, backbone, aggregator):
        super().__init__()
        self.backbone = backbone
        self.aggregator = aggregator

    def forward(self, x):
        x = self.backbone(x)
        x, attns = self.aggregator(x)
        return x, attns


def boq_transform(image_size):
    """The BoQ README's ``input_transform`` (``image_size`` as (H, W))."""
    return T.Compose([
        T.ToTensor(),
        T.Resize(image_size, interpolation=T.InterpolationMode.BICUBIC, antialias=True),
        T.Normalize(mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225]),
    ])


# ---------------------------------------------------------------- SALAD and MegaLoc


def log_otp_solver(log_a, log_b, M, num_iters: int = 20, reg: float = 1.0) -> torch.Tensor:
    M = M / reg
    u, v = torch.zeros_like(log_a), torch.zeros_like(log_b)
    for _ in range(num_iters):
        u = log_a - torch.logsumexp(M + v.unsqueeze(1), dim=2).squeeze()
        v = log_b - torch.logsumexp(M + u.unsqueeze(2), dim=1).squeeze()
    return M + u.unsqueeze(2) + v.unsqueeze(1)


def get_matching_probs(S, dustbin_score=1.0, num_iters=3, reg=1.0):
    batch_size, m, n = S.size()
    S_aug = torch.empty(batch_size, m + 1, n, dtype=S.dtype, device=S.device)
    S_aug[:, :m, :n] = S
    S_aug[:, m, :] = dustbin_score
    norm = -torch.tensor(math.log(n + m), device=S.device)
    log_a, log_b = norm.expand(m + 1).contiguous(), norm.expand(n).contiguous()
    log_a[-1] = log_a[-1] + math.log(n - m)
    log_a, log_b = log_a.expand(batch_size, -1), log_b.expand(batch_size, -1)
    log_P = log_otp_solver(log_a, log_b, S_aug, num_iters=num_iters, reg=reg)
    return log_P - norm


class SALAD(nn.Module):
    def __init__(self, num_channels=1536, num_clusters=64, cluster_dim=128, token_dim=256, mlp_dim=512,
                 dropout=0.3):
        super().__init__()
        self.num_channels = num_channels
        self.num_clusters = num_clusters
        self.cluster_dim = cluster_dim
        self.token_dim = token_dim
        dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.token_features = nn.Sequential(
            nn.Linear(self.num_channels, mlp_dim), nn.ReLU(), nn.Linear(mlp_dim, self.token_dim))
        self.cluster_features = nn.Sequential(
            nn.Conv2d(self.num_channels, mlp_dim, 1), dropout, nn.ReLU(), nn.Conv2d(mlp_dim, self.cluster_dim, 1))
        self.score = nn.Sequential(
            nn.Conv2d(self.num_channels, mlp_dim, 1), dropout, nn.ReLU(), nn.Conv2d(mlp_dim, self.num_clusters, 1))
        self.dust_bin = nn.Parameter(torch.tensor(1.))

    def forward(self, x):
        x, t = x
        f = self.cluster_features(x).flatten(2)
        p = self.score(x).flatten(2)
        t = self.token_features(t)
        p = get_matching_probs(p, self.dust_bin, 3)
        p = torch.exp(p)
        p = p[:, :-1, :]
        p = p.unsqueeze(1).repeat(1, self.cluster_dim, 1, 1)
        f = f.unsqueeze(2).repeat(1, 1, self.num_clusters, 1)
        f = torch.cat([
            nn.functional.normalize(t, p=2, dim=-1),
            nn.functional.normalize((f * p).sum(dim=-1), p=2, dim=1).flatten(1)
        ], dim=-1)
        return nn.functional.normalize(f, p=2, dim=-1)


class SaladDino(nn.Module):
    """serizba/salad ``models/backbones/dinov2.DINOv2`` with the hub config of ``dinov2_salad``."""

    def __init__(self, embed_dim=768, depth=12, norm_layer=True, mask_token=True):
        super().__init__()
        self.model = HubViT(embed_dim, depth, mask_token=mask_token)
        self.num_channels = embed_dim
        self.num_trainable_blocks = 4
        self.norm_layer = norm_layer

    def forward(self, x):
        B, C, H, W = x.shape
        x = self.model.prepare_tokens_with_masks(x)
        for blk in self.model.blocks[:-self.num_trainable_blocks]:
            x = blk(x)
        for blk in self.model.blocks[-self.num_trainable_blocks:]:
            x = blk(x)
        if self.norm_layer:
            x = self.model.norm(x)
        t = x[:, 0]
        f = x[:, 1:]
        f = f.reshape((B, H // 14, W // 14, self.num_channels)).permute(0, 3, 1, 2)
        return f, t


class SaladVPRModel(nn.Module):
    def __init__(self, backbone, aggregator):
        super().__init__()
        self.backbone = backbone
        self.aggregator = aggregator

    def forward(self, x):
        return self.aggregator(self.backbone(x))


def salad_transform(image_size):
    """serizba/salad ``eval.py`` ``input_transform`` (``image_size`` as (H, W))."""
    return T.Compose([
        T.Resize(image_size, interpolation=T.InterpolationMode.BILINEAR),
        T.ToTensor(),
        T.Normalize(mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225]),
    ])


class MegaLocBackbone(nn.Module):
    """MegaLoc's ``DINOv2``: the ViT's normalised patch tokens and class token. ``old=True``: the
    ``megaloc.torch`` layout (hub model under ``.model``), else ``model.safetensors`` (flat)."""

    def __init__(self, embed_dim=768, depth=12, old=False):
        super().__init__()
        vit = HubViT(embed_dim, depth, mask_token=old)
        if old:
            self.model = vit
        else:
            self.__dict__["model"] = vit          # the parameters sit directly under backbone.*
            for name, child in vit.named_children():
                self.add_module(name, child)
            self.cls_token, self.pos_embed = vit.cls_token, vit.pos_embed
        self.num_channels = embed_dim

    def forward(self, images):
        B, C, H, W = images.shape
        x = self.model.prepare_tokens_with_masks(images)
        for block in self.model.blocks:
            x = block(x)
        x = self.model.norm(x)
        features = x[:, 1:].reshape((B, H // 14, W // 14, self.num_channels)).permute(0, 3, 1, 2)
        return features, x[:, 0]


class MegaLocAggregator(nn.Module):
    def __init__(self, feat_dim, agg_config, salad_out_dim):
        super().__init__()
        self.agg = SALAD(**agg_config)
        self.linear = nn.Linear(salad_out_dim, feat_dim)

    def forward(self, x):
        return self.linear(self.agg(x))


class MegaLoc(nn.Module):
    def __init__(self, feat_dim=8448, num_clusters=64, cluster_dim=256, token_dim=256, mlp_dim=512, embed_dim=768,
                 depth=12, old=False):
        super().__init__()
        self.backbone = MegaLocBackbone(embed_dim, depth, old)
        self.aggregator = MegaLocAggregator(
            feat_dim, {"num_channels": embed_dim, "num_clusters": num_clusters, "cluster_dim": cluster_dim,
                       "token_dim": token_dim, "mlp_dim": mlp_dim}, num_clusters * cluster_dim + token_dim)

    def forward(self, images):
        b, c, h, w = images.shape
        if h % 14 != 0 or w % 14 != 0:
            h = round(h / 14) * 14
            w = round(w / 14) * 14
            images = T.functional.resize(images, [h, w], antialias=True)
        return F.normalize(self.aggregator(self.backbone(images)), p=2.0, dim=1)


def megaloc_transform():
    """VPR-methods-evaluation ``test_dataset.py`` without ``--image_size``."""
    return T.Compose([T.ToTensor(), T.Normalize(mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225])])


# ---------------------------------------------------------------- weights off their defaults


@torch.no_grad()
def perturb(model: nn.Module, seed: int) -> nn.Module:
    """Every parameter and buffer moved off its default: LayerNorm/BatchNorm weights around 1,
    biases, layer scales, tokens, queries, position embeddings and BN statistics random, attention
    projections scaled up so that attention is far from uniform."""
    g = torch.Generator().manual_seed(seed)
    for name, p in list(model.named_parameters()) + list(model.named_buffers()):
        if not p.is_floating_point():
            continue
        r = torch.randn(p.shape, generator=g)
        if name.endswith("running_var"):
            p.copy_(0.5 + torch.rand(p.shape, generator=g))
        elif name.endswith("gamma"):
            p.copy_(0.3 + 0.2 * r)
        elif p.ndim == 1 and ("norm" in name or "bn" in name or ".net.1." in name or "downsample.1" in name) \
                and name.endswith("weight"):
            p.copy_(1 + 0.2 * r)
        elif p.ndim <= 1:
            p.copy_(0.1 * r if p.ndim == 1 else 0.5 + 0.3 * r)
        elif name.endswith(("pos_embed", "cls_token", "queries", "mask_token")):
            p.copy_(r)
        else:
            fan_in = p[0].numel()
            gain = 4.0 if ("qkv" in name or "in_proj" in name) else 1.0
            p.copy_(gain * r / math.sqrt(fan_in))
    return model.eval()
