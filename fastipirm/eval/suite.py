"""The evaluation a training run does, configured by its ``[eval]`` table: the kNN monitor
during training and, at the end, the linear probe, the generative-factor probes and DCoDR's
factor probes (``eval.factor_probes``, :mod:`.factor_probes`); on CL-ICA's data the
identifiability scores instead (:mod:`.identifiability`)."""
from __future__ import annotations

from typing import Callable

import torch

from .. import runtime
from ..data import eval_transform
from ..data.domain_batches import DOMAIN_METHODS, domain_values
from ..models import eval_mode
from ..models.codes import contrastive_code
from ..seeding import Stream, derive_seed
from .factor_probes import probe_factors
from .retrieval import retrieval_rules, retrieval_top1
from .factors import factor_evaluation
from .features import extract_features
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
        if ev.factor_probes:
            out["probes"] = self.factor_probes(model)
        return out

    def factor_probes(self, model: torch.nn.Module) -> dict:
        """DCoDR's evaluation of the frozen model: the L2-normalised codes of the memory (train)
        and test splits, one MLP probe per factor (:func:`.factor_probes.probe_factors`). DCoDR's
        models see [0, 1] images (as they were trained), the others the run's eval transform."""
        cfg = self.cfg
        domain = cfg.data.domain_factor or getattr(self.memory, "domain_factor", None) or ""
        factors = getattr(self.memory, "factors", None)
        if not factors:
            raise ValueError(f"eval.factor_probes: {self.memory.name} has no factors to probe")
        if not domain:
            raise ValueError("eval.factor_probes: set data.domain_factor (the factor that is the "
                             "domain)")
        domain_values(self.memory, domain)            # a clear error for an unknown factor
        raw = cfg.method.name in DOMAIN_METHODS
        extract = dict(self.extract, transform=(lambda x: x.permute(0, 3, 1, 2).float() / 255)
                       if raw else eval_transform)
        with eval_mode(model):
            codes = [extract_features(lambda x: contrastive_code(model(x)), split, **extract)
                     for split in (self.memory, self.test)]
        def pick(split):
            return {k: torch.as_tensor(v).long() for k, v in split.factors.items()
                    if k in factors and len(set(map(int, factors[k]))) > 1}

        targets = [getattr(split, "targets", None) for split in (self.memory, self.test)]
        res = probe_factors(codes[0], pick(self.memory), codes[1], pick(self.test),
                            domain_factor=domain,
                            targets=None if targets[0] is None else (targets[0], targets[1]),
                            seed=derive_seed(cfg.run.seed, Stream.FACTOR_PROBES),
                            device=self.device, max_epochs=cfg.eval.probe_epochs,
                            patience=cfg.eval.probe_patience, log=self.log)
        train_f, test_f = pick(self.memory), pick(self.test)
        try:
            allowed, cyclic = retrieval_rules(self.memory.name, train_f, domain)
        except ValueError as exc:                    # no factor to match: no retrieval
            self.log(f"retrieval: skipped ({exc})")
        else:
            ret = retrieval_top1(codes[0], train_f, codes[1], test_f, allowed=allowed,
                                 cyclic=cyclic, device=self.device)
            res["retrieval"] = ret["top1"]
            self.log("retrieval top-1 matches: " + ", ".join(
                f"{k} {100 * v:.1f}%" for k, v in ret["top1"].items()))
        return res



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
