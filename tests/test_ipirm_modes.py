"""Three official IP-IRM modes against literal references of the official code (Wangt-CN/IP-IRM):

* the DCL debiased loss (``main.py --debiased --tau_plus``): :func:`debiased_nt_xent`, the SimCLR
  method with ``ipirm.debiased``, and ``minimization_loss(debiased=True)`` (its global term);
* ``--irm_mode v2`` (the variance of the environment losses) in the maximisation objective;
* the online search (``auto_split``): with a fixed feature extraction, one online epoch equals the
  offline search on the same features; eval mode and no gradients in the extraction.

References are float64, written step by step as the official code computes (masks, gathers,
``torch.var``, ``autograd.grad(create_graph=True)``); inputs are fresh each run (``seed``).
"""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fastipirm import partition as part
from fastipirm import train as trainmod
from fastipirm.config import Config, load_config
from fastipirm.data import IndexedLoader
from fastipirm.data.datasets import ArrayDataset
from fastipirm.losses.ipirm import (maximization_objective, memberships_from_logits,
                                    minimization_loss)
from fastipirm.losses.simclr import debiased_nt_xent, nt_xent
from fastipirm.methods import MethodContext, build_method
from fastipirm.models import SimCLRModel
from fastipirm.seeding import derived_generator
from test_train import tiny_config

pytestmark = pytest.mark.usefixtures("one_thread")


def unit(b, d, dtype=torch.float64):
    return F.normalize(torch.randn(b, d, dtype=dtype), dim=1)


# -- literal references ------------------------------------------------------------------------

def ref_dcl(out_1, out_2, temperature, debiased, tau_plus):
    """main.py ``train``: the boolean negative mask, pos repeated, estimator g, clamp, mean."""
    b = out_1.shape[0]
    out = torch.cat([out_1, out_2], dim=0)
    neg = torch.exp(torch.mm(out, out.t().contiguous()) / temperature)
    keep = torch.ones((b, 2 * b), dtype=torch.bool)
    for i in range(b):
        keep[i, i] = False
        keep[i, i + b] = False
    keep = torch.cat((keep, keep), 0)
    neg = neg.masked_select(keep).view(2 * b, -1)
    pos = torch.exp(torch.sum(out_1 * out_2, dim=-1) / temperature)
    pos = torch.cat([pos, pos], dim=0)
    if debiased:
        n = 2 * b - 2
        ng = (-tau_plus * n * pos + neg.sum(dim=-1)) / (1 - tau_plus)
        ng = torch.clamp(ng, min=n * np.e ** (-1 / temperature))
    else:
        ng = neg.sum(dim=-1)
    return (-torch.log(pos / (pos + ng))).mean()


def ref_info_nce(features, b):
    """utils.info_nce_loss at T = 1: (2b, 2b-1) logits, positive first, targets 0."""
    ids = torch.cat([torch.arange(b), torch.arange(b)])
    same = (ids[None, :] == ids[:, None]).float()
    off = ~torch.eye(2 * b, dtype=torch.bool)
    same = same[off].view(2 * b, -1)
    sim = (features @ features.T)[off].view(2 * b, -1)
    logits = torch.cat([sim[same.bool()].view(2 * b, -1), sim[~same.bool()].view(2 * b, -1)], 1)
    return logits, torch.zeros(2 * b, dtype=torch.long)


def ref_info_nce_update(features, b):
    """utils.info_nce_loss_update at T = 1: the logits above and the slot -> sample map."""
    logits, labels = ref_info_nce(features, b)
    ids = torch.cat([torch.arange(b), torch.arange(b)])
    same = ids[None, :] == ids[:, None]
    off = ~torch.eye(2 * b, dtype=torch.bool)
    seq = ids[None, :].expand(2 * b, 2 * b)[off].view(2 * b, -1)
    same = same[off].view(2 * b, -1)
    index = torch.cat([seq[same].view(2 * b, -1), seq[~same].view(2 * b, -1)], 1)
    return logits, labels, index


