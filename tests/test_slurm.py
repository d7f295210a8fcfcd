"""SLURM through submitit, against stand-in ``sbatch``/``squeue``/``sacct``/``scontrol``/``srun`` commands on
PATH that log their calls: one job array per submission, job ids in the run folders, the scheduler's state
in ``dynexit status``, nothing submitted twice, requeue of the same run, and the resource arithmetic."""
import json
import multiprocessing
import os
import random
import re
import sys
import textwrap
import time
from pathlib import Path

import pytest
import submitit
import torch

from dynexit.cli import main
from dynexit.runs.folders import QUEUED, read_status, run_dir
from dynexit.runs.slurm import (
    MIN_PORT,
    RunJob,
    first_host,
    job_name,
    job_resources,
    join_task_group,
    scheduler_states,
    task_device,
    task_environment,
)
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
    raw = {"name": "x", "base": {}}
    job = RunJob(raw, "spec.yaml", ["train.epochs=3"], "res", "abc123")
    assert isinstance(job, submitit.helpers.Checkpointable)
    again = job.checkpoint()
    assert isinstance(again, submitit.helpers.DelayedSubmission)
    assert isinstance(again.function, RunJob) and again.function is not job
    assert (again.function.raw, again.function.spec_path, again.function.overrides, again.function.results_dir,
            again.function.run_id) == (raw, "spec.yaml", ["train.epochs=3"], "res", "abc123")
    assert again.args == () and again.kwargs == {}


def submitted_jobs(results: Path) -> list[RunJob]:
    """The RunJob of every job submitit pickled under ``results`` (what the scheduler would start)."""
    files = sorted((results / "submitit").rglob("*_submitted.pkl"))
    return [submitit.helpers.DelayedSubmission.load(f).function for f in files]


def test_a_job_runs_what_was_submitted_whatever_the_spec_says_later(tmp_path, fake_slurm):
    spec = write_spec(tmp_path)
    assert main(["run", str(spec), "--set", "train.epochs=2"]) == 0
    before = load_spec(spec, ["train.epochs=2"])
    jobs = submitted_jobs(tmp_path / "res")
    assert sorted(j.run_id for j in jobs) == sorted(r.run_id for r in before.runs)
    # the spec is edited while the jobs wait: every run's configuration changes (new ids)
    spec.write_text(spec.read_text().replace("train.lr: [0.001, 0.002, 0.003]", "train.lr: [0.1, 0.2, 0.3]")
                    .replace("batch_size: 32", "batch_size: 8"))
    assert {r.run_id for r in load_spec(spec, ["train.epochs=2"]).runs}.isdisjoint(j.run_id for j in jobs)
    for job in jobs + [j.checkpoint().function for j in jobs]:  # the job, and the job requeued
        run = job.experiment().run(job.run_id)
        assert run.config == before.run(job.run_id).config
        assert (run.config.train.epochs, run.config.train.batch_size) == (2, 32)
        assert job.experiment().results_dir == tmp_path / "res"


@pytest.mark.parametrize("gpus,workers,cpus,mem", [(1, 0, 1, 8), (1, 2, 3, 24), (8, 10, 64, 512), (4, 5, 24, 192),
                                                   (8, 20, 64, 512), (2, 7, 16, 128)])
def test_derived_resources(tmp_path, gpus, workers, cpus, mem):
    experiment = load_spec(write_spec(tmp_path, workers=workers, gpus=gpus))
    assert job_resources(experiment, experiment.runs) == {"cpus_per_task": cpus, "mem_gb": mem}


