"""The result tables of README.md, results/README.md and docs/**/*.md say what the committed reports under results/ say.

A table declares its source in an HTML comment right before it (invisible once rendered):

    <!-- table: results/quickstart/report/ablation.md -->

A Markdown source: every cell of the table equals the source table's cell in the same row (by its first
cell) and column (by its header), so a document may show a subset of the rows and columns but changes no
figure. A CSV source gives, in YAML after the path, which row of the CSV each table row shows (``key``: the
column that names rows; ``rows``: one name per table row) and which CSV columns each cell shows
(``columns``: one entry per table column, the same for every row; or ``cells``: one list per row), as
``column``, ``column / 1000`` (a scale), ``column ± other`` (mean ± deviation), or null (a label, not
checked). A number shown with d decimals must be the CSV value rounded to d decimals; where the CSV has no
value, the cell must be blank or a note in parentheses.
"""
import math
import re
from pathlib import Path

import pandas as pd
import pytest
import yaml

ROOT = Path(__file__).parent.parent
MARKER = re.compile(r"^<!--\s*table:\s*(.*?)-->[ \t]*\n((?:\|[^\n]*\n?)+)", re.S | re.M)
NUMBER = re.compile(r"^[+-]?\d+(?:\.\d+)?$")


def documents() -> list[Path]:
    return [ROOT / "README.md", ROOT / "results" / "README.md", *sorted((ROOT / "docs").glob("**/*.md"))]


def declared_tables() -> list[tuple[str, str, dict, list[list[str]]]]:
    """(where, source path, CSV spec, table rows as lists of cells) of every declared table."""
    found = []
    for doc in documents():
        text = doc.read_text()
        for match in MARKER.finditer(text):
            source, _, spec = match.group(1).strip().partition("\n")
            line = text[:match.start()].count("\n") + 1
            found.append((f"{doc.relative_to(ROOT)}:{line}", source.strip(), yaml.safe_load(spec) or {},
                          parse_table(match.group(2))))
    return found


def parse_table(text: str) -> list[list[str]]:
    """The rows of a Markdown table (the alignment row dropped), each a list of stripped cells."""
    rows = [[cell.strip() for cell in line.strip().strip("|").split("|")] for line in text.strip().splitlines()]
    return [row for row in rows if not all(re.fullmatch(r":?-+:?", cell) for cell in row)]


def first_table(path: Path) -> list[list[str]]:
    match = re.search(r"^(\|.*\n?)+", path.read_text(), re.M)
    assert match, f"{path} holds no Markdown table"
    return parse_table(match.group(0))


def plain(cell: str) -> str:
    return cell.replace("**", "").replace("`", "").strip()


def value(row: pd.Series, expression: str) -> float:
    name, _, scale = (part.strip() for part in expression.partition("/"))
    assert name in row.index, f"no column {name!r} in the source"
    return float(row[name]) / (float(scale) if scale else 1.0)


def check_csv_cell(cell: str, row: pd.Series, entry: str, where: str) -> None:
    expected = [value(row, part) for part in entry.split("±")]
    shown = plain(cell)
    if all(math.isnan(v) for v in expected):
        assert shown == "" or shown.startswith("("), f"{where}: {cell!r} where the source has no value ({entry})"
        return
    parts = [re.sub(r"\s*(k|M|%)$", "", p.strip()) for p in shown.split("±")]
    assert len(parts) == len(expected) and all(NUMBER.match(p) for p in parts), \
        f"{where}: {cell!r} is not {len(expected)} number(s) ({entry})"
    for text, v in zip(parts, expected):
        decimals = len(text.partition(".")[2])
        assert abs(float(text) - v) <= 0.5 * 10 ** -decimals * (1 + 1e-9), \
            f"{where}: {cell!r} shows {text}, the source has {v!r} ({entry})"


def check_markdown_source(table: list[list[str]], source: list[list[str]], where: str) -> None:
    header, *rows = table
    source_header, *source_rows = source
    by_label = {r[0]: r for r in source_rows}
    for column in header:
        assert column in source_header, f"{where}: column {column!r} is not in the source"
    for row in rows:
        assert row[0] in by_label, f"{where}: row {row[0]!r} is not in the source"
        for column, cell in zip(header, row):
            expected = by_label[row[0]][source_header.index(column)]
            assert cell == expected, \
                f"{where}: row {row[0]!r}, column {column!r}: {cell!r}, the source says {expected!r}"


