"""The notebooks run top to bottom (nbclient) on results/quickstart when it exists, else on a synthetic
results folder, and show what dynexit.analysis computes; the committed files carry no outputs."""
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient
from test_analysis import write_synthetic_results

from dynexit import analysis

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = ROOT / "notebooks"
QUICKSTART = ROOT / "results" / "quickstart"
EXPECTED = {"budgeted_curves.ipynb": 1, "ablations.ipynb": 0, "exit_behaviour.ipynb": 3}  # figures shown


@pytest.fixture(scope="module")
def results_dir(tmp_path_factory):
    if (QUICKSTART / "runs.csv").is_file():
        return QUICKSTART
    return write_synthetic_results(tmp_path_factory.mktemp("nb") / "synthetic", seeds=(0, 1), samples=150)


def _tagged(nb, tag: str) -> list:
    return [c for c in nb.cells if tag in c.get("metadata", {}).get("tags", [])]


def _text(cell) -> str:
    parts = []
    for out in cell.get("outputs", []):
        if out.get("output_type") == "stream":
            parts.append(out["text"])
        for mime in ("text/markdown", "text/plain"):
            if mime in out.get("data", {}):
                parts.append(out["data"][mime])
    return "\n".join(parts)


def test_every_notebook_is_committed_without_outputs():
    assert sorted(p.name for p in NOTEBOOKS.glob("*.ipynb")) == sorted(EXPECTED)
    for path in NOTEBOOKS.glob("*.ipynb"):
        nb = nbformat.read(path, as_version=4)
        code = [c for c in nb.cells if c.cell_type == "code"]
        assert code and all(c.outputs == [] and c.execution_count is None for c in code), path.name


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_notebook_runs_and_shows_the_analysis(name, results_dir, monkeypatch):
    monkeypatch.setenv(analysis.RESULTS_ENV, str(results_dir))
    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    NotebookClient(nb, timeout=300, kernel_name="python3",
                   resources={"metadata": {"path": str(NOTEBOOKS)}}).execute()
    results = analysis.load_results(results_dir)
    load = _text(_tagged(nb, "load")[0])
    assert f"{len(results.runs)} runs in {results_dir}" in load
    assert ", ".join(results.configs) in load
    figures = [c for c in _tagged(nb, "figure")
               if any("image/png" in out.get("data", {}) for out in c.outputs)]
    assert len(figures) == EXPECTED[name]
    if name == "ablations.ipynb":  # the very table dynexit.analysis computes, every configuration in it
        shown = _text(_tagged(nb, "ablation-table")[0])
        assert analysis.to_markdown(analysis.ablation_table(results)).strip() in shown
        assert all(f"| {c} |" in shown for c in results.configs)
    if name == "budgeted_curves.ipynb":
        band = _text(_tagged(nb, "band")[0])
        assert all(c in band for c in results.dynamic_configs)


@pytest.fixture(scope="module")
def edge_folders(tmp_path_factory):
    """Mixed families with a static reference (the spec's reference:), and a single run."""
    import pandas as pd
    import yaml
    from test_analysis import MIXED

    root = tmp_path_factory.mktemp("edge")
    mixed = write_synthetic_results(root / "mixed", seeds=(0,), samples=60, names_of=MIXED)
    spec = yaml.safe_load((mixed / "experiment.yaml").read_text())
    (mixed / "experiment.yaml").write_text(yaml.safe_dump({**spec, "reference": "static"}))
    single = write_synthetic_results(root / "single", seeds=(0,), samples=60)
    for name in ("runs.csv", "curves.csv", "index.csv"):
        frame = pd.read_csv(single / name)
        frame[frame["run_id"] == "no_dwc-0"].to_csv(single / name, index=False)
    return {"mixed, static reference": mixed, "single run": single}


@pytest.mark.parametrize("folder", ["mixed, static reference", "single run"])
@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_notebook_runs_on_any_results_folder(name, folder, edge_folders, monkeypatch):
    results_dir = edge_folders[folder]
    monkeypatch.setenv(analysis.RESULTS_ENV, str(results_dir))
    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    NotebookClient(nb, timeout=300, kernel_name="python3",
                   resources={"metadata": {"path": str(NOTEBOOKS)}}).execute()
    results = analysis.load_results(results_dir)
    assert ", ".join(results.configs) in _text(_tagged(nb, "load")[0])
    figures = [c for c in _tagged(nb, "figure") if any("image/png" in out.get("data", {}) for out in c.outputs)]
    assert len(figures) == EXPECTED[name]
