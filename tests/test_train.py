"""The trainer end to end on tiny synthetic data (CPU): CLI run, exact resume, data errors, NaN."""
import csv
import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from fastipirm import cli, runtime
from fastipirm import train as trainmod
from fastipirm.checkpoint import atomic_save, load_checkpoint
from fastipirm.config import load_config, write_config
from fastipirm.methods import grouped_projection
from fastipirm.methods import ipirm as ipirm_method


pytestmark = pytest.mark.usefixtures("one_thread")


ROOT = Path(__file__).resolve().parents[1]

TINY = """
[run]
name = "tiny"
output_dir = "{out}"
seed = 7
device = "cpu"
log_every = 1
ckpt_every = 1
progress = false
tensorboard = false
plot = {plot}

[data]
name = "synthetic"
split = "train"
memory_split = "train"
test_split = "test"
num_samples = 96
eval_num_samples = 64
image_size = 16
crop_size = 16

[model]
arch = "resnet18"
feature_dim = 16
width = 4
channels_last = false

[train]
epochs = 4
batch_size = 32

[partition]
maximize_iter = 2
batch_size = 64
extract_batch_size = 40
min_epochs = 1
patience = 1
max_epochs = 3

[eval]
knn_every = 2
k = 20
batch_size = 64
linear_at_end = {linear}
linear_epochs = 3
linear_batch_size = 32
fixed_bn = true
linear_augment = false
"""


def tiny_config(tmp_path, name="tiny.toml", plot=False, linear=False, sets=()):
    """The tiny test config as a TOML file; ``sets`` (``section.key=value``) are written in."""
    path = tmp_path / name
    path.write_text(TINY.format(out=(tmp_path / "runs").as_posix(),
                                plot=str(plot).lower(), linear=str(linear).lower()))
    if sets:
        write_config(load_config(path, list(sets)), path)
    return path


def read_metrics(run_dir):
    with open(run_dir / "metrics.csv", newline="") as fh:
        return list(csv.DictReader(fh))


def test_full_tiny_run_through_the_cli(tmp_path, capsys):
    cfg = tiny_config(tmp_path, plot=True, linear=True)
    assert cli.main(["train", "--config", str(cfg), "--set", "run.compare_baseline=true",
                     "--set", "run.compare_random=true",
                     "--set", "model.bn_splits=2"]) == 0
    out = capsys.readouterr().out
    run_dir = tmp_path / "runs" / "tiny"
    # resolved config, metrics, checkpoint, summary
    assert load_config(run_dir / "config.toml").train.epochs == 4
    rows = read_metrics(run_dir)
    assert [int(r["epoch"]) for r in rows] == [1, 2, 3, 4]
    assert all(float(r["loss"]) > 0 and float(r["loss_env"]) > 0 for r in rows)
    assert [int(r["partitions"]) for r in rows] == [1, 2, 2, 2]   # epoch 0 + after epoch 2
    assert rows[1]["knn_top1"] and rows[3]["knn_top1"] and not rows[0]["knn_top1"]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert [p["epoch"] for p in summary["partitions"]] == [0, 2]
    assert 0 <= summary["knn_top1"] <= 100 and 0 <= summary["linear"]["final_top1"] <= 100
    assert set(summary["factors"]) == {"shape", "color", "background"}
    assert summary["factors"]["color"]["num_classes"] == 8
    ckpt = load_checkpoint(run_dir / "checkpoint.pt")
    assert ckpt["epoch"] == 4 and ckpt["method"]["partitions"].shape == (2, 96, 2)
    if importlib.util.find_spec("matplotlib") is not None:
        assert (run_dir / "curves.png").stat().st_size > 1000
    else:
        assert "matplotlib is not installed" in out
    # the baseline ran with the same budget, no environments and no partitions; the table
    # names both
    base_rows = read_metrics(tmp_path / "runs" / "tiny_simclr")
    assert len(base_rows) == 4 and all(not r.get("loss_env") for r in base_rows)
    assert all(not r.get("partitions") for r in base_rows)
    assert load_checkpoint(tmp_path / "runs" / "tiny_simclr")["method"] == {}
    assert "IP-IRM" in out and "SimCLR" in out and "kNN top-1" in out
    # ... and the untrained network, as a row of the table and of the per-factor probes
    table = out[out.index("IP-IRM vs SimCLR vs random init"):]
    assert "best on the label (shape)" in table
    rows = {line.split()[0]: line for line in table.splitlines() if line.strip()}
    assert "random init" in table and "background" in rows and rows["background"].count("/") == 3
    comparison = json.loads((tmp_path / "runs" / "tiny_comparison.json").read_text())
    assert set(comparison) >= {"ipirm", "simclr", "random_init", "table"}
    assert comparison["random_init"]["epochs"] == 0 and "shape" in comparison["random_init"][
        "factors"]
    assert [e for e, _ in comparison["ipirm"]["knn_curve"]] == [2, 4]
    if importlib.util.find_spec("matplotlib") is not None:
        assert (tmp_path / "runs" / "tiny_comparison.png").stat().st_size > 1000
    # linear probe of the checkpoint from the CLI
    assert cli.main(["eval", "linear", "--checkpoint", str(run_dir / "checkpoint.pt"),
                     "--epochs", "2", "--no-fixed-bn", "--augment", "--no-progress"]) == 0
    res = json.loads((run_dir / "linear_eval.json").read_text())
    assert res["epochs"] == 2 and not res["fixed_bn"] and res["augment"]
    assert 0 <= res["best_top1"] <= 100


