"""A user's data set, as the docs show one: a factory returning (train, test) torch Datasets."""
import torch
from torch.utils.data import TensorDataset


def make(n_train: int = 120, n_test: int = 40, size: int = 16, classes: int = 3, seed: int = 0):
    """Images whose mean brightness says their class (so that a tiny model learns something)."""
    g = torch.Generator().manual_seed(seed)

    def split(n):
        labels = torch.randint(0, classes, (n,), generator=g)
        images = torch.randn(n, 3, size, size, generator=g) * 0.3 + labels.view(-1, 1, 1, 1).float()
        return TensorDataset(images, labels)

    return split(n_train), split(n_test)
