"""dynexit costs: per-exit cost (fvcore GMACs) and parameters of a model preset."""
from __future__ import annotations

from typing import Any

from omegaconf import OmegaConf

from dynexit.cli import HelpFormatter

EPILOG = """examples:
  dynexit costs reg800m_perceiver_t128 --csv costs.csv
  dynexit costs resnet50_0375_perceiver_t128 --input-size 160 --num-classes 100
  dynexit costs reg800m_perceiver_t128 --set x2z=false --set depth_factor=[1,1,1,1]
  dynexit costs reg800m_perceiver_t128 --set static=true      # the backbone alone, one exit
  dynexit costs branchy_resnet_tiny --input-size 28 --set exit_stages=[2,3]   # exits on the backbone

Costs are per image and cumulative in exit order: exit k counts every segment up to it, including the
earlier exit heads that ran and were rejected. GMACs: fvcore counts one multiply-add as one FLOP.
Parameters of exit k: every parameter used up to exit k. The CSV has one row per exit in exit order
(columns exit, index, gmacs, segment_gmacs, cost_share, params, input_size, unit); 'dynexit curve
--costs' reads it."""


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "costs", help="per-exit cost (GMACs, fvcore) and parameters of a model",
        description="Count the multiply-adds of reaching each exit with fvcore, on the same segments the "
                    "model runs, and the parameters used up to each exit, with a breakdown by component.",
        epilog=EPILOG, formatter_class=HelpFormatter)
    add_model_arguments(p)
    p.add_argument("--csv", metavar="PATH", help="write the per-exit table to this CSV file")
    p.set_defaults(func=run)


def add_model_arguments(p) -> None:
    """NAME, --input-size, --num-classes and --set: the model options shared with 'dynexit bench'."""
    p.add_argument("name", metavar="NAME", help="model preset (see 'dynexit models')")
    p.add_argument("--input-size", type=int, metavar="N", help="image size in pixels (default: the preset's)")
    p.add_argument("--num-classes", type=int, metavar="C", help="number of classes (default: the preset's)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="model override, value parsed as YAML (e.g. x2z=false, depth_factor=[1,1,1,1]); repeatable")


def model_overrides(args) -> dict[str, Any]:
    """The model overrides given by --set, --input-size and --num-classes."""
    from dynexit.config import parse_set

    overrides = OmegaConf.to_container(parse_set(args.set), resolve=True)
    nested = [k for k, v in overrides.items() if isinstance(v, dict)]
    if nested:
        raise ValueError(f"--set {nested[0]}.…: model overrides are plain keys (x2z=false), not dotted ones")
    for key, value in (("input_size", args.input_size), ("num_classes", args.num_classes)):
        if value is not None:
            overrides[key] = value
    return overrides


def build_model(args):
    from dynexit.models import create_model

    return create_model(args.name, **model_overrides(args))


def run(args) -> int:
    from dynexit.costs import count_costs, format_costs

    model = build_model(args)
    costs = count_costs(model)
    print(format_costs(costs, args.name))
    if args.csv:
        costs.to_csv(args.csv)
        print(f"\nwrote {args.csv}")
    return 0
