"""The official ``train_env`` minimisation step (IP-IRM ``main.py``) re-created as a speed baseline.

What one official step does (spec section 6.2), and what :class:`OfficialStep` does the same way:

* the two views arrive as CPU tensors from the per-image PIL DataLoader and are copied to the
  device; one fp32 forward per view (train mode);
* ``keep_cont``: the global NT-Xent from the official logit construction (``info_nce_loss``:
  a same-sample label matrix and a diagonal mask built on the host and copied over, boolean
  selection of the positives and negatives, positive first) and ``CrossEntropyLoss``;
* for every retained partition and every environment: the batch rows whose argmax environment
  is ``k`` (``torch.where``, a host synchronisation), their own ``2b x (2b-1)`` logit matrix,
  the cross-entropy at ``temperature`` and the per-slot IRM penalty at ``irm_temperature``: a
  ones vector with one entry per logit column, ``autograd.grad(create_graph=True)`` and the
  squared norm of that gradient;
* ``loss = mean_{p,k} L_{p,k} + L_glob + lambda1 * mean_{p,k} R_{p,k}`` (divided by lambda1 when
  it exceeds 1), one ``backward``, one Adam step, and ``loss.item()`` for the progress bar.

Not reproduced: ``nn.DataParallel`` over 2 GPUs (one device here, so BN sees the whole view) and
the official cudnn flags, which the benchmarks set around this step instead
(:func:`official_cudnn`). As in the official code nothing guards an empty environment (the
logit construction fails on it), so batches must be large enough for the partitions (with
random balanced partitions an empty environment has odds ``2^(1-B)`` per partition and batch). The pieces are also used by the official-style maximisation of
``bench.maximize`` (:func:`official_logits` with ``slots=True``).
"""
from __future__ import annotations

import contextlib
from typing import Optional, Sequence

import torch
import torch.nn.functional as F


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


def official_logits(features: torch.Tensor, batch: int, *, slots: bool = False):
    """``info_nce_loss`` (and ``info_nce_loss_update`` with ``slots``) at temperature 1.

    ``features`` is ``(2b, D)``: view 1 then view 2. Returns the ``(2b, 2b-1)`` cosine logits
    (positive in column 0, the negatives in ascending column order), the zero targets and, with
    ``slots``, the in-batch sample index of every logit slot (int64, the official index map).
    """
    device = features.device
    sample = torch.cat([torch.arange(batch), torch.arange(batch)])
    same = (sample[None, :] == sample[:, None]).float().to(device)
    sim = features @ features.T
    keep = ~torch.eye(same.shape[0], dtype=torch.bool).to(device)
    same = same[keep].view(same.shape[0], -1).bool()
    sim = sim[keep].view(sim.shape[0], -1)
    logits = torch.cat([sim[same].view(sim.shape[0], -1), sim[~same].view(sim.shape[0], -1)], 1)
    targets = torch.zeros(logits.shape[0], dtype=torch.long).to(device)
    if not slots:
        return logits, targets
    index = sample.to(device)[None, :].expand(2 * batch, 2 * batch)
    index = index[keep].view(2 * batch, -1)
    index = torch.cat([index[same].view(2 * batch, -1), index[~same].view(2 * batch, -1)], 1)
    return logits, targets, index


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
    batch = z1.shape[0]
    zero = z1.new_zeros(())
    loss_global = zero
    if keep_cont:
        logits, targets = official_logits(torch.cat([z1, z2]), batch)
        loss_global = F.cross_entropy(logits / temperature, targets)
    env_losses, env_penalties = [], []
    for split in splits:
        for env in range(split.shape[1]):
            e1, e2 = select_environment(z1, z2, indices, split, env)
            logits, targets = official_logits(torch.cat([e1, e2]), e1.shape[0])
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
