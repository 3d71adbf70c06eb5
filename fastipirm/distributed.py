"""Multi-process training (``torchrun``): the process group, rank-0 guards, the autograd-aware
gather and the broadcast helpers (``docs/distributed.md``).

World size 1 (no ``WORLD_SIZE`` > 1 in the environment and no process group) is the
single-process trainer unchanged: nothing here creates a group, gathers or reduces, and every
helper is the identity. Under ``torchrun`` (``WORLD_SIZE``, ``RANK``, ``LOCAL_RANK``,
``MASTER_ADDR``/``MASTER_PORT`` set by its rendezvous) :func:`init_from_env` creates the default
group, NCCL on GPUs (one per local rank), gloo on the CPU, with a collective timeout of
``FASTIPIRM_DIST_TIMEOUT_MIN`` minutes (default 180: the other ranks wait while rank 0
evaluates). A group created by someone else (a
test's ``init_process_group``) is used as it is.

* :func:`all_gather_grad`: PyTorch's autograd-aware ``torch.distributed.nn.functional.
  all_gather``, concatenated in rank order. Its backward sums the gradients of every rank's
  copy of a slice onto the rank that owns it, which is what makes a loss over gathered keys
  exact (the argument is in ``docs/distributed.md``).
* :func:`all_reduce_grad`: the autograd-aware all-reduce (sum) of partial sums (IP-IRM +
  MixUp's per-key-column penalty gradients).
* :func:`is_main`, :func:`main_only`: rank-0 guards for files, log lines and progress bars.
* :func:`broadcast_object`, :func:`broadcast_tensor`, :func:`mean_across`, :func:`barrier`.
"""
from __future__ import annotations

import datetime
import os
import warnings
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    """This process's place in the run."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0


_created_group = False

# how long a rank waits at a collective: the other ranks wait while rank 0 evaluates (a final
# linear probe can take long); a rank that fails does not rely on it (torchrun stops the others)
TIMEOUT_MINUTES = 180


def env_world_size() -> int:
    """``WORLD_SIZE`` from torchrun's environment (1 when unset)."""
    return int(os.environ.get("WORLD_SIZE", "1") or 1)


def active() -> bool:
    """A process group of more than one rank is in use."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def info() -> DistInfo:
    """Rank, world size and local rank of this process (0, 1, 0 without a group)."""
    if not (dist.is_available() and dist.is_initialized()):
        return DistInfo()
    return DistInfo(dist.get_rank(), dist.get_world_size(),
                    int(os.environ.get("LOCAL_RANK", dist.get_rank())))


def world_size() -> int:
    return info().world_size


def rank() -> int:
    return info().rank


def is_main() -> bool:
    """Rank 0 (or no group): the process that writes files and logs."""
    return info().rank == 0


def init_from_env(device: str = "auto") -> DistInfo:
    """Create the default process group from torchrun's environment when ``WORLD_SIZE`` > 1
    (NCCL when the run's device is a GPU, gloo otherwise); idempotent. Returns :func:`info`."""
    global _created_group
    if dist.is_available() and dist.is_initialized():
        return info()
    if env_world_size() <= 1:
        return DistInfo()
    if not dist.is_available():
        raise RuntimeError("WORLD_SIZE > 1 but this torch build has no torch.distributed")
    for key in ("RANK", "MASTER_ADDR", "MASTER_PORT"):
        if key not in os.environ:
            raise RuntimeError(f"WORLD_SIZE is {env_world_size()} but {key} is not set; start "
                               "multi-process runs with torchrun")
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = device != "cpu" and torch.cuda.is_available()
    if use_cuda:
        torch.cuda.set_device(local_rank)
    dist.init_process_group("nccl" if use_cuda else "gloo", timeout=datetime.timedelta(
        minutes=float(os.environ.get("FASTIPIRM_DIST_TIMEOUT_MIN", TIMEOUT_MINUTES))))
    _created_group = True
    return info()


def shutdown() -> None:
    """Destroy the process group if :func:`init_from_env` created it, after a barrier: a rank
    that tears its group down while another still talks to the store (rank 0 hosts it) can end
    in ``std::terminate`` at exit."""
    global _created_group
    if _created_group and dist.is_initialized():
        try:
            dist.barrier()
        finally:
            dist.destroy_process_group()
    _created_group = False

def main_only(fn: Callable) -> Callable:
    """``fn`` on rank 0, a no-op returning None elsewhere (for ``log`` callbacks)."""
    def guarded(*args, **kwargs):
        if is_main():
            return fn(*args, **kwargs)
        return None
    return guarded


def barrier() -> None:
    if active():
        dist.barrier()


def all_gather_grad(x: torch.Tensor) -> torch.Tensor:
    """``x`` of every rank concatenated along dim 0 in rank order, differentiable (the backward
    sums each rank's gradient of a slice onto its owner). Every rank must pass the same shape.
    Identity without a group."""
    if not active():
        return x
    import torch.distributed.nn.functional as dnn
    with warnings.catch_warnings():        # deprecated in favour of an API torch 2.11 lacks
        warnings.simplefilter("ignore", FutureWarning)
        return torch.cat(dnn.all_gather(x), 0)


def all_reduce_grad(x: torch.Tensor) -> torch.Tensor:
    """The sum of ``x`` over the ranks, differentiable (PyTorch's autograd-aware
    ``torch.distributed.nn.functional.all_reduce``: the backward sums every rank's gradient of
    the result onto each rank's ``x``). For partial sums that must be complete before a
    non-linear step (the per-key-column IRM gradients before they are squared). Identity
    without a group."""
    if not active():
        return x
    import torch.distributed.nn.functional as dnn
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        return dnn.all_reduce(x)


def all_gather_nograd(x: torch.Tensor) -> torch.Tensor:
    """``x`` of every rank concatenated along dim 0 (no gradient: indices, memberships)."""
    if not active():
        return x
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts, 0)


