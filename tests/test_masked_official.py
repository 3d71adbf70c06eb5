"""masked_contrastive_loss computes the official objectives: each one written here literally, as
the official code evaluates it, and compared with the op on every available backend.

* CL-ICA (``losses.py``): ``LpSimCLRLoss(p, tau, alpha=0.5, simclr_compatibility_mode=True,
  pow=True)`` for p in {1, 2, 3} and ``SimCLRLoss`` (dot product on the fixed unit sphere), fed
  as ``main_mlp.py``'s training step feeds them: the negatives are the anchors rolled by one
  (so every anchor, itself included, at distance 0), the positive a separate tensor.
* DCoDR (``model/modules.py``): ``SimCLR_Loss_w_Pos(num_rand_negs=64, alpha=0.5, num_pos=1)``
  with domain-wise negatives: the codes L2-normalised inside, anchor i's negatives the
  ``min(n_dom - 1, 64)`` other anchors of its domain drawn without replacement (all 31 of them
  with 4 domains x 32), ``-2 (alpha LSE(pos) - (1 - alpha) LSE(negs, pos))`` averaged.
* IP-IRM + MixUp (``main_mixup.py``, i-Mix): mixed view-1 codes x clean view-2 codes / tau,
  ``(lam * CE(S, i) + (1 - lam) * CE(S, perm(i))).mean()`` with per-sample ``lam`` (the CE is
  a batch mean, so ``lam`` collapses to its batch mean), and the IRM penalty ``|dL/ds|^2`` for
  a dummy ``s`` of ones per key column, by ``autograd.grad(create_graph=True)``; per
  environment (a subset re-mixed with its own permutation and lambdas), tau = 0.2.

Values and gradients (w.r.t. every feature tensor) with random upstream gradients on every
output, float64 inputs, to 1e-10 relative for a backend that keeps float64 statistics (fp32
inputs and the fp32 tolerance for the others). Fresh random inputs every run: a failure prints
its seed, replayed with ``FASTIPIRM_TEST_SEED=<seed>``.
"""
import pytest
import torch
import torch.nn.functional as F

from fastipirm.check import FP32_TOLERANCE, GRADIENT_FLOOR, VALUE_FLOOR, relative_error
from fastipirm.ops import key_group_penalty, masked_contrastive_loss
from fastipirm.ops.backends import MASKED

BACKENDS = MASKED.available("cpu")
F64_TOLERANCE = 1e-10
f64 = torch.float64

pytestmark = pytest.mark.usefixtures("one_thread")


def precision(backend: str) -> tuple[torch.dtype, float]:
    """(input dtype, relative tolerance): float64 for a backend with float64 statistics."""
    kern = getattr(MASKED.backends[backend].load(), "kernels", None)
    if kern is not None and kern.stat_dtype(f64) == f64:
        return f64, F64_TOLERANCE
    return torch.float32, FP32_TOLERANCE


def interpreted(backend: str) -> bool:
    """Triton on CPU tensors runs in its (slow) interpreter: smaller batches and codes."""
    return backend == "triton"


def outputs_and_grads(fn, leaves: dict, ups: list, dtype) -> dict:
    """``fn(**leaves)`` (a tuple of outputs) on fresh ``dtype`` leaf copies, and the gradients of
    ``sum_o <output_o, up_o>`` w.r.t. every leaf."""
    xs = {n: t.detach().to(dtype).requires_grad_() for n, t in leaves.items()}
    outs = fn(**xs)
    total = sum((o * u.to(o.dtype)).sum() for o, u in zip(outs, ups))
    grads = torch.autograd.grad(total, list(xs.values()), allow_unused=True)
    result = {f"output {i}": o.detach() for i, o in enumerate(outs)}
    for (name, x), g in zip(xs.items(), grads):
        result[f"d {name}"] = torch.zeros_like(x) if g is None else g.detach()
    return result


def compare(backend, official, op, leaves: dict, seed, what: str, ups=None) -> tuple:
    """The op (through ``backend``) against the official objective, values and gradients, for
    random upstream gradients ``ups`` (drawn if None); returns ``(official's, op's)`` outputs
    and gradients and ``ups``."""
    if ups is None:
        outs = official(**{n: t.detach().clone().requires_grad_() for n, t in leaves.items()})
        ups = [torch.randn(o.shape, dtype=f64) for o in outs]
    want = outputs_and_grads(official, leaves, ups, f64)
    dtype, tol = precision(backend)
    got = outputs_and_grads(lambda **x: op(backend=backend, **x), leaves, ups, dtype)
    for name in want:
        assert torch.isfinite(got[name]).all(), f"{name} not finite ({what}, seed {seed})"
        err = relative_error(got[name].cpu(), want[name],
                             VALUE_FLOOR if name.startswith("output") else GRADIENT_FLOOR)
        assert err <= tol, f"{name}: relative error {err:.3e} > {tol:g} ({backend} {what}, " \
                           f"seed {seed})"
    return want, got, ups


