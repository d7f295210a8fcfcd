"""The ``dynexit`` command.

Each subcommand lives in its own module of this package and provides ``add_parser(subparsers)``,
which registers the subcommand and sets ``func`` (a function taking the parsed arguments); options that
several commands share are declared once in :mod:`dynexit.cli.options`. Command modules import torch
and the rest of the package only when their command runs, so that ``--help`` answers at once. Errors
are one clear line unless ``--debug`` is given.
"""
from __future__ import annotations

import argparse
import difflib
import logging
import re
import sys

from dynexit.cli import (
    bench,
    compare,
    convert,
    convert_from,
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
COMMANDS = (models, costs, bench, convert_from, convert, convert_msdnet, train, run, status, curve, search, report,
            compare, migrate_ids)

EPILOG = f"""examples:
  dynexit models
  dynexit costs reg800m_perceiver_t128 --out costs.csv
  dynexit run experiments/quickstart.yaml
  dynexit report results/quickstart

{SET_RULE}
run 'dynexit COMMAND --help' for a command's options and examples."""


class Parser(argparse.ArgumentParser):
    """An argument parser that names the closest command or option on a misspelling ("did you mean"), and
    takes no abbreviation of an option (``--device`` is not silently ``--devices``). Subcommand parsers are of
    this class too (argparse makes them with the parser's own class)."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def options(self) -> list[str]:
        """The options this parser shows in its help."""
        return [o for a in self._actions if a.help != argparse.SUPPRESS for o in a.option_strings]

    def error(self, message: str):
        choice = re.search(r"invalid choice: '([^']*)' \(choose from (.*)\)", message)
        if choice:
            known = re.findall(r"'([^']*)'", choice.group(2)) or [c.strip() for c in choice.group(2).split(",")]
            message += did_you_mean(choice.group(1), known)
        unknown = re.match(r"unrecognized arguments: (.*)", message)
        if unknown:
            for word in unknown.group(1).split():
                if word.startswith("-"):
                    message += did_you_mean(word.split("=", 1)[0], self.options())
        super().error(message)


def did_you_mean(word: str, known: list[str]) -> str:
    close = difflib.get_close_matches(word, known, n=3, cutoff=0.75)
    return f"; did you mean {' or '.join(repr(c) for c in close)}?" if close else ""


def add_global_options(parser: argparse.ArgumentParser, after_command: bool = False) -> None:
    """--debug and -v: before the command (``dynexit --debug run ...``) or after it (``dynexit run ... --debug``).
    After the command they default to nothing (SUPPRESS), so that they do not undo the same option given before."""
    default = {"default": argparse.SUPPRESS} if after_command else {}
    parser.add_argument("--debug", action="store_true", help="show full tracebacks on errors", **default)
    parser.add_argument("-v", "--verbose", action="store_true", help="log at DEBUG level", **default)


def command_parsers(parser: argparse.ArgumentParser, words: tuple[str, ...] = ()):
    """Every subcommand's parser below ``parser``, with its command words."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield words + (name,), sub
                yield from command_parsers(sub, words + (name,))


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="dynexit",
        description="Early-exit image classification with Dynamic Perceiver: models, costs, "
        "thresholds, training, experiment grids and reports.",
        epilog=EPILOG,
        formatter_class=HelpFormatter,
    )
    add_global_options(parser)
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for command in COMMANDS:
        command.add_parser(subparsers)
    for _, sub in command_parsers(parser):
        add_global_options(sub, after_command=True)
    return parser


def chosen_parser(parser: argparse.ArgumentParser, args: argparse.Namespace) -> argparse.ArgumentParser:
    """The parser of the (sub)command ``args`` ran, so that an error shows that command's usage."""
    chosen = parser
    for words, sub in command_parsers(parser):
        if words[0] == args.command and (len(words) == 1 or words[1:] == (getattr(args, "search_command", None),)):
            chosen = sub
    return chosen


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    if unknown:  # reported by the command's own parser, with its usage and the closest option
        chosen_parser(parser, args).error(f"unrecognized arguments: {' '.join(unknown)}")
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
