"""Every execution path sees exactly the GPUs it was given (torch.cuda mocked: there is no GPU here), GPUs are
locked per device across dynexit processes, a worker that hits a CUDA error is replaced, and thread counts
follow the process's CPU affinity."""
import fcntl
import multiprocessing as mp
import queue as queue_module
import threading
import time
from types import SimpleNamespace

import pytest

from dynexit.config import RunConfig
from dynexit.runs import devices as dev
from dynexit.runs import pipeline, runner
from dynexit.runs.execute import Outcome
from dynexit.runs.folders import DONE, FAILED


def test_children_see_the_parents_devices(monkeypatch):
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    assert dev.device_environment(["cuda:4", "cuda:5"]) == {"CUDA_VISIBLE_DEVICES": "4,5"}
    assert dev.device_environment(["cpu"]) == {"CUDA_VISIBLE_DEVICES": ""}
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,3,4,5,6,7")  # this process is restricted already
    assert dev.device_environment(["cuda:4", "cuda:5"]) == {"CUDA_VISIBLE_DEVICES": "6,7"}
    assert runner.worker_environment(["cuda:0"]) == {"CUDA_VISIBLE_DEVICES": "2"}
    with pytest.raises(ValueError, match="cuda:6 does not exist: CUDA_VISIBLE_DEVICES=2,3,4,5,6,7 shows 6"):
        dev.physical_ids(["cuda:6"])


@pytest.mark.parametrize("visible,expected", [(None, "4,5,6,7"), ("0,1,2,3,8,9,10,11", "8,9,10,11")])
def test_a_torchrun_group_trains_on_its_own_gpus(tmp_path, monkeypatch, visible, expected):
    if visible is None:
        monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    else:
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", visible)
    launched = []
    monkeypatch.setattr(pipeline.subprocess, "run", lambda cmd, check, env: launched.append((cmd, env)))
    pipeline._train(RunConfig(), tmp_path, ["cuda:4", "cuda:5", "cuda:6", "cuda:7"])
    (cmd, env), = launched
    assert "--nproc_per_node=4" in cmd and env["CUDA_VISIBLE_DEVICES"] == expected
    assert cmd[cmd.index("--device") + 1] == "cuda"  # torchrun's ranks that see no GPU fail, never train on the CPU


def test_a_process_asked_for_a_gpu_that_sees_none_fails(monkeypatch):
    import torch

    from dynexit.training.distributed import setup

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match="device cuda requested, but CUDA is not available"):
        setup("cuda")


def test_one_group_of_four_gpus_runs_in_this_process_on_those_gpus(monkeypatch, tmp_path):
    """--devices cuda:4,...,7 with gpus_per_run 4: the run gets exactly those devices (and their locks)."""
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path))
    monkeypatch.setattr("torch.cuda.device_count", lambda: 8)
    monkeypatch.setattr("torch.cuda.get_device_properties", lambda i: SimpleNamespace(uuid=f"uuid-of-{i}"))
    groups = runner.plan_workers("cuda:4,cuda:5,cuda:6,cuda:7", None, 8, 4)
    assert groups == [["cuda:4", "cuda:5", "cuda:6", "cuda:7"]]
    assert dev.lock_names(groups[0]) == ["GPU-uuid-of-4", "GPU-uuid-of-5", "GPU-uuid-of-6", "GPU-uuid-of-7"]


def test_gpu_locks_are_keyed_by_uuid_not_by_the_index_a_process_sees(monkeypatch, tmp_path):
    """Two SLURM jobs on one node each see their GPU as cuda:0 (cgroups): different GPUs, different locks;
    two processes that see one GPU under different indices share its lock."""
    import torch

    def sees(uuids):  # the GPUs this process sees, in its own index order
        monkeypatch.setattr(torch.cuda, "get_device_properties", lambda i: SimpleNamespace(uuid=uuids[i]))

    sees(["GPU-aaaa"])
    job_a = dev.lock_names(["cuda:0"])
    sees(["GPU-bbbb"])
    job_b = dev.lock_names(["cuda:0"])
    assert job_a == ["GPU-aaaa"] and job_b == ["GPU-bbbb"]
    sees(["MIG-cccc", "GPU-aaaa"])
    assert dev.lock_names(["cuda:1", "cuda:0"]) == ["GPU-aaaa", "MIG-cccc"]
    assert dev.lock_names(["cpu"]) == []
    with dev.device_locks(job_a, tmp_path):
        with dev.device_locks(job_b, tmp_path):  # the other GPU: no wait
            pass
        with open(tmp_path / "gpu-GPU-aaaa.lock", "a") as fh, pytest.raises(BlockingIOError):
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)  # the same GPU, whatever index: held


