"""Runs an experiment's runs as SLURM jobs through submitit (``executor.kind: slurm``), or as local
processes through submitit's local executor (``submitit_local``, for testing the same path).

One submission is one job array (``executor.batch()``), so ``slurm_array_parallelism`` bounds how many runs
the scheduler runs at once. The command returns once the array is submitted: each run's job id is kept in its
``status.json`` (state "queued"), ``dynexit status`` asks the scheduler (``sacct``) for the state of those ids,
and a later ``dynexit run`` submits nothing for a run whose job is still queued or running.

A job that reaches its time limit or is preempted is requeued by submitit: the submitted callable is
checkpointable (:class:`RunJob`), and the requeued job resumes the run from its folder's checkpoint.

Resources are derived from the run unless the spec gives them, and the derived ones fit an 8-GPU node: each
training process (one per GPU, ``executor.gpus_per_run``) gets ``cpus_per_gpu`` CPUs, by default one per loader
worker (``data.num_workers``) plus one for itself, at most ``MAX_CPUS_PER_GPU`` (8: 64 CPUs for 8 GPUs); memory
(``executor.mem_gb``, per node) is 8 GB per CPU (512 GB for 64 CPUs). ``executor.cpus_per_gpu`` or
``executor.cpus_per_task`` and ``executor.mem_gb`` set them. A process with fewer CPUs than its loaders ask for
starts fewer workers (``dynexit.data.loaders.loader_workers``): loader workers change the speed, never the
numbers, so they are not part of a run's identity. On one node, one run is one task (torchrun inside it for
several GPUs). ``executor.max_num_timeout`` bounds how often a job that reaches its time limit is requeued;
``executor.sbatch`` passes any other sbatch option (qos, constraint, gres, ...) and ``executor.setup`` the shell
lines the job runs first (module load, conda activate).

The job runs what was submitted: each job carries the spec as it was read at submission (and the ``--set``
options), so editing the spec file afterwards changes neither a queued job nor a requeued one.

A run on several nodes (``executor.nodes`` N > 1, ``slurm`` only, ``gpus_per_run`` a multiple of N) is one
job of N nodes with one task per GPU (``gpus_per_run / N`` per node), started by srun; every task is one
training process of one process group (no torchrun): :func:`task_environment` reads its rank from SLURM's
variables, the master is the first node of the job, the port follows from the job id. Rank 0 alone keeps
the run's folder state, writes outputs (as under torchrun) and evaluates; it tells the others whether to
train at all (the run may be done, or locked by another job). Resources are then per task: ``cpus_per_task
= w + 1`` and ``mem_gb`` (per node) ``= 8 x cpus_per_task x tasks per node``.
"""
from __future__ import annotations

import copy
import logging
import os
import re
import subprocess
import time
from collections.abc import Mapping
from dataclasses import dataclass

import submitit
from submitit.slurm.slurm import SlurmInfoWatcher

from dynexit.runs.aggregate import aggregate
from dynexit.runs.execute import execute
from dynexit.runs.folders import QUEUED, read_status, run_dir, write_status
from dynexit.runs.spec import ExecutorConfig, Experiment, Run, reload_spec, validate_executor

log = logging.getLogger(__name__)

GB_PER_CPU = 8
MAX_CPUS_PER_GPU = 8  # derived CPUs per training process: 8 GPUs x 8 = 64, what an 8-GPU node offers
# Scheduler states of a job that will still run (or is running): its run is not submitted again.
LIVE_STATES = ("PENDING", "RUNNING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED", "RESIZING", "SUSPENDED",
               "CONFIGURING", "COMPLETING", "STAGE_OUT", "SIGNALING", "PREEMPTED")


