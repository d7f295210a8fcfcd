"""Transforms: the small recipe as whole-batch tensor work, and the official ImageNet recipe through timm."""
from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F

from dynexit.config import DataConfig
from dynexit.data.datasets import _INFO


class TensorTransform:
    """uint8 images (B, C, H, W), C in {1, 3} -> normalized float32 (B, 3, H, W).

    Training: each image gets its own random crop of the zero-padded batch (offsets in [0, 2p]) and,
    if ``hflip``, a mirror with probability 1/2; both are one gather over the batch. Randomness comes
    from torch's global generator (the training loader runs it in the training process: see
    ``dynexit.data.loaders``).
    """

    batched = True  # one call transforms a whole batch

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
