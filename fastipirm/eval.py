"""Evaluation: the weighted kNN monitor and the linear probe (spec section 9).

* :func:`knn_evaluate`: memory = normalised encoder features (2048-d for ResNet-50) of the
  labelled train split, queries = the test split, both at native resolution (``eval_transform``),
  model in eval mode under ``no_grad``. Each query takes its ``k`` most cosine-similar memory
  items (``k`` clamped to the memory size), weights them by ``exp(cos / T)`` and predicts the
  class with the largest weight sum (DCL's ``test()``). Returns top-1 and top-5 in percent.
* :func:`linear_probe`: the official ``linear.py`` protocol. The encoder is frozen and a
  ``Linear(feat_dim, classes)`` is trained on its *unnormalised* features with Adam (lr 1e-3,
  wd 1e-6), batch 512 shuffled (no drop_last), for 100 epochs, on the train split with the SSL
  augmentation (one view at ``crop_size``); the test split is evaluated at native resolution after
  every epoch. Officially the encoder's BN layers stay in *train* mode while the probe trains, so
  they normalise with batch statistics and their running statistics drift to the probe's data
  (spec section 13, bug 2); ``fixed_bn=True`` runs the encoder in eval mode instead. The probe
  works on a deep copy of the encoder, so the caller's model is never changed. Reports the final
  and the best test top-1 (the official log has both; the paper does not say which it quotes).
  On one device the train-mode BN normalises over the whole batch of 512 (the official
  DataParallel run normalises 256 per GPU).

  With ``fixed_bn=True`` and ``augment=False`` the encoder is a fixed function of the image, so its
  features are computed once and the probe trains on them (the same result as re-running the
  frozen encoder every epoch, much faster); the quickstart uses this setting.
"""
from __future__ import annotations

import contextlib
import copy
import time
from types import SimpleNamespace
from typing import Callable, Optional

import numpy as np
import torch
import torch.nn.functional as F


def _images(dataset) -> torch.Tensor:
    return torch.as_tensor(dataset.images)


def _labels(dataset) -> torch.Tensor:
    if dataset.labels is None:
        raise ValueError(f"split of {getattr(dataset, 'name', 'the data set')} has no labels")
    return torch.as_tensor(dataset.labels).long()


@torch.no_grad()
def extract_features(encoder: Callable[[torch.Tensor], torch.Tensor], dataset, *,
                     batch_size: int, device: torch.device, transform: Callable,
                     autocast: Callable = contextlib.nullcontext,
                     channels_last: bool = False, normalize: bool = True) -> torch.Tensor:
    """``encoder(transform(images))`` of every image of ``dataset`` in order, float32 (N, D)."""
    images = _images(dataset)
    out = []
    for b0 in range(0, images.shape[0], batch_size):
        x = transform(images[b0:b0 + batch_size].to(device))
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with autocast():
            h = encoder(x)
        h = h.flatten(1).float()
        out.append(F.normalize(h, dim=1) if normalize else h)
    return torch.cat(out)


@torch.no_grad()
def knn_predict(queries: torch.Tensor, memory: torch.Tensor, memory_labels: torch.Tensor,
                num_classes: int, *, k: int, temperature: float,
                chunk: int = 1024) -> torch.Tensor:
    """Class ranking ``(Q, num_classes)`` (best first) of each query by weighted kNN voting.

    ``queries`` and ``memory`` are L2-normalised rows; the weight of a neighbour is
    ``exp(cos / temperature)``.
    """
    k = min(k, memory.shape[0])
    ranks = []
    for q0 in range(0, queries.shape[0], chunk):
        sim = queries[q0:q0 + chunk] @ memory.T                      # (q, M)
        weight, idx = sim.topk(k, dim=1)
        weight = (weight / temperature).exp()
        labels = memory_labels[idx]                                  # (q, k)
        scores = torch.zeros(sim.shape[0], num_classes, device=sim.device, dtype=weight.dtype)
        scores.scatter_add_(1, labels, weight)
        ranks.append(scores.argsort(dim=1, descending=True))
    return torch.cat(ranks)


def topk_accuracy(ranks: torch.Tensor, labels: torch.Tensor) -> tuple[float, float]:
    labels = labels.to(ranks.device)
    top1 = (ranks[:, 0] == labels).float().mean().item() * 100
    kk = min(5, ranks.shape[1])
    top5 = (ranks[:, :kk] == labels[:, None]).any(1).float().mean().item() * 100
    return top1, top5


