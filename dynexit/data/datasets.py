"""The data sets: their files (readers and sources, each data set's own train and test parts), what is
known about each one (classes, mean and std, whether mirror images keep their class), and the two views
of a split (in-memory images transformed batch-wise, image folders transformed per image)."""
from __future__ import annotations

import codecs
import functools
import gzip
import hashlib
import json
import logging
import os
import pickle
import random
import struct
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
from torch.utils.data import Dataset
from torchvision.datasets import ImageFolder

from dynexit.config import DATASET_SIZES, DataConfig

log = logging.getLogger(__name__)


CALIB_FILE = "calib_indices.json"
FASHION_MNIST_DEBIAN = Path("/usr/share/datasets/fashion-mnist")
# Where downloads go (and are looked for) when data.root is not set.
DATA_CACHE = Path(os.environ.get("DYNEXIT_DATA", "~/.cache/dynexit/data")).expanduser()
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# The in-memory copy resized for the small recipe must stay reasonable; above this, use recipe=imagenet.
MAX_IN_MEMORY_BYTES = 4 << 30
DIGITS_TEST_SIZE = DATASET_SIZES["digits"][1]  # digits has no test split of its own: a fixed 20%, for every seed
_DIGITS_TEST_SEED = 20230611


@dataclass(frozen=True)
class _Info:
    num_classes: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    hflip: bool  # whether mirror images are still members of their class


_INFO = {
    "digits": _Info(10, (0.3053,) * 3, (0.3759,) * 3, hflip=False),
    "fashion_mnist": _Info(10, (0.2860,) * 3, (0.3530,) * 3, hflip=True),
    "cifar10": _Info(10, (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616), hflip=True),
    "cifar100": _Info(100, (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762), hflip=True),
    "imagefolder": _Info(0, IMAGENET_MEAN, IMAGENET_STD, hflip=True),  # classes from the folders
}


# ----------------------------------------------------------------------------------------------------
# Split views


@contextmanager
def sample_rng(seed: int) -> Iterator[None]:
    """Python's, numpy's and torch's global generators seeded with ``seed`` (one sample's augmentation, as
    timm's and torchvision's transforms draw from them), then restored: the caller's streams go on unchanged."""
    saved = random.getstate(), np.random.get_state(), torch.get_rng_state()
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    try:
        yield
    finally:
        random.setstate(saved[0])
        np.random.set_state(saved[1])
        torch.set_rng_state(saved[2])


def _seeded(item: Any) -> tuple[int, Optional[int]]:
    """``(position, seed)`` of a sampler's item: a position, or a position with its augmentation seed."""
    return (int(item[0]), int(item[1])) if isinstance(item, tuple) else (int(item), None)


class InMemoryImages(Dataset):
    """The images ``indices`` of a uint8 (N, C, H, W) tensor, transformed batch-wise.

    ``__getitems__`` (used by DataLoader) transforms a whole batch in one call and returns the list of
    ``(image, target)`` samples that the default collate function expects. A transform that works image by
    image (not ``batched``, e.g. the imagenet recipe's) draws each image's augmentation from the seed its
    sampler gives it with the position (``(position, seed)``; see ``dynexit.data.loaders``).
    """

    def __init__(self, images: torch.Tensor, targets: torch.Tensor, indices: np.ndarray,
                 transform: Callable[[torch.Tensor], torch.Tensor]):
        self.images = images
        self.all_targets = targets
        self.indices = torch.as_tensor(np.asarray(indices, dtype=np.int64))
        self.transform = transform

    @property
    def batched(self) -> bool:
        """Whether the transform works on whole batches (random draws from the global generator)."""
        return bool(getattr(self.transform, "batched", False))

    @property
    def takes_seeds(self) -> bool:
        """Whether samples may come as ``(position, seed)`` (images transformed one by one)."""
        return not self.batched

    @property
    def targets(self) -> torch.Tensor:
        return self.all_targets[self.indices]

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i) -> tuple[torch.Tensor, int]:
        return self.__getitems__([i])[0]

    def __getitems__(self, positions: list) -> list[tuple[torch.Tensor, int]]:
        items = [_seeded(p) for p in positions]
        rows = self.indices[torch.as_tensor([p for p, _ in items], dtype=torch.int64)]
        if any(seed is not None for _, seed in items):
            images = []
            for row, (_, seed) in zip(rows, items):
                with sample_rng(seed) if seed is not None else nullcontext():
                    images.append(self.transform(self.images[row:row + 1]))
            images = torch.cat(images)
        else:
            images = self.transform(self.images[rows])
        return list(zip(images.unbind(0), self.all_targets[rows].tolist()))


