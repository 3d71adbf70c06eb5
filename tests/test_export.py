"""``fastipirm export``: the encoder as a torchvision-named ``state_dict`` plus its JSON.

torchvision is not a dependency, so the reference below is a minimal transcription of
torchvision's ResNet (same attribute names and forward), made small-stem the way a user would:
``conv1 = Conv2d(3, 64, 3, 1, 1, bias=False)``, ``maxpool = Identity()``, ``fc = Identity()``.
"""
import copy
import json

import pytest
import torch
from torch import nn

from fastipirm import cli, runtime
from fastipirm.checkpoint import FORMAT, atomic_save
from fastipirm.config import load_config
from fastipirm.data import CIFAR10_MEAN, CIFAR10_STD
from fastipirm.models import (SimCLRModel, from_torchvision, official_state_dict, resnet18,
                              resnet50, to_torchvision, torchvision_keys)
from fastipirm.eval.saved import result_path
from fastipirm.model_files import load_model_file
from test_train import tiny_config

pytestmark = pytest.mark.usefixtures("one_thread")


# --- torchvision's ResNet, transcribed (torchvision/models/resnet.py) -------------------------

class TVBasicBlock(nn.Module):
    expansion = 1

    def __init__(self, inplanes, planes, stride=1, downsample=None):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample
        self.stride = stride

    def forward(self, x):
        identity = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        if self.downsample is not None:
            identity = self.downsample(x)
        out += identity
        return self.relu(out)


class TVBottleneck(nn.Module):
    expansion = 4

    def __init__(self, inplanes, planes, stride=1, downsample=None):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * 4)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample
        self.stride = stride

    def forward(self, x):
        identity = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        if self.downsample is not None:
            identity = self.downsample(x)
        out += identity
        return self.relu(out)


