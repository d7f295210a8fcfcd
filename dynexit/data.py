"""Data sets, disjoint train/calibration/test splits, and transforms.

Public API:

- ``DataConfig``: the ``data`` section of a run config (fields documented on the class).
- ``build_datasets(cfg, run_dir=None) -> Splits``: loads the data set named by ``cfg.name`` and returns
  three disjoint splits: ``train`` (training transforms), ``calib`` (held out of the training set, for
  choosing exit thresholds) and ``test`` (the data set's own test/val split), both with evaluation
  transforms. Each is a torch Dataset yielding ``(float32 image (3, S, S), int target)``. The
  calibration indices are written to ``run_dir/calib_indices.json`` and reused when that file exists.
- ``Splits``: ``train``, ``calib``, ``test``, ``num_classes``, ``image_size``, ``calib_indices``,
  ``train_indices``, ``test_indices``, ``name`` (the data set actually loaded), ``classes``, ``mean``,
  ``std``.
- ``build_loaders(splits, batch_size, num_workers=0, distributed=False, seed=0, ...)``: a dict of
  DataLoaders keyed ``"train"``, ``"calib"``, ``"test"``: train shuffled by a seeded generator (or a
  DistributedSampler: call ``loader.sampler.set_epoch(epoch)`` each epoch), the others in order.
- ``DATASETS``: the known names; ``read_idx(path)``: an IDX file (MNIST format) as a NumPy array.

Data sets: ``digits`` (scikit-learn's 1,797 8x8 digits; bundled, no download), ``fashion_mnist``
(IDX files), ``cifar10`` / ``cifar100`` (CIFAR's python pickle batches), ``imagefolder`` (``train/``
and ``val/`` class folders, ImageNet style). The first four are held in memory as uint8 tensors; with
the ``small`` recipe their augmentation (random crop with zero padding, horizontal flip) runs on whole
batches of tensors, so no per-image PIL work is done. The ``imagenet`` recipe is the official one
through timm (RandAugment, random erasing, bicubic; eval resize S/0.875 then centre crop S).
Mixup/CutMix and label smoothing belong to the training loop (``Splits.num_classes`` sizes them).
"""
from __future__ import annotations

import functools
import gzip
import json
import logging
import os
import pickle
import struct
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from dynexit.utils import atomic_write_text

log = logging.getLogger(__name__)

DATASETS = ("digits", "fashion_mnist", "cifar10", "cifar100", "imagefolder")
RECIPES = ("small", "imagenet")
CALIB_FILE = "calib_indices.json"
FASHION_MNIST_DEBIAN = Path("/usr/share/datasets/fashion-mnist")
# Where downloads go (and are looked for) when data.root is not set.
DATA_CACHE = Path(os.environ.get("DYNEXIT_DATA", "~/.cache/dynexit/data")).expanduser()
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# The in-memory copy resized for the small recipe must stay reasonable; above this, use recipe=imagenet.
MAX_IN_MEMORY_BYTES = 4 << 30
DIGITS_TEST_SIZE = 360  # digits has no test split of its own: a fixed 20%, the same for every seed
_DIGITS_TEST_SEED = 20230611


@dataclass
class DataConfig:
    """Which data set, how it is split, and how it is transformed."""

    name: str = "digits"  # digits | fashion_mnist | cifar10 | cifar100 | imagefolder
    root: Optional[str] = None  # folder of the files; None: the usual place (see build_datasets)
    download: bool = False  # download through torchvision when the files are missing (not imagefolder)
    fallback: Optional[str] = None  # data set to use instead when the files of `name` are missing
    image_size: int = 32  # side S of the (S, S) images the model gets
    calib_size: float = 0.1  # held out of training for thresholds: a fraction (< 1) or a count (>= 1)
    split_seed: int = 0  # draws the calibration split and the subsets
    train_subset: Optional[int] = None  # keep at most this many training images (quick runs)
    test_subset: Optional[int] = None  # keep at most this many test images (quick runs)
    recipe: str = "small"  # "small" (tensor crop + flip, 28-32 px) or "imagenet" (official timm recipe)
    hflip: Optional[bool] = None  # random horizontal flip; None: the data set's default (off for digits)
    crop_padding: Optional[int] = None  # small recipe: zero padding of the random crop; None: S // 8
    auto_augment: Optional[str] = "rand-m9-mstd0.5-inc1"  # imagenet recipe: timm auto-augment policy
    random_erasing: float = 0.25  # imagenet recipe: random-erasing probability (pixel mode)
    eval_crop_pct: float = 0.875  # imagenet recipe: eval resize to S / eval_crop_pct, centre crop S
    num_workers: int = 0  # DataLoader worker processes


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