def ref_penalty(logits, labels):
    """utils.penalty mode 'w': squared norm of d CE(logits * s) / d s at s = ones(1, slots)."""
    scale = torch.ones((1, logits.size(-1)), dtype=logits.dtype).requires_grad_()
    loss = F.cross_entropy(logits * scale, labels)
    grad = torch.autograd.grad(loss, [scale], create_graph=True)[0]
    return torch.sum(grad ** 2)


def ref_soft_loss(logits, labels, weights, nonorm):
    """utils.soft_contrastive_loss mode 'v2'."""
    slots = logits.size(1)
    ex = logits.exp()
    w_pos, w_neg = torch.split(weights, [1, slots - 1], dim=1)
    w_neg = w_neg / w_neg.sum(1).unsqueeze(1) * (slots - 1)
    w_all = torch.cat([torch.ones_like(w_pos), w_neg], dim=1)
    soft = (w_all * ex) / (w_all * ex).sum(1).unsqueeze(1)
    per = F.nll_loss(torch.log(soft), labels, reduction="none")
    norm = logits.size(0) if nonorm else w_pos.sum()
    return (per * w_pos.squeeze()).sum() / norm


def ref_entropy(prob, dim):
    return -(prob * prob.log()).sum(dim=dim)


def ref_search_objective_v2(f1, f2, theta, temperature, irm_weight, constrain, relax, nonorm):
    """utils.auto_split_offline / auto_split, irm_mode 'v2', one batch: the minimised risk."""
    q = F.softmax(theta, dim=-1)
    conts = []
    for e in range(theta.shape[1]):
        logits, labels, index = ref_info_nce_update(torch.cat([f1, f2], 0), f1.size(0))
        w = q[:, e][index]
        conts.append(ref_soft_loss(logits / temperature, labels, w, nonorm))
    inv = torch.var(torch.stack(conts))
    cont = torch.stack(conts).mean()
    risk = -(cont + irm_weight * inv)
    if constrain:
        if nonorm:
            risk = risk + 0.2 * (-ref_entropy(q.mean(0), 0) + ref_entropy(q, 1).mean())
        elif relax:
            risk = risk + torch.relu(0.6365 - ref_entropy(q.mean(0), 0))
        else:
            risk = risk - ref_entropy(q.mean(0), 0)
    return risk, cont, inv


def close(got, want, tol=1e-9):
    torch.testing.assert_close(got.double(), want.double(), rtol=tol, atol=tol)


# -- 1. DCL debiased loss ---------------------------------------------------------------------

@pytest.mark.parametrize("tau_plus", [0.0, 0.1, 0.3, 0.9])
def test_debiased_nt_xent_matches_official_dcl(seed, tau_plus):
    b, d = int(torch.randint(2, 9, ())), int(torch.randint(2, 7, ()))
    t = float(torch.empty(()).uniform_(0.2, 1.0))
    z1 = unit(b, d).requires_grad_()
    z2 = unit(b, d).requires_grad_()
    got = debiased_nt_xent(z1, z2, temperature=t, tau_plus=tau_plus)
    want = ref_dcl(z1, z2, t, True, tau_plus)
    assert got.dtype == torch.float64
    close(got, want)
    up = torch.randn((), dtype=torch.float64)
    g_got = torch.autograd.grad(got * up, (z1, z2))
    g_want = torch.autograd.grad(want * up, (z1, z2))
    for a, w in zip(g_got, g_want):
        close(a, w)


def test_debiased_clamp_binds_and_tau_zero_is_nt_xent(seed):
    b, t = 6, 0.5
    # every negative is the anchor's antipode direction: exp(-1/t) each, so the clamp binds
    base = unit(1, 4)
    z1, z2 = base.repeat(b, 1), base.repeat(b, 1)
    z1 = torch.cat([z1[:3], -z1[3:]]).requires_grad_()
    z2 = torch.cat([z2[:3], -z2[3:]]).requires_grad_()
    got = debiased_nt_xent(z1, z2, temperature=t, tau_plus=0.5)
    want = ref_dcl(z1, z2, t, True, 0.5)
    close(got, want)
    for a, w in zip(torch.autograd.grad(got, (z1, z2)), torch.autograd.grad(want, (z1, z2))):
        close(a, w)
    # tau_plus = 0: the estimator is the plain negative sum (never below the clamp)
    y1, y2 = unit(7, 5), unit(7, 5)
    close(debiased_nt_xent(y1, y2, temperature=0.3, tau_plus=0.0),
          ref_dcl(y1, y2, 0.3, False, 0.0))
    close(debiased_nt_xent(y1, y2, temperature=0.3, tau_plus=0.0),
          nt_xent(y1, y2, temperature=0.3), tol=1e-10)
    with pytest.raises(ValueError, match="tau_plus"):
        debiased_nt_xent(y1, y2, temperature=0.3, tau_plus=1.0)


