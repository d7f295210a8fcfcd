import argparse

import pytest
import torch
from official_layout import deterministic_weights, load_fixture

from dynexit.cli import main
from dynexit.models.checkpoint import load_model


def test_convert_official_reads_architecture_from_checkpoint_args(tmp_path, capsys):
    name = "mobilenetV3_0x75_perceiver_t128"
    fixture = load_fixture(name)
    args = argparse.Namespace(model=name, depth_factor=["1", "1", "1", "3"], with_x2z=True, with_isc=True,
                              SA_widening_factor=4, nb_classes=1000, input_size=224)
    source, target = tmp_path / "official.pth", tmp_path / "dynexit.pt"
    torch.save({"model": deterministic_weights(fixture["keys"]), "args": args, "epoch": 3}, source)
    assert main(["convert-official", str(source), str(target)]) == 0
    model = load_model(target)
    x = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        merge = model(x)[-1]
    ref = fixture["outputs"]["merge"]
    assert (merge - ref).abs().max() <= 1e-4 * ref.abs().max()
    # An existing output is never overwritten without --force.
    before = target.read_bytes()
    assert main(["convert-official", str(source), str(target)]) == 1
    assert "exists" in capsys.readouterr().err
    assert target.read_bytes() == before


def test_convert_official_errors_are_one_line(tmp_path, capsys):
    assert main(["convert-official", str(tmp_path / "missing.pth"), str(tmp_path / "out.pt")]) == 1
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "missing.pth" in err
    torch.save({"model": {"latent": torch.zeros(128, 32)}}, tmp_path / "bare.pth")
    assert main(["convert-official", str(tmp_path / "bare.pth"), str(tmp_path / "out.pt")]) == 1
    assert "--model" in capsys.readouterr().err
    assert not (tmp_path / "out.pt").exists()


def test_help_of_every_command_has_an_example(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    top = capsys.readouterr().out
    from dynexit.cli import build_parser
    commands = build_parser()._subparsers._group_actions[0].choices
    for command in commands:
        assert command in top
        with pytest.raises(SystemExit):
            main([command, "--help"])
        assert f"dynexit {command}" in capsys.readouterr().out.split("example")[-1], command


def test_convert_from_names_the_source_and_gives_what_the_named_converters_give(tmp_path, capsys):
    name = "mobilenetV3_0x75_perceiver_t128"
    fixture = load_fixture(name)
    args = argparse.Namespace(model=name, depth_factor=["1", "1", "1", "3"], nb_classes=1000, input_size=224)
    source = tmp_path / "official.pth"
    torch.save({"model": deterministic_weights(fixture["keys"]), "args": args}, source)
    assert main(["convert", "--from", "official", str(source), str(tmp_path / "a.pt")]) == 0
    assert main(["convert-official", str(source), str(tmp_path / "b.pt")]) == 0
    a, b = load_model(tmp_path / "a.pt"), load_model(tmp_path / "b.pt")
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    capsys.readouterr()
    assert main(["convert", "--from", "msdnet", str(source), str(tmp_path / "c.pt")]) == 1
    assert "--from msdnet needs --model" in capsys.readouterr().err
    assert not (tmp_path / "c.pt").exists()
