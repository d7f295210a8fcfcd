"""Every shipped spec and run configuration is valid (what `dynexit run --dry-run` checks) and says what
its comments promise."""
from pathlib import Path

import pytest

from dynexit.cli import main
from dynexit.config import load_run_config, resolve_model
from dynexit.runs.spec import load_spec

EXPERIMENTS = Path(__file__).resolve().parents[1] / "experiments"
SPECS = ["quickstart.yaml", "fashion_mnist.yaml", "imagenet_official.yaml", "imagenet_ablations.yaml",
         "msdnet_cifar100.yaml", "compare.yaml"]
COMMITTED = ("quickstart.yaml", "fashion_mnist.yaml")  # their results are in results/: nothing pending
ABLATIONS = {"full": {}, "no_x2z": {"x2z": False}, "no_z2x": {"z2x": False}, "no_dwc": {"dwc": False},
             "no_isc": {"isc": False}, "no_last_ca": {"last_ca": False}, "static": {"static": True}}


@pytest.mark.parametrize("name", SPECS)
def test_shipped_specs_dry_run(name, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # a dry run writes nothing, wherever it runs
    assert main(["run", str(EXPERIMENTS / name), "--dry-run"]) == 0
    assert "pending" in capsys.readouterr().out or name in COMMITTED
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("name", ["quickstart.yaml", "imagenet_ablations.yaml"])
def test_ablation_specs_switch_one_component_per_variant(name):
    experiment = load_spec(EXPERIMENTS / name)
    seeds = {run.config.seed for run in experiment.runs}
    assert len(experiment.runs) == len(ABLATIONS) * len(seeds)
    for run in experiment.runs:
        arch = resolve_model(run.config.model)
        switches = {k: getattr(arch, k) for k in ("x2z", "z2x", "dwc", "isc", "last_ca", "static")}
        expected = {"x2z": True, "z2x": True, "dwc": True, "isc": True, "last_ca": True, "static": False}
        expected.update(ABLATIONS[run.variant])
        assert switches == expected, run.variant


def test_imagenet_official_spec_is_the_official_recipe():
    experiment = load_spec(EXPERIMENTS / "imagenet_official.yaml")
    recipes = {r.config.model.name: (r.config.train.lr, r.config.train.epochs) for r in experiment.runs}
    assert recipes == {"reg800m_perceiver_t128": (1e-3, 300), "resnet50_0375_perceiver_t128": (6e-4, 300),
                       "mobilenetV3_0x75_perceiver_t128": (1e-3, 600)}
    train = experiment.runs[0].config.train
    assert (train.batch_size, train.warmup_epochs, train.weight_decay, train.ema_decay) == (128, 20, 0.05, 0.9999)
    assert (train.mixup, train.cutmix, train.label_smoothing) == (0.8, 1.0, 0.1)
    assert train.loss_weights == {"early3": 0.5, "att": 0.5, "cnn": 1.0, "merge": 1.0}
    assert (train.distill_alpha, train.distill_temperature) == (0.5, 1.0)
    assert experiment.executor.gpus_per_run == 8


@pytest.mark.parametrize("name", ["imagenet_official.yaml", "imagenet_ablations.yaml"])
def test_imagenet_specs_evaluate_every_5_epochs_and_calibration_at_the_end(name):
    for run in load_spec(EXPERIMENTS / name).runs:
        assert (run.config.train.eval_every, run.config.train.eval_calib) == (5, "end")
    train = load_run_config(EXPERIMENTS / "train_imagenet_official.yaml").train
    assert (train.eval_every, train.eval_calib) == (5, "end")


@pytest.mark.parametrize("name", ["train_digits.yaml", "train_imagenet_official.yaml"])
def test_shipped_run_configs_load(name):
    """Every value the file writes is the loaded configuration's (read back with plain YAML), and the model
    section resolves to its preset."""
    import yaml

    from dynexit.config import to_container
    from dynexit.models.presets import preset_config

    cfg = load_run_config(EXPERIMENTS / name)
    raw = yaml.safe_load((EXPERIMENTS / name).read_text())
    loaded = to_container(cfg)
    for section, values in raw.items():
        if not isinstance(values, dict):
            assert loaded[section] == values, section
            continue
        for key, value in values.items():
            assert loaded[section][key] == value, f"{section}.{key}"
    model = resolve_model(cfg.model)
    preset = preset_config(raw["model"]["name"], num_classes=raw["model"]["num_classes"],
                           input_size=raw["model"]["input_size"])
    assert model == preset


def test_msdnet_cifar_spec_trains_with_the_reference_recipe():
    """The train section of experiments/msdnet_cifar100.yaml is MSDNet's CIFAR recipe. (Its dry run needs
    the msdnet_cifar_anytime model: it is in SPECS.)"""
    import yaml

    from dynexit.config import TrainConfig, merge, milestone_epochs, validate_train_config
    from dynexit.training.optim import learning_rate

    spec = yaml.safe_load((EXPERIMENTS / "msdnet_cifar100.yaml").read_text())
    train = merge(TrainConfig, spec["base"]["train"], where="msdnet_cifar100.yaml")
    validate_train_config(train)
    assert (train.optimizer, train.lr, train.momentum, train.nesterov) == ("sgd", 0.1, 0.9, True)
    assert (train.weight_decay, train.decay_all, train.batch_size, train.epochs) == (1e-4, True, 64, 300)
    assert milestone_epochs(train.milestones, train.epochs) == [150, 225]
    steps = 703  # 45,000 training images in batches of 64, the incomplete last one dropped
    assert [learning_rate(train, epoch * steps, steps) for epoch in (0, 149, 150, 224, 225, 299)] == \
        pytest.approx([0.1, 0.1, 0.01, 0.01, 0.001, 0.001], rel=1e-12)
    assert spec["base"]["data"]["calib_size"] == 5000 and spec["base"]["eval"]["grid"] == "msdnet"


def test_compare_spec_pits_four_families_at_similar_costs_with_budgets_where_curves_differ():
    """experiments/compare.yaml: Dyn-Perceiver, MSDNet, branchy and the static backbone, 2 seeds each, the full
    Fashion-MNIST training set with 5,000 calibration images, one recipe, the full grid; full costs within 2x
    of each other; every budget inside some multi-exit model's curve (first-exit to full cost), and one inside
    every multi-exit curve (above the dearest first exit, below the cheapest full cost)."""
    from dynexit.config import build_configured_model, exit_loss_weights
    from dynexit.costs import count_costs

    experiment = load_spec(EXPERIMENTS / "compare.yaml")
    by_variant: dict[str, list] = {}
    for run in experiment.runs:
        by_variant.setdefault(run.variant, []).append(run.config)
    assert {v: sorted(c.seed for c in cfgs) for v, cfgs in by_variant.items()} == {
        "perceiver": [0, 1], "msdnet": [0, 1], "branchy": [0, 1], "static": [0, 1]}
    full_costs, budgets, curves = {}, None, []
    for variant, (cfg, _) in by_variant.items():
        assert (cfg.data.name, cfg.data.calib_size, cfg.data.train_subset, cfg.data.image_size) == (
            "fashion_mnist", 5000, None, 28)
        assert (cfg.train.threads, cfg.train.epochs) == (1, 30)
        model = build_configured_model(cfg.model)
        gmacs = count_costs(model, cfg.data.image_size).gmacs
        full_costs[variant] = gmacs[-1]
        budgets = cfg.eval.budgets
        assert len(budgets) >= 3 and cfg.eval.grid == "full"
        if len(gmacs) > 1:
            curves.append((gmacs[0], gmacs[-1]))
        weights = exit_loss_weights(model.exit_names, cfg.train.loss_weights)
        if variant in ("msdnet", "branchy"):
            assert weights == dict.fromkeys(model.exit_names, 1.0)
    assert max(full_costs.values()) / min(full_costs.values()) < 2
    assert all(any(low <= b <= high for low, high in curves) for b in budgets)
    assert any(all(low < b < high for low, high in curves) for b in budgets)
    # the same backbone; the branchy model's last head differs a little from the static classifier's
    assert full_costs["static"] == pytest.approx(full_costs["branchy"], rel=0.01)
