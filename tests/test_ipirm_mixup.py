"""IP-IRM + MixUp: the MixUp draws, the i-Mix loss and the per-partition terms against a literal
re-creation of the official ``train_env_mixup_full_retaingp`` (float64, the same lambda, partners
and subsets), the step's gradients, and short runs through the trainer."""
import math

import pytest
import torch
import torch.nn.functional as F

from fastipirm.config import from_dict
from fastipirm.data.mixup import group_mixup_draws, mix, mixup_draws
from fastipirm.losses.ipirm_mixup import imix_environment_terms, imix_loss
from fastipirm.methods import MethodContext
from fastipirm.methods.ipirm_mixup import IPIRMMixup
from fastipirm.models import SimCLRModel


def fresh_seed():
    return int(torch.randint(0, 2**31 - 1, ()).item())


def test_mixup_draws_follow_the_official_law():
    g = torch.Generator().manual_seed(fresh_seed())
    lam, partner = mixup_draws(20000, 1.0, generator=g)
    assert float(lam.min()) >= 0.5 and float(lam.max()) <= 1.0
    assert abs(float(lam.mean()) - 0.75) < 0.01                  # max(U, 1-U) ~ U(0.5, 1)
    assert sorted(partner.tolist()) == list(range(20000))
    lam2, _ = mixup_draws(20000, 0.2, generator=g)                # Beta(0.2, 0.2): mass at 0/1
    assert float((lam2 > 0.95).float().mean()) > 0.4
    lam3, partner3 = group_mixup_draws([3, 0, 5], generator=g)
    assert lam3.shape == (8,) and set(partner3[:3].tolist()) == {0, 1, 2}
    assert set(partner3[3:].tolist()) == set(range(3, 8))
    x = torch.randn(4, 3, dtype=torch.float64)
    lam4, p4 = torch.tensor([1.0, 0.5, 0.75, 0.6], dtype=torch.float64), torch.tensor([1, 0, 3, 2])
    want = torch.stack([lam4[i] * x[i] + (1 - lam4[i]) * x[p4[i]] for i in range(4)])
    assert torch.allclose(mix(x, lam4, p4), want)


def official_imix(q, k, lam_bar, partner, tau, dummy=None):
    """``lam_bar CE(S, i) + (1 - lam_bar) CE(S, partner)`` with ``S = q k^T / tau`` (times the
    dummy scale of each key column when given), written as the official code does."""
    logits = q @ k.T / tau
    if dummy is not None:
        logits = logits * dummy
    own = torch.arange(q.shape[0])
    return lam_bar * F.cross_entropy(logits, own) + (1 - lam_bar) * F.cross_entropy(logits, partner)


def test_imix_loss_and_partition_terms_equal_the_official_forms():
    g = torch.Generator().manual_seed(fresh_seed())
    q = torch.randn(12, 6, generator=g, dtype=torch.float64, requires_grad=True)
    k = torch.randn(12, 6, generator=g, dtype=torch.float64, requires_grad=True)
    lam, partner = mixup_draws(12, generator=g)
    lam = lam.double()
    got = imix_loss(q, k, lam, partner, temperature=0.2, backend="torch")
    want = official_imix(q, k, lam.mean(), partner, 0.2)
    assert torch.allclose(got, want, atol=1e-12)
    envs = torch.tensor([0] * 5 + [1] * 4 + [2] * 3)
    lam_e, partner_e = group_mixup_draws([5, 4, 3], generator=g)
    lam_e = lam_e.double()
    loss, pen = imix_environment_terms(q, k, envs, lam_e, partner_e, temperature=0.2,
                                       backend="torch")
    losses, pens = [], []
    for e in range(3):
        rows = torch.nonzero(envs == e).squeeze(1)
        dummy = torch.ones(1, len(rows), dtype=torch.float64, requires_grad=True)
        lk = official_imix(q[rows], k[rows], lam_e[rows].mean(), partner_e[rows] - rows[0], 0.2,
                           dummy)
        (gd,) = torch.autograd.grad(lk, dummy, create_graph=True)
        losses.append(lk)
        pens.append((gd ** 2).sum())
    assert torch.allclose(loss, torch.stack(losses).mean(), atol=1e-12)
    assert torch.allclose(pen, torch.stack(pens).mean(), atol=1e-12)
    up = torch.randn((), dtype=torch.float64, generator=g)
    ours = torch.autograd.grad(up * (loss + 0.7 * pen), (q, k))
    theirs = torch.autograd.grad(up * (torch.stack(losses).mean() + 0.7 * torch.stack(pens).mean()),
                                 (q, k))
    for a, b in zip(ours, theirs):
        assert torch.allclose(a, b, atol=1e-10)