class Killed(Exception):
    pass


def train_killed_after(cfg, epoch: int) -> None:
    """Train ``cfg`` and interrupt it right after the checkpoint of ``epoch``."""
    def kill(e, state):
        if e == epoch:
            raise Killed

    with pytest.raises(Killed):
        trainmod.train(cfg, log=lambda *a: None, on_epoch_end=kill)


def test_kill_and_resume_is_exact(tmp_path):
    """A run interrupted after epoch 1 and resumed equals the uninterrupted run, bit for bit."""
    cfg_path = tiny_config(tmp_path)
    full = load_config(cfg_path, ["run.name=full"])
    trainmod.train(full, log=lambda *a: None)

    train_killed_after(load_config(cfg_path, ["run.name=cut"]), 1)
    ckpt_path = tmp_path / "runs" / "cut" / "checkpoint.pt"
    assert load_checkpoint(ckpt_path)["epoch"] == 1
    assert cli.main(["train", "--resume", str(ckpt_path)]) == 0

    a = load_checkpoint(tmp_path / "runs" / "full")
    b = load_checkpoint(tmp_path / "runs" / "cut")
    assert a["epoch"] == b["epoch"] == 4 and a["step"] == b["step"]
    pa, pb = a["method"]["partitions"], b["method"]["partitions"]
    assert pa.shape == (2, 96, 2) and torch.equal(pa, pb)
    for key in ("loss", "loss_global", "loss_env", "penalty", "knn_top1"):
        assert [h.get(key) for h in a["history"]] == [h.get(key) for h in b["history"]], key
    for k, v in a["model"].items():
        assert torch.equal(v, b["model"][k]), k
    assert read_metrics(tmp_path / "runs" / "full")[-1]["loss"] == \
        read_metrics(tmp_path / "runs" / "cut")[-1]["loss"]


def test_sigkill_mid_run_then_resume_is_exact(tmp_path):
    """A real ``fastipirm train`` process killed with SIGKILL at an arbitrary point resumes from
    its last checkpoint to exactly the state of an uninterrupted run."""
    sets = ["run.threads=1", "train.epochs=5", "eval.knn_every=0"]
    cfg_path = tiny_config(tmp_path)
    trainmod.train(load_config(cfg_path, sets + ["run.name=full"]), log=lambda *a: None)

    ckpt = tmp_path / "runs" / "tiny" / "checkpoint.pt"
    cmd = [sys.executable, "-m", "fastipirm", "train", "--config", str(cfg_path)]
    for item in sets:
        cmd += ["--set", item]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        deadline = time.time() + 120
        while not ckpt.exists() and proc.poll() is None and time.time() < deadline:
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait(timeout=30)
    killed_at = load_checkpoint(ckpt)["epoch"]
    assert 1 <= killed_at < 5                      # killed before the end of the run
    assert cli.main(["train", "--resume", str(ckpt)]) == 0

    a = load_checkpoint(tmp_path / "runs" / "full")
    b = load_checkpoint(ckpt)
    assert b["epoch"] == 5 and torch.equal(a["method"]["partitions"], b["method"]["partitions"])
    assert [h["loss"] for h in a["history"]] == [h["loss"] for h in b["history"]]
    for k, v in a["model"].items():
        assert torch.equal(v, b["model"][k]), k