def test_simclr_method_uses_the_debiased_loss(seed):
    torch.manual_seed(seed)
    model = SimCLRModel("resnet18", feature_dim=8, width=2, hidden_dim=8)
    v1, v2 = torch.randn(2, 6, 3, 8, 8)
    cfg = Config()
    cfg.model.channels_last = False
    cfg.ipirm.debiased, cfg.ipirm.tau_plus = True, 0.2
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    method = build_method("simclr", MethodContext(cfg, model, opt, torch.device("cpu")))
    with torch.no_grad():
        want = ref_dcl(model(v1)[1].double(), model(v2)[1].double(), 0.5, True, 0.2)
    loss, _ = method.objective(v1, v2)
    close(loss.detach(), want, tol=1e-5)


def ref_min_loss_debiased(z1, z2, partitions, idx, tau, irm_tau, lam, tau_plus):
    """train_env's environment terms (hard subsets, CE and penalty) + the DCL global term."""
    losses, pens = [], []
    for theta in partitions:
        assign = theta[idx].argmax(dim=1)
        for k in range(theta.shape[1]):
            sel = torch.where(assign == k)[0]
            logits, labels = ref_info_nce(torch.cat([z1[sel], z2[sel]], 0), len(sel))
            losses.append(F.cross_entropy(logits / tau, labels))
            pens.append(ref_penalty(logits / irm_tau, labels))
    total = torch.stack(losses).mean() + ref_dcl(z1, z2, tau, True, tau_plus)
    total = total + lam * torch.stack(pens).mean()
    return total / lam if lam > 1 else total


@pytest.mark.parametrize("n_parts,k,lam", [(1, 2, 0.2), (2, 2, 2.0), (2, 3, 0.5)])
def test_minimization_loss_debiased_global_term(seed, n_parts, k, lam):
    batch, n_data, tau_plus = 18, 40, 0.1
    while True:   # every environment non-empty (the official code crashes on an empty one)
        parts = torch.randn(n_parts, n_data, k, dtype=torch.float64)
        idx = torch.randperm(n_data)[:batch]
        mem = memberships_from_logits(parts, idx)
        if bool((mem.sum(0) >= 2).all()):
            break
    z1, z2 = unit(batch, 6).requires_grad_(), unit(batch, 6).requires_grad_()
    got, parts_out = minimization_loss(z1, z2, mem.double(), temperature=0.4,
                                       irm_temperature=0.6, penalty_weight=lam, keep_cont=True,
                                       backend="torch", debiased=True, tau_plus=tau_plus)
    want = ref_min_loss_debiased(z1, z2, parts, idx, 0.4, 0.6, lam, tau_plus)
    close(got, want)
    up = torch.randn((), dtype=torch.float64)
    for a, w in zip(torch.autograd.grad(got * up, (z1, z2)),
                    torch.autograd.grad(want * up, (z1, z2))):
        close(a, w)
    close(parts_out["loss_global"], ref_dcl(z1, z2, 0.4, True, tau_plus).detach())
    assert parts_out["env_losses"].shape == (n_parts * k,)
    # global term only (the SimCLR step), default off = bit-identical to before
    only, _ = minimization_loss(z1, z2, None, temperature=0.4, irm_temperature=0.6,
                                penalty_weight=lam, keep_cont=True, debiased=True,
                                tau_plus=tau_plus)
    close(only, ref_dcl(z1, z2, 0.4, True, tau_plus) / (lam if lam > 1 else 1.0))
    off_a, _ = minimization_loss(z1, z2, mem.double(), temperature=0.4, irm_temperature=0.6,
                                 penalty_weight=lam, keep_cont=True, backend="torch")
    off_b, _ = minimization_loss(z1, z2, mem.double(), temperature=0.4, irm_temperature=0.6,
                                 penalty_weight=lam, keep_cont=True, backend="torch",
                                 debiased=False, tau_plus=0.7)
    assert torch.equal(off_a, off_b)
    with pytest.raises(ValueError, match="keep_cont"):
        minimization_loss(z1, z2, mem.double(), temperature=0.4, irm_temperature=0.6,
                          penalty_weight=lam, keep_cont=False, debiased=True)


