"""Official Dynamic Perceiver checkpoints -> dynexit state dicts.

The official state dict names modules per stage (``cross_att3_x2z``, ``self_att4.2`` ...) and keeps
separate q/k/v projections; dynexit groups them by latent stage and fuses the projections. Each official
key is renamed by the rules below, fused projections are concatenated, and the result must match the
model's own state dict exactly: every missing, unexpected or wrongly shaped key is reported by name.
"""
from __future__ import annotations

import argparse
import re
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dynexit.utils import load_torch_file

# Top-level official prefixes -> dynexit prefixes. {k} is the official 1-based stage number, {k0} = k-1,
# {j1} = j+1 for the 0-based inter-stage index j.
_PREFIXES = [
    (r"latent$", "latent"),
    (r"cnn_stem\.", "backbone.stem."),
    (r"cnn_body\.block(?P<k>\d)\.", "backbone.stages.{k0}."),
    (r"cnn_body_stage(?P<k>\d)\.", "backbone.stages.{k0}."),
    (r"dwc(?P<k>\d)_x2z\.", "latent_stages.{k0}.x2z.dwc."),
    (r"cross_att(?P<k>\d)_x2z\.", "latent_stages.{k0}.x2z.cross."),
    (r"cross_att(?P<k>\d)_z2x\.", "latent_stages.{k0}.z2x.cross."),
    (r"self_att(?P<k>\d)\.", "latent_stages.{k0}.self_attn."),
    (r"token_mixer\.(?P<j>\d)\.0\.", "latent_stages.{j1}.mixer.norm."),
    (r"token_mixer\.(?P<j>\d)\.1\.", "latent_stages.{j1}.mixer.fc."),
    (r"token_expander\.(?P<j>\d)\.0\.", "latent_stages.{j1}.expander.norm."),
    (r"token_expander\.(?P<j>\d)\.1\.", "latent_stages.{j1}.expander.fc."),
    (r"last_cross_att_z2x\.", "exits.merge.cross.cross."),
    (r"early_classifier3\.", "exits.early3.fc."),
    (r"classifier_att\.", "exits.att.fc."),
    (r"isc3\.", "exits.att.isc."),
    (r"classifier_cnn\.", "exits.cnn.fc."),
    (r"isc4\.", "exits.merge.isc."),
    (r"classifier_merge\.", "exits.merge.fc."),
]

# Inside attention layers. A third element names the slot of a fused projection.
_INNER = [
    (r"cross_attn\.q_norm\.", "q_norm."),
    (r"cross_attn\.kv_norm\.", "kv_norm."),
    (r"cross_attn\.attention\.relative_position_bias$", "attn.key_pos"),
    (r"cross_attn\.attention\.q_proj\.weight$", "attn.q.weight"),
    (r"cross_attn\.attention\.k_proj\.weight$", "attn.kv.weight", 0),
    (r"cross_attn\.attention\.v_proj\.weight$", "attn.kv.weight", 1),
    (r"cross_attn\.attention\.o_proj\.", "attn.proj."),
    (r"self_attn\.norm\.", "norm."),
    (r"self_attn\.attention\.q_proj\.weight$", "attn.qkv.weight", 0),
    (r"self_attn\.attention\.k_proj\.weight$", "attn.qkv.weight", 1),
    (r"self_attn\.attention\.v_proj\.weight$", "attn.qkv.weight", 2),
    (r"self_attn\.attention\.o_proj\.", "attn.proj."),
    (r"mlp\.layernorm\.", "mlp.norm."),
]
_ATTENTION_PARENTS = (".x2z.cross.", ".z2x.cross.", "exits.merge.cross.cross.", ".self_attn.")


def official_key(key: str) -> tuple[str, int | None]:
    """The dynexit key of an official key, and its slot in a fused projection (None if not fused)."""
    for pattern, target in _PREFIXES:
        m = re.match(pattern, key)
        if m:
            groups = m.groupdict()
            names = {}
            if "k" in groups:
                names["k0"] = int(groups["k"]) - 1
            if "j" in groups:
                names["j1"] = int(groups["j"]) + 1
            new = target.format(**names) + key[m.end():]
            break
    else:
        raise KeyError(key)
    if not any(p in new for p in _ATTENTION_PARENTS):
        return new, None
    # Rename inside the attention layer: find where the layer's own names begin.
    head, _, tail = _split_attention(new)
    for rule in _INNER:
        m = re.match(rule[0], tail)
        if m:
            return head + rule[1] + tail[m.end():], (rule[2] if len(rule) > 2 else None)
    return new, None


def _split_attention(key: str) -> tuple[str, str, str]:
    m = re.search(r"(\.self_attn\.\d+\.|\.cross\.(?:cross\.)?)", key)
    return key[: m.end()], "", key[m.end():]


