"""The evaluation a training run does, configured by its ``[eval]`` table: the kNN monitor
during training and, at the end, the linear probe and the generative-factor probes; on generated
data (CL-ICA) the identifiability scores instead (:mod:`.identifiability`)."""
from __future__ import annotations

from typing import Callable

import torch

from .. import runtime
from ..data import eval_transform
from .factors import factor_evaluation
from .identifiability import IdentifiabilityMonitor
from .knn import knn_evaluate
from .linear import linear_probe


class RunEvaluation:
    """The evaluations of a run on its labelled ``memory``/``test`` splits (both None: none).

    ``autocast`` and ``device`` are the run's; ``augment`` its two-view augmentation (the linear
    probe's training view when ``eval.linear_augment``); ``source``: the generated data of a
    CL-ICA run (scored by :class:`IdentifiabilityMonitor` after every epoch and at the end).
    """

    def __init__(self, cfg, memory, test, *, device: torch.device, autocast: Callable,
                 augment=None, source=None, log: Callable[[str], None] = print):
        self.cfg, self.memory, self.test = cfg, memory, test
        self.identifiability = None if source is None else IdentifiabilityMonitor(cfg, source, log)
        self.device, self.autocast, self.augment, self.log = device, autocast, augment, log
        self.extract = dict(batch_size=cfg.eval.batch_size, device=device,
                            transform=eval_transform, autocast=autocast,
                            channels_last=cfg.model.channels_last)

    def knn_due(self, epoch: int) -> bool:
        ev = self.cfg.eval
        return self.memory is not None and ev.knn_every > 0 and (
            epoch % ev.knn_every == 0 or epoch == self.cfg.train.epochs)

    def after_epoch(self, epoch: int, forward) -> dict:
        """The metrics due after ``epoch``: the kNN monitor's, the identifiability scores."""
        row = self.knn(forward) if self.knn_due(epoch) else {}
        if self.identifiability is not None:
            row.update(self.identifiability.scores(forward, epoch))
        return row

    def knn(self, forward) -> dict:
        """``knn_top1``, ``knn_top5``, ``knn_seconds`` of the model (or its compiled form)."""
        if self.memory is None:
            return {}
        return knn_evaluate(forward, self.memory, self.test, k=self.cfg.eval.k,
                            temperature=self.cfg.knn_temperature, **self.extract)

    def final(self, model: torch.nn.Module) -> dict:
        """The end-of-run probes: ``{"linear": ..., "factors": ..., "identifiability": ...}``
        (those configured)."""
        ev, out = self.cfg.eval, {}
        if self.identifiability is not None:
            out["identifiability"] = self.identifiability.final(model)
        if self.memory is None:
            return out
        if ev.linear_at_end:
            res = linear_probe(
                model.encoder, self.memory, self.test, epochs=ev.linear_epochs,
                batch_size=ev.linear_batch_size, lr=ev.linear_lr,
                weight_decay=ev.linear_weight_decay, fixed_bn=ev.fixed_bn,
                augment=self.augment.view if ev.linear_augment else None,
                test_transform=eval_transform, device=self.device, seed=self.cfg.run.seed,
                eval_batch_size=ev.batch_size, autocast=self.autocast,
                channels_last=self.cfg.model.channels_last, progress=self.cfg.run.progress)
            self.log(f"linear probe ({ev.linear_epochs} epochs, BN "
                     f"{'eval' if ev.fixed_bn else 'train'} mode): final top-1 "
                     f"{res['final_top1']:.2f}%, best {res['best_top1']:.2f}% (epoch "
                     f"{res['best_epoch']})")
            out["linear"] = res
        if ev.factors and getattr(self.memory, "factors", None):
            facs = factor_evaluation(
                model, self.memory, self.test, k=ev.k, temperature=self.cfg.knn_temperature,
                linear_epochs=ev.linear_epochs, linear_batch_size=ev.linear_batch_size,
                linear_lr=ev.linear_lr, linear_weight_decay=ev.linear_weight_decay,
                seed=self.cfg.run.seed, **self.extract)
            self.log("generative factors (kNN / linear on frozen eval-mode features): " +
                     ", ".join(f"{f} {r['knn_top1']:.1f}/{r['linear_top1']:.1f}%"
                               for f, r in facs.items()))
            out["factors"] = facs
        return out



def evaluate_initialisation(cfg, log: Callable[[str], None] = print) -> dict:
    """The run's evaluation of its network as training starts it (same seed, same
    initialisation, no training step): the reference that shows what training added. Returns a
    summary like a trained run's (``knn_top1``, ``linear``, ``factors``), or ``{}`` when the run
    has no labelled evaluation splits."""
    device = runtime.setup(cfg)
    train_set = runtime.load_split(cfg, cfg.data.split)
    memory, test = runtime.load_eval_splits(cfg, train_set, log)
    if memory is None:
        return {}
    model = runtime.training_model(cfg, device, resuming=False, log=log)
    log(f"[{cfg.run.name}] the same network untrained ("
        f"{'from ' + cfg.run.pretrain_model if cfg.run.pretrain_model else 'random init'}), "
        f"seed {cfg.run.seed}")
    autocast = runtime.autocast_factory(device, cfg.train.amp)
    evaluation = RunEvaluation(cfg, memory, test, device=device, autocast=autocast,
                               augment=runtime.augmentation(cfg, device), log=log)
    summary = {"name": f"{cfg.run.name}_init", "kind": "random init", "epochs": 0,
               **evaluation.knn(model)}
    log(f"kNN {summary['knn_top1']:.2f}%")
    final = evaluation.final(model)
    if "linear" in final:
        summary["linear"] = {k: v for k, v in final["linear"].items() if k != "history"}
    if "factors" in final:
        summary["factors"] = final["factors"]
    return summary
