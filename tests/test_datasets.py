"""Data sets in their published on-disk formats (written small into tmp dirs), the synthetic set and
the loader."""
import hashlib
import pickle
import tarfile
import time

import numpy as np
import pytest
import torch

from fastipirm.data import ArrayDataset, IndexedLoader, load_dataset
from fastipirm.data import cifar as cifar_mod
from fastipirm.data import stl10 as stl_mod
from fastipirm.data.loader import epoch_permutation

RNG = np.random.default_rng(1234)


# --------------------------------------------------------------------------- STL-10
def stl_bytes(images_hwc: np.ndarray) -> bytes:
    """The release's record layout: per image R, G, B planes, each plane column-major."""
    return np.ascontiguousarray(images_hwc.transpose(0, 3, 2, 1)).tobytes()


def write_stl(root, n_train=6, n_test=4, n_unlab=5):
    folder = root / "stl10_binary"
    folder.mkdir(parents=True)
    data = {}
    for name, n, labelled in (("train", n_train, True), ("test", n_test, True),
                              ("unlabeled", n_unlab, False)):
        images = RNG.integers(0, 256, (n, 96, 96, 3), dtype=np.uint8)
        (folder / f"{name}_X.bin").write_bytes(stl_bytes(images))
        labels = RNG.integers(1, 11, n).astype(np.uint8) if labelled else None
        if labelled:
            (folder / f"{name}_y.bin").write_bytes(labels.tobytes())
        data[name] = (images, labels)
    return data


def test_stl10_column_major_layout(tmp_path):
    # byte c*96*96 + x*96 + y holds pixel (row y, column x) of channel c
    folder = tmp_path / "stl10_binary"
    folder.mkdir()
    raw = np.zeros(3 * 96 * 96, dtype=np.uint8)
    raw[0 * 9216 + 5 * 96 + 2] = 200   # channel R, column 5, row 2
    raw[2 * 9216 + 0 * 96 + 7] = 100   # channel B, column 0, row 7
    (folder / "unlabeled_X.bin").write_bytes(raw.tobytes())
    ds = load_dataset("stl10", "unlabeled", root=str(tmp_path))
    assert ds.images.shape == (1, 96, 96, 3) and ds.images.flags.c_contiguous
    assert ds.images[0, 2, 5, 0] == 200 and ds.images[0, 7, 0, 2] == 100
    assert ds.images.sum() == 300
    assert ds.labels is None and ds.num_classes == 0


def test_stl10_splits(tmp_path):
    data = write_stl(tmp_path)
    for split in ("train", "test"):
        ds = load_dataset("stl10", split, root=str(tmp_path))
        images, labels = data[split]
        np.testing.assert_array_equal(ds.images, images)
        np.testing.assert_array_equal(ds.labels, labels.astype(np.int64) - 1)
        assert ds.labels.dtype == np.int64 and ds.num_classes == 10 and ds.name == f"stl10/{split}"
    both = load_dataset("stl10", "train+unlabeled", root=str(tmp_path))
    assert len(both) == 11
    np.testing.assert_array_equal(both.images[:6], data["train"][0])
    np.testing.assert_array_equal(both.images[6:], data["unlabeled"][0])
    np.testing.assert_array_equal(both.labels, np.r_[data["train"][1] - 1, [-1] * 5])


def test_stl10_missing_and_corrupt(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"(?s)stl10_binary.*train_X\.bin"):
        load_dataset("stl10", "train", root=str(tmp_path))
    write_stl(tmp_path)
    folder = tmp_path / "stl10_binary"
    x = (folder / "train_X.bin").read_bytes()
    (folder / "train_X.bin").write_bytes(x[:-100])
    with pytest.raises(ValueError, match=r"train_X\.bin.*truncated"):
        load_dataset("stl10", "train", root=str(tmp_path))
    (folder / "train_X.bin").write_bytes(x)
    (folder / "train_y.bin").write_bytes(b"\x01\x02")
    with pytest.raises(ValueError, match=r"train_y\.bin: 2 labels"):
        load_dataset("stl10", "train", root=str(tmp_path))
    (folder / "train_y.bin").write_bytes(bytes([1, 2, 3, 11, 4, 5]))
    with pytest.raises(ValueError, match=r"train_y\.bin: labels must be 1\.\.10"):
        load_dataset("stl10", "train", root=str(tmp_path))
    with pytest.raises(ValueError, match="unknown split"):
        load_dataset("stl10", "validation", root=str(tmp_path))


