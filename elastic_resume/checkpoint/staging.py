"""Staging for background saves: reusable host buffers the tensors are copied into, so training can
change its tensors while the copies are written.

Only what this rank writes is staged (its slice of the replicated state, its per-rank state, its
shards): at N ranks each rank holds about 1/N of the replicated bytes, not a full copy. The
buffers are allocated and touched by the first save (page faults paid once, not in the training
loop's stall) and reused while shapes and dtypes stay the same.
"""

from __future__ import annotations

import torch


class Stager:
    """Copies tensors into buffers kept across saves (pinned when they come from a GPU)."""

    def __init__(self) -> None:
        self.buffers: list[torch.Tensor] = []

    @property
    def nbytes(self) -> int:
        """Host memory held for staging."""
        return sum(b.numel() * b.element_size() for b in self.buffers)

    def stage(self, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
        out = []
        pin = torch.cuda.is_available()
        any_cuda = False
        for i, t in enumerate(tensors):
            buf = self.buffers[i] if i < len(self.buffers) else None
            if buf is None or buf.shape != t.shape or buf.dtype != t.dtype:
                buf = torch.empty(t.shape, dtype=t.dtype, pin_memory=pin and t.is_cuda)
                if buf.numel():
                    buf.view(-1).view(torch.uint8).zero_() if buf.dtype != torch.bool else buf.zero_()
                if i < len(self.buffers):
                    self.buffers[i] = buf
                else:
                    self.buffers.append(buf)
            any_cuda |= t.is_cuda
            buf.copy_(t, non_blocking=t.is_cuda)
            out.append(buf)
        del self.buffers[len(tensors):]  # a smaller state no longer needs them
        if any_cuda:
            torch.cuda.synchronize()
        return out
