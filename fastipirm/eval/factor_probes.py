"""DCoDR's evaluation by probes: one MLP per factor on the frozen, L2-normalised codes.

What the official ``evaluation.py`` (``--eval-type prediction``, ``predict_contents_nn``) does, and
what :func:`probe_factors` does the same way (``docs/dcodr-eval.md``):

* The codes of the train and test splits are L2-normalised (``F.normalize`` of the encoder's
  ``code``). The train codes are split once, not stratified, into a probe-train part and a
  validation part of ``ceil(0.1 N)`` rows (``train_test_split(test_size=0.1)``); the test split is
  only scored.
* Every factor, the domain included, gets its own probe: :class:`ProbeMLP`, 5 blocks of
  ``Linear(no bias) -> BatchNorm1d -> LeakyReLU(0.01)`` of width 128 and a final ``Linear`` with a
  bias (6 linear layers; the official ``Shallow_Classifier(hidden_size=128, num_layers=6)``).
  Class labels are renumbered 0..K-1 over the union of the train and test values, K outputs.
* Adam (lr 1e-3, betas 0.9/0.999, no weight decay), shuffled batches of 128 without drop_last,
  at most 100 epochs, the loss on the float64 outputs: cross-entropy, or for a continuous target
  (CelebA's landmarks) the mean L1 error. The official ``MultiStepLR`` (x0.3 at 25, 40, 50, ...,
  90) is stepped with the epoch's mean training loss *as its epoch number*, so the next epoch's lr
  is ``1e-3 * 0.3 ** #{milestones <= training loss}``: inert for cross-entropy (below 25), but it
  lowers the lr of a regression whose L1 loss in pixels is above 25. This is reproduced.
* After every epoch the probe (eval-mode BN) is scored on the validation part: accuracy, or the
  L1 loss for a regression. Training stops after the first epoch ``e`` (0-based) with
  ``e - best > patience`` (``best`` the first epoch of the best score), i.e. after ``patience + 1``
  epochs without a strict improvement; the best epoch's weights are then scored on the test split.
* Reported: test accuracy per factor (a fraction in [0, 1]) or the test L1 error. The domain's
  accuracy is the *invariance* (lower is better), the others the *informativeness*. For reference
  the official prints the cumulative frequencies of the six most frequent values of every factor
  over train + test; the first of them, the majority-class rate, is ``chance`` here.

Deviations (all in ``docs/dcodr-eval.md``): the split, the initialisation and the batch order are
drawn from ``seed`` (officially sklearn's ``random_state=0`` on an order the unseeded data loader
shuffled, and the global torch generator); a training batch of one sample (which BatchNorm cannot
normalise; the official run would crash) is skipped; losses are means over all samples, not means
of batch means; the best weights are kept in memory instead of one file per epoch.
"""
from __future__ import annotations

import bisect
import math
import time
import zlib
from typing import Callable, Mapping, Optional, Union

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from ..seeding import Stream, derive_seed, derived_generator

__all__ = ["ProbeMLP", "probe_factors", "majority_rates", "LR_MILESTONES", "LR_GAMMA"]

LR_MILESTONES = (25, 40, 50, 60, 70, 80, 90)
"""The official ``MultiStepLR`` milestones, compared with the epoch's mean training loss."""
LR_GAMMA = 0.3
VAL_FRACTION = 0.1
HIDDEN = 128
LAYERS = 6
NEGATIVE_SLOPE = 0.01          # nn.LeakyReLU() default, as the official builds it
_EVAL_CHUNK = 65536


