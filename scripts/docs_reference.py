"""The generated pages of the documentation: the spec reference (every field of the configuration dataclasses,
with its type, default and meaning) and the command-line reference (every command's help, from the parser).

A field's meaning is the comment on its line in the dataclass's source, else the comment lines right above
it; every field must have one (tests/test_docs.py checks). ``scripts/mkdocs_hooks.py`` puts both pages into
the site when it is built, so they cannot drift from the code; ``python scripts/docs_reference.py spec|cli``
prints them.
"""
from __future__ import annotations

import argparse
import dataclasses
import inspect
import io
import os
import sys
import textwrap
import tokenize
import types
import typing
from pathlib import Path
from typing import Any

# Keys of the model section that are not a Dyn-Perceiver setting (dynexit/config.py, the comment above
# ModelConfig, says the same): they are made by make_dataclass, so they have no source line of their own.
MODEL_KEYS = {
    "name": "a preset of any family (Dyn-Perceiver, MSDNet, branchy; `dynexit models` lists them); unused "
            "with `factory`",
    "factory": "`package.module:function` building your own model, called with the section's other keys as "
               "keyword arguments",
    "costs": "per-exit GMACs per image, increasing, for a model without segments; null: counted by fvcore",
    "options": "any other key of the section (another family's setting, a factory's argument) is gathered here "
               "and checked by the model's own configuration",
    "op_handles": "how fvcore counts an op it has no handle for: `{aten::op: zero}` or "
                  "`{aten::op: package.module:function}`",
}


def field_comments(cls: type) -> dict[str, str]:
    """The comment of each field of the dataclass ``cls`` in its source (its line's, else the block above)."""
    source = textwrap.dedent(inspect.getsource(cls))
    lines = source.splitlines()
    comments: dict[int, str] = {}
    for token in tokenize.generate_tokens(io.StringIO(source).readline):
        if token.type == tokenize.COMMENT:
            comments[token.start[0]] = token.string.lstrip("#").strip()
    found = {}
    for number, line in enumerate(lines, start=1):
        stripped = line.strip()
        name = stripped.split(":", 1)[0]
        if not (line.startswith("    ") and not line.startswith("     ") and ":" in stripped
                and name.isidentifier() and name in {f.name for f in dataclasses.fields(cls)}):
            continue
        if number in comments and not stripped.startswith("#"):
            found[name] = comments[number]
            continue
        above, k = [], number - 1
        while k in comments and lines[k - 1].strip().startswith("#"):
            above.insert(0, comments[k])
            k -= 1
        if above:
            found[name] = " ".join(above)
    return found


def type_name(hint: Any) -> str:
    """``int``, ``list[float]``, ``str or null``, ``any``."""
    if hint is Any:
        return "any"
    args = typing.get_args(hint)
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        named = [type_name(a) for a in args if a is not type(None)]
        return " or ".join(named) + (" or null" if type(None) in args else "")
    if args:
        return f"{typing.get_origin(hint).__name__}[{', '.join(type_name(a) for a in args)}]"
    return getattr(hint, "__name__", str(hint))


def default_of(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return None


def shown(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    return str(value)


def sections() -> list[tuple[str, type, dict[str, str], str]]:
    """(section, dataclass, meanings, note) of every section of a run configuration and of a spec."""
    from dynexit.config import DataConfig, EvalConfig, ModelConfig, RunConfig, TrainConfig
    from dynexit.models.presets import PerceiverConfig
    from dynexit.runs.spec import ExecutorConfig

    model = {**field_comments(PerceiverConfig), **MODEL_KEYS}
    return [
        ("model", ModelConfig, model,
         "A preset `name` with overrides (null: the preset's value), or a `factory`. The fields below are "
         "Dyn-Perceiver's; MSDNet and branchy take their own settings (see the models page)."),
        ("data", DataConfig, field_comments(DataConfig), ""),
        ("train", TrainConfig, field_comments(TrainConfig), ""),
        ("eval", EvalConfig, field_comments(EvalConfig),
         "Not part of a run's id: changing it re-evaluates finished runs without training them."),
        ("seed", RunConfig, field_comments(RunConfig), ""),
        ("executor", ExecutorConfig, field_comments(ExecutorConfig),
         "A key of the spec, beside `base`: how `dynexit run` runs the runs."),
    ]


def spec_reference() -> str:
    """The spec reference page, in Markdown."""
    out = ["# Spec reference", "",
           "Every field of a run configuration (the `base` of a spec, `dynexit train`'s file, `--set KEY=VALUE`) "
           "and of a spec's `executor`, generated from the configuration dataclasses "
           "(`dynexit/config.py`, `dynexit/runs/spec.py`).", ""]
    for section, cls, meanings, note in sections():
        hints = typing.get_type_hints(cls)
        fields = [f for f in dataclasses.fields(cls) if section != "seed" or f.name == "seed"]
        out += [f"## `{section}`", ""] + ([note, ""] if note else [])
        out += ["| key | type | default | meaning |", "|---|---|---|---|"]
        for f in fields:
            key = f.name if section in ("seed", "executor") and f.name == section else f"{section}.{f.name}"
            if section == "executor":
                key = f"executor.{f.name}"
            meaning = meanings.get(f.name, "").replace("|", "\\|")
            out.append(f"| `{key}` | `{type_name(hints[f.name])}` | `{shown(default_of(f))}` | {meaning} |")
        out.append("")
    return "\n".join(out)


def subcommand_parsers(parser: argparse.ArgumentParser, words: tuple[str, ...] = ()):
    """Every (sub)command's parser with its command words; an alias (a second name of one parser) once."""
    yield words, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            seen = set()
            for name, sub in action.choices.items():
                if id(sub) not in seen:
                    seen.add(id(sub))
                    yield from subcommand_parsers(sub, words + (name,))


def cli_reference() -> str:
    """The command-line reference page: every command's ``--help``."""
    from dynexit.cli import build_parser

    out = ["# Command-line reference", "",
           "Every command's `--help`, generated from the parser (`dynexit/cli/`).", ""]
    columns = os.environ.get("COLUMNS")
    os.environ["COLUMNS"] = "100"  # argparse wraps to the terminal's width: the page must not depend on it
    try:
        for words, parser in subcommand_parsers(build_parser()):
            title = " ".join(("dynexit", *words))
            out += [f"## `{title}`", "", "```text", parser.format_help().rstrip(), "```", ""]
    finally:
        if columns is None:
            del os.environ["COLUMNS"]
        else:
            os.environ["COLUMNS"] = columns
    return "\n".join(out)


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    page = sys.argv[1] if len(sys.argv) > 1 else "spec"
    print(spec_reference() if page == "spec" else cli_reference())
