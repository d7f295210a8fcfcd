"""A run's identity and its evaluation, with the real pipeline on digits: the same numbers with one worker or
two; evaluation settings changed after training re-evaluate finished runs without training; run folders
named by the old id renamed to the current one; results compared with a reference."""
import hashlib
import json
import logging
import shutil
import textwrap
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml

import dynexit.training.loop
from dynexit.analysis.compare import BIT_IDENTICAL, DIFFERS, MISSING, WITHIN_SPREAD, compare_results
from dynexit.config import load_run_config, to_container
from dynexit.runs.folders import (
    DONE,
    EVAL_FILE,
    FAILED,
    STALE,
    evaluation_changes,
    experiment_status,
    read_status,
    run_dir,
    run_state,
)
from dynexit.runs.runner import run_experiment
from dynexit.runs.spec import load_spec

ROOT = Path(__file__).parent.parent

SPEC = """
name: identity
results_dir: {out}
base:
  model: {{name: tiny_perceiver_t16, input_size: 16}}
  data: {{name: digits, image_size: 16, train_subset: 256, calib_size: 64, test_subset: 96}}
  train: {{epochs: 1, batch_size: 32, lr: 2.0e-3, threads: {threads}, progress: false, tensorboard: false}}
  eval: {{grid: official, criterion: max_softmax, budgets: [0.004], batch_size: 64}}
variants:
{variants}
seeds: [0, 1]
"""


