"""Under torchrun (N ranks): a background save whose foreground waits on no other rank, and
staging that holds only what this rank writes.

Rank 0 does not even start its save until every other rank's ``save(blocking=False)`` has
returned (a flag file per rank): if the foreground waited on rank 0 in any collective, this
job would hang until the test's timeout. Then each rank prints, as one JSON line, the host bytes
it holds for staging and the bytes it was assigned, and after a restore whether the state came
back exactly.
"""

import json
import os
import sys
import time

import torch
import torch.distributed as dist

from elastic_resume import CheckpointManager, RNGState

root, flags = sys.argv[1], sys.argv[2]
dist.init_process_group("gloo")
rank, world = dist.get_rank(), dist.get_world_size()
torch.manual_seed(0)  # the same replicated state on every rank
model = torch.nn.Sequential(*[torch.nn.Linear(256, 256) for _ in range(6)])
opt = torch.optim.Adam(model.parameters())
model(torch.randn(4, 256)).sum().backward()
opt.step()
state = {"model": model, "optimizer": opt, "rng": RNGState()}
mgr = CheckpointManager(root, keep_last=None)
mgr.save(1, state, blocking=False)  # the first background save allocates the buffers
mgr.wait()

flag = os.path.join(flags, f"returned-{rank}")
if rank != 0:
    mgr.save(2, state, blocking=False)
    open(flag, "w").close()
else:
    deadline = time.monotonic() + 120
    while not all(os.path.exists(os.path.join(flags, f"returned-{r}")) for r in range(1, world)):
        if time.monotonic() > deadline:
            print(json.dumps({"rank": rank, "error": "another rank's save(blocking=False) never returned"}), flush=True)
            os._exit(3)
        time.sleep(0.05)
    mgr.save(2, state, blocking=False)
manifest = mgr.wait()
assert manifest is not None and manifest.step == 2
replicated = sum(t.numel() * t.element_size() for t in list(model.state_dict().values())
                 + [v for s in opt.state_dict()["state"].values() for v in s.values() if isinstance(v, torch.Tensor)])
written = sum(f.size for f in manifest.files if f.rank == rank and f.kind == "shared")
expected = {k: v.clone() for k, v in model.state_dict().items()}
with torch.no_grad():
    for p in model.parameters():
        p.zero_()
restored = mgr.restore(state, step=2)
exact = all(torch.equal(expected[k], v) for k, v in model.state_dict().items())
# One write per line (print writes the text and its newline separately, so the ranks' lines,
# sharing one pipe, could run together); a write this short to a pipe is atomic.
sys.stdout.write(json.dumps({"rank": rank, "staging_bytes": mgr.staging_bytes, "replicated_bytes": replicated,
                             "written_bytes": written, "restored": restored, "exact": exact}) + "\n")
sys.stdout.flush()
mgr.close()
dist.destroy_process_group()
