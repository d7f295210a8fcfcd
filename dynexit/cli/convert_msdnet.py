"""dynexit convert-msdnet: a reference MSDNet checkpoint -> a dynexit checkpoint."""
from __future__ import annotations

from pathlib import Path

from dynexit.cli.options import SET_RULE, HelpFormatter, add_set, model_set

EPILOG = """examples:
  dynexit convert-msdnet msdnet-step=4-block=5.pth.tar msdnet_imagenet.dynexit.pt --model msdnet_imagenet
  dynexit convert-msdnet cifar100_anytime.pth.tar cifar100_anytime.dynexit.pt --model msdnet_cifar_anytime
  dynexit convert-msdnet cifar10_batch.pth.tar cifar10.pt --model msdnet_cifar_batch --set model.num_classes=10

A reference checkpoint records no architecture: --model names the preset it was trained as and --set
overrides its knobs (model.num_classes, model.nBlocks, model.step, model.stepmode, model.base, model.nChannels,
model.growthRate, model.grFactor, ...).

""" + SET_RULE


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "convert-msdnet", help="convert a reference MSDNet checkpoint into a dynexit checkpoint",
        description="Load a checkpoint of the reference MSDNet implementation (its 'state_dict', keys prefixed "
                    "'module.') into dynexit's MSDNet, strictly (any missing, unexpected or wrongly shaped key "
                    "is an error), and write a dynexit checkpoint that `dynexit.models.checkpoint.load_model` reads.",
        epilog=EPILOG, formatter_class=HelpFormatter)
    p.add_argument("input", help="reference MSDNet checkpoint (.pth.tar)")
    p.add_argument("output", help="dynexit checkpoint to write")
    p.add_argument("--model", required=True, help="MSDNet preset the checkpoint was trained as (see 'dynexit models')")
    add_set(p, model_only=True)
    p.add_argument("--force", action="store_true", help="overwrite OUTPUT if it exists")
    p.set_defaults(func=run)


def run(args) -> int:
    from dynexit.models import MSDNET_PRESETS, MSDNet, load_msdnet, msdnet_config
    from dynexit.models.checkpoint import save_model

    if Path(args.output).exists() and not args.force:
        raise FileExistsError(f"{args.output} exists; pass --force to overwrite it")
    if args.model not in MSDNET_PRESETS:
        raise ValueError(f"--model {args.model!r} is not an MSDNet preset; valid: {', '.join(sorted(MSDNET_PRESETS))}")
    overrides = model_set(args.set, "convert-msdnet")
    model = MSDNet(msdnet_config(args.model, **overrides))
    load_msdnet(model, args.input)
    save_model(args.output, model, source=str(args.input))
    print(f"wrote {args.output}: {args.model}, {sum(p.numel() for p in model.parameters()):,} parameters")
    return 0
