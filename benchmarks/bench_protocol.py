"""Speed of the budgeted protocol on ImageNet-sized logits.

Random logits (seeded): 4 exits, 12,928 calibration and 50,000 test samples, 1000 classes. Prints the
time of the 33-point official curve (median of a few runs), split into the one softmax pass and the
33 operating points, the time of one ``evaluate_thresholds`` call (the inner step of a threshold
search), and, unless ``--no-loop``, the time of a per-sample Python-loop version of the protocol
(torch element indexing, the official code's approach) on a subset, extrapolated to the full size.

    python benchmarks/bench_protocol.py [--repeats 5] [--loop-fraction 0.05] [--no-loop]
"""
from __future__ import annotations

import argparse
import math
import statistics
import time

import numpy as np
import torch

from dynexit.policies import budgeted_curve, curve_from_scores, evaluate_thresholds, official_grid, scores

EXITS, CALIB, TEST, CLASSES = 4, 12_928, 50_000, 1000
COSTS = [0.4591, 1.0649, 1.2276, 1.298]


def make_logits(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Logits whose confidence and accuracy grow with the exit index, like a trained model's."""
    targets = rng.integers(0, CLASSES, n)
    logits = rng.standard_normal((EXITS, n, CLASSES), dtype=np.float32)
    for k in range(EXITS):
        signal = rng.standard_normal(n).astype(np.float32) * 2.0 + 2.0 + 1.5 * k
        logits[k, np.arange(n), targets] += signal
    return logits, targets


def median_time(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def loop_protocol(probs_calib: torch.Tensor, y_calib: torch.Tensor, probs_test: torch.Tensor,
                  y_test: torch.Tensor, grid: np.ndarray) -> list[tuple[float, float, float]]:
    """The protocol with per-sample Python loops over torch tensors: (test acc, test cost, T_0) per point."""
    conf_c, pred_c = probs_calib.max(dim=2)
    conf_t, pred_t = probs_test.max(dim=2)
    num_exits, n = conf_c.shape
    order = conf_c.sort(dim=1, descending=True).indices
    out = []
    for p in torch.from_numpy(grid):
        thresholds = torch.full((num_exits,), 1e8)
        exited = torch.zeros(n)
        for k in range(num_exits - 1):
            wanted, seen = math.floor(n * p[k]), 0
            for i in range(n):
                idx = order[k][i]
                if exited[idx] == 0:
                    seen += 1
                    if seen == wanted:
                        thresholds[k] = conf_c[k][idx]
                        break
            exited.add_(conf_c[k].ge(thresholds[k]).float())
        thresholds[-1] = -1e8
        results = []
        for conf, pred, y in ((conf_c, pred_c, y_calib), (conf_t, pred_t, y_test)):
            right, counts = 0, torch.zeros(num_exits)
            for i in range(conf.shape[1]):
                for k in range(num_exits):
                    if conf[k][i].item() >= thresholds[k]:
                        right += int(pred[k][i].item() == y[i].item())
                        counts[k] += 1
                        break
            cost = sum(float(counts[k] / conf.shape[1]) * COSTS[k] for k in range(num_exits))
            results.append((right * 100.0 / conf.shape[1], cost))
        out.append((results[1][0], results[1][1], float(thresholds[0])))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--loop-fraction", type=float, default=0.05,
                        help="share of the samples the per-sample loop version runs on")
    parser.add_argument("--no-loop", action="store_true")
    args = parser.parse_args()

    rng = np.random.default_rng(0)
    calib_logits, calib_y = make_logits(rng, CALIB)
    test_logits, test_y = make_logits(rng, TEST)
    print(f"logits: calib {calib_logits.shape}, test {test_logits.shape}; torch threads {torch.get_num_threads()}")

    t_scores = median_time(lambda: (scores(calib_logits), scores(test_logits)), max(1, args.repeats // 2))
    (conf_c, pred_c), (conf_t, pred_t) = scores(calib_logits), scores(test_logits)
    correct_c, correct_t = pred_c == calib_y, pred_t == test_y
    t_points = median_time(lambda: curve_from_scores(conf_c, correct_c, conf_t, correct_t, COSTS), args.repeats)
    t_full = median_time(lambda: budgeted_curve(calib_logits, calib_y, test_logits, test_y, COSTS),
                         max(1, args.repeats // 2))
    curve = curve_from_scores(conf_c, correct_c, conf_t, correct_t, COSTS)
    thresholds = curve[[f"threshold_{k}" for k in range(EXITS)]].to_numpy()[16]
    t_eval = median_time(lambda: [evaluate_thresholds(conf_t, correct_t, thresholds, COSTS) for _ in range(100)],
                         args.repeats) / 100

    print(f"softmax/confidence pass (calib + test, once):  {t_scores:8.3f} s")
    print(f"33 operating points on precomputed scores:     {t_points:8.3f} s  (median of {args.repeats})")
    print(f"budgeted_curve end to end (from logits):       {t_full:8.3f} s")
    print(f"evaluate_thresholds, 50,000 test samples:      {t_eval * 1e3:8.3f} ms/call "
          f"(~{60 / t_eval:,.0f} calls/min)")
    print(f"test accuracy range {curve.test_accuracy.min():.2f}-{curve.test_accuracy.max():.2f} %, "
          f"cost {curve.test_expected_cost.min():.3f}-{curve.test_expected_cost.max():.3f}")

    if args.no_loop:
        return
    n_c, n_t = int(CALIB * args.loop_fraction), int(TEST * args.loop_fraction)
    probs_c = torch.softmax(torch.from_numpy(calib_logits[:, :n_c]), dim=-1)
    probs_t = torch.softmax(torch.from_numpy(test_logits[:, :n_t]), dim=-1)
    start = time.perf_counter()
    loop = loop_protocol(probs_c, torch.from_numpy(calib_y[:n_c]), probs_t, torch.from_numpy(test_y[:n_t]),
                         official_grid())
    t_loop = time.perf_counter() - start
    t_loop_full = t_loop / args.loop_fraction  # both loops are linear in the number of samples
    small = curve_from_scores(conf_c[:, :n_c], correct_c[:, :n_c], conf_t[:, :n_t], correct_t[:, :n_t], COSTS)
    same = (np.allclose([r[0] for r in loop], small.test_accuracy, atol=1e-9)
            and np.allclose([r[1] for r in loop], small.test_expected_cost, atol=1e-5)
            and np.array_equal(np.float32([r[2] for r in loop]), small.threshold_0.to_numpy(np.float32)))
    print(f"per-sample loop version on {n_c} + {n_t} samples: {t_loop:8.3f} s -> ~{t_loop_full:.1f} s at full "
          f"size (linear extrapolation); results equal the vectorized ones: {same}")
    print(f"speed-up: {t_loop_full / t_points:,.0f}x on precomputed scores, "
          f"{t_loop_full / t_full:,.0f}x end to end (the loop figure excludes its softmax)")


if __name__ == "__main__":
    main()
