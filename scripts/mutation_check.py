"""Mutation check: breaks the core modules the way a regression would and runs the tests that should notice.

Each mutant is one text substitution in one file (the script first checks that the text occurs exactly once,
so a mutant cannot silently stop applying when the code changes) and names the tests that must catch it.
Everything happens in a temporary copy of the repository (the files git tracks or would track); the working
tree is never touched. A mutant is caught when its tests fail; it survives when they pass. The unmutated copy
must pass the same tests first.

    python scripts/mutation_check.py            # every mutant; exit status 1 if one survives
    python scripts/mutation_check.py --list     # the mutants and their tests
    python scripts/mutation_check.py -k costs   # the mutants whose name contains "costs"

Not part of CI (it runs the named tests once per mutant); run it before resolving an issue that touches
these modules, and record its output in benchmarks/README.md ("Mutation check").
"""
from __future__ import annotations

import argparse
import datetime
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Mutant:
    name: str
    path: str  # file, relative to the repository root
    old: str  # text that occurs exactly once in the file
    new: str
    tests: tuple[str, ...]  # pytest node ids (or files) that must fail


MUTANTS: tuple[Mutant, ...] = (
    # ------------------------------------------------------------------ costs
    Mutant("costs: attention counted as zero", "dynexit/costs.py",
           "return prod(batch) * length * keys * (width + v[-1])", "return 0",
           ("tests/test_pinned_costs.py",)),
    Mutant("costs: attention counts Q.K^T only", "dynexit/costs.py",
           "return prod(batch) * length * keys * (width + v[-1])", "return prod(batch) * length * keys * width",
           ("tests/test_pinned_costs.py",)),
    Mutant("costs: LayerNorm counted as zero", "dynexit/costs.py",
           'counter.set_op_handle("aten::scaled_dot_product_attention", sdpa_flop_jit)',
           'counter.set_op_handle("aten::scaled_dot_product_attention", sdpa_flop_jit)\n'
           '    counter.set_op_handle("aten::layer_norm", lambda inputs, outputs: 0)',
           ("tests/test_pinned_costs.py",)),
    Mutant("costs: adaptive average pooling counted as zero", "dynexit/costs.py",
           'counter.set_op_handle("aten::scaled_dot_product_attention", sdpa_flop_jit)',
           'counter.set_op_handle("aten::scaled_dot_product_attention", sdpa_flop_jit)\n'
           '    counter.set_op_handle("aten::adaptive_avg_pool2d", lambda inputs, outputs: 0)',
           ("tests/test_pinned_costs.py",)),
    Mutant("costs: the count takes x2z's strided pooled convolution", "dynexit/models/pooled_depthwise.py",
           "if conv._forward_hooks or conv._forward_pre_hooks or torch.jit.is_tracing() or torch.jit.is_scripting():",
           "if False:",
           ("tests/test_pinned_costs.py",)),
    Mutant("costs: exit k counts segment k alone", "dynexit/costs.py",
           "return tuple(accumulate(self.segment_macs))", "return tuple(self.segment_macs)",
           ("tests/test_pinned_costs.py",)),
    # ------------------------------------------------------------------ policies and curves
    Mutant("policies: n_k = floor(N p_k) in float64", "dynexit/policies/thresholds.py",
           "wanted = np.floor(np.float32(num_samples) * p).astype(np.int64)",
           "wanted = np.floor(num_samples * p.astype(np.float64)).astype(np.int64)",
           ("tests/test_protocol_bits.py",)),
    Mutant("policies: expected cost summed in float64", "dynexit/policies/thresholds.py",
           "    total = np.float32(0.0)\n    for term in shares32 * costs.astype(np.float32):\n"
           "        total = np.float32(total + term)",
           "    total = float((counts / num_samples) @ costs)",
           ("tests/test_protocol_bits.py", "tests/test_policies.py::test_official_protocol_reproduces_reference")),
    Mutant("policies: calibration exits only above the threshold", "dynexit/policies/thresholds.py",
           "remaining &= ~(conf[k] >= thresholds[k])", "remaining &= ~(conf[k] > thresholds[k])",
           ("tests/test_protocol_bits.py",)),
    Mutant("policies: a sample exits only above its threshold", "dynexit/policies/thresholds.py",
           "exits[conf[k] >= thresholds[k]] = k", "exits[conf[k] > thresholds[k]] = k",
           ("tests/test_protocol_bits.py",)),
    Mutant("curves: interpolation extrapolates past the cost range", "dynexit/curves.py",
           "return np.where((at < xs[0]) | (at > xs[-1]), np.nan, out)", "return out",
           ("tests/test_curves.py",)),
    Mutant("curves: points of equal cost keep the least accurate", "dynexit/curves.py",
           "ys = np.full(len(xs), -np.inf)\n    np.maximum.at(ys, inverse, y)",
           "ys = np.full(len(xs), np.inf)\n    np.minimum.at(ys, inverse, y)",
           ("tests/test_curves.py",)),
    Mutant("curves: the staircase forgets cheaper, better points", "dynexit/curves.py",
           "best = np.maximum.accumulate(acc)", "best = acc",
           ("tests/test_curves.py",)),
    # ------------------------------------------------------------------ real early exit
    Mutant("inference: a sample leaves only above its threshold", "dynexit/inference.py",
           "done = conf.double() >= limits[k]", "done = conf.double() > limits[k]",
           ("tests/test_early_exit.py",)),
    Mutant("inference: the finished samples are not dropped from the batch", "dynexit/inference.py",
           "                running = running[keep]\n                s = select(s, keep)\n",
           "                done[:] = False\n",
           ("tests/test_early_exit.py",)),
    # ------------------------------------------------------------------ safe loading and checkpoints
    Mutant("safe loading: torch files unpickled without weights_only", "dynexit/utils.py",
           'return torch.load(path, map_location="cpu", weights_only=True)',
           'return torch.load(path, map_location="cpu", weights_only=False)',
           ("tests/test_safe_loading.py",)),
    Mutant("safe loading: logits files allow pickles", "dynexit/logits.py",
           "data = np.load(path, allow_pickle=False)", "data = np.load(path, allow_pickle=True)",
           ("tests/test_safe_loading.py",)),
    Mutant("safe loading: YAML read with the unsafe loader", "dynexit/yaml_files.py",
           "class UniqueKeyLoader(yaml.SafeLoader):", "class UniqueKeyLoader(yaml.UnsafeLoader):",
           ("tests/test_safe_loading.py",)),
    Mutant("checkpoints: ema=True loads the trained weights", "dynexit/models/checkpoint.py",
           'key = "ema" if ema else "model"', 'key = "model"',
           ("tests/test_checkpoints.py",)),
    Mutant("checkpoints: loading leaves the model in training mode", "dynexit/models/checkpoint.py",
           "return model.eval()", "return model",
           ("tests/test_checkpoints.py",)),
    # ------------------------------------------------------------------ the run pipeline
    Mutant("pipeline: thresholds fitted on the test logits", "dynexit/runs/pipeline.py",
           "curve = budgeted_curve(calib_logits, calib_targets, test_logits, test_targets, gmacs,",
           "curve = budgeted_curve(test_logits, test_targets, test_logits, test_targets, gmacs,",
           ("tests/test_pipeline_split.py",)),
    Mutant("pipeline: the curve measured on the calibration logits", "dynexit/runs/pipeline.py",
           "curve = budgeted_curve(calib_logits, calib_targets, test_logits, test_targets, gmacs,",
           "curve = budgeted_curve(calib_logits, calib_targets, calib_logits, calib_targets, gmacs,",
           ("tests/test_pipeline_split.py",)),
    Mutant("pipeline: anytime accuracy on the calibration logits", "dynexit/runs/pipeline.py",
           "anytime = anytime_accuracy(test_logits, test_targets, gmacs, exit_names=names)",
           "anytime = anytime_accuracy(calib_logits, calib_targets, gmacs, exit_names=names)",
           ("tests/test_pipeline_split.py",)),
    Mutant("pipeline: a run computes with its process's threads, not train.threads", "dynexit/training/determinism.py",
           "    torch.set_num_threads(threads)\n", "",
           ("tests/test_run_identity.py::test_one_worker_or_two_give_bit_identical_runs",)),
    # ------------------------------------------------------------------ training
    Mutant("training: the step bypasses the gradient scaler", "dynexit/training/loop.py",
           "                self.scaler.step(self.optimizer)\n", "                self.optimizer.step()\n",
           ("tests/test_training.py::test_the_loops_scaled_fp16_steps_equal_unscaled_ones",)),
    Mutant("training: gradients clipped before they are unscaled", "dynexit/training/loop.py",
           "                    self.scaler.unscale_(self.optimizer)\n", "",
           ("tests/test_training.py::test_the_loops_scaled_fp16_steps_equal_unscaled_ones",)),
    Mutant("training: distributed evaluation loaders drop their workers", "dynexit/training/loop.py",
           "pin_memory=pin, persistent_workers=workers > 0)", "pin_memory=pin, persistent_workers=False)",
           ("tests/test_gpu_speed.py::test_distributed_evaluation_loaders_keep_their_workers",)),
    Mutant("runs: a default train field enters the run id", "dynexit/runs/spec.py",
           'IDENTITY_IF_SET = {"reference_batch": None, "scale_lr": False, "compile": False, "eval_calib": "every"}',
           'IDENTITY_IF_SET = {"reference_batch": None, "scale_lr": False, "eval_calib": "every"}',
           ("tests/test_gpu_speed.py::test_a_train_field_at_its_default_keeps_the_committed_run_id",)),
    # ------------------------------------------------------------------ models
    Mutant("msdnet: prune min keeps only its first transition", "dynexit/models/msdnet.py",
           "done in (total // 3, 2 * total // 3)", "done in (total // 3,)",
           ("tests/test_msdnet.py::test_other_reference_options_follow_the_reference_rules",)),
    Mutant("msdnet: the strided conv's bottleneck takes its own scale's width", "dynexit/models/msdnet.py",
           "b[s - 1] if has_finer else 0, b[s])", "b[s] if has_finer else 0, b[s])",
           ("tests/test_msdnet.py::test_without_bottleneck_each_growth_is_one_3x3_conv",)),
    # ------------------------------------------------------------------ documented numbers
    Mutant("README: a figure of a result table changed", "results/README.md",
           "| test accuracy, % | 91.91 |", "| test accuracy, % | 91.92 |",
           ("tests/test_result_tables.py",)),
)


