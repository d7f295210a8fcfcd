"""dynexit convert --from official|msdnet: a checkpoint of another code base -> a dynexit checkpoint (one
command for every converter; convert-official and convert-msdnet are the same, named by their source)."""
from __future__ import annotations

from dynexit.cli.options import SET_RULE, HelpFormatter, add_set

# --from: the code base a checkpoint comes from (its own names, not the protocol grids of the same names)
SOURCES = {"official": "the official Dynamic Perceiver release", "msdnet": "the reference MSDNet code"}

EPILOG = """examples:
  dynexit convert --from official reg800m_t128.pth reg800m_t128.converted.pt
  dynexit convert --from msdnet cifar100_anytime.pth.tar cifar100.converted.pt --model msdnet_cifar_anytime

--from official: an official Dynamic Perceiver checkpoint; its architecture is read from its training arguments
(by preset name only) unless --model names it. --from msdnet: a checkpoint of the reference MSDNet code, which
records no architecture: --model names the MSDNet preset it was trained as. --set overrides the model's settings.

""" + SET_RULE


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "convert", help="convert an official Dynamic Perceiver or reference MSDNet checkpoint into a dynexit one",
        description="Map every key of a checkpoint of another code base onto dynexit's modules (strictly: any "
                    "missing, unexpected or wrongly shaped key is an error) and write a dynexit checkpoint that "
                    "`dynexit.models.checkpoint.load_model` reads.",
        epilog=EPILOG, formatter_class=HelpFormatter)
    p.add_argument("--from", dest="source", required=True, choices=list(SOURCES),
                   help="the code base the checkpoint comes from")
    p.add_argument("input", help="the checkpoint to convert (.pth, .pth.tar)")
    p.add_argument("output", help="dynexit checkpoint to write")
    p.add_argument("--model", help="preset of the checkpoint's architecture (official: default from its arguments; "
                                   "msdnet: required)")
    add_set(p, model_only=True)
    p.add_argument("--ema", action="store_true", help="convert the EMA weights (model_ema; official only)")
    p.add_argument("--force", action="store_true", help="overwrite OUTPUT if it exists")
    p.set_defaults(func=run)


def run(args) -> int:
    from dynexit.cli import convert, convert_msdnet

    if args.source == "official":
        return convert.run(args)
    if args.ema:
        raise ValueError("--ema: a reference MSDNet checkpoint holds one set of weights")
    if not args.model:
        raise ValueError("--from msdnet needs --model: the MSDNet preset the checkpoint was trained as")
    return convert_msdnet.run(args)
