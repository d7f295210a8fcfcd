"""The training loop: loss, optimizer and schedule, exact resume, determinism, NaN stop, bad input, the
CLI, and the digits accuracy target (tiny preset, 32 px)."""
import hashlib
import json
import math
import time
from pathlib import Path

import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

import dynexit.models.checkpoint
from dynexit.cli import main as cli_main
from dynexit.config import (
    RunConfig,
    TrainConfig,
    load_run_config,
    merge,
    milestone_epochs,
    save_yaml,
    validate_train_config,
)
from dynexit.data import build_datasets, build_loaders
from dynexit.models import create_model
from dynexit.models.checkpoint import load_model
from dynexit.training import MultiExitLoss, train
from dynexit.training.optim import build_optimizer, learning_rate, lr_at, param_groups

EXITS = ("early3", "att", "cnn", "merge")
WEIGHTS = {"early3": 0.5, "att": 0.5, "cnn": 1.0, "merge": 1.0}


def small_config(*dotlist: str) -> RunConfig:
    """Tiny preset on a small digits subset: a 3-epoch run takes a few seconds."""
    base = {"model": {"name": "tiny_perceiver_t16", "input_size": 16},
            "data": {"name": "digits", "image_size": 16, "train_subset": 96, "test_subset": 48, "calib_size": 32},
            "train": {"epochs": 3, "batch_size": 32, "lr": 2e-3, "warmup_epochs": 1, "progress": False,
                      "tensorboard": False}}
    return merge(RunConfig, base, OmegaConf.from_dotlist(list(dotlist)))


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tiny models: see conftest.py


