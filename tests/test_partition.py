"""The offline maximisation step: improves J, official stopping rule, best epoch kept, retention."""
import math

import pytest
import torch
import torch.nn.functional as F

from fastipirm import partition as part
from fastipirm.losses.ipirm import maximization_objective


pytestmark = pytest.mark.usefixtures("one_thread")


KW = dict(temperature=0.5, irm_temperature=0.5, irm_weight=0.5, constrain=True,
          constrain_relax=True)


def features(n=96, d=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    # two clusters, so that a partition has something to find
    centres = F.normalize(torch.randn(2, d, generator=g), dim=1)
    lab = torch.arange(n) % 2
    z1 = F.normalize(centres[lab] + 0.6 * torch.randn(n, d, generator=g), dim=1)
    z2 = F.normalize(centres[lab] + 0.6 * torch.randn(n, d, generator=g), dim=1)
    return z1, z2


def full_objective(z1, z2, theta, batch_size):
    """Epoch-style mean of J over fixed (unshuffled) batches, without updating Theta."""
    vals = []
    for b0 in range(0, z1.shape[0], batch_size):
        j, _ = maximization_objective(z1[b0:b0 + batch_size], z2[b0:b0 + batch_size],
                                      theta[b0:b0 + batch_size], **KW)
        vals.append(float(j))
    return sum(vals) / len(vals)


def test_maximisation_improves_objective():
    z1, z2 = features()
    init = torch.randn(96, 2, generator=torch.Generator().manual_seed(1))
    res = part.optimize_partition(z1, z2, init, **KW, batch_size=96, min_epochs=8, patience=3,
                                  max_epochs=12, generator=torch.Generator().manual_seed(2))
    before = full_objective(z1, z2, init, 96)
    after = full_objective(z1, z2, res.logits, 96)
    assert after < before - 1e-3, (before, after)
    assert res.best_objective == min(res.history)
    assert res.history[res.best_epoch] == res.best_objective
    assert init.equal(torch.randn(96, 2, generator=torch.Generator().manual_seed(1)))  # untouched


def test_official_stopping_rule_and_batches(monkeypatch):
    """Scripted epoch means: check the stop epoch, the best epoch kept and the batch count."""
    z1, z2 = features(n=10, d=4)
    calls = []
    means = iter([5.0, 4.0, 3.0, 3.5, 3.6, 3.7, 2.0, 2.5, 2.6, 2.7, 2.8, 2.9, 1.0, 0.5])

    def fake_objective(a, b, logits, **kw):
        calls.append(a.shape[0])
        return logits.sum() * 0.0 + fake_objective.value, {}

    fake_objective.value = 0.0
    monkeypatch.setattr(part, "maximization_objective", fake_objective)
    snapshots = {}

    def progress(epoch, mean):
        snapshots[epoch] = mean
        # every batch of the next epoch reports the next scripted mean
        fake_objective.value = next(means, 0.0)

    fake_objective.value = next(means)
    res = part.optimize_partition(z1, z2, torch.zeros(10, 2), **KW, batch_size=4, min_epochs=6,
                                  patience=5, max_epochs=20, progress=progress)
    # 10 samples in batches of 4, shuffled, no drop_last: 3 batches (4, 4, 2) per epoch
    assert calls[:3] == [4, 4, 2] and len(calls) == 3 * res.epochs_run
    # best = 2.0 at epoch 6; cnt reaches 5 at epoch 11 (> min_epochs 6) -> stop after epoch 11
    assert res.best_epoch == 6 and res.best_objective == 2.0
    assert res.epochs_run == 12 and res.history == [snapshots[e] for e in range(12)]


def test_max_epochs_rule():
    z1, z2 = features(n=16, d=4)
    res = part.optimize_partition(z1, z2, torch.randn(16, 2), **KW, batch_size=16,
                                  min_epochs=50, patience=5, max_epochs=3)
    assert res.epochs_run == 4                     # epochs 0..3: stop at epoch == max_epochs


def test_best_theta_is_kept_not_the_last(monkeypatch):
    """J is lowest after the first epoch, so Theta after epoch 0 is returned, not the final one."""
    z1, z2 = features(n=8, d=4)
    values = iter([1.0, 2.0, 3.0, 4.0])

    def fake_objective(a, b, logits, **kw):
        return logits.sum() + fake_objective.offset, {}

    fake_objective.offset = next(values)

    def progress(epoch, mean):
        fake_objective.offset = next(values, 5.0) + 100

    monkeypatch.setattr(part, "maximization_objective", fake_objective)
    init = torch.zeros(8, 2)
    res = part.optimize_partition(z1, z2, init, **KW, batch_size=8, min_epochs=0, patience=2,
                                  max_epochs=10, lr=0.5, milestones=[100], progress=progress)
    assert res.best_epoch == 0 and res.epochs_run == 3
    # one Adam step of lr 0.5 on d(sum)/dtheta = 1: every entry moved by -0.5 exactly once
    assert torch.allclose(res.logits, torch.full((8, 2), -0.5))


def test_lr_schedule_is_multistep_per_epoch(monkeypatch):
    z1, z2 = features(n=8, d=4)
    lrs = []
    real_step = torch.optim.Adam.step

    def step(self, *a, **k):
        lrs.append(self.param_groups[0]["lr"])
        return real_step(self, *a, **k)

    monkeypatch.setattr(torch.optim.Adam, "step", step)
    part.optimize_partition(z1, z2, torch.randn(8, 2), **KW, batch_size=4, lr=0.5,
                            milestones=[1, 3], gamma=0.2, min_epochs=100, max_epochs=4)
    expect = [0.5] * 2 + [0.1] * 4 + [0.02] * 4
    assert all(math.isclose(a, b) for a, b in zip(lrs, expect)) and len(lrs) == 10


def test_initial_logits_and_warm_start_is_a_copy():
    prev = torch.randn(6, 2)
    g = torch.Generator().manual_seed(0)
    fresh = part.initial_logits(6, 2, random_init=True, previous=prev, generator=g,
                                device=torch.device("cpu"))
    assert not fresh.equal(prev)
    warm = part.initial_logits(6, 2, random_init=False, previous=prev, generator=g,
                               device=torch.device("cpu"))
    assert warm.equal(prev) and warm.data_ptr() != prev.data_ptr()
    first = part.initial_logits(6, 2, random_init=False, previous=None, generator=g,
                                device=torch.device("cpu"))
    assert first.shape == (6, 2)


def test_retain_group():
    a, b, c = torch.randn(5, 2), torch.randn(5, 2), torch.randn(5, 2)
    r = part.retain(None, a, retain_group=True)
    assert r.shape == (1, 5, 2) and r[0].equal(a)
    r = part.retain(r, b, retain_group=True)
    r = part.retain(r, c, retain_group=True)
    assert r.shape == (3, 5, 2) and r[2].equal(c) and r[0].equal(a)
    only = part.retain(r, a, retain_group=False)
    assert only.shape == (1, 5, 2) and only[0].equal(a)
    capped = part.retain(r, a, retain_group=True, retain_group_set=2)
    assert capped.shape == (2, 5, 2) and capped[0].equal(c) and capped[1].equal(a)
    b.add_(1.0)                                    # retained copies do not alias their inputs
    assert not r[1].equal(b)


class _Probe(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.bn = torch.nn.BatchNorm2d(3)
        self.modes = []

    def forward(self, x):
        self.modes.append(self.training)
        h = self.bn(x).mean((2, 3))
        return F.normalize(h, dim=1), F.normalize(h + 1.0, dim=1)


class _Loader:
    def __init__(self, images, bs):
        self.images, self.bs = images, bs

    def __iter__(self):
        n = self.images.shape[0]
        for b0 in range(0, n, self.bs):
            idx = torch.arange(b0, min(n, b0 + self.bs)).flip(0)   # any order
            yield idx, self.images[idx]


def test_extract_views_eval_mode_no_grad_and_order():
    images = torch.randint(0, 255, (10, 4, 4, 3), dtype=torch.uint8)
    model = _Probe().train()

    def augment(x, generator):
        y = x.permute(0, 3, 1, 2).float() / 255
        return y, 1 - y

    z1, z2 = part.extract_views(model, _Loader(images, 4), augment, num_samples=10,
                                device=torch.device("cpu"))
    assert model.modes and not any(model.modes) and model.training   # eval inside, restored
    assert not z1.requires_grad and z1.shape == (10, 3)
    with torch.no_grad():
        h = model.bn.eval()(images.permute(0, 3, 1, 2).float() / 255).mean((2, 3))
    assert torch.allclose(z1, F.normalize(h + 1.0, dim=1), atol=1e-6)  # row i = image i
    with pytest.raises(RuntimeError, match="covered"):
        part.extract_views(model, _Loader(images[:6], 4), augment, num_samples=10,
                           device=torch.device("cpu"))
