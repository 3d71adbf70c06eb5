"""Benchmarks: the harness, kernels, the suite, plots, baselines, targets, ``python -m bench``
and its ``gpu-check``."""
import argparse
import json
import re
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

import pytest
import torch

from bench import baselines, harness, kernels, plots, suite, targets
from bench import cli as bcli
from fastipirm.ops import available_backends

TINY = ["--device", "cpu", "--n", "16", "--dim", "8", "--envs", "3", "--repeats", "2",
        "--warmup", "0"]


def _args(module, argv):
    ap = argparse.ArgumentParser(conflict_handler="resolve")
    module.add_arguments(ap)
    return ap.parse_args(argv)


# ---------------------------------------------------------------------------------------------
# harness


def test_measure_statistics_exclude_warmup():
    calls = []
    delays = {0: 0.1, 1: 0.02, 2: 0.005, 3: 0.01, 4: 0.045}     # call 0 is the warm-up

    def step(i):
        calls.append(i)
        time.sleep(delays[i])

    res = harness.measure(step, warmup=1, repeats=4)
    assert calls == [0, 1, 2, 3, 4]
    assert res["repeats"] == 4 and res["peak_mib"] is None
    assert 5.0 <= res["min_ms"] < 9.0                       # the 5 ms call, not the warm-up
    assert 15.0 <= res["median_ms"] < 19.0                  # median of 20, 5, 10, 45 ms
    assert 20.0 <= res["mean_ms"] < 24.0
    assert res["min_ms"] <= res["p20_ms"] <= res["median_ms"] <= res["p80_ms"] < 60.0


def test_measure_stops_after_max_seconds():
    started = time.perf_counter()
    res = harness.measure(lambda i: time.sleep(0.02), warmup=0, repeats=1000, max_seconds=0.05)
    assert res["repeats"] == 3                              # 3 calls take > 50 ms: stop there
    assert time.perf_counter() - started < 1.0


def test_save_record_fields(tmp_path):
    path = harness.save_record("demo", {"benchmark": "demo", "rows": [{"x": 1}]}, tmp_path)
    assert path.parent == tmp_path and path.name.startswith("demo_cpu_" if not
                                                            torch.cuda.is_available() else "demo_")
    rec = json.loads(path.read_text())
    assert rec["benchmark"] == "demo" and rec["rows"] == [{"x": 1}]
    assert datetime.fromisoformat(rec["date"]).tzinfo is not None
    assert rec["command"] and rec["versions"]["torch"] == torch.__version__
    assert re.fullmatch(r"[0-9a-f]{7,}(\+dirty)?", rec["git_commit"]), rec["git_commit"]
    assert rec["host"]["cpu_count"] >= 1


def test_slug():
    assert harness.slug("NVIDIA H200") == "nvidia-h200"
    assert harness.slug(" Tesla V100-SXM2 (32GB) ") == "tesla-v100-sxm2-32gb"


# ---------------------------------------------------------------------------------------------
# kernels


def test_kernels_tiny_cpu_run():
    impls = ["reference", "torch"] + (["cpu"] if "cpu" in available_backends("cpu") else [])
    record = kernels.run(_args(kernels, TINY + ["--impl", *impls]))
    rows = record["rows"]
    assert record["benchmark"] == "kernels"
    assert len(rows) == 2 * len(impls)                      # hard and soft
    assert all(r["status"] == "ok" for r in rows), [r["status"] for r in rows]
    for mode in ("hard", "soft"):
        by = {r["impl"]: r for r in rows if r["mode"] == mode}
        ref, tor = by["reference"], by["torch"]
        assert ref["x_reference"] == 1.0
        assert tor["x_reference"] == pytest.approx(ref["median_ms"] / tor["median_ms"])
        assert ref["x_torch"] == pytest.approx(tor["median_ms"] / ref["median_ms"])
        assert tor["tflops"] == pytest.approx(6 * 16 * 16 * 8 / (tor["median_ms"] * 1e-3) / 1e12)
        assert tor["peak_mib"] is None and "x_compile" not in tor
    figs = baselines.figures(record)
    hard_torch = next(r for r in rows if r["mode"] == "hard" and r["impl"] == "torch")
    assert figs["kernels/fp32/D=8/2B=16/M=3/hard/torch/median_ms"] == {
        "value": hard_torch["median_ms"], "higher_is_better": False}
    assert figs["kernels/fp32/D=8/2B=16/M=3/soft/torch/x_reference"]["higher_is_better"] is True
    table = kernels.format_table(record)
    assert "x ref" in table and table.count(" ok") == len(rows)


