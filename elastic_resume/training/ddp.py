"""Bit-exact resume with DistributedDataParallel on three or more ranks.

DDP lays its gradient buckets out anew after its first backward (in the order gradients became
ready). With three or more ranks, that layout decides in which order the ranks' gradients are
added, so the first step of a restarted process rounds differently (last bits) from the same
step of a run that never stopped, and the runs drift apart from there. One throw-away backward
right after wrapping the model settles the layout, in every run alike; then a resumed run
reproduces an uninterrupted one bit for bit (with two ranks the sum is order-free anyway).
"""

from __future__ import annotations

from typing import Any

import torch

from ..errors import ConfigTypeError


def _zero_loss(out: Any) -> torch.Tensor:
    """A zero that depends on every floating-point tensor in the output."""
    if isinstance(out, torch.Tensor):
        return out.float().sum() * 0.0
    if isinstance(out, dict):
        out = list(out.values())
    if isinstance(out, (list, tuple)):
        parts = [_zero_loss(o) for o in out if isinstance(o, (torch.Tensor, list, tuple, dict))]
        if parts:
            return torch.stack(parts).sum()
    raise ConfigTypeError(f"settle_ddp_buckets: cannot build a loss from a model output of type {type(out).__name__}")


def settle_ddp_buckets(ddp_model: torch.nn.Module, *example_inputs: Any, **example_kwargs: Any) -> None:
    """Run one forward and backward on ``example_inputs`` that changes nothing: eval mode (no
    dropout draws, no batch-norm statistics), a loss of exactly zero, the gradients dropped
    afterwards, no optimizer step. Call it on every rank right after ``DDP(model)``, before
    restoring a checkpoint (it is collective: DDP all-reduces the zero gradients)."""
    module = getattr(ddp_model, "module", ddp_model)
    was_training = module.training
    module.eval()
    try:
        _zero_loss(ddp_model(*example_inputs, **example_kwargs)).backward()
    finally:
        module.zero_grad(set_to_none=True)
        module.train(was_training)
