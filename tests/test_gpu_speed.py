"""The GPU speed settings, checked for what they configure (no GPU here) or run on the CPU where torch allows:
fast kernels unless deterministic, bf16/fp16 autocast (fp16 with a gradient scaler), BatchNorm statistics
averaged over processes before evaluation (gloo), persistent evaluation loaders, the global batch."""
import warnings
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as tmp

from dynexit.config import RunConfig, TrainConfig, amp_mode, validate_train_config
from dynexit.training import loop
from dynexit.training.distributed import DistContext, average_batchnorm_stats
from dynexit.training.metrics import autocast


@pytest.fixture
def kernel_flags():
    saved = (torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic,
             torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32,
             torch.get_float32_matmul_precision(), torch.are_deterministic_algorithms_enabled())
    yield
    (torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic, torch.backends.cuda.matmul.allow_tf32,
     torch.backends.cudnn.allow_tf32) = saved[:4]
    torch.set_float32_matmul_precision(saved[4])
    torch.use_deterministic_algorithms(saved[5])


def test_fast_kernels_on_cuda_unless_deterministic(kernel_flags):
    torch.backends.cudnn.benchmark = False
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.set_float32_matmul_precision("highest")
    loop.configure_kernels(False, "cpu")  # nothing changes for the CPU
    assert not torch.backends.cudnn.benchmark and torch.get_float32_matmul_precision() == "highest"
    loop.configure_kernels(False, "cuda")
    assert torch.backends.cudnn.benchmark and torch.backends.cuda.matmul.allow_tf32
    assert torch.backends.cudnn.allow_tf32 and torch.get_float32_matmul_precision() == "high"
    loop.configure_kernels(True, "cuda")
    assert not torch.backends.cudnn.benchmark and torch.backends.cudnn.deterministic


