"""An experiment's report: every figure and table written into one folder."""
from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import pandas as pd

from dynexit.analysis.behaviour import confidence_histograms, exit_accuracy, exit_shares
from dynexit.analysis.budgets import budget_notes, budget_table, budgets_latex, budgets_markdown, format_budgets
from dynexit.analysis.evaluation import describe_evaluation
from dynexit.analysis.figures import (
    plot_budgeted_curves,
    plot_confidence_histograms,
    plot_exit_accuracy,
    plot_exit_shares,
)
from dynexit.analysis.html_report import REPORT_FILE, PageFigure, PageTable, figure_png, render_html
from dynexit.analysis.results import Results, load_results
from dynexit.analysis.tables import (
    ablation_table,
    curve_band,
    format_ablation,
    run_metrics,
    to_latex,
    to_markdown,
)
from dynexit.analysis.training_curves import plot_training_curves, training_bands, training_history
from dynexit.utils import atomic_write, atomic_write_text, staged_folder

log = logging.getLogger(__name__)


# No creation date in a figure, and fixed SVG ids (random by default): the same figure, the same bytes.
_STABLE_METADATA = {"pdf": {"CreationDate": None}, "svg": {"Date": None}, "png": {}}
_SVG_SALT = "dynexit"


CAPTIONS = {
    "budgeted curves": "Test accuracy against expected cost per image: one line per configuration (mean over "
                       "seeds, band ± std), each exit alone as hollow markers, static backbones as squares.",
    "exit shares": "Share of test samples leaving at each exit, per operating point of the budgeted curve.",
    "exit accuracy": "Accuracy of the test samples leaving at each exit, per operating point; dashed: overall.",
    "confidence histograms": "Max softmax probability of each exit on the test split (whatever the exit "
                             "criterion), correct and wrong samples stacked.",
    "latency": "Test accuracy against expected GMACs and against expected latency per image (sum over exits of the "
               "share of test images leaving there times the measured latency of reaching it), per operating point "
               "(mean over seeds).",
    "training curves": "Per-exit evaluated accuracy (at evaluated epochs), running training accuracy and training "
                       "loss against epoch: mean over seeds, band from the lowest to the highest seed.",
}


def save_figure(fig, path: str | Path, formats: Sequence[str] = ("png", "pdf"), dpi: int = 150) -> list[Path]:
    """Writes ``fig`` as ``path.<format>`` for each format, atomically and byte-stable (rendering the same
    figure again gives the same bytes); returns the paths."""
    import matplotlib

    out = []
    for fmt in formats:
        target = Path(path).with_suffix(f".{fmt}")
        with matplotlib.rc_context({"svg.hashsalt": _SVG_SALT}):
            atomic_write(target, lambda tmp, fmt=fmt: fig.savefig(tmp, format=fmt, dpi=dpi, bbox_inches="tight",
                                                                  metadata=_STABLE_METADATA.get(fmt)))
        out.append(target)
    return out


def write_report(results_dir: str | Path, out_dir: str | Path | None = None,
                 formats: Sequence[str] = ("png", "pdf"), budgets: Sequence[float] | None = None,
                 published: bool | str = "auto", allow_mixed: bool = False) -> dict[str, list[Path]]:
    """Writes an experiment's figures and tables into ``out_dir`` (default ``RESULTS_DIR/report``):
    budgeted curves, exit shares, exit accuracy and confidence histograms (each in ``formats``), the
    ablation table (CSV, Markdown, LaTeX) and the data behind the figures (CSV). All or nothing: every file
    is rendered into a staging folder first and moved into ``out_dir`` only when all succeeded; the same
    results give the same bytes. Returns ``{item: [paths]}``."""
    for fmt in formats:
        if fmt not in ("png", "pdf", "svg"):
            raise ValueError(f"figure format {fmt!r} is not one of png, pdf, svg")
    results = load_results(results_dir, allow_mixed=allow_mixed)
    out = Path(out_dir) if out_dir is not None else results.path / "report"
    with staged_folder(out) as stage:
        written = _render_report(results, stage, formats, budgets, published)
    return {item: [out / path.name for path in paths] for item, paths in written.items()}