def mean_across(x: torch.Tensor) -> torch.Tensor:
    """The mean of ``x`` over the ranks (a detached copy; ``x`` itself without a group)."""
    if not active():
        return x
    y = x.detach().clone()
    dist.all_reduce(y)
    return y / dist.get_world_size()


def broadcast_tensor(x: torch.Tensor, src: int = 0) -> torch.Tensor:
    """``x`` of rank ``src`` on every rank (in place; same shape and dtype everywhere)."""
    if active():
        dist.broadcast(x, src)
    return x


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """A picklable object of rank ``src`` on every rank."""
    if not active():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src)
    return box[0]


def share_rows(batch: int, rank_: int, world: int) -> slice:
    """Rank ``rank_``'s contiguous share of a global batch of ``batch`` samples (``world`` must
    divide it)."""
    if batch % world:
        raise ValueError(f"a batch of {batch} samples cannot be split over {world} ranks")
    per = batch // world
    return slice(rank_ * per, (rank_ + 1) * per)


def shard(batch: tuple, world: int, rank_: int) -> tuple:
    """Rank ``rank_``'s contiguous share (:func:`share_rows`) of every tensor of a global batch
    (dim 0; other values unchanged)."""
    if world == 1:
        return batch
    return tuple(t[share_rows(t.shape[0], rank_, world)]
                 if isinstance(t, torch.Tensor) and t.dim() > 0 else t for t in batch)


def balanced_shares(n: int, world: int) -> list[tuple[int, int]]:
    """``[start, stop)`` of every rank's share of ``n`` items, as even as possible (sizes differ
    by at most one; a share may be empty when ``n < world``)."""
    return [(r * n // world, (r + 1) * n // world) for r in range(world)]


def gather_shares(x: torch.Tensor, n: int) -> torch.Tensor:
    """The ``n`` rows of which every rank holds its :func:`balanced_shares` share ``x``, in order,
    on every rank (no gradient; shares padded to equal size for the all-gather). Identity
    without a group."""
    if not active():
        return x
    world = dist.get_world_size()
    shares = balanced_shares(n, world)
    per = max(stop - start for start, stop in shares)
    padded = x.new_zeros((per, *x.shape[1:]))
    padded[:x.shape[0]] = x
    full = all_gather_nograd(padded)
    return torch.cat([full[r * per:r * per + stop - start]
                      for r, (start, stop) in enumerate(shares)])


def local_columns(local: int, device) -> torch.Tensor:
    """The columns of this rank's ``local`` rows among keys gathered by :func:`all_gather_grad`
    (rank-major order)."""
    return rank() * local + torch.arange(local, device=device)