def test_one_loss_call_per_step_over_all_partitions(tmp_path, monkeypatch):
    """Every step makes one minimization_loss call with a (B, P*K) membership matrix."""
    real = ipirm_method.minimization_loss
    shapes = []

    def spy(z1, z2, memberships, **kw):
        shapes.append(tuple(memberships.shape))
        assert kw["keep_cont"] and kw["penalty_weight"] == 0.2
        return real(z1, z2, memberships, **kw)

    monkeypatch.setattr(ipirm_method, "minimization_loss", spy)
    cfg = load_config(tiny_config(tmp_path), ["train.epochs=3", "eval.knn_every=0"])
    summary = trainmod.train(cfg, log=lambda *a: None)
    assert summary["steps"] == 9 and len(shapes) == 9          # 3 epochs x 3 steps
    assert shapes == [(32, 2)] * 6 + [(32, 4)] * 3             # P = 1, then 2 after epoch 2


def test_grouped_projection_emulates_dataparallel_bn():
    """bn_splits=2: each half normalised by its own statistics; running stats from half 0."""
    torch.manual_seed(0)

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.bn = torch.nn.BatchNorm1d(3)

        def forward(self, x):
            y = self.bn(x)
            return y, y

    x = torch.randn(8, 3) * 3 + 1
    net, ref = Net().train(), Net().train()
    out = grouped_projection(net, x, 2, net)
    first, _ = ref(x[:4])
    ref2 = Net().train()
    second, _ = ref2(x[4:])
    assert torch.allclose(out, torch.cat([first, second]), atol=1e-6)
    assert torch.allclose(net.bn.running_mean, ref.bn.running_mean)
    assert torch.allclose(net.bn.running_var, ref.bn.running_var)
    assert net.bn.momentum == 0.1                       # restored
    assert torch.equal(grouped_projection(net, x, 1, net), net(x)[1])


def test_tensorboard_scalars_when_available(tmp_path, monkeypatch):
    """With TensorBoard importable, step and epoch scalars go to a SummaryWriter in <run>/tb."""
    import types
    written = []

    class FakeWriter:
        def __init__(self, logdir):
            written.append(("dir", logdir))

        def add_scalar(self, tag, value, step):
            written.append((tag, step))

        def close(self):
            written.append(("closed", None))

    fake = types.ModuleType("torch.utils.tensorboard")
    fake.SummaryWriter = FakeWriter
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", fake)
    cfg = load_config(tiny_config(tmp_path), ["train.epochs=2", "run.tensorboard=true",
                                              "partition.maximize_iter=5"])
    trainmod.train(cfg, log=lambda *a: None)
    assert written[0] == ("dir", str(tmp_path / "runs" / "tiny" / "tb"))
    tags = {t for t, _ in written}
    assert {"step/loss", "step/penalty", "epoch/loss", "epoch/knn_top1"} <= tags
    assert ("epoch/loss", 2) in written and written[-1] == ("closed", None)


def test_latest_partition_only_and_warm_start(tmp_path, monkeypatch):
    """retain_group = false keeps only the newest partition; random_init = false warm-starts
    the next search from (a copy of) the previous best Theta."""
    inits, bests = [], []
    real = ipirm_method.part.optimize_partition

    def spy(z1, z2, init, **kw):
        inits.append(init.clone())
        res = real(z1, z2, init, **kw)
        bests.append(res.logits.clone())
        return res

    monkeypatch.setattr(ipirm_method.part, "optimize_partition", spy)
    cfg = load_config(tiny_config(tmp_path), ["partition.retain_group=false",
                                              "partition.random_init=false",
                                              "eval.knn_every=0"])
    summary = trainmod.train(cfg, log=lambda *a: None)
    ckpt = load_checkpoint(tmp_path / "runs" / "tiny")
    state = ckpt["method"]
    assert len(summary["partitions"]) == 2 and state["partitions"].shape == (1, 96, 2)
    assert len(inits) == 2
    assert torch.equal(inits[1], bests[0])            # warm start from the previous best
    assert not torch.equal(bests[1], bests[0])
    assert torch.equal(state["partitions"][0], bests[1])   # only the latest is retained
    assert torch.equal(state["last_theta"], bests[1])


