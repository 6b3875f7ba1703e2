"""Soak helper: resume from ROOT, then save step after step (blocking), printing
``committed N`` once each save has returned, until killed."""

import random
import sys

import torch

from elastic_resume import CheckpointManager

root = sys.argv[1]
mgr = CheckpointManager(root, keep_last=2, max_resumes_per_step=0)
state = {"w": torch.zeros(50_000), "step": -1}
restored = mgr.restore(state)
step = 0 if restored is None else restored + 1
rng = random.Random()
while True:
    state["w"].fill_(float(step))
    state["step"] = step
    mgr.save(step, state)
    print(f"committed {step}", flush=True)
    step += rng.choice((1, 1, 2))
