"""Linear probes on frozen features.

* :func:`linear_probe`: the official ``linear.py`` protocol. The encoder is frozen and a
  ``Linear(feat_dim, classes)`` is trained on its *unnormalised* features with Adam (lr 1e-3,
  wd 1e-6), batch 512 shuffled (no drop_last), for 100 epochs, on the train split with the SSL
  augmentation (one view at ``crop_size``); the test split is evaluated at native resolution
  after every epoch. Officially the encoder's BN layers stay in *train* mode while the probe
  trains, so they normalise with batch statistics and their running statistics drift to the
  probe's data (``docs/official-ipirm.md#bug-2``); ``fixed_bn=True`` runs the encoder in
  eval mode instead. The probe works on a deep copy of the encoder, so the caller's model is
  never changed. Reports the final and the best test top-1 (the official log has both). On one
  device the train-mode BN normalises over the whole batch of 512 (the official DataParallel run
  normalises 256 per GPU). With ``fixed_bn=True`` and no augmentation the encoder is a fixed
  function of the image, so its features are computed once and the probe trains on them (the
  same result, much faster).
* :func:`linear_on_features`: the same classifier and optimiser on precomputed features.
* :func:`linear_eval_checkpoint`: ``fastipirm eval linear``, the probe of a saved model (a
  fastipirm run or an official IP-IRM checkpoint).

Randomness (classifier initialisation, shuffles, augmentation) derives from the run seed
(:mod:`fastipirm.seeding`); the global generators are never touched.
"""
from __future__ import annotations

import contextlib
import copy
import time
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from .. import runtime
from ..data import TwoViewAugment, eval_transform
from ..models import set_batchnorm_mode
from ..runlog import progress_bar, write_csv, write_json
from ..seeding import Stream, derive_seed, derived_generator
from .features import extract_features, images_of, labels_of
from .knn import topk_accuracy
from .saved import load_for_eval, result_path, source_fields

HISTORY_FIELDS = ["epoch", "train_loss", "top1", "top5"]


