"""Saved models of every accepted format through ``fastipirm eval linear`` / ``eval knn``: the
official IP-IRM checkpoints (with and without ``module.``, wrapped in a dict), fastipirm
checkpoints (file and run directory), and the one-line error for anything else."""
import argparse
import csv
import json

import pytest
import torch
from torch import nn

from fastipirm import cli, runtime
from fastipirm.checkpoint import FORMAT, atomic_save
from fastipirm.config import load_config
from fastipirm.data import eval_transform
from fastipirm.eval import knn_evaluate
from fastipirm.models import (SimCLRModel, convert_official_state_dict, infer_model_keys,
                              official_state_dict)
from fastipirm.eval.saved import result_path
from fastipirm.model_files import load_model, load_model_file
from test_train import tiny_config

pytestmark = pytest.mark.usefixtures("one_thread")

def tiny_toml(tmp_path):
    return tiny_config(tmp_path, sets=["model.hidden_dim=8", "eval.linear_epochs=2"])


def trained_like(arch="resnet18", width=4, hidden_dim=8, feature_dim=16, seed=0):
    """A model with non-trivial BN running statistics (as after training), in eval mode."""
    torch.manual_seed(seed)
    model = SimCLRModel(arch, feature_dim, width=width, hidden_dim=hidden_dim)
    with torch.no_grad():
        for _ in range(3):
            model(torch.randn(8, 3, 16, 16) * 2 + 0.5)
    return model.eval()


