"""A training script that lets a GaveUpError escape (no try/except), as a user's would."""

import torch.distributed as dist

from elastic_resume import GaveUpError

dist.init_process_group("gloo")
raise GaveUpError(f"rank {dist.get_rank()}: loss spike with the rollback budget spent (test)")