def test_kernels_rejects_bad_input():
    with pytest.raises(ValueError, match="even"):
        kernels.run(_args(kernels, TINY[:2] + ["--n", "15"]))
    with pytest.raises(ValueError, match="unknown implementation.*nope"):
        kernels.run(_args(kernels, TINY + ["--impl", "torch", "nope"]))


def test_kernels_unavailable_backend_is_a_row(monkeypatch):
    from fastipirm.ops import backends

    def broken():
        raise RuntimeError("not built here")

    monkeypatch.setitem(backends.BACKENDS, "broken", backends.Backend("broken", ("cpu",), broken))
    record = kernels.run(_args(kernels, TINY + ["--impl", "torch", "broken", "--mode", "hard"]))
    status = {r["impl"]: r["status"] for r in record["rows"]}
    assert status["torch"] == "ok" and "not built here" in status["broken"]


def test_cpu_alias_defaults():
    from bench import cpu

    args = _args(cpu, ["--dim", "8", "--repeats", "1", "--warmup", "0", "--n", "16"])
    assert args.device == "cpu" and args.envs == [16]
    assert _args(cpu, []).n == [512] and _args(cpu, []).dim == 128
    record = cpu.run(args)
    impls = {r["impl"] for r in record["rows"]}
    assert impls == {"reference"} | {b for b in available_backends("cpu") if b != "triton"}


# ---------------------------------------------------------------------------------------------
# CLI


def test_cli_bench_kernels(capsys, tmp_path):
    rc = bcli.main(["kernels", *TINY, "--impl", "reference", "torch", "--mode", "soft",
                   "--no-save", "--results-dir", str(tmp_path)])
    out = capsys.readouterr().out
    assert rc == 0
    assert "env_contrastive_loss fwd+bwd" in out and out.count(" ok") == 2
    assert "wrote" not in out and not list(tmp_path.iterdir())


def test_cli_bench_saves_and_plots(capsys, tmp_path):
    pytest.importorskip("matplotlib")
    rc = bcli.main(["kernels", *TINY, "--impl", "torch", "--mode", "hard",
                    "--results-dir", str(tmp_path), "--plot"])
    assert rc == 0
    names = sorted(p.name for p in tmp_path.iterdir())
    assert len(names) == 2 and names[0].endswith(".json") and names[1].endswith("_time.png")
    assert json.loads((tmp_path / names[0]).read_text())["benchmark"] == "kernels"


def test_cli_bench_missing_module(monkeypatch, capsys):
    monkeypatch.setitem(bcli.BENCHMARKS, "maximize", ("no_such_benchmark", "a missing module"))
    assert bcli.main(["maximize"]) == 1
    assert "bench/no_such_benchmark.py does not exist" in capsys.readouterr().err


def test_cli_bench_bad_option_is_an_error(capsys):
    assert bcli.main(["kernels", "--device", "cpu", "--n", "15", "--no-save"]) == 2
    assert "even" in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a CPU-only machine")
def test_cli_accept_refuses_without_gpu(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(baselines, "BASELINES", tmp_path)
    rc = bcli.main(["kernels", *TINY, "--impl", "torch", "--no-save", "--accept"])
    assert rc == 2 and "refusing" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())
    with pytest.raises(ValueError, match="refusing"):
        baselines.accept(_kernels_record())


# ---------------------------------------------------------------------------------------------
# plots


