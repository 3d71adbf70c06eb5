"""The method seam: the registry, SimCLR's step, and a new method trained by the unchanged loop
(its metrics, epoch fields, checkpoint state and exact resume)."""
import copy
import csv

import pytest
import torch
import torch.nn.functional as F

from fastipirm import train as trainmod
from fastipirm.checkpoint import load_checkpoint
from fastipirm.config import Config, load_config
from fastipirm.losses import nt_xent
from fastipirm.methods import METHODS, MethodContext, SimCLR, build_method
from fastipirm.models import SimCLRModel
from test_train import tiny_config, train_killed_after

pytestmark = pytest.mark.usefixtures("one_thread")


def test_registry_and_unknown_name():
    assert set(METHODS) >= {"simclr", "ipirm"}
    with pytest.raises(ValueError, match="method.name: 'byol' is not one of"):
        build_method("byol", None)


def test_nt_xent_is_the_literal_simclr_loss(seed):
    z1 = F.normalize(torch.randn(7, 5, dtype=torch.float64), dim=1)
    z2 = F.normalize(torch.randn(7, 5, dtype=torch.float64), dim=1)
    f = torch.cat([z1, z2])
    logits = (f @ f.T / 0.3).fill_diagonal_(float("-inf"))
    target = (torch.arange(14) + 7) % 14
    want = F.cross_entropy(logits, target)
    torch.testing.assert_close(nt_xent(z1, z2, temperature=0.3), want, rtol=1e-10, atol=1e-12)


def test_simclr_step_is_forward_nt_xent_backward_adam():
    torch.manual_seed(0)
    a = SimCLRModel("resnet18", feature_dim=8, width=2, hidden_dim=8)
    b = copy.deepcopy(a)
    g = torch.Generator().manual_seed(1)
    v1, v2 = torch.randn(2, 8, 3, 8, 8, generator=g)
    opt_a = torch.optim.Adam(a.parameters(), lr=1e-3, weight_decay=1e-6)
    ref = nt_xent(a(v1)[1], a(v2)[1], temperature=0.5, check_values=False)
    opt_a.zero_grad(set_to_none=True)
    ref.backward()
    opt_a.step()
    cfg = Config()
    cfg.model.channels_last = False
    opt_b = torch.optim.Adam(b.parameters(), lr=1e-3, weight_decay=1e-6)
    method = build_method("simclr", MethodContext(cfg, b, opt_b, torch.device("cpu")))
    loss, parts = method.step(torch.arange(8), v1, v2)
    assert torch.equal(loss, ref.detach()) and parts == {}
    for pa, pb in zip(a.parameters(), b.parameters()):
        assert torch.equal(pa, pb)


class Counting(SimCLR):
    """A new method: SimCLR plus a metric, an epoch field and state of its own."""
    name, label = "counting", "Counting"
    metric_names = ("half",)
    epoch_fields = ("epochs_seen",)

    def __init__(self, ctx):
        super().__init__(ctx)
        self.epochs_seen = 0

    def step(self, indices, view1, view2):
        loss, _ = super().step(indices, view1, view2)
        return loss, {"half": loss / 2}

    def end_epoch(self, epoch, *, last):
        self.epochs_seen += 1
        return {"epochs_seen": self.epochs_seen}

    def state_dict(self):
        return {"epochs_seen": self.epochs_seen}

    def load_state_dict(self, state):
        self.epochs_seen = state["epochs_seen"]


def test_a_new_method_runs_on_the_unchanged_loop(tmp_path, monkeypatch):
    monkeypatch.setitem(METHODS, "counting", Counting)
    cfg_path = tiny_config(tmp_path)
    sets = ["method.name=counting", "train.epochs=3", "eval.knn_every=0"]
    full = trainmod.train(load_config(cfg_path, sets + ["run.name=full"]), log=lambda *a: None)
    train_killed_after(load_config(cfg_path, sets + ["run.name=cut"]), 2)
    resumed = trainmod.train(load_config(cfg_path, sets + ["run.name=cut"]),
                             resume=str(tmp_path / "runs" / "cut"), log=lambda *a: None)
    assert full["kind"] == resumed["kind"] == "Counting" and "partitions" not in full
    a, b = load_checkpoint(tmp_path / "runs" / "full"), load_checkpoint(tmp_path / "runs" / "cut")
    assert a["method"] == b["method"] == {"epochs_seen": 3}
    with open(tmp_path / "runs" / "cut" / "metrics.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert [int(r["epochs_seen"]) for r in rows] == [1, 2, 3]
    for r, h in zip(rows, a["history"]):
        assert float(r["half"]) == pytest.approx(float(r["loss"]) / 2)
        assert float(r["loss"]) == h["loss"]                  # resumed == uninterrupted
