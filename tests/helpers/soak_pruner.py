"""Soak helper: prune ROOT down to its newest loadable step, again and again, until killed."""

import sys

from elastic_resume.checkpoint.store import CheckpointStore
from elastic_resume.storage import open_storage

store = CheckpointStore(open_storage(sys.argv[1]))
while True:
    store.prune(keep_last=1)