def test_explicit_resources_kept_or_refused(tmp_path, fake_slurm, capsys):
    experiment = load_spec(write_spec(tmp_path, workers=10, gpus=8, extra=", cpus_per_task: 96, mem_gb: 500"))
    assert job_resources(experiment, experiment.runs) == {"cpus_per_task": 96, "mem_gb": 500}
    experiment = load_spec(write_spec(tmp_path, workers=10, gpus=8, extra=", cpus_per_gpu: 6, mem_gb: 400"))
    assert job_resources(experiment, experiment.runs) == {"cpus_per_task": 48, "mem_gb": 400}
    experiment = load_spec(write_spec(tmp_path, workers=10, gpus=8, extra=", cpus_per_task: 64"))
    assert job_resources(experiment, experiment.runs) == {"cpus_per_task": 64, "mem_gb": 512}  # no longer refused
    spec = write_spec(tmp_path, workers=10, gpus=8, extra=", cpus_per_task: 4")
    assert main(["run", str(spec)]) != 0
    assert "executor.cpus_per_task=4 leaves 8 training process(es) less than a CPU each" in capsys.readouterr().err
    assert sbatch_calls(fake_slurm) == [] and not (tmp_path / "res").exists()


OFFICIAL = Path(__file__).parent.parent / "experiments" / "imagenet_official.yaml"


def test_the_official_imagenet_spec_asks_for_what_an_8_gpu_node_has(tmp_path, fake_slurm):
    """The README's command with --set executor.kind=slurm: 8 GPUs, at most 64 CPUs and 512 GB."""
    assert main(["run", str(OFFICIAL), "--set", "executor.kind=slurm", "--set", "executor.slurm_partition=gpu",
                 "--results-dir", str(tmp_path / "res")]) == 0
    (call,) = sbatch_calls(fake_slurm)
    lines = call["file"].splitlines()
    assert call["tasks"] == 3
    assert {"#SBATCH --gpus-per-node=8", "#SBATCH --cpus-per-task=64", "#SBATCH --mem=512GB",
            "#SBATCH --nodes=1", "#SBATCH --partition=gpu"} <= set(lines)
    assert all(job.experiment().executor.kind == "slurm" for job in submitted_jobs(tmp_path / "res"))


def test_explicit_cpus_memory_requeues_sbatch_options_and_setup_reach_the_submission(tmp_path, fake_slurm):
    spec = write_spec(tmp_path, workers=10, gpus=8, extra=", cpus_per_gpu: 7, mem_gb: 480, max_num_timeout: 40, "
                      "sbatch: {qos: high, constraint: a100, exclusive: true}, "
                      "setup: ['module load cuda/12.1', 'source activate dynexit']")
    assert main(["run", str(spec), "--set", "executor.slurm_account=lab"]) == 0
    lines = sbatch_calls(fake_slurm)[0]["file"].splitlines()
    assert {"#SBATCH --cpus-per-task=56", "#SBATCH --mem=480GB", "#SBATCH --qos=high", "#SBATCH --constraint=a100",
            "#SBATCH --exclusive", "#SBATCH --account=lab"} <= set(lines)
    setup = lines.index("module load cuda/12.1")
    assert lines[setup + 1] == "source activate dynexit" and any(line.startswith("srun") for line in lines[setup:])
    submissions = sorted((tmp_path / "res" / "submitit").rglob("*_submitted.pkl"))
    assert len(submissions) == 6
    for path in submissions:  # submitit requeues a timed-out job while its countdown lasts
        assert submitit.helpers.DelayedSubmission.load(path)._timeout_countdown == 40


def test_the_readme_executor_commands_work(tmp_path, capsys):
    ablations = OFFICIAL.parent / "imagenet_ablations.yaml"
    assert main(["run", str(ablations), "--set", "executor.gpus_per_run=2", "--dry-run",
                 "--results-dir", str(tmp_path / "a")]) == 0
    assert load_spec(ablations, ["executor.gpus_per_run=2"]).executor.gpus_per_run == 2
    spec = write_spec(tmp_path)
    experiment = load_spec(spec, ["executor.kind=submitit_local", "executor.gpus_per_run=2", "train.epochs=2"])
    assert (experiment.executor.kind, experiment.executor.gpus_per_run) == ("submitit_local", 2)
    assert {r.config.train.epochs for r in experiment.runs} == {2}
    # executor settings are not part of a run's identity
    assert [r.run_id for r in experiment.runs] == [r.run_id for r in load_spec(spec, ["train.epochs=2"]).runs]


