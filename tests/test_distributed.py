"""Multi-process training (``fastipirm.distributed``, ``docs/distributed.md``): one step on 2 gloo
ranks gives the loss and the parameter gradients of one process with the same global batch, for
every multi-process method, and a 2-rank IP-IRM maximisation gives the 1-process partitions.

The 2-rank side runs once per module (``torch.multiprocessing.spawn``, about 10 s); each rank
writes its results to a file that the tests compare with the single-process ones.
"""
from __future__ import annotations

import os
import socket

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fastipirm import distributed
from fastipirm.config import Config
from fastipirm.data.augment import TwoViewAugment
from fastipirm.data.datasets import ArrayDataset
from fastipirm.methods import MethodContext, build_method

WORLD = 2
BATCH = 8                   # global; 4 per rank
SIZE = 8                    # images and crops 8 x 8
DCODR_SIZE = 32             # DCoDR: the generator and the VGG need 16 | size and size >= 32
# ipirm: local anchors and all-reduced per-slot sums (the op's distributed form, torch backend);
# ipirm_split: the same with the split penalty; ipirm_replicated: op.ddp_form = "replicated",
# the whole global loss on every rank
METHODS = ("simclr", "simclr_debiased", "clica", "dcodr_norec", "ipirm", "ipirm_split",
           "ipirm_replicated", "mixup", "ipirm_mixup", "dcodr")
IPIRM_VARIANTS = {"ipirm": ("slot", "auto", "local"), "ipirm_split": ("split", "local", "local"),
                  "ipirm_replicated": ("slot", "replicated", "replicated")}


class Tiny(torch.nn.Module):
    """No BN (the comparison is exact without SyncBatchNorm, which torch runs on GPUs only)."""

    def __init__(self, tuple_out: bool, size: int = SIZE):
        super().__init__()
        self.tuple_out = tuple_out
        self.body = torch.nn.Linear(3 * size * size, 16)
        self.head = torch.nn.Linear(16, 6)

    def forward(self, x):
        h = torch.tanh(self.body(x.flatten(1).float()))
        z = self.head(h)
        return (h, F.normalize(z, dim=1)) if self.tuple_out else z


def config(name: str, vgg: str = "") -> Config:
    cfg = Config()
    cfg.method.name = ("simclr" if name == "simclr_debiased" else
                       "ipirm" if name in IPIRM_VARIANTS else name)
    cfg.ipirm.debiased = name == "simclr_debiased"
    cfg.model.channels_last = False
    cfg.train.temperature = 0.5
    cfg.train.batch_size = BATCH
    cfg.train.amp = "none"
    cfg.op.backend = "torch"
    cfg.clica.p = 1
    cfg.ipirm.keep_cont = True
    cfg.ipirm.irm_temperature = 0.5
    cfg.dcodr.domains_per_batch, cfg.dcodr.samples_per_domain = 2, 4
    cfg.dcodr.vgg_path, cfg.dcodr.generator_width, cfg.dcodr.embedding_dim = vgg, 8, 8
    cfg.model.feature_dim = 6                           # Tiny's code: the generator's input
    p = cfg.partition
    p.batch_size, p.extract_batch_size = 8, 8
    p.max_epochs, p.min_epochs, p.patience, p.milestones = 4, 2, 2, [2, 3]
    if name in IPIRM_VARIANTS:
        cfg.op.penalty, cfg.op.ddp_form, _ = IPIRM_VARIANTS[name]
    return cfg


def dataset(size: int = SIZE) -> ArrayDataset:
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (16, size, size, 3), dtype=np.uint8)
    labels = np.repeat(np.arange(4), 4).astype(np.int64)
    return ArrayDataset(images, labels, 4, "tiny")


def batch(seed: int = 1, size: int = SIZE):
    g = torch.Generator().manual_seed(seed)
    indices = torch.tensor([3, 0, 7, 12, 5, 9, 14, 1])
    v1 = torch.randn(BATCH, 3, size, size, generator=g)
    v2 = v1 + 0.3 * torch.randn(BATCH, 3, size, size, generator=g)
    return indices, v1, v2


