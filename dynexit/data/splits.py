"""Disjoint train / calibration / test splits of a data set (:func:`build_datasets`), with a calibration
split drawn once per run folder and kept."""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from dynexit.config import DataConfig, calibration_count, validate_data_config
from dynexit.data.datasets import (
    _INFO,
    CALIB_FILE,
    IMAGENET_MEAN,
    IMAGENET_STD,
    MAX_IN_MEMORY_BYTES,
    FolderImages,
    InMemoryImages,
    _Arrays,
    _Info,
    _load,
)
from dynexit.data.transforms import (
    ModelInput,
    PilTransform,
    TensorTransform,
    _crop_padding,
    _hflip,
    _small_folder_transform,
    imagenet_transform,
)
from dynexit.utils import atomic_write_text

log = logging.getLogger(__name__)


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
    # With build_datasets(uint8_train=True): the train split yields uint8 images and this finishes them on the
    # training device (normalization, and the imagenet recipe's random erasing); None otherwise.
    train_input: Optional[ModelInput] = None


def _calib_count(cfg: DataConfig, n_train: int) -> int:
    return calibration_count(cfg.calib_size, n_train)


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


def split_indices(cfg: DataConfig, name: str, n_train: int, n_test: int, run_dir: Path | str | None
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The sorted indices of the training, calibration and test splits: the calibration split held out of
    the training set (``calibration_indices``), then ``train_subset`` and ``test_subset`` thinning the rest."""
    calib_idx = calibration_indices(cfg, name, n_train, Path(run_dir) if run_dir is not None else None)
    rest = np.setdiff1d(np.arange(n_train), calib_idx, assume_unique=True)
    train_idx = _subset(rest, cfg.train_subset, [cfg.split_seed, 1],
                        "training images left after calibration", "train_subset")
    test_idx = _subset(np.arange(n_test), cfg.test_subset, [cfg.split_seed, 2], "test images", "test_subset")
    return train_idx, calib_idx, test_idx


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


def build_datasets(cfg: DataConfig, run_dir: Path | str | None = None, uint8_train: bool = False) -> Splits:
    """Loads ``cfg.name`` and returns its disjoint train / calibration / test splits.

    Files are looked for in ``cfg.root``, or by default: Fashion-MNIST in /usr/share/datasets/fashion-mnist
    (Debian's ``dataset-fashion-mnist``) then ``$DYNEXIT_DATA/fashion_mnist``; CIFAR in
    ``$DYNEXIT_DATA/<name>`` (``$DYNEXIT_DATA`` defaults to ~/.cache/dynexit/data). When they are missing:
    download through torchvision if ``cfg.download``, else use ``cfg.fallback`` if set, else raise
    FileNotFoundError. The calibration split is drawn from the training set (see
    ``calibration_indices``); ``train_subset`` then thins the rest and ``test_subset`` the test set.
    With ``uint8_train`` (the training loop) the train split yields augmented uint8 images and
    ``Splits.train_input`` normalizes them on the training device (the same numbers, a quarter of the bytes).
    """
    validate_data_config(cfg)
    if cfg.factory is not None:
        return _factory_splits(cfg, run_dir)
    if cfg.stage_to is not None:
        from dynexit.data.staging import stage

        cfg = replace(cfg, root=str(stage(cfg.root, cfg.stage_to)))
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

    train_idx, calib_idx, test_idx = split_indices(cfg, name, n_train, n_test, run_dir)

    if isinstance(source, _Arrays):
        train, calib, test = _in_memory_splits(cfg, source, info, train_idx, calib_idx, test_idx, uint8_train)
    else:
        make = imagenet_transform if cfg.recipe == "imagenet" else _small_folder_transform
        train_tf = make(cfg, True, info.mean, info.std, uint8=uint8_train)
        eval_tf = make(cfg, False, info.mean, info.std)
        train = FolderImages(source[0], train_idx, train_tf)
        calib = FolderImages(source[0], calib_idx, eval_tf)
        test = FolderImages(source[1], test_idx, eval_tf)
    log.info("%s: %d train, %d calibration, %d test images, %d classes, %d px, %s recipe", name, len(train),
             len(calib), len(test), num_classes, cfg.image_size, cfg.recipe)
    erasing = cfg.random_erasing if cfg.recipe == "imagenet" else 0.0  # timm's, moved after normalization
    return Splits(train=train, calib=calib, test=test, num_classes=num_classes, image_size=cfg.image_size,
                  calib_indices=calib_idx, train_indices=train_idx, test_indices=test_idx, name=name,
                  classes=classes, mean=info.mean, std=info.std,
                  train_input=ModelInput(info.mean, info.std, erasing) if uint8_train else None)


def _in_memory_splits(cfg: DataConfig, src: _Arrays, info: _Info, train_idx: np.ndarray,
                      calib_idx: np.ndarray, test_idx: np.ndarray, uint8_train: bool = False):
    train_x, test_x = src.train_images, src.test_images
    if cfg.recipe == "imagenet":  # timm crops and resizes each PIL image from the stored original
        train_tf = PilTransform(imagenet_transform(cfg, True, info.mean, info.std, uint8=uint8_train))
        eval_tf = PilTransform(imagenet_transform(cfg, False, info.mean, info.std))
    else:  # resize once, then only tensor work per batch
        s = cfg.image_size
        need = (len(train_x) + len(test_x)) * train_x.shape[1] * s * s
        if need > MAX_IN_MEMORY_BYTES:
            raise ValueError(f"data.image_size={s}: the small recipe would hold {need / 2**30:.1f} GiB of "
                             f"resized {cfg.name} images in memory; use data.recipe=imagenet or a smaller size")
        train_x, test_x = _resize(train_x, s), _resize(test_x, s)
        train_tf = TensorTransform(info.mean, info.std, _crop_padding(cfg), _hflip(cfg, cfg.name),
                                   normalize=not uint8_train)
        eval_tf = TensorTransform(info.mean, info.std)
    return (InMemoryImages(train_x, src.train_targets, train_idx, train_tf),
            InMemoryImages(train_x, src.train_targets, calib_idx, eval_tf),
            InMemoryImages(test_x, src.test_targets, test_idx, eval_tf))


def _factory_splits(cfg: DataConfig, run_dir: Path | str | None) -> Splits:
    """The splits of a user's data set: ``data.factory(**data.options)`` gives (train, test) Datasets of
    (C x H x W float image, int label); the calibration split is held out of train, the subsets thinned, as
    for the built-in data sets. The images are used as they come (no transform, no normalisation)."""
    from torch.utils.data import Subset

    from dynexit.models.interface import load_factory

    made = load_factory(cfg.factory, what="data factory")(**(cfg.options or {}))
    if not (isinstance(made, (tuple, list)) and len(made) == 2 and all(hasattr(d, "__getitem__") and hasattr(
            d, "__len__") for d in made)):
        raise TypeError(f"data.factory {cfg.factory!r} must return (train, test), two torch Datasets; got "
                        f"{type(made).__name__}")
    source_train, source_test = made
    n_train, n_test = len(source_train), len(source_test)
    image, _ = source_train[0]
    if not (isinstance(image, torch.Tensor) and image.ndim == 3 and image.is_floating_point()):
        raise TypeError(f"data.factory {cfg.factory!r}: a sample must be (C x H x W float tensor, int label), got "
                        f"an image of {type(image).__name__} {tuple(getattr(image, 'shape', ()))}")
    if tuple(image.shape[1:]) != (cfg.image_size, cfg.image_size):
        raise ValueError(f"data.factory {cfg.factory!r} gives {tuple(image.shape[1:])} images, but "
                         f"data.image_size is {cfg.image_size}; set data.image_size: {image.shape[-1]}")
    name = cfg.factory
    train_idx, calib_idx, test_idx = split_indices(cfg, name, n_train, n_test, run_dir)
    classes = list(getattr(source_train, "classes", []) or [])
    num_classes = len(classes) or 1 + max(int(source_train[i][1]) for i in range(n_train))
    log.info("%s: %d train, %d calibration, %d test images, %d classes, %d px, as the factory gives them", name,
             len(train_idx), len(calib_idx), len(test_idx), num_classes, cfg.image_size)
    channels = image.shape[0]
    return Splits(train=Subset(source_train, train_idx.tolist()), calib=Subset(source_train, calib_idx.tolist()),
                  test=Subset(source_test, test_idx.tolist()), num_classes=num_classes, image_size=cfg.image_size,
                  calib_indices=calib_idx, train_indices=train_idx, test_indices=test_idx, name=name,
                  classes=classes, mean=(0.0,) * channels, std=(1.0,) * channels)