def write_spec(folder: Path, results: Path, threads: int = 1, variants: str = "  full: {}", **eval_changes) -> Path:
    text = textwrap.dedent(SPEC.format(out=results, threads=threads, variants=variants))
    raw = yaml.safe_load(text)
    raw["base"]["eval"].update(eval_changes)
    path = folder / f"{results.name}.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def no_training(*args, **kwargs):
    raise AssertionError("training was called")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One tiny experiment (one variant, two seeds), trained once; tests work on copies of it."""
    folder = tmp_path_factory.mktemp("trained")
    spec = write_spec(folder, folder / "results")
    outcomes = run_experiment(load_spec(spec), devices="cpu")
    assert [o.state for o in outcomes] == [DONE, DONE], [o.error for o in outcomes]
    return folder / "results"


def copy_results(trained: Path, tmp_path: Path, name: str = "results", **eval_changes) -> tuple[Path, Path]:
    """A copy of the trained results and a spec for it (with ``eval_changes``)."""
    results = tmp_path / name
    shutil.copytree(trained, results)
    return results, write_spec(tmp_path, results, **eval_changes)


# --------------------------------------------------------------------------- scheduling


def test_one_worker_or_two_give_bit_identical_runs(tmp_path, monkeypatch):
    """--workers 1 runs in the runner's own process, here set to 2 threads; --workers 2 in two spawned
    worker processes, whose torch starts with 1 thread (OMP_NUM_THREADS; torch caps a larger value at the
    cores). Both compute with the runs' train.threads (1): a run that kept the threads of its process would
    compute with 2 threads in one grid and 1 in the other, and the thread count changes the last bits."""
    one = load_spec(write_spec(tmp_path, tmp_path / "one"))
    two = load_spec(write_spec(tmp_path, tmp_path / "two"))
    caller_threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        assert all(o.state == DONE for o in run_experiment(one, devices="cpu", workers=1))
        assert torch.get_num_threads() == 2  # the run's threads do not leak into the caller
    finally:
        torch.set_num_threads(caller_threads)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # the workers' own default, unlike the caller's
    assert all(o.state == DONE for o in run_experiment(two, devices="cpu", workers=2))
    assert [r.run_id for r in one.runs] == [r.run_id for r in two.runs] and len(one.runs) == 2
    pids = set()
    for run in one.runs:
        a, b = run_dir(one, run), run_dir(two, run)
        pids.add(read_status(b)["pid"])
        for folder in (a, b):
            assert read_status(folder)["threads"] == 1
            assert load_run_config(folder / "config.yaml").train.threads == 1
        for split in ("calib", "test"):
            la, lb = np.load(a / f"logits_{split}.npz"), np.load(b / f"logits_{split}.npz")
            assert np.array_equal(la["logits"], lb["logits"]) and np.array_equal(la["targets"], lb["targets"])
    assert len(pids) == 2  # the second grid really ran in two worker processes


def test_training_computes_with_the_configured_threads_deterministically(tmp_path):
    from dynexit.training import train

    spec = load_spec(write_spec(tmp_path, tmp_path / "r", threads=3))
    cfg = spec.runs[0].config
    cfg.data.train_subset, cfg.train.eval_every = 64, 1
    seen = []
    caller = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    train(cfg, tmp_path / "run", device="cpu",
          on_epoch_end=lambda **_: seen.append((torch.get_num_threads(), torch.are_deterministic_algorithms_enabled())))
    assert seen == [(3, True)]
    assert (torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()) == caller  # restored


def test_threads_are_validated_and_part_of_the_id(tmp_path):
    for bad in (0, -1, "two", 1.5):
        text = write_spec(tmp_path, tmp_path / "r").read_text().replace("threads: 1", f"threads: {bad!r}")
        (tmp_path / "bad.yaml").write_text(text)
        with pytest.raises(ValueError, match="threads"):
            load_spec(tmp_path / "bad.yaml")
    one = load_spec(write_spec(tmp_path, tmp_path / "r", threads=1))
    two = load_spec(write_spec(tmp_path, tmp_path / "r", threads=2))
    assert {r.run_id for r in one.runs}.isdisjoint(r.run_id for r in two.runs)


# --------------------------------------------------------------------------- evaluation apart from training


def snapshot(folder: Path) -> dict[str, tuple[int, bytes]]:
    return {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in folder.iterdir() if p.is_file()}


def test_eval_changes_re_evaluate_from_saved_logits_without_training(trained, tmp_path, monkeypatch, caplog):
    before_runs = pd.read_csv(trained / "runs.csv")
    before_curves = pd.read_csv(trained / "curves.csv")
    results, spec = copy_results(trained, tmp_path, criterion="entropy", grid="msdnet", budgets=[0.003, 0.005])
    experiment = load_spec(spec)
    assert [r.run_id for r in experiment.runs] == list(before_runs["run_id"])  # the same runs
    folders = [run_dir(experiment, r) for r in experiment.runs]
    before = {f.name: snapshot(f) for f in folders}
    assert [row["state"] for row in experiment_status(experiment)] == [STALE, STALE]
    assert "eval.criterion: 'max_softmax' -> 'entropy'" in experiment_status(experiment)[0]["eval_changes"]

    monkeypatch.setattr(dynexit.training.loop, "train", no_training)
    with caplog.at_level(logging.INFO, logger="dynexit.runs.runner"):
        outcomes = run_experiment(experiment, devices="cpu")
    assert [o.state for o in outcomes] == [DONE, DONE], [o.error for o in outcomes]
    assert "progress: 2/2 runs done" in caplog.text
    for folder in folders:
        after = snapshot(folder)
        for name in ("checkpoint.pt", "logits_calib.npz", "logits_test.npz", "metrics.csv", "costs.csv"):
            assert after[name] == before[folder.name][name], name  # untouched: same time, same bytes
        assert after["curve.csv"][1] != before[folder.name]["curve.csv"][1]
        assert json.loads((folder / EVAL_FILE).read_text())["outputs"]["criterion"] == "entropy"
        assert load_run_config(folder / "config.yaml").eval.grid == "msdnet"
        assert read_status(folder)["state"] == DONE
    runs, curves = pd.read_csv(results / "runs.csv"), pd.read_csv(results / "curves.csv")
    assert len(runs) == 2 and runs["run_id"].is_unique and list(runs["run_id"]) == list(before_runs["run_id"])
    assert {"acc_at_0.003", "acc_at_0.005"} <= set(runs.columns) and "acc_at_0.004" not in runs.columns
    assert list(runs["acc_final"]) == list(before_runs["acc_final"])  # the same models
    assert not curves.duplicated(["run_id", "point"]).any() and set(curves["run_id"]) == set(runs["run_id"])
    assert len(curves) != len(before_curves)  # the msdnet grid has other operating points than the official one
    # Up to date now: nothing to do, everything done.
    assert run_experiment(load_spec(spec), devices="cpu") == []
    assert {row["state"] for row in experiment_status(load_spec(spec))} == {DONE}


def test_eval_changes_the_logits_depend_on_collect_them_from_the_checkpoint(trained, tmp_path, monkeypatch):
    results, spec = copy_results(trained, tmp_path, use_ema=True)
    experiment = load_spec(spec)
    folder = run_dir(experiment, experiment.runs[0])
    before = snapshot(folder)
    monkeypatch.setattr(dynexit.training.loop, "train", no_training)
    assert [o.state for o in run_experiment(experiment, devices="cpu")] == [DONE, DONE]
    after = snapshot(folder)
    assert after["checkpoint.pt"] == before["checkpoint.pt"]
    old = np.load(trained / "runs" / folder.name / "logits_test.npz")["logits"]
    new = np.load(folder / "logits_test.npz")["logits"]
    assert old.shape == new.shape and not np.array_equal(old, new)  # the EMA weights' logits
    assert json.loads((folder / EVAL_FILE).read_text())["logits"] == {"use_ema": True, "batch_size": 64}


def test_a_re_evaluation_that_needs_a_missing_checkpoint_fails_and_keeps_the_run(trained, tmp_path, monkeypatch):
    results, spec = copy_results(trained, tmp_path, batch_size=32)
    experiment = load_spec(spec)
    folder = run_dir(experiment, experiment.runs[0])
    (folder / "checkpoint.pt").unlink()
    monkeypatch.setattr(dynexit.training.loop, "train", no_training)
    outcomes = {o.run_id: o for o in run_experiment(experiment, devices="cpu")}
    failed = outcomes[folder.name]
    assert failed.state == FAILED and "checkpoint.pt" in failed.error and str(folder) in failed.error
    assert outcomes[experiment.runs[1].run_id].state == DONE
    assert read_status(folder)["state"] == DONE  # still trained: the next run tries the re-evaluation again
    assert run_state(folder, experiment.runs[0].config.eval) == STALE
    # left out of runs.csv (by name, in the log) until evaluated again: its old row is not its configuration's
    assert list(pd.read_csv(results / "runs.csv")["run_id"]) == [experiment.runs[1].run_id]


def test_eval_compile_leaves_finished_runs_done_and_the_other_settings_still_make_them_stale(trained, tmp_path,
                                                                                              monkeypatch):
    results, spec = copy_results(trained, tmp_path, compile=True)
    experiment = load_spec(spec)
    assert [row["state"] for row in experiment_status(experiment)] == [DONE, DONE]
    monkeypatch.setattr(dynexit.training.loop, "train", no_training)
    assert run_experiment(experiment, devices="cpu") == []  # nothing to evaluate again
    results, spec = copy_results(trained, tmp_path, name="criterion", compile=True, criterion="entropy")
    rows = experiment_status(load_spec(spec))
    assert [row["state"] for row in rows] == [STALE, STALE]
    assert rows[0]["eval_changes"] == ["eval.criterion: 'max_softmax' -> 'entropy'"]  # compile is not a change


def test_eval_compile_collects_the_logits_through_the_compiled_model(trained, tmp_path, monkeypatch):
    """The wiring (the logits of a run re-collected with eval.compile run through torch.compile; the numerics
    of a real compilation are the next test's)."""
    from dynexit.runs.pipeline import evaluate_run

    results, spec = copy_results(trained, tmp_path, compile=True, batch_size=32)  # batch_size: collect again
    experiment = load_spec(spec)
    run = experiment.runs[0]
    compiled = []
    monkeypatch.setattr(torch, "compile", lambda model: compiled.append(model) or model)
    evaluate_run(run.config, run_dir(experiment, run))
    folder = run_dir(experiment, run)
    assert len(compiled) == 1 and list(compiled[0].exit_names) == list(pd.read_csv(folder / "costs.csv")["exit"])
    assert json.loads((folder / EVAL_FILE).read_text())["logits"] == {"use_ema": False, "batch_size": 32}
    old = np.load(trained / "runs" / folder.name / "logits_test.npz")["logits"]
    assert np.allclose(np.load(folder / "logits_test.npz")["logits"], old, rtol=0, atol=1e-5)
    assert evaluation_changes(folder, run.config.eval) == []


class _TwoExits(torch.nn.Module):
    def __init__(self):
        super().__init__()
        conv = torch.nn.Conv2d
        self.stem = torch.nn.Sequential(conv(3, 8, 3, padding=1), torch.nn.BatchNorm2d(8), torch.nn.ReLU())
        self.body = torch.nn.Sequential(conv(8, 8, 3, padding=1), torch.nn.ReLU())
        self.head1, self.head2 = torch.nn.Linear(8, 10), torch.nn.Linear(8, 10)

    def forward(self, x):
        h = self.stem(x)
        first = self.head1(h.mean((2, 3)))
        return [first, self.head2(self.body(h).mean((2, 3)))]


@pytest.mark.slow
def test_compiled_evaluation_gives_the_eager_logits(monkeypatch, tmp_path):
    """eval.compile's promise (why it is not part of eval.json): the same logits up to float rounding. A tiny
    two-exit network keeps the compilation (C++ kernels on the CPU) to about 30 s."""
    from dynexit.logits import collect_logits
    from dynexit.training.determinism import run_threads

    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))  # compiles, not a cache hit
    torch.manual_seed(0)
    model = _TwoExits().eval()
    images = torch.randn(64, 3, 8, 8)
    batches = [(images[:32], torch.zeros(32, dtype=torch.long)), (images[32:], torch.zeros(32, dtype=torch.long))]
    with run_threads(1, deterministic_cpu=True):
        eager, _ = collect_logits(model, batches)
        compiled, _ = collect_logits(torch.compile(model), batches)
    assert eager.shape == compiled.shape == (2, 64, 10) and np.abs(eager).max() > 0.1
    assert np.allclose(compiled, eager, rtol=0, atol=1e-5)