def dcodr_batch(size: int = SIZE):
    indices, v1, v2 = batch(2, size)
    if size != SIZE:                      # DCoDR reconstructs the anchors: images in [0, 1]
        v1, v2 = torch.sigmoid(v1), torch.sigmoid(v2)
    return torch.tensor([0, 4, 1, 5, 2, 6, 3, 7]), v1, v2      # domains 0, 1, 0, 1, ...


def mixup_partitions() -> torch.Tensor:
    """Two partitions of the 16 samples whose environments split the test batch (indices 3, 0,
    7, 12 | 5, 9, 14, 1) 4 + 4 and 0 + 8: every environment has >= 2 members in each rank's
    share, so 1 and 2 processes use the same environments."""
    envs = torch.ones(2, 16, dtype=torch.long)
    envs[0, [3, 0, 7, 12]] = 0
    return F.one_hot(envs, 2).float() * 3.0


def one_step(name: str, rank: int, world: int, vgg: str = "") -> dict:
    """One step of ``name`` on this rank's share of the global batch: the mean loss over the
    ranks and the (DDP-averaged) parameter gradients (DCoDR: the generator's too)."""
    torch.manual_seed(0)
    cfg = config(name, vgg)
    size = DCODR_SIZE if name == "dcodr" else SIZE
    model = Tiny(tuple_out=name not in ("clica",), size=size)
    forward = model
    if world > 1:
        forward = torch.nn.parallel.DistributedDataParallel(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    ctx = MethodContext(cfg, model, optimizer, torch.device("cpu"), forward=forward,
                        plain_forward=model, train_set=dataset(size),
                        generator=torch.Generator().manual_seed(0))
    method = build_method(cfg.method.name, ctx)
    if name in IPIRM_VARIANTS:
        assert method.ddp_form == IPIRM_VARIANTS[name][2]
        method.partitions = torch.randn(2, 16, 2, generator=torch.Generator().manual_seed(3))
        method.penalty_weight = 0.7
    if name == "ipirm_mixup":
        method.partitions = mixup_partitions()
        method.penalty_weight = 0.7
    full = dcodr_batch(size) if name.startswith("dcodr") else batch()
    # a ``global_batch`` method (MixUp) gets the whole global batch and takes its share itself
    indices, v1, v2 = full if method.global_batch else distributed.shard(full, world, rank)
    loss, parts = method.step(indices, v1, v2)
    grads = {k: p.grad.clone() for k, p in model.named_parameters()}
    if name == "dcodr":
        grads.update({f"generator.{k}": p.grad.clone()
                      for k, p in method.generator.named_parameters()})
    return {"loss": float(distributed.mean_across(loss)), "grads": grads,
            "parts": {k: distributed.mean_across(v.double()).tolist() for k, v in parts.items()}}


class RecordingAugment(TwoViewAugment):
    """TwoViewAugment that records the batch rows it was asked to make."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.made = []

    def forward(self, images, generator=None, rows=None):
        self.made.append((images.shape[0], None if rows is None else (rows.start, rows.stop)))
        return super().forward(images, generator, rows=rows)


# the maximisations compared: the offline bank, the online search, IP-IRM + MixUp's online
# MixUp search
SEARCHES = ("offline", "online", "mixup_online")


def maximisation(rank: int, world: int, search: str = "offline") -> dict:
    """The first partition of a run (and the rows each extraction batch made on this rank)."""
    torch.manual_seed(0)
    name = "ipirm_mixup" if search == "mixup_online" else "ipirm"
    cfg = config(name)
    cfg.partition.offline = search == "offline"
    cfg.partition.mixup_max = search == "mixup_online"
    cfg.partition.extract_batch_size = 7     # batches of 7, 7, 2: uneven shares (3 + 4, 1 + 1)
    model = Tiny(tuple_out=True)
    forward = model if world == 1 else torch.nn.parallel.DistributedDataParallel(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    ctx = MethodContext(cfg, model, optimizer, torch.device("cpu"), forward=forward,
                        plain_forward=model, train_set=dataset(),
                        augment=RecordingAugment(out_size=SIZE, scale=(0.5, 1.0)),
                        generator=torch.Generator().manual_seed(0), log=lambda s: None)
    method = build_method(name, ctx)
    method.start()
    return {"partitions": method.partitions.clone(), "made": ctx.augment.made}


def _rank_main(rank: int, port: int, out: str, vgg: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(WORLD),
                      RANK=str(rank), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    distributed.init_from_env("cpu")
    try:
        results = {name: one_step(name, rank, WORLD, vgg) for name in METHODS}
        results["maximisation"] = {s: maximisation(rank, WORLD, s) for s in SEARCHES}
        results["world"] = distributed.world_size()
        torch.save(results, os.path.join(out, f"rank{rank}.pt"))
    finally:
        distributed.shutdown()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def vgg_file(tmp_path_factory) -> str:
    """Random VGG16 weights for DCoDR's perceptual distance."""
    from fastipirm.losses.perceptual import VGG16Features

    path = tmp_path_factory.mktemp("vgg") / "vgg16.pth"
    torch.manual_seed(0)
    torch.save(VGG16Features().state_dict(), path)
    return str(path)


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory, vgg_file):
    out = tmp_path_factory.mktemp("ddp")
    torch.multiprocessing.spawn(_rank_main, args=(_free_port(), str(out), vgg_file),
                                nprocs=WORLD, join=True)
    return [torch.load(out / f"rank{r}.pt") for r in range(WORLD)]