def test_loader_workers_are_not_part_of_a_run_s_identity(tmp_path):
    ids = {w: [r.run_id for r in load_spec(write_spec(tmp_path, workers=w)).runs] for w in (0, 2, 10)}
    assert ids[0] == ids[2] == ids[10]


@pytest.mark.parametrize("extra,message", [
    (", kind: slurmm", "executor.kind must be local, slurm, submitit_local, not 'slurmm'"),
    (", timeout_min: -5", "executor.timeout_min must be an integer >= 1, got -5"),
    (", slurm_array_parallelism: 0", "executor.slurm_array_parallelism must be an integer >= 1, got 0"),
    (", gpus_per_run: -1", "executor.gpus_per_run must be an integer >= 0, got -1"),
    (", max_num_timeout: -1", "executor.max_num_timeout must be an integer >= 0, got -1"),
    (", cpus_per_gpu: 0", "executor.cpus_per_gpu must be a positive integer or null (derived), got 0"),
    (", mem_gb: 0", "executor.mem_gb must be a positive integer or null (derived), got 0"),
    (", cpus_per_gpu: 4, cpus_per_task: 8", "executor.cpus_per_gpu and executor.cpus_per_task exclude each other"),
    (", slurm_partition: 'a b'", "executor.slurm_partition must be a name without spaces, got 'a b'"),
    (", sbatch: {mem: 10G}", "executor.sbatch.mem: dynexit sets --mem itself; use executor.mem_gb"),
    (", sbatch: {time: 10}", "executor.sbatch.time: dynexit sets --time itself; use executor.timeout_min"),
    (", sbatch: {qos: false}", "executor.sbatch.qos must be a value on one line (or true for a bare flag)"),
    (", sbatch: {'Bad Key': 1}", "executor.sbatch.Bad Key: not an sbatch option name"),
    (", setup: [\"a\\nb\"]", "executor.setup[0] must be one shell line"),
])
def test_every_executor_value_is_checked_by_a_dry_run(tmp_path, fake_slurm, capsys, extra, message):
    spec = write_spec(tmp_path)
    for item in extra[2:].split(", "):  # each key replaces the spec's own or joins the executor section
        key = item.split(":")[0]
        text = spec.read_text()
        replaced = re.sub(rf"\b{key}: [^,}}]*", item.replace("\\", "\\\\"), text)
        spec.write_text(replaced if replaced != text else text.replace("slurm_array_parallelism: 4",
                                                                       f"slurm_array_parallelism: 4, {item}"))
    assert main(["run", str(spec), "--dry-run"]) != 0
    err = capsys.readouterr().err
    assert message in err and str(spec) in err
    assert "(line 11)" in err or "Bad Key" in message
    assert not (tmp_path / "res").exists()


@pytest.mark.parametrize("option,message", [
    ("executor.kind=gpu", "--set: executor.kind must be local, slurm, submitit_local, not 'gpu'"),
    ("executor.nodes=0", "--set: executor.nodes must be an integer >= 1, got 0"),
    ("executor.timeout_min=0", "--set: executor.timeout_min must be an integer >= 1, got 0"),
    ("executor.gpu=2", "--set: key 'executor.gpu'"),
    ("executor=slurm", "--set executor=...: give one key at a time"),
])
def test_executor_values_given_by_set_are_checked_naming_set(tmp_path, capsys, option, message):
    assert main(["run", str(write_spec(tmp_path)), "--set", option, "--dry-run"]) != 0
    assert message in capsys.readouterr().err
    assert not (tmp_path / "res").exists()


