"""dynexit models: list the presets."""
from __future__ import annotations

from dynexit.cli.options import HelpFormatter


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "models", help="list the model presets",
        description="List every model preset with its backbone (or architecture), latent tokens (Dyn-Perceiver) "
                    "and defaults.",
        epilog="example:\n  dynexit models", formatter_class=HelpFormatter)
    p.set_defaults(func=run)


def run(args) -> int:
    from dynexit.models import BACKBONES, BRANCHY_PRESETS, MSDNET_PRESETS, PRESETS, list_models, msdnet_config

    print(f"{'preset':<34} {'backbone':<24} {'tokens':>6} {'classes':>7} {'size':>5}")
    for name in list_models():
        if name in MSDNET_PRESETS:
            cfg = msdnet_config(name)
            print(f"{name:<34} {f'MSDNet, {cfg.nBlocks} blocks':<24} {'-':>6} {cfg.num_classes:>7} {cfg.input_size:>5}")
            continue
        preset = PRESETS[name] if name in PRESETS else BRANCHY_PRESETS[name]
        print(f"{name:<34} {preset['backbone']:<24} {preset.get('num_latents', '-'):>6} "
              f"{preset.get('num_classes', 1000):>7} {preset.get('input_size', 224):>5}")
    print("\nbackbones:")
    for name, spec in BACKBONES.items():
        print(f"  {name:<24} {spec.description}")
    return 0
