"""The maximisation step of IP-IRM: offline (official ``auto_split_offline``, see
``docs/official-ipirm.md#offline``) and online (official ``auto_split``,
``docs/official-ipirm.md#online-maximisation``).

1. :func:`extract_views`: the model in eval mode, under ``no_grad``, gives the normalised
   projections ``z1, z2`` (N, D) of ONE augmented view pair per dataset image, in dataset order.
2. :func:`optimize_partition`: a logit matrix Theta (N, K) is trained to *minimise*
   ``J = -mean_k(L^soft_k + lambda2 R^soft_k) + C(q)`` (:func:`maximization_objective`) with
   dense Adam (lr 0.5) over the whole Theta, MultiStepLR([5, 35], x0.2) stepped per epoch, a
   shuffled feature batch of 3096 without drop_last, and the official stopping rule: stop after
   epoch ``e`` when ``e > 50 and cnt >= 5`` or ``e == 60`` (``cnt`` = epochs since the epoch-mean
   J last improved). The Theta at the end of the best (lowest epoch-mean J) epoch is returned.
   The objective's penalty is the IRM gradient penalty (``irm_mode="v1"``) or the variance of the
   environment losses (``"v2"``), as the official ``--irm_mode``.
3. Online (``partition.offline = false``): :func:`optimize_partition_online` runs the same
   objective, optimiser, schedule and stopping rule, but every epoch's feature batches come from
   a callable ``epoch -> batches``; :func:`online_views` makes it from the model and a loader
   (shuffled, ``drop_last``, the official ``update_loader``): fresh augmentations of every batch,
   projected in eval mode under ``no_grad`` right before the Theta step on them. With
   ``drop_last`` the last ``N mod batch_size`` samples of an epoch's order get no step (Adam's
   momentum still moves their rows, as officially).
4. :func:`retain`: the new partition joins the retained ``(P, N, K)`` stack (``retain_group``)
   or replaces it; ``retain_group_set`` caps P (FIFO, main_mixup.py).

Initialisation: ``random_init`` draws a fresh Theta ~ N(0, 1) every call (all official scripts).
Without it Theta warm-starts from a *copy* of the previous best Theta. The official code instead
optimises the very tensor it has just appended to the retained list, so the last retained partition
is silently overwritten with the next search's final (not best) Theta
(``docs/official-ipirm.md#bug-4``); fastipirm does not reproduce that aliasing (no official script
is affected; ``docs/deviations.md#warm-start``).

Every count (epochs, milestones, patience, batch sizes) comes from the config so tests and the
quickstart can run the procedure small.
"""
from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass, field
from functools import partial
from typing import Callable, Iterable, Iterator, Optional

import torch

from . import distributed
from .data.mixup import mix, mixup_draws
from .losses.ipirm import maximization_objective
from .losses.ipirm_mixup import mixup_maximization_objective
from .models import eval_mode


@dataclass
class PartitionResult:
    logits: torch.Tensor                  # (N, K) best Theta (detached logits, not probabilities)
    best_objective: float                 # its epoch-mean J
    best_epoch: int
    epochs_run: int
    history: list = field(default_factory=list)   # epoch-mean J per epoch
    seconds: float = 0.0

    def fractions(self) -> list[float]:
        """Share of the samples that the hard (argmax) assignment puts in each environment."""
        return hard_fractions(self.logits)


def hard_fractions(logits: torch.Tensor) -> list[float]:
    k = logits.shape[-1]
    counts = torch.bincount(logits.argmax(-1).flatten(), minlength=k).double()
    return (counts / counts.sum()).tolist()