def check_csv_source(table: list[list[str]], frame: pd.DataFrame, spec: dict, where: str) -> None:
    unknown = set(spec) - {"key", "rows", "columns", "cells"}
    assert not unknown and "key" in spec and "rows" in spec, f"{where}: the spec needs key and rows, got {spec}"
    rows = table[1:]
    assert len(rows) == len(spec["rows"]), f"{where}: {len(rows)} rows but {len(spec['rows'])} named in rows"
    cells = spec.get("cells") or [spec["columns"]] * len(rows)
    keyed = frame.set_index(frame[spec["key"]].astype(str))
    for row, name, entries in zip(rows, spec["rows"], cells):
        assert str(name) in keyed.index, f"{where}: no row {name!r} in column {spec['key']!r} of the source"
        assert len(entries) == len(row), f"{where}: row {row[0]!r} has {len(row)} cells, the spec {len(entries)}"
        for cell, entry in zip(row, entries):
            if entry is not None:
                check_csv_cell(cell, keyed.loc[str(name)], str(entry), f"{where}, row {row[0]!r}")


TABLES = declared_tables()


def test_the_readme_declares_the_sources_of_its_result_tables():
    assert any(where.startswith("README.md") for where, *_ in TABLES), \
        "README.md's result tables need a <!-- table: SOURCE --> line before them (see this module's docstring)"


@pytest.mark.parametrize("where,source,spec,table", TABLES, ids=[t[0] for t in TABLES])
def test_a_declared_table_says_what_its_source_says(where, source, spec, table):
    path = ROOT / source
    assert path.is_file(), f"{where}: the source {source} does not exist"
    if path.suffix == ".md":
        assert not spec, f"{where}: a Markdown source takes no spec"
        check_markdown_source(table, first_table(path), where)
    elif path.suffix == ".csv":
        check_csv_source(table, pd.read_csv(path), spec, where)
    else:
        raise AssertionError(f"{where}: a source must be a .md or .csv file, got {source}")


def test_the_check_notices_a_changed_figure():
    """The checks themselves: one changed digit, a missing column or row, a value shown where none exists."""
    source = parse_table("| Configuration | acc |\n|---|---|\n| full | 77.41 ± 0.65 |\n| static | |\n")
    check_markdown_source(parse_table("| Configuration | acc |\n|---|---|\n| full | 77.41 ± 0.65 |\n"), source, "t")
    for bad in ("| Configuration | acc |\n|---|---|\n| full | 77.42 ± 0.65 |\n",
                "| Configuration | AUC |\n|---|---|\n| full | 77.41 ± 0.65 |\n",
                "| Configuration | acc |\n|---|---|\n| half | 77.41 ± 0.65 |\n"):
        with pytest.raises(AssertionError):
            check_markdown_source(parse_table(bad), source, "t")
    frame = pd.DataFrame({"config": ["a", "b"], "params": [348288.0, 1.0], "acc": [94.18, float("nan")],
                          "std": [0.004, float("nan")]})
    spec = {"key": "config", "rows": ["a", "b"], "columns": [None, "params / 1000", "acc ± std"]}
    check_csv_source(parse_table("| m | p | acc |\n|---|---|---|\n| A | 348 k | **94.18** ± 0.00 |\n"
                                 "| B | 0.001 k | (none) |\n"), frame, spec, "t")
    for bad in ("| A | 349 k | 94.18 ± 0.00 |", "| A | 348 k | 94.19 ± 0.00 |", "| A | 348 k | 94.18 |"):
        with pytest.raises(AssertionError):
            check_csv_source(parse_table(f"| m | p | acc |\n|---|---|---|\n{bad}\n| B | 0.001 k | |\n"),
                             frame, spec, "t")
    with pytest.raises(AssertionError):
        check_csv_source(parse_table("| m | p | acc |\n|---|---|---|\n| A | 348 k | 94.18 ± 0.00 |\n"
                                     "| B | 0.001 k | 3.0 |\n"), frame, spec, "t")