def test_a_slurm_job_that_sees_no_gpu_fails_loudly(tmp_path, monkeypatch):
    from dynexit.runs import slurm

    experiment = load_spec(write_spec(tmp_path, gpus=2))
    job = RunJob.of(experiment, experiment.runs[0], [])
    ran = []
    monkeypatch.setattr(slurm, "execute", lambda e, run, devices: ran.append(devices))
    monkeypatch.setattr(slurm, "aggregate", lambda e: None)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    with pytest.raises(RuntimeError, match=r"asks for 2 GPU\(s\) \(executor.gpus_per_run\) and the job sees none"):
        job()
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(RuntimeError, match="wants 2 GPUs"):
        job()
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    job()
    assert ran == [["cuda:0", "cuda:1"]]
    cpu = load_spec(write_spec(tmp_path, gpus=0))  # a CPU job asks for no GPU
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    RunJob.of(cpu, cpu.runs[0], [])()
    assert ran[-1] == ["cpu"]


# --------------------------------------------------------------------------- runs across several nodes

def test_a_multi_node_run_is_one_job_of_n_nodes_with_a_task_per_gpu(tmp_path, fake_slurm):
    spec = write_spec(tmp_path, workers=2, gpus=8, extra=", nodes: 2")
    assert main(["run", str(spec)]) == 0
    calls = sbatch_calls(fake_slurm)
    assert len(calls) == 1 and calls[0]["tasks"] == 6  # still one array, one array task per run
    lines = calls[0]["file"].splitlines()
    assert "#SBATCH --array=0-5%4" in lines
    assert "#SBATCH --nodes=2" in lines
    assert "#SBATCH --ntasks-per-node=4" in lines and "#SBATCH --gpus-per-node=4" in lines  # 8 GPUs / 2 nodes
    assert "#SBATCH --cpus-per-task=3" in lines  # one process per task: 2 loader workers + 1
    assert "#SBATCH --mem=96GB" in lines  # per node: 8 GB x 3 CPUs x 4 tasks
    assert any(line.startswith("srun ") for line in lines)  # srun starts the 8 tasks
    assert any(line.startswith("#SBATCH --signal=USR2@") for line in lines)  # requeue stays on
    experiment = load_spec(spec)
    assert {read_status(run_dir(experiment, r))["state"] for r in experiment.runs} == {QUEUED}


def test_one_node_keeps_one_task_running_torchrun(tmp_path, fake_slurm):
    assert main(["run", str(write_spec(tmp_path, workers=2, gpus=4))]) == 0
    lines = sbatch_calls(fake_slurm)[0]["file"].splitlines()
    assert "#SBATCH --nodes=1" in lines and "#SBATCH --ntasks-per-node=1" in lines
    assert "#SBATCH --gpus-per-node=4" in lines and "#SBATCH --cpus-per-task=12" in lines


@pytest.mark.parametrize("gpus,extra,kind,message", [
    (8, ", nodes: 0", "slurm", "executor.nodes must be an integer >= 1, got 0"),
    (0, ", nodes: 2", "slurm", "executor.nodes=2 needs GPUs: executor.gpus_per_run is 0"),
    (6, ", nodes: 4", "slurm", "executor.gpus_per_run=6 cannot be split evenly over executor.nodes=4"),
    (8, ", nodes: 2", "submitit_local", "executor.nodes=2 needs executor.kind: slurm (submitit_local runs use one"),
    (8, ", nodes: 2, cpus_per_task: 2, cpus_per_gpu: 2", "slurm", "executor.cpus_per_gpu and executor.cpus_per_task "
                                                                 "exclude each other"),
])
def test_impossible_node_settings_are_refused_before_submitting(tmp_path, fake_slurm, capsys, gpus, extra, kind,
                                                                message):
    spec = write_spec(tmp_path, workers=2, gpus=gpus, extra=extra)
    spec.write_text(spec.read_text().replace("kind: slurm", f"kind: {kind}"))
    assert main(["run", str(spec)]) != 0
    assert message in capsys.readouterr().err
    assert sbatch_calls(fake_slurm) == [] and not (tmp_path / "res").exists()


