"""The default detectors on clean loss curves of the shapes users train (real small training,
``harness/loss_shapes.py``): never a spike, while a 10x spike or a NaN is caught. The benchmark
``benchmarks/bench_false_rollbacks.py`` runs the same at 10,000 steps and compares detectors."""

from __future__ import annotations

import copy
import math

import pytest

from elastic_resume import default_detectors
from elastic_resume.spike.detectors import DetectorBank
from harness import loss_shapes

STEPS = 2500


@pytest.fixture(scope="module")
def curves() -> dict[str, list[float]]:
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return {"regression": loss_shapes.regression(STEPS), "classification": loss_shapes.classification(STEPS),
                "curriculum": loss_shapes.classification(STEPS, curriculum=True),
                "language model, warm-up and decay": loss_shapes.language_model(600, warmup=60)}
    finally:
        torch.set_num_threads(threads)


def judge(curve: list[float], inject: dict[int, float] | None = None) -> tuple[list[int], dict[int, bool]]:
    """Steps the default detectors flag on the clean curve, and for each step in ``inject``
    whether the injected value instead of the clean one would have been flagged."""
    bank = DetectorBank(default_detectors())
    flagged, caught = [], {}
    for step, loss in enumerate(curve):
        if inject and step in inject:
            trial = copy.deepcopy(bank)
            caught[step] = bool(trial.update(step, inject[step], grad_norm=1.0)[0])
        if bank.update(step, loss, grad_norm=1.0)[0]:
            flagged.append(step)
    return flagged, caught


@pytest.mark.slow
def test_the_default_detectors_never_flag_a_clean_curve_and_catch_10x_and_nan(curves):
    for name, curve in curves.items():
        steps = range(200, len(curve), 37)
        flagged, caught = judge(curve, {s: 10 * curve[s] for s in steps})
        assert flagged == [], f"{name}: clean steps flagged {flagged[:5]}"
        rate = sum(caught.values()) / len(caught)
        if name == "regression":
            # Batch losses of this regression are heavy-tailed (7x their median, clean): a 10x
            # spike stands out of them only when its batch was not already a low one.
            assert rate > 0.3, f"{name}: 10x spikes caught at {rate:.0%} of steps"
        else:
            assert rate > 0.95, f"{name}: 10x spikes caught at {rate:.0%} of steps"
        _, nan = judge(curve, {s: math.nan for s in steps})
        assert all(nan.values()), name
