"""IP-IRM + MixUp (official ``main_mixup.py --ours_mixup_mode full --keep_cont --offline
--retain_group``, ``train_env_mixup_full_retaingp``; ``docs/official-ipirm.md#mixup``), the
official best result (its baseline, ``--baseline``, is :class:`.mixup.MixupBaseline`).

A step:

1. view 1 mixed over the whole batch (:mod:`fastipirm.data.mixup`), the mixed view 1 and the
   clean view 2 forwarded once each, the global i-Mix loss ``L_glob`` at ``train.temperature``
   (:func:`fastipirm.losses.ipirm_mixup.imix_loss`);
2. for every retained partition ``p``: the batch sorted by environment, the *clean* view-1
   images of each environment re-mixed within it (new partners and weights) and forwarded as
   their own batch (BN sees only that subset), their queries against the environment's view-2
   keys: ``loss_p = mean_k L_pk + lambda1 mean_k R_pk`` (divided by lambda1 when lambda1 > 1)
   with the penalty at ``train.temperature`` too (no ``irm_temperature`` here);
3. one optimiser step on ``L_glob + sum_p loss_p`` (the official *sums* the partitions'
   terms, ``main.py`` averages them).

The view-2 forward is shared by the global term and every partition (the official forwards it
again for each partition: the same outputs and gradients; only BN's running statistics are
updated fewer times). Maximisation is IP-IRM's offline one (:class:`.ipirm.IPIRM`), at
``train.temperature`` (0.2) with ``ipirm.irm_temperature`` (0.5), as the official STL runs.
Environments with fewer than 2 members in a batch are skipped (train-mode BN cannot normalise
one sample; the official run would fail there).

Several processes (``docs/distributed.md#mixup``): every rank receives the whole global batch
(``global_batch``), so the draws and the environments are the global batch's on every rank;
each rank forwards its share of the mixed view 1, of view 2 and of every environment's subset
(``chunk(world)``, as DataParallel splits it; an environment is used when every share has >= 2
members), its queries go against the gathered view-2 keys and the per-key-column gradients are
all-reduced before they are squared.
"""
from __future__ import annotations

import torch

from .. import distributed
from ..data.mixup import group_mixup_draws, mix
from ..losses.ipirm_mixup import imix_environment_terms
from .base import project_batch
from .ipirm import IPIRM
from .mixup import mixup_global_term


class IPIRMMixup(IPIRM):
    name = "ipirm_mixup"
    label = "IP-IRM + MixUp"
    global_batch = True          # MixUp partners range over the global batch's images

    def objective(self, indices, view1, view2, partitions, penalty_weight):
        ctx = self.ctx
        world, rank = distributed.world_size(), distributed.rank()
        ddp = distributed.active()
        glob, z2 = mixup_global_term(ctx, view1, view2, backend=self.backend)
        total = glob
        env_loss = torch.zeros((), device=glob.device)
        penalty = torch.zeros((), device=glob.device)
        if partitions is not None:
            k_envs = partitions.shape[2]
            for logits in partitions:
                envs = logits[indices].argmax(1)
                counts = torch.bincount(envs, minlength=k_envs)
                # an environment needs >= 2 members in every BN batch: each rank's share (a
                # DataParallel chunk of the subset; one process: the subset itself)
                per = (counts + world - 1) // world
                usable = counts - (world - 1) * per >= 2
                keep = usable[envs]                        # singletons: no BN batch
                order = torch.argsort(torch.where(keep, envs, k_envs), stable=True)
                sizes = [c if ok else 0 for c, ok in zip(counts.tolist(), usable.tolist())]
                n = sum(sizes)
                if n == 0:
                    continue
                order = order[:n]
                lam, partner = group_mixup_draws(sizes, ctx.cfg.ipirm.mixup_alpha,
                                                 generator=ctx.generator, device=view1.device)
                mixed = mix(view1[order], lam, partner)
                chunks = mixed.split([s for s in sizes if s])
                if ddp:           # this rank's share of every environment (docs/distributed.md)
                    q, rows, start = [], [], 0
                    for chunk in chunks:
                        share = (chunk.shape[0] + world - 1) // world
                        q.append(project_batch(ctx, chunk.chunk(world)[rank]))
                        lo = start + rank * share
                        rows.append(torch.arange(lo, lo + q[-1].shape[0], device=q[-1].device))
                        start += chunk.shape[0]
                    q, rows = torch.cat(q), torch.cat(rows)
                else:
                    q, rows = torch.cat([project_batch(ctx, chunk) for chunk in chunks]), None
                loss_k, pen_k = imix_environment_terms(
                    q, z2[order], envs[order], lam, partner,
                    temperature=ctx.cfg.train.temperature, backend=self.backend,
                    check_values=False, rows=rows, world=world)
                term = loss_k + penalty_weight * pen_k
                if penalty_weight > 1:
                    term = term / penalty_weight
                total = total + term
                env_loss = env_loss + loss_k.detach()
                penalty = penalty + pen_k.detach()
        return total, {"loss_global": glob.detach(), "loss_env": env_loss, "penalty": penalty}