def _method(penalty_weight, seed):
    cfg = from_dict({"method": {"name": "ipirm_mixup"},
                     "model": {"arch": "resnet18", "width": 2, "hidden_dim": 8,
                               "feature_dim": 8, "channels_last": False},
                     "train": {"temperature": 0.2, "amp": "none"},
                     "ipirm": {"penalty_weight": penalty_weight},
                     "op": {"backend": "torch"}})
    torch.manual_seed(seed)
    model = SimCLRModel(arch="resnet18", feature_dim=8, width=2, hidden_dim=8).double()
    opt = torch.optim.Adam(model.parameters())
    gen = torch.Generator().manual_seed(seed)
    return IPIRMMixup(MethodContext(cfg, model, opt, torch.device("cpu"), generator=gen)), model


@pytest.mark.parametrize("penalty_weight", [0.2, 2.0])
def test_one_step_equals_the_official_train_env_mixup_full_retaingp(penalty_weight):
    """Loss and parameter gradients of one step against the official structure, written
    literally: L_glob backward first; per partition, view 2 re-forwarded, each environment's
    clean view-1 images re-mixed within it and forwarded as their own batch, the dummy-scaled
    i-Mix loss and its penalty, loss_p backward; gradients accumulate."""
    seed = fresh_seed()
    b, n = 10, 30
    g = torch.Generator().manual_seed(seed + 1)
    v1 = torch.randn(b, 3, 8, 8, generator=g, dtype=torch.float64)
    v2 = torch.randn(b, 3, 8, 8, generator=g, dtype=torch.float64)
    indices = torch.randperm(n, generator=g)[:b]
    partitions = torch.randn(3, n, 2, generator=g)          # P = 3 partitions of K = 2
    method, model = _method(penalty_weight, seed)
    loss, parts = method.objective(indices, v1, v2, partitions, penalty_weight)
    model.zero_grad()
    loss.backward()
    ours = {k: p.grad.clone() for k, p in model.named_parameters()}

    # the official structure, with the same draws (replayed from the same generator)
    _, official_model = _method(penalty_weight, seed)
    official_model.load_state_dict(model.state_dict())     # same weights, fresh BN stats
    gen = torch.Generator().manual_seed(seed)
    lam, partner = mixup_draws(b, generator=gen)
    z2 = official_model(v2)[1]
    zq = official_model(mix(v1, lam, partner))[1]
    total = official_imix(zq, z2, lam.double().mean(), partner, 0.2)
    official_model.zero_grad()
    total.backward()
    total = total.detach()
    for logits in partitions:
        envs = logits[indices].argmax(1)
        counts = torch.bincount(envs, minlength=2).tolist()
        sizes = [c if c >= 2 else 0 for c in counts]
        lam_e, partner_e = group_mixup_draws(sizes, generator=gen)
        z2 = official_model(v2)[1]                          # re-forwarded per partition
        losses, pens, start = [], [], 0
        for e in range(2):
            if sizes[e] == 0:
                continue
            rows = torch.nonzero(envs == e).squeeze(1)
            lk, pk = lam_e[start:start + sizes[e]], partner_e[start:start + sizes[e]] - start
            start += sizes[e]
            q = official_model(mix(v1[rows], lk, pk))[1]
            dummy = torch.ones(1, len(rows), dtype=torch.float64, requires_grad=True)
            le = official_imix(q, z2[rows], lk.double().mean(), pk, 0.2, dummy)
            (gd,) = torch.autograd.grad(le, dummy, create_graph=True)
            losses.append(le)
            pens.append((gd ** 2).sum())
        term = torch.stack(losses).mean() + penalty_weight * torch.stack(pens).mean()
        if penalty_weight > 1:
            term = term / penalty_weight
        term.backward()
        total = total + term.detach()
    assert math.isclose(float(loss.detach()), float(total), rel_tol=1e-10, abs_tol=1e-12)
    for name, p in official_model.named_parameters():
        assert torch.allclose(ours[name], p.grad, atol=1e-9, rtol=1e-7), name
    assert float(parts["penalty"]) > 0


