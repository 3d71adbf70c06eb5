"""The method protocol: what a training method gives the loop, and the step machinery they share.

A method (:class:`Method`) owns everything that differs between SimCLR, IP-IRM and the methods to
come: its training step, what happens after an epoch (IP-IRM: a new partition), its own state in
the checkpoint and the names of the metrics it reports. The loop (:mod:`fastipirm.train`) owns
the rest: data, model, optimiser, epochs, evaluation and outputs. A method is built from a
:class:`MethodContext` (the run's config, model, optimiser and runtime) and registered by name in
:data:`fastipirm.methods.METHODS`.

:class:`TrainStep` is the step every method runs: its objective (forward + loss) under autocast,
optionally ``torch.compile``-d, backward through the GradScaler, one optimiser step, with nothing
read back to the host.
"""
from __future__ import annotations

import contextlib
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Optional

import torch


@dataclass
class MethodContext:
    """What a method is built with. ``cfg`` is the run's :class:`fastipirm.config.Config`."""

    cfg: Any
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    device: torch.device
    scaler: Optional[torch.amp.GradScaler] = None      # None: a disabled one
    forward: Optional[Callable] = None                 # the model or its compiled form
    autocast: Callable = contextlib.nullcontext
    compile_mode: Optional[str] = None                 # torch.compile mode of the step
    train_set: Any = None                              # the pretraining split
    augment: Any = None                                # TwoViewAugment of the training views
    generator: Optional[torch.Generator] = None        # the augmentation generator
    progress: Callable[[int, str], Any] = field(default=lambda total, desc: None)
    log: Callable[[str], None] = print
    plain_forward: Optional[Callable] = None           # without the DDP wrapper (no-grad
                                                       # passes, e.g. IP-IRM's extraction)

    def __post_init__(self):
        if self.scaler is None:
            self.scaler = torch.amp.GradScaler("cuda", enabled=False)
        if self.forward is None:
            self.forward = self.model
        if self.plain_forward is None:
            self.plain_forward = self.forward


class Method(ABC):
    """One training method. Subclasses set the class attributes and implement :meth:`step`.

    * ``name``: the registry key (``method.name`` in the config); ``label``: for tables.
    * ``metric_names``: the parts of a step's loss (0-d tensors in ``step``'s dict), averaged
      over an epoch and logged beside ``loss``.
    * ``epoch_fields``: the fields :meth:`end_epoch` adds to an epoch's metrics row.
    * ``global_batch``: under several processes :meth:`step` receives the whole global batch
      (every rank makes it) and takes its share itself (MixUp: the partners range over the
      global batch's images); otherwise (default) it receives this rank's contiguous share
      (the training views are made with ``shard=(rank, world)``). One process: the batch
      either way.
    """

    name: ClassVar[str]
    label: ClassVar[str]
    metric_names: ClassVar[tuple[str, ...]] = ()
    epoch_fields: ClassVar[tuple[str, ...]] = ()
    global_batch: ClassVar[bool] = False

    def __init__(self, ctx: MethodContext):
        self.ctx = ctx

    def start(self) -> None:
        """Before the first epoch of a fresh run (not on resume)."""

    def begin_epoch(self, epoch: int) -> None:
        """Before the steps of ``epoch`` (1-based)."""

    @abstractmethod
    def step(self, indices: torch.Tensor, view1: torch.Tensor, view2: torch.Tensor
             ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """One optimisation step on a batch; ``(loss, {metric: value})``, detached, on device."""

    def end_epoch(self, epoch: int, *, last: bool) -> dict:
        """After the steps of ``epoch``; returns its ``epoch_fields``."""
        return {}

    def describe(self, row: dict) -> str:
        """The method's part of an epoch's log line (``row``: the epoch's metrics)."""
        return ""

    def state_dict(self) -> dict:
        """The method's own state for the checkpoint (CPU tensors and plain values)."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        """Restore :meth:`state_dict`'s state on resume."""

    def summary(self) -> dict:
        """What the method adds to ``summary.json``."""
        return {}


def grouped_projection(forward: Callable, x: torch.Tensor, splits: int,
                       model: torch.nn.Module) -> torch.Tensor:
    """Projections of a batch whose BN sees ``splits`` equal groups, as ``nn.DataParallel``
    (``docs/deviations.md#bn-splits``).

    The official run splits every view over 2 GPUs, so train-mode BN normalises each half with
    its own statistics, and only replica 0 (the first group) updates the running statistics.
    Here the groups are forwarded one after the other and the later ones run with BN momentum
    0, which leaves the running statistics as the first group set them. ``splits=1``: one plain
    forward.
    """
    if splits == 1:
        return forward(x)[1]
    bns = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    momenta = [m.momentum for m in bns]
    outs = []
    try:
        for j, chunk in enumerate(x.chunk(splits)):
            if j == 1:
                for m in bns:
                    m.momentum = 0.0
            outs.append(forward(chunk)[1])
    finally:
        for m, mom in zip(bns, momenta):
            m.momentum = mom
    return torch.cat(outs)


def project_batch(ctx: MethodContext, x: torch.Tensor) -> torch.Tensor:
    """Projections of one batch in float32 (float64 stays float64), forwarded as its own batch
    (BN sees it alone) under autocast, channels_last as configured, in ``model.bn_splits`` BN
    groups."""
    m = ctx.cfg.model
    if m.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    with ctx.autocast():
        z = grouped_projection(ctx.forward, x, m.bn_splits, ctx.model)
    return z.to(torch.promote_types(z.dtype, torch.float32))


def project_views(ctx: MethodContext, v1: torch.Tensor, v2: torch.Tensor
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Float32 projections of both views: one forward per view (so BN sees each view
    separately, as the official code), :func:`project_batch` each."""
    return project_batch(ctx, v1), project_batch(ctx, v2)


class TrainStep:
    """``step(*args)``: ``loss, parts = objective(*args)``, backward through the scaler, one
    optimiser step; returns ``(loss, parts)`` detached and on the device (no host read).

    ``compile_mode`` (``None``: eager) compiles the objective with
    ``torch.compile(mode=compile_mode)`` (``"reduce-overhead"`` adds CUDA graphs) and, when no
    GradScaler is active, the optimiser step as well. The backward runs the compiled graph's
    backward (AOTAutograd), so the whole step is compiled code. ``backend``: the op backend the
    objective uses, loaded before tracing (a lazy load inside traced code forces a recompile).
    """

    def __init__(self, ctx: MethodContext, objective: Callable, *, backend: Optional[str] = None):
        self.model, self.optimizer, self.scaler = ctx.model, ctx.optimizer, ctx.scaler
        self.compile_mode = ctx.compile_mode
        self._objective = objective
        self._optimizer_step = None
        self._cudagraphs = False
        if self.compile_mode is not None:
            from ..ops.backends import resolve_backend
            resolve_backend(backend, next(self.model.parameters()).device)
            self._objective = torch.compile(objective, mode=self.compile_mode)
            self._cudagraphs = self.compile_mode in ("reduce-overhead", "max-autotune")
            if not self.scaler.is_enabled():
                self._optimizer_step = torch.compile(self.optimizer.step)

    def __call__(self, *args):
        if self._cudagraphs:
            torch.compiler.cudagraph_mark_step_begin()
        loss, parts = self._objective(*args)
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        if self._optimizer_step is not None:
            self._optimizer_step()
        else:
            self.scaler.step(self.optimizer)
        self.scaler.update()
        loss = loss.detach()
        if self._cudagraphs:                        # outputs of a CUDA graph are overwritten
            loss, parts = loss.clone(), {k: v.clone() for k, v in parts.items()}
        return loss, parts
