"""Training-data throughput.

Default: the ImageNet recipe (``data.recipe: imagenet`` at 224 px: RandomResizedCrop, flip, RandAugment;
random erasing on the training device) on synthetic JPEGs of ImageNet's typical size (500 x 375, quality 90),
read through dynexit's image-folder pipeline as the training loop reads them (uint8 batches, per-sample
augmentation seeds): images/s per core in one process, then through the train loader with workers, and the
cores a GPU consuming a given number of images/s needs at that rate.

    python benchmarks/bench_data.py [--images 256] [--workers 0,1,2] [--gpu-rates 1000,2000,3000]
    python benchmarks/bench_data.py --fashion   # the in-memory loader (needs Debian's dataset-fashion-mnist)
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from dynexit.config import DataConfig
from dynexit.data import build_datasets, build_loaders
from dynexit.data.datasets import _load_image

CLASSES = 4


def synthetic_jpegs(root: Path, images: int, width: int = 500, height: int = 375) -> None:
    """``root/train`` and ``root/val`` with CLASSES class folders of JPEGs: smooth random colour fields with
    a little noise, which compress (and decode) like photographs rather than like noise."""
    rng = np.random.default_rng(0)
    for part, count in (("train", images), ("val", CLASSES)):
        for i in range(count):
            folder = root / part / f"class{i % CLASSES}"
            folder.mkdir(parents=True, exist_ok=True)
            coarse = Image.fromarray(rng.integers(0, 256, (12, 16, 3), dtype=np.uint8)).resize((width, height),
                                                                                                Image.BICUBIC)
            pixels = np.asarray(coarse, dtype=np.int16) + rng.integers(-12, 13, (height, width, 3))
            Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(folder / f"{i:06d}.JPEG", quality=90)


def per_core(splits, count: int) -> float:
    """Images/s of one process on one thread: decode and augment ``count`` training images."""
    torch.set_num_threads(1)
    for i in range(4):
        splits.train[(i, i)]
    start = time.perf_counter()
    for i in range(count):
        splits.train[(i % len(splits.train), 1000 + i)]
    return count / (time.perf_counter() - start)


def imagenet(args) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        synthetic_jpegs(Path(tmp), args.images)
        cfg = DataConfig(name="imagefolder", root=tmp, recipe="imagenet", image_size=224, calib_size=CLASSES)
        files = sorted(Path(tmp, "train").rglob("*.JPEG"))
        start = time.perf_counter()
        for path in files[:64]:
            _load_image(str(path))
        decode = 64 / (time.perf_counter() - start)
        size = np.mean([f.stat().st_size for f in files]) / 1e3
        print(f"synthetic JPEGs 500x375 q90, {len(files)} images, mean {size:.0f} kB")
        print(f"decode only (PIL, RGB): {decode:,.0f} img/s per core ({1e3 / decode:.1f} ms/image)")
        uint8 = build_datasets(cfg, uint8_train=True)
        floats = build_datasets(cfg)
        rate = per_core(uint8, args.images)
        print(f"train sample, uint8 (decode + crop + flip + RandAugment): {rate:,.0f} img/s per core "
              f"({1e3 / rate:.1f} ms/image), {3 * 224 * 224 / 1e3:.0f} kB per image")
        float_rate = per_core(floats, args.images)
        print(f"train sample, float32 normalized + random erasing in the loader: {float_rate:,.0f} img/s per core "
              f"({1e3 / float_rate:.1f} ms/image), {4 * 3 * 224 * 224 / 1e3:.0f} kB per image")
        batch = torch.stack([uint8.train[(i, i)][0] for i in range(64)])
        uint8.train_input(batch)
        start = time.perf_counter()
        for _ in range(5):
            uint8.train_input(batch)
        print(f"normalize + random erasing of a 64-image batch on the CPU (on the GPU: not measured, no GPU): "
              f"{(time.perf_counter() - start) / 5 * 1e3:.1f} ms")
        for workers in args.workers:
            loader = build_loaders(uint8, batch_size=64, num_workers=workers, seed=0)["train"]
            loader.sampler.set_epoch(0)
            next(iter(loader))  # start the workers (persistent) before timing
            start, count = time.perf_counter(), 0
            for epoch in (1, 2):
                loader.sampler.set_epoch(epoch)
                for images, _ in loader:
                    count += len(images)
            seconds = time.perf_counter() - start
            cores = max(workers, 1)
            print(f"train loader, {workers} worker(s), batch 64: {count / seconds:,.0f} img/s "
                  f"({count / seconds / cores:,.0f} per core)")
        for gpu in args.gpu_rates:
            print(f"a GPU training at {gpu:,} img/s needs {gpu / rate:.0f} loader cores at {rate:,.0f} img/s per core")


def fashion(args) -> None:
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
        for bs in (128, 256):
            loader = build_loaders(s, bs)["train"]
            t, count = time.perf_counter(), 0
            for xb, _ in loader:
                count += len(xb)
            dt = time.perf_counter() - t
            print(f"{size}px train loader batch {bs}: {count} images in {dt:.2f} s = {count/dt:,.0f} img/s, "
                  f"{dt/len(loader)*1e3:.2f} ms/batch")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--fashion", action="store_true", help="the in-memory loader on Fashion-MNIST instead")
    parser.add_argument("--images", type=int, default=256, help="synthetic training JPEGs (default 256)")
    parser.add_argument("--workers", type=lambda s: [int(w) for w in s.split(",")], default=[0, 1, 2],
                        help="loader workers to time, e.g. 0,1,2")
    parser.add_argument("--gpu-rates", type=lambda s: [int(r) for r in s.split(",")], default=[1000, 2000, 3000],
                        help="GPU training speeds (img/s) to size the loader for")
    args = parser.parse_args()
    (fashion if args.fashion else imagenet)(args)


if __name__ == "__main__":
    main()
