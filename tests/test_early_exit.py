"""Real early exit gives exactly the simulated policy's decisions, and runs only what is needed."""
import numpy as np
import pytest
import torch

import dynexit
from dynexit import policies
from dynexit.inference import early_exit
from dynexit.policies import CRITERIA, exit_scores
from dynexit.timing import Timing, operating_point, thresholds_for_shares

NAME = "tiny_perceiver_t16"
SIZE, N = 16, 24  # 16 px images keep the tests fast; the model pools any size to its token grid


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tiny models: see conftest.py


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    # float64: the logits of a compacted batch equal those of the full batch to ~1e-15, so comparing with
    # the policy on full-batch logits tests the decisions, not float32 rounding of batch-size-dependent
    # kernels (float32 is tested below with thresholds away from every confidence).
    return dynexit.create_model(NAME, input_size=SIZE).double().eval()


@pytest.fixture(scope="module")
def images():
    return torch.randn(N, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(1), dtype=torch.float64)


@pytest.fixture(scope="module")
def logits(model, images):
    """Logits of all exits of the whole batch (exits, samples, classes)."""
    return all_logits(model, images)


def all_logits(model, x) -> np.ndarray:
    with torch.no_grad():
        return torch.stack(model(x)).numpy()


def simulated(logits, thresholds, criterion):
    """The policy on the logits of all exits: (predictions, exits)."""
    conf, pred = policies.scores(logits, criterion)
    exits = policies.assign_exits(conf, np.asarray(thresholds))
    return pred[exits, np.arange(len(exits))], exits


def random_thresholds(conf: np.ndarray, rng: np.random.Generator, gap: float = 0.0) -> np.ndarray:
    """Per exit, the midpoint between two neighbouring sorted confidences at a random rank (at least
    ``gap`` apart), or -inf/+inf now and then; the last exit's threshold is random too (it is ignored)."""
    out = []
    for c in conf:
        s = np.unique(c)
        mids, gaps = (s[1:] + s[:-1]) / 2, np.diff(s)
        choices = mids[gaps > gap]
        r = rng.random()
        out.append(-np.inf if r < 0.1 else np.inf if r < 0.2 else rng.choice(choices))
    return np.array(out)


def reference_scores(logits: np.ndarray, criterion: str, temperature: float | None) -> tuple[np.ndarray, np.ndarray]:
    """The criteria written out in float64 NumPy: the prediction is the first index of the largest softmax
    probability at temperature 1; the confidence is computed at ``temperature``."""
    def softmax(z):
        e = np.exp(z - z.max(axis=-1, keepdims=True))
        return e / e.sum(axis=-1, keepdims=True)

    z = logits.astype(np.float64)
    pred = softmax(z).argmax(axis=-1)
    p = softmax(z / (temperature or 1.0))
    if criterion == "max_softmax":
        return p.max(axis=-1), pred
    if criterion == "entropy":
        return np.where(p > 0, p * np.log(np.where(p > 0, p, 1.0)), 0.0).sum(axis=-1), pred
    top = np.sort(p, axis=-1)[..., ::-1]
    return (top[..., 0] - top[..., 1] if p.shape[-1] > 1 else top[..., 0]), pred


def test_exit_scores_and_policies_scores_equal_the_criteria_written_out():
    """exit_scores (the scoring of real early exit) and policies.scores (the simulated policy), each against
    the float64 reference: confidences to float32 rounding, predictions exactly (ties: the first class)."""
    rng = np.random.default_rng(0)
    logits = (rng.normal(size=(3, 200, 10)) * rng.uniform(0.1, 8, size=(3, 200, 1))).astype(np.float32)
    logits[0, :5] = 0.0  # ties
    for criterion in CRITERIA:
        for temperature in (None, 1.7):
            conf, pred = policies.scores(logits, criterion, temperature)
            want_conf, want_pred = reference_scores(logits, criterion, temperature)
            np.testing.assert_allclose(conf, want_conf, rtol=0, atol=2e-6, err_msg=criterion)
            assert np.array_equal(pred, want_pred) and (pred[0, :5] == 0).all(), criterion
            for k in range(3):
                c, p = exit_scores(torch.from_numpy(logits[k]), criterion, temperature)
                np.testing.assert_allclose(c.numpy(), want_conf[k], rtol=0, atol=2e-6, err_msg=criterion)
                assert np.array_equal(p.numpy(), want_pred[k]), criterion
    one_class = np.zeros((1, 4, 1), dtype=np.float32)  # margin with one class: the top probability, 1
    assert exit_scores(torch.from_numpy(one_class[0]), "margin")[0].tolist() == [1.0] * 4
    assert policies.confidence(one_class, "margin")[0].tolist() == [1.0] * 4


@pytest.mark.parametrize("criterion", CRITERIA)
def test_early_exit_equals_simulated_policy(model, images, logits, criterion):
    rng = np.random.default_rng(CRITERIA.index(criterion))
    conf = policies.confidence(logits, criterion)
    settings = [np.full(4, -np.inf), np.full(4, np.inf)]  # everyone at the first exit; everyone at the last
    settings += [random_thresholds(conf, rng) for _ in range(8)]
    seen = set()
    for thresholds in settings:
        want_pred, want_exits = simulated(logits, thresholds, criterion)
        seen.update(want_exits.tolist())
        for batch in (N, 7):
            got = [early_exit(model, images[i:i + batch], thresholds, criterion) for i in range(0, N, batch)]
            assert np.array_equal(torch.cat([e for _, e in got]).numpy(), want_exits), (batch, thresholds)
            assert np.array_equal(torch.cat([p for p, _ in got]).numpy(), want_pred), (batch, thresholds)
        for i in range(0, N, 4):  # batches of one
            p, e = early_exit(model, images[i:i + 1], thresholds, criterion)
            assert (p.item(), e.item()) == (want_pred[i], want_exits[i]), (i, thresholds)
    assert seen == {0, 1, 2, 3}
    for thresholds, exit_ in ((settings[0], 0), (settings[1], 3)):
        assert (simulated(logits, thresholds, criterion)[1] == exit_).all()