def test_a_spec_whose_runs_differ_only_in_eval_is_refused(tmp_path):
    spec = write_spec(tmp_path, tmp_path / "r", variants="  a: {}\n  b: {eval.criterion: entropy}")
    with pytest.raises(ValueError, match="same configuration.*eval section"):
        load_spec(spec)


# --------------------------------------------------------------------------- migration of old run ids


def old_run_id(config: dict) -> str:
    """The id before train.threads existed: a hash of the whole resolved configuration, eval included."""
    config = json.loads(json.dumps(config))
    config["train"].pop("threads")
    text = json.dumps(config, sort_keys=True, separators=(",", ":"))
    return hashlib.sha1(text.encode()).hexdigest()[:10]


def make_old(results: Path) -> dict[str, str]:
    """Turns current results into results of the old scheme (as committed before): folders named by the
    old id, config.yaml without train.threads, no eval.json. Returns {old id: current id}."""
    mapping = {}
    for folder in sorted((results / "runs").iterdir()):
        config = to_container(load_run_config(folder / "config.yaml"))
        old = old_run_id(config)
        mapping[old] = folder.name
        del config["train"]["threads"]
        (folder / "config.yaml").write_text(yaml.safe_dump(config))
        (folder / EVAL_FILE).unlink()
        folder.rename(folder.parent / old)
    (results / "report").mkdir()
    for name in ("runs.csv", "curves.csv", "index.csv"):
        text = (results / name).read_text()
        for old, new in mapping.items():
            text = text.replace(new, old)
        (results / name).write_text(text)
        if name == "runs.csv":
            (results / "report" / "run_metrics.csv").write_text(text)
    return mapping