def _kernels_record(triton_ms=10.0, reference_ms=300.0, compile_ms=50.0, peak=(900.0, 400.0, 8.0)):
    rows = []
    for n in (2048, 8192):
        scale = (n / 8192) ** 2
        group = [{"n": n, "batch": n // 2, "dim": 128, "envs": 16, "mode": "hard", "impl": impl,
                  "dtype": "bf16", "status": "ok", "median_ms": ms * scale, "p20_ms": ms * scale,
                  "p80_ms": ms * scale, "tflops": 1.0, "peak_mib": mem * scale}
                 for impl, ms, mem in (("reference", reference_ms, peak[0]),
                                       ("torch.compile", compile_ms, peak[1]),
                                       ("triton", triton_ms, peak[2]))]
        kernels._add_ratios(group)
        rows += group
    return {"benchmark": "kernels", "device": "NVIDIA H200", "dim": 128, "dtype": "bf16",
            "repeats": 5, "warmup": 1, "threads": 2, "timing": "CUDA events", "rows": rows}


def test_plots_written(tmp_path):
    pytest.importorskip("matplotlib")
    paths = plots.plot_record(_kernels_record(), tmp_path / "k")
    assert [p.name for p in paths] == ["k_time.png", "k_memory.png"]
    loader = {"benchmark": "loader", "device": "cpu",
              "rows": [{"out_size": 32, "pipeline": "torch", "samples_per_s": 100.0},
                       {"out_size": 32, "pipeline": "step", "samples_per_s": 50.0}]}
    paths += plots.plot_record({"benchmark": "all", "rows": [],
                                "parts": {"loader": loader, "step": {"error": "x"}}},
                               tmp_path / "a")
    assert paths[-1].name == "a_loader_rates.png"
    for p in paths:
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and p.stat().st_size > 5000


def test_plots_without_matplotlib(monkeypatch):
    import sys
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(ImportError, match="pip install matplotlib"):
        plots.plot_record(_kernels_record(), "unused")


# ---------------------------------------------------------------------------------------------
# baselines


def test_compare_passes_equal_and_catches_a_10_percent_drop():
    baseline = {"figures": baselines.figures(_kernels_record()), "targets": {}}
    assert baselines.compare(_kernels_record(), baseline) == []
    assert baselines.compare(_kernels_record(triton_ms=10.5), baseline) == []     # 5%: noise
    failures = baselines.compare(_kernels_record(triton_ms=11.5), baseline)       # 15% slower
    keys = {line.split(":")[0] for line in failures}
    assert "kernels/bf16/D=128/2B=8192/M=16/hard/triton/median_ms" in keys
    assert "kernels/bf16/D=128/2B=8192/M=16/hard/triton/x_reference" in keys
    assert all("worse than the baseline" in line for line in failures)


def test_compare_catches_a_missed_target():
    baseline = {"figures": {}, "targets": targets.bounds()}
    assert baselines.compare(_kernels_record(), baseline) == []                   # 30x, 5x
    failures = baselines.compare(_kernels_record(triton_ms=16.0, compile_ms=100.0), baseline)
    assert failures == ["kernels/bf16/D=128/2B=8192/M=16/hard/triton/x_reference: 18.75 is "
                        "below its target 20"]
    failures = baselines.compare(_kernels_record(peak=(900.0, 400.0, 40.0)), baseline)
    assert any("memory_over_compile" in f and "above its target" in f for f in failures)


def test_accept_writes_and_merges(tmp_path):
    path = tmp_path / "gpu.json"
    baselines.accept(_kernels_record(), force=True, path=path)
    data = baselines.load_baseline(path)
    assert data["figures"] == baselines.figures(_kernels_record())
    assert data["targets"]["step/resnet50/P=8/ipirm_over_simclr_time"] == {"max": 1.15}
    data["targets"]["maximize/fastipirm_seconds"] = {"max": 20}                   # edited by hand
    path.write_text(json.dumps(data))
    baselines.accept(_kernels_record(triton_ms=8.0), force=True, path=path)
    data = baselines.load_baseline(path)
    key = "kernels/bf16/D=128/2B=8192/M=16/hard/triton/median_ms"
    assert data["figures"][key]["value"] == 8.0
    assert data["targets"]["maximize/fastipirm_seconds"] == {"max": 20}
    assert len(data["accepted"]) == 2 and data["accepted"][0]["benchmark"] == "kernels"