class FolderImages(Dataset):
    """The samples ``indices`` of a torchvision ImageFolder (loaded without a transform), transformed."""

    takes_seeds = True  # samples may come as (position, seed): see InMemoryImages

    def __init__(self, base: Any, indices: np.ndarray, transform: Callable):
        self.base = base
        self.indices = np.asarray(indices, dtype=np.int64)
        self.transform = transform

    @property
    def targets(self) -> torch.Tensor:
        return torch.as_tensor(np.asarray(self.base.targets, dtype=np.int64)[self.indices])

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i) -> tuple[torch.Tensor, int]:
        position, seed = _seeded(i)
        image, target = self.base[int(self.indices[position])]
        with sample_rng(seed) if seed is not None else nullcontext():
            return self.transform(image), int(target)


# ----------------------------------------------------------------------------------------------------
# Readers


def read_idx(path: str | Path) -> np.ndarray:
    """Reads an IDX file (the MNIST/Fashion-MNIST format), gzip-compressed or not."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError) as err:
        raise ValueError(f"cannot read IDX file {path}: {err}") from None
    dtypes = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
    if len(data) < 4 or data[:2] != b"\x00\x00" or data[2] not in dtypes:
        raise ValueError(f"{path} is not an IDX file (bad magic number {data[:4].hex()})")
    ndim = data[3]
    header = 4 + 4 * ndim
    if len(data) < header:
        raise ValueError(f"{path}: IDX header truncated")
    dims = struct.unpack(f">{ndim}I", data[4:header])
    dtype = np.dtype(dtypes[data[2]])
    expected = int(np.prod(dims, dtype=np.int64)) * dtype.itemsize
    if len(data) - header != expected:
        raise ValueError(f"{path}: IDX dimensions {dims} need {expected} bytes of data, the file has "
                         f"{len(data) - header}")
    return np.frombuffer(data, dtype=dtype, offset=header).reshape(dims)


def _load_image(path: str):
    """ImageFolder loader: an RGB PIL image, or a ValueError naming the file."""
    from PIL import Image

    try:
        with open(path, "rb") as f:
            return Image.open(f).convert("RGB")  # convert() decodes now, inside the try
    except (OSError, SyntaxError, ValueError) as err:
        raise ValueError(f"cannot read image file {path}: {err}") from None


# ----------------------------------------------------------------------------------------------------
# Sources: the data set's own train and test parts


@dataclass
class _Arrays:
    """An in-memory data set: uint8 images (N, C, H, W) and int64 targets for its train and test parts."""

    train_images: torch.Tensor
    train_targets: torch.Tensor
    test_images: torch.Tensor
    test_targets: torch.Tensor
    classes: list[str]


@functools.lru_cache(maxsize=1)  # 110 kB, read from a CSV file each time otherwise; never mutated
def _load_digits() -> _Arrays:
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = torch.from_numpy(np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)).unsqueeze(1)
    targets = torch.from_numpy(digits.target.astype(np.int64))
    order = np.random.default_rng(_DIGITS_TEST_SEED).permutation(len(images))
    test, train = np.sort(order[:DIGITS_TEST_SIZE]), np.sort(order[DIGITS_TEST_SIZE:])
    return _Arrays(images[train], targets[train], images[test], targets[test],
                   [str(c) for c in digits.target_names])


_FASHION_FILES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
                  "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}
FASHION_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker",
                   "Bag", "Ankle boot"]


def _find_idx(folders: list[Path], stem: str) -> Optional[Path]:
    for folder in folders:
        for name in (stem + ".gz", stem):
            if (folder / name).is_file():
                return folder / name
    return None


def _fashion_folders(root: Path) -> list[Path]:
    return [root, root / "FashionMNIST" / "raw"]  # the second: torchvision's download layout


def _load_fashion_mnist(cfg: DataConfig) -> _Arrays:
    if cfg.root is not None:
        roots = [Path(cfg.root).expanduser()]
    else:
        roots = [FASHION_MNIST_DEBIAN, DATA_CACHE / "fashion_mnist"]
    folders = [f for r in roots for f in _fashion_folders(r)]
    stems = [s for pair in _FASHION_FILES.values() for s in pair]
    if any(_find_idx(folders, s) is None for s in stems):
        if not cfg.download:
            raise FileNotFoundError(
                f"Fashion-MNIST not found: no {stems[0]}[.gz] (and its three companions) in "
                f"{', '.join(str(r) for r in roots)}. Install the Debian package `dataset-fashion-mnist` "
                f"(apt-get install dataset-fashion-mnist, files in {FASHION_MNIST_DEBIAN}), put the IDX "
                f"files in data.root, or set data.download=true to download them through torchvision.")
        target = roots[-1]
        _download("fashion_mnist", target)
        folders = _fashion_folders(target)
    parts = []
    for split, (image_stem, label_stem) in _FASHION_FILES.items():
        image_path, label_path = _find_idx(folders, image_stem), _find_idx(folders, label_stem)
        if image_path is None or label_path is None:
            raise FileNotFoundError(f"Fashion-MNIST {split} files missing after download in {folders}")
        images, labels = read_idx(image_path), read_idx(label_path)
        if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
            raise ValueError(f"{image_path} and {label_path} do not match: images {images.shape}, "
                             f"labels {labels.shape}")
        if labels.size and labels.max() >= 10:
            raise ValueError(f"{label_path}: label {int(labels.max())} out of range 0..9")
        parts.append((torch.from_numpy(images.astype(np.uint8)).unsqueeze(1),
                      torch.from_numpy(labels.astype(np.int64))))
    (tr_x, tr_y), (te_x, te_y) = parts
    return _Arrays(tr_x, tr_y, te_x, te_y, list(FASHION_CLASSES))


_CIFAR = {  # folder, train batches, test batch, label key, meta file, class-names key
    "cifar10": ("cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)], "test_batch", "labels",
                "batches.meta", "label_names"),
    "cifar100": ("cifar-100-python", ["train"], "test", "fine_labels", "meta", "fine_label_names"),
}


def _numpy_array_builders() -> dict[tuple[str, str], Any]:
    """The globals a pickled numpy array needs, under the module names numpy 1 and 2 pickle them as."""
    core = getattr(np, "_core", None) or np.core
    builders = {}
    for module in ("numpy.core", "numpy._core"):
        builders[(f"{module}.multiarray", "_reconstruct")] = core.multiarray._reconstruct
        builders[(f"{module}.numeric", "_frombuffer")] = core.numeric._frombuffer
    return builders


class _CifarUnpickler(pickle.Unpickler):
    """Reads what a CIFAR python batch holds (dicts, lists, str, bytes, numbers and numpy arrays) and
    refuses every other class or function, so that a forged batch file cannot run code."""

    ALLOWED = {("numpy", "ndarray"): np.ndarray, ("numpy", "dtype"): np.dtype,
               ("_codecs", "encode"): codecs.encode,  # bytes, as pickle protocols 0-2 write them
               **_numpy_array_builders()}

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in self.ALLOWED:
            raise _RefusedGlobal(f"{module}.{name}")
        return self.ALLOWED[(module, name)]


class _RefusedGlobal(pickle.UnpicklingError):
    pass


def read_cifar_pickle(path: Path) -> Any:
    """A CIFAR python pickle (batch or meta file), read with :class:`_CifarUnpickler`."""
    try:
        with open(path, "rb") as f:
            return _CifarUnpickler(f, encoding="latin1").load()
    except _RefusedGlobal as err:
        raise ValueError(f"refusing to load CIFAR file {path}: it holds {err}, which a CIFAR batch never "
                         f"contains (unpickling it could run code); nothing in it was run") from None
    except Exception as err:
        raise ValueError(f"cannot read CIFAR file {path}: {err}") from None


def _read_cifar_batch(path: Path, label_key: str) -> tuple[torch.Tensor, torch.Tensor]:
    """One CIFAR python batch (a pickled dict): images (N, 3, 32, 32), labels (N,)."""
    if not path.is_file():
        raise FileNotFoundError(f"CIFAR batch file missing: {path}")
    batch = read_cifar_pickle(path)
    for key in ("data", label_key):
        if not isinstance(batch, dict) or key not in batch:
            raise ValueError(f"CIFAR batch file {path} has no key {key!r}")
    try:
        data = np.asarray(batch["data"], dtype=np.uint8)
        labels = np.asarray(batch[label_key], dtype=np.int64)
    except (TypeError, ValueError) as err:
        raise ValueError(f"CIFAR batch file {path}: 'data' or {label_key!r} is not numeric ({err})") from None
    if data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or labels.ndim != 1 or len(data) != len(labels):
        raise ValueError(f"CIFAR batch file {path}: data {data.shape} and labels {labels.shape} do not "
                         f"form (N, 3072) images with N labels")
    return torch.from_numpy(data.reshape(-1, 3, 32, 32).copy()), torch.from_numpy(labels)


def _load_cifar(cfg: DataConfig, name: str) -> _Arrays:
    folder_name, train_files, test_file, label_key, meta_file, names_key = _CIFAR[name]
    root = Path(cfg.root).expanduser() if cfg.root is not None else DATA_CACHE / name
    candidates = [root / folder_name, root]
    folder = next((c for c in candidates if (c / test_file).is_file()), None)
    if folder is None:
        if not cfg.download:
            raise FileNotFoundError(
                f"{name} not found: no {folder_name}/{test_file} under {root} (data.root). Put CIFAR's "
                f"python batches there or set data.download=true to download them through torchvision.")
        _download(name, root)
        folder = root / folder_name
    train = [_read_cifar_batch(folder / f, label_key) for f in train_files]
    test_x, test_y = _read_cifar_batch(folder / test_file, label_key)
    num_classes = _INFO[name].num_classes
    for y, f in [(y, f) for (_, y), f in zip(train, train_files)] + [(test_y, test_file)]:
        if len(y) and (int(y.min()) < 0 or int(y.max()) >= num_classes):
            raise ValueError(f"{folder / f}: labels outside 0..{num_classes - 1}")
    classes = [str(c) for c in range(num_classes)]
    if (folder / meta_file).is_file():
        meta = read_cifar_pickle(folder / meta_file)
        if not isinstance(meta, dict):
            raise ValueError(f"CIFAR meta file {folder / meta_file} is not a dict")
        classes = [str(c) for c in meta.get(names_key, classes)]
    return _Arrays(torch.cat([x for x, _ in train]), torch.cat([y for _, y in train]), test_x, test_y, classes)


def _download(name: str, root: Path) -> None:
    """Downloads through torchvision into ``root`` (its own layout there)."""
    from torchvision import datasets

    cls = {"fashion_mnist": datasets.FashionMNIST, "cifar10": datasets.CIFAR10,
           "cifar100": datasets.CIFAR100}[name]
    log.info("downloading %s into %s", name, root)
    try:
        root.mkdir(parents=True, exist_ok=True)
        for train in (True, False):
            cls(str(root), train=train, download=True)
    except Exception as err:
        hint = (" Or install the Debian package `dataset-fashion-mnist` (no internet needed)."
                if name == "fashion_mnist" else "")
        raise FileNotFoundError(f"downloading {name} into {root} failed ({type(err).__name__}: {err}); "
                                f"place the files in data.root instead.{hint}") from None


INDEX_VERSION = 1


def index_dir() -> Path:
    """Where image-folder indexes are kept: ``$DYNEXIT_DATA/index`` (``DATA_CACHE``)."""
    return DATA_CACHE / "index"


def folder_index(folder: Path) -> tuple[list[str], list[tuple[str, int]]]:
    """The classes and ``(path, class index)`` samples of an image folder (``folder/<class>/<image>``), as
    torchvision's ImageFolder lists them. The list is kept in :func:`index_dir`, one JSON file per folder, and
    read from there while every class folder keeps the modification time it had when it was scanned (adding,
    removing or renaming a file changes its folder's): ImageNet's 1.28 M names are scanned once, not by every
    process of every run."""
    from torchvision.datasets.folder import IMG_EXTENSIONS, find_classes, make_dataset

    folder = folder.resolve()
    path = index_dir() / f"{hashlib.sha1(str(folder).encode()).hexdigest()[:16]}.json"
    classes, _ = find_classes(folder)
    mtimes = {c: (folder / c).stat().st_mtime_ns for c in classes}
    if path.is_file():
        try:
            index = json.loads(path.read_text())
            if (index.get("version"), index.get("folder"), index.get("mtimes")) == (INDEX_VERSION, str(folder),
                                                                                    mtimes):
                samples = [(str(folder / c / name), i) for i, c in enumerate(classes) for name in index["files"][c]]
                log.info("%s: %d files from the index %s", folder, len(samples), path)
                return classes, samples
        except (ValueError, KeyError, TypeError):
            log.warning("%s is not a readable folder index; scanning %s again", path, folder)
    start = time.perf_counter()
    samples = make_dataset(folder, {c: i for i, c in enumerate(classes)}, IMG_EXTENSIONS)
    files: dict[str, list[str]] = {c: [] for c in classes}
    for sample, target in samples:
        files[classes[target]].append(Path(sample).name)
    try:
        from dynexit.utils import atomic_write_text

        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, json.dumps({"version": INDEX_VERSION, "folder": str(folder), "mtimes": mtimes,
                                            "files": files}))
        log.info("%s: scanned %d files in %.1f s; index kept in %s", folder, len(samples),
                 time.perf_counter() - start, path)
    except OSError as err:
        log.warning("%s: scanned %d files, but cannot keep the index in %s (%s): the next process scans again",
                    folder, len(samples), path, err)
    return classes, samples


class IndexedImageFolder(ImageFolder):
    """torchvision's ImageFolder of ``root`` (images read by :func:`_load_image`) whose classes and samples
    are given (by :func:`folder_index`) instead of scanned."""

    def __init__(self, root: Path, classes: list[str], samples: list[tuple[str, int]]):
        self.index = classes, samples
        super().__init__(str(root), loader=_load_image)

    def find_classes(self, directory):
        return list(self.index[0]), {c: i for i, c in enumerate(self.index[0])}

    def make_dataset(self, directory, class_to_idx, extensions=None, is_valid_file=None, allow_empty=False):
        return list(self.index[1])


def _load_imagefolder(cfg: DataConfig):
    if cfg.root is None:
        raise ValueError("data.root must name the folder holding train/ and val/ for data.name=imagefolder")
    root = Path(cfg.root).expanduser()
    bases = []
    for part in ("train", "val"):
        folder = root / part
        if not folder.is_dir():
            raise FileNotFoundError(f"imagefolder: folder {folder} not found (data.root must hold train/ "
                                    f"and val/, one subfolder per class)")
        try:
            bases.append(IndexedImageFolder(folder, *folder_index(folder)))
        except FileNotFoundError as err:
            raise FileNotFoundError(f"imagefolder: {folder}: {err}") from None
    train, val = bases
    if train.classes != val.classes:
        missing = sorted(set(train.classes) ^ set(val.classes))
        raise ValueError(f"imagefolder: the classes of {root / 'train'} and {root / 'val'} differ "
                         f"({', '.join(missing[:5]) or 'order'})")
    return train, val


def _load(cfg: DataConfig):
    if cfg.name == "digits":
        return _load_digits()
    if cfg.name == "fashion_mnist":
        return _load_fashion_mnist(cfg)
    if cfg.name in _CIFAR:
        return _load_cifar(cfg, cfg.name)
    return _load_imagefolder(cfg)
