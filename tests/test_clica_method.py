"""CL-ICA as a fastipirm method: its loss against the official formula, its config checks, and
short ``fastipirm train`` runs on the embedded generated data (outputs, learning, exact resume)."""
import json

import pytest
import torch

from fastipirm import cli
from fastipirm import train as trainmod
from fastipirm.checkpoint import load_checkpoint
from fastipirm.config import load_config, write_config
from fastipirm.losses import clica_infonce

# ---------------------------------------------------------------- the loss


def official_clica_loss(h, h_pos, p, tau):
    """CL-ICA's training loss as the official ``main_mlp.py`` builds it (docs/clica.md#loss),
    written literally: the negatives of anchor i are every anchor of the batch, itself included;
    L_p^p distances (``LpSimCLRLoss``) or, for p = 0, dot products (``SimCLRLoss``)."""
    losses = []
    for i in range(h.shape[0]):
        if p == 0:
            pos = (h[i] * h_pos[i]).sum()
            negs = torch.stack([(h[i] * h[j]).sum() for j in range(h.shape[0])])
            terms = torch.cat([negs / tau, (pos / tau)[None]])
            losses.append(-pos / tau + torch.logsumexp(terms, 0))
        else:
            pos = ((h[i] - h_pos[i]).abs() ** p).sum()
            negs = torch.stack([((h[i] - h[j]).abs() ** p).sum() for j in range(h.shape[0])])
            terms = torch.cat([-negs / tau, (-pos / tau)[None]])
            losses.append(pos / tau + torch.logsumexp(terms, 0))
    return torch.stack(losses).mean()


@pytest.mark.parametrize("p", [0, 1, 2, 3])
@pytest.mark.parametrize("tau", [1.0, 0.05])
def test_clica_loss_equals_the_official_formula(p, tau, seed):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(23, 5, generator=g, dtype=torch.float64) * 0.4
    h_pos = h + 0.05 * torch.randn(23, 5, generator=g, dtype=torch.float64)
    if p == 0:
        h, h_pos = (torch.nn.functional.normalize(t, dim=1) for t in (h, h_pos))
    a, b = h.clone().requires_grad_(), h_pos.clone().requires_grad_()
    want = official_clica_loss(a, b, p, tau)
    want.backward()
    want_grads = a.grad, b.grad
    a2, b2 = h.clone().requires_grad_(), h_pos.clone().requires_grad_()
    got = clica_infonce(a2, b2, p=p, temperature=tau, backend="torch")
    got.backward()
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12, msg=f"seed {seed}")
    torch.testing.assert_close(a2.grad, want_grads[0], rtol=1e-8, atol=1e-10)
    torch.testing.assert_close(b2.grad, want_grads[1], rtol=1e-8, atol=1e-10)


def test_clica_loss_rejects_p_between_0_and_1():
    h = torch.randn(4, 3)
    with pytest.raises(ValueError, match="clica.p"):
        clica_infonce(h, h, p=0.5, temperature=1.0)


# ---------------------------------------------------------------- config

TINY = """
[run]
name = "clica_tiny"
output_dir = "{out}"
seed = {seed}
threads = 2
log_every = 10
ckpt_every = 1
progress = false
tensorboard = false
plot = {plot}

[data]
name = "latent_mixing"

[model]
arch = "clica_mlp"
channels_last = false

[train]
epochs = {epochs}
batch_size = 256
lr = 1e-3
weight_decay = 0.0
temperature = 0.05
amp = "none"

[method]
name = "clica"

[clica]
n = 2
mixing_layers = 3
cond_samples = 2000
c_p = 1.0
c_param = 0.05
p = 1.0
output_norm = "box"
steps_per_epoch = {steps}
eval_samples = 2048
num_eval_batches = 4
"""


def tiny(tmp_path, epochs=6, steps=50, plot=False, seed=0, sets=()):
    path = tmp_path / "clica.toml"
    path.write_text(TINY.format(out=(tmp_path / "runs").as_posix(), epochs=epochs, steps=steps,
                                plot=str(plot).lower(), seed=seed))
    if sets:
        write_config(load_config(path, list(sets)), path)
    return path


@pytest.mark.parametrize("sets, message", [
    (["data.name=stl10"], "data.name: method clica trains on"),
    (["model.arch=resnet18"], "model.arch: data.name = .latent_mixing. is encoded by"),
    (["model.arch=clica_resnet18"], "clica_mlp, got .clica_resnet18."),
    (["data.name=threedident", "model.arch=clica_resnet18", "clica.p=0"], "clica.p: the image"),
    (["data.name=kitti_masks", "model.arch=clica_kitti_conv", "clica.output_norm=auto"],
     "clica.output_norm: the image encoders"),
    (["method.name=ipirm"], "method.name: 'ipirm' trains on images"),
    (["clica.c_p=0"], "von Mises-Fisher"),
    (["clica.space=unbounded", "clica.m_p=0"], "uniform"),
    (["clica.box_min=1.0"], "clica.box_min"),
    (["clica.p=0.5"], "clica.p"),
    (["clica.cond_thresh_ratio=1.0"], "clica.cond_thresh_ratio"),
    (["clica.space=torus"], "clica.space"),
    (["run.compare_baseline=true"], "clica_supervised"),
    (["run.compare_random=true"], "raw observations"),
])
def test_bad_clica_configs_name_the_key(tmp_path, sets, message):
    with pytest.raises(ValueError, match=message):
        load_config(tiny(tmp_path), sets)