def test_resume_auto(tmp_path, capsys):
    cfg = tiny_config(tmp_path)
    sets = ["--set", "train.epochs=1", "--set", "eval.knn_every=0", "--set",
            "partition.max_epochs=1"]
    assert cli.main(["train", "--config", str(cfg), "--resume", "auto", *sets]) == 0
    assert "no checkpoint" in capsys.readouterr().out
    sets[1] = "train.epochs=2"
    assert cli.main(["train", "--config", str(cfg), "--resume", "auto", *sets]) == 0
    out = capsys.readouterr().out
    assert "resuming" in out and "after epoch 1" in out and "epoch 2/2" in out
    assert load_checkpoint(tmp_path / "runs" / "tiny")["epoch"] == 2


def test_synthetic_options_reach_the_generator(tmp_path):
    cfg = load_config(tiny_config(tmp_path), ["data.num_colors=2", "data.num_backgrounds=1",
                                              "data.noise=0.0", "data.label_factor=color"])
    train = runtime.load_split(cfg, "train")
    test = runtime.load_split(cfg, "test")
    assert len(train.images) == 96 and len(test.images) == 64 and train.images.shape[1] == 16
    assert set(train.factors["color"].tolist()) <= {0, 1}
    assert set(train.factors["background"].tolist()) == {0}
    assert (train.labels == train.factors["color"]).all()
    # a spurious colour in the pretraining split only: independent in the others
    cfg = load_config(tiny_config(tmp_path), ["data.color_correlation=1.0",
                                              "data.eval_color_correlation=0.0"])
    train, test = runtime.load_split(cfg, "train"), runtime.load_split(cfg, "test")
    assert (train.factors["color"] == train.factors["shape"] % 8).all()
    assert (test.factors["color"] != test.factors["shape"] % 8).mean() > 0.5


def test_missing_data_gives_a_clear_error(tmp_path, capsys):
    cfg = tiny_config(tmp_path)
    empty = tmp_path / "empty"
    empty.mkdir()
    code = cli.main(["train", "--config", str(cfg), "--set", "data.name=cifar10",
                     "--set", f"data.root={empty.as_posix()!r}".replace("'", '"')])
    err = capsys.readouterr().err
    assert code == 1
    assert "cifar10" in err and "cifar-10-batches-py" in err and "Traceback" not in err
    assert not (tmp_path / "runs" / "tiny").exists()       # no half-made run directory
    assert len(err.strip().splitlines()) <= 3


def test_corrupt_data_gives_a_clear_error_without_traceback(tmp_path):
    cfg = tiny_config(tmp_path)
    root = tmp_path / "stl"
    (root / "stl10_binary").mkdir(parents=True)
    (root / "stl10_binary" / "train_X.bin").write_bytes(b"\x00" * 1000)  # not whole images
    (root / "stl10_binary" / "train_y.bin").write_bytes(b"\x01" * 3)
    (root / "stl10_binary" / "unlabeled_X.bin").write_bytes(b"\x00" * 27648)
    proc = subprocess.run(
        [sys.executable, "-m", "fastipirm", "train", "--config", str(cfg),
         "--set", "data.name=stl10", "--set", "data.split=train+unlabeled",
         "--set", f'data.root="{root.as_posix()}"'],
        capture_output=True, text=True, cwd=ROOT, timeout=120,
        env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 1, proc.stderr
    assert "train_X.bin" in proc.stderr and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) <= 3, proc.stderr


def _dali_ok():
    try:
        from fastipirm.data.dali import dali_available
    except ImportError:
        return False
    return dali_available()[0]


@pytest.mark.skipif(not _dali_ok(), reason="NVIDIA DALI is not installed")
def test_dali_pipeline_trains_and_resumes_exactly(tmp_path):
    """data.pipeline = dali (on the CPU here): training views from DALI, exact resume."""
    cfg_path = tiny_config(tmp_path)
    sets = ["data.pipeline=dali", "train.epochs=3", "eval.knn_every=0"]
    trainmod.train(load_config(cfg_path, sets + ["run.name=full"]), log=lambda *a: None)
    train_killed_after(load_config(cfg_path, sets + ["run.name=cut"]), 1)
    assert cli.main(["train", "--resume", str(tmp_path / "runs" / "cut")]) == 0
    a = load_checkpoint(tmp_path / "runs" / "full")
    b = load_checkpoint(tmp_path / "runs" / "cut")
    assert b["config"]["data"]["pipeline"] == "dali" and b["epoch"] == 3
    assert torch.equal(a["method"]["partitions"], b["method"]["partitions"])
    assert [h["loss"] for h in a["history"]] == [h["loss"] for h in b["history"]]


