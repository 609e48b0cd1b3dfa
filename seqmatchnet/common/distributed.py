"""The process group of a job started by ``torchrun`` (docs/torchrun.md).

``init`` joins the group from torchrun's environment (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``,
``MASTER_ADDR``, ``MASTER_PORT``): NCCL when the job computes on CUDA, gloo on the CPU. Without
torchrun nothing is initialised and every helper acts for a world of one process: ``rank() == 0``,
``world_size() == 1``, ``shard(n)`` is everything and the gathers return their input.

Every collective waits at most ``SEQMATCHNET_DIST_TIMEOUT`` seconds (default 1800) for the other
processes; a failed or timed-out collective becomes a ``UserError`` that names the step, so a job
whose process failed or hangs ends with one line instead of waiting for ever.
"""
from __future__ import annotations

import contextlib
import datetime
import logging
import os
import pickle

import numpy as np
import torch
import torch.distributed as dist

from seqmatchnet.common.errors import UserError
from seqmatchnet.matching.topk import topk_by_value_then_index

log = logging.getLogger(__name__)


TIMEOUT_ENV = "SEQMATCHNET_DIST_TIMEOUT"
DEFAULT_TIMEOUT_S = 1800.0


def launched() -> bool:
    """True in a process started by torchrun (its ``RANK`` and ``WORLD_SIZE`` are set)."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def active() -> bool:
    """True once ``init`` joined a process group."""
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if active() else 0


def world_size() -> int:
    return dist.get_world_size() if active() else 1


def is_main() -> bool:
    """Rank 0: the one process that writes run folders, checkpoints, logs and results."""
    return rank() == 0


def timeout_s() -> float:
    """Seconds a collective waits for the other processes (``SEQMATCHNET_DIST_TIMEOUT``)."""
    text = os.environ.get(TIMEOUT_ENV, "")
    if not text:
        return DEFAULT_TIMEOUT_S
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not value > 0:
        raise UserError(f"{TIMEOUT_ENV} must be a positive number of seconds, got {text!r}")
    return value


def init(cuda: bool) -> bool:
    """Join torchrun's process group (NCCL with ``cuda``, else gloo); the current CUDA device
    becomes ``LOCAL_RANK``. Returns False, doing nothing, outside torchrun."""
    if not launched() or active():
        return active()
    if not dist.is_available():
        raise UserError("this build of torch has no torch.distributed: run with python instead of "
                        "torchrun")
    backend = "nccl" if cuda else "gloo"
    if cuda:
        local = int(os.environ.get("LOCAL_RANK", "0"))
        if local >= torch.cuda.device_count():
            raise UserError(f"LOCAL_RANK {local} has no GPU ({torch.cuda.device_count()} on this "
                            "machine): start at most one process per GPU (torchrun "
                            "--nproc_per_node), or use --nocuda")
        torch.cuda.set_device(local)
    try:
        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s()))
    except (RuntimeError, ValueError) as exc:
        raise UserError(f"cannot join the torchrun job (backend {backend}, "
                        f"MASTER_ADDR={os.environ.get('MASTER_ADDR')}, "
                        f"MASTER_PORT={os.environ.get('MASTER_PORT')}): {exc}") from exc
    log.debug("rank %d of %d (backend %s, collective timeout %g s)", rank(), world_size(), backend,
              timeout_s())
    return True


def shutdown() -> None:
    """Leave the process group (no final barrier: after a failure the others may be gone)."""
    if active():
        dist.destroy_process_group()


@contextlib.contextmanager
def collective(what: str):
    """Turn a failed collective (a process of the job ended, or did not answer within the timeout)
    into a ``UserError`` naming ``what`` and this rank."""
    try:
        yield
    except (RuntimeError, dist.DistError) as exc:
        if not active():
            raise
        text = " ".join(str(exc).split())
        raise UserError(f"rank {rank()} of {world_size()}: {what} failed: another process of the "
                        f"job ended or did not answer within {timeout_s():g} s ({TIMEOUT_ENV}); "
                        f"see the other ranks' messages [{text:.200}]") from exc


def _comm_device() -> torch.device:
    if active() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


# ---------------------------------------------------------------- sharding

def shard_bounds(n: int, world: int | None = None,
                 keep_together: np.ndarray | None = None) -> list[int]:
    """Cut ``range(n)`` into ``world`` consecutive pieces of (nearly) equal size: ``world + 1``
    bounds. With ``keep_together`` ``[n]``, a cut never separates consecutive equal keys (it moves
    forward)."""
    world = world_size() if world is None else world
    bounds = [i * n // world for i in range(world + 1)]
    if keep_together is not None and n and world > 1:
        keys = (keep_together.cpu().numpy() if torch.is_tensor(keep_together)
                else np.asarray(keep_together))
        for i in range(1, world):
            cut = max(bounds[i], bounds[i - 1])
            while 0 < cut < n and keys[cut] == keys[cut - 1]:
                cut += 1
            bounds[i] = cut
    return bounds


def shard(n: int, keep_together: np.ndarray | None = None) -> slice:
    """This rank's consecutive slice of ``range(n)`` (all of it in a world of one)."""
    bounds = shard_bounds(n, keep_together=keep_together)
    return slice(bounds[rank()], bounds[rank() + 1])


