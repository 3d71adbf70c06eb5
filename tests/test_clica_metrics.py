"""CL-ICA disentanglement scores (fastipirm.eval.disentanglement) against literal numpy
references: closed-form least squares with an intercept column, R² = 1 - SS_res / SS_tot per
dimension, np.corrcoef and a brute-force assignment over all permutations."""
import itertools

import numpy as np
import pytest
import torch

from fastipirm.eval.disentanglement import (
    correlation_matrix,
    disentanglement_scores,
    linear_r2,
    mcc,
    scores_over_batches,
)


# ---------------------------------------------------------------- literal numpy references
def ref_r2(h, z):
    """Affine least squares (intercept column) fitted and scored on the same samples."""
    h = np.asarray(h, dtype=np.float64)
    z = np.asarray(z, dtype=np.float64)
    x = np.concatenate([h, np.ones((h.shape[0], 1))], axis=1)
    w, *_ = np.linalg.lstsq(x, z, rcond=None)
    pred = x @ w
    ss_res = ((z - pred) ** 2).sum(axis=0)
    ss_tot = ((z - z.mean(axis=0)) ** 2).sum(axis=0)
    return float(np.mean(1.0 - ss_res / ss_tot))


def ref_mcc(h, z):
    """|Pearson| between z-dims (rows) and h-dims (columns), best assignment by brute force."""
    h = np.asarray(h, dtype=np.float64)
    z = np.asarray(z, dtype=np.float64)
    n, m = z.shape[1], h.shape[1]
    absc = np.abs(np.corrcoef(z.T, h.T)[:n, n:])
    k = min(n, m)
    best = -1.0
    if n <= m:
        for cols in itertools.permutations(range(m), k):
            best = max(best, sum(absc[i, c] for i, c in enumerate(cols)))
    else:
        for rows in itertools.permutations(range(n), k):
            best = max(best, sum(absc[r, j] for j, r in enumerate(rows)))
    return best / n          # an unmatched z-dimension (m < n) counts as 0


def _gen(seed):
    g = torch.Generator().manual_seed(seed)
    return g


def _rand(g, *shape):
    return torch.randn(*shape, generator=g, dtype=torch.float64)


def _invertible(g, n):
    q, _ = torch.linalg.qr(_rand(g, n, n))
    scales = torch.rand(n, generator=g, dtype=torch.float64) * 2 + 0.5
    return q * scales  # orthogonal times positive column scales: well conditioned


# ---------------------------------------------------------------- agreement with references
@pytest.mark.parametrize("n,m", [(3, 3), (4, 6), (5, 2), (1, 3), (4, 1)])
def test_r2_matches_numpy_reference(seed, n, m):
    g = _gen(seed)
    z = _rand(g, 300, n)
    h = torch.tanh(z @ _rand(g, n, m)) + 0.3 * _rand(g, 300, m)
    got, want = linear_r2(h, z), ref_r2(h.numpy(), z.numpy())
    assert got == pytest.approx(want, abs=1e-10), f"seed={seed} n={n} m={m}: {got} vs {want}"


@pytest.mark.parametrize("n,m", [(3, 3), (5, 5), (3, 5), (5, 3), (1, 4), (4, 1)])
def test_mcc_matches_numpy_reference(seed, n, m):
    g = _gen(seed)
    z = _rand(g, 400, n)
    h = torch.tanh(z @ _rand(g, n, m)) + 0.5 * _rand(g, 400, m)
    got, want = mcc(h, z), ref_mcc(h.numpy(), z.numpy())
    assert got == pytest.approx(want, abs=1e-10), f"seed={seed} n={n} m={m}: {got} vs {want}"


def test_correlation_matrix_orientation(seed):
    g = _gen(seed)
    z, h = _rand(g, 200, 3), _rand(g, 200, 5)
    c = correlation_matrix(h, z)
    want = np.corrcoef(z.numpy().T, h.numpy().T)[:3, 3:]
    assert c.shape == (3, 5), f"seed={seed}"
    np.testing.assert_allclose(c.numpy(), want, atol=1e-12, err_msg=f"seed={seed}")


def test_float32_and_numpy_inputs(seed):
    g = _gen(seed)
    z = _rand(g, 256, 3)
    h = z @ _rand(g, 3, 4) + 0.2 * _rand(g, 256, 4)
    want_r2 = ref_r2(h.float().double().numpy(), z.float().double().numpy())
    assert linear_r2(h.float(), z.float()) == pytest.approx(want_r2, abs=1e-9), f"seed={seed}"
    assert mcc(h.numpy(), z.numpy()) == pytest.approx(mcc(h, z), abs=1e-12), f"seed={seed}"


