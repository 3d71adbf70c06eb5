"""The shared glue of the fused backends (fastipirm/ops/fused.py): its closed-form cotangents
against ``torch.func.vjp`` of the glue itself, over every penalty variant and the edge cases."""
import pytest
import torch

from fastipirm.ops import EnvContrastiveSpec
from fastipirm.ops.fused import Setup, glue_cotangents, glue_g_acc, glue_out, glue_rc


def _weights(b, m, soft, case):
    w = torch.rand(b, m, dtype=torch.float64) if soft else \
        (torch.rand(b, m) < 0.5).double()
    if case == "empty":          # environment 0 has no member
        w[:, 0] = 0.0
    elif case == "one":          # environment 0 has a single member
        w[:, 0] = 0.0
        w[3, 0] = 1.0
    elif case == "equal":        # all-equal weights
        w[:] = 0.5 if soft else 1.0
    return w


def _statistics(n, m, penalty, temps):
    """Random kernel statistics and output cotangents for n rows and m environments."""
    t1, t2 = temps
    groups = 2 * m if "split" in penalty else m
    f64 = dict(dtype=torch.float64)
    spos = torch.randn(n, **f64) * 0.5
    mrow = spos + torch.rand(n, **f64) * 3.0        # mrow >= spos
    if t1 < 0.1:
        mrow[:4] = spos[:4] + 6.0   # rows whose positive is ~120 temperatures below the max
    zn = torch.rand(n, m, **f64) * 5.0
    zn[1] = 0.0                     # a row with no negative mass
    znt = torch.rand(n, m, **f64) * 5.0 if t1 != t2 else zn
    acc = torch.randn(Setup.nbands_of(penalty), n, groups, **f64)
    return (spos, mrow, zn, znt, acc, torch.randn(m, **f64), torch.randn(m, **f64),
            torch.randn(n, groups, **f64))


@pytest.mark.parametrize("penalty", ["slot", "scalar", "split", "scalar_split"])
@pytest.mark.parametrize("soft,nonorm", [(False, False), (True, False), (True, True)])
@pytest.mark.parametrize("case", ["random", "empty", "one", "equal"])
@pytest.mark.parametrize("temps", [(0.5, 0.5), (0.5, 0.2), (0.05, 0.05)])
def test_closed_form_cotangents_match_vjp(seed, penalty, soft, nonorm, case, temps):
    b, m = 13, 4
    n = 2 * b
    t1, t2 = temps
    w = _weights(b, m, soft, case)
    st = Setup(w, EnvContrastiveSpec(t1, t2, soft, penalty, nonorm))
    spos, mrow, zn, znt, acc, g_loss, g_pen, rho = _statistics(n, m, penalty, temps)

    def glue(zn_, znt_, spos_):
        znt_ = znt_ if t1 != t2 else zn_
        loss, pen, _ = glue_out(st, zn_, znt_, acc, spos_, mrow)
        return loss, pen, glue_rc(st, znt_, spos_, mrow)

    (_, _, rc), vjp_fn = torch.func.vjp(glue, zn, znt, spos)
    want_zn, want_znt, want_spos = vjp_fn((g_loss, g_pen, rho))
    g = glue_out(st, zn, znt, acc, spos, mrow)[2]
    got_zn, got_znt, got_spos, none = glue_cotangents(st, zn, znt, spos, mrow, g, rc, g_loss,
                                                      g_pen, rho)
    assert none is None
    if t1 == t2:
        got_zn, got_znt = got_zn + got_znt, torch.zeros_like(got_znt)
    for got, want in ((got_zn, want_zn), (got_znt, want_znt), (got_spos, want_spos)):
        assert torch.isfinite(got).all()
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9 * (1 + want.abs().max()))


@pytest.mark.parametrize("penalty", ["slot", "scalar", "split", "scalar_split"])
def test_closed_form_band_cotangent_matches_vjp(seed, penalty):
    b, m = 11, 3
    w = _weights(b, m, True, "random")
    st = Setup(w, EnvContrastiveSpec(0.5, 0.5, True, penalty))
    n, groups = 2 * b, st.group_weight.shape[1]
    spos = torch.randn(n, dtype=torch.float64)
    mrow = spos + 1.0
    zn = torch.rand(n, m, dtype=torch.float64)
    acc = torch.randn(st.nbands, n, groups, dtype=torch.float64)
    g_pen = torch.randn(m, dtype=torch.float64)
    _, vjp_fn = torch.func.vjp(lambda a: glue_out(st, zn, zn, a, spos, mrow)[:2], acc)
    (want,) = vjp_fn((torch.zeros(m, dtype=torch.float64), g_pen))
    g = glue_out(st, zn, zn, acc, spos, mrow)[2]
    torch.testing.assert_close(glue_g_acc(st, g, g_pen), want, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("penalty", ["slot", "scalar", "split", "scalar_split"])
@pytest.mark.parametrize("nonorm", [False, True])
@pytest.mark.parametrize("case", ["random", "empty", "one", "equal"])
@pytest.mark.parametrize("temps", [(0.5, 0.5), (0.5, 0.2), (0.05, 0.05)])
def test_closed_form_weight_gradient_matches_vjp(seed, penalty, nonorm, case, temps):
    """Soft weights being learnt: the closed form's weight gradient (through w2, kappa, the norms
    and the group weights) against the vjp of the glue with the weights' setup in its graph."""
    b, m = 13, 4
    n = 2 * b
    t1, t2 = temps
    w = _weights(b, m, True, case)
    if case == "one":
        w[5, 1] = 0.0                # and a row with zero weight in a non-empty environment
    spos, mrow, zn, znt, acc, g_loss, g_pen, rho = _statistics(n, m, penalty, temps)
    spec = EnvContrastiveSpec(t1, t2, True, penalty, nonorm)

    def glue(zn_, znt_, spos_, w_):
        st_ = Setup(w_, spec)
        znt_ = znt_ if t1 != t2 else zn_
        loss, pen, _ = glue_out(st_, zn_, znt_, acc, spos_, mrow)
        return loss, pen, glue_rc(st_, znt_, spos_, mrow)

    (_, _, rc), vjp_fn = torch.func.vjp(glue, zn, znt, spos, w)
    want = vjp_fn((g_loss, g_pen, rho))
    st = Setup(w, spec)
    g = glue_out(st, zn, znt, acc, spos, mrow)[2]
    got = list(glue_cotangents(st, zn, znt, spos, mrow, g, rc, g_loss, g_pen, rho, acc=acc))
    if t1 == t2:
        got[0], got[1] = got[0] + got[1], torch.zeros_like(got[1])
    for x, y in zip(got, want):
        assert torch.isfinite(x).all()
        torch.testing.assert_close(x, y, rtol=1e-9, atol=1e-9 * (1 + y.abs().max()))
