"""Save step 1, start an async save of step 2, and SIGKILL this process while it is written."""

import os
import signal
import sys

import torch

from elastic_resume import CheckpointManager

root = sys.argv[1]
mgr = CheckpointManager(root, keep_last=None)
state = {"w": torch.randn((128 << 20) // 4)}  # 128 MiB: the background write takes a while
mgr.save(1, state)
mgr.save(2, state, blocking=False)
assert mgr.save_in_progress
print("async save started", flush=True)
os.kill(os.getpid(), signal.SIGKILL)
