"""Checks that every segmented multi-exit model (Dyn-Perceiver, branchy, MSDNet) must pass, shared by
their test files: the segments are the forward pass, and real early exit is the simulated policy."""
from __future__ import annotations

import numpy as np
import torch

from dynexit import policies
from dynexit.inference import early_exit
from dynexit.models.state import logits_of, select


def assert_segments_are_the_forward_pass(model, x: torch.Tensor, drop_after: int, keep: list[int]) -> None:
    """Running the segments one by one gives forward's logits of every exit; after segment ``drop_after``
    only the samples ``keep`` go on (``state.select``), and theirs still match."""
    kept = torch.arange(len(x))
    with torch.no_grad():
        full = model(x)
        state = model.init_state(x)
        for k in range(len(model.exit_names)):
            state = model.run_segment(k, state)
            torch.testing.assert_close(logits_of(state)[-1], full[k][kept])
            if k == drop_after:
                kept = torch.tensor(keep)
                state = select(state, kept)
    assert logits_of(state)[-1].shape[0] == len(keep)


def assert_early_exit_equals_the_simulated_policy(model, x: torch.Tensor, batch_sizes: tuple[int, ...],
                                                  settings: int = 8) -> None:
    """``early_exit`` at each batch size takes the exits and predictions that the policy simulated on
    forward's logits assigns, for no threshold, every threshold and ``settings`` random ones; some sample
    leaves at each exit. Run the model in float64: compacted batches then give the full batch's logits to
    ~1e-15, and thresholds halfway between neighbouring confidences leave no decision to the last bit."""
    n, exits = len(x), len(model.exit_names)
    with torch.no_grad():
        logits = torch.stack(model(x)).numpy()
    conf, pred = policies.scores(logits, "max_softmax")
    rng = np.random.default_rng(0)
    mids = [(np.sort(c)[1:] + np.sort(c)[:-1]) / 2 for c in conf]
    thresholds_tried = [np.full(exits, -np.inf), np.full(exits, np.inf)]
    thresholds_tried += [np.array([rng.choice(m) for m in mids]) for _ in range(settings)]
    seen = set()
    for thresholds in thresholds_tried:
        want_exits = policies.assign_exits(conf, thresholds)
        want_pred = pred[want_exits, np.arange(n)]
        seen.update(want_exits.tolist())
        for batch in batch_sizes:
            got = [early_exit(model, x[i:i + batch], thresholds) for i in range(0, n, batch)]
            assert np.array_equal(torch.cat([e for _, e in got]).numpy(), want_exits), (batch, thresholds)
            assert np.array_equal(torch.cat([p for p, _ in got]).numpy(), want_pred), (batch, thresholds)
    assert seen == set(range(exits))