def slurm_task(procid: int, localid: int, ntasks: int = 8, nodelist: str = "gpu[07-08]", job: str = "4711") -> dict:
    return {"SLURM_PROCID": str(procid), "SLURM_LOCALID": str(localid), "SLURM_NTASKS": str(ntasks),
            "SLURM_JOB_NODELIST": nodelist, "SLURM_JOB_ID": job}


def test_task_environment_of_task_5_of_8_on_2_nodes():
    task = task_environment(slurm_task(5, 1))
    assert (task.rank, task.local_rank, task.world_size, task.master_addr) == (5, 1, 8, "gpu07")
    assert MIN_PORT <= task.master_port < 65536 and task.master_port >= 1024
    # every task of the job meets at the same address and port
    tasks = [task_environment(slurm_task(p, p % 4)) for p in range(8)]
    assert {(t.master_addr, t.master_port) for t in tasks} == {("gpu07", task.master_port)}
    assert [t.rank for t in tasks] == list(range(8))
    # neighbouring jobs (array tasks may share a first node) get other ports
    assert task_environment(slurm_task(5, 1, job="4712")).master_port == task.master_port + 1
    assert task.torch_variables() == {"RANK": "5", "LOCAL_RANK": "1", "WORLD_SIZE": "8", "MASTER_ADDR": "gpu07",
                                      "MASTER_PORT": str(task.master_port)}
    # the task's GPU is its local rank among its node's GPUs (cuda:0 when SLURM bound one GPU to it)
    assert task_device(task.local_rank, 4) == "cuda:1"
    assert task_device(3, 4) == "cuda:3" and task_device(1, 1) == "cuda:0"
    with pytest.raises(RuntimeError, match="local rank 4 sees 4 GPU"):
        task_device(4, 4)
    with pytest.raises(RuntimeError, match="sees 0 GPU"):
        task_device(0, 0)


@pytest.mark.parametrize("nodelist,first", [("gpu[07-08]", "gpu07"), ("n[3,5-9],m1", "n3"), ("a,b", "a"),
                                            ("node12", "node12"), ("r[1-2]c[04-05]", "r1c04")])
def test_first_host_of_a_node_list(nodelist, first):
    assert first_host(nodelist) == first


def test_task_environment_refuses_what_is_not_a_task():
    env = slurm_task(5, 1)
    del env["SLURM_JOB_NODELIST"]
    with pytest.raises(RuntimeError, match="SLURM_JOB_NODELIST unset"):
        task_environment(env)
    with pytest.raises(ValueError, match="SLURM_PROCID=8, SLURM_LOCALID=0, SLURM_NTASKS=8 do not fit"):
        task_environment(slurm_task(8, 0))
    with pytest.raises(ValueError, match="SLURM_JOB_NODELIST='gpu\\[07': '\\[' without"):
        task_environment(slurm_task(0, 0, nodelist="gpu[07"))


def _task_worker(procid: int, job: str, out: str):
    task = task_environment(slurm_task(procid, procid, ntasks=2, nodelist="localhost", job=job))
    ctx = join_task_group(task, "cpu")
    total = ctx.all_reduce(torch.tensor([float(procid + 1)]))
    flag = ctx.broadcast_flag(procid == 0)  # rank 0's decision reaches rank 1
    torch.save({"rank": ctx.rank, "world": ctx.world_size, "sum": total, "flag": flag}, f"{out}.{procid}")
    ctx.close()