def _render_report(results: Results, out: Path, formats: Sequence[str], budgets: Sequence[float] | None,
                   published: bool | str) -> dict[str, list[Path]]:
    """Writes every file of the report into ``out``; returns ``{item: [paths]}``."""
    written: dict[str, list[Path]] = {}

    def csv(name: str, frame: pd.DataFrame) -> Path:
        path = out / f"{name}.csv"
        atomic_write(path, lambda tmp: frame.to_csv(tmp, index=False))
        return path

    evaluation = describe_evaluation(results)  # stated in the header, the tables' notes and the captions
    table = ablation_table(results, budgets)
    table.attrs["notes"] = [evaluation, *table.attrs["notes"], *completeness_notes(results)]
    written["ablation table"] = [csv("ablation", table)]
    atomic_write_text(out / "ablation.md", to_markdown(table))
    atomic_write_text(out / "ablation.tex", to_latex(table))
    written["ablation table"] += [out / "ablation.md", out / "ablation.tex"]
    written["per-run metrics"] = [csv("run_metrics", run_metrics(results, table.attrs["budgets"],
                                                                 table.attrs["auc_range"]))]
    budgets_frame = budget_table(results, table.attrs["budgets"])
    budgets_frame.attrs["evaluation"] = evaluation
    written["budgets"] = [csv("budgets", budgets_frame)]
    atomic_write_text(out / "budgets.md", budgets_markdown(budgets_frame))
    atomic_write_text(out / "budgets.tex", budgets_latex(budgets_frame))
    written["budgets"] += [out / "budgets.md", out / "budgets.tex"]
    tables = [PageTable("Accuracy at budgets: who wins where", "budgets", format_budgets(budgets_frame),
                        budget_notes(budgets_frame))]

    page: list[PageFigure] = []

    def figure(item: str, name: str, fig, caption: str) -> list[Path]:
        page.append(PageFigure(item[0].upper() + item[1:], caption, figure_png(fig)))
        return save_figure(fig, out / name, formats)

    fig = plot_budgeted_curves(results, published=published)
    written["budgeted curves"] = figure("budgeted curves", "budgeted_curves", fig,
                                        f"{CAPTIONS['budgeted curves']} {evaluation}")
    written["budgeted curves"].append(csv("curve_bands", curve_band(results)))

    shares = exit_shares(results)
    behaviour = exit_accuracy(results)
    hist = confidence_histograms(results)
    for item, name, fig, data in (("exit shares", "exit_shares", plot_exit_shares(results, shares), shares),
                                  ("exit accuracy", "exit_accuracy", plot_exit_accuracy(results, behaviour),
                                   behaviour),
                                  ("confidence histograms", "confidence", plot_confidence_histograms(results, hist),
                                   hist)):
        if fig is None:
            log.info("%s: nothing to plot (no multi-exit run with the files it needs)", item)
            continue
        caption = CAPTIONS[item] + ("" if item == "confidence histograms" else f" {evaluation}")
        written[item] = figure(item, name, fig, caption) + [csv(name, data)]

    bands = training_bands(training_history(results), results)
    fig = plot_training_curves(results, bands)
    if fig is None:
        log.info("training curves: nothing to plot (no run folder has a metrics.csv)")
    else:
        written["training curves"] = figure("training curves", "training_curves", fig,
                                            CAPTIONS["training curves"]) + [csv("training_curves", bands)]

    _render_latency(results, out, written, csv, figure, evaluation)
    _render_searches(results, out, formats, page, written, csv)

    atomic_write_text(out / REPORT_FILE, render_html(results, format_ablation(table), table.attrs.get("notes", []),
                                                     page, tables, evaluation))
    written["page"] = [out / REPORT_FILE]
    return written


def completeness_notes(results: Results) -> list[str]:
    """What the tables leave out or pool against the rule, by name."""
    notes = []
    if results.mixed:
        notes.append(f"Pooled over runs evaluated differently (--allow-mixed): {', '.join(results.mixed)}.")
    if results.left_out:
        notes.append("Left out (not in runs.csv): " + "; ".join(f"run {rid} ({why})"
                                                              for rid, why in results.left_out.items()) + ".")
    return notes


def _render_latency(results: Results, out: Path, written: dict[str, list[Path]], csv, figure, evaluation: str) -> None:
    """With RESULTS_DIR/latency.csv (``dynexit bench RESULTS_DIR``): the expected latency of every operating
    point (latency.csv) and accuracy against GMACs and latency side by side."""
    from dynexit.analysis.latency import (
        LATENCY_FILE,
        expected_latency,
        latency_caption,
        plot_latency_curves,
        read_latency,
    )

    path = results.path / LATENCY_FILE
    if not path.is_file():
        log.info("accuracy against latency: no %s (measure it with 'dynexit bench %s')", path, results.path)
        return
    measured = read_latency(path)
    table = expected_latency(results, measured)
    fig = plot_latency_curves(results, table)
    if fig is None:
        return
    caption = (f"{CAPTIONS['latency']} {latency_caption(measured)} {evaluation}")
    written["latency"] = figure("accuracy against latency", "latency", fig, caption) + [csv("latency", table)]


def _render_searches(results: Results, out: Path, formats: Sequence[str], page: list[PageFigure],
                     written: dict[str, list[Path]], csv) -> None:
    """The searches a results folder holds: the loss-weight study (drawn from its trials.csv) and the
    figures threshold searches wrote under ``search/`` (``*.figure.png``, shown on the page as they are)."""
    from dynexit.analysis.search_figures import HISTORY, loss_weight_figures
    from dynexit.utils import read_csv_file

    trials_path = results.path / "search" / "loss_weights" / "trials.csv"
    if trials_path.is_file():
        for name, (fig, data) in loss_weight_figures(read_csv_file(trials_path, "loss-weight trials")).items():
            item = "loss-weight search: " + ("objective over trials" if name == HISTORY else "parameter importances")
            caption = (f"From {trials_path.relative_to(results.path)}: " +
                       ("objective of each complete trial (mean calibration budgeted accuracy, %) and the best so "
                        "far." if name == HISTORY else "fANOVA importance of each searched parameter (seed 0)."))
            page.append(PageFigure(item[0].upper() + item[1:], caption, figure_png(fig)))
            written[item] = save_figure(fig, out / f"search_loss_weights_{name}", formats) + [
                csv(f"search_loss_weights_{name}", data)]
    for png in sorted((results.path / "search").glob("**/*.figure.png")):
        where = png.relative_to(results.path)
        page.append(PageFigure(f"Threshold search: {where.with_suffix('').with_suffix('').as_posix()}",
                               f"{where}: the searched curve against the protocol's (test split), as the search "
                               "wrote it.", png.read_bytes()))
