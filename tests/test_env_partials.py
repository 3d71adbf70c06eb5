"""The env op's distributed form (``env_contrastive_partials`` + ``env_penalty``): the partial
sums of disjoint anchor shares, summed (the slot gradients before they are squared), give the
literal reference's loss, penalty and gradients; bad input is a clear error."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from fastipirm.ops import (PENALTIES, env_contrastive_loss_reference, env_contrastive_partials,
                           env_penalty)
from fastipirm.ops import torch_backend


def _shares(batch: int, parts: int, g: torch.Generator) -> list[tuple[int, int]]:
    """``parts`` disjoint non-empty ranges covering ``[0, batch)``, uneven cuts."""
    cuts = sorted(torch.randperm(batch - 1, generator=g)[:parts - 1].add(1).tolist())
    bounds = [0, *cuts, batch]
    return list(zip(bounds, bounds[1:]))


def _weights(batch: int, m: int, g: torch.Generator) -> torch.Tensor:
    """Random 0/1 memberships plus the edge columns: empty, one member, everybody."""
    w = (torch.rand(batch, m, generator=g) < 0.5).float()
    w[:, 0] = 1.0
    w[:, 1] = 0.0
    w[:, 2] = 0.0
    w[int(torch.randint(batch, (1,), generator=g)), 2] = 1.0
    return w


def _summed(z1, z2, w, shares, **kw):
    losses, grads = zip(*(env_contrastive_partials(z1, z2, w, samples=s, **kw) for s in shares))
    return sum(losses), env_penalty(sum(grads), w, penalty=kw["penalty"])


@pytest.mark.parametrize("penalty", PENALTIES)
@pytest.mark.parametrize("batch,dim,parts", [(2, 3, 2), (7, 5, 3), (13, 9, 2), (33, 17, 4)])
def test_summed_shares_equal_the_reference(penalty, batch, dim, parts):
    g = torch.Generator().manual_seed(torch.seed() % 2**31)     # fresh inputs every run
    z1 = F.normalize(torch.randn(batch, dim, generator=g, dtype=torch.float64), dim=1)
    z2 = F.normalize(torch.randn(batch, dim, generator=g, dtype=torch.float64), dim=1)
    z1.requires_grad_()
    z2.requires_grad_()
    w = _weights(batch, 5, g)
    kw = dict(temperature=0.3, irm_temperature=0.7, penalty=penalty)
    ref_loss, ref_pen = env_contrastive_loss_reference(z1, z2, w.double(), soft=False, **kw)
    loss, pen = _summed(z1, z2, w, _shares(batch, min(parts, batch), g), **kw)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(pen, ref_pen, rtol=1e-9, atol=1e-12)
    up_l, up_p = (torch.randn(5, generator=g, dtype=torch.float64) for _ in range(2))
    want = torch.autograd.grad((ref_loss * up_l + ref_pen * up_p).sum(), (z1, z2))
    got = torch.autograd.grad((loss * up_l + pen * up_p).sum(), (z1, z2))
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-12)


def test_streamed_row_blocks_and_float32(monkeypatch):
    """Blocks of 3 rows (the shares are streamed too) and float32 inputs, all-equal features."""
    monkeypatch.setattr(torch_backend, "CHUNK_ELEMENTS", 3 * 22)
    g = torch.Generator().manual_seed(5)
    z = F.normalize(torch.randn(11, 6, generator=g), dim=1)
    z1 = z.clone().requires_grad_()
    z2 = (z + 0.1 * torch.randn(11, 6, generator=g)).requires_grad_()
    z2.data[4:7] = z1.data[4]                       # equal features: ties in every row
    w = _weights(11, 4, g)
    kw = dict(temperature=0.2, irm_temperature=0.5, penalty="slot")
    loss, pen = _summed(z1, z2, w, [(0, 5), (5, 6), (6, 11)], **kw)
    ref_loss, ref_pen = env_contrastive_loss_reference(z1.double(), z2.double(), w.double(),
                                                       soft=False, **kw)
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss.double(), ref_loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(pen.double(), ref_pen, rtol=1e-4, atol=1e-6)
    (loss.sum() + pen.sum()).backward()
    assert torch.isfinite(z1.grad).all() and z1.grad.abs().sum() > 0


def test_an_empty_environment_and_one_share_alone():
    """A share holds only its anchors' terms: an environment with no member in it gets loss 0
    and zero slot gradients from that share."""
    z1 = F.normalize(torch.randn(6, 4, dtype=torch.float64), dim=1)
    z2 = F.normalize(torch.randn(6, 4, dtype=torch.float64), dim=1)
    w = torch.tensor([[1, 0], [1, 0], [1, 0], [0, 1], [0, 1], [0, 1]], dtype=torch.float64)
    loss, grads = env_contrastive_partials(z1, z2, w, samples=(0, 3), temperature=0.5,
                                           irm_temperature=0.5)
    assert loss[1] == 0 and loss[0] > 0
    assert grads[1].abs().sum() == 0 and grads[0].abs().sum() > 0


def test_bad_input_is_a_clear_error():
    z = F.normalize(torch.randn(4, 3), dim=1)
    w = torch.ones(4, 1)
    kw = dict(temperature=0.5, irm_temperature=0.5)
    with pytest.raises(ValueError, match="samples must be a non-empty range"):
        env_contrastive_partials(z, z, w, samples=(2, 2), **kw)
    with pytest.raises(ValueError, match="samples must be a non-empty range"):
        env_contrastive_partials(z, z, w, samples=(0, 5), **kw)
    with pytest.raises(ValueError, match="implemented by torch only"):
        env_contrastive_partials(z, z, w, samples=(0, 2), backend="triton", **kw)
    with pytest.raises(ValueError, match="0/1 memberships"):
        env_contrastive_partials(z, z, torch.full((4, 1), 0.5), samples=(0, 2), **kw)
    with pytest.raises(ValueError, match="one row per sample"):
        env_contrastive_partials(z, z, torch.ones(3, 1), samples=(0, 2), **kw)


def test_minimization_loss_with_the_whole_batch_as_its_share_is_the_plain_one():
    """One process, ``rows`` = every sample: the distributed form's minimisation loss is the
    plain one (the all-reduce is the identity without a process group)."""
    from fastipirm.losses.ipirm import minimization_loss

    g = torch.Generator().manual_seed(torch.seed() % 2**31)
    z1 = F.normalize(torch.randn(9, 5, generator=g, dtype=torch.float64), dim=1).requires_grad_()
    z2 = F.normalize(torch.randn(9, 5, generator=g, dtype=torch.float64), dim=1).requires_grad_()
    memberships = _weights(9, 4, g)
    kw = dict(temperature=0.5, irm_temperature=0.3, penalty_weight=2.5, keep_cont=True)
    plain, plain_parts = minimization_loss(z1, z2, memberships, **kw)
    dist, dist_parts = minimization_loss(z1, z2, memberships, rows=(0, 9), world=1, **kw)
    torch.testing.assert_close(dist, plain)
    for key in ("loss_global", "loss_env", "penalty"):
        torch.testing.assert_close(dist_parts[key], plain_parts[key])
    torch.testing.assert_close(torch.autograd.grad(dist, z1), torch.autograd.grad(plain, z1))
    with pytest.raises(ValueError, match="debiased has no distributed form"):
        minimization_loss(z1, z2, memberships, rows=(0, 9), debiased=True, **kw)


def test_choose_ddp_form():
    from fastipirm.ops import available_backends
    from fastipirm.ops.env_contrastive import LOCAL_FORM_MIN_WORLD, choose_ddp_form

    cpu = torch.device("cpu")
    assert choose_ddp_form("auto", "torch", cpu, 2) == "local"
    assert choose_ddp_form("auto", "cpu", cpu, 8) == "replicated"      # a named fused backend
    assert choose_ddp_form("replicated", "torch", cpu, 8) == "replicated"
    assert choose_ddp_form("local", None, cpu, 2) == "local"
    # auto backend: the fused C++ kernel on all anchors is faster below LOCAL_FORM_MIN_WORLD
    fused = "cpu" in available_backends(cpu)
    assert choose_ddp_form("auto", None, cpu, 2) == ("replicated" if fused else "local")
    assert choose_ddp_form("auto", None, cpu, LOCAL_FORM_MIN_WORLD) == "local"
    with pytest.raises(ValueError, match="implemented by torch only"):
        choose_ddp_form("local", "triton", cpu, 2)
    with pytest.raises(ValueError, match="ddp_form must be one of"):
        choose_ddp_form("fast", None, cpu, 2)


def test_config_refuses_the_local_form_on_a_fused_backend():
    from fastipirm.config import from_dict

    with pytest.raises(ValueError, match="op.ddp_form"):
        from_dict({"op": {"backend": "cpu", "ddp_form": "local"}})
    with pytest.raises(ValueError, match="op.ddp_form"):
        from_dict({"op": {"ddp_form": "sometimes"}})
    assert from_dict({"op": {"backend": "cpu", "ddp_form": "replicated"}}).op.ddp_form == \
        "replicated"