def test_two_tasks_of_one_node_join_one_gloo_group(tmp_path):
    """Two processes with the SLURM variables of a 1-node, 2-task job (forked: they start with this
    process's imports, so the test takes a second or two, not the import time of two interpreters)."""
    job = str(random.randrange(10**6, 10**7))  # a port unlikely to be taken by another test run
    start = time.monotonic()
    context = multiprocessing.get_context("fork")
    workers = [context.Process(target=_task_worker, args=(p, job, str(tmp_path / "task"))) for p in (0, 1)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(timeout=60)
    assert [w.exitcode for w in workers] == [0, 0]
    assert time.monotonic() - start < 20
    for procid in (0, 1):
        got = torch.load(f"{tmp_path / 'task'}.{procid}", weights_only=True)
        assert (got["rank"], got["world"], got["flag"]) == (procid, 2, True)
        assert torch.equal(got["sum"], torch.tensor([3.0]))


NODES_SPEC = """
name: nodes
results_dir: {out}
base:
  model: {{name: tiny_perceiver_t16, input_size: 16}}
  data: {{name: digits, image_size: 16, train_subset: 64, test_subset: 40, calib_size: 30, crop_padding: 0}}
  train: {{epochs: 1, batch_size: 16, progress: false, tensorboard: false}}
executor: {{kind: slurm, gpus_per_run: 2, nodes: 2}}
"""


def _run_job_task(procid: int, spec: str, run_id: str, job: str, out: str):
    """One srun task of a 2-node run's job, on the CPU (gloo) instead of its GPU."""
    import pickle

    from dynexit.runs import slurm

    os.environ.update(slurm_task(procid, 0, ntasks=2, nodelist="localhost", job=job))
    slurm.task_device = lambda local_rank, visible: "cpu"
    experiment = load_spec(spec)
    outcome = RunJob.of(experiment, experiment.run(run_id), [])()
    Path(f"{out}.{procid}").write_bytes(pickle.dumps(outcome))


def _two_tasks(spec: Path, run_id: str, out: Path) -> list:
    import pickle

    job = str(random.randrange(10**6, 10**7))
    context = multiprocessing.get_context("fork")
    workers = [context.Process(target=_run_job_task, args=(p, str(spec), run_id, job, str(out))) for p in (0, 1)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(timeout=120)
    assert [w.exitcode for w in workers] == [0, 0]
    return [pickle.loads(Path(f"{out}.{p}").read_bytes()) for p in (0, 1)]


@pytest.mark.usefixtures("one_torch_thread")
def test_the_tasks_of_a_multi_node_run_train_it_once_and_rank_0_keeps_its_folder(tmp_path):
    spec = tmp_path / "nodes.yaml"
    spec.write_text(textwrap.dedent(NODES_SPEC.format(out=tmp_path / "res")))
    experiment = load_spec(spec)
    run = experiment.runs[0]
    first, other = _two_tasks(spec, run.run_id, tmp_path / "first")
    assert first.state == "done" and other is None  # rank 0 reports the run; the other task returns nothing
    folder = run_dir(experiment, run)
    checkpoint = torch.load(folder / "checkpoint.pt", weights_only=True)
    assert checkpoint["world_size"] == 2 and checkpoint["epoch"] == 1  # trained by both tasks together
    assert read_status(folder)["state"] == "done" and read_status(folder)["devices"] == ["cpu"]
    assert (folder / "summary.json").is_file() and (tmp_path / "res" / "runs.csv").is_file()  # rank 0 evaluated
    # Again (a requeued job of a finished run): rank 0 tells the other task there is nothing to train.
    mtime = (folder / "checkpoint.pt").stat().st_mtime_ns
    first, other = _two_tasks(spec, run.run_id, tmp_path / "again")
    assert first.state == "done" and other is None
    assert (folder / "checkpoint.pt").stat().st_mtime_ns == mtime


def test_execute_tells_the_other_tasks_it_does_not_train_a_run_another_job_holds(tmp_path):
    from dynexit.runs.execute import execute
    from dynexit.runs.folders import run_lock

    spec = tmp_path / "nodes.yaml"
    spec.write_text(textwrap.dedent(NODES_SPEC.format(out=tmp_path / "res")))
    experiment = load_spec(spec)
    run = experiment.runs[0]
    heard = []
    with run_lock(run_dir(experiment, run)) as acquired:  # another job's rank 0 holds the run
        assert acquired
        outcome = execute(experiment, run, ["cpu"], heard.append)
    assert outcome.state == "running" and heard == [False]
    assert not (run_dir(experiment, run) / "checkpoint.pt").exists()