# ------------------------------------------------------------------ runs through the trainer

def test_short_ipirm_mixup_run_trains_retains_and_resumes(tmp_path):
    from fastipirm import train as trainmod
    from fastipirm.checkpoint import load_checkpoint
    from fastipirm.config import load_config
    from test_train import tiny_config

    class Killed(Exception):
        pass

    sets = ["method.name=ipirm_mixup", "train.temperature=0.2", "partition.maximize_iter=1",
            "train.epochs=3"]
    full = load_config(tiny_config(tmp_path, sets=sets + ["run.name=full"]))
    summary = trainmod.train(full, log=lambda s: None)
    assert summary["method"] == "ipirm_mixup" and summary["knn_top1"] is not None
    a = load_checkpoint(tmp_path / "runs" / "full")
    rows = a["history"]
    assert [r["partitions"] for r in rows] == [2, 3, 3]      # epoch 0's, then one per epoch
    assert all(r["penalty"] > 0 and r["loss_env"] > 0 for r in rows)
    assert all(math.isfinite(r["loss"]) for r in rows)

    def kill(epoch, state):
        if epoch == 1:
            raise Killed

    cut = load_config(tiny_config(tmp_path, name="cut.toml", sets=sets + ["run.name=cut"]))
    with pytest.raises(Killed):
        trainmod.train(cut, log=lambda s: None, on_epoch_end=kill)
    trainmod.train(cut, resume=str(tmp_path / "runs" / "cut"), log=lambda s: None)
    b = load_checkpoint(tmp_path / "runs" / "cut")
    assert [r["loss"] for r in a["history"]] == [r["loss"] for r in b["history"]]
    for k, v in a["model"].items():
        assert torch.equal(v, b["model"][k]), k


def test_mixup_baseline_run_and_the_keep_cont_rule(tmp_path):
    from fastipirm import train as trainmod
    from fastipirm.config import load_config
    from test_train import tiny_config

    cfg = load_config(tiny_config(tmp_path, sets=["method.name=mixup", "train.epochs=1"]))
    summary = trainmod.train(cfg, log=lambda s: None)
    assert summary["method"] == "mixup" and math.isfinite(summary["final_loss"])
    with pytest.raises(ValueError, match="ipirm.keep_cont"):
        load_config(tiny_config(tmp_path, name="k.toml",
                                sets=["method.name=ipirm_mixup", "ipirm.keep_cont=false"]))


def test_the_shipped_mixup_configs_are_the_official_scripts():
    from fastipirm.config import load_config

    cfg = load_config("configs/stl_mixup.toml")
    assert (cfg.method.name, cfg.train.temperature, cfg.train.epochs) == ("ipirm_mixup", 0.2, 400)
    assert cfg.ipirm.keep_cont and cfg.partition.offline and cfg.partition.retain_group
    assert (cfg.ipirm.penalty_weight, cfg.partition.irm_weight_maxim) == (0.2, 0.5)
    assert (cfg.ipirm.irm_temperature, cfg.ipirm.mixup_alpha) == (0.5, 1.0)
    assert load_config("configs/stl_mixup_set5.toml").partition.retain_group_set == 5
    assert load_config("configs/stl_mixup_1000.toml").train.epochs == 1000
    base = load_config("configs/stl_mixup_baseline.toml")
    assert (base.method.name, base.train.temperature) == ("mixup", 0.5)


