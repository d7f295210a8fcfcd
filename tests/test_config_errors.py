"""Impossible settings are refused by 'dynexit run --dry-run', 'dynexit train' and 'dynexit search loss-weights'
alike, before anything is written, with an error naming the file, the key and the line."""
from __future__ import annotations

import pytest
import yaml

from dynexit.cli import main
from dynexit.yaml_files import key_in_message, key_lines

BASE = {"model": {"name": "tiny_perceiver_t16", "input_size": 16},
        "data": {"name": "digits", "image_size": 16},
        "train": {"epochs": 1, "lr": 0.001},
        "eval": {"grid": "official", "criterion": "max_softmax"}}
# (section, key, bad value, words the error must contain)
BAD = {
    "criterion typo": ("eval", "criterion", "max_sofmax", "max_sofmax"),
    "grid typo": ("eval", "grid", "oficial", "oficial"),
    "negative lr": ("train", "lr", -0.001, "-0.001"),
    "zero epochs": ("train", "epochs", 0, "positive"),
    "unknown data set": ("data", "name", "imagenett", "imagenett"),
    "model override not a bool": ("model", "x2z", "maybe", "maybe"),
    "model override out of range": ("model", "num_latents", 12, "multiple of 8"),
    "unknown model override": ("model", "x2zz", True, "x2zz"),
}
COMMANDS = ("run", "train", "search loss-weights")


def write(tmp_path, command: str, section: str, key: str, value) -> tuple[str, int, list[str]]:
    """The tiny spec (or run configuration, for train) with one bad value: (file, line of the key, argv)."""
    base = {s: dict(v) for s, v in BASE.items()}
    base[section][key] = value
    if command == "train":
        path, doc = tmp_path / "run.yaml", base
        argv = ["train", str(path), "--out", str(tmp_path / "out")]
    else:
        path, doc = tmp_path / "spec.yaml", {"name": "tiny", "results_dir": str(tmp_path / "results"), "base": base}
        argv = (["run", str(path), "--dry-run"] if command == "run"
                else ["search", "loss-weights", str(path), "--trials", "1", "--device", "cpu"])
    text = yaml.safe_dump(doc, sort_keys=False)
    path.write_text(text)
    line = 1 + next(i for i, row in enumerate(text.splitlines()) if row.strip().startswith(f"{key}:")
                    and text.splitlines()[i - 1 - list(base[section]).index(key)].strip() == f"{section}:")
    return str(path), line, argv


@pytest.mark.parametrize("command", COMMANDS)
@pytest.mark.parametrize("case", list(BAD))
def test_impossible_value_is_refused_naming_file_key_and_line(tmp_path, capsys, command, case):
    section, key, value, words = BAD[case]
    path, line, argv = write(tmp_path, command, section, key, value)
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert path in err and f"{section}.{key}" in err and f"line {line}" in err and words in err, err
    written = sorted(p.name for p in tmp_path.iterdir())
    assert written == [path.rsplit("/", 1)[1]], written  # no results folder, no run folder


def test_a_bad_set_value_is_blamed_on_set(tmp_path, capsys):
    path, _, argv = write(tmp_path, "train", "train", "lr", 0.001)
    assert main([*argv, "--set", "train.lr=-1"]) == 1
    err = capsys.readouterr().err
    assert "--set: train.lr must be" in err and "line" not in err
    assert not (tmp_path / "out").exists()


def test_key_lines_follow_nested_and_dotted_keys(tmp_path):
    spec = tmp_path / "spec.yaml"
    spec.write_text("name: x\nbase:\n  train:\n    lr: 1\n  eval:\n    lr: 5\nvariants:\n  a: {train.lr: 2}\n"
                    "grid:\n  train.lr: [1, 2]\n")
    assert key_lines(spec, "train.lr") == [4, 8, 10]  # not eval.lr (line 6)
    assert key_lines(spec, "eval.criterion") == [] and key_lines(tmp_path / "missing.yaml", "a.b") == []
    assert key_in_message("key 'model.x2z': Value 'maybe' is not a valid bool") == "model.x2z"
    assert key_in_message("model field 'num_latents' must be a multiple of 8") == "model.num_latents"
    assert key_in_message("data.name: unknown data set 'x'") == "data.name"


def test_a_malformed_preset_fails_at_import_with_its_name(monkeypatch):
    import sys
    import types
    from pathlib import Path

    import dynexit.models.presets as presets

    source = Path(presets.__file__).read_text()
    loop = "for _name, _values in PRESETS.items():"
    assert source.count(loop) == 1
    for broken, words in (({"num_latents": 12}, "multiple of 8"), ({"num_heads": [1, 2]}, "list of 4 ints"),
                          ({"num_latent": 16}, "unknown field(s) num_latent")):
        module = types.ModuleType("presets_copy")
        monkeypatch.setitem(sys.modules, "presets_copy", module)  # dataclasses look their module up
        edited = source.replace(loop, f"PRESETS['broken_preset'] = {broken!r}\n{loop}")
        with pytest.raises(ValueError, match="model preset 'broken_preset'") as info:
            exec(compile(edited, presets.__file__, "exec"), module.__dict__)
        assert words in str(info.value)


def test_every_preset_builds_a_valid_configuration():
    """Every preset of every registered family gives a configuration holding the preset's own values."""
    from dynexit.models import FAMILIES

    assert {"perceiver", "msdnet", "branchy"} <= set(FAMILIES)
    for family in FAMILIES.values():
        for name, values in family.presets.items():
            cfg = family.config(name)
            assert isinstance(cfg, family.config_class)
            assert {key: getattr(cfg, key) for key in values} == dict(values), name
