"""The SeqMatchNet model: a per-frame projection (``pool``) and the sequence matcher.

State-dict keys follow the reference (``pool.1.conv.weight`` / ``.bias``) so
released checkpoints load unchanged.
"""
from __future__ import annotations

import argparse
import logging
from pathlib import Path

import torch
from torch import nn

from seqMatchNet import SeqMatchNet
from utils import UserError

log = logging.getLogger(__name__)


class L2Norm(nn.Module):
    def __init__(self, dim: int = -1) -> None:
        super().__init__()
        self.dim = dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.normalize(x, p=2, dim=self.dim)


class Flatten(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.reshape(x.shape[0], -1)


class WXpB(nn.Module):
    """``W x + b`` on each frame descriptor as a 1x1 temporal convolution:
    ``[N, C, 1, 1] -> [N, 1, outDims]``."""

    def __init__(self, in_dims: int, out_dims: int) -> None:
        super().__init__()
        self.conv = nn.Conv1d(in_dims, out_dims, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x.flatten(2)).permute(0, 2, 1)


class SeqNetConv(nn.Module):
    """SeqNet: a temporal convolution over a window, averaged over time:
    ``[N, L, C] -> [N, outDims]`` (kernel ``w`` <= L)."""

    def __init__(self, in_dims: int, out_dims: int, w: int) -> None:
        super().__init__()
        self.conv = nn.Conv1d(in_dims, out_dims, kernel_size=w)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x.permute(0, 2, 1)).mean(dim=-1)


SEQUENCE_DESCRIPTOR_METHODS = ("smooth", "delta", "seqnet")
METHODS = ("seqmatch", "single") + SEQUENCE_DESCRIPTOR_METHODS


def smooth_weights(seq_len: int) -> torch.Tensor:
    """Equal weights ``[L]``: the window mean."""
    return torch.full((seq_len,), 1.0 / seq_len)


