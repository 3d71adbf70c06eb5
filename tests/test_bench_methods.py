"""The DCoDR, MixUp and DDP-loss benchmarks (``python -m bench dcodr-step``, ``mixup-step``,
``ddp-loss``) at a tiny size, and the comparison table's factor-probe rows."""
import json

import pytest

from bench import cli as bcli
from fastipirm.runlog import comparison_table


def test_dcodr_step_benchmark_tiny(tmp_path, capsys):
    assert bcli.main(["dcodr-step", "--width", "2", "--generator-width", "8", "--domains", "2",
                      "--per-domain", "2", "--repeats", "1", "--results-dir",
                      str(tmp_path)]) == 0
    (path,) = tmp_path.glob("dcodr_step_*.json")
    record = json.loads(path.read_text())
    rows = {(r["method"], r["impl"]): r for r in record["rows"]}
    assert set(rows) == {(m, i) for m in ("dcodr_norec", "dcodr")
                         for i in ("official-style", "fastipirm")}
    for r in rows.values():
        assert r["median_ms"] > 0 and r["repeats"] == 1
    assert rows[("dcodr", "official-style")]["official_over_this"] == 1.0
    assert "official / this" in capsys.readouterr().out


def test_comparison_table_lists_the_probes():
    probes = {"background": {"accuracy": 0.3, "chance": 0.25},
              "shape": {"accuracy": 0.8, "chance": 0.2}}
    rows = [("DCoDR-norec", {"domain_factor": "background", "probes": probes}),
            ("SimCLR", {"domain_factor": "background",
                        "probes": {"background": {"accuracy": 1.0, "chance": 0.25}}})]
    table = comparison_table(rows)
    assert "kNN top-1" not in table
    line = next(x for x in table.splitlines() if x.startswith("background (domain)"))
    assert line.split()[-3:] == ["25.0", "30.00", "100.00"]
    shape = next(x for x in table.splitlines() if x.startswith("shape"))
    assert shape.split()[-1] == "-"


def test_mixup_step_benchmark_tiny(tmp_path):
    assert bcli.main(["mixup-step", "--width", "2", "--batch", "8", "--size", "16",
                      "--partitions", "2", "--repeats", "1", "--results-dir",
                      str(tmp_path)]) in (0, 1)              # 1: a missed target, reported
    (path,) = tmp_path.glob("mixup_step_*.json")
    rows = json.loads(path.read_text())["rows"]
    assert [r["impl"] for r in rows] == ["ipirm", "ipirm_mixup", "official-mixup"]
    assert rows[0]["over_ipirm_step"] == 1.0 and rows[1]["target"] is None     # P = 2
    assert all(r["median_ms"] > 0 for r in rows)


def test_ddp_loss_benchmark_tiny(tmp_path):
    assert bcli.main(["ddp-loss", "--batch", "8", "--dim", "4", "--partitions", "2",
                      "--worlds", "2", "4", "--repeats", "1", "--results-dir",
                      str(tmp_path)]) == 0
    (path,) = tmp_path.glob("ddp_loss_*.json")
    rows = json.loads(path.read_text())["rows"]
    impls = [r["impl"] for r in rows]
    assert "replicated-torch" in impls and impls[-2:] == ["local", "local"]
    assert [r["world"] for r in rows[-2:]] == [2, 4]
    assert min(r["over_replicated"] for r in rows if r["world"] is None) == 1.0
    assert all(r["median_ms"] > 0 for r in rows)
    with pytest.raises(SystemExit):
        bcli.main(["ddp-loss", "--worlds", "x"])
    assert bcli.main(["ddp-loss", "--batch", "6", "--worlds", "4", "--no-save"]) == 2
