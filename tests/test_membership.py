"""One owner of membership: a job re-formed in-process at a smaller world keeps its manager and vote
objects, and they save, restore and vote at the new size after one ``reconfigure()``."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from harness.processes import REPO, child_env


def test_a_reformed_world_is_one_call_for_every_consumer(tmp_path):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=3", "--monitor-interval=0.5",
           os.path.join(REPO, "tests", "helpers", "reform_job.py"), str(tmp_path / "ckpt"), str(tmp_path)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=240,
                       env=child_env({"TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"}))
    assert r.returncode == 0, r.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank-{rank}.json").read_text()) for rank in range(3)]
    assert [o["rank0"] for o in ranks] == [0, 1, 2]
    assert all(o["vote0"] == {"world": 3, "mean_loss": 1.0} and o["generation0"] == 0 for o in ranks)
    # The subgroup of global ranks 1 and 2: its own ranks 0 and 1, and its rank 0 is global rank 1.
    assert ranks[1]["sub"] == [0, 2, "from global rank 1"] and ranks[2]["sub"] == [1, 2, "from global rank 1"]
    assert ranks[2].get("left")
    for rank, o in enumerate(ranks[:2]):
        assert o["generation"] == 1 and o["rank"] == rank and o["world"] == 2 and o["events_rank"] == rank, o
        assert o["saved_world"] == 2 and o["restored"] == 2 and o["tier"] == "memory" and o["step"] == 2, o
        assert o["restored_old"] == 1  # saved at world size 3, restored at 2
        assert o["vote1"] == {"world": 2, "mean_loss": 0.5}, o