# ------------------------------------------------------------------ CL-ICA
def clica_lp_official(h, h_pos, p, tau):
    """LpSimCLRLoss on (anchors h, positives h_pos, negatives roll(h, 1)): per-anchor
    ``2 (alpha pos_i / tau + (1 - alpha) LSE_j({-neg_ij / tau} + {-pos_i / tau}))`` with the
    powered p-norms ``pos_i = |h_i - h~_i|_p^p``, ``neg_ij = |h_i - n_j|_p^p``, alpha = 0.5."""
    negatives = torch.roll(h, 1, 0)
    neg = torch.linalg.vector_norm(h[:, None, :] - negatives[None, :, :], ord=p, dim=-1) ** p
    pos = torch.linalg.vector_norm(h - h_pos, ord=p, dim=-1) ** p
    lse = torch.logsumexp(torch.cat([-neg, -pos[:, None]], 1) / tau, 1)
    alpha = 0.5
    per_anchor = 2 * (alpha * pos / tau + (1 - alpha) * lse)
    return per_anchor, per_anchor.mean()


def clica_dot_official(h, h_pos, tau):
    """SimCLRLoss(normalize=False) on the fixed sphere: per-anchor ``2 (alpha (-pos_i / tau) +
    (1 - alpha) LSE_j({neg_ij / tau} + {pos_i / tau}))`` with dot products against
    roll(h, 1)."""
    neg = h @ torch.roll(h, 1, 0).T
    pos = (h * h_pos).sum(1)
    lse = torch.logsumexp(torch.cat([neg, pos[:, None]], 1) / tau, 1)
    alpha = 0.5
    per_anchor = 2 * (alpha * (-pos / tau) + (1 - alpha) * lse)
    return per_anchor, per_anchor.mean()


LP_SIMILARITY = {1: dict(similarity="l1"), 2: dict(similarity="sqeuclidean"),
                 3: dict(similarity="lp", p=3)}


def clica_op(p, tau, include_self=True):
    kw = dict(LP_SIMILARITY[p]) if p else dict(similarity="dot")

    def op(h, h_pos, backend):
        args = dict(keys=None, positives=h_pos, include_self=include_self, temperature=tau,
                    backend=backend, **kw)
        return (masked_contrastive_loss(h, reduction="none", **args),
                masked_contrastive_loss(h, reduction="mean", **args))
    return op


def clica_batch(batch=128, n=10, sphere=False):
    """Encoder outputs of box latents (uniform in [0, 1]^n) and their positives under the
    Normal(0.05) conditional; on the sphere: unit vectors and normalised noisy positives."""
    if sphere:
        h = F.normalize(torch.randn(batch, n, dtype=f64), dim=1)
        return h, F.normalize(h + 0.2 * torch.randn(batch, n, dtype=f64), dim=1)
    h = torch.rand(batch, n, dtype=f64)
    return h, h + 0.05 * torch.randn(batch, n, dtype=f64)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("tau", [1.0, 0.05])
@pytest.mark.parametrize("p", [1, 2, 3])
def test_clica_lp_simclr_loss(backend, p, tau, seed):
    h, h_pos = clica_batch(48 if interpreted(backend) else 128)
    want, _, _ = compare(backend, lambda h, h_pos: clica_lp_official(h, h_pos, p, tau),
                         clica_op(p, tau), dict(h=h, h_pos=h_pos), seed,
                         f"CL-ICA LpSimCLRLoss p={p} tau={tau}")
    # the self-pair is one of the official negatives: without it the loss differs
    without = clica_op(p, tau, include_self=False)(h, h_pos, "torch")[1]
    assert abs(without.item() - want["output 1"].item()) > 1e-6


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("tau", [1.0, 0.05])
def test_clica_dot_simclr_loss_on_the_sphere(backend, tau, seed):
    h, h_pos = clica_batch(48 if interpreted(backend) else 128, sphere=True)
    compare(backend, lambda h, h_pos: clica_dot_official(h, h_pos, tau), clica_op(None, tau),
            dict(h=h, h_pos=h_pos), seed, f"CL-ICA SimCLRLoss tau={tau}")