# -- 2. irm_mode v2 -----------------------------------------------------------------------------

@pytest.mark.parametrize("k,constrain,relax,nonorm",
                         [(2, True, True, False), (3, True, False, False), (2, True, True, True),
                          (2, False, False, False)])
def test_v2_objective_matches_official_variance_mode(seed, k, constrain, relax, nonorm):
    batch = int(torch.randint(3, 12, ()))
    f1, f2 = unit(batch, 5), unit(batch, 5)
    theta = torch.randn(batch, k, dtype=torch.float64, requires_grad=True)
    lam2 = float(torch.empty(()).uniform_(0.1, 2.0))
    want, cont, inv = ref_search_objective_v2(f1, f2, theta, 0.5, lam2, constrain, relax, nonorm)
    got, parts = maximization_objective(f1, f2, theta, temperature=0.5, irm_temperature=0.3,
                                        irm_weight=lam2, constrain=constrain,
                                        constrain_relax=relax, nonorm=nonorm, backend="torch",
                                        irm_mode="v2")
    # the op computes in float32 (soft weights are softmax(theta.float()))
    close(got, want, tol=1e-5)
    close(parts["loss"], cont.detach(), tol=1e-5)
    close(parts["penalty"], inv.detach(), tol=1e-5)
    up = torch.randn((), dtype=torch.float64)
    (g_got,) = torch.autograd.grad(got * up, theta)
    (g_want,) = torch.autograd.grad(want * up, theta)
    torch.testing.assert_close(g_got.double(), g_want, rtol=1e-4, atol=1e-6)
    with pytest.raises(ValueError, match="irm_mode"):
        maximization_objective(f1, f2, theta, temperature=0.5, irm_temperature=0.3,
                               irm_weight=lam2, irm_mode="v3")


# -- 3. online search ---------------------------------------------------------------------------

SEARCH = dict(temperature=0.5, irm_temperature=0.5, irm_weight=0.5, constrain=True,
              constrain_relax=True, backend="torch")


@pytest.mark.parametrize("irm_mode,max_epochs", [("v1", 0), ("v2", 0), ("v1", 4)])
def test_online_search_on_fixed_features_equals_offline(seed, irm_mode, max_epochs):
    n, bs = 48, 16
    z1, z2 = unit(n, 8, torch.float32), unit(n, 8, torch.float32)
    init = torch.randn(n, 2)
    common = dict(SEARCH, irm_mode=irm_mode, min_epochs=1, patience=1, max_epochs=max_epochs)
    offline = part.optimize_partition(z1, z2, init, batch_size=bs,
                                      generator=torch.Generator().manual_seed(seed), **common)
    order = torch.Generator().manual_seed(seed)

    def batches(epoch):     # the same shuffles, drop_last (n is a multiple of bs)
        perm = torch.randperm(n, generator=order)
        for b0 in range(0, n - n % bs, bs):
            idx = perm[b0:b0 + bs]
            yield idx, z1[idx], z2[idx]

    online = part.optimize_partition_online(batches, init, **common)
    assert torch.equal(online.logits, offline.logits)
    assert online.history == offline.history and online.best_epoch == offline.best_epoch
    assert online.epochs_run == offline.epochs_run <= max_epochs + 1
    assert offline.epochs_run == len(offline.history) and (max_epochs or offline.epochs_run == 1)


class BNProjector(torch.nn.Module):
    """A (feature, projection) model with BN: eval mode makes it a fixed per-image function."""

    def __init__(self, d_in, d_out):
        super().__init__()
        self.lin = torch.nn.Linear(d_in, d_out)
        self.bn = torch.nn.BatchNorm1d(d_out)
        with torch.no_grad():
            self.bn.running_mean.normal_()
            self.bn.running_var.uniform_(0.5, 2.0)

    def forward(self, x):
        h = self.bn(self.lin(x.flatten(1)))
        return h, F.normalize(h, dim=1)