def test_load_baseline_rejects_bad_files(tmp_path):
    bad = tmp_path / "b.json"
    bad.write_text('{"figures": {"k": {"value": "fast"}}}')
    with pytest.raises(ValueError, match="figure 'k'"):
        baselines.load_baseline(bad)
    bad.write_text('{"targets": {"k": {"at_least": 3}}}')
    with pytest.raises(ValueError, match="target 'k'"):
        baselines.load_baseline(bad)


def test_step_figures():
    step = {"benchmark": "step", "rows": [
        {"arch": "resnet50", "partitions": 8, "variant": "fastipirm", "images_per_s": 5000.0,
         "step_images_per_s": 6000.0}],
        "ratios": [{"arch": "resnet50", "partitions": 8, "fastipirm_vs_official": 4.0,
                    "ipirm_overhead": 1.2}]}
    baseline = {"figures": {}, "targets": targets.bounds()}
    failures = baselines.compare(step, baseline)
    assert len(failures) == 2
    assert failures[0].startswith("step/resnet50/P=8/fastipirm_over_official: 4 is below")
    assert failures[1].startswith("step/resnet50/P=8/ipirm_over_simclr_time: 1.2 is above")


def test_maximize_figures():
    record = {"benchmark": "maximize", "rows": [{"impl": "official", "seconds": 600.0},
                                                {"impl": "fastipirm", "seconds": 12.0}]}
    from bench import maximize
    figs = maximize.figures(record)
    assert figs["maximize/fastipirm_seconds"] == {"value": 12.0, "higher_is_better": False}
    assert figs["maximize/fastipirm_over_official"]["value"] == pytest.approx(50.0)


# ---------------------------------------------------------------------------------------------
# suite


def _step_record(rate_p1=2560.0, rate_p8=1280.0, arch="resnet50"):
    rows = [{"arch": arch, "partitions": p, "variant": v, "images_per_s": r * f}
            for p, r in ((1, rate_p1), (8, rate_p8))
            for v, f in (("official", 0.1), ("fastipirm", 1.0), ("compiled", 0.5))]
    return {"benchmark": "step", "device": "cuda", "rows": rows, "ratios": [],
            "settings": {"width": 64, "batch": 256, "crop": 32}}


def test_estimate_formula():
    maximize = {"benchmark": "maximize", "device": "cuda",
                "settings": {"arch": "resnet50", "width": 64, "feature_batch": 3096},
                "rows": [{"impl": "official", "seconds": 500.0, "n": 52_500},
                         {"impl": "fastipirm", "seconds": 5.0, "n": 52_500}]}
    est = suite.estimate(_step_record(), maximize)
    # P = 1..8 for 50 epochs each, time per image linear in P: the mean is the P=1/P=8 average
    train_s = 400 * 410 * 256 * (1 / 2560 + 1 / 1280) / 2
    assert est["train_seconds"] == pytest.approx(train_s)                        # 24,600 s
    assert est["maximize_seconds_each"] == pytest.approx(10.0)                   # 5 s at N/2
    assert est["hours"] == pytest.approx((train_s + 9 * 10.0) / 3600)
    assert est["status"] == "ok" and "ceil(e / 50)" in est["formula"]
    resnet18 = suite.estimate(_step_record(arch="resnet18"), maximize)
    assert "NOT the official setting" in resnet18["status"] and "step measured" in \
        resnet18["status"] and "maximize measured" not in resnet18["status"]
    assert suite.estimate(_step_record(), None)["status"] == "not estimated: no maximize record"


