"""The SeqMatchNet model: a per-frame projection (``pool``) and the sequence matcher, and the
comparison methods, behind one interface.

Two families of models compare windows of L frames. *Frame models* (``seqmatch``, ``single``)
project each frame and compare windows by sequence matching (single: L = 1); *window models*
(``smooth``, ``delta``, ``seqnet``) turn each window into one descriptor. Both offer the same three
calls, so evaluation, mining and the loss need not know which they have: ``embed_windows`` (a
traversal's windows as a ``WindowEmbedding``), ``window_distance_matrix`` (the mining matrix) and
``triplet_distances`` (the loss's distances).

State-dict keys follow the reference (``pool.1.conv.weight`` / ``.bias``) so released checkpoints
load unchanged.
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from seqmatchnet.common.errors import UserError
from seqmatchnet.common.logs import progress, progress_enabled
from seqmatchnet.data.descriptors import rows_of
from seqmatchnet.matching.seqmatch import frame_distances, sequence_distance, window_distances
from seqmatchnet.models.layers import Flatten, L2Norm
from seqmatchnet.speeds.loss import trajectory_sequence_distance


class WXpB(nn.Module):
    """``W x + b`` on each frame descriptor: ``[N, C, 1, 1] -> [N, 1, outDims]`` (any ``[N, C, *]``
    gives ``[N, prod(*), outDims]``).

    The reference's 1x1 temporal convolution, computed as one matrix product (``F.linear`` with the
    kernel viewed as ``[out, in]``): the same values, many times faster than ``conv1d`` on ``[N, C,
    1]`` on the CPU. ``conv`` only holds the parameters, so the state-dict keys and shapes stay the
    reference's (``conv.weight`` ``[out, in, 1]``, ``conv.bias``).
    """

    def __init__(self, in_dims: int, out_dims: int) -> None:
        super().__init__()
        self.conv = nn.Conv1d(in_dims, out_dims, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.conv.weight
        return nn.functional.linear(x.flatten(2).transpose(1, 2), weight.view(weight.shape[0], -1),
                                    self.conv.bias)


class SeqNetConv(nn.Module):
    """SeqNet: a temporal convolution over a window, averaged over time: ``[N, L, C] -> [N,
    outDims]`` (kernel ``w`` <= L)."""

    def __init__(self, in_dims: int, out_dims: int, w: int) -> None:
        super().__init__()
        self.conv = nn.Conv1d(in_dims, out_dims, kernel_size=w)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # The convolution is linear, so its mean over the L - w + 1 positions is the kernel applied
        # to the mean of the shifted windows: one matrix product [N, C*w] x [C*w, out] (conv1d on
        # the
        # CPU is several times slower); ``conv`` holds the parameters (reference keys and shapes).
        weight = self.conv.weight
        windows = x.unfold(1, weight.shape[-1], 1).mean(dim=1)          # [N, C, w]
        return nn.functional.linear(windows.reshape(x.shape[0], -1),
                                    weight.reshape(weight.shape[0], -1),
                                    self.conv.bias)


WINDOW_METHODS = ("smooth", "delta", "seqnet")      # one descriptor per window
METHODS = ("seqmatch", "single") + WINDOW_METHODS    # the choices of --method
FEATURE_BLOCK_BYTES = 128 * 1024**2   # project_frames: at least this much input + output per block


@dataclass(frozen=True)
class Projection:
    """How ``embed_windows`` projects a traversal's frames: on ``device``, ``batch_size`` rows at a
    time, with a progress bar named ``name`` unless ``quiet``, kept in ``dtype`` (None: the
    model's)."""

    device: torch.device
    batch_size: int
    name: str = "frames"
    quiet: bool = False
    dtype: torch.dtype | None = None


@dataclass
class WindowEmbedding:
    """A traversal's windows as a model sees them: frame features ``feats`` ``[F, D]`` with
    ``starts`` ``[N]`` the first row of each window in them (frame models), or one descriptor
    per window ``feats`` ``[N, D]`` with ``starts`` None (window models)."""

    feats: torch.Tensor
    starts: torch.Tensor | None

    def rows(self) -> torch.Tensor:
        """One row per window (for L = 1 or window models): ``[N, D]``."""
        return self.feats if self.starts is None else self.feats[self.starts]


def smooth_weights(seq_len: int) -> torch.Tensor:
    """Equal weights ``[L]``: the window mean."""
    return torch.full((seq_len,), 1.0 / seq_len)


def delta_weights(seq_len: int) -> torch.Tensor:
    """Delta Descriptors ``[L]``: -2/L on the first floor(L/2) frames, +2/L on the others."""
    w = torch.full((seq_len,), 2.0 / seq_len)
    w[: seq_len // 2] = -2.0 / seq_len
    return w


class SeqMatchModel(nn.Module):
    """A model of one of two families, chosen by ``method`` when constructed
    (``SeqMatchModel(...)`` returns a ``FrameModel`` or a ``WindowModel``):

    - ``FrameModel`` (``seqmatch``, ``single``): ``pool`` maps frame descriptors ``[N, C]`` to
      L2-normalised ``[N, outDims]`` (the learned 1x1 projection with ``pooling``, else the raw
      descriptors); windows are compared by sequence matching (single frames: L = 1, by faiss).
    - ``WindowModel`` (``smooth``, ``delta``, ``seqnet``): one descriptor per window; ``seqnet``'s
      ``pool`` is SeqNet's temporal convolution over ``[N, L, C]``, ``smooth`` and ``delta`` combine
      the (projected) frame descriptors of a window with fixed weights.

    Both offer the same three calls (module docstring); state-dict keys are the reference's.
    """

    def __new__(cls, *args, **kwargs):
        # (copies and unpickling call __new__ on the subclass, without arguments)
        if cls is SeqMatchModel:
            method = kwargs.get("method", args[4] if len(args) > 4 else "seqmatch")
            if method not in METHODS:
                raise UserError(f"unknown --method {method!r}; choose one of {', '.join(METHODS)}")
            cls = WindowModel if method in WINDOW_METHODS else FrameModel
        return super().__new__(cls)

    def __init__(self, encoder_dim: int, pooling: bool, out_dims: int, matcher: str = "seqMatchNet",
                 method: str = "seqmatch", w: int = 5) -> None:
        super().__init__()
        self.encoder_dim = encoder_dim
        self.method = method
        self.learned = pooling or method == "seqnet"
        self.out_dims = out_dims if self.learned else encoder_dim
        self.single_frames = method == "single" or matcher == "None"
        if method == "seqnet":
            self.pool = nn.Sequential(SeqNetConv(encoder_dim, out_dims, w), Flatten(),
                                      L2Norm(dim=-1))
        elif pooling:
            self.pool = nn.Sequential(nn.AdaptiveMaxPool2d((1, 1)), WXpB(encoder_dim, out_dims),
                                      L2Norm(dim=-1))
        else:
            self.pool = nn.Sequential(nn.AdaptiveMaxPool2d((1, 1)), Flatten(), L2Norm(dim=-1))

    describes_windows = False          # True for window models: one descriptor per window

    @property
    def compares_descriptors(self) -> bool:
        """True when windows are compared as single descriptors (window models, single frames):
        nearest neighbours by Euclidean distance instead of sequence matching."""
        return self.describes_windows or self.single_frames

    def _check_dims(self, x: torch.Tensor) -> None:
        if x.shape[-1] != self.encoder_dim:
            raise UserError(f"descriptors have {x.shape[-1]} dimensions but the model expects "
                            f"{self.encoder_dim}: use the descriptors the model was trained on")

    def encode(self, frames: torch.Tensor, overwrite: bool = False) -> torch.Tensor:
        """Frame descriptors ``[N, C]`` -> projected, L2-normalised ``[N, outDims]``.

        Without gradients the normalisation divides in place (the same values as
        ``nn.functional.normalize``, without another ``[N, outDims]`` buffer); raw descriptors (no
        projection) are then normalised in ``frames`` itself, and only when ``overwrite`` allows
        it."""
        self._check_dims(frames)
        if self.method == "seqnet":
            raise ValueError("a SeqNet model describes windows, not frames: use describe()")
        # the first layer max-pools a 1x1 map (the identity) and the last is the L2Norm: both
        # skipped
        x = self.pool[1:-1](frames[:, :, None, None]).reshape(frames.shape[0], -1)
        if x.requires_grad or (not overwrite and x.data_ptr() == frames.data_ptr()):
            return nn.functional.normalize(x, p=2, dim=-1)
        return normalise_(x)

    def forward(self, frames: torch.Tensor) -> torch.Tensor:
        return self.encode(frames)


class FrameModel(SeqMatchModel):
    """``seqmatch`` and ``single``: projected frames, windows compared by sequence matching."""

    @torch.no_grad()
    def embed_windows(self, desc: np.ndarray, starts: np.ndarray, seq_len: int, how: Projection,
                      all_frames: bool = False) -> WindowEmbedding:
        """The windows starting at ``starts`` of the traversal ``desc`` ``[N, C]`` (an array or a
        ``datasets.DescriptorSource``), in eval mode: the frames the windows cover (every frame with
        ``all_frames``), projected as ``how`` says and kept in ``how.dtype`` (default: the
        model's)."""
        if all_frames:
            frames, local = np.arange(len(desc)), np.asarray(starts)
        else:
            frames, local = window_frames(starts, seq_len)
        feats = project_frames(self, rows_of(desc, frames), how.device, how.batch_size, how.name,
                               how.quiet, how.dtype)
        return WindowEmbedding(feats, torch.as_tensor(local, device=feats.device))

    def window_distance_matrix(self, db: WindowEmbedding, q: WindowEmbedding, seq_len: int,
                               distance: str = "meanOfPairs") -> torch.Tensor:
        """Sequence distances (``distance``) of every database window to every query window ``[Nd,
        Nq]``."""
        return window_distances(db.feats, q.feats, db.starts, q.starts, seq_len, distance)

    def triplet_distances(self, frames: torch.Tensor, q_idx: torch.Tensor, p_idx: torch.Tensor,
                          n_idx: torch.Tensor, distance: str = "meanOfPairs",
                          p_valid: torch.Tensor | None = None,
                          n_valid: torch.Tensor | None = None, weights: torch.Tensor | None = None
                          ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(d(q, p) [B], d(q, n) [B, K])`` with gradients, for windows given as rows of ``frames``
        ``[R, C]`` (raw descriptors, each distinct frame once, projected once): ``q_idx``, ``p_idx``
        ``[B, L]`` and ``n_idx`` ``[B, K, L]``. Across speeds (``p_valid`` ``[B, T]``, ``n_valid``
        ``[B, K, T]``) ``p_idx`` ``[B, T, L]`` and ``n_idx`` ``[B, K, T, L]`` hold each trajectory's
        frames, and a distance is the smallest over the valid trajectories (``velocity``; inf when
        none is); with midpoints the indices gain a last axis of 2 frames weighted by ``weights``
        ``[T, L, 2]``."""
        feats = self.encode(frames)
        fq, fp, fn = feats[q_idx], feats[p_idx], feats[n_idx]
        if p_valid is None:
            return sequence_distance(fq, fp, distance), sequence_distance(fq[:, None], fn, distance)
        return (trajectory_sequence_distance(fq, fp, p_valid, distance, weights=weights),
                trajectory_sequence_distance(fq[:, None], fn, n_valid, distance, weights=weights))


class WindowModel(SeqMatchModel):
    """``smooth``, ``delta`` and ``seqnet``: one descriptor per window, compared by Euclidean
    distance."""

    describes_windows = True

    def describe(self, windows: torch.Tensor) -> torch.Tensor:
        """One L2-normalised descriptor per window: ``[N, L, C] -> [N, outDims]``."""
        self._check_dims(windows)
        n, seq_len, _ = windows.shape
        if self.method == "seqnet":
            pool = self.pool.module if isinstance(self.pool, nn.DataParallel) else self.pool
            if seq_len < pool[0].conv.kernel_size[0]:
                raise UserError(f"SeqNet's kernel w={pool[0].conv.kernel_size[0]} is longer than "
                                f"--seqL {seq_len}: use --w <= --seqL")
            return self.pool(windows)
        frames = self.encode(windows.reshape(n * seq_len, -1)).reshape(n, seq_len, -1)
        weights = (delta_weights if self.method == "delta" else smooth_weights)(seq_len)
        return nn.functional.normalize(torch.einsum("nld,l->nd", frames, weights.to(frames)),
                                       dim=-1)

    @torch.no_grad()
    def embed_windows(self, desc: np.ndarray, starts: np.ndarray, seq_len: int, how: Projection,
                      all_frames: bool = False) -> WindowEmbedding:
        """One descriptor per window starting at ``starts`` of ``desc`` (``starts`` None)."""
        feats = describe_windows(self, desc, starts, seq_len, how.device, how.batch_size)
        return WindowEmbedding(feats, None)

    def window_distance_matrix(self, db: WindowEmbedding, q: WindowEmbedding, seq_len: int,
                               distance: str = "meanOfPairs") -> torch.Tensor:
        """Euclidean distances of the window descriptors ``[Nd, Nq]``."""
        return frame_distances(db.feats, q.feats)

    def triplet_distances(self, frames: torch.Tensor, q_idx: torch.Tensor, p_idx: torch.Tensor,
                          n_idx: torch.Tensor,
                          distance: str = "meanOfPairs") -> tuple[torch.Tensor, torch.Tensor]:
        """As ``FrameModel.triplet_distances``, between window descriptors (``distance`` does not
        apply)."""
        seq_len = q_idx.shape[-1]

        def describe(idx: torch.Tensor) -> torch.Tensor:
            return self.describe(frames[idx.reshape(-1, seq_len)]).view(*idx.shape[:-1], 1, -1)

        fq, fp, fn = describe(q_idx), describe(p_idx), describe(n_idx)
        return sequence_distance(fq, fp), sequence_distance(fq[:, None], fn)


def normalise_(x: torch.Tensor) -> torch.Tensor:
    """L2-normalise the rows of ``x`` in place: the values of ``nn.functional.normalize(x,
    dim=-1)``."""
    return x.div_(x.norm(2, -1, keepdim=True).clamp_min_(1e-12))


@torch.no_grad()
def project_frames(model: SeqMatchModel, desc: np.ndarray, device: torch.device, batch_size: int,
                     desc_name: str = "frames", quiet: bool = False,
                     dtype: torch.dtype | None = None,
                     overwrite: bool = False) -> torch.Tensor:
    """Project every frame with the model in eval mode: ``[N, C]`` -> ``[N, outDims]`` on
    ``device``, stored in ``dtype`` (default: the model's; float16 halves the memory, values rounded
    once). ``desc`` is an array or anything sliced like one (``datasets.DescriptorSource`` reads
    each block).

    Frames go through in blocks of ``batch_size`` rows, or of ``FEATURE_BLOCK_BYTES`` of input and
    output when that is more (a projection is one matrix product per block; small blocks cost
    several times more per frame on the CPU), straight into one preallocated result (one block is
    the result). ``overwrite``: ``desc`` may be overwritten (normalised in place); always so for a
    ``DescriptorSource``, whose reads are fresh buffers, never for an array unless asked."""
    model.eval()
    rows = max(batch_size, FEATURE_BLOCK_BYTES // (4 * (desc.shape[1] + model.out_dims)), 1)
    # a source's reads are fresh buffers
    overwrite = overwrite or not isinstance(desc, np.ndarray)
    blocks = range(0, len(desc), rows)
    if len(blocks) == 1:                       # one block: its features are the result, not copied
        feats = model.encode(torch.from_numpy(np.ascontiguousarray(desc[0:rows])).to(device),
                             overwrite)
        return feats if dtype is None else feats.to(dtype)
    out = None
    for lo in progress(blocks, desc=f"features ({desc_name})", unit="block",
                   disable=not progress_enabled(quiet),
                   leave=False):
        feats = model.encode(torch.from_numpy(np.ascontiguousarray(desc[lo:lo + rows])).to(device),
                             overwrite)
        if out is None:
            out = torch.empty((len(desc), feats.shape[1]), dtype=dtype or feats.dtype,
                              device=feats.device)
        out[lo:lo + len(feats)] = feats
    return out if out is not None else torch.empty((0, model.out_dims), dtype=dtype, device=device)


def window_means(feats: torch.Tensor, starts: torch.Tensor, seq_len: int) -> torch.Tensor:
    """One descriptor per window: the L2-normalised mean of its frames' features, summed in window
    order in float32: ``feats [F, D]``, ``starts [N]`` -> ``[N, D]`` float32. When the windows cover
    most frames (a streamed chunk), the sums of the windows starting at every frame are made from
    ``L`` shifted slices (no copies of the frames) and the starts picked from them."""
    starts = torch.as_tensor(starts, device=feats.device)
    if len(starts) == 0:
        return torch.empty((0, feats.shape[1]), dtype=torch.float32, device=feats.device)
    if 2 * len(starts) < len(feats):
        acc = feats[starts].float()
        for k in range(1, seq_len):
            acc += feats[starts + k]
        return normalise_(acc)
    first, n = int(starts.min()), int(starts.max()) + 1
    acc = feats[first:n].to(torch.float32, copy=True)        # never a view of feats
    for k in range(1, seq_len):
        acc += feats[first + k:n + k]
    normalise_(acc)
    if len(starts) == n - first and bool((starts == torch.arange(first, n,
                                                                 device=starts.device)).all()):
        # every start once, in order: no gather
        return acc
    return acc[starts - first]


@torch.no_grad()
def describe_windows(model: SeqMatchModel, desc: np.ndarray, starts: np.ndarray, seq_len: int,
                     device: torch.device, batch_size: int) -> torch.Tensor:
    """One descriptor per window (window models): ``starts [N]`` -> ``[N, outDims]`` on
    ``device``."""
    model.eval()
    offsets = np.arange(seq_len)
    out = []
    for lo in range(0, len(starts), batch_size):
        windows = desc[starts[lo:lo + batch_size, None] + offsets]              # [b, L, C]
        out.append(model.describe(torch.from_numpy(np.ascontiguousarray(windows)).to(device)))
    return torch.cat(out) if out else torch.empty((0, model.out_dims), device=device)


def window_frames(starts: np.ndarray, seq_len: int) -> tuple[np.ndarray, np.ndarray]:
    """The frames that the windows ``starts`` cover, ascending, and each window's start among them:
    ``(frames [F], local_starts [N])``. Every frame of a window is kept, so a window stays
    contiguous: frame ``starts[i] + k`` is ``frames[local_starts[i] + k]``; features of ``frames``
    alone then give the same window distances as features of every frame."""
    starts = np.asarray(starts, dtype=np.int64)
    frames = np.unique((starts[:, None] + np.arange(seq_len)).ravel())
    return frames, np.searchsorted(frames, starts)


def get_model(opt: argparse.Namespace, encoder_dim: int) -> SeqMatchModel:
    method = opt.method
    if method == "seqnet" and opt.w > opt.seqL:
        raise UserError(f"SeqNet's kernel --w {opt.w} is longer than --seqL {opt.seqL}: use --w "
                        "<= --seqL")
    # default: keep the descriptors' size
    out_dims = encoder_dim if opt.outDims is None else opt.outDims
    model = SeqMatchModel(encoder_dim, opt.pooling, out_dims, opt.matcher, method, opt.w)
    if opt.pooling and method != "seqnet" and opt.init == "identity":
        init_identity(model)
    return model


def init_identity(model: SeqMatchModel) -> None:
    """Start the projection at the identity (needs outDims == input dims): training then begins from
    the raw descriptors instead of a random projection."""
    conv = model.pool[1].conv
    if conv.out_channels != conv.in_channels:
        raise UserError("--init identity needs --outDims equal to the descriptor dimensions "
                        f"({conv.in_channels})")
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
        raise UserError(f"checkpoint {source} does not fit this model (unexpected keys "
                        f"{unknown[:4]}, missing {missing[:4]}): it comes from another model; "
                        "check --pooling / --method")
    for key, value in state.items():
        if tuple(value.shape) != tuple(own[key].shape):
            raise UserError(f"checkpoint {source}: {key} has shape {tuple(value.shape)} but the "
                            f"model needs {tuple(own[key].shape)}: check --outDims and that the "
                            "descriptors (--descType, --dataset) are the ones it was trained on")
        if not torch.isfinite(value).all():
            raise UserError(f"checkpoint {source}: {key} holds NaN/Inf values; use another "
                            "checkpoint")
    model.load_state_dict(state)


def parallelize(model: SeqMatchModel, n_gpu: int, device: torch.device) -> SeqMatchModel:
    """Wrap ``pool`` in ``nn.DataParallel`` for ``--nGPU`` > 1 (state-dict keys
    ``pool.module.*``, as in the reference; checkpoints are saved without the prefix)."""
    if n_gpu > 1:
        if device.type != "cuda" or torch.cuda.device_count() < n_gpu:
            raise UserError(f"--nGPU {n_gpu} needs {n_gpu} CUDA devices; found "
                            f"{torch.cuda.device_count() if device.type == 'cuda' else 0}")
        model.pool = nn.DataParallel(model.pool)
    return model