def checkpoint_tensors(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a training checkpoint: model, EMA and optimizer state, flattened by key."""
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    out = {f"model.{k}": v for k, v in ckpt["model"].items()}
    out.update({f"ema.{k}": v for k, v in ckpt.get("ema", {}).items()})
    for pid, state in ckpt["optimizer"]["state"].items():
        out.update({f"opt.{pid}.{k}": v for k, v in state.items() if torch.is_tensor(v)})
    return out


def sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


# ----------------------------------------------------------------------------------------------- loss

def manual_loss(logits, target, weights, alpha, t):
    ce = [F.cross_entropy(y, target) if target.ndim == 1 else -(target * F.log_softmax(y, -1)).sum(-1).mean()
          for y in logits]
    total = sum(w * c for w, c in zip(weights, ce))
    p = F.softmax(logits[-1] / t, -1)
    kl = sum((p * (p.log() - F.log_softmax(y / t, -1))).sum(-1).mean() for y in logits[:-1])
    return total + alpha * t * t * kl


def test_loss_is_weighted_ce_plus_distillation_from_the_last_exit():
    g = torch.Generator().manual_seed(0)
    logits = [torch.randn(8, 10, generator=g, requires_grad=True) for _ in EXITS]
    target = torch.randint(0, 10, (8,), generator=g)
    loss = MultiExitLoss(EXITS, WEIGHTS, distill_alpha=0.5, temperature=2.0)
    out = loss(logits, target)
    expected = manual_loss(logits, target, [0.5, 0.5, 1.0, 1.0], 0.5, 2.0)
    assert torch.allclose(out.total, expected, atol=1e-6)
    assert torch.allclose(out.per_exit, torch.stack([F.cross_entropy(y, target) for y in logits]).detach())
    # The teacher is detached: the distillation term sends no gradient into the last exit.
    out.total.backward()
    grad_last = logits[-1].grad.clone()
    y = logits[-1].detach().requires_grad_()
    F.cross_entropy(y, target).backward()
    assert torch.allclose(grad_last, y.grad, atol=1e-7)
    # Soft (Mixup) targets: one-hot soft targets give the hard-target loss; mixed ones the formula.
    one_hot = F.one_hot(target, 10).float()
    assert torch.allclose(loss(logits, one_hot).total, out.total, atol=1e-6)
    soft = torch.softmax(torch.randn(8, 10, generator=g), -1)
    assert torch.allclose(loss(logits, soft).total, manual_loss(logits, soft, [0.5, 0.5, 1.0, 1.0], 0.5, 2.0),
                          atol=1e-6)
    # Weights are keyed by name: a zero weight and no distillation leave exactly the other CE terms.
    only_merge = MultiExitLoss(EXITS, {**dict.fromkeys(EXITS, 0.0), "merge": 2.0})
    assert torch.allclose(only_merge(logits, target).total, 2 * F.cross_entropy(logits[3], target))


def test_one_exit_model_gets_plain_cross_entropy_and_label_smoothing():
    g = torch.Generator().manual_seed(1)
    y, target = torch.randn(6, 5, generator=g), torch.randint(0, 5, (6,), generator=g)
    static = MultiExitLoss(("cnn",), WEIGHTS, distill_alpha=0.5)  # weights of absent exits are not used
    assert torch.allclose(static([y], target).total, F.cross_entropy(y, target))
    smooth = MultiExitLoss(("cnn",), label_smoothing=0.1)
    assert torch.allclose(smooth([y], target).total, F.cross_entropy(y, target, label_smoothing=0.1))


def test_loss_weights_must_name_the_model_exits():
    with pytest.raises(ValueError, match=r"'exit9' is not an exit.*early3, att, cnn, merge"):
        MultiExitLoss(EXITS, {**WEIGHTS, "exit9": 1.0})
    with pytest.raises(ValueError, match=r"no weight for exit\(s\) att"):
        MultiExitLoss(EXITS, {k: v for k, v in WEIGHTS.items() if k != "att"})


# ------------------------------------------------------------------------------ optimizer, schedule

def test_no_weight_decay_on_biases_and_1d_parameters():
    model = create_model("tiny_perceiver_t16")
    decay, no_decay = param_groups(model, 0.05)
    names = {id(p): n for n, p in model.named_parameters()}
    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0
    assert all(p.ndim >= 2 for p in decay["params"])
    assert all(p.ndim == 1 for p in no_decay["params"])
    decayed = {names[id(p)] for p in decay["params"]}
    assert "latent" in decayed and "exits.merge.fc.1.weight" in decayed
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))


def test_warmup_then_cosine_to_min_lr():
    lrs = [lr_at(s, 100, 10, 1e-3, 1e-5) for s in range(100)]
    assert lrs[:10] == pytest.approx([1e-3 * (s + 1) / 10 for s in range(10)])
    assert lrs[10] == pytest.approx(1e-3)
    assert lrs[-1] == pytest.approx(1e-5)
    assert lrs[55] == pytest.approx(1e-5 + 0.5 * (1e-3 - 1e-5) * (1 + math.cos(math.pi * 45 / 89)))
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))


def test_multistep_lr_at_every_step():
    # 4 epochs of 3 steps, milestones at 50 % and 75 %: lr x0.1 from epoch 2, x0.01 from epoch 3.
    cfg = TrainConfig(epochs=4, lr=0.1, schedule="multistep", milestones=[0.5, 0.75], lr_decay=0.1)
    validate_train_config(cfg)
    lrs = [learning_rate(cfg, s, 3) for s in range(12)]
    assert lrs == pytest.approx([0.1] * 6 + [0.01] * 3 + [0.001] * 3, rel=1e-12)
    # One epoch of warm-up (3 steps) comes first, then the same steps.
    cfg.warmup_epochs = 1.0
    lrs = [learning_rate(cfg, s, 3) for s in range(12)]
    assert lrs == pytest.approx([0.1 / 3, 0.2 / 3, 0.1] + [0.1] * 3 + [0.01] * 3 + [0.001] * 3, rel=1e-12)
    # A milestone is the epoch (from 0) nearest to fraction x epochs, halves up (MSDNet: `epoch >= 0.5 * epochs`).
    assert milestone_epochs([0.5, 0.75], 300) == [150, 225]  # MSDNet CIFAR
    assert milestone_epochs([0.3333333, 0.6666667], 90) == [30, 60]  # MSDNet ImageNet: every 30 epochs
    assert milestone_epochs([0.5], 5) == [3]
    assert milestone_epochs([0.7], 10) == [7]  # 0.7 * 10 is 7.000000000000001 in floats
    # cosine stays the default and gives what lr_at gives.
    cosine = TrainConfig(epochs=4, lr=1e-3, warmup_epochs=1.0)
    assert [learning_rate(cosine, s, 3) for s in range(12)] == [lr_at(s, 12, 3, 1e-3, 1e-6) for s in range(12)]


def test_sgd_settings_reach_the_torch_optimizer():
    model = create_model("tiny_perceiver_t16")
    cfg = TrainConfig(optimizer="sgd", lr=0.1, momentum=0.8, nesterov=True, weight_decay=1e-4)
    optimizer = build_optimizer(model, cfg)
    assert type(optimizer) is torch.optim.SGD and len(optimizer.param_groups) == 2
    for group, decay in zip(optimizer.param_groups, (1e-4, 0.0)):
        assert (group["lr"], group["momentum"], group["nesterov"], group["weight_decay"]) == (0.1, 0.8, True, decay)
        assert group["dampening"] == 0
    cfg.decay_all = True  # MSDNet's reference: weight decay on every parameter
    (group,) = build_optimizer(model, cfg).param_groups
    assert group["weight_decay"] == 1e-4 and len(group["params"]) == len(list(model.parameters()))
    adamw = build_optimizer(model, TrainConfig(lr=2e-3, betas=[0.8, 0.99], eps=1e-6))
    assert type(adamw) is torch.optim.AdamW
    assert [(g["lr"], g["betas"], g["eps"], g["weight_decay"]) for g in adamw.param_groups] == \
        [(2e-3, (0.8, 0.99), 1e-6, 0.05), (2e-3, (0.8, 0.99), 1e-6, 0.0)]


@pytest.mark.parametrize("setting,message", [
    ("train.optimizer=sgdm", r"train\.optimizer must be one of adamw, sgd, got 'sgdm'"),
    ("train.schedule=step", r"train\.schedule must be one of cosine, multistep, got 'step'"),
    ("train.milestones=[0.75,0.5]", r"train\.milestones must be increasing fractions"),
    ("train.milestones=[0.5,1.0]", r"train\.milestones must be increasing fractions"),
    ("train.milestones=[0,0.5]", r"train\.milestones must be increasing fractions"),
    ("train.milestones=[]", r"train\.milestones must be increasing fractions"),
    ("train.milestones=[0.1,0.5]",
     r"train\.milestones: the first decay \(0\.1 x 3 epochs: epoch 0\) comes before the warm-up"),
    ("train.lr_decay=0", r"train\.lr_decay must be in \(0, 1\]"),
    ("train.momentum=1.0", r"train\.momentum must be below 1"),
])
def test_bad_optimizer_or_schedule_is_refused_naming_the_key(tmp_path, setting, message):
    schedule = "train.schedule=step" if "schedule" in setting else "train.schedule=multistep"
    cfg = small_config("train.optimizer=sgd", schedule, setting)  # 3 epochs, 1 of warm-up
    with pytest.raises(ValueError, match=message):
        train(cfg, tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_nesterov_needs_momentum_and_milestones_are_numbers():
    with pytest.raises(ValueError, match=r"train\.nesterov needs train\.momentum > 0"):
        validate_train_config(TrainConfig(optimizer="sgd", nesterov=True, momentum=0.0))
    with pytest.raises(ValueError, match=r"train\.milestones"):  # caught by the typed config at load
        small_config("train.milestones=[half]")


# ------------------------------------------------------------------------ resume, determinism, NaN

class Stop(Exception):
    pass


def test_resumed_run_ends_with_exactly_the_weights_of_an_uninterrupted_one(tmp_path, monkeypatch):
    # Mixup (numpy RNG), crop augmentation (torch RNG), EMA and shuffling (loader generator) all on.
    cfg = small_config("train.mixup=0.8", "train.cutmix=1.0", "train.label_smoothing=0.1", "train.ema=true")
    first = train(cfg, tmp_path / "a")
    # Same seed: same weights, also when evaluating less often (evaluation runs on a forked RNG).
    again = train(small_config("train.mixup=0.8", "train.cutmix=1.0", "train.label_smoothing=0.1",
                               "train.eval_every=3"), tmp_path / "b")
    assert pd.read_csv(again.metrics_csv)["test_acc_merge"].isna().tolist() == [True, True, False]
    ta, tb = checkpoint_tensors(first.checkpoint), checkpoint_tensors(again.checkpoint)
    assert ta.keys() == tb.keys() and any(k.startswith("ema.") for k in ta)
    assert all(torch.equal(ta[k], tb[k]) for k in ta), "same seed, same machine: same weights"
    different = train(small_config("seed=1", "train.epochs=1"), tmp_path / "seed1")
    assert not torch.equal(checkpoint_tensors(different.checkpoint)["model.latent"], ta["model.latent"])
    assert_interrupted_run_resumes_exactly(cfg, first, tmp_path / "c", monkeypatch)


def test_eval_calib_end_evaluates_the_calibration_split_after_the_last_epoch_only(tmp_path):
    every = train(small_config("train.epochs=2", "train.ema=true"), tmp_path / "every")
    end = train(small_config("train.epochs=2", "train.ema=true", "train.eval_calib=end"), tmp_path / "end")
    a, b = pd.read_csv(every.metrics_csv), pd.read_csv(end.metrics_csv)
    assert list(a.columns) == list(b.columns)  # the same columns, in the same order
    for split in ("test", "ema_test"):
        assert b[f"{split}_acc_merge"].notna().tolist() == [True, True]
        assert b[f"{split}_acc_merge"].tolist() == a[f"{split}_acc_merge"].tolist()
    for split in ("calib", "ema_calib"):
        assert b[f"{split}_acc_merge"].isna().tolist() == [True, False]
        assert b[f"{split}_loss_early3"].isna().tolist() == [True, False]
        assert b[f"{split}_acc_merge"].iloc[-1] == a[f"{split}_acc_merge"].iloc[-1]
    ta, tb = checkpoint_tensors(every.checkpoint), checkpoint_tensors(end.checkpoint)
    assert all(torch.equal(ta[k], tb[k]) for k in ta)  # evaluation runs on a forked RNG: the same weights
    assert end.metrics["calib_acc_merge"] == every.metrics["calib_acc_merge"]
    with pytest.raises(ValueError, match=r"train\.eval_calib must be one of every, end, got 'last'"):
        train(small_config("train.eval_calib=last"), tmp_path / "bad")
    assert not (tmp_path / "bad").exists()


def test_resume_is_exact_with_sgd_and_a_multistep_schedule(tmp_path, monkeypatch):
    # MSDNet's recipe in small: SGD with Nesterov momentum, decay on every parameter, lr x0.1 at 30 % and
    # 60 % of 3 epochs (from epochs 2 and 3).
    cfg = small_config("train.optimizer=sgd", "train.lr=0.1", "train.momentum=0.9", "train.nesterov=true",
                       "train.weight_decay=1e-4", "train.decay_all=true", "train.schedule=multistep",
                       "train.milestones=[0.3,0.6]", "train.warmup_epochs=0", "train.ema=true")
    first = train(cfg, tmp_path / "a")
    assert pd.read_csv(first.metrics_csv)["lr"].tolist() == pytest.approx([0.1, 0.01, 0.001], rel=1e-12)
    ckpt = torch.load(first.checkpoint, map_location="cpu", weights_only=True)
    (group,) = ckpt["optimizer"]["param_groups"]
    assert (group["momentum"], group["nesterov"], group["weight_decay"]) == (0.9, True, 1e-4)
    assert all("momentum_buffer" in state for state in ckpt["optimizer"]["state"].values())
    assert_interrupted_run_resumes_exactly(cfg, first, tmp_path / "c", monkeypatch)


def stop_after_first_epoch(cfg, folder: Path, monkeypatch) -> None:
    """Trains ``cfg`` into ``folder`` and stops it right after the first epoch's checkpoint is written."""
    save = dynexit.models.checkpoint.save_model

    def save_then_stop(path, model, **extra):
        save(path, model, **extra)
        if extra["epoch"] == 1:
            raise Stop

    monkeypatch.setattr(dynexit.models.checkpoint, "save_model", save_then_stop)
    with pytest.raises(Stop):
        train(cfg, folder)
    monkeypatch.setattr(dynexit.models.checkpoint, "save_model", save)


def assert_interrupted_run_resumes_exactly(cfg, first, folder: Path, monkeypatch):
    """A run of ``cfg`` stopped after its first epoch's checkpoint and resumed ends with exactly the
    checkpoint and metrics of the uninterrupted run ``first`` (3 epochs of 3 steps)."""
    ta = checkpoint_tensors(first.checkpoint)
    stop_after_first_epoch(cfg, folder, monkeypatch)
    assert torch.load(folder / "checkpoint.pt", weights_only=True)["epoch"] == 1
    resumed = train(cfg, folder)
    assert resumed.start_epoch == 1 and resumed.epochs == 3 and resumed.steps == first.steps == 9
    tc = checkpoint_tensors(resumed.checkpoint)
    assert tc.keys() == ta.keys()
    unequal = [k for k in ta if not torch.equal(ta[k], tc[k])]
    assert not unequal, f"resumed run differs in {unequal[:5]}"
    # The metrics history is whole and the same (timing aside).
    ma, mc = (pd.read_csv(r.metrics_csv).drop(columns="epoch_time") for r in (first, resumed))
    assert list(ma["epoch"]) == [1, 2, 3]
    pd.testing.assert_frame_equal(ma, mc)
    # A finished run returns at once with its result.
    t0 = time.perf_counter()
    done = train(cfg, folder)
    assert time.perf_counter() - t0 < 5 and done.metrics == resumed.metrics and done.epochs == 3


def test_the_gradient_scaler_resumes_at_its_scale(tmp_path, monkeypatch):
    """The loop's gradient scaler (fp16 on CUDA) is saved in every checkpoint and restored on resume. No GPU
    here: the loop gets an enabled CPU scaler that doubles its scale every 2 steps, so after 2 epochs of 3
    steps a restored scaler is at 2^13 and one restarted after epoch 1 would be at 2^11."""
    real = torch.amp.GradScaler
    monkeypatch.setattr(torch.amp, "GradScaler",
                        lambda device, enabled: real("cpu", init_scale=2.0 ** 10, growth_interval=2))
    cfg = small_config("train.epochs=2", "train.ema=false")
    first = train(cfg, tmp_path / "a")
    state = torch.load(first.checkpoint, weights_only=True)["scaler"]
    assert first.steps == 6 and (state["scale"], state["_growth_tracker"]) == (2.0 ** 13, 0)
    stop_after_first_epoch(cfg, tmp_path / "b", monkeypatch)
    stopped = torch.load(tmp_path / "b" / "checkpoint.pt", weights_only=True)["scaler"]
    assert (stopped["scale"], stopped["_growth_tracker"]) == (2.0 ** 11, 1)
    resumed = train(cfg, tmp_path / "b")
    assert torch.load(resumed.checkpoint, weights_only=True)["scaler"] == state
    ta, tb = checkpoint_tensors(first.checkpoint), checkpoint_tensors(resumed.checkpoint)
    assert all(torch.equal(ta[k], tb[k]) for k in ta)  # power-of-two scales: the same weights as unscaled


@pytest.mark.parametrize("clip", ["null", "1.0"])
def test_the_loops_scaled_fp16_steps_equal_unscaled_ones(tmp_path, monkeypatch, clip):
    """The loop scales the loss, unscales the gradients before clipping and steps through the scaler: with
    a power-of-two scale (2^10) the trained weights equal those of a run without scaling, bit for bit. A
    step on the scaled gradients (or an unscaled loss divided by the scale) would move AdamW differently."""
    cfg = small_config("train.epochs=1", "train.ema=false", f"train.clip_grad={clip}")
    plain = train(cfg, tmp_path / "plain")
    real = torch.amp.GradScaler
    scalers = []

    def enabled(device, enabled):
        scalers.append(real("cpu", init_scale=2.0 ** 10, growth_interval=1000))
        return scalers[-1]

    monkeypatch.setattr(torch.amp, "GradScaler", enabled)
    scaled = train(cfg, tmp_path / "scaled")
    assert len(scalers) == 1 and scalers[0].get_scale() == 2.0 ** 10 and scalers[0]._get_growth_tracker() == 3
    ta, tb = checkpoint_tensors(plain.checkpoint), checkpoint_tensors(scaled.checkpoint)
    assert ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)


