"""Checkpoint I/O: format check, RNG capture/restore, and first-format checkpoints resume."""
import random

import numpy as np
import pytest
import torch

from fastipirm import cli
from fastipirm import train as trainmod
from fastipirm.checkpoint import (capture_rng, config_from_checkpoint, load_checkpoint,
                                  restore_rng)
from fastipirm.config import MOVED, load_config
from test_train import tiny_config, train_killed_after

pytestmark = pytest.mark.usefixtures("one_thread")


def test_rng_capture_and_restore():
    g = torch.Generator().manual_seed(3)
    state = capture_rng(torch.device("cpu"), {"augment": g})
    want = (torch.rand(3), np.random.rand(3), random.random(), torch.rand(3, generator=g))
    restore_rng(state, torch.device("cpu"), {"augment": g})
    got = (torch.rand(3), np.random.rand(3), random.random(), torch.rand(3, generator=g))
    assert torch.equal(want[0], got[0]) and np.array_equal(want[1], got[1])
    assert want[2] == got[2] and torch.equal(want[3], got[3])


def test_not_a_checkpoint(tmp_path):
    torch.save({"format": "something-else"}, tmp_path / "x.pt")
    with pytest.raises(ValueError, match="is not a fastipirm checkpoint"):
        load_checkpoint(tmp_path / "x.pt")
    with pytest.raises(FileNotFoundError):
        load_checkpoint(tmp_path / "missing.pt")


def _as_first_format(ckpt: dict) -> dict:
    """The layout of the first checkpoint format: method state at the top level, the config
    before [method], [ipirm] and [op] existed."""
    old = dict(ckpt, format="fastipirm-checkpoint-1")
    old.update(old.pop("method"))
    cfg = {k: dict(v) for k, v in old["config"].items()}
    for (old_section, name), (new_section, _) in MOVED.items():
        cfg[old_section][name] = cfg[new_section].pop(name)
    cfg["train"]["baseline"] = cfg.pop("method")["name"] == "simclr"
    del cfg["ipirm"], cfg["op"]
    old["config"] = cfg
    return old


def test_first_format_checkpoint_resumes_exactly(tmp_path):
    cfg_path = tiny_config(tmp_path)
    sets = ["train.epochs=2", "eval.knn_every=0", "partition.maximize_iter=1"]
    trainmod.train(load_config(cfg_path, sets + ["run.name=full"]), log=lambda *a: None)
    train_killed_after(load_config(cfg_path, sets + ["run.name=cut"]), 1)
    path = tmp_path / "runs" / "cut" / "checkpoint.pt"
    torch.save(_as_first_format(torch.load(path, weights_only=False)), path)
    assert config_from_checkpoint(path).method.name == "ipirm"
    assert cli.main(["train", "--resume", str(path)]) == 0
    a, b = load_checkpoint(tmp_path / "runs" / "full"), load_checkpoint(path)
    assert b["format"] == "fastipirm-checkpoint-2" and b["epoch"] == 2
    assert torch.equal(a["method"]["partitions"], b["method"]["partitions"])
    assert [h["loss"] for h in a["history"]] == [h["loss"] for h in b["history"]]
