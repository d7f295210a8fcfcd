"""Data sets, disjoint train/calibration/test splits, transforms and loaders."""
from dynexit.data.datasets import (CALIB_FILE, DATASETS, DIGITS_TEST_SIZE, FASHION_MNIST_DEBIAN, DataConfig, Splits,
                                   TensorTransform, build_datasets, build_loaders, read_idx)

__all__ = ["CALIB_FILE", "DATASETS", "DIGITS_TEST_SIZE", "FASHION_MNIST_DEBIAN", "DataConfig", "Splits",
           "TensorTransform", "build_datasets", "build_loaders", "read_idx"]