def test_gradient_accumulation_equals_the_larger_batch(tmp_path):
    # No augmentation (random crops are drawn per loader batch) and frozen BN (batch statistics of half
    # a batch differ): then two accumulated half-batches are the full batch. AdamW's eps is raised to
    # 1e-3: parameters whose gradient is structurally zero (a bias followed by a normalisation) get
    # float noise (~1e-8) that depends on summation order, and with eps=1e-8 Adam turns that noise into
    # full-size steps of random sign; with 1e-3 the update stays proportional to it.
    common = ("data.crop_padding=0", "train.freeze_bn=true", "train.epochs=2", "train.ema=false", "train.eps=1e-3")
    big = train(small_config(*common, "train.batch_size=32"), tmp_path / "big")
    accum = train(small_config(*common, "train.batch_size=16", "train.accum_steps=2"), tmp_path / "accum")
    assert big.steps == accum.steps == 6
    ta, tb = checkpoint_tensors(big.checkpoint), checkpoint_tensors(accum.checkpoint)
    torch.manual_seed(0)
    init = create_model("tiny_perceiver_t16", input_size=16).state_dict()
    moved = max((ta[f"model.{k}"] - v).abs().max().item() for k, v in init.items() if v.is_floating_point())
    assert moved > 5e-3  # the weights did move, by far more than the tolerance below
    for key in ta:
        if key.startswith("model."):
            assert torch.allclose(ta[key].float(), tb[key].float(), rtol=1e-4, atol=2e-5), key
    assert big.metrics["train_loss"] == pytest.approx(accum.metrics["train_loss"], rel=1e-5)