def test_the_runner_reads_the_uuids_before_a_worker_narrows_its_devices(tmp_path, monkeypatch):
    """The locks a worker holds come from its parent (a worker reading them would initialise CUDA before its
    CUDA_VISIBLE_DEVICES is narrowed); the pool hands each worker its group's UUIDs."""
    import torch

    fork = mp.get_context("fork")
    monkeypatch.setattr(runner.mp, "get_context", lambda kind: fork)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda i: SimpleNamespace(uuid=f"uuid-{i}"))
    started = []
    monkeypatch.setattr(fork, "Process", lambda target, args: started.append(args) or SimpleNamespace(
        start=lambda: None, is_alive=lambda: False, exitcode=0, join=lambda: None))
    experiment = SimpleNamespace(path=tmp_path / "spec.yaml", results_dir=tmp_path, raw={})
    runner._run_pool(experiment, [SimpleNamespace(run_id="a")], [["cuda:0"], ["cuda:1"]], [],
                     runner.Progress(1, 0, 1, 2))
    assert [(args[4], args[6]) for args in started] == [(["cuda:0"], ["GPU-uuid-0"]), (["cuda:1"], ["GPU-uuid-1"])]


def test_a_gpu_is_locked_while_a_run_uses_it(tmp_path):
    with dev.device_locks(["3", "1"], tmp_path):
        for name in ("1", "3"):
            with open(tmp_path / f"gpu-{name}.lock", "a") as fh, pytest.raises(BlockingIOError):
                fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        with open(tmp_path / "gpu-2.lock", "a") as fh:  # another GPU is free
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        waited = []

        def second():
            start = time.monotonic()
            with dev.device_locks(["3"], tmp_path):
                waited.append(time.monotonic() - start)

        t = threading.Thread(target=second)
        t.start()
        time.sleep(0.5)
        assert not waited  # the second user of GPU 3 waits
    t.join(5)
    assert waited and waited[0] >= 0.4


def test_lock_dir_is_per_user(monkeypatch, tmp_path):
    monkeypatch.delenv("XDG_RUNTIME_DIR", raising=False)
    monkeypatch.setattr(dev.tempfile, "gettempdir", lambda: str(tmp_path))
    folder = dev.lock_dir()
    assert folder == tmp_path / f"dynexit-{__import__('os').getuid()}" and folder.stat().st_mode & 0o777 == 0o700


def test_cuda_errors_are_recognised():
    assert dev.is_cuda_error("RuntimeError: CUDA error: an illegal memory access was encountered")
    assert dev.is_cuda_error("RuntimeError: cuDNN error: CUDNN_STATUS_INTERNAL_ERROR")
    assert not dev.is_cuda_error("ValueError: train.lr must be > 0")


def _fake_experiment(tmp_path):
    return SimpleNamespace(path=tmp_path / "spec.yaml", results_dir=tmp_path, raw={},
                           run=lambda run_id: SimpleNamespace(run_id=run_id))


def test_a_worker_stops_after_a_cuda_error(tmp_path, monkeypatch):
    monkeypatch.setattr(runner, "reload_spec", lambda *a: _fake_experiment(tmp_path))
    monkeypatch.setattr(runner, "aggregate", lambda e: None)
    monkeypatch.setattr(runner, "execute", lambda e, run, d: Outcome(run.run_id, FAILED, "RuntimeError: CUDA error: x"))
    q, results = queue_module.Queue(), queue_module.Queue()
    for item in ("a", "b", None):
        q.put(item)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path))
    with pytest.raises(SystemExit) as stop:
        runner._worker({}, "spec.yaml", [], str(tmp_path), ["cuda:1"], {"CUDA_VISIBLE_DEVICES": "1"}, ["GPU-x"], q,
                       results)
    assert stop.value.code == runner.RETIRED
    assert results.get_nowait().run_id == "a" and q.get_nowait() == "b"  # the next run waits for a new worker


def test_the_pool_replaces_a_worker_that_hit_a_cuda_error(tmp_path, monkeypatch):
    """Forked workers (so the stand-ins below reach them): the first run fails with a CUDA error, its worker
    exits, a new process on the same device runs the other runs."""
    fork = mp.get_context("fork")
    monkeypatch.setattr(runner.mp, "get_context", lambda kind: fork)
    monkeypatch.setattr(runner, "reload_spec", lambda *a: _fake_experiment(tmp_path))
    monkeypatch.setattr(runner, "aggregate", lambda e: None)
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path))

    def execute(experiment, run, devices):
        import os
        marker = tmp_path / "broken"
        if not marker.exists():
            marker.write_text(str(os.getpid()))
            return Outcome(run.run_id, FAILED, "RuntimeError: CUDA error: device-side assert triggered")
        return Outcome(run.run_id, DONE, str(os.getpid()))

    monkeypatch.setattr(runner, "execute", execute)
    todo = [SimpleNamespace(run_id=r) for r in ("a", "b", "c")]
    outcomes = runner._run_pool(_fake_experiment(tmp_path), todo, [["cpu"]], [], runner.Progress(3, 0, 3, 1))
    assert [o.state for o in outcomes] == [FAILED, DONE, DONE]
    broken_pid = (tmp_path / "broken").read_text()
    assert {o.error for o in outcomes[1:]} != {broken_pid}  # the other runs ran in a new process


def test_threads_follow_the_cpu_affinity(monkeypatch):
    monkeypatch.setattr(dev.os, "sched_getaffinity", lambda pid: {2, 3, 5})
    assert dev.available_cores() == 3