def seeded_linear(d_in: int, d_out: int, seed: int) -> torch.nn.Linear:
    """``nn.Linear`` with PyTorch's default init drawn from the probe stream of ``seed``
    (the global generator is left as it was)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(derive_seed(seed, Stream.PROBE_INIT))
        return torch.nn.Linear(d_in, d_out)


def linear_on_features(train_feats: torch.Tensor, train_labels: torch.Tensor,
                       test_feats: torch.Tensor, test_labels: torch.Tensor, num_classes: int, *,
                       epochs: int, batch_size: int, lr: float, weight_decay: float,
                       seed: int = 0) -> dict:
    """Linear classifier (Adam, CE, shuffled batches without drop_last) on fixed features.

    Returns ``final_top1``, ``best_top1`` (percent, test accuracy after every epoch) and
    ``best_epoch``.
    """
    device = train_feats.device
    gen = derived_generator(seed, Stream.PROBE_ORDER)
    fc = seeded_linear(train_feats.shape[1], num_classes, seed).to(device)
    opt = torch.optim.Adam(fc.parameters(), lr=lr, weight_decay=weight_decay)
    train_labels, test_labels = train_labels.to(device), test_labels.to(device)
    n = train_feats.shape[0]
    tops = []
    for _ in range(epochs):
        perm = torch.randperm(n, generator=gen).to(device)
        for b0 in range(0, n, batch_size):
            idx = perm[b0:b0 + batch_size]
            loss = F.cross_entropy(fc(train_feats[idx]), train_labels[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        with torch.no_grad():
            tops.append((fc(test_feats).argmax(1) == test_labels).float().mean().item() * 100)
    best = max(range(len(tops)), key=lambda i: tops[i])
    return {"final_top1": tops[-1], "best_top1": tops[best], "best_epoch": best + 1}


def linear_probe(encoder: torch.nn.Module, train_set, test_set, *, epochs: int = 100,
                 batch_size: int = 512, lr: float = 1e-3, weight_decay: float = 1e-6,
                 fixed_bn: bool = False, augment: Optional[Callable] = None,
                 test_transform: Callable, device: torch.device, seed: int = 0,
                 eval_batch_size: int = 256, autocast: Callable = contextlib.nullcontext,
                 channels_last: bool = False, progress: bool = False) -> dict:
    """Official linear evaluation of a frozen ``encoder`` (images -> unnormalised features).

    ``augment(images_uint8, generator)`` gives the training view (official: one SSL view at
    ``crop_size``); ``None`` trains on ``test_transform`` images. ``fixed_bn`` keeps the encoder's
    BN in eval mode during training (official: train mode). Returns ``final_top1``,
    ``best_top1``, ``final_top5``, the per-epoch ``history`` and the settings used.
    """
    start = time.perf_counter()
    encoder = copy.deepcopy(encoder).to(device)
    for p in encoder.parameters():
        p.requires_grad_(False)
    encoder.eval()
    train_images, train_labels = images_of(train_set), labels_of(train_set)
    test_labels = labels_of(test_set).to(device)
    num_classes = int(train_set.num_classes)
    cached = fixed_bn and augment is None
    fe = dict(device=device, autocast=autocast, channels_last=channels_last, normalize=False)
    if cached:
        train_feats = extract_features(encoder, train_set, batch_size=eval_batch_size,
                                       transform=test_transform, **fe)
        feat_dim = train_feats.shape[1]
    else:
        with torch.no_grad():
            probe = test_transform(train_images[:2].to(device))
            feat_dim = encoder(probe).flatten(1).shape[1]
    gen = derived_generator(seed, Stream.PROBE_ORDER)
    aug_gen = derived_generator(seed, Stream.PROBE_AUGMENT, device=device)
    fc = seeded_linear(feat_dim, num_classes, seed).to(device)
    opt = torch.optim.Adam(fc.parameters(), lr=lr, weight_decay=weight_decay)
    history = []
    n = train_images.shape[0]
    bar = progress_bar(progress, epochs, "linear probe")
    for epoch in range(1, epochs + 1):
        perm = torch.randperm(n, generator=gen)
        if not cached:
            encoder.eval()
            set_batchnorm_mode(encoder, not fixed_bn)      # official: BN in train mode
        fc.train()
        loss_sum = torch.zeros((), device=device)
        for b0 in range(0, n, batch_size):                 # shuffled, no drop_last
            idx = perm[b0:b0 + batch_size]
            y = train_labels[idx].to(device)
            if cached:
                h = train_feats[idx.to(device)]
            else:
                images = train_images[idx].to(device)
                x = augment(images, aug_gen) if augment is not None else test_transform(images)
                if channels_last:
                    x = x.contiguous(memory_format=torch.channels_last)
                with torch.no_grad(), autocast():
                    h = encoder(x)
                h = h.flatten(1).float()
            loss = F.cross_entropy(fc(h), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            loss_sum += loss.detach() * idx.shape[0]
        # test (official: net.eval(), i.e. BN running statistics, possibly drifted)
        encoder.eval()
        fc.eval()
        with torch.no_grad():
            if epoch == 1 or not fixed_bn:   # BN statistics only change in train mode
                test_feats = extract_features(encoder, test_set, batch_size=eval_batch_size,
                                              transform=test_transform, **fe)
            logits = fc(test_feats)
        ranks = logits.argsort(dim=1, descending=True)
        top1, top5 = topk_accuracy(ranks, test_labels)
        history.append({"epoch": epoch, "train_loss": float(loss_sum) / n, "top1": top1,
                        "top5": top5})
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{history[-1]['train_loss']:.3f}", top1=f"{top1:.2f}")
    if bar is not None:
        bar.close()
    best = max(history, key=lambda h: h["top1"])
    return {"final_top1": history[-1]["top1"], "final_top5": history[-1]["top5"],
            "best_top1": best["top1"], "best_epoch": best["epoch"], "history": history,
            "epochs": epochs, "fixed_bn": fixed_bn, "augment": augment is not None,
            "seconds": time.perf_counter() - start}


def linear_eval_checkpoint(checkpoint, *, config=None, overrides=None,
                           epochs: Optional[int] = None, fixed_bn: Optional[bool] = None,
                           augment: Optional[bool] = None, device: Optional[str] = None,
                           progress: bool = True, log: Callable[[str], None] = print) -> dict:
    """``fastipirm eval linear``: the linear probe of a saved model.

    ``checkpoint`` is any file :func:`fastipirm.model_files.load_model_file` reads: a fastipirm
    checkpoint (file or run directory) or an official IP-IRM ``model_<epoch>.pth``, among others.
    The data set and probe settings come from the checkpoint's config (``[eval]``); a file without
    one (official) takes them from ``config`` (a TOML path; default: the default config, the
    official STL-10 run, so the probe is the official ``linear.py`` protocol,
    ``docs/official-ipirm.md#linear-probe``) and its model shape from its weights. ``overrides``
    (``section.key=value``) and the explicit arguments go on top. The result (without the
    per-epoch history, which goes to ``linear_eval.csv``) is written next to the checkpoint as
    ``linear_eval.json`` (:func:`fastipirm.eval.saved.result_path`).
    """
    model, cfg, dev, mf = load_for_eval(checkpoint, config=config, overrides=overrides,
                                        device=device, log=log)
    ev = cfg.eval
    epochs = ev.linear_epochs if epochs is None else epochs
    fixed_bn = ev.fixed_bn if fixed_bn is None else fixed_bn
    augment = ev.linear_augment if augment is None else augment
    train_set = runtime.load_split(cfg, cfg.data.memory_split)
    test_set = runtime.load_split(cfg, cfg.data.test_split)
    aug = TwoViewAugment(out_size=cfg.data.crop_size, scale=(cfg.data.crop_scale_min, 1.0))
    log(f"linear probe of {mf.description}: {cfg.data.name} {cfg.data.memory_split} -> "
        f"{cfg.data.test_split}, {epochs} epochs, batch {ev.linear_batch_size}, Adam lr "
        f"{ev.linear_lr:g} wd {ev.linear_weight_decay:g}, encoder BN "
        f"{'eval (fixed)' if fixed_bn else 'train (official)'} mode, "
        f"{'SSL-augmented' if augment else 'un-augmented'} training images")
    res = linear_probe(model.encoder, train_set, test_set, epochs=epochs,
                       batch_size=ev.linear_batch_size, lr=ev.linear_lr,
                       weight_decay=ev.linear_weight_decay, fixed_bn=fixed_bn,
                       augment=aug.view if augment else None, test_transform=eval_transform,
                       device=dev, seed=cfg.run.seed, eval_batch_size=ev.batch_size,
                       autocast=runtime.autocast_factory(dev, cfg.train.amp),
                       channels_last=cfg.model.channels_last, progress=progress)
    write_csv(result_path(checkpoint, "linear_eval.csv"), HISTORY_FIELDS, res["history"])
    out = {k: v for k, v in res.items() if k != "history"}
    out.update(source_fields(checkpoint, mf))
    write_json(result_path(checkpoint, "linear_eval.json"), out)
    log(f"linear top-1: final {res['final_top1']:.2f}%, best {res['best_top1']:.2f}% "
        f"(epoch {res['best_epoch']}); top-5 final {res['final_top5']:.2f}%")
    return res
