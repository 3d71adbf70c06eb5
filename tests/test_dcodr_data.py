"""DCoDR data readers: tiny files in the published formats, written here and read back.

Shapes3D (HDF5 with 'images'/'labels'), Cars3D (MATLAB car_*_mesh.mat with 'im'), SmallNORB
(NORB binary matrices with their magic numbers), CelebA (aligned images + the annotation text
files), Edges2Shoes (edge|photo jpgs, optional Zappos50K files), and the shared stratified split.
"""
import csv
import gzip
import hashlib
import math

import numpy as np
import pytest

from fastipirm.data import ArrayDataset, DATASETS, load_dataset
from fastipirm.data import cars3d, celeba, edges2shoes, shapes3d, smallnorb
from fastipirm.data.domain_split import SEED, split_rows, stratified_split

Image = pytest.importorskip("PIL.Image")
h5py = pytest.importorskip("h5py")
sio = pytest.importorskip("scipy.io")

DCODR = ("shapes3d", "cars3d", "smallnorb", "celeba", "edges2shoes")


def _sha(a) -> str:
    return hashlib.sha256(np.ascontiguousarray(a).tobytes()).hexdigest()


def _check_split(ds_train, ds_test, ds_all, train_rows, test_rows, domain):
    """train/test are disjoint, cover 'all', keep every domain on both sides, ~90/10 per domain."""
    assert len(np.intersect1d(train_rows, test_rows)) == 0
    assert len(train_rows) + len(test_rows) == len(ds_all)
    assert len(test_rows) == math.ceil(0.1 * len(ds_all))
    dom = ds_all.factors[domain]
    for d in np.unique(dom):
        n = np.sum(dom == d)
        n_test = np.sum(dom[test_rows] == d)
        assert 1 <= n_test <= n - 1
        assert abs(n_test - 0.1 * n) < 1.0 + 1e-9
    for ds, rows in ((ds_train, train_rows), (ds_test, test_rows)):
        assert np.array_equal(ds.images, ds_all.images[rows])
        for key, value in ds_all.factors.items():
            assert np.array_equal(ds.factors[key], value[rows])
        assert np.array_equal(ds.labels, ds_all.labels[rows])
        assert ds.num_classes == ds_all.num_classes


def _check_common(ds, domain, channels=3):
    assert isinstance(ds, ArrayDataset)
    assert ds.images.dtype == np.uint8 and ds.images.shape[1:] == (64, 64, 3)
    assert ds.images.flags.c_contiguous
    assert ds.domain_factor == domain and ds.channels == channels
    for value in ds.factors.values():
        assert value.dtype == np.int64 and value.shape == (len(ds),)
    assert np.array_equal(ds.labels, ds.factors[domain])
    assert ds.num_classes == int(ds.factors[domain].max()) + 1


# ----------------------------------------------------------------------------------------------
# the split
# ----------------------------------------------------------------------------------------------

def test_split_matches_scikit_learn_golden_values():
    # expected values: sklearn 1.9.1, np.random.seed(2); train_test_split(np.arange(40),
    # stratify=np.tile(np.arange(4), 10), test_size=0.1)
    train, test = stratified_split(np.tile(np.arange(4), 10))
    assert train.tolist() == [3, 31, 4, 38, 26, 0, 33, 8, 12, 6, 27, 23, 34, 20, 25, 2, 1, 16, 35,
                              22, 10, 11, 39, 15, 5, 7, 13, 18, 36, 37, 24, 17, 29, 30, 28, 9]
    assert test.tolist() == [19, 14, 21, 32]
    # the official Cars3D split (prepare_cars3d.py: row r has car r % 183), same reference run
    train, test = stratified_split(np.tile(np.arange(183), 96).astype(np.uint32))
    assert (len(train), len(test)) == (15811, 1757)
    assert train[:8].tolist() == [14595, 11124, 636, 285, 14883, 2865, 223, 10716]
    assert test[:8].tolist() == [12687, 3849, 6780, 8994, 8134, 14755, 10080, 10316]
    assert _sha(train.astype(np.int64)) == ("3a5ab5c637aaeecb56fe2371405f1610"
                                            "7d1a911ad17a47b68d1d8013ce11bb0d")
    assert _sha(test.astype(np.int64)) == ("c82da222407035f92fe33350452379d4"
                                           "54bf1f6af0b0c08cd1ba455919161ba0")