# ---------------------------------------------------------------- collectives

def barrier(what: str = "barrier") -> None:
    if active():
        with collective(what):
            dist.barrier()


def all_reduce_sum(t: torch.Tensor, what: str = "sum over processes") -> torch.Tensor:
    """The element-wise sum of ``t`` over all ranks (a new tensor on ``t``'s device)."""
    if not active():
        return t.clone()
    out = t.detach().to(_comm_device(), copy=True)
    with collective(what):
        dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out.to(t.device)


def all_gather_rows(t: torch.Tensor, what: str = "gather") -> torch.Tensor:
    """The tensors ``t`` of all ranks concatenated along dim 0, in rank order (their first
    dimensions may differ; the others must agree)."""
    if not active():
        return t
    world = world_size()
    dev = _comm_device()
    with collective(what):
        sizes = [torch.zeros(1, dtype=torch.long, device=dev) for _ in range(world)]
        dist.all_gather(sizes, torch.tensor([t.shape[0]], dtype=torch.long, device=dev))
        sizes = [int(s) for s in sizes]
        padded = torch.zeros((max(sizes), *t.shape[1:]), dtype=t.dtype, device=dev)
        padded[:t.shape[0]] = t.detach().to(dev)
        pieces = [torch.empty_like(padded) for _ in range(world)]
        dist.all_gather(pieces, padded)
    return torch.cat([p[:s] for p, s in zip(pieces, sizes)]).to(t.device)


def all_gather_arrays(*arrays: np.ndarray, what: str = "gather") -> tuple[np.ndarray, ...]:
    """NumPy arrays of all ranks concatenated along axis 0, in rank order (booleans travel as
    bytes)."""
    if not active():
        return arrays
    out = []
    for a in arrays:
        a = np.ascontiguousarray(a)
        t = torch.from_numpy(a.view(np.uint8) if a.dtype == bool else a)
        g = all_gather_rows(t, what).numpy()
        out.append(g.view(bool) if a.dtype == bool else g)
    return tuple(out)


def broadcast_object(obj, src: int = 0, what: str = "broadcast"):
    """Rank ``src``'s ``obj`` (picklable) on every rank."""
    if not active():
        return obj
    data = bytearray(pickle.dumps(obj)) if rank() == src else bytearray()
    dev = _comm_device()
    with collective(what):
        size = torch.tensor([len(data)], dtype=torch.long, device=dev)
        dist.broadcast(size, src)
        buf = torch.zeros(int(size.item()), dtype=torch.uint8, device=dev)
        if rank() == src:
            buf.copy_(torch.frombuffer(data, dtype=torch.uint8))
        dist.broadcast(buf, src)
    return obj if rank() == src else pickle.loads(buf.cpu().numpy().tobytes())


def all_gather_topk(values: torch.Tensor, ids: torch.Tensor, k: int,
                    n_ids: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge the ranks' top-k lists: each rank's ``(values [N, k_r], ids [N, k_r])`` (ascending, ids
    distinct and below ``n_ids``) -> the ``k`` smallest of all ranks ordered by (value, id), as
    ``seqMatchNet.topk_by_value_then_index``; one all-gather of ``[N, k]``. A rank with ``k_r < k``
    pads with infinite values and ids at or past ``n_ids``."""

    if not active():
        return values, ids
    n, have = values.shape
    if have < k:
        pad = torch.arange(have, k, device=ids.device) + n_ids + rank() * k
        values = torch.cat([values, torch.full((n, k - have), float("inf"), dtype=values.dtype,
                                               device=values.device)], dim=1)
        ids = torch.cat([ids, pad.expand(n, -1)], dim=1)
    world = world_size()
    all_v = all_gather_rows(values[:, :k].contiguous(),
                            "gathering the ranked lists").view(world, n, k)
    all_i = all_gather_rows(ids[:, :k].contiguous(), "gathering the ranked lists").view(world, n, k)
    all_v = all_v.permute(1, 0, 2).reshape(n, world * k)
    all_i = all_i.permute(1, 0, 2).reshape(n, world * k)
    best, order = topk_by_value_then_index(all_v, k, ids=all_i)
    return best, torch.gather(all_i, 1, order)