@torch.no_grad()
def extract_views(model: torch.nn.Module, loader, augment, *, num_samples: int,
                  device: torch.device, generator: Optional[torch.Generator] = None,
                  autocast: Callable = contextlib.nullcontext,
                  channels_last: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Normalised projections of one augmented view pair per image, indexed by dataset index.

    ``loader`` yields ``(indices, uint8 NHWC images)`` over the whole partition split (any order,
    no drop_last); ``augment(images, generator) -> (v1, v2)``. The model runs in eval mode (BN
    running statistics, as the official code) and is put back in its previous mode afterwards.
    Returns float32 ``(N, D)`` tensors on ``device``.
    """
    z1 = z2 = None
    seen = torch.zeros(num_samples, dtype=torch.bool, device=device)
    with eval_mode(model):
        for indices, images in loader:
            indices = indices.to(device)
            p1, p2 = _project_pair(model, images.to(device), augment, generator, autocast,
                                   channels_last)
            if z1 is None:
                z1 = torch.empty(num_samples, p1.shape[1], dtype=torch.float32, device=device)
                z2 = torch.empty_like(z1)
            z1[indices] = p1.float()
            z2[indices] = p2.float()
            seen[indices] = True
    if z1 is None or not bool(seen.all()):
        missing = num_samples - int(seen.sum())
        raise RuntimeError(f"feature extraction covered {num_samples - missing} of "
                           f"{num_samples} samples: the partition loader must visit every index")
    return z1, z2


def _project_pair(model, images, augment, generator, autocast, channels_last):
    """The projections (head output) of one augmented view pair of ``images``.

    Several processes (``docs/distributed.md#maximisation``): every rank has the whole batch,
    makes the views of its share of it only (``augment(..., rows=share)``: the whole batch's
    draws, so the generators stay in step), projects them and the projections are gathered: every
    rank returns the whole batch's.
    """
    n = images.shape[0]
    sharded = distributed.active() and n >= distributed.world_size()
    if sharded:
        start, stop = distributed.balanced_shares(n, distributed.world_size())[distributed.rank()]
        v1, v2 = augment(images, generator, rows=slice(start, stop))
    else:
        v1, v2 = augment(images, generator)
    if channels_last:
        v1 = v1.contiguous(memory_format=torch.channels_last)
        v2 = v2.contiguous(memory_format=torch.channels_last)
    with autocast():
        p1 = model(v1)[1]
        p2 = model(v2)[1]
    if sharded:
        p1, p2 = distributed.gather_shares(p1, n), distributed.gather_shares(p2, n)
    return p1, p2


FeatureBatches = Callable[[int], Iterable[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]]


def online_views(model: torch.nn.Module, loader, augment, *, device: torch.device,
                 generator: Optional[torch.Generator] = None,
                 autocast: Callable = contextlib.nullcontext,
                 channels_last: bool = False,
                 mixup_alpha: Optional[float] = None) -> FeatureBatches:
    """The feature batches of the online search (official ``auto_split``): ``epoch -> batches``.

    Calling it with a search epoch ``e`` calls ``loader.set_epoch(e)`` (when the loader has it)
    and iterates ``loader`` (``(indices, uint8 NHWC images)``; the official ``update_loader`` is
    shuffled with ``drop_last``); each batch gets fresh views ``augment(images, generator)``,
    projected with the model in eval mode under ``no_grad`` (the model's mode and the grad mode are
    restored before the batch is yielded), and is yielded as ``(indices, z1, z2)``, float32 on
    ``device``. With ``mixup_alpha`` (the official ``--mixup_max`` search), view 1 is mixed
    first (:mod:`fastipirm.data.mixup`, from ``generator``) and the batch is ``(indices, z1 of
    the mixed view, z2, lam, partner)``.
    """
    def batches(epoch: int) -> Iterator[tuple[torch.Tensor, ...]]:
        if hasattr(loader, "set_epoch"):
            loader.set_epoch(epoch)
        for indices, images in loader:
            extra = ()
            views = augment
            if mixup_alpha is not None:
                lam, partner = mixup_draws(images.shape[0], mixup_alpha, generator=generator,
                                           device=device)
                extra = (lam, partner)

                def views(x, g, rows=slice(None), lam=lam, partner=partner):
                    v1, v2 = augment(x, g)       # partners across the batch: all of it
                    return mix(v1, lam, partner)[rows], v2[rows]
            with torch.no_grad(), eval_mode(model):
                p1, p2 = _project_pair(model, images.to(device), views, generator, autocast,
                                       channels_last)
            yield (indices.to(device), p1.float(), p2.float(), *extra)
    return batches


def optimize_partition(z1: torch.Tensor, z2: torch.Tensor, init: torch.Tensor, *,
                       temperature: float, irm_temperature: float, irm_weight: float,
                       constrain: bool = True, constrain_relax: bool = True, nonorm: bool = False,
                       lr: float = 0.5, milestones=(5, 35), gamma: float = 0.2,
                       batch_size: int = 3096, min_epochs: int = 50, patience: int = 5,
                       max_epochs: int = 60, generator: Optional[torch.Generator] = None,
                       backend: Optional[str] = None, penalty: str = "slot",
                       progress: Optional[Callable[[int, float], None]] = None,
                       irm_mode: str = "v1") -> PartitionResult:
    """Official Theta optimisation on a fixed feature bank; returns the best epoch's Theta.

    ``init`` (N, K) is the starting Theta (copied, never modified). ``generator`` drives the
    per-epoch shuffle (a CPU generator). Stops after epoch ``e`` when
    ``(e > min_epochs and cnt >= patience) or e == max_epochs``.
    """
    n = z1.shape[0]
    if init.shape[0] != n:
        raise ValueError(f"init has {init.shape[0]} rows for {n} samples")

    def bank_batches(epoch: int):
        perm = torch.randperm(n, generator=generator).to(z1.device)
        for b0 in range(0, n, batch_size):               # shuffled, no drop_last
            idx = perm[b0:b0 + batch_size]
            yield idx, z1[idx], z2[idx]

    objective = partial(maximization_objective, temperature=temperature,
                        irm_temperature=irm_temperature, irm_weight=irm_weight,
                        constrain=constrain, constrain_relax=constrain_relax, nonorm=nonorm,
                        backend=backend, penalty=penalty, irm_mode=irm_mode)
    return _search(bank_batches, init, z1.device, objective, lr=lr, milestones=milestones,
                   gamma=gamma, min_epochs=min_epochs, patience=patience, max_epochs=max_epochs,
                   progress=progress)


def optimize_partition_online(feature_batches: FeatureBatches, init: torch.Tensor, *,
                              temperature: float, irm_temperature: float, irm_weight: float,
                              constrain: bool = True, constrain_relax: bool = True,
                              nonorm: bool = False, lr: float = 0.5, milestones=(5, 35),
                              gamma: float = 0.2, min_epochs: int = 50, patience: int = 5,
                              max_epochs: int = 60, device: Optional[torch.device] = None,
                              backend: Optional[str] = None, penalty: str = "slot",
                              progress: Optional[Callable[[int, float], None]] = None,
                              irm_mode: str = "v1") -> PartitionResult:
    """Official online Theta optimisation (``auto_split``); returns the best epoch's Theta.

    ``feature_batches(e)`` gives search epoch ``e``'s ``(indices, z1, z2)`` batches (see
    :func:`online_views`), extracted lazily, one batch per Theta step. ``init`` (N, K, N = the
    data set's size) is copied to ``device`` (default: its own device). Everything else as
    :func:`optimize_partition`.
    """
    device = init.device if device is None else torch.device(device)
    objective = partial(maximization_objective, temperature=temperature,
                        irm_temperature=irm_temperature, irm_weight=irm_weight,
                        constrain=constrain, constrain_relax=constrain_relax, nonorm=nonorm,
                        backend=backend, penalty=penalty, irm_mode=irm_mode)
    return _search(feature_batches, init, device, objective, lr=lr, milestones=milestones,
                   gamma=gamma, min_epochs=min_epochs, patience=patience, max_epochs=max_epochs,
                   progress=progress)


#: the official online MixUp search's fixed schedule (``auto_split_online_mixup``): Adam lr,
#: milestones, gamma, and the stop after epoch e when (e > 25 and cnt >= 5) or e == 30
MIXUP_SEARCH = dict(lr=0.1, milestones=(5, 25), gamma=0.2, min_epochs=25, patience=5,
                    max_epochs=30)


def optimize_partition_online_mixup(feature_batches: FeatureBatches, init: torch.Tensor, *,
                                    temperature: float, irm_weight: float,
                                    constrain: bool = True, constrain_relax: bool = True,
                                    nonorm: bool = False, device: Optional[torch.device] = None,
                                    progress: Optional[Callable[[int, float], None]] = None
                                    ) -> PartitionResult:
    """The official online MixUp search (``--mixup_max``, ``auto_split_online_mixup``): the
    batches of :func:`online_views` with ``mixup_alpha``, the objective
    :func:`fastipirm.losses.ipirm_mixup.mixup_maximization_objective` at ``temperature`` (no
    ``irm_temperature``), and the official fixed schedule :data:`MIXUP_SEARCH`."""
    device = init.device if device is None else torch.device(device)

    def objective(q, k, theta_rows, lam, partner):
        return mixup_maximization_objective(q, k, lam, partner, theta_rows,
                                            temperature=temperature, irm_weight=irm_weight,
                                            constrain=constrain,
                                            constrain_relax=constrain_relax, nonorm=nonorm)

    return _search(feature_batches, init, device, objective, progress=progress, **MIXUP_SEARCH)


def _search(feature_batches: FeatureBatches, init: torch.Tensor, device: torch.device,
            objective: Callable, *, lr, milestones, gamma, min_epochs, patience, max_epochs,
            progress) -> PartitionResult:
    """The Theta loop shared by the searches: ``objective(z1, z2, theta_rows, *extra)`` of each
    batch ``(indices, z1, z2, *extra)``."""
    start = time.perf_counter()
    theta = init.detach().clone().to(device=device, dtype=torch.float32).requires_grad_(True)
    opt = torch.optim.Adam([theta], lr=lr)   # dense Adam over all N x K entries (official)
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=list(milestones), gamma=gamma)
    best, best_epoch, cnt = math.inf, -1, 0
    best_theta = theta.detach().clone()
    history = []
    epoch = 0
    while True:
        total = torch.zeros((), dtype=torch.float64, device=device)
        batches = 0
        for idx, f1, f2, *extra in feature_batches(epoch):
            value, _ = objective(f1, f2, theta[idx], *extra)
            opt.zero_grad(set_to_none=True)
            value.backward()
            opt.step()
            total += value.detach()
            batches += 1
        if batches == 0:
            raise ValueError(f"search epoch {epoch} gave no feature batch (with drop_last the "
                             "batch size must not exceed the number of samples)")
        sched.step()
        mean = float(total / batches)
        if not math.isfinite(mean):
            raise FloatingPointError(f"the partition objective became {mean} at epoch {epoch}")
        history.append(mean)
        if mean < best:
            best, best_epoch, cnt = mean, epoch, 0
            best_theta = theta.detach().clone()
        else:
            cnt += 1
        if progress is not None:
            progress(epoch, mean)
        if (epoch > min_epochs and cnt >= patience) or epoch >= max_epochs:
            break
        epoch += 1
    return PartitionResult(best_theta, best, best_epoch, epoch + 1, history,
                           time.perf_counter() - start)


def initial_logits(num_samples: int, num_envs: int, *, random_init: bool,
                   previous: Optional[torch.Tensor], generator: Optional[torch.Generator],
                   device: torch.device) -> torch.Tensor:
    """Theta's starting point: N(0, 1) (random_init or first call) or a copy of ``previous``."""
    if random_init or previous is None:
        return torch.randn(num_samples, num_envs, generator=generator).to(device)
    return previous.detach().clone().to(device)      # a copy: no official aliasing


def retain(retained: Optional[torch.Tensor], new: torch.Tensor, *, retain_group: bool,
           retain_group_set: int = 0) -> torch.Tensor:
    """The retained partitions ``(P, N, K)`` after adding ``new`` (N, K)."""
    new = new.detach()[None]
    if retained is None or not retain_group or retained.shape[0] == 0:
        return new.clone()
    out = torch.cat([retained.to(new.device), new])
    if retain_group_set > 0 and out.shape[0] > retain_group_set:
        out = out[-retain_group_set:]
    return out.clone()
