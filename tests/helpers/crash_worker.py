"""Processes for the crash-consistency test, driven over stdin/stdout.

``writer`` mode is a zygote: it imports torch once, then on each ``spawn`` line forks a child
that saves checkpoints in a loop (the child is what the test SIGKILLs at random moments; forking
keeps each kill cycle at milliseconds instead of a torch import). Each child appends the steps it
saw committed to a progress file.

``verifier`` mode answers each ``check`` line by building a brand-new CheckpointManager and
restoring, then comparing every tensor byte with what the writer saved for that step.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import s3fs  # noqa: F401
import torch

# Imported once in the zygote so that forked writers start saving at once; importing creates no
# event loop or connection, so nothing unsafe crosses the fork.
import elastic_resume.checkpoint.manager  # noqa: F401

torch.set_num_threads(1)


def state_for(step: int) -> dict:
    """The exact state saved at ``step``: anyone can recompute it to compare bytes."""
    g = torch.Generator().manual_seed(step)
    return {
        "w": torch.randn(192, 1024, generator=g),  # 768 KiB
        "b": torch.randint(0, 255, ((step % 7) * 4099 + 13,), generator=g, dtype=torch.uint8),
        "step": step,
    }


def writer_loop(root: str, options: dict, progress: str) -> None:
    from elastic_resume import CheckpointManager

    mgr = CheckpointManager(root, storage_options=options, keep_last=3)
    steps = mgr.committed_steps()
    step = (steps[0] if steps else 0) + 1
    while True:
        mgr.save(step, state_for(step))
        with open(progress, "a") as f:
            f.write(f"{step}\n")
        step += 1


def writer(args: argparse.Namespace) -> None:
    options = json.loads(args.options)
    for line in sys.stdin:
        cmd = line.split()
        if cmd[0] == "spawn":
            pid = os.fork()
            if pid == 0:
                try:
                    writer_loop(args.root, options, cmd[1])
                finally:
                    os._exit(0)
            print(f"pid {pid}", flush=True)
        elif cmd[0] == "reap":
            os.waitpid(int(cmd[1]), 0)
            print("reaped", flush=True)


def verifier(args: argparse.Namespace) -> None:
    from elastic_resume import CheckpointManager

    options = json.loads(args.options)
    for line in sys.stdin:
        if line.strip() != "check":
            continue
        try:
            state = {"w": None, "b": None, "step": None}
            step = CheckpointManager(args.root, storage_options=options, read_only=True).restore(state)
            if step is None:
                print("none", flush=True)
                continue
            want = state_for(step)
            same = (
                state["step"] == step
                and state["w"].dtype == want["w"].dtype and torch.equal(state["w"], want["w"])
                and torch.equal(state["b"], want["b"])
            )
            print(f"ok {step}" if same else f"mismatch {step}", flush=True)
        except Exception as e:  # noqa: BLE001 - reported to the test, which fails on it
            print(f"error {type(e).__name__}: {e}".replace("\n", " "), flush=True)


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("mode", choices=["writer", "verifier"])
    p.add_argument("--root", required=True)
    p.add_argument("--options", default="{}")
    a = p.parse_args()
    writer(a) if a.mode == "writer" else verifier(a)