def test_suite_runs_parts_and_reports_failures(monkeypatch):
    args = _args(suite, ["--only", "kernels", "maximize",
                         "--kernels-args", " ".join(TINY + ["--impl", "torch", "--mode", "hard"])])
    monkeypatch.setattr(suite.importlib, "import_module", _fail_for("bench.maximize"))
    record = suite.run(args)
    assert [r["part"] for r in record["rows"]] == ["kernels", "maximize"]
    assert record["rows"][0]["status"] == "ok" and record["parts"]["kernels"]["rows"]
    assert "cannot be imported" in record["rows"][1]["status"]
    assert record["estimate"]["hours"] is None
    assert "kernels/fp32/D=8/2B=16/M=3/hard/torch/median_ms" in baselines.figures(record)
    assert "== kernels ==" in suite.format_table(record)
    with pytest.raises(ValueError, match="--kernels-args"):
        suite.run(_args(suite, ["--only", "kernels", "--kernels-args=--n"]))


def _fail_for(name):
    import importlib
    real = importlib.import_module

    def import_module(module, *a):
        if module == name:
            raise ImportError(f"no module named {name!r}")
        return real(module, *a)

    return import_module


# ---------------------------------------------------------------------------------------------
# loader


def test_loader_tiny_run():
    from bench import loader

    record = loader.run(_args(loader, [
        "--device", "cpu", "--out-sizes", "16", "--source-size", "24", "--num-images", "32",
        "--batch", "16", "--batches", "1", "--workers", "0", "--arch", "resnet18", "--width", "4",
        "--skip", "dali"]))
    rates = {r["pipeline"]: r for r in record["rows"]}
    assert set(rates) == {"official", "torch", "step"}
    assert all(r["samples_per_s"] > 0 for r in rates.values())
    assert rates["torch"]["vs_step"] == pytest.approx(rates["torch"]["samples_per_s"]
                                                      / rates["step"]["samples_per_s"])
    figs = baselines.figures(record)
    assert figs["loader/16px/official/samples_per_s"]["higher_is_better"] is True
    assert "loader/16px/step/vs_step" not in figs
    assert "official" in loader.format_table(record)
    with pytest.raises(ValueError, match="at least --batch"):
        loader.run(_args(loader, ["--device", "cpu", "--num-images", "8", "--batch", "32"]))


def test_cpu_ratio_interleaves_both_backends():
    if "cpu" not in available_backends("cpu"):
        pytest.skip("the C++ extension is not built")
    from bench import cpu_ratio
    rows = cpu_ratio.run(_args(cpu_ratio, ["--batch", "24", "--dim", "8", "--envs", "3",
                                           "--rounds", "3", "--threads", "1"]))["rows"]
    assert [r["mode"] for r in rows] == ["hard", "soft"]
    for r in rows:
        assert len(r["rounds"]) == 3
        assert all(x["torch"] > 0 and x["cpu"] > 0 for x in r["rounds"])
        ratios = sorted(x["torch"] / x["cpu"] for x in r["rounds"])
        assert r["median_round_ratio"] == pytest.approx(ratios[1])


# ---------------------------------------------------------------------------------------------
# targets


def test_targets_apply_only_to_the_settings_they_were_set_for():
    key = "maximize/fastipirm_seconds"
    record = {"benchmark": "maximize", "rows": [{"impl": "fastipirm", "seconds": 30.0}],
              "settings": {"num_samples": 26_250, "arch": "resnet50"}}
    baseline = {"figures": {}, "targets": targets.bounds()}
    assert not targets.applies(key, record) and baselines.compare(record, baseline) == []
    record["settings"]["num_samples"] = 105_000
    assert targets.applies(key, record)
    assert baselines.compare(record, baseline) == [f"{key}: 30 is above its target 10"]
    assert targets.report(record) == [f"target MISSED {key} = 30 (<= 10, gpu)"]
    whole = {"benchmark": "all", "rows": [], "parts": {"maximize": record}, "estimate": {}}
    assert targets.check(whole) == [(key, 30.0, False)]
    assert "105,000" in targets.describe(key) and targets.applies("not/a/target", record)
    cpu = {k: b for k, b in targets.bounds("cpu").items() if k.startswith("cpu_ratio/")}
    assert set(cpu) == {f"cpu_ratio/B=512/D=128/M=16/threads=1/{m}/torch_over_cpu"
                        for m in ("hard", "soft")}
    assert all(b == {"min": targets.CPU_RATIO["min"]} for b in cpu.values())