@dataclass
class Splits:
    """The three disjoint splits of a data set and what a model needs to know about them."""

    train: Dataset
    calib: Dataset
    test: Dataset
    num_classes: int
    image_size: int
    calib_indices: np.ndarray  # into the data set's training set, sorted
    train_indices: np.ndarray  # into the data set's training set, sorted
    test_indices: np.ndarray  # into the data set's test set, sorted
    name: str  # the data set actually loaded (the fallback when the named one was missing)
    classes: list[str] = field(default_factory=list)
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD


# ----------------------------------------------------------------------------------------------------
# Transforms


class TensorTransform:
    """uint8 images (B, C, H, W), C in {1, 3} -> normalized float32 (B, 3, H, W).

    Training: each image gets its own random crop of the zero-padded batch (offsets in [0, 2p]) and,
    if ``hflip``, a mirror with probability 1/2; both are one gather over the batch. Randomness comes
    from torch's global generator (seeded per DataLoader worker by torch).
    """

    def __init__(self, mean: Sequence[float], std: Sequence[float], crop_padding: int = 0,
                 hflip: bool = False):
        self.mean = tuple(float(m) for m in mean)
        self.std = tuple(float(s) for s in std)
        self.crop_padding = int(crop_padding)
        self.hflip = bool(hflip)

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] not in (1, 3):
            raise TypeError(f"expected uint8 images (B, 1 or 3, H, W), got {images.dtype} {tuple(images.shape)}")
        if self.crop_padding or self.hflip:
            images = self._augment(images)
        c = images.shape[1]
        scale = torch.tensor([1.0 / (255.0 * s) for s in self.std[:c]]).view(1, c, 1, 1)
        shift = torch.tensor([m / s for m, s in zip(self.mean[:c], self.std[:c])]).view(1, c, 1, 1)
        out = images.float().mul_(scale).sub_(shift)  # grey images: normalize once, then 3 channels
        return out.expand(-1, 3, -1, -1).contiguous() if c == 1 else out.contiguous()

    def _augment(self, images: torch.Tensor) -> torch.Tensor:
        b, _, h, w = images.shape
        p = self.crop_padding
        padded = F.pad(images, (p, p, p, p)) if p else images
        oy = torch.randint(0, 2 * p + 1, (b, 1))
        ox = torch.randint(0, 2 * p + 1, (b, 1))
        rows = oy + torch.arange(h)  # (B, H)
        cols = ox + torch.arange(w)  # (B, W)
        if self.hflip:
            flip = torch.rand(b, 1) < 0.5
            cols = torch.where(flip, cols.flip(1), cols)
        batch = torch.arange(b).view(b, 1, 1)
        out = padded.permute(0, 2, 3, 1)[batch, rows[:, :, None], cols[:, None, :]]  # (B, H, W, C)
        return out.permute(0, 3, 1, 2)

    def __repr__(self) -> str:
        return (f"TensorTransform(mean={self.mean}, std={self.std}, crop_padding={self.crop_padding}, "
                f"hflip={self.hflip})")


class PilTransform:
    """Applies a per-image PIL transform (timm/torchvision) to a uint8 batch (B, C, H, W)."""

    def __init__(self, transform: Callable):
        self.transform = transform

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        return torch.stack([self.transform(_to_pil(img)) for img in images])

    def __repr__(self) -> str:
        return f"PilTransform({self.transform!r})"


def _to_pil(image: torch.Tensor):
    from PIL import Image

    if image.shape[0] == 1:
        return Image.fromarray(image[0].numpy(), mode="L").convert("RGB")
    return Image.fromarray(image.permute(1, 2, 0).numpy(), mode="RGB")


def imagenet_transform(cfg: DataConfig, train: bool, mean: Sequence[float], std: Sequence[float]) -> Callable:
    """The official recipe through timm: PIL image -> normalized tensor (3, S, S)."""
    from timm.data import create_transform

    common = dict(input_size=cfg.image_size, interpolation="bicubic", mean=tuple(mean), std=tuple(std))
    if not train:
        return create_transform(is_training=False, crop_pct=cfg.eval_crop_pct, **common)
    hflip = _hflip(cfg, cfg.name)
    return create_transform(is_training=True, scale=(0.08, 1.0), hflip=0.5 if hflip else 0.0,
                            color_jitter=0.4, auto_augment=cfg.auto_augment or None,
                            re_prob=cfg.random_erasing, re_mode="pixel", re_count=1, **common)


