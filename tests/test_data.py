"""Data sets, disjoint splits with saved calibration indices, tensor transforms, loaders, bad input."""
import gzip
import json
import pickle
import struct
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from dynexit.config import DataConfig, RunConfig, merge
from dynexit.data import (
    CALIB_FILE,
    DIGITS_TEST_SIZE,
    FASHION_MNIST_DEBIAN,
    TensorTransform,
    build_datasets,
    build_loaders,
    read_idx,
)

DIGITS_MEAN, DIGITS_STD = 0.3053, 0.3759


def to_uint8(images: torch.Tensor, mean, std) -> torch.Tensor:
    """Undoes the normalization of float images (..., 3, H, W)."""
    m = torch.tensor(mean).view(3, 1, 1)
    s = torch.tensor(std).view(3, 1, 1)
    return ((images * s + m) * 255).round().to(torch.uint8)


@pytest.fixture(scope="module")
def digits():
    return build_datasets(DataConfig())


# ---------------------------------------------------------------------------------------------- digits

def test_digits_default_splits_are_disjoint_and_sized(digits):
    n_train_total = 1797 - DIGITS_TEST_SIZE
    assert (len(digits.train), len(digits.calib), len(digits.test)) == (1293, 144, 360)
    assert round(0.1 * n_train_total) == 144
    assert len(np.intersect1d(digits.train_indices, digits.calib_indices)) == 0
    assert np.array_equal(np.union1d(digits.train_indices, digits.calib_indices), np.arange(n_train_total))
    assert (digits.num_classes, digits.image_size, digits.name) == (10, 32, "digits")
    image, target = digits.train[0]
    assert image.shape == (3, 32, 32) and image.dtype == torch.float32 and isinstance(target, int)
    assert torch.equal(image[0], image[1]) and torch.equal(image[0], image[2])  # grey -> 3 channels
    targets = torch.cat([digits.train.targets, digits.calib.targets, digits.test.targets])
    assert targets.min() == 0 and targets.max() == 9
    assert torch.bincount(targets).tolist() == [178, 182, 177, 183, 181, 182, 181, 179, 174, 180]


def test_digits_eval_images_are_the_resized_digits_normalized(digits):
    from sklearn.datasets import load_digits

    raw = load_digits().images  # 0..16
    images = torch.stack([digits.test[i][0] for i in range(len(digits.test))])
    pixels = to_uint8(images, digits.mean, digits.std).float() / 255
    assert pixels.shape == (360, 3, 32, 32)
    # the upsampled test images keep the data set's average ink
    assert abs(pixels.mean().item() - raw.mean() / 16) < 0.02
    # the fixed test split, in order, upsampled bilinearly (to within two rounding steps)
    order = np.sort(np.random.default_rng(20230611).permutation(1797)[:DIGITS_TEST_SIZE])
    source = torch.from_numpy(raw[order] / 16).float().unsqueeze(1)
    expected = torch.nn.functional.interpolate(source, size=(32, 32), mode="bilinear", align_corners=False)
    assert (pixels[:, :1] - expected).abs().max() < 2.01 / 255


def test_split_seed_and_subsets_are_deterministic(digits):
    again = build_datasets(DataConfig())
    assert np.array_equal(again.calib_indices, digits.calib_indices)
    other = build_datasets(DataConfig(split_seed=1))
    assert not np.array_equal(other.calib_indices, digits.calib_indices)
    cfg = DataConfig(train_subset=100, test_subset=50, calib_size=40, split_seed=3)
    a, b = build_datasets(cfg), build_datasets(cfg)
    assert (len(a.train), len(a.calib), len(a.test)) == (100, 40, 50)
    assert np.array_equal(a.train_indices, b.train_indices) and np.array_equal(a.test_indices, b.test_indices)
    assert len(np.intersect1d(a.train_indices, a.calib_indices)) == 0
    assert torch.equal(a.test.targets, b.test.targets)
    c = build_datasets(replace(cfg, split_seed=4))
    assert not np.array_equal(c.train_indices, a.train_indices)


# ------------------------------------------------------------------------------ calibration indices file