def repository_files(root: Path) -> list[str]:
    """The files git tracks or would track (untracked but not ignored), relative to ``root``."""
    out = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=root,
                         check=True, capture_output=True).stdout.decode()
    return [name for name in out.split("\0") if name and (root / name).is_file()]


def copy_repository(root: Path, target: Path) -> None:
    for name in repository_files(root):
        dest = target / name
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(root / name, dest)


TIMEOUT = 1200  # seconds for one pytest run: a mutant that hangs the tests is reported as an error


def run_tests(copy: Path, tests: tuple[str, ...]) -> tuple[int, str]:
    """pytest's exit status (1: a test failed) and its last line, on ``tests`` in ``copy``."""
    env = {**os.environ, "PYTHONPATH": str(copy), "PYTHONDONTWRITEBYTECODE": "1"}
    cmd = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *tests]
    try:
        proc = subprocess.run(cmd, cwd=copy, env=env, capture_output=True, text=True, timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        return -1, f"timed out after {TIMEOUT} s"
    lines = [line for line in proc.stdout.strip().splitlines() if line.strip()]
    return proc.returncode, lines[-1] if lines else proc.stderr.strip()[-200:]


def apply(copy: Path, mutant: Mutant) -> str:
    """Applies ``mutant`` in ``copy``; returns the original text of the file. ValueError if the text to
    replace does not occur exactly once."""
    path = copy / mutant.path
    original = path.read_text()
    found = original.count(mutant.old)
    if found != 1:
        raise ValueError(f"mutant {mutant.name!r}: the text to replace occurs {found} times in {mutant.path}, "
                         f"not once: {mutant.old!r}")
    path.write_text(original.replace(mutant.old, mutant.new))
    return original


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-k", dest="select", default="", help="only the mutants whose name contains this text")
    parser.add_argument("--list", action="store_true", help="list the mutants and their tests, run nothing")
    args = parser.parse_args(argv)
    mutants = [m for m in MUTANTS if args.select in m.name]
    if args.list:
        for m in mutants:
            print(f"{m.name}: {m.path} -> {' '.join(m.tests)}")
        return 0
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                            text=True).stdout.strip()
    dirty = subprocess.run(["git", "status", "--porcelain"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    print(f"mutation check, {datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC, commit {commit}"
          f"{' (with uncommitted changes)' if dirty else ''}, {len(mutants)} mutants", flush=True)
    survivors, errors = [], []
    began = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="dynexit-mutants-") as tmp:
        copy = Path(tmp) / "repo"
        copy_repository(ROOT, copy)
        for m in mutants:  # every mutant applies, before anything runs
            (copy / m.path).write_text(apply(copy, m))
        baseline = sorted({t for m in mutants for t in m.tests})
        rc, last = run_tests(copy, tuple(baseline))
        if rc != 0:
            print(f"the unmutated copy fails its tests ({last}): fix them first")
            return 2
        for m in mutants:
            start = time.monotonic()
            original = apply(copy, m)
            try:
                rc, last = run_tests(copy, m.tests)
            finally:
                (copy / m.path).write_text(original)
            verdict = {0: "SURVIVED", 1: "caught"}.get(rc, f"error (pytest exit {rc})")
            print(f"  {verdict:<8} {m.name} [{time.monotonic() - start:.0f} s; {last}]", flush=True)
            if rc == 0:
                survivors.append(m.name)
            elif rc != 1:
                errors.append(m.name)
    print(f"{len(mutants) - len(survivors) - len(errors)} of {len(mutants)} caught in "
          f"{(time.monotonic() - began) / 60:.0f} min; "
          f"survivors: {', '.join(survivors) if survivors else 'none'}"
          + (f"; errors: {', '.join(errors)}" if errors else ""))
    return 1 if survivors or errors else 0


if __name__ == "__main__":
    sys.exit(main())
