"""Two processes under torchrun (gloo, CPU) train exactly what one process trains on the combined batch.

BatchNorm: with two processes each sees half the batch, so BN batch statistics differ from the
combined batch's. torch's SyncBatchNorm would restore equality but runs on CUDA only (its kernels,
e.g. ``batch_norm_stats``, have no CPU implementation), so the runs use ``train.freeze_bn`` (BN
normalises with its running statistics): every sample's gradient is then independent of how the
batch is split, and equality tests what the DDP code is responsible for: the sharding (each sample
seen once), gradient averaging against the loss's batch mean, schedule, optimizer, EMA, the rank-0
checkpoint, and metrics reduced across ranks.

AdamW's eps is 1e-3: parameters whose gradient is structurally zero (a bias followed by a
normalisation) get float noise (~1e-8) that depends on summation order, which Adam with eps=1e-8 would
turn into full-size steps of random sign; with 1e-3 the update stays proportional to it.

Each epoch is one optimizer step over the whole training subset (64 images: 2 x 32 per process, or
1 x 64), so the combined batch is the same set of samples in both runs whatever the shuffling.
"""
import os
import subprocess
import sys

import pandas as pd
import pytest
import torch
from omegaconf import OmegaConf

from dynexit.config import RunConfig, merge, resolve_model, save_yaml
from dynexit.models import build_model
from dynexit.training import train

COMPARED = ["train_loss", "train_acc_merge", "train_loss_early3", "test_loss_merge", "test_acc_merge",
            "test_acc_early3", "calib_loss_cnn", "ema_test_loss_att"]


def config(batch_size: int) -> RunConfig:
    return merge(RunConfig, {
        # 32 px: the first two x2z maps (32x32, cells of 8) train through the pooled depthwise backward.
        "model": {"name": "tiny_perceiver_t16", "input_size": 32},
        "data": {"name": "digits", "image_size": 32, "train_subset": 64, "test_subset": 40, "calib_size": 30,
                 "crop_padding": 0},
        "train": {"epochs": 3, "batch_size": batch_size, "lr": 2e-3, "eps": 1e-3, "freeze_bn": True,
                  "progress": False, "tensorboard": False},
    }, OmegaConf.create({}))


@pytest.mark.usefixtures("one_torch_thread")  # tiny model: see conftest.py
def test_two_processes_equal_one_process_on_the_combined_batch(tmp_path):
    path = tmp_path / "ddp.yaml"
    save_yaml(config(32), path)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "dynexit", "train", str(path), "--out", str(tmp_path / "ddp"), "--device", "cpu"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    single = train(config(64), tmp_path / "single", device="cpu")

    ddp_ckpt = torch.load(tmp_path / "ddp" / "checkpoint.pt", weights_only=True)
    one_ckpt = torch.load(single.checkpoint, weights_only=True)
    assert ddp_ckpt["world_size"] == 2 and ddp_ckpt["step"] == one_ckpt["step"] == 3
    assert len(ddp_ckpt["rng"]) == 2  # each process's RNG state, for an exact resume
    for part in ("model", "ema"):
        for key, value in one_ckpt[part].items():
            other = ddp_ckpt[part][key]
            diff = (other.double() - value.double()).abs().max().item()
            assert torch.allclose(other.double(), value.double(), rtol=1e-4, atol=2e-5), f"{part}.{key}: {diff}"
    # Not trivially equal: the weights moved away from their initial values.
    torch.manual_seed(0)
    init = dict(build_model(resolve_model(config(64).model)).named_parameters())
    moved = [k for k, v in init.items() if not torch.allclose(v, one_ckpt["model"][k])]
    assert len(moved) > 0.9 * len(init)

    ddp_rows, one_rows = pd.read_csv(tmp_path / "ddp" / "metrics.csv"), pd.read_csv(single.metrics_csv)
    pd.testing.assert_frame_equal(ddp_rows[COMPARED], one_rows[COMPARED], rtol=1e-4, atol=1e-5)


def _ddp_within_epoch_worker(rank: int, init_file: str, folder: str, keep: str, minutes):
    """One of two processes (gloo) training config(16) for 2 epochs of 2 steps each, host syncs every step,
    checkpoints within epochs when ``minutes`` is set; rank 0 keeps a copy of the checkpoint written after
    the first batch of epoch 2 in ``keep``."""
    import shutil

    import dynexit.models.checkpoint
    import dynexit.training.loop as loop

    torch.set_num_threads(1)
    loop.LOG_EVERY = 1
    save = dynexit.models.checkpoint.save_model

    def save_and_keep(path, model, **extra):
        save(path, model, **extra)
        if keep and (extra["epoch"], extra.get("batch")) == (1, 1):
            shutil.copy(path, keep)

    dynexit.models.checkpoint.save_model = save_and_keep
    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    cfg = config(16)
    cfg.train.epochs, cfg.train.checkpoint_minutes = 2, minutes
    try:
        train(cfg, folder, device="cpu")
    finally:
        torch.distributed.destroy_process_group()


@pytest.mark.usefixtures("one_torch_thread")
def test_two_processes_checkpoint_within_an_epoch_and_resume_there_to_the_bit(tmp_path):
    """Two processes agree on when to checkpoint within an epoch (rank 0's clock) and save every rank's random
    state; a pair resumed from the checkpoint after batch 1 of epoch 2 ends with the weights and metrics of
    the pair never stopped, and of a pair that never checkpointed within an epoch."""
    import shutil

    import torch.multiprocessing as tmp

    keep = tmp_path / "within.pt"
    runs = {"plain": None, "within": 1e-9}
    for name, minutes in runs.items():
        tmp.spawn(_ddp_within_epoch_worker, nprocs=2, join=True,
                  args=(str(tmp_path / f"init_{name}"), str(tmp_path / name), str(keep) if minutes else "", minutes))
    ckpt = torch.load(keep, weights_only=True)
    assert (ckpt["epoch"], ckpt["batch"], ckpt["world_size"], len(ckpt["rng"])) == (1, 1, 2, 2)
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    for name in ("config.yaml", "calib_indices.json", "metrics.csv"):
        shutil.copy(tmp_path / "within" / name, resumed / name)
    shutil.copy(keep, resumed / "checkpoint.pt")
    tmp.spawn(_ddp_within_epoch_worker, nprocs=2, join=True,
              args=(str(tmp_path / "init_resumed"), str(resumed), "", 1e-9))
    plain = torch.load(tmp_path / "plain" / "checkpoint.pt", weights_only=True)
    for name in ("within", "resumed"):
        other = torch.load(tmp_path / name / "checkpoint.pt", weights_only=True)
        assert other["step"] == plain["step"] == 4
        for part in ("model", "ema"):
            assert all(torch.equal(plain[part][k], other[part][k]) for k in plain[part]), (name, part)
        rows = pd.read_csv(tmp_path / name / "metrics.csv").drop(columns="epoch_time")
        pd.testing.assert_frame_equal(rows, pd.read_csv(tmp_path / "plain" / "metrics.csv").drop(columns="epoch_time"))