def test_float32_model_equals_simulated_policy(images):
    torch.manual_seed(2)
    model = dynexit.create_model(NAME, input_size=SIZE).eval()
    x = images.float()
    logits = all_logits(model, x)
    conf = policies.confidence(logits)
    rng = np.random.default_rng(5)
    for _ in range(3):
        # float32 logits depend on the batch size by ~1e-6: keep thresholds 1e-5 away from every confidence
        thresholds = random_thresholds(conf, rng, gap=2e-5)
        want_pred, want_exits = simulated(logits, thresholds, "max_softmax")
        for batch in (N, 1):
            got = [early_exit(model, x[i:i + batch], thresholds) for i in range(0, N, batch)]
            assert np.array_equal(torch.cat([e for _, e in got]).numpy(), want_exits)
            assert np.array_equal(torch.cat([p for p, _ in got]).numpy(), want_pred)


def spy_segments(model, monkeypatch) -> list[tuple[int, int]]:
    """Records (segment, batch size) of every run_segment call."""
    calls = []
    original = model.run_segment

    def run_segment(k, s):
        calls.append((k, s.x.shape[0]))
        return original(k, s)

    monkeypatch.setattr(model, "run_segment", run_segment)
    return calls


def test_compaction_runs_each_segment_only_for_samples_still_running(model, images, logits, monkeypatch):
    rng = np.random.default_rng(3)
    conf = policies.confidence(logits)
    for _ in range(5):
        thresholds = random_thresholds(conf, rng)
        _, want_exits = simulated(logits, thresholds, "max_softmax")
        calls = spy_segments(model, monkeypatch)
        early_exit(model, images, thresholds)
        running = [int((want_exits >= k).sum()) for k in range(4)]
        assert calls == [(k, n) for k, n in enumerate(running) if n > 0]
        monkeypatch.undo()


def test_batch_of_one_returns_at_first_confident_exit(model, images, logits, monkeypatch):
    conf = policies.confidence(logits[:, :1])[:, 0]
    for k in range(4):
        thresholds = np.where(np.arange(4) == k, conf.astype(np.float64) - 1e-6, np.inf)  # exit k only
        calls = spy_segments(model, monkeypatch)
        _, exits = early_exit(model, images[:1], thresholds)
        assert exits.item() == k and calls == [(j, 1) for j in range(k + 1)]
        monkeypatch.undo()


def test_early_exit_restores_mode_and_checks_input(model, images):
    model.train()
    try:
        thresholds = [0.0, np.inf, np.inf]  # one per exit but the last
        assert early_exit(model, images[:4], thresholds)[1].tolist() == [0, 0, 0, 0]
        assert model.training
    finally:
        model.eval()
    with pytest.raises(ValueError, match="thresholds has 2 values"):
        early_exit(model, images, [0.5, 0.5])
    with pytest.raises(ValueError, match="criterion"):
        early_exit(model, images, [0.5] * 4, criterion="maxprob")
    with pytest.raises(ValueError, match="NaN"):
        early_exit(model, images, [np.nan] * 4)
    p, e = early_exit(model, images[:0], [0.5] * 4)
    assert p.shape == e.shape == (0,)


def test_thresholds_for_shares_send_those_shares_out(model, images):
    thresholds = thresholds_for_shares(model, images, (0.5, 0.25, 0.0, 0.25), batch_size=16)
    _, exits = early_exit(model, images, thresholds)
    assert np.bincount(exits.numpy(), minlength=4).tolist() == [12, 6, 0, 6]
    point = operating_point(model, images, (0.5, 0.0, 0.0, 0.5), (1.0, 2.0, 3.0, 4.0), batch_size=N,
                            repeats=1, warmup=0)
    assert point.shares == (0.5, 0.0, 0.0, 0.5)
    assert point.expected_gmacs == 2.5 and point.expected_gain == 1.6


def test_timing_summary():
    t = Timing((0.01, 0.02, 0.03, 0.04, 1.0))
    assert t.median == 0.03
    assert t.spread == pytest.approx((0.52 - 0.015) / 0.03)


def test_bench_cli_reports_every_exit_and_the_requested_shares(capsys):
    from dynexit.cli import main

    argv = ["bench", NAME, "--input-size", "16", "--batch-size", "4", "--images", "8", "--repeats", "1",
            "--warmup", "0", "--shares", "0.5,0.25,0,0.25", "--default-malloc"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "one multiply-add as one FLOP" in out
    rows = [line.split() for line in out.splitlines() if line.split()[:1] in (["0"], ["1"], ["2"], ["3"])]
    assert [r[1] for r in rows] == ["early3", "att", "cnn", "merge"] and float(rows[-1][-1]) == 1.0
    point = next(line.split() for line in out.splitlines() if line.strip().startswith("0.50,0.25"))
    assert point[1] == "0.50,0.25,0.00,0.25"  # measured shares = target shares on these images
    assert main(["bench", NAME, "--shares", "0.5,0.5", "--default-malloc"]) == 1
    assert "2 values for 4 exits" in capsys.readouterr().err
