"""Loss spikes: detected, agreed across ranks, rolled back in-process.

- ``detectors.py`` pure detectors fed floats (threshold, ratios, robust z-score, CUSUM, NaN/Inf, plateau)
- ``vote.py``      the one per-step collective: every rank's flags and losses in one all_reduce
- ``policy.py``    the pure decision from a vote to an action (continue, save, roll back, stop)
- ``guard.py``     ``SpikeGuard``: the loop API that runs the three and performs the rollback
- ``backend.py``   the contract between the guard and whatever holds its checkpoints
"""

from __future__ import annotations
