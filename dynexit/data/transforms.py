"""Transforms: the small recipe as whole-batch tensor work, and the official ImageNet recipe through timm."""
from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F

from dynexit.config import DataConfig
from dynexit.data.datasets import _INFO


class TensorTransform:
    """uint8 images (B, C, H, W), C in {1, 3} -> normalized float32 (B, 3, H, W); with ``normalize=False``
    the augmented uint8 images (B, C, H, W), which :class:`ModelInput` normalizes on the training device.

    Training: each image gets its own random crop of the zero-padded batch (offsets in [0, 2p]) and,
    if ``hflip``, a mirror with probability 1/2; both are one gather over the batch. Randomness comes
    from torch's global generator (the training loader runs it in the training process: see
    ``dynexit.data.loaders``).
    """

    batched = True  # one call transforms a whole batch

    def __init__(self, mean: Sequence[float], std: Sequence[float], crop_padding: int = 0,
                 hflip: bool = False, normalize: bool = True):
        self.mean = tuple(float(m) for m in mean)
        self.std = tuple(float(s) for s in std)
        self.crop_padding = int(crop_padding)
        self.hflip = bool(hflip)
        self.normalize = bool(normalize)

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] not in (1, 3):
            raise TypeError(f"expected uint8 images (B, 1 or 3, H, W), got {images.dtype} {tuple(images.shape)}")
        if self.crop_padding or self.hflip:
            images = self._augment(images)
        if not self.normalize:
            return images.contiguous()
        return normalize_uint8(images, *_scale_shift(self.mean, self.std, images.shape[1], images.device))

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
                f"hflip={self.hflip}, normalize={self.normalize})")


def _scale_shift(mean: Sequence[float], std: Sequence[float], c: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    scale = torch.tensor([1.0 / (255.0 * s) for s in std[:c]]).view(1, c, 1, 1).to(device)
    shift = torch.tensor([m / s for m, s in zip(mean[:c], std[:c])]).view(1, c, 1, 1).to(device)
    return scale, shift


def normalize_uint8(images: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """uint8 (B, C, H, W), C in {1, 3} -> float32 (B, 3, H, W): ``x / 255`` standardised with the mean and std
    that ``scale`` and ``shift`` hold (the same operations wherever they run, so the same numbers)."""
    out = images.float().mul_(scale).sub_(shift)  # grey images: normalize once, then 3 channels
    return out.expand(-1, 3, -1, -1).contiguous() if images.shape[1] == 1 else out.contiguous()


class ModelInput:
    """The training batches' last step, on the training device: uint8 images (B, C, H, W) from the loader
    (a quarter of float32's bytes through the loader's queues and to the device) -> normalized float32
    (B, 3, H, W), then, for the imagenet recipe, random erasing (timm's, per image, pixel mode) drawn from
    the process's global generators."""

    def __init__(self, mean: Sequence[float], std: Sequence[float], random_erasing: float = 0.0):
        self.mean, self.std = tuple(mean), tuple(std)
        self.random_erasing = float(random_erasing)
        self._constants: dict[tuple[str, int], tuple[torch.Tensor, torch.Tensor]] = {}  # per device: copied once
        self._erase: dict[str, Any] = {}

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] not in (1, 3):
            raise TypeError(f"expected uint8 images (B, 1 or 3, H, W), got {images.dtype} {tuple(images.shape)}")
        key = (str(images.device), images.shape[1])
        if key not in self._constants:
            self._constants[key] = _scale_shift(self.mean, self.std, images.shape[1], images.device)
        out = normalize_uint8(images, *self._constants[key])
        if self.random_erasing > 0:
            if key[0] not in self._erase:
                from timm.data.random_erasing import RandomErasing

                self._erase[key[0]] = RandomErasing(self.random_erasing, mode="pixel", max_count=1,
                                                    device=images.device)
            out = self._erase[key[0]](out)
        return out

    def __repr__(self) -> str:
        return f"ModelInput(mean={self.mean}, std={self.std}, random_erasing={self.random_erasing})"


class PilTransform:
    """Applies a per-image PIL transform (timm/torchvision) to a uint8 batch (B, C, H, W)."""

    def __init__(self, transform: Callable):
        self.transform = transform

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        return torch.stack([torch.as_tensor(self.transform(_to_pil(img))) for img in images])

    def __repr__(self) -> str:
        return f"PilTransform({self.transform!r})"


def _to_pil(image: torch.Tensor):
    from PIL import Image

    if image.shape[0] == 1:
        return Image.fromarray(image[0].numpy(), mode="L").convert("RGB")
    return Image.fromarray(image.permute(1, 2, 0).numpy(), mode="RGB")


def imagenet_transform(cfg: DataConfig, train: bool, mean: Sequence[float], std: Sequence[float],
                       uint8: bool = False) -> Callable:
    """The official recipe through timm: PIL image -> normalized tensor (3, S, S). With ``uint8`` (training):
    the augmented uint8 tensor (3, S, S), without random erasing, which :class:`ModelInput` applies after
    normalizing on the training device (as timm's prefetcher does)."""
    from timm.data import create_transform

    common = dict(input_size=cfg.image_size, interpolation="bicubic", mean=tuple(mean), std=tuple(std))
    if not train:
        return create_transform(is_training=False, crop_pct=cfg.eval_crop_pct, **common)
    hflip = _hflip(cfg, cfg.name)
    transform = create_transform(is_training=True, scale=(0.08, 1.0), hflip=0.5 if hflip else 0.0,
                                 color_jitter=0.4, auto_augment=cfg.auto_augment or None, use_prefetcher=uint8,
                                 re_prob=cfg.random_erasing, re_mode="pixel", re_count=1, **common)
    for step in getattr(transform, "transforms", ()):
        for op in getattr(step, "ops", ()):  # RandAugment's operations
            if op.name.startswith("Posterize"):
                op.aug_fn = posterize
    return transform


def posterize(image, bits_to_keep: int, **_):
    """PIL's posterize for any number of bits kept, 0 included. RandAugment's increasing posterize keeps 0 bits
    at magnitude 10, which the official recipe's magnitude noise (m9, std 0.5) reaches for about 2 % of its
    draws; Pillow refuses 0 bits (a ValueError that would stop training), and keeping none makes every
    pixel 0."""
    from PIL import Image, ImageOps

    if bits_to_keep >= 8:
        return image
    if bits_to_keep <= 0:
        return Image.new(image.mode, image.size)
    return ImageOps.posterize(image, bits_to_keep)


def _small_folder_transform(cfg: DataConfig, train: bool, mean: Sequence[float], std: Sequence[float],
                            uint8: bool = False) -> Callable:
    """Small recipe for image files: resize + centre crop to S (+ padded random crop and flip); with ``uint8``
    the uint8 tensor, normalized later by :class:`ModelInput`."""
    from torchvision import transforms as T

    s = cfg.image_size
    steps: list[Any] = [T.Resize(s, interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(s)]
    if train:
        pad = _crop_padding(cfg)
        if pad:
            steps.append(T.RandomCrop(s, padding=pad))
        if _hflip(cfg, cfg.name):
            steps.append(T.RandomHorizontalFlip())
    steps += [T.PILToTensor()] if uint8 else [T.ToTensor(), T.Normalize(mean, std)]
    return T.Compose(steps)


def _hflip(cfg: DataConfig, name: str) -> bool:
    return _INFO[name].hflip if cfg.hflip is None else bool(cfg.hflip)


def _crop_padding(cfg: DataConfig) -> int:
    return cfg.image_size // 8 if cfg.crop_padding is None else int(cfg.crop_padding)