def knn_evaluate(model: torch.nn.Module, memory_set, test_set, *, k: int, temperature: float,
                 batch_size: int, device: torch.device, transform: Callable,
                 autocast: Callable = contextlib.nullcontext,
                 channels_last: bool = False) -> dict:
    """kNN top-1/top-5 (percent) of ``test_set`` against ``memory_set`` (model in eval mode)."""
    start = time.perf_counter()
    was_training = model.training
    model.eval()
    try:
        feat = lambda x: model(x)[0]                                      # normalize(h)
        kw = dict(batch_size=batch_size, device=device, transform=transform,
                  autocast=autocast, channels_last=channels_last)
        memory = extract_features(feat, memory_set, **kw)
        queries = extract_features(feat, test_set, **kw)
    finally:
        model.train(was_training)
    num_classes = int(memory_set.num_classes)
    ranks = knn_predict(queries, memory, _labels(memory_set).to(device), num_classes, k=k,
                        temperature=temperature)
    top1, top5 = topk_accuracy(ranks, _labels(test_set))
    return {"knn_top1": top1, "knn_top5": top5, "knn_seconds": time.perf_counter() - start}


def _set_bn_train(module: torch.nn.Module, mode: bool) -> None:
    for m in module.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.train(mode)


def _seeded_linear(d_in: int, d_out: int, seed: int) -> torch.nn.Linear:
    """``nn.Linear`` with PyTorch's default init drawn from ``seed`` (global RNG untouched)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
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
    gen = torch.Generator().manual_seed(seed)
    fc = _seeded_linear(train_feats.shape[1], num_classes, seed).to(device)
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


def factor_datasets(dataset) -> dict:
    """``{factor: dataset labelled by it}`` for every discrete factor of a synthetic data set."""
    out = {}
    for name, values in (getattr(dataset, "factors", None) or {}).items():
        values = np.asarray(values)
        if values.dtype.kind in "iu":
            out[name] = SimpleNamespace(images=dataset.images, labels=values.astype(np.int64),
                                        num_classes=int(values.max()) + 1,
                                        name=f"{dataset.name}[{name}]")
    return out


def factor_evaluation(model: torch.nn.Module, memory_set, test_set, *, k: int,
                      temperature: float, batch_size: int, device: torch.device,
                      transform: Callable, linear_epochs: int, linear_batch_size: int,
                      linear_lr: float, linear_weight_decay: float, seed: int = 0,
                      autocast: Callable = contextlib.nullcontext,
                      channels_last: bool = False) -> dict:
    """kNN and linear accuracy for every discrete generative factor (synthetic data).

    One eval-mode, no-grad pass over each split; kNN on the normalised features as
    :func:`knn_evaluate`; the linear probe on the cached *unnormalised* features with frozen,
    eval-mode BN and no augmentation (the fast variant of the protocol). Returns
    ``{factor: {"knn_top1", "linear_top1", "linear_best_top1", "num_classes"}}``.
    """
    mem_f, test_f = factor_datasets(memory_set), factor_datasets(test_set)
    names = [f for f in mem_f if f in test_f]
    if not names:
        return {}
    was_training = model.training
    model.eval()
    try:
        kw = dict(batch_size=batch_size, device=device, transform=transform, autocast=autocast,
                  channels_last=channels_last, normalize=False)
        enc = model.encoder
        mem_h, test_h = extract_features(enc, memory_set, **kw), extract_features(enc, test_set,
                                                                                   **kw)
    finally:
        model.train(was_training)
    mem_n, test_n = F.normalize(mem_h, dim=1), F.normalize(test_h, dim=1)
    out = {}
    for name in names:
        classes = max(mem_f[name].num_classes, test_f[name].num_classes)
        y_mem = torch.as_tensor(mem_f[name].labels).to(device)
        y_test = torch.as_tensor(test_f[name].labels)
        ranks = knn_predict(test_n, mem_n, y_mem, classes, k=k, temperature=temperature)
        lin = linear_on_features(mem_h, y_mem, test_h, y_test, classes, epochs=linear_epochs,
                                 batch_size=linear_batch_size, lr=linear_lr,
                                 weight_decay=linear_weight_decay, seed=seed)
        out[name] = {"num_classes": classes, "knn_top1": topk_accuracy(ranks, y_test)[0],
                     "linear_top1": lin["final_top1"], "linear_best_top1": lin["best_top1"]}
    return out


def linear_probe(encoder: torch.nn.Module, train_set, test_set, *, epochs: int = 100,
                 batch_size: int = 512, lr: float = 1e-3, weight_decay: float = 1e-6,
                 fixed_bn: bool = False, augment: Optional[Callable] = None,
                 test_transform: Callable, device: torch.device, seed: int = 0,
                 eval_batch_size: int = 256, autocast: Callable = contextlib.nullcontext,
                 channels_last: bool = False, progress: bool = False,
                 log: Callable[[str], None] = print) -> dict:
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
    train_images, train_labels = _images(train_set), _labels(train_set)
    test_labels = _labels(test_set).to(device)
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
    gen = torch.Generator().manual_seed(seed)
    aug_gen = torch.Generator(device=device).manual_seed(seed + 1)
    fc = _seeded_linear(feat_dim, num_classes, seed).to(device)
    opt = torch.optim.Adam(fc.parameters(), lr=lr, weight_decay=weight_decay)
    history = []
    n = train_images.shape[0]
    bar = None
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=epochs, desc="linear probe", leave=False, dynamic_ncols=True)
    for epoch in range(1, epochs + 1):
        perm = torch.randperm(n, generator=gen)
        if not cached:
            encoder.eval()
            _set_bn_train(encoder, not fixed_bn)      # official: BN in train mode
        fc.train()
        loss_sum = torch.zeros((), device=device)
        for b0 in range(0, n, batch_size):            # shuffled, no drop_last
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


def linear_eval_checkpoint(checkpoint, *, overrides=None, epochs: Optional[int] = None,
                           fixed_bn: Optional[bool] = None, augment: Optional[bool] = None,
                           device: Optional[str] = None, progress: bool = True,
                           log: Callable[[str], None] = print) -> dict:
    """``fastipirm eval linear``: the linear probe of a trained checkpoint.

    The data set, model and probe settings come from the checkpoint's config (``[eval]``), with
    ``overrides`` (``section.key=value``) and the explicit arguments on top. The result (without
    the per-epoch history, which goes to ``linear_eval.csv``) is written next to the checkpoint
    as ``linear_eval.json``.
    """
    import json
    from pathlib import Path

    from .data import TwoViewAugment, eval_transform
    from .train import (_write_csv, autocast_factory, build_model, config_from_checkpoint,
                        load_checkpoint, load_split, select_device)

    cfg = config_from_checkpoint(checkpoint, overrides)
    ev = cfg.eval
    epochs = ev.linear_epochs if epochs is None else epochs
    fixed_bn = ev.fixed_bn if fixed_bn is None else fixed_bn
    augment = ev.linear_augment if augment is None else augment
    dev = select_device(device or cfg.run.device)
    if cfg.run.threads:
        torch.set_num_threads(cfg.run.threads)
    model = build_model(cfg)
    model.load_state_dict(load_checkpoint(checkpoint)["model"])
    model.to(dev)
    if cfg.model.channels_last:
        model = model.to(memory_format=torch.channels_last)
    train_set = load_split(cfg, cfg.data.memory_split)
    test_set = load_split(cfg, cfg.data.test_split)
    aug = TwoViewAugment(out_size=cfg.data.crop_size, scale=(cfg.data.crop_scale_min, 1.0))
    log(f"linear probe of {checkpoint}: {cfg.data.name} {cfg.data.memory_split} -> "
        f"{cfg.data.test_split}, {epochs} epochs, batch {ev.linear_batch_size}, Adam lr "
        f"{ev.linear_lr:g} wd {ev.linear_weight_decay:g}, encoder BN "
        f"{'eval (fixed)' if fixed_bn else 'train (official)'} mode, "
        f"{'SSL-augmented' if augment else 'un-augmented'} training images")
    res = linear_probe(model.encoder, train_set, test_set, epochs=epochs,
                       batch_size=ev.linear_batch_size, lr=ev.linear_lr,
                       weight_decay=ev.linear_weight_decay, fixed_bn=fixed_bn,
                       augment=aug.view if augment else None, test_transform=eval_transform,
                       device=dev, seed=cfg.run.seed, eval_batch_size=ev.batch_size,
                       autocast=autocast_factory(dev, cfg.train.amp),
                       channels_last=cfg.model.channels_last, progress=progress)
    ckpt = Path(checkpoint)
    folder = ckpt if ckpt.is_dir() else ckpt.parent
    _write_csv(folder / "linear_eval.csv", ["epoch", "train_loss", "top1", "top5"],
               res["history"])
    out = {k: v for k, v in res.items() if k != "history"}
    out["checkpoint"] = str(checkpoint)
    with open(folder / "linear_eval.json", "w") as fh:
        json.dump(out, fh, indent=2)
    log(f"linear top-1: final {res['final_top1']:.2f}%, best {res['best_top1']:.2f}% "
        f"(epoch {res['best_epoch']}); top-5 final {res['final_top5']:.2f}%")
    return res
