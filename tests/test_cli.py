"""Command line: `fastipirm check` and `fastipirm info`."""
import subprocess
import sys

import torch

from fastipirm import cli
from fastipirm.ops import backends


def test_check_passes_and_prints_a_table(capsys):
    assert cli.main(["check", "--quick"]) == 0
    out = capsys.readouterr().out
    assert "max rel err" in out and "torch" in out and "ok" in out


def test_check_fails_on_a_wrong_backend(monkeypatch, capsys):
    from fastipirm.ops.torch_backend import env_contrastive_loss_torch

    def wrong(*args, **kw):
        loss, pen = env_contrastive_loss_torch(*args, **kw)
        return loss * 1.001, pen

    monkeypatch.setitem(backends.BACKENDS, "wrong",
                        backends.Backend("wrong", ("cpu",), lambda: wrong))
    assert cli.main(["check", "--quick", "--backend", "wrong"]) == 1
    out = capsys.readouterr().out
    assert "FAIL" in out


def test_check_fails_on_a_crashing_backend(monkeypatch, capsys):
    def crash(*args, **kw):
        raise RuntimeError("boom")

    monkeypatch.setitem(backends.BACKENDS, "crash",
                        backends.Backend("crash", ("cpu",), lambda: crash))
    assert cli.main(["check", "--quick", "--backend", "crash"]) == 1
    assert "boom" in capsys.readouterr().out


def test_info_runs_as_module():
    out = subprocess.run([sys.executable, "-m", "fastipirm", "info"], capture_output=True,
                         text=True, check=True).stdout
    assert f"torch {torch.__version__}" in out and "torch    available" in out


def test_bench_points_to_the_repository_entry(capsys):
    assert cli.main(["bench", "kernels", "--n", "512"]) == 2
    err = capsys.readouterr().err
    assert "python -m bench <name>" in err and len(err.strip().splitlines()) == 1