def test_split_properties_and_errors():
    rng = np.random.default_rng()
    domains = rng.integers(0, 6, size=int(rng.integers(300, 600)))
    train, test = stratified_split(domains)
    again = stratified_split(domains)
    assert np.array_equal(train, again[0]) and np.array_equal(test, again[1])
    assert train.dtype == np.int64 and test.dtype == np.int64
    assert np.array_equal(np.sort(np.concatenate([train, test])), np.arange(len(domains)))
    for d in np.unique(domains):
        n, k = np.sum(domains == d), np.sum(domains[test] == d)
        assert abs(k - 0.1 * n) < 1.0 + 1e-9
    other = stratified_split(domains, seed=SEED + 1)
    assert not np.array_equal(np.sort(test), np.sort(other[1]))
    assert np.array_equal(split_rows(domains, "all"), np.arange(len(domains)))
    assert np.array_equal(split_rows(domains, "test"), test)
    with pytest.raises(ValueError, match="only 1"):
        stratified_split(np.array([0, 0, 0, 1, 2, 2, 2, 2, 2, 2]))
    with pytest.raises(ValueError, match="cannot hold"):
        stratified_split(np.repeat(np.arange(5), 2))
    with pytest.raises(ValueError, match="unknown split"):
        split_rows(domains, "val")


def test_registered_in_dispatcher():
    for name in DCODR:
        assert name in DATASETS
    with pytest.raises(ValueError, match="unknown split"):
        load_dataset("cars3d", "validation", root="nowhere")
    with pytest.raises(TypeError, match="no option"):
        load_dataset("shapes3d", "train", root="nowhere", bogus=1)


def test_array_dataset_new_fields_are_checked():
    images = np.zeros((4, 8, 8, 3), np.uint8)
    ds = ArrayDataset(images, np.zeros(4), 1, "x", factors={"d": np.zeros(4, np.int64)},
                      domain_factor="d", channels=1, targets={"t": np.zeros((4, 2))})
    assert ds.channels == 1 and ds.targets["t"].shape == (4, 2)
    assert ArrayDataset(images, None, 0, "y").domain_factor is None
    with pytest.raises(ValueError, match="domain factor"):
        ArrayDataset(images, None, 0, "x", factors={"d": np.zeros(4)}, domain_factor="e")
    with pytest.raises(ValueError, match="target 't'"):
        ArrayDataset(images, None, 0, "x", targets={"t": np.zeros((3, 2))})
    with pytest.raises(ValueError, match="channels"):
        ArrayDataset(images, None, 0, "x", channels=2)


# ----------------------------------------------------------------------------------------------
# OpenCV-style resize
# ----------------------------------------------------------------------------------------------