class RunJob(submitit.helpers.Checkpointable):
    """What one job runs: the run (with its own thread count, ``train.threads``), then the experiment's
    aggregate files. It holds the spec as read at submission (``raw``, the mapping of the spec file, and the
    ``--set`` options): the job expands that, never the file again. On a time limit or preemption submitit
    calls :meth:`checkpoint` and requeues the job; the run then resumes from the last checkpoint in its folder."""

    def __init__(self, raw: dict, spec_path: str, overrides: list[str], results_dir: str, run_id: str):
        self.raw, self.spec_path, self.overrides = raw, spec_path, overrides
        self.results_dir, self.run_id = results_dir, run_id

    @classmethod
    def of(cls, experiment: Experiment, run: Run, overrides: list[str] | None) -> RunJob:
        """The job of ``run``, capturing its experiment's spec as it is now."""
        return cls(copy.deepcopy(experiment.raw), str(experiment.path), list(overrides or []),
                   str(experiment.results_dir), run.run_id)

    def experiment(self) -> Experiment:
        """The experiment as submitted (``KeyError`` naming the run if it no longer expands to it)."""
        experiment = reload_spec(self.raw, self.spec_path, self.overrides, self.results_dir)
        experiment.run(self.run_id)
        return experiment

    def __call__(self):
        import torch

        experiment = self.experiment()
        if experiment.executor.nodes > 1:
            return self._task(experiment)
        n = torch.cuda.device_count()
        gpus = experiment.executor.gpus_per_run
        if gpus and not n and experiment.executor.kind == "slurm":
            raise RuntimeError(f"run {self.run_id} asks for {gpus} GPU(s) (executor.gpus_per_run) and the job sees "
                               f"none (CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')!r}): "
                               f"not training on the CPU instead; set executor.gpus_per_run=0 for a CPU job")
        if n and n < gpus:
            raise RuntimeError(f"run {self.run_id} wants {gpus} GPUs (executor.gpus_per_run), the job sees {n}")
        # submitit_local jobs run on this machine: its GPUs when it has them, else the CPU (as --devices auto)
        devices = [f"cuda:{i}" for i in range(gpus)] if gpus and n else ["cpu"]
        outcome = execute(experiment, experiment.run(self.run_id), devices)
        aggregate(experiment)
        return outcome

    def _task(self, experiment: Experiment):
        """One task of a multi-node run: joins the run's process group on its GPU; rank 0 executes the run
        (and tells the others whether it trains), the others train with it. Returns rank 0's outcome."""
        import torch

        from dynexit.training import train

        task = task_environment()
        device = task_device(task.local_rank, torch.cuda.device_count())
        run = experiment.run(self.run_id)
        ctx = join_task_group(task, device, run.config.train.dist_timeout_min)
        try:
            if not ctx.is_main:
                if ctx.broadcast_flag(False):
                    train(run.config, run_dir(experiment, run), device=device, resume=True)
                return None
            told = []

            def trains(flag: bool) -> None:
                told.append(flag)
                ctx.broadcast_flag(flag)

            try:
                outcome = execute(experiment, run, [device], trains)
            finally:
                if not told:  # execute failed before deciding: the others must not wait for a decision
                    ctx.broadcast_flag(False)
            aggregate(experiment)
            return outcome
        finally:
            ctx.close()

    def checkpoint(self, *args, **kwargs) -> submitit.helpers.DelayedSubmission:
        """The same run again: training state lives in the run folder, not in this object."""
        return submitit.helpers.DelayedSubmission(RunJob(self.raw, self.spec_path, self.overrides,
                                                         self.results_dir, self.run_id))


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", str(text)).strip("_") or "x"


def job_name(experiment: Experiment, run: Run) -> str:
    """``dynexit-<experiment>-<variant>-s<seed>-<run_id>``: which run a job is, as squeue shows it."""
    return f"dynexit-{_slug(experiment.name)}-{_slug(run.variant)}-s{run.config.seed}-{run.run_id}"