# ------------------------------------------------------------------ DCoDR
def dcodr_official(z, z_pos, domains, tau):
    """SimCLR_Loss_w_Pos with domain-wise negatives, one positive, alpha = 0.5 (the codes are
    normalised inside): mean_i of ``-2 (alpha LSE(s+_i / tau) - (1 - alpha) LSE({s_ij / tau :
    j in N(i)} + {s+_i / tau}))``, ``N(i)`` the ``min(B / n_domains - 1, 64)`` other anchors of
    i's domain drawn without replacement."""
    z, z_pos = F.normalize(z, dim=-1), F.normalize(z_pos, dim=-1)
    batch = z.shape[0]
    per_domain = batch // len(torch.unique(domains))
    n_neg = min(per_domain - 1, 64)
    others = []
    for i in range(batch):
        same = torch.nonzero((domains == domains[i]) & (torch.arange(batch) != i)).flatten()
        others.append(same[torch.randperm(len(same))[:n_neg]])
    negatives = torch.stack(others)                                   # (B, n_neg)
    neg_sims = (z[:, None, :] * z[negatives]).sum(-1)                 # anchor . other anchor
    pos_sims = torch.matmul(z_pos[:, None, :], z[:, :, None])[:, :, 0]   # (B, 1): one positive
    loss_pos = torch.logsumexp(pos_sims / tau, -1)
    loss_neg = torch.logsumexp(torch.cat([neg_sims, pos_sims], -1) / tau, -1)
    alpha = 0.5
    return (-2 * (alpha * loss_pos - (1 - alpha) * loss_neg)).mean(),


def dcodr_op(domains, tau):
    def op(z, z_pos, backend):
        return masked_contrastive_loss(F.normalize(z, dim=-1), keys=None,
                                       positives=F.normalize(z_pos, dim=-1),
                                       query_groups=domains, similarity="dot", temperature=tau,
                                       backend=backend),
    return op


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("tau", [0.2, 0.1])
@pytest.mark.parametrize("order", ["contiguous", "shuffled"])
def test_dcodr_domain_wise_loss(backend, order, tau, seed):
    """4 domains x 32 anchors (BalancedBatchSampler: 4 random class ids), 128-d codes (16-d in
    the Triton interpreter)."""
    ids = torch.randperm(100)[:4]
    domains = ids.repeat_interleave(32)
    if order == "shuffled":
        domains = domains[torch.randperm(128)]
    d = 16 if interpreted(backend) else 128
    z = torch.randn(128, d, dtype=f64)
    z_pos = z + 0.7 * torch.randn(128, d, dtype=f64)
    compare(backend, lambda z, z_pos: dcodr_official(z, z_pos, domains, tau),
            dcodr_op(domains, tau), dict(z=z, z_pos=z_pos), seed,
            f"DCoDR {order} tau={tau}")


# ------------------------------------------------------------------ IP-IRM + MixUp (i-Mix)
def imix_official(q, k, perm, lam, tau):
    """One (environment's) i-Mix loss of main_mixup.py and its IRM penalty: logits = mixed
    view-1 codes q x clean view-2 codes k / tau, scaled by a dummy of ones per key column;
    ``L = (lam * CE(S, i) + (1 - lam) * CE(S, perm(i))).mean()`` (CE with mean reduction,
    ``lam`` per sample); ``R = |dL/ds|^2`` (create_graph). Returns (L, R, dL/ds)."""
    n = q.shape[0]
    logits = q @ k.T / tau
    dummy = torch.ones(1, n, dtype=logits.dtype, requires_grad=True)
    scaled = logits * dummy
    labels = torch.arange(n)
    loss = (lam * F.cross_entropy(scaled, labels) + (1 - lam) * F.cross_entropy(scaled, perm))
    loss = loss.mean()
    (grad,) = torch.autograd.grad(loss, dummy, create_graph=True)
    return loss, (grad ** 2).sum(), grad[0]


def mixup_lambdas(n):
    """lam_i ~ Beta(1, 1), then max(lam_i, 1 - lam_i)."""
    lam = torch.distributions.Beta(1.0, 1.0).sample((n,)).to(f64)
    return torch.maximum(lam, 1 - lam)


