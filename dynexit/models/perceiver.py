"""Dynamic Perceiver: a CNN branch, a latent-token branch, cross-attention between them, four exits.

The model runs as a sequence of *segments*, each ending in an exit. ``forward`` runs them all; cost
counting runs segments 0..k; early exit runs a segment only for the samples still undecided. All three
go through ``run_segment``, so there is one forward path.

Segment plan (exit names as in the official release):

    0  stem, latent 1, CNN 1, latent 2, CNN 2, latent 3          -> "early3" (latent branch)
    1  CNN 3, latent 4                                           -> "att"    (latent branch)
    2  CNN 4                                                     -> "cnn"    (CNN branch)
    3  last cross-attention (features read the latents)          -> "merge"  (both branches)

"latent k" is the latent stage attached to the input of CNN stage k: token mixing and widening (k > 1),
z2x (k > 1), x2z, then self-attention.
"""
from __future__ import annotations

import torch
from torch import nn

from dynexit.models.backbones import BACKBONES
from dynexit.models.base import CNNExit, MultiExitModel, State, classifier, configured_backbone
from dynexit.models.layers import (
    FeaturesToLatents,
    LatentsToFeatures,
    SelfAttentionLayer,
    TokenExpander,
    TokenMixer,
)
from dynexit.models.presets import PRESETS, PerceiverConfig
from dynexit.models.registry import ModelFamily, register_family


