"""``elastic-resume launch``: torchrun's launcher plus what a long training job needs.

- ``launch.py``   the plan (flags, detected defaults, worker environment) and the run: torch's
  elastic agent with our hooks, preemption signals, requeue, exit codes
- ``detect.py``   pure detection of the platform (Slurm, Kubernetes Indexed Job, JobSet, PyTorchJob)
- ``worker.py``   what each worker process runs before the training script
- ``slurm.py``    the sbatch script generator (pure; pinned by a golden file)
"""

from __future__ import annotations
