"""The two IP-IRM objectives against a plain loop over partitions/environments of the reference."""
import math

import pytest
import torch
import torch.nn.functional as F

from fastipirm.losses import (balance_constraint, maximization_objective,
                                  memberships_from_logits, minimization_loss,
                                  relaxed_entropy_threshold)
from fastipirm.ops import env_contrastive_loss_reference as reference


def feats(b, d=16, dtype=torch.float64):
    return (F.normalize(torch.randn(b, d, dtype=dtype), dim=1),
            F.normalize(torch.randn(b, d, dtype=dtype), dim=1))


def official_min_loss(z1, z2, partitions, idx, tau, irm_tau, lam, keep_cont):
    """main.py train_env: loop over retained partitions and environments, subset per env."""
    losses, pens = [], []
    for theta in partitions:
        assign = theta[idx].argmax(1)
        for k in range(theta.shape[1]):
            w = (assign == k).double()[:, None]
            loss, p = reference(z1, z2, w, temperature=tau, irm_temperature=irm_tau, soft=False)
            losses.append(loss[0])
            pens.append(p[0])
    total = torch.stack(losses).mean() + lam * torch.stack(pens).mean()
    if keep_cont:
        total = total + reference(z1, z2, torch.ones(len(idx), 1, dtype=torch.float64),
                                  temperature=tau, irm_temperature=irm_tau, soft=False)[0][0]
    if lam > 1:
        total = total / lam
    return total


@pytest.mark.parametrize("n_parts,k,keep_cont,lam", [(1, 2, True, 0.2), (3, 2, True, 0.2),
                                                     (2, 3, False, 2.0), (8, 2, True, 0.5)])
def test_minimization_loss_matches_loop_over_partitions(n_parts, k, keep_cont, lam):
    n_data, batch = 200, 48
    parts = torch.randn(n_parts, n_data, k, dtype=torch.float64)
    idx = torch.randperm(n_data)[:batch]
    z1, z2 = feats(batch)
    z1.requires_grad_()
    mem = memberships_from_logits(parts, idx)
    assert mem.shape == (batch, n_parts * k) and torch.all(mem.sum(1) == n_parts)
    total, parts_out = minimization_loss(z1.float(), z2.float(), mem, temperature=0.5,
                                         irm_temperature=0.5, penalty_weight=lam,
                                         keep_cont=keep_cont, backend="torch")
    want = official_min_loss(z1, z2, parts, idx, 0.5, 0.5, lam, keep_cont)
    assert abs(total.item() - want.item()) < 1e-5 * max(1.0, abs(want.item()))
    zf = z1.detach().float().requires_grad_()
    t2, _ = minimization_loss(zf, z2.float(), mem, temperature=0.5, irm_temperature=0.5,
                              penalty_weight=lam, keep_cont=keep_cont, backend="torch")
    (g_got,) = torch.autograd.grad(t2, zf)
    (g_want,) = torch.autograd.grad(want, z1)
    assert torch.allclose(g_got.double(), g_want, atol=1e-5, rtol=1e-4)
    assert set(parts_out) >= {"loss_global", "loss_env", "penalty"}


def test_baseline_is_plain_ntxent():
    z1, z2 = feats(32)
    total, _ = minimization_loss(z1.float(), z2.float(), None, temperature=0.5,
                                 irm_temperature=0.5, penalty_weight=0.2, keep_cont=True)
    want = reference(z1, z2, torch.ones(32, 1, dtype=torch.float64), temperature=0.5,
                     irm_temperature=0.5, soft=False)[0][0]
    assert abs(total.item() - want.item()) < 1e-5
    with pytest.raises(ValueError, match="memberships"):
        minimization_loss(z1.float(), z2.float(), None, temperature=0.5, irm_temperature=0.5,
                          penalty_weight=0.2, keep_cont=False)


def entropy(q):
    return -(q * q.log()).sum()


@pytest.mark.parametrize("k,constrain,relax,nonorm",
                         [(2, True, True, False), (2, True, False, False), (2, True, True, True),
                          (2, False, False, False), (4, True, True, False)])
