"""A job whose world is re-formed in-process (run under torchrun, 3 ranks): the last rank leaves,
the others abort every group, initialise the default group again at world size 2 (a new store
prefix: a new generation) and call ``membership.current().reconfigure()``. The same manager and
vote objects then save, restore and vote at the new size. Each rank writes what it saw to
``OUT/rank-N.json`` (workers' stdout lines can interleave)."""

from __future__ import annotations

import datetime
import json
import os
import sys

import torch
import torch.distributed as dist

from elastic_resume import CheckpointManager, membership
from elastic_resume.collectives import TorchGroup
from elastic_resume.spike.vote import Vote


def init(store: dist.Store, generation: int, rank: int, world: int) -> None:
    dist.init_process_group("gloo", store=dist.PrefixStore(f"generation-{generation}", store), rank=rank,
                            world_size=world, timeout=datetime.timedelta(seconds=60))


def vote_once(vote: Vote, step: int, loss: float) -> dict:
    result = vote.submit(step, values=[(step, loss, None)], spike=False, nonfinite=False, preempt=False, stop=False)
    assert result is not None
    return {"world": result.world_size, "mean_loss": result.mean_loss}


def report(out_dir: str, out: dict) -> None:
    with open(os.path.join(out_dir, f"rank-{out['rank0']}.json"), "w") as f:
        json.dump(out, f)


def main() -> int:
    root, out_dir = sys.argv[1], sys.argv[2]
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    # The store outlives the process groups (rank 0 hosts it; rank 0 stays).
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world, rank == 0,
                          timeout=datetime.timedelta(seconds=60))
    init(store, 0, rank, world)
    torch.manual_seed(0)
    model = torch.nn.Linear(8, 8)
    state = {"model": model, "progress": {"step": 1}}
    member = membership.current()
    mgr = CheckpointManager(root, keep_last=None)
    vote = Vote(lag=0)
    out: dict = {"pid": os.getpid(), "rank0": rank}
    # A subgroup's handle speaks in the subgroup's ranks (ranks 1 and 2 are its 0 and 1).
    sub = dist.new_group([1, 2], backend="gloo")
    if rank in (1, 2):
        handle = TorchGroup(group=sub)
        out["sub"] = [handle.rank, handle.world_size, handle.broadcast_object(f"from global rank {rank}", src=0)]
    mgr.save(1, state)
    out["vote0"] = vote_once(vote, 1, float(rank))
    out["generation0"] = member.generation

    member.abort()  # every group, ours and the default one
    if rank == world - 1:  # this one leaves
        out["left"] = True
        report(out_dir, out)
        return 0
    init(store, 1, rank, world - 1)
    member.reconfigure()
    state["progress"]["step"] = 2
    manifest = mgr.save(2, state)
    assert manifest is not None
    state["progress"]["step"] = 0
    out.update(generation=member.generation, rank=mgr.rank, world=mgr.world_size, saved_world=manifest.world_size,
               restored=mgr.restore(state, step=2), tier=mgr.last_restore_tier, step=state["progress"]["step"],
               restored_old=mgr.restore(state, step=1), events_rank=mgr.events.rank, vote1=vote_once(vote, 2, float(rank)))
    mgr.close()
    report(out_dir, out)
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