def test_migration_renames_old_run_folders_to_their_current_ids(trained, tmp_path, monkeypatch, capsys):
    from dynexit.cli import main

    results, spec = copy_results(trained, tmp_path)
    mapping = make_old(results)
    experiment = load_spec(spec)
    rows = experiment_status(experiment)
    assert {row["state"] for row in rows if row["in_spec"]} == {"pending"}  # old names: not found
    assert {row["run_id"] for row in rows if not row["in_spec"]} == set(mapping)  # listed, as other folders

    assert main(["migrate-ids", str(spec), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert all(f"{old} -> {new}  train.threads=1" in out for old, new in mapping.items())
    assert sorted(p.name for p in (results / "runs").iterdir()) == sorted(mapping)  # a dry run changes nothing

    monkeypatch.setattr(dynexit.training.loop, "train", no_training)
    assert main(["migrate-ids", str(spec)]) == 0
    assert sorted(p.name for p in (results / "runs").iterdir()) == sorted(mapping.values())
    assert {row["state"] for row in experiment_status(experiment)} == {DONE}  # done: nothing to train
    assert run_experiment(experiment, devices="cpu") == []
    for name in ("runs.csv", "curves.csv", "index.csv"):
        pd.testing.assert_frame_equal(pd.read_csv(results / name), pd.read_csv(trained / name))
    assert (results / "report" / "run_metrics.csv").read_text() == (trained / "runs.csv").read_text()
    for run in experiment.runs:
        folder = run_dir(experiment, run)
        assert evaluation_changes(folder, run.config.eval) == []
        assert load_run_config(folder / "config.yaml").train.threads == 1
    assert main(["migrate-ids", str(spec)]) == 0  # again: nothing left to rename
    assert "0 run folder(s) renamed" in capsys.readouterr().out


def test_migration_needs_to_know_the_threads(trained, tmp_path):
    from dynexit.runs.migration import plan_migration

    results, spec = copy_results(trained, tmp_path)
    mapping = make_old(results)
    for old in mapping:
        status = json.loads((results / "runs" / old / "status.json").read_text())
        del status["threads"]
        (results / "runs" / old / "status.json").write_text(json.dumps(status))
    with pytest.raises(ValueError, match="--threads"):
        plan_migration(spec)
    assert {r.new_id for r in plan_migration(spec, threads=1)} == set(mapping.values())
    assert not {r.new_id for r in plan_migration(spec, threads=2)} & set(mapping.values())


@pytest.mark.parametrize("spec,runs,threads", [("quickstart", 14, 1), ("fashion_mnist", 1, 2)])
def test_committed_results_are_done_under_the_current_ids(spec, runs, threads):
    experiment = load_spec(ROOT / "experiments" / f"{spec}.yaml", results_dir=ROOT / "results" / spec)
    rows = experiment_status(experiment)
    assert len(rows) == runs and {row["state"] for row in rows} == {DONE}, rows
    assert {r.config.train.threads for r in experiment.runs} == {threads}
    listed = pd.read_csv(experiment.results_dir / "runs.csv")["run_id"].astype(str)
    assert sorted(listed) == sorted(r.run_id for r in experiment.runs)


# --------------------------------------------------------------------------- comparison with a reference


def test_compare_with_a_reference(trained, tmp_path, capsys):
    from dynexit.cli import main

    results, _ = copy_results(trained, tmp_path)
    comparison = compare_results(results, trained)
    assert comparison.reproduced and {c.verdict for c in comparison.checks} == {BIT_IDENTICAL}
    assert comparison.budgets == [0.004]
    assert main(["compare", str(results), str(trained)]) == 0
    assert "reproduced: all 2 configurations bit-identical" in capsys.readouterr().out

    # Logits off in the last bits, the same accuracies: within the reference's seed spread.
    first = results / "runs" / comparison.checks[0].run_id
    data = dict(np.load(first / "logits_test.npz"))
    np.savez(first / "logits_test.npz", logits=np.nextafter(data["logits"], np.inf), targets=data["targets"])
    comparison = compare_results(results, trained)
    assert [c.verdict for c in comparison.checks] == [WITHIN_SPREAD, BIT_IDENTICAL] and comparison.reproduced
    assert "not bit-identical" in comparison.checks[0].details[0]

    # Accuracy far outside the spread of the two seeds: differs, named; exit status 1.
    runs = pd.read_csv(results / "runs.csv")
    ref = pd.read_csv(trained / "runs.csv")["acc_final"]
    spread = 2 * ref.std(ddof=1)
    runs.loc[0, "acc_final"] = ref.mean() + spread + 1.0
    runs.to_csv(results / "runs.csv", index=False)
    comparison = compare_results(results, trained)
    assert comparison.checks[0].verdict == DIFFERS and not comparison.reproduced
    assert any(d.startswith("acc_final") for d in comparison.checks[0].details)
    assert main(["compare", str(results), str(trained)]) == 1
    assert "not reproduced: of 2 configurations, 1 differ" in capsys.readouterr().out

    # Another test set (as with a fallback data set) differs whatever the accuracy; a run not there is missing.
    np.savez(first / "logits_test.npz", logits=data["logits"][:, :-1], targets=data["targets"][:-1])
    runs = runs[runs["run_id"] != comparison.checks[1].run_id]
    runs.to_csv(results / "runs.csv", index=False)
    verdicts = [c.verdict for c in compare_results(results, trained).checks]
    assert verdicts == [DIFFERS, MISSING]


def test_make_quickstart_trains_into_an_ignored_folder_and_compares_with_the_reference():
    import re
    import subprocess

    makefile = (ROOT / "Makefile").read_text()
    out = re.search(r"^QUICKSTART_OUT \?= (\S+)$", makefile, re.M).group(1)
    recipe = re.search(r"^quickstart:.*\n((?:\t.*\n)+)", makefile, re.M).group(1)
    commands = [line.strip().replace("$(QUICKSTART_OUT)", out) for line in recipe.splitlines()]
    assert commands == [f"$(BIN)/dynexit run experiments/quickstart.yaml --devices cpu --workers 2 --out {out}",
                        f"$(BIN)/dynexit report {out}",
                        f"$(BIN)/dynexit compare {out} results/quickstart"]
    ignored = subprocess.run(["git", "check-ignore", "-q", f"{out}/runs.csv"], cwd=ROOT)
    assert ignored.returncode == 0, f"{out} is not ignored by git"