def test_the_shipped_clica_configs_load():
    for name in ("mlp_box_normal_l2_cpu", "mlp_box_laplace_l1_cpu"):
        cfg = load_config(f"configs/clica/{name}.toml")
        assert cfg.method.name == "clica" and cfg.clica.n == 5 and cfg.train.batch_size == 1024
    for name in ("mlp_paper_box_normal_l2", "mlp_paper_box_laplace_l1"):
        cfg = load_config(f"configs/clica/{name}.toml")
        assert cfg.clica.n == 10 and cfg.train.batch_size == 6144
        assert cfg.train.epochs * cfg.clica.steps_per_epoch == 300_000
    cfg = load_config("configs/clica/threedident_box_normal.toml")
    assert (cfg.data.name, cfg.model.arch, cfg.train.batch_size) == ("threedident",
                                                                     "clica_resnet18", 512)
    assert cfg.train.epochs * cfg.clica.steps_per_epoch == 30_000
    cfg = load_config("configs/clica/kitti_masks_laplace_box.toml")
    assert (cfg.data.name, cfg.model.arch, cfg.clica.p) == ("kitti_masks", "clica_kitti_conv", 1)
    assert cfg.train.epochs * cfg.clica.steps_per_epoch == 300_000


# ---------------------------------------------------------------- training runs


def test_short_run_learns_and_writes_its_outputs(tmp_path):
    """300 steps through the CLI (n = 2, L1 with the box output, lr 1e-3): R² and MCC in
    metrics.csv and summary.json (with their std over the fresh evaluation batches and the raw
    observations' scores), curves.png, and final R² and MCC above the raw observations' (seed 0:
    0.997 / 0.997 against 0.915 / 0.741)."""
    assert cli.main(["train", "--config", str(tiny(tmp_path, plot=True))]) == 0
    run = tmp_path / "runs" / "clica_tiny"
    summary = json.loads((run / "summary.json").read_text())
    for key in ("r2", "r2_std", "mcc", "mcc_std", "raw_r2", "raw_mcc"):
        assert isinstance(summary[key], float), key
    assert summary["eval_batches"] == 4 and summary["steps"] == 300
    assert summary["r2"] > summary["raw_r2"] and summary["mcc"] > summary["raw_mcc"], summary
    history = load_checkpoint(run / "checkpoint.pt")["history"]
    assert [h["epoch"] for h in history] == [1, 2, 3, 4, 5, 6]
    assert all(0 <= h["r2"] <= 1 and 0 <= h["mcc"] <= 1 for h in history)
    assert history[-1]["loss"] < history[0]["loss"]
    header = (run / "metrics.csv").read_text().splitlines()[0].split(",")
    assert "r2" in header and "mcc" in header
    assert (run / "curves.png").stat().st_size > 1000


class Killed(Exception):
    pass


def test_kill_and_resume_is_exact(tmp_path):
    """Interrupted after epoch 1 and resumed, a CL-ICA run equals the uninterrupted one bit for
    bit: the latent pairs and the evaluation samples are streams of (seed, epoch)."""
    path = tiny(tmp_path, epochs=3, steps=10)
    trainmod.train(load_config(path, ["run.name=full"]), log=lambda *a: None)

    def kill(epoch, state):
        if epoch == 1:
            raise Killed

    with pytest.raises(Killed):
        trainmod.train(load_config(path, ["run.name=cut"]), log=lambda *a: None,
                       on_epoch_end=kill)
    assert cli.main(["train", "--resume", str(tmp_path / "runs" / "cut")]) == 0
    a = load_checkpoint(tmp_path / "runs" / "full")
    b = load_checkpoint(tmp_path / "runs" / "cut")
    assert a["step"] == b["step"] == 30
    for key in ("loss", "r2", "mcc"):
        assert [h[key] for h in a["history"]] == [h[key] for h in b["history"]], key
    for k, v in a["model"].items():
        assert torch.equal(v, b["model"][k]), k
    sa = json.loads((tmp_path / "runs" / "full" / "summary.json").read_text())
    sb = json.loads((tmp_path / "runs" / "cut" / "summary.json").read_text())
    assert (sa["r2"], sa["mcc"], sa["raw_r2"]) == (sb["r2"], sb["mcc"], sb["raw_r2"])


def test_supervised_baseline_regresses_the_latents(tmp_path):
    """``method.name = "clica_supervised"`` (the official supervised baseline): MSE of the codes
    against the true latents, which it recovers almost exactly in 300 steps (n = 2)."""
    path = tiny(tmp_path, sets=["method.name=clica_supervised", "run.name=sup"])
    summary = trainmod.train(load_config(path), log=lambda *a: None)
    assert summary["method"] == "clica_supervised" and summary["steps"] == 300
    assert summary["r2"] > 0.99 and summary["mcc"] > 0.99, summary
    history = load_checkpoint(tmp_path / "runs" / "sup")["history"]
    assert history[-1]["loss"] < 0.1 * history[0]["loss"]