# ---------------------------------------------------------------------------------------------
# python -m bench and gpu-check

ROOT = Path(__file__).resolve().parent.parent


def test_python_m_bench_help_from_the_repository_root():
    run = subprocess.run([sys.executable, "-m", "bench", "kernels", "--help"], cwd=ROOT,
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    assert "usage: python -m bench kernels" in run.stdout
    for option in ("--small", "--no-save", "--results-dir", "--plot", "--compare", "--accept"):
        assert option in run.stdout
    top = subprocess.run([sys.executable, "-m", "bench", "--help"], cwd=ROOT,
                         capture_output=True, text=True, timeout=60)
    assert top.returncode == 0 and all(name in top.stdout for name in bcli.BENCHMARKS)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a CPU-only machine")
def test_gpu_check_refuses_without_cuda(capsys, tmp_path):
    assert bcli.main(["gpu-check", "--results-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "--allow-cpu" in err
    assert not list(tmp_path.iterdir())


def test_gpu_check_stops_a_hung_phase_and_keeps_to_its_budget(monkeypatch, capsys, tmp_path):
    from bench import gpu_check

    hang = gpu_check.Phase("hang", lambda mode, args: ["-c", "import time; time.sleep(60)"],
                           {m: 1 for m in gpu_check.BUDGET}, lambda log, rec: "")
    ok = gpu_check.Phase("ok", lambda mode, args: ["-c", "print('wrote nothing')"],
                         {m: 30 for m in gpu_check.BUDGET}, lambda log, rec: "fine")
    monkeypatch.setattr(gpu_check, "PHASES", (hang, ok))
    monkeypatch.setattr(gpu_check, "_mode", lambda args: "cpu")
    started = time.perf_counter()
    assert bcli.main(["gpu-check", "--results-dir", str(tmp_path)]) == 1
    assert time.perf_counter() - started < 30
    (path,) = tmp_path.glob("gpu_check_*.json")
    rows = {r["phase"]: r for r in json.loads(path.read_text())["rows"]}
    assert rows["hang"]["status"] == "timed out after 1 s" and rows["hang"]["rc"] is None
    assert rows["ok"]["status"] == "ok" and rows["ok"]["key"] == "fine"
    assert Path(rows["ok"]["log"]).read_text().endswith("wrote nothing\n")
    assert bcli.main(["gpu-check", "--budget", "20", "--results-dir", str(tmp_path)]) == 1
    assert "skipped: no time left" in capsys.readouterr().out


@pytest.mark.skipif(torch.cuda.is_available(), reason="the tiny CPU run of a CPU-only machine")
def test_gpu_check_tiny_cpu_run(capsys, tmp_path):
    """``gpu-check --allow-cpu``: every phase as a subprocess, records and logs in the results
    directory, the table last (well under a minute)."""
    assert bcli.main(["gpu-check", "--allow-cpu", "--results-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    (path,) = tmp_path.glob("gpu_check_*.json")
    record = json.loads(path.read_text())
    assert record["mode"] == "cpu"
    assert [r["phase"] for r in record["rows"]] == ["info", "check", "gpu-tests", "kernels",
                                                    "masked", "step", "ddp-loss", "maximize"]
    for r in record["rows"]:
        assert r["status"] == "ok" and Path(r["log"]).exists(), r
    records = {r["phase"]: json.loads(Path(r["record"]).read_text())["benchmark"]
               for r in record["rows"] if r["record"]}
    assert records == {"kernels": "kernels", "masked": "masked", "step": "step",
                       "ddp-loss": "ddp_loss", "maximize": "maximize"}
    keys = {r["phase"]: r["key"] for r in record["rows"]}
    assert keys["check"] == "all backends of both ops agree with their references"
    assert "skipped" in keys["gpu-tests"] and "P=2: fastipirm" in keys["step"]
    assert keys["masked"].startswith("CL-ICA l1 B=64: ")
    assert keys["ddp-loss"].startswith("local N=2 ")
    table = out[out.index("gpu-check (cpu run"):]
    assert "phase" in table and "maximize" in table and f"wrote {path}" in out
