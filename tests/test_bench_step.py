"""Step and maximisation benchmarks: the official-style baselines compute fastipirm's mathematics,
the trainer's step is the inline step it replaced, and both benchmarks run end to end on a CPU."""
import argparse
import copy

import pytest
import torch
import torch.nn.functional as F

from bench import maximize as bmax
from bench import step as bstep
from bench.official_step import OfficialStep, train_env_loss
from fastipirm.config import Config
from fastipirm.losses import maximization_objective, memberships_from_logits, minimization_loss
from fastipirm.methods import MethodContext, TrainStep, build_method
from fastipirm.models import SimCLRModel

pytestmark = pytest.mark.usefixtures("one_thread")


def _splits(n, p, indices, seed=0):
    """``p`` random (N, 2) partition logits whose environments are all non-empty in the batch."""
    g = torch.Generator().manual_seed(seed)
    out = []
    while len(out) < p:
        s = torch.randn(n, 2, generator=g, dtype=torch.float64)
        counts = torch.bincount(s[indices].argmax(1), minlength=2)
        if bool((counts >= 2).all()):
            out.append(s)
    return out


def _features(b, d, seed):
    g = torch.Generator().manual_seed(seed)
    return (F.normalize(torch.randn(b, d, generator=g, dtype=torch.float64), dim=1),
            F.normalize(torch.randn(b, d, generator=g, dtype=torch.float64), dim=1))


@pytest.mark.parametrize("penalty_weight,keep_cont", [(0.2, True), (2.0, True), (0.2, False)])
def test_official_loss_equals_minimization_loss(penalty_weight, keep_cont):
    z1, z2 = _features(12, 8, 0)
    indices = torch.randperm(20, generator=torch.Generator().manual_seed(1))[:12]
    splits = _splits(20, 3, indices)
    loss, parts = train_env_loss(z1, z2, indices, splits, temperature=0.5, irm_temperature=0.3,
                                 penalty_weight=penalty_weight, keep_cont=keep_cont)
    ref, ref_parts = minimization_loss(
        z1, z2, memberships_from_logits(torch.stack(splits), indices), temperature=0.5,
        irm_temperature=0.3, penalty_weight=penalty_weight, keep_cont=keep_cont)
    assert loss.dtype == torch.float64
    torch.testing.assert_close(loss, ref, rtol=1e-10, atol=1e-12)
    for key in ("loss_global", "loss_env", "penalty"):
        torch.testing.assert_close(parts[key], ref_parts[key], rtol=1e-10, atol=1e-12)
    assert float(parts["penalty"]) > 0


def _tiny_model():
    torch.manual_seed(0)
    return SimCLRModel("resnet18", feature_dim=8, width=2, hidden_dim=8).double()


def test_official_step_gradients_equal_minimization_loss_in_float64():
    """Same weights, same batch: the official step's loss, parameter gradients and Adam step
    equal those of fastipirm's ``minimization_loss`` (fp64; the trainer's step runs the loss in
    fp32, see ``test_train_step_is_the_inline_step_it_replaced``)."""
    a = _tiny_model()
    b = copy.deepcopy(a)
    g = torch.Generator().manual_seed(3)
    x1 = torch.randn(10, 3, 8, 8, generator=g, dtype=torch.float64)
    x2 = torch.randn(10, 3, 8, 8, generator=g, dtype=torch.float64)
    indices = torch.arange(10) * 2
    splits = _splits(20, 2, indices, seed=4)
    opt_a = torch.optim.Adam(a.parameters(), lr=1e-3, weight_decay=1e-6)
    official = OfficialStep(a, opt_a, splits, device="cpu", temperature=0.5,
                            irm_temperature=0.3, penalty_weight=0.2)
    loss_a = official(x1, x2, indices)
    opt_b = torch.optim.Adam(b.parameters(), lr=1e-3, weight_decay=1e-6)
    loss_b, parts = minimization_loss(
        b(x1)[1], b(x2)[1], memberships_from_logits(torch.stack(splits), indices),
        temperature=0.5, irm_temperature=0.3, penalty_weight=0.2, keep_cont=True)
    opt_b.zero_grad()
    loss_b.backward()
    opt_b.step()
    assert isinstance(loss_a, float) and loss_b.dtype == torch.float64
    assert loss_a == pytest.approx(loss_b.item(), rel=1e-12)
    assert float(official.last_parts["penalty"]) == pytest.approx(float(parts["penalty"]),
                                                                  rel=1e-10)
    for (name, pa), pb in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(pa.grad, pb.grad, rtol=1e-8, atol=1e-12, msg=name)
        torch.testing.assert_close(pa, pb, rtol=1e-10, atol=1e-12, msg=name)
    for (name, ba), bb in zip(a.named_buffers(), b.buffers()):      # BN saw the same batches
        torch.testing.assert_close(ba, bb, rtol=1e-10, atol=1e-12, msg=name)


