"""The custom-op wrapper of compiled backends: opcheck, autograd, fullgraph compile.

Exercised with the torch backend's forward/backward functions registered as an opaque op (the
way the Triton and C++ backends are registered).
"""
import pytest
import torch
import torch.nn.functional as F

from fastipirm.ops import env_contrastive_loss_reference
from fastipirm.ops.custom_ops import register_env_contrastive_op
from fastipirm.ops.torch_backend import _backward, _forward


def _fwd(z1, z2, w, spec):
    loss, pen, g = _forward(z1.float(), z2.float(), w.float(), spec)
    return loss, pen, [g]


def _bwd(z1, z2, w, saved, d_loss, d_pen, spec):
    d_z1, d_z2, d_w = _backward(z1.float(), z2.float(), w.float(), saved[0], d_loss, d_pen, spec)
    return d_z1.to(z1.dtype), d_z2.to(z2.dtype), None if d_w is None else d_w.to(w.dtype)


def _fake(z1, z2, w, spec):
    slots = 1 if spec.scalar else 2 * z1.shape[0]
    return [z1.new_empty(spec.groups(w.shape[1]), slots, dtype=torch.float32)]


OPAQUE = register_env_contrastive_op("torch_opaque_test", _fwd, _bwd, _fake)


def inputs(b=9, d=8, m=3, soft=True):
    z1 = F.normalize(torch.randn(b, d), dim=1)
    z2 = F.normalize(torch.randn(b, d), dim=1)
    w = torch.rand(b, m) if soft else (torch.rand(b, m) < 0.5).float()
    return z1, z2, w


@pytest.mark.parametrize("soft,penalty", [(False, "slot"), (True, "slot"), (True, "split"),
                                          (False, "scalar")])
def test_opcheck(soft, penalty):
    z1, z2, w = inputs(soft=soft)
    args = (z1.requires_grad_(), z2.requires_grad_(), w.requires_grad_(soft), soft, False,
            penalty, 0.5, 0.4)
    torch.library.opcheck(OPAQUE.forward_op, args)


@pytest.mark.parametrize("soft", [False, True])
def test_values_and_gradients_match_reference(soft):
    z1, z2, w = inputs(soft=soft)
    ins = [t.clone().requires_grad_(soft or i < 2) for i, t in enumerate((z1, z2, w))]
    loss, pen = OPAQUE(*ins, temperature=0.5, irm_temperature=0.4, soft=soft)
    ref = [t.double().clone().requires_grad_(soft or i < 2) for i, t in enumerate((z1, z2, w))]
    rl, rp = env_contrastive_loss_reference(*ref, temperature=0.5, irm_temperature=0.4, soft=soft)
    assert torch.allclose(loss.double(), rl, rtol=1e-5)
    assert torch.allclose(pen.double(), rp, rtol=1e-4)
    (loss.sum() + 3 * pen.sum()).backward()
    (rl.sum() + 3 * rp.sum()).backward()
    for a, b in zip(ins, ref):
        if b.grad is not None:
            assert torch.allclose(a.grad.double(), b.grad, atol=1e-6, rtol=1e-4)


def test_whole_step_compiles_without_graph_break():
    z1, z2, w = inputs(soft=True)
    lin = torch.nn.Linear(8, 8)

    def step(x1, x2, weights):
        a = F.normalize(lin(x1), dim=1)
        b = F.normalize(lin(x2), dim=1)
        loss, pen = OPAQUE(a, b, weights, temperature=0.5, irm_temperature=0.5, soft=True)
        return loss.mean() + 0.5 * pen.mean()

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    out = compiled(z1, z2, w)
    out.backward()
    g_compiled = lin.weight.grad.clone()
    lin.weight.grad = None
    ref = step(z1, z2, w)
    ref.backward()
    assert torch.allclose(out, ref) and torch.allclose(g_compiled, lin.weight.grad, atol=1e-6)