def test_stl10_download_checks_md5(tmp_path, monkeypatch):
    src = tmp_path / "src"
    write_stl(src)
    archive = tmp_path / "stl10_binary.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(src / "stl10_binary", arcname="stl10_binary")
    md5 = hashlib.md5(archive.read_bytes()).hexdigest()
    files = {p.name: hashlib.md5(p.read_bytes()).hexdigest()
             for p in (src / "stl10_binary").iterdir()}
    monkeypatch.setattr(stl_mod, "URL", archive.as_uri())
    monkeypatch.setattr(stl_mod, "FILE_MD5", files)

    monkeypatch.setattr(stl_mod, "ARCHIVE_MD5", "0" * 32)
    root = tmp_path / "data"
    with pytest.raises(ValueError, match="MD5"):
        load_dataset("stl10", "train", root=str(root), download=True)
    assert not (root / "stl10_binary.tar.gz").exists() and not list(root.glob("*.part"))

    monkeypatch.setattr(stl_mod, "ARCHIVE_MD5", md5)
    ds = load_dataset("stl10", "test", root=str(root), download=True)
    assert len(ds) == 4 and (root / "stl10_binary.tar.gz").is_file()

    monkeypatch.setattr(stl_mod, "URL", (tmp_path / "nowhere.tar.gz").as_uri())
    with pytest.raises(FileNotFoundError, match=r"(?s)could not download.*stl10_binary"):
        load_dataset("stl10", "train", root=str(tmp_path / "empty"), download=True)