def test_maximization_objective_matches_reference(k, constrain, relax, nonorm):
    batch = 40
    z1, z2 = feats(batch)
    theta = torch.randn(batch, k, dtype=torch.float64, requires_grad=True)
    q = torch.softmax(theta, 1)
    loss, p = reference(z1, z2, q, temperature=0.5, irm_temperature=0.4, soft=True, nonorm=nonorm)
    qbar = q.mean(0)
    if not constrain:
        c = 0.0
    elif nonorm:
        c = 0.2 * (-entropy(qbar) + torch.stack([entropy(r) for r in q]).mean())
    elif relax:
        c = F.relu(relaxed_entropy_threshold(k) - entropy(qbar))
    else:
        c = -entropy(qbar)
    want = -(loss.mean() + 0.5 * p.mean()) + c
    (g_want,) = torch.autograd.grad(want, theta)

    theta32 = theta.detach().float().requires_grad_()
    got, parts = maximization_objective(z1.float(), z2.float(), theta32, temperature=0.5,
                                        irm_temperature=0.4, irm_weight=0.5, constrain=constrain,
                                        constrain_relax=relax, nonorm=nonorm, backend="torch")
    (g_got,) = torch.autograd.grad(got, theta32)
    assert abs(got.item() - want.item()) < 1e-5 * max(1.0, abs(want.item()))
    assert torch.allclose(g_got.double(), g_want, atol=1e-6, rtol=1e-4)
    assert parts["loss"] > 0


def test_relaxed_threshold():
    assert relaxed_entropy_threshold(2) == 0.6365
    assert abs(relaxed_entropy_threshold(2)
               - (-(1 / 3) * math.log(1 / 3) - (2 / 3) * math.log(2 / 3))) < 1e-4
    h4 = relaxed_entropy_threshold(4)
    assert abs(h4 - (-(0.4 * math.log(0.4) + 3 * 0.2 * math.log(0.2)))) < 1e-12
    assert h4 < math.log(4)
    with pytest.raises(ValueError):
        relaxed_entropy_threshold(1)


def test_relaxed_constraint_is_zero_inside_two_to_one_split():
    q = torch.tensor([[0.65, 0.35]] * 10)
    assert balance_constraint(q, constrain=True, constrain_relax=True, nonorm=False) == 0
    q = torch.tensor([[0.9, 0.1]] * 10)
    assert balance_constraint(q, constrain=True, constrain_relax=True, nonorm=False) > 0


def test_maximization_gradient_ascends_the_penalty():
    """A few gradient steps on J lower J (the partition becomes more adversarial)."""
    torch.manual_seed(0)
    z1, z2 = feats(64, dtype=torch.float32)
    theta = torch.randn(64, 2, requires_grad=True)
    opt = torch.optim.Adam([theta], lr=0.5)
    values = []
    for _ in range(15):
        j, _ = maximization_objective(z1, z2, theta, temperature=0.5, irm_temperature=0.5,
                                      irm_weight=0.5)
        opt.zero_grad()
        j.backward()
        opt.step()
        values.append(j.item())
    assert min(values[-5:]) < values[0]


def test_the_general_op_computes_simclr_nt_xent():
    """NT-Xent over the 2B views is the general op with each view's partner as its positive
    column (keys = the views themselves, own column excluded): both ops agree."""
    from fastipirm.losses import nt_xent
    from fastipirm.ops import masked_contrastive_loss

    g = torch.Generator().manual_seed(0)
    z1 = F.normalize(torch.randn(11, 6, generator=g, dtype=torch.float64), dim=1)
    z2 = F.normalize(torch.randn(11, 6, generator=g, dtype=torch.float64), dim=1)
    partner = torch.cat([torch.arange(11, 22), torch.arange(11)])
    general = masked_contrastive_loss(torch.cat([z1, z2]), positive_index=partner,
                                      temperature=0.5, backend="torch")
    torch.testing.assert_close(general, nt_xent(z1, z2, temperature=0.5, backend="torch"),
                               rtol=1e-12, atol=1e-12)
