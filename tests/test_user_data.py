"""A user's own data set through ``data: {factory: ..., <its keyword arguments>}``: the calibration split held
out of its training set as for the built-in data sets, the images used as they come, a whole run on it."""
import numpy as np
import pytest
import torch
import yaml
from user_data import make

from dynexit.config import DataConfig, RunConfig, merge, to_container, validate_run_config
from dynexit.data import build_datasets
from dynexit.runs.folders import DONE
from dynexit.runs.runner import run_experiment
from dynexit.runs.spec import load_spec, run_id

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_the_splits_hold_the_calibration_images_out_of_the_users_training_set(tmp_path):
    cfg = merge(RunConfig, {"data": {"factory": "user_data:make", "n_train": 100, "n_test": 30, "image_size": 16,
                                     "calib_size": 20, "test_subset": 25}}).data
    assert cfg.options == {"n_train": 100, "n_test": 30}  # the factory's keyword arguments
    splits = build_datasets(cfg, tmp_path)
    assert (len(splits.train), len(splits.calib), len(splits.test)) == (80, 20, 25)
    assert set(splits.train_indices).isdisjoint(splits.calib_indices)
    assert splits.num_classes == 3
    train, test = make(n_train=100, n_test=30)
    for k, i in enumerate(splits.calib_indices[:5]):  # the user's images, untouched
        image, label = splits.calib[k]
        assert torch.equal(image, train[int(i)][0]) and int(label) == int(train[int(i)][1])
    assert (tmp_path / "calib_indices.json").is_file()  # a resumed run keeps its split


def test_a_data_factorys_mistakes_are_named(tmp_path):
    with pytest.raises(ValueError, match="data.factory"):
        validate_run_config(merge(RunConfig, {"data": {"factory": "user_data:no_such_function"}}))
    with pytest.raises(ValueError, match="data.image_size: 16"):
        build_datasets(DataConfig(factory="user_data:make", image_size=32))
    with pytest.raises(ValueError, match="data.options"):
        validate_run_config(merge(RunConfig, {"data": {"options": {"n_train": 3}}}))
    # a data section without a factory still refuses an unknown key
    with pytest.raises(ValueError, match="n_train"):
        merge(RunConfig, {"data": {"n_train": 3}})


def test_unused_data_keys_leave_run_ids_unchanged():
    assert "factory" not in to_container(RunConfig())["data"]
    assert run_id(RunConfig()) == "b91b32b7d5"  # as before data factories existed


def test_a_run_on_the_users_data(tmp_path):
    spec = {"name": "mine", "results_dir": str(tmp_path / "results"),
            "base": {"model": {"name": "tiny_perceiver_t16", "input_size": 16, "num_classes": 3},
                     "data": {"factory": "user_data:make", "image_size": 16, "calib_size": 30},
                     "train": {"epochs": 1, "batch_size": 30, "progress": False, "tensorboard": False}}}
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(spec))
    experiment = load_spec(tmp_path / "spec.yaml")
    assert [o.state for o in run_experiment(experiment, devices="cpu")] == [DONE]
    folder = tmp_path / "results" / "runs" / experiment.runs[0].run_id
    logits = np.load(folder / "logits_calib.npz")
    assert logits["logits"].shape[:2] == (4, 30) and set(logits["targets"]) <= {0, 1, 2}