def test_calibration_indices_are_saved_and_reused(tmp_path):
    first = build_datasets(DataConfig(calib_size=50), tmp_path)
    record = json.loads((tmp_path / CALIB_FILE).read_text())
    assert record["dataset"] == "digits" and record["train_size"] == 1437
    assert record["indices"] == first.calib_indices.tolist()
    assert [p.name for p in tmp_path.iterdir()] == [CALIB_FILE]  # no temporary file left behind

    # a resumed run takes the saved split, whatever the seed says now
    record["indices"] = list(range(100, 150))
    (tmp_path / CALIB_FILE).write_text(json.dumps(record))
    resumed = build_datasets(DataConfig(calib_size=50, split_seed=7), tmp_path)
    assert resumed.calib_indices.tolist() == list(range(100, 150))
    assert len(np.intersect1d(resumed.train_indices, resumed.calib_indices)) == 0
    assert len(resumed.train) == 1437 - 50


@pytest.mark.parametrize("change, message", [
    ({"train_size": 60000}, "was made for 'digits' with 60000"),
    ({"dataset": "fashion_mnist"}, "was made for 'fashion_mnist'"),
    ({"indices": list(range(49)) + [5000]}, "outside 0..1436"),
    ({"indices": list(range(49)) + [0]}, "repeated"),
    ({"indices": list(range(10))}, "holds 10 indices"),
])
def test_a_saved_file_that_does_not_fit_is_an_error(tmp_path, change, message):
    build_datasets(DataConfig(calib_size=50), tmp_path)
    path = tmp_path / CALIB_FILE
    path.write_text(json.dumps({**json.loads(path.read_text()), **change}))
    with pytest.raises(ValueError, match=message) as err:
        build_datasets(DataConfig(calib_size=50), tmp_path)
    assert CALIB_FILE in str(err.value)


def test_an_unreadable_calibration_file_is_an_error(tmp_path):
    (tmp_path / CALIB_FILE).write_text("{not json")
    with pytest.raises(ValueError, match="not a calibration-indices file"):
        build_datasets(DataConfig(), tmp_path)


# ---------------------------------------------------------------------------------------- transforms

def test_tensor_augmentation_is_a_padded_crop_and_maybe_a_flip():
    torch.manual_seed(0)
    b, h, w, p = 64, 6, 7, 2
    images = torch.randint(1, 256, (b, 1, h, w), dtype=torch.uint8)  # no zeros: padding is recognisable
    mean, std = (0.5,) * 3, (0.25,) * 3
    for hflip in (False, True):
        out = to_uint8(TensorTransform(mean, std, crop_padding=p, hflip=hflip)(images), mean, std)
        assert out.shape == (b, 3, h, w) and torch.equal(out[:, 0], out[:, 2])
        padded = torch.nn.functional.pad(images, (p, p, p, p))
        found = []
        for i in range(b):
            matches = [(dy, dx, f) for dy in range(2 * p + 1) for dx in range(2 * p + 1) for f in (0, 1)
                       if torch.equal(out[i, 0], (lambda c: c.flip(-1) if f else c)(
                           padded[i, 0, dy:dy + h, dx:dx + w]))]
            assert matches, f"image {i} is no padded crop"
            found.append(matches[0])
        flips = {f for _, _, f in found}
        assert flips == ({0, 1} if hflip else {0})
        assert len({(dy, dx) for dy, dx, _ in found}) > 10  # offsets drawn per image


def test_eval_transform_normalizes_exactly():
    images = torch.tensor([0, 51, 255], dtype=torch.uint8).view(3, 1, 1, 1).expand(3, 3, 2, 2).contiguous()
    mean, std = (0.1, 0.2, 0.3), (0.5, 0.25, 0.125)
    out = TensorTransform(mean, std)(images)
    expected = (torch.tensor([0, 0.2, 1.0]).view(3, 1, 1, 1) - torch.tensor(mean).view(1, 3, 1, 1)) \
        / torch.tensor(std).view(1, 3, 1, 1)
    assert torch.allclose(out, expected.expand(3, 3, 2, 2), atol=1e-6)
    with pytest.raises(TypeError, match="uint8"):
        TensorTransform(mean, std)(images.float())


