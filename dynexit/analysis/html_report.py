"""``report.html``: an experiment's report as one self-contained page (figures embedded as PNG data URIs,
inline CSS, no script, no reference outside the file), readable in any browser without a network.

The page holds the spec (``experiment.yaml``), the ablation table, every figure with a caption, one row per
run (accuracies, costs, training time, the devices it ran on) and the versions of the packages that wrote
it. Nothing on it depends on the clock: the same results and packages give the same bytes.
"""
from __future__ import annotations

import base64
import io
import json
import platform
from collections.abc import Sequence
from dataclasses import dataclass
from html import escape
from importlib import metadata

import numpy as np
import pandas as pd
import yaml

from dynexit.analysis.results import Results

REPORT_FILE = "report.html"
THIN = "\u2009"  # thin space
PACKAGES = ("dynexit", "torch", "numpy", "pandas", "matplotlib", "optuna")

_CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:0;background:#f6f7f9;color:#1d232b;
line-height:1.45}
main{max-width:1280px;margin:0 auto;padding:1rem 1.2rem 3rem;box-sizing:border-box;background:#fff;
box-shadow:0 0 8px #0001}
h1{font-size:1.7rem;margin:.4rem 0 .2rem}h2{font-size:1.25rem;margin-top:2.2rem;border-bottom:2px solid #dde3ea;
padding-bottom:.2rem}h3{font-size:1.05rem;margin:1.4rem 0 .4rem}
p.lead{color:#4a5562;margin-top:0}nav{font-size:.92rem;margin:.6rem 0 1rem}nav a{margin-right:1rem;color:#1f5fbf}
.scroll{overflow-x:auto;margin:.5rem 0}
table{border-collapse:collapse;font-size:.74rem;font-variant-numeric:tabular-nums}
th,td{padding:.24rem .22rem;border-bottom:1px solid #e3e7ec;text-align:right;white-space:nowrap}
th{background:#eef2f6;white-space:normal;vertical-align:bottom;}td:first-child,th:first-child{text-align:left}
tr:nth-child(even) td{background:#fafbfc}
figure{margin:1rem 0 1.8rem}figure img{max-width:100%;height:auto;border:1px solid #e3e7ec}
figcaption{font-size:.9rem;color:#4a5562;margin-top:.3rem}
pre{background:#f3f5f8;padding:.8rem;overflow-x:auto;font-size:.82rem;border-radius:4px}
ol.notes{font-size:.85rem;color:#4a5562}
"""


@dataclass
class PageFigure:
    """A figure on the page: section title, caption and the PNG bytes."""

    title: str
    caption: str
    png: bytes


@dataclass
class PageTable:
    """A table on the page after the ablation table: section title, anchor, display strings and notes."""

    title: str
    anchor: str
    frame: pd.DataFrame
    notes: Sequence[str] = ()


def figure_png(fig, dpi: int = 110) -> bytes:
    """``fig`` as PNG bytes, byte-stable (matplotlib writes no date into a PNG)."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi, bbox_inches="tight", metadata={})
    return buffer.getvalue()


def _table(frame: pd.DataFrame) -> str:
    head = "".join(f"<th>{escape(str(c))}</th>" for c in frame.columns)
    body = "\n".join("<tr>" + "".join(f"<td>{escape(_cell(v))}</td>" for v in row) + "</tr>"
                     for row in frame.itertuples(index=False))
    return f'<div class="scroll"><table>\n<thead><tr>{head}</tr></thead>\n<tbody>\n{body}\n</tbody>\n</table></div>'


def _cell(value) -> str:
    if isinstance(value, str):
        return value.replace(" ± ", THIN + "±" + THIN)  # narrower columns: the table fits 1280 px
    if value is None or (isinstance(value, float) and not np.isfinite(value)):
        return ""
    if isinstance(value, (float, np.floating)):
        return f"{value:.4g}" if abs(value) < 1 else f"{value:.2f}"
    return str(value)


def run_details(results: Results) -> pd.DataFrame:
    """One row per run, in display order: id, variant, configuration, seed, per-exit accuracy and cost,
    final accuracy, parameters, training time and the devices its status file recorded."""
    runs = results.runs
    out = pd.DataFrame({"run id": runs["run_id"], "variant": runs["variant"], "configuration": runs["config"],
                        "seed": runs["seed"]})
    for name in results.exit_names:
        if f"acc_{name}" in runs:
            out[f"{name} acc. (%)"] = runs[f"acc_{name}"]
            out[f"{name} GMACs"] = runs[f"gmacs_{name}"]
    for column, label in (("acc_final", "final acc. (%)"), ("params", "params"),
                          ("train_seconds", "training time (s)")):
        if column in runs:
            out[label] = runs[column]
    out["devices"] = [_devices(results, rid) for rid in runs["run_id"]]
    return out.reset_index(drop=True)


def _devices(results: Results, run_id: str) -> str:
    path = results.run_folder(run_id) / "status.json"
    try:
        status = json.loads(path.read_text())
    except (OSError, ValueError):
        return ""
    devices = ", ".join(str(d) for d in status.get("devices") or [])
    threads = status.get("threads")
    if devices and threads:
        return f"{devices} ({threads} thread{'' if threads == 1 else 's'})"
    return devices


def environment() -> pd.DataFrame:
    """The versions of Python and the packages writing the report."""
    rows = [("python", platform.python_version())]
    for name in PACKAGES:
        try:
            rows.append((name, metadata.version(name)))
        except metadata.PackageNotFoundError:
            rows.append((name, "not installed"))
    return pd.DataFrame(rows, columns=["package", "version"])


def _spec_text(results: Results) -> str:
    path = results.path / "experiment.yaml"
    if path.is_file():
        return path.read_text(encoding="utf-8")
    return yaml.safe_dump(results.spec, sort_keys=False) if results.spec else "(no experiment.yaml)"


def render_html(results: Results, ablation: pd.DataFrame, notes: Sequence[str],
                figures: Sequence[PageFigure], tables: Sequence[PageTable] = (), evaluation: str = "") -> str:
    """The page's HTML: ``ablation`` are the display strings of the ablation table (with ``notes``), then
    ``tables``, then ``figures`` in the order shown."""
    name = escape(results.name)
    description = escape(str(results.spec.get("description") or ""))
    seeds = sorted(set(results.runs["seed"].tolist()))
    summary = (f"{len(results.runs)} runs: {len(results.configs)} configurations × {len(seeds)} seeds "
               f"({', '.join(str(s) for s in seeds)}); every number of a configuration is a mean ± std over its seeds.")
    parts = [
        "<!DOCTYPE html>", '<html lang="en">', "<head>", '<meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{name}: dynexit report</title>", f"<style>{_CSS}</style>", "</head>", "<body>", "<main>",
        f"<h1>{name}</h1>",
        f'<p class="lead">{description}</p>' if description else "",
        f"<p>{escape(summary)}</p>",
        f"<p>{escape(evaluation)}</p>" if evaluation else "",
        '<nav><a href="#ablation">Ablation table</a>'
        + "".join(f'<a href="#{escape(t.anchor)}">{escape(t.title.split(":")[0])}</a>' for t in tables)
        + '<a href="#figures">Figures</a><a href="#runs">Runs</a>'
        '<a href="#spec">Spec</a><a href="#environment">Environment</a></nav>',
        '<h2 id="ablation">Ablation table</h2>', _table(ablation),
    ]
    if notes:
        parts.append('<ol class="notes">' + "".join(f"<li>{escape(n)}</li>" for n in notes) + "</ol>")
    for table in tables:
        parts += [f'<h2 id="{escape(table.anchor)}">{escape(table.title)}</h2>', _table(table.frame)]
        if table.notes:
            parts.append('<ol class="notes">' + "".join(f"<li>{escape(n)}</li>" for n in table.notes) + "</ol>")
    parts.append('<h2 id="figures">Figures</h2>')
    for k, figure in enumerate(figures):
        data = base64.b64encode(figure.png).decode("ascii")
        parts += [f'<h3 id="figure-{k + 1}">{escape(figure.title)}</h3>',
                  f'<figure><img src="data:image/png;base64,{data}" alt="{escape(figure.title)}">'
                  f"<figcaption>{escape(figure.caption)}</figcaption></figure>"]
    parts += ['<h2 id="runs">Runs</h2>', _table(run_details(results)),
              '<h2 id="spec">Spec (experiment.yaml)</h2>', f"<pre>{escape(_spec_text(results))}</pre>",
              '<h2 id="environment">Environment</h2>',
              "<p>Packages that wrote this report; the devices each run trained on are in the runs table.</p>",
              _table(environment()), "</main>", "</body>", "</html>", ""]
    return "\n".join(p for p in parts if p)