def job_layout(ex: ExecutorConfig) -> dict:
    """``nodes``, ``tasks_per_node`` and ``gpus_per_node`` of one run's job; an impossible combination of
    ``executor.nodes``, ``kind`` and ``gpus_per_run`` is a ValueError naming the key."""
    validate_executor(ex)
    nodes, gpus = ex.nodes, ex.gpus_per_run
    if nodes == 1:
        return {"nodes": 1, "tasks_per_node": 1, "gpus_per_node": gpus}
    return {"nodes": nodes, "tasks_per_node": gpus // nodes, "gpus_per_node": gpus // nodes}


def job_resources(experiment: Experiment, runs: list[Run]) -> dict:
    """``cpus_per_task`` and ``mem_gb`` (per node) for the runs' jobs (the module docstring gives the rule);
    an explicit setting that leaves a training process without a CPU is a ValueError naming the key."""
    ex = experiment.executor
    layout = job_layout(ex)
    workers = max(r.config.data.num_workers for r in runs)
    # processes per task: one task runs torchrun's processes on one node, or is one process of a multi-node run
    processes = 1 if ex.nodes > 1 else max(1, ex.gpus_per_run)
    if ex.cpus_per_task is not None:
        cpus = ex.cpus_per_task
        if cpus < processes:
            raise ValueError(f"executor.cpus_per_task={cpus} leaves {processes} training process(es) less than a "
                             f"CPU each; give at least {processes}, or executor.cpus_per_gpu")
    else:
        per_process = ex.cpus_per_gpu if ex.cpus_per_gpu is not None else min(workers + 1, MAX_CPUS_PER_GPU)
        cpus = processes * per_process
    if cpus // processes < workers + 1:
        log.info("%d CPU(s) per training process: its loaders start %d worker(s) instead of data.num_workers=%d "
                 "(the same numbers, at the speed those CPUs give)", cpus // processes, cpus // processes - 1, workers)
    mem = ex.mem_gb if ex.mem_gb is not None else GB_PER_CPU * cpus * layout["tasks_per_node"]
    return {"cpus_per_task": int(cpus), "mem_gb": int(mem)}


def make_executor(experiment: Experiment, runs: list[Run]):
    """A submitit executor for the runs (its files under ``<results_dir>/submitit/``)."""
    ex = experiment.executor
    cluster = "local" if ex.kind == "submitit_local" else "slurm"
    executor = submitit.AutoExecutor(folder=experiment.results_dir / "submitit" / "%j", cluster=cluster,
                                     slurm_max_num_timeout=ex.max_num_timeout)
    resources, layout = job_resources(experiment, runs), job_layout(ex)
    name = job_name(experiment, runs[0]) if len(runs) == 1 else f"dynexit-{_slug(experiment.name)}"
    params = {"timeout_min": ex.timeout_min, "name": name, "cpus_per_task": resources["cpus_per_task"],
              "gpus_per_node": layout["gpus_per_node"] if cluster == "slurm" else 0}
    if cluster == "slurm":
        params.update(mem_gb=resources["mem_gb"], slurm_array_parallelism=ex.slurm_array_parallelism,
                      tasks_per_node=layout["tasks_per_node"], nodes=layout["nodes"])
        if ex.slurm_partition:
            params["slurm_partition"] = ex.slurm_partition
        if ex.slurm_account:
            params["slurm_account"] = ex.slurm_account
        if ex.sbatch:
            params["slurm_additional_parameters"] = {str(k).replace("-", "_"): v for k, v in ex.sbatch.items()}
        if ex.setup:
            params["slurm_setup"] = list(ex.setup)
    executor.update_parameters(**params)
    return executor


def submit(experiment: Experiment, runs: list[Run], overrides: list[str] | None, progress=None,
           wait: bool = False):
    """Submits the runs as one job array and records each run's job id in its ``status.json``. With
    ``wait``, waits for the jobs and returns their outcomes (``progress``, a ``dynexit.runs.runner.Progress``,
    hears of each); without, returns [] once submitted."""
    if experiment.path is None:
        raise ValueError("SLURM runs need the experiment to come from a spec file")
    executor = make_executor(experiment, runs)
    with executor.batch():
        jobs = [executor.submit(RunJob.of(experiment, run, overrides)) for run in runs]
    for run, job in zip(runs, jobs):
        folder = run_dir(experiment, run)
        folder.mkdir(parents=True, exist_ok=True)
        write_status(folder, QUEUED, job_id=str(job.job_id), scheduler=experiment.executor.kind,
                     job_name=job_name(experiment, run), submitted=time.strftime("%Y-%m-%dT%H:%M:%S"),
                     variant=run.variant, overrides=run.overrides, error="")
    log.info("submitted %d runs as one job array (%s): %s", len(jobs), experiment.executor.kind,
             ", ".join(f"{r.run_id}={j.job_id}" for r, j in zip(runs[:8], jobs[:8])))
    if not wait:
        return []
    outcomes = []
    for job in jobs:
        outcome = job.results()[0]  # a multi-node run's job has a result per task: rank 0's is the run's
        outcomes.append(progress.finished(outcome) if progress is not None else outcome)
    return outcomes


# --------------------------------------------------------------------------- one task of a multi-node run

TASK_VARIABLES = ("SLURM_PROCID", "SLURM_LOCALID", "SLURM_NTASKS", "SLURM_JOB_NODELIST", "SLURM_JOB_ID")
MIN_PORT, PORT_SPAN = 20000, 40000  # master ports: 20000..59999, above the usual service ports


@dataclass(frozen=True)
class TaskEnvironment:
    rank: int
    local_rank: int
    world_size: int
    master_addr: str
    master_port: int

    def torch_variables(self) -> dict[str, str]:
        """The variables torch.distributed's env:// initialisation (and ``training.distributed.setup``) reads."""
        return {"RANK": str(self.rank), "LOCAL_RANK": str(self.local_rank), "WORLD_SIZE": str(self.world_size),
                "MASTER_ADDR": self.master_addr, "MASTER_PORT": str(self.master_port)}


def task_environment(environ: Mapping[str, str] | None = None) -> TaskEnvironment:
    """This SLURM task's place in its job's process group, from SLURM's variables (``environ``, default this
    process's): rank ``SLURM_PROCID``, local rank ``SLURM_LOCALID``, world size ``SLURM_NTASKS``, master the
    first host of ``SLURM_JOB_NODELIST`` (where task 0 runs), port :func:`master_port` of ``SLURM_JOB_ID``."""
    env = os.environ if environ is None else environ
    missing = [k for k in TASK_VARIABLES if not env.get(k)]
    if missing:
        raise RuntimeError(f"not inside a SLURM task: {', '.join(missing)} unset (a task of a multi-node run "
                           f"reads its rank and its group's master from them)")
    try:
        rank, local, world = (int(env[k]) for k in TASK_VARIABLES[:3])
    except ValueError:
        raise ValueError("SLURM_PROCID, SLURM_LOCALID and SLURM_NTASKS must be integers, got "
                         f"{[env[k] for k in TASK_VARIABLES[:3]]}") from None
    if not 0 <= rank < world or not 0 <= local <= rank:
        raise ValueError(f"SLURM_PROCID={rank}, SLURM_LOCALID={local}, SLURM_NTASKS={world} do not fit together")
    return TaskEnvironment(rank, local, world, first_host(env["SLURM_JOB_NODELIST"]),
                           master_port(env["SLURM_JOB_ID"]))


def master_port(job_id: str) -> int:
    """The process group's port: the same for every task of a job, and different for jobs whose ids are
    closer than ``PORT_SPAN`` (neighbouring array tasks may share their first node)."""
    if not str(job_id).isdigit():
        raise ValueError(f"SLURM_JOB_ID must be a number, got {job_id!r}")
    return MIN_PORT + int(job_id) % PORT_SPAN


def first_host(nodelist: str) -> str:
    """The first host of a SLURM node list: ``gpu[07-08,11],cpu01`` -> ``gpu07``, ``a,b`` -> ``a``."""
    host, i = "", 0
    while i < len(nodelist) and nodelist[i] != ",":
        if nodelist[i] == "[":
            end = nodelist.find("]", i)
            if end < 0:
                raise ValueError(f"SLURM_JOB_NODELIST={nodelist!r}: '[' without ']'")
            host += nodelist[i + 1:end].split(",")[0].split("-")[0]  # a range's first number, padding kept
            i = end + 1
        else:
            host += nodelist[i]
            i += 1
    if not host:
        raise ValueError(f"SLURM_JOB_NODELIST={nodelist!r} names no host")
    return host


def task_device(local_rank: int, visible: int) -> str:
    """The GPU of the task with ``local_rank`` among the ``visible`` GPUs it sees: ``cuda:<local rank>`` when
    the task sees its node's GPUs, ``cuda:0`` when SLURM bound one GPU to each task."""
    if visible == 1:
        return "cuda:0"
    if not 0 <= local_rank < visible:
        raise RuntimeError(f"task with local rank {local_rank} sees {visible} GPU(s); a multi-node run needs "
                           f"one GPU per task (executor.gpus_per_run / executor.nodes per node)")
    return f"cuda:{local_rank}"


def join_task_group(task: TaskEnvironment, device: str, timeout_min: float | None = None):
    """Joins the run's process group as ``task`` on ``device`` (NCCL on CUDA, gloo on the CPU); the
    returned ``DistContext`` closes it. The variables stay set for the training loop, which joins the group.
    ``timeout_min``: how long collectives wait for the other tasks (``train.dist_timeout_min``)."""
    from dynexit.training.distributed import setup

    os.environ.update(task.torch_variables())
    ctx = setup(device, timeout_min=timeout_min)
    log.info("task %d of %d (local rank %d) on %s, master %s:%d", task.rank, task.world_size, task.local_rank,
             device, task.master_addr, task.master_port)
    return ctx


# --------------------------------------------------------------------------- the scheduler's view

def scheduler_states(job_ids: list[str]) -> dict[str, str]:
    """The scheduler's state of each job id (one ``sacct`` call; ``UNKNOWN`` for an id it does not list).
    Raises FileNotFoundError when there is no ``sacct`` (not on a SLURM machine)."""
    ids = sorted({str(j) for j in job_ids if j})
    if not ids:
        return {}
    command = ["sacct", "-o", "JobID,State", "--parsable2"]
    for main_id in sorted({j.split("_")[0] for j in ids}):
        command += ["-j", main_id]
    try:
        output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
    except FileNotFoundError:
        raise FileNotFoundError("sacct not found: the scheduler's state of SLURM jobs needs a SLURM machine") from None
    info = SlurmInfoWatcher().read_info(output)
    # "CANCELLED by 123" -> "CANCELLED"
    return {j: info.get(j, {}).get("State", "UNKNOWN").split(" ")[0] for j in ids}


def live_job_ids(experiment: Experiment, runs: list[Run]) -> dict[str, str]:
    """``{run_id: job_id}`` for the runs whose SLURM job will still run or is running (a job the scheduler
    reports as finished, failed, timed out, cancelled or does not know is not live)."""
    if experiment.executor.kind != "slurm":
        return {}
    recorded = {r.run_id: read_status(run_dir(experiment, r)).get("job_id") for r in runs}
    recorded = {k: v for k, v in recorded.items() if v}
    if not recorded:
        return {}
    states = scheduler_states(list(recorded.values()))
    return {run_id: job for run_id, job in recorded.items() if states.get(job) in LIVE_STATES}
