"""dynexit convert-official: an official Dynamic Perceiver checkpoint -> a dynexit checkpoint."""
from __future__ import annotations

from pathlib import Path

from dynexit.cli.options import SET_RULE, HelpFormatter, add_set, model_set

EPILOG = """examples:
  dynexit convert-official reg800m_t128.pth reg800m_t128.dynexit.pt
  dynexit convert-official ckpt.pth out.pt --model resnet50_0375_perceiver_t128 --set model.isc=false

The architecture is read from the checkpoint's training arguments when it has them; --model and --set
(model.x2z, model.z2x, model.dwc, model.isc, model.last_ca, model.depth_factor, model.num_classes, ...)
override it.

""" + SET_RULE


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "convert-official", help="convert an official checkpoint into a dynexit checkpoint",
        description="Map every key of an official Dynamic Perceiver checkpoint onto dynexit's modules "
                    "(strictly: any missing, unexpected or wrongly shaped key is an error) and write a "
                    "dynexit checkpoint that `dynexit.models.checkpoint.load_model` reads.",
        epilog=EPILOG, formatter_class=HelpFormatter)
    p.add_argument("input", help="official checkpoint (.pth)")
    p.add_argument("output", help="dynexit checkpoint to write")
    p.add_argument("--model", help="preset name (default: from the checkpoint's arguments)")
    add_set(p, model_only=True)
    p.add_argument("--ema", action="store_true", help="convert the EMA weights (model_ema)")
    p.add_argument("--force", action="store_true", help="overwrite OUTPUT if it exists")
    p.set_defaults(func=run)


def run(args) -> int:
    from dynexit.models import create_model
    from dynexit.models.checkpoint import save_model
    from dynexit.models.official import load_official, official_architecture, open_checkpoint, read_checkpoint

    if Path(args.output).exists() and not args.force:
        raise FileExistsError(f"{args.output} exists; pass --force to overwrite it")
    checkpoint = open_checkpoint(args.input)
    weights = checkpoint
    if args.ema:
        if "model_ema" not in checkpoint:
            raise ValueError(f"{args.input} holds no model_ema weights")
        weights = checkpoint["model_ema"]
    weights = read_checkpoint(weights, where=str(args.input))  # refuses dynexit state dicts, naming the file
    name, overrides = official_architecture(checkpoint, str(args.input), model=args.model)
    if name is None:
        raise ValueError(f"{args.input} records no model name; pass --model PRESET")
    overrides.update(model_set(args.set, "convert-official"))
    model = create_model(name, **overrides)
    load_official(model, weights)
    save_model(args.output, model, source=str(args.input))
    print(f"wrote {args.output}: {name}, {sum(p.numel() for p in model.parameters()):,} parameters")
    return 0
