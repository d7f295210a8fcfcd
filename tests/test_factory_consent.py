"""A factory named inside a file is data: every file dynexit reads (a checkpoint, a results folder's
experiment.yaml, a run folder's config.yaml, an output folder's config.yaml, an official checkpoint) is
planted with a factory whose module creates a marker file when it is imported, and every command that reads
the file runs: the marker never appears, and each refusal names the file. The caller's consent (naming the
factory, or trusting its module) is what lets a checkpoint's factory run."""
import argparse
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import yaml

from dynexit.cli import main as cli_main
from dynexit.models import create_model
from dynexit.models.checkpoint import load_model, save_model
from dynexit.models.interface import TRUST_ENV, UntrustedFactoryError
from dynexit.runs.spec import load_spec

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TINY = {"model": {"name": "tiny_perceiver_t16", "input_size": 16},
        "data": {"name": "digits", "image_size": 16, "train_subset": 32, "test_subset": 16, "calib_size": 16},
        "train": {"epochs": 1, "batch_size": 16, "progress": False, "tensorboard": False}}
EVIL = "plantedfactory_{tag}.models:build"


@pytest.fixture
def planted(tmp_path, monkeypatch):
    """A package on sys.path whose import creates ``marker`` and whose ``build`` makes a tiny model;
    returns (factory name, marker path)."""
    tag = tmp_path.name.replace("-", "_")  # a module name of its own: never imported by another test
    package = tmp_path / "site" / f"plantedfactory_{tag}"
    package.mkdir(parents=True)
    marker = tmp_path / "MARKER"
    (package / "__init__.py").write_text("")
    (package / "models.py").write_text(textwrap.dedent(f"""
        from pathlib import Path
        Path({str(marker)!r}).touch()  # importing this module is running code

        def build(**kwargs):
            from dynexit.models import create_model
            return create_model("tiny_perceiver_t16", input_size=16, **kwargs)
        """))
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    monkeypatch.delenv(TRUST_ENV, raising=False)
    yield EVIL.format(tag=tag), marker
    sys.modules.pop(f"plantedfactory_{tag}.models", None)
    sys.modules.pop(f"plantedfactory_{tag}", None)


def factory_checkpoint(path: Path, factory: str) -> Path:
    """A dynexit checkpoint of a factory's model, written without importing the factory."""
    weights = create_model("tiny_perceiver_t16", input_size=16).state_dict()
    torch.save({"model": weights, "model_config": {"factory": factory, "kwargs": {}}, "model_kind": "factory"}, path)
    return path


def run_config(factory: str) -> dict:
    return {**TINY, "model": {"factory": factory}}


def test_a_checkpoint_naming_a_factory_is_refused_naming_file_and_factory(tmp_path, planted):
    factory, marker = planted
    path = factory_checkpoint(tmp_path / "shared.pt", factory)
    with pytest.raises(UntrustedFactoryError) as err:
        load_model(path)
    assert str(path) in str(err.value) and factory in str(err.value)
    assert TRUST_ENV in str(err.value) and "factory=" in str(err.value)
    assert not marker.exists()


def test_the_callers_consent_rebuilds_the_model_with_the_files_weights(tmp_path, planted, monkeypatch):
    factory, marker = planted
    path = factory_checkpoint(tmp_path / "shared.pt", factory)
    expected = torch.load(path, weights_only=True)["model"]
    model = load_model(path, factory=factory)  # named by the caller
    assert marker.exists()
    assert all(torch.equal(model.state_dict()[k], v) for k, v in expected.items())
    assert model.dynexit_factory == {"factory": factory, "kwargs": {}}


@pytest.mark.parametrize("listed", ["{package}", "{package}.models", "other, {package} "])
def test_a_trusted_module_rebuilds_the_model(tmp_path, planted, monkeypatch, listed):
    factory, marker = planted
    package = factory.split(".")[0]
    path = factory_checkpoint(tmp_path / "shared.pt", factory)
    monkeypatch.setenv(TRUST_ENV, listed.format(package=package))
    load_model(path)
    assert marker.exists()


@pytest.mark.parametrize("listed", ["{package}x", "{package}.model", "other"])
def test_trust_is_by_whole_module_name(tmp_path, planted, monkeypatch, listed):
    factory, marker = planted
    package = factory.split(".")[0]
    monkeypatch.setenv(TRUST_ENV, listed.format(package=package))
    with pytest.raises(UntrustedFactoryError):
        load_model(factory_checkpoint(tmp_path / "shared.pt", factory))
    assert not marker.exists()