def _pattern(h, w, c):
    i = np.arange(h * w * c, dtype=np.int64).reshape(h, w, c)
    return ((i * 37 + (i // 7) ** 2) % 256).astype(np.uint8)


@pytest.mark.parametrize("shape,size,kind,dtype,expected", [
    ((96, 96, 1), 64, "linear", np.uint8, "adc8430a325d43f0"),
    ((128, 128, 3), 64, "linear", np.uint8, "2012442a32555a14"),
    ((256, 256, 3), 32, "cubic", np.uint8, "e84845b46c44e623"),
    ((256, 256, 3), 64, "linear", np.float64, "b3b2f8a8cf8abf8b"),
])
def test_resize_matches_opencv_golden(shape, size, kind, dtype, expected):
    # expected: sha256 prefixes of cv2.resize (opencv-python 5.0) on the same pattern
    out = edges2shoes.resize_like_cv2(_pattern(*shape)[None].astype(dtype), size, size, kind)[0]
    assert _sha(out)[:16] == expected


def test_resize_exact_halving_is_rounded_block_mean():
    img = np.random.default_rng().integers(0, 256, (3, 128, 128, 3)).astype(np.uint8)
    out = edges2shoes.resize_like_cv2(img, 64, 64, "linear")
    sums = img.astype(np.int64).reshape(3, 64, 2, 64, 2, 3).sum(axis=(2, 4))
    assert np.array_equal(out, (sums + 2) // 4)


# ----------------------------------------------------------------------------------------------
# Shapes3D
# ----------------------------------------------------------------------------------------------

SHAPES_GRID = {"floor_hue": np.linspace(0, 1, 10, endpoint=False)[[0, 3]],
               "wall_hue": np.linspace(0, 1, 10, endpoint=False)[[2, 9]],
               "object_hue": np.linspace(0, 1, 10, endpoint=False)[[5]],
               "scale": np.linspace(0.75, 1.25, 8)[[1, 6]],
               "shape": np.arange(4.0),
               "orientation": np.linspace(-30, 30, 15)[[0, 4, 7, 11, 14]]}


def _write_shapes(path, rng):
    grids = np.meshgrid(*SHAPES_GRID.values(), indexing="ij")
    labels = np.stack([g.reshape(-1) for g in grids], axis=1)  # file order: last factor fastest
    images = rng.integers(0, 256, size=(len(labels), 64, 64, 3), dtype=np.uint8)
    with h5py.File(path, "w") as f:
        f.create_dataset("images", data=images)
        f.create_dataset("labels", data=labels.astype(np.float64))
    return images, labels


def test_shapes3d_reads_factors_images_and_split(tmp_path):
    rng = np.random.default_rng()
    (tmp_path / "3dshapes").mkdir()
    images, labels = _write_shapes(tmp_path / "3dshapes" / "3dshapes.h5", rng)
    n = len(labels)
    full = shapes3d.load_shapes3d(tmp_path, "all", chunk=7)
    _check_common(full, "shape")
    assert len(full) == n == 160 and full.num_classes == 4 and full.name == "shapes3d/all"
    assert np.array_equal(full.images, images)
    assert tuple(full.factors) == shapes3d.FACTORS
    for j, name in enumerate(shapes3d.FACTORS):
        codes = np.searchsorted(SHAPES_GRID[name], labels[:, j])
        assert np.array_equal(full.factors[name], codes)
    train = load_dataset("shapes3d", "train", root=str(tmp_path), chunk=11)
    test = shapes3d.load_shapes3d(tmp_path, "test", chunk=1000)
    train_rows, test_rows = stratified_split(full.factors["shape"])
    _check_split(train, test, full, train_rows, test_rows, "shape")
    assert np.bincount(test.labels).tolist() == [4, 4, 4, 4]  # 40 rows per shape -> 4 in test
    # official reduced training set: drawn from the training rows after the split
    reduced = shapes3d.load_shapes3d(tmp_path, "train", reduced=20)
    assert len(reduced) == 20
    rows = [int(np.flatnonzero((images == im).all(axis=(1, 2, 3)))[0]) for im in reduced.images]
    assert len(set(rows)) == 20 and set(rows) <= set(train_rows.tolist())
    again = shapes3d.load_shapes3d(tmp_path, "train", reduced=20)
    assert np.array_equal(reduced.images, again.images)
    with pytest.raises(ValueError, match="train split only"):
        shapes3d.load_shapes3d(tmp_path, "test", reduced=20)
    first = shapes3d.load_shapes3d(tmp_path, "all", limit=30)
    assert np.array_equal(first.images, images[:30])


def test_shapes3d_errors_name_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="3dshapes.h5.*storage.googleapis.com"):
        shapes3d.load_shapes3d(tmp_path, "train")
    bad = tmp_path / "3dshapes.h5"
    bad.write_bytes(np.random.default_rng().bytes(4096))
    with pytest.raises(ValueError, match=str(bad)):
        shapes3d.load_shapes3d(tmp_path, "train")
    with h5py.File(bad, "w") as f:
        f.create_dataset("images", data=np.zeros((8, 64, 64, 3), np.uint8))
    with pytest.raises(ValueError, match=r"3dshapes.h5: missing dataset\(s\) labels"):
        shapes3d.load_shapes3d(tmp_path, "all")
    with h5py.File(bad, "w") as f:
        f.create_dataset("images", data=np.zeros((8, 64, 64, 3), np.float32))
        f.create_dataset("labels", data=np.zeros((8, 6)))
    with pytest.raises(ValueError, match="'images' must be uint8"):
        shapes3d.load_shapes3d(tmp_path, "all")


# ----------------------------------------------------------------------------------------------
# Cars3D
# ----------------------------------------------------------------------------------------------

def _write_cars(folder, names, rng):
    folder.mkdir(parents=True)
    ims = {}
    for name in names:
        im = rng.integers(0, 256, size=(128, 128, 3, 24, 4), dtype=np.uint8)
        sio.savemat(str(folder / name), {"im": im, "mask": np.zeros((128, 128, 24, 4), np.uint8)})
        ims[name] = im
    (folder / "list.txt").write_text("\n".join(n[:-4] for n in names) + "\n")
    return ims


def test_cars3d_layout_factors_and_official_split(tmp_path):
    rng = np.random.default_rng()
    names = ["car_002_mesh.mat", "car_010_mesh.mat", "car_001_mesh.mat"]
    ims = _write_cars(tmp_path / "data" / "cars", names, rng)
    full = cars3d.load_cars3d(tmp_path, "all")
    _check_common(full, "car")
    assert len(full) == 3 * 96 and full.num_classes == 3
    order = sorted(names)  # car numbers follow the sorted file names
    for row in rng.choice(len(full), size=12, replace=False):
        e, a, c = row // (24 * 3), (row // 3) % 24, row % 3
        assert full.factors["car"][row] == c
        assert full.factors["elevation"][row] == e and full.factors["azimuth"][row] == a
        assert full.factors["pose"][row] == e * 24 + a
        view = Image.fromarray(ims[order[c]][:, :, :, a, e])
        expected = np.asarray(view.resize((64, 64), Image.Resampling.LANCZOS))
        assert np.array_equal(full.images[row], expected)
    assert sorted(np.unique(full.factors["pose"]).tolist()) == list(range(96))
    train = cars3d.load_cars3d(tmp_path, "train")
    test = load_dataset("cars3d", "test", root=str(tmp_path))
    # prepare_cars3d.py: np.random.seed(2); train_test_split(arange(N), stratify=car, 0.1)
    train_rows, test_rows = stratified_split(np.arange(3 * 96) % 3)
    _check_split(train, test, full, train_rows, test_rows, "car")
    assert len(test) == 29


def test_cars3d_errors_name_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="car_\\*_mesh.mat.*scottreed"):
        cars3d.load_cars3d(tmp_path, "train")
    folder = tmp_path / "cars"
    folder.mkdir()
    bad = folder / "car_001_mesh.mat"
    bad.write_bytes(b"MATLAB 5.0 MAT-file" + np.random.default_rng().bytes(300))
    with pytest.raises(ValueError, match="car_001_mesh.mat"):
        cars3d.load_cars3d(tmp_path, "all")
    sio.savemat(str(bad), {"im": np.zeros((128, 128, 3, 24), np.uint8)})
    with pytest.raises(ValueError, match="car_001_mesh.mat: 'im' must be uint8"):
        cars3d.load_cars3d(tmp_path, "all")
    sio.savemat(str(bad), {"mask": np.zeros((4, 4), np.uint8)})
    with pytest.raises(ValueError, match="no variable 'im'"):
        cars3d.load_cars3d(tmp_path, "all")


# ----------------------------------------------------------------------------------------------
# SmallNORB
# ----------------------------------------------------------------------------------------------

def _norb_bytes(array: np.ndarray, magic: int) -> bytes:
    dims = list(array.shape) + [1] * max(0, 3 - array.ndim)
    header = np.array([magic, array.ndim] + dims, dtype="<i4").tobytes()
    return header + np.ascontiguousarray(array).tobytes()


def _write_norb(root, part, toys, pairs_per_toy, rng, gz=False):
    n = len(toys) * pairs_per_toy
    dat = rng.integers(0, 256, size=(n, 2, 96, 96), dtype=np.uint8)
    cat = np.repeat([c for c, _ in toys], pairs_per_toy).astype("<i4")
    info = np.stack([np.repeat([i for _, i in toys], pairs_per_toy),
                     rng.integers(0, 9, n), 2 * rng.integers(0, 18, n), rng.integers(0, 6, n)],
                    axis=1).astype("<i4")
    for kind, array, magic in (("dat", dat, 0x1E3D4C55), ("cat", cat, 0x1E3D4C54),
                               ("info", info, 0x1E3D4C54)):
        path = root / f"{smallnorb.PARTS[part]}-{kind}.mat"
        data = _norb_bytes(array, magic)
        if gz:
            with gzip.open(str(path) + ".gz", "wb") as f:
                f.write(data)
        else:
            path.write_bytes(data)
    return dat, cat, info


def test_smallnorb_binary_format_factors_and_split(tmp_path):
    rng = np.random.default_rng()
    tr = _write_norb(tmp_path, "training", [(0, 4), (1, 6)], 10, rng)
    te = _write_norb(tmp_path, "testing", [(0, 0), (2, 1)], 10, rng, gz=True)
    full = smallnorb.load_smallnorb(tmp_path, "all")
    _check_common(full, "object", channels=1)
    assert len(full) == 80 and full.num_classes == 4
    assert np.array_equal(full.images[..., 0], full.images[..., 2])
    dat = np.concatenate([tr[0], te[0]])
    info = np.concatenate([tr[2], te[2]])
    cat = np.concatenate([tr[1], te[1]])
    assert np.array_equal(full.factors["camera"], np.tile([0, 1], 40))
    assert np.array_equal(full.factors["category"], np.repeat(cat, 2))
    assert np.array_equal(full.factors["instance"], np.repeat(info[:, 0], 2))
    assert np.array_equal(full.factors["elevation"], np.repeat(info[:, 1], 2))
    assert np.array_equal(full.factors["azimuth"], np.repeat(info[:, 2] // 2, 2))
    assert np.array_equal(full.factors["lighting"], np.repeat(info[:, 3], 2))
    # objects numbered by (category, instance): (0,0) (0,4) (1,6) (2,1)
    assert np.array_equal(full.factors["object"], np.repeat([1, 2, 0, 3], 20))
    # 96 -> 64 bilinear: within one grey level of the exact float interpolation
    pos = np.arange(64) * 1.5 + 0.25
    lo = np.floor(pos).astype(int)
    w = pos - lo
    mat = np.zeros((64, 96))
    mat[np.arange(64), lo] = 1 - w
    mat[np.arange(64), lo + 1] = w
    for row in (0, 1, 37, 79):
        exact = mat @ dat[row // 2, row % 2].astype(np.float64) @ mat.T
        assert np.abs(full.images[row, :, :, 0] - exact).max() <= 1.0
    left = smallnorb.load_smallnorb(tmp_path, "all", cameras="left")
    assert len(left) == 40 and "camera" not in left.factors
    assert np.array_equal(left.images, full.images[0::2])
    train = smallnorb.load_smallnorb(tmp_path, "train")
    test = load_dataset("smallnorb", "test", root=str(tmp_path))
    train_rows, test_rows = stratified_split(full.factors["object"])
    _check_split(train, test, full, train_rows, test_rows, "object")
    by_cat = smallnorb.load_smallnorb(tmp_path, "test", domain="category")
    assert by_cat.domain_factor == "category" and by_cat.num_classes == 3


def test_smallnorb_errors_name_the_file(tmp_path):
    rng = np.random.default_rng()
    with pytest.raises(FileNotFoundError, match="training-dat.mat.*cs.nyu.edu"):
        smallnorb.load_smallnorb(tmp_path, "train")
    _write_norb(tmp_path, "training", [(0, 4), (1, 6)], 10, rng)
    _write_norb(tmp_path, "testing", [(0, 0), (2, 1)], 10, rng)
    cat_path = tmp_path / f"{smallnorb.PARTS['testing']}-cat.mat"
    good = cat_path.read_bytes()
    cat_path.write_bytes(np.array([0x1E3D4C99], "<i4").tobytes() + good[4:])
    with pytest.raises(ValueError, match=f"{cat_path.name}: magic number 0x1e3d4c99"):
        smallnorb.load_smallnorb(tmp_path, "all")
    cat_path.write_bytes(good[:-8])
    with pytest.raises(ValueError, match=f"{cat_path.name}: .* truncated"):
        smallnorb.load_smallnorb(tmp_path, "all")
    cat_path.write_bytes(np.array([0x1E3D4C55], "<i4").tobytes() + good[4:])
    with pytest.raises(ValueError, match="expected int32"):
        smallnorb.load_smallnorb(tmp_path, "all")
    cat_path.write_bytes(good[:-4] + np.array([7], "<i4").tobytes())
    with pytest.raises(ValueError, match=f"{cat_path.name}: category must lie in 0..4"):
        smallnorb.load_smallnorb(tmp_path, "all")


# ----------------------------------------------------------------------------------------------
# CelebA
# ----------------------------------------------------------------------------------------------

def _write_celeba(root, rng, ids, partition, fmt="png"):
    img_dir = root / "Img" / "img_align_celeba"
    img_dir.mkdir(parents=True)
    (root / "Anno").mkdir()
    (root / "Eval").mkdir()
    names, faces, marks = [], {}, {}
    for k, identity in enumerate(ids):
        name = f"{k + 1:06d}.jpg"
        face = rng.integers(0, 256, size=(218, 178, 3), dtype=np.uint8)
        if fmt == "png":
            Image.fromarray(face).save(img_dir / (name[:-4] + ".png"))
        else:
            Image.fromarray(face).save(img_dir / name, quality=95)
        names.append(name)
        faces[name] = face
        marks[name] = rng.integers(40, 170, size=10)
    (root / "Anno" / "identity_CelebA.txt").write_text(
        "".join(f"{n} {i}\n" for n, i in zip(names, ids)))
    header = " ".join(celeba.LANDMARK_NAMES)
    lines = [f"{len(names)}", header] + [
        f"{n} " + " ".join(f"{v:4d}" for v in marks[n]) for n in names]
    (root / "Anno" / "list_landmarks_align_celeba.txt").write_text("\n".join(lines) + "\n")
    (root / "Eval" / "list_eval_partition.txt").write_text(
        "".join(f"{n} {p}\n" for n, p in zip(names, partition)))
    return names, faces, marks


def test_celeba_crop_identity_landmarks_and_splits(tmp_path):
    rng = np.random.default_rng()
    ids = np.array([2880] * 10 + [12] * 10 + [500] * 10 + [77] * 10 + [9999])
    order = rng.permutation(len(ids))
    ids = ids[order]
    partition = np.where(np.isin(ids, [77, 9999]), 2, np.where(ids == 500, 1, 0))
    names, faces, marks = _write_celeba(tmp_path, rng, ids, partition)
    full = celeba.load_celeba(tmp_path, "all", workers=3)
    _check_common(full, "identity")
    keep = ids != 9999  # a single-image identity cannot be split: left out of the pool
    assert len(full) == 40 and full.num_classes == 4
    expected_codes = np.searchsorted([12, 77, 500, 2880], ids[keep])
    assert np.array_equal(full.factors["identity"], expected_codes)
    kept = [n for n, k in zip(names, keep) if k]
    for row in range(0, 40, 7):
        crop = faces[kept[row]][45:173, 25:153].astype(np.int64)
        block = crop.reshape(64, 2, 64, 2, 3).sum(axis=(1, 3))
        assert np.array_equal(full.images[row], (block + 2) // 4)
        m = marks[kept[row]].astype(np.float64)
        expected = np.empty(10)
        expected[0::2] = (m[0::2] - 25 - 0.5) / 2
        expected[1::2] = (m[1::2] - 45 - 0.5) / 2
        assert np.allclose(full.targets["landmarks"][row], expected)
    assert full.targets["landmarks"].dtype == np.float32
    train = celeba.load_celeba(tmp_path, "train", workers=1)
    test = load_dataset("celeba", "test", root=str(tmp_path))
    train_rows, test_rows = stratified_split(full.factors["identity"])
    _check_split(train, test, full, train_rows, test_rows, "identity")
    assert np.array_equal(test.targets["landmarks"], full.targets["landmarks"][test_rows])
    # identity-disjoint protocol from the published partition file
    d_train = celeba.load_celeba(tmp_path, "train", protocol="disjoint")
    d_test = celeba.load_celeba(tmp_path, "test", protocol="disjoint")
    assert set(d_test.factors["identity"].tolist()) == {1}
    assert set(d_train.factors["identity"].tolist()) == {0, 2, 3}
    assert len(d_train) + len(d_test) == 40
    every = celeba.load_celeba(tmp_path, "all", min_images=1, landmarks=False)
    assert len(every) == 41 and every.targets is None and every.num_classes == 5


def test_celeba_reads_jpg_and_reports_errors(tmp_path):
    rng = np.random.default_rng()
    ids = np.repeat([5, 6], 10)
    names, faces, _ = _write_celeba(tmp_path, rng, ids, np.zeros(20, int), fmt="jpg")
    ds = celeba.load_celeba(tmp_path, "test")
    assert len(ds) == 2 and sorted(ds.labels.tolist()) == [0, 1]
    with Image.open(tmp_path / "Img" / "img_align_celeba" / names[0]) as im:
        decoded = np.asarray(im.convert("RGB")).astype(np.int64)
    first = celeba.load_celeba(tmp_path, "all", landmarks=False)
    block = decoded[45:173, 25:153].reshape(64, 2, 64, 2, 3).sum(axis=(1, 3))
    assert np.array_equal(first.images[0], (block + 2) // 4)
    bad = tmp_path / "Img" / "img_align_celeba" / names[3]
    bad.write_bytes(b"\xff\xd8\xff" + rng.bytes(200))
    with pytest.raises(ValueError, match=names[3]):
        celeba.load_celeba(tmp_path, "all")
    ident = tmp_path / "Anno" / "identity_CelebA.txt"
    ident.write_text(ident.read_text() + "000099.jpg twelve\n")
    with pytest.raises(ValueError, match="identity_CelebA.txt, line 21"):
        celeba.load_celeba(tmp_path, "all")
    ident.unlink()
    with pytest.raises(FileNotFoundError, match="identity_CelebA.txt.*mmlab"):
        celeba.load_celeba(tmp_path, "all")


# ----------------------------------------------------------------------------------------------
# Edges2Shoes
# ----------------------------------------------------------------------------------------------

def _smooth(rng, h, w):
    small = rng.integers(0, 256, size=(h // 16, w // 16, 3), dtype=np.uint8)
    return np.asarray(Image.fromarray(small).resize((w, h), Image.Resampling.BILINEAR))


def _write_pairs(root, rng, train_ids, val_ids):
    photos = {}
    for folder, ids in (("train", train_ids), ("val", val_ids)):
        (root / "edges2shoes" / folder).mkdir(parents=True)
        for k in ids:
            edges = np.where(rng.random((256, 256, 1)) < 0.03, 0, 255).repeat(3, axis=2)
            photo = _smooth(rng, 256, 256)
            pair = np.concatenate([edges, photo], axis=1).astype(np.uint8)
            Image.fromarray(pair).save(root / "edges2shoes" / folder / f"{k}_AB.jpg", quality=95)
            photos[(folder, k)] = photo
    return photos


def _expected_64(image, inflate):
    img = image.astype(np.int64)
    if inflate:
        pad = np.pad(img, ((2, 2), (2, 2), (0, 0)), mode="edge")
        img = np.min([pad[i:i + 256, j:j + 256] for i in range(5) for j in range(5)], axis=0)
    pick = img.reshape(64, 4, 64, 4, 3)[:, 1:3, :, 1:3].sum(axis=(1, 3))
    return np.floor(pick / 4 + 0.5).astype(np.uint8)


def test_edges2shoes_rows_preprocessing_and_split(tmp_path):
    rng = np.random.default_rng()
    _write_pairs(tmp_path, rng, train_ids=[1, 2, 3, 4, 5, 6, 7, 8, 10], val_ids=[1, 9])
    files = edges2shoes.pair_files(tmp_path)
    assert [(p.parent.name, p.name) for p in files][:3] == [
        ("train", "1_AB.jpg"), ("val", "1_AB.jpg"), ("train", "2_AB.jpg")]
    assert files[-1].name == "10_AB.jpg" and files[-2].parent.name == "val"
    full = edges2shoes.load_edges2shoes(tmp_path, "all")
    _check_common(full, "modality")
    assert len(full) == 22 and full.num_classes == 2 and list(full.factors) == ["modality"]
    assert np.array_equal(full.labels, np.tile([0, 1], 11))
    for i in (0, 1, 10):
        with Image.open(files[i]) as im:
            pair = np.asarray(im.convert("RGB"))
        assert np.array_equal(full.images[2 * i], _expected_64(pair[:, 256:], True))
        assert np.array_equal(full.images[2 * i + 1], _expected_64(pair[:, :256], True))
    only_edges = edges2shoes.load_edges2shoes(tmp_path, "all", inflate_lines="edges", limit=2)
    assert len(only_edges) == 4
    with Image.open(files[1]) as im:
        pair = np.asarray(im.convert("RGB"))
    assert np.array_equal(only_edges.images[2], _expected_64(pair[:, 256:], False))
    assert np.array_equal(only_edges.images[3], full.images[3])
    train = edges2shoes.load_edges2shoes(tmp_path, "train")
    test = load_dataset("edges2shoes", "test", root=str(tmp_path))
    train_rows, test_rows = stratified_split(np.tile([0, 1], 11))
    _check_split(train, test, full, train_rows, test_rows, "modality")


def test_edges2shoes_zappos_attributes(tmp_path):
    rng = np.random.default_rng()
    photos = _write_pairs(tmp_path, rng, train_ids=[1, 2, 3, 4, 5], val_ids=[])
    data = tmp_path / "zappos_50k" / "ut-zap50k-data"
    images = tmp_path / "zappos_50k" / "ut-zap50k-images"
    data.mkdir(parents=True)
    # Zappos images: the five photos (shrunk, as the catalogue images are) in shuffled order
    # plus three unrelated shoes
    perm = rng.permutation(5)
    rels = []
    for j in range(8):
        rel = f"Shoes/Boots/Brand{j}/{1000 + j}.{j}.jpg"
        (images / rel).parent.mkdir(parents=True, exist_ok=True)
        src = photos[("train", int(perm[j]) + 1)] if j < 5 else _smooth(rng, 256, 256)
        Image.fromarray(src).resize((136, 102), Image.Resampling.BILINEAR).save(images / rel)
        rels.append(rel)
    sio.savemat(str(data / "image-path.mat"),
                {"imagepath": np.array([[r] for r in rels], dtype=object)})
    category = ["Boots", "Shoes", "Boots", "Sandals", "Boots", "Shoes", "Slippers", "Boots"]
    gender = ["Men", "Women;Girls", "Women", "", "Men", "Men", "Women", "Boys"]
    with open(data / "meta-data.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["CID", "Category", "SubCategory", "HeelHeight", "Insole", "Closure",
                         "Gender", "Material", "ToeStyle"])
        for j in range(8):
            writer.writerow([f"{1000 + j}-{j}", category[j], "Mid-Calf", "", "", "Lace up",
                             gender[j], "Leather", "Round"])
    # rare=1: a value seen once becomes "Other" (the official threshold is 250)
    codes = edges2shoes.zappos_labels(data / "meta-data.csv", rare=1)
    # shoe_type: Boots x4, Shoes x2 -> kept; Sandals, Slippers -> Other; sorted: Boots, Other, Shoes
    assert codes["shoe_type"].tolist() == [0, 2, 0, 1, 0, 2, 1, 0]
    # gender: "Women;Girls" -> Women, "" -> Other, Boys x1 -> Other; Men x3, Women x3
    assert codes["gender"].tolist() == [0, 2, 2, 1, 0, 0, 2, 1]
    assert set(codes["material"].tolist()) == {0}
    ds = edges2shoes.load_edges2shoes(tmp_path, "all", rare=1)
    assert list(ds.factors) == ["modality"] + list(edges2shoes.ATTRIBUTES)
    for pair in range(5):
        zap_row = int(np.flatnonzero(perm == pair)[0])  # Zappos row holding this pair's photo
        for name in edges2shoes.ATTRIBUTES:
            assert ds.factors[name][2 * pair] == codes[name][zap_row]
            assert ds.factors[name][2 * pair + 1] == codes[name][zap_row]
    plain = edges2shoes.load_edges2shoes(tmp_path, "all", attributes=False)
    assert list(plain.factors) == ["modality"]
    (images / rels[6]).unlink()
    with pytest.raises(FileNotFoundError, match="1006.6.jpg"):
        edges2shoes.load_edges2shoes(tmp_path, "all")


def test_edges2shoes_errors_name_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="edges2shoes.*edges2shoes.tar.gz"):
        edges2shoes.load_edges2shoes(tmp_path, "train")
    rng = np.random.default_rng()
    _write_pairs(tmp_path, rng, train_ids=[1, 2, 3], val_ids=[])
    with pytest.raises(FileNotFoundError, match="ut-zap50k-data"):
        edges2shoes.load_edges2shoes(tmp_path, "all", attributes=True)
    bad = tmp_path / "edges2shoes" / "train" / "2_AB.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0" + rng.bytes(100))
    with pytest.raises(ValueError, match="2_AB.jpg"):
        edges2shoes.load_edges2shoes(tmp_path, "all")
    Image.fromarray(np.zeros((256, 256, 3), np.uint8)).save(bad)
    with pytest.raises(ValueError, match="2_AB.jpg: an edges2shoes image is edge|photo"):
        edges2shoes.load_edges2shoes(tmp_path, "all")