class ProbeMLP(nn.Module):
    """DCoDR's probe: ``layers - 1`` blocks ``Linear(bias=False), BatchNorm1d, LeakyReLU`` of width
    ``hidden``, then ``Linear(hidden, out_features)`` with a bias. The defaults are the official
    evaluation's (``hidden=128``, ``layers=6``); the module is named ``predictor`` as officially, so
    the state-dict keys match."""

    def __init__(self, in_features: int, out_features: int, hidden: int = HIDDEN,
                 layers: int = LAYERS, negative_slope: float = NEGATIVE_SLOPE):
        super().__init__()
        if layers < 2:
            raise ValueError(f"ProbeMLP needs layers >= 2 (hidden blocks + output), got {layers}")
        for name, value in (("in_features", in_features), ("out_features", out_features),
                            ("hidden", hidden)):
            if value < 1:
                raise ValueError(f"ProbeMLP: {name} must be >= 1, got {value}")
        blocks: list[nn.Module] = []
        width = in_features
        for _ in range(layers - 1):
            blocks += [nn.Linear(width, hidden, bias=False), nn.BatchNorm1d(hidden),
                       nn.LeakyReLU(negative_slope)]
            width = hidden
        blocks.append(nn.Linear(width, out_features, bias=True))
        self.predictor = nn.Sequential(*blocks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.predictor(x)


def majority_rates(values: torch.Tensor, top: int = 6) -> list[float]:
    """Cumulative frequencies of the ``top`` most frequent values (what the official prints as
    "Majority"); the first is the majority-class rate."""
    _, counts = torch.unique(values, return_counts=True)
    counts = counts.sort(descending=True).values[:top].double()
    return (counts.cumsum(0) / values.numel()).tolist()


# ----------------------------------------------------------------------------- input checks

def _as_tensor(x, what: str) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        return x.detach()
    try:
        return torch.as_tensor(np.asarray(x))
    except (TypeError, ValueError, RuntimeError) as exc:
        raise ValueError(f"{what} must be a tensor or array, got {type(x).__name__}") from exc


def _check_codes(codes, split: str) -> torch.Tensor:
    codes = _as_tensor(codes, f"{split} codes")
    if codes.dim() != 2:
        raise ValueError(f"{split} codes must be a 2-D (N, d) tensor, got shape "
                         f"{tuple(codes.shape)}")
    if codes.shape[0] == 0:
        raise ValueError(f"the {split} split is empty (0 codes)")
    if codes.shape[1] == 0:
        raise ValueError(f"{split} codes have no dimensions (shape {tuple(codes.shape)})")
    if not (codes.is_floating_point()):
        raise ValueError(f"{split} codes must be floating point, got {codes.dtype}")
    if not bool(torch.isfinite(codes).all()):
        raise ValueError(f"{split} codes contain NaN or inf")
    return codes


def _check_factors(train: Mapping, test: Mapping, n_train: int,
                   n_test: int) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    if not isinstance(train, Mapping) or not isinstance(test, Mapping):
        raise ValueError("train_factors and test_factors must be dicts {factor: (N,) labels}")
    if set(train) != set(test):
        raise ValueError(f"train and test factors differ: only in train "
                         f"{sorted(set(train) - set(test))}, only in test "
                         f"{sorted(set(test) - set(train))}")
    out = {}
    for name in train:
        pair = []
        for split, table, n in (("train", train, n_train), ("test", test, n_test)):
            y = _as_tensor(table[name], f"{split} factor {name!r}")
            if y.dim() != 1 or y.shape[0] != n:
                raise ValueError(f"{split} factor {name!r} must have shape ({n},) like the {split} "
                                 f"codes, got {tuple(y.shape)}")
            if y.is_floating_point() or y.is_complex() or y.dtype == torch.bool:
                raise ValueError(f"{split} factor {name!r} must hold integer class labels, got "
                                 f"{y.dtype} (continuous factors go in targets=)")
            pair.append(y.long())
        out[name] = (pair[0], pair[1])
    return out


def _check_targets(targets, n_train: int, n_test: int) -> dict[str, tuple[torch.Tensor,
                                                                          torch.Tensor]]:
    """``targets``: ``(train_dict, test_dict)`` or ``{name: (train, test)}``."""
    if targets is None:
        return {}
    if isinstance(targets, (tuple, list)) and len(targets) == 2 and all(
            isinstance(t, Mapping) for t in targets):
        train, test = targets
        if set(train) != set(test):
            raise ValueError(f"train and test targets differ: {sorted(train)} vs {sorted(test)}")
        pairs = {k: (train[k], test[k]) for k in train}
    elif isinstance(targets, Mapping):
        pairs = {}
        for k, v in targets.items():
            if not (isinstance(v, (tuple, list)) and len(v) == 2):
                raise ValueError(f"target {k!r} must be a (train, test) pair of (N, k) arrays")
            pairs[k] = (v[0], v[1])
    else:
        raise ValueError("targets must be (train_dict, test_dict) or {name: (train, test)}")
    out = {}
    for name, (tr, te) in pairs.items():
        pair = []
        for split, y, n in (("train", tr, n_train), ("test", te, n_test)):
            y = _as_tensor(y, f"{split} target {name!r}")
            if y.dim() == 1:
                y = y[:, None]
            if y.dim() != 2 or y.shape[0] != n or y.shape[1] == 0:
                raise ValueError(f"{split} target {name!r} must have shape ({n}, k) like the "
                                 f"{split} codes, got {tuple(y.shape)}")
            if y.is_complex() or y.dtype == torch.bool:
                raise ValueError(f"{split} target {name!r} must be real-valued, got {y.dtype}")
            y = y.double()
            if not bool(torch.isfinite(y).all()):
                raise ValueError(f"{split} target {name!r} contains NaN or inf")
            pair.append(y)
        if pair[0].shape[1] != pair[1].shape[1]:
            raise ValueError(f"target {name!r} has {pair[0].shape[1]} columns in train and "
                             f"{pair[1].shape[1]} in test")
        out[name] = (pair[0], pair[1])
    return out


def _seed_of(seed: Union[int, torch.Generator]) -> int:
    if isinstance(seed, torch.Generator):
        return int(torch.randint(0, 2**62, (1,), generator=seed, device=seed.device).item())
    return int(seed)


def _factor_tag(name: str) -> int:
    return zlib.crc32(name.encode("utf-8"))


# ----------------------------------------------------------------------------- training

@torch.no_grad()
def _predict(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    model.eval()
    return torch.cat([model(x[i:i + _EVAL_CHUNK]) for i in range(0, x.shape[0], _EVAL_CHUNK)]
                     ).double()


def _score(out: torch.Tensor, y: torch.Tensor, classify: bool) -> tuple[float, float]:
    """(loss, accuracy) of float64 outputs; accuracy is NaN for a regression."""
    if classify:
        loss = F.cross_entropy(out, y).item()
        return loss, (out.argmax(1) == y).double().mean().item()
    return F.l1_loss(out, y).item(), math.nan


def _train_probe(x_tr, y_tr, x_val, y_val, out_dim: int, classify: bool, *, init_seed: int,
                 order: torch.Generator, max_epochs: int, patience: int, batch_size: int,
                 lr: float) -> tuple[ProbeMLP, dict]:
    device = x_tr.device
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(init_seed)
        model = ProbeMLP(x_tr.shape[1], out_dim)
    model = model.to(device)
    opt = torch.optim.Adam(model.parameters(), lr=lr, betas=(0.9, 0.999),
                           fused=device.type in ("cpu", "cuda"))
    crit = F.cross_entropy if classify else F.l1_loss
    n = x_tr.shape[0]
    best_epoch, best_score, best_state = -1, math.nan, None
    history = []
    epoch = -1
    for epoch in range(max_epochs):
        model.train()
        perm = torch.randperm(n, generator=order).to(device)
        loss_sum = torch.zeros((), dtype=torch.float64, device=device)
        batches = 0
        for b0 in range(0, n, batch_size):
            idx = perm[b0:b0 + batch_size]
            if idx.numel() < 2:            # BatchNorm cannot train on one sample
                continue
            loss = crit(model(x_tr[idx]).double(), y_tr[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            loss_sum += loss.detach()
            batches += 1
        train_loss = (loss_sum / batches).item()
        epoch_lr = opt.param_groups[0]["lr"]
        # the official MultiStepLR.step(train_loss): the loss is taken as the epoch number
        for group in opt.param_groups:
            group["lr"] = lr * LR_GAMMA ** bisect.bisect_right(LR_MILESTONES, train_loss)
        val_loss, val_acc = _score(_predict(model, x_val), y_val, classify)
        score = val_acc if classify else val_loss
        history.append({"epoch": epoch + 1, "lr": epoch_lr, "train_loss": train_loss,
                        "val_loss": val_loss, "val_accuracy": val_acc})
        improved = best_state is None or (score > best_score if classify else score < best_score)
        if improved:
            best_epoch, best_score = epoch, score
            best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        if epoch - best_epoch > patience:
            break
    model.load_state_dict(best_state)
    info = {"epochs": epoch + 1, "best_epoch": best_epoch + 1,
            "stopped_early": epoch + 1 < max_epochs, "history": history}
    if classify:
        info["val_accuracy"] = best_score
    else:
        info["val_l1"] = best_score
    return model, info


def probe_factors(train_codes, train_factors: Mapping, test_codes, test_factors: Mapping, *,
                  domain_factor: str, targets=None, seed: Union[int, torch.Generator] = 0,
                  device: Union[str, torch.device, None] = None, max_epochs: int = 100,
                  patience: int = 7, batch_size: int = 128, lr: float = 1e-3,
                  normalize: bool = True, history: bool = False,
                  log: Optional[Callable[[str], None]] = print) -> dict:
    """DCoDR's probe evaluation of frozen codes (module docstring; ``docs/dcodr-eval.md``).

    ``train_codes`` (N, d), ``test_codes`` (M, d): the codes (L2-normalised here when
    ``normalize``, as the official does). ``train_factors``/``test_factors``: ``{factor: int (N,)
    labels}`` with the same keys, ``domain_factor`` among them. ``targets``: continuous factors,
    ``(train_dict, test_dict)`` or ``{name: (train, test)}`` of float (N, k) arrays, scored by L1.
    ``seed`` (an int or a torch generator) fixes the validation split, every probe's
    initialisation and batch order; ``device`` defaults to the codes' device.

    Returns ``{"domain_factor", "invariance" (the domain's test accuracy), "informativeness"
    ({factor: test accuracy}), "l1_errors" ({target: test L1}), "probes": {name: ...},
    "num_train", "num_val", "num_test", "seconds"}``. A classification probe reports ``accuracy``,
    ``chance`` (the majority-class rate over train + test, the official reference),
    ``chance_uniform`` (1 / classes), ``majority_rates`` (the six cumulative rates the official
    prints), ``num_classes``, ``test_loss``, ``val_accuracy``, ``epochs``, ``best_epoch`` (1-based)
    and ``stopped_early``; a regression ``l1``, ``baseline_l1`` (predicting the train mean),
    ``baseline_median_l1`` (the train median), ``dims``, ``val_l1`` and the same epoch counts.
    ``history=True`` adds every probe's per-epoch ``history`` (``epoch``, the ``lr`` it trained
    with, ``train_loss``, ``val_loss``, ``val_accuracy``).
    """
    start = time.perf_counter()
    x_train = _check_codes(train_codes, "train")
    x_test = _check_codes(test_codes, "test")
    if x_train.shape[1] != x_test.shape[1]:
        raise ValueError(f"train codes have {x_train.shape[1]} dimensions and test codes "
                         f"{x_test.shape[1]}")
    n_train, n_test = x_train.shape[0], x_test.shape[0]
    factors = _check_factors(train_factors, test_factors, n_train, n_test)
    conts = _check_targets(targets, n_train, n_test)
    if domain_factor not in factors:
        raise ValueError(f"unknown domain factor {domain_factor!r}: the factors are "
                         f"{sorted(factors) or 'none'}")
    clash = sorted(set(factors) & set(conts))
    if clash:
        raise ValueError(f"{clash} named both as factors and as continuous targets")
    for name, (y_tr, y_te) in factors.items():
        if torch.unique(torch.cat([y_tr, y_te])).numel() < 2:
            raise ValueError(f"factor {name!r} takes one value only: nothing to probe")
    n_val = math.ceil(VAL_FRACTION * n_train)
    if n_train - n_val < 2:
        raise ValueError(f"the train split has {n_train} codes; the probes need at least 3 (a "
                         f"10% validation part and two samples to train BatchNorm)")
    for name, value, least in (("max_epochs", max_epochs, 1), ("patience", patience, 0),
                               ("batch_size", batch_size, 2)):
        if int(value) != value or value < least:
            raise ValueError(f"{name} must be an integer >= {least}, got {value!r}")
    if not lr > 0:
        raise ValueError(f"lr must be positive, got {lr!r}")

    device = torch.device(device) if device is not None else x_train.device
    x_train = x_train.to(device=device, dtype=torch.float32)
    x_test = x_test.to(device=device, dtype=torch.float32)
    if normalize:
        x_train, x_test = F.normalize(x_train, dim=1), F.normalize(x_test, dim=1)
    base = _seed_of(seed)
    split = torch.randperm(n_train, generator=derived_generator(base, Stream.FACTOR_PROBES, 0))
    val_idx, tr_idx = split[:n_val].to(device), split[n_val:].to(device)
    x_tr, x_val = x_train[tr_idx], x_train[val_idx]

    probes: dict[str, dict] = {}
    for name in [*factors, *conts]:
        classify = name in factors
        tag = _factor_tag(name)
        init_seed = derive_seed(base, Stream.FACTOR_PROBES, 1, tag, 0)
        order = derived_generator(base, Stream.FACTOR_PROBES, 1, tag, 1)
        if classify:
            y_tr_raw, y_te_raw = factors[name]
            both = torch.cat([y_tr_raw, y_te_raw])
            values, codes = torch.unique(both, sorted=True, return_inverse=True)
            y_all = codes.to(device)
            y_train, y_test = y_all[:n_train], y_all[n_train:]
            out_dim = values.numel()
        else:
            y_train, y_test = (t.to(device) for t in conts[name])
            out_dim = y_train.shape[1]
        model, info = _train_probe(x_tr, y_train[tr_idx], x_val, y_train[val_idx], out_dim,
                                   classify, init_seed=init_seed, order=order,
                                   max_epochs=int(max_epochs), patience=int(patience),
                                   batch_size=int(batch_size), lr=float(lr))
        test_loss, test_acc = _score(_predict(model, x_test), y_test, classify)
        if not history:
            info.pop("history")
        if classify:
            rates = majority_rates(both)
            res = {"kind": "classification", "accuracy": test_acc, "chance": rates[0],
                   "chance_uniform": 1.0 / out_dim, "majority_rates": rates,
                   "num_classes": out_dim, "test_loss": test_loss, **info}
            if log:
                log(f"probe {name}{' (domain)' if name == domain_factor else ''}: accuracy "
                    f"{test_acc:.4f} (chance {rates[0]:.4f}, 1/{out_dim} = "
                    f"{1.0 / out_dim:.4f}), {info['epochs']} epochs, best "
                    f"{info['best_epoch']}")
        else:
            mean = y_train.mean(0, keepdim=True)
            median = y_train.median(0, keepdim=True).values
            res = {"kind": "regression", "l1": test_loss,
                   "baseline_l1": F.l1_loss(mean.expand_as(y_test), y_test).item(),
                   "baseline_median_l1": F.l1_loss(median.expand_as(y_test), y_test).item(),
                   "dims": out_dim, **info}
            if log:
                log(f"probe {name}: L1 {test_loss:.4f} (train-mean baseline "
                    f"{res['baseline_l1']:.4f}), {info['epochs']} epochs, best "
                    f"{info['best_epoch']}")
        probes[name] = res
    return {"domain_factor": domain_factor,
            "invariance": probes[domain_factor]["accuracy"],
            "informativeness": {k: v["accuracy"] for k, v in probes.items()
                                if v["kind"] == "classification" and k != domain_factor},
            "l1_errors": {k: v["l1"] for k, v in probes.items() if v["kind"] == "regression"},
            "probes": probes, "num_train": n_train - n_val, "num_val": n_val,
            "num_test": n_test, "seconds": time.perf_counter() - start}