def _small_folder_transform(cfg: DataConfig, train: bool, mean: Sequence[float], std: Sequence[float]) -> Callable:
    """Small recipe for image files: resize + centre crop to S (+ padded random crop and flip)."""
    from torchvision import transforms as T

    s = cfg.image_size
    steps: list[Any] = [T.Resize(s, interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(s)]
    if train:
        pad = _crop_padding(cfg)
        if pad:
            steps.append(T.RandomCrop(s, padding=pad))
        if _hflip(cfg, cfg.name):
            steps.append(T.RandomHorizontalFlip())
    steps += [T.ToTensor(), T.Normalize(mean, std)]
    return T.Compose(steps)


def _hflip(cfg: DataConfig, name: str) -> bool:
    return _INFO[name].hflip if cfg.hflip is None else bool(cfg.hflip)


def _crop_padding(cfg: DataConfig) -> int:
    return cfg.image_size // 8 if cfg.crop_padding is None else int(cfg.crop_padding)


# ----------------------------------------------------------------------------------------------------
# Split views


class InMemoryImages(Dataset):
    """The images ``indices`` of a uint8 (N, C, H, W) tensor, transformed batch-wise.

    ``__getitems__`` (used by DataLoader) transforms a whole batch in one call and returns the list of
    ``(image, target)`` samples that the default collate function expects.
    """

    def __init__(self, images: torch.Tensor, targets: torch.Tensor, indices: np.ndarray,
                 transform: Callable[[torch.Tensor], torch.Tensor]):
        self.images = images
        self.all_targets = targets
        self.indices = torch.as_tensor(np.asarray(indices, dtype=np.int64))
        self.transform = transform

    @property
    def targets(self) -> torch.Tensor:
        return self.all_targets[self.indices]

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return self.__getitems__([i])[0]

    def __getitems__(self, positions: list[int]) -> list[tuple[torch.Tensor, int]]:
        rows = self.indices[torch.as_tensor(positions, dtype=torch.int64)]
        images = self.transform(self.images[rows])
        return list(zip(images.unbind(0), self.all_targets[rows].tolist()))


class FolderImages(Dataset):
    """The samples ``indices`` of a torchvision ImageFolder (loaded without a transform), transformed."""

    def __init__(self, base: Any, indices: np.ndarray, transform: Callable):
        self.base = base
        self.indices = np.asarray(indices, dtype=np.int64)
        self.transform = transform

    @property
    def targets(self) -> torch.Tensor:
        return torch.as_tensor(np.asarray(self.base.targets, dtype=np.int64)[self.indices])

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        image, target = self.base[int(self.indices[i])]
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


def _read_cifar_batch(path: Path, label_key: str) -> tuple[torch.Tensor, torch.Tensor]:
    """One CIFAR python batch (a pickled dict; only open files you trust): images (N, 3, 32, 32)."""
    if not path.is_file():
        raise FileNotFoundError(f"CIFAR batch file missing: {path}")
    try:
        with open(path, "rb") as f:
            batch = pickle.load(f, encoding="latin1")
    except Exception as err:
        raise ValueError(f"cannot read CIFAR batch file {path}: {err}") from None
    for key in ("data", label_key):
        if not isinstance(batch, dict) or key not in batch:
            raise ValueError(f"CIFAR batch file {path} has no key {key!r}")
    data = np.asarray(batch["data"], dtype=np.uint8)
    labels = np.asarray(batch[label_key], dtype=np.int64)
    if data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or len(data) != len(labels):
        raise ValueError(f"CIFAR batch file {path}: data {data.shape} and {len(labels)} labels do not "
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
        with open(folder / meta_file, "rb") as f:
            meta = pickle.load(f, encoding="latin1")
        classes = list(meta.get(names_key, classes))
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


def _load_imagefolder(cfg: DataConfig):
    from torchvision.datasets import ImageFolder

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
            bases.append(ImageFolder(str(folder), loader=_load_image))
        except FileNotFoundError as err:
            raise FileNotFoundError(f"imagefolder: {folder}: {err}") from None
    train, val = bases
    if train.classes != val.classes:
        missing = sorted(set(train.classes) ^ set(val.classes))
        raise ValueError(f"imagefolder: the classes of {root / 'train'} and {root / 'val'} differ "
                         f"({', '.join(missing[:5]) or 'order'})")
    return train, val


# ----------------------------------------------------------------------------------------------------
# Splits


def validate_data_config(cfg: DataConfig) -> None:
    """Raises ValueError naming the first bad field of ``cfg`` (as ``data.<name>``)."""
    if cfg.name not in DATASETS:
        raise ValueError(f"data.name: unknown data set {cfg.name!r}; known: {', '.join(DATASETS)}")
    if cfg.fallback is not None and (cfg.fallback not in DATASETS or cfg.fallback == cfg.name):
        raise ValueError(f"data.fallback: {cfg.fallback!r} must be another known data set "
                         f"({', '.join(d for d in DATASETS if d != cfg.name)})")
    if cfg.recipe not in RECIPES:
        raise ValueError(f"data.recipe: unknown recipe {cfg.recipe!r}; known: {', '.join(RECIPES)}")
    if not isinstance(cfg.image_size, int) or cfg.image_size < 8:
        raise ValueError(f"data.image_size must be an integer >= 8, got {cfg.image_size!r}")
    if not cfg.calib_size > 0 or (cfg.calib_size >= 1 and cfg.calib_size != int(cfg.calib_size)):
        raise ValueError(f"data.calib_size must be a fraction in (0, 1) or a whole count >= 1, "
                         f"got {cfg.calib_size!r}")
    for key in ("train_subset", "test_subset"):
        value = getattr(cfg, key)
        if value is not None and (not isinstance(value, int) or value < 1):
            raise ValueError(f"data.{key} must be a positive integer or null, got {value!r}")
    if cfg.crop_padding is not None and cfg.crop_padding < 0:
        raise ValueError(f"data.crop_padding must be >= 0, got {cfg.crop_padding}")
    if not 0.0 <= cfg.random_erasing <= 1.0:
        raise ValueError(f"data.random_erasing must be a probability, got {cfg.random_erasing}")
    if not 0.0 < cfg.eval_crop_pct <= 1.0:
        raise ValueError(f"data.eval_crop_pct must be in (0, 1], got {cfg.eval_crop_pct}")
    if cfg.num_workers < 0:
        raise ValueError(f"data.num_workers must be >= 0, got {cfg.num_workers}")


def _calib_count(cfg: DataConfig, n_train: int) -> int:
    n = max(1, round(cfg.calib_size * n_train)) if cfg.calib_size < 1 else int(cfg.calib_size)
    if n >= n_train:
        raise ValueError(f"data.calib_size={cfg.calib_size:g} asks for {n} calibration images, but the "
                         f"training set has {n_train}; at least one must stay for training")
    return n


def calibration_indices(cfg: DataConfig, name: str, n_train: int, run_dir: Optional[Path]) -> np.ndarray:
    """The sorted training-set indices held out for calibration: read from ``run_dir/calib_indices.json``
    when it exists (a resumed run keeps its split), else drawn with ``cfg.split_seed`` and saved there."""
    n_calib = _calib_count(cfg, n_train)
    path = Path(run_dir) / CALIB_FILE if run_dir is not None else None
    if path is not None and path.is_file():
        return _read_calib_file(path, name, n_train, n_calib)
    indices = np.sort(np.random.default_rng(cfg.split_seed).permutation(n_train)[:n_calib])
    if path is not None:
        record = {"dataset": name, "train_size": n_train, "split_seed": cfg.split_seed,
                  "indices": indices.tolist()}
        atomic_write_text(path, json.dumps(record))
    return indices


def _read_calib_file(path: Path, name: str, n_train: int, n_calib: int) -> np.ndarray:
    try:
        record = json.loads(path.read_text())
        saved_name, saved_size, raw = record["dataset"], record["train_size"], record["indices"]
    except (ValueError, KeyError, TypeError) as err:
        raise ValueError(f"{path}: not a calibration-indices file ({type(err).__name__}: {err})") from None
    if saved_name != name or saved_size != n_train:
        raise ValueError(f"{path} was made for {saved_name!r} with {saved_size} training images, but this "
                         f"run loads {name!r} with {n_train}; delete the file or use another run folder")
    indices = np.asarray(raw, dtype=np.int64)
    if indices.ndim != 1 or len(indices) != n_calib:
        raise ValueError(f"{path} holds {indices.size} indices, but data.calib_size asks for {n_calib}")
    if len(indices) and (indices.min() < 0 or indices.max() >= n_train):
        raise ValueError(f"{path}: indices outside 0..{n_train - 1}")
    if len(np.unique(indices)) != len(indices):
        raise ValueError(f"{path}: repeated indices")
    return np.sort(indices)


def _subset(indices: np.ndarray, size: Optional[int], seed: list[int], what: str, key: str) -> np.ndarray:
    if size is None:
        return indices
    if size >= len(indices):  # "at most": the same spec serves a large data set and its small fallback
        log.info("data.%s=%d keeps all %d %s", key, size, len(indices), what)
        return indices
    return np.sort(np.random.default_rng(seed).choice(indices, size=size, replace=False))


def _resize(images: torch.Tensor, size: int, chunk: int = 8192) -> torch.Tensor:
    """uint8 (N, C, H, W) -> uint8 (N, C, size, size), bilinear (antialiased when shrinking)."""
    if images.shape[-2:] == (size, size):
        return images
    shrink = size < max(images.shape[-2:])
    out = torch.empty((len(images), images.shape[1], size, size), dtype=torch.uint8)
    for start in range(0, len(images), chunk):  # bounds the float copy's memory
        part = images[start:start + chunk].float()
        resized = F.interpolate(part, size=(size, size), mode="bilinear", align_corners=False, antialias=shrink)
        out[start:start + chunk] = resized.round_().clamp_(0, 255).to(torch.uint8)
    return out


def _load(cfg: DataConfig):
    if cfg.name == "digits":
        return _load_digits()
    if cfg.name == "fashion_mnist":
        return _load_fashion_mnist(cfg)
    if cfg.name in _CIFAR:
        return _load_cifar(cfg, cfg.name)
    return _load_imagefolder(cfg)


def build_datasets(cfg: DataConfig, run_dir: Path | str | None = None) -> Splits:
    """Loads ``cfg.name`` and returns its disjoint train / calibration / test splits.

    Files are looked for in ``cfg.root``, or by default: Fashion-MNIST in /usr/share/datasets/fashion-mnist
    (Debian's ``dataset-fashion-mnist``) then ``$DYNEXIT_DATA/fashion_mnist``; CIFAR in
    ``$DYNEXIT_DATA/<name>`` (``$DYNEXIT_DATA`` defaults to ~/.cache/dynexit/data). When they are missing:
    download through torchvision if ``cfg.download``, else use ``cfg.fallback`` if set, else raise
    FileNotFoundError. The calibration split is drawn from the training set (see
    ``calibration_indices``); ``train_subset`` then thins the rest and ``test_subset`` the test set.
    """
    validate_data_config(cfg)
    try:
        source = _load(cfg)
    except FileNotFoundError as err:
        if cfg.fallback is None:
            raise
        log.warning("%s; using data.fallback=%s instead", err, cfg.fallback)
        cfg = replace(cfg, name=cfg.fallback, root=None, fallback=None)
        source = _load(cfg)
    name, info = cfg.name, _INFO[cfg.name]
    if isinstance(source, _Arrays):
        n_train, n_test, classes = len(source.train_images), len(source.test_images), source.classes
    else:
        n_train, n_test, classes = len(source[0]), len(source[1]), list(source[0].classes)
    num_classes = info.num_classes or len(classes)

    calib_idx = calibration_indices(cfg, name, n_train, Path(run_dir) if run_dir is not None else None)
    rest = np.setdiff1d(np.arange(n_train), calib_idx, assume_unique=True)
    train_idx = _subset(rest, cfg.train_subset, [cfg.split_seed, 1],
                        "training images left after calibration", "train_subset")
    test_idx = _subset(np.arange(n_test), cfg.test_subset, [cfg.split_seed, 2], "test images", "test_subset")

    if isinstance(source, _Arrays):
        train, calib, test = _in_memory_splits(cfg, source, info, train_idx, calib_idx, test_idx)
    else:
        make = imagenet_transform if cfg.recipe == "imagenet" else _small_folder_transform
        train_tf, eval_tf = make(cfg, True, info.mean, info.std), make(cfg, False, info.mean, info.std)
        train = FolderImages(source[0], train_idx, train_tf)
        calib = FolderImages(source[0], calib_idx, eval_tf)
        test = FolderImages(source[1], test_idx, eval_tf)
    log.info("%s: %d train, %d calibration, %d test images, %d classes, %d px, %s recipe", name, len(train),
             len(calib), len(test), num_classes, cfg.image_size, cfg.recipe)
    return Splits(train=train, calib=calib, test=test, num_classes=num_classes, image_size=cfg.image_size,
                  calib_indices=calib_idx, train_indices=train_idx, test_indices=test_idx, name=name,
                  classes=classes, mean=info.mean, std=info.std)


def _in_memory_splits(cfg: DataConfig, src: _Arrays, info: _Info, train_idx: np.ndarray,
                      calib_idx: np.ndarray, test_idx: np.ndarray):
    train_x, test_x = src.train_images, src.test_images
    if cfg.recipe == "imagenet":  # timm crops and resizes each PIL image from the stored original
        train_tf = PilTransform(imagenet_transform(cfg, True, info.mean, info.std))
        eval_tf = PilTransform(imagenet_transform(cfg, False, info.mean, info.std))
    else:  # resize once, then only tensor work per batch
        s = cfg.image_size
        need = (len(train_x) + len(test_x)) * train_x.shape[1] * s * s
        if need > MAX_IN_MEMORY_BYTES:
            raise ValueError(f"data.image_size={s}: the small recipe would hold {need / 2**30:.1f} GiB of "
                             f"resized {cfg.name} images in memory; use data.recipe=imagenet or a smaller size")
        train_x, test_x = _resize(train_x, s), _resize(test_x, s)
        train_tf = TensorTransform(info.mean, info.std, _crop_padding(cfg), _hflip(cfg, cfg.name))
        eval_tf = TensorTransform(info.mean, info.std)
    return (InMemoryImages(train_x, src.train_targets, train_idx, train_tf),
            InMemoryImages(train_x, src.train_targets, calib_idx, eval_tf),
            InMemoryImages(test_x, src.test_targets, test_idx, eval_tf))


# ----------------------------------------------------------------------------------------------------
# Loaders


def build_loaders(splits: Splits, batch_size: int, num_workers: int = 0, distributed: bool = False,
                  seed: int = 0, eval_batch_size: Optional[int] = None, pin_memory: bool = False,
                  drop_last: Optional[bool] = None) -> dict[str, DataLoader]:
    """DataLoaders for ``splits``, keyed ``"train"``, ``"calib"``, ``"test"``.

    Train: shuffled by a generator seeded with ``seed`` (the same seed gives the same order and the same
    worker seeds), or, when ``distributed``, a DistributedSampler over the initialised process group
    (seeded with ``seed``; call ``set_epoch``). ``drop_last`` (None: drop the last incomplete batch when
    the split holds at least one full batch) applies to train only. Calibration and test keep their
    order, are not sharded, and use ``eval_batch_size`` (default ``batch_size``).
    """
    for key, value in (("batch_size", batch_size), ("eval_batch_size", eval_batch_size)):
        if value is not None and (not isinstance(value, int) or value < 1):
            raise ValueError(f"{key} must be a positive integer, got {value!r}")
    if num_workers < 0:
        raise ValueError(f"num_workers must be >= 0, got {num_workers}")
    common = dict(num_workers=num_workers, pin_memory=pin_memory, persistent_workers=num_workers > 0)
    train = splits.train
    generator = torch.Generator()
    sampler = None
    per_replica = len(train)
    if distributed:
        import torch.distributed as dist
        from torch.utils.data.distributed import DistributedSampler

        if not dist.is_available() or not dist.is_initialized():
            raise ValueError("build_loaders(distributed=True) needs an initialised torch.distributed "
                             "process group")
        per_replica = -(-len(train) // dist.get_world_size())
        generator.manual_seed(seed + dist.get_rank())  # different augmentation seeds per rank
    else:
        generator.manual_seed(seed)
    if drop_last is None:
        drop_last = per_replica >= batch_size
    if distributed:
        sampler = DistributedSampler(train, shuffle=True, seed=seed, drop_last=drop_last)
    loaders = {"train": DataLoader(train, batch_size=batch_size, shuffle=sampler is None, sampler=sampler,
                                   generator=generator, drop_last=drop_last, **common)}
    for name in ("calib", "test"):
        loaders[name] = DataLoader(getattr(splits, name), batch_size=eval_batch_size or batch_size,
                                   shuffle=False, drop_last=False, **common)
    return loaders
