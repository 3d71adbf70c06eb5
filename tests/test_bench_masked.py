"""The masked-op benchmark (``python -m bench masked``): its official constructions equal the op
(float64, losses and gradients), a tiny run end to end with its record, the CL-ICA CPU targets
of ``bench/targets.py``."""
import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from bench import baselines, masked, targets
from bench import cli as bcli
from fastipirm.ops import masked_contrastive_loss

ROOT = Path(__file__).resolve().parent.parent
F64 = torch.float64
# a tiny run: every form, the torch backend, one thread (a loaded 2-core machine makes OpenMP
# teams wait), few calls
TINY = ["--small", "--clica-batch", "48", "--backend", "torch", "--repeats", "2", "--warmup", "0",
        "--sets", "2", "--threads", "1"]


def _args(argv):
    ap = argparse.ArgumentParser(conflict_handler="resolve")
    masked.add_arguments(ap)
    return ap.parse_args(argv)


def _case(form, variant="", **params):
    base = {"clica": {"batch": 48, "dim": 10, "tau": 1.0},
            "dcodr": {**masked.DCODR, "per_domain": 8, "dim": 16},
            "mixup": {**masked.MIXUP, "batch": 32, "dim": 16}}[form]
    params = {**base, **params}
    if form == "dcodr":
        params["batch"] = params["domains"] * params["per_domain"]
    return {"form": form, "variant": variant, "params": params}


def _loss_and_grads(case, impl, x, backend=None):
    for t in x["leaves"]:
        t.grad = None
    loss = masked.loss_fn(case, impl, backend)(x)
    loss.backward()
    grads = [t.grad.clone() for t in x["leaves"]]
    for t in x["leaves"]:
        t.grad = None
    return loss.detach(), grads


def _ours_backends():
    """The torch kernel set, and the C++ one where it is built (the Triton interpreter has its
    own tests)."""
    from fastipirm.ops.backends import MASKED

    return ["torch"] + [b for b in ("cpu",) if b in MASKED.available("cpu")]


def _assert_same(case, impls, seed=0):
    """Loss and gradients of every implementation in ``impls`` (``ours``: on every CPU
    backend) equal the official construction's, float64."""
    x = masked.make_inputs(case, F64, "cpu", seed)
    ref_loss, ref_grads = _loss_and_grads(case, masked.OFFICIAL, x)
    assert torch.isfinite(ref_loss) and all(torch.isfinite(g).all() for g in ref_grads)
    runs = [(impl, b) for impl in impls
            for b in (_ours_backends() if impl == masked.OURS else [None])]
    for impl, backend in runs:
        loss, grads = _loss_and_grads(case, impl, x, backend)
        torch.testing.assert_close(loss, ref_loss, rtol=1e-10, atol=1e-12,
                                   msg=lambda m: f"{impl} {backend}: {m}")
        for g, ref in zip(grads, ref_grads):
            torch.testing.assert_close(g, ref, rtol=1e-8, atol=1e-11,
                                       msg=lambda m: f"{impl} {backend} gradient: {m}")


# ---------------------------------------------------------------------------------------------
# the official constructions equal the op (float64)


@pytest.mark.parametrize("variant", list(masked.CLICA))
@pytest.mark.parametrize("tau", [1.0, 0.5])
def test_clica_official_equals_the_op(variant, tau):
    _assert_same(_case("clica", variant, tau=tau), [masked.OURS])


def test_clica_official_is_the_written_formula():
    """The official construction against the CL-ICA line of the spec (section 0), by hand."""
    x = masked.make_inputs(_case("clica", "l3", batch=12), F64, "cpu", 3)
    h, hp = x["h"].detach(), x["h_pos"].detach()
    pos = ((h - hp).abs() ** 3).sum(1)
    total = 0.0
    for i in range(h.shape[0]):
        neg = [float(((h[i] - h[j]).abs() ** 3).sum()) for j in range(h.shape[0])]   # self too
        total += float(pos[i]) + np.log(np.exp(-float(pos[i])) + np.exp(-np.array(neg)).sum())
    got = masked.clica_official(h, hp, 3, 1.0)
    assert float(got) == pytest.approx(total / h.shape[0], rel=1e-12)


@pytest.mark.parametrize("per_domain,dim", [(8, 16), (32, 128)])
def test_dcodr_official_and_dense_equal_the_op(per_domain, dim):
    _assert_same(_case("dcodr", per_domain=per_domain, dim=dim),
                 [masked.DENSE, masked.OURS])


def test_dcodr_official_is_deterministic_given_the_batch():
    """All same-domain others are drawn (31 < 64): the random order does not change the loss."""
    x = masked.make_inputs(_case("dcodr", per_domain=32, dim=128), F64, "cpu", 1)
    args = (x["z"], x["z_aug"], x["domains_np"], 0.2, 64)
    a = masked.dcodr_official(*args, np.random.RandomState(0)).detach()
    b = masked.dcodr_official(*args, np.random.RandomState(123)).detach()
    assert a.item() == pytest.approx(b.item(), rel=1e-13)
    assert x["domains_np"].tolist()[:32] == [x["domains_np"][0]] * 32       # contiguous blocks