class LatentStage(nn.Module):
    """Latent stage k: [mixer + expander, z2x,] x2z, self-attention; returns (features, latents)."""

    def __init__(self, cfg: PerceiverConfig, k: int, channels: tuple[int, ...], tokens: list[int]):
        super().__init__()
        c = channels[k]
        first = k == 0
        self.mixer = None if first else TokenMixer(tokens[k - 1], tokens[k])
        self.expander = None if first else TokenExpander(channels[k - 1], c)
        self.z2x = LatentsToFeatures(c, c, cfg.dropout) if (cfg.z2x and not first) else None
        # The first x2z is always kept: without it the latents never see the image before stage 2.
        self.x2z = FeaturesToLatents(c, cfg.token_grid, cfg.dwc, cfg.dropout) if (cfg.x2z or first) else None
        depth = cfg.sa_layers[k] * cfg.depth_factor[k]
        self.self_attn = nn.Sequential(
            *[SelfAttentionLayer(c, cfg.num_heads[k], cfg.widening, cfg.dropout) for _ in range(depth)]
        )

    def forward(self, x: torch.Tensor, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.mixer is not None:
            z = self.expander(self.mixer(z))
        if self.z2x is not None:
            x = self.z2x(x, z)
        if self.x2z is not None:
            z = self.x2z(x, z)
        return x, self.self_attn(z)


class LogitConnection(nn.Sequential):
    """isc: an earlier exit's logits, projected to the latent width (Linear + BatchNorm + ReLU)."""

    def __init__(self, num_classes: int, channels: int):
        super().__init__(nn.Linear(num_classes, channels), nn.BatchNorm1d(channels), nn.ReLU(inplace=True))


class LatentExit(nn.Module):
    """Exit on the latent branch: mean of the tokens [+ isc of an earlier exit's logits] -> classifier."""

    def __init__(self, channels: int, num_classes: int, isc_from: int | None):
        super().__init__()
        self.isc_from = isc_from
        self.isc = LogitConnection(num_classes, channels) if isc_from is not None else None
        self.fc = nn.Linear(channels * (2 if self.isc is not None else 1), num_classes)

    def forward(self, s: State) -> torch.Tensor:
        h = s.z.mean(dim=1)
        if self.isc is not None:
            h = torch.cat([h, self.isc(s.logits[self.isc_from])], dim=1)
        return self.fc(h)


class MergeExit(nn.Module):
    """Exit merging both branches: [last cross-attention,] pooled features, mean latents [, isc] -> BN, classifier."""

    def __init__(self, cfg: PerceiverConfig, map_channels: int, latent_channels: int, hidden: int | None,
                 cnn_dropout: float, isc_from: int | None):
        super().__init__()
        self.cross = LatentsToFeatures(map_channels, latent_channels, cfg.dropout) if cfg.last_ca else None
        # Without the last cross-attention the merge exit reuses the CNN exit's (dropped-out) features.
        self.drop = nn.Dropout(cnn_dropout) if (cnn_dropout and not cfg.last_ca) else nn.Identity()
        self.isc_from = isc_from
        self.isc = LogitConnection(cfg.num_classes, latent_channels) if isc_from is not None else None
        width = map_channels + latent_channels * (2 if self.isc is not None else 1)
        self.fc = classifier(width, cfg.num_classes, hidden, norm=True)

    def forward(self, s: State) -> torch.Tensor:
        x = self.cross(s.x, s.z) if self.cross is not None else s.x
        parts = [self.drop(x.mean(dim=(2, 3))), s.z.mean(dim=1)]
        if self.isc is not None:
            parts.append(self.isc(s.logits[self.isc_from]))
        return self.fc(torch.cat(parts, dim=1))


# (step kind, index) per segment; ("exit", name) ends a segment.
SEGMENT_PLAN: tuple[tuple[tuple[str, int | str], ...], ...] = (
    (("stem", 0), ("latent", 0), ("cnn", 0), ("latent", 1), ("cnn", 1), ("latent", 2), ("exit", "early3")),
    (("cnn", 2), ("latent", 3), ("exit", "att")),
    (("cnn", 3), ("exit", "cnn")),
    (("exit", "merge"),),
)


class DynPerceiver(MultiExitModel):
    """Dyn-Perceiver on a staged CNN backbone; ``forward`` returns the logits of the four exits."""

    segment_plan = SEGMENT_PLAN
    exit_names = ("early3", "att", "cnn", "merge")

    def __init__(self, cfg: PerceiverConfig):
        super().__init__()
        if cfg.static:
            raise ValueError("a static configuration builds a StaticClassifier, not a DynPerceiver")
        self.config = cfg
        spec = BACKBONES[cfg.backbone]
        self.backbone, cnn_dropout = configured_backbone(cfg)
        channels = self.backbone.stage_channels
        tokens = [cfg.num_latents >> k for k in range(4)]
        self.latent = nn.Parameter(nn.init.trunc_normal_(torch.empty(tokens[0], channels[0]), std=0.02, a=-2, b=2))
        self.latent_stages = nn.ModuleList(LatentStage(cfg, k, channels, tokens) for k in range(4))
        isc = cfg.isc
        self.exits = nn.ModuleDict({
            "early3": LatentExit(channels[2], cfg.num_classes, None),
            "att": LatentExit(channels[3], cfg.num_classes, 0 if isc else None),
            "cnn": CNNExit(self.backbone.out_channels, cfg.num_classes, spec.head_hidden, cnn_dropout),
            "merge": MergeExit(cfg, self.backbone.out_channels, channels[3], spec.head_hidden, cnn_dropout,
                               1 if isc else None),
        })

    def init_state(self, images: torch.Tensor) -> State:
        z = self.latent.expand(images.shape[0], -1, -1)
        return State(images, z, ())

    def _step(self, step: tuple[str, int | str], s: State) -> State:
        kind, i = step
        if kind == "latent":
            x, z = self.latent_stages[i](s.x, s.z)
            return s._replace(x=x, z=z)
        return super()._step(step, s)


class StaticClassifier(MultiExitModel):
    """The backbone alone with its classifier: one exit, the baseline without early exits."""

    segment_plan = ((("stem", 0), ("cnn", 0), ("cnn", 1), ("cnn", 2), ("cnn", 3), ("exit", "cnn")),)
    exit_names = ("cnn",)

    def __init__(self, cfg: PerceiverConfig):
        super().__init__()
        self.config = cfg
        spec = BACKBONES[cfg.backbone]
        self.backbone, cnn_dropout = configured_backbone(cfg)
        self.exits = nn.ModuleDict({"cnn": CNNExit(self.backbone.out_channels, cfg.num_classes, spec.head_hidden,
                                                   cnn_dropout)})

    def init_state(self, images: torch.Tensor) -> State:
        return State(images, images.new_zeros(images.shape[0], 0, 0), ())


def model_class(cfg: PerceiverConfig) -> type[MultiExitModel]:
    """The class ``build_model`` builds for ``cfg`` (its ``exit_names`` are known without building it)."""
    return StaticClassifier if cfg.static else DynPerceiver


def build_model(cfg: PerceiverConfig) -> MultiExitModel:
    return model_class(cfg)(cfg)


register_family(ModelFamily(
    name="perceiver", config_class=PerceiverConfig, build=build_model, presets=PRESETS,
    description="Dynamic Perceiver (CNN and latent branches, four exits), or its backbone alone (static=true)",
    exit_names=lambda cfg: tuple(model_class(cfg).exit_names)))