def delta_weights(seq_len: int) -> torch.Tensor:
    """Delta Descriptors ``[L]``: -2/L on the first floor(L/2) frames, +2/L on the others."""
    w = torch.full((seq_len,), 2.0 / seq_len)
    w[: seq_len // 2] = -2.0 / seq_len
    return w


class SeqMatchModel(nn.Module):
    """``pool`` maps frame descriptors ``[N, C]`` to L2-normalised ``[N, outDims]``
    (the learned 1x1 projection with ``pooling``, else the raw descriptors);
    ``matcher`` compares aligned sequences.

    With ``method='seqnet'``, ``pool`` is SeqNet's temporal convolution
    instead and maps windows ``[N, L, C]`` to one descriptor each; ``smooth``
    and ``delta`` combine the frame descriptors of a window with fixed weights.
    """

    def __init__(self, encoder_dim: int, pooling: bool, out_dims: int, matcher: str = "seqMatchNet",
                 method: str = "meanOfPairs", sequence_method: str = "seqmatch", w: int = 5) -> None:
        super().__init__()
        if sequence_method not in METHODS:
            raise UserError(f"unknown --method {sequence_method!r}; choose one of {', '.join(METHODS)}")
        self.encoder_dim = encoder_dim
        self.sequence_method = sequence_method
        self.learned = pooling or sequence_method == "seqnet"
        self.out_dims = out_dims if self.learned else encoder_dim
        if sequence_method == "seqnet":
            self.pool = nn.Sequential(SeqNetConv(encoder_dim, out_dims, w), Flatten(), L2Norm(dim=-1))
        elif pooling:
            self.pool = nn.Sequential(nn.AdaptiveMaxPool2d((1, 1)), WXpB(encoder_dim, out_dims), L2Norm(dim=-1))
        else:
            self.pool = nn.Sequential(nn.AdaptiveMaxPool2d((1, 1)), Flatten(), L2Norm(dim=-1))
        self.matcher = nn.Sequential(SeqMatchNet(method)) if matcher == "seqMatchNet" else None

    @property
    def describes_sequences(self) -> bool:
        """True when a window is compared through one descriptor (smooth, delta, seqnet)."""
        return self.sequence_method in SEQUENCE_DESCRIPTOR_METHODS

    def _check_dims(self, x: torch.Tensor) -> None:
        if x.shape[-1] != self.encoder_dim:
            raise UserError(f"descriptors have {x.shape[-1]} dimensions but the model expects "
                            f"{self.encoder_dim}: use the descriptors the model was trained on")

    def encode(self, frames: torch.Tensor) -> torch.Tensor:
        """Frame descriptors ``[N, C]`` -> projected, L2-normalised ``[N, outDims]``."""
        self._check_dims(frames)
        if self.sequence_method == "seqnet":
            raise ValueError("a SeqNet model describes windows, not frames: use describe()")
        pool = self.pool
        if isinstance(pool, nn.Sequential):
            pool = pool[1:]     # its first layer max-pools a 1x1 map: the identity, skipped
        return pool(frames[:, :, None, None]).reshape(frames.shape[0], -1)

    def describe(self, windows: torch.Tensor) -> torch.Tensor:
        """One L2-normalised descriptor per window: ``[N, L, C] -> [N, outDims]``."""
        self._check_dims(windows)
        n, seq_len, _ = windows.shape
        if self.sequence_method == "seqnet":
            pool = self.pool.module if isinstance(self.pool, nn.DataParallel) else self.pool
            if seq_len < pool[0].conv.kernel_size[0]:
                raise UserError(f"SeqNet's kernel w={pool[0].conv.kernel_size[0]} is longer than "
                                f"--seqL {seq_len}: use --w <= --seqL")
            return self.pool(windows)
        frames = self.encode(windows.reshape(n * seq_len, -1)).reshape(n, seq_len, -1)
        weights = (delta_weights if self.sequence_method == "delta" else smooth_weights)(seq_len)
        return nn.functional.normalize(torch.einsum("nld,l->nd", frames, weights.to(frames)), dim=-1)

    def forward(self, frames: torch.Tensor) -> torch.Tensor:
        return self.encode(frames)


def get_model(opt: argparse.Namespace, encoder_dim: int) -> SeqMatchModel:
    method = getattr(opt, "method", "seqmatch")
    if method == "seqnet" and opt.w > opt.seqL:
        raise UserError(f"SeqNet's kernel --w {opt.w} is longer than --seqL {opt.seqL}: use --w <= --seqL")
    model = SeqMatchModel(encoder_dim, opt.pooling, opt.outDims, opt.matcher, opt.loss_trip_method,
                          method, getattr(opt, "w", 5))
    if opt.pooling and method != "seqnet" and getattr(opt, "init", "random") == "identity":
        init_identity(model)
    return model


def init_identity(model: SeqMatchModel) -> None:
    """Start the projection at the identity (needs outDims == input dims):
    training then begins from the raw descriptors instead of a random projection."""
    conv = model.pool[1].conv
    if conv.out_channels != conv.in_channels:
        raise UserError(f"--init identity needs --outDims equal to the descriptor dimensions ({conv.in_channels})")
    with torch.no_grad():
        conv.weight.copy_(torch.eye(conv.in_channels)[:, :, None])
        conv.bias.zero_()


def load_state(model: SeqMatchModel, state_dict: dict, source: str) -> None:
    """Load a (possibly DataParallel-prefixed) state dict, checking shapes with a clear message."""
    state = {k.replace("pool.module.", "pool."): v for k, v in state_dict.items()}
    own = model.state_dict()
    unknown = sorted(set(state) - set(own))
    missing = sorted(set(own) - set(state))
    if unknown or missing:
        raise UserError(f"checkpoint {source} does not fit this model (unexpected keys {unknown[:4]}, missing "
                        f"{missing[:4]}): it comes from another model; check --pooling / --method")
    for key, value in state.items():
        if tuple(value.shape) != tuple(own[key].shape):
            raise UserError(f"checkpoint {source}: {key} has shape {tuple(value.shape)} but the model needs "
                            f"{tuple(own[key].shape)}: check --outDims and that the descriptors (--descType, "
                            "--dataset) are the ones it was trained on")
        if not torch.isfinite(value).all():
            raise UserError(f"checkpoint {source}: {key} holds NaN/Inf values; use another checkpoint")
    model.load_state_dict(state)


def checkpoint_path(run_dir: Path, opt: argparse.Namespace) -> Path:
    """``RUNDIR/<savePath>/checkpoint.pth.tar`` (``--ckpt latest``) or ``model_best.pth.tar`` (``--ckpt best``)."""
    name = "model_best.pth.tar" if opt.ckpt == "best" else "checkpoint.pth.tar"
    return Path(run_dir) / opt.savePath / name


def open_run(opt: argparse.Namespace) -> tuple[argparse.Namespace, Path, Path, dict]:
    """For ``--resume RUNDIR``: the options with those of the run's flags.json restored,
    the run folder, the checkpoint's path and the checkpoint (loaded to the CPU)."""
    from options import restore_flags
    from utils import load_checkpoint

    run_dir = Path(opt.resume)
    opt = restore_flags(opt, run_dir / opt.savePath / "flags.json")
    ckpt_file = checkpoint_path(run_dir, opt)
    return opt, run_dir, ckpt_file, load_checkpoint(ckpt_file)


def parallelize(model: SeqMatchModel, n_gpu: int, device: torch.device) -> SeqMatchModel:
    """Wrap ``pool`` in ``nn.DataParallel`` for ``--nGPU`` > 1 (state-dict keys
    ``pool.module.*``, as in the reference; checkpoints are saved without the prefix)."""
    if n_gpu > 1:
        if device.type != "cuda" or torch.cuda.device_count() < n_gpu:
            raise UserError(f"--nGPU {n_gpu} needs {n_gpu} CUDA devices; found "
                            f"{torch.cuda.device_count() if device.type == 'cuda' else 0}")
        model.pool = nn.DataParallel(model.pool)
    return model
