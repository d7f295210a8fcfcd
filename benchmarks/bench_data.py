"""Throughput of the in-memory training loader on Fashion-MNIST (needs the Debian package
dataset-fashion-mnist): the batch transform alone, then whole epochs at a few batch sizes and workers.

    python benchmarks/bench_data.py
"""
import time

import torch  # noqa: F401  (imported first so that thread settings apply)

from dynexit.config import DataConfig
from dynexit.data import build_datasets, build_loaders

for size in (28, 32):
    s = build_datasets(DataConfig(name="fashion_mnist", image_size=size))
    tf = s.train.transform
    x = s.train.images[:128]
    for _ in range(5):
        tf(x)
    t, n = time.perf_counter(), 200
    for _ in range(n):
        tf(x)
    print(f"{size}px transform of a 128 batch: {(time.perf_counter()-t)/n*1e3:.2f} ms")
    for bs, nw in ((128, 0), (256, 0), (128, 2)):
        loader = build_loaders(s, bs, num_workers=nw)["train"]
        t, count = time.perf_counter(), 0
        for xb, _ in loader:
            count += len(xb)
        dt = time.perf_counter() - t
        print(f"{size}px train loader batch {bs} workers {nw}: {count} images in {dt:.2f} s = {count/dt:,.0f} img/s, "
              f"{dt/len(loader)*1e3:.2f} ms/batch")
