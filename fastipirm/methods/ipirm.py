"""IP-IRM (Wang et al., NeurIPS 2021): SimCLR plus an IRM penalty over every environment of every
retained partition (minimisation), alternating with learning a new partition of the data set that
maximises that penalty (maximisation). What the official code does is in
``docs/official-ipirm.md``; deviations are in ``docs/deviations.md``.

* Step (:meth:`IPIRM.step`): one forward per view, the batch's hard memberships in every
  retained partition as one ``(B, P*K)`` matrix, and one :func:`minimization_loss` call over all
  of them (plus the global NT-Xent column with ``ipirm.keep_cont``).
* Penalty schedule: lambda1 (``ipirm.penalty_weight``) from epoch ``ipirm.penalty_iters`` on
  (always when ``penalty_iters >= 200``, as the official code).
* Partition schedule: a partition at epoch 0 (eval mode, untrained network) and after the
  training of every ``partition.maximize_iter``-th epoch, before that epoch's evaluation; the
  one after the final epoch, which the official code computes and never uses, only with
  ``partition.at_last_epoch``. Each maximisation (:mod:`fastipirm.partition`) extracts one view
  pair per image, optimises Theta from a generator derived from (seed, epoch) and joins the
  retained ``(P, N, K)`` stack.
* State: the retained partitions, the last best Theta (warm start when ``random_init`` is off)
  and the log of every maximisation.

Several processes (``docs/distributed.md``): the step gathers both views' projections and the
indices; with ``op.ddp_form`` local each rank's samples are the anchors of the op's distributed
form and the per-slot sums are all-reduced before they are squared, replicated computes the
whole global loss on every rank. The maximisation extracts the bank in shares (gathered), runs
the same search everywhere and broadcasts rank 0's Theta.
"""
from __future__ import annotations

import time
from typing import Optional

import torch

from .. import distributed
from .. import partition as part
from ..data import IndexedLoader
from ..losses.ipirm import memberships_from_logits, minimization_loss
from ..ops.env_contrastive import choose_ddp_form
from ..runtime import TrainingDiverged
from ..seeding import Stream, derive_seed, derived_generator
from .base import Method, MethodContext, TrainStep, project_views


def scheduled_penalty_weight(cfg, epoch: int) -> float:
    """lambda1 from epoch ``penalty_iters`` on (always if it is >= 200), else 0."""
    ip = cfg.ipirm
    return ip.penalty_weight if (epoch >= ip.penalty_iters or ip.penalty_iters >= 200) else 0.0


