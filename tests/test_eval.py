"""kNN monitor and linear probe on toy data: separable features, eval mode, the probe learns."""
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fastipirm import eval as ev


pytestmark = pytest.mark.usefixtures("one_thread")



def to_float(images):
    return images.permute(0, 3, 1, 2).float() / 255.0


def colour_dataset(n, seed, num_classes=3):
    """Images whose class is their dominant colour channel (plus noise)."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, num_classes, n)
    images = rng.integers(0, 90, (n, 8, 8, 3))
    images[np.arange(n), :, :, labels] += 150
    return SimpleNamespace(images=images.astype(np.uint8), labels=labels.astype(np.int64),
                           num_classes=num_classes, name="toy")


class ModeRecorder(torch.nn.Module):
    """An encoder with BN that records the mode of every call; colour means as features."""

    def __init__(self):
        super().__init__()
        self.bn = torch.nn.BatchNorm2d(3)
        self.modes = []

    def forward(self, x):
        self.modes.append(self.bn.training)
        return self.bn(x).mean((2, 3))


class Wrapper(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.encoder = ModeRecorder()

    def forward(self, x):
        h = self.encoder(x)
        return F.normalize(h, dim=1), F.normalize(h, dim=1)


def test_knn_on_separable_features_is_perfect():
    g = torch.Generator().manual_seed(0)
    centres = F.normalize(torch.randn(4, 32, generator=g), dim=1)
    mem_labels = torch.arange(400) % 4
    q_labels = torch.arange(100) % 4
    memory = F.normalize(centres[mem_labels] + 0.05 * torch.randn(400, 32, generator=g), dim=1)
    queries = F.normalize(centres[q_labels] + 0.05 * torch.randn(100, 32, generator=g), dim=1)
    ranks = ev.knn_predict(queries, memory, mem_labels, 4, k=200, temperature=0.5, chunk=32)
    top1, top5 = ev.topk_accuracy(ranks, q_labels)
    assert top1 == 100.0 and top5 == 100.0
    # k larger than the memory is clamped; random labels give chance-level accuracy
    ranks = ev.knn_predict(queries, memory, torch.randint(0, 4, (400,), generator=g), 4, k=5000,
                           temperature=0.5)
    assert ev.topk_accuracy(ranks, q_labels)[0] < 60


def test_knn_weights_are_exp_cos_over_t():
    memory = torch.tensor([[1.0, 0.0], [0.6, 0.8], [0.0, 1.0]])
    labels = torch.tensor([0, 1, 1])
    q = F.normalize(torch.tensor([[0.9, 0.45]]), dim=1)
    # class 0: exp(cos0/T); class 1: exp(cos1/T) + exp(cos2/T); pick T where they differ in order
    for t in (0.05, 5.0):
        s = q @ memory.T
        score0, score1 = (s[0, 0] / t).exp(), (s[0, 1] / t).exp() + (s[0, 2] / t).exp()
        expect = 0 if score0 > score1 else 1
        assert ev.knn_predict(q, memory, labels, 2, k=3, temperature=t)[0, 0].item() == expect


def test_knn_evaluate_uses_eval_mode_and_restores_it():
    memory, test = colour_dataset(120, 1), colour_dataset(60, 2)
    model = Wrapper().train()
    res = ev.knn_evaluate(model, memory, test, k=20, temperature=0.5, batch_size=32,
                          device=torch.device("cpu"), transform=to_float)
    assert model.encoder.modes and not any(model.encoder.modes)
    assert model.training
    assert res["knn_top1"] > 90


def test_linear_probe_learns_and_leaves_the_encoder_alone():
    train, test = colour_dataset(300, 3), colour_dataset(120, 4)
    enc = ModeRecorder()
    before = {k: v.clone() for k, v in enc.state_dict().items()}
    res = ev.linear_probe(enc, train, test, epochs=60, batch_size=64, lr=0.05,
                          test_transform=to_float, device=torch.device("cpu"), seed=0)
    assert res["final_top1"] > 90 and res["best_top1"] >= res["final_top1"]
    assert res["history"][0]["train_loss"] > res["history"][-1]["train_loss"]
    for k, v in enc.state_dict().items():          # the probe works on a copy
        assert torch.equal(v, before[k]), k


class SharedLog(ModeRecorder):
    """Logs to a class attribute, which survives the probe's deep copy of the encoder."""
    log = []

    def forward(self, x):
        SharedLog.log.append((self.bn.training, int(self.bn.num_batches_tracked)))
        return super().forward(x)


def test_linear_probe_bn_modes():
    """Official: BN in train mode while the probe trains, eval mode for the test; fixed_bn: eval."""
    train, test = colour_dataset(64, 5), colour_dataset(32, 6)

    def aug(images, gen):
        return to_float(images)

    SharedLog.log = []
    ev.linear_probe(SharedLog(), train, test, epochs=2, batch_size=32, fixed_bn=False,
                    augment=aug, test_transform=to_float, device=torch.device("cpu"))
    modes = [m for m, _ in SharedLog.log]
    assert True in modes and False in modes         # train-mode probe steps, eval-mode test
    assert SharedLog.log[-1][1] == 4                # running statistics drifted (official)
    SharedLog.log = []
    ev.linear_probe(SharedLog(), train, test, epochs=2, batch_size=32, fixed_bn=True,
                    augment=aug, test_transform=to_float, device=torch.device("cpu"))
    assert SharedLog.log and not any(m for m, _ in SharedLog.log)
    assert all(n == 0 for _, n in SharedLog.log)


def test_factor_evaluation_reads_each_factor():
    train, test = colour_dataset(300, 7), colour_dataset(150, 8)
    rng = np.random.default_rng(0)
    for d in (train, test):
        d.factors = {"colour": d.labels.copy(), "coin": rng.integers(0, 2, len(d.labels)),
                     "size": rng.random(len(d.labels)).astype(np.float32)}  # continuous: skipped
    model = Wrapper().train()
    res = ev.factor_evaluation(model, train, test, k=20, temperature=0.5, batch_size=64,
                               device=torch.device("cpu"), transform=to_float,
                               linear_epochs=40, linear_batch_size=64, linear_lr=0.05,
                               linear_weight_decay=0.0)
    assert set(res) == {"colour", "coin"} and res["colour"]["num_classes"] == 3
    assert res["colour"]["knn_top1"] > 90 and res["colour"]["linear_top1"] > 90
    assert res["coin"]["knn_top1"] < 70 and res["coin"]["linear_top1"] < 70   # chance: 50
    assert model.training and not any(model.encoder.modes)


def test_unlabelled_split_is_rejected():
    data = SimpleNamespace(images=np.zeros((4, 8, 8, 3), np.uint8), labels=None, num_classes=0,
                           name="u")
    with pytest.raises(ValueError, match="no labels"):
        ev.knn_evaluate(Wrapper(), data, data, k=2, temperature=0.5, batch_size=2,
                        device=torch.device("cpu"), transform=to_float)