def test_amp_modes():
    assert [amp_mode(v) for v in (None, False, True, "bf16", "fp16")] == [None, None, "bf16", "bf16", "fp16"]
    with pytest.raises(ValueError, match="train.amp must be bf16, fp16 or null"):
        validate_train_config(TrainConfig(amp="fp32"))
    validate_train_config(TrainConfig(amp="fp16"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # autocast on "cuda" without a GPU warns; its dtype is what is checked
        assert autocast(torch.device("cuda"), "fp16").fast_dtype == torch.float16
        assert autocast(torch.device("cuda"), True).fast_dtype == torch.bfloat16
    assert not isinstance(autocast(torch.device("cpu"), "fp16"), torch.autocast)


# A committed run (results/fashion_mnist): its config.yaml predates train.reference_batch, scale_lr, compile
# and eval_calib, and its folder is named by its id.
COMMITTED_RUN = Path(__file__).resolve().parents[1] / "results" / "fashion_mnist" / "runs" / "035a5ad804"


def committed_config() -> RunConfig:
    from dynexit.config import load_run_config

    return load_run_config(COMMITTED_RUN / "config.yaml")


@pytest.mark.parametrize("key,default,other", [
    ("amp", False, "fp16"), ("reference_batch", None, 1024), ("scale_lr", False, True), ("compile", False, True),
    ("eval_calib", "every", "end")])
def test_a_train_field_at_its_default_keeps_the_committed_run_id(key, default, other):
    """At its default (given explicitly or not) a field leaves the id of a committed run unchanged; set to
    anything else it makes another run."""
    from dynexit.runs.spec import run_id

    cfg = committed_config()
    assert key == "amp" or key not in (COMMITTED_RUN / "config.yaml").read_text()  # written before it existed
    assert getattr(cfg.train, key) == default and run_id(cfg) == COMMITTED_RUN.name
    setattr(cfg.train, key, default)
    assert run_id(cfg) == COMMITTED_RUN.name
    setattr(cfg.train, key, other)
    assert run_id(cfg) != COMMITTED_RUN.name


def test_global_batch():
    assert loop.global_batch(SimpleNamespace(batch_size=128, accum_steps=2), 4) == 1024


def _bn_worker(rank: int, init_file: str, out: str):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    bn = torch.nn.BatchNorm2d(3)
    bn.running_mean.fill_(float(rank + 1))  # 1 and 2
    bn.running_var.fill_(float(4 * rank + 1))  # 1 and 5
    average_batchnorm_stats(torch.nn.Sequential(bn), DistContext(rank, 2, torch.device("cpu"), owns_group=False))
    torch.save({"mean": bn.running_mean, "var": bn.running_var}, f"{out}.{rank}")
    dist.destroy_process_group()


def test_batchnorm_statistics_are_averaged_over_processes(tmp_path):
    tmp.spawn(_bn_worker, args=(str(tmp_path / "init"), str(tmp_path / "bn")), nprocs=2, join=True)
    for rank in (0, 1):
        stats = torch.load(f"{tmp_path / 'bn'}.{rank}", weights_only=True)
        assert torch.equal(stats["mean"], torch.full((3,), 1.5)) and torch.equal(stats["var"], torch.full((3,), 3.0))


def test_one_process_keeps_its_statistics():
    bn = torch.nn.BatchNorm1d(2)
    bn.running_mean.fill_(7.0)
    average_batchnorm_stats(bn, DistContext(0, 1, torch.device("cpu"), owns_group=False))
    assert torch.equal(bn.running_mean, torch.full((2,), 7.0))


def test_distributed_evaluation_loaders_keep_their_workers(tmp_path, monkeypatch):
    """The evaluation loaders of one of two processes: every second sample, workers kept across epochs."""
    from dynexit.config import load_run_config

    (tmp_path / "config.yaml").write_text(
        "model: {name: tiny_perceiver_t16, input_size: 16}\n"
        "data: {name: digits, image_size: 16, train_subset: 64, calib_size: 20, test_subset: 30, num_workers: 1}\n")
    cfg = load_run_config(tmp_path / "config.yaml")
    monkeypatch.setattr(DistContext, "barrier", lambda self: None)  # no process group: nobody to wait for
    session = loop._Session(cfg, tmp_path / "run", DistContext(0, 2, torch.device("cpu"), owns_group=False),
                            resume=True, on_epoch_end=None)
    (tmp_path / "run").mkdir()
    session._build_model()
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)  # for the training sampler
    try:
        session._build_data()
    finally:
        dist.destroy_process_group()
    for name, size in (("calib", 20), ("test", 30)):
        loader = session.loaders[name]
        assert loader.persistent_workers and loader.num_workers == 1, name
        assert list(loader.dataset.indices) == list(range(0, size, 2)), name


def test_the_global_batch_is_checked_against_the_recipe(caplog):
    tc = TrainConfig(batch_size=128, lr=1e-3, min_lr=1e-6, reference_batch=1024)
    with caplog.at_level("INFO", logger="dynexit.training.loop"):
        same = loop.scaled_recipe(tc, 1)
    assert same is tc and same.lr == 1e-3
    assert "global batch: 1 process(es) x 128 per process x 1 accumulation step(s) = 128" in caplog.text
    assert "linear scaling gives lr 0.000125 instead of 0.001" in caplog.text
    tc.scale_lr = True
    scaled = loop.scaled_recipe(tc, 2)  # 256 of 1024
    assert scaled.lr == pytest.approx(2.5e-4) and scaled.min_lr == pytest.approx(2.5e-7) and tc.lr == 1e-3
    assert loop.scaled_recipe(tc, 8) is tc  # the recipe's own global batch
    with pytest.raises(ValueError, match="train.scale_lr needs train.reference_batch"):
        validate_train_config(TrainConfig(scale_lr=True))


class _Noise(torch.utils.data.Dataset):
    """Items drawn from the loading process's random state, as random augmentations are."""

    def __len__(self):
        return 8

    def __getitem__(self, i):
        return torch.rand(1), 0


def test_resume_draws_the_same_augmentations_with_loader_workers():
    from types import SimpleNamespace as NS

    from dynexit.data.loaders import build_loaders
    splits = NS(train=_Noise(), calib=_Noise(), test=_Noise())
    first = build_loaders(splits, 4, num_workers=1, seed=3)
    assert not first["train"].persistent_workers and first["test"].persistent_workers
    [x for x, _ in first["train"]]  # epoch 0
    state = first["train"].generator.get_state()  # what the checkpoint after epoch 0 holds
    uninterrupted = torch.cat([x for x, _ in first["train"]])  # epoch 1
    resumed_loaders = build_loaders(splits, 4, num_workers=1, seed=3)
    resumed_loaders["train"].generator.set_state(state)
    resumed = torch.cat([x for x, _ in resumed_loaders["train"]])
    assert torch.equal(resumed, uninterrupted)


def test_the_gradient_scaler_state_round_trips_through_a_checkpoint(tmp_path, caplog):
    """scaler_state/restore_scaler through the checkpoint's writer and its safe reader (weights_only)."""
    from dynexit.models import create_model
    from dynexit.models.checkpoint import save_model
    from dynexit.training.state import FORMAT, read_checkpoint, restore_scaler, scaler_state

    model = torch.nn.Linear(4, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10, growth_interval=5)
    for _ in range(3):  # three good steps: the growth tracker counts them
        scaler.scale(model(torch.ones(1, 4)).sum()).backward()
        scaler.step(opt)
        scaler.update()
    scaler.update(new_scale=96.0)
    assert (scaler.get_scale(), scaler._get_growth_tracker()) == (96.0, 3)
    net = create_model("tiny_perceiver_t16", num_classes=10, input_size=16)
    training = dict(optimizer={}, epoch=1, step=3, rng=[], config={}, metrics={}, wall_time=0.0)
    save_model(tmp_path / "with.pt", net, format=FORMAT, **training, **scaler_state(scaler))
    restored = torch.amp.GradScaler("cpu", growth_interval=5)
    restore_scaler(restored, read_checkpoint(tmp_path / "with.pt"))
    assert (restored.get_scale(), restored._get_growth_tracker()) == (96.0, 3)
    # Disabled (bf16, float32): nothing saved; an old checkpoint without it: the initial scale, with a warning.
    assert scaler_state(torch.amp.GradScaler("cuda", enabled=False)) == {}
    save_model(tmp_path / "old.pt", net, format=FORMAT, **training)
    fresh = torch.amp.GradScaler("cpu", init_scale=512.0)
    restore_scaler(fresh, read_checkpoint(tmp_path / "old.pt"))
    assert fresh.get_scale() == 512.0 and "restarts at its initial scale 512" in caplog.text