def test_dali_pipeline_without_dali_is_a_clear_error(tmp_path, capsys, monkeypatch):
    dali = pytest.importorskip("fastipirm.data.dali")
    monkeypatch.setattr(dali, "dali_available",
                        lambda: (False, "NVIDIA DALI is not installed (No module named 'nvidia')"))
    cfg = tiny_config(tmp_path)
    assert cli.main(["train", "--config", str(cfg), "--set", "data.pipeline=dali"]) == 2
    err = capsys.readouterr().err
    assert "data.pipeline" in err and "DALI" in err and "Traceback" not in err


def test_config_error_through_the_cli(tmp_path, capsys):
    cfg = tiny_config(tmp_path)
    assert cli.main(["train", "--config", str(cfg), "--set", "train.bach_size=3"]) == 2
    err = capsys.readouterr().err
    assert "train.bach_size: unknown key" in err and "Traceback" not in err


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch, capsys):
    cfg = tiny_config(tmp_path)
    real = ipirm_method.minimization_loss
    calls = {"n": 0}

    def poisoned(*args, **kwargs):
        total, parts = real(*args, **kwargs)
        calls["n"] += 1
        if calls["n"] > 4:          # epoch 1 has 3 steps: poison the 2nd step of epoch 2
            total = total * float("nan")
        return total, parts

    monkeypatch.setattr(ipirm_method, "minimization_loss", poisoned)
    run_dir = tmp_path / "runs" / "tiny"
    assert cli.main(["train", "--config", str(cfg)]) == 1
    err = capsys.readouterr().err
    assert "training stopped" in err and "nan" in err and "epoch 2" in err
    assert "checkpoint.pt (kept unchanged)" in err
    ckpt = load_checkpoint(run_dir / "checkpoint.pt")
    assert ckpt["epoch"] == 1
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values() if v.is_floating_point())
    assert sorted(p.name for p in run_dir.iterdir() if p.name.startswith(".")) == []
    # the good checkpoint resumes
    monkeypatch.setattr(ipirm_method, "minimization_loss", real)
    assert cli.main(["train", "--resume", str(run_dir), "--set", "train.epochs=2"]) == 0
    assert load_checkpoint(run_dir / "checkpoint.pt")["epoch"] == 2


def test_atomic_save_never_loses_the_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "checkpoint.pt"
    atomic_save({"x": torch.ones(3)}, path)
    good = path.read_bytes()

    def broken_save(obj, fh):
        fh.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        atomic_save({"x": torch.zeros(3)}, path)
    assert path.read_bytes() == good
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint.pt"]


def test_unreadable_checkpoint_is_reported(tmp_path, capsys):
    bad = tmp_path / "checkpoint.pt"
    bad.write_bytes(b"not a checkpoint")
    assert cli.main(["train", "--resume", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "cannot be read" in err and "Traceback" not in err


def test_pipeline_auto_is_dali_only_on_a_gpu(monkeypatch):
    from fastipirm.data import choose_pipeline, dali
    assert choose_pipeline("auto", torch.device("cpu")) == "torch"
    assert choose_pipeline("dali", torch.device("cpu")) == "dali"
    monkeypatch.setattr(dali, "dali_available", lambda: (True, "x"))
    assert choose_pipeline("auto", torch.device("cuda")) == "dali"
    monkeypatch.setattr(dali, "dali_available", lambda: (False, "not installed"))
    assert choose_pipeline("auto", torch.device("cuda")) == "torch"


def test_progress_is_one_line_per_epoch_without_a_terminal(tmp_path, capfd, monkeypatch):
    cfg = tiny_config(tmp_path)
    assert cli.main(["train", "--config", str(cfg), "--set", "run.progress=true",
                     "--set", "train.epochs=2", "--set", "eval.knn_every=0"]) == 0
    out, err = capfd.readouterr()
    assert "\r" not in out + err
    assert [line.split()[1] for line in out.splitlines() if line.startswith("epoch ")] == \
        ["1/2", "2/2"]
    from fastipirm import runlog
    monkeypatch.setattr(runlog.sys.stdout, "isatty", lambda: True, raising=False)
    monkeypatch.setattr(runlog.sys.stderr, "isatty", lambda: True, raising=False)
    bar = runlog.progress_bar(True, 3, "x")
    assert bar is not None and runlog.progress_bar(False, 3, "x") is None
    bar.close()