@pytest.mark.parametrize("name", METHODS)
def test_one_step_on_two_ranks_equals_one_process(two_ranks, vgg_file, name):
    single = one_step(name, 0, 1, vgg_file)
    for r, res in enumerate(two_ranks):
        assert res["world"] == WORLD
        got = res[name]
        assert got["loss"] == pytest.approx(single["loss"], rel=1e-5, abs=1e-6), (name, r)
        for key, v in single["parts"].items():
            assert got["parts"][key] == pytest.approx(v, rel=1e-5, abs=1e-6), (name, r, key)
        assert got["grads"].keys() == single["grads"].keys()
        for key, g in single["grads"].items():
            assert torch.allclose(got["grads"][key], g, rtol=1e-4, atol=1e-6), (name, r, key)
        assert any(g.abs().sum() > 0 for g in single["grads"].values())
    if name == "ipirm_mixup":            # both partitions' terms are in the comparison
        assert single["parts"]["loss_env"] > 0 and single["parts"]["penalty"] > 0
        assert len(two_ranks[0]["ipirm_mixup"]["parts"]) == 3
    if name == "dcodr":                  # the generator and the domain embedding train
        assert single["parts"]["reconstruction"] > 0
        assert single["grads"]["generator.class_embedding.weight"].abs().sum() > 0


@pytest.mark.parametrize("search", SEARCHES)
def test_two_rank_maximisation_gives_the_one_process_partitions(two_ranks, search):
    """Each rank made the views of its share of every extraction batch only (the MixUp search:
    all views, its partners span the batch), and every rank ends with the 1-process partition."""
    single = maximisation(0, 1, search)
    assert all(rows is None for _, rows in single["made"])
    for rank, res in enumerate(two_ranks):
        got = res["maximisation"][search]
        assert torch.equal(got["partitions"].argmax(-1), single["partitions"].argmax(-1))
        assert torch.allclose(got["partitions"], single["partitions"], rtol=1e-5, atol=1e-6)
        assert len(got["made"]) == len(single["made"]) > 0
        for n, rows in got["made"]:
            if search == "mixup_online":
                assert rows is None
            else:
                assert rows == distributed.balanced_shares(n, WORLD)[rank]