def test_digits_train_transform_never_flips_and_calib_is_not_augmented(digits):
    train_tf, calib_tf = digits.train.transform, digits.calib.transform
    assert (train_tf.hflip, train_tf.crop_padding) == (False, 4)
    assert (calib_tf.hflip, calib_tf.crop_padding) == (False, 0)
    assert torch.equal(digits.calib[0][0], digits.calib[0][0])
    assert digits.test.transform.crop_padding == 0


def test_imagenet_recipe_is_the_official_timm_one():
    splits = build_datasets(DataConfig(recipe="imagenet", image_size=32, hflip=True))
    steps = {type(t).__name__: t for t in splits.train.transform.transform.transforms}
    crop = steps["RandomResizedCropAndInterpolation"]
    assert crop.size == (32, 32) and crop.scale == (0.08, 1.0) and crop.interpolation.value == "bicubic"
    augment = steps["RandAugment"]
    assert augment.num_layers == 2 and len(augment.ops) == 15
    assert {(op.magnitude, op.magnitude_std, op.prob) for op in augment.ops} == {(9, 0.5, 0.5)}
    assert steps["RandomErasing"].probability == 0.25 and steps["RandomErasing"].mode == "pixel"
    assert steps["RandomHorizontalFlip"].p == 0.5
    assert torch.allclose(steps["Normalize"].mean, torch.tensor([DIGITS_MEAN] * 3))
    evals = {type(t).__name__: t for t in splits.test.transform.transform.transforms}
    assert evals["Resize"].size == 36 and evals["CenterCrop"].size == (32, 32)  # 32 / 0.875, as 256/224
    torch.manual_seed(0)
    image, _ = splits.train[0]
    assert image.shape == (3, 32, 32)
    assert torch.equal(splits.test[3][0], splits.test[3][0])


# ------------------------------------------------------------------------------------------- loaders

def test_loaders_shuffle_by_seed_and_keep_eval_order():
    splits = build_datasets(DataConfig(train_subset=200, calib_size=30, test_subset=70))
    loaders = build_loaders(splits, batch_size=32, seed=5)
    order = lambda loader: torch.cat([y for _, y in loader])  # noqa: E731
    first = order(loaders["train"])
    assert len(first) == 192  # 6 full batches: the incomplete one is dropped
    assert torch.equal(first, order(build_loaders(splits, batch_size=32, seed=5)["train"]))
    assert not torch.equal(first, order(build_loaders(splits, batch_size=32, seed=6)["train"]))
    assert not torch.equal(first, splits.train.targets[:192])
    assert torch.equal(order(loaders["test"]), splits.test.targets)
    assert torch.equal(order(loaders["calib"]), splits.calib.targets)
    images, targets = next(iter(loaders["test"]))
    assert images.shape == (32, 3, 32, 32) and targets.dtype == torch.int64
    assert torch.equal(images[5], splits.test[5][0])  # batched and per-sample paths agree
    small = build_loaders(splits, batch_size=256)["train"]  # fewer images than one batch: kept
    assert sum(len(y) for _, y in small) == 200


def test_distributed_loader_uses_a_distributed_sampler(tmp_path):
    import torch.distributed as dist
    from torch.utils.data.distributed import DistributedSampler

    splits = build_datasets(DataConfig(train_subset=64, calib_size=10, test_subset=20))
    with pytest.raises(ValueError, match="process group"):
        build_loaders(splits, batch_size=16, distributed=True)
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        loaders = build_loaders(splits, batch_size=16, distributed=True, seed=2)
        assert isinstance(loaders["train"].sampler, DistributedSampler)
        assert loaders["train"].sampler.seed == 2 and loaders["train"].sampler.shuffle
        assert sorted(torch.cat([y for _, y in loaders["train"]]).tolist()) == \
            sorted(splits.train.targets.tolist())
        assert not isinstance(loaders["test"].sampler, DistributedSampler)
    finally:
        dist.destroy_process_group()


# ------------------------------------------------------------------------------------- Fashion-MNIST

