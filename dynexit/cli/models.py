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
    from dynexit.models import BACKBONES, FAMILIES, list_models

    print(f"{'preset':<34} {'family':<10} {'backbone':<24} {'tokens':>6} {'classes':>7} {'size':>5}")
    families = {p: family for family in FAMILIES.values() for p in family.presets}
    for name in list_models():
        family = families[name]
        cfg = family.config(name)
        backbone = getattr(cfg, "backbone", None) or (f"{cfg.nBlocks} blocks" if hasattr(cfg, "nBlocks") else "-")
        print(f"{name:<34} {family.name:<10} {backbone:<24} {getattr(cfg, 'num_latents', '-'):>6} "
              f"{getattr(cfg, 'num_classes', '-'):>7} {getattr(cfg, 'input_size', '-'):>5}")
    print("\nfamilies:")
    for family in FAMILIES.values():
        print(f"  {family.name:<24} {family.description}")
    print("\nbackbones:")
    for name, spec in BACKBONES.items():
        print(f"  {name:<24} {spec.description}")
    print(f"  {'timm:NAME':<24} any timm CNN, cut into stages where its map shrinks (branchy models)")
    print(f"  {'torchvision:NAME':<24} any torchvision CNN, likewise")
    return 0