def test_world_size_one_needs_no_process_group(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    info = distributed.init_from_env("cpu")
    assert (info.rank, info.world_size) == (0, 1)
    assert not distributed.active()
    x = torch.randn(3, 2, requires_grad=True)
    assert distributed.all_gather_grad(x) is x
    assert distributed.shard((x,), 1, 0)[0] is x


def test_shard_takes_contiguous_shares_and_rejects_uneven_batches():
    x = torch.arange(8)
    assert distributed.shard((x, 5), 2, 1)[0].tolist() == [4, 5, 6, 7]
    with pytest.raises(ValueError, match="cannot be split"):
        distributed.shard((torch.arange(6),), 4, 0)


def _torchrun(args, cwd, target=("-m", "fastipirm", "train"), ok=True):
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items()
           if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env["OMP_NUM_THREADS"] = "1"
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
         "--master_port", str(_free_port()), *target, *args],
        capture_output=True, text=True, env=env, timeout=240, cwd=str(cwd))
    if not ok:
        return proc
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return proc.stdout


def test_torchrun_two_cpu_processes_train_resume_and_refuse_another_world_size(tmp_path,
                                                                               capsys):
    """``torchrun --nproc_per_node 2 -m fastipirm train`` on gloo: rank 0 alone logs and writes
    one run directory whose summary and checkpoint say world size 2; a run stopped after epoch 1
    and resumed on 2 ranks equals the uninterrupted one; a 1-process resume is refused."""
    import json

    from test_train import tiny_config

    from fastipirm import cli
    from fastipirm.checkpoint import load_checkpoint

    sets = ["eval.knn_every=2", "run.compare_baseline=false", "run.compare_random=false"]
    full = tiny_config(tmp_path, "full.toml", sets=[*sets, "train.epochs=2", "run.name=full"])
    cut = tiny_config(tmp_path, "cut.toml", sets=[*sets, "train.epochs=1", "run.name=cut"])
    out = _torchrun(["--config", str(full)], tmp_path)
    assert out.count("epoch 2/2") == 1 and "world size 2" in out   # rank 0 alone logs
    run = tmp_path / "runs" / "full"
    summary = json.loads((run / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["steps"] == 2 * (96 // 32)
    assert summary["knn_top1"] is not None               # evaluated (once, on rank 0)
    a = load_checkpoint(run)
    assert a["world_size"] == 2 and a["method"]["partitions"].shape == (1, 96, 2)

    _torchrun(["--config", str(cut)], tmp_path)
    resumed = tmp_path / "runs" / "cut" / "checkpoint.pt"
    _torchrun(["--resume", str(resumed), "--set", "train.epochs=2"], tmp_path)
    b = load_checkpoint(resumed)
    assert b["epoch"] == 2 and torch.equal(a["method"]["partitions"], b["method"]["partitions"])
    assert [h["loss"] for h in a["history"]] == [h["loss"] for h in b["history"]]
    for k, v in a["model"].items():
        assert torch.equal(v, b["model"][k]), k

    assert cli.main(["train", "--resume", str(run / "checkpoint.pt"),
                     "--set", "train.epochs=3"]) != 0
    assert "run on 2 process(es)" in capsys.readouterr().err


def test_unsupported_method_and_uneven_batch_are_clear_errors(monkeypatch):
    from fastipirm import train as trainmod
    from fastipirm.methods import METHODS as REGISTRY
    from fastipirm.train import _check_distributed

    assert set(REGISTRY) <= set(trainmod.DDP_METHODS)       # every method trains under DDP
    info = distributed.DistInfo(rank=0, world_size=3, local_rank=0)
    cfg = config("simclr")
    with pytest.raises(ValueError, match="not divisible by the world size 3"):
        _check_distributed(cfg, torch.device("cpu"), info)
    cfg = config("dcodr")                                   # 2 x 4 anchors on 3 ranks
    with pytest.raises(ValueError, match="samples_per_domain .8, the global batch"):
        _check_distributed(cfg, torch.device("cpu"), info)
    monkeypatch.setattr(trainmod, "DDP_METHODS", ("simclr",))   # a method not (yet) covered
    cfg = config("ipirm_mixup")
    cfg.train.batch_size = 6
    with pytest.raises(ValueError, match="does not train on several processes"):
        _check_distributed(cfg, torch.device("cpu"), info)
    cfg = config("simclr")
    cfg.train.batch_size = 6
    cfg.model.sync_bn = True
    with pytest.raises(ValueError, match="GPUs only"):
        _check_distributed(cfg, torch.device("cpu"), info)


def test_the_gathered_losses_on_one_process_equal_the_plain_ones():
    from fastipirm.losses.clica import clica_infonce, clica_infonce_gathered
    from fastipirm.losses.dcodr import dcodr_contrastive_loss
    from fastipirm.losses.simclr import nt_xent, nt_xent_gathered

    g = torch.Generator().manual_seed(0)
    z1 = F.normalize(torch.randn(6, 5, generator=g, dtype=torch.float64), dim=1)
    z2 = F.normalize(torch.randn(6, 5, generator=g, dtype=torch.float64), dim=1)
    domains = torch.tensor([0, 1, 0, 1, 0, 1])
    kw = dict(temperature=0.5, backend="torch")
    assert torch.allclose(nt_xent_gathered(z1, z2, **kw), nt_xent(z1, z2, **kw))
    assert torch.allclose(clica_infonce_gathered(z1, z2, p=1, **kw),
                          clica_infonce(z1, z2, p=1, **kw))
    assert torch.allclose(dcodr_contrastive_loss(z1, z2, domains, gather=True, **kw),
                          dcodr_contrastive_loss(z1, z2, domains, **kw))


def test_the_mixup_environment_terms_on_shares_equal_the_whole_batch():
    """IP-IRM + MixUp's DDP form on one process: the environment losses of uneven shares (rows
    of each environment, ``world`` = 1, no all-reduce) add up to the whole batch's, and all the
    rows at once give the plain call's loss and penalty."""
    from fastipirm.data.mixup import group_mixup_draws
    from fastipirm.losses.ipirm_mixup import imix_environment_terms, imix_loss

    g = torch.Generator().manual_seed(0)
    q = F.normalize(torch.randn(8, 5, generator=g, dtype=torch.float64), dim=1)
    k = F.normalize(torch.randn(8, 5, generator=g, dtype=torch.float64), dim=1)
    envs = torch.tensor([0, 0, 0, 0, 0, 2, 2, 2])
    lam, partner = group_mixup_draws([5, 0, 3], generator=g)
    kw = dict(temperature=0.5, backend="torch")
    loss, pen = imix_environment_terms(q, k, envs, lam, partner, **kw)
    rows = torch.arange(8)
    loss_r, pen_r = imix_environment_terms(q, k, envs, lam, partner, rows=rows, **kw)
    assert torch.allclose(loss_r, loss) and torch.allclose(pen_r, pen)
    shares = [torch.tensor([0, 1, 2, 5, 6]), torch.tensor([3, 4, 7])]   # 3 + 2 and 2 + 1
    parts = [imix_environment_terms(q[r], k, envs, lam, partner, rows=r, **kw)[0]
             for r in shares]
    assert torch.allclose(sum(parts), loss)
    whole = imix_loss(q, k, lam, partner, **kw)
    halves = [imix_loss(q[r], k, lam, partner, rows=r, **kw) for r in shares]
    assert torch.allclose((5 * halves[0] + 3 * halves[1]) / 8, whole)


def test_sharded_training_views_are_the_shares_of_the_global_batches():
    """``TwoViewBatches(shard=(r, 2))``: each rank's batches (indices and views) are its share
    of the 1-process batches, bit for bit, and every rank's generator ends where one process's
    does; :class:`RankShares` slices any other training views."""
    from fastipirm.data.views import RankShares, TwoViewBatches

    def epoch(shard):
        gen = torch.Generator().manual_seed(4)
        views = TwoViewBatches(dataset(), BATCH, seed=2, device="cpu", out_size=SIZE,
                               generator=gen, shard=shard)
        return list(views.epoch(3)), gen.get_state()

    whole, state = epoch(None)
    shares = [epoch((r, WORLD)) for r in range(WORLD)]
    assert len(whole) == 2
    for r, (batches, rank_state) in enumerate(shares):
        assert torch.equal(rank_state, state)
        for got, want in zip(batches, whole):
            for a, b in zip(got, want):
                assert torch.equal(a, b[r * BATCH // WORLD:(r + 1) * BATCH // WORLD])

    class Global:
        augment = "aug"

        def __len__(self):
            return 1

        def epoch(self, e):
            yield torch.arange(6) + e, torch.zeros(6, 2), 7

    sliced = RankShares(Global(), 1, 3)
    assert len(sliced) == 1 and sliced.augment == "aug"
    (idx, x, seven), = sliced.epoch(10)
    assert idx.tolist() == [12, 13] and x.shape == (2, 2) and seven == 7
    with pytest.raises(ValueError, match="cannot be split over 4 ranks"):
        TwoViewBatches(dataset(), 6, seed=0, device="cpu", out_size=SIZE, shard=(0, 4))


def test_gather_shares_without_a_group_and_balanced_shares():
    x = torch.randn(5, 2)
    assert distributed.gather_shares(x, 5) is x
    assert distributed.balanced_shares(7, 3) == [(0, 2), (2, 4), (4, 7)]
    assert distributed.balanced_shares(1, 2) == [(0, 0), (0, 1)]


FAILING_RANK = """
import os, runpy, sys
failing = sys.argv[2]
if os.environ["RANK"] == failing:
    from fastipirm.methods.ipirm import IPIRM

    scheduled = IPIRM.begin_epoch

    def begin_epoch(self, epoch):
        if epoch == 2:
            raise RuntimeError("injected failure on rank " + failing)
        scheduled(self, epoch)

    IPIRM.begin_epoch = begin_epoch
sys.argv = ["fastipirm", "train", "--config", sys.argv[1]]        # argv[2]: the failing rank
runpy.run_module("fastipirm", run_name="__main__")
"""


@pytest.mark.parametrize("failing", [0, 1])
def test_a_failing_rank_stops_the_run_with_its_error_and_keeps_the_checkpoint(tmp_path, failing):
    """One rank raises at the start of epoch 2 while the other waits in a collective: the run
    ends (no hang) with a non-zero exit, the error is printed, and epoch 1's checkpoint stays."""
    import time

    from test_train import tiny_config

    from fastipirm.checkpoint import load_checkpoint

    script = tmp_path / "failing_rank.py"
    script.write_text(FAILING_RANK)
    cfg = tiny_config(tmp_path, "fail.toml", sets=["train.epochs=3", "run.name=fail",
                                                    "run.compare_baseline=false",
                                                    "run.compare_random=false"])
    start = time.perf_counter()
    proc = _torchrun([str(cfg), str(failing)], tmp_path, target=(str(script),), ok=False)
    assert proc.returncode != 0
    assert time.perf_counter() - start < 200
    assert f"injected failure on rank {failing}" in proc.stdout + proc.stderr
    ckpt = load_checkpoint(tmp_path / "runs" / "fail")
    assert ckpt["epoch"] == 1 and ckpt["world_size"] == 2


def test_run_threads_are_shared_by_the_processes_of_a_machine(monkeypatch):
    from fastipirm.runtime import process_threads

    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    assert process_threads(8) == 8
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    assert process_threads(8) == 4 and process_threads(2) == 1 and process_threads(1) == 1
