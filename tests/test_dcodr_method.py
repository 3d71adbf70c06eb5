"""DCoDR's loss against the official formula, its domain-block batches, its positive views, and
short DCoDR-norec runs through the trainer."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fastipirm.data.dcodr_augment import dcodr_positive_views, gaussian_blur5
from fastipirm.data.domain_batches import domain_batch_indices, domain_values
from fastipirm.losses.dcodr import dcodr_contrastive_loss


def fresh_seed():
    return int(torch.randint(0, 2**31 - 1, ()).item())


def official_dcodr_loss(z, z_pos, domains, tau, domain_negatives=True, positives=True,
                        alpha=0.5):
    """The official SimCLR_Loss_w_Pos with one positive, written literally: normalised codes;
    anchor i's negatives are the other anchors of its domain (or every other anchor);
    l_i = -2 [alpha LSE(s_i+) - (1 - alpha) LSE(negatives U {s_i+})]."""
    z = z / z.norm(dim=1, keepdim=True)
    z_pos = z_pos / z_pos.norm(dim=1, keepdim=True)
    losses = []
    for i in range(z.shape[0]):
        pos = (z[i] * z_pos[i]).sum() / tau if positives else torch.tensor(1.0 / tau,
                                                                              dtype=z.dtype)
        negs = [(z[i] * z[j]).sum() / tau for j in range(z.shape[0])
                if j != i and (not domain_negatives or domains[j] == domains[i])]
        terms = torch.stack(negs + [pos])
        losses.append(-2 * (alpha * pos - (1 - alpha) * torch.logsumexp(terms, 0)))
    return torch.stack(losses).mean()


@pytest.mark.parametrize("domain_negatives, positives", [(True, True), (False, True),
                                                         (True, False)])
def test_loss_and_gradients_equal_the_official_formula(domain_negatives, positives):
    g = torch.Generator().manual_seed(fresh_seed())
    blocks = [7, 5, 9, 1]                                  # a one-member domain included
    domains = torch.cat([torch.full((b,), d) for d, b in enumerate(blocks)])
    z = torch.randn(len(domains), 11, generator=g, dtype=torch.float64, requires_grad=True)
    z_pos = torch.randn(len(domains), 11, generator=g, dtype=torch.float64, requires_grad=True)
    tau = 0.2
    got = dcodr_contrastive_loss(z, z_pos, domains, temperature=tau,
                                 domain_negatives=domain_negatives, positives=positives,
                                 backend="torch")
    want = official_dcodr_loss(z, z_pos, domains, tau, domain_negatives, positives)
    assert torch.allclose(got, want, rtol=1e-10, atol=1e-10)
    gz, gp = torch.autograd.grad(got, (z, z_pos), allow_unused=True)
    wz, wp = torch.autograd.grad(want, (z, z_pos), allow_unused=True)
    assert torch.allclose(gz, wz, atol=1e-10)
    if positives:
        assert torch.allclose(gp, wp, atol=1e-10)
    else:
        assert gp is None or float(gp.abs().max()) == 0


def test_batches_are_contiguous_same_domain_blocks():
    rng = np.random.default_rng(fresh_seed())
    domains = np.repeat(np.arange(6), [40, 33, 70, 10, 45, 52])
    rng.shuffle(domains)
    g = torch.Generator().manual_seed(1)
    batches = domain_batch_indices(domains, 4, 32, g)
    assert len(batches) == (len(domains) - 1) // 128
    for b in batches:
        blocks = []
        start = 0
        while start < len(b):
            d = domains[b[start]]
            end = start
            while end < len(b) and domains[b[end]] == d:
                end += 1
            blocks.append((d, end - start))
            start = end
        assert len(blocks) == 4 and len({d for d, _ in blocks}) == 4
        for d, size in blocks:                         # full blocks, or the whole short domain
            assert size == min(32, int((domains == d).sum()))
        assert len(set(b.tolist())) == len(b)
    again = domain_batch_indices(domains, 4, 32, torch.Generator().manual_seed(1))
    assert all(np.array_equal(a, b) for a, b in zip(batches, again))


def test_a_domain_is_not_repeated_before_its_list_is_used_up():
    domains = np.repeat(np.arange(2), [96, 96])          # Edges2Shoes-like: 2 domains
    batches = domain_batch_indices(domains, 4, 32, torch.Generator().manual_seed(fresh_seed()))
    assert len(batches) == (192 - 1) // 64
    seen = np.concatenate(batches)
    for d in range(2):
        mine = seen[domains[seen] == d]
        assert len(set(mine[:96].tolist())) == len(mine[:96])   # one pass before a reshuffle


def test_domain_values_of_a_factor_or_the_labels():
    class Data:
        name = "toy"
        factors = {"background": np.array([0, 1, 1]), "shape": np.array([2, 0, 1])}
        labels = np.array([5, 6, 7])

    assert domain_values(Data, "background").tolist() == [0, 1, 1]
    assert domain_values(Data).tolist() == [5, 6, 7]
    with pytest.raises(ValueError, match="data.domain_factor: 'size' is not a factor"):
        domain_values(Data, "size")


def reference_blur(x):
    k = torch.exp(-0.5 * torch.arange(-2, 3, dtype=x.dtype) ** 2)
    k = torch.outer(k, k) / k.sum() ** 2
    pad = F.pad(x, (2, 2, 2, 2), mode="reflect")
    out = torch.zeros_like(x)
    for dy in range(5):
        for dx in range(5):
            out += k[dy, dx] * pad[..., dy:dy + x.shape[-2], dx:dx + x.shape[-1]]
    return out


def test_positive_views_follow_the_four_official_augmentations():
    g = torch.Generator().manual_seed(fresh_seed())
    x = torch.rand(8, 3, 12, 10, generator=g, dtype=torch.float64)
    assert torch.allclose(gaussian_blur5(x), reference_blur(x), atol=1e-12)
    for k in range(4):
        out = dcodr_positive_views(x, torch.Generator().manual_seed(3),
                                   choice=torch.full((8,), k))
        assert out.shape == x.shape and float(out.min()) >= 0 and float(out.max()) <= 1 + 1e-9
        gray = 0.299 * x[:, 0] + 0.587 * x[:, 1] + 0.114 * x[:, 2]
        if k == 0:
            assert torch.allclose(out, reference_blur(x), atol=1e-12)
        elif k in (1, 3):                                # blends with factor in [1.8, 3]
            target = gray.mean(dim=(1, 2))[:, None, None, None] if k == 1 else gray[:, None]
            ok = (out > 1e-9) & (out < 1 - 1e-9)            # not clamped
            f = ((out - target) / (x - target))[ok & ((x - target).abs() > 0.05)]
            assert float(f.min()) >= 1.8 - 1e-6 and float(f.max()) <= 3 + 1e-6
        else:                                            # a resized crop
            assert not torch.allclose(out, x)
    grey = x[:, :1].expand(-1, 3, -1, -1)
    views = dcodr_positive_views(grey.contiguous(), torch.Generator().manual_seed(4))
    assert torch.allclose(views[:, 0], views[:, 1]) and torch.allclose(views[:, 1], views[:, 2])


# ------------------------------------------------------------------ runs through the trainer

TINY = """
[run]
name = "tiny"
output_dir = "{out}"
seed = 1
threads = 2
progress = false
log_every = 2
ckpt_every = 1