def test_a_factory_given_for_a_preset_checkpoint_is_refused(tmp_path):
    path = tmp_path / "preset.pt"
    save_model(path, create_model("tiny_perceiver_t16", input_size=16))
    with pytest.raises(ValueError, match="needs no factory"):
        load_model(path, factory="os:system")


def results_folder(tmp_path: Path, factory: str) -> Path:
    """A results folder as another user might share it: experiment.yaml and a run folder whose
    config.yaml both name ``factory``."""
    folder = tmp_path / "shared_results"
    spec = {"name": "shared", "base": run_config(factory)}
    (folder / "runs" / "0123456789").mkdir(parents=True)
    (folder / "experiment.yaml").write_text(yaml.safe_dump(spec))
    (folder / "runs" / "0123456789" / "config.yaml").write_text(yaml.safe_dump(run_config(factory)))
    return folder


def test_status_of_a_results_folder_imports_no_factory(tmp_path, planted, capsys):
    factory, marker = planted
    folder = results_folder(tmp_path, factory)
    assert cli_main(["status", str(folder)]) == 0
    out = capsys.readouterr().out
    assert "pending: 2" in out  # the spec's one run and the run folder, both read as data
    assert "0123456789" in out
    assert not marker.exists()


def test_a_results_folders_spec_is_still_checked_without_importing(tmp_path, planted):
    factory, marker = planted
    folder = results_folder(tmp_path, factory)
    bad = yaml.safe_load((folder / "experiment.yaml").read_text())
    bad["base"]["model"]["factory"] = "not a factory"
    (folder / "experiment.yaml").write_text(yaml.safe_dump(bad))
    with pytest.raises(ValueError, match="model.factory"):
        load_spec(folder / "experiment.yaml", import_factories=False)
    assert not marker.exists()


def test_migrate_ids_reads_run_folders_without_importing(tmp_path, planted, capsys):
    factory, marker = planted
    folder = results_folder(tmp_path, factory)
    own_spec = tmp_path / "mine.yaml"  # the user's own spec, of presets only
    own_spec.write_text(yaml.safe_dump({"name": "mine", "base": TINY}))
    assert cli_main(["migrate-ids", str(own_spec), "--results-dir", str(folder), "--threads", "1",
                     "--dry-run"]) == 0
    assert "0123456789" in capsys.readouterr().out  # the planted run folder was read and planned
    assert not marker.exists()


def test_train_into_a_folder_whose_config_names_a_factory_imports_nothing(tmp_path, planted, capsys):
    factory, marker = planted
    out = tmp_path / "out"
    out.mkdir()
    (out / "config.yaml").write_text(yaml.safe_dump(run_config(factory)))
    mine = tmp_path / "mine.yaml"
    mine.write_text(yaml.safe_dump(TINY))
    assert cli_main(["train", str(mine), "--out", str(out)]) == 1
    assert str(out / "config.yaml") in capsys.readouterr().err  # refused: the folder is another run's
    assert not marker.exists()
    assert not (out / "checkpoint.pt").exists()


def test_convert_official_takes_only_a_preset_from_the_checkpoint(tmp_path, planted, capsys):
    factory, marker = planted
    source = tmp_path / "official.pth"
    torch.save({"model": {"latent": torch.zeros(16, 128)},
                "args": argparse.Namespace(model=factory, nb_classes=10)}, source)
    assert cli_main(["convert-official", str(source), str(tmp_path / "out.pt")]) == 1
    err = capsys.readouterr().err
    assert str(source) in err and factory in err and "--model" in err
    assert not marker.exists()
    assert not (tmp_path / "out.pt").exists()


def test_a_run_of_the_users_own_spec_still_builds_its_factory(tmp_path, planted):
    factory, marker = planted
    spec = tmp_path / "mine.yaml"
    spec.write_text(yaml.safe_dump({"name": "mine", "base": run_config(factory)}))
    experiment = load_spec(spec)  # the user's own file: like a Python script, its factory is checked by building
    assert marker.exists()
    assert experiment.runs[0].config.model.factory == factory


def test_report_and_costs_of_a_shared_folder_import_no_factory(tmp_path, planted, capsys):
    factory, marker = planted
    folder = results_folder(tmp_path, factory)
    (folder / "runs.csv").write_text("run_id,variant,model.name\n0123456789,base," + factory + "\n")
    cli_main(["report", str(folder), "--formats", "png"])  # whatever it makes of so little, it runs no code
    assert not marker.exists()
