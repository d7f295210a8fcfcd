"""The documentation site (docs/, mkdocs.yml): every page's code runs, every dynexit command in it parses, and
the generated references cover every configuration field and every command.

``mkdocs build --strict`` itself runs in ``make test`` (CI) and ``make docs``; here, what needs no MkDocs.
"""
import dataclasses
import re
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from test_readme import ROOT, blocks, check_commands_parse, run_python_blocks

import dynexit
from dynexit.runs.spec import load_spec

sys.path.insert(0, str(ROOT / "scripts"))
import docs_reference  # noqa: E402

DOCS = ROOT / "docs"
PAGES = sorted(DOCS.glob("**/*.md"))
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def page_folder(tmp_path: Path, page: str) -> Path:
    folder = tmp_path / page.replace("/", "_").removesuffix(".md")
    folder.mkdir()
    return folder


def test_the_site_lists_every_page_and_the_pages_exist():
    config = yaml.safe_load((ROOT / "mkdocs.yml").read_text())
    listed = set()

    def walk(entries):
        for entry in entries:
            for value in entry.values():
                walk(value) if isinstance(value, list) else listed.add(value)

    walk(config["nav"])
    assert listed == {str(p.relative_to(DOCS)) for p in PAGES}
    assert config["strict"] is True and config["theme"]["name"] == "material"
    assert any("mkdocstrings" in p for p in (list(x) if isinstance(x, dict) else [x] for x in config["plugins"])
               for p in p)


@pytest.mark.parametrize("page", [str(p.relative_to(DOCS)) for p in PAGES])
def test_every_dynexit_command_of_a_page_parses(page):
    check_commands_parse(DOCS / page)


def test_the_models_page_runs(tmp_path, monkeypatch, capsys):
    namespace = run_python_blocks(DOCS / "models.md", page_folder(tmp_path, "models.md"), monkeypatch)
    out = capsys.readouterr().out
    assert "('early3', 'att', 'cnn', 'merge')" in out and "reg800m_perceiver_t128" in out
    # The weights block loaded the stand-ins: official weights outside the backbone, torchvision's inside.
    from official_layout import deterministic_weights, load_fixture

    model = namespace["model"]
    assert torch.equal(model.latent, deterministic_weights(load_fixture("reg800m_perceiver_t128")["keys"])["latent"])
    regnet = torch.load(Path.cwd() / "regnet_y_800mf.pth", weights_only=True)
    assert torch.equal(model.backbone.state_dict()["stem.0.weight"], regnet["stem.0.weight"])
    assert namespace["preds"].shape == namespace["exits"].shape == (len(namespace["images"]),)
    costs = namespace["costs"]
    assert namespace["curve"]["test_expected_cost"].between(costs.min() - 1e-9, costs.max() + 1e-9).all()
    assert isinstance(namespace["msdnet"], dynexit.MSDNet)


def test_the_own_model_page_runs(tmp_path, monkeypatch):
    from dynexit.models import FAMILIES

    before = dict(FAMILIES)
    try:
        namespace = run_python_blocks(DOCS / "own-model.md", page_folder(tmp_path, "own-model.md"), monkeypatch)
    finally:
        for name in set(FAMILIES) - set(before):
            del FAMILIES[name]
    assert namespace["tiny_exits"].shape == (16,) and namespace["wide"].config.width == 16
    assert namespace["wide"].heads[0][-1].out_features == 5
    # The page's spec trains the factory's model: it loads, and names the model's exits.
    (spec,) = blocks(DOCS / "own-model.md", "yaml")
    (Path.cwd() / "tiny.yaml").write_text(spec)
    experiment = load_spec("tiny.yaml")
    assert [run.config.model.factory for run in experiment.runs] == ["tiny_exits:make_model"]


def test_the_trained_run_page_runs(tmp_path, monkeypatch, capsys):
    """On a copy of the committed run, with an untrained stand-in for its checkpoint (checkpoints stay local)."""
    from dynexit.models.checkpoint import save_model

    folder = page_folder(tmp_path, "trained-run.md")
    source = ROOT / "results/quickstart/runs/cedd982074"
    run = folder / "results/quickstart/runs/cedd982074"
    run.mkdir(parents=True)
    for name in ("curve.csv", "costs.csv"):
        shutil.copy(source / name, run / name)
    config = yaml.safe_load((source / "config.yaml").read_text())  # Fashion-MNIST may be missing here: digits
    config["data"].update(name="digits", fallback=None, calib_size=100, train_subset=None)
    (run / "config.yaml").write_text(yaml.safe_dump(config))
    torch.manual_seed(0)
    save_model(run / "checkpoint.pt", dynexit.create_model("tiny_perceiver_t16", num_classes=10, input_size=28))
    namespace = run_python_blocks(DOCS / "trained-run.md", folder, monkeypatch)
    policy, preds, exits = namespace["policy"], namespace["preds"], namespace["exits"]
    assert policy.exit_names == ("early3", "att", "cnn", "merge")
    assert preds.shape == exits.shape == (len(namespace["images"]),)
    assert "images per exit" in capsys.readouterr().out
    # Its decisions are those of the simulated policy on the same images' logits.
    from dynexit.policies import assign_exits, confidence

    with torch.no_grad():
        logits = np.stack([y.numpy() for y in namespace["model"](namespace["images"])])
    assert (exits.numpy() == assign_exits(confidence(logits), list(policy.thresholds))).all()


