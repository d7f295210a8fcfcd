"""MkDocs hooks (mkdocs.yml ``hooks``): the generated reference pages, and the committed reports' figures.

A page holding ``<!-- generated: spec -->`` or ``<!-- generated: cli -->`` is replaced by the page of
``scripts/docs_reference.py`` when the site is built (its committed text only says so, for readers of the
file), so the spec and command-line references always say what the code says. The figures of
``results/*/report/`` are added to the site under ``results/``, so that pages show them
(``![...](results/compare/report/budgeted_curves.png)`` from a top-level page) without copying them into
``docs/``.
"""
from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

import docs_reference  # noqa: E402

GENERATED = {"<!-- generated: spec -->": docs_reference.spec_reference,
             "<!-- generated: cli -->": docs_reference.cli_reference}


def on_page_markdown(markdown, page, config, files):
    for marker, make in GENERATED.items():
        if marker in markdown:
            return make()
    return markdown


def on_files(files, config):
    from mkdocs.structure.files import File

    for path in sorted(ROOT.glob("results/*/report/*.png")):
        files.append(File(str(path.relative_to(ROOT)), str(ROOT), config["site_dir"], config["use_directory_urls"]))
    return files