def fixed_augment(images, generator):
    x = images.float() / 255.0
    return x, x.flip(-2)


def test_online_views_one_epoch_equals_offline_on_extracted_features(seed):
    n, bs, k = 40, 10, 2
    rng = np.random.default_rng(seed)
    data = ArrayDataset(rng.integers(0, 256, (n, 4, 4, 3), dtype=np.uint8), None, 0, "toy")
    model = BNProjector(48, 6).train()
    stats = model.bn.running_mean.clone()
    bank_loader = IndexedLoader(data, 7, seed=0, shuffle=False, drop_last=False)
    z1, z2 = part.extract_views(model, bank_loader, fixed_augment, num_samples=n,
                                device=torch.device("cpu"))
    init = torch.randn(n, k)
    loader = IndexedLoader(data, bs, seed=seed, shuffle=True, drop_last=True)
    batches = part.online_views(model, loader, fixed_augment, device=torch.device("cpu"))
    online = part.optimize_partition_online(batches, init, max_epochs=0, **SEARCH)
    offline = part.optimize_partition(z1, z2, init, batch_size=bs, max_epochs=0,
                                      generator=derived_generator(seed, 0), **SEARCH)
    torch.testing.assert_close(online.logits, offline.logits, rtol=1e-6, atol=1e-6)
    assert model.training and torch.equal(model.bn.running_mean, stats)   # eval mode, restored
    assert all(p.grad is None for p in model.parameters())                # no_grad extraction
    # the batches of one search epoch: fresh features, the loader's shuffled drop_last order
    got = list(batches(3))
    assert len(got) == n // bs and not got[0][1].requires_grad
    loader.set_epoch(3)
    assert torch.equal(torch.cat([g[0] for g in got]), loader.order()[: n // bs * bs])
    with pytest.raises(ValueError, match="no feature batch"):
        part.optimize_partition_online(lambda e: iter(()), init, max_epochs=0, **SEARCH)


def test_online_v2_and_debiased_runs_end_to_end(tmp_path):
    """The tiny trainer run: online v2 searches (N = 96, batch 64 with drop_last), DCL SimCLR."""
    cfg = load_config(tiny_config(tmp_path), ["partition.offline=false", "partition.irm_mode=v2",
                                              "train.epochs=3", "eval.knn_every=0"])
    out = trainmod.train(cfg, log=lambda *a: None)
    parts = out["partitions"]
    assert [p["epoch"] for p in parts] == [0, 2]
    assert all(math.isfinite(p["best_objective"]) and 2 <= p["epochs_run"] <= 4 for p in parts)
    assert math.isfinite(out["final_loss"])
    base = load_config(tiny_config(tmp_path, name="b.toml"),
                       ["method.name=simclr", "ipirm.debiased=true", "ipirm.tau_plus=0.1",
                        "train.epochs=1", "eval.knn_every=0", "run.name=dcl"])
    res = trainmod.train(base, log=lambda *a: None)
    assert res["kind"] == "SimCLR" and math.isfinite(res["final_loss"])


def test_config_accepts_the_three_modes(tmp_path):
    path = tmp_path / "modes.toml"
    path.write_text('[method]\nname = "simclr"\n[ipirm]\ndebiased = true\ntau_plus = 0.05\n'
                    '[partition]\noffline = false\nirm_mode = "v2"\n')
    cfg = load_config(path)
    assert cfg.ipirm.debiased and cfg.ipirm.tau_plus == 0.05
    assert not cfg.partition.offline and cfg.partition.irm_mode == "v2"
    with pytest.raises(ValueError, match="ipirm.debiased: the official IP-IRM ignores"):
        load_config(path, ["method.name=ipirm"])
    with pytest.raises(ValueError, match="ipirm.tau_plus: must be below 1"):
        load_config(path, ["ipirm.tau_plus=1.0"])
    path.write_text('[partition]\nirm_mode = "v3"\n')
    with pytest.raises(ValueError, match="partition.irm_mode: 'v3' is not one of v1, v2"):
        load_config(path)