def permutation_with_fixed_points(n, kind="fixed"):
    """A random permutation with a few fixed points (perm(i) = i), or the identity."""
    if kind == "identity":
        return torch.arange(n)
    perm = torch.randperm(n)
    for i in torch.randperm(n)[:max(1, n // 8)].tolist():
        j = int(torch.nonzero(perm == i)[0, 0])
        perm[i], perm[j] = i, int(perm[i])
    return perm


def imix_op(perm, lam_bar, tau):
    def op(q, k, backend):
        n = q.shape[0]
        loss, g = masked_contrastive_loss(
            q, k, positive_index=torch.stack([torch.arange(n), perm], 1),
            positive_weight=torch.tensor([lam_bar, 1 - lam_bar], dtype=f64),
            temperature=tau, key_penalty=True, backend=backend)
        _, penalty = key_group_penalty(g)
        return loss, penalty[0], g
    return op


def codes(n, d=128):
    return F.normalize(torch.randn(n, d, dtype=f64), dim=1)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", ["fixed", "identity"])
def test_imix_loss_and_key_column_penalty(backend, kind, seed):
    """The full-batch i-Mix loss (the --keep_cont term) with its per-key-column penalty; the
    penalty ingredient key_grads is the official dL/ds itself."""
    n, d, tau = (40, 16, 0.2) if interpreted(backend) else (96, 128, 0.2)
    perm = permutation_with_fixed_points(n, kind)
    assert (perm == torch.arange(n)).any()
    lam = mixup_lambdas(n)
    lam_bar = lam.mean().item()
    q, k = codes(n, d), codes(n, d)
    compare(backend, lambda q, k: imix_official(q, k, perm, lam, tau),
            imix_op(perm, lam_bar, tau), dict(q=q, k=k), seed, f"i-Mix {kind}")


def env_setup(n=64, envs=3):
    """Environment labels (scattered, plus one single-member environment), and per environment
    its indices, a permutation with fixed points and per-sample lambdas (the subset re-mixed)."""
    labels = torch.randint(0, envs, (n,))
    labels[:envs] = torch.arange(envs)                   # every environment is present
    labels[envs + int(torch.randint(0, n - envs, ()))] = envs    # and a one-sample one
    parts = []
    for e in range(envs + 1):
        idx = torch.nonzero(labels == e).flatten()
        parts.append((idx, permutation_with_fixed_points(len(idx)), mixup_lambdas(len(idx))))
    return labels, parts


def env_official(parts, tau):
    def official(q, k):
        out = [imix_official(q[idx], k[idx], perm, lam, tau) for idx, perm, lam in parts]
        return torch.stack([o[0] for o in out]), torch.stack([o[1] for o in out])
    return official


def env_op_grouped(labels, parts, tau):
    """All environments in one call: groups, global target columns, per-row target weights."""
    n = labels.shape[0]
    index = torch.empty(n, 2, dtype=torch.long)
    weight = torch.empty(n, 2, dtype=f64)
    for idx, perm, lam in parts:
        index[idx, 0], index[idx, 1] = idx, idx[perm]
        weight[idx] = torch.tensor([lam.mean().item(), 1 - lam.mean().item()], dtype=f64)

    def op(q, k, backend):
        losses, g = masked_contrastive_loss(
            q, k, positive_index=index, positive_weight=weight, query_groups=labels,
            key_groups=labels, temperature=tau, reduction="none", key_penalty=True,
            backend=backend)
        ids, penalties = key_group_penalty(g, labels)
        assert ids.tolist() == list(range(len(parts)))
        return torch.stack([losses[idx].mean() for idx, _, _ in parts]), penalties
    return op


def env_op_separate(parts, tau):
    """One call per environment."""
    def op(q, k, backend):
        out = [imix_op(perm, lam.mean().item(), tau)(q[idx], k[idx], backend)
               for idx, perm, lam in parts]
        return torch.stack([o[0] for o in out]), torch.stack([o[1] for o in out])
    return op


@pytest.mark.parametrize("backend", BACKENDS)
def test_imix_per_environment(backend, seed):
    """The minimisation step's per-environment losses L_k and penalties R_k (tau = 0.2): the
    environments as groups of one call, and one call per environment, both equal the official
    per-subset computation (a one-sample environment gives L = R = 0)."""
    tau, d = 0.2, 16 if interpreted(backend) else 128
    labels, parts = env_setup()
    q, k = codes(64, d), codes(64, d)
    leaves = dict(q=q, k=k)
    official = env_official(parts, tau)
    want, grouped, ups = compare(backend, official, env_op_grouped(labels, parts, tau), leaves,
                                 seed, "i-Mix environments as groups")
    _, separate, _ = compare(backend, official, env_op_separate(parts, tau), leaves, seed,
                             "i-Mix one call per environment", ups)
    dtype, tol = precision(backend)
    single = len(parts) - 1
    assert want["output 0"][single] == 0 and want["output 1"][single] == 0
    zero = 1e-12 if dtype == f64 else 1e-6       # fp32: the target weights sum to 1 - eps
    for name in ("output 0", "output 1"):
        assert grouped[name][single].abs() < zero, f"{name}: {grouped[name]} (seed {seed})"
    for name in want:
        err = relative_error(grouped[name], separate[name],
                             VALUE_FLOOR if name.startswith("output") else GRADIENT_FLOOR)
        assert err <= tol, f"grouped vs separate {name}: {err:.3e} (seed {seed})"