# ---------------------------------------------------------------- properties
@pytest.mark.parametrize("n", [2, 5, 10])
def test_affine_map_gives_r2_one(seed, n):
    g = _gen(seed)
    z = _rand(g, 500, n)
    h = z @ _invertible(g, n).T + _rand(g, 1, n) * 3
    assert linear_r2(h, z) == pytest.approx(1.0, abs=1e-10), f"seed={seed}"


def test_r2_rank_deficient_h(seed):
    """Redundant h-columns (an exact copy and a constant column): the minimum-norm solution
    gives the same predictions as the full-rank fit."""
    g = _gen(seed)
    z = _rand(g, 300, 3)
    h = torch.tanh(z @ _invertible(g, 3)) + 0.1 * _rand(g, 300, 3)
    h_def = torch.cat([h, h[:, :1] * 2.0 - 1.0, torch.full((300, 1), 7.0)], dim=1)
    got = linear_r2(h_def, z)
    assert got == pytest.approx(ref_r2(h.numpy(), z.numpy()), abs=1e-9), f"seed={seed}"
    # more h-dimensions than samples: the fit interpolates, R² = 1
    zs, hs = _rand(g, 6, 2), _rand(g, 6, 9)
    assert linear_r2(hs, zs) == pytest.approx(1.0, abs=1e-9), f"seed={seed}"


def test_pinv_path_matches_gelsd(seed):
    """The non-CPU (pseudo-inverse) solver gives the gelsd solution, rank-deficient or not."""
    from fastipirm.eval.disentanglement import _min_norm_lstsq

    g = _gen(seed)
    a = _rand(g, 50, 4)
    a = torch.cat([a, a[:, :2] + a[:, 2:3]], dim=1)  # rank 4 of 6
    b = _rand(g, 50, 3)
    x1 = _min_norm_lstsq(a, b, use_pinv=False)
    x2 = _min_norm_lstsq(a, b, use_pinv=True)
    torch.testing.assert_close(x1, x2, atol=1e-9, rtol=1e-9, msg=f"seed={seed}")


@pytest.mark.parametrize("n", [2, 4, 6])
def test_permuted_signflipped_scaled_gives_mcc_one(seed, n):
    g = _gen(seed)
    z = _rand(g, 500, n)
    perm = torch.randperm(n, generator=g)
    signs = torch.where(torch.rand(n, generator=g) < 0.5, -1.0, 1.0).double()
    scales = torch.rand(n, generator=g, dtype=torch.float64) * 5 + 0.1
    h = z[:, perm] * signs * scales + _rand(g, 1, n)
    assert mcc(h, z) == pytest.approx(1.0, abs=1e-12), f"seed={seed}"
    assert linear_r2(h, z) == pytest.approx(1.0, abs=1e-10), f"seed={seed}"


def test_rotation_mixing_lowers_mcc_not_r2(seed):
    g = _gen(seed)
    z = torch.rand(2000, 2, generator=g, dtype=torch.float64)  # independent uniforms
    c, s = np.cos(np.pi / 4), np.sin(np.pi / 4)
    rot = torch.tensor([[c, -s], [s, c]], dtype=torch.float64)
    h = z @ rot.T
    assert mcc(h, z) < 0.9, f"seed={seed}: {mcc(h, z)}"  # |corr| = cos(45°) ≈ 0.707
    assert mcc(h, z) == pytest.approx(ref_mcc(h.numpy(), z.numpy()), abs=1e-12), f"seed={seed}"
    assert linear_r2(h, z) == pytest.approx(1.0, abs=1e-10), f"seed={seed}"


def test_independent_noise_scores_near_zero(seed):
    g = _gen(seed)
    z, h = _rand(g, 20000, 3), _rand(g, 20000, 3)
    r2 = linear_r2(h, z)
    assert -1e-12 <= r2 < 0.005, f"seed={seed}: R² {r2}"  # in-sample fit: ≈ m / N ≥ 0
    assert mcc(h, z) < 0.05, f"seed={seed}: MCC {mcc(h, z)}"