def official_online_mixup_objective(f1, f2, theta, lam, labels_aux, tau, irm_weight):
    """``auto_split_online_mixup``'s risk of one batch (irm_mode v1, loss_mode v2, the relaxed
    balance constraint), written as the official code computes it."""
    bsz = f1.shape[0]
    param_split = F.softmax(theta, dim=-1)
    conts, pens = [], []

    def soft_loss(logits, weights):
        logits_exp = logits.exp()
        mask = torch.eye(bsz, dtype=torch.bool)
        weights = weights.unsqueeze(0).repeat(bsz, 1)
        weight_pos = weights[mask]
        weights_mask = weights * (~mask)
        weight_neg_norm = weights_mask / weights_mask.sum(1).unsqueeze(1) * (bsz - 1)
        weights_new = mask + weight_neg_norm
        sm = (weights_new * logits_exp) / (weights_new * logits_exp).sum(1).unsqueeze(1)
        labels = torch.arange(bsz)
        nll = torch.nn.NLLLoss(reduction="none")
        cont = (lam * nll(torch.log(sm), labels) + (1. - lam) * nll(torch.log(sm), labels_aux)
                ).mean()
        return (cont * weight_pos.squeeze()).sum() / weight_pos.sum()

    for e in range(theta.shape[1]):
        logits = f1.mm(f2.t()) / tau
        w = param_split[:, e]
        conts.append(soft_loss(logits, w))
        scale = torch.ones((1, bsz), dtype=f1.dtype).requires_grad_()
        (g,) = torch.autograd.grad(soft_loss(logits * scale, w), [scale], create_graph=True)
        pens.append(torch.sum(g ** 2))
    risk = -(torch.stack(conts).mean() + irm_weight * torch.stack(pens).mean())
    ent = -(param_split.mean(0) * torch.log(param_split.mean(0))).sum()
    return risk + torch.relu(0.6365 - ent)


def test_online_mixup_search_objective_equals_the_official():
    from fastipirm.losses.ipirm_mixup import mixup_maximization_objective

    g = torch.Generator().manual_seed(fresh_seed())
    b = 24
    f1 = F.normalize(torch.randn(b, 8, generator=g, dtype=torch.float64), dim=1)
    f2 = F.normalize(torch.randn(b, 8, generator=g, dtype=torch.float64), dim=1)
    lam, partner = mixup_draws(b, generator=g)
    lam = lam.double()
    theta = torch.randn(b, 2, generator=g, dtype=torch.float64, requires_grad=True)
    got, parts = mixup_maximization_objective(f1, f2, lam, partner, theta, temperature=0.2,
                                              irm_weight=0.5)
    want = official_online_mixup_objective(f1, f2, theta, lam, partner, 0.2, 0.5)
    assert torch.allclose(got.double(), want, atol=1e-10)
    (ga,) = torch.autograd.grad(got, theta)
    (gb,) = torch.autograd.grad(want, theta)
    assert torch.allclose(ga.double(), gb, atol=1e-9)


def test_online_mixup_search_run(tmp_path):
    """``partition.mixup_max``: the online MixUp search with its fixed schedule (25-30 search
    epochs) inside a short run; the config rules around it."""
    from fastipirm import train as trainmod
    from fastipirm.checkpoint import load_checkpoint
    from fastipirm.config import load_config
    from test_train import tiny_config

    sets = ["method.name=ipirm_mixup", "train.temperature=0.2", "partition.offline=false",
            "partition.mixup_max=true", "train.epochs=1", "partition.maximize_iter=1"]
    cfg = load_config(tiny_config(tmp_path, sets=sets))
    trainmod.train(cfg, log=lambda s: None)
    log = load_checkpoint(tmp_path / "runs" / "tiny")["method"]["partition_log"]
    assert len(log) == 1 and 26 <= log[0]["epochs_run"] <= 31 and log[0]["best_epoch"] >= 0
    with pytest.raises(ValueError, match="partition.mixup_max: the online MixUp search needs"):
        load_config(tiny_config(tmp_path, name="a.toml",
                                sets=["method.name=ipirm_mixup", "partition.mixup_max=true"]))
    with pytest.raises(ValueError, match="partition.mixup_max: the MixUp search belongs"):
        load_config(tiny_config(tmp_path, name="b.toml",
                                sets=["partition.offline=false", "partition.mixup_max=true"]))