def write_idx(path: Path, array: np.ndarray) -> None:
    data = struct.pack(">BBBB", 0, 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    data += array.astype(np.uint8).tobytes()
    if path.suffix == ".gz":
        data = gzip.compress(data)
    path.write_bytes(data)


def make_fashion(folder: Path, n_train: int = 40, n_test: int = 12, gz: bool = True) -> dict:
    rng = np.random.default_rng(0)
    arrays = {"train-images-idx3-ubyte": rng.integers(0, 256, (n_train, 28, 28)),
              "train-labels-idx1-ubyte": np.arange(n_train) % 10,
              "t10k-images-idx3-ubyte": rng.integers(0, 256, (n_test, 28, 28)),
              "t10k-labels-idx1-ubyte": (np.arange(n_test) * 3) % 10}
    folder.mkdir(parents=True, exist_ok=True)
    for stem, array in arrays.items():
        write_idx(folder / (stem + (".gz" if gz else "")), array)
    return arrays


@pytest.mark.parametrize("gz", [True, False])
def test_fashion_mnist_reads_idx_files_from_root(tmp_path, gz):
    arrays = make_fashion(tmp_path, gz=gz)
    splits = build_datasets(DataConfig(name="fashion_mnist", root=str(tmp_path), image_size=28,
                                       calib_size=10), tmp_path / "run")
    assert (len(splits.train), len(splits.calib), len(splits.test)) == (30, 10, 12)
    assert splits.num_classes == 10 and splits.classes[9] == "Ankle boot"
    assert splits.test.targets.tolist() == arrays["t10k-labels-idx1-ubyte"].tolist()
    image, _ = splits.test[4]
    assert image.shape == (3, 28, 28)
    assert torch.equal(to_uint8(image, splits.mean, splits.std)[0],
                       torch.from_numpy(arrays["t10k-images-idx3-ubyte"][4].astype(np.uint8)))
    assert splits.train.transform.hflip and splits.train.transform.crop_padding == 3  # 28 // 8


def test_read_idx_rejects_bad_files(tmp_path):
    good = tmp_path / "x-idx3-ubyte"
    write_idx(good, np.arange(24).reshape(2, 3, 4))
    assert read_idx(good).shape == (2, 3, 4) and read_idx(good)[1, 2, 3] == 23
    truncated = tmp_path / "short-idx3-ubyte"
    truncated.write_bytes(good.read_bytes()[:-1])
    with pytest.raises(ValueError, match="short-idx3-ubyte.*need 24 bytes"):
        read_idx(truncated)
    bad_magic = tmp_path / "magic"
    bad_magic.write_bytes(b"\x01\x02\x03\x04rest")
    with pytest.raises(ValueError, match="magic.*not an IDX file"):
        read_idx(bad_magic)
    broken_gz = tmp_path / "broken-idx1-ubyte.gz"
    broken_gz.write_bytes(b"not gzip at all")
    with pytest.raises(ValueError, match="broken-idx1-ubyte.gz"):
        read_idx(broken_gz)


def test_missing_fashion_mnist_says_both_ways_or_falls_back(tmp_path):
    with pytest.raises(FileNotFoundError) as err:
        build_datasets(DataConfig(name="fashion_mnist", root=str(tmp_path)))
    assert "dataset-fashion-mnist" in str(err.value) and "data.download=true" in str(err.value)
    assert str(tmp_path) in str(err.value)
    splits = build_datasets(DataConfig(name="fashion_mnist", root=str(tmp_path), fallback="digits"))
    assert splits.name == "digits" and len(splits.test) == DIGITS_TEST_SIZE


@pytest.mark.skipif(not (FASHION_MNIST_DEBIAN / "train-images-idx3-ubyte.gz").is_file(),
                    reason="Debian package dataset-fashion-mnist not installed")
def test_real_fashion_mnist():
    splits = build_datasets(DataConfig(name="fashion_mnist", image_size=32, calib_size=5000))
    assert (len(splits.train), len(splits.calib), len(splits.test)) == (55000, 5000, 10000)
    assert splits.train.images.shape == (60000, 1, 32, 32) and splits.test.images.dtype == torch.uint8
    assert torch.bincount(torch.cat([splits.train.targets, splits.calib.targets])).tolist() == [6000] * 10
    assert torch.bincount(splits.test.targets).tolist() == [1000] * 10
    test = torch.stack([splits.test[i][0] for i in range(0, 10000, 50)])
    assert test.shape == (200, 3, 32, 32)
    pixels = to_uint8(test, splits.mean, splits.std).float() / 255
    assert abs(pixels.mean().item() - 0.286) < 0.03  # Fashion-MNIST's known mean


# --------------------------------------------------------------------------------------------- CIFAR

def cifar_image(i: int) -> np.ndarray:
    """A (3, 32, 32) image whose pixels tell channel, row and column apart."""
    c, y, x = np.meshgrid(np.arange(3), np.arange(32), np.arange(32), indexing="ij")
    return ((c * 80 + y * 2 + x + i * 7) % 256).astype(np.uint8)


def write_cifar(root: Path, name: str) -> tuple[list[int], list[int]]:
    if name == "cifar10":
        folder, files, test, key, meta = root / "cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)], \
            "test_batch", "labels", ("batches.meta", "label_names", 10)
    else:
        folder, files, test, key, meta = root / "cifar-100-python", ["train"], "test", "fine_labels", \
            ("meta", "fine_label_names", 100)
    folder.mkdir(parents=True)
    counter, train_labels = 0, []
    for f in files:
        n = 20 // len(files)
        labels = [(counter + j) * 7 % meta[2] for j in range(n)]
        data = np.stack([cifar_image(counter + j).reshape(-1) for j in range(n)])
        with open(folder / f, "wb") as fh:
            pickle.dump({"data": data, key: labels}, fh)
        counter += n
        train_labels += labels
    test_labels = [meta[2] - 1 - j for j in range(6)]
    with open(folder / test, "wb") as fh:
        pickle.dump({"data": np.stack([cifar_image(100 + j).reshape(-1) for j in range(6)]), key: test_labels}, fh)
    with open(folder / meta[0], "wb") as fh:
        pickle.dump({meta[1]: [f"class{k}" for k in range(meta[2])]}, fh)
    return train_labels, test_labels


@pytest.mark.parametrize("name, classes", [("cifar10", 10), ("cifar100", 100)])
def test_cifar_from_python_batches(tmp_path, name, classes):
    train_labels, test_labels = write_cifar(tmp_path, name)
    splits = build_datasets(DataConfig(name=name, root=str(tmp_path), calib_size=4))
    assert splits.num_classes == classes and splits.classes[-1] == f"class{classes - 1}"
    assert (len(splits.train), len(splits.calib), len(splits.test)) == (16, 4, 6)
    assert splits.test.targets.tolist() == test_labels
    assert splits.calib.targets.tolist() == [train_labels[i] for i in splits.calib_indices]
    image, target = splits.test[2]
    assert target == test_labels[2]
    assert torch.equal(to_uint8(image, splits.mean, splits.std), torch.from_numpy(cifar_image(102)))
    image, _ = splits.calib[0]
    assert torch.equal(to_uint8(image, splits.mean, splits.std),
                       torch.from_numpy(cifar_image(int(splits.calib_indices[0]))))
    assert splits.train.transform.hflip and splits.train.transform.crop_padding == 4


def test_missing_cifar_names_the_folder(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError, match="nowhere.*data.download=true"):
        build_datasets(DataConfig(name="cifar10", root=str(missing)))


def test_corrupt_cifar_batch_names_the_file(tmp_path):
    write_cifar(tmp_path, "cifar10")
    (tmp_path / "cifar-10-batches-py" / "data_batch_3").write_bytes(b"garbage")
    with pytest.raises(ValueError, match="data_batch_3"):
        build_datasets(DataConfig(name="cifar10", root=str(tmp_path), calib_size=2))


# --------------------------------------------------------------------------------------- imagefolder

def make_folder(root: Path, classes=("ant", "bee", "cat"), per_class=(4, 2)) -> None:
    from PIL import Image

    rng = np.random.default_rng(0)
    for part, n in zip(("train", "val"), per_class):
        for c in classes:
            (root / part / c).mkdir(parents=True)
            for j in range(n):
                pixels = rng.integers(0, 256, (12, 10, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(root / part / c / f"{j}.png")


@pytest.mark.parametrize("recipe", ["small", "imagenet"])
def test_imagefolder_splits(tmp_path, recipe):
    make_folder(tmp_path)
    splits = build_datasets(DataConfig(name="imagefolder", root=str(tmp_path), image_size=16, calib_size=3,
                                       recipe=recipe))
    assert splits.num_classes == 3 and splits.classes == ["ant", "bee", "cat"]
    assert (len(splits.train), len(splits.calib), len(splits.test)) == (9, 3, 6)
    assert splits.test.targets.tolist() == [0, 0, 1, 1, 2, 2]
    image, target = splits.test[5]
    assert image.shape == (3, 16, 16) and target == 2
    torch.manual_seed(0)
    assert splits.train[0][0].shape == (3, 16, 16)
    batch, targets = next(iter(build_loaders(splits, batch_size=4)["test"]))
    assert batch.shape == (4, 3, 16, 16) and targets.tolist() == [0, 0, 1, 1]


def test_the_file_list_of_an_image_folder_is_scanned_once_and_shared(tmp_path, monkeypatch):
    import os

    import torchvision.datasets.folder as tv_folder
    from torchvision.datasets import ImageFolder

    from dynexit.data import datasets

    monkeypatch.setattr(datasets, "DATA_CACHE", tmp_path / "cache")
    make_folder(tmp_path / "data")
    cfg = DataConfig(name="imagefolder", root=str(tmp_path / "data"), image_size=16, calib_size=3)
    scans = []
    real = tv_folder.make_dataset
    monkeypatch.setattr(tv_folder, "make_dataset", lambda *a, **k: scans.append(a[0]) or real(*a, **k))
    first = build_datasets(cfg)
    assert len(scans) == 2 and len(list((tmp_path / "cache" / "index").glob("*.json"))) == 2  # train and val
    again = build_datasets(cfg)  # another process, another run: the index, no scan
    assert len(scans) == 2
    reference = ImageFolder(str(tmp_path / "data" / "train"))  # torchvision's own listing (a scan)
    del scans[2:]
    assert again.train.base.samples == first.train.base.samples == reference.samples
    assert again.train.base.classes == reference.classes and again.test.base.targets == first.test.base.targets
    assert torch.equal(again.test[4][0], first.test[4][0])
    # a file added to one class folder changes that folder's time: the folder is scanned again
    bee = tmp_path / "data" / "train" / "bee"
    (bee / "4.png").write_bytes((bee / "0.png").read_bytes())
    stamp = (tmp_path / "data" / "train" / "bee").stat().st_mtime_ns
    os.utime(tmp_path / "data" / "train" / "bee", ns=(stamp + 10**9, stamp + 10**9))  # coarse file system clocks
    grown = build_datasets(cfg)
    assert len(scans) == 3 and len(grown.train) + len(grown.calib) == 13
    assert grown.train.base.samples == ImageFolder(str(tmp_path / "data" / "train")).samples
    (next((tmp_path / "cache" / "index").glob("*.json"))).write_text("{not json")
    assert len(build_datasets(cfg).train) == len(grown.train)  # a damaged index: scanned again, with a warning


def test_corrupt_image_names_the_file(tmp_path):
    make_folder(tmp_path)
    (tmp_path / "val" / "bee" / "broken.png").write_bytes(b"\x89PNG not really")
    splits = build_datasets(DataConfig(name="imagefolder", root=str(tmp_path), image_size=16, calib_size=3))
    with pytest.raises(ValueError, match=r"cannot read image file .*val/bee/broken\.png"):
        [splits.test[i] for i in range(len(splits.test))]


def test_imagefolder_bad_layouts(tmp_path):
    with pytest.raises(ValueError, match="data.root"):
        build_datasets(DataConfig(name="imagefolder"))
    (tmp_path / "train" / "a").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="val"):
        build_datasets(DataConfig(name="imagefolder", root=str(tmp_path)))
    make_folder(tmp_path / "mismatch")
    (tmp_path / "mismatch" / "val" / "cat").rename(tmp_path / "mismatch" / "val" / "dog")
    with pytest.raises(ValueError, match="classes.*differ.*cat, dog"):
        build_datasets(DataConfig(name="imagefolder", root=str(tmp_path / "mismatch")))


# ------------------------------------------------------------------------------------ config and errors

@pytest.mark.parametrize("fields, message", [
    ({"name": "mnist"}, "data.name: unknown data set 'mnist'"),
    ({"recipe": "fancy"}, "data.recipe"),
    ({"fallback": "digits"}, "data.fallback"),
    ({"calib_size": 1437}, r"data.calib_size=1437 asks for 1437 calibration images.*has 1437"),
    ({"calib_size": 0.0}, "data.calib_size must be"),
    ({"calib_size": 12.5}, "data.calib_size must be"),
    ({"train_subset": 0}, "data.train_subset must be a positive integer"),
    ({"image_size": 4}, "data.image_size"),
    ({"image_size": 3000}, "data.image_size=3000.*GiB"),
])
def test_bad_config_is_a_clear_error(fields, message):
    with pytest.raises(ValueError, match=message):
        build_datasets(DataConfig(**fields))


def test_subsets_are_at_most_the_data_set():
    splits = build_datasets(DataConfig(train_subset=2000, test_subset=361))
    assert (len(splits.train), len(splits.test)) == (1293, 360)
    assert len(build_datasets(DataConfig(train_subset=1292)).train) == 1292


def test_data_config_is_a_structured_omegaconf_section():
    cfg = merge(RunConfig, {"data": {"name": "fashion_mnist", "calib_size": 500, "fallback": "digits"}})
    assert cfg.data.calib_size == 500.0 and cfg.data.fallback == "digits" and cfg.data.hflip is None
    with pytest.raises(ValueError, match="calib_sise"):
        merge(RunConfig, {"data": {"calib_sise": 0.2}})


# ------------------------------------------------------------------ uint8 training batches, normalized on the device

def test_uint8_training_batches_normalized_on_the_device_are_the_float_batches():
    """The small recipe: the same random crops and flips (torch's global generator), normalized in the loader
    or after it: the same float32 numbers, bit for bit, from a quarter of the bytes."""
    cfg = DataConfig(train_subset=64, calib_size=10, test_subset=20, hflip=True)
    floats, uint8 = build_datasets(cfg), build_datasets(cfg, uint8_train=True)
    assert floats.train_input is None and uint8.train_input is not None
    torch.manual_seed(3)
    expected = next(iter(build_loaders(floats, batch_size=16, seed=1)["train"]))[0]
    torch.manual_seed(3)
    raw = next(iter(build_loaders(uint8, batch_size=16, seed=1)["train"]))[0]
    assert raw.dtype == torch.uint8 and raw.shape == (16, 1, 32, 32)  # grey digits: one channel travels
    assert raw.nbytes * 12 == expected.nbytes
    got = uint8.train_input(raw)
    assert got.dtype == torch.float32 and torch.equal(got, expected)
    mean, std = uint8.mean[0], uint8.std[0]  # an independent reference: (x / 255 - mean) / std, grey to RGB
    assert torch.allclose(got, ((raw.double() / 255 - mean) / std).expand(-1, 3, -1, -1).float(), atol=1e-5)
    assert torch.equal(uint8.calib[0][0], floats.calib[0][0])  # evaluation splits unchanged


def test_uint8_imagenet_recipe_leaves_random_erasing_to_the_device():
    cfg = DataConfig(train_subset=32, calib_size=10, test_subset=20, recipe="imagenet", image_size=32,
                     random_erasing=0.0)
    floats, uint8 = build_datasets(cfg), build_datasets(cfg, uint8_train=True)
    for position, seed in ((0, 11), (5, 12)):
        image, target = uint8.train[(position, seed)]
        assert image.dtype == torch.uint8 and image.shape == (3, 32, 32)
        reference, reference_target = floats.train[(position, seed)]  # the same per-sample seed: the same crop
        assert target == reference_target
        assert torch.allclose(uint8.train_input(image[None])[0], reference, atol=1e-5)
    erasing = build_datasets(DataConfig(train_subset=32, calib_size=10, test_subset=20, recipe="imagenet",
                                        image_size=32, random_erasing=1.0), uint8_train=True)
    assert "RandomErasing" not in repr(erasing.train.transform)
    batch = torch.stack([erasing.train[(i, i)][0] for i in range(4)])
    torch.manual_seed(0)
    erased = erasing.train_input(batch)
    plain = build_datasets(cfg, uint8_train=True).train_input(batch)
    changed = (erased != plain).flatten(1).any(1)
    assert changed.all()  # probability 1: every image has an erased patch
    assert ((erased == plain).flatten(1).float().mean(1) > 0.5).all()  # a patch, not the whole image


def test_the_official_randaugment_survives_posterize_at_magnitude_10():
    """RandAugment's increasing posterize keeps 4 - int(4 m / 10) bits: 0 at magnitude 10, which m9 with std
    0.5 draws about 2 % of the time; Pillow refuses 0 bits. The recipe's posterize blacks the image out."""
    from PIL import Image

    from dynexit.data.transforms import imagenet_transform

    cfg = DataConfig(recipe="imagenet", image_size=32, auto_augment="rand-m10-n1-inc1")
    transform = imagenet_transform(cfg, True, (0.5,) * 3, (0.5,) * 3, uint8=True)
    ops = {op.name: op for step in transform.transforms for op in getattr(step, "ops", ())}
    op = ops["PosterizeIncreasing"]
    op.prob = 1.0
    image = Image.new("RGB", (40, 40), (200, 100, 50))
    assert op.level_fn(10, op.hparams) == (0,)
    assert np.asarray(op(image)).max() == 0  # kept no bit: black
    op.magnitude = 5  # 4 - int(2.0) = 2 bits kept: 200 -> 192, 100 -> 64, 50 -> 0
    assert np.asarray(op(image))[0, 0].tolist() == [192, 64, 0]


def test_stage_to_copies_the_files_once_per_node_and_reads_them_from_there(tmp_path, monkeypatch):
    import shutil

    from dynexit.data import datasets, staging

    monkeypatch.setattr(datasets, "DATA_CACHE", tmp_path / "cache")
    make_folder(tmp_path / "nfs" / "imagenet")
    copies = []
    copytree = shutil.copytree
    monkeypatch.setattr(staging, "shutil", type("Shutil", (), {"copytree": staticmethod(
        lambda a, b: copies.append(a) or copytree(a, b)), "rmtree": staticmethod(shutil.rmtree)}))
    monkeypatch.setenv("NODE_TMP", str(tmp_path / "local"))
    cfg = DataConfig(name="imagefolder", root=str(tmp_path / "nfs" / "imagenet"), image_size=16, calib_size=3,
                     stage_to="$NODE_TMP/data")
    plain = build_datasets(DataConfig(name="imagefolder", root=str(tmp_path / "nfs" / "imagenet"), image_size=16,
                                      calib_size=3))
    staged = build_datasets(cfg)
    (copy,) = (tmp_path / "local" / "data").glob("imagenet-*")
    assert copies == [(tmp_path / "nfs" / "imagenet").resolve()]
    assert all(Path(path).is_relative_to(copy) for path, _ in staged.train.base.samples + staged.test.base.samples)
    assert [Path(p).relative_to(copy) for p, _ in staged.test.base.samples] == \
        [Path(p).relative_to((tmp_path / "nfs" / "imagenet").resolve()) for p, _ in plain.test.base.samples]
    assert torch.equal(staged.test[3][0], plain.test[3][0])
    build_datasets(cfg)  # another process of the node, another run: the copy is there
    assert len(copies) == 1
    (copy / staging.MARKER).unlink()  # an interrupted copy (no marker): made again
    build_datasets(cfg)
    assert len(copies) == 2 and (copy / staging.MARKER).is_file()
    monkeypatch.delenv("NODE_TMP")
    with pytest.raises(ValueError, match=r"data.stage_to='\$NODE_TMP/data': an environment variable"):
        build_datasets(cfg)
    with pytest.raises(ValueError, match="data.stage_to needs data.root"):
        build_datasets(DataConfig(name="imagefolder", stage_to="/tmp/x"))