# --------------------------------------------------------------------------- CIFAR
def cifar_pickle(images_hwc, labels, label_key, protocol=2, py2_numpy_names=False) -> bytes:
    batch = {"batch_label": "testing batch", label_key: [int(v) for v in labels],
             "data": (np.ascontiguousarray(images_hwc.transpose(0, 3, 1, 2))
                      .reshape(len(labels), 3072)),
             "filenames": [f"img_{i}.png" for i in range(len(labels))]}
    if label_key == "fine_labels":
        batch["coarse_labels"] = [int(v) // 5 for v in labels]
    blob = pickle.dumps(batch, protocol=protocol)
    # protocol-2 GLOBAL opcodes name the module as text: emulate NumPy 1.x pickles
    if py2_numpy_names:
        blob = blob.replace(b"numpy._core.multiarray", b"numpy.core.multiarray")
    return blob


def test_cifar10_and_cifar100(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    expected = {}
    for i, name in enumerate(["data_batch_1", "data_batch_2", "data_batch_3", "data_batch_4",
                              "data_batch_5", "test_batch"]):
        images = RNG.integers(0, 256, (3, 32, 32, 3), dtype=np.uint8)
        labels = RNG.integers(0, 10, 3)
        (folder / name).write_bytes(cifar_pickle(images, labels, "labels",
                                                 py2_numpy_names=i % 2 == 0))
        expected[name] = (images, labels)
    train = load_dataset("cifar10", "train", root=str(tmp_path))
    assert train.images.shape == (15, 32, 32, 3) and train.num_classes == 10
    np.testing.assert_array_equal(train.images[3:6], expected["data_batch_2"][0])
    np.testing.assert_array_equal(train.labels,
                                  np.concatenate([expected[f"data_batch_{k}"][1]
                                                  for k in range(1, 6)]))
    test = load_dataset("cifar10", "test", root=str(tmp_path))
    np.testing.assert_array_equal(test.images, expected["test_batch"][0])

    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    images, labels = RNG.integers(0, 256, (4, 32, 32, 3), dtype=np.uint8), np.array([0, 99, 42, 7])
    (folder / "train").write_bytes(cifar_pickle(images, labels, "fine_labels", protocol=4))
    ds = load_dataset("cifar100", "train", root=str(tmp_path))
    np.testing.assert_array_equal(ds.images, images)
    np.testing.assert_array_equal(ds.labels, labels)
    assert ds.num_classes == 100


def test_cifar_missing_and_corrupt(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"(?s)cifar-10-batches-py.*data_batch_1"):
        load_dataset("cifar10", "train", root=str(tmp_path))
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    blob = cifar_pickle(RNG.integers(0, 256, (2, 32, 32, 3), dtype=np.uint8), [1, 2], "fine_labels")
    (folder / "test").write_bytes(blob[: len(blob) // 2])
    with pytest.raises(ValueError,
                       match=r"cifar-100-python/test: not a readable CIFAR python pickle"):
        load_dataset("cifar100", "test", root=str(tmp_path))

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))
    (folder / "test").write_bytes(pickle.dumps({"data": Evil(), "fine_labels": []}))
    with pytest.raises(ValueError, match="refusing to load global builtins.print"):
        load_dataset("cifar100", "test", root=str(tmp_path))
    (folder / "test").write_bytes(pickle.dumps({"data": np.zeros((2, 100), np.uint8),
                                                "fine_labels": [1, 2]}))
    with pytest.raises(ValueError, match=r"'data' must be uint8 of shape \(n, 3072\)"):
        load_dataset("cifar100", "test", root=str(tmp_path))
    (folder / "test").write_bytes(cifar_pickle(np.zeros((2, 32, 32, 3), np.uint8), [1, 100],
                                               "fine_labels"))
    with pytest.raises(ValueError, match=r"labels must be 0\.\.99"):
        load_dataset("cifar100", "test", root=str(tmp_path))
    assert cifar_mod.SPECS["cifar100"]["label_key"] == "fine_labels"


# --------------------------------------------------------------------------- image folder
def test_imagefolder(tmp_path):
    Image = pytest.importorskip("PIL.Image")
    colours = {"cat": (255, 0, 0), "dog": (0, 0, 255)}
    for cls, colour in colours.items():
        (tmp_path / "train" / cls).mkdir(parents=True)
        for i, size in enumerate([(40, 30), (20, 50)]):
            Image.new("RGB", size, colour).save(tmp_path / "train" / cls / f"{i}.png")
    Image.new("L", (16, 16), 128).save(tmp_path / "train" / "dog" / "2.jpg")
    ds = load_dataset("imagefolder", "train", root=str(tmp_path), image_size=16)
    assert ds.images.shape == (5, 16, 16, 3) and ds.num_classes == 2
    np.testing.assert_array_equal(ds.labels, [0, 0, 1, 1, 1])
    assert (ds.images[0] == [255, 0, 0]).all() and (ds.images[3] == [0, 0, 255]).all()
    assert abs(int(ds.images[4].mean()) - 128) <= 2   # grayscale jpeg -> RGB

    (tmp_path / "unlab").mkdir()
    for i in range(3):
        Image.new("RGB", (8, 8), (i, i, i)).save(tmp_path / "unlab" / f"{i}.png")
    ds = load_dataset("imagefolder", "unlab", root=str(tmp_path), image_size=None)
    assert ds.labels is None and ds.num_classes == 0 and ds.images.shape == (3, 8, 8, 3)

    (tmp_path / "unlab" / "3.png").write_bytes(b"\x89PNG\r\n\x1a\nthis is not a png")
    with pytest.raises(ValueError, match=r"3\.png: cannot decode image"):
        load_dataset("imagefolder", "unlab", root=str(tmp_path))
    with pytest.raises(FileNotFoundError, match="is not a directory"):
        load_dataset("imagefolder", "val", root=str(tmp_path))


# --------------------------------------------------------------------------- synthetic
def test_synthetic_deterministic_and_fast():
    start = time.perf_counter()
    a = load_dataset("synthetic", "train")
    elapsed = time.perf_counter() - start
    assert elapsed < 5.0, f"10k synthetic images took {elapsed:.1f}s"
    assert a.images.shape == (10_000, 32, 32, 3) and a.images.dtype == np.uint8
    assert a.num_classes == 5 and a.labels.dtype == np.int64
    np.testing.assert_array_equal(a.labels, a.factors["shape"])
    assert set(a.factors) >= {"shape", "color", "background", "size", "pos_x", "pos_y", "rotation"}
    assert np.bincount(a.labels).min() > 1800     # balanced classes

    b = load_dataset("synthetic", "train", n=300, image_size=16, seed=3)
    c = load_dataset("synthetic", "train", n=300, image_size=16, seed=3)
    d = load_dataset("synthetic", "train", n=300, image_size=16, seed=4)
    t = load_dataset("synthetic", "test", n=300, image_size=16, seed=3)
    assert b.images.shape == (300, 16, 16, 3)
    np.testing.assert_array_equal(b.images, c.images)
    for key in b.factors:
        np.testing.assert_array_equal(b.factors[key], c.factors[key])
    assert not np.array_equal(b.images, d.images) and not np.array_equal(b.images, t.images)


def test_synthetic_options():
    ds = load_dataset("synthetic", "val", n=2000, label_factor="color", color_correlation=1.0)
    assert ds.num_classes == 8
    np.testing.assert_array_equal(ds.labels, ds.factors["shape"] % 8)
    few = load_dataset("synthetic", "train", n=500, num_colors=3, num_backgrounds=1,
                       label_factor="color")
    assert few.num_classes == 3 and set(few.labels.tolist()) == {0, 1, 2}
    assert (few.factors["background"] == 0).all()
    with pytest.raises(ValueError, match="num_colors"):
        load_dataset("synthetic", "train", n=10, num_colors=9)
    upright = load_dataset("synthetic", "train", n=800, num_shapes=8, rotation=0.0)
    assert upright.num_classes == 8 and set(upright.labels.tolist()) == set(range(8))
    assert (upright.factors["rotation"] == 0).all()
    tilted = load_dataset("synthetic", "train", n=800, rotation=90.0)
    assert 0 < tilted.factors["rotation"].max() <= np.pi / 2 + 1e-6
    # the first five shapes and full rotation are the defaults: the same draws as before
    np.testing.assert_array_equal(load_dataset("synthetic", "train", n=50).images,
                                  load_dataset("synthetic", "train", n=50, num_shapes=5,
                                               rotation=360.0).images)
    with pytest.raises(ValueError, match="num_shapes"):
        load_dataset("synthetic", "train", n=10, num_shapes=9)
    with pytest.raises(ValueError, match="rotation"):
        load_dataset("synthetic", "train", n=10, rotation=400.0)
    with pytest.raises(ValueError, match="label_factor"):
        load_dataset("synthetic", "train", n=10, label_factor="size")
    with pytest.raises(TypeError, match="takes no option"):
        load_dataset("synthetic", "train", n=10, colour=3)
    with pytest.raises(TypeError, match="takes no option"):
        load_dataset("cifar10", "train", image_size=3)
    with pytest.raises(ValueError, match="unknown data set"):
        load_dataset("mnist", "train")


def test_array_dataset_validation():
    with pytest.raises(ValueError, match="uint8"):
        ArrayDataset(np.zeros((2, 4, 4, 3), np.float32), None, 0, "x")
    with pytest.raises(ValueError, match="labels shape"):
        ArrayDataset(np.zeros((2, 4, 4, 3), np.uint8), np.zeros(3), 1, "x")
    ds = ArrayDataset(np.zeros((2, 3, 4, 4), np.uint8).transpose(0, 2, 3, 1), [0, 1], 2, "x")
    assert ds.images.flags.c_contiguous and ds.labels.dtype == np.int64 and len(ds) == 2


# --------------------------------------------------------------------------- loader
def small_dataset(n=23):
    images = np.arange(n, dtype=np.uint8)[:, None, None, None] * np.ones((1, 2, 2, 3), np.uint8)
    return ArrayDataset(images, np.arange(n) % 3, 3, "toy")


def test_loader_epochs():
    ds = small_dataset()
    loader = IndexedLoader(ds, 5, seed=7)
    assert len(loader) == 4
    seen = []
    for idx, images in loader:
        assert idx.dtype == torch.int64 and idx.shape == (5,)
        assert images.dtype == torch.uint8 and images.shape == (5, 2, 2, 3)
        assert torch.equal(images[:, 0, 0, 0].long(), idx)   # image content = its index
        seen.append(idx)
    seen = torch.cat(seen)
    assert seen.numel() == 20 and seen.unique().numel() == 20    # 3 dropped, none repeated
    assert torch.equal(loader.labels[seen], torch.from_numpy(ds.labels)[seen])

    first = torch.cat([i for i, _ in loader])
    loader.set_epoch(1)
    second = torch.cat([i for i, _ in loader])
    assert not torch.equal(first, second)
    again = IndexedLoader(ds, 5, seed=7)       # a "resumed" loader
    again.set_epoch(1)
    assert torch.equal(torch.cat([i for i, _ in again]), second)
    assert torch.equal(epoch_permutation(23, 7, 1)[:20], second)
    other_seed = IndexedLoader(ds, 5, seed=8)
    other_seed.set_epoch(1)
    assert not torch.equal(torch.cat([i for i, _ in other_seed]), second)


def test_loader_no_drop_no_shuffle():
    ds = small_dataset()
    loader = IndexedLoader(ds, 5, seed=0, shuffle=False, drop_last=False)
    batches = [i for i, _ in loader]
    assert len(loader) == len(batches) == 5 and batches[-1].tolist() == [20, 21, 22]
    assert torch.equal(torch.cat(batches), torch.arange(23))
    with pytest.raises(ValueError, match="cannot fill one batch"):
        IndexedLoader(ds, 64, seed=0)
