"""Accuracy against measured latency: `dynexit bench RESULTS_DIR` times every configuration's exits on an
untrained copy of its architecture; the report's expected latency of each operating point is the sum of its
test shares times the per-exit latencies."""
import numpy as np
import pandas as pd
import pytest
from test_analysis import EXITS, SYNTHETIC, write_architectures, write_synthetic_results

from dynexit import analysis
from dynexit.analysis.latency import MEASURED_COLUMNS, expected_latency
from dynexit.cli import main

PER_EXIT = {1: [1.0, 2.5, 3.0, 4.0], 8: [0.2, 0.4, 0.5, 0.7]}  # ms per image to reach each exit, per batch size


def _hand_latency(folder) -> pd.DataFrame:
    rows = []
    for variant, (costs, _, _) in SYNTHETIC.items():
        names = ["cnn"] if len(costs) == 1 else list(EXITS)
        for batch, values in PER_EXIT.items():
            for k, name in enumerate(names):
                rows.append({"configuration": variant, "exit": name, "batch_size": batch,
                             "latency_ms": values[-1] * 0.8 if len(names) == 1 else values[k]})
    frame = pd.DataFrame(rows)
    frame.to_csv(folder / "latency.csv", index=False)
    return frame


def test_expected_latency_is_shares_times_per_exit_latency(tmp_path):
    folder = write_synthetic_results(tmp_path / "r", seeds=(0, 1), samples=80)
    measured = _hand_latency(folder)
    results = analysis.load_results(folder)
    table = expected_latency(results, measured)
    curves = pd.read_csv(folder / "curves.csv")
    for variant in ("full", "no_x2z"):
        for batch, values in PER_EXIT.items():
            mine = curves[curves["variant"] == variant]
            shares = mine[[f"test_share_{k}" for k in range(4)]].to_numpy()
            per_point = pd.DataFrame({"point": mine["point"], "latency": shares @ np.array(values),
                                      "gmacs": mine["test_expected_cost"]}).groupby("point").mean()
            got = table[(table["configuration"] == variant) & (table["batch_size"] == batch)].set_index("point")
            np.testing.assert_allclose(got["latency_ms"], per_point["latency"], rtol=1e-9)
            np.testing.assert_allclose(got["gmacs"], per_point["gmacs"], rtol=1e-9)
    static = table[table["configuration"] == "static"]
    assert list(static["latency_ms"]) == pytest.approx([4.0 * 0.8, 0.7 * 0.8])
    # an operating point that sends everyone to one exit costs that exit's latency
    full = table[(table["configuration"] == "full") & (table["batch_size"] == 1)]
    assert full["latency_ms"].min() >= 1.0 and full["latency_ms"].max() <= 4.0
    with pytest.raises(ValueError, match="no latency of exit"):
        expected_latency(results, measured[measured["exit"] != "att"])


def test_bench_results_folder_then_report_gives_latency_csv_and_figure(tmp_path, capsys):
    folder = write_synthetic_results(tmp_path / "r", seeds=(0,), samples=60)
    write_architectures(folder)  # the tiny Dyn-Perceiver and its static backbone
    assert main(["bench", str(folder), "--repeats", "2", "--warmup", "0", "--batch-sizes", "1,3",
                 "--threads", "1"]) == 0
    printed = capsys.readouterr().out
    measured = pd.read_csv(folder / "latency.csv")
    assert list(measured.columns) == MEASURED_COLUMNS and str(folder / "latency.csv") in printed
    assert len(measured) == 2 * (3 * 4 + 1) and set(measured["batch_size"]) == {1, 3}
    assert (measured["threads"] == 1).all() and measured["machine"].str.contains("CPUs").all()
    np.testing.assert_allclose(measured["latency_ms"], measured["batch_ms"] / measured["batch_size"])
    assert (measured["latency_ms"] > 0).all()
    assert main(["report", str(folder), "--formats", "png"]) == 0
    table = pd.read_csv(folder / "report" / "latency.csv")
    assert list(table.columns) == ["configuration", "point", "batch_size", "gmacs", "accuracy", "latency_ms"]
    assert set(table["configuration"]) == set(SYNTHETIC) and (folder / "report" / "latency.png").is_file()
    assert "Latency measured on" in (folder / "report" / "report.html").read_text()
