"""dynexit costs: per-exit cost (fvcore GMACs) and parameters of a model preset."""
from __future__ import annotations

from dynexit.cli.options import (
    MODEL_RULE,
    SET_RULE,
    HelpFormatter,
    add_model,
    add_op_handles,
    add_out,
    build_model,
    op_handles,
)

EPILOG = """examples:
  dynexit costs reg800m_perceiver_t128 --out costs.csv
  dynexit costs resnet50_0375_perceiver_t128 --input-size 160 --num-classes 100
  dynexit costs tiny_perceiver_t16 --input-size 28 --set model.x2z=false --set model.depth_factor=[1,1,1,1]
  dynexit costs reg800m_perceiver_t128 --set model.static=true      # the backbone alone, one exit
  dynexit costs branchy_resnet_tiny --input-size 28 --set model.exits_after=[2,3]   # exits on the backbone
  dynexit costs mypkg.models:build --op-handle aten::cumsum=zero       # an op fvcore has no handle for

Costs are per image and cumulative in exit order: exit k counts every segment up to it, including the
earlier exit heads that ran and were rejected. GMACs: fvcore counts one multiply-add as one FLOP.
Parameters of exit k: every parameter used up to exit k. The CSV has one row per exit in exit order
(columns exit, index, gmacs, segment_gmacs, cost_share, params, input_size, unit); 'dynexit curve
--costs' reads it.

""" + SET_RULE


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "costs", help="per-exit cost (GMACs, fvcore) and parameters of a model",
        description="Count the multiply-adds of reaching each exit with fvcore, on the same segments the "
                    "model runs, and the parameters used up to each exit, with a breakdown by component; "
                    f"{MODEL_RULE}.",
        epilog=EPILOG, formatter_class=HelpFormatter)
    add_model(p)
    add_op_handles(p)
    add_out(p, "COSTS.csv", "write the per-exit table to this CSV file", old=("--csv",))
    p.set_defaults(func=run)


def run(args) -> int:
    from dynexit.costs import count_costs, format_costs

    model = build_model(args, "costs")
    costs = count_costs(model, handles=op_handles(args.op_handles))
    print(format_costs(costs, args.name))
    if args.out:
        costs.to_csv(args.out)
        print(f"\nwrote {args.out}")
    return 0
