"""Saves or restores a replicated state at any world size (gloo on CPU), for the parallel-restore
tests: ``save`` commits steps 1 and 2; ``restore`` restores with ``--parallel 1`` (each rank
reads a share of the replicated files and the ranks exchange them) or ``0`` (every rank reads
every file), then writes this rank's step and a digest of every restored byte to ``--out``."""

from __future__ import annotations

import argparse
import hashlib
import json

import torch
import torch.distributed as dist

from elastic_resume import CheckpointManager


def build() -> dict:
    torch.manual_seed(0)
    model = torch.nn.Sequential(*[torch.nn.Linear(64, 64) for _ in range(8)])
    return {"model": model, "progress": {"step": 0}}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("mode", choices=["save", "restore"])
    p.add_argument("--root", required=True)
    p.add_argument("--options", default="{}")
    p.add_argument("--parallel", type=int, default=1)
    p.add_argument("--out")
    args = p.parse_args()
    dist.init_process_group("gloo")
    state = build()
    mgr = CheckpointManager(args.root, storage_options=json.loads(args.options), keep_last=None,
                            parallel_restore=bool(args.parallel))
    if args.mode == "save":
        for step in (1, 2):
            with torch.no_grad():
                for param in state["model"].parameters():
                    param.add_(step)
            state["progress"]["step"] = step
            mgr.save(step, state)
    else:
        with torch.no_grad():
            for param in state["model"].parameters():
                param.zero_()
        step = mgr.restore(state)
        digest = hashlib.sha256()
        for t in state["model"].state_dict().values():
            digest.update(t.numpy().tobytes())
        with open(f"{args.out}.{dist.get_rank()}", "w") as f:
            json.dump({"step": step, "progress": state["progress"], "digest": digest.hexdigest()}, f)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
