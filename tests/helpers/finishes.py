"""A two-rank script in the tutorial's shape: DDP, a few steps, its own ``destroy_process_group()``
at the end. With torch 2.13 gloo may abort such a process at exit (SIGABRT) after it finished."""

import torch
import torch.distributed as dist

dist.init_process_group("gloo")
model = torch.nn.parallel.DistributedDataParallel(torch.nn.Linear(8, 8))
opt = torch.optim.SGD(model.parameters(), lr=0.1)
for _ in range(20):
    opt.zero_grad()
    model(torch.randn(4, 8)).sum().backward()
    opt.step()
print(f"rank {dist.get_rank()} finished", flush=True)
dist.destroy_process_group()
