"""The protocol fixture (tests/fixtures/protocol_seed1.*) and the check that a curve reproduces it.

The fixture holds the official protocol's exact results. Confidences are float32 softmax maxima, and
torch's float32 softmax rounds differently by an ulp or two on different CPU kernels (AVX2 / AVX-512),
so a threshold may differ by a few ulps from the fixture's. Where some sample's confidence lies within
those ulps of a point's threshold, the CPU's rounding decides which side it falls on, and that point's
accuracy and cost may differ by that one sample; every other accuracy and expected cost must equal the
fixture's exactly (the same samples at each exit, the same float32 arithmetic).
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd

from dynexit.policies import confidence

FIXTURES = Path(__file__).parent / "fixtures"
ULPS = 4
METRICS = ("calib_accuracy", "calib_expected_cost", "test_accuracy", "test_expected_cost")


def load_reference() -> tuple[dict[str, np.ndarray], dict]:
    arrays = np.load(FIXTURES / "protocol_seed1.npz", allow_pickle=False)
    meta = json.loads((FIXTURES / "protocol_seed1.json").read_text())
    return {key: arrays[key] for key in arrays.files}, meta


def _tied(conf: np.ndarray, thresholds: np.ndarray, own: int) -> bool:
    """Whether more than ``own`` confidences of some exit lie within ULPS ulps of its threshold (``own``: 1 on
    the calibration split, where the threshold is a sample's own confidence and stays on its side)."""
    for k, t in enumerate(thresholds):
        if abs(t) > 1:  # never / always exit: nothing can tie
            continue
        t32 = np.float32(t)
        if np.count_nonzero(np.abs(conf[k] - t32) <= ULPS * np.spacing(t32)) > own:
            return True
    return False


def assert_reproduces_reference(curve: pd.DataFrame, reference) -> int:
    """Checks ``curve`` (33 official points) against the fixture as the module docstring says; returns how
    many points had a confidence tied with a threshold (and were allowed one sample of difference)."""
    arrays, meta = reference
    points = meta["operating_points"]
    exits = arrays["calib_logits"].shape[0]
    thresholds = curve[[f"threshold_{k}" for k in range(exits)]].to_numpy()
    np.testing.assert_array_max_ulp(thresholds.astype(np.float32),
                                    np.array([p["thresholds"] for p in points], dtype=np.float32), maxulp=ULPS)
    conf = {split: confidence(arrays[f"{split}_logits"]) for split in ("calib", "test")}
    max_cost = max(meta["costs"])
    tied = 0
    for i, p in enumerate(points):
        row = curve.iloc[i]
        tie = any(_tied(conf[split], thresholds[i], own=int(split == "calib")) for split in conf)
        tied += tie
        for key in METRICS:
            n = len(arrays[f"{key.split('_')[0]}_targets"])
            one_sample = (100.0 if key.endswith("accuracy") else max_cost) / n
            if tie:
                assert abs(row[key] - p[key]) <= one_sample + 1e-6, (i, key, row[key], p[key], "tie")
            else:
                assert row[key] == p[key], (i, key, row[key], p[key], "no tie")
    return tied
