"""Official-layout state dicts for tests: the deterministic weights of the reference fixtures, and the
official key list of any combination of the five ablation switches (derived from the full list the way
the official constructor drops and resizes modules)."""
from __future__ import annotations

import math
import re
from pathlib import Path

import torch

FIXTURES = Path(__file__).parent / "fixtures"
OFFICIAL_MODELS = ("reg800m_perceiver_t128", "resnet50_0375_perceiver_t128", "mobilenetV3_0x75_perceiver_t128")


def load_fixture(name: str) -> dict:
    return torch.load(FIXTURES / f"{name}.pt", weights_only=True)


def deterministic_weights(keys) -> dict[str, torch.Tensor]:
    """The fixture recipe: entry i of ``keys`` is drawn from a generator seeded with 1000 + i."""
    state = {}
    for i, (key, shape, dtype) in enumerate(keys):
        g = torch.Generator().manual_seed(1000 + i)
        shape = tuple(shape)
        if key.endswith("num_batches_tracked"):
            state[key] = torch.zeros(shape, dtype=getattr(torch, str(dtype).split(".")[-1]))
        elif key.endswith("running_var"):
            state[key] = torch.rand(shape, generator=g) + 0.5
        elif key.endswith("running_mean"):
            state[key] = torch.randn(shape, generator=g) * 0.1
        elif len(shape) >= 2:
            state[key] = torch.randn(shape, generator=g) / math.sqrt(math.prod(shape[1:]))
        elif key.endswith("weight"):
            state[key] = 1 + 0.1 * torch.randn(shape, generator=g)
        else:
            state[key] = 0.1 * torch.randn(shape, generator=g)
    return state


def ablated_keys(keys, x2z=True, z2x=True, dwc=True, isc=True, last_ca=True):
    """The official key list of a switch combination, from the full (all switches on) list."""
    drop = []
    if not x2z:
        drop.append(r"(dwc|cross_att)[234]_x2z\.")
    if not dwc:
        drop.append(r"dwc\d_x2z\.")
    if not z2x:
        drop.append(r"cross_att\d_z2x\.")
    if not last_ca:
        drop.append(r"last_cross_att_z2x\.")
    if not isc:
        drop.append(r"isc[34]\.")
    out = [(k, list(s), d) for k, s, d in keys if not any(re.match(p, k) for p in drop)]
    if not isc:
        shapes = dict((k, s) for k, s, _ in keys)
        latent_width = shapes["isc4.0.weight"][0]
        for entry in out:
            key, shape = entry[0], entry[1]
            if key == "classifier_att.weight":
                shape[1] -= latent_width  # no isc features next to the mean latent
            elif key.startswith("classifier_merge.0."):
                if shape:
                    shape[0] -= latent_width
            elif key == "classifier_merge.1.weight":
                shape[1] -= latent_width
    return out
