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