def test_official_maximisation_objective_equals_fastipirm():
    """``official_objective`` (the official per-environment loop) = ``maximization_objective``,
    value and gradient w.r.t. the partition logits (fp64 features; ``maximization_objective``
    takes the softmax of the logits in fp32, hence the 1e-6 bounds)."""
    z1, z2 = _features(9, 6, 5)
    theta = torch.randn(9, 2, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    ta, tb = theta.clone().requires_grad_(), theta.clone().requires_grad_()
    risk, logged = bmax.official_objective(z1, z2, ta, temperature=0.5, irm_temperature=0.3,
                                           irm_weight=0.5)
    ref, parts = maximization_objective(z1, z2, tb, temperature=0.5, irm_temperature=0.3,
                                        irm_weight=0.5, constrain=True, constrain_relax=True)
    torch.testing.assert_close(risk, ref.to(risk.dtype), rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(-logged[2], parts["penalty"].to(risk.dtype), rtol=1e-6,
                               atol=1e-7)
    risk.backward()
    ref.backward()
    torch.testing.assert_close(ta.grad, tb.grad.to(ta.dtype), rtol=1e-5, atol=1e-7)


def test_official_auto_split_stop_rule_and_steps():
    z1, z2 = _features(40, 6, 7)
    init = torch.randn(40, 2, generator=torch.Generator().manual_seed(8))
    res = bmax.official_auto_split(z1.float(), z2.float(), init, device="cpu", batch_size=16,
                                   workers=0, min_epochs=1, patience=10**9, max_epochs=2)
    assert res["epochs_run"] == 3 and res["adam_steps"] == 3 * 3      # 16 + 16 + 8 per epoch
    assert res["logits"].shape == (40, 2) and len(res["history"]) == 3
    assert res["history"][res["best_epoch"]] == min(res["history"])


def test_train_step_is_the_inline_step_it_replaced():
    """The IP-IRM method's step (``build_method("ipirm", ...)``, a ``TrainStep``) = forward per
    view, one ``minimization_loss``, backward, Adam: bit for bit."""
    torch.manual_seed(0)
    a = SimCLRModel("resnet18", feature_dim=8, width=2, hidden_dim=8)
    b = copy.deepcopy(a)
    g = torch.Generator().manual_seed(1)
    v1, v2 = torch.randn(2, 8, 3, 8, 8, generator=g)
    indices = torch.arange(8)
    partitions = torch.randn(2, 8, 2, generator=g)
    opt_a = torch.optim.Adam(a.parameters(), lr=1e-3, weight_decay=1e-6)
    z1, z2 = a(v1)[1], a(v2)[1]
    ref, ref_parts = minimization_loss(z1, z2, memberships_from_logits(partitions, indices),
                                       temperature=0.5, irm_temperature=0.5,
                                       penalty_weight=0.2, keep_cont=True, check_values=False)
    opt_a.zero_grad(set_to_none=True)
    ref.backward()
    opt_a.step()
    opt_b = torch.optim.Adam(b.parameters(), lr=1e-3, weight_decay=1e-6)
    cfg = Config()
    cfg.model.channels_last = False
    method = build_method("ipirm", MethodContext(cfg, b, opt_b, torch.device("cpu")))
    step = method.train_step
    assert isinstance(step, TrainStep) and not step.scaler.is_enabled()
    method.partitions, method.penalty_weight = partitions, 0.2
    loss, parts = method.step(indices, v1, v2)
    assert torch.equal(loss, ref.detach()) and not loss.requires_grad
    assert torch.equal(parts["penalty"], ref_parts["penalty"])
    for pa, pb in zip(a.parameters(), b.parameters()):
        assert torch.equal(pa, pb)
    method.partitions = None
    simclr, simclr_parts = method.step(indices, v1, v2)           # plain SimCLR step
    assert float(simclr_parts["penalty"]) == 0.0 and float(simclr) > 0


def _parse(module, argv):
    ap = argparse.ArgumentParser()
    module.add_arguments(ap)
    return ap.parse_args(argv)


# batch 16: an empty environment (which the official step does not guard) has odds 2^-15
STEP_TINY = ["--device", "cpu", "--archs", "resnet18", "--width", "2", "--batch", "16",
             "--num-images", "48", "--source-size", "24", "--partitions", "1", "2",
             "--workers", "0", "--warmup", "1", "--repeats", "2"]


MAX_TINY = ["--device", "cpu", "--num-samples", "40", "--feature-batch", "16",
            "--extract-batch", "16", "--epochs", "2", "--width", "2", "--source-size", "24",
            "--workers", "0"]


@pytest.fixture(scope="module")
def step_record():
    return bstep.run(_parse(bstep, STEP_TINY + ["--variants", "official", "fastipirm", "simclr"]))


@pytest.fixture(scope="module")
def maximize_record():
    return bmax.run(_parse(bmax, MAX_TINY))


def test_step_benchmark_runs_on_cpu(step_record):
    record = step_record
    assert record["benchmark"] == "step" and record["device"] == "cpu"
    assert "not GPU figures" in record["figures"] and record["pipeline"] == "torch"
    kinds = [(r["variant"], r["partitions"]) for r in record["rows"]]
    assert kinds == [("official", 1), ("official", 2), ("fastipirm", 1), ("fastipirm", 2),
                     ("simclr", 0)]
    for r in record["rows"]:
        assert r["images_per_s"] > 0 and r["step_images_per_s"] > 0, r
        assert r["ms"] > 0 and r["step_ms"] > 0
    assert [(q["arch"], q["partitions"]) for q in record["ratios"]] == [("resnet18", 1),
                                                                        ("resnet18", 2)]
    for q in record["ratios"]:
        for key in ("fastipirm_vs_official", "fastipirm_vs_official_step_only",
                    "ipirm_overhead", "ipirm_overhead_with_data"):
            assert q[key] > 0, key
    assert "IP-IRM/SimCLR" in bstep.format_table(record)


def test_step_benchmark_reports_a_failed_compile(monkeypatch):
    import fastipirm.methods.base as trainmod

    def broken(fn, **kw):
        def call(*a, **k):
            raise RuntimeError("no C++ compiler found\nmore detail")
        return call

    monkeypatch.setattr(trainmod.torch, "compile", broken)
    record = bstep.run(_parse(bstep, STEP_TINY + ["--variants", "compiled", "--partitions", "1"]))
    (row,) = record["rows"]
    assert row["variant"] == "compiled" and row["images_per_s"] is None
    assert row["error"] == "torch.compile failed: RuntimeError: no C++ compiler found"
    assert "no C++ compiler" in bstep.format_table(record)


def test_step_benchmark_rejects_bad_options():
    with pytest.raises(ValueError, match="--batch 64 exceeds --num-images 48"):
        bstep.run(_parse(bstep, STEP_TINY + ["--batch", "64"]))



def test_maximize_benchmark_runs_on_cpu(maximize_record):
    record = maximize_record
    assert "official / fastipirm" in bmax.format_table(record)
    assert record["benchmark"] == "maximize" and "not GPU figures" in record["figures"]
    fast, off = record["rows"]
    assert (fast["impl"], off["impl"]) == ("fastipirm", "official")
    for r in (fast, off):
        assert r["extract_s"] > 0 and r["optimize_s"] > 0 and r["n"] == 40
        assert r["seconds"] == pytest.approx(r["extract_s"] + r["optimize_s"])
        assert r["epochs_run"] == 2 and r["adam_steps"] == 2 * 3
    q = record["ratios"]
    assert q["same_epochs"] and q["same_adam_steps"] and q["total"] > 0 and q["optimize"] > 0


def test_maximize_official_epochs_are_scaled_to_the_compared_count():
    record = bmax.run(_parse(bmax, MAX_TINY + ["--epochs", "3", "--official-epochs", "1"]))
    fast, off = record["rows"]
    assert fast["epochs_run"] == off["epochs_run"] == 3 and off["extrapolated_from_epochs"] == 1
    assert off["adam_steps"] == fast["adam_steps"] == 9
    assert off["optimize_s"] == pytest.approx(3 * off["seconds_per_epoch"])
    assert "scaled from 1 timed epochs" in bmax.format_table(record)


def test_records_feed_the_suite_estimate_and_the_baseline_figures(step_record, maximize_record):
    """The keys ``bench.suite`` and ``bench.baselines`` read from step and maximize records."""
    from bench import baselines, suite

    figs = baselines.figures(step_record)
    assert figs["step/resnet18/P=2/fastipirm_over_official"]["value"] > 0
    assert figs["step/resnet18/P=2/ipirm_over_simclr_time"]["higher_is_better"] is False
    figs = baselines.figures(maximize_record)
    assert figs["maximize/fastipirm_seconds"]["value"] == maximize_record["rows"][0]["seconds"]
    assert figs["maximize/fastipirm_over_official"]["value"] > 0
    est = suite.estimate(step_record, maximize_record)
    assert est["hours"] > 0 and est["maximize_measured"]["n"] == 40
    assert est["status"].startswith("ok, but NOT the official setting")
