"""Every impossible value is refused by ``dynexit run --dry-run``, before anything is written, naming the
file, the key and the line (or ``--set``): sizes impossible for a built-in data set, numbers that are not
finite, seeds the generators cannot take, names that cannot be file names, a key given twice in any form,
and YAML that expands past its limits."""
import textwrap

import pytest
import yaml

from dynexit.cli import main as cli_main

SPEC = """
name: limits
results_dir: {out}
base:
  model: {{name: tiny_perceiver_t16, input_size: 16}}
  data: {{name: digits, image_size: 16}}
  train: {{epochs: 1}}
"""


def dry_run(tmp_path, capsys, edit=None, text=None, options=()):
    """Runs ``dynexit run SPEC --dry-run``; returns (exit code, stderr). Nothing may be written."""
    results = tmp_path / "results"
    raw = yaml.safe_load(textwrap.dedent(SPEC.format(out=results)))
    if edit:
        edit(raw)
    spec = tmp_path / "spec.yaml"
    spec.write_text(text if text is not None else yaml.safe_dump(raw, sort_keys=False))
    code = cli_main(["run", str(spec), "--devices", "cpu", "--dry-run", *options])
    assert not results.exists()
    return code, capsys.readouterr().err


def test_a_valid_spec_passes(tmp_path, capsys):
    assert dry_run(tmp_path, capsys)[0] == 0


@pytest.mark.parametrize("calib, ok", [(1436, True), (1437, False), (0.9997, False), (0.999, True)])
def test_a_calibration_split_larger_than_the_training_set_is_refused(tmp_path, capsys, calib, ok):
    # digits: 1,797 images, 360 of them the test split, 1,437 for training (and calibration)
    code, err = dry_run(tmp_path, capsys, lambda raw: raw["base"]["data"].update(calib_size=calib))
    assert code == (0 if ok else 1)
    if not ok:
        line = next(i for i, text in enumerate((tmp_path / "spec.yaml").read_text().splitlines(), 1)
                    if "calib_size" in text)
        assert "data.calib_size" in err and "1437" in err and "digits" in err and f"(line {line})" in err


@pytest.mark.parametrize("section, key, value, named", [
    ("train", "lr", float("inf"), "train.lr"),
    ("train", "loss_weights", {"early3": float("inf")}, "train.loss_weights.early3"),
    ("train", "clip_grad", float("nan"), "train.clip_grad"),
    ("model", "dropout", float("nan"), "model.dropout"),
    ("train", "milestones", [0.5, float("inf")], "train.milestones[1]"),
])
def test_numbers_that_are_not_finite_are_refused_anywhere(tmp_path, capsys, section, key, value, named):
    code, err = dry_run(tmp_path, capsys, lambda raw: raw["base"][section].update({key: value}))
    assert code == 1 and named in err and "finite" in err


@pytest.mark.parametrize("edit, named", [
    (lambda raw: raw.update(seeds=[0, -1]), "seed"),
    (lambda raw: raw.update(seeds=[2**32]), "seed"),
    (lambda raw: raw["base"]["data"].update(split_seed=2**32), "data.split_seed"),
])
def test_seeds_the_generators_cannot_take_are_refused(tmp_path, capsys, edit, named):
    code, err = dry_run(tmp_path, capsys, edit)
    assert code == 1 and f"{named} must be an integer in [0, 2**32 - 1]" in err


def test_the_largest_seed_passes(tmp_path, capsys):
    assert dry_run(tmp_path, capsys, lambda raw: raw.update(seeds=[2**32 - 1]))[0] == 0


@pytest.mark.parametrize("edit, said", [
    (lambda raw: raw.update(name="a/b"), "name 'a/b'"),
    (lambda raw: raw.update(name=".."), "name '..'"),
    (lambda raw: raw.update(name=" "), "blank"),
    (lambda raw: raw.update(variants={"x\ty": {}}), "variant name"),
])
def test_names_that_cannot_be_file_names_are_refused(tmp_path, capsys, edit, said):
    code, err = dry_run(tmp_path, capsys, edit)
    assert code == 1 and said in err


@pytest.mark.parametrize("edit, said", [
    (lambda raw: raw.update(variants={"v": {"train.lr": 0.1, "train": {"lr": 0.2}}}), "sets 'train.lr' twice"),
    (lambda raw: raw.update(variants={"v": {"train.lr": 0.1}}, grid={"train.lr": [0.2]}),
     "grid and variant 'v' both set 'train.lr'"),
    (lambda raw: raw.update(grid={"train.lr": [0.2]}, zip=[{"train.lr": [0.3]}]), "both set 'train.lr'"),
    (lambda raw: raw.update(variants={"v": {"seed": 3}}, seeds=[1]), "both set 'seed'"),
])
def test_a_key_given_twice_in_any_form_is_refused(tmp_path, capsys, edit, said):
    code, err = dry_run(tmp_path, capsys, edit)
    assert code == 1 and said in err


def test_variants_may_each_set_the_same_key(tmp_path, capsys):
    def edit(raw):
        raw.update(variants={"a": {"train.lr": 0.1}, "b": {"train.lr": 0.2}})

    assert dry_run(tmp_path, capsys, edit)[0] == 0


def test_set_twice_is_refused(tmp_path, capsys):
    code, err = dry_run(tmp_path, capsys, options=["--set", "train.lr=0.1", "--set", "train={lr: 0.2}"])
    assert code == 1 and "--set gives 'train.lr' twice" in err


def test_a_bad_set_value_is_reported_as_set_not_at_the_specs_line(tmp_path, capsys):
    code, err = dry_run(tmp_path, capsys, options=["--set", "train.epochs=0"])
    assert code == 1 and "--set: train.epochs" in err and "line" not in err


def test_a_yaml_alias_bomb_is_refused(tmp_path, capsys):
    lines = ["name: bomb", "l0: &l0 [x, x, x, x, x, x, x, x, x, x]"]
    lines += [f"l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * 10)}]" for i in range(1, 9)]  # 10^9 values expanded
    code, err = dry_run(tmp_path, capsys, text="\n".join(lines) + "\n")
    assert code == 1 and "more than 100,000 values" in err and "spec.yaml" in err


def test_the_known_size_of_digits_is_its_real_size():
    from dynexit.config import DATASET_SIZES, DataConfig
    from dynexit.data import build_datasets

    splits = build_datasets(DataConfig(name="digits", image_size=8, calib_size=1))
    assert (len(splits.train) + len(splits.calib), len(splits.test)) == DATASET_SIZES["digits"]


def test_a_reference_must_be_a_variant(tmp_path, capsys):
    def edit(raw):
        raw.update(variants={"a": {}, "b": {"train.lr": 0.002}}, reference="c")

    code, err = dry_run(tmp_path, capsys, edit)
    assert code == 1 and "reference 'c' is not one of the variants (a, b)" in err

    def good(raw):
        raw.update(variants={"a": {}, "b": {"train.lr": 0.002}}, reference="b")

    assert dry_run(tmp_path, capsys, good)[0] == 0