def save_fastipirm(model, cfg, path, epoch=3):
    """A minimal fastipirm checkpoint (what load_checkpoint and the evaluations read)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_save({"format": FORMAT, "config": cfg.to_dict(), "epoch": epoch, "step": 9,
                 "model": model.state_dict()}, path)
    return path


def save_official(model, path, *, data_parallel=True, wrap=False):
    """The model as the official main.py saves it (``module.f.*``/``module.g.*``), optionally
    without the prefix or wrapped in a dict with non-tensor entries."""
    state = official_state_dict(model.state_dict(), data_parallel=data_parallel)
    obj = {"state_dict": state, "epoch": 5, "args": argparse.Namespace(k=200)} if wrap else state
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(obj, path)
    return path


def features(model, x):
    with torch.no_grad():
        return model.eval().encoder(x)


@pytest.fixture
def setup(tmp_path):
    toml = tiny_toml(tmp_path)
    cfg = load_config(toml)
    model = trained_like()
    return toml, cfg, model


@pytest.mark.parametrize("data_parallel,wrap", [(True, False), (False, False), (True, True)])
def test_official_file_gives_the_original_features(setup, tmp_path, data_parallel, wrap):
    toml, cfg, model = setup
    path = save_official(model, tmp_path / "official" / "model_400.pth",
                         data_parallel=data_parallel, wrap=wrap)
    mf = load_model_file(path)
    assert mf.kind == "official" and mf.config is None and mf.has_head
    assert mf.epoch == (5 if wrap else 400)
    assert ("prefix of DataParallel" in mf.description) == data_parallel
    logs = []
    loaded, used, _ = load_model(path, config=toml, log=logs.append)
    assert (used.model.arch, used.model.width, used.model.hidden_dim,
            used.model.feature_dim) == ("resnet18", 4, 8, 16)
    assert "resnet18, width 4, head 8 -> 16" in logs[0]
    x = torch.randn(5, 3, 16, 16)
    assert torch.equal(features(loaded, x), features(model, x))
    with torch.no_grad():
        for a, b in zip(loaded(x), model(x)):
            assert torch.equal(a, b)
    for k, v in model.state_dict().items():                       # BN buffers included
        assert torch.equal(loaded.state_dict()[k], v), k


def test_shapes_are_inferred_for_resnet50():
    model = SimCLRModel("resnet50", 4, width=2, hidden_dim=6)
    ours = convert_official_state_dict(official_state_dict(model.state_dict()))
    assert infer_model_keys(ours) == {"arch": "resnet50", "width": 2, "hidden_dim": 6,
                                      "feature_dim": 4}


def read_json(path):
    return json.loads(path.read_text())


def test_eval_knn_official_equals_fastipirm_and_direct(setup, tmp_path, capsys):
    toml, cfg, model = setup
    official = save_official(model, tmp_path / "official" / "model_400.pth")
    run = tmp_path / "runs" / "tiny"
    save_fastipirm(model, cfg, run / "checkpoint.pt")

    assert cli.main(["eval", "knn", "--checkpoint", str(official), "--config", str(toml)]) == 0
    out = capsys.readouterr().out
    assert "official IP-IRM checkpoint without a config" in out and "kNN top-1" in out
    assert cli.main(["eval", "knn", "--checkpoint", str(run)]) == 0       # a run directory
    a = read_json(result_path(official, "knn_eval.json"))
    b = read_json(run / "knn_eval.json")
    memory, test = runtime.load_split(cfg, "train"), runtime.load_split(cfg, "test")
    direct = knn_evaluate(model, memory, test, k=20, temperature=cfg.knn_temperature,
                          batch_size=64, device=torch.device("cpu"), transform=eval_transform)
    assert a["knn_top1"] == b["knn_top1"] == direct["knn_top1"]
    assert a["knn_top5"] == b["knn_top5"] == direct["knn_top5"]
    assert a["k"] == 20 and a["temperature"] == cfg.knn_temperature == 0.5
    assert a["checkpoint_format"] == "official" and a["epoch"] == 400
    assert b["checkpoint_format"] == "fastipirm" and b["epoch"] == 3
    # --k / --temperature override the config
    assert cli.main(["eval", "knn", "--checkpoint", str(official), "--config", str(toml),
                     "--k", "5", "--temperature", "0.1"]) == 0
    c = read_json(result_path(official, "knn_eval.json"))
    assert c["k"] == 5 and c["temperature"] == 0.1


@pytest.mark.parametrize("flags", [[], ["--no-fixed-bn", "--augment"]])
def test_eval_linear_official_equals_fastipirm(setup, tmp_path, flags):
    toml, cfg, model = setup
    official = save_official(model, tmp_path / "official" / "model_400.pth", wrap=True)
    ckpt = save_fastipirm(model, cfg, tmp_path / "runs" / "tiny" / "checkpoint.pt")
    common = ["--no-progress", *flags]
    assert cli.main(["eval", "linear", "--checkpoint", str(official), "--config", str(toml),
                     *common]) == 0
    assert cli.main(["eval", "linear", "--checkpoint", str(ckpt), *common]) == 0
    a = read_json(result_path(official, "linear_eval.json"))
    b = read_json(ckpt.parent / "linear_eval.json")
    assert a["epochs"] == 2 and a["fixed_bn"] == (not flags) and a["augment"] == bool(flags)
    for key in ("final_top1", "final_top5", "best_top1", "best_epoch"):
        assert a[key] == b[key], key
    assert a["checkpoint_format"] == "official" and a["epoch"] == 5
    with open(result_path(official, "linear_eval.csv"), newline="") as fh:
        assert [r["epoch"] for r in csv.DictReader(fh)] == ["1", "2"]


def test_official_file_without_config_uses_the_official_stl_run(setup, tmp_path, capsys):
    _, _, model = setup
    official = save_official(model, tmp_path / "model_400.pth")
    empty = tmp_path / "no-data"
    empty.mkdir()
    code = cli.main(["eval", "knn", "--checkpoint", str(official),
                     "--set", f'data.root="{empty.as_posix()}"', "--set", "run.device=\"cpu\""])
    captured = capsys.readouterr()
    assert code == 1                                          # no STL-10 files here
    assert "default config (the official STL-10 run)" in captured.out
    assert "stl10" in captured.err and "Traceback" not in captured.err
    assert len(captured.err.strip().splitlines()) <= 3      # the data error of test_train


def test_config_of_a_fastipirm_checkpoint_wins(setup, tmp_path, capsys):
    toml, cfg, model = setup
    run = tmp_path / "runs" / "tiny"
    save_fastipirm(model, cfg, run / "checkpoint.pt")
    assert cli.main(["eval", "knn", "--checkpoint", str(run), "--config", str(toml)]) == 0
    out = capsys.readouterr().out
    assert f"--config {toml} is ignored" in out and "kNN top-1" in out
    # weights that do not fit the (overridden) model: one line, no traceback
    assert cli.main(["eval", "knn", "--checkpoint", str(run), "--set", "model.width=8"]) == 2
    err = capsys.readouterr().err
    assert "do not fit" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


def bad_files(tmp_path, model):
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint at all")
    no_tensors = tmp_path / "no_tensors.pt"
    torch.save({"epoch": 3, "note": "hello"}, no_tensors)
    other = tmp_path / "other.pt"
    torch.save(nn.Linear(3, 2).state_dict(), other)
    extra = tmp_path / "extra_f.pth"
    state = official_state_dict(model.state_dict())
    state["module.f.9.weight"] = torch.zeros(1)
    torch.save(state, extra)
    short = tmp_path / "short.pth"
    torch.save({k: v for k, v in official_state_dict(model.state_dict()).items()
                if not k.startswith("module.f.6.1.")}, short)
    big_stem = tmp_path / "big_stem.pth"
    state = official_state_dict(model.state_dict())
    state["module.f.0.weight"] = torch.zeros(4, 3, 7, 7)
    torch.save(state, big_stem)
    empty = tmp_path / "empty.pt"
    empty.write_bytes(b"")
    return [(garbage, "cannot be read"), (no_tensors, "no state dict of tensors"),
            (other, "none of these formats"), (extra, "f.9.weight"),
            (short, "cannot infer the architecture"), (big_stem, "7x7"),
            (empty, "cannot be read")]


@pytest.mark.parametrize("command", [["eval", "knn"], ["eval", "linear"], ["export"]])
def test_a_file_in_no_accepted_format_is_one_error_line(setup, tmp_path, capsys, command):
    toml, _, model = setup
    extra = ["--out", str(tmp_path / "x.pt")] if command == ["export"] else []
    for path, reason in bad_files(tmp_path, model):
        code = cli.main([*command, "--checkpoint", str(path), "--config", str(toml), *extra])
        err = capsys.readouterr().err
        assert code == 2, (path, err)
        lines = err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("fastipirm: error: "), err
        assert reason in err and "Traceback" not in err, err
        if reason not in ("cannot infer the architecture", "7x7"):
            assert "fastipirm checkpoint" in err and "official IP-IRM" in err, err
    # missing file, run directory without a checkpoint: exit 1, one line
    for missing in (tmp_path / "nope.pth", tmp_path):
        assert cli.main([*command, "--checkpoint", str(missing), *extra]) == 1
        err = capsys.readouterr().err
        assert ("does not exist" in err or "a folder without checkpoint.pt" in err) and \
            len(err.strip().splitlines()) == 1


def test_official_file_of_an_old_pytorch_without_num_batches_tracked(setup, tmp_path):
    toml, _, model = setup
    state = {k: v for k, v in official_state_dict(model.state_dict()).items()
             if not k.endswith("num_batches_tracked")}
    path = tmp_path / "model_200.pth"
    torch.save(state, path)
    loaded, _, mf = load_model(path, config=toml, log=lambda *a: None)
    x = torch.randn(3, 3, 16, 16)
    assert mf.epoch == 200 and torch.equal(features(loaded, x), features(model, x))


def test_results_of_files_in_one_folder_do_not_overwrite_each_other(tmp_path):
    run = tmp_path / "runs" / "tiny"
    run.mkdir(parents=True)
    assert result_path(run, "knn_eval.json") == run / "knn_eval.json"
    assert result_path(run / "checkpoint.pt", "knn_eval.json") == run / "knn_eval.json"
    a, b = (result_path(tmp_path / f"model_{e}.pth", "knn_eval.json") for e in (25, 400))
    assert a.name == "model_25.knn_eval.json" and b.name == "model_400.knn_eval.json"