def test_nonfinite_loss_stops_with_epoch_and_step_and_keeps_the_checkpoint(tmp_path, monkeypatch):
    cfg = small_config()
    hashes = {}
    save = dynexit.models.checkpoint.save_model

    def save_and_hash(path, model, **extra):
        save(path, model, **extra)
        hashes[extra["epoch"]] = sha256(path)

    forward = MultiExitLoss.forward
    calls = {"n": 0}

    def nan_on_fifth_call(self, logits, target):  # 3 steps per epoch: call 5 = epoch 2, step 2
        calls["n"] += 1
        if calls["n"] == 5:
            logits = [y * float("nan") for y in logits]
        return forward(self, logits, target)

    monkeypatch.setattr(dynexit.models.checkpoint, "save_model", save_and_hash)
    monkeypatch.setattr(MultiExitLoss, "forward", nan_on_fifth_call)
    with pytest.raises(FloatingPointError, match=r"epoch 2, step 2 of 3.*checkpoint.*\(epoch 1\) is kept"):
        train(cfg, tmp_path / "run")
    ckpt = tmp_path / "run" / "checkpoint.pt"
    assert list(hashes) == [1] and sha256(ckpt) == hashes[1]
    assert torch.load(ckpt, weights_only=True)["epoch"] == 1
    assert list(pd.read_csv(tmp_path / "run" / "metrics.csv")["epoch"]) == [1]


