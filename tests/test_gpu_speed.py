"""The GPU speed settings, checked for what they configure (no GPU here) or run on the CPU where torch allows:
fast kernels unless deterministic, bf16/fp16 autocast (fp16 with a gradient scaler), BatchNorm statistics
averaged over processes before evaluation (gloo), persistent evaluation loaders, the global batch."""
import warnings
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


def test_the_default_amp_keeps_run_ids():
    from dynexit.runs.spec import run_id
    assert RunConfig().train.amp is False  # absent or false: the identity JSON is unchanged
    a, b = RunConfig(), RunConfig()
    b.train.amp = "fp16"
    assert run_id(a) != run_id(b)


def test_fp16_steps_go_through_a_gradient_scaler():
    """The scaler the loop uses for fp16 (on the CPU's GradScaler, which torch provides): gradients of a
    scaled loss are unscaled before the step, so the step equals the unscaled one."""
    torch.manual_seed(0)
    a = torch.nn.Linear(4, 2)
    b = torch.nn.Linear(4, 2)
    b.load_state_dict(a.state_dict())
    x = torch.randn(8, 4)
    opt_a, opt_b = torch.optim.SGD(a.parameters(), lr=0.1), torch.optim.SGD(b.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    scaler.scale(a(x).square().mean()).backward()
    b(x).square().mean().backward()
    assert torch.allclose(a.weight.grad, 1024.0 * b.weight.grad)  # the loss was scaled
    scaler.unscale_(opt_a)
    scaler.step(opt_a)
    scaler.update()
    opt_b.step()
    assert torch.allclose(a.weight, b.weight, atol=1e-6)


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


def test_distributed_evaluation_loaders_keep_their_workers():
    source = open(loop.__file__).read()
    assert "persistent_workers=workers > 0" in source


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


def test_reference_batch_enters_the_run_id_only_when_set():
    from dynexit.runs.spec import run_id
    a, b, c = RunConfig(), RunConfig(), RunConfig()
    b.train.reference_batch = 1024
    c.train.reference_batch, c.train.scale_lr = 1024, True
    assert len({run_id(a), run_id(b), run_id(c)}) == 3


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


def test_train_compile_enters_the_run_id_only_when_set():
    """Committed runs keep their ids (tests/test_run_identity.py); a compiled run is another run."""
    from dynexit.runs.spec import run_id
    a, b = RunConfig(), RunConfig()
    b.train.compile = True
    assert run_id(a) != run_id(b)


def test_eval_calib_enters_the_run_id_only_when_set():
    from dynexit.runs.spec import run_id
    a, b, c = RunConfig(), RunConfig(), RunConfig()
    b.train.eval_calib = "every"
    c.train.eval_calib = "end"
    assert run_id(a) == run_id(b) != run_id(c)


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