def convert_state_dict(official: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """Maps an official state dict onto ``model``'s keys; raises ValueError naming every mismatch."""
    own = model.state_dict()
    problems: list[str] = []
    fused: dict[str, dict[int, torch.Tensor]] = {}
    origin: dict[str, list[str]] = {}
    converted: dict[str, torch.Tensor] = {}
    for key, value in official.items():
        try:
            new, slot = official_key(key)
        except KeyError:
            problems.append(f"unexpected key {key} (no counterpart in dynexit)")
            continue
        origin.setdefault(new, []).append(key)
        if new not in own:
            problems.append(f"unexpected key {key} (maps to {new}, which this model configuration lacks)")
        elif slot is None:
            converted[new] = value
        else:
            fused.setdefault(new, {})[slot] = value
    for new, parts in fused.items():
        converted[new] = torch.cat([parts[i] for i in sorted(parts)], dim=0)
    for key, value in own.items():
        if key not in converted:
            if key not in origin:
                problems.append(f"missing key {key}")
            continue
        if tuple(converted[key].shape) != tuple(value.shape):
            problems.append(
                f"wrong shape for {' + '.join(origin[key])}: checkpoint {tuple(converted[key].shape)}, "
                f"model {key} {tuple(value.shape)}"
            )
    if problems:
        raise ValueError(
            f"official checkpoint does not fit the model ({len(problems)} problem(s)):\n  " + "\n  ".join(problems)
        )
    return converted


# What an official checkpoint pickles besides tensors and plain containers: its training arguments.
OFFICIAL_GLOBALS = (argparse.Namespace,)


def open_checkpoint(checkpoint: str | Path | dict[str, Any]) -> dict[str, Any]:
    """An official checkpoint file loaded safely on the CPU (tensors, plain containers and the training
    arguments' ``argparse.Namespace``; anything else is refused unrun), or the dict itself; clear errors
    for missing, corrupt or unsafe files."""
    where = "the checkpoint"
    if isinstance(checkpoint, (str, Path)):
        where = str(checkpoint)
        checkpoint = load_torch_file(checkpoint, "official checkpoint", allow=OFFICIAL_GLOBALS)
    if not isinstance(checkpoint, dict):
        raise ValueError(f"{where}: a checkpoint must be a dict, got {type(checkpoint).__name__}")
    if "model_config" in checkpoint:
        raise ValueError(f"{where} is a dynexit checkpoint (it has 'model_config'), not an official one: it needs "
                         f"no conversion; load it with dynexit.models.checkpoint.load_model")
    return checkpoint


def read_checkpoint(checkpoint: str | Path | dict[str, Any], where: str | None = None) -> dict[str, torch.Tensor]:
    """The official state dict inside a path or loaded checkpoint (``model``, ``model_ema``, ``state_dict``
    or a raw state dict). ``where`` names a loaded checkpoint's file in errors."""
    where = where or (str(checkpoint) if isinstance(checkpoint, (str, Path)) else "the checkpoint")
    checkpoint = open_checkpoint(checkpoint)
    for key in ("model", "model_ema", "state_dict"):
        if isinstance(checkpoint.get(key), dict):
            checkpoint = checkpoint[key]
            break
    if not all(isinstance(v, torch.Tensor) for v in checkpoint.values()):
        bad = [k for k, v in checkpoint.items() if not isinstance(v, torch.Tensor)][:5]
        raise ValueError(f"{where}: not a state dict: entries {bad} are not tensors")
    # Checkpoints saved from DistributedDataParallel carry a "module." prefix.
    state = {k[len("module."):] if k.startswith("module.") else k: v for k, v in checkpoint.items()}
    ours = [k for k in state if k.startswith(_DYNEXIT_PREFIXES)]
    if ours:
        raise ValueError(f"{where} holds dynexit parameter names ({ours[0]}, ...), not official ones: it is "
                         f"already a dynexit state dict; load it with model.load_state_dict")
    return state


# Top-level module names that only dynexit's own state dicts have.
_DYNEXIT_PREFIXES = ("latent_stages.", "exits.", "backbone.")


# Official training arguments -> dynexit overrides.
_OFFICIAL_ARGS = {"depth_factor": "depth_factor", "SA_widening_factor": "widening", "with_x2z": "x2z",
                  "with_z2x": "z2x", "with_dwc": "dwc", "with_isc": "isc", "with_last_CA": "last_ca",
                  "nb_classes": "num_classes", "input_size": "input_size", "dropout": "dropout"}


def official_architecture(checkpoint: dict[str, Any], where: str = "checkpoint",
                          model: str | None = None) -> tuple[str | None, dict[str, Any]]:
    """The model name and overrides recorded in an official checkpoint's ``args`` (None, {} if absent);
    ``model``, the caller's own choice (a preset or a factory), replaces the recorded name. A recorded name
    must be one of dynexit's Dyn-Perceiver presets: a file names no code to run (ValueError naming ``where``
    and the name otherwise)."""
    args = checkpoint.get("args") if isinstance(checkpoint, dict) else None
    if args is None:
        return model, {}
    args = vars(args) if not isinstance(args, dict) else args
    overrides = {ours: args[theirs] for theirs, ours in _OFFICIAL_ARGS.items() if args.get(theirs) is not None}
    if "depth_factor" in overrides:
        overrides["depth_factor"] = [int(v) for v in overrides["depth_factor"]]
    name = model if model is not None else args.get("model")
    if model is None and name is not None:
        from dynexit.models.presets import PRESETS

        if name not in PRESETS:
            raise ValueError(f"{where}: its args.model {name!r} is not a Dyn-Perceiver preset of dynexit; a model "
                             f"is taken from a checkpoint only by preset name. Pass --model PRESET (or your own "
                             f"package.module:function) to say which architecture its weights belong to")
    return name, overrides


def load_official(model: nn.Module, checkpoint: str | Path | dict[str, Any]) -> nn.Module:
    """Loads an official Dynamic Perceiver checkpoint into a dynexit model, strictly."""
    state = convert_state_dict(read_checkpoint(checkpoint), model)
    model.load_state_dict(state, strict=True)
    return model