def test_epoch_callback_sees_each_checkpointed_epoch_and_can_end_training(tmp_path):
    seen = []

    def stop_after_two(epoch, model, ema, metrics):
        seen.append((epoch, metrics["epoch"], ema is not None, model.training))
        if epoch == 2:
            raise Stop

    with pytest.raises(Stop):
        train(small_config(), tmp_path / "run", on_epoch_end=stop_after_two)
    assert seen == [(1, 1, True, True), (2, 2, True, True)]
    assert torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)["epoch"] == 2
    assert train(small_config(), tmp_path / "run").epochs == 3


# --------------------------------------------------------------------------------------- bad input

def test_bad_configuration_is_refused_naming_the_culprit_and_writes_nothing(tmp_path):
    path = tmp_path / "cfg.yaml"
    path.write_text("train:\n  epochs: 1\n  lrr: 0.1\n")
    with pytest.raises(ValueError, match=r"train\.lrr"):
        load_run_config(path)
    path.write_text("train:\n  epochs: many\n")
    with pytest.raises(ValueError, match=r"train\.epochs"):
        load_run_config(path)
    run = tmp_path / "run"
    with pytest.raises(ValueError, match=r"train\.lr must be in"):
        train(small_config("train.lr=-1"), run)
    with pytest.raises(ValueError, match=r"'exit9' is not an exit of this model"):
        train(small_config("train.loss_weights.exit9=1.0"), run)
    with pytest.raises(FileNotFoundError, match=r"/no/such/folder"):
        train(small_config("data.name=cifar10", "data.root=/no/such/folder"), run)
    assert not run.exists() or not any(run.iterdir())


