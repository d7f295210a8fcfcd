"""SLURM through submitit, against stand-in ``sbatch``/``squeue``/``sacct``/``scontrol``/``srun`` commands on
PATH that log their calls: one job array per submission, job ids in the run folders, the scheduler's state
in ``dynexit status``, nothing submitted twice, requeue of the same run, and the resource arithmetic."""
import json
import sys
import textwrap
import time
from pathlib import Path

import pytest
import submitit

from dynexit.cli import main
from dynexit.runs.folders import QUEUED, read_status, run_dir
from dynexit.runs.slurm import RunJob, job_name, job_resources, scheduler_states
from dynexit.runs.spec import load_spec

SPEC = """
name: grid
results_dir: {out}
base:
  model: {{name: tiny_perceiver_t16, input_size: 16}}
  data: {{name: digits, image_size: 16, num_workers: {workers}}}
  train: {{epochs: 1, batch_size: 32}}
grid:
  train.lr: [0.001, 0.002, 0.003]
seeds: [0, 1]
executor: {{kind: slurm, slurm_partition: gpu, gpus_per_run: {gpus}, slurm_array_parallelism: 4{extra}}}
"""

# sbatch: logs its call and the submission file, answers like sbatch. sacct: lists the tasks of every array
# it was asked about, in the state written to $FAKE_SLURM/state (PENDING when there is none).
SBATCH = """
import json, os, re, sys
from pathlib import Path
log = Path(os.environ["FAKE_SLURM"])
text = Path(sys.argv[-1]).read_text()
n = len(list(log.glob("sbatch_*.json")))
job = 1000 + n
m = re.search(r"--array=0-(\\d+)", text)
(log / f"sbatch_{n}.json").write_text(json.dumps({"argv": sys.argv[1:], "file": text, "job": job,
                                                   "tasks": int(m.group(1)) + 1 if m else 0}))
print(f"Submitted batch job {job}")
"""
SACCT = """
import json, os, sys
from pathlib import Path
log = Path(os.environ["FAKE_SLURM"])
(log / "sacct_calls.txt").open("a").write(" ".join(sys.argv[1:]) + "\\n")
state = (log / "state").read_text().strip() if (log / "state").exists() else "PENDING"
asked = {sys.argv[i + 1] for i, a in enumerate(sys.argv) if a == "-j"}
print("JobID|State")
for f in sorted(log.glob("sbatch_*.json")):
    sub = json.loads(f.read_text())
    if str(sub["job"]) in asked:
        for t in range(sub["tasks"]):
            print(f"{sub['job']}_{t}|{state}")
"""
OTHER = """
import os, sys
from pathlib import Path
Path(os.environ["FAKE_SLURM"], "other_calls.txt").open("a").write(sys.argv[0] + " " + " ".join(sys.argv[1:]) + "\\n")
"""


@pytest.fixture
def fake_slurm(tmp_path, monkeypatch):
    bin_dir, log = tmp_path / "bin", tmp_path / "slurm_log"
    bin_dir.mkdir()
    log.mkdir()
    for name, body in [("sbatch", SBATCH), ("sacct", SACCT), ("squeue", OTHER), ("scontrol", OTHER),
                       ("srun", OTHER), ("scancel", OTHER)]:
        path = bin_dir / name
        path.write_text(f"#!{sys.executable}\n" + textwrap.dedent(body))
        path.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{__import__('os').environ['PATH']}")
    monkeypatch.setenv("FAKE_SLURM", str(log))
    return log


def write_spec(tmp_path: Path, workers: int = 2, gpus: int = 1, extra: str = "") -> Path:
    path = tmp_path / "grid.yaml"
    path.write_text(textwrap.dedent(SPEC.format(out=tmp_path / "res", workers=workers, gpus=gpus, extra=extra)))
    return path


def sbatch_calls(log: Path) -> list[dict]:
    return [json.loads(f.read_text()) for f in sorted(log.glob("sbatch_*.json"))]