@pytest.mark.parametrize("envs,batch", [(2, 32), (3, 30)])
def test_mixup_official_equals_the_op(envs, batch):
    _assert_same(_case("mixup", envs=envs, batch=batch), [masked.OURS], seed=envs)


def test_mixup_official_penalty_matches_the_ops_key_penalty():
    """The penalty alone: the official dummy-scale gradients against ``key_grads``."""
    from fastipirm.ops import key_group_penalty

    case = _case("mixup", penalty_weight=1.0)
    x = masked.make_inputs(case, F64, "cpu", 5)
    no_pen = dict(case, params={**case["params"], "penalty_weight": 0.0})
    full = masked.loss_fn(case, masked.OFFICIAL)(x)
    loss_only = masked.loss_fn(no_pen, masked.OFFICIAL)(x)
    _, key_grads = masked_contrastive_loss(
        x["queries"], x["keys"], positive_index=x["positive_index"],
        positive_weight=x["positive_weight"], query_groups=x["query_groups"],
        key_groups=x["envs"], temperature=case["params"]["tau"], reduction="none",
        key_penalty=True)
    _, pens = key_group_penalty(key_grads, x["envs"])
    torch.testing.assert_close(full - loss_only, pens.mean(), rtol=1e-10, atol=1e-14)


# ---------------------------------------------------------------------------------------------
# the benchmark end to end


def test_tiny_run_end_to_end_with_its_record(tmp_path, capsys):
    threads = torch.get_num_threads()
    started = time.perf_counter()
    assert bcli.main(["masked", *TINY, "--results-dir", str(tmp_path)]) == 0
    elapsed = time.perf_counter() - started
    assert torch.get_num_threads() == threads
    assert elapsed < 30, f"the tiny run took {elapsed:.1f} s"
    out = capsys.readouterr().out
    (path,) = tmp_path.glob("masked_*.json")
    record = json.loads(path.read_text())
    assert record["benchmark"] == "masked" and record["device"] == "cpu"
    assert record["git_commit"] and record["command"] and record["dtype"] == "fp32"
    assert "fresh process" in record["memory"] and record["threads"] == 1
    assert record["backends"]["torch"] == "ok" and record["settings"]["device"] == "cpu"
    rows = record["rows"]
    assert {r["case"].split("/")[0] for r in rows} == {
        "clica-l1", "clica-l2sq", "clica-l3", "dcodr", "mixup"}
    assert len(rows) == 3 * 2 + 3 + 2                     # official + ours; dcodr also dense
    for r in rows:
        assert r["status"] == "ok", r
        for field in ("form", "case", "size", "batch", "implementation", "backend", "median_ms",
                      "p20_ms", "p80_ms", "peak_mib", "time_over_official",
                      "memory_over_official", "loss", "loss_rel_diff"):
            assert field in r, (field, r)
        assert r["p20_ms"] <= r["median_ms"] <= r["p80_ms"]
        assert r["peak_mib"] is not None and r["peak_mib"] >= 0
        assert r["loss_rel_diff"] < 1e-4
    by = {(r["case"], r["implementation"]): r for r in rows}
    off, ours = by[("clica-l1/B=48/n=10", "official")], by[("clica-l1/B=48/n=10", "ours")]
    assert ours["size"] == "B=48/n=10" and ours["backend"] == "torch"
    assert off["time_over_official"] == 1.0 and off["loss_rel_diff"] == 0.0
    assert ours["time_over_official"] == pytest.approx(ours["median_ms"] / off["median_ms"])
    assert {r["implementation"] for r in rows if r["form"] == "dcodr"} == {
        "official", "dense-masked", "ours"}
    figs = baselines.figures(record)
    key = "masked/clica-l1/B=48/n=10/fp32/ours-torch/time_over_official"
    assert figs[key] == {"value": ours["time_over_official"], "higher_is_better": False}
    assert "masked/mixup/B=32/D=16/envs=2/fp32/official/median_ms" in figs
    lines = out.splitlines()
    assert lines[0].startswith("masked_contrastive_loss fwd+bwd") and "wrote" in lines[-1]
    assert sum(line.endswith("  ok") for line in lines) == len(rows)


def test_threads_restored_and_memory_optional():
    before = torch.get_num_threads()
    record = masked.run(_args(["--small", "--forms", "clica", "--similarity", "l2sq",
                               "--clica-batch", "16", "--backend", "torch", "--repeats", "1",
                               "--warmup", "0", "--sets", "1", "--threads", "1",
                               "--memory", "none"]))
    assert torch.get_num_threads() == before
    assert [r["implementation"] for r in record["rows"]] == ["official", "ours"]
    assert all(r["peak_mib"] is None and r["memory_over_official"] is None
               for r in record["rows"])
    assert record["memory"].startswith("not measured")