class IPIRM(Method):
    name = "ipirm"
    label = "IP-IRM"
    metric_names = ("loss_global", "loss_env", "penalty")
    epoch_fields = ("penalty_weight", "partitions", "balance", "partition_seconds")

    def __init__(self, ctx: MethodContext):
        super().__init__(ctx)
        cfg = ctx.cfg
        self.backend = cfg.op.backend_or_none
        self.loss_options = dict(temperature=cfg.train.temperature,
                                 irm_temperature=cfg.ipirm.irm_temperature,
                                 keep_cont=cfg.ipirm.keep_cont, backend=self.backend,
                                 penalty=cfg.op.penalty, check_values=False)
        self.train_step = TrainStep(ctx, self.objective, backend=self.backend)
        # several processes: each rank's anchors against the gathered batch through the op's
        # distributed form ("local"), or the whole global loss on every rank ("replicated");
        # op.ddp_form, docs/distributed.md#gradients
        self.ddp_form = choose_ddp_form(cfg.op.ddp_form, self.backend, ctx.device,
                                        distributed.world_size())
        self.partitions: Optional[torch.Tensor] = None    # (P, N, K) retained partition logits
        self.last_theta: Optional[torch.Tensor] = None    # the latest best Theta (warm start)
        self.partition_log: list = []
        self.penalty_weight = 0.0
        self._extract_loader: Optional[IndexedLoader] = None

    # -- the minimisation step ---------------------------------------------------------------
    def objective(self, indices, view1, view2, partitions, penalty_weight):
        z1, z2 = project_views(self.ctx, view1, view2)
        local = {}
        if distributed.active():     # the gathered global batch (docs/distributed.md#gradients)
            n, world = z1.shape[0], distributed.world_size()
            z1, z2 = distributed.all_gather_grad(z1), distributed.all_gather_grad(z2)
            indices = distributed.all_gather_nograd(indices)
            if self.ddp_form == "local":    # this rank's anchors, slot sums all-reduced
                rank = distributed.rank()
                local = dict(rows=(rank * n, (rank + 1) * n), world=world)
        memberships = None if partitions is None else memberships_from_logits(partitions, indices)
        return minimization_loss(z1, z2, memberships, penalty_weight=penalty_weight,
                                 **self.loss_options, **local)

    def begin_epoch(self, epoch: int) -> None:
        self.penalty_weight = scheduled_penalty_weight(self.ctx.cfg, epoch)

    def step(self, indices, view1, view2):
        indices = indices.to(self.ctx.device, non_blocking=True)
        return self.train_step(indices, view1, view2, self.partitions, self.penalty_weight)

    # -- the maximisation step ---------------------------------------------------------------
    def start(self) -> None:
        self._new_partition(0)

    def end_epoch(self, epoch: int, *, last: bool) -> dict:
        pc = self.ctx.cfg.partition
        seconds = 0.0
        if epoch % pc.maximize_iter == 0 and (not last or pc.at_last_epoch):
            seconds = self._new_partition(epoch)
        return {"penalty_weight": self.penalty_weight,
                "partitions": 0 if self.partitions is None else self.partitions.shape[0],
                "balance": (min(self.partition_log[-1]["fractions"]) if self.partition_log
                            else None),
                "partition_seconds": seconds}

    def _new_partition(self, epoch: int) -> float:
        """Maximise, retain the new partition, log it; returns the seconds it took.

        Offline (``partition.offline``): one feature bank, then the search on it. Online: a
        shuffled ``drop_last`` loader of ``partition.batch_size`` images whose order of search
        epoch ``e`` is a pure function of (seed, ``epoch``, ``e``), fresh views every search epoch;
        with ``partition.mixup_max`` (IP-IRM + MixUp's CIFAR-100 runs) view 1 is mixed and the
        search is the official online MixUp one, with its fixed schedule.
        """
        ctx, cfg = self.ctx, self.ctx.cfg
        pc, seed = cfg.partition, cfg.run.seed
        start = time.perf_counter()
        n = len(ctx.train_set.images)
        if pc.offline:
            if self._extract_loader is None:
                self._extract_loader = IndexedLoader(ctx.train_set, pc.extract_batch_size,
                                                     seed=seed, shuffle=False, drop_last=False,
                                                     device=ctx.device)
            z1, z2 = part.extract_views(ctx.plain_forward, self._extract_loader, ctx.augment,
                                        num_samples=n, device=ctx.device, generator=ctx.generator,
                                        autocast=ctx.autocast,
                                        channels_last=cfg.model.channels_last)
        else:
            loader = getattr(self, "_online_loader", None)
            if loader is None:       # one loader (and device copy of the images) for every search
                loader = self._online_loader = IndexedLoader(
                    ctx.train_set, pc.batch_size, seed=seed, shuffle=True, drop_last=True,
                    device=ctx.device)
            loader.seed = derive_seed(seed, Stream.THETA_ORDER, epoch)
            batches = part.online_views(
                ctx.plain_forward, loader, ctx.augment, device=ctx.device, generator=ctx.generator,
                autocast=ctx.autocast, channels_last=cfg.model.channels_last,
                mixup_alpha=cfg.ipirm.mixup_alpha if pc.mixup_max else None)
        init = part.initial_logits(n, pc.env_num, random_init=pc.random_init,
                                   previous=self.last_theta,
                                   generator=derived_generator(seed, Stream.THETA_INIT, epoch),
                                   device=ctx.device)
        bar = ctx.progress(pc.max_epochs + 1, f"partition @{epoch}")

        def progress(e, j):
            if bar is not None:
                bar.update(1)
                bar.set_postfix(J=f"{j:.4f}")

        search = dict(temperature=cfg.train.temperature,
                      irm_temperature=cfg.ipirm.irm_temperature, irm_weight=pc.irm_weight_maxim,
                      constrain=pc.constrain, constrain_relax=pc.constrain_relax,
                      nonorm=pc.nonorm, lr=pc.lr, milestones=pc.milestones, gamma=pc.gamma,
                      min_epochs=pc.min_epochs, patience=pc.patience, max_epochs=pc.max_epochs,
                      backend=self.backend, penalty=cfg.op.penalty, progress=progress,
                      irm_mode=pc.irm_mode)
        try:
            if pc.offline:
                result = part.optimize_partition(
                    z1, z2, init, batch_size=pc.batch_size,
                    generator=derived_generator(seed, Stream.THETA_ORDER, epoch), **search)
            elif pc.mixup_max:
                result = part.optimize_partition_online_mixup(
                    batches, init, device=ctx.device, temperature=cfg.train.temperature,
                    irm_weight=pc.irm_weight_maxim, constrain=pc.constrain,
                    constrain_relax=pc.constrain_relax, nonorm=pc.nonorm, progress=progress)
            else:
                result = part.optimize_partition_online(batches, init, device=ctx.device,
                                                        **search)
        except FloatingPointError as exc:
            raise TrainingDiverged(f"partition step after epoch {epoch}: {exc}") from None
        finally:
            if bar is not None:
                bar.close()
        # under DDP every rank ran the same search on the same bank (same weights, same
        # generators); rank 0's result is broadcast so that the partitions agree bit for bit
        # even where a GPU kernel is not deterministic (docs/distributed.md)
        logits = distributed.broadcast_tensor(result.logits.contiguous())
        self.last_theta = logits
        self.partitions = part.retain(self.partitions, logits,
                                      retain_group=pc.retain_group,
                                      retain_group_set=pc.retain_group_set)
        seconds = time.perf_counter() - start
        entry = distributed.broadcast_object(
            {"epoch": epoch, "best_objective": result.best_objective,
             "best_epoch": result.best_epoch, "epochs_run": result.epochs_run,
             "fractions": result.fractions(), "seconds": seconds,
             "partitions": self.partitions.shape[0]})
        seconds = entry["seconds"]
        self.partition_log.append(entry)
        ctx.log(f"  partition after epoch {epoch}: J* {result.best_objective:.4f} (epoch "
                f"{result.best_epoch} of {result.epochs_run}), env shares "
                f"{', '.join(f'{f:.3f}' for f in entry['fractions'])}, {seconds:.1f}s")
        return seconds

    def describe(self, row: dict) -> str:
        return (f"(global {row['loss_global']:.4f}, env {row['loss_env']:.4f}, penalty "
                f"{row['penalty']:.4f} x {row['penalty_weight']:g})  P={row['partitions']}")

    # -- checkpoint and summary --------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"partitions": None if self.partitions is None else self.partitions.cpu(),
                "last_theta": None if self.last_theta is None else self.last_theta.cpu(),
                "partition_log": self.partition_log}

    def load_state_dict(self, state: dict) -> None:
        dev = self.ctx.device
        self.partitions = None if state["partitions"] is None else state["partitions"].to(dev)
        self.last_theta = None if state["last_theta"] is None else state["last_theta"].to(dev)
        self.partition_log = list(state["partition_log"])

    def summary(self) -> dict:
        return {"partitions": self.partition_log}
