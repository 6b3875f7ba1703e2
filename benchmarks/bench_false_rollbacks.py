"""False rollbacks of the default detectors on clean loss curves of the shapes users train, side
by side with the rules a user could pick instead, in one run:

  false rollbacks per 10,000 clean steps                               goal: 0 on every shape
  10x spikes caught (the judged loss times 10 at every 25th step)       goal: all where the
                                                                        batches vary less than 3x
  NaN caught                                                            goal: all

Curves (``harness/loss_shapes.py``, real training, the global loss of 2 ranks): a regression
converging towards 0, classification, language-model cross-entropy, a curriculum with three
steps, a warm-up and cosine decay. Rules: the default (``MaxRatio``: 3x the highest of the last
128), 0.3's default (``RobustZScore(window=50, z=8)``), OLMo-core's (mean + 6 standard
deviations over 128 steps) and Megatron's (10x the running maximum).

Usage: python benchmarks/bench_false_rollbacks.py [--steps 10000]
"""

from __future__ import annotations

import argparse
import copy
import math
import os
import statistics
import sys
import time
from collections import deque
from dataclasses import dataclass

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from elastic_resume.spike.detectors import OK, Detector, DetectorBank, MaxRatio, NonFinite, RobustZScore, Verdict
from harness.loss_shapes import SHAPES


@dataclass(kw_only=True)
class MeanSigma(Detector):
    """OLMo-core's rule: more than ``sigmas`` standard deviations above the mean of the last
    ``window`` values."""

    sigmas: float = 6.0
    window: int = 128

    def __post_init__(self) -> None:
        super().__post_init__()
        self.values: deque[float] = deque(maxlen=self.window)
        self.warmup = max(self.warmup, 16)

    def _absorb(self, value: float) -> None:
        self.values.append(value)

    def _judge(self, value: float, step: int) -> Verdict:
        mean, sd = statistics.fmean(self.values), statistics.pstdev(self.values)
        return Verdict(spike=True, reason="6 sigma") if value > mean + self.sigmas * sd else OK


RULES = {
    "default: MaxRatio(3x max of 128)": lambda: MaxRatio(),
    "0.3 default: RobustZScore(50, z=8)": lambda: RobustZScore(window=50, z=8.0),
    "OLMo-core: mean + 6 sd of 128": lambda: MeanSigma(),
    "Megatron: 10x the running max": lambda: MaxRatio(ratio=10.0, window=10**6),
}


def judge(curve: list[float], make) -> tuple[int, float, float]:
    """(clean steps flagged, share of 10x spikes caught, share of NaNs caught)."""
    bank = DetectorBank([NonFinite(watch="loss"), make()])
    flagged = caught = nans = trials = 0
    for step, loss in enumerate(curve):
        if step >= 200 and step % 25 == 0:
            trials += 1
            caught += bool(copy.deepcopy(bank).update(step, 10 * loss)[0])
            nans += bool(copy.deepcopy(bank).update(step, math.nan)[0])
        flagged += bool(bank.update(step, loss)[0])
    return flagged, caught / trials, nans / trials


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=10_000)
    args = p.parse_args()
    torch.set_num_threads(1)
    print(f"clean curves of {args.steps} steps, global loss of 2 ranks; per rule: false rollbacks per 10,000 "
          "clean steps | 10x spikes caught | NaN caught")
    for shape, make_curve in SHAPES.items():
        t0 = time.perf_counter()
        curve = make_curve(args.steps)
        print(f"\n{shape} (trained in {time.perf_counter() - t0:.0f} s; loss {curve[0]:.3g} -> {curve[-1]:.3g})")
        for rule, make in RULES.items():
            flagged, tenx, nan = judge(curve, make)
            print(f"  {rule:38s} {flagged * 10_000 / args.steps:7.1f} | {tenx:5.0%} | {nan:5.0%}", flush=True)


if __name__ == "__main__":
    main()
