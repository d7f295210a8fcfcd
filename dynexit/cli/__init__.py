"""The ``dynexit`` command.

Each subcommand lives in its own module of this package and provides ``add_parser(subparsers)``,
which registers the subcommand and sets ``func`` (a function taking the parsed arguments); options that
several commands share are declared once in :mod:`dynexit.cli.options`. Command modules import torch
and the rest of the package only when their command runs, so that ``--help`` answers at once. Errors
are one clear line unless ``--debug`` is given.
"""
from __future__ import annotations

import argparse
import logging
import sys

from dynexit.cli import (
    bench,
    compare,
    convert,
    convert_msdnet,
    costs,
    curve,
    migrate_ids,
    models,
    report,
    run,
    search,
    status,
    train,
)
from dynexit.cli.options import SET_RULE, HelpFormatter

# Subcommand modules, in the order ``dynexit --help`` lists them.
COMMANDS = (models, costs, bench, convert, convert_msdnet, train, run, status, curve, search, report, compare,
            migrate_ids)

EPILOG = f"""examples:
  dynexit models
  dynexit costs reg800m_perceiver_t128 --csv costs.csv
  dynexit run experiments/quickstart.yaml
  dynexit report results/quickstart

{SET_RULE}
run 'dynexit COMMAND --help' for a command's options and examples."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dynexit",
        description="Early-exit image classification with Dynamic Perceiver: models, costs, "
        "thresholds, training, experiment grids and reports.",
        epilog=EPILOG,
        formatter_class=HelpFormatter,
    )
    parser.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    parser.add_argument("-v", "--verbose", action="store_true", help="log at DEBUG level")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for command in COMMANDS:
        command.add_parser(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(levelname)s %(name)s: %(message)s",
    )
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        result = args.func(args)
    except KeyboardInterrupt:
        print("dynexit: interrupted", file=sys.stderr)
        return 130
    except Exception as err:  # noqa: BLE001 - one clear line for users, traceback with --debug
        if args.debug:
            raise
        print(f"dynexit {args.command}: error: {err}", file=sys.stderr)
        return 1
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