def test_a_grid_is_one_job_array_submitted_once(tmp_path, fake_slurm, capsys):
    spec = write_spec(tmp_path)
    start = time.monotonic()
    assert main(["run", str(spec)]) == 0
    assert time.monotonic() - start < 30  # returns once submitted: nothing waits for the jobs
    calls = sbatch_calls(fake_slurm)
    assert len(calls) == 1 and calls[0]["tasks"] == 6
    lines = calls[0]["file"].splitlines()
    assert "#SBATCH --array=0-5%4" in lines  # slurm_array_parallelism applies
    assert "#SBATCH --cpus-per-task=3" in lines  # 1 GPU x (2 loader workers + 1)
    assert "#SBATCH --mem=24GB" in lines  # 8 GB per CPU
    assert "#SBATCH --partition=gpu" in lines and "#SBATCH --job-name=dynexit-grid" in lines
    assert any(line.startswith("#SBATCH --signal=USR2@") for line in lines)  # submitit's requeue signal

    experiment = load_spec(spec)
    job_ids = set()
    for run in experiment.runs:
        status = read_status(run_dir(experiment, run))
        assert status["state"] == QUEUED and status["job_name"] == job_name(experiment, run)
        job_ids.add(status["job_id"])
    assert job_ids == {f"1000_{t}" for t in range(6)}
    assert job_name(experiment, experiment.runs[0]) == f"dynexit-grid-base-s0-{experiment.runs[0].run_id}"

    capsys.readouterr()
    assert main(["status", str(spec)]) == 0
    out = capsys.readouterr().out
    for t in range(6):
        assert f"1000_{t} (PENDING)" in out
    assert "queued: 6" in out

    # Queued (then running) jobs are not submitted again.
    assert main(["run", str(spec)]) == 0
    (fake_slurm / "state").write_text("RUNNING")
    assert main(["run", str(spec)]) == 0
    assert len(sbatch_calls(fake_slurm)) == 1

    # Jobs that ended without finishing their runs (timed out for good, cancelled) are: again one array.
    (fake_slurm / "state").write_text("TIMEOUT")
    assert main(["run", str(spec)]) == 0
    calls = sbatch_calls(fake_slurm)
    assert len(calls) == 2 and calls[1]["tasks"] == 6
    assert {read_status(run_dir(experiment, r))["job_id"] for r in experiment.runs} == {f"1001_{t}" for t in range(6)}


def test_scheduler_states_parse_sacct(fake_slurm, tmp_path):
    write_spec(tmp_path)
    (fake_slurm / "sbatch_0.json").write_text(json.dumps({"job": 1000, "tasks": 2, "file": "", "argv": []}))
    (fake_slurm / "state").write_text("CANCELLED by 42")
    assert scheduler_states(["1000_0", "1000_1", "999"]) == {"1000_0": "CANCELLED", "1000_1": "CANCELLED",
                                                             "999": "UNKNOWN"}


def test_requeue_resubmits_the_same_run(tmp_path):
    job = RunJob("spec.yaml", ["train.epochs=3"], "res", "abc123")
    assert isinstance(job, submitit.helpers.Checkpointable)
    again = job.checkpoint()
    assert isinstance(again, submitit.helpers.DelayedSubmission)
    assert isinstance(again.function, RunJob) and again.function is not job
    assert (again.function.spec_path, again.function.overrides, again.function.results_dir,
            again.function.run_id) == ("spec.yaml", ["train.epochs=3"], "res", "abc123")
    assert again.args == () and again.kwargs == {}


@pytest.mark.parametrize("gpus,workers,cpus,mem", [(1, 0, 1, 8), (1, 2, 3, 24), (8, 10, 88, 704), (4, 5, 24, 192)])
def test_derived_resources(tmp_path, gpus, workers, cpus, mem):
    experiment = load_spec(write_spec(tmp_path, workers=workers, gpus=gpus))
    assert job_resources(experiment, experiment.runs) == {"cpus_per_task": cpus, "mem_gb": mem}


def test_explicit_resources_kept_or_refused(tmp_path, fake_slurm, capsys):
    experiment = load_spec(write_spec(tmp_path, workers=10, gpus=8, extra=", cpus_per_task: 96, mem_gb: 500"))
    assert job_resources(experiment, experiment.runs) == {"cpus_per_task": 96, "mem_gb": 500}
    spec = write_spec(tmp_path, workers=10, gpus=8, extra=", cpus_per_task: 8")
    assert main(["run", str(spec)]) != 0
    assert "executor.cpus_per_task=8 is too small: 8 GPU process(es) x (data.num_workers=10 loader workers + 1) " \
           "need 88" in capsys.readouterr().err
    assert sbatch_calls(fake_slurm) == [] and not (tmp_path / "res").exists()
