"""An FSDP2 (fully_shard, DTensor) job on CPU with gloo, for the sharded-checkpoint test.

``save``: train a few steps, save through CheckpointManager, and write the full (unsharded)
parameters and optimizer moments to ``--reference`` as JSON. ``restore``: build the same model
at any world size, restore, and write the full tensors to ``--out`` for comparison.
"""

from __future__ import annotations

import argparse
import json

import torch
import torch.distributed as dist
from torch.distributed.fsdp import fully_shard

from elastic_resume import CheckpointManager


def full_state(model: torch.nn.Module, opt: torch.optim.Optimizer) -> dict[str, list[float]]:
    out = {}
    for name, p in model.named_parameters():
        out[f"param.{name}"] = p.full_tensor().flatten().tolist()
        st = opt.state.get(p, {})
        if "exp_avg" in st:
            out[f"exp_avg.{name}"] = st["exp_avg"].full_tensor().flatten().tolist()
    return out


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("mode", choices=["save", "restore"])
    p.add_argument("--root", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--blocking", type=int, default=1)
    args = p.parse_args()
    dist.init_process_group("gloo")
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 8))
    for layer in (model[0], model[2]):
        fully_shard(layer)
    fully_shard(model)
    opt = torch.optim.AdamW(model.parameters(), lr=0.01)
    state = {"model": model, "optimizer": opt, "progress": {"step": 0}}
    mgr = CheckpointManager(args.root)
    if args.mode == "save":
        g = torch.Generator().manual_seed(dist.get_rank())
        for step in range(1, 4):
            loss = model(torch.randn(4, 16, generator=g)).pow(2).mean()
            loss.backward()
            opt.step()
            opt.zero_grad()
            state["progress"]["step"] = step
        mgr.save(3, state, blocking=bool(args.blocking))
        mgr.wait()
    else:
        assert mgr.restore(state) == 3
        assert state["progress"] == {"step": 3}
    full = full_state(model, opt)
    if dist.get_rank() == 0:
        with open(args.out, "w") as f:
            json.dump(full, f)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
