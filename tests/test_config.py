"""Config: TOML into typed dataclasses; errors name the key; --set overrides; round trip."""
import tomllib
from pathlib import Path

import pytest

from fastipirm.config import (Config, apply_overrides, from_dict, load_config, parse_override,
                              to_toml, write_config)

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.toml"))


def write(tmp_path, text):
    p = tmp_path / "c.toml"
    p.write_text(text)
    return p


def test_shipped_configs_load():
    names = {p.name for p in CONFIGS}
    assert {"stl.toml", "simclr_stl.toml", "cifar10.toml", "cifar100.toml",
            "quickstart.toml"} <= names
    for p in CONFIGS:
        load_config(p)


def test_stl_config_is_the_official_run():
    c = load_config(CONFIGS[0].parent / "stl.toml")
    assert (c.ipirm.penalty_weight, c.partition.irm_weight_maxim) == (0.2, 0.5)
    assert c.partition.maximize_iter == 50 and c.train.epochs == 400
    assert c.partition.random_init and c.partition.constrain and c.partition.constrain_relax
    assert c.partition.offline and c.ipirm.keep_cont and c.partition.retain_group
    assert c.data.split == "train+unlabeled" and c.data.crop_size == 32
    assert (c.train.lr, c.train.weight_decay, c.train.batch_size) == (1e-3, 1e-6, 256)
    assert c.partition.milestones == [5, 35] and c.partition.batch_size == 3096
    assert c.method.name == "ipirm" and c.op.penalty == "slot"
    assert load_config(CONFIGS[0].parent / "simclr_stl.toml").method.name == "simclr"


@pytest.mark.parametrize("text, key", [
    ("[train]\nbach_size = 3\n", "train.bach_size: unknown key"),
    ("[trian]\nbatch_size = 3\n", "trian: unknown section"),
    ("[train]\nbatch_size = 3.5\n", "train.batch_size: expected an integer"),
    ("[train]\nbatch_size = true\n", "train.batch_size: expected an integer"),
    ("[train]\nlr = \"fast\"\n", "train.lr: expected a number"),
    ("[ipirm]\nkeep_cont = 1\n", "ipirm.keep_cont: expected true or false"),
    ("[partition]\nmilestones = 5\n", "partition.milestones: expected a list"),
    ("[partition]\nmilestones = [5, 3.5]\n", "partition.milestones[1]: expected an integer"),
    ("[data]\nname = 3\n", "data.name: expected a string"),
    ("[data]\nname = \"imagenet\"\n", "data.name: 'imagenet' is not one of"),
    ("[train]\namp = \"fp8\"\n", "train.amp: 'fp8' is not one of"),
    ("[train]\nepochs = 0\n", "train.epochs: must be a positive integer"),
    ("[train]\ntemperature = -0.5\n", "train.temperature: must be a positive number"),
    ("[ipirm]\nincreasing_weight = true\n", "ipirm.increasing_weight = true: not implemented"),
    ("[train]\nkeep_cont = false\n", "train.keep_cont: moved to ipirm.keep_cont"),
    ("[train]\nbaseline = true\n", 'train.baseline: removed; choose the method with [method] name'),
    ("[train]\nbackend = \"torch\"\n", "train.backend: moved to op.backend"),
    ("[method]\nname = \"byol\"\n", "method.name: 'byol' is not one of simclr, ipirm"),
    ("[op]\npenalty = \"vrex\"\n", "op.penalty: 'vrex' is not one of slot"),
    ("[op]\nbackend = \"tpu\"\n", "op.backend: 'tpu' is not one of auto, torch"),
    ("[model]\nbn_splits = 3\n", "model.bn_splits: 3 does not divide train.batch_size 256"),
    ("[data]\ncrop_scale_min = 1.5\n", "data.crop_scale_min: must lie in (0, 1]"),
    ("[partition]\nenv_num = 1\n", "partition.env_num: needs at least 2"),
    ("[run]\ndevice = \"tpu\"\n", "run.device"),
    ("train = 3\n", "train: expected a table"),
])
def test_errors_name_the_key(tmp_path, text, key):
    with pytest.raises(ValueError) as err:
        load_config(write(tmp_path, text))
    assert key in str(err.value)