[data]
name = "synthetic"
split = "train"
memory_split = "train"
test_split = "test"
num_samples = 256
eval_num_samples = 128
image_size = 32
crop_size = 32
domain_factor = "background"
num_backgrounds = 4
num_colors = 3
rotation = 0.0

[model]
arch = "resnet18"
width = 4
hidden_dim = 16
feature_dim = 16
channels_last = false

[train]
epochs = {epochs}
batch_size = 32
lr = 1e-3
weight_decay = 0.0
temperature = 0.2
betas = [0.5, 0.999]
amp = "none"

[method]
name = "{method}"

[dcodr]
samples_per_domain = 8
generator_width = 8
vgg_path = "{vgg}"

[eval]
knn_every = 0
factors = false
factor_probes = true
probe_epochs = 3
"""


def tiny_config(tmp_path, method="dcodr_norec", epochs=2, sets=()):
    from fastipirm.config import load_config
    from fastipirm.losses.perceptual import VGG16Features

    vgg = tmp_path / "vgg16.pth"
    if method == "dcodr" and not vgg.exists():
        torch.save(VGG16Features().state_dict(), vgg)
    path = tmp_path / f"{method}.toml"
    path.write_text(TINY.format(out=(tmp_path / "runs").as_posix(), epochs=epochs,
                                method=method, vgg=vgg.as_posix()))
    return load_config(path, list(sets))


def test_dcodr_norec_run_writes_the_probes_and_resumes_exactly(tmp_path):
    from fastipirm import train as trainmod
    from fastipirm.checkpoint import load_checkpoint

    class Killed(Exception):
        pass

    summary = trainmod.train(tiny_config(tmp_path, sets=["run.name=full"]), log=lambda s: None)
    assert summary["domain_factor"] == "background"
    assert set(summary["probes"]) >= {"background", "shape", "color"}
    assert 0 <= summary["retrieval"]["all"] <= 1          # every factor but the domain exact
    for res in summary["probes"].values():
        assert 0 <= res["accuracy"] <= 1 and 0 < res["chance"] < 1

    def kill(epoch, state):
        if epoch == 1:
            raise Killed

    with pytest.raises(Killed):
        trainmod.train(tiny_config(tmp_path, sets=["run.name=cut"]), log=lambda s: None,
                       on_epoch_end=kill)
    cut = tiny_config(tmp_path, sets=["run.name=cut"])
    trainmod.train(cut, resume=str(tmp_path / "runs" / "cut"), log=lambda s: None)
    a = load_checkpoint(tmp_path / "runs" / "full")
    b = load_checkpoint(tmp_path / "runs" / "cut")
    assert a["step"] == b["step"] == 2 * ((256 - 1) // 32)
    assert [h["loss"] for h in a["history"]] == [h["loss"] for h in b["history"]]
    for k, v in a["model"].items():
        assert torch.equal(v, b["model"][k]), k
    assert list(a["optimizer"]["param_groups"][0]["betas"]) == [0.5, 0.999]


def test_dcodr_with_reconstruction_trains_its_generator(tmp_path):
    from fastipirm import train as trainmod
    from fastipirm.checkpoint import load_checkpoint

    summary = trainmod.train(tiny_config(tmp_path, "dcodr", epochs=1), log=lambda s: None)
    ckpt = load_checkpoint(tmp_path / "runs" / "tiny")
    row = ckpt["history"][0]
    assert row["reconstruction"] > 0 and row["contrastive"] > 0
    assert abs(row["loss"] - (row["contrastive"] + 0.3 * row["reconstruction"])) < 1e-4
    assert "generator" in ckpt["method"]
    lrs = sorted(g["lr"] for g in ckpt["optimizer"]["param_groups"])
    assert lrs == [3e-4, 1e-3, 3e-3]            # generator, encoder (train.lr), embedding
    assert "probes" in summary


@pytest.mark.parametrize("sets, message", [
    (["method.name=dcodr", "dcodr.vgg_path="], "dcodr.vgg_path"),
    (["model.arch=dcodr_resnet50"], "dcodr.moco_path"),
    (["method.name=simclr", "model.arch=dcodr_resnet50"], "DCoDR's encoder"),
    (["train.betas=[0.5]"], "train.betas"),
])
def test_bad_dcodr_configs_name_the_key(tmp_path, sets, message):
    with pytest.raises(ValueError, match=message):
        tiny_config(tmp_path, sets=sets)


def test_random_init_encoder_says_so(tmp_path):
    from fastipirm import runtime

    cfg = tiny_config(tmp_path, sets=["model.arch=dcodr_resnet50", 'dcodr.init="random"'])
    lines = []
    model = runtime.training_model(cfg, torch.device("cpu"), resuming=False, log=lines.append)
    assert any("random weights" in s for s in lines)
    assert model(torch.rand(2, 3, 32, 32)).shape == (2, 128)


def test_the_shipped_dcodr_configs_follow_the_official_scripts():
    from fastipirm.config import load_config

    table = {"cars3d": (0.2, 1e-4, False), "smallnorb": (0.2, 3e-4, True),
             "celeba": (0.2, 1e-3, False), "edges2shoes": (0.1, 1e-3, False),
             "shapes3d": (0.1, 1e-4, False)}
    for name, (tau, lr, head) in table.items():
        rec = load_config(f"configs/dcodr/{name}.toml")
        norec = load_config(f"configs/dcodr/{name}_norec.toml")
        assert (rec.method.name, norec.method.name) == ("dcodr", "dcodr_norec")
        assert (rec.train.temperature, rec.train.lr, rec.dcodr.fc_head) == (tau, lr, head)
        assert (norec.train.lr, norec.dcodr.fc_head) == (1e-4, False)
        for cfg in (rec, norec):
            assert cfg.data.name == name and cfg.model.arch == "dcodr_resnet50"
            assert cfg.train.betas == [0.5, 0.999] and cfg.train.epochs == 200
            assert cfg.eval.factor_probes
    assert load_config("configs/dcodr/celeba.toml").data.min_images == 20


def test_dali_positives_follow_the_recipe():
    """The DALI graph of the positives (CPU DALI): the same batches, anchors = the images in
    [0, 1], positives in [0, 1], about a quarter of them exactly the torch blur."""
    pytest.importorskip("nvidia.dali")
    from fastipirm.data.domain_batches import DomainBatches

    class Data:
        images = np.random.default_rng(fresh_seed() % 2**32).integers(
            0, 256, (96, 16, 16, 3), dtype=np.uint8)

    domains = np.repeat(np.arange(4), 24)
    kw = dict(domains_per_batch=2, samples_per_domain=8, seed=3, device="cpu")
    dali = DomainBatches(Data, domains, generator=torch.Generator(), pipeline="dali", **kw)
    plain = DomainBatches(Data, domains, generator=torch.Generator(), **kw)
    blurred = total = 0
    for (i1, a1, p1), (i2, a2, _) in zip(dali.epoch(2), plain.epoch(2)):
        assert torch.equal(i1, i2) and torch.allclose(a1, a2, atol=1e-6)
        assert p1.shape == a1.shape and float(p1.min()) >= 0 and float(p1.max()) <= 1
        blurred += int(((p1 - gaussian_blur5(a1)).abs().flatten(1).max(1).values < 1e-4).sum())
        total += len(i1)
    assert 0.05 < blurred / total < 0.5