class TVResNet(nn.Module):
    """torchvision's ResNet with the base width 64 as a parameter (64 = torchvision)."""

    def __init__(self, block, layers, width=64, num_classes=1000):
        super().__init__()
        self.inplanes = width
        self.conv1 = nn.Conv2d(3, width, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        self.layer1 = self._make_layer(block, width, layers[0])
        self.layer2 = self._make_layer(block, width * 2, layers[1], stride=2)
        self.layer3 = self._make_layer(block, width * 4, layers[2], stride=2)
        self.layer4 = self._make_layer(block, width * 8, layers[3], stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(width * 8 * block.expansion, num_classes)

    def _make_layer(self, block, planes, blocks, stride=1):
        downsample = None
        if stride != 1 or self.inplanes != planes * block.expansion:
            downsample = nn.Sequential(
                nn.Conv2d(self.inplanes, planes * block.expansion, 1, stride, bias=False),
                nn.BatchNorm2d(planes * block.expansion))
        layers = [block(self.inplanes, planes, stride, downsample)]
        self.inplanes = planes * block.expansion
        layers += [block(self.inplanes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def torchvision_small_stem(arch, width=64):
    """What the README tells users to do with torchvision.models.resnet18/50()."""
    block, layers = {"resnet18": (TVBasicBlock, [2, 2, 2, 2]),
                     "resnet50": (TVBottleneck, [3, 4, 6, 3])}[arch]
    net = TVResNet(block, layers, width)
    net.conv1 = nn.Conv2d(3, width, 3, 1, 1, bias=False)
    net.maxpool = nn.Identity()
    net.fc = nn.Identity()
    return net


# --- helpers -----------------------------------------------------------------------------------

def tiny(tmp_path, arch="resnet18", width=4):
    path = tiny_config(tmp_path, sets=[f'model.arch="{arch}"', f"model.width={width}",
                                       "model.hidden_dim=8", "model.channels_last=true",
                                       'method.name="simclr"'])
    return path, load_config(path)


def trained_like(cfg, seed=0):
    """The model of ``cfg`` with non-trivial BN statistics, placed as a run places it
    (channels_last), in eval mode."""
    torch.manual_seed(seed)
    model = runtime.build_model(cfg)
    with torch.no_grad():
        for _ in range(3):
            model(torch.randn(8, 3, 16, 16) * 2 + 0.5)
    return runtime.place_model(model, cfg, torch.device("cpu")).eval()


def save_checkpoint(model, cfg, path, epoch=12):
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_save({"format": FORMAT, "config": cfg.to_dict(), "epoch": epoch, "step": 36,
                 "model": model.state_dict()}, path)
    return path


def encoder_features(encoder, x):
    """Eval-mode features, computed in the standard memory format (the same conv kernels for
    both networks, so equal weights give bitwise-equal features)."""
    encoder = copy.deepcopy(encoder).to(memory_format=torch.contiguous_format).eval()
    with torch.no_grad():
        return encoder(x)


# --- tests -------------------------------------------------------------------------------------

def test_export_loads_strictly_into_torchvision_resnet18(tmp_path, capsys):
    toml, cfg = tiny(tmp_path)
    model = trained_like(cfg)
    assert not model.encoder.conv1.weight.is_contiguous()      # channels_last in the checkpoint
    ckpt = save_checkpoint(model, cfg, tmp_path / "runs" / "tiny" / "checkpoint.pt")
    out = tmp_path / "export" / "backbone.pt"
    assert cli.main(["export", "--checkpoint", str(ckpt.parent), "--out", str(out)]) == 0
    assert "wrote" in capsys.readouterr().out

    state = torch.load(out, map_location="cpu", weights_only=True)   # plain tensors only
    assert all(t.device.type == "cpu" and t.is_contiguous() for t in state.values())
    assert "fc.weight" not in state and not any(k.startswith("encoder.") for k in state)
    tv = torchvision_small_stem("resnet18", width=4)
    assert list(state) == list(tv.state_dict())                 # torchvision's keys and order
    tv.load_state_dict(state, strict=True)
    x = torch.randn(4, 3, 16, 16)
    assert torch.equal(encoder_features(tv, x), encoder_features(model.encoder, x))
    x = torch.randn(2, 3, 24, 24)                               # any input size
    assert torch.equal(encoder_features(tv, x), encoder_features(model.encoder, x))

    meta = json.loads(out.with_suffix(".json").read_text())
    assert meta["architecture"] == "resnet18" and meta["width"] == 4
    assert meta["feature_dim"] == 32 and meta["block"] == "BasicBlock"
    assert meta["stem"]["conv1"] == {"in_channels": 3, "out_channels": 4, "kernel_size": 3,
                                     "stride": 1, "padding": 1, "bias": False}
    assert meta["stem"]["maxpool"] is None
    assert meta["input_normalization"]["mean"] == list(CIFAR10_MEAN)
    assert meta["input_normalization"]["std"] == list(CIFAR10_STD)
    assert meta["input_size"] == 16 and meta["method"] == "simclr"
    assert meta["config"] == cfg.to_dict() and meta["config_source"] == "checkpoint"
    assert meta["source"] == {"checkpoint": str(ckpt), "format": "fastipirm", "epoch": 12,
                              "description": meta["source"]["description"]}
    assert meta["weights"] == "backbone.pt" and meta["tensors"] == len(state) == 120


def test_export_of_an_official_checkpoint(tmp_path):
    toml, cfg = tiny(tmp_path, width=3)
    model = trained_like(cfg, seed=1)
    official = tmp_path / "official" / "model_400.pth"
    official.parent.mkdir()
    torch.save(official_state_dict(model.state_dict()), official)
    outdir = tmp_path / "out"
    outdir.mkdir()
    assert cli.main(["export", "--checkpoint", str(official), "--config", str(toml),
                     "--out", str(outdir)]) == 0                 # a folder: <folder>/backbone.pt
    state = torch.load(outdir / "backbone.pt", weights_only=True)
    tv = torchvision_small_stem("resnet18", width=3)
    tv.load_state_dict(state, strict=True)
    x = torch.randn(3, 3, 16, 16)
    assert torch.equal(encoder_features(tv, x), encoder_features(model.encoder, x))
    meta = json.loads((outdir / "backbone.json").read_text())
    assert meta["source"]["format"] == "official" and meta["source"]["epoch"] == 400
    assert meta["method"] is None and meta["config_source"] == str(toml)
    assert meta["width"] == 3 and meta["config"]["model"]["width"] == 3


def test_resnet50_key_set_and_shapes_are_torchvision():
    ours = to_torchvision(resnet50().state_dict(), "resnet50")
    tv = torchvision_small_stem("resnet50").state_dict()
    assert list(ours) == list(tv) == torchvision_keys("resnet50")
    assert {k: v.shape for k, v in ours.items()} == {k: v.shape for k, v in tv.items()}
    # facts of torchvision's resnet50: 320 state_dict entries with fc.weight and fc.bias,
    # projection shortcuts in the first block of every stage, 2048 channels at the end
    assert len(ours) == 318
    assert ours["layer1.0.downsample.0.weight"].shape == (256, 64, 1, 1)
    assert ours["layer4.2.conv3.weight"].shape == (2048, 512, 1, 1)
    assert ours["conv1.weight"].shape == (64, 3, 3, 3)          # the small stem
    assert "layer1.1.downsample.0.weight" not in ours and "layer4.2.bn3.running_var" in ours
    # resnet18: 122 entries with fc; no projection in layer1
    r18 = to_torchvision(resnet18().state_dict(), "resnet18")
    assert len(r18) == 120 and "layer1.0.downsample.0.weight" not in r18
    assert r18["layer2.0.downsample.0.weight"].shape == (128, 64, 1, 1)
    assert list(r18) == list(torchvision_small_stem("resnet18").state_dict())


def test_resnet50_export_gives_the_same_features(tmp_path):
    toml, cfg = tiny(tmp_path, arch="resnet50", width=4)
    model = trained_like(cfg)
    ckpt = save_checkpoint(model, cfg, tmp_path / "run" / "checkpoint.pt")
    out = tmp_path / "r50.pt"
    assert cli.main(["export", "--checkpoint", str(ckpt), "--out", str(out)]) == 0
    tv = torchvision_small_stem("resnet50", width=4)
    tv.load_state_dict(torch.load(out, weights_only=True), strict=True)
    x = torch.randn(2, 3, 16, 16)
    assert torch.equal(encoder_features(tv, x), encoder_features(model.encoder, x))
    assert json.loads((tmp_path / "r50.json").read_text())["feature_dim"] == 128


def test_a_renamed_module_cannot_pass_silently():
    state = resnet18(2).state_dict()
    renamed = {k.replace("layer1.0.bn1.", "layer1.0.norm1."): v for k, v in state.items()}
    with pytest.raises(ValueError, match="missing layer1.0.bn1.weight.*unexpected layer1.0.norm1"):
        to_torchvision(renamed, "resnet18")
    with pytest.raises(ValueError, match="unexpected fc.weight"):
        to_torchvision({**state, "fc.weight": torch.zeros(1)}, "resnet18")
    with pytest.raises(ValueError, match="resnet50 layout"):
        to_torchvision(state, "resnet50")
    back = from_torchvision(to_torchvision(state, "resnet18"), "resnet18")
    assert set(back) == {f"encoder.{k}" for k in state}


def test_export_then_evaluate_the_backbone(tmp_path, capsys):
    """An exported backbone is itself a model file: kNN on it equals kNN on the checkpoint."""
    toml, cfg = tiny(tmp_path)
    model = trained_like(cfg)
    run = tmp_path / "runs" / "tiny"
    save_checkpoint(model, cfg, run / "checkpoint.pt")
    out = tmp_path / "export" / "backbone.pt"
    assert cli.main(["export", "--checkpoint", str(run), "--out", str(out)]) == 0
    mf = load_model_file(out)
    assert mf.kind == "backbone" and not mf.has_head and mf.epoch == 12
    assert mf.config.to_dict() == cfg.to_dict()
    assert cli.main(["eval", "knn", "--checkpoint", str(run)]) == 0
    assert cli.main(["eval", "knn", "--checkpoint", str(out)]) == 0
    a = json.loads((run / "knn_eval.json").read_text())
    b = json.loads(result_path(out, "knn_eval.json").read_text())
    assert a["knn_top1"] == b["knn_top1"] and a["knn_top5"] == b["knn_top5"]
    assert b["checkpoint_format"] == "backbone"
    # without its JSON the backbone still loads, its shape read from the weights
    out.with_suffix(".json").unlink()
    assert cli.main(["eval", "knn", "--checkpoint", str(out), "--config", str(toml)]) == 0
    assert "no projection head" in capsys.readouterr().out
    assert json.loads(result_path(out, "knn_eval.json").read_text())["knn_top1"] == a["knn_top1"]


def test_out_must_name_the_weights_file(tmp_path, capsys):
    toml, cfg = tiny(tmp_path)
    ckpt = save_checkpoint(trained_like(cfg), cfg, tmp_path / "run" / "checkpoint.pt")
    assert cli.main(["export", "--checkpoint", str(ckpt), "--out",
                     str(tmp_path / "backbone.json")]) == 2
    err = capsys.readouterr().err
    assert "--out" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "backbone.json").exists()


def test_simclr_model_state_dict_file(tmp_path):
    """A bare SimCLRModel state dict is read too (shape from the weights)."""
    model = SimCLRModel("resnet18", 16, width=2, hidden_dim=8)
    path = tmp_path / "weights.pt"
    torch.save({"model": model.state_dict(), "epoch": 9}, path)
    mf = load_model_file(path)
    assert mf.kind == "state_dict" and mf.epoch == 9 and mf.config is None
    assert set(mf.state) == set(model.state_dict())
