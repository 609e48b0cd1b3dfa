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

- ``boq``: BoQ (``images/boq.py``), ResNet-50 to layer3 or DINOv2 ViT-B/14 (no final norm).
- ``salad`` and ``megaloc``: DINOv2 ViT-B/14 + SALAD (``images/salad.py``; the ViT from timm,
  ``images/dinov2.py``).

The architecture is read from the checkpoint: the backbone depth from its keys, the output size
from the last layer's shape, the aggregators' settings from their weights' shapes. Files load
without running code: ``torch.load(weights_only=True)`` or safetensors.
"""
from __future__ import annotations

from pathlib import Path

import torch

from seqmatchnet.common.errors import UserError
from seqmatchnet.common.files import numpy_safe_globals
from seqmatchnet.images.base import MODELS, RELEASES, TITLES, ImageModel, strip_module_prefix
from seqmatchnet.images.boq import boq_from_state
from seqmatchnet.images.cosplace import geolocalization_from_state
from seqmatchnet.images.mixvpr import mixvpr_from_state
from seqmatchnet.images.netvlad import NETVLAD_SIZE, netvlad_from_state
from seqmatchnet.images.salad import megaloc_from_state, salad_from_state

FROM_STATE = {"mixvpr": mixvpr_from_state, "boq": boq_from_state, "salad": salad_from_state,
              "megaloc": megaloc_from_state}


def is_safetensors(path: Path) -> bool:
    """Whether ``path`` is a safetensors file (an 8-byte header length, then a JSON header)."""
    with open(path, "rb") as f:
        head = f.read(9)
    return len(head) == 9 and head[8:9] == b"{"


def _load_file(path: Path, name: str):
    """The file's content, read without running code: safetensors, or ``torch.load`` weights-only
    (a pickled object is refused)."""
    if is_safetensors(path):
        from safetensors.torch import load_file

        return load_file(str(path), device="cpu")
    with torch.serialization.safe_globals(numpy_safe_globals()):
        return torch.load(path, map_location="cpu", weights_only=True)


def read_state(path: Path, name: str) -> dict[str, torch.Tensor]:
    """The state dict of a checkpoint file (bare, or under ``'state_dict'``), loaded weights-only
    onto the CPU, ``module.`` prefixes removed."""
    path = Path(path)
    flag = "--netvladCkpt (or --weights)" if name == "netvlad" else "--weights"
    if not path.is_file():
        raise UserError(f"{TITLES[name]} checkpoint {path} not found: download one, e.g. "
                        f"{RELEASES[name]}, and pass it with {flag}")
    try:
        ckpt = _load_file(path, name)
    except Exception as exc:   # torch raises many error types for bad files
        text = " ".join(str(exc).split())
        raise UserError(f"{TITLES[name]} checkpoint {path} could not be loaded weights-only "
                        f"({text:.160}): is it a complete checkpoint file? (e.g. "
                        f"{RELEASES[name]})") from exc
    state = ckpt.get("state_dict", ckpt) if isinstance(ckpt, dict) else None
    if not isinstance(state, dict) or not state or not all(isinstance(v, torch.Tensor)
                                                           for v in state.values()):
        raise UserError(f"{TITLES[name]} checkpoint {path} holds no state dict of tensors (bare "
                        f"or under 'state_dict'): not a {TITLES[name]} checkpoint (e.g. "
                        f"{RELEASES[name]})")
    return strip_module_prefix(state)


def model_from_state(name: str, state: dict[str, torch.Tensor],
                     source: str = "checkpoint") -> ImageModel:
    """The ``ImageModel`` of ``name`` (one of ``MODELS``) from a state dict; a state dict that fits
    none of its architectures is a one-line ``UserError`` saying what was found."""
    if name not in MODELS:
        raise UserError(f"--model {name!r}: choose one of {', '.join(MODELS)}")
    state = strip_module_prefix(state)
    if name == "netvlad":
        net = netvlad_from_state(state, source)
        what = f"VGG16 to conv5_3 + NetVLAD K={net.pool.num_clusters}" + (f" + WPCA {net.out_dim}"
                                                                          if net.WPCA else "")
        return ImageModel("netvlad", net, net.out_dim, what, NETVLAD_SIZE)
    if name in FROM_STATE:
        return FROM_STATE[name](state, source)
    return geolocalization_from_state(state, name, source)


def load_model(name: str, path: Path) -> ImageModel:
    """Read checkpoint ``path`` as model ``name`` (CPU, eval mode)."""
    return model_from_state(name, read_state(Path(path), name), f"{TITLES[name]} checkpoint {path}")