def test_constant_dimensions(seed):
    g = _gen(seed)
    z = _rand(g, 300, 3)
    h = z @ _invertible(g, 3).T
    # a constant z-dimension: fitted exactly by the intercept -> R² 1.0 (sklearn's convention)
    for value in (0.0, 0.1, -3.7):
        z_c = torch.cat([z[:, :2], torch.full((300, 1), value, dtype=torch.float64)], dim=1)
        got = linear_r2(h, z_c)
        assert got == pytest.approx(1.0, abs=1e-10), f"seed={seed} value={value}: {got}"
        # ... and, in MCC, correlation 0 (NaN in np.corrcoef)
        m = mcc(h[:, :2], z_c)
        assert np.isfinite(m), f"seed={seed}"
        # (the constant third z-dimension counts 0 in the mean over the 3 z-dimensions)
        want = ref_mcc(h[:, :2].numpy(), z_c[:, :2].numpy()) * 2 / 3
        assert m == pytest.approx(want, abs=1e-12)
    # the constant z-dimension's R² of 1.0 enters the uniform average
    z_noise = torch.cat([_rand(g, 300, 1), torch.full((300, 1), 2.5, dtype=torch.float64)], 1)
    h_noise = _rand(g, 300, 2)
    want = (ref_r2(h_noise.numpy(), z_noise[:, :1].numpy()) + 1.0) / 2
    assert linear_r2(h_noise, z_noise) == pytest.approx(want, abs=1e-10), f"seed={seed}"
    # a constant h-dimension carries nothing: it is matched with correlation 0
    h_c = torch.cat([z[:, :1], torch.full((300, 1), 4.0, dtype=torch.float64)], dim=1)
    assert mcc(h_c, z[:, :2]) == pytest.approx(0.5, abs=1e-12), f"seed={seed}"
    # one h-dimension for two true latents: the unmatched one counts 0
    assert mcc(h_c[:, :1], z[:, :2]) == pytest.approx(0.5, abs=1e-12), f"seed={seed}"
    # all constant
    const = torch.ones(10, 2, dtype=torch.float64)
    assert linear_r2(const, const) == 1.0
    assert mcc(const, const) == 0.0


# ---------------------------------------------------------------- input validation
@pytest.mark.parametrize("fn", [linear_r2, mcc, disentanglement_scores])
def test_bad_inputs_raise(fn):
    z = torch.randn(10, 3)
    with pytest.raises(ValueError, match="2-D"):
        fn(torch.randn(10), z)
    with pytest.raises(ValueError, match="2-D"):
        fn(torch.randn(10, 3), torch.randn(10, 3, 1))
    with pytest.raises(ValueError, match="same number of samples"):
        fn(torch.randn(9, 3), z)
    with pytest.raises(ValueError, match="N >= 2"):
        fn(torch.randn(1, 3), torch.randn(1, 3))
    with pytest.raises(ValueError, match="at least one dimension"):
        fn(torch.randn(10, 0), z)
    bad = z.clone()
    bad[3, 1] = float("nan")
    with pytest.raises(ValueError, match="z contains non-finite"):
        fn(torch.randn(10, 3), bad)
    bad[3, 1] = float("inf")
    with pytest.raises(ValueError, match="h contains non-finite"):
        fn(bad, z)
    with pytest.raises(ValueError, match="real-valued"):
        fn(torch.randn(10, 3, dtype=torch.complex64), z)


# ---------------------------------------------------------------- mean / std over batches
def test_scores_over_batches_match_numpy(seed):
    g = _gen(seed)
    batches = []
    for _ in range(7):
        z = _rand(g, 200, 3)
        h = torch.tanh(z @ _rand(g, 3, 3)) + 0.3 * _rand(g, 200, 3)
        batches.append((h, z))
    it = iter(batches)
    out = scores_over_batches(lambda: next(it), n_batches=7)
    r2s = [ref_r2(h.numpy(), z.numpy()) for h, z in batches]
    mccs = [ref_mcc(h.numpy(), z.numpy()) for h, z in batches]
    msg = f"seed={seed}"
    assert out["n_batches"] == 7
    assert out["r2_mean"] == pytest.approx(np.mean(r2s), abs=1e-10), msg
    assert out["r2_std"] == pytest.approx(np.std(r2s), abs=1e-10), msg  # ddof = 0
    assert out["mcc_mean"] == pytest.approx(np.mean(mccs), abs=1e-10), msg
    assert out["mcc_std"] == pytest.approx(np.std(mccs), abs=1e-10), msg
    np.testing.assert_allclose(out["r2_values"], r2s, atol=1e-10, err_msg=msg)
    np.testing.assert_allclose(out["mcc_values"], mccs, atol=1e-10, err_msg=msg)
    one = disentanglement_scores(*batches[0])
    assert one["r2"] == pytest.approx(r2s[0], abs=1e-10) and one["mcc"] == pytest.approx(mccs[0])


def test_scores_over_batches_single_batch_and_errors():
    z = torch.randn(50, 2)
    out = scores_over_batches(lambda: (z * 2, z), n_batches=1)
    assert out["r2_std"] == 0.0 and out["mcc_std"] == 0.0
    assert out["r2_mean"] == pytest.approx(1.0) and out["mcc_mean"] == pytest.approx(1.0)
    for bad in (0, -1, 2.0, True):
        with pytest.raises(ValueError, match="n_batches"):
            scores_over_batches(lambda: (z, z), n_batches=bad)
    with pytest.raises(ValueError, match="callable"):
        scores_over_batches(None, n_batches=2)
    with pytest.raises(ValueError, match="pair"):
        scores_over_batches(lambda: z, n_batches=2)