def test_int_widens_to_float_and_defaults_fill_in(tmp_path):
    c = load_config(write(tmp_path, "[train]\nlr = 1\n"))
    assert c.train.lr == 1.0 and isinstance(c.train.lr, float)
    assert c.train.batch_size == Config().train.batch_size


def test_invalid_toml_and_missing_file(tmp_path):
    with pytest.raises(ValueError, match="invalid TOML"):
        load_config(write(tmp_path, "[train\n"))
    with pytest.raises(ValueError, match="does not exist"):
        load_config(tmp_path / "nope.toml")


def test_overrides(tmp_path):
    c = load_config(write(tmp_path, "[train]\nepochs = 5\n"),
                    ["train.epochs=7", "data.name=cifar10", "train.lr=2e-3",
                     "partition.milestones=[1, 2]", "run.compare_baseline=true",
                     'run.name="x y"'])
    assert c.train.epochs == 7 and c.data.name == "cifar10" and c.train.lr == 2e-3
    assert c.partition.milestones == [1, 2] and c.run.compare_baseline and c.run.name == "x y"
    with pytest.raises(ValueError, match="train.bach_size: unknown key"):
        apply_overrides(c, ["train.bach_size=3"])
    with pytest.raises(ValueError, match="train.epochs: expected an integer"):
        apply_overrides(c, ["train.epochs=many"])
    with pytest.raises(ValueError, match="section.key"):
        parse_override("epochs=3")
    with pytest.raises(ValueError, match="expected section.key=value"):
        parse_override("train.epochs")


def test_resolved_config_round_trips(tmp_path):
    c = apply_overrides(Config(), ["train.epochs=3", "eval.knn_temperature=0.1"])
    write_config(c, tmp_path / "config.toml")
    again = from_dict(tomllib.loads((tmp_path / "config.toml").read_text()))
    assert again == c
    assert from_dict(tomllib.loads(to_toml(Config()))) == Config()


def test_knn_temperature_defaults_to_the_training_temperature():
    c = apply_overrides(Config(), ["train.temperature=0.2"])
    assert c.eval.knn_temperature is None and c.knn_temperature == 0.2
    assert apply_overrides(c, ["eval.knn_temperature=0.1"]).knn_temperature == 0.1


def test_choice_lists_come_from_their_modules():
    """A name the owning module adds is valid in the config at once (no second list)."""
    from fastipirm.data import DATASETS, GENERATIVE, PIPELINES
    from fastipirm.methods import METHODS
    from fastipirm.models import ARCHS, MLP_ARCHS
    from fastipirm.ops import PENALTIES
    clica = {"data": {"name": GENERATIVE[0]}, "model": {"arch": MLP_ARCHS[0]}}
    for name in METHODS:
        extra = clica if name.startswith("clica") else {}
        if name == "dcodr":
            extra = {"dcodr": {"vgg_path": "vgg16-397923af.pth"}}
        assert from_dict({"method": {"name": name}, **extra}).method.name == name
    for name in PENALTIES:
        assert from_dict({"op": {"penalty": name}}).op.penalty == name
    for section, key, names in (("data", "name", DATASETS), ("data", "pipeline", PIPELINES),
                                ("model", "arch", ARCHS)):
        for name in names:
            assert getattr(getattr(from_dict({section: {key: name}}), section), key) == name
    for name in GENERATIVE:
        assert from_dict({"method": {"name": "clica"}, "data": {"name": name},
                          "model": {"arch": MLP_ARCHS[0]}}).data.name == name


def test_first_format_config_is_upgraded():
    from fastipirm.config import MOVED, upgrade_v1_dict
    old = Config().to_dict()
    moved = {k: old["ipirm"].pop(k) for k in list(old["ipirm"]) if ("train", k) in MOVED}
    old["train"].update(moved, baseline=True, penalty="split", backend="torch")
    del old["method"], old["ipirm"], old["op"]
    c = from_dict(upgrade_v1_dict(old))
    assert c.method.name == "simclr" and c.op.penalty == "split" and c.op.backend == "torch"
    assert c.ipirm.penalty_weight == Config().ipirm.penalty_weight
