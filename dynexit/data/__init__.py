"""Data sets, disjoint train/calibration/test splits, and transforms.

Public API:

- ``dynexit.config.DataConfig``: the ``data`` section of a run config (fields documented on the class).
- ``build_datasets(cfg, run_dir=None) -> Splits``: loads the data set named by ``cfg.name`` and returns
  three disjoint splits: ``train`` (training transforms), ``calib`` (held out of the training set, for
  choosing exit thresholds) and ``test`` (the data set's own test/val split), both with evaluation
  transforms. Each is a torch Dataset yielding ``(float32 image (3, S, S), int target)``. The
  calibration indices are written to ``run_dir/calib_indices.json`` and reused when that file exists.
  With ``uint8_train=True`` (the training loop) the train split yields augmented uint8 images and
  ``Splits.train_input`` finishes them on the training device (normalization, the imagenet recipe's
  random erasing). ``data.stage_to`` copies ``data.root`` to a node's local disk first
  (``dynexit.data.staging``); an image folder's file list is scanned once and kept in an index
  (``$DYNEXIT_DATA/index``).
- ``Splits``: ``train``, ``calib``, ``test``, ``num_classes``, ``image_size``, ``calib_indices``,
  ``train_indices``, ``test_indices``, ``name`` (the data set actually loaded), ``classes``, ``mean``,
  ``std``.
- ``build_loaders(splits, batch_size, num_workers=0, distributed=False, seed=0, ...)``: a dict of
  DataLoaders keyed ``"train"``, ``"calib"``, ``"test"``: train shuffled by a seeded generator (or a
  DistributedSampler: call ``loader.sampler.set_epoch(epoch)`` each epoch; its ``skip`` starts the next pass
  within the epoch), the others in order. The number of workers changes the speed, never the images.
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

from dynexit.config import DATASETS, RECIPES
from dynexit.data.datasets import CALIB_FILE, DIGITS_TEST_SIZE, FASHION_MNIST_DEBIAN, read_idx
from dynexit.data.loaders import build_loaders
from dynexit.data.splits import Splits, build_datasets, calibration_indices
from dynexit.data.transforms import TensorTransform, imagenet_transform

__all__ = ["CALIB_FILE", "DATASETS", "DIGITS_TEST_SIZE", "FASHION_MNIST_DEBIAN", "RECIPES", "Splits",
           "TensorTransform", "build_datasets", "build_loaders", "calibration_indices", "imagenet_transform",
           "read_idx"]