def test_bad_options_and_unavailable_backends(monkeypatch):
    from fastipirm.ops import backends

    with pytest.raises(ValueError, match="unknown backend"):
        masked.run(_args(["--small", "--backend", "nope"]))
    with pytest.raises(ValueError, match="--small runs on the CPU"):
        masked.run(_args(["--small", "--device", "cuda"]))

    def broken():
        raise RuntimeError("not built here")

    monkeypatch.setitem(backends.MASKED.backends, "broken",
                        backends.Backend("broken", ("cpu",), broken))
    record = masked.run(_args(["--small", "--forms", "dcodr", "--backend", "torch", "broken",
                               "cuda", "--repeats", "1", "--warmup", "0", "--sets", "1",
                               "--threads", "1", "--memory", "none"]))
    status = {(r["implementation"], r["backend"]): r["status"] for r in record["rows"]}
    assert status[("ours", "torch")] == "ok" and "not built here" in status[("ours", "broken")]
    assert status[("ours", "cuda")] == "does not run on cpu"
    assert "not built here" in record["backends"]["broken"]
    table = masked.format_table(record)
    assert "not built here" in table and "does not run on cpu" in table


def test_default_sizes():
    cpu = masked._cases(_args([]), cuda=False)
    assert [c["params"]["batch"] for c in cpu if c["variant"] == "l1"] == [1024, 4096]
    large = masked._cases(_args(["--large"]), cuda=False)
    assert [c["params"]["batch"] for c in large if c["variant"] == "l1"] == [1024, 4096, 6144]
    gpu = masked._cases(_args([]), cuda=True)
    assert [c["params"]["batch"] for c in gpu if c["variant"] == "l1"] == [1024, 4096, 6144]
    assert {c["params"]["dim"] for c in gpu if c["form"] == "clica"} == {10}
    (dcodr,) = [c for c in gpu if c["form"] == "dcodr"]
    assert masked.case_key(dcodr) == "dcodr/B=128/D=128/domains=4"
    assert dcodr["params"]["tau"] == 0.2 and dcodr["params"]["negs"] == 64
    (mixup,) = [c for c in gpu if c["form"] == "mixup"]
    assert masked.case_key(mixup) == "mixup/B=256/D=128/envs=2"


def test_help_from_the_repository_root():
    run = subprocess.run([sys.executable, "-m", "bench", "masked", "--help"], cwd=ROOT,
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    assert "usage: python -m bench masked" in run.stdout
    for option in ("--small", "--large", "--forms", "--backend", "--memory", "--no-save",
                   "--plot", "--compare"):
        assert option in run.stdout


# ---------------------------------------------------------------------------------------------
# the targets of bench/targets.py


def _row(impl, backend, ms, peak, case="clica-l1/B=4096/n=10"):
    return {"case": case, "form": "clica", "variant": "l1", "batch": 4096, "dim": 10,
            "implementation": impl, "backend": backend, "dtype": "fp32", "status": "ok",
            "median_ms": ms, "p20_ms": ms, "p80_ms": ms, "peak_mib": peak, "loss": 1.0}


def _record(rows, device="cpu"):
    rows = [dict(r) for r in rows]
    masked._add_ratios(rows, "fp32")
    return {"benchmark": "masked", "device": device, "dtype": "fp32", "repeats": 7, "warmup": 1,
            "sets": 3, "threads": 2, "timing": "time.perf_counter", "memory": "rss",
            "backends": {"torch": "ok", "cpu": "ok"}, "settings": {"device": device},
            "rows": rows}


def test_the_clica_cpu_targets_are_read_from_bench_targets():
    spec = targets.MASKED_CLICA
    row = _row("ours", spec["backend"], 1.0, 1.0, case=spec["case"])
    keys = {masked.figure_key(row, m): m for m in ("memory_over_official", "time_over_official")}
    for key, metric in keys.items():
        t = targets.TARGETS[key]
        assert t.machine == "cpu" and t.requires == {"device": "cpu"}
        assert t.bound == {"max": spec["memory_max" if metric.startswith("memory")
                                   else "time_max"]}
    assert spec["memory_max"] == pytest.approx(1 / 20) and spec["time_max"] == 0.5
    assert set(keys) <= set(targets.bounds("cpu"))

    official = _row("official", "torch", 1000.0, 2000.0)
    good = _record([official, _row("ours", "torch", 600.0, 50.0),
                    _row("ours", "cpu", 400.0, 80.0)])
    assert sorted((k, met) for k, _, met in targets.check(good)) == sorted(
        (k, True) for k in keys)
    report = masked.format_table(good)
    assert report.count("target met") == 2 and "MISSED" not in report
    slow = _record([official, _row("ours", "cpu", 600.0, 120.0)])
    assert {k: met for k, _, met in targets.check(slow)} == {k: False for k in keys}
    assert masked.format_table(slow).count("target MISSED") == 2
    # no cpu backend: no figure, nothing checked; a GPU run is not held to them
    assert targets.check(_record([official, _row("ours", "torch", 100.0, 1.0)])) == []
    gpu = _record([official, _row("ours", "cpu", 600.0, 120.0)], device="cuda")
    assert not any(targets.applies(k, gpu) for k in keys)
    # a row whose loss differs from the official one has no figures
    wrong = _record([official, {**_row("ours", "cpu", 1.0, 1.0), "loss": 2.0}])
    assert wrong["rows"][1]["status"].startswith("ok, but the loss differs")
    assert targets.check(wrong) == []
