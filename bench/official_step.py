"""The official ``train_env`` minimisation step (IP-IRM ``main.py``) re-created as a speed baseline.

What one official step does, and what :class:`OfficialStep` does the same way:

* the two views arrive as CPU tensors from the per-image PIL DataLoader and are copied to the
  device; one fp32 forward per view (train mode);
* ``keep_cont``: the global NT-Xent from the official logit construction (``info_nce_loss``: a
  same-sample label matrix and a diagonal mask built on the host and copied over, boolean
  selection of the positives and negatives, positive first;
  :func:`fastipirm.ops.reference.official_logits` with ``host_masks``) and ``CrossEntropyLoss``
  against zero targets also built on the host;
* for every retained partition and every environment: the batch rows whose argmax environment
  is ``k`` (``torch.where``, a host synchronisation), their own ``2b x (2b-1)`` logit matrix,
  the cross-entropy at ``temperature`` and the per-slot IRM penalty at ``irm_temperature``: a
  ones vector with one entry per logit column, ``autograd.grad(create_graph=True)`` and the
  squared norm of that gradient;
* ``loss = mean_{p,k} L_{p,k} + L_glob + lambda1 * mean_{p,k} R_{p,k}`` (divided by lambda1 when
  it exceeds 1), one ``backward``, one Adam step, and ``loss.item()`` for the progress bar.

Not reproduced: ``nn.DataParallel`` over 2 GPUs (one device here, so BN sees the whole view) and
the official cudnn flags, which the benchmarks set around this step instead
(:func:`official_cudnn`). As in the official code nothing guards an empty environment (the logit
construction fails on it), so batches must be large enough for the partitions (with random
balanced partitions an empty environment has odds ``2^(1-B)`` per partition and batch).
"""
from __future__ import annotations

import contextlib
from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from fastipirm.ops.reference import official_logits


@contextlib.contextmanager
def official_cudnn(enabled: bool = True):
    """cudnn as the official ``set_seed`` leaves it (deterministic, no benchmark), then restore."""
    before = torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark
    if enabled:
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    try:
        yield
    finally:
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = before


def zero_targets(logits: torch.Tensor) -> torch.Tensor:
    """The official targets of the logits (positive in column 0), made on the host and copied."""
    return torch.zeros(logits.shape[0], dtype=torch.long).to(logits.device)


def slot_penalty(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """``utils.penalty(mode='w')``: squared norm of d CE(logits * s) / d s at s = 1, s per slot."""
    scale = torch.ones((1, logits.shape[-1]), dtype=logits.dtype).to(logits.device)
    scale.requires_grad_()
    loss = F.cross_entropy(logits * scale, targets)
    grad = torch.autograd.grad(loss, [scale], create_graph=True)[0]
    return torch.sum(grad ** 2)


def select_environment(z1: torch.Tensor, z2: torch.Tensor, indices: torch.Tensor,
                       split: torch.Tensor, env: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``assign_features``: the batch rows whose argmax environment in ``split`` is ``env``."""
    chosen = torch.where(split[indices].argmax(dim=1) == env)[0]
    return z1[chosen], z2[chosen]


def train_env_loss(z1: torch.Tensor, z2: torch.Tensor, indices: torch.Tensor,
                   splits: Sequence[torch.Tensor], *, temperature: float = 0.5,
                   irm_temperature: float = 0.5, penalty_weight: float = 0.2,
                   keep_cont: bool = True) -> tuple[torch.Tensor, dict]:
    """The official ``train_env`` loss of one batch, one graph per environment.

    ``splits``: the retained partitions, each ``(N, K)`` logits on the device; ``indices``: the
    batch's dataset indices (a CPU tensor, as the DataLoader gives them). Returns ``(loss,
    parts)`` with parts ``loss_global``, ``loss_env`` (mean over the P*K terms) and ``penalty``
    (mean), detached.
    """
    zero = z1.new_zeros(())
    loss_global = zero
    if keep_cont:
        logits, _ = official_logits(torch.cat([z1, z2]), slots=False, host_masks=True)
        loss_global = F.cross_entropy(logits / temperature, zero_targets(logits))
    env_losses, env_penalties = [], []
    for split in splits:
        for env in range(split.shape[1]):
            e1, e2 = select_environment(z1, z2, indices, split, env)
            logits, _ = official_logits(torch.cat([e1, e2]), slots=False, host_masks=True)
            targets = zero_targets(logits)
            env_losses.append(F.cross_entropy(logits / temperature, targets))
            env_penalties.append(slot_penalty(logits / irm_temperature, targets))
    loss_env = torch.stack(env_losses).mean()
    penalty = torch.stack(env_penalties).mean()
    loss = loss_env + loss_global + penalty_weight * penalty
    if penalty_weight > 1.0:
        loss = loss / penalty_weight
    return loss, {"loss_global": loss_global.detach(), "loss_env": loss_env.detach(),
                  "penalty": penalty.detach()}


class OfficialStep:
    """One official minimisation step: ``step(pos_1, pos_2, indices) -> float`` (the loss).

    ``model`` is a :class:`fastipirm.models.SimCLRModel` in fp32 (``forward`` returns the
    normalised feature and projection); ``splits`` the retained ``(N, K)`` partition logits on
    ``device``. The views may live on the host (pinned, as the DataLoader gives them).
    """

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                 splits: Sequence[torch.Tensor], *, device, temperature: float = 0.5,
                 irm_temperature: float = 0.5, penalty_weight: float = 0.2,
                 keep_cont: bool = True):
        if len(splits) == 0:
            raise ValueError("OfficialStep needs at least one retained partition")
        self.model, self.optimizer, self.splits = model, optimizer, list(splits)
        self.device = torch.device(device)
        self.kwargs = dict(temperature=temperature, irm_temperature=irm_temperature,
                           penalty_weight=penalty_weight, keep_cont=keep_cont)
        self.last_parts: Optional[dict] = None
        model.train()

    def __call__(self, pos_1: torch.Tensor, pos_2: torch.Tensor, indices: torch.Tensor) -> float:
        _, z1 = self.model(pos_1.to(self.device, non_blocking=True))
        _, z2 = self.model(pos_2.to(self.device, non_blocking=True))
        loss, self.last_parts = train_env_loss(z1, z2, indices, self.splits, **self.kwargs)
        self.optimizer.zero_grad()
        loss.backward()
        self.optimizer.step()
        return loss.item()