def test_run_folder_of_another_configuration_is_refused_and_kept(tmp_path):
    run = tmp_path / "run"
    train(small_config("train.epochs=1"), run)
    before = {p.name: sha256(p) for p in run.iterdir() if p.is_file()}
    with pytest.raises(ValueError, match=r"checkpoint\.pt was trained with a different configuration.*"
                                         r"train\.lr: 0\.002 -> 0\.01"):
        train(small_config("train.epochs=1", "train.lr=0.01"), run)
    with pytest.raises(FileExistsError, match="checkpoint.pt exists and resume is off"):
        train(small_config("train.epochs=1"), run, resume=False)
    assert {p.name: sha256(p) for p in run.iterdir() if p.is_file()} == before


def test_cli_trains_and_reports_errors_in_one_line(tmp_path, capsys):
    path = tmp_path / "digits.yaml"
    save_yaml(small_config("train.epochs=1"), path)
    out = tmp_path / "run"
    assert cli_main(["train", str(path), "--set", "train.ema=false", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "test acc %" in printed and "merge" in printed
    result = json.loads((out / "train_result.json").read_text())
    assert result["epochs"] == 1 and result["steps"] == 3
    assert load_run_config(out / "config.yaml").train.ema is False
    assert cli_main(["train", str(path), "--out", str(out)]) == 1  # ema differs from the checkpoint's
    assert "train.ema: False -> True" in capsys.readouterr().err


# ---------------------------------------------------------------------------- the accuracy target

DIGITS_YAML = Path(__file__).resolve().parents[1] / "experiments" / "train_digits.yaml"


@pytest.mark.slow
def test_digits_at_32px_reaches_the_accuracy_targets(tmp_path):
    cfg = load_run_config(DIGITS_YAML)
    assert cfg.model.name == "tiny_perceiver_t16" and cfg.data.name == "digits" and cfg.data.image_size == 32
    t0, c0 = time.perf_counter(), time.process_time()
    result = train(cfg, tmp_path / "run", device="cpu")
    seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
    accs = {e: result.metrics[f"test_acc_{e}"] for e in EXITS}
    print(f"digits 32 px, {result.epochs} epochs in {seconds:.0f} s ({cpu:.0f} s CPU): test accuracy {accs}")
    assert accs["merge"] >= 95.0, accs
    assert min(accs.values()) >= 85.0, accs
    # The run folder holds what the rest of the toolkit reads.
    run = tmp_path / "run"
    for name in ("config.yaml", "checkpoint.pt", "metrics.csv", "calib_indices.json", "train_result.json"):
        assert (run / name).is_file(), name
    assert list((run / "tb").glob("events.out.tfevents.*"))
    history = pd.read_csv(run / "metrics.csv")
    assert list(history["epoch"]) == list(range(1, cfg.train.epochs + 1))
    assert {f"{s}_{m}_{e}" for s in ("train", "calib", "test") for m in ("loss", "acc") for e in EXITS} <= set(history)
    # The saved model gives the logged test accuracy.
    model = load_model(run / "checkpoint.pt")
    splits = build_datasets(cfg.data, run)
    images, labels = next(iter(build_loaders(splits, batch_size=len(splits.test))["test"]))
    with torch.no_grad():
        logits = model(images)
    for name, y in zip(EXITS, logits):
        assert (y.argmax(1) == labels).double().mean().item() * 100 == pytest.approx(accs[name])


def test_tensorboard_has_the_run_name_id_and_hparams(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import plugin_data_pb2

    run = tmp_path / "abc123"
    cfg = small_config("train.epochs=2", "train.tensorboard=true", "train.eval_every=2")
    result = train(cfg, run, device="cpu", run_name="demo/full_seed0")
    events = EventAccumulator(str(run / "tb"), size_guidance={"tensors": 0, "scalars": 0})
    events.Reload()
    tags = events.Tags()
    assert "test/acc_merge" in tags["scalars"]
    text = events.Tensors("run/text_summary")[0].tensor_proto.string_val[0].decode()
    assert text == "demo/full_seed0 (run id abc123)"

    content = events.PluginTagToContent("hparams")
    start = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/session_start_info"]).session_start_info
    params = {k: (v.string_value or v.number_value or v.bool_value) for k, v in start.hparams.items()}
    assert params["model.name"] == "tiny_perceiver_t16" and params["train.epochs"] == 2
    assert params["train.lr"] == pytest.approx(2e-3) and params["data.train_subset"] == 96
    experiment = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/experiment"]).experiment
    metrics = {m.name.tag for m in experiment.metric_infos}
    assert {"test/acc_merge", "train/loss"} <= metrics
    # the metrics point at logged scalars whose last value is the final result
    assert events.Scalars("test/acc_merge")[-1].value == pytest.approx(result.metrics["test_acc_merge"], rel=1e-6)


# ------------------------------------------------------------------- long runs: host syncs, mid-epoch resume

class SyncCounter:
    """Counts the calls that make the host wait for the device (a tensor's value read on the host, a
    collective of the process group) while the training step runs: a CUDA-free stand-in for what
    ``torch.cuda.set_sync_debug_mode`` reports on a GPU. Only calls within an epoch's training count;
    loading its batches does not (the loader's work, on the host anyway), nor torch's optimizer steps (they
    read their step counters, CPU tensors also when the parameters are on a GPU)."""

    READS = ("item", "tolist", "__bool__", "__float__", "__int__", "__index__", "numpy", "cpu")

    def __init__(self, monkeypatch):
        import dynexit.training.loop as loop
        from dynexit.training.distributed import DistContext

        self.calls: list[str] = []
        self.paused = 1  # counting only within _train_epoch
        for name in self.READS:
            monkeypatch.setattr(torch.Tensor, name, self._counted(getattr(torch.Tensor, name), f"Tensor.{name}"))
        for name in ("all_reduce", "broadcast_flag", "gather", "barrier"):
            monkeypatch.setattr(DistContext, name, self._counted(getattr(DistContext, name), name))
        monkeypatch.setattr(loop._Session, "_train_epoch", self._paused(loop._Session._train_epoch, -1))
        loader_iter = torch.utils.data.dataloader._BaseDataLoaderIter
        for owner, name in ((loader_iter, "__next__"), (torch.optim.AdamW, "step"), (torch.optim.SGD, "step")):
            monkeypatch.setattr(owner, name, self._paused(getattr(owner, name)))

    def _counted(self, method, label):
        def counted(*args, **kwargs):
            if not self.paused:
                self.calls.append(label)
            return method(*args, **kwargs)
        return counted

    def _paused(self, method, change: int = 1):
        def paused(*args, **kwargs):
            self.paused += change
            try:
                return method(*args, **kwargs)
            finally:
                self.paused -= change
        return paused


@pytest.mark.parametrize("accum", [1, 2])
def test_the_training_step_does_not_wait_for_the_device(tmp_path, monkeypatch, accum):
    """An epoch of 12 optimizer steps waits for the device as often as an epoch of 3: at its end only (the
    finiteness check, the epoch's metrics), not once per step or micro-batch."""
    counts = {}
    for steps in (3, 12):
        counter = SyncCounter(monkeypatch)
        cfg = small_config("train.epochs=1", f"train.accum_steps={accum}", f"train.batch_size={32 // accum}",
                           f"data.train_subset={32 * steps}", "data.calib_size=200", "train.mixup=0.8",
                           "train.cutmix=1.0", "train.clip_grad=1.0")
        train(cfg, tmp_path / f"{steps}_{accum}", device="cpu")
        counts[steps] = list(counter.calls)
        monkeypatch.undo()
    assert counts[3] == counts[12], counts
    assert len(counts[12]) <= 6, counts[12]


def test_the_loss_weights_live_on_the_training_device(tmp_path, monkeypatch):
    moved = []
    to = MultiExitLoss.to
    monkeypatch.setattr(MultiExitLoss, "to", lambda self, *a, **k: moved.append((a, k)) or to(self, *a, **k))
    train(small_config("train.epochs=1"), tmp_path / "run", device="cpu")
    assert moved == [((torch.device("cpu"),), {})]


def stop_after_checkpoint_within_epoch(cfg, folder: Path, monkeypatch, epoch: int, batch: int) -> None:
    """Trains ``cfg`` into ``folder`` and stops it right after the checkpoint written within ``epoch`` after
    ``batch`` micro-batches."""
    save = dynexit.models.checkpoint.save_model
    written = []

    def save_then_stop(path, model, **extra):
        save(path, model, **extra)
        written.append((extra["epoch"], extra.get("batch", 0)))
        if (extra["epoch"] + 1, extra.get("batch")) == (epoch, batch):
            raise Stop

    monkeypatch.setattr(dynexit.models.checkpoint, "save_model", save_then_stop)
    with pytest.raises(Stop):
        train(cfg, folder, device="cpu")
    monkeypatch.setattr(dynexit.models.checkpoint, "save_model", save)
    return written


@pytest.mark.parametrize("setting", [
    ("train.mixup=0.8", "train.cutmix=1.0", "train.ema=true"),  # in memory: the batch transform's global RNG
    ("train.accum_steps=2", "train.batch_size=16", "train.ema=true", "train.optimizer=sgd", "train.lr=0.05"),
    ("data.recipe=imagenet", "data.num_workers=2", "train.ema=true"),  # per-sample seeds, persistent workers
])
def test_a_run_stopped_within_an_epoch_resumes_to_the_bit(tmp_path, monkeypatch, setting):
    """Checkpoints every optimizer step (train.checkpoint_minutes tiny, two steps between host syncs): a
    run stopped after the checkpoint 4 micro-batches into epoch 2 resumes there and ends with exactly the
    checkpoint and metrics of a run never stopped, and of a run that never checkpointed within an epoch."""
    import dynexit.training.loop as loop

    monkeypatch.setattr(loop, "LOG_EVERY", 1)
    args = ("data.train_subset=192", "train.epochs=2", *setting)
    plain = train(small_config(*args), tmp_path / "plain", device="cpu")
    cfg = small_config(*args, "train.checkpoint_minutes=1e-9")
    whole = train(cfg, tmp_path / "whole", device="cpu")
    written = stop_after_checkpoint_within_epoch(cfg, tmp_path / "stopped", monkeypatch, epoch=2, batch=4)
    assert (1, 0) in written and written[-1] == (1, 4) and (0, 2) in written  # within epochs 1 and 2
    ckpt = torch.load(tmp_path / "stopped" / "checkpoint.pt", weights_only=True)
    assert (ckpt["epoch"], ckpt["batch"]) == (1, 4) and set(ckpt["train_metrics"][0]) >= {"loss_sum", "count"}
    resumed = train(cfg, tmp_path / "stopped", device="cpu")
    assert resumed.start_epoch == 1 and resumed.steps == whole.steps == plain.steps
    reference = checkpoint_tensors(plain.checkpoint)
    for result in (whole, resumed):
        tensors = checkpoint_tensors(result.checkpoint)
        assert tensors.keys() == reference.keys()
        unequal = [k for k in reference if not torch.equal(reference[k], tensors[k])]
        assert not unequal, f"differs in {unequal[:5]}"
        metrics = pd.read_csv(result.metrics_csv).drop(columns="epoch_time")
        pd.testing.assert_frame_equal(metrics, pd.read_csv(plain.metrics_csv).drop(columns="epoch_time"))
    assert len(pd.read_csv(resumed.metrics_csv)) == 2


@pytest.mark.parametrize("recipe", ["small", "imagenet"])
def test_loader_workers_change_the_speed_not_the_weights(tmp_path, recipe):
    runs = [train(small_config("train.epochs=1", f"data.recipe={recipe}", f"data.num_workers={w}"),
                  tmp_path / f"w{w}", device="cpu") for w in (0, 2)]
    a, b = (checkpoint_tensors(r.checkpoint) for r in runs)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_compile_comes_before_the_ddp_wrap(tmp_path, monkeypatch):
    import dynexit.training.loop as loop

    compiled, wrapped = [], []
    monkeypatch.setattr(torch, "compile", lambda model: compiled.append(model) or model)
    wrap = loop._Session._wrap
    monkeypatch.setattr(loop._Session, "_wrap", lambda self, model: wrapped.append(model) or wrap(self, model))
    train(small_config("train.epochs=1", "train.compile=true"), tmp_path / "run", device="cpu")
    assert len(compiled) == 1 and wrapped == compiled  # the compiled model is what DDP would wrap


def test_long_run_settings_are_checked_and_leave_the_run_id(tmp_path, monkeypatch):
    from dynexit.runs.spec import run_id
    from dynexit.training import distributed

    base = run_id(small_config())
    assert run_id(small_config("train.checkpoint_minutes=20", "train.dist_timeout_min=90",
                               "data.num_workers=8")) == base
    assert run_id(small_config("data.root=/d", "data.stage_to=/tmp/x")) == run_id(small_config("data.root=/d"))
    for bad in ("train.checkpoint_minutes=0", "train.checkpoint_minutes=-1", "train.dist_timeout_min=0"):
        with pytest.raises(ValueError, match=bad.split("=")[0].replace(".", r"\.")):
            validate_train_config(small_config(bad).train)
    seen = {}
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setattr(distributed.dist, "init_process_group", lambda **kw: seen.update(kw) or 1 / 0)
    with pytest.raises(ZeroDivisionError):
        distributed.setup("cpu", timeout_min=90)
    assert seen["timeout"].total_seconds() == 90 * 60 and seen["backend"] == "gloo"