def test_the_notebooks_page_runs(tmp_path, monkeypatch, capsys):
    folder = page_folder(tmp_path, "notebooks.md")
    (folder / "results").mkdir()
    (folder / "results/compare").symlink_to(ROOT / "results/compare")  # read only
    monkeypatch.delenv("DYNEXIT_RESULTS", raising=False)
    namespace = run_python_blocks(DOCS / "notebooks.md", folder, monkeypatch)
    assert set(namespace["results"].configs) == {"branchy", "static", "perceiver", "msdnet"}


def test_every_yaml_block_is_a_valid_spec_or_executor_section(tmp_path):
    """A spec (with ``base``) loads and validates every run; an ``executor`` fragment is a valid ExecutorConfig.
    The own-model page's spec names its factory: test_the_own_model_page_runs loads it."""
    from omegaconf import OmegaConf

    from dynexit.runs.spec import ExecutorConfig

    checked = 0
    for page in [ROOT / "README.md", *PAGES]:
        for index, block in enumerate(blocks(page, "yaml")):
            tree = yaml.safe_load(block)
            if "base" in tree and "factory" not in block:
                (tmp_path / f"{page.stem}_{index}.yaml").write_text(block)
                assert load_spec(tmp_path / f"{page.stem}_{index}.yaml").runs
            elif "executor" in tree:
                OmegaConf.merge(OmegaConf.structured(ExecutorConfig), tree["executor"])
            else:
                assert "factory" in block, f"{page.name} yaml block {index}: neither a spec nor an executor"
            checked += 1
    assert checked >= 3


def test_every_python_block_of_the_docs_runs_in_some_test():
    tested = {"models.md", "own-model.md", "trained-run.md", "notebooks.md", "reproducing.md"}
    with_code = {str(p.relative_to(DOCS)) for p in PAGES if blocks(p)}
    assert with_code <= tested, f"pages with python blocks but no test: {sorted(with_code - tested)}"
    assert all("imagenet" in code.lower() for code in blocks(DOCS / "reproducing.md"))


# ------------------------------------------------------------------------------ generated references

def test_the_spec_reference_has_every_field_with_type_default_and_meaning():
    from dynexit.config import DataConfig, EvalConfig, ModelConfig, TrainConfig
    from dynexit.runs.spec import ExecutorConfig

    page = docs_reference.spec_reference()
    rows = {m.group(1): m.group(2) for m in re.finditer(r"^\| `([\w.]+)` \| `[^`]+` \| `[^`]*` \| (.*) \|$",
                                                         page, re.M)}
    for section, cls in (("model", ModelConfig), ("data", DataConfig), ("train", TrainConfig),
                         ("eval", EvalConfig), ("executor", ExecutorConfig)):
        for field in dataclasses.fields(cls):
            key = f"{section}.{field.name}"
            assert key in rows, f"{key} is missing from the spec reference"
            assert rows[key].strip(), f"{key} has no meaning: give the field a comment in its dataclass"
    assert "seed" in rows
    assert "| `train.lr` | `float` | `0.001` |" in page and "| `eval.grid` | `str` | `full` |" in page
    assert "| `data.root` | `str or null` | `null` |" in page


def test_a_field_without_a_comment_is_noticed():
    @dataclasses.dataclass
    class Section:
        documented: int = 1  # what it means
        # the block above means this one
        above: int = 2
        bare: int = 3

    assert docs_reference.field_comments(Section) == {"documented": "what it means",
                                                      "above": "the block above means this one"}


def test_the_cli_reference_has_every_command_and_option():
    from dynexit.cli import build_parser

    page = docs_reference.cli_reference()
    for words, parser in docs_reference.subcommand_parsers(build_parser()):
        assert f"## `{' '.join(('dynexit', *words))}`" in page
        for action in parser._actions:
            for option in action.option_strings:
                if action.help != "==SUPPRESS==":
                    assert option in page, f"{option} of dynexit {' '.join(words)} is not in the reference"
    assert "## `dynexit search thresholds`" in page


def test_the_generated_pages_are_where_the_site_puts_them():
    assert "<!-- generated: spec -->" in (DOCS / "reference/spec.md").read_text()
    assert "<!-- generated: cli -->" in (DOCS / "reference/cli.md").read_text()
    hooks = (ROOT / "scripts/mkdocs_hooks.py").read_text()
    assert "scripts/mkdocs_hooks.py" in (ROOT / "mkdocs.yml").read_text() and "on_page_markdown" in hooks
