"""What every image model shares: the model names and their releases, ImageNet normalisation,
``ImageModel`` (a network with its input size and title) and checkpoint-key helpers.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from seqmatchnet.common.errors import UserError

MODELS = ("netvlad", "cosplace", "eigenplaces", "mixvpr", "boq", "salad", "megaloc")
TITLES = {"netvlad": "NetVLAD (Patch-NetVLAD)", "cosplace": "CosPlace",
          "eigenplaces": "EigenPlaces", "mixvpr": "MixVPR", "boq": "BoQ", "salad": "SALAD",
          "megaloc": "MegaLoc"}
RELEASES = {
    "netvlad": "https://huggingface.co/TobiasRobotics/Patch-NetVLAD/resolve/main/"
               "pitts_WPCA4096.pth.tar",
    "cosplace": "https://github.com/gmberton/CosPlace/releases (e.g. ResNet50_2048_cosplace.pth)",
    "eigenplaces": "https://github.com/gmberton/EigenPlaces/releases (e.g. "
                   "ResNet50_2048_eigenplaces.pth)",
    "mixvpr": "the MixVPR README (github.com/amaralibey/MixVPR): "
              "resnet50_MixVPR_4096_channels(1024)_rows(4).ckpt",
    "boq": "https://github.com/amaralibey/Bag-of-Queries/releases/tag/v1.0 (dinov2_12288.pth or "
           "resnet50_16384.pth)",
    "salad": "https://github.com/serizba/salad/releases/download/v1.0.0/dino_salad.ckpt",
    "megaloc": "https://huggingface.co/gberton/MegaLoc (model.safetensors)",
}
# how an image is resized to the model's input size
RESIZES = {"bilinear": "Pillow bilinear to image_size (W, H)",
           "bicubic": "torchvision Resize to image_size (W, H) on the [0, 1] tensor, bicubic, "
                      "antialias"}
CHECKPOINT_URL = RELEASES["netvlad"]
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


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
    resize: str = "bilinear"                 # a key of RESIZES
    multiple: int | None = None              # the image sides must be multiples of it (ViT/14)
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD
    extras: dict = field(default_factory=dict)

    @property
    def out_dim(self) -> int:
        return self.dim

    def check_size(self, size: tuple[int, int] | None) -> None:
        """A ``UserError`` when images of ``size`` (W, H) cannot go through the network."""
        if self.multiple is not None:
            self._check_multiple(size)
        if self.cells is None:
            return
        side = math.isqrt(self.cells)
        pixels = side * 2 ** self.stride_steps
        example = f"{pixels},{pixels}" if side * side == self.cells else "W,H"
        if size is None:
            raise UserError("MixVPR needs a fixed --imageSize: its aggregator mixes exactly "
                            f"{self.cells} feature cells (H/16 x W/16), e.g. --imageSize {example}")
        got = feature_cells(size[1], self.stride_steps) * feature_cells(size[0], self.stride_steps)
        if got != self.cells:
            raise UserError(f"--imageSize {size[0]},{size[1]} gives {got} feature cells but this "
                            f"MixVPR checkpoint mixes {self.cells} (H/16 x W/16): use e.g. "
                            f"--imageSize {example}")

    def _check_multiple(self, size: tuple[int, int] | None) -> None:
        m = self.multiple
        if size is None:
            raise UserError(f"this {self.name} network needs a fixed --imageSize with sides that "
                            f"are multiples of {m}, e.g. --imageSize {23 * m},{23 * m}")
        if size[0] % m or size[1] % m:
            near = ",".join(str(max(m, round(s / m) * m)) for s in size)
            raise UserError(f"--imageSize {size[0]},{size[1]}: this {self.name} network takes "
                            f"sides that are multiples of {m} (patches of {m} pixels): use e.g. "
                            f"--imageSize {near}")

    def preprocessing(self, size: tuple[int, int] | None) -> dict:
        """What is done to an image before the network, as stored in the extraction metadata."""
        own = "none (each image at its own size)" + (
            "; the network resizes to the nearest multiples of 14 (bilinear, antialias)"
            if self.name == "megaloc" else "")
        return {"image_size": list(size) if size else None,
                "resize": RESIZES[self.resize] if size else own,
                "colour": "RGB", "scale": "[0, 1]", "mean": list(self.mean), "std": list(self.std)}


def feature_cells(pixels: int, steps: int) -> int:
    """Feature-map length after ``steps`` stride-2 stages of a torchvision ResNet (3x3/7x7 kernels,
    padding k//2): each maps n to floor((n - 1) / 2) + 1."""
    for _ in range(steps):
        pixels = (pixels - 1) // 2 + 1
    return pixels


def _meta_build(build: Callable[[], nn.Module]) -> nn.Module:
    """``build()`` on the meta device, then moved to the CPU uninitialised (the checkpoint fills
    it): no random initialisation of weights that are overwritten."""
    with torch.device("meta"):
        module = build()
    return module.to_empty(device="cpu")


# ---------------------------------------------------------------- checkpoints

def looks_like(state: dict[str, torch.Tensor]) -> str | None:
    """The model whose checkpoint layout ``state`` has (CosPlace and EigenPlaces share one), or
    None."""
    if "pool.centroids" in state:
        return "netvlad"
    if any(k.startswith("aggregator.mix.") for k in state):
        return "mixvpr"
    if "aggregation.1.p" in state:
        return "cosplace"
    if "aggregator.proj_c.weight" in state:
        return "boq"
    if "aggregator.linear.weight" in state and "aggregator.agg.dust_bin" in state:
        return "megaloc"
    if "aggregator.dust_bin" in state:
        return "salad"
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
    hint = {"netvlad": "; a NetVLAD checkpoint: use --model netvlad",
            "mixvpr": "; a MixVPR checkpoint: use --model "
            "mixvpr", "cosplace": "; a CosPlace/EigenPlaces checkpoint: use --model cosplace or "
                                  "eigenplaces",
            "boq": "; a BoQ checkpoint: use --model boq", "salad": "; a SALAD checkpoint: use "
            "--model salad", "megaloc": "; a MegaLoc checkpoint: use --model megaloc"}
    more = " ..." if len(groups) > 6 else ""
    return f"found {len(state)} keys: {listed}{more}{hint.get(other, '')}"


def load_checked(module: nn.Module, state: dict[str, torch.Tensor], source: str, what: str,
                 unexpected_hint: str) -> None:
    """Load ``state`` into ``module`` (then eval mode) after checking every key and shape: a
    missing, unexpected or misshapen key is a ``UserError`` naming it. BatchNorm's
    ``num_batches_tracked`` may be absent (it is not used in eval mode)."""
    expected = {k: tuple(v.shape) for k, v in module.state_dict().items()}
    for key, shape in expected.items():
        if key not in state and not key.endswith("num_batches_tracked"):
            raise UserError(f"{source}: key {key!r} (shape {list(shape)}) is missing: not a "
                            f"complete checkpoint of {what}")
        if key in state and tuple(state[key].shape) != shape:
            raise UserError(f"{source}: {key!r} has shape {list(state[key].shape)}, expected "
                            f"{list(shape)} ({what})")
    unexpected = [k for k in state if k not in expected]
    if unexpected:
        raise UserError(f"{source}: unexpected key {unexpected[0]!r} (shape "
                        f"{list(state[unexpected[0]].shape)})"
                        f"{f' and {len(unexpected) - 1} more' if len(unexpected) > 1 else ''}: "
                        f"{unexpected_hint}")
    for key, value in module.state_dict().items():
        if key.endswith("num_batches_tracked") and key not in state:
            value.zero_()
    module.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in state.items()},
                           strict=False)
    module.eval()


def strip_module_prefix(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Keys without the ``module.`` parts that multi-GPU training adds."""
    return {".".join(p for p in k.split(".") if p != "module"): v for k, v in state.items()}
